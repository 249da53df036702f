"""What a reshard is asked for, what each shard-range chunk carries, its ``shard:offset``
cursor, and what a chunk reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.queue.contract import Job

__all__ = [
    "MAX_INDEX_UID_BYTES",
    "READ_PAGE_DOCS",
    "RESHARD_BACKFILL",
    "InvalidLiveDocument",
    "PlannedReshard",
    "ReshardChunkParams",
    "ReshardChunkReport",
    "ReshardRefused",
    "ReshardRequest",
    "format_cursor",
    "parse_cursor",
    "shadow_index_uid",
    "shadow_topology_for",
]

#: The ``type`` of reshard-backfill rows.
RESHARD_BACKFILL = "reshard_backfill"
#: Meilisearch's limit on an index uid; the shadow uid must fit too.
MAX_INDEX_UID_BYTES = 400
#: Documents asked for per ``fetch_shard`` call (capped further by ``settings.batch_size``).
READ_PAGE_DOCS = 2000


class ReshardRefused(ValueError):
    """A reshard that must not start; the message says what is wrong and what to do."""


class InvalidLiveDocument(ValueError):
    """A live document the backfill cannot re-hash (no valid primary key): not retryable."""


class ReshardRequest(BaseModel):
    """What an operator asks for: change the shard count of one live index."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index_uid: str = Field(pattern=r"^[A-Za-z0-9_-]{1,400}$")
    new_shards: int = Field(ge=1, le=2**32 - 1)
    shards_per_chunk: int = Field(default=8, ge=1)
    #: Delete a shadow index left by an earlier reshard instead of refusing to plan.
    replace_shadow: bool = False


class ReshardChunkParams(BaseModel):
    """Everything a worker needs to backfill one shard range, stored in the chunk row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    index_uid: str
    shadow_uid: str
    primary_key: str
    old_shards: int = Field(ge=1)
    new_shards: int = Field(ge=1)
    shard_start: int = Field(ge=0)
    shard_end: int = Field(ge=0)
    live_topology: dict[str, Any]
    shadow_topology: dict[str, Any]


@dataclass(frozen=True)
class PlannedReshard:
    parent: Job
    chunk_ids: list[str]
    shadow_uid: str
    primary_key: str
    old_shards: int
    new_shards: int
    shadow_topology: Topology


@dataclass
class ReshardChunkReport:
    """What backfilling one shard range did; becomes the Dagster run's metadata."""

    chunk_id: str
    attempt: int
    shard_start: int
    shard_end: int
    #: Cursor this attempt started at when it resumed a previous attempt's work, else None.
    resumed_from: str | None
    documents: int = 0
    per_node: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def docs_per_s(self) -> float:
        return self.documents / self.duration_s if self.duration_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"chunk {self.chunk_id}: shards [{self.shard_start}, {self.shard_end}), "
            f"{self.documents} documents, {self.docs_per_s:,.0f} docs/s, "
            f"resumed from {self.resumed_from or 'the start'}"
        )

    def as_metadata(self) -> dict[str, Any]:
        return {
            "chunk_id": self.chunk_id,
            "attempt": self.attempt,
            "shards": f"[{self.shard_start}, {self.shard_end})",
            "resumed_from": self.resumed_from or "",
            "documents": self.documents,
            "per_node": dict(self.per_node),
            "duration_s": round(self.duration_s, 3),
            "docs_per_s": round(self.docs_per_s, 1),
        }


def shadow_index_uid(index_uid: str, new_shards: int) -> str:
    """The shadow index a reshard fills: ``{uid}__reshard_{S_new}``."""
    return f"{index_uid}__reshard_{new_shards}"


def shadow_topology_for(live: Topology, new_shards: int, new: Topology | None = None) -> Topology:
    """The shadow's topology: ``new`` if given (its ``shards`` must equal ``new_shards``), else the
    live nodes with ``shards = new_shards``."""
    if new is None:
        return live.model_copy(update={"shards": new_shards})
    if new.shards != new_shards:
        raise ReshardRefused(
            f"the new topology has shards: {new.shards} but --new-shards is {new_shards}; "
            "make them agree (or leave out --new-topology to reuse the live nodes)"
        )
    return new


def format_cursor(shard: int, offset: int) -> str:
    """The one place that writes the reshard cursor: ``"shard:offset"`` (next unread position)."""
    return f"{shard}:{offset}"


def parse_cursor(cursor: str) -> tuple[int, int]:
    """``"shard:offset"`` → ``(shard, offset)``; a malformed cursor is an error naming it."""
    shard, sep, offset = str(cursor).partition(":")
    try:
        if not sep:
            raise ValueError
        s, o = int(shard), int(offset)
    except ValueError:
        raise ValueError(f"reshard cursor {cursor!r} is not of the form 'shard:offset'") from None
    if s < 0 or o < 0:
        raise ValueError(f"reshard cursor {cursor!r} has a negative shard or offset")
    return s, o
