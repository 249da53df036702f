"""Processing one dump chunk: read its byte range from the cursor, parse only each line's
primary key, route, tag with ``_miroir_shard`` and hand batches to the chunk pipeline."""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from miroir_pipeline import metrics
from miroir_pipeline.fleet.routing import Router
from miroir_pipeline.fleet.shard_tag import shard_prefixes, untag
from miroir_pipeline.fleet.targets.base import (
    NodeTarget,
    RefusedDocument,
    RequestRefused,
    TargetError,
)
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.dump_import.dead_letter import DeadLetter, DeadLetterMissing
from miroir_pipeline.jobs.dump_import.document_router import (
    BLANKS,
    BOM,
    DocumentRouter,
    InvalidLine,
)
from miroir_pipeline.jobs.dump_import.params import (
    DUMP_IMPORT,
    ChunkReport,
    DumpChunkParams,
    InvalidDocumentError,
    ReplicasDisagree,
)
from miroir_pipeline.jobs.pipeline import Batch, Refusals, run_batches
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue.contract import JobStore, Lease
from miroir_pipeline.queue.lease import LeaseKeeper, run_under_lease
from miroir_pipeline.queue.shutdown import Shutdown
from miroir_pipeline.sources import DumpRef, iter_line_blocks, open_range, resolve_planned_dump

__all__ = ["process_dump_chunk"]

log = logging.getLogger(__name__)


def process_dump_chunk(
    store: JobStore,
    lease: Lease,
    targets: Mapping[str, NodeTarget],
    settings: PipelineSettings,
    *,
    shutdown: Shutdown | None = None,
    on_batch: Callable[[ChunkReport], None] | None = None,
) -> ChunkReport:
    """Import one chunk under ``lease``: resume at the cursor, commit progress after every batch
    all targets acknowledged, complete under the fence. Fails the row (retryable, or for good
    for invalid input) on error; on a lost lease stops at once and leaves the row to its new
    holder; on ``shutdown`` hands the chunk back at its last committed cursor."""
    return run_under_lease(
        store,
        lease,
        lambda keeper: _run_chunk(store, keeper, targets, settings, shutdown or Shutdown(), on_batch),
        ttl=settings.lease_ttl,
        heartbeat_interval=settings.heartbeat_interval,
        permanent=(InvalidDocumentError, ReplicasDisagree, RequestRefused),
        plain=(TargetError, DeadLetterMissing),
    )


def _run_chunk(
    store: JobStore,
    keeper: LeaseKeeper,
    targets: Mapping[str, NodeTarget],
    settings: PipelineSettings,
    shutdown: Shutdown,
    on_batch: Callable[[ChunkReport], None] | None,
) -> ChunkReport:
    started = time.monotonic()
    lease = keeper.lease
    job = lease.job
    params = DumpChunkParams.model_validate(job.params)
    router = Router(Topology.parse(params.topology, source=f"chunk {job.id} params"))
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
    if report.resumed_from:
        log.info("chunk %s attempt %d resumes at byte %d", job.id, lease.attempt, cursor)
    node_targets = [targets[n] for n in router.node_ids]
    for t in node_targets:
        t.ensure_index(params.index_uid, params.primary_key, None)
    dead: DeadLetter | None = None
    refused_dead: DeadLetter | None = None
    if params.on_invalid_document == "skip":
        folder = Path(settings.dead_letter_dir) / (job.parent_job_id or "orphans")
        dead = DeadLetter(folder / f"{job.id}.ndjson", int(prog.get("dead_letter_bytes", 0)))
        # Documents a node refused are only known once their batch is acknowledged, after the
        # router has moved on: they get their own file, so each file's committed size holds.
        try:
            refused_dead = DeadLetter(folder / f"{job.id}.refused.ndjson", int(prog.get("refused_dead_letter_bytes", 0)))
        except DeadLetterMissing:
            dead.close()
            raise
        report.dead_letter = str(dead.path)
        report.refused_dead_letter = str(refused_dead.path)
    routed = metrics.CommittedCount(metrics.DUMP_IMPORT_DOCUMENTS_ROUTED, report.documents)
    read = metrics.CommittedCount(metrics.DUMP_IMPORT_BYTES_READ, report.bytes)

    def committed(batch: Batch) -> None:
        routed.commit(int(batch.progress["docs_routed"]))
        read.commit(int(batch.progress["bytes_processed"]))
        if on_batch is not None:
            on_batch(report)

    try:
        data = resolve_planned_dump(params.data_uri, params.data_size, (cursor, params.end))
        line_counter = _LineCounter(data)
        refusals = _RefusedByNodes(params, router, line_counter, refused_dead, report)
        run_batches(
            store,
            keeper,
            node_targets,
            params.index_uid,
            params.primary_key,
            _batches(params, data, router, node_targets, settings, cursor, int(prog.get("blank_lines", 0)), report, dead, line_counter),
            shutdown,
            window_bytes=settings.window_bytes,
            before_commit=lambda batch: refusals.amend(batch, dead),
            on_commit=committed,
            on_refused=refusals.record,
        )
    finally:
        for file in (dead, refused_dead):
            if file is not None:
                file.close()
    refusals.settle_report()
    report.duration_s = time.monotonic() - started
    return report



