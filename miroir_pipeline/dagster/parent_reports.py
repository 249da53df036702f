"""One import (one reshard, one parent of any kind) as a whole in Dagster.

Every registered kind gets a parent-level asset, ``[<prefix>, <job type>]`` (``miroir/dump_import``,
``miroir/reshard_backfill``), partitioned by parent id (dynamic partitions
``<prefix>_<job type>s``), and a job that records one partition (``<prefix>_<job type>_report_job``).
Recording reads the finished parent's roll-up from the jobs table:

* a **completed** parent materializes its partition with its totals as metadata (documents, bytes
  and MB/s where known, docs/s, per-node counts, invalid documents and their dead-letter folder,
  duration, chunk counts), numeric where Dagster can plot it across imports; its ``has_documents``
  check (WARN) fails when every document was invalid, so an import that skipped every line is not
  green;
* a **failed** or cancelled parent fails the run with a :class:`dagster.Failure` that carries the
  same facts plus the failed chunks and their errors, so its partition shows as failed.

Who records: the ``<prefix>_parent_reports`` sensor requests one run per finish (run key and tag
``miroir/parent-report`` = ``{parent id}:{state}:{finished at, ms}``), and a command that ran an
import in its own process calls :func:`record_parent` when it ends. Both look for a run with that
tag first, so a finish is recorded once; a parent finishing again (a chunk retried from the UI)
is a new finish, recorded again. A completed parent whose report run failed (the jobs store or
the instance was unreachable) is recorded again, up to :data:`REPORT_ATTEMPTS` runs in all; a
failed parent's run fails by design and is not repeated.
"""

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg

from miroir_pipeline.dagster.checks import has_documents_result, has_documents_spec
from miroir_pipeline.dagster.names import DEFAULT_KEY_PREFIX, TAG_PARENT_REPORT, MiroirNames
from miroir_pipeline.dagster.resources import JobStoreResource, SettingsResource
from miroir_pipeline.dagster.run_logs import console_log_level
from miroir_pipeline.jobs.registry import JobKind, UnknownJobKind, kind_for
from miroir_pipeline.queue.contract import Job, JobNotFound, JobState, JobStore, ParentSummary
from miroir_pipeline.queue.contract import JobKind as RowKind

if TYPE_CHECKING:
    from dagster._core.definitions.unresolved_asset_job_definition import (
        UnresolvedAssetJobDefinition,
    )

__all__ = [
    "DEFAULT_PARENT_REPORT_INTERVAL_S",
    "MAX_FAILED_CHUNKS_LISTED",
    "PARENT_REPORT_INTERVAL_ENV",
    "REPORT_SCAN",
    "REPORT_SLACK_S",
    "ParentRecord",
    "build_parent_asset",
    "build_parent_report_job",
    "build_parent_report_sensor",
    "parent_metadata",
    "parent_partitions",
    "record_parent",
    "report_key",
]

PARENT_REPORT_INTERVAL_ENV = "MIROIR_PARENT_REPORT_INTERVAL"
DEFAULT_PARENT_REPORT_INTERVAL_S = 15
#: Finished parents a sensor tick reads, in finish order from its cursor.
REPORT_SCAN = 200
#: A tick re-reads this many seconds before its cursor: a parent whose finish committed late
#: (Postgres stamps ``now()`` at transaction start) is still seen; run keys drop the repeats.
REPORT_SLACK_S = 120.0
#: Report runs of one finish of a completed parent, at most: a run that failed (the jobs store or
#: the instance was unreachable) is followed by another, so a blip does not leave the import
#: shown as failed.
REPORT_ATTEMPTS = 3
_ENDED_UNRECORDED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
#: Failed chunks listed, with their errors, in a failed parent's metadata.
MAX_FAILED_CHUNKS_LISTED = 50
_FINISHED = (JobState.COMPLETED, JobState.FAILED)


def report_key(parent: Job) -> str:
    """Run key (and ``miroir/parent-report`` tag) of the record of one finish of ``parent``."""
    finished = parent.finished_at or parent.updated_at
    return f"{parent.id}:{parent.state}:{int(finished.timestamp() * 1000)}"


