"""The operator's view in Dagster, in process: one parent-level materialization per import and
reshard (the report sensor, ``record_parent``), a failed or cancelled parent shown as failed, the
``has_documents`` WARN check on chunks and parents whose every document was invalid, and prune
removing the partitions of what it deletes.

The same against a real webserver and daemon, over GraphQL, is in ``test_graphql_launch.py``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import orjson
import pytest
from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value
from dagster._core.test_utils import create_run_for_test

from miroir_pipeline.dagster import MiroirNames, miroir_definitions, parent_reports
from miroir_pipeline.dagster.names import (
    POOL_CHUNK_RUN,
    TAG_CHUNK_RUN,
    TAG_CLAIM_TOKEN,
    TAG_PARENT_REPORT,
    TAG_WORKER_ID,
)
from miroir_pipeline.dagster.parent_reports import ParentRecord, record_parent, report_key
from miroir_pipeline.dagster.prune import prune_finished, remove_orphaned_partitions
from miroir_pipeline.dagster.resources import JobStoreResource, targets_for
from miroir_pipeline.fleet.topology import load_topology
from miroir_pipeline.jobs.dump_import import DumpImportRequest, PlannedImport, plan_dump_import
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import JobStore, open_store
from miroir_pipeline.queue.contract import Job, JobState, NewChunk
from tests.import_helpers import make_docs
from tests.integration.test_sensors import pipeline_env, write_topology

NAMES = MiroirNames()
DUMP, RESHARD = "dump_import", "reshard_backfill"


@dataclass
class Env:
    root: Path
    dsn: str
    topology: Path
    store: JobStore
    defs: dg.Definitions


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """A SQLite jobs table, 3 local nodes and the pipeline environment under tmp; the default
    definitions, built after the environment is set."""
    dsn = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    topology = write_topology(tmp_path)
    for key in [k for k in os.environ if k.startswith("MIROIR_")]:
        monkeypatch.delenv(key)
    for key, value in pipeline_env(tmp_path, dsn, topology).items():
        if key.startswith("MIROIR_"):
            monkeypatch.setenv(key, value)
    store = open_store(dsn)
    yield Env(tmp_path, dsn, topology, store, miroir_definitions())
    store.close()


def _settings(env: Env) -> PipelineSettings:
    return PipelineSettings(
        allowed_roots=[str(env.root)],
        staging_dir=str(env.root / "staging"),
        dead_letter_dir=str(env.root / "dead-letter"),
    )


def _plan(env: Env, lines: list[bytes], index: str, chunk_size: int, on_invalid: str = "fail") -> PlannedImport:
    dump = env.root / f"{index}.ndjson"
    dump.write_bytes(b"".join(line + b"\n" for line in lines))
    topology = load_topology(env.topology)
    request = DumpImportRequest(
        uri=str(dump), index_uid=index, primary_key="id", chunk_size_bytes=chunk_size, on_invalid_document=on_invalid
    )
    return plan_dump_import(env.store, request, topology, targets_for(topology), _settings(env))


def _run_chunks(env: Env, instance: dg.DagsterInstance, chunk_ids: list[str]) -> list[dg.ExecuteInProcessResult]:
    instance.add_dynamic_partitions(NAMES.partitions(DUMP), chunk_ids)
    job = env.defs.resolve_job_def(NAMES.chunk_job(DUMP))
    return [job.execute_in_process(instance=instance, partition_key=c, raise_on_error=False) for c in chunk_ids]


def _parent(store: JobStore, job_id: str, chunks: int, *, job_type: str = DUMP) -> list[Job]:
    store.enqueue(job_type, {"index_uid": "movies"}, job_id=job_id)
    return store.split(job_id, [NewChunk(i, {"i": i}) for i in range(chunks)])


def _complete(store: JobStore, chunk: Job, progress: dict[str, Any] | None = None) -> None:
    store.complete(store.claim_by_id(chunk.id, "test-worker"), progress)


def _tick(env: Env, instance: dg.DagsterInstance, cursor: str | None = None) -> dg.SensorResult:
    sensor = env.defs.resolve_sensor_def(NAMES.parent_report_sensor)
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={NAMES.jobs_resource: JobStoreResource(dsn=env.dsn)}
    )
    result = sensor(context)
    assert isinstance(result, dg.SensorResult), result
    return result


def _launch(instance: dg.DagsterInstance, result: dg.SensorResult) -> None:
    """What the daemon does with a tick's result: add the partitions, create the runs."""
    for req in result.dynamic_partitions_requests or []:
        assert isinstance(req, dg.AddDynamicPartitionsRequest)
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
    for rr in result.run_requests or []:
        tags = {**rr.tags, "dagster/run_key": str(rr.run_key), "dagster/partition": str(rr.partition_key)}
        create_run_for_test(instance, job_name=str(rr.job_name), tags=tags, status=dg.DagsterRunStatus.NOT_STARTED)


