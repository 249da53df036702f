"""Resources: the job store, the topology and the processing settings.

Secrets never sit in resource config: the jobs DSN and Meilisearch API keys are read from
environment variables (``dsn`` may be an ``EnvVar``), so they never show in the UI.
"""


import os
import threading

import dagster as dg

from miroir_pipeline.fleet.targets.base import NodeTarget
from miroir_pipeline.fleet.targets.factory import open_target
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.settings import PipelineSettings, resolve_topology
from miroir_pipeline.queue import JobStore, open_store

_lock = threading.Lock()
_stores: dict[str, JobStore] = {}
_targets: dict[tuple[str, str], NodeTarget] = {}


class JobStoreResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The jobs table. ``dsn`` (an ``EnvVar`` in production) or else ``$MIROIR_JOBS_DSN``."""

    dsn: str | None = None

    def get_store(self) -> JobStore:
        dsn = self.dsn or os.environ.get("MIROIR_JOBS_DSN") or ""
        with _lock:
            store = _stores.get(dsn)
            if store is None:
                store = open_store(dsn or None)
                _stores[dsn] = store
            return store


class TopologyResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The live topology: a YAML file, else ``$MIROIR_TOPOLOGY``, else the local default."""

    path: str | None = None

    def get_topology(self) -> Topology:
        return resolve_topology(self.path)


class SettingsResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Overrides of :class:`PipelineSettings`; unset (None) fields keep the embedded defaults."""

    allowed_roots: list[str] | None = None
    staging_dir: str | None = None
    dead_letter_dir: str | None = None
    chunk_size_bytes: int | None = None
    memory_buffer_bytes: int | None = None
    batch_size: int | None = None
    on_invalid_document: str | None = None
    lease_ttl: float | None = None
    heartbeat_interval: float | None = None
    max_attempts: int | None = None

    def get_settings(self) -> PipelineSettings:
        return PipelineSettings.from_env(**self.model_dump())


def targets_for(topology: Topology) -> dict[str, NodeTarget]:
    """Node targets, one per node, kept for the life of the process (connection reuse)."""
    out: dict[str, NodeTarget] = {}
    with _lock:
        for node in topology.all_nodes():
            key = (node.id, node.url)
            target = _targets.get(key)
            if target is None:
                target = open_target(node)
                _targets[key] = target
            out[node.id] = target
    return out
