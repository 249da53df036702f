"""The job-store contract, run unchanged against SQLite and Postgres.

Expiry is exercised with short real leases (0.3 s) and sleeps, retries with a 0.05 s
backoff base (the ``retry_backoff_base`` store option), races with real threads and real
processes (``spawn``), each process opening its own store from the DSN.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import itertools
import json
import multiprocessing
import os
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from miroir_pipeline import metrics
from miroir_pipeline.queue import (
    Job,
    JobKind,
    JobNotClaimable,
    JobNotFound,
    JobState,
    JobStore,
    Lease,
    LeaseLost,
    NewChunk,
    SplitRefused,
    open_store,
)
from miroir_pipeline.queue.contract import chunk_id
from miroir_pipeline.queue.lease import LeaseKeeper, acquire_chunk, hand_back, run_under_lease
from miroir_pipeline.queue.shutdown import ChunkHandedBack

DUMP = "dump_import"
RESHARD = "reshard_backfill"
SHORT_TTL = 0.3
PAST_SHORT_TTL = 0.45


def make_parent(
    store: JobStore,
    n: int,
    *,
    job_type: str = DUMP,
    max_attempts: int = 5,
    job_id: str | None = None,
) -> tuple[Job, list[Job]]:
    parent = store.enqueue(job_type, {"uri": "file:///d.ndjson"}, job_id=job_id,
                           max_attempts=max_attempts)  # fmt: skip
    children = store.split(parent.id, [NewChunk(i, {"start": i * 10, "end": i * 10 + 10})
                                       for i in range(n)])  # fmt: skip
    return store.get(parent.id), children


def claim_one(store: JobStore, worker: str = "w1", ttl: float = 30.0, **kw: Any) -> Lease:
    lease = store.claim([DUMP, RESHARD], worker, ttl=ttl, **kw)
    assert lease is not None, "expected a claimable chunk"
    return lease


# -- producers ---------------------------------------------------------------------------------


def test_parent_is_never_claimable(store: JobStore) -> None:
    parent = store.enqueue(DUMP, {"uri": "x"})
    assert parent.kind == JobKind.PARENT and parent.state == JobState.QUEUED
    assert store.claim([DUMP], "w1") is None
    assert store.queue_depth([DUMP, RESHARD]) == {DUMP: 0, RESHARD: 0}


def test_split_inserts_children_and_moves_parent_out_of_queue(store: JobStore) -> None:
    parent = store.enqueue(DUMP, {"uri": "x", "ünï": [1, {"a": None}]}, max_attempts=7)
    children = store.split(
        parent.id, [NewChunk(i, {"i": i}, progress={"bytes_processed": 0}) for i in range(3)]
    )
    assert [c.id for c in children] == [chunk_id(parent.id, i, 3) for i in range(3)]
    for i, c in enumerate(children):
        assert (c.kind, c.state, c.type, c.max_attempts) == ("chunk", "queued", DUMP, 7)
        assert (c.parent_job_id, c.chunk_index, c.total_chunks) == (parent.id, i, 3)
        assert c.params == {"i": i} and c.progress == {"bytes_processed": 0}
        assert c.attempts == 0 and c.claim_token is None
    got = store.get(parent.id)
    assert got.state == JobState.IN_PROGRESS and got.total_chunks == 3
    assert got.claim_token is None and got.claim_expires_at is None and got.claimed_by is None
    assert got.params == {"uri": "x", "ünï": [1, {"a": None}]}
    assert [c.id for c in store.children(parent.id)] == [c.id for c in children]
    assert store.queue_depth([DUMP])[DUMP] == 3


def test_resplit_is_refused_and_nothing_changes(store: JobStore) -> None:
    parent, children = make_parent(store, 2)
    with pytest.raises(SplitRefused):
        store.split(parent.id, [NewChunk(0, {})])
    with pytest.raises(SplitRefused):
        store.split(children[0].id, [NewChunk(0, {})])
    with pytest.raises(JobNotFound):
        store.split("no-such-parent", [NewChunk(0, {})])
    assert len(store.children(parent.id)) == 2
    with pytest.raises(ValueError, match="chunk_index"):
        store.split(store.enqueue(DUMP, {}).id, [NewChunk(0, {}), NewChunk(2, {})])


def test_split_into_zero_chunks_completes_parent(store: JobStore) -> None:
    parent = store.enqueue(DUMP, {})
    assert store.split(parent.id, []) == []
    got = store.get(parent.id)
    assert got.state == JobState.COMPLETED and got.finished_at is not None
    assert got.total_chunks == 0


def test_duplicate_job_id_is_an_error(store: JobStore) -> None:
    store.enqueue(DUMP, {}, job_id="dup")
    with pytest.raises(Exception, match="already exists"):
        store.enqueue(DUMP, {}, job_id="dup")


# -- claiming ----------------------------------------------------------------------------------


def test_claim_sets_a_fresh_lease(store: JobStore) -> None:
    _, children = make_parent(store, 2)
    a = claim_one(store, "w1", ttl=30)
    b = claim_one(store, "w2", ttl=30)
    assert {a.job_id, b.job_id} == {c.id for c in children}
    assert a.token != b.token and len(a.token) == 32
    for lease, worker in ((a, "w1"), (b, "w2")):
        job = store.get(lease.job_id)
        assert job.state == JobState.IN_PROGRESS and job.claimed_by == worker
        assert job.claim_token == lease.token and job.attempts == lease.attempt == 1
        assert lease.worker_id == worker and lease.expires_at == job.claim_expires_at
        assert 25 < (lease.expires_at - job.updated_at).total_seconds() <= 30.01
    assert store.claim([DUMP], "w3") is None
    with pytest.raises(ValueError):
        store.claim([DUMP], "w3", ttl=0)


def test_claim_only_takes_requested_types(store: JobStore) -> None:
    make_parent(store, 1, job_type=RESHARD)
    assert store.claim([DUMP], "w1") is None
    lease = store.claim([RESHARD], "w1")
    assert lease is not None and lease.job.type == RESHARD


def test_two_parents_queued_together_interleave(store: JobStore) -> None:
    a, _ = make_parent(store, 3)
    b, _ = make_parent(store, 3)
    order = [claim_one(store).job for _ in range(6)]
    pairs = [{(j.parent_job_id, j.chunk_index) for j in order[i : i + 2]} for i in (0, 2, 4)]
    assert pairs == [{(a.id, k), (b.id, k)} for k in range(3)]


def test_a_claim_scoped_to_a_parent_takes_only_its_chunks(open_jobs: Callable[..., JobStore]) -> None:
    # A long backoff, so "not claimable before its backoff" holds however slow the machine is.
    store = open_jobs(retry_backoff_base=30.0)
    a, _ = make_parent(store, 3)
    b, _ = make_parent(store, 2)
    got = [claim_one(store, parent_id=a.id).job for _ in range(3)]
    assert [(j.parent_job_id, j.chunk_index) for j in got] == [(a.id, 0), (a.id, 1), (a.id, 2)]
    assert store.claim([DUMP], "w1", parent_id=a.id) is None  # b's chunks are not a's
    assert {j.state for j in store.children(b.id)} == {JobState.QUEUED}
    assert store.claim([RESHARD], "w1", parent_id=b.id) is None  # types still apply

    # Scoped claims keep the rules of any claim: a failed attempt waits out its backoff, and an
    # expired lease is claimable again with its progress and the next attempt.
    first = claim_one(store, "w2", ttl=SHORT_TTL, parent_id=b.id)
    store.fail(claim_one(store, "w2", parent_id=b.id), "node down")
    store.save_progress(first, {"last_cursor": {"offset": 7}})
    time.sleep(PAST_SHORT_TTL)
    again = claim_one(store, "w3", parent_id=b.id)
    assert again.job_id == first.job_id and again.attempt == 2
    assert again.job.progress == {"last_cursor": {"offset": 7}}
    assert store.claim([DUMP], "w3", parent_id=b.id) is None  # the other one is backing off
    assert store.claim([DUMP], "w3", parent_id="no-such-parent") is None


def test_expired_lease_is_reclaimed_with_progress_and_next_attempt(store: JobStore) -> None:
    make_parent(store, 1)
    first = claim_one(store, "w1", ttl=SHORT_TTL)
    store.save_progress(first, {"bytes_processed": 100, "last_cursor": {"offset": 100}})
    time.sleep(PAST_SHORT_TTL)
    assert store.queue_depth([DUMP])[DUMP] == 1  # the expired lease counts
    second = claim_one(store, "w2", ttl=30)
    assert second.job_id == first.job_id and second.token != first.token
    assert second.attempt == 2 and second.job.claimed_by == "w2"
    assert second.job.progress == {"bytes_processed": 100, "last_cursor": {"offset": 100}}
    # The first holder is fenced out of every write.
    with pytest.raises(LeaseLost):
        store.renew(first)
    with pytest.raises(LeaseLost):
        store.save_progress(first, {"bytes_processed": 1})
    with pytest.raises(LeaseLost):
        store.complete(first)
    with pytest.raises(LeaseLost):
        store.fail(first, "boom")
    with pytest.raises(LeaseLost):
        store.release(first)
    job = store.get(first.job_id)
    assert job.state == JobState.IN_PROGRESS and job.claim_token == second.token
    assert job.progress["bytes_processed"] == 100
    store.complete(second, {"bytes_processed": 200})
    assert store.get(first.job_id).progress == {"bytes_processed": 200}


def test_stale_or_forged_token_raises_lease_lost(store: JobStore) -> None:
    make_parent(store, 1)
    lease = claim_one(store)
    forged = replace(lease, token="0" * 32)
    for write in (
        lambda: store.renew(forged),
        lambda: store.save_progress(forged, {"x": 1}),
        lambda: store.complete(forged),
        lambda: store.fail(forged, "e"),
        lambda: store.release(forged),
    ):
        with pytest.raises(LeaseLost, match=lease.job_id):
            write()
    assert store.get(lease.job_id).state == JobState.IN_PROGRESS
    store.complete(lease)
    with pytest.raises(LeaseLost):  # finished: the lease is gone for good
        store.save_progress(lease, {"x": 2})


def test_renew_keeps_the_lease_alive(store: JobStore) -> None:
    make_parent(store, 1)
    lease = claim_one(store, ttl=SHORT_TTL)
    renewed = store.renew(lease, ttl=30)
    assert renewed.token == lease.token and renewed.expires_at > lease.expires_at
    time.sleep(PAST_SHORT_TTL)
    assert store.claim([DUMP], "w2") is None
    assert store.reclaim_expired() == 0


def test_reclaim_expired_requeues_with_progress(store: JobStore) -> None:
    make_parent(store, 2)
    dying = claim_one(store, "dead", ttl=SHORT_TTL)
    alive = claim_one(store, "alive", ttl=30)
    store.save_progress(dying, {"docs_routed": 5})
    time.sleep(PAST_SHORT_TTL)
    assert store.reclaim_expired() == 1
    job = store.get(dying.job_id)
    assert job.state == JobState.QUEUED and job.attempts == 1
    assert job.claim_token is None and job.claimed_by is None and job.claim_expires_at is None
    assert job.progress == {"docs_routed": 5}
    assert store.get(alive.job_id).claim_token == alive.token
    with pytest.raises(LeaseLost):
        store.save_progress(dying, {"docs_routed": 6})


def test_expired_lease_out_of_attempts_fails_for_good(store: JobStore) -> None:
    parent, _ = make_parent(store, 2, max_attempts=1)
    a = claim_one(store, "w1", ttl=SHORT_TTL)
    claim_one(store, "w2", ttl=SHORT_TTL)
    store.save_progress(a, {"docs_routed": 3})
    time.sleep(PAST_SHORT_TTL)
    assert store.queue_depth([DUMP])[DUMP] == 0  # never claimable again
    assert store.reclaim_expired() == 2
    for child in store.children(parent.id):
        assert child.state == JobState.FAILED and child.finished_at is not None
        assert child.error is not None and "lease expired" in child.error
    assert store.get(a.job_id).progress == {"docs_routed": 3}
    got = store.get(parent.id)
    assert got.state == JobState.FAILED and got.error is not None
    assert got.error.startswith("chunk ") and parent.id in got.error


def test_claim_skips_and_fails_exhausted_expired_lease(store: JobStore) -> None:
    chunk = store.enqueue(DUMP, {}, kind=JobKind.CHUNK, max_attempts=1)
    claim_one(store, ttl=SHORT_TTL)
    time.sleep(PAST_SHORT_TTL)
    assert store.claim([DUMP], "w2") is None
    assert store.get(chunk.id).state == JobState.FAILED


# -- finishing ---------------------------------------------------------------------------------


def test_parent_rolls_up_children_and_completes_with_the_last(store: JobStore) -> None:
    parent, _ = make_parent(store, 3)
    leases = [claim_one(store) for _ in range(3)]
    for n, lease in enumerate(leases, start=1):
        store.save_progress(
            lease,
            {"docs_routed": 10 * n, "bytes_processed": n, "per_node": {"n1": n, "n2": 1},
             "last_cursor": {"offset": n}},
        )  # fmt: skip
    summary = store.parent_summary(parent.id)
    assert summary.chunks_total == 3 and summary.chunks_by_state[JobState.IN_PROGRESS] == 3
    assert summary.progress == {
        "docs_routed": 60, "bytes_processed": 6, "per_node": {"n1": 6, "n2": 3}
    }  # fmt: skip
    store.complete(leases[0])
    store.complete(leases[2], {"docs_routed": 35, "bytes_processed": 3})
    assert store.get(parent.id).state == JobState.IN_PROGRESS
    done = store.complete(leases[1])
    assert done.state == JobState.COMPLETED and done.finished_at is not None
    assert done.claimed_by == "w1" and done.claim_token is None
    got = store.get(parent.id)
    assert got.state == JobState.COMPLETED and got.finished_at is not None
    summary = store.parent_summary(parent.id)
    assert summary.chunks_done == 3 and summary.progress["docs_routed"] == 10 + 20 + 35


def test_complete_returns_the_row_as_stored(store: JobStore) -> None:
    """complete() builds its result from the lease and what the statement returns: it must be
    the stored row, also after the lease was renewed and progress saved through it."""
    make_parent(store, 2)
    first, second = claim_one(store), claim_one(store, "w2")
    store.renew(first, ttl=60)  # the lease's own copy of the row is now behind the table
    store.save_progress(first, {"last_cursor": {"offset": 7}, "docs_routed": 3})
    done = store.complete(first)  # no progress given: the saved progress stays
    assert done == store.get(first.job_id)
    assert done.progress == {"last_cursor": {"offset": 7}, "docs_routed": 3}
    assert done.state == JobState.COMPLETED and done.claimed_by == "w1"
    assert done.claim_token is None and done.claim_expires_at is None
    assert done.finished_at is not None and done.attempts == 1
    done = store.complete(second, {"last_cursor": {"offset": 20}})
    assert done == store.get(second.job_id) and done.progress == {"last_cursor": {"offset": 20}}


def test_parent_fails_when_a_child_fails_for_good(store: JobStore) -> None:
    parent, _ = make_parent(store, 2)
    lease = claim_one(store)
    store.save_progress(lease, {"docs_routed": 7})
    failed = store.fail(lease, "bad line 12 at byte 3400", retryable=False)
    assert failed.state == JobState.FAILED and failed.error == "bad line 12 at byte 3400"
    assert failed.progress == {"docs_routed": 7} and failed.finished_at is not None
    got = store.get(parent.id)
    assert got.state == JobState.FAILED and got.finished_at is not None
    assert got.error is not None and lease.job_id in got.error and "bad line 12" in got.error
    # A sibling finishing later does not resurrect the parent.
    sibling = claim_one(store)
    store.complete(sibling)
    assert store.get(parent.id).state == JobState.FAILED


def test_retry_with_backoff_then_failed_after_max_attempts(
    open_jobs: Callable[..., JobStore],
) -> None:
    # Base 0.2 s (not the fixture's 0.05 s) so "not claimable yet" holds on a busy machine.
    store = open_jobs(retry_backoff_base=0.2)
    parent, _ = make_parent(store, 1, max_attempts=3)
    expected_backoff = [0.2, 0.4]
    for attempt in (1, 2):
        lease = claim_one(store, f"w{attempt}")
        assert lease.attempt == attempt
        store.save_progress(lease, {"docs_routed": attempt * 10})
        job = store.fail(lease, f"node down ({attempt})")
        assert job.state == JobState.QUEUED and job.attempts == attempt
        assert job.error == f"node down ({attempt})"
        assert job.claim_token is None and job.claimed_by is None
        assert job.progress == {"docs_routed": attempt * 10}
        assert job.available_at is not None
        backoff = (job.available_at - job.updated_at).total_seconds()
        assert backoff == pytest.approx(expected_backoff[attempt - 1], abs=0.005)
        assert store.claim([DUMP], "eager") is None  # not before the backoff
        assert store.queue_depth([DUMP])[DUMP] == 0
        time.sleep(backoff + 0.1)
    last = claim_one(store, "w3")
    assert last.attempt == 3 and last.job.progress == {"docs_routed": 20}
    job = store.fail(last, "node down (3)")
    assert job.state == JobState.FAILED and job.error == "node down (3)"
    assert job.attempts == 3 and job.progress == {"docs_routed": 20}
    assert store.get(parent.id).state == JobState.FAILED
    time.sleep(0.45)
    assert store.claim([DUMP], "w4") is None


def test_release_requeues_at_once_without_counting_an_attempt(store: JobStore) -> None:
    make_parent(store, 1)
    lease = claim_one(store, "w1")
    store.save_progress(lease, {"docs_routed": 9})
    released = store.release(lease)
    assert released.state == JobState.QUEUED and released.attempts == 0
    assert released.claim_token is None and released.progress == {"docs_routed": 9}
    again = claim_one(store, "w2")
    assert again.job_id == lease.job_id and again.attempt == 1
    assert again.job.progress == {"docs_routed": 9}
    with pytest.raises(LeaseLost):
        store.release(lease)


# -- waking idle workers -----------------------------------------------------------------------

#: Long enough that a wake-up can only come from the signal, never from the timeout running out
#: (the test would then fail on the False it returns, not pass on luck).
WAKE_TIMEOUT = 60.0
#: How long a wait that must find nothing waits.
QUIET_WAIT = 0.3


def test_work_signal_wakes_on_claimable_chunks_and_finished_parents(
    open_jobs: Callable[..., JobStore],
) -> None:
    waiting, other = open_jobs(), open_jobs()  # the waiter and another process's store
    signal = waiting.work_signal()
    try:
        assert signal.wait(QUIET_WAIT) is False
        parent = other.enqueue(DUMP, {"uri": "x"})
        assert signal.wait(QUIET_WAIT) is False, "a parent waiting to be split is no work"
        other.split(parent.id, [NewChunk(i, {"start": i}) for i in range(50)])
        assert signal.wait(WAKE_TIMEOUT) is True
        assert signal.wait(QUIET_WAIT) is False, "one split of 50 chunks wakes a waiter once"
        lease = claim_one(other)
        other.save_progress(lease, {"docs_routed": 1})
        other.renew(lease)
        assert signal.wait(QUIET_WAIT) is False, "claims, progress and renewals are no work"
        other.release(lease)
        assert signal.wait(WAKE_TIMEOUT) is True, "a chunk handed back is work"
        lease = claim_one(other)
        other.fail(lease, "boom")
        assert signal.wait(WAKE_TIMEOUT) is True, "a chunk queued for a retry is work"
        assert other.cancel(parent.id) > 0
        assert signal.wait(WAKE_TIMEOUT) is True, "a parent that finished ends its scoped workers"
    finally:
        signal.close()


def test_work_signal_keeps_a_change_made_between_claim_and_wait(
    open_jobs: Callable[..., JobStore],
) -> None:
    """The signal is taken before the claim: a chunk queued after a claim found nothing but
    before the wait began still wakes the wait at once."""
    waiting, other = open_jobs(), open_jobs()
    signal = waiting.work_signal()
    try:
        assert waiting.claim([DUMP], "idle") is None
        make_parent(other, 1)
        assert signal.wait(WAKE_TIMEOUT) is True
        assert waiting.claim([DUMP], "idle") is not None
    finally:
        signal.close()


def test_work_signal_wait_ends_on_shutdown(store: JobStore) -> None:
    from miroir_pipeline.queue.shutdown import Shutdown

    shutdown = Shutdown()
    signal = store.work_signal()
    try:
        woke: list[bool] = []
        waiter = threading.Thread(target=lambda: woke.append(signal.wait(WAKE_TIMEOUT, shutdown)))
        waiter.start()
        shutdown.request("test")
        waiter.join(WAKE_TIMEOUT / 2)  # a wait that ignored the request would run the full minute
        assert not waiter.is_alive() and woke == [False]
    finally:
        signal.close()


@pytest.mark.postgres
def test_postgres_work_signal_ignores_other_schemas(pg_dsn: str) -> None:
    mine, theirs = open_store(pg_dsn, schema="miroir_a"), open_store(pg_dsn, schema="miroir_b")
    signal = mine.work_signal()
    try:
        make_parent(theirs, 1)
        assert signal.wait(QUIET_WAIT) is False
        make_parent(mine, 1)
        assert signal.wait(WAKE_TIMEOUT) is True
    finally:
        signal.close()
        mine.close()
        theirs.close()


# -- claim by id -------------------------------------------------------------------------------


def test_claim_by_id(store: JobStore) -> None:
    parent, children = make_parent(store, 3)
    lease = store.claim_by_id(children[2].id, "ui-run", ttl=30)
    assert lease.job_id == children[2].id and lease.attempt == 1
    assert store.get(children[2].id).claimed_by == "ui-run"

    with pytest.raises(JobNotClaimable) as held:
        store.claim_by_id(children[2].id, "other")
    assert held.value.job is not None and held.value.job.claimed_by == "ui-run"
    assert "ui-run" in str(held.value)

    store.complete(lease)
    with pytest.raises(JobNotClaimable) as done:
        store.claim_by_id(children[2].id, "other")
    assert done.value.job is not None and done.value.job.state == JobState.COMPLETED

    with pytest.raises(JobNotClaimable) as par:
        store.claim_by_id(parent.id, "other")
    assert par.value.job is not None and par.value.job.kind == JobKind.PARENT

    with pytest.raises(JobNotFound):
        store.claim_by_id("missing", "other")

    short = store.claim_by_id(children[0].id, "w1", ttl=SHORT_TTL)
    time.sleep(PAST_SHORT_TTL)
    taken = store.claim_by_id(children[0].id, "w2")  # expired lease: claimable by id
    assert taken.attempt == 2 and taken.token != short.token

    failed = store.claim_by_id(children[1].id, "w1")
    store.fail(failed, "fatal", retryable=False)
    with pytest.raises(JobNotClaimable) as fl:
        store.claim_by_id(children[1].id, "w1")
    assert fl.value.job is not None and fl.value.job.state == JobState.FAILED


# -- observers / operators ---------------------------------------------------------------------


def test_queue_depth_counts_due_and_expired_and_lists_every_type(
    open_jobs: Callable[..., JobStore],
) -> None:
    store = open_jobs(retry_backoff_base=SHORT_TTL)  # backoff ends with the short lease
    assert store.queue_depth() == {}  # only types asked for are zero-filled
    assert store.queue_depth([DUMP, RESHARD]) == {DUMP: 0, RESHARD: 0}
    make_parent(store, 4)
    claim_one(store, "live", ttl=30)
    claim_one(store, "dies", ttl=SHORT_TTL)
    backoff = claim_one(store, "fails")
    store.fail(backoff, "retry me")
    assert store.queue_depth([DUMP, RESHARD]) == {DUMP: 1, RESHARD: 0}
    time.sleep(PAST_SHORT_TTL)  # the short lease expires, the backoff passes
    assert store.queue_depth([DUMP, RESHARD]) == {DUMP: 3, RESHARD: 0}


def test_list_parents_newest_first_with_summaries(store: JobStore) -> None:
    make_parent(store, 2, job_id="old")
    time.sleep(0.01)
    make_parent(store, 1, job_id="new", job_type=RESHARD)
    summaries = store.list_parents()
    assert [s.parent.id for s in summaries] == ["new", "old"]
    assert [s.chunks_total for s in summaries] == [1, 2]
    assert [s.parent.id for s in store.list_parents(job_type=DUMP)] == ["old"]
    assert [s.parent.id for s in store.list_parents(limit=1)] == ["new"]
    with pytest.raises(JobNotFound):
        store.parent_summary("missing")


def test_cancel_parent_fails_unfinished_chunks_and_fences_leases(store: JobStore) -> None:
    parent, _ = make_parent(store, 4)
    done = claim_one(store)
    store.complete(done)
    live = claim_one(store, "w2")
    assert store.cancel(parent.id, "operator: wrong dump") == 4  # parent + 3 unfinished
    states = {c.id: c.state for c in store.children(parent.id)}
    assert Counter(states.values()) == {JobState.FAILED: 3, JobState.COMPLETED: 1}
    got = store.get(parent.id)
    assert got.state == JobState.FAILED and got.error == "operator: wrong dump"
    assert store.get(live.job_id).error == "operator: wrong dump"
    with pytest.raises(LeaseLost):
        store.save_progress(live, {"x": 1})
    assert store.claim([DUMP], "w3") is None
    assert store.cancel(parent.id) == 0  # already finished
    with pytest.raises(JobNotFound):
        store.cancel("missing")


def test_cancel_racing_the_lease_sweep_never_deadlocks(open_jobs: Callable[..., JobStore]) -> None:
    """An operator's cancel and the sweep that re-queues expired leases touch the same chunks
    at once; each locks them in id order, so neither is chosen as a deadlock victim and the
    cancel always wins (a re-queued chunk is then failed too). The leases are claimed in
    reverse id order, so expiry order (the sweep's scan) is the reverse of the rows' order."""
    canceller, sweeper = open_jobs(), open_jobs()
    for _ in range(8):
        parent, children = make_parent(canceller, 200)
        for child in reversed(children):
            canceller.claim_by_id(child.id, "crashed", ttl=0.001)
        errors: list[BaseException] = []
        start = threading.Barrier(2)

        def race(action: Callable[[], object], start: threading.Barrier = start,
                 errors: list[BaseException] = errors) -> None:
            start.wait()
            try:
                action()
            except BaseException as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [
            threading.Thread(target=race, args=(functools.partial(canceller.cancel, parent.id, "stop"),)),
            threading.Thread(target=race, args=(sweeper.reclaim_expired,)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        assert canceller.get(parent.id).state == JobState.FAILED
        assert {c.state for c in canceller.children(parent.id)} == {JobState.FAILED}


def test_cancel_one_chunk_fails_it_and_its_parent(store: JobStore) -> None:
    parent, children = make_parent(store, 2)
    assert store.cancel(children[1].id, "skip it") == 2
    assert store.get(children[1].id).state == JobState.FAILED
    got = store.get(parent.id)
    assert got.state == JobState.FAILED and got.error is not None and children[1].id in got.error


def test_an_adopted_claim_is_renewed_when_the_run_takes_it_over(store: JobStore) -> None:
    """A worker claims, then starts the chunk's run; the run adopts the claim and renews it at
    once, so the lease runs a whole TTL from the run's start, not from the claim (the heartbeat
    first renews one interval after the run starts). A claim no longer held is refused."""
    make_parent(store, 2)
    claimed = claim_one(store, ttl=5.0)
    adopted = acquire_chunk(store, claimed.job_id, "other-name", 600.0, adopt_token=claimed.token)
    assert adopted is not None
    assert (adopted.token, adopted.worker_id) == (claimed.token, claimed.worker_id)
    assert (adopted.expires_at - claimed.expires_at).total_seconds() >= 590
    assert store.get(claimed.job_id).claim_expires_at == adopted.expires_at
    store.release(adopted)
    with pytest.raises(JobNotClaimable, match="no longer held"):
        acquire_chunk(store, claimed.job_id, "w", 600.0, adopt_token=claimed.token)


def test_param_values_lists_what_rows_name_until_they_are_pruned(store: JobStore) -> None:
    """What prune keeps of files named in params (staged dump copies): every distinct value of a
    key, over parents and chunks, finished or not; gone once the rows naming it are pruned."""
    assert store.param_values("data_uri") == set()
    parent = store.enqueue(DUMP, {"data_uri": "/s/a-1.jsonl"}, job_id="a")
    store.split(parent.id, [NewChunk(i, {"data_uri": "/s/a-1.jsonl", "n": i}) for i in range(2)])
    store.enqueue(DUMP, {"data_uri": "/s/b \"q\".jsonl", "n": 1}, job_id="b", kind=JobKind.CHUNK)
    store.enqueue(DUMP, {"other": "x"}, job_id="c", kind=JobKind.CHUNK)
    assert store.param_values("data_uri") == {"/s/a-1.jsonl", '/s/b "q".jsonl'}
    assert store.param_values("n") == set()  # string values only: both databases agree on them
    assert store.param_values("other") == {"x"}
    with pytest.raises(ValueError, match="not an identifier"):
        store.param_values('odd "key"')
    for chunk in store.children("a"):
        store.complete(store.claim_by_id(chunk.id, "w"))
    assert store.get("a").state == JobState.COMPLETED
    time.sleep(0.3)
    store.prune(0.2)
    assert store.param_values("data_uri") == {'/s/b "q".jsonl'}


def test_prune_deletes_old_finished_trees_only(store: JobStore) -> None:
    make_parent(store, 2, job_id="done")
    make_parent(store, 1, job_type=RESHARD, job_id="resharded")
    for _ in range(3):
        store.complete(claim_one(store))
    _, broken_children = make_parent(store, 2, job_id="broken")
    store.fail(store.claim_by_id(broken_children[0].id, "w"), "fatal", retryable=False)
    orphan = store.enqueue(DUMP, {}, job_id="orphan", kind=JobKind.CHUNK)
    store.complete(store.claim_by_id(orphan.id, "w"))
    make_parent(store, 1, job_id="pending")
    nothing = store.prune(3600)  # nothing old enough
    assert (nothing.rows, nothing.parents, nothing.chunks) == (0, {}, {})
    time.sleep(0.3)
    # "done" and "resharded" with their chunks, and the orphan; "broken" still has a queued
    # chunk, "pending" runs. What was deleted comes back by job type.
    pruned = store.prune(0.2)
    assert pruned.rows == 6
    assert pruned.parents == {DUMP: ["done"], RESHARD: ["resharded"]}
    assert pruned.chunks == {
        DUMP: sorted([chunk_id("done", 0, 2), chunk_id("done", 1, 2), "orphan"]),
        RESHARD: [chunk_id("resharded", 0, 1)],
    }
    assert pruned.parent_ids == ["done", "resharded"] and len(pruned.chunk_ids) == 4
    for gone in ("done", chunk_id("done", 0, 2), chunk_id("done", 1, 2), "orphan", "resharded"):
        with pytest.raises(JobNotFound):
            store.get(gone)
    assert store.get("broken").state == JobState.FAILED
    assert store.get("pending").state == JobState.IN_PROGRESS
    assert len(store.children("broken")) == 2


# -- races -------------------------------------------------------------------------------------

RACE_ROWS = 200


def _race_worker(store: JobStore, worker: str, seed: int, all_hold: Any) -> dict[str, Any]:
    """Claim until the queue is empty; release ~15 % of claims, complete the rest.

    With its first lease a claimer waits at ``all_hold`` until every claimer holds one: each
    one takes part, however the machine schedules them. Records every lease as (job id, token,
    claimed_at, released_at) with monotonic timestamps taken after the claim returned and
    before the hand-back was sent.
    """
    rng = random.Random(seed)
    leases: list[tuple[str, str, int, int]] = []
    completed: list[str] = []
    lost = 0
    idle = 0
    while idle < 3:
        lease = store.claim([DUMP], worker, ttl=60)
        if lease is None:
            idle += 1
            time.sleep(0.02)
            continue
        idle = 0
        claimed_at = time.monotonic_ns()
        if not leases:
            all_hold.wait(timeout=60)
        time.sleep(rng.random() * 0.002)
        released_at = time.monotonic_ns()
        try:
            if rng.random() < 0.15:
                store.release(lease)
            else:
                store.complete(lease, {"docs_routed": 1})
                completed.append(lease.job_id)
        except LeaseLost:
            lost += 1
        leases.append((lease.job_id, lease.token, claimed_at, released_at))
    return {"leases": leases, "completed": completed, "lost": lost}


def _race_process(dsn: str, worker: str, seed: int, out: str, start: Any, all_hold: Any) -> None:
    store = open_store(dsn, migrate=False)
    try:
        start.wait(timeout=60)  # all claimers begin together
        result = _race_worker(store, worker, seed, all_hold)
    finally:
        store.close()
    Path(out).write_text(json.dumps(result))


def _check_race(store: JobStore, parent_id: str, results: list[dict[str, Any]]) -> None:
    assert sum(r["lost"] for r in results) == 0, "no lease was lost with a 60 s TTL"
    completed = Counter(j for r in results for j in r["completed"])
    expected = {chunk_id(parent_id, i, RACE_ROWS) for i in range(RACE_ROWS)}
    assert set(completed) == expected and set(completed.values()) == {1}
    by_row: dict[str, list[tuple[int, int]]] = defaultdict(list)
    tokens = [t for r in results for (_, t, _, _) in r["leases"]]
    assert len(tokens) == len(set(tokens)), "every claim gets a fresh token"
    for r in results:
        for job_id, _, start, end in r["leases"]:
            by_row[job_id].append((start, end))
    for job_id, spans in by_row.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end < start, f"two leases of {job_id} overlap"
    assert sum(len(s) for s in by_row.values()) > RACE_ROWS, "some rows were re-claimed"
    assert all(r["leases"] for r in results), "every claimer took part in the race"
    assert store.get(parent_id).state == JobState.COMPLETED
    assert store.parent_summary(parent_id).progress == {"docs_routed": RACE_ROWS}


@pytest.mark.timeout(120)
def test_threads_racing_never_share_a_row(store: JobStore) -> None:
    parent, _ = make_parent(store, RACE_ROWS)
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)
    all_hold = threading.Barrier(8)

    def run(i: int) -> None:
        try:
            start.wait(timeout=30)
            results.append(_race_worker(store, f"thread-{i}", seed=i, all_hold=all_hold))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=100)
    assert not errors, errors
    assert len(results) == 8
    _check_race(store, parent.id, results)


@pytest.mark.timeout(180)
def test_processes_racing_never_share_a_row(store: JobStore, jobs_dsn: str, tmp_path: Path) -> None:
    parent, _ = make_parent(store, RACE_ROWS)
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"claimer-{i}.json" for i in range(4)]
    start = ctx.Barrier(len(outs))
    all_hold = ctx.Barrier(len(outs))
    procs = [
        ctx.Process(target=_race_process, args=(jobs_dsn, f"proc-{i}", i, str(out), start, all_hold))
        for i, out in enumerate(outs)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=150)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * len(procs)
    _check_race(store, parent.id, [json.loads(out.read_text()) for out in outs])


# -- Postgres only -----------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_postgres_store_carries_on_after_a_database_restart(pg_server: Any, pg_dsn: str) -> None:
    store = open_store(pg_dsn, max_size=2)
    try:
        make_parent(store, 2)
        lease = claim_one(store, ttl=60)
        store.save_progress(lease, {"docs_routed": 1})
        signal = store.work_signal()
        pg_server.stop(mode="fast")  # every pooled connection dies, and the listening one
        pg_server.start()
        store.save_progress(lease, {"docs_routed": 2})  # the lease survived; the pool healed
        store.complete(lease)
        assert store.queue_depth([DUMP])[DUMP] == 1
        assert store.get(lease.job_id).progress == {"docs_routed": 2}
        # The signal listens again: one wake for what it may have missed, then real ones.
        while signal.wait(QUIET_WAIT):
            pass
        make_parent(store, 1)
        assert signal.wait(WAKE_TIMEOUT) is True
    finally:
        store.close()


def test_requeue_reopens_finished_chunks_and_their_parent(store: JobStore) -> None:
    parent, children = make_parent(store, 2)
    first = claim_one(store)
    store.save_progress(first, {"last_cursor": 10, "docs_routed": 3})
    store.complete(first, {"last_cursor": 20, "docs_routed": 5})
    second = claim_one(store)
    store.fail(second, "bad line", retryable=False)
    assert store.get(parent.id).state == JobState.FAILED

    # Retry after a failure for good: fresh attempts, progress kept, parent re-opened.
    retried = store.requeue(second.job_id)
    assert retried.state == JobState.QUEUED and retried.attempts == 0 and retried.error is None
    assert store.get(parent.id).state == JobState.IN_PROGRESS and store.get(parent.id).error is None
    again = claim_one(store)
    assert again.job_id == second.job_id and again.attempt == 1
    store.complete(again)
    assert store.get(parent.id).state == JobState.COMPLETED

    # Re-import of a completed chunk: progress cleared so it starts over.
    reimport = store.requeue(first.job_id, reset_progress=True)
    assert reimport.progress == {} and reimport.state == JobState.QUEUED
    assert store.get(parent.id).state == JobState.IN_PROGRESS
    store.complete(claim_one(store))
    assert store.get(parent.id).state == JobState.COMPLETED

    # Only finished chunks can be re-queued; the old lease stays fenced.
    with pytest.raises(LeaseLost):
        store.save_progress(first, {"last_cursor": 1})
    with pytest.raises(JobNotClaimable):
        store.requeue(parent.id)
    live = store.requeue(children[0].id)
    lease = store.claim_by_id(live.id, "w")
    with pytest.raises(JobNotClaimable):
        store.requeue(lease.job_id)
    with pytest.raises(JobNotFound):
        store.requeue("no-such-chunk")


def test_parent_stays_failed_until_its_last_failed_chunk_is_requeued(store: JobStore) -> None:
    """Re-queueing one of two chunks that failed for good must not re-open the parent: nothing
    would complete or fail it again while the other stays failed. The re-queued chunk runs all
    the same; once the last failed one is re-queued, the parent is open and completes."""
    parent, _ = make_parent(store, 3, max_attempts=1)
    a, b = claim_one(store), claim_one(store)
    store.fail(a, "boom A")
    store.fail(b, "boom B")
    store.complete(claim_one(store))
    assert store.get(parent.id).state == JobState.FAILED

    store.requeue(a.job_id)
    assert store.get(parent.id).state == JobState.FAILED and store.get(parent.id).error is not None
    store.complete(claim_one(store))
    assert store.get(parent.id).state == JobState.FAILED, "B is still failed for good"
    assert parent.id in {j.id for j in store.finished_parents()}

    store.requeue(b.job_id)
    assert store.get(parent.id).state == JobState.IN_PROGRESS
    store.complete(claim_one(store))
    assert store.get(parent.id).state == JobState.COMPLETED


def _lock_waiters(dsn: str) -> int:
    with psycopg.connect(dsn.split("?")[0]) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_requeue_racing_the_last_completion_never_completes_the_parent_over_it(
    store: JobStore, open_jobs: Callable[..., JobStore], jobs_dsn: str
) -> None:
    """An operator re-queues completed chunk A while B, the last unfinished chunk, completes.
    Whatever the order, the parent must not end completed with A queued again.

    Fault stand-in: the requeue's transaction is held open (a pause after its statements,
    parent locked) so that B's completion checks the parent meanwhile; the real window is the
    few milliseconds between the requeue's statements and its commit."""
    parent, _ = make_parent(store, 2)
    a = claim_one(store)
    store.complete(a)
    b = claim_one(store)
    operator = open_jobs()
    paused = threading.Event()
    proceed = threading.Event()
    original = operator._rows  # type: ignore[attr-defined]

    def pausing_rows(conn: Any, name: str, params: Any = None) -> Any:
        rows = original(conn, name, params)
        if name == "reopen_parent":
            paused.set()
            proceed.wait(10)
        return rows

    operator._rows = pausing_rows  # type: ignore[attr-defined]
    requeue = threading.Thread(target=lambda: operator.requeue(a.job_id, reset_progress=True))
    requeue.start()
    try:
        assert paused.wait(10), "the requeue never reached its parent update"
        completing = threading.Thread(target=lambda: store.complete(b))
        completing.start()
        if jobs_dsn.startswith("postgres"):  # until B's completion waits for the parent's lock
            deadline = time.monotonic() + 10
            while not _lock_waiters(jobs_dsn):
                assert time.monotonic() < deadline, "the completion never waited for the parent"
                time.sleep(0.01)
        # (SQLite has one writer: the completion waits for the requeue's whole transaction.)
    finally:
        proceed.set()
        requeue.join(10)
    completing.join(10)
    assert not completing.is_alive() and not requeue.is_alive()
    assert store.get(a.job_id).state == JobState.QUEUED
    assert store.get(parent.id).state == JobState.IN_PROGRESS, "completed with a chunk queued"
    store.complete(claim_one(store))
    assert store.get(parent.id).state == JobState.COMPLETED


