"""The worker pool member: claim a chunk, execute it as a Dagster run in-process against the
shared instance (so it shows in the UI without a process start per chunk), repeat.

A worker owns a :class:`Shutdown`: SIGTERM/SIGINT (or anyone holding it) requests a drain, the
worker stops claiming, and the running chunk, which watches the same object through the runtime
resource of its run, hands itself back at once at its acknowledged cursor.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import dagster as dg

from miroir_pipeline import metrics
from miroir_pipeline.dagster.instance import home_lock
from miroir_pipeline.dagster.names import (
    DEFAULT_KEY_PREFIX,
    POOL_CHUNK_RUN,
    TAG_CHUNK_RUN,
    TAG_CLAIM_TOKEN,
    TAG_WORKER_ID,
    MiroirNames,
)
from miroir_pipeline.dagster.resources import runtime_resource
from miroir_pipeline.dagster.run_logs import console_log_level
from miroir_pipeline.jobs.registry import JobKind, job_types, kind_for, kinds
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue.contract import (
    Job,
    JobNotFound,
    JobState,
    JobStore,
    Lease,
    WorkSignal,
)
from miroir_pipeline.queue.lease import default_worker_id, lease_outcome, settle_abandoned
from miroir_pipeline.queue.shutdown import Shutdown

__all__ = ["Worker", "WorkerStats"]


def _report_lock(instance: dg.DagsterInstance) -> contextlib.AbstractContextManager[None]:
    """The lock workers sharing a local Dagster home take to record a parent; none without one."""
    try:
        root = Path(instance.root_directory)
    except Exception:  # an instance without a local home
        return contextlib.nullcontext()
    return home_lock(root, ".miroir-report.lock")

#: How often a worker refreshes the queue depth it serves (between chunks, while idle).
QUEUE_DEPTH_EVERY_S = 5.0
#: How often a pool worker completes parents whose chunks have all completed but which a crash
#: left in progress (between chunks too): a claim that finds nothing does it, but a pool that
#: never runs dry would otherwise leave it to the dispatch sensor, which may not run at all.
PARENT_SWEEP_EVERY_S = 60.0

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    chunks_run: int = 0
    chunks_succeeded: int = 0
    chunks_failed: int = 0
    run_ids: list[str] = field(default_factory=list)


class Worker:
    """Claims chunks of the registered kinds (or of ``job_types``; optionally of one parent only)
    and runs each one as a run of its chunk job in ``defs``.

    ``defs`` is what :func:`~miroir_pipeline.dagster.miroir_definitions` returned (alone or
    merged into a code location), built with ``key_prefix``.
    """

    def __init__(
        self,
        store: JobStore,
        instance: dg.DagsterInstance,
        defs: dg.Definitions,
        settings: PipelineSettings,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        job_types: Sequence[str] | None = None,
        shutdown: Shutdown | None = None,
        worker_id: str | None = None,
        parent_id: str | None = None,
        exit_when_empty: bool = False,
        max_chunks: int | None = None,
        idle_max_sleep: float = 5.0,
        run_log_level: str = "WARNING",
        plan_wait_s: float = 0.0,
    ) -> None:
        self.store = store
        self.instance = instance
        self.defs = defs
        self.settings = settings
        self.names = MiroirNames(key_prefix)
        self.kinds: tuple[JobKind, ...] = (
            kinds() if job_types is None else tuple(kind_for(t) for t in job_types)
        )
        self.job_types = tuple(k.job_type for k in self.kinds)
        self._jobs = {k.job_type: self._chunk_job(k) for k in self.kinds}
        self.shutdown = shutdown if shutdown is not None else Shutdown()
        self.worker_id = worker_id or default_worker_id()
        self.parent_id = parent_id
        self.exit_when_empty = exit_when_empty
        self.max_chunks = max_chunks
        self.idle_max_sleep = idle_max_sleep
        self.run_log_level = run_log_level
        #: How long a worker scoped to a parent waits for that parent to be planned: the
        #: ``import`` command starts its workers while it plans, so their Dagster start-up
        #: overlaps the planning. Zero: a parent that does not exist ends the worker at once.
        self.plan_wait_s = plan_wait_s
        self._started = time.monotonic()
        self._registered: set[str] = set()
        self.stats = WorkerStats()

    def _chunk_job(self, kind: JobKind) -> dg.JobDefinition:
        name = self.names.chunk_job(kind)
        try:
            return self.defs.resolve_job_def(name)
        except Exception as exc:
            raise ValueError(
                f"the definitions given to the worker have no job {name!r} for {kind.job_type} "
                f"chunks; build them with miroir_definitions(key_prefix={self.names.key_prefix!r}) "
                "and give the worker the same key_prefix"
            ) from exc

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop claiming; the running chunk hands itself back at its acknowledged cursor."""

        def _drain(signum: int, _frame: FrameType | None) -> None:
            log.warning("worker %s: signal %d, draining", self.worker_id, signum)
            self.shutdown.request(f"worker {self.worker_id} received signal {signum}")

        signal.signal(signal.SIGTERM, _drain)
        signal.signal(signal.SIGINT, _drain)

    def run(self) -> WorkerStats:
        """Claim and run chunks until drained, out of work (``exit_when_empty``) or
        ``max_chunks``. An idle worker waits on the store's work signal, taken before its first
        claim: a chunk queued anywhere (or its parent finishing) wakes it at once, and it
        claims again at least every ``idle_max_sleep`` seconds for leases that expired."""
        try:
            work = self.store.work_signal()
        except Exception:  # the database is down at start: poll until it is back
            log.exception("worker %s: cannot listen for work; polling every %.1f s", self.worker_id, self.idle_max_sleep)
            work = WorkSignal()
        try:
            self._loop(work)
        finally:
            work.close()
        return self.stats

    def _loop(self, work: WorkSignal) -> None:
        published = swept = float("-inf")
        idle = False
        while not self.shutdown.requested:
            if self.max_chunks is not None and self.stats.chunks_run >= self.max_chunks:
                break
            try:
                if time.monotonic() - published >= QUEUE_DEPTH_EVERY_S:
                    self._publish_queue_depth()
                    published = time.monotonic()
                if self.parent_id is None and time.monotonic() - swept >= PARENT_SWEEP_EVERY_S:
                    swept = time.monotonic()
                    self.store.complete_finished_parents()
                lease = self._claim()
                done = lease is None and self.exit_when_empty and self._nothing_left()
            except Exception:
                # The jobs database is unreachable (restart, failover, network): a worker is a
                # long-running process and waits it out; its chunks' leases expire meanwhile.
                log.exception("worker %s: job store unavailable; retrying", self.worker_id)
                lease, done = None, False
            if done:
                if self.parent_id is not None:
                    self._record_parent(self.parent_id)
                break
            if lease is None:
                if not idle:
                    log.info("worker %s: waiting for work (claims again at least every %g s)", self.worker_id, self.idle_max_sleep)
                    idle = True
                work.wait(self.idle_max_sleep, self.shutdown)
                continue
            idle = False
            self._run_chunk(lease)

    def _record_parent(self, parent_id: str) -> None:
        """Record a parent that has finished as its partition of the parent-level asset (the
        worker has Dagster loaded; whoever submitted the job need not load it). A worker scoped
        to the parent does it when it runs out of chunks; a pool worker after each chunk whose
        parent it finished, so imports served by a running pool show at once, without waiting
        for the parent-report sensor (or with no daemon at all). Under a file lock in a local
        Dagster home, so workers finishing together record it once; ``record_parent`` leaves a
        parent still running alone, and a failure is left to the sensor."""
        from miroir_pipeline.dagster.parent_reports import record_parent

        try:
            with _report_lock(self.instance):
                record_parent(
                    self.defs, self.instance, parent_id, key_prefix=self.names.key_prefix, store=self.store
                )
        except Exception as exc:  # the import's outcome stands; the sensor records it later
            log.warning("worker %s: could not record %s in Dagster (%s)", self.worker_id, parent_id, exc)

    def _publish_queue_depth(self) -> None:
        """Refresh this worker's ``miroir_background_queue_depth`` on its /metrics (every
        registered kind, at zero when it has nothing claimable)."""
        for job_type, count in self.store.queue_depth(job_types()).items():
            metrics.WORKER_QUEUE_DEPTH.labels(job_type=job_type).set(count)

    # -- claiming -----------------------------------------------------------------------------
    def _claim(self) -> Lease | None:
        if self.parent_id is None:
            lease = self.store.claim(list(self.job_types), self.worker_id, self.settings.lease_ttl)
        else:
            lease = self._claim_in_parent(self.parent_id)
        if lease is not None:
            metrics.CHUNK_CLAIMS.labels(job_type=lease.job.type).inc()
            if lease.attempt > 1:
                metrics.CHUNK_RECLAIMS.inc()
        return lease

    def _claim_in_parent(self, parent_id: str) -> Lease | None:
        """The parent's next claimable chunk, in one statement however many chunks it has. Its
        chunks are registered as partitions once, when this worker first sees them."""
        if parent_id not in self._registered:
            children = self.store.children(parent_id)
            if not children:
                return None  # not planned (or not split) yet
            self._register_partitions(parent_id, children)
        return self.store.claim(
            list(self.job_types), self.worker_id, self.settings.lease_ttl, parent_id=parent_id
        )

    def _register_partitions(self, parent_id: str, children: Sequence[Job]) -> None:
        """Every chunk of the parent, and the parent itself, as partitions (idempotent): a
        parent planned outside Dagster (the ``import`` command plans it in-process) shows in
        the UI in full as soon as a worker sees it, not chunk by chunk as they run."""
        by_kind: dict[str, list[str]] = {}
        for job in children:
            by_kind.setdefault(job.type, []).append(job.id)
        for job_type, ids in by_kind.items():
            kind = kind_for(job_type)
            self.instance.add_dynamic_partitions(self.names.partitions(kind), ids)
            self.instance.add_dynamic_partitions(self.names.parent_partitions(kind), [parent_id])
        self._registered.add(parent_id)

    def _nothing_left(self) -> bool:
        if self.parent_id is not None:
            try:
                summary = self.store.parent_summary(self.parent_id)
            except JobNotFound:
                if time.monotonic() - self._started < self.plan_wait_s:
                    return False  # still being planned
                log.error("worker %s: parent job %s does not exist; nothing to run", self.worker_id, self.parent_id)
                return True
            if summary.parent.state == JobState.QUEUED and summary.parent.total_chunks is None:
                return False  # enqueued, not split yet
            return summary.parent.state in (JobState.COMPLETED, JobState.FAILED)
        depth = self.store.queue_depth()
        return all(depth.get(t, 0) == 0 for t in self.job_types)

    # -- running ------------------------------------------------------------------------------
    def _run_chunk(self, lease: Lease) -> None:
        kind = kind_for(lease.job.type)
        job_def = self._jobs[kind.job_type]
        partitions_name = self.names.partitions(kind)
        chunk_id = lease.job_id
        if not self.instance.has_dynamic_partition(partitions_name, chunk_id):
            self.instance.add_dynamic_partitions(partitions_name, [chunk_id])
        started = time.monotonic()
        # Pool runs are tagged apart from daemon-launched ones: the run queue's cap on chunk runs
        # (dagster.yaml) must not count them, and a killed worker's run never finishes.
        tags: dict[str, Any] = {
            TAG_CLAIM_TOKEN: lease.token,
            TAG_WORKER_ID: self.worker_id,
            TAG_CHUNK_RUN: POOL_CHUNK_RUN,
        }
        log.info("worker %s: running chunk %s (attempt %d)", self.worker_id, chunk_id, lease.attempt)
        result = self._execute_off_main_thread(job_def, chunk_id, tags)
        elapsed = time.monotonic() - started
        self.stats.chunks_run += 1
        self.stats.run_ids.append(result.run_id)
        if result.success:
            self.stats.chunks_succeeded += 1
        else:
            self.stats.chunks_failed += 1
        try:
            if not result.success:
                settle_abandoned(
                    self.store,
                    lease,
                    f"Dagster run {result.run_id} failed before processing the chunk",
                    hand_back=self.shutdown.requested,
                )
            outcome = lease_outcome(self.store, lease)
        except Exception:  # store unreachable: the lease expires and the chunk is re-claimed
            log.exception("worker %s: could not record how chunk %s ended", self.worker_id, chunk_id)
            outcome = "failed"
        metrics.CHUNK_DURATION.labels(job_type=lease.job.type, outcome=outcome).observe(elapsed)
        if self.parent_id is None and lease.job.parent_job_id is not None:
            self._record_parent(lease.job.parent_job_id)

    def _execute_off_main_thread(
        self, job_def: dg.JobDefinition, chunk_id: str, tags: dict[str, Any]
    ) -> dg.ExecuteInProcessResult:
        """Execute the run in a helper thread while the main thread waits.

        On the main thread Dagster swaps SIGTERM/SIGINT for its own handler, which raises an
        interrupt inside the chunk (mid-write) and never requests the worker's shutdown, so the
        attempt is failed and the worker goes on claiming. Off the main thread Dagster leaves the
        handlers alone: SIGTERM requests the shutdown the run's chunk watches (its runtime
        resource), and the chunk hands itself back at its acknowledged cursor.
        """
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = job_def.execute_in_process(
                    run_config=console_log_level(job_def, self.run_log_level),
                    instance=self.instance,
                    partition_key=chunk_id,
                    tags=tags,
                    resources={self.names.runtime_resource: runtime_resource(self.shutdown)},
                    raise_on_error=False,
                )
            except BaseException as exc:  # re-raised on the main thread below
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"chunk-run-{chunk_id}")
        thread.start()
        while thread.is_alive():
            thread.join(0.5)  # wakes up so signal handlers run on the main thread
        if "error" in box:
            raise box["error"]
        result: dg.ExecuteInProcessResult = box["result"]
        return result
