"""Job kinds and the one registry every other layer reads them from.

A kind is a folder under :mod:`miroir_pipeline.jobs` whose package registers a :class:`JobKind`
when imported (``register(JobKind(...))``). The worker pool, the dispatch sensor, the Dagster
partitions and chunk assets, the metrics' zero-fills and ``status`` all iterate :func:`kinds`, so a
new kind is its own folder and nothing else. Kinds shipped by other packages register through the
``miroir_pipeline.job_kinds`` entry-point group (the entry point names the kind's module).
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

from pydantic import BaseModel

from miroir_pipeline import metrics
from miroir_pipeline.fleet.targets.base import NodeTarget
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue.contract import JobStore, Lease
from miroir_pipeline.queue.shutdown import Shutdown

__all__ = [
    "ENTRY_POINT_GROUP",
    "ChunkEnv",
    "ChunkReport",
    "JobKind",
    "UnknownJobKind",
    "job_types",
    "kind_for",
    "kinds",
    "register",
]

ENTRY_POINT_GROUP = "miroir_pipeline.job_kinds"


class ChunkReport(Protocol):
    """What processing one chunk did; its metadata becomes the Dagster materialization's."""

    chunk_id: str
    attempt: int
    documents: int

    def as_metadata(self) -> dict[str, Any]: ...

    def summary(self) -> str: ...


@dataclass(frozen=True)
class ChunkEnv:
    """What a chunk needs besides its lease, handed down explicitly by whoever runs it."""

    settings: PipelineSettings
    #: Node targets for a topology (the caller keeps them open across chunks).
    targets: Callable[[Topology], Mapping[str, NodeTarget]]
    shutdown: Shutdown
    #: Called after every committed batch (progress bars, tests).
    on_batch: Callable[[ChunkReport], None] | None = None


#: ``process(store, lease, env)``: run one claimed chunk to completion under its lease.
ChunkProcessor = Callable[[JobStore, Lease, ChunkEnv], ChunkReport]


@dataclass(frozen=True)
class JobKind:
    """One kind of background job: its rows' ``type``, its chunk params and its processor."""

    #: The ``type`` column of its rows (``dump_import``).
    job_type: str
    #: Short name that derives the Dagster names: ``{name}_chunks`` partitions, ``{name}_chunk``
    #: asset, ``{name}_chunk_job`` job, and the ``miroir/chunk-run={name}`` run tag.
    name: str
    description: str
    #: Validates a chunk row's ``params`` at the edge.
    params_model: type[BaseModel]
    process: ChunkProcessor
    #: Progress key that counts a parent's documents (for ``status`` and summaries).
    documents_key: str = "documents"

    @property
    def partitions_name(self) -> str:
        return f"{self.name}_chunks"

    @property
    def asset_name(self) -> str:
        return f"{self.name}_chunk"

    @property
    def job_name(self) -> str:
        return f"{self.name}_chunk_job"


class UnknownJobKind(KeyError):
    """A row's ``type`` that no registered kind handles."""


_lock = threading.RLock()
_kinds: dict[str, JobKind] = {}
_discovered = False


def register(kind: JobKind) -> JobKind:
    """Add ``kind`` to the registry (idempotent for the same object); returns it."""
    with _lock:
        known = _kinds.get(kind.job_type)
        if known is not None and known != kind:
            raise ValueError(f"job type {kind.job_type!r} is registered twice ({known.name}, {kind.name})")
        clash = [k for k in _kinds.values() if k.name == kind.name and k.job_type != kind.job_type]
        if clash:
            raise ValueError(f"job kind name {kind.name!r} is used by {clash[0].job_type!r} already")
        _kinds[kind.job_type] = kind
    metrics.prime_job_type(kind.job_type)
    return kind


def _discover() -> None:
    global _discovered
    with _lock:
        if _discovered:
            return
        _discovered = True
        package = importlib.import_module("miroir_pipeline.jobs")
        for info in pkgutil.iter_modules(package.__path__, "miroir_pipeline.jobs."):
            if info.ispkg:
                importlib.import_module(info.name)
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            importlib.import_module(ep.value.split(":", 1)[0])


def kinds() -> tuple[JobKind, ...]:
    """Every registered kind, in job-type order (the kind packages are imported on first use)."""
    _discover()
    with _lock:
        return tuple(_kinds[t] for t in sorted(_kinds))


def job_types() -> tuple[str, ...]:
    return tuple(k.job_type for k in kinds())


def kind_for(job_type: str) -> JobKind:
    """The kind of rows of ``job_type``; :class:`UnknownJobKind` names the registered ones."""
    for kind in kinds():
        if kind.job_type == job_type:
            return kind
    raise UnknownJobKind(f"no job kind handles type {job_type!r} (registered: {', '.join(job_types())})")
