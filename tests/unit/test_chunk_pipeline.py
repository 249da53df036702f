"""The acknowledged-prefix rule of the chunk pipeline: with a window of batches in flight, a
cursor is committed only for batches that every node acknowledged, in order, whatever order
the nodes' acknowledgements arrive in; a failed write stops the window and the cursor never
passes it.

The nodes here are scripted stand-ins: the order in which real Meilisearch nodes finish tasks
cannot be chosen from outside, and that order is exactly what these tests vary. Everything
else (the SQLite job store, the lease, the fence) is real; the same rule is exercised against
real Meilisearch nodes in the failure suite.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from miroir_pipeline.fleet.targets.base import (
    NodeTarget,
    PendingWrite,
    RefusedDocument,
    TargetError,
    send_guard,
)
from miroir_pipeline.jobs.pipeline import Batch, run_batches
from miroir_pipeline.queue import JobStore, open_store
from miroir_pipeline.queue.contract import JobState, Lease, NewChunk
from miroir_pipeline.queue.lease import LeaseKeeper
from miroir_pipeline.queue.shutdown import ChunkHandedBack, Shutdown

BATCHES = 12


class ScriptedWrite(PendingWrite):
    def __init__(self, node: ScriptedNode, batch: int) -> None:
        self.node, self.batch = node, batch
        self.acked = threading.Event()
        self.error: TargetError | None = None

    def check(self) -> bool:
        with self.node.polled:
            self.node.polls += 1
            self.node.polled.notify_all()
        if self.error is not None:
            raise self.error
        return self.acked.is_set()


class ScriptedNode(NodeTarget):
    """Accepts every batch at once and acknowledges it when the test says so."""

    def __init__(self, node_id: str, polled: threading.Condition | None = None) -> None:
        self.node_id = node_id
        self.writes: dict[int, ScriptedWrite] = {}
        self.polls = 0
        self.polled = polled or threading.Condition()  # shared by the nodes of one test
        self.sent = threading.Condition()

    def enqueue_routed(self, index_uid: str, primary_key: str, lines: Sequence[bytes], keys: Sequence[Any], shards: Sequence[int], *, checked: bool = False) -> PendingWrite:
        batch = int(keys[0])
        write = ScriptedWrite(self, batch)
        with self.sent:
            self.writes[batch] = write
            self.sent.notify_all()
        return write

    def write_documents(self, *a: Any, **k: Any) -> None:
        raise AssertionError("the pipeline must enqueue, not write synchronously")

    def ensure_index(self, *a: Any, **k: Any) -> None: ...
    def index_exists(self, index_uid: str) -> bool:
        return True
    def get_primary_key(self, index_uid: str) -> str | None:
        return "id"
    def get_settings(self, index_uid: str) -> dict[str, Any]:
        return {}
    def fetch_shard(self, *a: Any) -> list[bytes]:
        return []
    def iter_documents(self, *a: Any, **k: Any) -> Iterator[bytes]:
        return iter(())
    def count_documents(self, index_uid: str) -> int:
        return 0
    def count_by_shard(self, index_uid: str) -> dict[int, int]:
        return {}
    def delete_documents(self, *a: Any) -> None: ...
    def delete_index(self, index_uid: str) -> None: ...


class RecordingStore:
    """The real store, with every committed cursor checked against what the nodes acknowledged
    at that moment."""

    def __init__(self, store: JobStore, nodes: list[ScriptedNode]) -> None:
        self.store, self.nodes = store, nodes
        self.cursors: list[int] = []

    def save_progress(self, lease: Lease, progress: dict[str, Any]) -> Any:
        cursor = int(progress["last_cursor"])
        for node in self.nodes:
            for b in range(cursor):
                write = node.writes.get(b)
                assert write is not None and write.acked.is_set(), f"cursor {cursor} committed before {node.node_id} acknowledged batch {b}"
        self.cursors.append(cursor)
        return self.store.save_progress(lease, progress)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def batches(n: int, nodes: int) -> Iterator[Batch]:
    for b in range(n):
        yield Batch(
            lines=[[b'{"id":%d}' % b]] * nodes,
            keys=[[b]] * nodes,
            shards=[[0]] * nodes,
            progress={"last_cursor": b + 1},
            position=f"batch {b + 1}",
            final=b == n - 1,
        )


def lease_one_chunk(tmp_path: Path, *, ttl: float, interval: float) -> tuple[JobStore, LeaseKeeper]:
    """A SQLite job store with one chunk, claimed, and the heartbeat holding it."""
    store = open_store(f"sqlite:///{tmp_path}/jobs.sqlite3")
    parent = store.enqueue("dump_import", {})
    store.split(parent.id, [NewChunk(0, {})])
    lease = store.claim(["dump_import"], "w", ttl)
    assert lease is not None
    return store, LeaseKeeper(store, lease, ttl=ttl, interval=interval).start()


@pytest.fixture
def leased(tmp_path: Path) -> Iterator[tuple[JobStore, LeaseKeeper]]:
    store, keeper = lease_one_chunk(tmp_path, ttl=60, interval=20)
    yield store, keeper
    keeper.stop()
    store.close()


def release_in_random_order(nodes: list[ScriptedNode], seed: int, fail: tuple[int, int] | None = None) -> threading.Thread:
    """Acknowledge every (node, batch) in a seeded random order, each only after the pipeline
    polled since the previous one (so commits interleave with acknowledgements)."""
    order = [(n, b) for n in range(len(nodes)) for b in range(BATCHES)]
    random.Random(seed).shuffle(order)

    def run() -> None:
        for n, b in order:
            node = nodes[n]
            with node.sent:
                node.sent.wait_for(lambda node=node, b=b: b in node.writes, timeout=30)
            total = sum(x.polls for x in nodes)
            with node.polled:
                node.polled.wait_for(lambda total=total: sum(x.polls for x in nodes) > total, timeout=30)
            write = node.writes[b]
            if fail == (n, b):
                write.error = TargetError(f"node {node.node_id}: task for batch {b} failed", node_id=node.node_id)
                continue
            write.acked.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("seed", range(6))
def test_cursor_commits_only_the_acknowledged_prefix_in_order(leased: tuple[JobStore, LeaseKeeper], seed: int) -> None:
    store, keeper = leased
    polled = threading.Condition()
    nodes = [ScriptedNode("a", polled), ScriptedNode("b", polled)]
    recording = RecordingStore(store, nodes)
    releaser = release_in_random_order(nodes, seed)
    run_batches(recording, keeper, nodes, "idx", "id", batches(BATCHES, 2), Shutdown(), window_bytes=1 << 30)  # type: ignore[arg-type]
    releaser.join(timeout=30)
    assert recording.cursors == sorted(set(recording.cursors)), "cursors go forward, each once"
    assert recording.cursors[-1] == BATCHES
    assert store.get(keeper.lease.job_id).progress["last_cursor"] == BATCHES
    # The window really was used: batches were sent before earlier ones were acknowledged.
    assert len(nodes[0].writes) == BATCHES


@pytest.mark.parametrize("seed", range(3))
def test_a_failed_write_stops_the_window_and_the_cursor_never_passes_it(leased: tuple[JobStore, LeaseKeeper], seed: int) -> None:
    store, keeper = leased
    polled = threading.Condition()
    nodes = [ScriptedNode("a", polled), ScriptedNode("b", polled)]
    recording = RecordingStore(store, nodes)
    failing = (1, 5)  # node b, batch 5
    releaser = release_in_random_order(nodes, seed, fail=failing)
    with pytest.raises(TargetError, match="batch 5 failed"):
        run_batches(recording, keeper, nodes, "idx", "id", batches(BATCHES, 2), Shutdown(), window_bytes=1 << 30)  # type: ignore[arg-type]
    releaser.join(timeout=30)
    committed = int(store.get(keeper.lease.job_id).progress.get("last_cursor", 0))
    # Batches 0-4 were acknowledged everywhere and committed; batch 5 never is.
    assert committed == 5, f"the cursor should stop right before the failed batch 5: {committed}"


def test_without_a_window_one_batch_is_in_flight_while_the_next_is_routed(leased: tuple[JobStore, LeaseKeeper]) -> None:
    store, keeper = leased
    nodes = [ScriptedNode("a")]
    in_flight_at_send: list[int] = []

    def watched() -> Iterator[Batch]:
        for batch in batches(BATCHES, 1):
            in_flight_at_send.append(sum(1 for w in nodes[0].writes.values() if not w.acked.is_set()))
            yield batch

    def ack_all() -> None:
        for b in range(BATCHES):
            with nodes[0].sent:
                nodes[0].sent.wait_for(lambda b=b: b in nodes[0].writes, timeout=30)
            nodes[0].writes[b].acked.set()

    thread = threading.Thread(target=ack_all, daemon=True)
    thread.start()
    run_batches(store, keeper, nodes, "idx", "id", watched(), Shutdown(), window_bytes=0)
    thread.join(timeout=30)
    assert max(in_flight_at_send) <= 1, in_flight_at_send
    assert store.get(keeper.lease.job_id).progress["last_cursor"] == BATCHES


@pytest.mark.timeout(60)
def test_a_drain_stops_waiting_on_the_window_and_hands_back_at_the_acknowledged_prefix(
    leased: tuple[JobStore, LeaseKeeper],
) -> None:
    """A node that does not acknowledge (here: batch 3, never) cannot hold a drain: the wait on
    the window gives up, nothing more is sent, and the chunk is handed back at the prefix every
    node acknowledged, named in the message."""
    store, keeper = leased
    node = ScriptedNode("a")
    shutdown = Shutdown()

    def ack_three_then_drain() -> None:
        for b in range(3):
            with node.sent:
                node.sent.wait_for(lambda b=b: b in node.writes, timeout=30)
            node.writes[b].acked.set()
        with node.sent:
            node.sent.wait_for(lambda: 3 in node.writes, timeout=30)
        polls = node.polls
        with node.polled:  # the pipeline is waiting on batch 3: it polled it since
            node.polled.wait_for(lambda: node.polls > polls + 1, timeout=30)
        shutdown.request("test drain")

    thread = threading.Thread(target=ack_three_then_drain, daemon=True)
    thread.start()
    with pytest.raises(ChunkHandedBack, match="handed back at batch 3: test drain"):
        run_batches(store, keeper, [node], "idx", "id", batches(BATCHES, 1), shutdown, window_bytes=0)
    thread.join(timeout=30)
    row = store.get(keeper.lease.job_id)
    assert (row.state, row.attempts, row.claimed_by) == (JobState.QUEUED, 0, None)
    assert row.progress["last_cursor"] == 3
    assert sorted(node.writes) == [0, 1, 2, 3], "nothing is sent after the drain"


class StuckNode(ScriptedNode):
    """Its first enqueue hangs until released (a send stuck in retries against a slow node)."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.entered = threading.Event()
        self.release = threading.Event()

    def enqueue_routed(self, index_uid: str, primary_key: str, lines: Sequence[bytes], keys: Sequence[Any], shards: Sequence[int], *, checked: bool = False) -> PendingWrite:
        if int(keys[0]) == 0:
            self.entered.set()
            self.release.wait(30)
        return super().enqueue_routed(index_uid, primary_key, lines, keys, shards, checked=checked)


