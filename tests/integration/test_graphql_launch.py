"""API-triggered chunk runs: a real ``dagster-webserver`` and ``dagster-daemon`` on
loopback; runs submitted over GraphQL (Python client with the ``dagster/partition`` tag, and a
``launchPartitionBackfill`` mutation) import their chunks; a run for a chunk a worker holds
fails fast with a clear message and leaves the lease alone.

The operator's view, read over GraphQL: the parent-report sensor (ticking every second here)
materializes a finished import as its own partition of ``miroir/dump_import`` with its totals,
shows a cancelled import's partition as failed, and the prune job removes the partitions of what
it deletes.

The dispatch sensor is turned off (``MIROIR_DISPATCH_ENABLED=0``) so every chunk run here is one
the test launched.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
from dagster_graphql import DagsterGraphQLClient

from miroir_pipeline.dagster.parent_reports import PARENT_REPORT_INTERVAL_ENV, report_key
from miroir_pipeline.dagster.sensors import DISPATCH_ENABLED_ENV
from miroir_pipeline.jobs.dump_import import PlannedImport
from miroir_pipeline.queue import JobNotFound, JobStore, open_store
from miroir_pipeline.queue.contract import JobState
from tests.integration.test_sensors import (
    LOCATION_NAME,
    NAMES,
    VENV_BIN,
    ServiceProcess,
    free_port,
    pipeline_env,
    plan_import,
    start_daemon,
    wait_for,
    write_dagster_home,
    write_topology,
    write_workspace,
)

#: The chunk job of dump imports in the default code location.
DUMP_CHUNK_JOB = NAMES.chunk_job("dump_import")
READY_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 90.0
#: Time for the report sensor to see a finished parent and its run to record it.
RECORD_TIMEOUT_S = 120.0

_PARENT_ASSET_QUERY = """
query ParentAsset($path: [String!]!, $partitions: [String!]) {
  assetNodeOrError(assetKey: {path: $path}) {
    __typename
    ... on AssetNode {
      partitionKeys
      assetPartitionStatuses {
        __typename
        ... on DefaultPartitionStatuses { materializedPartitions failedPartitions }
      }
      assetMaterializations(partitions: $partitions) {
        partition
        metadataEntries {
          label
          __typename
          ... on IntMetadataEntry { intRepr }
          ... on FloatMetadataEntry { floatValue }
          ... on JsonMetadataEntry { jsonString }
          ... on TextMetadataEntry { text }
          ... on PathMetadataEntry { path }
        }
      }
    }
  }
}
"""

_WORKSPACE_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries {
    name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""

_BACKFILL_MUTATION = """
mutation Backfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on PartitionSetNotFoundError { message }
    ... on PartitionKeysNotFoundError { message }
  }
}
"""


@dataclass
class Services:
    root: Path
    home: Path
    topology: Path
    store: JobStore
    url: str
    client: DagsterGraphQLClient
    instance: dg.DagsterInstance
    daemon: ServiceProcess
    webserver: ServiceProcess

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = httpx.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=30)
        resp.raise_for_status()
        body: dict[str, Any] = resp.json()
        assert "errors" not in body, body["errors"]
        return body["data"]  # type: ignore[no-any-return]

    def plan(self, size: int, chunk_size: int, index: str) -> list[str]:
        """Plan an import with the core planner and register its chunks as partitions."""
        return self.plan_parent(size, chunk_size, index).chunk_ids

    def plan_parent(self, size: int, chunk_size: int, index: str) -> PlannedImport:
        planned = plan_import(self.store, self.root, self.topology, size=size, chunk_size=chunk_size, index=index)
        self.instance.add_dynamic_partitions(NAMES.partitions("dump_import"), planned.chunk_ids)
        return planned

    def import_all(self, planned: PlannedImport) -> None:
        """Run every chunk of ``planned`` over GraphQL, to a completed parent."""
        run_ids = [self.client.submit_job_execution(DUMP_CHUNK_JOB, tags={"dagster/partition": c}) for c in planned.chunk_ids]
        runs = self.wait_runs(run_ids, f"the chunk runs of {planned.parent.id}")
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), self.daemon.log_tail()
        assert self.store.get(planned.parent.id).state == JobState.COMPLETED

    def parent_asset(self, partitions: list[str] | None = None) -> dict[str, Any]:
        """The ``miroir/dump_import`` asset node as the UI reads it (materializations of ``partitions``)."""
        path = NAMES.parent_asset_key("dump_import").path
        node = self.graphql(_PARENT_ASSET_QUERY, {"path": path, "partitions": partitions or []})["assetNodeOrError"]
        assert node["__typename"] == "AssetNode", node
        return node  # type: ignore[no-any-return]

    def statuses(self) -> dict[str, list[str]]:
        statuses = self.parent_asset()["assetPartitionStatuses"]
        assert statuses["__typename"] == "DefaultPartitionStatuses", statuses
        return statuses  # type: ignore[no-any-return]

    def wait_recorded(self, parent_id: str, status: str) -> None:
        """Until ``parent_id``'s partition is listed as ``status`` (materialized or failed)."""
        wait_for(
            f"the report sensor to record {parent_id} as {status}",
            lambda: parent_id in self.statuses()[f"{status}Partitions"],
            RECORD_TIMEOUT_S,
            self.daemon,
            self.webserver,
        )

    def wait_runs(self, run_ids: list[str], what: str) -> list[dg.DagsterRun]:
        def finished() -> bool:
            runs = [self.instance.get_run_by_id(r) for r in run_ids]
            return all(r is not None and r.is_finished for r in runs)

        wait_for(what, finished, RUN_TIMEOUT_S, self.daemon, self.webserver)
        return [r for r in (self.instance.get_run_by_id(i) for i in run_ids) if r is not None]


