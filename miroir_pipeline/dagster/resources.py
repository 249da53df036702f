"""Resources: the jobs table, the topology, the processing settings, the Pushgateway, and the
runtime a chunk run gets from whoever launched it.

Every configurable field accepts a ``dagster.EnvVar`` (``EnvVar.int`` for whole numbers), which
Dagster resolves when a run or sensor tick starts: a DSN or URL given that way never shows in the
UI or in run metadata. A field left unset falls back to its ``MIROIR_*`` environment variable,
read when the resource is used (never at import), then to the embedded default.
"""

import json
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

import dagster as dg
import yaml

from miroir_pipeline import metrics
from miroir_pipeline.dagster.names import DEFAULT_KEY_PREFIX
from miroir_pipeline.fleet.targets.base import NodeTarget
from miroir_pipeline.fleet.targets.factory import open_target
from miroir_pipeline.fleet.topology import Node, Topology
from miroir_pipeline.jobs.registry import ChunkReport
from miroir_pipeline.jobs.settings import PipelineSettings, resolve_topology
from miroir_pipeline.queue import JobStore, open_store
from miroir_pipeline.queue.shutdown import Shutdown

__all__ = [
    "ChunkRuntime",
    "JobStoreResource",
    "PushgatewayResource",
    "SettingsResource",
    "TopologyResource",
    "runtime_resource",
    "targets_for",
]

_lock = threading.Lock()
_stores: dict[str, JobStore] = {}
_targets: dict[Node, NodeTarget] = {}


class JobStoreResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """The jobs table: ``dsn`` (an ``EnvVar`` in production), else ``$MIROIR_JOBS_DSN``, else a
    SQLite file under the Miroir home. One store per DSN and process (connection reuse)."""

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
    """The live topology: ``spec`` (the topology itself, YAML or JSON text), else the YAML file
    at ``path``, else ``$MIROIR_TOPOLOGY``, else three local nodes under the Miroir home."""

    path: str | None = None
    spec: str | None = None

    @classmethod
    def from_value(cls, value: Any) -> "TopologyResource":
        """A resource for what :func:`miroir_definitions` accepts as ``topology``: a path (or an
        ``EnvVar`` naming one), a :class:`Topology`, or the same structure as a mapping."""
        if value is None:
            return cls()
        if isinstance(value, TopologyResource):
            return value
        if isinstance(value, Topology):
            return cls(spec=value.model_dump_json())
        if isinstance(value, Mapping):
            Topology.parse(dict(value), source="miroir_definitions(topology=...)")  # refuse it now
            return cls(spec=json.dumps(dict(value)))
        if isinstance(value, dg.EnvVar):
            return cls(path=value)
        if isinstance(value, (str, os.PathLike)):
            return cls(path=os.fspath(value))
        raise TypeError(
            f"topology must be a file path, a dagster.EnvVar, a Topology or a mapping, not {type(value).__name__}"
        )

    def get_topology(self) -> Topology:
        if self.spec:
            return Topology.parse(yaml.safe_load(self.spec), source="topology resource")
        return resolve_topology(self.path)


class SettingsResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Overrides of :class:`PipelineSettings`; an unset (None) field keeps its ``MIROIR_<FIELD>``
    environment variable or embedded default."""

    allowed_roots: list[str] | None = None
    staging_dir: str | None = None
    dead_letter_dir: str | None = None
    chunk_size_bytes: int | None = None
    memory_buffer_bytes: int | None = None
    read_block_bytes: int | None = None
    batch_size: int | None = None
    batch_bytes: int | None = None
    max_document_bytes: int | None = None
    on_invalid_document: str | None = None
    lease_ttl: float | None = None
    heartbeat_interval: float | None = None
    max_attempts: int | None = None

    @classmethod
    def from_value(cls, value: Any) -> "SettingsResource":
        """A resource for what :func:`miroir_definitions` accepts as ``settings``: a mapping of
        overrides (values may be ``EnvVar``), or :class:`PipelineSettings` (its explicitly set
        fields only, so the others still follow the environment)."""
        if value is None:
            return cls()
        if isinstance(value, SettingsResource):
            return value
        if isinstance(value, PipelineSettings):
            return cls(**value.model_dump(exclude_unset=True))
        if isinstance(value, Mapping):
            unknown = set(value) - set(cls.model_fields)
            if unknown:
                raise ValueError(
                    f"unknown settings {sorted(unknown)}; known: {', '.join(sorted(cls.model_fields))}"
                )
            return cls(**dict(value))
        raise TypeError(f"settings must be a mapping or PipelineSettings, not {type(value).__name__}")

    def get_settings(self) -> PipelineSettings:
        overrides = {k: v for k, v in self.model_dump().items() if v is not None}
        return PipelineSettings.from_env(**overrides)


class PushgatewayResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Where the queue-depth sensor pushes ``miroir_background_queue_depth``: ``url`` (an
    ``EnvVar`` if it carries credentials), else ``$MIROIR_PUSHGATEWAY_URL``; grouped by
    ``deployment``, else ``$MIROIR_DEPLOYMENT``, else the default deployment label.

    Definitions built with another ``key_prefix`` than the default push a group of their own
    (``key_prefix`` label too): each push replaces its whole group, so two sets of definitions
    sharing one group would overwrite each other's depths. The default prefix keeps the plain
    group, so an upgrade leaves no stale group behind for the autoscaler to add up."""

    url: str | None = None
    deployment: str | None = None
    key_prefix: str = DEFAULT_KEY_PREFIX

    def push(self, depth: Mapping[str, int]) -> bool:
        """Push ``depth``; False (nothing pushed) when no gateway is configured. Raises
        ``metrics.MetricsPushError`` naming the gateway (credentials redacted) on failure."""
        url = (self.url or os.environ.get(metrics.PUSHGATEWAY_URL_ENV, "")).strip()
        if not url:
            return False
        deployment = (
            self.deployment or os.environ.get(metrics.DEPLOYMENT_ENV, "")
        ).strip() or metrics.DEFAULT_DEPLOYMENT
        group = {metrics.DEPLOYMENT_LABEL: deployment}
        if self.key_prefix != DEFAULT_KEY_PREFIX:
            group[metrics.KEY_PREFIX_LABEL] = self.key_prefix
        metrics.push_queue_depth(url, depth, grouping_key=group)
        return True


class ChunkRuntime:
    """What a chunk run gets from whoever launched it, beyond config: the :class:`Shutdown` its
    chunk watches (the chunk hands itself back at its next batch once a drain is requested) and
    an optional per-batch callback.

    Runs launched from the UI, a sensor or GraphQL get a fresh runtime whose shutdown nobody
    requests; the worker pool launches each run with its own (see :func:`runtime_resource`).
    """

    def __init__(
        self,
        shutdown: Shutdown | None = None,
        on_batch: Callable[[ChunkReport], None] | None = None,
    ) -> None:
        self.shutdown = shutdown if shutdown is not None else Shutdown()
        self.on_batch = on_batch

    def __repr__(self) -> str:
        return f"ChunkRuntime(shutdown requested={self.shutdown.requested})"


def runtime_resource(
    shutdown: Shutdown | None = None,
    on_batch: Callable[[ChunkReport], None] | None = None,
) -> dg.ResourceDefinition:
    """The runtime resource: bound to ``shutdown`` (a launcher passes it per run with
    ``execute_in_process(resources={names.runtime_resource: runtime_resource(shutdown)})``), or,
    without one, a fresh never-requested shutdown per run (the default in the definitions)."""
    description = "The shutdown a chunk run watches (set by the process that launched the run)."
    if shutdown is None and on_batch is None:
        return dg.ResourceDefinition(resource_fn=lambda _init: ChunkRuntime(), description=description)
    return dg.ResourceDefinition.hardcoded_resource(ChunkRuntime(shutdown, on_batch), description)


def targets_for(topology: Topology) -> dict[str, NodeTarget]:
    """Node targets, one per node, kept for the life of the process (connection reuse). A
    node is the same only with all of its settings: a plan made after the topology changed a
    node's payload limit or key variable gets a target that applies them."""
    out: dict[str, NodeTarget] = {}
    with _lock:
        for node in topology.all_nodes():
            target = _targets.get(node)
            if target is None:
                target = open_target(node)
                _targets[node] = target
            out[node.id] = target
    return out
