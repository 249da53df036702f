"""Holding a lease while a chunk runs: a heartbeat thread that renews it and stops the chunk
the moment renewal is refused (DESIGN §6 step 1)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TypeVar

from miroir_pipeline import metrics
from miroir_pipeline.fleet.targets.base import TargetError
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue.contract import JobStore, Lease, LeaseLost
from miroir_pipeline.queue.shutdown import ChunkHandedBack

__all__ = ["LeaseKeeper", "run_under_lease"]

R = TypeVar("R")

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Renews ``lease`` every ``interval`` seconds until stopped.

    A refused renewal (another worker holds the row now) or failing to renew before the lease
    would expire marks the lease lost; :meth:`check` then raises :class:`LeaseLost` so the
    chunk stops writing at once.
    """

    def __init__(self, store: JobStore, lease: Lease, *, ttl: float, interval: float) -> None:
        self._store = store
        self._lease = lease
        self._ttl = ttl
        self._interval = min(interval, ttl / 3)
        self._stop = threading.Event()
        self._lost: str | None = None
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
        """Raise :class:`LeaseLost` if the lease is gone; call before every fenced write."""
        if self._lost is not None:
            raise LeaseLost(self._lost)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self._ttl)

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _run(self) -> None:
        deadline = time.monotonic() + self._ttl
        while not self._stop.wait(self._interval):
            try:
                self._lease = self._store.renew(self._lease, self._ttl)
                deadline = time.monotonic() + self._ttl
            except LeaseLost:
                self._mark_lost("renewal refused: another worker holds it now")
                return
            except Exception as exc:  # database unreachable: keep trying until the lease runs out
                log.warning("heartbeat for chunk %s failed (%s); retrying", self._lease.job_id, exc)
                if time.monotonic() >= deadline:
                    self._mark_lost(f"could not renew before the lease expired ({exc})")
                    return

    def _mark_lost(self, why: str) -> None:
        self._lost = (
            f"lease on chunk {self._lease.job_id} (attempt {self._lease.attempt}) lost: {why}; "
            "stopped writing"
        )
        metrics.CHUNK_LEASE_LOSSES.labels(job_type=self._lease.job.type).inc()
        log.error(self._lost)


def run_under_lease(
    store: JobStore,
    lease: Lease,
    settings: PipelineSettings,
    body: Callable[[LeaseKeeper], R],
    *,
    permanent: tuple[type[Exception], ...] = (),
) -> R:
    """Run ``body`` while a heartbeat holds the lease, then complete the chunk under the fence.

    On error the row is failed under the fence — for good for ``permanent`` errors (bad input a
    retry cannot fix), otherwise re-queued with backoff — and the error re-raised. A lost lease
    or a hand-back on shutdown leaves the row alone: it belongs to someone else now.
    """
    keeper = LeaseKeeper(store, lease, ttl=settings.lease_ttl, interval=settings.heartbeat_interval)
    keeper.start()
    try:
        result = body(keeper)
        keeper.check()
        store.complete(keeper.lease, None)
        return result
    except (LeaseLost, ChunkHandedBack):
        raise
    except Exception as exc:
        known = isinstance(exc, (TargetError, *permanent))
        error = str(exc) if known else f"{type(exc).__name__}: {exc}"
        try:
            store.fail(keeper.lease, error, retryable=not isinstance(exc, permanent))
        except LeaseLost:
            log.warning("chunk %s failed after its lease was lost: %s", keeper.lease.job_id, error)
        raise
    finally:
        keeper.stop()
