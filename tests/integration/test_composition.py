"""The Dagster surface as a library: ``miroir_definitions(...)`` merged into a user's own code
location (with its own ``jobs`` resource) loads, validates and runs; two prefixes coexist; a job
kind registered in the registry shows up with its partitions, asset, job, dispatch and worker;
the launcher's shutdown reaches the chunk through the runtime resource; and importing the
package reads no environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster_shared.serdes import serialize_value

from miroir_pipeline.dagster import (
    MiroirNames,
    SettingsResource,
    miroir_definitions,
    runtime_resource,
)
from miroir_pipeline.dagster.resources import targets_for
from miroir_pipeline.fleet.topology import load_topology
from miroir_pipeline.jobs.registry import ChunkReport
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState
from miroir_pipeline.queue.shutdown import Shutdown
from tests.import_helpers import (
    actual_placement,
    assert_exact_placement,
    expected_placement,
    make_docs,
    write_dump,
)
from tests.integration.test_sensors import REPO_ROOT, VENV_BIN, write_topology

DSN_VAR = "COMPOSITION_JOBS_DSN"

#: A user's code location: its own resource under the key ``jobs``, its own asset using it, and
#: Miroir's definitions merged in (their resources are namespaced, so nothing clashes).
USER_LOCATION = '''
import dagster as dg

from miroir_pipeline.dagster import miroir_definitions


class JobsBoard(dg.ConfigurableResource):
    """The user's own resource that happens to be called ``jobs``."""

    board: str = "careers"


@dg.asset
def openings(jobs: JobsBoard) -> int:
    return len(jobs.board)


def user_definitions(**miroir):
    return dg.Definitions.merge(
        dg.Definitions(assets=[openings], resources={"jobs": JobsBoard()}),
        miroir_definitions(jobs_dsn=dg.EnvVar("COMPOSITION_JOBS_DSN"), **miroir),
    )


