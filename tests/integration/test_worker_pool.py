"""The worker pool: ``miroir-pipeline worker`` processes claim chunks from a
Postgres jobs table and run each as a Dagster run in-process against a shared instance.

One scenario, end to end: a worker is stopped with SIGTERM in the middle of a chunk and hands
it back (queued again, progress kept, the attempt not counted); two more workers drain the
import, one of them resuming the handed-back chunk at its cursor. Every chunk shows as one
successful run of its partition, and every node holds exactly the documents the routing
formula sends it. The Dagster instance is ``dagster.prod.yaml``: Postgres storage in a database
of its own, apart from the jobs table.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

import dagster as dg
import orjson
import psycopg
import pytest

from miroir_pipeline.dagster.names import TAG_WORKER_ID
from miroir_pipeline.dagster.resources import targets_for
from miroir_pipeline.fleet.routing import shard_for_key, write_targets
from miroir_pipeline.fleet.topology import Topology, load_topology
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import Job, JobState
from tests.fixtures.postgres import PostgresServer
from tests.integration.test_sensors import (
    NAMES,
    REPO_ROOT,
    ServiceProcess,
    pipeline_env,
    plan_import,
    wait_for,
    write_dagster_home,
    write_topology,
)

pytestmark = pytest.mark.postgres

CHUNK_SIZE = 1024 * 1024
DUMP_SIZE = 4 * CHUNK_SIZE
DRAIN_TIMEOUT_S = 120.0


def _start_worker(name: str, root: Path, env: Mapping[str, str]) -> ServiceProcess:
    return ServiceProcess.start(
        name,
        [sys.executable, "-m", "miroir_pipeline.cli", "--log-level", "INFO", "worker", "--exit-when-empty"],
        {**env, "POD_NAME": name},
        root / f"{name}.log",
        REPO_ROOT,
    )


def _wait_exit(worker: ServiceProcess, timeout: float) -> int:
    try:
        return worker.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{worker.name} did not exit within {timeout:g}s\n{worker.log_tail()}")


def _expected_placement(dump: Path, topology: Topology) -> dict[str, set[str]]:
    """Node id -> primary keys (as text) the routing formula sends there."""
    expected: dict[str, set[str]] = {n.id: set() for n in topology.all_nodes()}
    with dump.open("rb") as fh:
        for line in fh:
            if line.strip():
                pk = str(orjson.loads(line)["id"])
                for node in write_targets(shard_for_key(pk, topology.shards), topology):
                    expected[node].add(pk)
    return expected


def _stored_keys(topology: Topology, index: str) -> dict[str, list[str]]:
    targets = targets_for(topology)
    return {
        n.id: [str(orjson.loads(doc)["id"]) for doc in targets[n.id].iter_documents(index)]
        for n in topology.all_nodes()
    }


def _dagster_pg_env(server: PostgresServer, db_name: str) -> dict[str, str]:
    """``DAGSTER_PG_*`` for ``dagster.prod.yaml``: a database of Dagster's own on the server."""
    parts = urlsplit(server.create_database(db_name))
    return {
        "DAGSTER_PG_HOST": parts.hostname or "127.0.0.1",
        "DAGSTER_PG_PORT": str(parts.port or 5432),
        "DAGSTER_PG_USER": unquote(parts.username or ""),
        "DAGSTER_PG_PASSWORD": unquote(parts.password or ""),
        "DAGSTER_PG_DB": db_name,
    }


