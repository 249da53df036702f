"""The node-target contract: where routed documents are written and read back (DESIGN §5).

Two implementations: the local node store (``local://PATH``) and a Meilisearch node
(``http(s)://``). Writes are idempotent by primary key: a re-sent document replaces the old one.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

__all__ = ["IndexNotFound", "NodeTarget", "TargetError"]


class TargetError(RuntimeError):
    """A node refused or failed a request; the message names node, index and (if any) task."""

    def __init__(self, message: str, *, node_id: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.retryable = retryable


class IndexNotFound(TargetError):
    pass


class NodeTarget(abc.ABC):
    """One node of the fleet."""

    node_id: str

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
    ) -> None:
        """Write documents the router already parsed: each line with its primary key value and
        shard. Same guarantee as :meth:`write_documents`; a target that can use the parsed keys
        (the local store) overrides this to skip decoding them again."""
        self.write_documents(index_uid, primary_key, b"\n".join(lines) + b"\n", len(lines))

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
