"""Getting the lease a chunk run works under: adopt the worker's claim, or claim by id."""

from __future__ import annotations

import os
import socket

from miroir_pipeline.queue.contract import JobNotClaimable, JobState, JobStore, Lease

__all__ = ["acquire_chunk", "default_worker_id"]


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
) -> Lease | None:
    """The lease to process ``chunk_id`` under; ``None`` when the chunk is already completed
    (a no-op) unless ``reimport`` asks to import it again from the start.

    With ``adopt_token`` (a worker claimed the row and handed it to this run) the claim is
    adopted as is instead of claiming again. A run launched for a chunk that failed for good is
    an operator's retry: the chunk is re-queued with a fresh attempt budget and resumes at its
    cursor. Raises :class:`JobNotClaimable` naming the holder when another worker holds it.
    """
    job = store.get(chunk_id)
    if adopt_token:
        if job.state == JobState.IN_PROGRESS and job.claim_token == adopt_token:
            assert job.claimed_by is not None and job.claim_expires_at is not None
            return Lease(job=job, token=adopt_token, worker_id=job.claimed_by, expires_at=job.claim_expires_at)
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
        store.requeue(chunk_id, reset_progress=False)
    return store.claim_by_id(chunk_id, worker_id, ttl)