def test_a_parent_summary_reads_the_parent_and_its_chunks_at_one_moment(store: JobStore) -> None:
    """The last chunk completes (and with it the parent) between the summary's read of the
    parent row and its read of the chunks: both must come from the same moment."""
    parent, _ = make_parent(store, 2)
    store.complete(claim_one(store))
    last = claim_one(store)
    original = store._rows  # type: ignore[attr-defined]

    def completing_in_between(conn: Any, name: str, params: Any = None) -> Any:
        if name == "children_states" and threading.current_thread().name == "summary":
            done = threading.Thread(target=lambda: store.complete(last))
            done.start()
            done.join(10)
        return original(conn, name, params)

    store._rows = completing_in_between  # type: ignore[attr-defined]
    seen: list[Any] = []
    reader = threading.Thread(target=lambda: seen.append(store.parent_summary(parent.id)), name="summary")
    reader.start()
    reader.join(20)
    [summary] = seen
    assert store.get(parent.id).state == JobState.COMPLETED
    completed = summary.chunks_by_state.get(JobState.COMPLETED, 0)
    assert (summary.parent.state, completed) in ((JobState.IN_PROGRESS, 1), (JobState.COMPLETED, 2)), (
        summary.parent.state,
        summary.chunks_by_state,
    )


@pytest.mark.parametrize("ending", ["complete", "fail", "release"])
def test_a_chunk_that_ended_is_never_counted_as_a_lost_lease(store: JobStore, ending: str) -> None:
    """The heartbeat is stopped before the lease ends (completed, failed, or handed back on
    shutdown): a renewal landing after it would be refused and counted (and logged) as a lease
    loss of a chunk that ended normally.

    Fault stand-in: the store's ending call waits (up to 1 s) for a renewal to follow it, so a
    heartbeat still running is sure to renew after the lease ended."""
    make_parent(store, 1)
    lease = claim_one(store, ttl=3.0)
    renewed_after = threading.Event()
    ended = threading.Event()
    real_renew, real_end = store.renew, getattr(store, ending)

    def renew(lease: Lease, ttl: float) -> Lease:
        try:
            return real_renew(lease, ttl)
        finally:
            if ended.is_set():
                renewed_after.set()

    def end(lease: Lease, *args: Any, **kw: Any) -> Job:
        job = real_end(lease, *args, **kw)
        ended.set()
        renewed_after.wait(1.0)
        return job

    store.renew = renew  # type: ignore[method-assign]
    setattr(store, ending, end)

    def body(keeper: LeaseKeeper) -> None:
        if ending == "fail":
            raise ValueError("the chunk's input is unreadable")
        if ending == "release":
            raise hand_back(store, keeper, "byte 0", "the worker is shutting down")

    losses = metrics.CHUNK_LEASE_LOSSES.labels(job_type=DUMP)
    before = losses._value.get()
    raised = (ValueError, ChunkHandedBack) if ending != "complete" else ()
    with contextlib.nullcontext() if not raised else pytest.raises(raised):
        run_under_lease(store, lease, body, ttl=3.0, heartbeat_interval=0.01)
    expected = {"complete": JobState.COMPLETED, "fail": JobState.QUEUED, "release": JobState.QUEUED}
    assert store.get(lease.job_id).state == expected[ending]
    assert not renewed_after.is_set(), f"the heartbeat renewed the lease after {ending}"
    assert losses._value.get() == before


