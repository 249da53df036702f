"""Reshard backfill: plan (validate, prepare the shadow index, split the shard-id space, enqueue)
and process one shard range under its lease with the resume protocol of DESIGN §6.

Every document of a live shard range is read back page by page from one live node holding it,
re-hashed under the new shard count, tagged with its new ``_miroir_shard`` and written to the
shadow index ``{uid}__reshard_{S_new}`` on every node the new topology assigns it to. The
cursor ``"shard:offset"`` (the next unread position) is saved only after every target
acknowledged the batch, so a crashed attempt resumes exactly where the last commit ended.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec
import orjson
from pydantic import BaseModel, ConfigDict, Field

from miroir_pipeline import metrics
from miroir_pipeline.fleet.routing import SHARD_FIELD, Router, primary_key_text
from miroir_pipeline.fleet.targets.base import NodeTarget, TargetError
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.dump_import import new_parent_id
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue.contract import Job, JobStore, JobType, Lease, NewChunk
from miroir_pipeline.queue.lease import LeaseKeeper, run_under_lease
from miroir_pipeline.queue.shutdown import DRAIN, ChunkHandedBack
from miroir_pipeline.sources.split import split_shards

__all__ = [
    "MAX_INDEX_UID_BYTES",
    "READ_PAGE_DOCS",
    "InvalidLiveDocument",
    "PlannedReshard",
    "ReshardChunkParams",
    "ReshardChunkReport",
    "ReshardRefused",
    "ReshardRequest",
    "format_cursor",
    "parse_cursor",
    "plan_reshard",
    "process_reshard_chunk",
    "shadow_index_uid",
    "shadow_topology_for",
]

log = logging.getLogger(__name__)

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


# -- planning ---------------------------------------------------------------------------------


def plan_reshard(
    store: JobStore,
    request: ReshardRequest,
    live_topology: Topology,
    live_targets: Mapping[str, NodeTarget],
    settings: PipelineSettings,
    *,
    new_topology: Topology | None = None,
    shadow_targets: Mapping[str, NodeTarget] | None = None,
) -> PlannedReshard:
    """Validate, prepare the shadow index on every shadow node, then enqueue and split.

    Refused before any row is written: the same shard count, a live index missing on its
    nodes (or without a primary key), a shadow uid too long, a shadow index left by an earlier
    reshard (unless ``replace_shadow``). The shadow gets the live index's settings and primary
    key, and ``_miroir_shard`` is made filterable on live and shadow nodes alike.
    """
    uid = request.index_uid
    old_shards = live_topology.shards
    if request.new_shards == old_shards:
        raise ReshardRefused(
            f"index {uid} already has {old_shards} shards under the live topology; nothing to do"
        )
    shadow_uid = shadow_index_uid(uid, request.new_shards)
    if len(shadow_uid.encode()) > MAX_INDEX_UID_BYTES:
        raise ReshardRefused(
            f"shadow index uid {shadow_uid[:40]}... would be longer than {MAX_INDEX_UID_BYTES} bytes"
        )
    shadow_topology = shadow_topology_for(live_topology, request.new_shards, new_topology)
    if shadow_targets is None:
        shadow_targets = live_targets
    live_nodes = [n.id for n in live_topology.all_nodes()]
    shadow_nodes = [n.id for n in shadow_topology.all_nodes()]
    for role, nodes, targets in (("live", live_nodes, live_targets), ("shadow", shadow_nodes, shadow_targets)):
        unknown = [n for n in nodes if n not in targets]
        if unknown:
            raise ReshardRefused(f"no target opened for {role} node(s) {unknown}")

    missing = [n for n in live_nodes if not live_targets[n].index_exists(uid)]
    if missing:
        where = "any of its nodes" if len(missing) == len(live_nodes) else f"node(s) {missing}"
        raise ReshardRefused(
            f"live index {uid} does not exist on {where} (live nodes: {live_nodes}); "
            "check the index uid and --topology"
        )
    source = live_targets[live_nodes[0]]
    primary_key = source.get_primary_key(uid)
    if not primary_key:
        raise ReshardRefused(f"live index {uid} on node {source.node_id} has no primary key yet")
    index_settings = source.get_settings(uid)

    existing = [n for n in shadow_nodes if shadow_targets[n].index_exists(shadow_uid)]
    if existing:
        if not request.replace_shadow:
            raise ReshardRefused(
                f"shadow index {shadow_uid} already exists on node(s) {existing}, left by an earlier "
                "reshard; delete it or plan with replace_shadow (CLI: --replace-shadow)"
            )
        for n in existing:
            shadow_targets[n].delete_index(shadow_uid)

    for n in live_nodes:  # makes _miroir_shard filterable where it was not yet (awaited)
        live_targets[n].ensure_index(uid, primary_key, None)
    for n in shadow_nodes:
        shadow_targets[n].ensure_index(shadow_uid, primary_key, index_settings)

    parent = store.enqueue(
        JobType.RESHARD_BACKFILL,
        {
            "index_uid": uid,
            "shadow_uid": shadow_uid,
            "primary_key": primary_key,
            "old_shards": old_shards,
            "new_shards": request.new_shards,
            "shards_per_chunk": request.shards_per_chunk,
        },
        job_id=new_parent_id("reshard", uid),
        max_attempts=settings.max_attempts,
    )
    live_dict = live_topology.model_dump(mode="json")
    shadow_dict = shadow_topology.model_dump(mode="json")
    chunks = [
        NewChunk(
            chunk_index=i,
            params=ReshardChunkParams(
                index_uid=uid,
                shadow_uid=shadow_uid,
                primary_key=primary_key,
                old_shards=old_shards,
                new_shards=request.new_shards,
                shard_start=r.start,
                shard_end=r.stop,
                live_topology=live_dict,
                shadow_topology=shadow_dict,
            ).model_dump(),
            progress={"last_cursor": format_cursor(r.start, 0)},
        )
        for i, r in enumerate(split_shards(old_shards, request.shards_per_chunk))
    ]
    children = store.split(parent.id, chunks)
    log.info(
        "reshard %s: %s %d -> %d shards into %s, %d chunk(s)",
        parent.id, uid, old_shards, request.new_shards, shadow_uid, len(children),
    )  # fmt: skip
    return PlannedReshard(
        parent=store.get(parent.id),
        chunk_ids=[c.id for c in children],
        shadow_uid=shadow_uid,
        primary_key=primary_key,
        old_shards=old_shards,
        new_shards=request.new_shards,
        shadow_topology=shadow_topology,
    )


# -- processing one chunk ----------------------------------------------------------------------


def process_reshard_chunk(
    store: JobStore,
    lease: Lease,
    live_targets: Mapping[str, NodeTarget],
    shadow_targets: Mapping[str, NodeTarget],
    settings: PipelineSettings,
    *,
    on_batch: Callable[[ReshardChunkReport, str], None] | None = None,
) -> ReshardChunkReport:
    """Backfill one shard range under ``lease``: resume at the cursor, commit progress after every
    batch all shadow targets acknowledged, complete under the fence. Fails the row (retryable or
    not) on error; on :class:`LeaseLost` stops at once and leaves the row to its new holder.
    ``on_batch(report, cursor)`` runs after every committed batch."""
    return run_under_lease(
        store, lease, settings, lambda k: _run_chunk(store, k, live_targets, shadow_targets, settings, on_batch), permanent=(InvalidLiveDocument,)
    )


class _ShardReader:
    """Reads one live shard page by page from one node holding it, sticking to that node.

    Replicas are tried in write-target order, falling back on :class:`TargetError`. Offsets are
    only meaningful on the node that produced them (Meilisearch orders by its internal ids), so
    switching nodes part-way through a shard restarts the shard at offset 0; re-sending documents
    is harmless because writes are idempotent by primary key.
    """

    def __init__(self, router: Router, targets: Mapping[str, NodeTarget], index_uid: str) -> None:
        self.router = router
        self.targets = targets
        self.index_uid = index_uid
        self.node: str | None = None

    def read(self, shard: int, offset: int, limit: int, preferred: str | None) -> tuple[list[bytes], int]:
        """A page and the offset it was read at (0 if the read moved to another node)."""
        replicas = self.router.targets_of(shard)
        order = [preferred] if preferred in replicas else []
        order += [n for n in replicas if n not in order]
        last: TargetError | None = None
        for node in order:
            at = offset if node == preferred or offset == 0 else 0
            try:
                page = self.targets[node].fetch_shard(self.index_uid, shard, at, limit)
            except TargetError as exc:
                log.warning("shard %d: live node %s failed (%s); trying the next replica", shard, node, exc)
                last = exc
                continue
            if at != offset:
                log.warning(
                    "shard %d: reading moved from %s to %s; restarting the shard at offset 0",
                    shard, preferred, node,
                )  # fmt: skip
            self.node = node
            return page, at
        assert last is not None
        raise TargetError(
            f"index {self.index_uid} shard {shard}: no live node holding it answered "
            f"(tried {order}); last error: {last}",
            node_id=last.node_id,
            retryable=True,
        )


def _run_chunk(
    store: JobStore,
    keeper: LeaseKeeper,
    live_targets: Mapping[str, NodeTarget],
    shadow_targets: Mapping[str, NodeTarget],
    settings: PipelineSettings,
    on_batch: Callable[[ReshardChunkReport, str], None] | None,
) -> ReshardChunkReport:
    started = time.monotonic()
    lease = keeper.lease
    job = lease.job
    params = ReshardChunkParams.model_validate(job.params)
    live_router = Router(Topology.parse(params.live_topology, source=f"chunk {job.id} live_topology"))
    shadow_router = Router(Topology.parse(params.shadow_topology, source=f"chunk {job.id} shadow_topology"))
    pk_field = params.primary_key
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
    reader = _ShardReader(live_router, live_targets, params.index_uid)
    read_node: str | None = prog.get("read_node") if offset else None
    page_size = max(1, min(READ_PAGE_DOCS, settings.batch_size))
    batch = _ShadowBatch(len(node_targets))
    pool = ThreadPoolExecutor(max_workers=max(1, len(node_targets)), thread_name_prefix=f"flush-{job.id}")
    # As in the dump import: one batch's writes may be in flight while the next pages are read
    # and re-hashed; a batch's writes start only once the previous one is acknowledged, and its
    # progress is saved only after every shadow target acknowledged it.
    in_flight: list[tuple[list[Future[None]], dict[str, Any], str]] = []

    def settle() -> None:
        while in_flight:
            writes, progress, at = in_flight.pop()
            for w in writes:
                w.result()  # raises the node's TargetError
            keeper.check()
            store.save_progress(keeper.lease, progress)
            if on_batch is not None:
                on_batch(report, at)

    def flush(next_shard: int, next_offset: int, *, last: bool = False) -> None:
        nonlocal batch
        settle()
        done, batch = batch, _ShadowBatch(len(node_targets))
        for node_id, lines in zip(shadow_router.node_ids, done.lines, strict=True):
            report.per_node[node_id] += len(lines)
        report.documents += done.docs
        metrics.RESHARD_DOCUMENTS_BACKFILLED.inc(done.docs)
        at = format_cursor(next_shard, next_offset)
        progress = {
            "last_cursor": at,
            "documents_backfilled": report.documents,
            "shards_done": next_shard - start,
            "per_node": dict(report.per_node),
            # The node the cursor's offset refers to (offsets are per node); None at a shard start.
            "read_node": reader.node if next_offset else None,
        }
        writes = [
            pool.submit(t.write_routed, params.shadow_uid, pk_field, lines, keys, shards)
            for t, lines, keys, shards in zip(node_targets, done.lines, done.keys, done.shards, strict=True)
            if lines
        ]
        in_flight.append((writes, progress, at))
        if last or DRAIN.is_set():
            settle()
        if DRAIN.is_set() and next_shard < end:
            store.release(keeper.lease)
            raise ChunkHandedBack(f"chunk {job.id} handed back at {at} because this worker is shutting down")

    try:
        while shard < end:
            page, offset = reader.read(shard, offset, page_size, read_node)
            read_node = reader.node
            for raw in page:
                data, new_shard, pk = _rehash(raw, pk_field, shadow_router, params, shard)
                batch.add(data, pk, new_shard, shadow_router.targets[new_shard])
            offset += len(page)
            if len(page) < page_size:
                shard, offset, read_node = shard + 1, 0, None
            if batch.docs >= settings.batch_size or batch.nbytes >= settings.memory_buffer_bytes // 2:
                flush(shard, offset)
        flush(end, 0, last=True)
    finally:
        pool.shutdown(wait=True)
    report.duration_s = time.monotonic() - started
    return report


_SHARD_PREFIX = b'{"' + SHARD_FIELD.encode() + b'":'


def _rehash(
    raw: bytes, pk_field: str, router: Router, params: ReshardChunkParams, shard: int
) -> tuple[bytes, int, str | int]:
    """The document tagged with its new shard, that shard, and its primary key value.

    Documents the pipeline wrote start with ``{"_miroir_shard":N,``; only that prefix is
    rewritten (the primary key is decoded alone). Anything else is decoded and re-encoded.
    """
    try:
        if raw.startswith(_SHARD_PREFIX):
            pk = _decoder(pk_field).decode(raw).pk
            new_shard = router.shard(primary_key_text(pk))
            comma = raw.index(b",", len(_SHARD_PREFIX))
            return b'{"%s":%d%s' % (SHARD_FIELD.encode(), new_shard, raw[comma:]), new_shard, pk
        doc = orjson.loads(raw)
        pk = doc[pk_field]
        new_shard = router.shard(primary_key_text(pk))
    except (orjson.JSONDecodeError, msgspec.DecodeError, msgspec.ValidationError, TypeError, KeyError, ValueError) as exc:
        what = f"no {pk_field!r} field" if isinstance(exc, KeyError | TypeError) else str(exc)
        raise InvalidLiveDocument(
            f"index {params.index_uid} shard {shard}: a live document cannot be re-hashed ({what}): "
            f"{raw[:200].decode('utf-8', 'replace')}"
        ) from None
    doc[SHARD_FIELD] = new_shard
    return orjson.dumps(doc), new_shard, pk


@functools.lru_cache(maxsize=16)
def _decoder(pk_field: str) -> msgspec.json.Decoder[Any]:
    """Decodes only the primary key of a live document (present and valid: it was imported)."""
    struct: Any = msgspec.defstruct("LivePrimaryKey", [("pk", Any)], rename={"pk": pk_field})
    return msgspec.json.Decoder(struct)


class _ShadowBatch:
    """Re-hashed documents bound for each shadow node, with their keys and shards."""

    def __init__(self, nodes: int) -> None:
        self.lines: list[list[bytes]] = [[] for _ in range(nodes)]
        self.keys: list[list[str | int]] = [[] for _ in range(nodes)]
        self.shards: list[list[int]] = [[] for _ in range(nodes)]
        self.docs = 0
        self.nbytes = 0

    def add(self, data: bytes, pk: str | int, shard: int, nodes: tuple[int, ...]) -> None:
        for i in nodes:
            self.lines[i].append(data)
            self.keys[i].append(pk)
            self.shards[i].append(shard)
        self.docs += 1
        self.nbytes += len(data)
