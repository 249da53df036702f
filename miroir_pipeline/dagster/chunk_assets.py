"""One chunk of any registered kind as a partitioned asset, and the job that runs it.

Every kind has the same shape in Dagster: a dynamic partition per chunk row, an asset whose
materialization processes that chunk under its lease (``kind.process``) and records the report,
and a job with the in-process executor that a sensor, the UI, GraphQL or the worker pool
launches for one partition. Every materialization carries the ``has_documents`` check (WARN): a
chunk whose every document was invalid is not shown as a healthy success.
"""

from typing import TYPE_CHECKING

import dagster as dg

from miroir_pipeline.dagster.checks import has_documents_result, has_documents_spec
from miroir_pipeline.dagster.chunk_runs import (
    NOOP_METADATA,
    lease_for_run,
    stopped_chunks_fail_clearly,
)
from miroir_pipeline.dagster.names import TAG_CHUNK_RUN, MiroirNames
from miroir_pipeline.dagster.resources import (
    ChunkRuntime,
    JobStoreResource,
    SettingsResource,
    targets_for,
)
from miroir_pipeline.jobs.registry import ChunkEnv, JobKind
from miroir_pipeline.queue.contract import JobStore

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

__all__ = ["build_chunk_asset", "build_chunk_job", "chunk_partitions"]


def chunk_partitions(kind: JobKind, names: MiroirNames) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=names.partitions(kind))


def build_chunk_asset(
    kind: JobKind, names: MiroirNames, partitions_def: dg.DynamicPartitionsDefinition
) -> dg.AssetsDefinition:
    """The asset whose partition ``chunk_id`` processes that chunk row of ``kind``."""
    jobs_key, settings_key, runtime_key = (
        names.jobs_resource,
        names.settings_resource,
        names.runtime_resource,
    )
    key = names.chunk_asset_key(kind)

    @dg.asset(
        key=key,
        partitions_def=partitions_def,
        description=kind.description,
        group_name=names.group_name,
        required_resource_keys={jobs_key, settings_key, runtime_key},
        check_specs=[has_documents_spec(names, key, f"{kind.job_type} chunk")],
    )
    def _chunk(context: dg.AssetExecutionContext) -> dg.MaterializeResult:  # type: ignore[type-arg]
        jobs: JobStoreResource = getattr(context.resources, jobs_key)
        settings: SettingsResource = getattr(context.resources, settings_key)
        runtime: ChunkRuntime = getattr(context.resources, runtime_key)
        store = jobs.get_store()
        cfg = settings.get_settings()
        lease = lease_for_run(context, store, cfg)
        if lease is None:
            return dg.MaterializeResult(
                metadata=NOOP_METADATA, check_results=[_check_from_row(store, kind, names, context.partition_key)]
            )
        env = ChunkEnv(
            settings=cfg,
            targets=targets_for,
            shutdown=runtime.shutdown,
            on_batch=runtime.on_batch,
        )
        with stopped_chunks_fail_clearly():
            report = kind.process(store, lease, env)
        context.log.info(f"chunk {context.partition_key}: {report.summary()}")
        check = has_documents_result(
            names,
            key,
            f"chunk {report.chunk_id}",
            documents=int(report.documents),
            invalid_documents=int(getattr(report, "invalid_documents", 0) or 0),
            dead_letter=getattr(report, "dead_letter", None),
            refused_dead_letter=getattr(report, "refused_dead_letter", None),
        )
        if not check.passed:
            context.log.warning(str(check.description))
        return dg.MaterializeResult(metadata=report.as_metadata(), check_results=[check])

    return _chunk


def _check_from_row(store: JobStore, kind: JobKind, names: MiroirNames, chunk_id: str) -> dg.AssetCheckResult:
    """The ``has_documents`` check of a chunk that was already completed (a no-op run), from the
    progress its completion recorded."""
    progress = store.get(chunk_id).progress
    return has_documents_result(
        names,
        names.chunk_asset_key(kind),
        f"chunk {chunk_id}",
        documents=int(progress.get(kind.documents_key, 0) or 0),
        invalid_documents=int(progress.get("invalid_documents", 0) or 0),
    )


def build_chunk_job(kind: JobKind, names: MiroirNames, asset: dg.AssetsDefinition) -> "UnresolvedAssetJobDefinition":
    """One run per partition, in-process (a chunk is one step; a process per step would cost
    seconds), tagged so the instance's run queue caps concurrent runs of the kind."""
    return dg.define_asset_job(
        names.chunk_job(kind),
        selection=[asset],
        executor_def=dg.in_process_executor,
        tags={TAG_CHUNK_RUN: kind.name},
        description=f"Process one {kind.job_type} chunk (one run per partition).",
    )