def test_a_lease_run_out_on_the_workers_clock_is_failed_not_left_held(store: JobStore) -> None:
    """The heartbeat's renewal hangs; nobody else claims the chunk. Once the lease has run out
    on the worker's own clock the chunk stops, and its row is re-queued at once (failed,
    fenced, retryable) instead of staying held by a worker that has given it up.

    Fault stand-in: the store's renewal blocks until the test ends (a half-open connection)."""
    make_parent(store, 1)
    lease = claim_one(store, ttl=1.0)
    hung = threading.Event()
    release = threading.Event()
    real_renew = store.renew

    def renew(lease: Lease, ttl: float) -> Lease:
        hung.set()
        release.wait(30)
        return real_renew(lease, ttl)

    store.renew = renew  # type: ignore[method-assign]

    def body(keeper: LeaseKeeper) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            keeper.check()  # raises once the lease has run out unrenewed
            time.sleep(0.02)

    try:
        with pytest.raises(LeaseLost, match="not renewed within its 1 s TTL"):
            run_under_lease(store, lease, body, ttl=1.0, heartbeat_interval=0.2)
        assert hung.is_set()
        row = store.get(lease.job_id)
        assert row.state == JobState.QUEUED and row.claim_token is None
        assert row.error is not None and "not renewed within" in row.error
    finally:
        release.set()


