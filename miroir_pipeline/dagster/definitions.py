"""The public factory: :func:`miroir_definitions` builds the whole Dagster surface (resources,
chunk assets and jobs of every registered job kind, their parent-level assets and report jobs,
the kinds' own extras, the prune job, sensors) as a ``dagster.Definitions`` to use as a code
location or merge into one's own."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import dagster as dg

from miroir_pipeline.dagster.chunk_assets import (
    build_chunk_asset,
    build_chunk_job,
    chunk_partitions,
)
from miroir_pipeline.dagster.dump_import_assets import dump_import_definitions
from miroir_pipeline.dagster.names import DEFAULT_KEY_PREFIX, MiroirNames
from miroir_pipeline.dagster.parent_reports import (
    DEFAULT_PARENT_REPORT_INTERVAL_S,
    PARENT_REPORT_INTERVAL_ENV,
    build_parent_asset,
    build_parent_report_job,
    build_parent_report_sensor,
    parent_partitions,
)
from miroir_pipeline.dagster.prune import prune_definitions
from miroir_pipeline.dagster.reshard_assets import reshard_definitions
from miroir_pipeline.dagster.resources import (
    JobStoreResource,
    PushgatewayResource,
    SettingsResource,
    TopologyResource,
    runtime_resource,
)
from miroir_pipeline.dagster.sensors import (
    DEFAULT_DISPATCH_INTERVAL_S,
    DEFAULT_QUEUE_DEPTH_INTERVAL_S,
    DISPATCH_INTERVAL_ENV,
    QUEUE_DEPTH_INTERVAL_ENV,
    DispatchOptions,
    build_dispatch_sensor,
    build_queue_depth_sensor,
    env_var_name,
    resolve_number,
)
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.registry import JobKind, kinds
from miroir_pipeline.jobs.settings import PipelineSettings

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

__all__ = ["KIND_EXTRAS", "miroir_definitions"]

#: Definitions a kind has beyond its chunk asset and job (planning, verification, cutover),
#: keyed by job type; built only when that kind is registered.
KIND_EXTRAS: Mapping[str, Callable[[MiroirNames, JobKind], dg.Definitions]] = {
    "dump_import": dump_import_definitions,
    "reshard_backfill": reshard_definitions,
}


def miroir_definitions(
    *,
    jobs_dsn: str | None = None,
    topology: str | os.PathLike[str] | Mapping[str, Any] | Topology | None = None,
    settings: Mapping[str, Any] | PipelineSettings | None = None,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    dispatch_interval_s: int | dg.EnvVar | None = None,
    queue_depth_interval_s: int | dg.EnvVar | None = None,
    parent_report_interval_s: int | dg.EnvVar | None = None,
    max_chunk_runs: int | dg.EnvVar | None = None,
    dispatch_enabled: bool | dg.EnvVar | None = None,
    pushgateway_url: str | None = None,
    deployment: str | None = None,
    default_sensor_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
) -> dg.Definitions:
    """Miroir's chunked, resumable jobs as Dagster definitions.

    Called with no arguments, everything follows the environment when it runs (``MIROIR_JOBS_DSN``,
    ``MIROIR_TOPOLOGY``, ``MIROIR_<SETTING>``, ``MIROIR_PUSHGATEWAY_URL``, ...), then the embedded
    defaults (a SQLite jobs file and three local nodes under ``./.miroir``). Every setting (all
    arguments but ``key_prefix`` and ``default_sensor_status``, which shape the definitions)
    also accepts a ``dagster.EnvVar`` (``EnvVar.int`` for numbers; in ``settings``, per value), read
    when a run or tick starts (sensor intervals: when this function runs), so a DSN or URL given
    that way never shows in the UI or in run metadata.

    Args:
        jobs_dsn: the jobs table, ``sqlite:///path`` or ``postgresql://...`` (default
            ``$MIROIR_JOBS_DSN``).
        topology: the live topology: a YAML file path (or ``EnvVar`` naming one), a ``Topology``,
            or the same structure as a mapping (default ``$MIROIR_TOPOLOGY``).
        settings: overrides of ``PipelineSettings`` (``{"batch_size": 5000, "lease_ttl": 60}``;
            values may be ``EnvVar``), or a ``PipelineSettings`` (its explicitly set fields).
        key_prefix: namespaces everything: resource keys ``<prefix>_jobs``, ``<prefix>_topology``,
            ``<prefix>_settings``, ``<prefix>_pushgateway``, ``<prefix>_runtime``; asset keys
            ``[<prefix>, ...]`` in group ``<prefix>``; partitions, jobs, ops and sensors named
            ``<prefix>_...``. Two calls with different prefixes merge without clashing.
        dispatch_interval_s, queue_depth_interval_s, parent_report_interval_s: minimum seconds
            between sensor ticks (default ``$MIROIR_DISPATCH_INTERVAL`` /
            ``$MIROIR_QUEUE_DEPTH_INTERVAL`` / ``$MIROIR_PARENT_REPORT_INTERVAL``, else 15); fixed
            when this function runs.
        max_chunk_runs: chunk runs the dispatch sensor keeps in flight (default
            ``$MIROIR_MAX_CHUNK_RUNS``, else 4); read on every tick.
        dispatch_enabled: False makes the dispatch sensor a no-op (default
            ``$MIROIR_DISPATCH_ENABLED``, else on); read on every tick.
        pushgateway_url, deployment: where the queue-depth sensor pushes, and the ``deployment``
            label it groups by (default ``$MIROIR_PUSHGATEWAY_URL`` / ``$MIROIR_DEPLOYMENT``).
        default_sensor_status: whether the sensors start running (the default) or stopped.

    Every job kind in ``miroir_pipeline.jobs.registry`` gets its dynamic partitions, chunk asset
    and chunk job (in-process executor, tagged ``miroir/chunk-run=<kind name>``), a parent-level
    asset partitioned by parent id with the job that records one finished parent (see
    :mod:`miroir_pipeline.dagster.parent_reports`), and the sensors cover it; the prune job
    (``<prefix>_prune_job``) deletes old finished rows and their partitions. See
    :class:`MiroirNames` for every name. Chunk runs read a runtime
    resource (``<prefix>_runtime``) whose shutdown is never requested unless the process that
    launches the run binds its own (the worker pool does).
    """
    names = MiroirNames(key_prefix)
    registered = kinds()
    dispatch = DispatchOptions(
        interval_s=resolve_number(
            dispatch_interval_s, DISPATCH_INTERVAL_ENV, DEFAULT_DISPATCH_INTERVAL_S, 1, name="dispatch_interval_s"
        ),
        max_chunk_runs=max_chunk_runs,
        enabled=dispatch_enabled,
        default_status=default_sensor_status,
    )
    depth_interval = resolve_number(
        queue_depth_interval_s, QUEUE_DEPTH_INTERVAL_ENV, DEFAULT_QUEUE_DEPTH_INTERVAL_S, 1, name="queue_depth_interval_s"
    )
    report_interval = resolve_number(
        parent_report_interval_s,
        PARENT_REPORT_INTERVAL_ENV,
        DEFAULT_PARENT_REPORT_INTERVAL_S,
        1,
        name="parent_report_interval_s",
    )
    if max_chunk_runs is not None and env_var_name(max_chunk_runs) is None:
        resolve_number(max_chunk_runs, "", 0, 0, name="max_chunk_runs")  # refuse a bad cap now, not per tick

    parts: list[dg.Definitions] = []
    chunk_jobs: list[UnresolvedAssetJobDefinition] = []
    report_jobs: list[UnresolvedAssetJobDefinition] = []
    for kind in registered:
        asset = build_chunk_asset(kind, names, chunk_partitions(kind, names))
        job = build_chunk_job(kind, names, asset)
        chunk_jobs.append(job)
        parent_asset = build_parent_asset(kind, names, parent_partitions(kind, names))
        report_job = build_parent_report_job(kind, names, parent_asset)
        report_jobs.append(report_job)
        parts.append(dg.Definitions(assets=[asset, parent_asset], jobs=[job, report_job]))
        extras = KIND_EXTRAS.get(kind.job_type)
        if extras is not None:
            parts.append(extras(names, kind))

    parts.append(prune_definitions(names))

    core = dg.Definitions(
        sensors=[
            build_dispatch_sensor(names, registered, chunk_jobs, dispatch),
            build_queue_depth_sensor(names, registered, depth_interval, default_sensor_status),
            build_parent_report_sensor(names, registered, report_jobs, report_interval, default_sensor_status),
        ],
        resources={
            names.jobs_resource: JobStoreResource(dsn=jobs_dsn),
            names.topology_resource: TopologyResource.from_value(topology),
            names.settings_resource: SettingsResource.from_value(settings),
            names.pushgateway_resource: PushgatewayResource(
                url=pushgateway_url, deployment=deployment, key_prefix=names.key_prefix
            ),
            names.runtime_resource: runtime_resource(),
            names.results_io_manager: dg.mem_io_manager,
        },
    )
    return dg.Definitions.merge(*parts, core)
