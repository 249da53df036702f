"""The one chunk pipeline every job kind plugs into.

A kind supplies an iterator of :class:`Batch` es (documents routed per target node, plus the
progress that commits them); the pipeline owns the rest of the resume protocol:

1. each batch is handed to every target node as soon as it is routed, in order, so a node
   keeps a *window* of enqueued batches to index while the kind routes the next one (a
   Meilisearch node indexes tasks of one index in enqueue order, so a later version of a
   document still lands last);
2. a batch's progress (its cursor) is saved, under the lease's fence, only once **every**
   target acknowledged it **and** every batch before it: the committed cursor only ever covers
   an acknowledged prefix, whatever order the nodes' acknowledgements arrive in;
3. the window is bounded in bytes (``window_bytes``), so memory stays flat whatever the chunk
   size; one status request per node polls the whole window;
4. on a drain request the window is settled and the chunk handed back at the last committed
   cursor.

A crash with a full window resumes at the last fully acknowledged cursor: the batches after it
are sent again, and writes are add-or-replace by primary key, so nothing is lost or doubled.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from miroir_pipeline.fleet.targets.base import (
    DocumentsRefused,
    NodeTarget,
    PendingWrite,
    TargetError,
    sending_under,
)
from miroir_pipeline.queue.contract import JobStore
from miroir_pipeline.queue.lease import LeaseKeeper, hand_back
from miroir_pipeline.queue.shutdown import Shutdown

__all__ = ["Batch", "Refusals", "run_batches"]

log = logging.getLogger(__name__)

#: Per target (its index in the pipeline's targets), the documents it refused in a batch.
Refusals = dict[int, DocumentsRefused]

_FIRST_POLL_S = 0.005
_MAX_POLL_S = 0.2


@dataclass
class Batch:
    """Documents bound for each target node (same order as the pipeline's targets), and the
    progress that is saved once every target acknowledged them."""

    lines: Sequence[Sequence[bytes]]
    keys: Sequence[Sequence[str | int]]
    shards: Sequence[Sequence[int]]
    progress: dict[str, Any]
    #: Where the cursor stands after this batch, for messages (``byte 1234``, ``shard:offset``).
    position: str
    #: Nothing follows this batch: the chunk is done once it commits.
    final: bool = False
    #: Whatever the kind wants back in its hooks (e.g. the byte range the batch came from).
    extra: dict[str, Any] = field(default_factory=dict)
    #: Every line already passed the document rules (the dump router's promise): targets that
    #: apply those rules themselves skip them (``NodeTarget.write_routed(checked=…)``).
    checked: bool = False

    @property
    def nbytes(self) -> int:
        return sum(len(line) for lines in self.lines for line in lines)


class _SendAbandoned(TargetError):
    """A send stopped between two attempts because the chunk is being handed back: the next
    claimer sends the batch again, so nothing waits out the node's retries."""


@dataclass
class _InFlight:
    batch: Batch
    nbytes: int
    #: Per target index: the enqueue (a future, run on that target's own thread).
    writes: dict[int, Future[PendingWrite]]
    #: Per target index: the outcome once settled (None: acknowledged in full).
    settled: dict[int, DocumentsRefused | None] = field(default_factory=dict)


class _Window:
    """Batches handed to the targets and not yet committed, oldest first."""

    def __init__(
        self,
        targets: Sequence[NodeTarget],
        name: str,
        guard: Callable[[], None] = lambda: None,
        abandon: Callable[[], bool] = lambda: False,
    ) -> None:
        self.targets = targets
        #: Raises once the lease is lost: checked before each enqueue and each wait, so a worker
        #: that lost its chunk never sends an older batch after the new holder's newer ones.
        self.guard = guard
        #: True once the chunk is to be handed back: a send stops at its next attempt.
        self.abandon = abandon
        # One thread per target: a node receives its batches strictly in order.
        self.senders = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-{i}") for i in range(len(targets))]
        self.batches: deque[_InFlight] = deque()
        self.nbytes = 0

    def send(self, index_uid: str, primary_key: str, batch: Batch) -> None:
        writes = {
            i: self.senders[i].submit(self._guarded, target, index_uid, primary_key, lines, keys, shards, batch.checked)
            for i, (target, lines, keys, shards) in enumerate(
                zip(self.targets, batch.lines, batch.keys, batch.shards, strict=True)
            )
            if lines
        }
        nbytes = batch.nbytes
        self.batches.append(_InFlight(batch, nbytes, writes))
        self.nbytes += nbytes

    def _guarded(
        self,
        target: NodeTarget,
        index_uid: str,
        primary_key: str,
        lines: Sequence[bytes],
        keys: Sequence[str | int],
        shards: Sequence[int],
        checked: bool,
    ) -> PendingWrite:
        """An enqueue on a sender thread, only while the lease is held (a batch may wait its
        turn behind a slow send for longer than the lease) and no hand-back is under way; the
        node's own retries check both too."""
        may_send = self._may_send(target)
        may_send()
        with sending_under(may_send):
            return target.enqueue_routed(index_uid, primary_key, lines, keys, shards, checked=checked)

    def _may_send(self, target: NodeTarget) -> Callable[[], None]:
        """The check made before anything more is sent to ``target`` or waited for from it:
        raises once the lease is lost, or :class:`_SendAbandoned` once the chunk is being
        handed back."""

        def may_send() -> None:
            self.guard()
            if self.abandon():
                raise _SendAbandoned(
                    f"node {target.node_id}: send stopped, the chunk is being handed back",
                    node_id=target.node_id,
                    retryable=True,
                )

        return may_send

    def settle_oldest(
        self, index_uid: str, primary_key: str, *, block: bool, stop: Callable[[], bool] = lambda: False
    ) -> _InFlight | None:
        """The oldest batch once every target acknowledged it (None if not yet, unless ``block``;
        a blocking wait also gives up, returning None, once ``stop()`` is true). Raises a
        target's error; a refusal of documents is isolated first (see :meth:`_isolate`)."""
        oldest = self.batches[0]
        delay = _FIRST_POLL_S
        while True:
            if self._poll(oldest, index_uid, primary_key, block=block):
                self.batches.popleft()
                self.nbytes -= oldest.nbytes
                return oldest
            if not block or stop():
                return None
            self.guard()
            time.sleep(delay)
            delay = min(delay * 2, _MAX_POLL_S)

    def _poll(self, flight: _InFlight, index_uid: str, primary_key: str, *, block: bool) -> bool:
        for i, write in flight.writes.items():
            if i in flight.settled:
                continue
            if not write.done() and not block:
                return False
            try:
                pending = write.result()  # the enqueue's own error (node down, refused request)
            except _SendAbandoned:
                return False  # never sent whole: not acknowledged, the next claimer sends it
            target = self.targets[i]
            target.refresh(
                [f.writes[i].result() for f in self.batches if i in f.writes and f.writes[i].done() and f.writes[i].exception() is None]
            )
            try:
                if not pending.check():
                    return False
                flight.settled[i] = None
            except DocumentsRefused as exc:
                flight.settled[i] = exc
            except TargetError as exc:
                if target.refusal_of(exc) is None:
                    raise
                try:
                    self._isolate(i, index_uid, primary_key)
                except _SendAbandoned:
                    return False  # not acknowledged: the next claimer sends the batch again
        return True

    def _isolate(self, i: int, index_uid: str, primary_key: str) -> None:
        """Target ``i`` refused documents of a batch in the window. Later batches were enqueued
        after it; once all of them finished, every unsettled batch is written again to that
        target, in order and synchronously (isolating refused documents by halves), so the
        node ends with each document's latest version whatever it applied meanwhile.

        Like a send, it stops (raising :class:`_SendAbandoned`) once the chunk is being handed
        back, between two polls or two requests: the next claimer writes the batches again."""
        target = self.targets[i]
        may_send = self._may_send(target)
        for flight in self.batches:  # let the node finish what it has: nothing lands after us
            if i in flight.writes and i not in flight.settled:
                self._finish_quietly(flight, i, may_send)
        for flight in self.batches:
            if i not in flight.writes or i in flight.settled:
                continue
            b = flight.batch
            try:
                with sending_under(may_send):
                    target.write_routed(index_uid, primary_key, b.lines[i], b.keys[i], b.shards[i], checked=b.checked)
                flight.settled[i] = None
            except DocumentsRefused as exc:
                flight.settled[i] = exc

    def _finish_quietly(self, flight: _InFlight, i: int, may_send: Callable[[], None]) -> None:
        try:
            pending = flight.writes[i].result()
        except TargetError:
            return
        delay = _FIRST_POLL_S
        while True:
            may_send()
            self.targets[i].refresh([pending])
            try:
                if pending.check():
                    return
            except TargetError:
                return
            time.sleep(delay)
            delay = min(delay * 2, _MAX_POLL_S)

    def close(self) -> None:
        """Stop the senders: batches not yet handed to their node are dropped (nothing past the
        committed cursor needs them); the one being sent finishes its request, and on a
        hand-back makes no further attempt."""
        for sender in self.senders:
            sender.shutdown(wait=True, cancel_futures=True)


def run_batches(
    store: JobStore,
    keeper: LeaseKeeper,
    targets: Sequence[NodeTarget],
    index_uid: str,
    primary_key: str,
    batches: Iterator[Batch],
    shutdown: Shutdown,
    *,
    window_bytes: int = 0,
    before_commit: Callable[[Batch], None] | None = None,
    on_commit: Callable[[Batch], None] | None = None,
    on_refused: Callable[[Batch, Refusals], None] | None = None,
) -> None:
    """Hand every batch to its targets and commit progress for the acknowledged prefix.

    Up to ``window_bytes`` of routed documents may be in flight (0: one batch at a time).
    ``before_commit`` runs once every target acknowledged a batch and before its progress is
    saved (e.g. syncing a dead-letter file the progress points into); ``on_commit`` after.
    Documents a target refused for what they are (the rest of the batch was written) go to
    ``on_refused`` before the commit: it records them (and amends the batch's progress) or
    raises; without it the first refusal is raised. Otherwise raises the first target error,
    :class:`LeaseLost` as soon as the fence refuses a write, and :class:`ChunkHandedBack` after
    handing the chunk back on a drain request.

    A drain does not wait for the window: it commits what the nodes have acknowledged by then
    and hands the chunk back at that cursor. Batches still in flight are sent again by the next
    claimer, after what the nodes already hold (add-or-replace, in order), so a drain takes one
    poll, not the time a slow or unreachable node needs for the whole window.
    """
    window = _Window(targets, f"send-{keeper.lease.job_id}", keeper.check, lambda: shutdown.requested)
    committed = "its resume cursor (nothing committed by this run)"  # where a hand-back leaves it

    def commit(flight: _InFlight) -> None:
        nonlocal committed
        batch = flight.batch
        refusals: Refusals = {i: exc for i, exc in flight.settled.items() if exc is not None}
        if refusals:
            if on_refused is None:
                raise next(iter(refusals.values()))
            on_refused(batch, refusals)
        if before_commit is not None:
            before_commit(batch)
        keeper.check()
        store.save_progress(keeper.lease, batch.progress)
        committed = batch.position
        if on_commit is not None:
            on_commit(batch)

    def settle(*, block: bool, keep_bytes: int = 0) -> None:
        """Commit acknowledged batches, oldest first; with ``block``, wait until at most
        ``keep_bytes`` stay in flight (or a drain is requested)."""
        while window.batches:
            must = block and (window.nbytes > keep_bytes or (len(window.batches) > 1 and keep_bytes == 0))
            flight = window.settle_oldest(index_uid, primary_key, block=must, stop=lambda: shutdown.requested)
            if flight is None:
                return
            commit(flight)

    try:
        for batch in batches:
            keeper.check()
            if shutdown.requested:
                break
            window.send(index_uid, primary_key, batch)
            settle(block=False)
            settle(block=True, keep_bytes=0 if batch.final else window_bytes)
        else:
            settle(block=True)  # gives up early only on a drain
            if not window.batches:
                return
        try:
            settle(block=False)  # what the nodes acknowledged by now; nothing is waited for
        except TargetError as exc:  # the next claimer meets it again, with this worker's attempt back
            log.warning("chunk %s: draining past a node error: %s", keeper.lease.job_id, exc)
        # Senders stop before the lease ends: a batch of this run still being sent must not
        # reach a node after the next claimer's writes of the same documents.
        window.close()
        raise hand_back(store, keeper, committed, shutdown.reason)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        window.close()