def test_threads_that_come_and_go_do_not_leave_connections_behind(store: JobStore) -> None:
    """A worker runs each chunk's heartbeat in a thread of its own: a connection (and its file
    descriptors) per finished thread would pile up until the process hits its limit."""
    make_parent(store, 1)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    store.get(claim_one(store).job_id)  # this thread's connection (and the pool's) exist
    before = fds()
    for _ in range(60):
        reader = threading.Thread(target=lambda: store.queue_depth([DUMP]))
        reader.start()
        reader.join(10)
    gc.collect()
    assert fds() - before < 10, f"{fds() - before} descriptors more after 60 short-lived threads"


def test_claimable_peeks_in_claim_order_without_leasing(store: JobStore) -> None:
    make_parent(store, 3, job_id="a")
    make_parent(store, 2, job_id="b")
    make_parent(store, 1, job_id="r", job_type=RESHARD)
    peek = store.claimable([DUMP], limit=10)
    assert [j.parent_job_id for j in peek] == ["a", "b", "a", "b", "a"]
    assert all(j.state == JobState.QUEUED and j.claim_token is None for j in peek)
    assert [j.id for j in store.claimable([DUMP], limit=2)] == [peek[0].id, peek[1].id]
    assert [claim_one(store).job_id for _ in range(2)] == [peek[0].id, peek[1].id]
    assert [j.id for j in store.claimable([DUMP])] == [j.id for j in peek[2:]]
    assert {j.type for j in store.claimable([DUMP, RESHARD])} == {DUMP, RESHARD}
    assert store.claimable([]) == []