class _RefusedByNodes:
    """Documents the nodes refused for what they are (found after their batch was written).

    Under ``fail`` the first one stops the chunk naming its line; under ``skip`` each goes to the
    dead letter with the node's own message. The router counted them as routed when it took
    them, so the progress of every later commit is amended by what was refused so far.
    """

    def __init__(
        self,
        params: DumpChunkParams,
        router: Router,
        line_counter: _LineCounter,
        dead: DeadLetter | None,
        report: ChunkReport,
    ) -> None:
        self.params = params
        self.node_ids = router.node_ids
        self.line_counter = line_counter
        self.dead = dead
        self.report = report
        self.documents = 0
        self.per_node: dict[str, int] = {}

    def record(self, batch: Batch, refusals: Refusals) -> None:
        # One document goes to a node of every replica group, so its refusals are grouped by
        # its bytes; identical dump lines are separate documents, counted by how often each
        # node refused them, each placed at its own line.
        found: dict[bytes, dict[str, list[RefusedDocument]]] = {}
        for target_index, exc in sorted(refusals.items()):
            node = self.node_ids[target_index]
            for refused in exc.refused:
                doc = bytes(batch.lines[target_index][refused.position])
                found.setdefault(doc, {}).setdefault(node, []).append(refused)
        start, end = int(batch.extra["start"]), int(batch.extra["end"])
        data = _read(self.line_counter.ref, start, end)
        for doc, by_node in found.items():
            self._agree(batch, doc, by_node, data, start, end)
            search_from = 0
            for copy in range(max(len(r) for r in by_node.values())):
                node, refused = next((n, r[copy]) for n, r in by_node.items() if copy < len(r))
                line_no, offset, search_from = self._locate(doc, data, start, search_from)
                self._refuse(doc, node, refused, line_no, offset, start, end)
            for n, r in by_node.items():
                self.per_node[n] = self.per_node.get(n, 0) + len(r)

    def _place(self, line_no: int, offset: int, start: int, end: int) -> str:
        """Where a refused document stands in the dump (its batch's byte range when its line
        cannot be found)."""
        if line_no:
            return f"{_where(self.params)}: line {line_no}, byte offset {offset}"
        return f"{_where(self.params)}: a line between byte offsets {start} and {end}"

    def _agree(
        self, batch: Batch, doc: bytes, by_node: dict[str, list[RefusedDocument]], data: bytes, start: int, end: int
    ) -> None:
        """Raise :class:`ReplicasDisagree` when a node that was sent ``doc`` wrote it while
        another refused it."""
        wrote = [
            node
            for node, lines in zip(self.node_ids, batch.lines, strict=True)
            if node not in by_node and any(line == doc for line in lines)
        ]
        if not wrote:
            return
        line_no, offset, _ = self._locate(doc, data, start, 0)
        where = self._place(line_no, offset, start, end)
        refused = "; ".join(f"node {node} refused it: {r[0].message}" for node, r in sorted(by_node.items()))
        raise ReplicasDisagree(
            f"{where}: nodes holding the same shard disagree about this document: {refused}; "
            f"node(s) {', '.join(wrote)} wrote it. Give those nodes the same Meilisearch version, "
            "index settings and payload limit, then retry the chunk (its progress is kept)"
        )

    def _refuse(
        self, doc: bytes, node: str, refused: RefusedDocument, line_no: int, offset: int, start: int, end: int
    ) -> None:
        where = self._place(line_no, offset, start, end)
        if self.dead is None:
            raise InvalidDocumentError(
                f"{where}: node {node} refused the document: {refused.message}. Fix the line, or "
                "rerun with --on-invalid skip (on_invalid_document: skip in Dagster run config) to "
                "send such documents to a dead-letter file"
            )
        self.dead.write(
            {
                **_dead_letter_source(self.params),
                "line": line_no,
                "byte_offset": offset,
                "reason": f"node {node} refused the document: {refused.message}",
                "node": node,
                "code": refused.code,
                "raw": untag(doc).decode("utf-8", "backslashreplace"),
            }
        )
        self.documents += 1
        metrics.INVALID_DOCUMENTS.labels(job_type=DUMP_IMPORT, policy="skip").inc()

    def amend(self, batch: Batch, dead: DeadLetter | None) -> None:
        """Before a commit: make the dead letters durable and take the refusals out of the
        batch's counts (its progress was taken when the router handed the batch over)."""
        if dead is not None:
            dead.sync()
        if self.dead is not None:
            self.dead.sync()
            batch.progress["refused_dead_letter_bytes"] = self.dead.size
        if not self.documents:
            return
        progress = batch.progress
        progress["docs_routed"] = int(progress["docs_routed"]) - self.documents
        progress["invalid_documents"] = int(progress["invalid_documents"]) + self.documents
        progress["per_node"] = {n: c - self.per_node.get(n, 0) for n, c in progress["per_node"].items()}

    def settle_report(self) -> None:
        """The final report counts refused documents as invalid, not as routed."""
        self.report.documents -= self.documents
        self.report.invalid_documents += self.documents
        self.report.per_node = {n: c - self.per_node.get(n, 0) for n, c in self.report.per_node.items()}

    def _locate(self, doc: bytes, data: bytes, start: int, search_from: int) -> tuple[int, int, int]:
        """(line number, byte offset) of the first dump line at or after ``search_from`` that a
        refused document came from, and where to look for its next copy; line 0 when it cannot
        be found (a document whose ``_miroir_shard`` the router replaced).

        The line must be the document whole (give or take the BOM and the blanks the router
        strips): the same bytes inside a longer line, or ending one, are another document."""
        body = untag(doc)[1:]  # what follows the opening brace, as the dump has it
        at = data.find(body, search_from)
        while at >= 0:
            line_start = data.rfind(b"\n", 0, at) + 1
            line_end = data.find(b"\n", at)
            if line_end < 0:
                line_end = len(data)
            before = data[line_start : at - 1]
            if (
                at > line_start
                and data[at - 1] == 123  # "{"
                and not before.removeprefix(BOM).strip(BLANKS)
                and not data[at + len(body) : line_end].strip(BLANKS)
            ):
                return (
                    self.line_counter.line_at(start) + data.count(b"\n", 0, line_start),
                    start + line_start,
                    line_end + 1,
                )
            at = data.find(body, at + 1)
        return 0, 0, search_from


