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
    read_node: str | None = prog.get("read_node") if offset else None
    run_batches(
        store,
        keeper,
        node_targets,
        params.shadow_uid,
        params.primary_key,
        _batches(
            params, reader, shadow_router, [t.payload_limit_bytes for t in node_targets], settings, shard, offset, read_node, report,
            prog.get("shard_per_node") if offset else None,
        ),
        shutdown,
        window_bytes=settings.window_bytes,
        on_commit=(lambda batch: on_batch(report, batch.position)) if on_batch is not None else None,
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
    reader: ShardReader,
    router: Router,
    payload_limits: Sequence[int | None],
    settings: PipelineSettings,
    shard: int,
    offset: int,
    read_node: str | None,
    report: ReshardChunkReport,
    shard_per_node: Mapping[str, int] | None,
) -> Iterator[Batch]:
    """Read and re-hash the range from ``shard:offset``; yield a batch whenever it fills (by
    documents or bytes), then a final one at ``end:0``. A document one of its shadow nodes cannot
    take in one request (``payload_limits``) stops the chunk for good, naming it.

    ``report`` counts each document once, however often it is read: a read that moves to
    another replica restarts its shard at offset 0 there, so what was counted of that shard
    (``shard_per_node`` of a resumed cursor, and what this attempt read) is taken back first."""
    end = params.shard_end
    nodes = len(router.node_ids)
    page_size = max(1, min(READ_PAGE_DOCS, settings.batch_size))
    lines: list[list[bytes]] = [[] for _ in range(nodes)]
    keys: list[list[str | int]] = [[] for _ in range(nodes)]
    shards: list[list[int]] = [[] for _ in range(nodes)]
    docs = nbytes = 0
    per_node = [report.per_node[n] for n in router.node_ids]
    # The current shard's share of the counts: its documents are its offset on the node read.
    in_shard = [int((shard_per_node or {}).get(n, 0)) for n in router.node_ids]

    def batch(next_shard: int, next_offset: int, *, final: bool = False) -> Batch:
        nonlocal lines, keys, shards, docs, nbytes
        report.per_node = dict(zip(router.node_ids, per_node, strict=True))
        metrics.RESHARD_DOCUMENTS_BACKFILLED.inc(docs)
        at = format_cursor(next_shard, next_offset)
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
                "read_node": reader.node if next_offset else None,
                # What the counts hold of that shard, taken back if its read moves to another node.
                "shard_per_node": dict(zip(router.node_ids, in_shard, strict=True)) if next_offset else None,
            },
            position=at,
            final=final,
        )
        lines = [[] for _ in range(nodes)]
        keys = [[] for _ in range(nodes)]
        shards = [[] for _ in range(nodes)]
        docs = nbytes = 0
        return done

    while shard < end:
        page, read_at = reader.read(shard, offset, page_size, read_node)
        if read_at != offset:  # moved to another replica: the shard is read again from its start
            report.documents -= offset
            per_node = [c - s for c, s in zip(per_node, in_shard, strict=True)]
            in_shard = [0] * nodes
            offset = read_at
        read_node = reader.node
        for at, raw in enumerate(page, start=1):
            data, new_shard, pk = _rehash(raw, params, router, shard)
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
            report.documents += 1
            # Every copy is held until its node acknowledges it, so every copy counts; checked
            # per document, as a page of large documents alone can exceed the budget.
            nbytes += len(data) * len(router.targets[new_shard])
            if (docs >= settings.batch_size or nbytes >= settings.effective_batch_bytes) and at < len(page):
                yield batch(shard, offset + at)
        offset += len(page)
        if len(page) < page_size:
            shard, offset, read_node = shard + 1, 0, None
            in_shard = [0] * nodes
        if docs >= settings.batch_size or nbytes >= settings.effective_batch_bytes:
            yield batch(shard, offset)
    yield batch(end, 0, final=True)


def _rehash(raw: bytes, params: ReshardChunkParams, router: Router, shard: int) -> tuple[bytes, int, str | int]:
    """The document retagged with its new shard, that shard, and its primary key value.

    Documents the pipeline wrote start with the shard tag; their primary key is decoded alone
    and only the tag is rewritten. Anything else is decoded in full once.
    """
    pk_field = params.primary_key
    try:
        if raw.startswith(TAG_START):
            pk = _decoder(pk_field).decode(raw).pk
        else:
            pk = orjson.loads(raw)[pk_field]
        new_shard = router.shard(primary_key_text(pk))
        return retag(raw, new_shard), new_shard, pk
    except (orjson.JSONDecodeError, msgspec.DecodeError, msgspec.ValidationError, TypeError, KeyError, ValueError) as exc:
        what = f"no {pk_field!r} field" if isinstance(exc, KeyError | TypeError) else str(exc)
        raise InvalidLiveDocument(
            f"index {params.index_uid} shard {shard}: a live document cannot be re-hashed ({what}): "
            f"{raw[:200].decode('utf-8', 'replace')}"
        ) from None


@functools.lru_cache(maxsize=16)
def _decoder(pk_field: str) -> msgspec.json.Decoder[Any]:
    """Decodes only the primary key of a live document (present and valid: it was imported)."""
    struct: Any = msgspec.defstruct("LivePrimaryKey", [("pk", Any)], rename={"pk": pk_field})
    return msgspec.json.Decoder(struct)
