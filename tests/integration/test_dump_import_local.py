"""Dump import end to end into local node stores: plan → Dagster chunk runs → exact placement."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import dagster as dg
import orjson
import pytest

from miroir_pipeline.dagster import MiroirNames, miroir_definitions
from miroir_pipeline.dagster.names import TAG_ATTEMPT
from miroir_pipeline.dagster.worker_pool import Worker
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.dump_import import (
    DumpImportRequest,
    InvalidDocumentError,
    plan_dump_import,
    process_dump_chunk,
)
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState, JobStore
from miroir_pipeline.sources import DumpSourceError
from tests.import_helpers import (
    actual_placement,
    assert_exact_placement,
    expected_placement,
    local_topology,
    make_docs,
    write_dump,
)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    dsn = f"sqlite:///{tmp_path}/jobs.sqlite3"
    monkeypatch.setenv("MIROIR_JOBS_DSN", dsn)
    monkeypatch.setenv("MIROIR_ALLOWED_ROOTS", str(tmp_path))
    monkeypatch.setenv("MIROIR_DEAD_LETTER_DIR", str(tmp_path / "dlq"))
    monkeypatch.setenv("MIROIR_STAGING_DIR", str(tmp_path / "staging"))
    store = open_store(dsn)
    yield {"root": tmp_path, "store": store, "dsn": dsn}
    store.close()


def settings_for(root: Path, **kw: Any) -> PipelineSettings:
    return PipelineSettings(
        allowed_roots=[str(root)], staging_dir=str(root / "staging"), dead_letter_dir=str(root / "dlq"), **kw
    )


def drain(store: JobStore, targets: Any, settings: PipelineSettings) -> list[Any]:
    reports = []
    while (lease := store.claim(["dump_import"], "test-worker", settings.lease_ttl)) is not None:
        reports.append(process_dump_chunk(store, lease, targets, settings))
    return reports


@pytest.mark.parametrize(("groups", "rf"), [(1, 1), (2, 1), (1, 2)])
def test_import_through_dagster_runs_places_every_document_exactly(env: dict[str, Any], groups: int, rf: int) -> None:
    root: Path = env["root"]
    topo = local_topology(root / "nodes", groups=groups, rf=rf)
    docs = make_docs(3000)
    dump = write_dump(root / "dump.ndjson", docs)
    targets = open_targets(topo)
    settings = settings_for(root, chunk_size_bytes=64 * 1024, batch_size=300)
    plan = plan_dump_import(env["store"], DumpImportRequest(uri=str(dump), index_uid="products", primary_key="id"), topo, targets, settings)
    assert len(plan.chunk_ids) > 3

    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(MiroirNames().partitions("dump_import"), plan.chunk_ids)
        worker = Worker(env["store"], instance, miroir_definitions(), settings, parent_id=plan.parent.id, exit_when_empty=True)
        stats = worker.run()
        assert stats.chunks_failed == 0 and stats.chunks_succeeded == len(plan.chunk_ids)
        # Every chunk is a successful run of its partition, with the processing metadata.
        mats = instance.fetch_materializations(dg.AssetKey(["miroir", "dump_chunk"]), limit=1000).records
        by_partition = {m.partition_key: m.asset_materialization for m in mats}
        assert set(by_partition) == set(plan.chunk_ids)
        assert sum(int(m.metadata["documents"].value) for m in by_partition.values()) == len(docs)

    summary = env["store"].parent_summary(plan.parent.id)
    assert summary.parent.state == JobState.COMPLETED
    assert summary.progress["docs_routed"] == len(docs)
    assert summary.progress["bytes_processed"] == dump.stat().st_size
    expected = expected_placement(docs, topo)
    assert summary.progress["per_node"] == {n: len(d) for n, d in expected.items()}
    assert_exact_placement(expected, actual_placement(targets, "products"))


def test_small_dump_is_one_chunk_and_empty_dump_completes_with_nothing(env: dict[str, Any]) -> None:
    root: Path = env["root"]
    topo = local_topology(root / "nodes")
    targets = open_targets(topo)
    settings = settings_for(root)
    docs = make_docs(10)
    small = write_dump(root / "small.ndjson", docs)
    plan = plan_dump_import(env["store"], DumpImportRequest(uri=str(small), index_uid="small", primary_key="id"), topo, targets, settings)
    assert len(plan.chunk_ids) == 1
    drain(env["store"], targets, settings)
    assert_exact_placement(expected_placement(docs, topo), actual_placement(targets, "small"))

    empty = root / "empty.ndjson"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty: no documents to import; pass --allow-empty"):
        plan_dump_import(env["store"], DumpImportRequest(uri=str(empty), index_uid="empty", primary_key="id"), topo, targets, settings)
    plan = plan_dump_import(env["store"], DumpImportRequest(uri=str(empty), index_uid="empty", primary_key="id", allow_empty=True), topo, targets, settings)
    assert plan.chunk_ids == []
    assert env["store"].get(plan.parent.id).state == JobState.COMPLETED


def test_crlf_no_trailing_newline_and_gzip_dumps(env: dict[str, Any]) -> None:
    root: Path = env["root"]
    topo = local_topology(root / "nodes")
    targets = open_targets(topo)
    settings = settings_for(root, chunk_size_bytes=4096)
    docs = make_docs(400, seed=3)
    crlf = write_dump(root / "crlf.ndjson", docs, crlf=True)
    crlf.write_bytes(crlf.read_bytes().rstrip(b"\r\n"))  # last line without newline
    plan_dump_import(env["store"], DumpImportRequest(uri=str(crlf), index_uid="crlf", primary_key="id"), topo, targets, settings)
    drain(env["store"], targets, settings)
    assert_exact_placement(expected_placement(docs, topo), actual_placement(targets, "crlf"))

    gz = root / "dump.ndjson.gz"
    gz.write_bytes(gzip.compress(b"".join(orjson.dumps(d) + b"\n" for d in docs)))
    plan_dump_import(env["store"], DumpImportRequest(uri=str(gz), index_uid="gz", primary_key="id"), topo, targets, settings)
    drain(env["store"], targets, settings)
    assert_exact_placement(expected_placement(docs, topo), actual_placement(targets, "gz"))


BAD_LINES = [
    (b'{"id": 1.5, "x": 1}', "float"),
    (b'{"id": true}', "boolean"),
    (b'{"id": null}', "null"),
    (b'{"id": ""}', "empty"),
    (b'{"id": "has space"}', "characters outside"),
    (b'{"id": "' + b"k" * 512 + b'"}', "512 bytes"),
    (b'{"name": "no id"}', "missing"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b'{"id": 7, "broken": ', "invalid JSON"),
    (b'{"id": "ok-utf8", "v": "\xff\xfe"}', "invalid UTF-8"),
]


@pytest.mark.parametrize(("bad", "reason"), BAD_LINES)
def test_fail_policy_stops_the_chunk_naming_dump_line_and_offset(env: dict[str, Any], bad: bytes, reason: str) -> None:
    root: Path = env["root"]
    topo = local_topology(root / "nodes")
    targets = open_targets(topo)
    settings = settings_for(root)
    good = [orjson.dumps(d) for d in make_docs(50)]
    lines = [*good[:20], bad, *good[20:]]
    dump = root / "bad.ndjson"
    dump.write_bytes(b"\n".join(lines) + b"\n")
    offset = sum(len(x) + 1 for x in lines[:20])
    plan = plan_dump_import(env["store"], DumpImportRequest(uri=str(dump), index_uid="bad", primary_key="id"), topo, targets, settings)
    lease = env["store"].claim(["dump_import"], "w", 30)
    assert lease is not None
    with pytest.raises(InvalidDocumentError) as err:
        process_dump_chunk(env["store"], lease, targets, settings)
    message = str(err.value)
    assert f"{dump}: line 21, byte offset {offset}" in message and reason in message
    chunk = env["store"].get(plan.chunk_ids[0])
    assert chunk.state == JobState.FAILED and "line 21" in (chunk.error or "")
    assert env["store"].get(plan.parent.id).state == JobState.FAILED


def test_skip_policy_dead_letters_every_bad_line_and_counts_add_up(env: dict[str, Any]) -> None:
    root: Path = env["root"]
    topo = local_topology(root / "nodes")
    targets = open_targets(topo)
    settings = settings_for(root, chunk_size_bytes=2048, on_invalid_document="skip")
    docs = make_docs(200, seed=5)
    lines = [orjson.dumps(d) for d in docs]
    for i, (bad, _) in enumerate(BAD_LINES):
        lines.insert(7 + i * 15, bad)
    lines.insert(0, b"")  # blank lines are ignored, not counted as invalid
    dump = root / "mixed.ndjson"
    dump.write_bytes(b"\n".join(lines) + b"\n")
    plan = plan_dump_import(env["store"], DumpImportRequest(uri=str(dump), index_uid="mixed", primary_key="id", on_invalid_document="skip"), topo, targets, settings)
    drain(env["store"], targets, settings)
    summary = env["store"].parent_summary(plan.parent.id)
    assert summary.parent.state == JobState.COMPLETED
    assert summary.progress["invalid_documents"] == len(BAD_LINES)
    assert summary.progress["docs_routed"] + summary.progress["invalid_documents"] == len(lines) - 1
    dead = [orjson.loads(x) for f in sorted((root / "dlq" / plan.parent.id).glob("*.ndjson")) for x in f.read_bytes().splitlines()]
    assert len(dead) == len(BAD_LINES)
    data = dump.read_bytes()
    for rec in dead:
        assert rec["dump"] == str(dump) and rec["reason"]
        # The recorded offset and line number point at the bad line itself.
        assert data.count(b"\n", 0, rec["byte_offset"]) + 1 == rec["line"]
    assert_exact_placement(expected_placement(docs, topo), actual_placement(targets, "mixed"))


def test_bad_configuration_is_refused_before_any_job_is_queued(env: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> None:
    root: Path = env["root"]
    topo = local_topology(root / "nodes")
    targets = open_targets(topo)
    settings = settings_for(root)
    outside = tmp_path_factory.mktemp("outside") / "d.ndjson"
    write_dump(outside, make_docs(5))
    with pytest.raises(DumpSourceError, match="outside the allowed"):
        plan_dump_import(env["store"], DumpImportRequest(uri=str(outside), index_uid="x", primary_key="id"), topo, targets, settings)
    with pytest.raises(DumpSourceError, match="does not exist"):
        plan_dump_import(env["store"], DumpImportRequest(uri=str(root / "nope.ndjson"), index_uid="x", primary_key="id"), topo, targets, settings)
    assert env["store"].list_parents() == []
    with pytest.raises(ValueError, match="replication_factor"):
        Topology.parse({"shards": 4, "replication_factor": 4, "groups": [{"id": 0, "nodes": [{"id": "a", "url": "local:///x"}]}]})
    with pytest.raises(ValueError, match="shards"):
        Topology.parse({"shards": 0, "groups": [{"id": 0, "nodes": [{"id": "a", "url": "local:///x"}]}]})


def test_completed_chunk_run_is_a_noop_and_held_chunk_run_ends_with_clear_message(env: dict[str, Any]) -> None:
    root: Path = env["root"]
    topo = local_topology(root / "nodes")
    targets = open_targets(topo)
    settings = settings_for(root, chunk_size_bytes=8192)
    docs = make_docs(300)
    dump = write_dump(root / "d.ndjson", docs)
    plan = plan_dump_import(env["store"], DumpImportRequest(uri=str(dump), index_uid="p", primary_key="id"), topo, targets, settings)
    first, second = plan.chunk_ids[0], plan.chunk_ids[1]
    job = miroir_definitions().resolve_job_def(MiroirNames().chunk_job("dump_import"))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(MiroirNames().partitions("dump_import"), plan.chunk_ids)
        assert job.execute_in_process(instance=instance, partition_key=first).success
        again = job.execute_in_process(instance=instance, partition_key=first)
        assert again.success
        mats = [e for e in again.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
        assert mats and mats[0].event_specific_data.materialization.metadata["noop"].value is True

        held = env["store"].claim_by_id(second, "someone-else", 300)
        res = job.execute_in_process(instance=instance, partition_key=second, raise_on_error=False)
        assert not res.success
        failure = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE")
        assert "someone-else" in failure.step_failure_data.user_failure_data.description
        row = env["store"].get(second)
        assert row.claim_token == held.token and row.claimed_by == "someone-else"


def test_ui_retry_of_a_failed_chunk_and_reimport_of_a_completed_one(env: dict[str, Any]) -> None:
    root: Path = env["root"]
    topo = local_topology(root / "nodes")
    targets = open_targets(topo)
    settings = settings_for(root)
    docs = make_docs(100)
    dump = root / "fixable.ndjson"
    good = b"".join(orjson.dumps(d) + b"\n" for d in docs)
    dump.write_bytes(good[:-2] + b',\n')  # last line broken (same length): the chunk fails for good
    plan = plan_dump_import(env["store"], DumpImportRequest(uri=str(dump), index_uid="fix", primary_key="id"), topo, targets, settings)
    [chunk] = plan.chunk_ids
    job = miroir_definitions().resolve_job_def(MiroirNames().chunk_job("dump_import"))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(MiroirNames().partitions("dump_import"), plan.chunk_ids)
        assert not job.execute_in_process(instance=instance, partition_key=chunk, raise_on_error=False).success
        assert env["store"].get(chunk).state == JobState.FAILED
        dump.write_bytes(good)  # the operator fixes the dump and retries the partition
        assert job.execute_in_process(instance=instance, partition_key=chunk).success
        assert env["store"].get(plan.parent.id).state == JobState.COMPLETED
        assert_exact_placement(expected_placement(docs, topo), actual_placement(targets, "fix"))

        targets[topo.all_nodes()[0].id].delete_documents("fix", [str(docs[1]["id"]), str(docs[2]["id"])])
        res = job.execute_in_process(instance=instance, partition_key=chunk, tags={"miroir/reimport": "true"})
        meta = next(e for e in res.all_events if e.event_type_value == "ASSET_MATERIALIZATION").event_specific_data.materialization.metadata
        assert "noop" not in meta and int(meta["documents"].value) == len(docs)
        assert_exact_placement(expected_placement(docs, topo), actual_placement(targets, "fix"))


def test_a_dispatched_run_starting_after_a_cancel_does_nothing(env: dict[str, Any]) -> None:
    """The dispatch sensor launches a run while a chunk is claimable; if the import is cancelled
    (or the chunk fails for good) before the run starts, the run must not take it as an
    operator's retry: the cancel holds, the attempt budget is untouched."""
    root: Path = env["root"]
    topo = local_topology(root / "nodes")
    targets = open_targets(topo)
    settings = settings_for(root, chunk_size_bytes=8192)
    dump = write_dump(root / "d.ndjson", make_docs(300))
    plan = plan_dump_import(env["store"], DumpImportRequest(uri=str(dump), index_uid="c", primary_key="id"), topo, targets, settings)
    chunk = plan.chunk_ids[0]
    env["store"].cancel(plan.parent.id, "wrong index")
    job = miroir_definitions().resolve_job_def(MiroirNames().chunk_job("dump_import"))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(MiroirNames().partitions("dump_import"), plan.chunk_ids)
        res = job.execute_in_process(instance=instance, partition_key=chunk, tags={TAG_ATTEMPT: "1"}, raise_on_error=False)
        assert not res.success
        failure = next(e for e in res.all_events if e.event_type_value == "STEP_FAILURE")
        assert "after this run was dispatched" in failure.step_failure_data.user_failure_data.description
    row = env["store"].get(chunk)
    assert row.state == JobState.FAILED and row.attempts == 0 and row.error is not None and "wrong index" in row.error
    assert env["store"].get(plan.parent.id).state == JobState.FAILED
    assert all(not held for held in actual_placement(targets, "c").values())


