"""Random SIGKILLs (the resume protocol): three worker processes import a multi-chunk dump on
Postgres while a seeded driver SIGKILLs 20 times a worker the database shows holding a lease,
and restarts it. Every kill is mid-chunk by choice, not by timing luck, so it holds on a loaded
machine too. Every chunk still completes, every abandoned lease is re-claimed (attempts show
it) and every node holds exactly the documents the routing formula gives it."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState
from tests.failure.conftest import (
    WorkerProc,
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
    local_topology,
    make_docs,
    write_dump,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

KILLS = 20
SEED = 20240611


@pytest.mark.timeout(300)
def test_twenty_random_sigkills_lose_nothing(tmp_path: Path, pg_dsn: str, workers: Workers) -> None:
    rng = random.Random(SEED)
    topo = local_topology(tmp_path / "nodes", shards=32, groups=2, nodes_per_group=2)
    topo_file = write_topology(tmp_path / "topology.yaml", topo)
    store = open_store(pg_dsn)
    docs = make_docs(120_000, seed=SEED)
    dump = write_dump(tmp_path / "dump.ndjson", docs)
    targets = open_targets(topo)
    # Many attempts allowed: one chunk may be hit several times; the point is that it resumes.
    settings = settings_for(tmp_path, chunk_size_bytes=512 * 1024, max_attempts=100)
    plan = plan_dump_import(store, DumpImportRequest(uri=str(dump), index_uid="kills", primary_key="id"), topo, targets, settings)
    parent = plan.parent.id
    env = worker_env(tmp_path, pg_dsn, topo_file)
    args = ("--parent", parent, "--exit-when-empty")

    generation = 0

    def spawn(slot: int) -> WorkerProc:
        nonlocal generation
        generation += 1
        return workers.start(env, f"w{slot}-g{generation}", *args)

    slots = [spawn(i) for i in range(3)]
    started = time.monotonic()
    wait_for(lambda: any(c.state == JobState.IN_PROGRESS for c in store.children(parent)), 60, "a first claim")

    kills: list[dict[str, object]] = []

    def leased_victims() -> list[tuple[int, str]]:
        """(slot, chunk) of every live worker the database shows holding a lease right now."""
        held = {c.claimed_by: c.id for c in store.children(parent) if c.state == JobState.IN_PROGRESS}
        return [(i, held[wp.name]) for i, wp in enumerate(slots) if wp.name in held]

    for _ in range(3 * KILLS):  # bounded: a kill that left no lease behind is tried again
        if len(kills) == KILLS or store.get(parent).state != JobState.IN_PROGRESS:
            break
        wait_for(lambda: bool(leased_victims()) or store.get(parent).state != JobState.IN_PROGRESS, 120, "a worker holding a lease")
        time.sleep(rng.uniform(0.0, 0.2))  # a random point inside the chunk...
        victims = leased_victims()  # ...then a worker that holds a lease there
        if not victims:
            continue
        slot, _ = rng.choice(victims)
        victim = slots[slot]
        victim.kill()
        # What the dead worker left behind: the row still names it until its lease expires.
        left = [c for c in store.children(parent) if c.state == JobState.IN_PROGRESS and c.claimed_by == victim.name]
        slots[slot] = spawn(slot)
        if left:
            kills.append({"at": round(time.monotonic() - started, 2), "slot": slot, "chunk": left[0].id, "attempt": left[0].attempts})
    assert len(kills) == KILLS, f"the import finished after {len(kills)} kills; make the dump bigger ({kills})"

    wait_for(lambda: store.get(parent).state != JobState.IN_PROGRESS, 180, "the import to finish", interval=0.2)
    elapsed = time.monotonic() - started
    for wp in slots:
        wp.proc.wait(timeout=60)
        assert wp.proc.returncode == 0, wp.output()[-3000:]

    chunks = store.children(parent)
    summary = store.parent_summary(parent)
    assert summary.parent.state == JobState.COMPLETED, [(c.id, c.state, c.error) for c in chunks]
    assert all(c.state == JobState.COMPLETED and c.attempts >= 1 for c in chunks)
    assert not any(c.claim_token for c in chunks), "a completed chunk still carries a lease"
    extra_attempts = sum(c.attempts for c in chunks) - len(chunks)
    # Each lease left behind by a killed worker had to be re-claimed, which counts an attempt.
    assert extra_attempts >= KILLS, (extra_attempts, kills)
    by_chunk = {c.id: c.attempts for c in chunks}
    for kill in kills:
        assert by_chunk[str(kill["chunk"])] > int(str(kill["attempt"])), f"chunk {kill['chunk']} was never re-claimed after {kill}"

    expected = expected_placement(docs, topo)
    assert summary.progress["docs_routed"] == len(docs)
    assert summary.progress["bytes_processed"] == dump.stat().st_size
    assert summary.progress["per_node"] == {n: len(d) for n, d in expected.items()}
    assert_exact_placement(expected, actual_placement(targets, "kills"))
    print(
        f"\n{len(chunks)} chunks, {KILLS} kills, each of a lease holder, "
        f"{extra_attempts} re-claims, import took {elapsed:.1f}s"
    )
