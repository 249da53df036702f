"""Dump import in Dagster, beyond its generic chunk asset: an op job that plans an import (stage,
validate, split, register one partition of the chunk asset per chunk)."""

import dagster as dg

from miroir_pipeline.dagster.names import MiroirNames
from miroir_pipeline.dagster.resources import (
    JobStoreResource,
    SettingsResource,
    TopologyResource,
    targets_for,
)
from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import
from miroir_pipeline.jobs.registry import JobKind

__all__ = ["DumpImportConfig", "dump_import_definitions"]


class DumpImportConfig(dg.Config):
    """An import request, as run config (the launchpad form in the UI)."""

    uri: str
    index_uid: str
    primary_key: str | None = None
    chunk_size_bytes: int | None = None
    on_invalid_document: str | None = None
    source_index_uid: str | None = None
    allow_empty: bool = False


def dump_import_definitions(names: MiroirNames, kind: JobKind) -> dg.Definitions:
    """The plan job of dump imports, for the definitions named by ``names``."""
    jobs_key, topology_key, settings_key = (
        names.jobs_resource,
        names.topology_resource,
        names.settings_resource,
    )
    partitions_name = names.partitions(kind)
    parents_name = names.parent_partitions(kind)
    chunk_asset = names.chunk_asset_key(kind).to_user_string()

    @dg.op(
        name=names.plan_dump_import_op,
        out=dg.Out(io_manager_key=names.results_io_manager),
        description=(
            "Stage and validate a dump, enqueue the parent, split it, and register one partition "
            f"of {chunk_asset} per chunk."
        ),
        required_resource_keys={jobs_key, topology_key, settings_key},
    )
    def _plan(context: dg.OpExecutionContext, config: DumpImportConfig) -> str:
        jobs: JobStoreResource = getattr(context.resources, jobs_key)
        topology: TopologyResource = getattr(context.resources, topology_key)
        settings: SettingsResource = getattr(context.resources, settings_key)
        topo = topology.get_topology()
        request = DumpImportRequest.model_validate(config.model_dump())
        planned = plan_dump_import(jobs.get_store(), request, topo, targets_for(topo), settings.get_settings())
        context.instance.add_dynamic_partitions(partitions_name, planned.chunk_ids)
        context.instance.add_dynamic_partitions(parents_name, [planned.parent.id])
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

    @dg.job(
        name=names.plan_dump_import_job,
        # One op, whose result stays in memory: a run of it never needs another process.
        executor_def=dg.in_process_executor,
        description=f"Plan a dump import: one dynamic partition of {chunk_asset} per chunk.",
    )
    def _plan_job() -> None:
        _plan()

    return dg.Definitions(jobs=[_plan_job])
