"""Claim throughput: claim + complete cycles per second with 1, 4 and 8 concurrent claimers.

One dump-import parent is split into ``--rows`` chunk rows (default 20,000); then K processes,
each with its own store (Postgres: its own pool of 1-2 connections), start together and loop
``claim(["dump_import"]) -> complete(lease)`` until the queue is empty. Rate = rows / wall time
(first start to last finish). Checked after each run: every row completed exactly once (the
per-claimer counts sum to the row count and the parent completed).

Baseline on Postgres, in the same run and the same database: the least a work queue can spend
per job on this machine, as the lean Postgres queues (procrastinate, River) do it. A table with
only what a lease needs (id, queue, status, token) and one partial index on the waiting rows;
each claimer process on one raw psycopg connection, autocommit, no pool, no row objects: claim is
one ``UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP LOCKED LIMIT 1)``, complete one fenced
``UPDATE``. No parents, no attempts or expiry, no resume cursor. The ratio store / baseline
says how much of the machine's ceiling the store reaches; the goal is an absolute rate, so
where the baseline itself stays below it, the machine cannot meet the goal with a lease per
row.

Backends: Postgres on a throwaway cluster (tests/fixtures/postgres.py: fsync, full_page_writes
and synchronous_commit off, as the test suite runs it) and again with those switched back on
(same cluster restarted without those flags: "pg-durable"); SQLite (WAL, synchronous=NORMAL) for comparison.
Also printed: each rate against 1 claimer on the same backend. Goal: >= 3,000/s with 8
claimers on Postgres.

``--breakdown`` measures instead where the store's cycle goes on Postgres (fsync off): the
store's own named statements on one raw autocommit connection per claimer, in variants that each
leave one thing out (the post-commit parent check; the claimed row returned whole, as a dict),
and the remaining-chunks counter on the parent (a prototype: a column added to the benchmark's
table, the chunk's completion and the parent's countdown in one statement), and the parent check
folded into the next claim (a prototype: a data-modifying CTE on the claim statement, which starts
after the completion committed, so it is as exact as the separate check), and the check skipped
when the completion holds a queued sibling (a prototype: that sibling, locked until the completion
commits, is skipped by claimers, so it completes later and its own completion sees this one), and
the check skipped when the completion's own snapshot shows a queued sibling (a prototype, with a
partial index of queued rows; not exact: a sibling claimed and completed within the completion
statement would leave the parent to the repair sweep). Variants run interleaved,
each on a fresh database; the ratios are to the statements as the store runs them.

    .venv/bin/python benchmarks/claim_throughput.py [--quick] [--rows 20000] [--claimers 1,4,8]
        [--backends pg,pg-durable,sqlite] [--repeat 1] [--breakdown]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
import uuid
from functools import partial
from multiprocessing.synchronize import Barrier
from typing import Any

import _common as c
import _services as svc
import psycopg
from psycopg.rows import dict_row

from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState, NewChunk
from miroir_pipeline.queue.sql import load_queries

GOAL = 3000.0

# The baseline queue (see the module docstring): created in its own schema of the benchmark's
# fresh database, so it never meets the store's tables.
MINIMAL_SCHEMA = """
CREATE SCHEMA minimal;
CREATE TABLE minimal.jobs (
    id     bigint PRIMARY KEY,
    queue  text   NOT NULL,
    status text   NOT NULL DEFAULT 'todo',
    worker text,
    token  text
);
-- the claim walks only waiting rows, in id order
CREATE INDEX jobs_todo_idx ON minimal.jobs (id) WHERE status = 'todo';
"""
MINIMAL_FILL = "INSERT INTO minimal.jobs (id, queue) SELECT g, 'dump_import' FROM generate_series(1, %(rows)s) AS g"
# One statement: the scalar subquery runs once (an InitPlan), locks the first waiting row no one
# else holds, and the UPDATE leases it.
MINIMAL_CLAIM = """
UPDATE minimal.jobs SET status = 'doing', worker = %(worker)s, token = %(token)s
WHERE id = (SELECT id FROM minimal.jobs
            WHERE status = 'todo' AND queue = %(queue)s
            ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id
"""
# Fenced by the token, as any lease must be.
MINIMAL_COMPLETE = """
UPDATE minimal.jobs SET status = 'done', token = NULL
WHERE id = %(id)s AND status = 'doing' AND token = %(token)s
"""


def claimer(dsn: str, worker: str, barrier: Barrier, out: Any) -> None:
    store = open_store(
        dsn, migrate=False, **({"min_size": 1, "max_size": 2} if dsn.startswith("postgres") else {})
    )
    try:
        # touch the store once so connection set-up is not timed
        store.queue_depth()
        barrier.wait()
        t0 = time.monotonic()
        n = 0
        while (lease := store.claim(["dump_import"], worker, 60.0)) is not None:
            store.complete(lease, {"bytes_processed": 1})
            n += 1
        out.put((worker, n, t0, time.monotonic()))
    finally:
        store.close()


def minimal_claimer(dsn: str, worker: str, barrier: Barrier, out: Any) -> None:
    """The baseline's loop: one raw autocommit connection, two statements per job."""
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        conn.execute("SELECT 1")  # connection set-up is not timed
        barrier.wait()
        t0 = time.monotonic()
        n = 0
        while True:
            token = uuid.uuid4().hex
            row = conn.execute(
                MINIMAL_CLAIM, {"worker": worker, "token": token, "queue": "dump_import"}
            ).fetchone()
            if row is None:
                break
            done = conn.execute(MINIMAL_COMPLETE, {"id": row[0], "token": token})
            if done.rowcount != 1:
                raise SystemExit(f"baseline claimer {worker}: lost the lease of row {row[0]}")
            n += 1
        out.put((worker, n, t0, time.monotonic()))
    finally:
        conn.close()


# --breakdown: the prototype of a remaining-chunks counter (not the store's SQL). The chunk's
# completion and the parent's countdown are one statement, so the parent row is locked only
# for the end of that statement; it locks the chunk before the parent, against the store's
# lock order (a parent before its chunks), so a concurrent cancel could deadlock with it.
COUNTER_COLUMN = """
ALTER TABLE jobs ADD COLUMN remaining integer;
UPDATE jobs SET remaining = total_chunks WHERE kind = 'parent';
"""
COUNTER_COMPLETE = """
WITH done AS (
    UPDATE jobs
    SET state = 'completed', progress = COALESCE(%(progress)s::jsonb, progress),
        claim_token = NULL, claim_expires_at = NULL, error = NULL,
        finished_at = now(), updated_at = now()
    WHERE id = %(id)s AND state = 'in_progress' AND claim_token = %(token)s
    RETURNING parent_job_id
)
UPDATE jobs AS p
SET remaining = p.remaining - 1,
    state = CASE WHEN p.remaining = 1 THEN 'completed' ELSE p.state END,
    finished_at = CASE WHEN p.remaining = 1 THEN now() ELSE p.finished_at END,
    updated_at = now()
FROM done
WHERE p.id = done.parent_job_id
RETURNING p.id
"""


def folded_check(parent_check: str) -> str:
    """The store's ``complete_parent_if_done`` as a CTE on the previous chunk's parent, for the
    prototype that has the next claim carry it: the claim statement starts after that chunk's
    completion committed, so the check sees what the separate post-commit statement sees (and
    is as exact); a cycle is two statements."""
    body = parent_check.replace("%(id)s", "%(prev_parent)s").replace("RETURNING *", "RETURNING p.id")
    return f"WITH parent_done AS (\n{body.strip().rstrip(';')}\n),\n"


def held_successor(complete: str) -> str:
    """PROTOTYPE: the completion also locks one queued sibling (SKIP LOCKED) until it commits;
    the post-commit check then runs only when it holds none."""
    head = """WITH held AS (
    SELECT c.id FROM jobs AS c
    WHERE c.parent_job_id = %(parent_id)s AND c.state = 'queued'
    LIMIT 1
    FOR NO KEY UPDATE SKIP LOCKED
)
"""
    body = complete.strip().rstrip(";")
    body = body.replace(
        "RETURNING progress, finished_at, updated_at",
        "RETURNING progress, finished_at, updated_at, EXISTS (SELECT 1 FROM held) AS held",
    )
    assert "AS held" in body
    return head + body


#: The prototype's index: only queued rows are in it, and a claim or completion (whose new row
#: version is not queued) adds no entry to it.
QUEUED_CHILDREN_INDEX = "CREATE INDEX jobs_queued_children_idx ON jobs (parent_job_id) WHERE state = 'queued'"


def queued_sibling_seen(complete: str) -> str:
    """PROTOTYPE: the completion also says whether its snapshot shows a queued sibling; the
    post-commit check then runs only when it shows none."""
    body = complete.strip().rstrip(";")
    body = body.replace(
        "RETURNING progress, finished_at, updated_at",
        "RETURNING progress, finished_at, updated_at, EXISTS (SELECT 1 FROM jobs AS c"
        " WHERE c.parent_job_id = %(parent_id)s AND c.state = 'queued') AS held",
    )
    assert "AS held" in body
    return body


#: variant -> (the claim returns the whole row as a dict, parent check after commit, parent
#: counter, parent check folded into the next claim); without the whole row, the claim returns
#: the ids only, as a tuple
BREAKDOWN = {
    "as the store runs them": (True, True, False, False),
    "no parent check": (True, False, False, False),
    "no check, claim ids only": (False, False, False, False),
    "parent counter": (True, False, True, False),
    "check folded into next claim": (True, False, False, True),
    "check unless a sibling held": (True, True, False, False),
    "check unless a queued sibling": (True, True, False, False),
}


def statements_claimer(variant: str, dsn: str, worker: str, barrier: Barrier, out: Any) -> None:
    """The store's own statements on one raw autocommit connection, as ``variant`` says."""
    whole, check, counter, folded = BREAKDOWN[variant]
    q = load_queries("postgres")
    claim, complete, parent_check = (
        q["claim_next"],
        q["complete_chunk"],
        q["complete_parent_if_done"],
    )
    if not whole:
        claim = claim.replace("RETURNING j.*", "RETURNING j.id, j.parent_job_id")
    if counter:
        complete = COUNTER_COMPLETE
    held = variant in ("check unless a sibling held", "check unless a queued sibling")
    if variant == "check unless a sibling held":
        complete = held_successor(complete)
    elif held:
        complete = queued_sibling_seen(complete)
    if folded:
        claim = claim.replace("WITH candidate AS (", folded_check(parent_check) + "candidate AS (", 1)
        assert "parent_done" in claim
    conn = psycopg.connect(dsn, autocommit=True, row_factory=dict_row if whole else None)
    try:
        conn.execute("SET search_path TO miroir")
        conn.execute("SET TIME ZONE 'UTC'")
        barrier.wait()
        t0 = time.monotonic()
        n = 0
        prev_parent: str | None = None
        while True:
            token = uuid.uuid4().hex
            args = {"types": ["dump_import"], "worker_id": worker, "token": token, "ttl": 60.0}
            if folded:
                args["prev_parent"] = prev_parent
            row = conn.execute(claim, args | {"parent_id": None}).fetchone()
            if row is None:
                break
            job_id, parent_id = (row["id"], row["parent_job_id"]) if whole else row
            done = conn.execute(
                complete,
                {"id": job_id, "token": token, "progress": '{"b": 1}', "parent_id": parent_id},
            ).fetchone()
            if done is None:
                raise SystemExit(f"{variant}, claimer {worker}: lost the lease of {job_id}")
            if check and not (held and done["held"]):
                conn.execute(parent_check, {"id": parent_id}).fetchall()
            prev_parent = parent_id
            n += 1
        out.put((worker, n, t0, time.monotonic()))
    finally:
        conn.close()


def run_statements_once(variant: str, dsn: str, rows: int, k: int) -> float:
    """One ``--breakdown`` variant over ``rows`` chunks of one parent; cycles per second."""
    parent_id = enqueue(dsn, rows)
    if BREAKDOWN[variant][2]:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SET search_path TO miroir")
            conn.execute(COUNTER_COLUMN)
    if variant == "check unless a queued sibling":
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SET search_path TO miroir")
            conn.execute(QUEUED_CHILDREN_INDEX)
            conn.execute("ANALYZE jobs")
    wall, done = _race(partial(statements_claimer, variant), dsn, k)
    with psycopg.connect(dsn, autocommit=True) as conn:
        got = conn.execute(
            "SELECT count(*) FILTER (WHERE state = 'completed' AND kind = 'chunk'),"
            " bool_or(state = 'completed' AND kind = 'parent') FROM miroir.jobs"
        ).fetchone()
    _, check, counter, folded = BREAKDOWN[variant]
    # the parent completes through the check (separate or folded; a folded check runs in the
    # claim that finds the queue empty) or the counter; a variant with none leaves it
    if done != rows or not got or got[0] != rows or bool(got[1]) != (check or counter or folded):
        raise SystemExit(
            f"{variant}, {k} claimers: {done} completions, {got} of {rows} ({parent_id})"
        )
    return rows / wall


def breakdown(server: Any, args: argparse.Namespace, res: Any) -> None:
    """``--breakdown``: every variant at each claimer count, interleaved per repeat."""
    for k in [int(x) for x in args.claimers.split(",")]:
        rates: dict[str, list[float]] = {v: [] for v in BREAKDOWN}
        for _ in range(args.repeat):
            for variant in BREAKDOWN:
                name, dsn = svc.fresh_database(server)
                try:
                    rates[variant].append(run_statements_once(variant, dsn, args.rows, k))
                finally:
                    server.drop_database(name)
        first = c.median(rates[next(iter(BREAKDOWN))])
        for variant, got in rates.items():
            rate = c.median(got)
            res.add(
                variant=variant,
                claimers=k,
                cycles_s=round(rate),
                vs_store_statements=round(rate / first, 2),
                all=[round(r) for r in got],
            )
            print(f"  {k} claimer(s) {variant:28s} {rate:8.0f} cycles/s ({rate / first:.2f})")


def run_minimal_once(dsn: str, rows: int, k: int) -> float:
    """The baseline queue over ``rows`` rows with ``k`` claimers; cycles per second."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(MINIMAL_SCHEMA)
        conn.execute(MINIMAL_FILL, {"rows": rows})
        conn.execute("ANALYZE minimal.jobs")
    wall, done = _race(minimal_claimer, dsn, k)
    with psycopg.connect(dsn, autocommit=True) as conn:
        got = conn.execute("SELECT count(*) FROM minimal.jobs WHERE status = 'done'").fetchone()
    if done != rows or not got or got[0] != rows:
        raise SystemExit(f"baseline, {k} claimers: {done} completions, {got} rows done, of {rows}")
    return rows / wall


def _race(target: Any, dsn: str, k: int) -> tuple[float, int]:
    """Start ``k`` claimer processes together; (wall seconds first start to last finish, jobs done)."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(k)
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(dsn, f"w{i}", barrier, out)) for i in range(k)]
    for p in procs:
        p.start()
    results = [out.get(timeout=900) for _ in procs]
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise SystemExit(f"claimer {p.name} exited with {p.exitcode}")
    done = sum(n for _, n, _, _ in results)
    wall = max(t1 for *_, t1 in results) - min(t0 for _, _, t0, _ in results)
    return float(wall), done