def _location_loaded(url: str) -> bool:
    try:
        resp = httpx.post(f"{url}/graphql", json={"query": _WORKSPACE_QUERY}, timeout=5)
    except httpx.TransportError:
        return False
    if resp.status_code != 200:
        return False
    entries = resp.json().get("data", {}).get("workspaceOrError", {}).get("locationEntries") or []
    for entry in entries:
        if entry["name"] == LOCATION_NAME and entry["loadStatus"] == "LOADED":
            loaded = entry["locationOrLoadError"]
            assert loaded["__typename"] == "RepositoryLocation", f"code location failed to load: {loaded}"
            return True
    return False


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    root = tmp_path_factory.mktemp("graphql")
    dsn = f"sqlite:///{root / 'jobs.sqlite3'}"
    topology = write_topology(root)
    home = write_dagster_home(root / "dagster")
    workspace = write_workspace(root / "workspace.yaml")
    env = pipeline_env(root, dsn, topology, **{DISPATCH_ENABLED_ENV: "0", PARENT_REPORT_INTERVAL_ENV: "1"})
    store = open_store(dsn)
    port = free_port()
    daemon = start_daemon(root, env, workspace)
    webserver = ServiceProcess.start(
        "dagster-webserver",
        [str(VENV_BIN / "dagster-webserver"), "-h", "127.0.0.1", "-p", str(port), "-w", str(workspace)],
        env,
        root / "webserver.log",
        root,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("the webserver to load the code location", lambda: _location_loaded(url), READY_TIMEOUT_S, webserver, daemon)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            yield Services(
                root=root,
                home=home,
                topology=topology,
                store=store,
                url=url,
                client=DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=30),
                instance=instance,
                daemon=daemon,
                webserver=webserver,
            )
    finally:
        webserver.stop()
        daemon.stop()
        store.close()


def test_python_client_launches_one_chunk(services: Services) -> None:
    chunk, *_rest = services.plan(size=48 * 1024, chunk_size=16 * 1024, index="client")
    run_id = services.client.submit_job_execution(DUMP_CHUNK_JOB, tags={"dagster/partition": chunk})

    (run,) = services.wait_runs([run_id], f"the GraphQL-submitted run of {chunk}")

    assert run.status == dg.DagsterRunStatus.SUCCESS, services.daemon.log_tail()
    assert run.tags["dagster/partition"] == chunk
    row = services.store.get(chunk)
    assert row.state == JobState.COMPLETED and row.progress["docs_routed"] > 0
    assert all(services.store.get(c).state == JobState.QUEUED for c in _rest)  # only that chunk ran


