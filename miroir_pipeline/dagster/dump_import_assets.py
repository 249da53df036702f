"""Dump import in Dagster: an op job that plans an import (stage, split, register one partition
per chunk) and the partitioned asset that imports one chunk."""


import dagster as dg

from miroir_pipeline.dagster.chunk_runs import (
    NOOP_METADATA,
    lease_for_run,
    stopped_chunks_fail_clearly,
)
from miroir_pipeline.dagster.partitions import (
    DUMP_CHUNKS,
    TAG_CHUNK_RUN,
    dump_chunks,
)
from miroir_pipeline.dagster.resources import (
    JobStoreResource,
    SettingsResource,
    TopologyResource,
    targets_for,
)
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.dump_import import (
    DumpChunkParams,
    DumpImportRequest,
    plan_dump_import,
    process_dump_chunk,
)


class DumpImportConfig(dg.Config):
    """An import request, as run config (the launchpad form in the UI)."""

    uri: str
    index_uid: str
    primary_key: str | None = None
    chunk_size_bytes: int | None = None
    on_invalid_document: str | None = None


@dg.op(description="Stage and validate a dump, enqueue the parent, split it, and register one partition per chunk.")
def plan_dump_import_op(
    context: dg.OpExecutionContext,
    config: DumpImportConfig,
    jobs: JobStoreResource,
    topology: TopologyResource,
    settings: SettingsResource,
) -> str:
    topo = topology.get_topology()
    request = DumpImportRequest.model_validate(config.model_dump())
    planned = plan_dump_import(jobs.get_store(), request, topo, targets_for(topo), settings.get_settings())
    context.instance.add_dynamic_partitions(DUMP_CHUNKS, planned.chunk_ids)
    context.add_output_metadata(
        {
            "parent_job_id": planned.parent.id,
            "chunks": len(planned.chunk_ids),
            "bytes_total": planned.bytes_total,
            "primary_key": planned.primary_key,
        }
    )
    context.log.info(f"import {planned.parent.id}: {len(planned.chunk_ids)} chunk(s) registered")
    return planned.parent.id


@dg.job(description="Plan a dump import: one dynamic partition of dump_chunk per chunk.")
def plan_dump_import_job() -> None:
    plan_dump_import_op()


@dg.asset(
    key=["miroir", "dump_chunk"],
    partitions_def=dump_chunks,
    description="One chunk of a dump import routed to its shard's nodes (resumable, fenced).",
    group_name="miroir",
)
def dump_chunk(
    context: dg.AssetExecutionContext,
    jobs: JobStoreResource,
    settings: SettingsResource,
) -> dg.MaterializeResult:  # type: ignore[type-arg]
    store = jobs.get_store()
    cfg = settings.get_settings()
    chunk_id = context.partition_key
    lease = lease_for_run(context, store, cfg)
    if lease is None:
        return dg.MaterializeResult(metadata=NOOP_METADATA)
    params = DumpChunkParams.model_validate(lease.job.params)
    targets = targets_for(Topology.parse(params.topology))
    with stopped_chunks_fail_clearly():
        report = process_dump_chunk(store, lease, targets, cfg)
    context.log.info(
        f"chunk {chunk_id}: {report.documents} documents, {report.bytes} bytes, "
        f"{report.mb_per_s:.1f} MB/s, resumed from {report.resumed_from}"
    )
    return dg.MaterializeResult(metadata=report.as_metadata())


dump_chunk_job = dg.define_asset_job(
    "dump_chunk_job",
    selection=[dump_chunk],
    executor_def=dg.in_process_executor,
    tags={TAG_CHUNK_RUN: "dump"},
    description="Import one dump chunk (one run per partition).",
)