def enqueue(dsn: str, rows: int) -> str:
    store = open_store(dsn)
    try:
        parent = store.enqueue("dump_import", {"bench": True})
        store.split(
            parent.id,
            [NewChunk(chunk_index=i, params={"start": i, "end": i + 1}) for i in range(rows)],
        )
        return parent.id
    finally:
        store.close()


def run_once(dsn: str, rows: int, k: int) -> float:
    parent_id = enqueue(dsn, rows)
    wall, done = _race(claimer, dsn, k)
    store = open_store(dsn, migrate=False)
    try:
        summary = store.parent_summary(parent_id)
    finally:
        store.close()
    if done != rows or summary.chunks_done != rows or summary.parent.state != JobState.COMPLETED:
        raise SystemExit(
            f"{k} claimers: {done} completions for {rows} rows; parent {summary.parent.state}, {summary.chunks_by_state}"
        )
    return rows / wall


def check_fsync(server: Any, want: str) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        got = conn.execute("SHOW fsync").fetchone()
    if not got or got[0] != want:
        raise SystemExit(f"expected fsync={want} on the benchmark cluster, got {got}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--claimers", default="1,4,8")
    ap.add_argument("--backends", default="pg,pg-durable,sqlite")
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs per configuration; the median counts"
    )
    ap.add_argument("--quick", action="store_true", help="2,000 rows, 1 and 4 claimers")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="Postgres only: the store's statements in variants (see the module docstring)",
    )
    args = ap.parse_args()
    if args.quick:
        args.rows, args.claimers = 2000, "1,4"
    c.header("claim + complete cycles per second with concurrent claimers", args)
    ks = [int(x) for x in args.claimers.split(",")]
    backends = [b.strip() for b in args.backends.split(",")]
    res = c.Results("claim_throughput", vars(args))
    if args.breakdown:
        with svc.postgres() as server:
            if not server.external:
                check_fsync(server, "off")
            breakdown(server, args, res)
        print()
        c.print_table(
            res.rows, ["variant", "claimers", "cycles_s", "vs_store_statements", "all", "load1"]
        )
        res.save()
        return

    def measure(backend: str, dsn_for: Any) -> None:
        base = None
        with_baseline = backend.startswith("pg")
        for k in ks:
            rates, minimal = [], []
            for _ in range(args.repeat):
                # store, then baseline, each on a fresh database: interleaved per repeat
                for runner, into in ((run_once, rates), (run_minimal_once, minimal)):
                    if runner is run_minimal_once and not with_baseline:
                        continue
                    dsn, cleanup = dsn_for()
                    try:
                        into.append(runner(dsn, args.rows, k))
                    finally:
                        cleanup()
            rate = c.median(rates)
            base = base if base is not None else rate
            row: dict[str, Any] = {
                "backend": backend,
                "claimers": k,
                "cycles_s": round(rate),
                "vs_1_claimer": round(rate / base, 2),
                "all": [round(r) for r in rates],
            }
            note = ""
            if with_baseline:
                floor = c.median(minimal)
                row |= {
                    "baseline_s": round(floor),
                    "vs_baseline": round(rate / floor, 2),
                    "baseline_all": [round(r) for r in minimal],
                }
                note = f"; baseline {floor:8.0f} cycles/s, store/baseline {rate / floor:.2f}"
            if with_baseline and k == 8:
                row["goal_3000"] = rate >= GOAL
            res.add(**row)
            print(
                f"  {backend:10s} {k} claimer(s): {rate:8.0f} cycles/s{note} (load {c.loadavg()[0]:.2f})"
            )

    if any(b.startswith("pg") for b in backends):
        with svc.postgres() as server:

            def pg_dsn() -> tuple[str, Any]:
                name, dsn = svc.fresh_database(server)
                return dsn, lambda: server.drop_database(name)

            # fsync-off first, then restart durable (the restart is one-way)
            for backend in sorted(b for b in backends if b.startswith("pg")):
                if backend == "pg-durable":
                    if server.external:
                        res.note(
                            "pg-durable skipped: MIROIR_TEST_PG_DSN names a server this script cannot restart"
                        )
                        continue
                    svc.restart_durable(server)
                if not server.external:
                    check_fsync(server, "on" if backend == "pg-durable" else "off")
                measure(backend, pg_dsn)
    if "sqlite" in backends:
        root = c.scratch_dir("claims")

        def sqlite_dsn() -> tuple[str, Any]:
            path = root / f"jobs-{time.monotonic_ns()}.sqlite3"

            def cleanup() -> None:
                for p in root.glob(path.name + "*"):
                    p.unlink()

            return f"sqlite:///{path}", cleanup

        measure("sqlite", sqlite_dsn)
    print()
    c.print_table(
        res.rows,
        [
            "backend",
            "claimers",
            "cycles_s",
            "baseline_s",
            "vs_baseline",
            "vs_1_claimer",
            "goal_3000",
            "all",
            "load1",
        ],
    )
    res.save()


if __name__ == "__main__":
    main()
