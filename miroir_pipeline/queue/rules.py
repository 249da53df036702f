"""Rules both job-store backends share: JSON columns, tokens, argument checks, retry backoff,
and the errors that say why a claim or a fenced write was refused."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec

from miroir_pipeline.queue.contract import (
    RETRY_BACKOFF_CAP,
    Job,
    JobKind,
    JobNotClaimable,
    JobState,
    LeaseLost,
    NewChunk,
    ParentSummary,
    rollup_progress,
)


def dump_json(value: Mapping[str, Any] | None, what: str) -> str:
    """JSON text of a params/progress mapping; names the field when it cannot be encoded."""
    try:
        return msgspec.json.encode(dict(value or {})).decode()
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from None


def load_json(value: Any) -> dict[str, Any]:
    """A JSON column read back (text on SQLite, already decoded on Postgres)."""
    if value is None:
        return {}
    if isinstance(value, str | bytes):
        decoded = msgspec.json.decode(value)
        return decoded if isinstance(decoded, dict) else {"value": decoded}
    return dict(value)


def new_token() -> str:
    return uuid.uuid4().hex


def new_job_id() -> str:
    return uuid.uuid4().hex


def check_new_job(job_type: str, kind: str, max_attempts: int) -> None:
    if not job_type:
        raise ValueError("job_type must be a non-empty string")
    if kind not in (JobKind.PARENT, JobKind.CHUNK):
        raise ValueError(f"kind must be 'parent' or 'chunk', not {kind!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")


def check_chunks(parent_id: str, chunks: Sequence[NewChunk]) -> None:
    """Chunk indexes must be exactly 0..n-1 (they order claims and name partitions)."""
    indexes = sorted(c.chunk_index for c in chunks)
    if indexes != list(range(len(chunks))):
        raise ValueError(
            f"split of {parent_id!r}: chunk_index values must be 0..{len(chunks) - 1} with "
            f"no gaps or repeats, got {indexes[:10]}{'…' if len(indexes) > 10 else ''}"
        )


def check_ttl(ttl: float) -> float:
    if not ttl > 0:
        raise ValueError(f"lease ttl must be a positive number of seconds, not {ttl!r}")
    return float(ttl)


def retry_backoff(attempts: int, base: float, cap: float = RETRY_BACKOFF_CAP) -> float:
    """Seconds before a failed attempt's retry: ``base * 2**(attempts-1)``, capped."""
    return float(min(base * 2 ** max(attempts - 1, 0), cap))


def lease_lost(job_id: str, token: str, current: Job | None) -> LeaseLost:
    if current is None:
        return LeaseLost(f"lease on job {job_id} lost: the row no longer exists (pruned?)")
    holder = (
        f", now leased by {current.claimed_by}"
        if current.state == JobState.IN_PROGRESS and current.claimed_by
        else ""
    )
    return LeaseLost(
        f"lease on job {job_id} lost (token …{token[-6:]} no longer matches; the row is "
        f"{current.state}{holder}): stop writing to it — another worker owns it now or it "
        "was cancelled"
    )


def not_claimable(job: Job, worker_id: str) -> JobNotClaimable:
    if job.kind == JobKind.PARENT:
        why = "it is a parent job; claim its chunks"
    elif job.state == JobState.IN_PROGRESS:
        why = f"it is leased by {job.claimed_by} until {job.claim_expires_at}"
    elif job.state == JobState.QUEUED:
        why = f"it is out of attempts ({job.attempts}/{job.max_attempts})"
    else:
        why = f"it is already {job.state}"
        if job.error:
            why += f" ({job.error})"
    return JobNotClaimable(f"job {job.id} cannot be claimed by {worker_id}: {why}", job)


def depth_by_type(rows: Iterable[tuple[str, int]], job_types: Sequence[str]) -> dict[str, int]:
    """Depth per type from (type, count) rows; every type in ``job_types`` present, 0 if idle."""
    depth: dict[str, int] = {str(t): 0 for t in job_types}
    for job_type, count in rows:
        depth[job_type] = int(count)
    return depth


def summarize(parent: Job, children: Iterable[tuple[str, Mapping[str, Any]]]) -> ParentSummary:
    """ParentSummary from (state, progress) of each child."""
    by_state: dict[str, int] = {str(s): 0 for s in JobState}
    progresses: list[Mapping[str, Any]] = []
    total = 0
    for state, progress in children:
        total += 1
        by_state[state] = by_state.get(state, 0) + 1
        progresses.append(progress)
    return ParentSummary(
        parent=parent,
        chunks_total=total,
        chunks_by_state=by_state,
        progress=rollup_progress(progresses),
    )