def parent_partitions(kind: JobKind, names: MiroirNames) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=names.parent_partitions(kind))


def _rate(amount: float, seconds: float | None) -> float:
    return round(amount / seconds, 1) if seconds else 0.0


def parent_metadata(
    store: JobStore, summary: ParentSummary, kind: JobKind, dead_letter_dir: str | os.PathLike[str]
) -> dict[str, Any]:
    """What one finished parent did, as materialization (or failure) metadata.

    Totals are the roll-up of its chunks' progress (``store.parent_summary``): ``documents`` is
    the kind's ``documents_key``; ``bytes`` and ``mb_per_s`` are present when the kind counts
    ``bytes_processed``. The duration runs from the parent's creation (its plan) to its finish.
    """
    parent, prog = summary.parent, summary.progress
    documents = int(prog.get(kind.documents_key, 0) or 0)
    invalid = int(prog.get("invalid_documents", 0) or 0)
    duration = (parent.finished_at - parent.created_at).total_seconds() if parent.finished_at else None
    failed = int(summary.chunks_by_state.get(JobState.FAILED, 0))
    meta: dict[str, Any] = {
        "parent_job_id": parent.id,
        "job_type": parent.type,
        "state": str(parent.state),
        "documents": documents,
    }
    if isinstance(parent.params.get("index_uid"), str):
        meta["index_uid"] = parent.params["index_uid"]
    if "bytes_processed" in prog:
        size = int(prog["bytes_processed"])
        meta["bytes"] = size
        meta["mb_per_s"] = _rate(size / 1e6, duration)
    if isinstance(parent.params.get("bytes_total"), int):
        meta["bytes_total"] = int(parent.params["bytes_total"])
    meta.update(
        {
            "docs_per_s": _rate(documents, duration),
            "duration_s": round(duration, 3) if duration is not None else 0.0,
            "invalid_documents": invalid,
            "per_node": dg.MetadataValue.json({str(k): int(v) for k, v in dict(prog.get("per_node", {})).items()}),
            "chunks": summary.chunks_total,
            "chunks_completed": summary.chunks_done,
            "chunks_failed": failed,
            "chunks_by_state": dg.MetadataValue.json({str(k): int(v) for k, v in summary.chunks_by_state.items()}),
        }
    )
    if invalid:
        meta["dead_letter_dir"] = dg.MetadataValue.path(str(Path(dead_letter_dir) / parent.id))
    if failed:
        failures = [{"id": c.id, "error": c.error} for c in store.children(parent.id) if c.state == JobState.FAILED]
        meta["failed_chunks"] = dg.MetadataValue.json(failures[:MAX_FAILED_CHUNKS_LISTED])
    if parent.error:
        meta["error"] = parent.error
    if parent.finished_at is not None:
        meta["finished_at"] = parent.finished_at.isoformat()
    meta["created_at"] = parent.created_at.isoformat()
    return meta


def _failure_description(kind: JobKind, summary: ParentSummary, meta: Mapping[str, Any]) -> str:
    parent = summary.parent
    text = (
        f"{kind.job_type} {parent.id} failed: {parent.error or 'no error recorded'}. "
        f"{summary.chunks_done}/{summary.chunks_total} chunk(s) completed, "
        f"{meta['chunks_failed']} failed; {meta['documents']} document(s) written"
    )
    if meta.get("invalid_documents"):
        text += f", {meta['invalid_documents']} invalid (dead letters in {meta['dead_letter_dir'].value})"
    failed = meta.get("failed_chunks")
    if failed is not None:
        listed = failed.value[:5]
        text += ". Failed chunks: " + "; ".join(f"{c['id']}: {c['error']}" for c in listed)
        if meta["chunks_failed"] > len(listed):
            text += f"; ... ({meta['chunks_failed'] - len(listed)} more in the metadata)"
    return text


