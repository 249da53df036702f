"""Dump import: a huge NDJSON dump split into byte-range chunks; every document routed to its
shard's nodes in every replica group, tagged with ``_miroir_shard``.

* :mod:`.plan` stages and validates the dump, prepares the indexes, enqueues and splits;
* :mod:`.process` runs one chunk through the chunk pipeline from its byte cursor;
* :mod:`.document_router` is the hot path (primary key only, routing, tagging, buffering).
"""

from __future__ import annotations

from miroir_pipeline.jobs.dump_import.params import (
    DUMP_IMPORT,
    ChunkReport,
    DumpChunkParams,
    DumpImportRequest,
    InvalidDocumentError,
    PlannedImport,
    ReplicasDisagree,
)
from miroir_pipeline.jobs.dump_import.plan import plan_dump_import
from miroir_pipeline.jobs.dump_import.process import process_dump_chunk
from miroir_pipeline.jobs.registry import ChunkEnv, JobKind, register
from miroir_pipeline.queue.contract import JobStore, Lease

__all__ = [
    "DUMP_IMPORT",
    "KIND",
    "ChunkReport",
    "DumpChunkParams",
    "DumpImportRequest",
    "InvalidDocumentError",
    "PlannedImport",
    "ReplicasDisagree",
    "plan_dump_import",
    "process_dump_chunk",
]


def _process(store: JobStore, lease: Lease, env: ChunkEnv) -> ChunkReport:
    from miroir_pipeline.fleet.topology import Topology

    params = DumpChunkParams.model_validate(lease.job.params)
    targets = env.targets(Topology.parse(params.topology, source=f"chunk {lease.job_id} params"))
    on_batch = env.on_batch
    return process_dump_chunk(
        store, lease, targets, env.settings, shutdown=env.shutdown, on_batch=on_batch
    )


KIND = register(
    JobKind(
        job_type=DUMP_IMPORT,
        name="dump",
        description="One byte range of a dump routed to its shards' nodes (resumable, fenced).",
        params_model=DumpChunkParams,
        process=_process,
        documents_key="docs_routed",
    )
)