@pytest.mark.timeout(60)
def test_a_worker_that_lost_its_lease_sends_nothing_more_from_its_window(tmp_path: Path) -> None:
    """The window holds batches queued behind a send that hangs; meanwhile the lease is lost
    (here: the chunk is cancelled, so the next renewal is refused). Once the send returns, not
    one more batch reaches the node: a newer holder's writes of the same documents must be the
    last ones, and the run ends with LeaseLost."""
    from miroir_pipeline.queue.contract import LeaseLost

    store, keeper = lease_one_chunk(tmp_path, ttl=30, interval=0.05)
    node = StuckNode("a")
    routed = threading.Event()

    def all_batches() -> Iterator[Batch]:
        for batch in batches(BATCHES, 1):
            batch.final = False  # so the pipeline asks for more after the last one was sent
            yield batch
        routed.set()  # every batch was handed to the window by now

    outcome: list[BaseException] = []

    def run() -> None:
        try:
            run_batches(store, keeper, [node], "idx", "id", all_batches(), Shutdown(), window_bytes=1 << 30)
        except BaseException as exc:
            outcome.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        assert node.entered.wait(30) and routed.wait(30), "every batch was queued behind the stuck send"
        store.cancel(keeper.lease.job_id, "taken away")
        deadline = time.monotonic() + 30
        while not keeper.lost:
            assert time.monotonic() < deadline, "the heartbeat never saw the lease go"
            time.sleep(0.01)
        node.release.set()
        runner.join(30)
        assert not runner.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], LeaseLost), outcome
        assert sorted(node.writes) == [0], f"batches sent after the lease was lost: {sorted(node.writes)[1:]}"
    finally:
        node.release.set()
        keeper.stop()
        store.close()