def build_parent_asset(kind: JobKind, names: MiroirNames, partitions_def: dg.DynamicPartitionsDefinition) -> dg.AssetsDefinition:
    """The asset whose partition ``parent_id`` records that finished parent of ``kind``."""
    jobs_key, settings_key = names.jobs_resource, names.settings_resource
    key = names.parent_asset_key(kind)
    chunk_asset = names.chunk_asset_key(kind).to_user_string()

    @dg.asset(
        key=key,
        partitions_def=partitions_def,
        description=(
            f"One {kind.job_type} as a whole, one partition per parent job id, recorded when it "
            f"finishes: totals, per-node counts, throughput, invalid documents, failed chunks. Its "
            f"chunks are the partitions of {chunk_asset}. A failed or cancelled parent fails its run."
        ),
        group_name=names.group_name,
        required_resource_keys={jobs_key, settings_key},
        check_specs=[has_documents_spec(names, key, kind.job_type)],
    )
    def _parent(context: dg.AssetExecutionContext) -> dg.MaterializeResult:  # type: ignore[type-arg]
        jobs: JobStoreResource = getattr(context.resources, jobs_key)
        settings: SettingsResource = getattr(context.resources, settings_key)
        store = jobs.get_store()
        parent_id = context.partition_key
        try:
            summary = store.parent_summary(parent_id)
        except JobNotFound:
            raise dg.Failure(
                description=f"{kind.job_type} {parent_id} is not in the jobs table (pruned?); nothing to record",
                allow_retries=False,
            ) from None
        parent = summary.parent
        if parent.kind != RowKind.PARENT or parent.type != kind.job_type:
            raise dg.Failure(
                description=f"{parent_id} is a {parent.type} {parent.kind}, not a {kind.job_type} parent",
                allow_retries=False,
            )
        if parent.state not in _FINISHED:
            raise dg.Failure(
                description=(
                    f"{kind.job_type} {parent_id} is still {parent.state} ({summary.chunks_done}/"
                    f"{summary.chunks_total} chunks completed); it is recorded when it finishes"
                ),
                allow_retries=False,
            )
        meta = parent_metadata(store, summary, kind, settings.get_settings().dead_letter_dir)
        if parent.state == JobState.FAILED:
            description = _failure_description(kind, summary, meta)
            context.log.error(description)
            raise dg.Failure(description=description, metadata=meta, allow_retries=False)
        check = has_documents_result(
            names,
            key,
            f"{kind.job_type} {parent_id}",
            documents=int(meta["documents"]),
            invalid_documents=int(meta["invalid_documents"]),
            dead_letter=meta["dead_letter_dir"].value if "dead_letter_dir" in meta else None,
        )
        (context.log.info if check.passed else context.log.warning)(
            f"{kind.job_type} {parent_id} completed: {meta['documents']} document(s) in "
            f"{summary.chunks_total} chunk(s), {meta['invalid_documents']} invalid"
        )
        return dg.MaterializeResult(metadata=meta, check_results=[check])

    return _parent


def build_parent_report_job(
    kind: JobKind, names: MiroirNames, asset: dg.AssetsDefinition
) -> "UnresolvedAssetJobDefinition":
    return dg.define_asset_job(
        names.parent_report_job(kind),
        selection=[asset],
        executor_def=dg.in_process_executor,
        description=f"Record one finished {kind.job_type} (one run per parent id).",
    )


# -- the sensor ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Cursor:
    """Finish time (epoch s) of the newest parent a tick handled; ``catching_up`` when that tick
    read a full page, so the next reads on from there instead of re-reading the slack window."""

    since: float | None = None
    catching_up: bool = False
    #: Id of the newest parent handled (ties on ``since`` are paged by id).
    last_id: str = ""

    @classmethod
    def parse(cls, raw: str | None) -> "_Cursor":
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            since = data.get("since")
            return cls(
                None if since is None else float(since),
                bool(data.get("catching_up", False)),
                str(data.get("last_id", "")),
            )
        except (ValueError, TypeError, AttributeError):
            return cls()

    def dump(self) -> str:
        return json.dumps({"since": self.since, "catching_up": self.catching_up, "last_id": self.last_id})

    def query_since(self) -> datetime | None:
        if self.since is None:
            return None
        since = self.since if self.catching_up else self.since - REPORT_SLACK_S
        return datetime.fromtimestamp(since, tz=UTC)


