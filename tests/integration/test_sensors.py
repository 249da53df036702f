"""The dispatch and queue-depth sensors against real Dagster instances, a real Pushgateway and,
at the end, a real ``dagster-daemon`` that dispatches and completes chunks.

The service helpers at the top (free port, topology, Dagster home, workspace, process group
control) are shared with ``test_graphql_launch.py`` and ``test_worker_pool.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._core.test_utils import create_run_for_test

from miroir_pipeline import metrics
from miroir_pipeline.dagster import MiroirNames, miroir_definitions
from miroir_pipeline.dagster.names import TAG_CHUNK_RUN, TAG_WORKER_ID
from miroir_pipeline.dagster.resources import JobStoreResource, PushgatewayResource, targets_for
from miroir_pipeline.dagster.sensors import DISPATCH_ENABLED_ENV, MAX_CHUNK_RUNS_ENV
from miroir_pipeline.fleet.topology import Topology, load_topology
from miroir_pipeline.jobs.dump_import import DumpImportRequest, PlannedImport, plan_dump_import
from miroir_pipeline.jobs.dump_import.sample_dump import write_sample_dump
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import JobStore, open_store
from miroir_pipeline.queue.contract import JobState, NewChunk
from tests.fixtures.pushgateway import Pushgateway, samples_of

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
LOCATION_NAME = "miroir_pipeline"
#: The names of the default code location (``definitions.py`` at the repo root).
NAMES = MiroirNames()
STOP_TIMEOUT_S = 15.0


# -- shared helpers ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_topology(root: Path, nodes: int = 3, shards: int = 16, replication_factor: int = 1) -> Path:
    """A one-group topology of ``nodes`` local node stores under ``root/nodes``."""
    data = {
        "shards": shards,
        "replication_factor": replication_factor,
        "groups": [
            {
                "id": 0,
                "nodes": [
                    {"id": f"node-{i}", "url": f"local://{root / 'nodes' / f'node-{i}'}"}
                    for i in range(nodes)
                ],
            }
        ],
    }
    path = root / "topology.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_dagster_home(home: Path, *, source: Path = REPO_ROOT / "miroir_pipeline" / "dagster" / "dagster.yaml", dequeue_interval_seconds: int = 1) -> Path:
    """``home/dagster.yaml`` from a shipped instance config (``source``), dequeuing every second
    for tests, with its storage created here before any service starts: processes creating
    the same fresh SQLite storages at once race on their schema."""
    home.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(source.read_text())
    config["run_coordinator"]["config"]["dequeue_interval_seconds"] = dequeue_interval_seconds
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.get_runs(limit=1)
    return home


def write_workspace(path: Path) -> Path:
    """A workspace that loads the default code location (``definitions.py``) from the checkout."""
    path.write_text(
        yaml.safe_dump(
            {
                "load_from": [
                    {
                        "python_file": {
                            "relative_path": str(REPO_ROOT / "definitions.py"),
                            "working_directory": str(REPO_ROOT),
                            "location_name": LOCATION_NAME,
                        }
                    }
                ]
            }
        )
    )
    return path


def pipeline_env(root: Path, jobs_dsn: str, topology: Path, **extra: str) -> dict[str, str]:
    """Environment of a pipeline process (worker, daemon, webserver) rooted in ``root``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIROIR_", "DAGSTER_"))}
    env.update(
        {
            "DAGSTER_HOME": str(root / "dagster"),
            "MIROIR_HOME": str(root / "miroir"),
            "MIROIR_JOBS_DSN": jobs_dsn,
            "MIROIR_TOPOLOGY": str(topology),
            "MIROIR_ALLOWED_ROOTS": str(root),
            "MIROIR_STAGING_DIR": str(root / "staging"),
            "MIROIR_DEAD_LETTER_DIR": str(root / "dead-letter"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


@dataclass
class ServiceProcess:
    """A process we started in its own process group; :meth:`stop` ends the whole group."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, name: str, cmd: list[str], env: Mapping[str, str], log_path: Path, cwd: Path) -> ServiceProcess:
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                cmd,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(name, proc, log_path)

    def log_tail(self, chars: int = 4000) -> str:
        return f"--- {self.name} log ({self.log_path}) ---\n" + self.log_path.read_text(errors="replace")[-chars:]

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL whatever is left after the timeout."""
        self.signal_group(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.signal_group(signal.SIGKILL)  # run subprocesses of the group may outlive the leader
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT_S)


def start_daemon(root: Path, env: Mapping[str, str], workspace: Path) -> ServiceProcess:
    return ServiceProcess.start(
        "dagster-daemon",
        [str(VENV_BIN / "dagster-daemon"), "run", "-w", str(workspace)],
        env,
        root / "daemon.log",
        REPO_ROOT,
    )


def wait_for(what: str, check: Callable[[], bool], timeout: float, *services: ServiceProcess) -> None:
    """Poll ``check`` until true; fail naming ``what`` (with the services' logs) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for svc in services:
            if svc.proc.poll() is not None:
                pytest.fail(f"{svc.name} exited ({svc.proc.returncode}) while waiting for {what}\n{svc.log_tail()}")
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}\n" + "\n".join(s.log_tail() for s in services))


def plan_import(
    store: JobStore,
    root: Path,
    topology_path: Path,
    *,
    size: int,
    chunk_size: int,
    index: str = "movies",
    seed: int = 0,
    doc_bytes: int = 512,
) -> PlannedImport:
    """Write a sample dump under ``root`` and plan its import with the core planner (no Dagster)."""
    dump = root / f"{index}.ndjson"
    write_sample_dump(dump, size, seed=seed, doc_bytes=doc_bytes)
    topology = load_topology(topology_path)
    settings = PipelineSettings(
        allowed_roots=[str(root)],
        staging_dir=str(root / "staging"),
        dead_letter_dir=str(root / "dead-letter"),
    )
    request = DumpImportRequest(uri=str(dump), index_uid=index, primary_key="id", chunk_size_bytes=chunk_size)
    return plan_dump_import(store, request, topology, targets_for(topology), settings)


def node_documents(topology: Topology, index: str) -> dict[str, int]:
    return {n.id: targets_for(topology)[n.id].count_documents(index) for n in topology.all_nodes()}


# -- fixtures ------------------------------------------------------------------------------------
@dataclass
class Env:
    root: Path
    dsn: str
    topology: Path
    store: JobStore


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """A SQLite job store, a 3-node local topology and the pipeline environment, all under tmp."""
    dsn = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    topology = write_topology(tmp_path)
    for key, value in pipeline_env(tmp_path, dsn, topology).items():
        if key.startswith("MIROIR_"):
            monkeypatch.setenv(key, value)
    for key in (MAX_CHUNK_RUNS_ENV, DISPATCH_ENABLED_ENV, metrics.PUSHGATEWAY_URL_ENV, metrics.DEPLOYMENT_ENV):
        monkeypatch.delenv(key, raising=False)
    store = open_store(dsn, retry_backoff_base=0.05)
    yield Env(tmp_path, dsn, topology, store)
    store.close()


def _sensor(name: str) -> dg.SensorDefinition:
    """A sensor of freshly built default definitions (they read the environment when built)."""
    return miroir_definitions().resolve_sensor_def(name)


def _tick(name: str, instance: dg.DagsterInstance, dsn: str) -> Any:
    resources = {NAMES.jobs_resource: JobStoreResource(dsn=dsn), NAMES.pushgateway_resource: PushgatewayResource()}
    return _sensor(name)(dg.build_sensor_context(instance=instance, resources=resources))


def _requests(result: object) -> list[dg.RunRequest]:
    """The run requests of a tick that returned a SensorResult."""
    assert isinstance(result, dg.SensorResult), result
    return list(result.run_requests or [])


def _key(rr: dg.RunRequest) -> str:
    assert rr.run_key is not None
    return rr.run_key


def _record_requests(instance: dg.DagsterInstance, result: dg.SensorResult) -> list[dg.DagsterRun]:
    """What the sensor daemon does with a tick's result: add partitions, create queued runs.

    The daemon itself runs in ``test_dispatch_sensor_in_a_real_daemon_completes_chunks``;
    here the runs are only created (status NOT_STARTED: launched, not yet claiming) so the next tick can see them.
    """
    for req in result.dynamic_partitions_requests or []:
        assert isinstance(req, dg.AddDynamicPartitionsRequest)
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    runs = []
    for rr in result.run_requests or []:
        tags = {**rr.tags, "dagster/run_key": rr.run_key, "dagster/partition": rr.partition_key}
        runs.append(create_run_for_test(instance, job_name=str(rr.job_name), tags=tags, status=dg.DagsterRunStatus.NOT_STARTED))
    return runs


# -- dispatch sensor -----------------------------------------------------------------------------
def test_dispatch_requests_one_run_per_chunk_attempt(env: Env) -> None:
    planned = plan_import(env.store, env.root, env.topology, size=64 * 1024, chunk_size=16 * 1024)
    assert len(planned.chunk_ids) >= 3
    with dg.instance_for_test() as instance:
        first = _tick(NAMES.dispatch_sensor, instance, env.dsn)
        first_requests = _requests(first)
        # every chunk gets its partition, and (cap 4) the first four chunks a run
        (partitions,) = first.dynamic_partitions_requests
        assert isinstance(partitions, dg.AddDynamicPartitionsRequest)
        assert partitions.partitions_def_name == NAMES.partitions("dump_import")
        assert sorted(partitions.partition_keys) == sorted(planned.chunk_ids)
        requested = [rr.partition_key for rr in first_requests]
        assert requested == planned.chunk_ids[:4]
        assert len({_key(rr) for rr in first_requests}) == len(requested)
        assert all(_key(rr).startswith(f"{rr.partition_key}:1:") for rr in first_requests)
        assert all(rr.tags[TAG_CHUNK_RUN] == "dump" for rr in first_requests)
        runs = _record_requests(instance, first)
        assert set(instance.get_dynamic_partitions(NAMES.partitions("dump_import"))) == set(planned.chunk_ids)

        # the same attempts again: nothing new (runs queued; their keys are taken)
        second = _tick(NAMES.dispatch_sensor, instance, env.dsn)
        assert isinstance(second, dg.SkipReason)

        # the run of chunk 0 claims it and its attempt fails: re-queued (short backoff)
        victim = planned.chunk_ids[0]
        lease = env.store.claim_by_id(victim, "run-of-chunk-0", 30)
        instance.report_run_failed(runs[0])
        env.store.fail(lease, "node-1 refused the batch")
        assert env.store.get(victim).state == JobState.QUEUED
        time.sleep(0.2)  # backoff 0.05 s
        third = _requests(_tick(NAMES.dispatch_sensor, instance, env.dsn))
        assert [rr.partition_key for rr in third] == [victim]
        (retry,) = third
        assert _key(retry).startswith(f"{victim}:2:")
        assert _key(retry) != _key(first_requests[0])


def test_dispatch_respects_the_cap_of_chunk_runs_in_flight(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    planned = plan_import(env.store, env.root, env.topology, size=96 * 1024, chunk_size=16 * 1024)
    assert len(planned.chunk_ids) >= 5
    monkeypatch.setenv(MAX_CHUNK_RUNS_ENV, "3")
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(NAMES.partitions("dump_import"), planned.chunk_ids)
        # one daemon-launched chunk run holds a slot; a worker-pool run does not count
        create_run_for_test(instance, job_name=NAMES.chunk_job("dump_import"), tags={TAG_CHUNK_RUN: "dump"}, status=dg.DagsterRunStatus.STARTED)
        create_run_for_test(
            instance,
            job_name=NAMES.chunk_job("dump_import"),
            tags={TAG_CHUNK_RUN: "dump", TAG_WORKER_ID: "worker-a"},
            status=dg.DagsterRunStatus.STARTED,
        )
        result = _tick(NAMES.dispatch_sensor, instance, env.dsn)
        assert [rr.partition_key for rr in _requests(result)] == planned.chunk_ids[:2]
        _record_requests(instance, result)

        # cap reached (3 in flight): nothing, even though chunks are still claimable
        full = _tick(NAMES.dispatch_sensor, instance, env.dsn)
        assert isinstance(full, dg.SkipReason)
        assert "3/3" in (full.skip_message or "")


def test_dispatch_requeues_expired_leases(env: Env) -> None:
    planned = plan_import(env.store, env.root, env.topology, size=16 * 1024, chunk_size=16 * 1024)
    (chunk,) = planned.chunk_ids
    env.store.claim_by_id(chunk, "a-worker-that-died", 0.2)
    time.sleep(0.4)
    assert env.store.get(chunk).state == JobState.IN_PROGRESS
    with dg.instance_for_test() as instance:
        result = _tick(NAMES.dispatch_sensor, instance, env.dsn)
    row = env.store.get(chunk)
    assert row.state == JobState.QUEUED and row.claimed_by is None
    (rr,) = _requests(result)
    assert rr.partition_key == chunk and _key(rr).startswith(f"{chunk}:2:")


def test_dispatch_launches_reshard_chunks_with_their_job(env: Env) -> None:
    parent = env.store.enqueue("reshard_backfill", {"index_uid": "movies"})
    chunks = env.store.split(parent.id, [NewChunk(chunk_index=i, params={"shard_start": i, "shard_end": i + 1}) for i in range(2)])
    with dg.instance_for_test() as instance:
        result = _tick(NAMES.dispatch_sensor, instance, env.dsn)
        requests = _requests(result)
    assert [(rr.job_name, rr.partition_key, rr.tags[TAG_CHUNK_RUN]) for rr in requests] == [
        (NAMES.chunk_job("reshard_backfill"), c.id, "reshard") for c in chunks
    ]
    (partitions,) = result.dynamic_partitions_requests
    assert partitions.partitions_def_name == NAMES.partitions("reshard_backfill")
    assert sorted(partitions.partition_keys) == sorted(c.id for c in chunks)


def test_dispatch_can_be_turned_off(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    plan_import(env.store, env.root, env.topology, size=16 * 1024, chunk_size=16 * 1024)
    monkeypatch.setenv(DISPATCH_ENABLED_ENV, "0")
    with dg.instance_for_test() as instance:
        result = _tick(NAMES.dispatch_sensor, instance, env.dsn)
    assert isinstance(result, dg.SkipReason)
    assert DISPATCH_ENABLED_ENV in (result.skip_message or "")


def test_factory_arguments_drive_the_dispatch_sensor_on_every_tick(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    planned = plan_import(env.store, env.root, env.topology, size=64 * 1024, chunk_size=16 * 1024)
    assert len(planned.chunk_ids) >= 3
    fleet = MiroirNames("fleet")
    defs = miroir_definitions(
        key_prefix="fleet",
        jobs_dsn=dg.EnvVar("FLEET_JOBS_DSN"),
        max_chunk_runs=dg.EnvVar.int("FLEET_CAP"),
        dispatch_enabled=dg.EnvVar("FLEET_DISPATCH"),
        dispatch_interval_s=7,
    )
    sensor = defs.resolve_sensor_def(fleet.dispatch_sensor)
    assert sensor.minimum_interval_seconds == 7
    monkeypatch.setenv("FLEET_JOBS_DSN", env.dsn)

    bound = defs.get_repository_def().get_top_level_resources()  # the factory's own resources

    def tick(instance: dg.DagsterInstance) -> Any:
        resources = {fleet.jobs_resource: bound[fleet.jobs_resource]}
        return sensor(dg.build_sensor_context(instance=instance, resources=resources))

    with dg.instance_for_test() as instance:
        monkeypatch.setenv("FLEET_CAP", "1")  # read when the tick runs, not when built
        (only,) = _requests(tick(instance))
        assert (only.job_name, only.partition_key) == (fleet.chunk_job("dump_import"), planned.chunk_ids[0])
        (partitions,) = tick(instance).dynamic_partitions_requests
        assert partitions.partitions_def_name == "fleet_dump_chunks"

        monkeypatch.setenv("FLEET_DISPATCH", "off")
        off = tick(instance)
        assert isinstance(off, dg.SkipReason) and "FLEET_DISPATCH=off" in (off.skip_message or "")


def test_run_for_a_chunk_someone_holds_fails_fast_and_leaves_the_lease(env: Env) -> None:
    planned = plan_import(env.store, env.root, env.topology, size=16 * 1024, chunk_size=16 * 1024)
    (chunk,) = planned.chunk_ids
    lease = env.store.claim_by_id(chunk, "worker-holding-it", 300)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(NAMES.partitions("dump_import"), [chunk])
        started = time.monotonic()
        result = miroir_definitions().resolve_job_def(NAMES.chunk_job("dump_import")).execute_in_process(
            instance=instance, partition_key=chunk, raise_on_error=False
        )
        elapsed = time.monotonic() - started
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    message = str(failure.step_failure_data.user_failure_data.description)  # type: ignore[union-attr]
    assert f"job {chunk} cannot be claimed" in message and "leased by worker-holding-it" in message
    assert elapsed < 30
    row = env.store.get(chunk)
    assert (row.state, row.claim_token, row.claimed_by) == (JobState.IN_PROGRESS, lease.token, "worker-holding-it")


# -- queue-depth sensor --------------------------------------------------------------------------
def _pushed_depths(gateway: Pushgateway, deployment: str) -> dict[str, float]:
    found = samples_of(gateway.scrape(), metrics.QUEUE_DEPTH_METRIC, job=metrics.PUSH_JOB, deployment=deployment)
    return {s.labels[metrics.JOB_TYPE_LABEL]: s.value for s in found}


def _local_depth(job_type: str) -> float:
    value = metrics.QUEUE_DEPTH_REGISTRY.get_sample_value(metrics.QUEUE_DEPTH_METRIC, {metrics.JOB_TYPE_LABEL: job_type})
    assert value is not None
    return value


def test_queue_depth_sensor_pushes_depth_then_zeros(
    env: Env, pushgateway: Pushgateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    pushgateway.wipe()  # the gateway is shared by the session; start from no pushed groups
    deployment = f"sensor-{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv(metrics.PUSHGATEWAY_URL_ENV, pushgateway.url)
    monkeypatch.setenv(metrics.DEPLOYMENT_ENV, deployment)
    planned = plan_import(env.store, env.root, env.topology, size=48 * 1024, chunk_size=16 * 1024)
    n = len(planned.chunk_ids)
    with dg.instance_for_test() as instance:
        result = _tick(NAMES.queue_depth_sensor, instance, env.dsn)
        assert isinstance(result, dg.SkipReason)
        assert (result.skip_message or "").startswith("pushed queue depth"), result.skip_message
        assert _pushed_depths(pushgateway, deployment) == {"dump_import": float(n), "reshard_backfill": 0.0}
        assert _local_depth("dump_import") == n

        while (lease := env.store.claim(["dump_import"], "drainer", 30)) is not None:
            env.store.complete(lease)
        _tick(NAMES.queue_depth_sensor, instance, env.dsn)
        assert _pushed_depths(pushgateway, deployment) == {"dump_import": 0.0, "reshard_backfill": 0.0}
        assert _local_depth("dump_import") == 0


def test_queue_depth_sensor_pushes_to_the_gateway_its_resource_names(env: Env, pushgateway: Pushgateway, monkeypatch: pytest.MonkeyPatch) -> None:
    pushgateway.wipe()
    monkeypatch.setenv("FLEET_GATEWAY", pushgateway.url)  # $MIROIR_PUSHGATEWAY_URL stays unset
    planned = plan_import(env.store, env.root, env.topology, size=32 * 1024, chunk_size=16 * 1024)
    defs = miroir_definitions(pushgateway_url=dg.EnvVar("FLEET_GATEWAY"), deployment="fleet-a")
    sensor = defs.resolve_sensor_def(NAMES.queue_depth_sensor)
    bound = defs.get_repository_def().get_top_level_resources()  # the factory's own resources
    resources = {NAMES.jobs_resource: JobStoreResource(dsn=env.dsn), NAMES.pushgateway_resource: bound[NAMES.pushgateway_resource]}
    with dg.instance_for_test() as instance:
        result = sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert (result.skip_message or "").startswith("pushed queue depth"), result.skip_message
    assert _pushed_depths(pushgateway, "fleet-a") == {"dump_import": float(len(planned.chunk_ids)), "reshard_backfill": 0.0}


def test_queue_depth_sensor_reports_a_failed_push_without_raising(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    monkeypatch.setenv(metrics.PUSHGATEWAY_URL_ENV, dead)
    plan_import(env.store, env.root, env.topology, size=16 * 1024, chunk_size=16 * 1024)
    with dg.instance_for_test() as instance:
        result = _tick(NAMES.queue_depth_sensor, instance, env.dsn)
    assert isinstance(result, dg.SkipReason)
    assert dead in (result.skip_message or "")
    assert _local_depth("dump_import") == 1  # the local gauge is set all the same


# -- a real daemon -------------------------------------------------------------------------------
def test_dispatch_sensor_in_a_real_daemon_completes_chunks(env: Env) -> None:
    planned = plan_import(env.store, env.root, env.topology, size=96 * 1024, chunk_size=32 * 1024)
    assert len(planned.chunk_ids) >= 3
    home = write_dagster_home(env.root / "dagster")
    workspace = write_workspace(env.root / "workspace.yaml")
    proc_env = pipeline_env(env.root, env.dsn, env.topology, MIROIR_DISPATCH_INTERVAL="1")
    daemon = start_daemon(env.root, proc_env, workspace)
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:

            def chunks_and_runs_done() -> bool:
                rows = env.store.children(planned.parent.id)
                if not all(c.state == JobState.COMPLETED for c in rows):
                    return False
                runs = instance.get_runs(dg.RunsFilter(job_name=NAMES.chunk_job("dump_import")))
                return len(runs) >= len(rows) and all(r.is_finished for r in runs)

            wait_for("the dispatch sensor's runs to complete every chunk", chunks_and_runs_done, 120, daemon)
            runs = instance.get_runs(dg.RunsFilter(job_name=NAMES.chunk_job("dump_import")))
            assert set(instance.get_dynamic_partitions(NAMES.partitions("dump_import"))) == set(planned.chunk_ids)
    finally:
        daemon.stop()
    assert env.store.get(planned.parent.id).state == JobState.COMPLETED
    # one run per chunk and attempt, each a success of its partition
    assert sorted(r.tags["dagster/partition"] for r in runs) == sorted(planned.chunk_ids)
    assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
    assert all(r.tags["dagster/run_key"].startswith(f"{r.tags['dagster/partition']}:1:") for r in runs)
    total = sum(node_documents(load_topology(env.topology), "movies").values())
    assert total == env.store.parent_summary(planned.parent.id).progress["docs_routed"] > 0