def test_partition_backfill_mutation_imports_several_chunks(services: Services) -> None:
    chunks = services.plan(size=64 * 1024, chunk_size=16 * 1024, index="backfill")
    assert len(chunks) >= 3
    data = services.graphql(
        _BACKFILL_MUTATION,
        {
            "params": {
                "selector": {
                    "partitionSetName": f"{DUMP_CHUNK_JOB}_partition_set",
                    "repositorySelector": {"repositoryLocationName": LOCATION_NAME, "repositoryName": "__repository__"},
                },
                "partitionNames": chunks,
            }
        },
    )["launchPartitionBackfill"]
    assert data["__typename"] == "LaunchBackfillSuccess", data
    backfill_id = data["backfillId"]

    def backfill_runs() -> list[dg.DagsterRun]:
        return list(services.instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id})))

    wait_for("the backfill to launch a run per chunk", lambda: len(backfill_runs()) == len(chunks), RUN_TIMEOUT_S, services.daemon)
    runs = services.wait_runs([r.run_id for r in backfill_runs()], f"the runs of backfill {backfill_id}")

    assert sorted(r.tags["dagster/partition"] for r in runs) == sorted(chunks)
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), services.daemon.log_tail()
    assert all(services.store.get(c).state == JobState.COMPLETED for c in chunks)


def test_run_for_a_chunk_a_worker_holds_fails_fast_and_leaves_the_lease(services: Services) -> None:
    (chunk,) = services.plan(size=16 * 1024, chunk_size=16 * 1024, index="held")
    lease = services.store.claim_by_id(chunk, "pool-worker-7", 600)
    submitted = time.monotonic()
    run_id = services.client.submit_job_execution(DUMP_CHUNK_JOB, tags={"dagster/partition": chunk})

    (run,) = services.wait_runs([run_id], f"the run of held chunk {chunk} to end")

    assert run.status == dg.DagsterRunStatus.FAILURE
    record = services.instance.get_run_record_by_id(run_id)
    assert record is not None and record.start_time is not None and record.end_time is not None
    assert record.end_time - record.start_time < 30, "the run should give up at once, not wait for the lease"
    assert time.monotonic() - submitted < 60
    failures = services.instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    assert len(failures) == 1
    data = failures[0].dagster_event.step_failure_data  # type: ignore[union-attr]
    message = str(data.user_failure_data.description if data.user_failure_data else data.error)
    assert f"job {chunk} cannot be claimed" in message
    assert "it is leased by pool-worker-7" in message
    row = services.store.get(chunk)
    assert (row.state, row.claim_token, row.claimed_by) == (JobState.IN_PROGRESS, lease.token, "pool-worker-7")
    assert row.attempts == 1 and row.error is None


