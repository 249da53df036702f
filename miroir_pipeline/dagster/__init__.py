"""Dagster surface over the core: resources, chunk assets and jobs for every registered job kind,
one parent-level asset per kind (an import or reshard as a whole, :func:`record_parent`), the
kinds' own extras (planning, verification), the prune job (:func:`prune_finished`), sensors, and
the worker pool (:class:`Worker`).

Start from :func:`miroir_definitions`: it returns a ``dagster.Definitions`` to load as a code
location or merge into one's own (``dagster.Definitions.merge``); every name it gives out is
namespaced by its ``key_prefix`` (:class:`MiroirNames`). Importing this package reads no
environment: the environment applies when the definitions are built and when they run.
"""

from miroir_pipeline.dagster.definitions import miroir_definitions
from miroir_pipeline.dagster.names import MiroirNames
from miroir_pipeline.dagster.parent_reports import ParentRecord, record_parent
from miroir_pipeline.dagster.prune import PruneOutcome, prune_finished, remove_partitions
from miroir_pipeline.dagster.resources import (
    ChunkRuntime,
    JobStoreResource,
    PushgatewayResource,
    SettingsResource,
    TopologyResource,
    runtime_resource,
)
from miroir_pipeline.dagster.worker_pool import Worker, WorkerStats

__all__ = [
    "ChunkRuntime",
    "JobStoreResource",
    "MiroirNames",
    "ParentRecord",
    "PruneOutcome",
    "PushgatewayResource",
    "SettingsResource",
    "TopologyResource",
    "Worker",
    "WorkerStats",
    "miroir_definitions",
    "prune_finished",
    "record_parent",
    "remove_partitions",
    "runtime_resource",
]
