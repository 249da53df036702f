"""A Meilisearch node that goes down mid-import (target retries, the resume protocol).

1. The node is SIGKILLed for ~20 s while chunks are being written: batches wait inside the
   node target's retry budget, no chunk attempt fails, and once the node is back the import
   completes with exact placement.
2. With a small retry budget the chunk fails instead, with an error naming the node (id and
   URL); the row stays retryable with its progress, and a later attempt, after the node is
   back, completes it — again with exact placement.
3. A node restarted on a fresh database hands the same task uids out again: a pending write
   whose uid now names another task (same index, succeeded) is not taken for acknowledged.

The fleet is dedicated to this test (``meili_fleet(dedicated=True)``): killing it harms no one.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from miroir_pipeline.fleet.targets.base import NodeTarget, TargetError
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.targets.meilisearch import MeilisearchNode, _EnqueuedTasks
from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import, process_dump_chunk
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState, JobStore
from tests.failure.conftest import settings_for, wait_for
from tests.import_helpers import (
    actual_placement,
    assert_exact_placement,
    expected_placement,
    make_docs,
    write_dump,
)

pytestmark = [pytest.mark.meilisearch, pytest.mark.slow]

OUTAGE_S = 20.0


def _drain(store: JobStore, targets: dict[str, NodeTarget], settings: Any, errors: list[BaseException]) -> None:
    try:
        while (lease := store.claim(["dump_import"], "outage-worker", settings.lease_ttl)) is not None:
            process_dump_chunk(store, lease, targets, settings)
    except BaseException as exc:
        errors.append(exc)


@pytest.mark.timeout(240)
def test_node_down_for_twenty_seconds_is_ridden_out_by_batch_retries(
    tmp_path: Path, meili_fleet: Any, meili_topology: Any
) -> None:
    procs = meili_fleet(3, dedicated=True)
    topo = meili_topology(procs, shards=16)
    store = open_store(f"sqlite:///{tmp_path}/jobs.sqlite3")
    # A budget that outlasts the outage whatever the jitter: 30 retries, backoff capped at 2 s.
    targets = open_targets(topo, meilisearch_options={"max_retries": 30, "backoff_cap": 2.0})
    docs = make_docs(6000, seed=31)
    dump = write_dump(tmp_path / "dump.ndjson", docs)
    settings = settings_for(tmp_path, chunk_size_bytes=64 * 1024, batch_size=250, read_block_bytes=16 * 1024, lease_ttl=5.0, heartbeat_interval=1.0)
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid="outage", primary_key="id"), topo, targets, settings)
    assert len(plan.chunk_ids) >= 4

    errors: list[BaseException] = []
    worker = threading.Thread(target=_drain, args=(store, targets, settings, errors))
    worker.start()
    try:
        wait_for(lambda: store.children(plan.parent.id)[0].state == JobState.COMPLETED, 60, "the first chunk")
        victim = procs[1]
        victim.kill()
        killed_at = time.monotonic()
        at_kill = store.parent_summary(plan.parent.id)
        assert at_kill.parent.state == JobState.IN_PROGRESS, "the import finished before the kill"
        bytes_at_kill = at_kill.progress.get("bytes_processed", 0)
        time.sleep(OUTAGE_S)
        # Nothing could be committed while a target of every batch was down; nothing failed.
        during = store.parent_summary(plan.parent.id)
        assert during.parent.state == JobState.IN_PROGRESS, "the import went on without the node"
        assert not during.chunks_by_state.get(JobState.FAILED)
        assert all(c.attempts <= 1 for c in store.children(plan.parent.id))
        stalled_bytes = during.progress.get("bytes_processed", 0) - bytes_at_kill
        victim.start()
        down_s = time.monotonic() - killed_at
    finally:
        worker.join(timeout=180)
    assert not worker.is_alive(), "the import did not finish after the node came back"
    assert not errors, errors[0]

    chunks = store.children(plan.parent.id)
    summary = store.parent_summary(plan.parent.id)
    assert summary.parent.state == JobState.COMPLETED
    assert [c.attempts for c in chunks] == [1] * len(chunks), "a batch retry budget ran out"
    expected = expected_placement(docs, topo)
    assert summary.progress["per_node"] == {n: len(d) for n, d in expected.items()}
    assert_exact_placement(expected, actual_placement(targets, "outage"))
    print(f"\nnode {victim.url} down {down_s:.1f}s; {len(chunks)} chunks, none retried; bytes committed while down: {stalled_bytes}")


@pytest.mark.timeout(180)
def test_small_retry_budget_fails_the_chunk_naming_the_node_and_a_later_attempt_completes(
    tmp_path: Path, meili_fleet: Any, meili_topology: Any
) -> None:
    procs = meili_fleet(3, dedicated=True)
    topo = meili_topology(procs, shards=16)
    store = open_store(f"sqlite:///{tmp_path}/jobs.sqlite3", retry_backoff_base=0.2)
    targets = open_targets(topo, meilisearch_options={"max_retries": 1, "backoff_base": 0.05, "backoff_cap": 0.1})
    docs = make_docs(10_000, seed=32)
    dump = write_dump(tmp_path / "dump.ndjson", docs)
    settings = settings_for(tmp_path, chunk_size_bytes=1 << 30, batch_size=200, read_block_bytes=16 * 1024)
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid="budget", primary_key="id"), topo, targets, settings)
    [chunk] = plan.chunk_ids
    victim_id = next(n.id for n in topo.all_nodes() if n.url == procs[2].url)

    lease = store.claim(["dump_import"], "first", 30)
    assert lease is not None
    failure: list[BaseException] = []

    def run() -> None:
        try:
            process_dump_chunk(store, lease, targets, settings)
        except BaseException as exc:
            failure.append(exc)

    first = threading.Thread(target=run)
    first.start()
    try:
        wait_for(lambda: int(store.get(chunk).progress.get("last_cursor", 0)) > 0, 60, "a committed batch")
        procs[2].kill()
    finally:
        first.join(timeout=60)
    assert len(failure) == 1 and isinstance(failure[0], TargetError), (failure, store.get(chunk).state)
    message = str(failure[0])
    assert f"node {victim_id} ({procs[2].url})" in message and "failed after 2 attempts" in message, message
    row = store.get(chunk)
    assert row.state == JobState.QUEUED and row.attempts == 1, "a node outage is retryable"
    assert row.error is not None and victim_id in row.error and procs[2].url in row.error
    kept = int(row.progress["last_cursor"])
    assert 0 < kept < dump.stat().st_size, "the committed cursor survives the failure"

    procs[2].start()
    deadline = time.monotonic() + 10
    retry = None
    while retry is None and time.monotonic() < deadline:  # claimable again after the backoff
        retry = store.claim(["dump_import"], "second", 30)
        time.sleep(0.05)
    assert retry is not None and retry.attempt == 2
    report = process_dump_chunk(store, retry, targets, settings)
    assert report.resumed_from == kept, "the later attempt resumes at the committed cursor"
    row = store.get(chunk)
    assert row.state == JobState.COMPLETED and row.attempts == 2 and row.error is None
    assert store.get(plan.parent.id).state == JobState.COMPLETED
    expected = expected_placement(docs, topo)
    assert row.progress["per_node"] == {n: len(d) for n, d in expected.items()}
    assert_exact_placement(expected, actual_placement(targets, "budget"))
    print(f"\nfirst attempt failed: {message}")


def test_a_task_uid_handed_out_again_after_a_fresh_restart_is_not_taken_for_ours(meili_fleet: Any) -> None:
    """Our batch was enqueued, then the node restarted on an empty database and the same uid
    went to another write of the same index, which succeeded. Matching by uid and index alone,
    the batch counted as acknowledged though the node holds none of it."""
    proc = meili_fleet(1, dedicated=True)[0]
    node = MeilisearchNode("n0", proc.url, api_key=proc.master_key, max_retries=2, backoff_base=0.05)
    try:
        node.ensure_index("reused", "id")
        pending = node.enqueue_routed("reused", "id", [b'{"id":"ours"}'], ["ours"], [0])
        assert isinstance(pending, _EnqueuedTasks)
        [ours] = pending.remaining
        proc.kill()
        shutil.rmtree(proc.data_dir / "data.ms")
        proc.start()
        node.ensure_index("reused", "id")
        while True:  # another client writes until the node hands out our uid again
            task = node._enqueue_task(
                "POST", "/indexes/reused/documents", what="another write", index_uid="reused",
                json=[{"id": "theirs"}],
            )  # fmt: skip
            assert task.uid <= ours, "the fresh node skipped our uid"
            if task.uid == ours:
                break
        node.await_task(task.uid, what="another write", index_uid="reused")

        node.refresh([pending])
        with pytest.raises(TargetError, match="is now another task") as info:
            pending.check()
        assert info.value.retryable and "fresh database" in str(info.value)
        with pytest.raises(TargetError, match="is now another task"):
            node.await_task(ours, what="adding documents", index_uid="reused", enqueued_at=pending.enqueued_at[ours])
        assert node.count_documents("reused") == 1  # theirs: ours never landed
    finally:
        node.close()
