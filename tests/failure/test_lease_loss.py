"""Lease loss (fencing, resume): a worker frozen with SIGSTOP past its lease TTL loses the
chunk to another worker; when it is thawed (SIGCONT) every write it tries is refused by the
fence, it stops by itself without completing the chunk, and the rescuer's import is exact.

Nodes are real Meilisearch servers and the jobs table is on Postgres: with local node stores
(SQLite files) a worker frozen inside a node-store write transaction holds that file's write
lock, and every other writer of the node waits (up to its busy timeout) until it is thawed."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState
from tests.failure.conftest import (
    LEASE_TTL,
    Workers,
    settings_for,
    wait_for,
    worker_env,
    write_topology,
)
from tests.import_helpers import (
    actual_placement,
    assert_exact_placement,
    expected_placement,
    make_docs,
    write_dump,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.meilisearch]


@pytest.mark.timeout(240)
def test_frozen_worker_loses_its_lease_and_every_later_write_is_fenced(
    tmp_path: Path, workers: Workers, pg_dsn: str, meili_fleet: Any, meili_topology: Any, meili_index_uid: str
) -> None:
    topo = meili_topology(meili_fleet(3), shards=16)
    topo_file = write_topology(tmp_path / "topology.yaml", topo)
    dsn = pg_dsn
    store = open_store(dsn)
    docs = make_docs(30_000, seed=7)
    dump = write_dump(tmp_path / "one-chunk.ndjson", docs)
    size = dump.stat().st_size
    targets = open_targets(topo)
    settings = settings_for(tmp_path, chunk_size_bytes=1 << 30)
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid=meili_index_uid, primary_key="id"), topo, targets, settings)
    [chunk] = plan.chunk_ids
    env = worker_env(tmp_path, dsn, topo_file, MIROIR_BATCH_SIZE="300")
    args = ("--parent", plan.parent.id, "--exit-when-empty")

    stale = workers.start(env, "stale", *args)
    wait_for(lambda: int(store.get(chunk).progress.get("last_cursor", 0)) > 0, 60, "the first committed batch")
    stale.signal(signal.SIGSTOP)
    frozen_row = store.get(chunk)
    frozen_at = int(frozen_row.progress["last_cursor"])
    assert frozen_row.claimed_by == "stale" and frozen_row.attempts == 1 and frozen_at < size

    # Watch the row from here on: after the takeover nobody but the rescuer may move it, and
    # the cursor never goes back (a stale progress write would carry an older cursor).
    samples: list[tuple[str | None, str | None, int, str]] = []
    watching = threading.Event()
    watching.set()

    def watch() -> None:
        watcher = open_store(dsn)
        try:
            while watching.is_set():
                row = watcher.get(chunk)
                samples.append((row.claimed_by, row.claim_token, int(row.progress.get("last_cursor", 0)), row.state))
                time.sleep(0.005)
        finally:
            watcher.close()

    watcher_thread = threading.Thread(target=watch, daemon=True)
    watcher_thread.start()
    try:
        rescuer = workers.start(env, "rescuer", *args)
        t0 = time.monotonic()
        wait_for(lambda: store.get(chunk).claimed_by == "rescuer", 60, "the rescuer's takeover")
        takeover_s = time.monotonic() - t0
        rescued = store.get(chunk)
        assert rescued.attempts == 2 and rescued.claim_token != frozen_row.claim_token
        # Thaw the stale worker while the rescuer is still mid-chunk, so its writes race.
        wait_for(
            lambda: int(store.get(chunk).progress.get("last_cursor", 0)) > frozen_at or store.get(chunk).state != JobState.IN_PROGRESS,
            60,
            "the rescuer's first batch",
            interval=0.005,
        )
        still_running = store.get(chunk).state == JobState.IN_PROGRESS
        stale.signal(signal.SIGCONT)
        rescuer.proc.wait(timeout=120)
        stale.proc.wait(timeout=60)  # stops by itself: no signal but SIGCONT was sent
    finally:
        watching.clear()
        watcher_thread.join(timeout=10)

    assert rescuer.proc.returncode == 0, rescuer.output()[-3000:]
    assert stale.proc.returncode == 0, stale.output()[-3000:]
    stale_log = stale.output()
    # The stale worker's own account: its lease ran out on its own clock while it was frozen,
    # or its renewal or progress write was refused by the fence.
    refused = [
        line for line in stale_log.splitlines()
        if chunk in line and (
            "not renewed within its" in line
            or "renewal refused" in line
            or ("no longer matches" in line and "rescuer" in line)
        )
    ]
    assert refused, stale_log[-3000:]

    row = store.get(chunk)
    assert row.state == JobState.COMPLETED and row.attempts == 2 and row.claimed_by == "rescuer"
    assert row.progress["last_cursor"] == size and row.progress["docs_routed"] == len(docs)
    after_takeover = samples[next(i for i, s in enumerate(samples) if s[0] == "rescuer"):]
    assert {s[0] for s in after_takeover} == {"rescuer"}, "the stale worker took the row back"
    assert frozen_row.claim_token not in {s[1] for s in after_takeover}
    cursors = [s[2] for s in after_takeover]
    assert cursors == sorted(cursors), "a stale progress write moved the cursor back"

    with dg.DagsterInstance.from_config(str(tmp_path / "dagster")) as instance:
        mats = instance.fetch_materializations(dg.AssetKey(["miroir", "dump_chunk"]), limit=10).records
        attempts = [int(m.asset_materialization.metadata["attempt"].value) for m in mats]
        resumed = [int(m.asset_materialization.metadata["resumed_from"].value) for m in mats]
    assert attempts == [2], "only the rescuer completes the chunk; the stale run never does"
    assert resumed[0] >= frozen_at

    expected = expected_placement(docs, topo)
    assert row.progress["per_node"] == {n: len(d) for n, d in expected.items()}
    assert_exact_placement(expected, actual_placement(targets, meili_index_uid))
    print(
        f"\nfrozen at byte {frozen_at}/{size}; takeover after {takeover_s:.1f}s (TTL {LEASE_TTL}s); "
        f"thawed while rescuer {'mid-chunk' if still_running else 'already done'}; {len(samples)} row samples"
    )
