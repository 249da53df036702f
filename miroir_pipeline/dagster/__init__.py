"""Dagster surface over the core: resources, chunk assets and jobs for every registered job kind,
the kinds' own extras (planning, verification), sensors, and the worker pool (:class:`Worker`).

Start from :func:`miroir_definitions`: it returns a ``dagster.Definitions`` to load as a code
location or merge into one's own (``dagster.Definitions.merge``); every name it gives out is
namespaced by its ``key_prefix`` (:class:`MiroirNames`). Importing this package reads no
environment: the environment applies when the definitions are built and when they run.
"""

from miroir_pipeline.dagster.definitions import miroir_definitions
from miroir_pipeline.dagster.names import MiroirNames
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
    "PushgatewayResource",
    "SettingsResource",
    "TopologyResource",
    "Worker",
    "WorkerStats",
    "miroir_definitions",
    "runtime_resource",
]