def _tables(dsn: str) -> set[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    return {(str(s), str(t)) for s, t in rows}


def test_worker_pool_drains_an_import_and_a_sigterm_hands_the_chunk_back(
    tmp_path: Path, pg_dsn: str, pg_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    topology_path = write_topology(tmp_path, nodes=3, shards=16, replication_factor=2)
    topology = load_topology(topology_path)
    # the production instance config: Dagster's storage in a Postgres database of its own
    dagster_db = f"dagster_{uuid.uuid4().hex[:12]}"
    dagster_pg = _dagster_pg_env(pg_server, dagster_db)
    for key, value in dagster_pg.items():
        monkeypatch.setenv(key, value)
    home = write_dagster_home(tmp_path / "dagster", source=REPO_ROOT / "dagster.prod.yaml")
    env = pipeline_env(
        tmp_path,
        pg_dsn,
        topology_path,
        **dagster_pg,
        MIROIR_BATCH_SIZE="5",  # ~600 small batches per chunk
        MIROIR_READ_BLOCK_BYTES="4096",
        # The reader runs at most 64 KiB ahead of the committed cursor (the default window would
        # hold the whole chunk, so a drain could find the last batch already read).
        MIROIR_MEMORY_BUFFER_BYTES="64KiB",
    )
    store = open_store(pg_dsn)
    workers: list[ServiceProcess] = []
    try:
        planned = plan_import(store, tmp_path, topology_path, size=DUMP_SIZE, chunk_size=CHUNK_SIZE, doc_bytes=300)
        assert len(planned.chunk_ids) == 4

        # -- a worker is stopped in the middle of its first chunk --------------------------
        first = _start_worker("worker-a", tmp_path, env)
        workers.append(first)
        held: list[Job] = []

        def mid_chunk() -> bool:
            held[:] = [
                c
                for c in store.children(planned.parent.id)
                if c.claimed_by == "worker-a" and 0 < int(c.progress.get("bytes_processed", 0)) < CHUNK_SIZE * 3 // 4
            ]
            return bool(held)

        wait_for("worker-a to be part-way through a chunk", mid_chunk, 60, first)
        # Hold the chunk's row while the signal lands: worker-a's next progress commit waits on
        # it, so the chunk cannot finish before the drain is requested, however loaded the box.
        # SIGTERM goes to the worker alone, as the kubelet sends it to a container's main process
        # (signalling the group would also stop the `tail` that mirrors the run's captured stderr
        # into this log, and with it the line waited for).
        with psycopg.connect(pg_dsn) as lock, lock.transaction():
            state, progress = lock.execute(
                "SELECT state, progress FROM miroir.jobs WHERE id = %s FOR UPDATE", (held[0].id,)
            ).fetchone() or (None, {})
            assert state == "in_progress" and int(progress["bytes_processed"]) < CHUNK_SIZE * 3 // 4, progress
            first.proc.send_signal(signal.SIGTERM)
            wait_for("worker-a to log the drain", lambda: "draining" in first.log_path.read_text(errors="replace"), 30, first)
        assert _wait_exit(first, 30) == 0, first.log_tail()
        chunk = store.get(held[0].id)
        cursor = int(chunk.progress["last_cursor"])
        assert chunk.state == JobState.QUEUED and chunk.claimed_by is None
        assert chunk.attempts == 0, "a hand-back must not count as an attempt"
        assert int(chunk.progress["bytes_processed"]) >= int(held[0].progress["bytes_processed"])
        start = int(chunk.params["start"])
        assert start < cursor < int(chunk.params["end"])
        others = [c for c in store.children(planned.parent.id) if c.id != chunk.id]
        assert all(
            c.state == JobState.COMPLETED or (c.state == JobState.QUEUED and c.attempts == 0) for c in others
        ), f"worker-a must stop claiming once told to stop: {[(c.id, c.state, c.attempts) for c in others]}"
        assert any(c.state == JobState.QUEUED for c in others), "chunks too fast: worker-a had finished the rest"

        # -- two workers drain the rest ----------------------------------------------------
        pool = [_start_worker("worker-b", tmp_path, env), _start_worker("worker-c", tmp_path, env)]
        workers.extend(pool)
        for w in pool:
            assert _wait_exit(w, DRAIN_TIMEOUT_S) == 0, w.log_tail()

        rows = store.children(planned.parent.id)
        assert [c.state for c in rows] == [JobState.COMPLETED] * len(rows)
        assert [c.attempts for c in rows] == [1] * len(rows)
        assert store.get(planned.parent.id).state == JobState.COMPLETED
    finally:
        for w in workers:
            w.stop()
        store.close()

    # -- Dagster shows each chunk as one successful run of its partition --------------------
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs(dg.RunsFilter(job_name=NAMES.chunk_job("dump_import")))
        by_partition: dict[str, list[dg.DagsterRun]] = {}
        for run in runs:
            by_partition.setdefault(run.tags["dagster/partition"], []).append(run)
        assert set(by_partition) == set(planned.chunk_ids)
        for cid, chunk_runs in by_partition.items():
            ok = [r for r in chunk_runs if r.status == dg.DagsterRunStatus.SUCCESS]
            assert len(ok) == 1, f"{cid}: {[(r.run_id, r.status) for r in chunk_runs]}"
            assert len(chunk_runs) == (2 if cid == chunk.id else 1)
        (handed_back,) = [r for r in by_partition[chunk.id] if r.status != dg.DagsterRunStatus.SUCCESS]
        assert handed_back.tags[TAG_WORKER_ID] == "worker-a"
        (finisher,) = [r for r in by_partition[chunk.id] if r.status == dg.DagsterRunStatus.SUCCESS]
        assert finisher.tags[TAG_WORKER_ID] in ("worker-b", "worker-c")
        (materialized,) = instance.all_logs(finisher.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
        metadata = materialized.dagster_event.step_materialization_data.materialization.metadata  # type: ignore[union-attr]
        assert metadata["resumed_from"].value == cursor  # resumed at the hand-back cursor

    # -- Dagster's tables and the jobs table never meet ----------------------------------------
    dagster_tables = _tables(pg_server.dsn(dagster_db))
    jobs_tables = _tables(pg_dsn)
    assert ("public", "runs") in dagster_tables and not any(s == "miroir" for s, _ in dagster_tables)
    assert ("miroir", "jobs") in jobs_tables and ("public", "runs") not in jobs_tables
    with contextlib.suppress(psycopg.Error):
        pg_server.drop_database(dagster_db)

    # -- every node holds exactly what the routing formula predicts ---------------------------
    expected = _expected_placement(tmp_path / "movies.ndjson", topology)
    stored = _stored_keys(topology, "movies")
    for node_id, keys in stored.items():
        assert len(keys) == len(set(keys)), f"{node_id} holds duplicates"
        assert set(keys) == expected[node_id], f"{node_id} differs from the routing formula"
    documents = sum(1 for line in (tmp_path / "movies.ndjson").read_bytes().splitlines() if line.strip())
    assert sum(len(k) for k in expected.values()) == 2 * documents  # RF 2: each document twice
