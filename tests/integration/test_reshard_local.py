"""Reshard backfill into local node stores: exact placement both ways (16 → 64, 64 → 16),
resume from the ``shard:offset`` cursor after a SIGKILLed worker, verification failures that
name the keys, edge cases, and the Dagster surface (blocking check, cutover)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import orjson
import pytest
import yaml

import miroir_pipeline.jobs.reshard_backfill.process as process_module
from miroir_pipeline.fleet.routing import SHARD_FIELD, Router, shard_for_key, write_targets
from miroir_pipeline.fleet.targets.base import NodeTarget, TargetError
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.topology import Group, Node, Topology
from miroir_pipeline.jobs.reshard_backfill import (
    PlannedReshard,
    ReshardChunkReport,
    ReshardRefused,
    ReshardRequest,
    parse_cursor,
    plan_reshard,
    process_reshard_chunk,
)
from miroir_pipeline.jobs.reshard_backfill.live_pages import READ_OVERLAP_DOCS
from miroir_pipeline.jobs.reshard_backfill.verification import verify_shadow
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import JobStore, open_store
from miroir_pipeline.queue.contract import JobState
from miroir_pipeline.queue.shutdown import ChunkHandedBack, Shutdown

REPO = Path(__file__).resolve().parents[2]
N_DOCS = 10_000
SETTINGS = PipelineSettings(allowed_roots=["/"], batch_size=1000)


# -- helpers (also used by the Meilisearch tests) -----------------------------------------------


def make_docs(n: int, *, int_ids: bool) -> list[dict[str, Any]]:
    """Documents with nested, float and array fields; ids are integers or strings."""
    return [
        {
            "id": i * 7 + 3 if int_ids else f"doc-{i:06d}_x",
            "title": f"title {i}",
            "price": i / 4,
            "tags": [f"t{i % 5}", f"u{i % 3}"],
            "meta": {"rank": i % 97, "ok": i % 2 == 0, "note": None},
        }
        for i in range(n)
    ]


def load_live(
    topology: Topology, targets: Mapping[str, NodeTarget], uid: str, docs: list[dict[str, Any]]
) -> None:
    """Write documents the way the router places them: ``_miroir_shard`` set, every write target."""
    for node in topology.all_nodes():
        targets[node.id].ensure_index(uid, "id", {"searchableAttributes": ["title", "tags"]})
    per_node: dict[str, list[bytes]] = defaultdict(list)
    for d in docs:
        shard = shard_for_key(d["id"], topology.shards)
        line = orjson.dumps({**d, SHARD_FIELD: shard}) + b"\n"
        for node_id in write_targets(shard, topology):
            per_node[node_id].append(line)
    for node_id, lines in per_node.items():
        for at in range(0, len(lines), 5000):
            batch = lines[at : at + 5000]
            targets[node_id].write_documents(uid, "id", b"".join(batch), len(batch))


def run_backfill(
    store: JobStore,
    live_targets: Mapping[str, NodeTarget],
    shadow_targets: Mapping[str, NodeTarget],
    settings: PipelineSettings = SETTINGS,
) -> list[ReshardChunkReport]:
    reports = []
    while (lease := store.claim(["reshard_backfill"], "test-worker", settings.lease_ttl)) is not None:
        reports.append(process_reshard_chunk(store, lease, live_targets, shadow_targets, settings))
    return reports


def assert_exact_placement(
    shadow_topology: Topology,
    shadow_targets: Mapping[str, NodeTarget],
    shadow_uid: str,
    docs: list[dict[str, Any]],
) -> None:
    """Independently of verify_shadow: each node holds exactly the documents the formula gives it,
    with the right ``_miroir_shard`` and unchanged content."""
    expected: dict[str, dict[str, dict[str, Any]]] = {n.id: {} for n in shadow_topology.all_nodes()}
    for d in docs:
        shard = shard_for_key(d["id"], shadow_topology.shards)
        for node_id in write_targets(shard, shadow_topology):
            expected[node_id][str(d["id"])] = {**d, SHARD_FIELD: shard}
    for node_id, want in expected.items():
        got = {str(doc["id"]): doc for doc in map(orjson.loads, shadow_targets[node_id].iter_documents(shadow_uid))}
        assert got.keys() == want.keys(), f"{node_id}: wrong document set"
        assert got == want, f"{node_id}: content or {SHARD_FIELD} differs"


def local_topology(root: Path, shards: int, groups: list[list[str]], rf: int = 1) -> Topology:
    return Topology(
        shards=shards,
        replication_factor=rf,
        groups=[
            Group(id=g, nodes=[Node(id=n, url=f"local://{root / n}") for n in names])
            for g, names in enumerate(groups)
        ],
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    s = open_store(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    yield s
    s.close()


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[Callable[[Topology], dict[str, NodeTarget]]]:
    all_targets: list[NodeTarget] = []

    def _open(topology: Topology) -> dict[str, NodeTarget]:
        t = open_targets(topology)
        all_targets.extend(t.values())
        return t

    yield _open
    for t in all_targets:
        t.close()


# -- the main promise ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "int_ids", "live_groups", "shadow_groups", "rf"),
    [
        # 16 -> 64 on the same nodes: two replica groups, so every document has two copies.
        (16, 64, False, [["a0", "a1"], ["b0", "b1"]], None, 1),
        # 64 -> 16 onto other nodes, RF 2 of 3, integer ids.
        (64, 16, True, [["n0", "n1", "n2"]], [["m0", "m1", "m2"]], 2),
    ],
)
def test_reshard_places_every_document_exactly(
    tmp_path: Path,
    store: JobStore,
    opened: Callable[[Topology], dict[str, NodeTarget]],
    old: int,
    new: int,
    int_ids: bool,
    live_groups: list[list[str]],
    shadow_groups: list[list[str]] | None,
    rf: int,
) -> None:
    live_topo = local_topology(tmp_path / "nodes", old, live_groups, rf=1 if shadow_groups else rf)
    live = opened(live_topo)
    docs = make_docs(N_DOCS, int_ids=int_ids)
    load_live(live_topo, live, "books", docs)
    new_topo = local_topology(tmp_path / "nodes", new, shadow_groups, rf=rf) if shadow_groups else None
    shadow_targets = opened(new_topo) if new_topo else live

    planned = plan_reshard(
        store,
        ReshardRequest(index_uid="books", new_shards=new, shards_per_chunk=8),
        live_topo,
        live,
        SETTINGS,
        new_topology=new_topo,
        shadow_targets=shadow_targets,
    )
    assert len(planned.chunk_ids) == old // 8
    reports = run_backfill(store, live, shadow_targets)
    assert sum(r.documents for r in reports) == N_DOCS
    summary = store.parent_summary(planned.parent.id)
    assert summary.parent.state == JobState.COMPLETED
    assert summary.progress["documents_backfilled"] == N_DOCS
    assert all(c.progress["last_cursor"] == f"{c.params['shard_end']}:0" for c in store.children(planned.parent.id))

    assert_exact_placement(planned.shadow_topology, shadow_targets, planned.shadow_uid, docs)
    copies = len(planned.shadow_topology.groups) * planned.shadow_topology.replication_factor
    assert sum(summary.progress["per_node"].values()) == N_DOCS * copies
    if new_topo:
        assert not any(t.index_exists(planned.shadow_uid) for t in live.values())

    result = verify_shadow(
        live_topo, live, planned.shadow_topology, shadow_targets, "books", planned.shadow_uid, "id"
    )
    assert result.passed, result.summary()
    assert result.live_documents == result.shadow_documents == N_DOCS
    assert result.shadow_per_node == summary.progress["per_node"]


# -- resume after a SIGKILLed worker ------------------------------------------------------------

VICTIM = """
import sys, time
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import open_store
from miroir_pipeline.jobs.reshard_backfill import ReshardChunkParams, process_reshard_chunk
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.topology import Topology

