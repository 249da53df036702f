"""Dump import: plan (stage, validate, split, enqueue) and process one chunk under its lease
with the resume protocol of DESIGN §6."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Generator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from miroir_pipeline import metrics
from miroir_pipeline.fleet.routing import Router
from miroir_pipeline.fleet.targets.base import NodeTarget
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.dump_import.document_router import DocumentRouter, InvalidLine
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue.contract import Job, JobStore, JobType, Lease, NewChunk
from miroir_pipeline.queue.lease import LeaseKeeper, run_under_lease
from miroir_pipeline.queue.shutdown import DRAIN, ChunkHandedBack
from miroir_pipeline.sources import DumpRef, iter_range_blocks, open_range, resolve_dump, stage_dump
from miroir_pipeline.sources.split import split_dump

__all__ = [
    "ChunkReport",
    "DumpChunkParams",
    "DumpImportRequest",
    "InvalidDocumentError",
    "PlannedImport",
    "plan_dump_import",
    "process_dump_chunk",
]

log = logging.getLogger(__name__)


class DumpImportRequest(BaseModel):
    """What an operator asks for: one dump into one index of the fleet."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str = Field(min_length=1)
    index_uid: str = Field(pattern=r"^[A-Za-z0-9_-]{1,400}$")
    primary_key: str | None = Field(default=None, min_length=1)
    chunk_size_bytes: int | None = Field(default=None, ge=1)
    on_invalid_document: Literal["fail", "skip"] | None = None


class DumpChunkParams(BaseModel):
    """Everything a worker needs to process one chunk, stored in the chunk row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_uri: str
    data_uri: str
    start: int = Field(ge=0)
    end: int = Field(ge=0)
    index_uid: str
    primary_key: str
    topology: dict[str, Any]
    on_invalid_document: Literal["fail", "skip"] = "fail"


class InvalidDocumentError(ValueError):
    """A dump line that cannot be imported under the ``fail`` policy."""


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
    dead_letter: str | None = None

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.duration_s if self.duration_s > 0 else 0.0

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
        }


def new_parent_id(prefix: str, index_uid: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{prefix}-{index_uid}-{stamp}-{secrets.token_hex(3)}"


def plan_dump_import(
    store: JobStore,
    request: DumpImportRequest,
    topology: Topology,
    targets: Mapping[str, NodeTarget],
    settings: PipelineSettings,
) -> PlannedImport:
    """Stage and validate the dump, prepare every node's index, then enqueue and split.

    Everything that can be refused (a URI outside the allowed roots, an unreadable dump, no
    primary key) is refused before any row is written.
    """
    staged = stage_dump(
        request.uri, settings.staging_dir, settings.allowed_roots, index_uid=request.index_uid
    )
    ref = staged.ref
    if staged.unapplied_update_files:
        if staged.kind != "ndjson":  # do not leave a staged copy of a refused dump behind
            for path in (ref.path + ".complete", ref.path):
                with contextlib.suppress(OSError):
                    ref.filesystem.delete_file(path)
        raise ValueError(
            f"{request.uri}: the Meilisearch dump holds {len(staged.unapplied_update_files)} document "
            "update(s) that were still queued when it was taken (tasks/update_files); importing it "
            "would lose them. Take the dump again once the source's tasks have finished"
        )
    primary_key = request.primary_key or staged.primary_key or _infer_primary_key(ref)
    chunk_size = request.chunk_size_bytes or settings.chunk_size_bytes
    ranges = split_dump(ref, chunk_size).ranges
    for node in topology.all_nodes():
        targets[node.id].ensure_index(request.index_uid, primary_key, staged.settings)
    on_invalid = request.on_invalid_document or settings.on_invalid_document
    parent = store.enqueue(
        JobType.DUMP_IMPORT,
        {
            "source_uri": request.uri,
            "data_uri": ref.uri,
            "index_uid": request.index_uid,
            "primary_key": primary_key,
            "chunk_size_bytes": chunk_size,
            "bytes_total": ref.size,
            "on_invalid_document": on_invalid,
        },
        job_id=new_parent_id("import", request.index_uid),
        max_attempts=settings.max_attempts,
    )
    topo = topology.model_dump(mode="json")
    chunks = [
        NewChunk(
            chunk_index=i,
            params=DumpChunkParams(
                source_uri=request.uri,
                data_uri=ref.uri,
                start=r.start,
                end=r.end,
                index_uid=request.index_uid,
                primary_key=primary_key,
                topology=topo,
                on_invalid_document=on_invalid,
            ).model_dump(),
        )
        for i, r in enumerate(ranges)
    ]
    children = store.split(parent.id, chunks)
    log.info("import %s: %d chunk(s) over %d bytes of %s", parent.id, len(children), ref.size, request.uri)
    return PlannedImport(
        parent=store.get(parent.id),
        chunk_ids=[c.id for c in children],
        data_uri=ref.uri,
        primary_key=primary_key,
        bytes_total=ref.size,
    )


def _infer_primary_key(ref: DumpRef) -> str:
    """Meilisearch's rule: the one top-level field of the first document whose name ends in ``id``."""
    reader = open_range(ref, 0, min(ref.size, 1 << 20))
    try:
        head = reader.read(1 << 20)
    finally:
        reader.close()
    for line in head.split(b"\n"):
        line = line.strip().removeprefix(b"\xef\xbb\xbf")
        if not line:
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            break
        if isinstance(doc, dict):
            candidates = [k for k in doc if k.lower().endswith("id")]
            if len(candidates) == 1:
                return str(candidates[0])
            raise ValueError(
                f"{ref.uri}: cannot infer the primary key (candidates: {candidates or 'none'}); "
                "pass --primary-key"
            )
        break
    raise ValueError(f"{ref.uri}: cannot infer the primary key from the first line; pass --primary-key")