def _report_runs(instance: dg.DagsterInstance, job_name: str, keys: Sequence[str]) -> dict[str, list[dg.DagsterRun]]:
    """The runs of ``job_name`` (any status, newest first) of each report key among ``keys``."""
    runs: dict[str, list[dg.DagsterRun]] = {key: [] for key in keys}
    if keys:
        records = instance.get_run_records(filters=dg.RunsFilter(job_name=job_name, tags={TAG_PARENT_REPORT: list(keys)}))
        for record in records:
            runs.setdefault(record.dagster_run.tags.get(TAG_PARENT_REPORT, ""), []).append(record.dagster_run)
    return runs


def _next_run_key(key: str, state: str, runs: Sequence[dg.DagsterRun]) -> str | None:
    """The run key of the next report run of one finish, or None when none is due: a run of it
    succeeded or is under way, it is a failed parent's (whose run fails by design), or
    :data:`REPORT_ATTEMPTS` runs of it failed already."""
    if not runs:
        return key
    if state != JobState.COMPLETED or len(runs) >= REPORT_ATTEMPTS:
        return None
    if any(run.status not in _ENDED_UNRECORDED for run in runs):
        return None
    return f"{key}#attempt-{len(runs) + 1}"


def build_parent_report_sensor(
    names: MiroirNames,
    kinds: Sequence[JobKind],
    report_jobs: Sequence["UnresolvedAssetJobDefinition"],
    interval_s: int,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
) -> dg.SensorDefinition:
    """The sensor that requests one report run per finished parent of the registered kinds."""
    jobs_key = names.jobs_resource
    by_type = {k.job_type: k for k in kinds}

    @dg.sensor(
        name=names.parent_report_sensor,
        jobs=list(report_jobs) or None,
        minimum_interval_seconds=interval_s,
        default_status=default_status,
        required_resource_keys={jobs_key},
        description=(
            "Record every finished parent (one import, one reshard) as a partition of its parent-level "
            f"asset ({', '.join(names.parent_asset_key(k).to_user_string() for k in kinds) or 'no kinds'}): "
            "one run per finish; a failed or cancelled parent's run fails."
        ),
    )
    def _reports(context: dg.SensorEvaluationContext, **_resources: Any) -> dg.SensorResult:
        jobs: JobStoreResource = getattr(context.resources, jobs_key)
        store = jobs.get_store()
        cursor = _Cursor.parse(context.cursor)
        rows = store.finished_parents(
            cursor.query_since(), limit=REPORT_SCAN, after_id=cursor.last_id if cursor.catching_up else ""
        )
        instance = context.instance
        run_requests: list[dg.RunRequest] = []
        partition_requests: list[dg.AddDynamicPartitionsRequest] = []
        unknown: set[str] = set()
        given_up = 0
        for job_type in sorted({r.type for r in rows}):
            kind = by_type.get(job_type)
            if kind is None:
                unknown.add(job_type)
                continue
            job_name = names.parent_report_job(kind)
            of_kind = [r for r in rows if r.type == job_type]
            keys = {r.id: report_key(r) for r in of_kind}
            runs = _report_runs(instance, job_name, list(keys.values()))
            run_keys = {r.id: _next_run_key(keys[r.id], str(r.state), runs[keys[r.id]]) for r in of_kind}
            todo = [r for r in of_kind if run_keys[r.id] is not None]
            given_up += sum(
                1
                for r in of_kind
                if r.state == JobState.COMPLETED
                and len(runs[keys[r.id]]) >= REPORT_ATTEMPTS
                and all(run.status in _ENDED_UNRECORDED for run in runs[keys[r.id]])
            )
            partitions_name = names.parent_partitions(kind)
            missing = [r.id for r in todo if not instance.has_dynamic_partition(partitions_name, r.id)]
            if missing:
                partition_requests.append(
                    dg.AddDynamicPartitionsRequest(partitions_def_name=partitions_name, partition_keys=missing)
                )
            run_requests.extend(
                dg.RunRequest(
                    run_key=run_keys[r.id],
                    job_name=job_name,
                    partition_key=r.id,
                    tags={TAG_PARENT_REPORT: keys[r.id]},
                )
                for r in todo
            )
        finished = [r for r in rows if r.finished_at is not None]
        last = finished[-1] if finished else None  # rows come in (finished_at, id) order
        if last is None or last.finished_at is None:
            next_cursor = _Cursor(cursor.since, catching_up=False, last_id=cursor.last_id)
        else:
            next_cursor = _Cursor(last.finished_at.timestamp(), catching_up=len(rows) >= REPORT_SCAN, last_id=last.id)
        note = f"{len(rows)} finished parent(s) read, {len(run_requests)} to record"
        if unknown:
            note += f"; no job kind registered for {', '.join(sorted(unknown))}"
        if given_up:
            note += (
                f"; {given_up} completed parent(s) left unrecorded after {REPORT_ATTEMPTS} failed "
                "report runs each: read those runs' errors, then run the report job for the partition"
            )
        context.log.info(note)
        if not run_requests and not partition_requests:
            return dg.SensorResult(skip_reason=note, cursor=next_cursor.dump())
        return dg.SensorResult(
            run_requests=run_requests, dynamic_partitions_requests=partition_requests, cursor=next_cursor.dump()
        )

    return _reports