def run_in_thread(store: JobStore, keeper: LeaseKeeper, node: NodeTarget, shutdown: Shutdown, *, window_bytes: int) -> tuple[threading.Thread, list[BaseException]]:
    """The chunk's batches sent to ``node`` on a thread of their own; what the run raised."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            run_batches(store, keeper, [node], "idx", "id", iter(batches(BATCHES, 1)), shutdown, window_bytes=window_bytes)
        except BaseException as exc:
            outcome.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    return runner, outcome


class RetryingNode(ScriptedNode):
    """Its first enqueue fails every attempt, as a node answering 503 would, and retries with
    the node target's rule: the send guard is checked before every attempt. FAKE: stands in for
    a node failing a request for as long as the test needs."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.retrying = threading.Event()
        self.attempts = 0

    def enqueue_routed(self, index_uid: str, primary_key: str, lines: Sequence[bytes], keys: Sequence[Any], shards: Sequence[int], *, checked: bool = False) -> PendingWrite:
        deadline = time.monotonic() + 30
        while int(keys[0]) == 0 and time.monotonic() < deadline:
            send_guard()
            self.attempts += 1
            self.retrying.set()
            time.sleep(0.01)
        return super().enqueue_routed(index_uid, primary_key, lines, keys, shards, checked=checked)


