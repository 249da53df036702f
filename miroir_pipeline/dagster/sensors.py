"""Sensors: dispatch chunk runs from the jobs table, publish the queue depth.

* the dispatch sensor (``<prefix>_chunk_dispatch``) re-queues expired leases, registers the
  dynamic partition of every claimable chunk it sees, and requests one run per claimable chunk
  and attempt (run key = chunk id, attempt and the time the row became claimable), up to a cap of
  chunk runs in flight. The runs claim their chunk by id themselves: a run for a chunk someone
  else holds fails at once with a message naming the holder and leaves the lease alone.
* the queue-depth sensor (``<prefix>_queue_depth``) pushes
  ``miroir_background_queue_depth{job_type}`` to the Pushgateway on every tick (zeros included)
  for the worker autoscaler.

Both are running by default and built per set of definitions (:func:`build_sensors`): the
intervals are fixed when the definitions are built, the cap and the on/off switch are read on
every tick. Each tick is a handful of queries, never a chunk's work.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dagster as dg

from miroir_pipeline import metrics
from miroir_pipeline.dagster.names import TAG_ATTEMPT, TAG_CHUNK_RUN, TAG_WORKER_ID, MiroirNames
from miroir_pipeline.dagster.resources import JobStoreResource, PushgatewayResource
from miroir_pipeline.jobs.registry import JobKind
from miroir_pipeline.queue.contract import Job, JobStore

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

__all__ = [
    "CANDIDATES_SCANNED",
    "DEFAULT_DISPATCH_INTERVAL_S",
    "DEFAULT_MAX_CHUNK_RUNS",
    "DEFAULT_QUEUE_DEPTH_INTERVAL_S",
    "DISPATCH_ENABLED_ENV",
    "DISPATCH_INTERVAL_ENV",
    "MAX_CHUNK_RUNS_ENV",
    "QUEUE_DEPTH_INTERVAL_ENV",
    "DispatchOptions",
    "build_dispatch_sensor",
    "build_queue_depth_sensor",
    "chunk_run_key",
    "claimable_chunks",
    "env_var_name",
    "resolve_number",
]

DISPATCH_INTERVAL_ENV = "MIROIR_DISPATCH_INTERVAL"
DISPATCH_ENABLED_ENV = "MIROIR_DISPATCH_ENABLED"
MAX_CHUNK_RUNS_ENV = "MIROIR_MAX_CHUNK_RUNS"
QUEUE_DEPTH_INTERVAL_ENV = "MIROIR_QUEUE_DEPTH_INTERVAL"
DEFAULT_DISPATCH_INTERVAL_S = 15
DEFAULT_QUEUE_DEPTH_INTERVAL_S = 15
DEFAULT_MAX_CHUNK_RUNS = 4
#: How many claimable chunks a dispatch tick looks at per kind, in claim order (far above any cap).
CANDIDATES_SCANNED = 500

#: Run statuses of a run that is waiting for, or holding, a slot.
_IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]
#: Statuses of a run that has not yet reached its chunk claim: the chunk is spoken for.
_NOT_YET_CLAIMING = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
}
_FALSE = ("0", "false", "no", "off")


def env_var_name(value: Any) -> str | None:
    """The variable a ``dagster.EnvVar`` (or ``EnvVar.int``) names; None for anything else."""
    name = getattr(value, "env_var_name", None) if isinstance(value, (str, int)) else None
    return name if isinstance(name, str) else None


def resolve_number(value: Any, env_name: str, default: int, minimum: int, *, name: str = "value") -> int:
    """``value`` (an int, or a ``dagster.EnvVar`` read now), else ``$env_name``, else ``default``;
    a clear error, naming the argument (``name``) or variable, for anything that is not a whole
    number of at least ``minimum``."""
    source = env_name
    named = env_var_name(value)
    if named is not None:
        source = named
        raw: Any = os.environ.get(source, "")
    elif value is None:
        raw = os.environ.get(env_name, "")
    else:
        raw, source = value, name
    if isinstance(raw, str):
        raw = raw.strip()
        if not raw:
            return default
        try:
            raw = int(raw)
        except ValueError:
            raise ValueError(f"{source}={raw!r} is not a whole number; unset it or give e.g. {default}") from None
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ValueError(f"{source}={raw!r} is not a whole number")
    if raw < minimum:
        raise ValueError(f"{source}={raw} is below {minimum}")
    return raw


def _resolve_flag(value: Any, env_name: str) -> tuple[bool, str]:
    """Whether a switch is on, and how to turn it back on (for the skip message)."""
    if isinstance(value, bool):
        return value, "the definitions were built with it off"
    name = env_var_name(value)
    if name is None and isinstance(value, str):
        return value.strip().lower() not in _FALSE, f"the definitions were built with {value!r}"
    name = name or env_name
    raw = os.environ.get(name, "1").strip().lower()
    return raw not in _FALSE, f"{name}={raw}"


@dataclass(frozen=True)
class DispatchOptions:
    """How the dispatch sensor behaves; ``None`` fields follow their environment variable."""

    interval_s: int
    max_chunk_runs: int | Any | None = None
    enabled: bool | Any | None = None
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING


def chunk_run_key(job: Job) -> str:
    """Run key of the next attempt of a claimable chunk: ``{id}:{attempt}:{claimable-since ms}``.

    The attempt number alone is not enough: a chunk handed back on shutdown gets its attempt
    back, so the time the row became claimable again tells that second try apart.
    """
    since = job.available_at or job.updated_at
    return f"{job.id}:{job.attempts + 1}:{int(since.timestamp() * 1000)}"


def claimable_chunks(store: JobStore, job_type: str) -> tuple[list[Job], list[str]]:
    """Claimable chunks of ``job_type`` in claim order (fair across parents: the store
    interleaves parents queued together), and their ids for partition registration."""
    candidates = store.claimable([job_type], limit=CANDIDATES_SCANNED)
    return candidates, [c.id for c in candidates]


def _chunk_runs_in_flight(instance: dg.DagsterInstance, job_names: set[str], tag_values: list[str]) -> list[dg.RunRecord]:
    """Chunk runs of these definitions launched through the run queue that are waiting for or
    holding a slot.

    Worker-pool runs (tagged with their worker id) are left out: the pool is bounded by its own
    size, and a killed worker's run stays "started" forever, which must not eat the cap.
    """
    if not tag_values:
        return []
    records = instance.get_run_records(filters=dg.RunsFilter(statuses=_IN_FLIGHT, tags={TAG_CHUNK_RUN: tag_values}))
    return [
        r for r in records if TAG_WORKER_ID not in r.dagster_run.tags and r.dagster_run.job_name in job_names
    ]


def _runs_of_partitions(instance: dg.DagsterInstance, job_name: str, keys: Sequence[str]) -> list[dg.RunRecord]:
    if not keys:
        return []
    return list(
        instance.get_run_records(filters=dg.RunsFilter(job_name=job_name, tags={"dagster/partition": list(keys)}))
    )


def _plan_runs(
    context: dg.SensorEvaluationContext,
    store: JobStore,
    kinds: Sequence[JobKind],
    names: MiroirNames,
    budget: int,
) -> tuple[list[dg.RunRequest], list[dg.AddDynamicPartitionsRequest], list[str]]:
    instance = context.instance
    run_requests: list[dg.RunRequest] = []
    partition_requests: list[dg.AddDynamicPartitionsRequest] = []
    notes: list[str] = []
    for kind in kinds:
        partitions_name, job_name = names.partitions(kind), names.chunk_job(kind)
        candidates, all_ids = claimable_chunks(store, kind.job_type)
        known = set(instance.get_dynamic_partitions(partitions_name))
        missing = [cid for cid in all_ids if cid not in known]
        if missing:
            partition_requests.append(
                dg.AddDynamicPartitionsRequest(partitions_def_name=partitions_name, partition_keys=missing)
            )
            notes.append(f"registered {len(missing)} {partitions_name} partition(s)")
        if not candidates or budget <= len(run_requests):
            continue
        existing = _runs_of_partitions(instance, job_name, [c.id for c in candidates])
        used_keys = {r.dagster_run.tags.get("dagster/run_key") for r in existing}
        pending = {
            r.dagster_run.tags.get("dagster/partition")
            for r in existing
            if r.dagster_run.status in _NOT_YET_CLAIMING
        }
        for job in candidates:
            if len(run_requests) >= budget:
                break
            key = chunk_run_key(job)
            if key in used_keys or job.id in pending:
                continue
            run_requests.append(
                dg.RunRequest(
                    run_key=key,
                    job_name=job_name,
                    partition_key=job.id,
                    tags={TAG_CHUNK_RUN: kind.name, TAG_ATTEMPT: str(job.attempts + 1)},
                )
            )
    return run_requests, partition_requests, notes


def build_dispatch_sensor(
    names: MiroirNames,
    kinds: Sequence[JobKind],
    chunk_jobs: Sequence["UnresolvedAssetJobDefinition"],
    options: DispatchOptions,
) -> dg.SensorDefinition:
    """The dispatch sensor of the definitions named by ``names``, for the chunk kinds given."""
    jobs_key = names.jobs_resource
    kinds = tuple(kinds)
    job_names = {names.chunk_job(k) for k in kinds}
    tag_values = [k.name for k in kinds]

    @dg.sensor(
        name=names.dispatch_sensor,
        jobs=list(chunk_jobs) or None,
        minimum_interval_seconds=options.interval_s,
        default_status=options.default_status,
        required_resource_keys={jobs_key},
        description=(
            "Re-queue expired chunk leases, register chunk partitions and launch one run per "
            f"claimable chunk attempt ({', '.join(k.job_type for k in kinds) or 'no kinds registered'}), "
            f"at most max_chunk_runs (${MAX_CHUNK_RUNS_ENV}, default {DEFAULT_MAX_CHUNK_RUNS}) chunk runs "
            f"in flight. ${DISPATCH_ENABLED_ENV}=0 turns it into a no-op."
        ),
    )
    def _dispatch(context: dg.SensorEvaluationContext, **_resources: Any) -> dg.SensorResult | dg.SkipReason:
        # (a direct call, as in a test, also passes the required resources as keywords)
        enabled, why = _resolve_flag(options.enabled, DISPATCH_ENABLED_ENV)
        if not enabled:
            return dg.SkipReason(f"chunk dispatch is off ({why})")
        jobs: JobStoreResource = getattr(context.resources, jobs_key)
        store = jobs.get_store()
        reclaimed = store.reclaim_expired()
        cap = resolve_number(
            options.max_chunk_runs, MAX_CHUNK_RUNS_ENV, DEFAULT_MAX_CHUNK_RUNS, 0, name="max_chunk_runs"
        )
        in_flight = len(_chunk_runs_in_flight(context.instance, job_names, tag_values))
        budget = max(cap - in_flight, 0)
        run_requests, partition_requests, notes = _plan_runs(context, store, kinds, names, budget)
        if reclaimed:
            notes.insert(0, f"re-queued {reclaimed} expired lease(s)")
        summary = f"{len(run_requests)} chunk run(s) requested; {in_flight}/{cap} in flight"
        context.log.info("; ".join([*notes, summary]))
        if not run_requests and not partition_requests:
            return dg.SkipReason("; ".join([*notes, f"nothing to launch ({in_flight}/{cap} chunk runs in flight)"]))
        return dg.SensorResult(run_requests=run_requests, dynamic_partitions_requests=partition_requests)

    return _dispatch


def _set_local_gauge(depth: Mapping[str, int]) -> None:
    for job_type, count in depth.items():
        metrics.QUEUE_DEPTH.labels(job_type=str(job_type)).set(int(count))


def _describe(depth: Mapping[str, int]) -> str:
    return ", ".join(f"{t}={n}" for t, n in sorted(depth.items())) or "empty"


def build_queue_depth_sensor(
    names: MiroirNames,
    kinds: Sequence[JobKind],
    interval_s: int,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
) -> dg.SensorDefinition:
    """The queue-depth sensor of the definitions named by ``names``: every registered kind is
    pushed, at zero when it has nothing claimable."""
    jobs_key, gateway_key = names.jobs_resource, names.pushgateway_resource
    job_types = [k.job_type for k in kinds]

    @dg.sensor(
        name=names.queue_depth_sensor,
        minimum_interval_seconds=interval_s,
        default_status=default_status,
        required_resource_keys={jobs_key, gateway_key},
        description=(
            f"Push {metrics.QUEUE_DEPTH_METRIC}{{job_type}} to the Pushgateway of resource "
            f"{gateway_key} (default ${metrics.PUSHGATEWAY_URL_ENV}, grouped by "
            f"deployment=${metrics.DEPLOYMENT_ENV}) for the worker autoscaler."
        ),
    )
    def _queue_depth(context: dg.SensorEvaluationContext, **_resources: Any) -> dg.SkipReason:
        jobs: JobStoreResource = getattr(context.resources, jobs_key)
        gateway: PushgatewayResource = getattr(context.resources, gateway_key)
        depth = jobs.get_store().queue_depth(job_types)  # every kind, 0 when drained
        _set_local_gauge(depth)
        try:
            pushed = gateway.push(depth)
        except metrics.MetricsPushError as exc:
            context.log.warning(str(exc))
            return dg.SkipReason(f"queue depth {_describe(depth)} not published: {exc}")
        if not pushed:
            return dg.SkipReason(
                f"queue depth {_describe(depth)}; not pushed: no Pushgateway configured "
                f"(${metrics.PUSHGATEWAY_URL_ENV} is not set)"
            )
        return dg.SkipReason(f"pushed queue depth {_describe(depth)}")

    return _queue_depth
