"""Database restart (the Postgres store's psycopg pool): the jobs database is stopped and started in
the middle of an import. The workers ride it out — nobody restarts them — reconnect through
their pools, and finish; every node holds exactly the documents the routing formula predicts.

The cluster belongs to this test alone (``own_pg``), so stopping it disturbs no other test."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState, NewChunk
from tests.failure.conftest import Workers, settings_for, wait_for, worker_env, write_topology
from tests.fixtures.postgres import PostgresServer
from tests.import_helpers import (
    actual_placement,
    assert_exact_placement,
    expected_placement,
    local_topology,
    make_docs,
    write_dump,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

OUTAGE_S = 4.0


@pytest.mark.timeout(300)
def test_workers_survive_a_database_restart_mid_import(tmp_path: Path, own_pg: PostgresServer, workers: Workers) -> None:
    dsn = own_pg.create_database("restart")
    topo = local_topology(tmp_path / "nodes", shards=32, groups=1, nodes_per_group=3)
    topo_file = write_topology(tmp_path / "topology.yaml", topo)
    store = open_store(dsn)
    docs = make_docs(60_000, seed=5)
    dump = write_dump(tmp_path / "dump.ndjson", docs)
    targets = open_targets(topo)
    settings = settings_for(tmp_path, chunk_size_bytes=256 * 1024)
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid="restart", primary_key="id"), topo, targets, settings)
    parent = plan.parent.id
    env = worker_env(tmp_path, dsn, topo_file)
    pool = [workers.start(env, f"w{i}", "--parent", parent, "--exit-when-empty") for i in range(2)]

    def done_count() -> int:
        return sum(c.state == JobState.COMPLETED for c in store.children(parent))

    wait_for(lambda: done_count() >= 2, 120, "two completed chunks")
    before = done_count()
    assert before < len(plan.chunk_ids), "the import finished before the outage; make the dump bigger"
    store.close()

    t0 = time.monotonic()
    own_pg.stop(mode="fast")  # disconnects every session, like a failover or a restart
    time.sleep(OUTAGE_S)
    own_pg.start()
    outage = time.monotonic() - t0
    assert all(w.alive() for w in pool), "a worker died during the outage:\n" + "\n".join(w.output()[-3000:] for w in pool if not w.alive())

    store = open_store(dsn)
    try:
        wait_for(lambda: store.get(parent).state != JobState.IN_PROGRESS, 240, "the import to finish", interval=0.25)
        for w in pool:
            w.proc.wait(timeout=60)
        outputs = {w.name: w.output() for w in pool}
        assert [w.proc.returncode for w in pool] == [0, 0], outputs
        chunks = store.children(parent)
        summary = store.parent_summary(parent)
        assert summary.parent.state == JobState.COMPLETED, [(c.id, c.state, c.error) for c in chunks]
        retried = [(c.id, c.attempts, c.error) for c in chunks if c.attempts > 1]
        expected = expected_placement(docs, topo)
        assert summary.progress["docs_routed"] == len(docs)
        assert summary.progress["per_node"] == {n: len(d) for n, d in expected.items()}
        assert_exact_placement(expected, actual_placement(targets, "restart"))
    finally:
        store.close()
    print(
        f"\n{len(chunks)} chunks, {before} done before a {outage:.1f}s outage; chunks with more than "
        f"one attempt: {retried}"
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_a_pooled_connection_left_over_from_before_a_restart_is_never_lent(own_pg: PostgresServer, mode: str) -> None:
    """The pool lends connections without a round trip while the server is quiet; one the
    server closed (a shutdown's FATAL message, or a crash's closed socket) is replaced before
    it is lent, so the first operation after a restart succeeds instead of failing."""
    dsn = own_pg.create_database(f"stale_{mode}")
    store = open_store(dsn, min_size=1, max_size=1)  # one connection: the stale one is the one lent
    try:
        parent = store.enqueue("dump_import", {"n": 1})
        store.split(parent.id, [NewChunk(chunk_index=i, params={}) for i in range(3)])
        assert store.queue_depth()["dump_import"] == 3
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CHECKPOINT")  # the fixture runs synchronous_commit=off: keep the rows over a crash
        own_pg.stop(mode=mode)
        own_pg.start()
        lease = store.claim(["dump_import"], "after-restart", 30.0)
        assert lease is not None and lease.job.parent_job_id == parent.id
        store.complete(lease)
        assert store.queue_depth()["dump_import"] == 2
    finally:
        store.close()