@pytest.mark.timeout(60)
def test_a_send_inside_its_retries_stops_once_the_lease_is_lost(tmp_path: Path) -> None:
    """The first batch's send is retrying against a failing node when the lease is lost: its
    next attempt is not made, so it cannot land after a newer holder's write of it."""
    from miroir_pipeline.queue.contract import LeaseLost

    store, keeper = lease_one_chunk(tmp_path, ttl=30, interval=0.05)
    node = RetryingNode("a")
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            run_batches(store, keeper, [node], "idx", "id", iter(batches(BATCHES, 1)), Shutdown(), window_bytes=1 << 30)
        except BaseException as exc:
            outcome.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    try:
        assert node.retrying.wait(30)
        store.cancel(keeper.lease.job_id, "taken away")
        runner.join(30)
        assert not runner.is_alive(), "the send kept retrying after the lease was lost"
        assert len(outcome) == 1 and isinstance(outcome[0], LeaseLost), outcome
        assert not node.writes, "the retried batch landed after the lease was lost"
    finally:
        keeper.stop()
        store.close()


@pytest.mark.timeout(60)
def test_a_drain_stops_a_send_inside_its_retries_and_hands_back(leased: tuple[JobStore, LeaseKeeper]) -> None:
    """The first batch's send is retrying against a failing node (the whole retry budget is
    half a minute with a real node) when the worker is asked to drain: the send makes no
    further attempt and the chunk is handed back at once, its attempt given back."""
    store, keeper = leased
    node = RetryingNode("a")
    shutdown = Shutdown()
    runner, outcome = run_in_thread(store, keeper, node, shutdown, window_bytes=1 << 30)
    assert node.retrying.wait(30)
    shutdown.request("test drain")
    runner.join(20)
    assert not runner.is_alive(), "the drain waited for the send's retries"
    assert len(outcome) == 1 and isinstance(outcome[0], ChunkHandedBack), outcome
    assert not node.writes, "the retried batch was sent after the drain"
    row = store.get(keeper.lease.job_id)
    assert (row.state, row.attempts, row.claimed_by) == (JobState.QUEUED, 0, None)


