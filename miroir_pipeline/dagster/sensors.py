"""Sensors (DESIGN §7-8): dispatch chunk runs from the jobs table, publish the queue depth.

* ``miroir_chunk_dispatch`` re-queues expired leases, registers the dynamic partition of every
  claimable chunk it sees, and requests one run per claimable chunk and attempt (run
  key = chunk id, attempt and the time the row became claimable), up to a cap of chunk runs
  in flight. The runs claim their chunk by id themselves: a run for a chunk someone else
  holds fails at once with a message naming the holder and leaves the lease alone.
* ``miroir_queue_depth`` pushes ``miroir_background_queue_depth{job_type}`` to the
  Pushgateway on every tick (zeros included) for the worker HPA.

Both are running by default. Each tick is a handful of queries, never a chunk's work.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dagster as dg

from miroir_pipeline import metrics
from miroir_pipeline.dagster.dump_import_assets import dump_chunk_job
from miroir_pipeline.dagster.partitions import (
    DUMP_CHUNKS,
    RESHARD_CHUNKS,
    TAG_CHUNK_RUN,
    TAG_WORKER_ID,
)
from miroir_pipeline.dagster.reshard_assets import reshard_chunk_job
from miroir_pipeline.dagster.resources import JobStoreResource
from miroir_pipeline.queue.contract import Job, JobStore, JobType

__all__ = [
    "DISPATCH_ENABLED_ENV",
    "DISPATCH_INTERVAL_ENV",
    "MAX_CHUNK_RUNS_ENV",
    "QUEUE_DEPTH_INTERVAL_ENV",
    "TAG_ATTEMPT",
    "ChunkKind",
    "chunk_dispatch_sensor",
    "chunk_run_key",
    "claimable_chunks",
    "queue_depth_sensor",
]

DISPATCH_INTERVAL_ENV = "MIROIR_DISPATCH_INTERVAL"
DISPATCH_ENABLED_ENV = "MIROIR_DISPATCH_ENABLED"
MAX_CHUNK_RUNS_ENV = "MIROIR_MAX_CHUNK_RUNS"
QUEUE_DEPTH_INTERVAL_ENV = "MIROIR_QUEUE_DEPTH_INTERVAL"
#: Run tag: which attempt of the chunk a dispatched run is meant to be.
TAG_ATTEMPT = "miroir/attempt"
#: How many claimable chunks a dispatch tick looks at, in claim order (far above any run cap).
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


@dataclass(frozen=True)
class ChunkKind:
    """A chunk type, the job that imports one chunk and its dynamic partitions."""

    job_type: str
    job_name: str
    partitions_name: str
    chunk_run_tag: str


#: The chunk types the dispatch sensor launches.
CHUNK_KINDS: tuple[ChunkKind, ...] = (
    ChunkKind(JobType.DUMP_IMPORT, dump_chunk_job.name, DUMP_CHUNKS, "dump"),
    ChunkKind(JobType.RESHARD_BACKFILL, reshard_chunk_job.name, RESHARD_CHUNKS, "reshard"),
)


def _env_number(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number; unset it or give e.g. {default}") from None
    if value < minimum:
        raise ValueError(f"{name}={value} is below {minimum}")
    return value


def _dispatch_enabled() -> bool:
    return os.environ.get(DISPATCH_ENABLED_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


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


def _chunk_runs_in_flight(instance: dg.DagsterInstance) -> list[dg.RunRecord]:
    """Chunk runs launched through the run queue that are waiting for or holding a slot.

    Worker-pool runs (tagged with their worker id) are left out: the pool is bounded by its
    own size, and a killed worker's run stays "started" forever, which must not eat the cap.
    """
    records = instance.get_run_records(
        filters=dg.RunsFilter(statuses=_IN_FLIGHT, tags={TAG_CHUNK_RUN: [k.chunk_run_tag for k in CHUNK_KINDS]})
    )
    return [r for r in records if TAG_WORKER_ID not in r.dagster_run.tags]


def _runs_of_partitions(instance: dg.DagsterInstance, job_name: str, keys: Sequence[str]) -> list[dg.RunRecord]:
    if not keys:
        return []
    return list(
        instance.get_run_records(
            filters=dg.RunsFilter(job_name=job_name, tags={"dagster/partition": list(keys)})
        )
    )


def _plan_runs(
    context: dg.SensorEvaluationContext, store: JobStore, budget: int
) -> tuple[list[dg.RunRequest], list[dg.AddDynamicPartitionsRequest], list[str]]:
    instance = context.instance
    run_requests: list[dg.RunRequest] = []
    partition_requests: list[dg.AddDynamicPartitionsRequest] = []
    notes: list[str] = []
    for kind in CHUNK_KINDS:
        candidates, all_ids = claimable_chunks(store, kind.job_type)
        known = set(instance.get_dynamic_partitions(kind.partitions_name))
        missing = [cid for cid in all_ids if cid not in known]
        if missing:
            partition_requests.append(
                dg.AddDynamicPartitionsRequest(partitions_def_name=kind.partitions_name, partition_keys=missing)
            )
            notes.append(f"registered {len(missing)} {kind.partitions_name} partition(s)")
        if not candidates or budget <= len(run_requests):
            continue
        existing = _runs_of_partitions(instance, kind.job_name, [c.id for c in candidates])
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
                    job_name=kind.job_name,
                    partition_key=job.id,
                    tags={TAG_CHUNK_RUN: kind.chunk_run_tag, TAG_ATTEMPT: str(job.attempts + 1)},
                )
            )
    return run_requests, partition_requests, notes


@dg.sensor(
    name="miroir_chunk_dispatch",
    jobs=[dump_chunk_job, reshard_chunk_job],
    minimum_interval_seconds=_env_number(DISPATCH_INTERVAL_ENV, 15, 1),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        "Re-queue expired chunk leases, register chunk partitions and launch one run per "
        f"claimable chunk attempt, at most ${MAX_CHUNK_RUNS_ENV} (default 4) chunk runs in flight. "
        f"${DISPATCH_ENABLED_ENV}=0 turns it into a no-op."
    ),
)
def chunk_dispatch_sensor(
    context: dg.SensorEvaluationContext, jobs: JobStoreResource
) -> dg.SensorResult | dg.SkipReason:
    if not _dispatch_enabled():
        return dg.SkipReason(f"chunk dispatch is off ({DISPATCH_ENABLED_ENV}=0)")
    store = jobs.get_store()
    reclaimed = store.reclaim_expired()
    cap = _env_number(MAX_CHUNK_RUNS_ENV, 4, 0)
    in_flight = len(_chunk_runs_in_flight(context.instance))
    budget = max(cap - in_flight, 0)
    run_requests, partition_requests, notes = _plan_runs(context, store, budget)
    if reclaimed:
        notes.insert(0, f"re-queued {reclaimed} expired lease(s)")
    summary = f"{len(run_requests)} chunk run(s) requested; {in_flight}/{cap} in flight"
    context.log.info("; ".join([*notes, summary]))
    if not run_requests and not partition_requests:
        return dg.SkipReason("; ".join([*notes, f"nothing to launch ({in_flight}/{cap} chunk runs in flight)"]))
    return dg.SensorResult(run_requests=run_requests, dynamic_partitions_requests=partition_requests)


def _set_local_gauge(depth: Mapping[str, int]) -> None:
    values: dict[str, int] = {t.value: 0 for t in JobType}
    values.update({str(k): int(v) for k, v in depth.items()})
    for job_type, count in values.items():
        metrics.QUEUE_DEPTH.labels(job_type=job_type).set(count)


def _describe(depth: Mapping[str, int]) -> str:
    return ", ".join(f"{t}={n}" for t, n in sorted(depth.items()))


@dg.sensor(
    name="miroir_queue_depth",
    minimum_interval_seconds=_env_number(QUEUE_DEPTH_INTERVAL_ENV, 15, 1),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=(
        f"Push {metrics.QUEUE_DEPTH_METRIC}{{job_type}} to ${metrics.PUSHGATEWAY_URL_ENV} "
        f"(grouped by deployment=${metrics.DEPLOYMENT_ENV}) for the worker autoscaler."
    ),
)
def queue_depth_sensor(context: dg.SensorEvaluationContext, jobs: JobStoreResource) -> dg.SkipReason:
    depth = jobs.get_store().queue_depth()
    _set_local_gauge(depth)
    try:
        pushed = metrics.push_queue_depth_from_env(depth)
    except metrics.MetricsPushError as exc:
        context.log.warning(str(exc))
        return dg.SkipReason(f"queue depth {_describe(depth)} not published: {exc}")
    if not pushed:
        return dg.SkipReason(
            f"queue depth {_describe(depth)}; not pushed: ${metrics.PUSHGATEWAY_URL_ENV} is not set"
        )
    return dg.SkipReason(f"pushed queue depth {_describe(depth)}")