def _finished_in_the_past(store: JobStore, job_id: str) -> None:
    """Until the clock (the database's: SQLite reads this host's) is past the row's finish, so a
    prune with age 0 (``finished_at < now``) sees it."""
    finished = store.get(job_id).finished_at
    assert finished is not None
    while datetime.now(UTC) <= finished + timedelta(milliseconds=5):
        time.sleep(0.001)


def _plain(metadata: dict[str, dg.MetadataValue]) -> dict[str, Any]:  # type: ignore[type-arg]
    return {k: v.value for k, v in metadata.items()}


def _check_evaluation(result: dg.ExecuteInProcessResult) -> dg.AssetCheckEvaluation:
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def _status(instance: dg.DagsterInstance, key: dg.AssetKey, partitions_name: str) -> tuple[set[str], set[str]]:
    """(materialized, failed) partitions of ``key`` as the UI computes them."""
    parts = dg.DynamicPartitionsDefinition(name=partitions_name)
    value = get_and_update_asset_status_cache_value(instance, key, parts)
    assert value is not None
    materialized = set(value.deserialize_materialized_partition_subsets(parts).get_partition_keys())
    failed = set(value.deserialize_failed_partition_subsets(parts).get_partition_keys())
    return materialized, failed


# -- the store's read API ----------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    dsn = f"sqlite:///{tmp_path / 'jobs.sqlite3'}" if request.param == "sqlite" else request.getfixturevalue("pg_dsn")
    store = open_store(dsn)
    yield store
    store.close()


def test_finished_parents_in_finish_order_from_a_time(any_store: JobStore) -> None:
    store = any_store
    first = _parent(store, "first", 1)
    cancelled = _parent(store, "cancelled", 1)
    running = _parent(store, "running", 2)
    _parent(store, "queued", 0)  # zero chunks: completed at once
    store.enqueue(DUMP, {}, job_id="unsplit")
    _complete(store, first[0])
    store.cancel("cancelled")
    _complete(store, running[0])
    rows = store.finished_parents()
    # parents only, finished ones only, in finish order (ties, within the clock's resolution, by id)
    assert {r.id: r.state for r in rows} == {"queued": "completed", "first": "completed", "cancelled": "failed"}
    assert all(r.kind == "parent" and r.finished_at is not None for r in rows)
    assert rows == sorted(rows, key=lambda r: (r.finished_at, r.id))
    # finished at its split, before anything else happened (a tie within the clock's resolution
    # is possible on a fast machine: then the id orders them, as asserted above)
    finished = {r.id: r.finished_at for r in rows}
    assert finished["queued"] <= finished["first"] <= finished["cancelled"]
    assert cancelled[0].id not in {r.id for r in rows}
    # an inclusive lower bound, and a limit that keeps finish order
    since = rows[1].finished_at
    assert since is not None
    assert store.finished_parents(since) == [r for r in rows if r.finished_at >= since]
    assert rows[1] in store.finished_parents(since) and rows[2] in store.finished_parents(since)
    assert store.finished_parents(since + timedelta(days=1)) == []
    assert store.finished_parents(limit=2) == rows[:2]


