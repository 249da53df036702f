"""Every way a chunk's lease begins and ends, in one place.

* begin: :func:`acquire_chunk` adopts the claim a worker made, or claims by id (re-queueing a
  chunk failed for good, or a completed one for a re-import);
* hold: :class:`LeaseKeeper` renews it on a heartbeat and stops the chunk the moment renewal is
  refused;
* end: :func:`run_under_lease` completes it under the fence, or fails it (retryable or for good);
  :func:`hand_back` releases it at its cursor on shutdown; :func:`settle_abandoned` ends a lease
  whose run died before the chunk took it over; a lost lease is left to its new holder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from miroir_pipeline import metrics
from miroir_pipeline.queue.contract import JobNotClaimable, JobState, JobStore, Lease, LeaseLost
from miroir_pipeline.queue.shutdown import ChunkHandedBack

__all__ = [
    "LeaseKeeper",
    "acquire_chunk",
    "default_worker_id",
    "hand_back",
    "lease_outcome",
    "run_under_lease",
    "settle_abandoned",
]

R = TypeVar("R")

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews ``lease`` every ``interval`` seconds until stopped.

    A refused renewal (another worker holds the row now) or failing to renew before the lease
    would expire marks the lease lost; :meth:`check` then raises :class:`LeaseLost` so the
    chunk stops writing at once. The lease counts as expired one TTL after the *start* of the
    last renewal that succeeded, measured on this worker's clock, so a heartbeat stuck in a
    renewal that never returns (a half-open connection) still stops the chunk in time.
    """

    def __init__(self, store: JobStore, lease: Lease, *, ttl: float, interval: float) -> None:
        self._store = store
        self._lease = lease
        self._ttl = ttl
        self._interval = min(interval, ttl / 3)
        self._stop = threading.Event()
        self._lost: str | None = None
        self._mark_lock = threading.Lock()
        # The claim or renewal that produced ``lease`` started before this keeper did.
        self._valid_until = time.monotonic() + ttl
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{lease.job_id}", daemon=True
        )

    @property
    def lease(self) -> Lease:
        return self._lease

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is gone or has run out unrenewed; call before
        every fenced write."""
        if self._lost is None and time.monotonic() >= self._valid_until:
            self._mark_lost(
                f"not renewed within its {self._ttl:g} s TTL (the worker was paused or starved of "
                "CPU, or the heartbeat's renewal never returned: check the jobs store's connection)"
            )
        if self._lost is not None:
            raise LeaseLost(self._lost)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing. Waits at most one interval for a renewal in flight (none is waited
        for once the lease is lost): one that lands later is refused by the ended row's fence,
        and a refusal after stop is not a loss."""
        self._stop.set()
        if self._lost is None and self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self._interval)

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            started = time.monotonic()
            try:
                lease = self._store.renew(self._lease, self._ttl)
            except LeaseLost:
                if not self._stop.is_set():  # after stop the row has ended: refused by design
                    self._mark_lost("renewal refused: another worker holds it now")
                return
            except Exception as exc:  # database unreachable: keep trying until the lease runs out
                log.warning("heartbeat for chunk %s failed (%s); retrying", self._lease.job_id, exc)
                if time.monotonic() >= self._valid_until:
                    self._mark_lost(f"could not renew before the lease expired ({exc})")
                    return
                continue
            if self._lost is not None:  # ran out while the renewal hung: the chunk has stopped
                return
            self._lease = lease
            self._valid_until = started + self._ttl

    def _mark_lost(self, why: str) -> None:
        with self._mark_lock:
            if self._lost is not None:
                return
            self._lost = self._message(why)
        metrics.CHUNK_LEASE_LOSSES.labels(job_type=self._lease.job.type).inc()
        log.error(self._lost)

    def _message(self, why: str) -> str:
        return (
            f"lease on chunk {self._lease.job_id} (attempt {self._lease.attempt}) lost: {why}; "
            "stopped writing"
        )


def run_under_lease(
    store: JobStore,
    lease: Lease,
    body: Callable[[LeaseKeeper], R],
    *,
    ttl: float,
    heartbeat_interval: float,
    permanent: tuple[type[Exception], ...] = (),
    plain: tuple[type[Exception], ...] = (),
) -> R:
    """Run ``body`` while a heartbeat holds the lease, then complete the chunk under the fence.

    On error the row is failed under the fence — for good for ``permanent`` errors (bad input a
    retry cannot fix), otherwise re-queued with backoff — and the error re-raised; ``permanent``
    and ``plain`` errors are recorded by their message alone (it already says what and where).
    A lost lease or a hand-back on shutdown leaves the row alone: it belongs to someone else now.
    """
    keeper = LeaseKeeper(store, lease, ttl=ttl, interval=heartbeat_interval)
    keeper.start()
    try:
        result = body(keeper)
        keeper.check()
        # No renewal after this point: one landing after the completion would be refused and
        # counted as a lease loss of a chunk that completed. Completion is fenced by the token.
        keeper.stop()
        keeper.check()
        store.complete(keeper.lease, None)
        return result
    except ChunkHandedBack:
        raise
    except LeaseLost as exc:
        # Lost on this worker's own clock, the row may still carry this lease's token (nobody
        # re-claimed it yet): fail it, fenced, so it is re-queued now rather than held until it
        # expires. Where another worker holds it, the fence refuses and nothing changes.
        keeper.stop()
        try:
            store.fail(keeper.lease, str(exc), retryable=True)
        except LeaseLost:
            pass
        except Exception as fail_exc:  # the store itself may be what failed: the row expires
            log.warning("chunk %s: could not fail the lost lease (%s)", keeper.lease.job_id, fail_exc)
        raise
    except Exception as exc:
        known = isinstance(exc, (*plain, *permanent))
        error = str(exc) if known else f"{type(exc).__name__}: {exc}"
        keeper.stop()  # as before completing: no renewal may land on the failed row
        try:
            store.fail(keeper.lease, error, retryable=not isinstance(exc, permanent))
        except LeaseLost:
            log.warning("chunk %s failed after its lease was lost: %s", keeper.lease.job_id, error)
        raise
    finally:
        keeper.stop()