store = open_store(sys.argv[1])
settings = PipelineSettings.from_env(allowed_roots=["/"])
lease = store.claim_by_id(sys.argv[2], "victim", settings.lease_ttl)
p = ReshardChunkParams.model_validate(lease.job.params)
live = open_targets(Topology.parse(p.live_topology))
shadow = open_targets(Topology.parse(p.shadow_topology))
# Throttle only: each committed batch is followed by a pause, so the kill lands mid-range.
process_reshard_chunk(store, lease, live, shadow, settings, on_batch=lambda report, cursor: time.sleep(0.05))
"""


@pytest.mark.parametrize(("groups", "rf", "pad"), [([["a0", "a1"], ["b0", "b1"]], 2, 250), ([["a0"]], 1, 20_000)], ids=["4-copies", "large-docs"])
def test_batches_stay_within_their_byte_budget(
    tmp_path: Path,
    store: JobStore,
    opened: Callable[[Topology], dict[str, NodeTarget]],
    monkeypatch: pytest.MonkeyPatch,
    groups: list[list[str]],
    rf: int,
    pad: int,
) -> None:
    """A batch holds every copy of its documents (one per replica group and replica) until the
    nodes acknowledge them, and a page of large documents alone can outgrow the budget: a
    batch is cut within one document of it, copies counted. (The chunk pipeline is spied on
    to see the batches; it runs unchanged.)"""
    topo = local_topology(tmp_path / "nodes", 4, groups, rf=rf)
    live = opened(topo)
    docs = [{"id": f"doc-{i:06d}", "title": f"t{i}", "pad": "x" * pad} for i in range(4000 if pad < 1000 else 300)]
    load_live(topo, live, "books", docs)
    settings = PipelineSettings(allowed_roots=["/"], memory_buffer_bytes=256 * 1024)
    seen: list[tuple[int, int]] = []
    real = process_module.run_batches

    def spy(*args: Any, **kw: Any) -> None:
        store_, keeper, targets, uid, pk, batches, shutdown = args

        def watched() -> Iterator[Any]:
            for b in batches:
                seen.append((b.nbytes, max((len(line) for lines in b.lines for line in lines), default=0)))
                yield b

        real(store_, keeper, targets, uid, pk, watched(), shutdown, **kw)

    monkeypatch.setattr(process_module, "run_batches", spy)
    planned = plan_reshard(store, ReshardRequest(index_uid="books", new_shards=8, shards_per_chunk=4), topo, live, settings)
    run_backfill(store, live, live, settings)
    copies = len(groups) * rf
    assert seen and all(size < settings.effective_batch_bytes + copies * longest for size, longest in seen), (
        settings.effective_batch_bytes, max(seen)
    )
    assert_exact_placement(planned.shadow_topology, live, planned.shadow_uid, docs)


def test_a_live_index_imported_under_another_topology_is_refused_before_anything_is_queued(
    tmp_path: Path, store: JobStore, opened: Callable[[Topology], dict[str, NodeTarget]]
) -> None:
    """The index was imported with 64 shards, the topology given says 16: a backfill reads
    shards 0-15 only and would leave three quarters of the documents behind, and verification
    (reading the same way) would pass. Refused, naming the node and the counts."""
    imported = local_topology(tmp_path / "nodes", 64, [["n0", "n1"]])
    live = opened(imported)
    load_live(imported, live, "books", make_docs(800, int_ids=False))
    claimed = imported.model_copy(update={"shards": 16})
    with pytest.raises(ReshardRefused) as refused:
        plan_reshard(store, ReshardRequest(index_uid="books", new_shards=32), claimed, live, SETTINGS)
    message = str(refused.value)
    assert "live index books on node n" in message and "16 shards" in message and "--topology" in message
    assert store.list_parents() == [], "nothing queued"


def test_killed_worker_resumes_at_its_shard_offset_cursor(
    tmp_path: Path, store: JobStore, opened: Callable[[Topology], dict[str, NodeTarget]]
) -> None:
    topo = local_topology(tmp_path / "nodes", 16, [["n0", "n1", "n2"]])
    live = opened(topo)
    docs = make_docs(N_DOCS, int_ids=False)
    load_live(topo, live, "books", docs)
    planned = plan_reshard(
        store, ReshardRequest(index_uid="books", new_shards=64, shards_per_chunk=16), topo, live, SETTINGS
    )
    (chunk_id,) = planned.chunk_ids
    dsn = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    env = {**os.environ, "MIROIR_LEASE_TTL": "1.5", "MIROIR_BATCH_SIZE": "250", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", VICTIM, dsn, chunk_id], env=env, cwd=tmp_path, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, "the victim exited before it could be killed"
            assert time.monotonic() < deadline, "no mid-range cursor within 60 s"
            cursor = store.get(chunk_id).progress.get("last_cursor", "0:0")
            shard, offset = parse_cursor(cursor)
            if shard >= 1 and offset > 0:  # past the range start and inside a shard
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    saved = store.get(chunk_id)
    assert saved.state == JobState.IN_PROGRESS and saved.claimed_by == "victim"
    saved_cursor = saved.progress["last_cursor"]
    assert parse_cursor(saved_cursor) > (0, 0)
    assert 0 < saved.progress["documents_backfilled"] < N_DOCS

    settings = PipelineSettings(allowed_roots=["/"], batch_size=250, lease_ttl=5)
    deadline = time.monotonic() + 15
    lease = None
    while lease is None:  # the victim's lease must run out first
        assert time.monotonic() < deadline, "the killed worker's lease never expired"
        lease = store.claim(["reshard_backfill"], "rescuer", settings.lease_ttl)
        if lease is None:
            time.sleep(0.1)
    assert lease.job_id == chunk_id and lease.attempt == 2
    first_cursor: list[str] = []
    report = process_reshard_chunk(
        store, lease, live, live, settings, on_batch=lambda r, c: first_cursor.append(c) if not first_cursor else None
    )
    assert report.resumed_from == saved_cursor
    # Documents counted from the saved count on: had the attempt re-read from the start, the
    # total would exceed the corpus.
    assert report.documents == N_DOCS
    assert parse_cursor(first_cursor[0]) > parse_cursor(saved_cursor)
    assert store.get(chunk_id).state == JobState.COMPLETED
    assert_exact_placement(planned.shadow_topology, live, planned.shadow_uid, docs)
    assert verify_shadow(topo, live, planned.shadow_topology, live, "books", planned.shadow_uid, "id").passed


def test_drain_hands_the_chunk_back_at_a_batch_boundary_and_it_resumes(
    tmp_path: Path, store: JobStore, opened: Callable[[Topology], dict[str, NodeTarget]]
) -> None:
    topo = local_topology(tmp_path / "nodes", 4, [["n0", "n1"]])
    live = opened(topo)
    docs = make_docs(2000, int_ids=True)
    load_live(topo, live, "books", docs)
    planned = plan_reshard(
        store, ReshardRequest(index_uid="books", new_shards=3, shards_per_chunk=4), topo, live, SETTINGS
    )
    # No window (the buffer is one batch wide): the drain requested at the first commit always
    # finds the chunk's last batch unsent, whatever the timing of the reads.
    settings = PipelineSettings(allowed_roots=["/"], batch_size=300, memory_buffer_bytes=64 * 1024, batch_bytes=64 * 1024)
    lease = store.claim(["reshard_backfill"], "w1", settings.lease_ttl)
    assert lease is not None
    shutdown = Shutdown()
    with pytest.raises(ChunkHandedBack):
        process_reshard_chunk(
            store, lease, live, live, settings, shutdown=shutdown, on_batch=lambda r, c: shutdown.request()
        )
    row = store.get(lease.job_id)
    assert row.state == JobState.QUEUED
    handed_back_at = row.progress["last_cursor"]
    assert parse_cursor(handed_back_at) > (0, 0)
    (report,) = run_backfill(store, live, live, settings)
    assert report.resumed_from == handed_back_at and report.documents == 2000
    assert_exact_placement(planned.shadow_topology, live, planned.shadow_uid, docs)


def _drain_mid_shard(
    store: JobStore, live: dict[str, NodeTarget], shadow: dict[str, NodeTarget], settings: PipelineSettings, at: int
) -> dict[str, Any]:
    """Run the first chunk until a batch commits at or past ``0:at``, then drain it (hand it back);
    the progress it was handed back at."""
    lease = store.claim(["reshard_backfill"], "w1", settings.lease_ttl)
    assert lease is not None
    shutdown = Shutdown()
    with pytest.raises(ChunkHandedBack):
        process_reshard_chunk(
            store, lease, live, shadow, settings, shutdown=shutdown,
            on_batch=lambda r, c: shutdown.request() if parse_cursor(c) >= (0, at) else None,
        )  # fmt: skip
    row = store.get(lease.job_id)
    assert row.state == JobState.QUEUED
    return dict(row.progress)


def _fails_after(target: NodeTarget, pages: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake fault (local stores cannot crash under a running read): ``target`` serves
    ``pages`` shard pages, then every read fails as a node that went down would."""
    real = target.fetch_shard
    served = [0]

    def fetch(index_uid: str, shard: int, offset: int, limit: int) -> list[bytes]:
        served[0] += 1
        if served[0] > pages:
            raise TargetError(f"node {target.node_id}: connection refused (fault injected)", node_id=target.node_id, retryable=True)
        return real(index_uid, shard, offset, limit)

    monkeypatch.setattr(target, "fetch_shard", fetch)