# -- the operator's view ---------------------------------------------------------------------------
def _metadata(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Metadata entries as plain values."""
    out: dict[str, Any] = {}
    for e in entries:
        kind = e["__typename"]
        if kind == "IntMetadataEntry":
            out[e["label"]] = int(e["intRepr"])
        elif kind == "FloatMetadataEntry":
            out[e["label"]] = float(e["floatValue"])
        elif kind == "JsonMetadataEntry":
            out[e["label"]] = json.loads(e["jsonString"])
        elif kind == "TextMetadataEntry":
            out[e["label"]] = e["text"]
        elif kind == "PathMetadataEntry":
            out[e["label"]] = e["path"]
    return out


def _report_runs(services: Services, parent_id: str) -> list[dg.DagsterRun]:
    return list(
        services.instance.get_runs(
            dg.RunsFilter(job_name=NAMES.parent_report_job("dump_import"), tags={"dagster/partition": parent_id})
        )
    )


def test_a_finished_import_is_materialized_as_its_own_partition(services: Services) -> None:
    planned = services.plan_parent(size=48 * 1024, chunk_size=16 * 1024, index="recorded")
    parent_id = planned.parent.id
    services.import_all(planned)

    services.wait_recorded(parent_id, "materialized")

    node = services.parent_asset([parent_id])
    assert parent_id in node["partitionKeys"]
    (mat,) = node["assetMaterializations"]
    assert mat["partition"] == parent_id
    meta = _metadata(mat["metadataEntries"])
    summary = services.store.parent_summary(parent_id)
    assert meta["state"] == "completed" and meta["parent_job_id"] == parent_id
    assert meta["documents"] == summary.progress["docs_routed"] > 0
    assert meta["per_node"] == summary.progress["per_node"]
    assert sum(meta["per_node"].values()) == meta["documents"]
    assert meta["invalid_documents"] == 0
    assert meta["bytes"] == planned.bytes_total and meta["mb_per_s"] >= 0.0
    assert meta["chunks"] == meta["chunks_completed"] == len(planned.chunk_ids)
    # recorded once, by the sensor, keyed by the parent and its finish; the materialization is
    # stored before the run itself ends, so wait for the run's own end
    (run,) = _report_runs(services, parent_id)
    (run,) = services.wait_runs([run.run_id], "the report run to finish")
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert run.tags["dagster/run_key"] == report_key(services.store.get(parent_id))
    assert run.tags["dagster/run_key"].startswith(f"{parent_id}:completed:")
    assert run.tags["dagster/sensor_name"] == NAMES.parent_report_sensor


def test_a_cancelled_import_shows_as_failed(services: Services) -> None:
    planned = services.plan_parent(size=32 * 1024, chunk_size=16 * 1024, index="cancelled")
    parent_id = planned.parent.id
    services.store.cancel(parent_id, "wrong index")

    services.wait_recorded(parent_id, "failed")

    assert parent_id not in services.statuses()["materializedPartitions"]
    assert services.parent_asset([parent_id])["assetMaterializations"] == []
    (run,) = _report_runs(services, parent_id)
    (run,) = services.wait_runs([run.run_id], "the report run to finish")
    assert run.status == dg.DagsterRunStatus.FAILURE
    assert run.tags["dagster/run_key"].startswith(f"{parent_id}:failed:")
    (failure,) = services.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    data = failure.dagster_event.step_failure_data  # type: ignore[union-attr]
    assert data.user_failure_data is not None
    assert f"{parent_id} failed: wrong index" in str(data.user_failure_data.description)
    facts = {k: v.value for k, v in data.user_failure_data.metadata.items()}
    assert facts["state"] == "failed" and facts["chunks_failed"] == len(planned.chunk_ids)
    assert [c["id"] for c in facts["failed_chunks"]] == planned.chunk_ids


def test_the_prune_job_removes_the_partitions_of_what_it_deletes(services: Services) -> None:
    done = services.plan_parent(size=32 * 1024, chunk_size=16 * 1024, index="prune-done")
    services.import_all(done)
    cancelled = services.plan_parent(size=32 * 1024, chunk_size=16 * 1024, index="prune-cancelled")
    services.store.cancel(cancelled.parent.id)
    services.wait_recorded(done.parent.id, "materialized")
    services.wait_recorded(cancelled.parent.id, "failed")
    chunk_partitions = NAMES.partitions("dump_import")
    ours = set(done.chunk_ids + cancelled.chunk_ids)
    assert ours <= set(services.instance.get_dynamic_partitions(chunk_partitions))

    run_id = services.client.submit_job_execution(
        NAMES.prune_job, run_config={"ops": {NAMES.prune_op: {"config": {"older_than_s": 0}}}}
    )
    (run,) = services.wait_runs([run_id], "the prune run")

    assert run.status == dg.DagsterRunStatus.SUCCESS, services.daemon.log_tail()
    assert not ours & set(services.instance.get_dynamic_partitions(chunk_partitions))
    parents = {done.parent.id, cancelled.parent.id}
    assert not parents & set(services.instance.get_dynamic_partitions(NAMES.parent_partitions("dump_import")))
    assert not parents & set(services.parent_asset()["partitionKeys"])  # the UI no longer lists them
    for parent_id in parents:
        with pytest.raises(JobNotFound):
            services.store.get(parent_id)