def hand_back(store: JobStore, keeper: LeaseKeeper, where: str, reason: str) -> ChunkHandedBack:
    """Release the chunk at its committed cursor (``where``) because its runner is shutting down;
    returns the exception the caller raises to stop the chunk."""
    keeper.check()
    keeper.stop()  # a renewal landing after the release would be refused and counted as a loss
    store.release(keeper.lease)
    return ChunkHandedBack(f"chunk {keeper.lease.job_id} handed back at {where}: {reason}")


def default_worker_id() -> str:
    """``$POD_NAME`` in Kubernetes, else host and pid."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def acquire_chunk(
    store: JobStore,
    chunk_id: str,
    worker_id: str,
    ttl: float,
    adopt_token: str | None = None,
    *,
    reimport: bool = False,
    retry_failed: bool = True,
) -> Lease | None:
    """The lease to process ``chunk_id`` under; ``None`` when the chunk is already completed
    (a no-op) unless ``reimport`` asks to import it again from the start.

    With ``adopt_token`` (a worker claimed the row and handed it to this run) the claim is
    adopted, and renewed, instead of claiming again. A run an operator launched (``retry_failed``) for a
    chunk that failed for good is a retry: the chunk is re-queued with a fresh attempt budget and
    resumes at its cursor. A run dispatched while the chunk was claimable is not: if the chunk
    failed for good or was cancelled before it started, it does nothing. Raises
    :class:`JobNotClaimable` naming the holder when another worker holds it.
    """
    job = store.get(chunk_id)
    if adopt_token:
        if job.state == JobState.IN_PROGRESS and job.claim_token == adopt_token:
            assert job.claimed_by is not None and job.claim_expires_at is not None
            held = Lease(job=job, token=adopt_token, worker_id=job.claimed_by, expires_at=job.claim_expires_at)
            # The claim is as old as this run's start-up; renewed now, it runs a whole TTL from
            # here, which is what the heartbeat (first renewal one interval from now) assumes.
            with contextlib.suppress(LeaseLost):
                return store.renew(held, ttl)
            job = store.get(chunk_id)
        raise JobNotClaimable(
            f"chunk {chunk_id}: the claim handed to this run is no longer held "
            f"(state {job.state}, holder {job.claimed_by or 'none'}); nothing was written",
            job,
        )
    if job.state == JobState.COMPLETED:
        if not reimport:
            return None
        store.requeue(chunk_id, reset_progress=True)
    elif job.state == JobState.FAILED:
        if not retry_failed:
            raise JobNotClaimable(
                f"chunk {chunk_id} failed for good or was cancelled after this run was dispatched "
                f"({job.error or 'no error recorded'}); nothing was done. To retry it, launch its "
                "partition from the Dagster UI",
                job,
            )
        store.requeue(chunk_id, reset_progress=False)
    return store.claim_by_id(chunk_id, worker_id, ttl)


def settle_abandoned(store: JobStore, lease: Lease, why: str, *, hand_back: bool) -> None:
    """End a lease whose run stopped before the chunk took it over (so it never dangles until
    expiry): released on shutdown (``hand_back``), else failed with ``why`` (retryable).
    A lease that has moved on (completed, failed, re-claimed) is left alone."""
    job = store.get(lease.job_id)
    if job.state != JobState.IN_PROGRESS or job.claim_token != lease.token:
        return
    try:
        if hand_back:
            store.release(lease)
        else:
            store.fail(lease, why)
    except LeaseLost:
        pass


def lease_outcome(store: JobStore, lease: Lease) -> str:
    """How an attempt ended, read from its row: ``completed``, ``lease_lost``, ``released`` or
    ``failed`` (one of ``metrics.CHUNK_OUTCOMES``)."""
    job = store.get(lease.job_id)
    if job.state == JobState.COMPLETED:
        return "completed"
    if job.state == JobState.IN_PROGRESS and job.claim_token != lease.token:
        return "lease_lost"
    if job.state == JobState.QUEUED and job.attempts < lease.attempt:
        return "released"
    return "failed"