class _DeadLetter:
    """Per-chunk dead-letter NDJSON file, truncated on resume to what the last progress recorded."""

    def __init__(self, path: Path, committed_bytes: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: BinaryIO = open(path, "ab+")  # noqa: SIM115 - closed in close()
        self._fh.truncate(committed_bytes)
        self._fh.seek(committed_bytes)
        self.size = committed_bytes

    def write(self, record: Mapping[str, Any]) -> None:
        data = orjson.dumps(record) + b"\n"
        self._fh.write(data)
        self.size += len(data)

    def sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()


def process_dump_chunk(
    store: JobStore,
    lease: Lease,
    targets: Mapping[str, NodeTarget],
    settings: PipelineSettings,
    *,
    on_batch: Callable[[ChunkReport], None] | None = None,
) -> ChunkReport:
    """Import one chunk under ``lease``: resume at the cursor, commit progress after every batch
    all targets acknowledged, complete under the fence. Fails the row (retryable or not) on
    error; on :class:`LeaseLost` stops at once and leaves the row to its new holder."""
    return run_under_lease(
        store, lease, settings, lambda k: _run_chunk(store, k, targets, settings, on_batch), permanent=(InvalidDocumentError,)
    )


def _run_chunk(
    store: JobStore,
    keeper: LeaseKeeper,
    targets: Mapping[str, NodeTarget],
    settings: PipelineSettings,
    on_batch: Callable[[ChunkReport], None] | None,
) -> ChunkReport:
    started = time.monotonic()
    lease = keeper.lease
    job = lease.job
    params = DumpChunkParams.model_validate(job.params)
    topology = Topology.parse(params.topology, source=f"chunk {job.id} params")
    router = Router(topology)
    doc_router = DocumentRouter(router, params.primary_key, settings.max_document_bytes)
    node_targets = [targets[n] for n in router.node_ids]
    prog = dict(job.progress)
    cursor = int(prog.get("last_cursor", params.start))
    if not params.start <= cursor <= params.end:
        raise ValueError(f"chunk {job.id}: cursor {cursor} outside [{params.start}, {params.end})")
    report = ChunkReport(
        chunk_id=job.id,
        attempt=lease.attempt,
        resumed_from=cursor if cursor > params.start else 0,
        documents=int(prog.get("docs_routed", 0)),
        bytes=cursor - params.start,
        invalid_documents=int(prog.get("invalid_documents", 0)),
        per_node={n: int(prog.get("per_node", {}).get(n, 0)) for n in router.node_ids},
    )
    doc_router.set_per_node_docs([report.per_node[n] for n in router.node_ids])
    blank_lines = int(prog.get("blank_lines", 0))
    if report.resumed_from:
        log.info("chunk %s attempt %d resumes at byte %d", job.id, lease.attempt, cursor)
    for t in node_targets:
        t.ensure_index(params.index_uid, params.primary_key, None)

    ref = resolve_dump(params.data_uri, None)
    dead: _DeadLetter | None = None
    if params.on_invalid_document == "skip":
        parent = job.parent_job_id or "orphans"
        dead = _DeadLetter(
            Path(settings.dead_letter_dir) / parent / f"{job.id}.ndjson", int(prog.get("dead_letter_bytes", 0))
        )
        report.dead_letter = str(dead.path)
    line_counter = _LineCounter(ref)
    pool = ThreadPoolExecutor(max_workers=max(1, len(node_targets)), thread_name_prefix=f"flush-{job.id}")

    # One batch may be in flight while the next is routed; writes of a batch start only once the
    # previous batch is acknowledged (so a later version of a document always lands last), and
    # a batch's progress is saved only after every target acknowledged it.
    in_flight: list[tuple[list[Future[None]], dict[str, Any]]] = []

    def settle() -> None:
        while in_flight:
            writes, progress = in_flight.pop()
            for w in writes:
                w.result()  # raises the node's TargetError
            if dead is not None:
                dead.sync()
            keeper.check()
            store.save_progress(keeper.lease, progress)
            if on_batch is not None:
                on_batch(report)

    def flush(pos: int, *, last: bool = False) -> None:
        settle()
        batches = doc_router.take_buffers()
        report.per_node = dict(zip(router.node_ids, doc_router.per_node_docs, strict=True))
        report.bytes = pos - params.start
        progress = {
            "last_cursor": pos,
            "bytes_processed": report.bytes,
            "docs_routed": report.documents,
            "invalid_documents": report.invalid_documents,
            "blank_lines": blank_lines,
            "per_node": report.per_node,
            "dead_letter_bytes": dead.size if dead else 0,
        }
        writes = [
            pool.submit(t.write_routed, params.index_uid, params.primary_key, b.lines, b.keys, b.shards)
            for t, b in zip(node_targets, batches, strict=True)
            if b.lines
        ]
        in_flight.append((writes, progress))
        if last or DRAIN.is_set():
            settle()
        if DRAIN.is_set() and pos < params.end:
            store.release(keeper.lease)
            raise ChunkHandedBack(f"chunk {job.id} handed back at byte {pos} because this worker is shutting down")

    blocks: Generator[bytes, None, None] = iter_range_blocks(ref, cursor, params.end, settings.read_block_bytes)  # type: ignore[assignment]
    try:
        pos = cursor  # file offset of the first byte not yet routed
        leftover = b""
        skipping_long_line = False
        while True:
            data = next(blocks, b"")
            if not data:
                if not leftover or skipping_long_line:
                    break
                block, leftover = leftover, b""
            else:
                buf = leftover + data if leftover else data
                cut = buf.rfind(b"\n")
                if skipping_long_line:
                    if cut < 0:
                        pos += len(buf)
                        leftover = b""
                        continue
                    first_nl = buf.find(b"\n")
                    pos += first_nl + 1
                    buf = buf[first_nl + 1:]
                    cut = buf.rfind(b"\n")
                    skipping_long_line = False
                if cut < 0:
                    leftover = buf
                    if len(leftover) > settings.max_document_bytes:
                        bad = InvalidLine(0, 0, f"line is longer than the {settings.max_document_bytes}-byte document limit", leftover[:256])
                        _handle_invalid(params, line_counter, pos, [bad], dead, report)
                        pos += len(leftover)
                        leftover = b""
                        skipping_long_line = True
                    continue
                block, leftover = buf[: cut + 1], buf[cut + 1:]
            invalid: list[InvalidLine] = []
            result = doc_router.route_block(block, at_file_start=pos == 0, invalid=invalid)
            if invalid:
                _handle_invalid(params, line_counter, pos, invalid, dead, report)
            line_counter.advance(pos, pos + len(block), result.lines)
            blank_lines += result.blank_lines
            report.documents += result.documents
            metrics.DUMP_IMPORT_BYTES_READ.inc(len(block))
            metrics.DUMP_IMPORT_DOCUMENTS_ROUTED.inc(result.documents)
            pos += len(block)
            if (
                doc_router.buffered_docs >= settings.batch_size
                or doc_router.buffered_bytes >= settings.memory_buffer_bytes // 2
            ):
                flush(pos)
        flush(pos, last=True)
    finally:
        blocks.close()
        pool.shutdown(wait=True)
        if dead is not None:
            dead.close()
    report.duration_s = time.monotonic() - started
    return report


class _LineCounter:
    """Global line numbers for error messages, computed lazily (only an invalid line pays)."""

    def __init__(self, ref: DumpRef) -> None:
        self._ref = ref
        self._known: tuple[int, int] | None = None  # (offset, newlines before offset)

    def line_at(self, offset: int) -> int:
        """1-based line number of the line starting at ``offset``."""
        if self._known is None or self._known[0] > offset:
            self._known = (0, 0)
        start, count = self._known
        if offset > start:
            reader = open_range(self._ref, start, offset)
            try:
                while chunk := reader.read(8 << 20):
                    count += chunk.count(b"\n")
            finally:
                reader.close()
            self._known = (offset, count)
        return count + 1

    def advance(self, block_start: int, block_end: int, newlines: int) -> None:
        """Keep the known position moving with the reader so later lookups stay cheap."""
        if self._known is not None and self._known[0] == block_start:
            self._known = (block_end, self._known[1] + newlines)


def _handle_invalid(
    params: DumpChunkParams,
    counter: _LineCounter,
    block_pos: int,
    invalid: list[InvalidLine],
    dead: _DeadLetter | None,
    report: ChunkReport,
) -> None:
    for bad in invalid:
        offset = block_pos + bad.offset_in_block
        line_no = counter.line_at(block_pos) + bad.line_in_block
        where = f"{params.source_uri}: line {line_no}, byte offset {offset}"
        if dead is None:
            raise InvalidDocumentError(
                f"{where}: {bad.reason}. Fix the line, or rerun with on_invalid_document=skip "
                "to send such lines to a dead-letter file"
            )
        dead.write(
            {
                "dump": params.source_uri,
                "line": line_no,
                "byte_offset": offset,
                "reason": bad.reason,
                "raw": bad.raw.decode("utf-8", "backslashreplace"),
            }
        )
        report.invalid_documents += 1
        metrics.INVALID_DOCUMENTS.labels(job_type=JobType.DUMP_IMPORT, policy="skip").inc()