@pytest.mark.parametrize("resumed", [False, True], ids=["within-an-attempt", "at-a-resumed-cursor"])
def test_a_read_moving_to_another_replica_counts_each_document_once(
    tmp_path: Path,
    store: JobStore,
    opened: Callable[[Topology], dict[str, NodeTarget]],
    monkeypatch: pytest.MonkeyPatch,
    resumed: bool,
) -> None:
    """The replica a shard is read from goes down mid-shard; the read restarts the shard at
    offset 0 on the other replica, and the counts (documents, per node) still match what the
    shadow holds, whether the move happens within one attempt or when an attempt resumes a
    cursor whose node is down."""
    topo = local_topology(tmp_path / "nodes", 2, [["n0", "n1"]], rf=2)
    live = opened(topo)
    docs = make_docs(2000, int_ids=True)
    load_live(topo, live, "books", docs)
    shadow_topo = local_topology(tmp_path / "nodes", 3, [["m0"], ["m1"]])
    shadow = opened(shadow_topo)
    planned = plan_reshard(
        store, ReshardRequest(index_uid="books", new_shards=3, shards_per_chunk=2), topo, live, SETTINGS,
        new_topology=shadow_topo, shadow_targets=shadow,
    )  # fmt: skip
    settings = PipelineSettings(allowed_roots=["/"], batch_size=100, memory_buffer_bytes=64 * 1024, batch_bytes=64 * 1024)
    first_reader = Router(topo).targets_of(0)[0]
    if resumed:  # the first attempt reads three pages of shard 0 from its first replica, then drains
        progress = _drain_mid_shard(store, live, shadow, settings, 300)
        shard, offset = parse_cursor(progress["last_cursor"])
        assert shard == 0 and offset >= 300 and progress["read_node"] == first_reader
        _fails_after(live[first_reader], 0, monkeypatch)
    else:
        _fails_after(live[first_reader], 3, monkeypatch)
    lease = store.claim(["reshard_backfill"], "w2", settings.lease_ttl)
    assert lease is not None
    report = process_reshard_chunk(store, lease, live, shadow, settings)
    assert report.documents == 2000
    assert_exact_placement(planned.shadow_topology, shadow, planned.shadow_uid, docs)
    summary = store.parent_summary(planned.parent.id)
    assert summary.progress["documents_backfilled"] == 2000
    result = verify_shadow(topo, live, planned.shadow_topology, shadow, "books", planned.shadow_uid, "id")
    assert result.passed, result.summary()
    assert result.shadow_per_node == summary.progress["per_node"] == report.per_node