# -- the report sensor -------------------------------------------------------------------------------
def test_sensor_requests_one_run_per_finished_parent(env: Env) -> None:
    store = env.store
    for chunk in _parent(store, "imp-done", 2):
        _complete(store, chunk)
    _parent(store, "imp-cancelled", 2)
    store.cancel("imp-cancelled", "wrong index")
    _complete(store, _parent(store, "imp-running", 2)[0])
    store.enqueue(DUMP, {}, job_id="imp-queued")
    _complete(store, _parent(store, "rs-done", 1, job_type=RESHARD)[0])
    finished = ["imp-done", "imp-cancelled", "rs-done"]

    with dg.instance_for_test() as instance:
        first = _tick(env, instance)
        requests = list(first.run_requests or [])
        by_parent = {rr.partition_key: rr for rr in requests}
        assert sorted(by_parent) == sorted(finished)  # none for the running or queued parent
        for parent_id in finished:
            rr, row = by_parent[parent_id], store.get(parent_id)
            assert rr.run_key == report_key(row) == rr.tags[TAG_PARENT_REPORT]
            assert str(rr.run_key).startswith(f"{parent_id}:{row.state}:")
            assert rr.job_name == NAMES.parent_report_job(row.type)
        assert by_parent["imp-cancelled"].run_key.startswith("imp-cancelled:failed:")  # type: ignore[union-attr]
        added = {
            req.partitions_def_name: sorted(req.partition_keys)  # type: ignore[union-attr]
            for req in first.dynamic_partitions_requests or []
        }
        assert added == {"miroir_dump_imports": ["imp-cancelled", "imp-done"], "miroir_reshard_backfills": ["rs-done"]}
        _launch(instance, first)

        # the same finishes again: nothing (their runs exist), even from no cursor at all
        assert not _tick(env, instance, first.cursor).run_requests
        assert not _tick(env, instance).run_requests

        # a finished parent finishing again (a chunk retried from the UI) is a new finish
        store.requeue(store.children("imp-done")[0].id)
        assert store.get("imp-done").state == JobState.IN_PROGRESS
        assert not _tick(env, instance, first.cursor).run_requests
        _complete(store, store.children("imp-done")[0])
        (again,) = _tick(env, instance, first.cursor).run_requests or []
        assert again.partition_key == "imp-done" and again.run_key == report_key(store.get("imp-done"))
        assert again.run_key != by_parent["imp-done"].run_key


def test_sensor_pages_through_a_backlog_of_finished_parents(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parent_reports, "REPORT_SCAN", 2)
    ids = [f"imp-{i}" for i in range(5)]
    for parent_id in ids:
        _complete(env.store, _parent(env.store, parent_id, 1)[0])
    requested: list[str] = []
    cursor = None
    with dg.instance_for_test() as instance:
        for _ in range(6):
            result = _tick(env, instance, cursor)
            requested += [str(rr.partition_key) for rr in result.run_requests or []]
            _launch(instance, result)
            cursor = result.cursor
    assert requested == ids  # each once, in finish order