defs = user_definitions(topology=dg.EnvVar("COMPOSITION_TOPOLOGY"))
'''


def _user_definitions(**miroir: Any) -> dg.Definitions:
    """The location of :data:`USER_LOCATION`, built in this process with ``miroir`` arguments."""
    namespace: dict[str, Any] = {}
    exec(compile(USER_LOCATION, "user_location.py", "exec"), namespace)
    return namespace["user_definitions"](**miroir)  # type: ignore[no-any-return]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIROIR_", "DAGSTER_"))}
    env.update(extra)
    return env


# -- (a) a user's code location validates --------------------------------------------------------
def test_user_code_location_with_its_own_jobs_resource_validates(tmp_path: Path) -> None:
    location = tmp_path / "user_location.py"
    location.write_text(USER_LOCATION)
    home = tmp_path / "dagster_home"
    home.mkdir()
    proc = subprocess.run(
        [str(VENV_BIN / "dagster"), "definitions", "validate", "-f", str(location)],
        env=_clean_env(DAGSTER_HOME=str(home), PYTHONPATH=str(REPO_ROOT)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Validation successful" in output, output


# -- (b) chunk runs from the merged definitions ---------------------------------------------------
@pytest.fixture
def planned(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A dump, a SQLite jobs table and a 3-node local topology under tmp; the DSN only in an
    environment variable the definitions name."""
    for key in [k for k in os.environ if k.startswith("MIROIR_")]:
        monkeypatch.delenv(key)
    dsn = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    monkeypatch.setenv(DSN_VAR, dsn)
    monkeypatch.setenv("COMPOSITION_READ_BLOCK", "4096")
    topology_path = write_topology(tmp_path, nodes=3, shards=16)
    docs = make_docs(600, seed=11)
    dump = write_dump(tmp_path / "dump.ndjson", docs)
    settings = {
        "allowed_roots": [str(tmp_path)],
        "staging_dir": str(tmp_path / "staging"),
        "dead_letter_dir": str(tmp_path / "dead-letter"),
        "batch_size": 50,
        # small reads make small batches: a chunk of this dump commits in a dozen or more
        "read_block_bytes": dg.EnvVar.int("COMPOSITION_READ_BLOCK"),
        # no window (the whole buffer is one batch): one batch in flight while the next is
        # routed, so a drain requested at the first commit finds most batches unsent
        "memory_buffer_bytes": 64 * 1024,
        "batch_bytes": 64 * 1024,
    }
    defs = _user_definitions(settings=settings, topology=str(topology_path))
    return {"root": tmp_path, "dsn": dsn, "topology": load_topology(topology_path), "docs": docs, "dump": dump, "defs": defs}


def _plan(defs: dg.Definitions, instance: dg.DagsterInstance, dump: Path, chunk_size: int) -> str:
    names = MiroirNames()
    op = names.plan_dump_import_op
    result = defs.resolve_job_def(names.plan_dump_import_job).execute_in_process(
        run_config={"ops": {op: {"config": {"uri": str(dump), "index_uid": "movies", "primary_key": "id", "chunk_size_bytes": chunk_size}}}},
        instance=instance,
    )
    return str(result.output_for_node(op))


def test_merged_definitions_plan_and_run_chunks_into_exact_placement(planned: dict[str, Any]) -> None:
    names = MiroirNames()
    defs: dg.Definitions = planned["defs"]
    store = open_store(planned["dsn"])
    try:
        with dg.instance_for_test() as instance:
            parent_id = _plan(defs, instance, planned["dump"], chunk_size=16 * 1024)
            chunks = [c.id for c in store.children(parent_id)]
            assert len(chunks) >= 3
            # the plan registered one partition per chunk
            assert set(instance.get_dynamic_partitions(names.partitions("dump_import"))) == set(chunks)

            chunk_job = defs.resolve_job_def(names.chunk_job("dump_import"))
            results = [chunk_job.execute_in_process(partition_key=c, instance=instance) for c in chunks]
            assert all(r.success for r in results)
            assert all(r.dagster_run.tags["miroir/chunk-run"] == "dump" for r in results)
            assert [store.get(c).state for c in chunks] == [JobState.COMPLETED] * len(chunks)

            mats = instance.fetch_materializations(names.chunk_asset_key("dump_import"), limit=100).records
            assert {m.partition_key for m in mats} == set(chunks)
            # the DSN was only ever an EnvVar: no run event or config carries it
            for r in results:
                logged = "".join(serialize_value(e) for e in instance.all_logs(r.run_id))
                assert planned["dsn"] not in logged and planned["dsn"] not in str(r.dagster_run.run_config)

        summary = store.parent_summary(parent_id)
        assert summary.parent.state == JobState.COMPLETED
        expected = expected_placement(planned["docs"], planned["topology"])
        assert summary.progress["per_node"] == {n: len(d) for n, d in expected.items()}
        assert_exact_placement(expected, actual_placement(targets_for(planned["topology"]), "movies"))
    finally:
        store.close()


def test_the_launchers_shutdown_reaches_the_chunk_through_the_runtime_resource(planned: dict[str, Any]) -> None:
    names = MiroirNames()
    defs: dg.Definitions = planned["defs"]
    store = open_store(planned["dsn"])
    try:
        with dg.instance_for_test() as instance:
            parent_id = _plan(defs, instance, planned["dump"], chunk_size=1024 * 1024)
            (chunk,) = [c.id for c in store.children(parent_id)]
            chunk_job = defs.resolve_job_def(names.chunk_job("dump_import"))

            # A launcher that starts draining once the chunk committed its first batch: the chunk
            # sends nothing more and hands itself back at what it committed.
            draining = Shutdown()
            batches: list[ChunkReport] = []

            def first_batch_then_drain(report: ChunkReport) -> None:
                batches.append(report)
                draining.request("test launcher is draining")

            handed = chunk_job.execute_in_process(
                partition_key=chunk,
                instance=instance,
                resources={names.runtime_resource: runtime_resource(draining, on_batch=first_batch_then_drain)},
                raise_on_error=False,
            )
            assert not handed.success
            (failure,) = [e for e in handed.all_events if e.event_type_value == "STEP_FAILURE"]
            assert failure.step_failure_data is not None and failure.step_failure_data.user_failure_data is not None
            assert "handed back" in str(failure.step_failure_data.user_failure_data.description)
            assert "test launcher is draining" in str(failure.step_failure_data.user_failure_data.description)
            row = store.get(chunk)
            cursor = int(row.progress["last_cursor"])
            assert (row.state, row.attempts, row.claimed_by) == (JobState.QUEUED, 0, None)
            assert batches and 0 < cursor < planned["dump"].stat().st_size
            assert f"handed back at byte {cursor}:" in str(failure.step_failure_data.user_failure_data.description)

            # The default runtime (what UI, sensor and GraphQL runs get) is never drained.
            done = chunk_job.execute_in_process(partition_key=chunk, instance=instance)
            assert done.success
            (mat,) = done.asset_materializations_for_node(names.chunk_op("dump_import"))
            assert mat.metadata["resumed_from"].value == cursor
        assert store.get(chunk).state == JobState.COMPLETED
        expected = expected_placement(planned["docs"], planned["topology"])
        assert_exact_placement(expected, actual_placement(targets_for(planned["topology"]), "movies"))
    finally:
        store.close()


# -- (c) two prefixes ------------------------------------------------------------------------------
class _RefusingIOManager(dg.ConfigurableIOManager):
    """The user's own default io manager: it stores only what the user's assets hand it, and
    refuses anything else (as one that writes to the user's warehouse would)."""

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        raise RuntimeError(f"the user's io_manager was asked to store {context.step_key}'s output")

    def load_input(self, context: dg.InputContext) -> object:
        raise RuntimeError("the user's io_manager was asked to load an input")


def test_a_location_with_its_own_io_manager_and_loggers_runs_every_miroir_job(planned: dict[str, Any]) -> None:
    """Its ``io_manager`` is never asked to store a plan's or prune's return value, and run
    config Miroir sets for its own runs (worker pool, parent reports) never names a ``console``
    logger the location's jobs do not have."""
    from miroir_pipeline.dagster import Worker, record_parent

    names = MiroirNames()
    user = dg.Definitions(
        resources={"io_manager": _RefusingIOManager()}, loggers={"user_json": dg.json_console_logger}
    )
    settings = {
        "allowed_roots": [str(planned["root"])],
        "staging_dir": str(planned["root"] / "staging"),
        "dead_letter_dir": str(planned["root"] / "dead-letter"),
    }
    defs = dg.Definitions.merge(
        user, miroir_definitions(jobs_dsn=dg.EnvVar(DSN_VAR), topology=str(planned["root"] / "topology.yaml"), settings=settings)
    )
    assert "console" not in defs.resolve_job_def(names.chunk_job("dump_import")).loggers
    store = open_store(planned["dsn"])
    try:
        with dg.instance_for_test() as instance:
            parent_id = _plan(defs, instance, planned["dump"], chunk_size=16 * 1024)
            stats = Worker(store, instance, defs, PipelineSettings(**settings), parent_id=parent_id, exit_when_empty=True).run()
            assert stats.chunks_run >= 3 and stats.chunks_failed == 0
            assert store.get(parent_id).state == JobState.COMPLETED
            report = record_parent(defs, instance, parent_id, store=store, quiet=True)
            assert report is not None and report.materialized
            prune = defs.resolve_job_def(names.prune_job).execute_in_process(
                run_config={"ops": {names.prune_op: {"config": {"older_than_s": 0}}}}, instance=instance
            )
            assert prune.success and prune.output_for_node(names.prune_op) >= 1
    finally:
        store.close()


def test_every_miroir_job_plans_with_its_own_executor_wherever_it_is_launched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run launched from the UI, the daemon or a schedule uses the job's own executor (the
    multiprocess one unless the job names another), which refuses outputs kept in memory: each
    Miroir job must build its execution plan as those launchers would, not only in process."""
    from dagster._core.execution.api import create_execution_plan

    monkeypatch.setenv(DSN_VAR, f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    names = MiroirNames()
    defs = _user_definitions()
    config = {
        names.plan_dump_import_job: {names.plan_dump_import_op: {"config": {"uri": "/d.ndjson", "index_uid": "i"}}},
        names.plan_reshard_job: {names.plan_reshard_op: {"config": {"index_uid": "i", "new_shards": 4}}},
        names.prune_job: {names.prune_op: {"config": {"older_than_s": 0}}},
        names.reshard_verify_job: {names.reshard_shadow_op: {"config": {"parent_job_id": "p"}}},
    }
    planned = []
    for job in defs.get_repository_def().get_all_jobs():
        if not job.name.startswith(f"{names.key_prefix}_") or job.name.startswith("__"):
            continue
        ops = config.get(job.name)
        plan = create_execution_plan(job, run_config={"ops": ops} if ops else None)
        assert plan.step_keys_to_execute, job.name
        planned.append(job.name)
    assert set(config) <= set(planned)


def test_two_prefixes_merge_without_clashing(monkeypatch: pytest.MonkeyPatch) -> None:
    fleet_b = miroir_definitions(key_prefix="fleet_b", jobs_dsn=dg.EnvVar("FLEET_B_DSN"), max_chunk_runs=2)
    # the user's location (its own `jobs`, an asset, Miroir under the default prefix) plus a second fleet
    merged = dg.Definitions.merge(_user_definitions(), fleet_b)
    dg.Definitions.validate_loadable(merged)
    repo = merged.get_repository_def()

    a, b = MiroirNames(), MiroirNames("fleet_b")
    assert set(repo.get_top_level_resources()) == {"jobs", *a.resource_keys, *b.resource_keys}
    assert dg.AssetKey("openings") in repo.asset_graph.get_all_asset_keys()
    for names in (a, b):
        for job_type in ("dump_import", "reshard_backfill"):
            assert repo.has_job(names.chunk_job(job_type))
            assert names.chunk_asset_key(job_type) in repo.asset_graph.get_all_asset_keys()
            assert names.chunk_asset_key(job_type).path[0] == names.key_prefix
            assert repo.has_job(names.parent_report_job(job_type))
            assert names.parent_asset_key(job_type) in repo.asset_graph.get_all_asset_keys()
        for job in (names.plan_dump_import_job, names.plan_reshard_job, names.reshard_verify_job, names.prune_job):
            assert repo.has_job(job)
        assert {names.dispatch_sensor, names.queue_depth_sensor, names.parent_report_sensor} <= {
            s.name for s in repo.sensor_defs
        }
    assert b.chunk_job("dump_import") == "fleet_b_dump_chunk_job"
    assert b.partitions("dump_import") == "fleet_b_dump_chunks"
    assert b.parent_partitions("dump_import") == "fleet_b_dump_imports"
    assert b.parent_asset_key("reshard_backfill") == dg.AssetKey(["fleet_b", "reshard_backfill"])
    assert a.jobs_resource == "miroir_jobs" and b.jobs_resource == "fleet_b_jobs"

    # each chunk asset reads its own set's resources
    a_asset = repo.assets_defs_by_key[a.chunk_asset_key("dump_import")]
    assert a_asset.required_resource_keys >= {a.jobs_resource, a.settings_resource, a.runtime_resource}
    assert not any(k.startswith("fleet_b_") for k in a_asset.required_resource_keys)

    # what the UI is sent names the environment variables, never their values
    monkeypatch.setenv("FLEET_B_DSN", "postgresql://miroir:s3cret@db.internal/miroir")
    snapshot = serialize_value(RepositorySnap.from_def(repo))
    assert "FLEET_B_DSN" in snapshot and "s3cret" not in snapshot

    # the same prefix twice is refused by Dagster (two resources under one key), not merged silently
    with pytest.raises(dg.DagsterInvariantViolationError, match="miroir_jobs"):
        dg.Definitions.merge(merged, miroir_definitions())


def test_bad_arguments_are_refused_when_building() -> None:
    with pytest.raises(ValueError, match="key_prefix"):
        miroir_definitions(key_prefix="has-dash")
    with pytest.raises(ValueError, match="max_chunk_runs"):
        miroir_definitions(max_chunk_runs=-1)
    with pytest.raises(ValueError, match="unknown settings"):
        miroir_definitions(settings={"batch_sise": 10})
    # every field of PipelineSettings can be set through the settings resource
    assert set(SettingsResource.model_fields) == set(PipelineSettings.model_fields)


# -- (d) nothing is read at import -----------------------------------------------------------------
def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=_clean_env(PYTHONPATH=str(REPO_ROOT), **env),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_importing_the_package_reads_no_environment() -> None:
    proc = _python(
        """
        import os

        reads = []

        class Spy(dict):
            def __getitem__(self, key):
                reads.append(key)
                return super().__getitem__(key)

            def get(self, key, default=None):
                reads.append(key)
                return super().get(key, default)

            def __contains__(self, key):
                reads.append(key)
                return super().__contains__(key)

        os.environ = Spy(os.environ)
        import miroir_pipeline.dagster
        import miroir_pipeline.dagster.worker_pool
        print("read at import:", sorted({k for k in reads if k.startswith("MIROIR_")}))
        try:
            miroir_pipeline.dagster.miroir_definitions()
        except ValueError as exc:
            print("when built:", exc)
        """,
        MIROIR_DISPATCH_INTERVAL="abc",
    )
    assert proc.returncode == 0, proc.stderr
    assert "read at import: []" in proc.stdout, proc.stdout
    # the bogus value is read, and refused by name, when the definitions are built
    assert "when built: MIROIR_DISPATCH_INTERVAL='abc' is not a whole number" in proc.stdout, proc.stdout


# -- a third job kind -------------------------------------------------------------------------------
THIRD_KIND = """
import sys
from dataclasses import dataclass

import dagster as dg
from pydantic import BaseModel

from miroir_pipeline.dagster import MiroirNames, miroir_definitions
from miroir_pipeline.dagster.parent_reports import record_parent
from miroir_pipeline.dagster.resources import JobStoreResource, PushgatewayResource
from miroir_pipeline.dagster.worker_pool import Worker
from miroir_pipeline.jobs.registry import JobKind, register
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState, NewChunk
from miroir_pipeline.queue.lease import run_under_lease


class EchoParams(BaseModel):
    word: str


@dataclass
class EchoReport:
    chunk_id: str
    attempt: int
    documents: int

    def as_metadata(self):
        return {"documents": self.documents, "echo": True}

    def summary(self):
        return f"echoed {self.documents}"


def process(store, lease, env):
    words = EchoParams.model_validate(lease.job.params).word
    report = EchoReport(lease.job_id, lease.attempt, len(words))
    return run_under_lease(store, lease, lambda keeper: report, ttl=env.settings.lease_ttl, heartbeat_interval=env.settings.heartbeat_interval)


register(JobKind(job_type="echo_job", name="echo", description="Echo a word.", params_model=EchoParams, process=process))

dsn = sys.argv[1]
store = open_store(dsn)
parent = store.enqueue("echo_job", {})
chunks = store.split(parent.id, [NewChunk(i, {"word": "x" * (i + 1)}) for i in range(3)])
defs = miroir_definitions(jobs_dsn=dsn)
names = MiroirNames()
repo = defs.get_repository_def()
print("job", repo.has_job("miroir_echo_chunk_job"))
print("asset", names.chunk_asset_key("echo_job").to_user_string() in {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()})
with dg.instance_for_test() as instance:
    sensor = defs.resolve_sensor_def(names.dispatch_sensor)
    tick = sensor(dg.build_sensor_context(instance=instance, resources={names.jobs_resource: JobStoreResource(dsn=dsn)}))
    print("dispatch", sorted({(r.job_name, r.tags["miroir/chunk-run"]) for r in tick.run_requests}))
    print("partitions", [req.partitions_def_name for req in tick.dynamic_partitions_requests])
    stats = Worker(store, instance, defs, PipelineSettings(), job_types=("echo_job",), exit_when_empty=True).run()
    print("worker", stats.chunks_succeeded, stats.chunks_failed)
    mats = instance.fetch_materializations(names.chunk_asset_key("echo_job"), limit=10).records
    print("documents", sorted(int(m.asset_materialization.metadata["documents"].value) for m in mats))
    pmats = instance.fetch_materializations(names.parent_asset_key("echo_job"), limit=10).records
    print("by the worker", [m.partition_key == parent.id for m in pmats], instance.get_dynamic_partitions("miroir_echo_jobs") == [parent.id])
    # A second job finished outside any worker (its chunk completed by hand): the sensor reports it.
    other = store.enqueue("echo_job", {})
    store.split(other.id, [NewChunk(0, {"word": "y"})])
    store.complete(store.claim(["echo_job"], "by-hand", 30))
    report_sensor = defs.resolve_sensor_def(names.parent_report_sensor)
    report = report_sensor(
        dg.build_sensor_context(instance=instance, resources={names.jobs_resource: JobStoreResource(dsn=dsn)})
    )
    print("report", [(r.job_name, r.partition_key == other.id) for r in report.run_requests])
    record = record_parent(defs, instance, other.id)
    print("recorded", record.materialized, sorted(instance.get_dynamic_partitions("miroir_echo_jobs")) == sorted([parent.id, other.id]))
print("rows", [store.get(c.id).state for c in chunks], store.get(parent.id).state, store.get(other.id).state)
"""


def test_a_kind_registered_in_the_registry_gets_its_whole_dagster_surface(tmp_path: Path) -> None:
    script = tmp_path / "third_kind.py"
    script.write_text(THIRD_KIND)
    proc = subprocess.run(
        [sys.executable, str(script), f"sqlite:///{tmp_path / 'jobs.sqlite3'}"],
        env=_clean_env(PYTHONPATH=str(REPO_ROOT), DAGSTER_HOME=str(tmp_path)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout.splitlines()
    assert "job True" in out and "asset True" in out
    assert "dispatch [('miroir_echo_chunk_job', 'echo')]" in out
    assert "partitions ['miroir_echo_chunks']" in out
    assert "worker 3 0" in out
    assert "documents [1, 2, 3]" in out
    # the pool worker recorded the parent it finished; the sensor reports one finished elsewhere
    assert "by the worker [True] True" in out
    assert "report [('miroir_echo_job_report_job', True)]" in out
    assert "recorded True True" in out
    assert "rows ['completed', 'completed', 'completed'] completed completed" in out