# -- recording from a command ----------------------------------------------------------------------
@dataclass(frozen=True)
class ParentRecord:
    """The Dagster run that recorded one finish of a parent."""

    parent_id: str
    job_type: str
    #: The parent's state when recorded (``completed`` or ``failed``).
    state: str
    run_id: str
    #: False when a run with the same report key existed already (the sensor got there first).
    recorded_now: bool
    #: The partition was materialized (a completed parent); False for a failed parent.
    materialized: bool


@contextmanager
def _store_of(defs: dg.Definitions, names: MiroirNames) -> Iterator[JobStore]:
    """The jobs store of the definitions' own jobs resource (``EnvVar`` fields resolved)."""
    resource = defs.get_repository_def().get_top_level_resources()[names.jobs_resource]
    with dg.build_resources({names.jobs_resource: resource}) as built:
        jobs: JobStoreResource = getattr(built, names.jobs_resource)
        yield jobs.get_store()


def record_parent(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    parent_id: str,
    *,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    store: JobStore | None = None,
    quiet: bool = True,
) -> ParentRecord | None:
    """Record a finished parent as its partition of the parent-level asset, in this process.

    For a command that ran an import or reshard itself and ends: the partition shows at once,
    without waiting for the sensor. ``defs`` are the definitions built with ``key_prefix``
    (``miroir_definitions(...)``); ``store`` defaults to the one of their jobs resource. Returns
    None when the parent is not finished yet (the sensor records it when it finishes); never
    raises for a failed parent: its run fails by design (see :attr:`ParentRecord.materialized`).
    A finish already recorded, or being recorded (same report key), is not recorded twice; a
    completed parent's finish whose runs all failed is run again, up to :data:`REPORT_ATTEMPTS`.
    """
    names = MiroirNames(key_prefix)
    if store is None:
        with _store_of(defs, names) as found:
            parent = found.get(parent_id)
    else:
        parent = store.get(parent_id)
    if parent.kind != RowKind.PARENT:
        raise ValueError(f"{parent_id} is a {parent.kind}, not a parent job")
    if parent.state not in _FINISHED:
        return None
    try:
        kind = kind_for(parent.type)
    except UnknownJobKind as exc:
        raise ValueError(str(exc)) from None
    key = report_key(parent)
    job_name = names.parent_report_job(kind)
    runs = _report_runs(instance, job_name, [key])[key]
    if _next_run_key(key, str(parent.state), runs) is None:
        succeeded = [run for run in runs if run.status == dg.DagsterRunStatus.SUCCESS]
        run = (succeeded or runs)[0]
        return ParentRecord(parent_id, kind.job_type, str(parent.state), run.run_id, False, bool(succeeded))
    instance.add_dynamic_partitions(names.parent_partitions(kind), [parent_id])
    job_def = defs.resolve_job_def(job_name)
    result = job_def.execute_in_process(
        run_config=console_log_level(job_def, "CRITICAL") if quiet else None,
        instance=instance,
        partition_key=parent_id,
        tags={TAG_PARENT_REPORT: key},
        raise_on_error=False,
    )
    return ParentRecord(parent_id, kind.job_type, str(parent.state), result.run_id, True, result.success)