def test_drain_hands_a_dump_chunk_back_at_its_cursor_and_it_resumes(env: dict[str, Any]) -> None:
    """Shutdown travels as an explicit context: requesting it mid-chunk hands the chunk back at
    the last committed byte cursor; the next attempt resumes there and places every document."""
    from miroir_pipeline.queue.shutdown import ChunkHandedBack, Shutdown

    root: Path = env["root"]
    store: JobStore = env["store"]
    topo = local_topology(root / "nodes")
    targets = open_targets(topo)
    # Many small batches in one chunk, and a small window, so most batches are routed after the
    # drain request (with a large window the whole chunk is handed to the nodes at once).
    settings = settings_for(root, batch_size=300, read_block_bytes=4096, memory_buffer_bytes=64 * 1024)
    docs = make_docs(3000, seed=11)
    dump = write_dump(root / "drain.ndjson", docs)
    plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid="drain", primary_key="id"), topo, targets, settings)
    lease = store.claim(["dump_import"], "w1", settings.lease_ttl)
    assert lease is not None
    shutdown = Shutdown()
    with pytest.raises(ChunkHandedBack, match="handed back at byte") as handed:
        process_dump_chunk(store, lease, targets, settings, shutdown=shutdown, on_batch=lambda _r: shutdown.request())
    row = store.get(lease.job_id)
    assert row.state == JobState.QUEUED and row.claimed_by is None
    cursor = int(row.progress["last_cursor"])
    assert f"handed back at byte {cursor}:" in str(handed.value)  # the committed cursor, named
    assert 0 < cursor < int(row.params["end"])
    again = store.claim(["dump_import"], "w2", settings.lease_ttl)
    assert again is not None and again.job_id == lease.job_id
    report = process_dump_chunk(store, again, targets, settings)
    assert report.resumed_from == cursor
    assert store.get(lease.job_id).state == JobState.COMPLETED
    assert_exact_placement(expected_placement(docs, topo), actual_placement(targets, "drain"))
