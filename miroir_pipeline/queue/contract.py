"""The job store contract: one interface, two backends (SQLite, Postgres).

Rows are jobs of a ``type``; a *parent* row (``kind='parent'``) is split into *chunk* rows
(``kind='chunk'``) that workers claim with a lease. Every write after a claim is fenced by
the claim token: once a lease is lost the holder's writes raise :class:`LeaseLost`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from miroir_pipeline.queue.shutdown import Shutdown

__all__ = [
    "DEFAULT_LEASE_TTL",
    "DEFAULT_MAX_ATTEMPTS",
    "Job",
    "JobKind",
    "JobNotClaimable",
    "JobNotFound",
    "JobState",
    "JobStore",
    "JobStoreError",
    "Lease",
    "LeaseLost",
    "NewChunk",
    "ParentSummary",
    "Pruned",
    "SplitRefused",
    "WorkSignal",
    "rollup_progress",
]

DEFAULT_LEASE_TTL = 30.0
DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_MAX_ATTEMPTS = 5
#: Retry backoff after a failed attempt: base * 2**(attempt-1), capped.
RETRY_BACKOFF_BASE = 2.0
RETRY_BACKOFF_CAP = 300.0


class JobState(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"


class JobKind(StrEnum):
    PARENT = "parent"
    CHUNK = "chunk"


class JobStoreError(RuntimeError):
    """Base class of job-store errors."""


class JobNotFound(JobStoreError):
    pass


class LeaseLost(JobStoreError):
    """The caller's claim token no longer matches the row: stop writing at once."""


class JobNotClaimable(JobStoreError):
    """``claim_by_id`` refused: the row is leased by another worker, finished, or a parent."""

    def __init__(self, message: str, job: Job | None = None) -> None:
        super().__init__(message)
        self.job = job


class SplitRefused(JobStoreError):
    """A parent that is already split (or not a queued parent) cannot be split again."""


@dataclass(frozen=True)
class Job:
    id: str
    type: str
    kind: str
    state: str
    params: dict[str, Any]
    progress: dict[str, Any]
    claimed_by: str | None
    claim_expires_at: datetime | None
    claim_token: str | None
    attempts: int
    max_attempts: int
    error: str | None
    parent_job_id: str | None
    chunk_index: int | None
    total_chunks: int | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    available_at: datetime | None


@dataclass(frozen=True)
class Lease:
    """Proof of a claim: pass it to every fenced write."""

    job: Job
    token: str
    worker_id: str
    expires_at: datetime

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def attempt(self) -> int:
        return self.job.attempts


@dataclass(frozen=True)
class NewChunk:
    """A child row to insert when splitting a parent."""

    chunk_index: int
    params: Mapping[str, Any]
    progress: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParentSummary:
    parent: Job
    chunks_total: int
    chunks_by_state: dict[str, int]
    progress: dict[str, Any]

    @property
    def chunks_done(self) -> int:
        return self.chunks_by_state.get(JobState.COMPLETED, 0)


@dataclass(frozen=True)
class Pruned:
    """What one :meth:`JobStore.prune` deleted, by job type: the parents, and the chunks (of those
    parents, and standalone ones). The ids are the Dagster partition keys to remove with them."""

    parents: dict[str, list[str]] = field(default_factory=dict)
    chunks: dict[str, list[str]] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows deleted in all."""
        return sum(len(ids) for ids in self.parents.values()) + sum(len(ids) for ids in self.chunks.values())

    @property
    def parent_ids(self) -> list[str]:
        return sorted(i for ids in self.parents.values() for i in ids)

    @property
    def chunk_ids(self) -> list[str]:
        return sorted(i for ids in self.chunks.values() for i in ids)


def rollup_progress(progresses: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum numeric progress fields over children; nested dicts of numbers (per_node) sum per key."""
    out: dict[str, Any] = {}
    for prog in progresses:
        for key, value in prog.items():
            if isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                out[key] = out.get(key, 0) + value
            elif isinstance(value, Mapping) and key != "last_cursor":
                sub = out.setdefault(key, {})
                for k, v in value.items():
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        sub[k] = sub.get(k, 0) + v
    out.pop("last_cursor", None)
    return out


def chunk_id(parent_id: str, index: int, total: int) -> str:
    """Deterministic, zero-padded chunk id usable as a Dagster partition key."""
    width = max(4, len(str(max(total - 1, 0))))
    return f"{parent_id}-c{index:0{width}d}"


class WorkSignal:
    """What an idle worker waits on between claims: woken when a chunk may have become
    claimable or a parent finished, instead of re-trying its claim on a timer.

    Created before the worker's first claim, so a change committed between a claim that found
    nothing and the next wait is not missed. Wake-ups may be spurious (the claim then finds
    nothing and the worker waits again). An expired lease signals nothing, so a worker waits at
    most ``timeout`` before it claims again. This base class signals nothing: it only sleeps.
    """

    def wait(self, timeout: float, shutdown: Shutdown | None = None) -> bool:
        """Block until signalled (True), ``timeout`` seconds passed or ``shutdown`` was
        requested (False)."""
        if shutdown is None:
            Shutdown().wait(timeout)
        else:
            shutdown.wait(timeout)
        return False

    def close(self) -> None:
        """Release what the signal holds (a listening connection)."""


