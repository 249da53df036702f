"""The job-store operations written once for both SQL backends.

:class:`SqlJobStore` runs the named statements of ``sql/<dialect>_queries.sql`` — the same
names on SQLite and Postgres — and keeps the logic around them (fencing, parent completion
and failure, retry backoff, roll-ups) in one place. A backend supplies only what really
differs: how it opens a write transaction or a read, how it runs a statement, how a list
parameter and a timestamp are encoded, how children are inserted, how exhausted leases are
failed, and how migrations are applied. Where Postgres needs lock ordering (a parent row
before its chunks) it sets :attr:`SqlJobStore.row_locks`; SQLite's single writer needs none.
"""

from __future__ import annotations

import abc
import logging
import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from miroir_pipeline.queue.contract import (
    DEFAULT_LEASE_TTL,
    DEFAULT_MAX_ATTEMPTS,
    Job,
    JobKind,
    JobNotClaimable,
    JobNotFound,
    JobState,
    JobStore,
    JobStoreError,
    Lease,
    NewChunk,
    ParentSummary,
    Pruned,
    SplitRefused,
    chunk_id,
)
from miroir_pipeline.queue.rules import (
    check_chunks,
    check_new_job,
    check_ttl,
    depth_by_type,
    dump_json,
    lease_lost,
    load_json,
    new_job_id,
    new_token,
    not_claimable,
    retry_backoff,
    summarize,
)
from miroir_pipeline.queue.sql import load_queries, migration_files

__all__ = ["Cursor", "EncodedChunk", "SqlConnection", "SqlJobStore"]

log = logging.getLogger(__name__)

#: A result row: ``sqlite3.Row`` or psycopg's ``DictRow``; both index by column name.
Row = Any


