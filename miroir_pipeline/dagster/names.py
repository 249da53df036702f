"""Every name the Dagster surface gives out, derived from one key prefix.

Resource keys, asset keys, partitions definitions, jobs, ops and sensors all carry the prefix
(``miroir`` by default), so the definitions merge into a user's code location without clashing
with its own names, and two sets built with different prefixes live side by side.

Run tags are not prefixed: they describe what a run is (a chunk run, the claim it adopts) and the
instance config (``dagster.yaml``) caps concurrent chunk runs on them, whatever the prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import dagster as dg

from miroir_pipeline.jobs.registry import JobKind, kind_for

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "POOL_CHUNK_RUN",
    "TAG_ATTEMPT",
    "TAG_CHUNK_RUN",
    "TAG_CLAIM_TOKEN",
    "TAG_PARENT_REPORT",
    "TAG_REIMPORT",
    "TAG_WORKER_ID",
    "MiroirNames",
]

DEFAULT_KEY_PREFIX = "miroir"

#: Run tags the worker pool sets so a run adopts the claim the worker already made.
TAG_CLAIM_TOKEN = "miroir/claim_token"
TAG_WORKER_ID = "miroir/worker_id"
#: ``true`` on a run of a completed chunk imports it again from the start.
TAG_REIMPORT = "miroir/reimport"
#: Every chunk run carries ``miroir/chunk-run=<kind name>`` (``dump``, ``reshard``); the shipped
#: ``dagster.yaml`` caps concurrent runs per value. Worker-pool runs carry ``pool`` instead.
TAG_CHUNK_RUN = "miroir/chunk-run"
POOL_CHUNK_RUN = "pool"
#: Which attempt of the chunk a dispatched run is meant to be.
TAG_ATTEMPT = "miroir/attempt"
#: On a run recording a finished parent: ``{parent id}:{state}:{finished at, ms}``, so the same
#: finish is recorded once whoever records it (the sensor, or the CLI in its own process).
TAG_PARENT_REPORT = "miroir/parent-report"

_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,39}$")


@dataclass(frozen=True)
class MiroirNames:
    """The names of one set of Miroir definitions (one :func:`miroir_definitions` call)."""

    key_prefix: str = DEFAULT_KEY_PREFIX

    def __post_init__(self) -> None:
        if not isinstance(self.key_prefix, str) or not _PREFIX.match(self.key_prefix):
            raise ValueError(
                f"key_prefix {self.key_prefix!r} must start with a letter and hold only letters, "
                "digits and underscores (at most 40): it becomes part of resource keys, job and "
                "sensor names"
            )

    def _name(self, name: str) -> str:
        return f"{self.key_prefix}_{name}"

    # -- resources ----------------------------------------------------------------------------
    @property
    def jobs_resource(self) -> str:
        """The jobs table (:class:`~miroir_pipeline.dagster.resources.JobStoreResource`)."""
        return self._name("jobs")

    @property
    def topology_resource(self) -> str:
        return self._name("topology")

    @property
    def settings_resource(self) -> str:
        return self._name("settings")

    @property
    def pushgateway_resource(self) -> str:
        return self._name("pushgateway")

    @property
    def results_io_manager(self) -> str:
        """Where the plan and prune ops' return values go: in memory, so an ``io_manager`` of
        the code location Miroir is merged into is never asked to store them."""
        return self._name("results_io_manager")

    @property
    def runtime_resource(self) -> str:
        """What the launcher of a chunk run hands it (its shutdown); see ``ChunkRuntime``."""
        return self._name("runtime")

    @property
    def resource_keys(self) -> tuple[str, ...]:
        return (
            self.jobs_resource,
            self.topology_resource,
            self.settings_resource,
            self.pushgateway_resource,
            self.runtime_resource,
            self.results_io_manager,
        )

    # -- assets -------------------------------------------------------------------------------
    @property
    def group_name(self) -> str:
        return self.key_prefix

    def asset_key(self, name: str) -> dg.AssetKey:
        return dg.AssetKey([self.key_prefix, name])

    def op_name(self, asset_key: dg.AssetKey) -> str:
        """The op Dagster derives from an asset key (run config goes under it)."""
        return "__".join(asset_key.path)

    # -- chunk kinds --------------------------------------------------------------------------
    def partitions(self, kind: JobKind | str) -> str:
        """Dynamic partitions of a kind's chunks (``miroir_dump_chunks``), one per chunk id."""
        return self._name(_kind(kind).partitions_name)

    def chunk_asset_key(self, kind: JobKind | str) -> dg.AssetKey:
        return self.asset_key(_kind(kind).asset_name)

    def chunk_job(self, kind: JobKind | str) -> str:
        """The job that runs one chunk of a kind (``miroir_dump_chunk_job``)."""
        return self._name(_kind(kind).job_name)

    def chunk_op(self, kind: JobKind | str) -> str:
        return self.op_name(self.chunk_asset_key(kind))

    @property
    def has_documents_check(self) -> str:
        """The WARN check on chunk and parent assets: fails when every document was invalid."""
        return "has_documents"

    def chunk_check_key(self, kind: JobKind | str) -> dg.AssetCheckKey:
        return dg.AssetCheckKey(self.chunk_asset_key(kind), self.has_documents_check)

    # -- parents (one import, one reshard) ----------------------------------------------------
    def parent_partitions(self, kind: JobKind | str) -> str:
        """Dynamic partitions of a kind's parents (``miroir_dump_imports``), one per parent id."""
        return self._name(f"{_kind(kind).job_type}s")

    def parent_asset_key(self, kind: JobKind | str) -> dg.AssetKey:
        """The asset recording one parent as a whole (``miroir/dump_import``), when it finishes."""
        return self.asset_key(_kind(kind).job_type)

    def parent_check_key(self, kind: JobKind | str) -> dg.AssetCheckKey:
        return dg.AssetCheckKey(self.parent_asset_key(kind), self.has_documents_check)

    def parent_op(self, kind: JobKind | str) -> str:
        return self.op_name(self.parent_asset_key(kind))

    def parent_report_job(self, kind: JobKind | str) -> str:
        """The job that records one finished parent (``miroir_dump_import_report_job``)."""
        return self._name(f"{_kind(kind).job_type}_report_job")

    # -- prune ----------------------------------------------------------------------------------
    @property
    def prune_job(self) -> str:
        return self._name("prune_job")

    @property
    def prune_op(self) -> str:
        """The op of the prune job: its run config (``older_than_s``) goes under this name."""
        return self._name("prune")

    # -- dump import --------------------------------------------------------------------------
    @property
    def plan_dump_import_job(self) -> str:
        return self._name("plan_dump_import_job")

    @property
    def plan_dump_import_op(self) -> str:
        return self._name("plan_dump_import")

    # -- reshard ------------------------------------------------------------------------------
    @property
    def plan_reshard_job(self) -> str:
        return self._name("plan_reshard_job")

    @property
    def plan_reshard_op(self) -> str:
        return self._name("plan_reshard")

    @property
    def reshard_shadow_key(self) -> dg.AssetKey:
        return self.asset_key("reshard_shadow")

    @property
    def reshard_shadow_op(self) -> str:
        """The op of ``reshard_shadow``: its run config (``parent_job_id``) goes under this name."""
        return self.op_name(self.reshard_shadow_key)

    @property
    def reshard_cutover_key(self) -> dg.AssetKey:
        return self.asset_key("reshard_cutover")

    @property
    def shadow_check_name(self) -> str:
        return "shadow_matches_live"

    @property
    def shadow_check_key(self) -> dg.AssetCheckKey:
        return dg.AssetCheckKey(self.reshard_shadow_key, self.shadow_check_name)

    @property
    def reshard_verify_job(self) -> str:
        return self._name("reshard_verify_job")

    # -- sensors ------------------------------------------------------------------------------
    @property
    def dispatch_sensor(self) -> str:
        return self._name("chunk_dispatch")

    @property
    def queue_depth_sensor(self) -> str:
        return self._name("queue_depth")

    @property
    def parent_report_sensor(self) -> str:
        return self._name("parent_reports")


def _kind(kind: JobKind | str) -> JobKind:
    """A kind, or the kind of a job type (``dump_import``)."""
    return kind if isinstance(kind, JobKind) else kind_for(kind)