class RefusingNode(ScriptedNode):
    """A node that refuses a document of batch 0 once the test says so (its task fails with an
    error about the documents), and whose synchronous rewrite during isolation keeps failing
    the way a node answering 503 does, retrying under the send guard. FAKE: which of a real
    node's tasks are still indexing, and for how long, cannot be chosen from outside."""

    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.rewriting = threading.Event()
        self.rewrites = 0

    def refusal_of(self, exc: TargetError) -> RefusedDocument | None:
        return RefusedDocument(0, str(exc)) if "refused" in str(exc) else None

    def write_routed(self, index_uid: str, primary_key: str, lines: Sequence[bytes], keys: Sequence[Any], shards: Sequence[int], *, checked: bool = False) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            send_guard()
            self.rewriting.set()
            time.sleep(0.01)
        self.rewrites += 1


def assert_handed_back_at_once(store: JobStore, keeper: LeaseKeeper, runner: threading.Thread, outcome: list[BaseException]) -> None:
    runner.join(20)
    assert not runner.is_alive(), "the drain waited for the refusal to be isolated"
    assert len(outcome) == 1 and isinstance(outcome[0], ChunkHandedBack), outcome
    row = store.get(keeper.lease.job_id)
    assert (row.state, row.attempts, row.claimed_by) == (JobState.QUEUED, 0, None)
    assert "last_cursor" not in row.progress, "nothing was acknowledged, nothing is committed"


@pytest.mark.timeout(60)
def test_a_drain_stops_waiting_for_later_batches_before_isolating_a_refusal(leased: tuple[JobStore, LeaseKeeper]) -> None:
    """Batch 0 is refused while the node is still indexing the batches queued after it, which
    isolation waits for before writing anything again. A drain then hands the chunk back at
    once, without waiting for the node and without rewriting anything."""
    store, keeper = leased
    node = RefusingNode("a")
    shutdown = Shutdown()
    runner, outcome = run_in_thread(store, keeper, node, shutdown, window_bytes=1 << 30)
    with node.sent:
        assert node.sent.wait_for(lambda: BATCHES - 1 in node.writes, timeout=30)
    polls = node.polls
    node.writes[0].error = TargetError("node a: task 0 failed: document refused", node_id="a")
    with node.polled:  # batch 0's refusal was seen, and isolation is polling batch 1
        assert node.polled.wait_for(lambda: node.polls > polls + 4, timeout=30)
    shutdown.request("test drain")
    assert_handed_back_at_once(store, keeper, runner, outcome)
    assert not node.rewriting.is_set(), "a batch was written again after the drain"


@pytest.mark.timeout(60)
def test_a_drain_stops_the_rewrite_that_isolates_a_refusal(leased: tuple[JobStore, LeaseKeeper]) -> None:
    """Batch 0 is refused and its rewrite (by halves, synchronously) is retrying against a
    failing node when the worker is asked to drain: the rewrite makes no further attempt and
    the chunk is handed back at once."""
    store, keeper = leased
    node = RefusingNode("a")
    shutdown = Shutdown()
    runner, outcome = run_in_thread(store, keeper, node, shutdown, window_bytes=0)
    with node.sent:
        assert node.sent.wait_for(lambda: 0 in node.writes, timeout=30)
    node.writes[0].error = TargetError("node a: task 0 failed: document refused", node_id="a")
    assert node.rewriting.wait(30)
    shutdown.request("test drain")
    assert_handed_back_at_once(store, keeper, runner, outcome)
    assert node.rewrites == 0
