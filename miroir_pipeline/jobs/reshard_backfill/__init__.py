"""Reshard backfill: change the shard count of a live index by re-hashing every document of it
into the shadow index ``{uid}__reshard_{S_new}``, one range of live shards per chunk.

* :mod:`.plan` checks the live index, prepares the shadow, enqueues and splits;
* :mod:`.process` backfills one range through the chunk pipeline from its ``shard:offset``
  cursor;
* :mod:`.verification` proves the shadow holds exactly the live documents before cutover.
"""

from __future__ import annotations

from miroir_pipeline.jobs.registry import ChunkEnv, JobKind, register
from miroir_pipeline.jobs.reshard_backfill.params import (
    MAX_INDEX_UID_BYTES,
    READ_PAGE_DOCS,
    RESHARD_BACKFILL,
    InvalidLiveDocument,
    PlannedReshard,
    ReshardChunkParams,
    ReshardChunkReport,
    ReshardRefused,
    ReshardRequest,
    format_cursor,
    parse_cursor,
    shadow_index_uid,
    shadow_topology_for,
)
from miroir_pipeline.jobs.reshard_backfill.plan import plan_reshard
from miroir_pipeline.jobs.reshard_backfill.process import process_reshard_chunk
from miroir_pipeline.queue.contract import JobStore, Lease

__all__ = [
    "KIND",
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
    "plan_reshard",
    "process_reshard_chunk",
    "shadow_index_uid",
    "shadow_topology_for",
]


def _process(store: JobStore, lease: Lease, env: ChunkEnv) -> ReshardChunkReport:
    from miroir_pipeline.fleet.topology import Topology

    params = ReshardChunkParams.model_validate(lease.job.params)
    live = env.targets(Topology.parse(params.live_topology, source=f"chunk {lease.job_id} live_topology"))
    shadow = env.targets(Topology.parse(params.shadow_topology, source=f"chunk {lease.job_id} shadow_topology"))
    on_batch = env.on_batch
    return process_reshard_chunk(
        store,
        lease,
        live,
        shadow,
        env.settings,
        shutdown=env.shutdown,
        on_batch=(lambda report, _cursor: on_batch(report)) if on_batch is not None else None,
    )


KIND = register(
    JobKind(
        job_type=RESHARD_BACKFILL,
        name="reshard",
        description="One range of live shards re-hashed into the shadow index (resumable, fenced).",
        params_model=ReshardChunkParams,
        process=_process,
        documents_key="documents_backfilled",
    )
)