# -- recording a parent ------------------------------------------------------------------------------
def test_parent_materialization_matches_the_parent_summary(env: Env) -> None:
    docs = make_docs(300, seed=3)
    lines = [orjson.dumps(d) for d in docs]
    lines[10] = b'{"title": "no id"}'
    lines[200] = b"not json at all"
    planned = _plan(env, lines, "summary", chunk_size=8 * 1024, on_invalid="skip")
    assert len(planned.chunk_ids) >= 3
    with dg.instance_for_test() as instance:
        assert all(r.success for r in _run_chunks(env, instance, planned.chunk_ids))
        summary = env.store.parent_summary(planned.parent.id)
        assert summary.parent.state == JobState.COMPLETED

        record = record_parent(env.defs, instance, planned.parent.id)
        assert isinstance(record, ParentRecord)
        assert (record.state, record.recorded_now, record.materialized) == ("completed", True, True)
        key = NAMES.parent_asset_key(DUMP)
        (mat,) = instance.fetch_materializations(key, limit=10).records
        assert mat.partition_key == planned.parent.id
        meta = _plain(dict(mat.asset_materialization.metadata))  # type: ignore[union-attr]
        prog = summary.progress
        assert meta["parent_job_id"] == planned.parent.id and meta["state"] == "completed"
        assert meta["documents"] == prog["docs_routed"] == len(docs) - 2
        assert meta["bytes"] == prog["bytes_processed"] == planned.bytes_total
        assert meta["invalid_documents"] == prog["invalid_documents"] == 2
        assert meta["per_node"] == prog["per_node"] and sum(meta["per_node"].values()) == len(docs) - 2
        assert meta["chunks"] == meta["chunks_completed"] == summary.chunks_total == len(planned.chunk_ids)
        assert meta["chunks_failed"] == 0 and meta["index_uid"] == "summary"
        assert meta["dead_letter_dir"] == str(env.root / "dead-letter" / planned.parent.id)
        assert Path(meta["dead_letter_dir"]).is_dir()
        assert isinstance(meta["mb_per_s"], float) and isinstance(meta["docs_per_s"], float)
        assert meta["duration_s"] > 0
        # some documents made it: the WARN check passes
        evaluation = instance.get_latest_asset_check_evaluation_record(NAMES.parent_check_key(DUMP))
        assert evaluation is not None and evaluation.event is not None
        assert evaluation.event.dagster_event.event_specific_data.passed  # type: ignore[union-attr]
        assert _status(instance, key, NAMES.parent_partitions(DUMP)) == ({planned.parent.id}, set())

        # recorded once: again from the CLI, or by the sensor
        again = record_parent(env.defs, instance, planned.parent.id)
        assert again is not None and not again.recorded_now and again.run_id == record.run_id
        assert not _tick(env, instance).run_requests


def test_unfinished_parent_is_not_recorded(env: Env) -> None:
    planned = _plan(env, [b'{"id": 1}'], "unfinished", chunk_size=1024)
    with dg.instance_for_test() as instance:
        assert record_parent(env.defs, instance, planned.parent.id) is None
        assert instance.get_runs() == []


