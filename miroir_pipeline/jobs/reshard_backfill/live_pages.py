"""Reading one live shard page by page while the live index still takes writes.

Pages are read by offset (Meilisearch has no cursor for a filtered read), and offsets count
the documents before them: a document deleted below the offset between two reads moves every
later one down, so the next page would start one too far and skip a document. Each page
therefore starts ``overlap`` documents early, re-reading the last documents already read, and
continues after the last of them it finds. A document added meanwhile may be missed, and one
deleted meanwhile may already be copied; both are the live writes' own business (Miroir
writes them to the shadow as well). When none of them is found (``overlap`` or more
documents deleted between two reads), the shard is read again from its start.

Known limit: a burst of more inserts just below the offset than a page holds (Meilisearch
reuses freed internal ids) can push documents already read past the next page, which then reads
them again: placed right, but counted twice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from miroir_pipeline.fleet.replica_reads import ShardReader
from miroir_pipeline.fleet.targets.base import TargetError

__all__ = ["MAX_RESTARTS", "READ_OVERLAP_DOCS", "LivePages", "Page", "ShardPosition"]

#: Documents each page re-reads of the previous one (at most a few % of a page).
READ_OVERLAP_DOCS = 64
#: Times one shard may be read again from its start in one attempt (after losing its place, or
#: moving to another replica) before the chunk gives up (and retries).
MAX_RESTARTS = 3

#: A live document's primary key: its value, and its text (what is hashed and compared).
KeyOf = Callable[[bytes], "tuple[str | int, bytes]"]


@dataclass
class ShardPosition:
    """Where the read of one shard stands: the next unread ``offset`` on ``node`` (offsets are
    per node) and the keys of the last documents read, which the next page overlaps."""

    shard: int
    offset: int = 0
    node: str | None = None
    tail: deque[bytes] = field(default_factory=lambda: deque(maxlen=READ_OVERLAP_DOCS))
    restarts: int = 0


@dataclass
class Page:
    """The documents of a page not read before, in order, with their keys; ``base`` is the
    position of the first on the node. ``restarted``: the shard is being read again from its
    start (on another replica, or after losing its place), so what was counted of it goes.
    ``last``: the shard has nothing after this page."""

    docs: Sequence[bytes]
    keys: list[str | int]
    texts: list[bytes]
    base: int
    tail_before: list[bytes]
    restarted: bool
    last: bool

    def tail_after(self, n: int) -> list[bytes]:
        """The overlap keys once the first ``n`` documents of this page are read."""
        return (self.tail_before + self.texts[:n])[-READ_OVERLAP_DOCS:]


class LivePages:
    """Pages of live shards from ``reader``, each continuing where the last one ended."""

    def __init__(self, reader: ShardReader, key_of: KeyOf, page_size: int, what: str) -> None:
        self.reader = reader
        self.key_of = key_of
        self.page_size = page_size
        self.what = what

    def next(self, pos: ShardPosition) -> Page:
        """The next page of ``pos.shard``; ``pos`` moves past it."""
        restarted = False
        while True:
            back = min(pos.offset, len(pos.tail))
            limit = self.page_size + back
            before = pos.node
            raw, read_at = self.reader.read(pos.shard, pos.offset - back, limit, before)
            pos.node = self.reader.node
            keys = [self.key_of(r) for r in raw]
            if read_at != pos.offset - back or (before is not None and pos.node != before):
                # Another replica, read from its start: its order is its own, so the overlap
                # keys say nothing there. Counted like any restart, so replicas that keep
                # failing in turn cannot keep the read at the shard's first pages forever.
                self._restart(pos, moved=True)
                start, restarted, back = 0, True, 0
            else:
                found = _after(pos.tail, [t for _, t in keys]) if back else 0
                if found is None:
                    self._restart(pos)
                    restarted = True
                    continue
                start = found
            tail_before = list(pos.tail)
            new = keys[start:]
            page = Page(
                docs=raw[start:],
                keys=[k for k, _ in new],
                texts=[t for _, t in new],
                base=pos.offset - back + start,
                tail_before=tail_before,
                restarted=restarted,
                last=len(raw) < limit,
            )
            pos.offset = page.base + len(page.docs)
            pos.tail.extend(page.texts)
            return page

    def _restart(self, pos: ShardPosition, *, moved: bool = False) -> None:
        """Start ``pos.shard`` over at offset 0; past :data:`MAX_RESTARTS` in one attempt, fail
        it retryably (the chunk resumes later from its cursor)."""
        pos.restarts += 1
        if pos.restarts > MAX_RESTARTS:
            where = f"{self.what} shard {pos.shard}"
            if moved:
                why = (
                    f"{where}: its read restarted {MAX_RESTARTS} times, the last time because it moved "
                    f"to node {pos.node} after another replica failed. The chunk is retried later from "
                    "its cursor; if this persists, check the health of the live nodes holding the "
                    "shard (their errors are logged above)"
                )
            else:
                why = (
                    f"{where}: lost its place {MAX_RESTARTS} times on node {pos.node}: "
                    f"{READ_OVERLAP_DOCS} or more of the shard's documents were deleted below the read "
                    "between two page reads each time. The chunk is retried later from its cursor; "
                    "if this persists, pause bulk deletes on the live index during the reshard"
                )
            raise TargetError(why, node_id=pos.node or "", retryable=True)
        pos.offset = 0
        pos.tail.clear()


def _after(tail: Sequence[bytes], texts: Sequence[bytes]) -> int | None:
    """Where the page continues: just after the latest document of ``tail`` it holds; None when
    it holds none of them."""
    at = {t: i for i, t in enumerate(texts)}
    for key in reversed(tail):
        i = at.get(key)
        if i is not None:
            return i + 1
    return None