def _read(ref: DumpRef, start: int, end: int) -> bytes:
    reader = open_range(ref, start, end)
    try:
        return bytes(reader.read(end - start))
    finally:
        reader.close()


def document_limit(max_document_bytes: int, router: Router, targets: Sequence[NodeTarget]) -> tuple[int, str]:
    """The longest line a chunk routes, and where that limit comes from: ``max_document_bytes``,
    or less when a target node takes smaller request bodies. A document that cannot fit in one
    body once tagged with its shard can never be sent, so it is an invalid document at its own
    line (failed or dead-lettered by the policy), not a node error retried until the chunk
    gives up."""
    limit, name = max_document_bytes, "max_document_bytes"
    tag_and_newline = max(map(len, shard_prefixes(router.shards))) - 1 + 1
    for node_id, target in zip(router.node_ids, targets, strict=True):
        body = target.payload_limit_bytes
        if body is not None and body - tag_and_newline < limit:
            limit = body - tag_and_newline
            name = (
                f"what fits in node {node_id}'s {body}-byte payload limit with the shard tag; "
                "payload_limit_bytes in the topology"
            )
    return limit, name


def _batches(
    params: DumpChunkParams,
    ref: DumpRef,
    router: Router,
    node_targets: Sequence[NodeTarget],
    settings: PipelineSettings,
    cursor: int,
    blank_lines: int,
    report: ChunkReport,
    dead: DeadLetter | None,
    line_counter: _LineCounter,
) -> Iterator[Batch]:
    """Route the chunk's lines from ``cursor`` and yield a batch whenever the buffers fill (by
    documents or by bytes, so memory stays bounded whatever the chunk size), then a final one."""
    doc_limit, limit_name = document_limit(settings.max_document_bytes, router, node_targets)
    doc_router = DocumentRouter(router, params.primary_key, doc_limit, limit_name)
    doc_router.set_per_node_docs([report.per_node[n] for n in router.node_ids])
    batch_start = cursor

    def batch(pos: int, *, final: bool = False) -> Batch:
        nonlocal batch_start
        routed = doc_router.take_buffers()
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
        done = Batch(
            lines=[b.lines for b in routed],
            keys=[b.keys for b in routed],
            shards=[b.shards for b in routed],
            progress=progress,
            position=f"byte {pos}",
            final=final,
            extra={"start": batch_start, "end": pos},
            checked=True,  # the router routes only lines that pass the document rules
        )
        batch_start = pos
        return done

    blocks = iter_line_blocks(ref, cursor, params.end, settings.read_block_bytes, doc_limit)
    try:
        pos = cursor  # file offset of the first byte not yet routed
        for data, _at, end, overlong in blocks:  # _at == pos: blocks follow each other
            if overlong:
                bad = InvalidLine(0, 0, f"line is longer than the {doc_limit}-byte document limit ({limit_name})", data)
                _handle_invalid(params, line_counter, pos, [bad], dead, report)
                pos += end
                continue
            invalid: list[InvalidLine] = []
            result = doc_router.route_block(data, at_file_start=pos == 0, invalid=invalid, end=end)
            if invalid:
                _handle_invalid(params, line_counter, pos, invalid, dead, report)
            line_counter.advance(pos, pos + end, result.lines)
            blank_lines += result.blank_lines
            report.documents += result.documents
            pos += end
            if (
                doc_router.buffered_docs >= settings.batch_size
                or doc_router.buffered_bytes >= settings.effective_batch_bytes
            ):
                yield batch(pos)
        yield batch(pos, final=True)
    finally:
        blocks.close()