def test_cancelled_parent_fails_its_run_with_the_facts(env: Env) -> None:
    docs = make_docs(120, seed=5)
    planned = _plan(env, [orjson.dumps(d) for d in docs], "cancelled", chunk_size=4 * 1024)
    assert len(planned.chunk_ids) >= 2
    with dg.instance_for_test() as instance:
        assert _run_chunks(env, instance, planned.chunk_ids[:1])[0].success
        env.store.cancel(planned.parent.id, "wrong index")

        record = record_parent(env.defs, instance, planned.parent.id)
        assert record is not None and (record.state, record.materialized) == ("failed", False)
        run = instance.get_run_by_id(record.run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.FAILURE
        (failure,) = instance.all_logs(record.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
        data = failure.dagster_event.step_failure_data  # type: ignore[union-attr]
        assert data.user_failure_data is not None
        description = str(data.user_failure_data.description)
        assert f"dump_import {planned.parent.id} failed: wrong index" in description
        meta = _plain(dict(data.user_failure_data.metadata))
        unfinished = len(planned.chunk_ids) - 1
        assert meta["state"] == "failed" and meta["error"] == "wrong index"
        assert meta["chunks_completed"] == 1 and meta["chunks_failed"] == unfinished
        assert meta["failed_chunks"] == [{"id": c, "error": "wrong index"} for c in planned.chunk_ids[1:]]
        assert meta["documents"] == env.store.parent_summary(planned.parent.id).progress["docs_routed"] > 0
        # the partition shows as failed, and nothing was materialized
        key = NAMES.parent_asset_key(DUMP)
        assert _status(instance, key, NAMES.parent_partitions(DUMP)) == (set(), {planned.parent.id})
        assert not instance.fetch_materializations(key, limit=1).records


def test_a_completed_parent_whose_report_run_failed_is_recorded_again(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The jobs store blips while a completed import is recorded: its report run fails. That
    run does not count as the record: the command (or a pool worker) records it again, and so
    does the sensor, under a new run key (the daemon drops a repeated one), until a run
    succeeds or REPORT_ATTEMPTS runs failed. A failed parent's run, failing by design, is not
    repeated (test above)."""
    planned = _plan(env, [orjson.dumps(d) for d in make_docs(50, seed=7)], "blip", chunk_size=1024 * 1024)
    store_class = type(env.store)
    real_summary = store_class.parent_summary
    blips = {"left": 1}

    # FAKE: the jobs store's outage during one report run, which cannot be timed from outside.
    def summary_once_unreachable(self: JobStore, parent_id: str) -> Any:
        if blips["left"]:
            blips["left"] -= 1
            raise OSError("jobs store unreachable")
        return real_summary(self, parent_id)

    with dg.instance_for_test() as instance:
        assert all(r.success for r in _run_chunks(env, instance, planned.chunk_ids))
        monkeypatch.setattr(store_class, "parent_summary", summary_once_unreachable)
        first = record_parent(env.defs, instance, planned.parent.id)
        assert first is not None and first.recorded_now and not first.materialized, "the blip failed the run"
        key = report_key(env.store.get(planned.parent.id))

        (retry,) = _tick(env, instance).run_requests or []
        assert retry.partition_key == planned.parent.id and retry.tags[TAG_PARENT_REPORT] == key
        assert retry.run_key == f"{key}#attempt-2"

        again = record_parent(env.defs, instance, planned.parent.id)
        assert again is not None and again.recorded_now and again.materialized
        assert again.run_id != first.run_id
        assert _status(instance, NAMES.parent_asset_key(DUMP), NAMES.parent_partitions(DUMP)) == ({planned.parent.id}, set())
        # recorded now: neither the sensor nor the command runs it again
        assert not _tick(env, instance).run_requests
        once_more = record_parent(env.defs, instance, planned.parent.id)
        assert once_more is not None and not once_more.recorded_now and once_more.run_id == again.run_id

        # runs that keep failing stop at REPORT_ATTEMPTS, and the sensor says so
        blips["left"] = 10
        for chunk in planned.chunk_ids:
            env.store.requeue(chunk)
        _run_chunks(env, instance, planned.chunk_ids)
        runs = [record_parent(env.defs, instance, planned.parent.id) for _ in range(parent_reports.REPORT_ATTEMPTS + 1)]
        assert [r.recorded_now for r in runs if r is not None] == [True] * parent_reports.REPORT_ATTEMPTS + [False]
        result = _tick(env, instance)
        assert not result.run_requests
        assert f"left unrecorded after {parent_reports.REPORT_ATTEMPTS} failed report runs" in str(result.skip_reason)


def _chunk_job() -> dg.JobDefinition:
    """The dump chunk job, reconstructable (a re-execution is launched from it)."""
    return miroir_definitions().resolve_job_def(NAMES.chunk_job(DUMP))


def test_re_executing_a_pool_run_from_the_ui_claims_the_chunk_anew(env: Env) -> None:
    """A pool worker hands its claim to the chunk's run in a tag; the run fails once the claim
    is gone (here: the worker failed the attempt, as it does for a run that died before the
    chunk started). Re-executing that run from the UI inherits its tags, the stale claim among
    them: it used to fail again on it; it claims the chunk anew and imports it."""
    planned = _plan(env, [orjson.dumps(d) for d in make_docs(40, seed=9)], "reexec", chunk_size=1024 * 1024)
    (chunk,) = planned.chunk_ids
    lease = env.store.claim([DUMP], "pool-worker-1", 30)
    assert lease is not None and lease.job_id == chunk
    env.store.fail(lease, "the Dagster run died before processing the chunk")
    tags = {TAG_CLAIM_TOKEN: lease.token, TAG_WORKER_ID: "pool-worker-1", TAG_CHUNK_RUN: POOL_CHUNK_RUN, "dagster/partition": chunk}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(NAMES.partitions(DUMP), [chunk])
        with dg.execute_job(dg.reconstructable(_chunk_job), instance, tags=tags, raise_on_error=False) as first:
            assert not first.success
            parent_run = first.dagster_run
        # What the UI's "Re-execute" sends: the parent run's tags (Dagster's own left out).
        inherited = {k: v for k, v in parent_run.tags.items() if not k.startswith("dagster/") or k == "dagster/partition"}
        assert inherited[TAG_CLAIM_TOKEN] == lease.token
        with dg.execute_job(
            dg.reconstructable(_chunk_job),
            instance,
            tags=inherited,
            raise_on_error=False,
            reexecution_options=dg.ReexecutionOptions(parent_run_id=parent_run.run_id),
        ) as again:
            failure = "" if again.success else str(again.all_events[-1].message)
            assert again.success, failure
    row = env.store.get(chunk)
    assert row.state == JobState.COMPLETED and row.claimed_by != "pool-worker-1"
    assert row.progress["docs_routed"] == 40


# -- all documents invalid -----------------------------------------------------------------------------
def test_all_invalid_chunk_and_parent_fail_the_warn_check(env: Env) -> None:
    lines = [b'{"title": "no id %d"}' % i for i in range(40)]
    planned = _plan(env, lines, "invalid", chunk_size=1024 * 1024, on_invalid="skip")
    (chunk,) = planned.chunk_ids
    with dg.instance_for_test() as instance:
        (result,) = _run_chunks(env, instance, [chunk])
        assert result.success  # skipped lines do not fail the chunk...
        evaluation = _check_evaluation(result)  # ...but its check warns
        assert evaluation.asset_check_key == NAMES.chunk_check_key(DUMP)
        assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
        meta = _plain(dict(evaluation.metadata))
        assert meta["documents"] == 0 and meta["invalid_documents"] == len(lines)
        assert meta["dead_letter"].endswith(f"{chunk}.ndjson") and Path(meta["dead_letter"]).is_file()
        assert "all 40 document(s) were invalid" in str(evaluation.description)

        # a no-op run of the completed chunk keeps warning
        again = env.defs.resolve_job_def(NAMES.chunk_job(DUMP)).execute_in_process(instance=instance, partition_key=chunk)
        assert not _check_evaluation(again).passed

        record = record_parent(env.defs, instance, planned.parent.id)
        assert record is not None and record.materialized  # completed: materialized, not green
        check = instance.get_latest_asset_check_evaluation_record(NAMES.parent_check_key(DUMP))
        assert check is not None and check.event is not None
        parent_eval = check.event.dagster_event.event_specific_data  # type: ignore[union-attr]
        assert isinstance(parent_eval, dg.AssetCheckEvaluation)
        assert not parent_eval.passed and parent_eval.severity == dg.AssetCheckSeverity.WARN
        assert parent_eval.target_materialization_data is not None
        assert _plain(dict(parent_eval.metadata))["invalid_documents"] == len(lines)


def test_healthy_chunk_passes_the_check(env: Env) -> None:
    planned = _plan(env, [b'{"id": %d}' % i for i in range(20)], "healthy", chunk_size=1024 * 1024)
    with dg.instance_for_test() as instance:
        (result,) = _run_chunks(env, instance, planned.chunk_ids)
        evaluation = _check_evaluation(result)
        assert evaluation.passed and _plain(dict(evaluation.metadata)) == {"documents": 20, "invalid_documents": 0}


# -- prune -------------------------------------------------------------------------------------------
def test_prune_removes_the_partitions_of_what_it_deletes(env: Env) -> None:
    done = _plan(env, [b'{"id": %d}' % i for i in range(200)], "pruned", chunk_size=1024)
    kept = _plan(env, [b'{"id": %d}' % i for i in range(50)], "kept", chunk_size=1024)
    assert len(done.chunk_ids) >= 2
    chunk_parts, parent_parts = NAMES.partitions(DUMP), NAMES.parent_partitions(DUMP)
    with dg.instance_for_test() as instance:
        _run_chunks(env, instance, done.chunk_ids)
        instance.add_dynamic_partitions(chunk_parts, kept.chunk_ids)
        record_parent(env.defs, instance, done.parent.id)
        instance.add_dynamic_partitions(parent_parts, [kept.parent.id])
        assert set(instance.get_dynamic_partitions(parent_parts)) == {done.parent.id, kept.parent.id}
        _finished_in_the_past(env.store, done.parent.id)
        # A staged copy no job names, left two hours ago: the job deletes it with its marker.
        stale = env.root / "staging" / "gone.ndjson-0123456789abcdef.jsonl"
        stale.parent.mkdir(exist_ok=True)
        for f in (stale, Path(f"{stale}.complete")):
            f.write_bytes(b"{}\n")
            os.utime(f, (time.time() - 7200, time.time() - 7200))

        for bad in (-1.0, float("nan"), float("inf")):  # refused before anything is deleted
            refused = env.defs.resolve_job_def(NAMES.prune_job).execute_in_process(
                instance=instance, run_config={"ops": {NAMES.prune_op: {"config": {"older_than_s": bad}}}},
                raise_on_error=False,
            )
            assert not refused.success
            failure = refused.failure_data_for_node(NAMES.prune_op)
            assert failure is not None and failure.user_failure_data is not None
            assert "must be a finite number of seconds, 0 or more" in str(failure.user_failure_data.description)
        assert set(instance.get_dynamic_partitions(parent_parts)) == {done.parent.id, kept.parent.id}
        result = env.defs.resolve_job_def(NAMES.prune_job).execute_in_process(
            instance=instance, run_config={"ops": {NAMES.prune_op: {"config": {"older_than_s": 0}}}}
        )
        assert result.success and result.output_for_node(NAMES.prune_op) == 1 + len(done.chunk_ids)
        assert set(instance.get_dynamic_partitions(chunk_parts)) == set(kept.chunk_ids)  # queued: kept
        assert instance.get_dynamic_partitions(parent_parts) == [kept.parent.id]
        (output,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
        out = _plain(dict(output.step_output_data.metadata))
        assert out["rows_deleted"] == 1 + len(done.chunk_ids) and out["parents_deleted"] == 1
        assert out["partitions_removed"] == 1 + len(done.chunk_ids)
        assert out["staged_files_deleted"] == 2 and out["staged_bytes_freed"] == 6 and not stale.exists()

        # the helper the CLI calls does the same
        env.store.cancel(kept.parent.id)
        _finished_in_the_past(env.store, kept.parent.id)
        outcome = prune_finished(env.store, instance, 0)
        assert outcome.pruned.parents == {DUMP: [kept.parent.id]}
        assert outcome.partitions_removed == 1 + len(kept.chunk_ids)
        assert instance.get_dynamic_partitions(chunk_parts) == []
        assert instance.get_dynamic_partitions(parent_parts) == []

        # partitions left behind by an earlier prune (rows gone) are swept on request
        instance.add_dynamic_partitions(chunk_parts, ["gone-c0000"])
        assert remove_orphaned_partitions(env.store, instance) == 1
        assert instance.get_dynamic_partitions(chunk_parts) == []
