"""API-triggered chunk runs: a real ``dagster-webserver`` and ``dagster-daemon`` on
loopback; runs submitted over GraphQL (Python client with the ``dagster/partition`` tag, and a
``launchPartitionBackfill`` mutation) import their chunks; a run for a chunk a worker holds
fails fast with a clear message and leaves the lease alone.

The dispatch sensor is turned off (``MIROIR_DISPATCH_ENABLED=0``) so every run here is one the
test launched.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
from dagster_graphql import DagsterGraphQLClient

from miroir_pipeline.dagster.sensors import DISPATCH_ENABLED_ENV
from miroir_pipeline.queue import JobStore, open_store
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
        planned = plan_import(self.store, self.root, self.topology, size=size, chunk_size=chunk_size, index=index)
        self.instance.add_dynamic_partitions(NAMES.partitions("dump_import"), planned.chunk_ids)
        return planned.chunk_ids

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
    env = pipeline_env(root, dsn, topology, **{DISPATCH_ENABLED_ENV: "0"})
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