def strand_parent(store: JobStore, monkeypatch: pytest.MonkeyPatch, chunks: int = 2) -> Job | None:
    """A parent whose last chunk completed while its parent check failed (the database went
    away between the two): returned in progress where the check runs after the chunk's commit
    (Postgres); None where both share one transaction (SQLite), which cannot strand a parent.

    The failure cannot be timed from outside between two statements: failing the parent check
    once stands in for it (or for the worker dying right there)."""
    parent, _ = make_parent(store, chunks)
    leases = [claim_one(store, parent_id=parent.id) for _ in range(chunks)]
    for lease in leases[:-1]:
        store.complete(lease)
    real_rows = store._rows  # type: ignore[attr-defined]

    def fail_at_parent_check(conn: Any, name: str, *args: Any, **kw: Any) -> Any:
        if name == "complete_parent_if_done":
            raise RuntimeError("database went away")
        return real_rows(conn, name, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(store, "_rows", fail_at_parent_check)
        try:
            done = store.complete(leases[-1])
        except RuntimeError:  # checked inside the chunk's own transaction: both rolled back
            done = None
    if done is None:
        assert store.get(leases[-1].job_id).state == JobState.IN_PROGRESS
        store.complete(leases[-1])
        assert store.get(parent.id).state == JobState.COMPLETED
        return None
    # Committed before the check: the completion stands and is reported, not failed, since a
    # failure would be refused by the fence of a completed chunk.
    assert done.state == JobState.COMPLETED
    assert store.get(leases[-1].job_id).state == JobState.COMPLETED
    assert store.get(parent.id).state == JobState.IN_PROGRESS
    return parent


def test_parent_left_in_progress_by_a_crash_after_its_last_chunk_is_repaired(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Completing a chunk does not hold its parent row; the parent check runs after the chunk's
    commit on Postgres. A worker that dies between the two leaves a finished parent in
    progress, which the repair sweep (run by reclaim_expired) completes."""
    other, _ = make_parent(store, 2)
    parent = strand_parent(store, monkeypatch)
    if parent is not None:
        store.reclaim_expired()
        assert store.get(parent.id).state == JobState.COMPLETED
    assert store.get(other.id).state == JobState.IN_PROGRESS  # untouched: none of its chunks finished
    assert store.complete_finished_parents() == 0
    assert store.complete_finished_parents(other.id) == 0


@pytest.mark.parametrize("scoped", [True, False], ids=["claim-in-parent", "claim-any"])
def test_a_claim_that_finds_nothing_completes_a_parent_left_in_progress(
    store: JobStore, monkeypatch: pytest.MonkeyPatch, scoped: bool
) -> None:
    """Workers waiting for a parent to end (the import command's own) only claim: a claim that
    finds nothing completes a finished parent a crash left in progress, without the dispatch
    sensor, which may not run at all."""
    parent = strand_parent(store, monkeypatch)
    if parent is None:
        pytest.skip("this backend checks the parent in the chunk's own transaction: none is stranded")
    assert store.claim([DUMP], "w", parent_id=parent.id if scoped else None) is None
    assert store.get(parent.id).state == JobState.COMPLETED
