"""Prune in Dagster: delete finished parents from the jobs table and, with them, their dynamic
partitions (their chunks' in ``<prefix>_<kind>_chunks``, their own in ``<prefix>_<job type>s``),
so the partition lists stay bounded.

:func:`prune_finished` is what ``miroir-pipeline prune`` calls; the ``<prefix>_prune_job`` does the
same from the UI, GraphQL or a schedule (config ``older_than_s``). Run history stays: Dagster
keeps the runs and materializations of a removed partition, it only stops listing the partition.
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass

import dagster as dg

from miroir_pipeline.dagster.names import DEFAULT_KEY_PREFIX, MiroirNames
from miroir_pipeline.dagster.resources import JobStoreResource, SettingsResource
from miroir_pipeline.jobs.dump_import.staged_copies import prune_staged_copies
from miroir_pipeline.jobs.registry import JobKind, kinds
from miroir_pipeline.queue.contract import JobNotFound, JobStore, Pruned

__all__ = [
    "DEFAULT_PRUNE_AGE_S",
    "PruneConfig",
    "PruneOutcome",
    "prune_definitions",
    "prune_finished",
    "remove_orphaned_partitions",
    "remove_partitions",
]

#: Seven days, the CLI's default too.
DEFAULT_PRUNE_AGE_S = 7 * 86400.0


@dataclass(frozen=True)
class PruneOutcome:
    """What one prune deleted from the jobs table, and how many Dagster partitions went with it."""

    pruned: Pruned
    partitions_removed: int


def _delete(instance: dg.DagsterInstance, partitions_name: str, keys: Iterable[str]) -> int:
    wanted = set(keys)
    if not wanted:
        return 0
    present = wanted.intersection(instance.get_dynamic_partitions(partitions_name))
    for key in sorted(present):
        instance.delete_dynamic_partition(partitions_name, key)
    return len(present)


def _registered() -> dict[str, JobKind]:
    return {k.job_type: k for k in kinds()}


def remove_partitions(instance: dg.DagsterInstance, pruned: Pruned, *, key_prefix: str = DEFAULT_KEY_PREFIX) -> int:
    """Delete the dynamic partitions of what ``pruned`` lists (chunk and parent partitions of the
    definitions built with ``key_prefix``); return how many existed and were deleted. Rows of a
    job type no registered kind handles have no partitions and are passed over."""
    names = MiroirNames(key_prefix)
    registered = _registered()
    removed = 0
    for job_type, ids in pruned.chunks.items():
        if job_type in registered:
            removed += _delete(instance, names.partitions(registered[job_type]), ids)
    for job_type, ids in pruned.parents.items():
        if job_type in registered:
            removed += _delete(instance, names.parent_partitions(registered[job_type]), ids)
    return removed


def prune_finished(
    store: JobStore, instance: dg.DagsterInstance, older_than_s: float, *, key_prefix: str = DEFAULT_KEY_PREFIX
) -> PruneOutcome:
    """``store.prune(older_than_s)``, then the partitions of every deleted row."""
    pruned = store.prune(older_than_s)
    return PruneOutcome(pruned, remove_partitions(instance, pruned, key_prefix=key_prefix))


def remove_orphaned_partitions(
    store: JobStore, instance: dg.DagsterInstance, *, key_prefix: str = DEFAULT_KEY_PREFIX
) -> int:
    """Delete partitions whose row is no longer in the jobs table (pruned before prune removed
    partitions, or deleted by hand); return how many. One lookup per partition: for a one-off
    clean-up, not for every prune."""
    names = MiroirNames(key_prefix)
    removed = 0
    for kind in _registered().values():
        for partitions_name in (names.partitions(kind), names.parent_partitions(kind)):
            gone = []
            for key in instance.get_dynamic_partitions(partitions_name):
                try:
                    store.get(key)
                except JobNotFound:
                    gone.append(key)
            removed += _delete(instance, partitions_name, gone)
    return removed


class PruneConfig(dg.Config):
    """How old a finished parent must be to be pruned, in seconds (default seven days)."""

    older_than_s: float = DEFAULT_PRUNE_AGE_S
    #: Also remove partitions whose row is already gone (a one-off clean-up; one lookup each).
    remove_orphaned_partitions: bool = False


def prune_definitions(names: MiroirNames) -> dg.Definitions:
    """The prune job of the definitions named by ``names``."""
    jobs_key = names.jobs_resource
    settings_key = names.settings_resource

    @dg.op(
        name=names.prune_op,
        out=dg.Out(io_manager_key=names.results_io_manager),
        description=(
            "Delete completed and failed parents finished longer ago than older_than_s (with their "
            "chunks) and finished standalone chunks, and remove their dynamic partitions; then the "
            "staged dump copies no remaining job names, unused for older_than_s (at least an hour)."
        ),
        required_resource_keys={jobs_key, settings_key},
    )
    def _prune(context: dg.OpExecutionContext, config: PruneConfig) -> int:
        if not (math.isfinite(config.older_than_s) and config.older_than_s >= 0):
            raise dg.Failure(
                description=f"older_than_s={config.older_than_s} must be a finite number of seconds, 0 or more",
                allow_retries=False,
            )
        jobs: JobStoreResource = getattr(context.resources, jobs_key)
        store = jobs.get_store()
        outcome = prune_finished(store, context.instance, config.older_than_s, key_prefix=names.key_prefix)
        orphans = remove_orphaned_partitions(store, context.instance, key_prefix=names.key_prefix) if config.remove_orphaned_partitions else 0
        settings: SettingsResource = getattr(context.resources, settings_key)
        staged = prune_staged_copies(store, settings.get_settings().staging_dir, config.older_than_s)
        if staged.error:
            context.log.warning(f"staged dump copies were not pruned: {staged.error}")
        pruned = outcome.pruned
        context.add_output_metadata(
            {
                "rows_deleted": pruned.rows,
                "parents_deleted": len(pruned.parent_ids),
                "chunks_deleted": len(pruned.chunk_ids),
                "partitions_removed": outcome.partitions_removed + orphans,
                "orphaned_partitions_removed": orphans,
                "staged_files_deleted": len(staged.removed),
                "staged_bytes_freed": staged.bytes_freed,
                "staged_error": staged.error or "",
                "parents": dg.MetadataValue.json({t: ids[:100] for t, ids in pruned.parents.items()}),
            }
        )
        context.log.info(
            f"pruned {pruned.rows} row(s) ({len(pruned.parent_ids)} parent(s)) finished more than "
            f"{config.older_than_s:g}s ago; removed {outcome.partitions_removed + orphans} partition(s)"
        )
        return pruned.rows

    @dg.job(
        name=names.prune_job,
        # One op, whose result stays in memory: a run of it never needs another process.
        executor_def=dg.in_process_executor,
        description="Prune finished jobs older than older_than_s and their Dagster partitions.",
    )
    def _prune_job() -> None:
        _prune()

    return dg.Definitions(jobs=[_prune_job])
