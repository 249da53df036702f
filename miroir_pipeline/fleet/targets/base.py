"""The node-target contract: where routed documents are written and read back.

Two implementations: the local node store (``local://PATH``) and a Meilisearch node
(``http(s)://``). Writes are idempotent by primary key: a re-sent document replaces the old one.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Acknowledged",
    "DocumentsRefused",
    "IndexNotFound",
    "NodeTarget",
    "PendingWrite",
    "RefusedDocument",
    "RequestRefused",
    "TargetError",
    "isolate_refused",
    "send_guard",
    "sending_under",
]

_SEND_GUARD: ContextVar[Callable[[], None] | None] = ContextVar("miroir_send_guard", default=None)


@contextlib.contextmanager
def sending_under(guard: Callable[[], None]) -> Iterator[None]:
    """Writes made in this block (this thread) check ``guard`` before every request they send,
    retries included, and between polls of a task they wait for: it raises once nothing more
    may be sent (the chunk's lease was lost, or it is being handed back), so a write waiting
    out a node's errors does not land after the new holder's, and a drain waits for nothing."""
    token = _SEND_GUARD.set(guard)
    try:
        yield
    finally:
        _SEND_GUARD.reset(token)


def send_guard() -> None:
    """Raise if the block this thread writes in may send nothing more (see :func:`sending_under`)."""
    guard = _SEND_GUARD.get()
    if guard is not None:
        guard()


class TargetError(RuntimeError):
    """A node refused or failed a request; the message names node, index and (if any) task."""

    def __init__(self, message: str, *, node_id: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.retryable = retryable


class IndexNotFound(TargetError):
    pass


class RequestRefused(TargetError):
    """A node refused the request itself, for what the workers' configuration says (HTTP 401 or
    403: the API key; 413: a body over the node's payload limit). Sent again, the same request
    is refused again, so the chunk fails for good at once instead of spending its attempts; the
    message says what to fix before retrying it."""

    def __init__(self, message: str, *, node_id: str, status: int) -> None:
        super().__init__(message, node_id=node_id, retryable=False)
        self.status = status


@dataclass(frozen=True)
class RefusedDocument:
    """One document a node refused for what it is: its position in the batch written, and the
    node's own words."""

    position: int
    message: str
    code: str | None = None


class DocumentsRefused(TargetError):
    """A node refused some documents of a batch for what they are (not for its own state); every
    other document of the batch was written. Retrying cannot help: the documents must change."""

    def __init__(self, node_id: str, index_uid: str, refused: Sequence[RefusedDocument]) -> None:
        first = refused[0]
        super().__init__(
            f"node {node_id}: index {index_uid}: {len(refused)} document(s) refused, first at "
            f"position {first.position} of the batch: {first.message}",
            node_id=node_id,
            retryable=False,
        )
        self.index_uid = index_uid
        self.refused = list(refused)


class PendingWrite(abc.ABC):
    """A batch handed to a node that may still be indexing it (its tasks enqueued).

    :meth:`check` says whether the node acknowledged every document (True), not yet (False), or
    raises what went wrong; the node's :meth:`NodeTarget.refresh` updates many pending writes
    with one status request, so a window of them costs one poll per round.
    """

    @abc.abstractmethod
    def check(self) -> bool:
        """True once acknowledged; raises :class:`TargetError` if the node failed the write."""


class Acknowledged(PendingWrite):
    """A write the node acknowledged before returning (or refused some documents of, having
    written the rest: ``refused`` is raised by :meth:`check`)."""

    def __init__(self, refused: DocumentsRefused | None = None) -> None:
        self.refused = refused

    def check(self) -> bool:
        if self.refused is not None:
            raise self.refused
        return True


def isolate_refused(
    lines: Sequence[bytes],
    write: Callable[[Sequence[bytes], int], None],
    refusal_of: Callable[[TargetError], RefusedDocument | None],
) -> list[RefusedDocument]:
    """Write ``lines`` by halves until every refused document is alone, and return those.

    ``write`` sends documents (and the position of the first) to the node, raising
    :class:`TargetError`; ``refusal_of`` says
    whether an error is about the documents sent (a :class:`RefusedDocument` template) or about
    the node (None: re-raised at once). Halves are written in order, so a later version of a
    document still lands last. Costs about ``2 * refused * log2(len(lines))`` writes.
    """
    refused: list[RefusedDocument] = []

    def attempt(part: Sequence[bytes], base: int) -> None:
        try:
            write(part, base)
            return
        except TargetError as exc:
            template = refusal_of(exc)
            if template is None:
                raise
            if len(part) == 1:
                refused.append(RefusedDocument(base, template.message, template.code))
                return
        mid = len(part) // 2
        attempt(part[:mid], base)
        attempt(part[mid:], base + mid)

    attempt(lines, 0)
    return refused


class NodeTarget(abc.ABC):
    """One node of the fleet."""

    node_id: str
    #: The largest request body the node takes, in bytes (a Meilisearch node's payload limit),
    #: or None when it takes any size. A document that cannot fit in it is refused before it is
    #: sent, as an invalid document.
    payload_limit_bytes: int | None = None

    @abc.abstractmethod
    def ensure_index(
        self,
        index_uid: str,
        primary_key: str,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """Create the index with its primary key if missing, apply ``settings`` (if given) and make
        ``_miroir_shard`` filterable; returns once all of it is in effect."""

    @abc.abstractmethod
    def write_documents(self, index_uid: str, primary_key: str, ndjson: bytes, count: int) -> None:
        """Write ``count`` documents given as NDJSON (every line ends with ``\\n``). Returns only once
        the node has durably committed them; raises :class:`TargetError` otherwise."""

    def write_routed(
        self,
        index_uid: str,
        primary_key: str,
        lines: Sequence[bytes],
        keys: Sequence[str | int],
        shards: Sequence[int],
        *,
        checked: bool = False,
    ) -> None:
        """Write documents the router already parsed: each line with its primary key value and
        shard. Same guarantee as :meth:`write_documents`; raises :class:`DocumentsRefused` (after
        writing every other document) when the node refuses some documents for what they are.
        A target that can use the parsed keys (the local store) skips decoding them again.

        ``checked``: every line already passed the document rules (``fleet/document_rules``),
        as the dump router makes sure of every line it routes; a target that applies those
        rules itself (the local store) need not apply them again."""
        self.write_documents(index_uid, primary_key, b"\n".join(lines) + b"\n", len(lines))

    def enqueue_routed(
        self,
        index_uid: str,
        primary_key: str,
        lines: Sequence[bytes],
        keys: Sequence[str | int],
        shards: Sequence[int],
        *,
        checked: bool = False,
    ) -> PendingWrite:
        """Hand a batch to the node without waiting for it to be indexed. Batches enqueued one
        after another on one node are applied in that order. A node that writes synchronously
        (the local store) writes here and returns an acknowledged write. ``checked`` as for
        :meth:`write_routed`."""
        try:
            self.write_routed(index_uid, primary_key, lines, keys, shards, checked=checked)
        except DocumentsRefused as exc:
            return Acknowledged(exc)
        return Acknowledged()

    def refresh(self, pending: Sequence[PendingWrite]) -> None:  # noqa: B027 - optional hook
        """Update the state of this node's pending writes in one request (nothing to do for a
        node that writes synchronously)."""

    def refusal_of(self, exc: TargetError) -> RefusedDocument | None:
        """What a failed write says of the documents sent (a refusal to isolate by writing the
        batch again by halves), or None when it is about the node itself."""
        return None

    @abc.abstractmethod
    def index_exists(self, index_uid: str) -> bool: ...

    @abc.abstractmethod
    def get_primary_key(self, index_uid: str) -> str | None: ...

    @abc.abstractmethod
    def get_settings(self, index_uid: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    def fetch_shard(self, index_uid: str, shard: int, offset: int, limit: int) -> list[bytes]:
        """One page of the documents whose ``_miroir_shard`` equals ``shard``, each as JSON bytes,
        in an order that is stable while the index is not written to."""

    @abc.abstractmethod
    def iter_documents(self, index_uid: str, page_size: int = 1000) -> Iterator[bytes]:
        """Every document of the index as JSON bytes (verification reads)."""

    @abc.abstractmethod
    def count_documents(self, index_uid: str) -> int: ...

    @abc.abstractmethod
    def count_by_shard(self, index_uid: str) -> dict[int, int]: ...

    @abc.abstractmethod
    def delete_documents(self, index_uid: str, primary_keys: list[str]) -> None:
        """Delete documents by primary key (tests and operators)."""

    @abc.abstractmethod
    def delete_index(self, index_uid: str) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
