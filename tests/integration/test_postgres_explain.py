"""The real claim statement walks the partial index on claimable chunks.

The plan is read with EXPLAIN (not executed) for the statement the store runs, loaded from
the same ``.sql`` file, against a migrated Postgres schema.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
import pytest

from miroir_pipeline.queue import NewChunk, open_store
from miroir_pipeline.queue.sql import load_queries

pytestmark = pytest.mark.postgres

CLAIM_PARAMS: dict[str, Any] = {
    "types": ["dump_import"],
    "worker_id": "explain",
    "token": "0" * 32,
    "ttl": 30.0,
    "parent_id": None,
}


def _fill(dsn: str, chunks: int, finished: int, *, analyze: bool = True) -> None:
    """One parent split into ``chunks`` chunks, the first ``finished`` of them completed."""
    store = open_store(dsn)
    try:
        parent = store.enqueue("dump_import", {})
        store.split(parent.id, [NewChunk(i, {}) for i in range(chunks)])
    finally:
        store.close()
    with psycopg.connect(dsn) as conn:
        conn.execute(  # bulk state change for setup only; the store never does this
            "UPDATE miroir.jobs SET state = 'completed', finished_at = now() "
            "WHERE kind = 'chunk' AND chunk_index < %s",
            (finished,),
        )
        if analyze:
            conn.execute("ANALYZE miroir.jobs")


def _claim_plan(dsn: str, *settings: str, parent_id: str | None = None) -> str:
    with psycopg.connect(dsn) as conn:
        conn.execute("SET search_path TO miroir")
        for setting in settings:
            conn.execute(setting)
        params = {**CLAIM_PARAMS, "parent_id": parent_id}
        rows = conn.execute("EXPLAIN " + load_queries("postgres")["claim_next"], params)
        return "\n".join(r[0] for r in rows)


def test_claim_uses_the_partial_index_on_a_small_table(pg_dsn: str) -> None:
    _fill(pg_dsn, chunks=20, finished=5)
    # A 20-row table is cheaper to scan than to index; forbid that so the test shows the
    # statement is *able* to use the index (its WHERE implies the index predicate).
    plan = _claim_plan(pg_dsn, "SET enable_seqscan = off")
    assert "jobs_claimable_idx" in plan, plan
    assert "LockRows" in plan, plan  # FOR UPDATE SKIP LOCKED inside the CTE


def test_planner_picks_the_partial_index_with_many_finished_rows(pg_dsn: str) -> None:
    _fill(pg_dsn, chunks=5000, finished=4950)
    plan = _claim_plan(pg_dsn)
    assert "jobs_claimable_idx" in plan, plan
    assert "Seq Scan" not in plan, plan


def test_a_claim_scoped_to_a_parent_uses_an_index_too(pg_dsn: str) -> None:
    _fill(pg_dsn, chunks=5000, finished=4950)
    with psycopg.connect(pg_dsn) as conn:
        parent = conn.execute("SELECT id FROM miroir.jobs WHERE kind = 'parent'").fetchone()
    assert parent is not None
    plan = _claim_plan(pg_dsn, parent_id=parent[0])
    assert "jobs_claimable_idx" in plan or "jobs_unfinished_children_idx" in plan, plan
    assert "Seq Scan" not in plan, plan
    assert "LockRows" in plan, plan


def _buffers(plan: str) -> int:
    """Shared buffers the statement touched (the top node's ``Buffers:`` line)."""
    match = re.search(r"Buffers: shared hit=(\d+)(?: read=(\d+))?", plan)
    assert match, plan
    return int(match[1]) + int(match[2] or 0)


def test_parent_completion_check_reads_completed_siblings_about_once(pg_dsn: str) -> None:
    """The check walks the unfinished-children index with a plain index scan, which marks the
    entries completed chunks left behind (until VACUUM) as dead, so the next check skips them;
    a bitmap scan would read all of them on every completion."""
    _fill(pg_dsn, chunks=5000, finished=4990, analyze=False)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SET search_path TO miroir")
        parent = conn.execute("SELECT id FROM jobs WHERE kind = 'parent'").fetchone()
        assert parent is not None
        conn.commit()  # no snapshot of ours holds the completed chunks' old versions alive
        queries = load_queries("postgres")
        # The check every completion runs, then the one under the parent's lock (same walk).
        for name in ("unfinished_child", "complete_parent_if_done"):
            check = "EXPLAIN (ANALYZE, BUFFERS) " + queries[name]
            plans = []
            for _ in range(2):
                plans.append("\n".join(r[0] for r in conn.execute(check, {"id": parent[0]})))
                conn.rollback()
            first, second = plans
            assert "Index Scan using jobs_unfinished_children_idx" in first and "Bitmap" not in first, (name, first)
            if name == "unfinished_child":
                assert _buffers(second) <= 20 < _buffers(first), (first, second)
            else:  # the entries were marked dead by the walk before
                assert _buffers(first) <= 20 and _buffers(second) <= 20, (first, second)