class _LineCounter:
    """Global line numbers for error messages, computed lazily (only an invalid line pays).

    Known positions are kept as checkpoints (offset, newlines before it): the router runs a
    window ahead of the refusals the nodes report, so a lookup may go back, and it counts from
    the nearest checkpoint before it rather than from the start of the dump."""

    _MAX_POINTS = 4096

    def __init__(self, ref: DumpRef) -> None:
        self.ref = ref
        self._points: list[tuple[int, int]] = [(0, 0)]  # sorted by offset

    def line_at(self, offset: int) -> int:
        """1-based line number of the line starting at ``offset``."""
        start, count = self._points[bisect.bisect_right(self._points, (offset, float("inf"))) - 1]
        if offset > start:
            reader = open_range(self.ref, start, offset)
            try:
                while chunk := reader.read(8 << 20):
                    count += chunk.count(b"\n")
            finally:
                reader.close()
            self._remember(offset, count)
        return count + 1

    def advance(self, block_start: int, block_end: int, newlines: int) -> None:
        """Keep a checkpoint moving with the reader so later lookups stay cheap."""
        at = bisect.bisect_left(self._points, (block_start, -1))
        if at < len(self._points) and self._points[at][0] == block_start:
            self._remember(block_end, self._points[at][1] + newlines)

    def _remember(self, offset: int, count: int) -> None:
        if len(self._points) < self._MAX_POINTS:
            bisect.insort(self._points, (offset, count))


def _where(params: DumpChunkParams) -> str:
    """The dump as an error names it; a staged one says its lines are counted in the staged copy."""
    if params.source_kind == "gzip":
        return f"{params.source_uri} (decompressed, as staged in {params.data_uri})"
    if params.source_kind == "meilisearch_dump":
        return f"{params.source_uri} (the index's documents.jsonl, as staged in {params.data_uri})"
    return params.source_uri


def _dead_letter_source(params: DumpChunkParams) -> dict[str, str]:
    """Where a dead-lettered line is: the dump, and its staged copy when lines are counted there."""
    if params.source_kind == "ndjson":
        return {"dump": params.source_uri}
    return {"dump": params.source_uri, "staged_as": params.data_uri}


def _handle_invalid(
    params: DumpChunkParams,
    counter: _LineCounter,
    block_pos: int,
    invalid: list[InvalidLine],
    dead: DeadLetter | None,
    report: ChunkReport,
) -> None:
    for bad in invalid:
        offset = block_pos + bad.offset_in_block
        line_no = counter.line_at(block_pos) + bad.line_in_block
        where = f"{_where(params)}: line {line_no}, byte offset {offset}"
        if dead is None:
            raise InvalidDocumentError(
                f"{where}: {bad.reason}. Fix the line, or rerun with --on-invalid skip "
                "(on_invalid_document: skip in Dagster run config) to send such lines to a dead-letter file"
            )
        dead.write(
            {
                **_dead_letter_source(params),
                "line": line_no,
                "byte_offset": offset,
                "reason": bad.reason,
                "raw": bad.raw.decode("utf-8", "backslashreplace"),
            }
        )
        report.invalid_documents += 1
        metrics.INVALID_DOCUMENTS.labels(job_type=DUMP_IMPORT, policy="skip").inc()