def test_replicas_failing_in_turn_fail_the_attempt_instead_of_restarting_forever(
    tmp_path: Path,
    store: JobStore,
    opened: Callable[[Topology], dict[str, NodeTarget]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both replicas of a shard flap: whichever served the last page fails the next read, so
    every read moves to the other replica and restarts the shard at offset 0. The restarts are
    bounded: the attempt fails retryably, naming the shard and the node, and the chunk is queued
    again at its cursor."""
    topo = local_topology(tmp_path / "nodes", 1, [["n0", "n1"]], rf=2)
    live = opened(topo)
    load_live(topo, live, "books", make_docs(1000, int_ids=True))
    plan_reshard(store, ReshardRequest(index_uid="books", new_shards=2), topo, live, SETTINGS)
    last, reads = [""], [0]
    for node_id, target in live.items():
        real = target.fetch_shard

        def fetch(index_uid: str, shard: int, offset: int, limit: int, node_id: str = node_id, real: Any = real) -> list[bytes]:
            # A fake fault (local stores cannot flap): the replica that served the last read fails.
            reads[0] += 1
            if reads[0] > 100:  # the read would go on forever: stop the test rather than hang it
                raise RuntimeError("the read kept moving between replicas without a bound")
            if last[0] == node_id:
                last[0] = ""
                raise TargetError(f"node {node_id}: connection reset (fault injected)", node_id=node_id, retryable=True)
            last[0] = node_id
            return real(index_uid, shard, offset, limit)

        monkeypatch.setattr(target, "fetch_shard", fetch)
    lease = store.claim(["reshard_backfill"], "w1", 30)
    assert lease is not None
    with pytest.raises(TargetError, match=r"shard 0: its read restarted 3 times.*moved to node n[01].*health") as info:
        process_reshard_chunk(store, lease, live, live, PipelineSettings(allowed_roots=["/"], batch_size=100))
    assert info.value.retryable and info.value.node_id in {"n0", "n1"}
    assert store.get(lease.job_id).state == JobState.QUEUED


@pytest.mark.parametrize("deleted", [5, 150], ids=["within-the-overlap", "beyond-the-overlap"])
def test_live_deletes_below_the_read_offset_do_not_make_the_read_skip_documents(
    tmp_path: Path,
    store: JobStore,
    opened: Callable[[Topology], dict[str, NodeTarget]],
    monkeypatch: pytest.MonkeyPatch,
    deleted: int,
) -> None:
    """The live index takes writes during a reshard. Documents deleted below the read's offset
    between two page reads move every later one down; each page overlaps the last documents
    read, so none is skipped. Past the overlap, the shard is read again from its start. (Miroir
    deletes them from the shadow as well; the test does so after the backfill.)"""
    topo = local_topology(tmp_path / "nodes", 2, [["n0"]])
    live = opened(topo)
    docs = make_docs(3000, int_ids=True)
    load_live(topo, live, "books", docs)
    shadow_topo = local_topology(tmp_path / "nodes", 3, [["m0"]])
    shadow = opened(shadow_topo)
    planned = plan_reshard(
        store, ReshardRequest(index_uid="books", new_shards=3, shards_per_chunk=2), topo, live, SETTINGS,
        new_topology=shadow_topo, shadow_targets=shadow,
    )  # fmt: skip
    node = live["n0"]
    real = node.fetch_shard
    reads, gone = [0], []

    def fetch(index_uid: str, shard: int, offset: int, limit: int) -> list[bytes]:
        reads[0] += shard == 0
        if shard == 0 and reads[0] == 3:  # before shard 0's third page: a live delete below it
            gone.extend(orjson.loads(d)["id"] for d in real(index_uid, 0, 0, deleted))
            node.delete_documents(index_uid, [str(k) for k in gone])
        return real(index_uid, shard, offset, limit)

    monkeypatch.setattr(node, "fetch_shard", fetch)
    (report,) = run_backfill(store, live, shadow, PipelineSettings(allowed_roots=["/"], batch_size=200))
    assert len(gone) == deleted
    shadow["m0"].delete_documents(planned.shadow_uid, [str(k) for k in gone])
    left = [d for d in docs if d["id"] not in set(gone)]
    assert_exact_placement(planned.shadow_topology, shadow, planned.shadow_uid, left)
    result = verify_shadow(topo, live, planned.shadow_topology, shadow, "books", planned.shadow_uid, "id")
    assert result.passed, result.summary()
    # Within the overlap every document was read once; beyond it, shard 0 was read again after
    # the delete, and what its first pass counted was taken back.
    assert report.documents == (3000 if deleted < READ_OVERLAP_DOCS else 3000 - deleted)
    if deleted >= READ_OVERLAP_DOCS:  # read once more, whole: the counts are what the shadow holds
        assert result.shadow_per_node == store.parent_summary(planned.parent.id).progress["per_node"]


def test_a_resumed_cursor_overlaps_the_documents_read_before_it(
    tmp_path: Path, store: JobStore, opened: Callable[[Topology], dict[str, NodeTarget]]
) -> None:
    """A chunk handed back mid-shard keeps the keys its next page overlaps in its progress: live
    deletes below the cursor while it waits do not make the resumed read skip documents."""
    topo = local_topology(tmp_path / "nodes", 2, [["n0"]])
    live = opened(topo)
    docs = make_docs(3000, int_ids=True)
    load_live(topo, live, "books", docs)
    planned = plan_reshard(store, ReshardRequest(index_uid="books", new_shards=3, shards_per_chunk=2), topo, live, SETTINGS)
    settings = PipelineSettings(allowed_roots=["/"], batch_size=200, memory_buffer_bytes=64 * 1024, batch_bytes=64 * 1024)
    progress = _drain_mid_shard(store, live, live, settings, 400)
    shard, offset = parse_cursor(progress["last_cursor"])
    assert shard == 0 and offset >= 400 and len(progress["tail_keys"]) == READ_OVERLAP_DOCS
    gone = [orjson.loads(d)["id"] for d in live["n0"].fetch_shard("books", 0, 0, 10)]
    live["n0"].delete_documents("books", [str(k) for k in gone])
    (report,) = run_backfill(store, live, live, settings)
    assert report.resumed_from == progress["last_cursor"] and report.documents == 3000
    live["n0"].delete_documents(planned.shadow_uid, [str(k) for k in gone])
    left = [d for d in docs if d["id"] not in set(gone)]
    assert_exact_placement(planned.shadow_topology, live, planned.shadow_uid, left)


def test_a_shard_whose_deletes_outrun_the_read_fails_the_attempt_retryably(
    tmp_path: Path,
    store: JobStore,
    opened: Callable[[Topology], dict[str, NodeTarget]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """More than the overlap deleted below the offset before every page: the read starts the
    shard over a bounded number of times, then fails the attempt (retried later), naming the
    shard, the node and what to do."""
    topo = local_topology(tmp_path / "nodes", 1, [["n0"]])
    live = opened(topo)
    load_live(topo, live, "books", make_docs(3000, int_ids=True))
    plan_reshard(store, ReshardRequest(index_uid="books", new_shards=2), topo, live, SETTINGS)
    node = live["n0"]
    real = node.fetch_shard

    def fetch(index_uid: str, shard: int, offset: int, limit: int) -> list[bytes]:
        if offset:  # a live bulk delete below every page after the first
            first = [str(orjson.loads(d)["id"]) for d in real(index_uid, shard, 0, READ_OVERLAP_DOCS + 1)]
            node.delete_documents(index_uid, first)
        return real(index_uid, shard, offset, limit)

    monkeypatch.setattr(node, "fetch_shard", fetch)
    lease = store.claim(["reshard_backfill"], "w1", 30)
    assert lease is not None
    with pytest.raises(TargetError, match=r"shard 0: lost its place 3 times on node n0.*pause bulk deletes") as info:
        process_reshard_chunk(store, lease, live, live, PipelineSettings(allowed_roots=["/"], batch_size=200))
    assert info.value.retryable
    assert store.get(lease.job_id).state == JobState.QUEUED


# -- verification failures name the keys ---------------------------------------------------------


@pytest.fixture
def backfilled(
    tmp_path: Path, store: JobStore, opened: Callable[[Topology], dict[str, NodeTarget]]
) -> tuple[Topology, dict[str, NodeTarget], PlannedReshard, list[dict[str, Any]]]:
    topo = local_topology(tmp_path / "nodes", 8, [["n0", "n1", "n2"]])
    live = opened(topo)
    docs = make_docs(1500, int_ids=False)
    load_live(topo, live, "books", docs)
    planned = plan_reshard(store, ReshardRequest(index_uid="books", new_shards=5), topo, live, SETTINGS)
    run_backfill(store, live, live)
    assert verify_shadow(topo, live, planned.shadow_topology, live, "books", planned.shadow_uid, "id").passed
    return topo, live, planned, docs


def _home_and_stranger(topo: Topology, pk: str, shards: int) -> tuple[str, str]:
    home = write_targets(shard_for_key(pk, shards), topo)[0]
    stranger = next(n.id for n in topo.all_nodes() if n.id not in write_targets(shard_for_key(pk, shards), topo))
    return home, stranger


def test_check_fails_naming_a_deleted_document(backfilled: Any) -> None:
    topo, live, planned, docs = backfilled
    pk = docs[42]["id"]
    home, _ = _home_and_stranger(planned.shadow_topology, pk, 5)
    live[home].delete_documents(planned.shadow_uid, [pk])
    r = verify_shadow(topo, live, planned.shadow_topology, live, "books", planned.shadow_uid, "id")
    assert not r.passed
    assert r.missing == [pk] and r.missing_count == 1
    assert (r.extra, r.altered, r.misplaced) == ([], [], [])
    assert pk in r.summary()


def test_check_fails_naming_an_altered_document(backfilled: Any) -> None:
    topo, live, planned, docs = backfilled
    pk = docs[7]["id"]
    shard = shard_for_key(pk, 5)
    home, _ = _home_and_stranger(planned.shadow_topology, pk, 5)
    changed = {**docs[7], "title": "tampered", SHARD_FIELD: shard}
    live[home].write_documents(planned.shadow_uid, "id", orjson.dumps(changed) + b"\n", 1)
    r = verify_shadow(topo, live, planned.shadow_topology, live, "books", planned.shadow_uid, "id")
    assert not r.passed
    assert r.altered == [pk] and (r.missing, r.extra, r.misplaced) == ([], [], [])


def test_check_fails_naming_a_document_on_a_wrong_node(backfilled: Any) -> None:
    topo, live, planned, docs = backfilled
    pk = docs[99]["id"]
    shard = shard_for_key(pk, 5)
    home, stranger = _home_and_stranger(planned.shadow_topology, pk, 5)
    line = orjson.dumps({**docs[99], SHARD_FIELD: shard}) + b"\n"
    live[stranger].write_documents(planned.shadow_uid, "id", line, 1)
    r = verify_shadow(topo, live, planned.shadow_topology, live, "books", planned.shadow_uid, "id")
    assert not r.passed
    assert r.misplaced == [pk] and (r.missing, r.extra, r.altered) == ([], [], [])
    assert stranger in r.misplaced_detail[0] and home in r.misplaced_detail[0]
    # Moved rather than copied: still misplaced, and not missing.
    live[home].delete_documents(planned.shadow_uid, [pk])
    r = verify_shadow(topo, live, planned.shadow_topology, live, "books", planned.shadow_uid, "id")
    assert r.misplaced == [pk] and r.missing == []


def test_check_fails_on_a_wrong_shard_tag_and_on_an_extra_document(backfilled: Any) -> None:
    topo, live, planned, docs = backfilled
    pk = docs[3]["id"]
    shard = shard_for_key(pk, 5)
    home, _ = _home_and_stranger(planned.shadow_topology, pk, 5)
    live[home].write_documents(
        planned.shadow_uid, "id", orjson.dumps({**docs[3], SHARD_FIELD: (shard + 1) % 5}) + b"\n", 1
    )
    extra = {"id": "not-in-live", "title": "x", SHARD_FIELD: shard_for_key("not-in-live", 5)}
    extra_home = write_targets(extra[SHARD_FIELD], planned.shadow_topology)[0]
    live[extra_home].write_documents(planned.shadow_uid, "id", orjson.dumps(extra) + b"\n", 1)
    r = verify_shadow(topo, live, planned.shadow_topology, live, "books", planned.shadow_uid, "id")
    assert not r.passed
    assert r.misplaced == [pk] and SHARD_FIELD in r.misplaced_detail[0]
    assert r.extra == ["not-in-live"] and r.altered == [] and r.missing == []


def test_examples_are_capped_but_counts_are_full(backfilled: Any) -> None:
    topo, live, planned, docs = backfilled
    for node in live.values():
        node.delete_documents(planned.shadow_uid, [d["id"] for d in docs[:50]])
    r = verify_shadow(topo, live, planned.shadow_topology, live, "books", planned.shadow_uid, "id", max_examples=20)
    assert r.missing_count == 50 and len(r.missing) == 20
    assert set(r.missing) <= {d["id"] for d in docs[:50]}


# -- edge cases -----------------------------------------------------------------------------------


def test_empty_shards_and_ranges_past_the_last_document(
    tmp_path: Path, store: JobStore, opened: Callable[[Topology], dict[str, NodeTarget]]
) -> None:
    topo = local_topology(tmp_path / "nodes", 16, [["n0", "n1"]])
    live = opened(topo)
    # Three documents: most shards are empty, and some chunk ranges hold no document at all.
    docs = make_docs(3, int_ids=True)
    load_live(topo, live, "books", docs)
    used = [shard_for_key(d["id"], 16) for d in docs]
    planned = plan_reshard(
        store, ReshardRequest(index_uid="books", new_shards=32, shards_per_chunk=4), topo, live, SETTINGS
    )
    reports = run_backfill(store, live, live)
    assert len(reports) == 4
    for r in reports:
        assert r.documents == sum(1 for s in used if r.shard_start <= s < r.shard_end)
    assert any(r.documents == 0 for r in reports), "expected at least one range with no document"
    assert store.parent_summary(planned.parent.id).parent.state == JobState.COMPLETED
    assert_exact_placement(planned.shadow_topology, live, planned.shadow_uid, docs)
    assert verify_shadow(topo, live, planned.shadow_topology, live, "books", planned.shadow_uid, "id").passed


def test_empty_live_index_backfills_nothing_and_verifies(
    tmp_path: Path, store: JobStore, opened: Callable[[Topology], dict[str, NodeTarget]]
) -> None:
    topo = local_topology(tmp_path / "nodes", 4, [["n0"]])
    live = opened(topo)
    load_live(topo, live, "books", [])
    planned = plan_reshard(store, ReshardRequest(index_uid="books", new_shards=2), topo, live, SETTINGS)
    assert [r.documents for r in run_backfill(store, live, live)] == [0]
    r = verify_shadow(topo, live, planned.shadow_topology, live, "books", planned.shadow_uid, "id")
    assert r.passed and r.live_documents == r.shadow_documents == 0


# -- Dagster: plan job, chunk runs, blocking check, cutover ---------------------------------------


def _defs() -> dg.Definitions:
    from miroir_pipeline.dagster import miroir_definitions

    return miroir_definitions()


def _plan_and_backfill(defs: dg.Definitions, store: JobStore, instance: dg.DagsterInstance, uid: str) -> str:
    """Plan a reshard of ``uid`` to 4 shards and run every chunk; the parent job id."""
    from miroir_pipeline.dagster import MiroirNames

    names = MiroirNames()
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    plan = defs.resolve_job_def(names.plan_reshard_job).execute_in_process(
        run_config={"ops": {names.plan_reshard_op: {"config": {"index_uid": uid, "new_shards": 4}}}, **quiet},
        instance=instance,
    )
    parent: str = plan.output_for_node(names.plan_reshard_op)
    chunk_job = defs.resolve_job_def(names.chunk_job("reshard_backfill"))
    for chunk in store.children(parent):
        assert chunk_job.execute_in_process(instance=instance, partition_key=chunk.id, run_config=quiet).success
    return parent


def _verify_job() -> dg.JobDefinition:
    """The verify job, reconstructable (a re-execution is launched from it)."""
    from miroir_pipeline.dagster import MiroirNames

    return _defs().resolve_job_def(MiroirNames().reshard_verify_job)


def test_dagster_plan_backfill_blocking_check_and_cutover(
    tmp_path: Path,
    store: JobStore,
    opened: Callable[[Topology], dict[str, NodeTarget]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from miroir_pipeline.dagster import MiroirNames
    from miroir_pipeline.dagster.reshard_assets import latest_verification

    topo = local_topology(tmp_path / "nodes", 16, [["n0", "n1", "n2"]])
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(topo.model_dump(mode="json", exclude_none=True)))
    monkeypatch.setenv("MIROIR_TOPOLOGY", str(tmp_path / "topology.yaml"))
    monkeypatch.setenv("MIROIR_JOBS_DSN", f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    live = opened(topo)
    docs = make_docs(2000, int_ids=True)
    load_live(topo, live, "books", docs)
    defs = _defs()
    names = MiroirNames()
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    with dg.instance_for_test() as instance:
        plan = defs.resolve_job_def(names.plan_reshard_job).execute_in_process(
            run_config={"ops": {names.plan_reshard_op: {"config": {"index_uid": "books", "new_shards": 8}}}, **quiet},
            instance=instance,
        )
        parent_id = plan.output_for_node(names.plan_reshard_op)
        partitions = instance.get_dynamic_partitions(names.partitions("reshard_backfill"))
        assert sorted(partitions) == [c.id for c in store.children(parent_id)] and len(partitions) == 2

        shadow_cfg = {"ops": {names.reshard_shadow_op: {"config": {"parent_job_id": parent_id}}}, **quiet}
        early = defs.resolve_job_def(names.reshard_verify_job).execute_in_process(
            run_config=shadow_cfg, instance=instance, raise_on_error=False
        )
        assert not early.success, "the shadow must not be recorded before the backfill completed"

        chunk_job = defs.resolve_job_def(names.chunk_job("reshard_backfill"))
        for key in partitions:
            run = chunk_job.execute_in_process(instance=instance, partition_key=key, run_config=quiet)
            assert run.success
            meta = run.asset_materializations_for_node(names.chunk_op("reshard_backfill"))[0].metadata
            assert meta["documents"].value > 0
        again = chunk_job.execute_in_process(instance=instance, partition_key=partitions[0], run_config=quiet)
        assert again.asset_materializations_for_node(names.chunk_op("reshard_backfill"))[0].metadata["noop"].value is True

        ok = defs.resolve_job_def(names.reshard_verify_job).execute_in_process(run_config=shadow_cfg, instance=instance)
        assert ok.success
        materialized = {e.asset_key.path[-1] for e in ok.get_asset_materialization_events() if e.asset_key}
        assert materialized == {"reshard_shadow", "reshard_cutover"}
        passed, _, check_meta = latest_verification(instance)
        assert passed and check_meta["shadow_documents"] == 2000

        # Break the shadow: the blocking check fails, names the key, and cutover does not run.
        pk = docs[11]["id"]
        home = write_targets(shard_for_key(pk, 8), topo)[0]
        live[home].delete_documents("books__reshard_8", [str(pk)])
        bad = defs.resolve_job_def(names.reshard_verify_job).execute_in_process(
            run_config=shadow_cfg, instance=instance, raise_on_error=False
        )
        assert not bad.success
        evaluations = [e for e in bad.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"]
        assert len(evaluations) == 1 and not evaluations[0].event_specific_data.passed
        assert not [
            e for e in bad.get_asset_materialization_events() if e.asset_key and e.asset_key.path[-1] == "reshard_cutover"
        ]
        passed, why, check_meta = latest_verification(instance)
        assert not passed and check_meta["missing_count"] == 1
        assert check_meta["divergences"]["missing"] == [str(pk)] and str(pk) in why

        # Cutover on its own also refuses while the latest evaluation failed.
        cutover = defs.get_assets_def(names.reshard_cutover_key)
        alone = dg.materialize([cutover], instance=instance, raise_on_error=False)
        assert not alone.success


def test_each_verify_run_reports_its_own_reshard_not_the_latest_one(
    tmp_path: Path,
    store: JobStore,
    opened: Callable[[Topology], dict[str, NodeTarget]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two reshards verified one after the other (or at once, from two terminals): the first
    run's outcome, read after the second finished, is still the first reshard's, and the
    cutover of a verify run records that run's own shadow."""
    from miroir_pipeline.dagster import MiroirNames
    from miroir_pipeline.dagster.reshard_assets import latest_verification

    topo = local_topology(tmp_path / "nodes", 16, [["n0", "n1"]])
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(topo.model_dump(mode="json", exclude_none=True)))
    monkeypatch.setenv("MIROIR_TOPOLOGY", str(tmp_path / "topology.yaml"))
    monkeypatch.setenv("MIROIR_JOBS_DSN", f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    live = opened(topo)
    docs = {"books": make_docs(300, int_ids=True), "films": make_docs(200, int_ids=False)}
    for uid, batch in docs.items():
        load_live(topo, live, uid, batch)
    defs = _defs()
    names = MiroirNames()
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    verify_job = defs.resolve_job_def(names.reshard_verify_job)
    chunk_job = defs.resolve_job_def(names.chunk_job("reshard_backfill"))
    with dg.instance_for_test() as instance:
        parents = {}
        for uid in docs:
            plan = defs.resolve_job_def(names.plan_reshard_job).execute_in_process(
                run_config={"ops": {names.plan_reshard_op: {"config": {"index_uid": uid, "new_shards": 4}}}, **quiet},
                instance=instance,
            )
            parents[uid] = plan.output_for_node(names.plan_reshard_op)
            for chunk in store.children(parents[uid]):
                assert chunk_job.execute_in_process(instance=instance, partition_key=chunk.id, run_config=quiet).success
        # The films shadow loses a document: its verification fails.
        pk = str(docs["films"][5]["id"])
        for node in write_targets(shard_for_key(pk, 4), topo):
            live[node].delete_documents("films__reshard_4", [pk])

        def verify(uid: str) -> dg.ExecuteInProcessResult:
            config = {"ops": {names.reshard_shadow_op: {"config": {"parent_job_id": parents[uid]}}}, **quiet}
            return verify_job.execute_in_process(run_config=config, instance=instance, raise_on_error=False)

        books, films = verify("books"), verify("films")
        assert books.success and not films.success
        passed, why, meta = latest_verification(instance, run_id=books.run_id)
        assert passed, why
        assert meta["parent_job_id"] == parents["books"] and meta["shadow_documents"] == 300
        passed, why, meta = latest_verification(instance, run_id=films.run_id)
        assert not passed and meta["parent_job_id"] == parents["films"] and meta["missing_count"] == 1
        cutover = books.asset_materializations_for_node(names.op_name(names.reshard_cutover_key))[0].metadata
        assert cutover["parent_job_id"].value == parents["books"]



def test_a_re_executed_cutover_records_the_shadow_of_the_run_it_re_executes(
    tmp_path: Path,
    store: JobStore,
    opened: Callable[[Topology], dict[str, NodeTarget]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Re-executing the cutover step of a verify run (from the UI, after another reshard's
    verify run): the re-execution materializes no shadow of its own, and the cutover used to
    take the latest shadow, recording the other reshard as ready for cutover."""
    from miroir_pipeline.dagster import MiroirNames
    from miroir_pipeline.dagster.reshard_assets import latest_verification

    topo = local_topology(tmp_path / "nodes", 8, [["n0", "n1"]])
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(topo.model_dump(mode="json", exclude_none=True)))
    monkeypatch.setenv("MIROIR_TOPOLOGY", str(tmp_path / "topology.yaml"))
    monkeypatch.setenv("MIROIR_JOBS_DSN", f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    live = opened(topo)
    docs = {"books": make_docs(120, int_ids=True), "films": make_docs(80, int_ids=False)}
    for uid, batch in docs.items():
        load_live(topo, live, uid, batch)
    defs = _defs()
    names = MiroirNames()
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    cutover_step = names.op_name(names.reshard_cutover_key)
    with dg.instance_for_test() as instance:
        runs = {}
        for uid in docs:
            parent = _plan_and_backfill(defs, store, instance, uid)
            config = {"ops": {names.reshard_shadow_op: {"config": {"parent_job_id": parent}}}, **quiet}
            with dg.execute_job(dg.reconstructable(_verify_job), instance, run_config=config) as verified:
                assert verified.success
                runs[uid] = (verified.run_id, parent, config)

        books_run, books_parent, books_config = runs["books"]
        with dg.execute_job(
            dg.reconstructable(_verify_job),
            instance,
            run_config=books_config,  # a re-execution keeps its parent run's config
            reexecution_options=dg.ReexecutionOptions(parent_run_id=books_run, step_selection=[cutover_step]),
        ) as again:
            assert again.success
            assert again.dagster_run.parent_run_id == books_run
            [cutover] = [
                e for e in again.get_asset_materialization_events()
                if e.asset_key and e.asset_key == names.reshard_cutover_key
            ]  # fmt: skip
            metadata = cutover.materialization.metadata
            assert metadata["parent_job_id"].value == books_parent
            assert metadata["index_uid"].value == "books"
            passed, why, meta = latest_verification(instance, run_id=again.run_id)
            assert passed, why
            assert meta["parent_job_id"] == books_parent and meta["shadow_documents"] == 120


def test_a_re_executed_check_never_makes_a_failed_reshard_read_as_verified(
    tmp_path: Path,
    store: JobStore,
    opened: Callable[[Topology], dict[str, NodeTarget]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """books verifies, then films fails its check; re-executing only the check step of the
    books run must not leave the latest verification reading as passed. (Dagster records an
    evaluation against the latest shadow, films': checking books' shadow there made films
    read as verified.)"""
    from miroir_pipeline.dagster import MiroirNames
    from miroir_pipeline.dagster.reshard_assets import latest_verification

    topo = local_topology(tmp_path / "nodes", 8, [["n0", "n1"]])
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(topo.model_dump(mode="json", exclude_none=True)))
    monkeypatch.setenv("MIROIR_TOPOLOGY", str(tmp_path / "topology.yaml"))
    monkeypatch.setenv("MIROIR_JOBS_DSN", f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    live = opened(topo)
    docs = {"books": make_docs(120, int_ids=True), "films": make_docs(80, int_ids=False)}
    for uid, batch in docs.items():
        load_live(topo, live, uid, batch)
    defs = _defs()
    names = MiroirNames()
    quiet = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    check_step = names.op_name(names.reshard_shadow_key) + "_" + names.shadow_check_name
    with dg.instance_for_test() as instance:
        runs = {}
        for uid in docs:
            parent = _plan_and_backfill(defs, store, instance, uid)
            if uid == "films":  # the live index loses documents after the backfill: check fails
                for target in live.values():
                    target.delete_documents("films", [str(d["id"]) for d in docs["films"][:3]])
            config = {"ops": {names.reshard_shadow_op: {"config": {"parent_job_id": parent}}}, **quiet}
            with dg.execute_job(dg.reconstructable(_verify_job), instance, run_config=config, raise_on_error=False) as v:
                assert v.success == (uid == "books")
                steps = {e.step_key for e in v.all_events if e.step_key}
                runs[uid] = (v.run_id, config)
        assert check_step in steps, steps
        books_run, books_config = runs["books"]
        with dg.execute_job(
            dg.reconstructable(_verify_job),
            instance,
            run_config=books_config,
            raise_on_error=False,
            reexecution_options=dg.ReexecutionOptions(parent_run_id=books_run, step_selection=[check_step]),
        ):
            pass
        passed, why, meta = latest_verification(instance)  # what a cutover materialized alone reads
        assert not passed, f"a failed reshard reads as verified: {why} {meta.get('parent_job_id')}"


def test_the_reshard_command_does_not_call_a_shadow_ready_when_its_cutover_failed(
    tmp_path: Path,
    store: JobStore,
    opened: Callable[[Topology], dict[str, NodeTarget]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The shadow passes its check, but recording it as ready for cutover fails (the Dagster
    instance's storage failed under it): the command reports the check as passed, says the
    shadow is NOT ready, how to record it again, and exits 1."""
    from miroir_pipeline.cli import reshard_cmd
    from miroir_pipeline.dagster import reshard_assets

    topo = local_topology(tmp_path / "nodes", 8, [["n0", "n1"]])
    (tmp_path / "topology.yaml").write_text(yaml.safe_dump(topo.model_dump(mode="json", exclude_none=True)))
    monkeypatch.setenv("MIROIR_TOPOLOGY", str(tmp_path / "topology.yaml"))
    monkeypatch.setenv("MIROIR_JOBS_DSN", f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    load_live(topo, opened(topo), "books", make_docs(120, int_ids=True))
    real_latest_shadow = reshard_assets._latest_shadow

    # FAKE: the instance's storage failing inside the cutover step alone (the only caller that
    # names its run), which cannot be timed from outside.
    def storage_fails_in_the_cutover(instance: Any, names: Any, run_id: str | None = None) -> Any:
        if run_id is not None:
            raise OSError("event log storage unavailable")
        return real_latest_shadow(instance, names, run_id)

    with dg.instance_for_test() as instance:
        parent = _plan_and_backfill(_defs(), store, instance, "books")
        monkeypatch.setattr(reshard_assets, "_latest_shadow", storage_fails_in_the_cutover)
        result: dict[str, Any] = {"per_node": {}}
        ok = reshard_cmd._verify(parent, instance, result)
    assert not ok
    assert result["verification"] == "passed" and result["ready_for_cutover"] is False
    assert "event log storage unavailable" in result["error"]
    assert f"miroir-pipeline reshard --resume {parent}" in result["error"]
    reshard_cmd._print_summary(
        {**result, "job_id": parent, "index": "books", "old_shards": 8, "new_shards": 4, "shadow_index": "x",
         "state": "completed", "documents": 120, "chunks_completed": 1, "chunks": 1, "backfill_s": 1,
         "docs_per_s": 1, "failed_chunks": []}
    )
    out = capsys.readouterr().out
    assert "ready for cutover in Miroir" not in out and "NOT recorded as ready for cutover" in out
