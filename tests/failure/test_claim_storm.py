"""Claim storm (claim, fencing, retries): 8 concurrent claimers race over 500 chunk rows
on each backend, each following a seeded random schedule of claim / renew / progress / sleep
(sometimes past the lease) / complete / fail / release / abandon. Every lease interval is
recorded in database time; no two leases of one row overlap, every row completes exactly once,
by its last attempt, and every write made after a takeover is refused (``LeaseLost``)."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState, JobStore, Lease, LeaseLost, NewChunk

CLAIMERS = 8
ROWS = 500
TTL = 0.5
SEED = 4242


@dataclass
class LeaseRecord:
    """One lease as the database granted it: [start, end] in the database's clock."""

    row: str
    claimer: int
    token: str
    attempt: int
    start: datetime
    end: datetime
    how: str = "held"  # completed | failed | released | abandoned | lost


@pytest.fixture(params=["sqlite", "postgres"])
def storm_dsn(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/storm.sqlite3"
    else:
        yield request.getfixturevalue("pg_dsn")


def claimer(dsn: str, n: int, parent: str, records: list[LeaseRecord], stats: Counter[str], errors: list[BaseException], lock: threading.Lock) -> None:
    rng = random.Random(SEED * 100 + n)
    store = open_store(dsn, retry_backoff_base=0.01)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            lease = store.claim(["dump_import"], f"claimer-{n}", TTL)
            if lease is None:
                if store.get(parent).state != JobState.IN_PROGRESS:
                    return
                time.sleep(rng.uniform(0.001, 0.02))
                continue
            rec = LeaseRecord(lease.job_id, n, lease.token, lease.attempt, lease.job.updated_at, lease.expires_at)
            with lock:
                records.append(rec)
                stats["claims"] += 1
            _hold(store, lease, rec, rng, stats, lock)
        raise AssertionError(f"claimer {n} still busy after 150 s")
    except BaseException as exc:
        errors.append(exc)
    finally:
        store.close()


def _hold(store: JobStore, lease: Lease, rec: LeaseRecord, rng: random.Random, stats: Counter[str], lock: threading.Lock) -> None:
    """Work under ``lease`` following the random schedule; any fenced write may be refused."""
    stale = False  # slept past the lease: another claimer may own the row now
    try:
        for step in range(rng.randint(0, 4)):
            op = rng.random()
            if op < 0.05:
                time.sleep(TTL * 1.6)
                stale = True
            elif op < 0.45:
                lease = store.renew(lease, TTL)
                rec.end = max(rec.end, lease.expires_at)
            elif op < 0.85:
                store.save_progress(lease, {"last_cursor": step, "by": rec.claimer})
            else:
                time.sleep(rng.uniform(0, TTL * 0.2))
        end = rng.random()
        if end < 0.80:
            job = store.complete(lease, {"done_by": rec.claimer, "attempt": rec.attempt})
            rec.how, rec.end = "completed", job.updated_at
        elif end < 0.90:
            job = store.fail(lease, "storm: random failure", retryable=True)
            rec.how, rec.end = "failed", job.updated_at
        elif end < 0.95:
            job = store.release(lease)
            rec.how, rec.end = "released", job.updated_at
        else:
            rec.how = "abandoned"  # left to expire
    except LeaseLost:
        rec.how = "lost"
        with lock:
            stats["refused_after_takeover" if stale else "refused"] += 1
        return
    if stale:
        with lock:
            stats["stale_write_accepted"] += 1  # fine only if nobody claimed the row meanwhile


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_claim_storm_leases_never_overlap_and_every_row_completes_once(storm_dsn: str) -> None:
    store = open_store(storm_dsn)
    parent = store.enqueue("dump_import", {"storm": True}, max_attempts=10_000)
    store.split(parent.id, [NewChunk(chunk_index=i, params={"i": i}) for i in range(ROWS)])
    records: list[LeaseRecord] = []
    stats: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()
    threads = [
        threading.Thread(target=claimer, args=(storm_dsn, n, parent.id, records, stats, errors, lock), name=f"claimer-{n}")
        for n in range(CLAIMERS)
    ]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=200)
    elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "a claimer hung"
    assert not errors, errors[0]

    rows = {c.id: c for c in store.children(parent.id)}
    assert len(rows) == ROWS
    assert store.get(parent.id).state == JobState.COMPLETED
    by_row: dict[str, list[LeaseRecord]] = defaultdict(list)
    for rec in records:
        by_row[rec.row].append(rec)
    overlaps = []
    for row_id, leases in by_row.items():
        leases.sort(key=lambda r: (r.start, r.attempt))
        row = rows[row_id]
        # Every claim counts an attempt, except that a released (handed back) attempt is not
        # counted; the database agrees with what the claimers saw.
        released = sum(r.how == "released" for r in leases)
        assert row.attempts == len(leases) - released, (row_id, leases)
        assert len({r.token for r in leases}) == len(leases)
        held_until = leases[0].end
        for a, b in itertools.pairwise(leases):
            if b.start < held_until:
                overlaps.append((row_id, a, b))
            held_until = max(held_until, b.end)
        completed = [r for r in leases if r.how == "completed"]
        assert len(completed) == 1, (row_id, leases)
        assert completed[0].attempt == row.attempts, "the completing lease must be the row's last attempt"
        assert row.state == JobState.COMPLETED and row.progress["done_by"] == completed[0].claimer
        assert row.progress["attempt"] == completed[0].attempt
    assert not overlaps, f"{len(overlaps)} overlapping leases, e.g. {overlaps[:2]}"
    assert set(by_row) == set(rows)
    outcomes = Counter(r.how for r in records)
    assert outcomes["completed"] == ROWS
    # The schedule really exercised takeovers and refused writes.
    assert outcomes["failed"] and outcomes["released"] and outcomes["abandoned"] and stats["refused_after_takeover"]
    print(f"\n{storm_dsn.split(':')[0]}: {stats['claims']} claims in {elapsed:.1f}s; outcomes {dict(outcomes)}; {dict(stats)}")