class JobStore(abc.ABC):
    """Operations every backend provides with identical semantics (see the conformance suite)."""

    dsn_scheme: str

    # -- lifecycle -------------------------------------------------------------------------
    @abc.abstractmethod
    def migrate(self) -> list[str]:
        """Apply pending numbered migrations; return the names applied now. Safe concurrently."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # -- producers -------------------------------------------------------------------------
    @abc.abstractmethod
    def enqueue(
        self,
        job_type: str,
        params: Mapping[str, Any],
        *,
        job_id: str | None = None,
        kind: str = JobKind.PARENT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Job:
        """Insert a new queued row. A parent is not claimable until split; a chunk is at once."""

    @abc.abstractmethod
    def split(self, parent_id: str, chunks: Sequence[NewChunk]) -> list[Job]:
        """Insert all children and move the parent out of the claimable set, atomically.

        Children get ids from :func:`chunk_id`, the parent's type and max_attempts.
        Zero chunks completes the parent at once. Raises :class:`SplitRefused` on a re-split.
        """

    # -- workers ---------------------------------------------------------------------------
    @abc.abstractmethod
    def claim(
        self,
        job_types: Sequence[str],
        worker_id: str,
        ttl: float = DEFAULT_LEASE_TTL,
        *,
        parent_id: str | None = None,
    ) -> Lease | None:
        """Atomically lease the next claimable chunk of the given types (fair across parents),
        or only of ``parent_id`` when given: one statement either way, whatever the queue holds."""

    @abc.abstractmethod
    def claim_by_id(self, job_id: str, worker_id: str, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        """Lease one specific chunk if claimable; else :class:`JobNotClaimable` / :class:`JobNotFound`."""

    @abc.abstractmethod
    def renew(self, lease: Lease, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        """Extend the lease; :class:`LeaseLost` when the token no longer matches."""

    @abc.abstractmethod
    def save_progress(self, lease: Lease, progress: Mapping[str, Any]) -> None:
        """Persist the progress cursor under the fence (:class:`LeaseLost` otherwise)."""

    @abc.abstractmethod
    def complete(self, lease: Lease, progress: Mapping[str, Any] | None = None) -> Job:
        """Mark the chunk completed under the fence; completes the parent with its last child."""

    @abc.abstractmethod
    def fail(self, lease: Lease, error: str, *, retryable: bool = True) -> Job:
        """Record a failed attempt under the fence: re-queue with backoff, or ``failed`` for good
        (after ``max_attempts`` or when not retryable), failing the parent too. Progress is kept."""

    @abc.abstractmethod
    def release(self, lease: Lease) -> Job:
        """Hand a chunk back (graceful shutdown): queued again at once, progress kept, the
        attempt not counted as a failure."""

    @abc.abstractmethod
    def requeue(self, job_id: str, *, reset_progress: bool = False) -> Job:
        """Operator re-run of a finished chunk (completed or failed): queued again with a fresh
        attempt budget, its parent re-opened. Progress is kept (resume at the cursor) unless
        ``reset_progress`` (a re-import from the start). :class:`JobNotClaimable` otherwise."""

    @abc.abstractmethod
    def complete_finished_parents(self, parent_id: str | None = None) -> int:
        """Complete split parents (or just ``parent_id``) whose every chunk is completed but that
        are still in progress (a worker died between completing the last chunk and its parent);
        returns how many. Run by :meth:`reclaim_expired`, and by :meth:`claim` when it finds
        nothing to claim (for its ``parent_id`` only, when given)."""

    @abc.abstractmethod
    def reclaim_expired(self) -> int:
        """Re-queue chunks whose lease expired (fail those out of attempts); return how many."""

    def work_signal(self) -> WorkSignal:
        """A new :class:`WorkSignal` on this store, for one waiting thread; close it when done."""
        return WorkSignal()

    # -- observers / operators -------------------------------------------------------------
    @abc.abstractmethod
    def queue_depth(self, job_types: Sequence[str] = ()) -> dict[str, int]:
        """Claimable chunks per type (queued and due, plus expired leases); every type of
        ``job_types`` is present (0 when idle), so a drained type reads 0, not missing."""

    @abc.abstractmethod
    def claimable(self, job_types: Sequence[str], limit: int = 100) -> list[Job]:
        """The chunks the next claims would take, in claim order, without leasing them."""

    @abc.abstractmethod
    def get(self, job_id: str) -> Job:
        """The row, or :class:`JobNotFound`."""

    @abc.abstractmethod
    def children(self, parent_id: str) -> list[Job]:
        """Chunks of a parent in chunk_index order."""

    @abc.abstractmethod
    def parent_summary(self, parent_id: str) -> ParentSummary: ...

    @abc.abstractmethod
    def list_parents(self, job_type: str | None = None, limit: int = 100) -> list[ParentSummary]:
        """Newest parents first."""

    @abc.abstractmethod
    def finished_parents(
        self, finished_since: datetime | None = None, limit: int = 100, *, after_id: str = ""
    ) -> list[Job]:
        """Parents that are completed or failed and finished after ``finished_since``, or at that
        instant with an id after ``after_id`` (all when None), in finish order (oldest first,
        ties by id): the rows only, no roll-up. ``(finished_since, after_id)`` of a page's last
        row reads the next page."""

    @abc.abstractmethod
    def cancel(self, job_id: str, reason: str = "cancelled by operator") -> int:
        """Fail a parent and all its unfinished chunks (or one chunk) for good; return rows changed."""

    @abc.abstractmethod
    def param_values(self, key: str) -> set[str]:
        """Every distinct string value of ``params[key]`` over all rows (``key`` an identifier):
        what a clean-up of files named in job params must keep (a staged dump copy no row names
        may go)."""

    @abc.abstractmethod
    def prune(self, older_than_seconds: float) -> Pruned:
        """Delete finished parents (with their chunks) and finished orphan chunks older than the
        age; return what was deleted (ids by job type)."""
