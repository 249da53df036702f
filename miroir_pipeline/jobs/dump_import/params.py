"""What a dump import is asked for, what each chunk row carries, and what a chunk reports."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from miroir_pipeline.jobs.ids import INDEX_UID_PATTERN, INDEX_UID_RULE
from miroir_pipeline.queue.contract import Job

__all__ = [
    "DUMP_IMPORT",
    "INDEX_UID_PATTERN",
    "INDEX_UID_RULE",
    "ChunkReport",
    "DumpChunkParams",
    "DumpImportRequest",
    "InvalidDocumentError",
    "PlannedImport",
    "is_invalid_document_error",
]

#: The ``type`` of dump-import rows.
DUMP_IMPORT = "dump_import"


class DumpImportRequest(BaseModel):
    """What an operator asks for: one dump into one index of the fleet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(min_length=1)
    #: The index the documents are written to.
    index_uid: str = Field(pattern=INDEX_UID_PATTERN)
    primary_key: str | None = Field(default=None, min_length=1)
    chunk_size_bytes: int | None = Field(default=None, ge=1)
    on_invalid_document: Literal["fail", "skip"] | None = None
    #: The index to read from a Meilisearch ``.dump`` when it is not ``index_uid`` (import a
    #: dump's ``products`` as ``products_v2``); refused for NDJSON, which holds no index.
    source_index_uid: str | None = Field(default=None, pattern=INDEX_UID_PATTERN)
    #: Accept a dump with no documents (empty or blank lines only) instead of refusing it.
    allow_empty: bool = False


class DumpChunkParams(BaseModel):
    """Everything a worker needs to process one chunk, stored in the chunk row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_uri: str
    #: What ``source_uri`` is: anything but ``ndjson`` was staged, so ``data_uri`` (where lines
    #: and byte offsets are counted) is its decompressed documents, not the file itself.
    source_kind: Literal["ndjson", "gzip", "meilisearch_dump"] = "ndjson"
    data_uri: str
    #: Size of ``data_uri`` when planned: a worker refuses another file put under that name
    #: since (``None`` in chunks planned before it was recorded).
    data_size: int | None = Field(default=None, ge=0)
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    index_uid: str
    primary_key: str
    topology: dict[str, Any]
    on_invalid_document: Literal["fail", "skip"] = "fail"


class InvalidDocumentError(ValueError):
    """A dump line that cannot be imported under the ``fail`` policy."""


class ReplicasDisagree(RuntimeError):
    """Nodes holding the same shard judged one document differently: some refused it, others
    wrote it. Neither policy fits (a dead letter would still be searchable on the others), and
    a retry changes nothing until the nodes are aligned, so the chunk fails for good."""


_INVALID_LINE_RE = re.compile(r"line \d+, byte offset \d+: .*--on-invalid skip", re.DOTALL)


def is_invalid_document_error(error: str | None) -> bool:
    """Whether a chunk's recorded error is an invalid document that stopped it under ``fail``
    (it names the line and byte offset and the ``--on-invalid skip`` way out)."""
    return bool(error and _INVALID_LINE_RE.search(error))


@dataclass(frozen=True)
class PlannedImport:
    parent: Job
    chunk_ids: list[str]
    data_uri: str
    primary_key: str
    bytes_total: int


@dataclass
class ChunkReport:
    """What processing one chunk did; becomes the Dagster run's metadata."""

    chunk_id: str
    attempt: int
    resumed_from: int
    documents: int = 0
    bytes: int = 0
    invalid_documents: int = 0
    per_node: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0
    #: Where lines the router found invalid go (``skip``), and documents a node refused.
    dead_letter: str | None = None
    refused_dead_letter: str | None = None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.duration_s if self.duration_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"chunk {self.chunk_id}: {self.documents} documents, {self.bytes} bytes, "
            f"{self.mb_per_s:.1f} MB/s, resumed from byte {self.resumed_from}"
        )

    def as_metadata(self) -> dict[str, Any]:
        return {
            "chunk_id": self.chunk_id,
            "attempt": self.attempt,
            "resumed_from": self.resumed_from,
            "documents": self.documents,
            "bytes": self.bytes,
            "invalid_documents": self.invalid_documents,
            "per_node": dict(self.per_node),
            "duration_s": round(self.duration_s, 3),
            "mb_per_s": round(self.mb_per_s, 1),
            "dead_letter": self.dead_letter,
            "refused_dead_letter": self.refused_dead_letter,
        }
