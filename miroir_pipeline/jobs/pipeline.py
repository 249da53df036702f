"""The one chunk pipeline every job kind plugs into.

A kind supplies an iterator of :class:`Batch` es (documents routed per target node, plus the
progress that commits them); the pipeline owns the rest of the resume protocol:

1. while batch *n* is being written to every target, the kind produces batch *n+1*
   (reading and routing overlap the writes);
2. batch *n+1*'s writes start only once batch *n* was acknowledged by **every** target, so a
   later version of a document always lands last;
3. only then is batch *n*'s progress (its cursor) saved, under the lease's fence;
4. on a drain request the chunk is handed back at the last committed cursor.

Re-sending a batch after a crash is harmless: writes are idempotent by primary key, and the
cursor makes sure nothing is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from miroir_pipeline.fleet.targets.base import DocumentsRefused, NodeTarget
from miroir_pipeline.queue.contract import JobStore
from miroir_pipeline.queue.lease import LeaseKeeper, hand_back
from miroir_pipeline.queue.shutdown import Shutdown

__all__ = ["Batch", "Refusals", "run_batches"]

#: Per target (its index in the pipeline's targets), the documents it refused in a batch.
Refusals = dict[int, DocumentsRefused]


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
    #: Whatever the kind wants back in ``on_commit`` (e.g. its report at this point).
    extra: dict[str, Any] = field(default_factory=dict)


def run_batches(
    store: JobStore,
    keeper: LeaseKeeper,
    targets: Sequence[NodeTarget],
    index_uid: str,
    primary_key: str,
    batches: Iterator[Batch],
    shutdown: Shutdown,
    *,
    before_commit: Callable[[Batch], None] | None = None,
    on_commit: Callable[[Batch], None] | None = None,
    on_refused: Callable[[Batch, Refusals], None] | None = None,
) -> None:
    """Write every batch to its targets and commit its progress, one batch in flight at a time.

    ``before_commit`` runs after all targets acknowledged a batch and before its progress is
    saved (e.g. syncing a dead-letter file the progress points into); ``on_commit`` after.
    Documents a target refused for what they are (the rest of the batch was written) go to
    ``on_refused`` before the commit: it records them (and amends the batch's progress) or
    raises; without it the first refusal is raised. Otherwise raises the first target error,
    :class:`LeaseLost` as soon as the fence refuses a write, and :class:`ChunkHandedBack` after
    handing the chunk back on a drain request.
    """
    pool = ThreadPoolExecutor(max_workers=max(1, len(targets)), thread_name_prefix=f"write-{keeper.lease.job_id}")
    in_flight: tuple[list[tuple[int, Future[None]]], Batch] | None = None

    def settle() -> None:
        nonlocal in_flight
        if in_flight is None:
            return
        writes, batch = in_flight
        in_flight = None
        refusals: Refusals = {}
        for target_index, write in writes:
            try:
                write.result()  # raises the node's TargetError
            except DocumentsRefused as exc:
                refusals[target_index] = exc
        if refusals:
            if on_refused is None:
                raise next(iter(refusals.values()))
            on_refused(batch, refusals)
        if before_commit is not None:
            before_commit(batch)
        keeper.check()
        store.save_progress(keeper.lease, batch.progress)
        if on_commit is not None:
            on_commit(batch)

    try:
        for batch in batches:
            settle()
            writes = [
                (i, pool.submit(target.write_routed, index_uid, primary_key, lines, keys, shards))
                for i, (target, lines, keys, shards) in enumerate(
                    zip(targets, batch.lines, batch.keys, batch.shards, strict=True)
                )
                if lines
            ]
            in_flight = (writes, batch)
            if batch.final or shutdown.requested:
                settle()
            if shutdown.requested and not batch.final:
                raise hand_back(store, keeper, batch.position, shutdown.reason)
        settle()
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        pool.shutdown(wait=True)