class Cursor(Protocol):
    """What the shared code reads from a statement's result (sqlite3 and psycopg cursors)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class SqlConnection(Protocol):
    """A DB-API-style connection whose ``execute`` takes named parameters."""

    def execute(self, query: str, params: Mapping[str, Any] = ..., /) -> Cursor: ...


ConnT = TypeVar("ConnT", bound=SqlConnection)


@dataclass(frozen=True)
class EncodedChunk:
    """One child row of a split, with its id and its JSON already encoded."""

    id: str
    chunk_index: int
    params: str
    progress: str


class SqlJobStore(JobStore, Generic[ConnT]):
    """:class:`JobStore` on named SQL statements; subclasses supply the backend hooks."""

    #: Names the query file (``sql/<dialect>_queries.sql``) and the migrations folder.
    dialect: ClassVar[str]
    #: True where concurrent writers need row locks taken in order (Postgres): the parent
    #: row is locked (``lock_job``) before its chunks are written. SQLite's ``BEGIN
    #: IMMEDIATE`` serialises all writers, so it needs none.
    row_locks: ClassVar[bool] = False
    #: The driver's error for a duplicate primary key on ``insert_job``.
    duplicate_key_errors: ClassVar[tuple[type[Exception], ...]]

    def __init__(self, *, retry_backoff_base: float, retry_backoff_cap: float) -> None:
        self.retry_backoff_base = float(retry_backoff_base)
        self.retry_backoff_cap = float(retry_backoff_cap)
        self._q = load_queries(self.dialect)

    # -- backend hooks ---------------------------------------------------------------------
    @abc.abstractmethod
    def _write(self) -> AbstractContextManager[ConnT]:
        """One write transaction: committed when the block ends, rolled back on an error."""

    def _statement(self) -> AbstractContextManager[ConnT]:
        """A connection for statements that each commit on their own (autocommit).

        The hot path (claim, heartbeat, progress, completion) is single statements; where the
        backend can, each is one round trip with no BEGIN/COMMIT around it. By default it is
        one write transaction."""
        return self._write()

    @abc.abstractmethod
    def _read(self, *, snapshot: bool = False) -> AbstractContextManager[ConnT]:
        """A connection to read from; ``snapshot`` when several queries must agree."""

    @abc.abstractmethod
    def _ts(self, value: Any) -> datetime | None:
        """A timestamp column as an aware UTC datetime (None stays None)."""

    @abc.abstractmethod
    def _list_param(self, values: Sequence[str]) -> Any:
        """A list of strings as the driver takes it for ``:types`` / ``:ids``."""

    @abc.abstractmethod
    def _param_key(self, key: str) -> dict[str, str]:
        """The parameters of ``param_values`` naming ``key`` as the driver's JSON access takes it."""

    @abc.abstractmethod
    def _insert_chunks(self, conn: ConnT, parent: Job, chunks: Sequence[EncodedChunk]) -> list[Job]:
        """Insert the (non-empty) children of ``parent``; return them in chunk_index order."""

    @abc.abstractmethod
    def _fail_expired_exhausted(self, conn: ConnT) -> list[Row]:
        """Fail expired leases on their last attempt; rows of (id, parent_job_id, error)."""

    @abc.abstractmethod
    def _begin_migrations(self, conn: ConnT) -> None:
        """Whatever must precede ``create_schema_migrations`` in the migrating transaction."""

    @abc.abstractmethod
    def _apply_migration(self, conn: ConnT, name: str, script: str) -> None:
        """Run one migration file; a failure raises :class:`JobStoreError` naming it."""

    # -- statement helpers -----------------------------------------------------------------
    def _run(self, conn: ConnT, name: str, params: Mapping[str, Any] | None = None) -> Cursor:
        """Execute the named statement of this backend's query file."""
        query = self._q[name]
        return conn.execute(query) if params is None else conn.execute(query, params)

    def _rows(self, conn: ConnT, name: str, params: Mapping[str, Any] | None = None) -> list[Row]:
        return self._run(conn, name, params).fetchall()

    def _job(self, row: Row) -> Job:
        created = self._ts(row["created_at"])
        updated = self._ts(row["updated_at"])
        assert created is not None and updated is not None  # NOT NULL columns
        return Job(
            id=row["id"],
            type=row["type"],
            kind=row["kind"],
            state=row["state"],
            params=load_json(row["params"]),
            progress=load_json(row["progress"]),
            claimed_by=row["claimed_by"],
            claim_expires_at=self._ts(row["claim_expires_at"]),
            claim_token=row["claim_token"],
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            error=row["error"],
            parent_job_id=row["parent_job_id"],
            chunk_index=row["chunk_index"],
            total_chunks=row["total_chunks"],
            created_at=created,
            updated_at=updated,
            finished_at=self._ts(row["finished_at"]),
            available_at=self._ts(row["available_at"]),
        )

    def _get(self, conn: ConnT, job_id: str, *, lock: bool = False) -> Job | None:
        """The row, row-locked when ``lock`` and the backend uses row locks."""
        query = "lock_job" if lock and self.row_locks else "get_job"
        row = self._run(conn, query, {"id": job_id}).fetchone()
        return None if row is None else self._job(row)

    def _lock_parent(self, conn: ConnT, parent_id: str | None) -> None:
        """Lock order: a chunk's parent row is locked before the chunk is written."""
        if parent_id is not None and self.row_locks:
            self._rows(conn, "lock_job", {"id": parent_id})

    def _lease(self, row: Row, token: str, worker_id: str) -> Lease:
        job = self._job(row)
        assert job.claim_expires_at is not None
        return Lease(job=job, token=token, worker_id=worker_id, expires_at=job.claim_expires_at)

    def _fenced(self, conn: ConnT, query: str, lease: Lease, **args: Any) -> Row:
        """Run a statement guarded by the lease's token; :class:`LeaseLost` when it matched nothing."""
        row = self._run(conn, query, {"id": lease.job_id, "token": lease.token, **args}).fetchone()
        if row is None:
            raise lease_lost(lease.job_id, lease.token, self._get(conn, lease.job_id))
        return row

    def _fail_unfinished(self, conn: ConnT, job_id: str, error: str) -> list[Row]:
        """Fail one unfinished parent or chunk for good; the rows changed (none or one)."""
        return self._rows(conn, "fail_unfinished", {"id": job_id, "error": error})

    def _fail_exhausted(self, conn: ConnT) -> int:
        """Fail expired leases that were on their last attempt, and their parents."""
        failed = self._fail_expired_exhausted(conn)
        for row in failed:
            if row["parent_job_id"] is not None:
                self._fail_unfinished(
                    conn,
                    row["parent_job_id"],
                    f"chunk {row['id']} failed for good: {row['error']}",
                )
        return len(failed)

    # -- lifecycle -------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        files = migration_files(self.dialect)
        applied: list[str] = []
        with self._write() as conn:
            self._begin_migrations(conn)
            self._run(conn, "create_schema_migrations")
            done = {r["name"] for r in self._rows(conn, "applied_migrations")}
            for name, script in files:
                if name in done:
                    continue
                self._apply_migration(conn, name, script)
                self._run(conn, "record_migration", {"name": name})
                applied.append(name)
        return applied

    # -- producers -------------------------------------------------------------------------
    def enqueue(
        self,
        job_type: str,
        params: Mapping[str, Any],
        *,
        job_id: str | None = None,
        kind: str = JobKind.PARENT,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> Job:
        check_new_job(job_type, kind, max_attempts)
        job_id = job_id or new_job_id()
        standalone_chunk = kind == JobKind.CHUNK
        args = {
            "id": job_id,
            "type": str(job_type),
            "kind": str(kind),
            "params": dump_json(params, f"params of job {job_id}"),
            "max_attempts": max_attempts,
            "chunk_index": 0 if standalone_chunk else None,
            "total_chunks": 1 if standalone_chunk else None,
        }
        try:
            with self._write() as conn:
                row = self._run(conn, "insert_job", args).fetchone()
        except self.duplicate_key_errors:
            raise JobStoreError(f"job id {job_id!r} already exists; pick another id") from None
        assert row is not None
        return self._job(row)

    def split(self, parent_id: str, chunks: Sequence[NewChunk]) -> list[Job]:
        check_chunks(parent_id, chunks)
        total = len(chunks)
        with self._write() as conn:
            parent = self._get(conn, parent_id, lock=True)
            if parent is None:
                raise JobNotFound(f"cannot split job {parent_id}: it does not exist")
            if parent.kind != JobKind.PARENT:
                raise SplitRefused(f"cannot split job {parent_id}: it is a chunk, not a parent")
            if parent.state == JobState.FAILED and parent.total_chunks is None:
                # Never split, yet out of the queue: cancelled (or failed) while waiting.
                raise SplitRefused(
                    f"cannot split job {parent_id}: it was cancelled or failed before it was "
                    f"split (state {parent.state}, error: {parent.error or 'none recorded'}), "
                    "and a cancelled or failed parent cannot be split; enqueue a new job instead"
                )
            if parent.state != JobState.QUEUED or parent.total_chunks is not None:
                raise SplitRefused(
                    f"cannot split job {parent_id} again: it is already split "
                    f"({parent.total_chunks} chunks, state {parent.state})"
                )
            jobs: list[Job] = []
            if chunks:
                encoded = [
                    EncodedChunk(
                        id=chunk_id(parent_id, c.chunk_index, total),
                        chunk_index=c.chunk_index,
                        params=dump_json(c.params, f"params of chunk {c.chunk_index}"),
                        progress=dump_json(c.progress, f"progress of chunk {c.chunk_index}"),
                    )
                    for c in chunks
                ]
                jobs = self._insert_chunks(conn, parent, encoded)
            self._run(
                conn,
                "mark_split",
                {
                    "id": parent_id,
                    "state": str(JobState.COMPLETED if total == 0 else JobState.IN_PROGRESS),
                    "total": total,
                    "finished": total == 0,
                },
            )
        return jobs

    # -- workers ---------------------------------------------------------------------------
    def claim(
        self,
        job_types: Sequence[str],
        worker_id: str,
        ttl: float = DEFAULT_LEASE_TTL,
        *,
        parent_id: str | None = None,
    ) -> Lease | None:
        types = [str(t) for t in job_types]
        if not types:
            return None
        token = new_token()
        with self._statement() as conn:
            row = self._run(
                conn,
                "claim_next",
                {
                    "types": self._list_param(types),
                    "worker_id": worker_id,
                    "token": token,
                    "ttl": check_ttl(ttl),
                    "parent_id": parent_id,
                },
            ).fetchone()
        if row is not None:
            return self._lease(row, token, worker_id)
        # Out-of-attempts expired leases are never claimed (claim_next skips them); they are
        # failed for good here, when nothing else is claimable, and by reclaim_expired - not on
        # every claim, where the sweep cost grew with the queue.
        with self._write() as conn:
            self._fail_exhausted(conn)
        if self.row_locks:
            # A parent whose last chunk completed but whose own completion never ran (see
            # complete) is finished here too, so workers waiting for it to end do not wait on
            # the dispatch sensor, which may not run at all.
            self.complete_finished_parents(parent_id)
        return None

    def claim_by_id(self, job_id: str, worker_id: str, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        token = new_token()
        with self._write() as conn:
            row = self._run(
                conn,
                "claim_by_id",
                {"id": job_id, "worker_id": worker_id, "token": token, "ttl": check_ttl(ttl)},
            ).fetchone()
            if row is None:
                self._fail_exhausted(conn)  # e.g. this very row, expired on its last attempt
            current = None if row is not None else self._get(conn, job_id)
        if row is not None:
            return self._lease(row, token, worker_id)
        if current is None:
            raise JobNotFound(f"cannot claim job {job_id}: it does not exist")
        raise not_claimable(current, worker_id)

    def renew(self, lease: Lease, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        with self._statement() as conn:
            row = self._fenced(conn, "renew_lease", lease, ttl=check_ttl(ttl))
        return self._lease(row, lease.token, lease.worker_id)

    def save_progress(self, lease: Lease, progress: Mapping[str, Any]) -> None:
        encoded = dump_json(progress, f"progress of job {lease.job_id}")
        with self._statement() as conn:
            self._fenced(conn, "save_progress", lease, progress=encoded)

    def complete(self, lease: Lease, progress: Mapping[str, Any] | None = None) -> Job:
        encoded = None if progress is None else dump_json(progress, f"progress of {lease.job_id}")
        parent_id = lease.job.parent_job_id  # a row's parent never changes
        # Where statements commit on their own (Postgres), the parent is checked after the
        # chunk's completion has committed, so sibling completions never queue on the parent
        # row: of two last chunks, whichever commits second sees both completed (READ
        # COMMITTED: a fresh snapshot per statement). Only a completion that finds no
        # unfinished sibling locks the parent and completes it (see complete_parent_if_done);
        # a crash in between is repaired by complete_finished_parents. With one writer at a
        # time (SQLite) the check runs in the chunk's own transaction.
        last = False
        check_failed: Exception | None = None
        with self._statement() as conn:
            row = self._fenced(conn, "complete_chunk", lease, progress=encoded)
            updated = self._ts(row["updated_at"])
            assert updated is not None  # a NOT NULL column
            job = replace(
                lease.job,
                state=JobState.COMPLETED.value,
                progress=load_json(row["progress"]),
                claim_token=None,
                claim_expires_at=None,
                error=None,
                finished_at=self._ts(row["finished_at"]),
                updated_at=updated,
            )
            if parent_id is not None and not self.row_locks:
                self._rows(conn, "complete_parent_if_done", {"id": parent_id})
            elif parent_id is not None:
                try:
                    last = not self._rows(conn, "unfinished_child", {"id": parent_id})
                except Exception as exc:  # the chunk is completed whatever happens now
                    check_failed = exc
        if last:
            try:
                self.complete_finished_parents(parent_id)
            except Exception as exc:
                check_failed = exc
        if check_failed is not None:
            # Raising would fail the attempt of a chunk that is completed (the fence then
            # refuses the failure); the parent is finished by the next claim that finds
            # nothing to claim, a pool worker's periodic sweep, or reclaim_expired.
            log.warning(
                "chunk %s completed, but checking whether it finished parent %s failed (%s); "
                "the next worker to find nothing to claim, a pool worker's periodic sweep, or "
                "the dispatch sensor completes "
                "the parent if it is finished",
                lease.job_id,
                parent_id,
                type(check_failed).__name__,
            )
        return job

    def fail(self, lease: Lease, error: str, *, retryable: bool = True) -> Job:
        attempts = lease.job.attempts  # fenced: the row's count is the lease's
        retry = retryable and attempts < lease.job.max_attempts
        backoff = retry_backoff(attempts, self.retry_backoff_base, self.retry_backoff_cap)
        parent_id = lease.job.parent_job_id
        with self._write() as conn:
            self._lock_parent(conn, parent_id)
            job = self._job(
                self._fenced(
                    conn, "fail_chunk", lease, retry=retry, error=str(error), backoff=backoff
                )
            )
            if job.state == JobState.FAILED and parent_id is not None:
                self._fail_unfinished(
                    conn,
                    parent_id,
                    f"chunk {job.id} failed for good after {job.attempts} attempt(s): {error}",
                )
        return job

    def release(self, lease: Lease) -> Job:
        with self._write() as conn:
            return self._job(self._fenced(conn, "release_chunk", lease))

    def requeue(self, job_id: str, *, reset_progress: bool = False) -> Job:
        with self._write() as conn:
            job = self._get(conn, job_id)
            if job is None:
                raise JobNotFound(f"cannot re-queue job {job_id}: it does not exist")
            self._lock_parent(conn, job.parent_job_id)
            row = self._run(
                conn, "requeue_chunk", {"id": job_id, "reset": bool(reset_progress)}
            ).fetchone()
            if row is None:
                raise JobNotClaimable(
                    f"chunk {job_id} is {job.state} ({job.kind}); only a completed or failed "
                    "chunk can be re-queued",
                    job,
                )
            if job.parent_job_id is not None:
                self._rows(conn, "reopen_parent", {"id": job.parent_job_id})
            return self._job(row)

    def reclaim_expired(self) -> int:
        with self._write() as conn:
            failed = self._fail_exhausted(conn)
            requeued = self._run(conn, "requeue_expired").rowcount
        self.complete_finished_parents()
        return failed + max(requeued, 0)

    def complete_finished_parents(self, parent_id: str | None = None) -> int:
        if not self.row_locks:  # one writer: nothing can change between check and update
            with self._write() as conn:
                if parent_id is not None:
                    return len(self._rows(conn, "complete_parent_if_done", {"id": parent_id}))
                return len(self._rows(conn, "complete_finished_parents"))
        with self._read() as conn:  # nothing is locked unless a parent may be finished
            if parent_id is None:
                candidates = [str(r["id"]) for r in self._rows(conn, "finished_parent_candidates")]
            elif self._rows(conn, "unfinished_child", {"id": parent_id}):
                return 0
            else:
                candidates = [parent_id]
        completed = 0
        for candidate in candidates:  # a transaction each: a parent's lock is held briefly
            with self._write() as conn:
                self._lock_parent(conn, candidate)
                completed += len(self._rows(conn, "complete_parent_if_done", {"id": candidate}))
        return completed

    # -- observers / operators -------------------------------------------------------------
    def queue_depth(self, job_types: Sequence[str] = ()) -> dict[str, int]:
        with self._read() as conn:
            rows = self._rows(conn, "queue_depth")
        return depth_by_type(((r["type"], r["depth"]) for r in rows), job_types)

    def claimable(self, job_types: Sequence[str], limit: int = 100) -> list[Job]:
        types = self._list_param([str(t) for t in job_types])
        with self._read() as conn:
            rows = self._rows(conn, "claimable_chunks", {"types": types, "limit": int(limit)})
        return [self._job(r) for r in rows]

    def get(self, job_id: str) -> Job:
        with self._read() as conn:
            job = self._get(conn, job_id)
        if job is None:
            raise JobNotFound(f"job {job_id} does not exist")
        return job

    def children(self, parent_id: str) -> list[Job]:
        with self._read() as conn:
            rows = self._rows(conn, "children", {"id": parent_id})
        return [self._job(r) for r in rows]

    def parent_summary(self, parent_id: str) -> ParentSummary:
        with self._read(snapshot=True) as conn:
            parent = self._get(conn, parent_id)
            if parent is None:
                raise JobNotFound(f"job {parent_id} does not exist")
            rows = self._rows(conn, "children_states", {"ids": self._list_param([parent_id])})
        return summarize(parent, ((r["state"], load_json(r["progress"])) for r in rows))

    def list_parents(self, job_type: str | None = None, limit: int = 100) -> list[ParentSummary]:
        with self._read(snapshot=True) as conn:
            parents = [
                self._job(r)
                for r in self._rows(
                    conn,
                    "list_parents",
                    {"type": None if job_type is None else str(job_type), "limit": int(limit)},
                )
            ]
            rows = self._rows(
                conn, "children_states", {"ids": self._list_param([p.id for p in parents])}
            )
        by_parent: dict[str, list[tuple[str, dict[str, Any]]]] = {p.id: [] for p in parents}
        for r in rows:
            by_parent[r["parent_job_id"]].append((r["state"], load_json(r["progress"])))
        return [summarize(p, by_parent[p.id]) for p in parents]

    def cancel(self, job_id: str, reason: str = "cancelled by operator") -> int:
        with self._write() as conn:
            job = self._get(conn, job_id)
            if job is None:
                raise JobNotFound(f"cannot cancel job {job_id}: it does not exist")
            self._lock_parent(conn, job.parent_job_id)
            changed = self._fail_unfinished(conn, job_id, reason)
            count = len(changed)
            if job.kind == JobKind.PARENT:
                count += self._run(
                    conn, "fail_unfinished_children", {"id": job_id, "error": reason}
                ).rowcount
            elif changed and job.parent_job_id is not None:
                count += len(
                    self._fail_unfinished(
                        conn, job.parent_job_id, f"chunk {job_id} cancelled: {reason}"
                    )
                )
        return count

    def finished_parents(
        self, finished_since: datetime | None = None, limit: int = 100, *, after_id: str = ""
    ) -> list[Job]:
        # Epoch seconds; the statements allow a microsecond each way, because a finish read back
        # as a datetime (µs) and turned into a float again can land a hair off the stored value.
        since = None if finished_since is None else finished_since.timestamp()
        with self._read() as conn:
            rows = self._rows(conn, "finished_parents", {"since": since, "after_id": after_id, "limit": int(limit)})
        return [self._job(r) for r in rows]

    def param_values(self, key: str) -> set[str]:
        if not _PARAM_KEY.fullmatch(key):
            raise ValueError(f"param key {key!r} is not an identifier ([A-Za-z_][A-Za-z0-9_]*)")
        with self._read() as conn:
            rows = self._rows(conn, "param_values", self._param_key(key))
        return {str(r["value"]) for r in rows}

    def prune(self, older_than_seconds: float) -> Pruned:
        age = {"age": float(older_than_seconds)}
        pruned = Pruned()
        with self._write() as conn:
            ids = [r["id"] for r in self._rows(conn, "prunable_parents", age)]
            if ids:
                encoded = {"ids": self._list_param(ids)}
                _collect(pruned.chunks, self._rows(conn, "delete_children", encoded))
                _collect(pruned.parents, self._rows(conn, "delete_jobs", encoded))
            _collect(pruned.chunks, self._rows(conn, "delete_finished_orphans", age))
        for ids_of_type in (*pruned.parents.values(), *pruned.chunks.values()):
            ids_of_type.sort()
        return pruned


#: What ``param_values`` takes as a key: both databases reach such a member the same way.
_PARAM_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _collect(into: dict[str, list[str]], rows: Sequence[Row]) -> None:
    """Add deleted rows' (id, type) to ``into``, by type."""
    for r in rows:
        into.setdefault(str(r["type"]), []).append(str(r["id"]))
