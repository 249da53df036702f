"""Processing one reshard chunk: read every document of a live shard range back page by page
from a replica holding it, re-hash it under the new shard count, retag it and hand batches to
the chunk pipeline, which writes them to the shadow index and commits the ``shard:offset``
cursor."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import msgspec
import orjson

from miroir_pipeline import metrics
from miroir_pipeline.fleet.replica_reads import ShardReader
from miroir_pipeline.fleet.routing import Router, primary_key_text
from miroir_pipeline.fleet.shard_tag import TAG_START, retag
from miroir_pipeline.fleet.targets.base import NodeTarget, RequestRefused, TargetError
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.pipeline import Batch, Refusals, run_batches
from miroir_pipeline.jobs.reshard_backfill.live_pages import LivePages, ShardPosition
from miroir_pipeline.jobs.reshard_backfill.params import (
    READ_PAGE_DOCS,
    InvalidLiveDocument,
    ReshardChunkParams,
    ReshardChunkReport,
    format_cursor,
    parse_cursor,
)
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue.contract import JobStore, Lease
from miroir_pipeline.queue.lease import LeaseKeeper, run_under_lease
from miroir_pipeline.queue.shutdown import Shutdown

__all__ = ["process_reshard_chunk"]

log = logging.getLogger(__name__)


def process_reshard_chunk(
    store: JobStore,
    lease: Lease,
    live_targets: Mapping[str, NodeTarget],
    shadow_targets: Mapping[str, NodeTarget],
    settings: PipelineSettings,
    *,
    shutdown: Shutdown | None = None,
    on_batch: Callable[[ReshardChunkReport, str], None] | None = None,
) -> ReshardChunkReport:
    """Backfill one shard range under ``lease``: resume at the cursor, commit progress after every
    batch all shadow targets acknowledged, complete under the fence. Fails the row (retryable or
    not) on error; on a lost lease stops at once and leaves the row to its new holder; on
    ``shutdown`` hands it back. ``on_batch(report, cursor)`` runs after every committed batch."""
    return run_under_lease(
        store,
        lease,
        lambda keeper: _run_chunk(
            store, keeper, live_targets, shadow_targets, settings, shutdown or Shutdown(), on_batch
        ),
        ttl=settings.lease_ttl,
        heartbeat_interval=settings.heartbeat_interval,
        permanent=(InvalidLiveDocument, RequestRefused),
        plain=(TargetError,),
    )


def _run_chunk(
    store: JobStore,
    keeper: LeaseKeeper,
    live_targets: Mapping[str, NodeTarget],
    shadow_targets: Mapping[str, NodeTarget],
    settings: PipelineSettings,
    shutdown: Shutdown,
    on_batch: Callable[[ReshardChunkReport, str], None] | None,
) -> ReshardChunkReport:
    started = time.monotonic()
    lease = keeper.lease
    job = lease.job
    params = ReshardChunkParams.model_validate(job.params)
    live_router = Router(Topology.parse(params.live_topology, source=f"chunk {job.id} live_topology"))
    shadow_router = Router(Topology.parse(params.shadow_topology, source=f"chunk {job.id} shadow_topology"))
    start, end = params.shard_start, params.shard_end
    prog = dict(job.progress)
    cursor = str(prog.get("last_cursor") or format_cursor(start, 0))
    shard, offset = parse_cursor(cursor)
    if not (start <= shard < end or (shard == end and offset == 0)):
        raise ValueError(f"chunk {job.id}: cursor {cursor} outside shards [{start}, {end})")
    report = ReshardChunkReport(
        chunk_id=job.id,
        attempt=lease.attempt,
        shard_start=start,
        shard_end=end,
        resumed_from=cursor if (shard, offset) != (start, 0) else None,
        documents=int(prog.get("documents_backfilled", 0)),
        per_node={n: int(prog.get("per_node", {}).get(n, 0)) for n in shadow_router.node_ids},
    )
    if report.resumed_from:
        log.info("chunk %s attempt %d resumes at %s", job.id, lease.attempt, cursor)
    node_targets = [shadow_targets[n] for n in shadow_router.node_ids]
    for t in node_targets:
        if not t.index_exists(params.shadow_uid):
            raise InvalidLiveDocument(
                f"chunk {job.id}: shadow index {params.shadow_uid} is missing on node {t.node_id}; "
                "it was deleted after planning. Plan the reshard again"
            )
    reader = ShardReader(live_router, live_targets, params.index_uid)
    pages = LivePages(
        reader,
        functools.partial(_live_key, params),
        max(1, min(READ_PAGE_DOCS, settings.batch_size)),
        f"index {params.index_uid}",
    )
    pos = ShardPosition(shard, offset, prog.get("read_node") if offset else None)
    if offset:
        pos.tail.extend(str(k).encode() for k in prog.get("tail_keys") or ())
    backfilled = metrics.CommittedCount(metrics.RESHARD_DOCUMENTS_BACKFILLED, report.documents)

    def committed(batch: Batch) -> None:
        backfilled.commit(int(batch.progress["documents_backfilled"]))
        if on_batch is not None:
            on_batch(report, batch.position)

    run_batches(
        store,
        keeper,
        node_targets,
        params.shadow_uid,
        params.primary_key,
        _batches(
            params, pages, pos, shadow_router, [t.payload_limit_bytes for t in node_targets], settings, report,
            prog if offset else {},
        ),
        shutdown,
        window_bytes=settings.window_bytes,
        on_commit=committed,
        on_refused=lambda batch, refusals: _refused(params, shadow_router, batch, refusals),
    )
    report.duration_s = time.monotonic() - started
    return report


def _refused(params: ReshardChunkParams, router: Router, batch: Batch, refusals: Refusals) -> None:
    """A live document the shadow's nodes refuse cannot be backfilled: the chunk stops for good,
    naming the document and the node's own words (the live index holds it, so it is for an
    operator to look at, not for a retry)."""
    target_index, exc = min(refusals.items())
    first = exc.refused[0]
    pk = batch.keys[target_index][first.position]
    raise InvalidLiveDocument(
        f"index {params.index_uid}: shadow node {router.node_ids[target_index]} refused live document "
        f"{pk!r} ({len(exc.refused)} refused in the batch ending at {batch.position}): {first.message}"
    )


def _batches(
    params: ReshardChunkParams,
    pages: LivePages,
    pos: ShardPosition,
    router: Router,
    payload_limits: Sequence[int | None],
    settings: PipelineSettings,
    report: ReshardChunkReport,
    resumed: Mapping[str, Any],
) -> Iterator[Batch]:
    """Read and re-hash the range from ``pos``; yield a batch whenever it fills (by documents
    or bytes), then a final one at ``end:0``. A document one of its shadow nodes cannot take in
    one request (``payload_limits``) stops the chunk for good, naming it.

    ``report`` counts each document once, however often it is read: when a shard is read again
    from its start (another replica, or the read lost its place), what was counted of that shard
    (``shard_documents`` and ``shard_per_node`` of a resumed cursor, and what this attempt read)
    is taken back first."""
    end = params.shard_end
    nodes = len(router.node_ids)
    lines: list[list[bytes]] = [[] for _ in range(nodes)]
    keys: list[list[str | int]] = [[] for _ in range(nodes)]
    shards: list[list[int]] = [[] for _ in range(nodes)]
    docs = nbytes = 0
    per_node = [report.per_node[n] for n in router.node_ids]
    # The current shard's share of the counts.
    in_shard = [int((resumed.get("shard_per_node") or {}).get(n, 0)) for n in router.node_ids]
    counted = resumed.get("shard_documents")
    in_shard_docs = pos.offset if counted is None else int(counted)  # before: one per position

    def batch(next_shard: int, next_offset: int, tail: list[bytes], *, final: bool = False) -> Batch:
        nonlocal lines, keys, shards, docs, nbytes
        report.per_node = dict(zip(router.node_ids, per_node, strict=True))
        at = format_cursor(next_shard, next_offset)
        mid = bool(next_offset)  # inside a shard: what resuming there needs
        done = Batch(
            lines=lines,
            keys=keys,
            shards=shards,
            progress={
                "last_cursor": at,
                "documents_backfilled": report.documents,
                "shards_done": next_shard - params.shard_start,
                "per_node": dict(report.per_node),
                # The node the cursor's offset refers to (offsets are per node); None at a shard start.
                "read_node": pos.node if mid else None,
                # The keys the next page overlaps, and what the counts hold of the shard (taken
                # back if it is read again from its start).
                "tail_keys": [t.decode() for t in tail] if mid else None,
                "shard_documents": in_shard_docs if mid else None,
                "shard_per_node": dict(zip(router.node_ids, in_shard, strict=True)) if mid else None,
            },
            position=at,
            final=final,
        )
        lines = [[] for _ in range(nodes)]
        keys = [[] for _ in range(nodes)]
        shards = [[] for _ in range(nodes)]
        docs = nbytes = 0
        return done

    while pos.shard < end:
        shard = pos.shard
        page = pages.next(pos)
        if page.restarted:
            report.documents -= in_shard_docs
            per_node = [c - s for c, s in zip(per_node, in_shard, strict=True)]
            in_shard, in_shard_docs = [0] * nodes, 0
        for at, (raw, pk, text) in enumerate(zip(page.docs, page.keys, page.texts, strict=True), start=1):
            new_shard = router.shard(text)
            data = retag(raw, new_shard)
            for i in router.targets[new_shard]:
                limit = payload_limits[i]
                if limit is not None and len(data) + 1 > limit:
                    raise InvalidLiveDocument(
                        f"index {params.index_uid} shard {shard}: live document {pk!r} is {len(data)} "
                        f"bytes with its new shard tag, more than shadow node {router.node_ids[i]}'s "
                        f"{limit}-byte payload limit can carry (payload_limit_bytes in the topology). "
                        "Raise the node's limit (and its --http-payload-size-limit) in the workers' "
                        "topology, or shrink the document in the live index, then retry the chunk"
                    )
                lines[i].append(data)
                keys[i].append(pk)
                shards[i].append(new_shard)
                per_node[i] += 1
                in_shard[i] += 1
            docs += 1
            in_shard_docs += 1
            report.documents += 1
            # Every copy is held until its node acknowledges it, so every copy counts; checked
            # per document, as a page of large documents alone can exceed the budget.
            nbytes += len(data) * len(router.targets[new_shard])
            if (docs >= settings.batch_size or nbytes >= settings.effective_batch_bytes) and at < len(page.docs):
                yield batch(shard, page.base + at, page.tail_after(at))
        if page.last:
            pos.shard, pos.offset, pos.node, pos.restarts = shard + 1, 0, None, 0
            pos.tail.clear()
            in_shard, in_shard_docs = [0] * nodes, 0
        if docs >= settings.batch_size or nbytes >= settings.effective_batch_bytes:
            yield batch(pos.shard, pos.offset, list(pos.tail))
    yield batch(end, 0, [], final=True)


def _live_key(params: ReshardChunkParams, raw: bytes) -> tuple[str | int, bytes]:
    """A live document's primary key: its value and its text (what is hashed).

    Documents the pipeline wrote start with the shard tag; their primary key is decoded alone.
    Anything else is decoded in full once.
    """
    pk_field = params.primary_key
    try:
        if raw.startswith(TAG_START):
            pk = _decoder(pk_field).decode(raw).pk
        else:
            pk = orjson.loads(raw)[pk_field]
        return pk, primary_key_text(pk)
    except (orjson.JSONDecodeError, msgspec.DecodeError, msgspec.ValidationError, TypeError, KeyError, ValueError) as exc:
        what = f"no {pk_field!r} field" if isinstance(exc, KeyError | TypeError) else str(exc)
        raise InvalidLiveDocument(
            f"index {params.index_uid}: a live document cannot be re-hashed ({what}): "
            f"{raw[:200].decode('utf-8', 'replace')}"
        ) from None


@functools.lru_cache(maxsize=16)
def _decoder(pk_field: str) -> msgspec.json.Decoder[Any]:
    """Decodes only the primary key of a live document (present and valid: it was imported)."""
    struct: Any = msgspec.defstruct("LivePrimaryKey", [("pk", Any)], rename={"pk": pk_field})
    return msgspec.json.Decoder(struct)
