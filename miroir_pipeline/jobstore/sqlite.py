"""SQLite job store: the embedded default — one file, one host, many processes (DESIGN §3).

WAL mode lets readers run beside the single writer; every write is a ``BEGIN IMMEDIATE``
transaction (the write lock is taken up front, so no transaction fails half-way on a
lock upgrade) and waits up to ``busy_timeout`` for other processes. Each thread gets its
own connection. Time comes from SQLite's clock as epoch seconds.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from miroir_pipeline.jobstore.base import (
    DEFAULT_LEASE_TTL,
    DEFAULT_MAX_ATTEMPTS,
    RETRY_BACKOFF_BASE,
    RETRY_BACKOFF_CAP,
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
    SplitRefused,
    chunk_id,
)
from miroir_pipeline.jobstore.factory import (
    check_chunks,
    check_new_job,
    check_ttl,
    depth_for_all_types,
    dump_json,
    lease_lost,
    load_json,
    new_job_id,
    new_token,
    not_claimable,
    retry_backoff,
    summarize,
)
from miroir_pipeline.sql import load_queries, migration_files

__all__ = ["SqliteJobStore"]


def _ts(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, tz=UTC)


def _job(row: sqlite3.Row) -> Job:
    created = _ts(row["created_at"])
    updated = _ts(row["updated_at"])
    assert created is not None and updated is not None  # NOT NULL columns
    return Job(
        id=row["id"],
        type=row["type"],
        kind=row["kind"],
        state=row["state"],
        params=load_json(row["params"]),
        progress=load_json(row["progress"]),
        claimed_by=row["claimed_by"],
        claim_expires_at=_ts(row["claim_expires_at"]),
        claim_token=row["claim_token"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        error=row["error"],
        parent_job_id=row["parent_job_id"],
        chunk_index=row["chunk_index"],
        total_chunks=row["total_chunks"],
        created_at=created,
        updated_at=updated,
        finished_at=_ts(row["finished_at"]),
        available_at=_ts(row["available_at"]),
    )


def split_script(script: str) -> list[str]:
    """Split a migration file into statements (``executescript`` would commit mid-migration)."""
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    rest = "\n".join(
        ln for ln in buffer.splitlines() if ln.strip() and not ln.strip().startswith("--")
    )
    if rest:
        raise ValueError(f"migration ends with an unterminated statement: {rest[:80]!r}")
    return statements


class SqliteJobStore(JobStore):
    """The job store in one SQLite file (``sqlite:///path``)."""

    dsn_scheme = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 30.0,
        retry_backoff_base: float = RETRY_BACKOFF_BASE,
        retry_backoff_cap: float = RETRY_BACKOFF_CAP,
    ) -> None:
        self.path = Path(path)
        self.busy_timeout = float(busy_timeout)
        self.retry_backoff_base = float(retry_backoff_base)
        self.retry_backoff_cap = float(retry_backoff_cap)
        self._q = load_queries("sqlite")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JobStoreError(
                f"cannot create the folder for the SQLite job store {self.path}: {exc}"
            ) from None
        self._conn()  # a bad path fails here, not on first use

    # -- connections -----------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise JobStoreError(f"the job store {self.path} is closed")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            return conn  # (after a fork the child opens its own connection)
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,  # explicit BEGIN IMMEDIATE / COMMIT only
                check_same_thread=False,  # so close() can close every thread's connection
            )
        except sqlite3.Error as exc:
            raise JobStoreError(f"cannot open the SQLite job store {self.path}: {exc}") from None
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        self._set_wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        with self._lock:
            self._connections.append(conn)
        self._local.conn = conn
        self._local.pid = os.getpid()
        return conn

    def _set_wal(self, conn: sqlite3.Connection) -> None:
        # Switching a fresh file to WAL can report "locked" without calling the busy handler
        # while another process does the same; retry within the busy timeout.
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One writer transaction, lock taken up front."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: one consistent snapshot over several queries."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _get(self, conn: sqlite3.Connection, job_id: str) -> Job | None:
        row = conn.execute(self._q["get_job"], {"id": job_id}).fetchone()
        return None if row is None else _job(row)

    # -- lifecycle -------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        files = migration_files("sqlite")
        applied: list[str] = []
        with self._write() as conn:
            conn.execute(self._q["create_schema_migrations"])
            done = {r["name"] for r in conn.execute(self._q["applied_migrations"])}
            for name, script in files:
                if name in done:
                    continue
                try:
                    for statement in split_script(script):
                        conn.execute(statement)
                except (sqlite3.Error, ValueError) as exc:
                    raise JobStoreError(
                        f"SQLite migration {name} failed on {self.path}: {exc}"
                    ) from exc
                conn.execute(self._q["record_migration"], {"name": name})
                applied.append(name)
        return applied

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._connections:
                conn.close()
            self._connections.clear()

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
                row = conn.execute(self._q["insert_job"], args).fetchone()
        except sqlite3.IntegrityError:
            raise JobStoreError(f"job id {job_id!r} already exists; pick another id") from None
        return _job(row)

    def split(self, parent_id: str, chunks: Sequence[NewChunk]) -> list[Job]:
        check_chunks(parent_id, chunks)
        total = len(chunks)
        with self._write() as conn:
            parent = self._get(conn, parent_id)
            if parent is None:
                raise JobNotFound(f"cannot split job {parent_id}: it does not exist")
            if parent.kind != JobKind.PARENT:
                raise SplitRefused(f"cannot split job {parent_id}: it is a chunk, not a parent")
            if parent.state != JobState.QUEUED or parent.total_chunks is not None:
                raise SplitRefused(
                    f"cannot split job {parent_id} again: it is already split "
                    f"({parent.total_chunks} chunks, state {parent.state})"
                )
            conn.executemany(
                self._q["insert_chunk"],
                [
                    {
                        "id": chunk_id(parent_id, c.chunk_index, total),
                        "type": parent.type,
                        "params": dump_json(c.params, f"params of chunk {c.chunk_index}"),
                        "progress": dump_json(c.progress, f"progress of chunk {c.chunk_index}"),
                        "max_attempts": parent.max_attempts,
                        "parent_id": parent_id,
                        "chunk_index": c.chunk_index,
                        "total": total,
                    }
                    for c in chunks
                ],
            )
            conn.execute(
                self._q["mark_split"],
                {
                    "id": parent_id,
                    "state": JobState.COMPLETED if total == 0 else JobState.IN_PROGRESS,
                    "total": total,
                    "finished": total == 0,
                },
            )
            rows = conn.execute(self._q["children"], {"id": parent_id}).fetchall()
        return [_job(r) for r in rows]

    # -- workers ---------------------------------------------------------------------------
    def _fail_exhausted(self, conn: sqlite3.Connection) -> int:
        """Fail expired leases that were on their last attempt, and their parents."""
        rows = conn.execute(self._q["fail_expired_exhausted"]).fetchall()
        for row in rows:
            if row["parent_job_id"] is not None:
                conn.execute(
                    self._q["fail_unfinished"],
                    {
                        "id": row["parent_job_id"],
                        "error": f"chunk {row['id']} failed for good: {row['error']}",
                    },
                )
        return len(rows)

    def _lease(self, row: sqlite3.Row, token: str, worker_id: str) -> Lease:
        job = _job(row)
        assert job.claim_expires_at is not None
        return Lease(job=job, token=token, worker_id=worker_id, expires_at=job.claim_expires_at)

    def claim(
        self, job_types: Sequence[str], worker_id: str, ttl: float = DEFAULT_LEASE_TTL
    ) -> Lease | None:
        types = [str(t) for t in job_types]
        if not types:
            return None
        token = new_token()
        with self._write() as conn:
            self._fail_exhausted(conn)
            row = conn.execute(
                self._q["claim_next"],
                {
                    "types": msgspec.json.encode(types).decode(),
                    "worker_id": worker_id,
                    "token": token,
                    "ttl": check_ttl(ttl),
                },
            ).fetchone()
        return None if row is None else self._lease(row, token, worker_id)

    def claim_by_id(self, job_id: str, worker_id: str, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        token = new_token()
        with self._write() as conn:
            self._fail_exhausted(conn)
            row = conn.execute(
                self._q["claim_by_id"],
                {"id": job_id, "worker_id": worker_id, "token": token, "ttl": check_ttl(ttl)},
            ).fetchone()
            current = None if row is not None else self._get(conn, job_id)
        if row is not None:
            return self._lease(row, token, worker_id)
        if current is None:
            raise JobNotFound(f"cannot claim job {job_id}: it does not exist")
        raise not_claimable(current, worker_id)

    def _fenced(self, conn: sqlite3.Connection, query: str, lease: Lease, **args: Any) -> Any:
        row = conn.execute(self._q[query], {"id": lease.job_id, "token": lease.token, **args})
        found = row.fetchone()
        if found is None:
            raise lease_lost(lease.job_id, lease.token, self._get(conn, lease.job_id))
        return found

    def renew(self, lease: Lease, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        with self._write() as conn:
            row = self._fenced(conn, "renew_lease", lease, ttl=check_ttl(ttl))
        return self._lease(row, lease.token, lease.worker_id)

    def save_progress(self, lease: Lease, progress: Mapping[str, Any]) -> None:
        encoded = dump_json(progress, f"progress of job {lease.job_id}")
        with self._write() as conn:
            self._fenced(conn, "save_progress", lease, progress=encoded)

    def complete(self, lease: Lease, progress: Mapping[str, Any] | None = None) -> Job:
        encoded = None if progress is None else dump_json(progress, f"progress of {lease.job_id}")
        with self._write() as conn:
            job = _job(self._fenced(conn, "complete_chunk", lease, progress=encoded))
            if job.parent_job_id is not None:
                conn.execute(self._q["complete_parent_if_done"], {"id": job.parent_job_id})
        return job

    def fail(self, lease: Lease, error: str, *, retryable: bool = True) -> Job:
        attempts = lease.job.attempts  # fenced: the row's count is the lease's
        retry = retryable and attempts < lease.job.max_attempts
        backoff = retry_backoff(attempts, self.retry_backoff_base, self.retry_backoff_cap)
        with self._write() as conn:
            job = _job(
                self._fenced(
                    conn, "fail_chunk", lease, retry=retry, error=str(error), backoff=backoff
                )
            )
            if job.state == JobState.FAILED and job.parent_job_id is not None:
                conn.execute(
                    self._q["fail_unfinished"],
                    {
                        "id": job.parent_job_id,
                        "error": f"chunk {job.id} failed for good after {job.attempts} "
                        f"attempt(s): {error}",
                    },
                )
        return job

    def release(self, lease: Lease) -> Job:
        with self._write() as conn:
            return _job(self._fenced(conn, "release_chunk", lease))

    def requeue(self, job_id: str, *, reset_progress: bool = False) -> Job:
        with self._write() as conn:
            job = self._get(conn, job_id)
            if job is None:
                raise JobNotFound(f"cannot re-queue job {job_id}: it does not exist")
            row = conn.execute(
                self._q["requeue_chunk"], {"id": job_id, "reset": bool(reset_progress)}
            ).fetchone()
            if row is None:
                raise JobNotClaimable(
                    f"chunk {job_id} is {job.state} ({job.kind}); only a completed or failed "
                    "chunk can be re-queued",
                    job,
                )
            if job.parent_job_id is not None:
                conn.execute(self._q["reopen_parent"], {"id": job.parent_job_id}).fetchall()
            return _job(row)

    def reclaim_expired(self) -> int:
        with self._write() as conn:
            failed = self._fail_exhausted(conn)
            requeued = conn.execute(self._q["requeue_expired"]).rowcount
        return failed + requeued

    # -- observers / operators -------------------------------------------------------------
    def queue_depth(self) -> dict[str, int]:
        rows = self._conn().execute(self._q["queue_depth"]).fetchall()
        return depth_for_all_types((r["type"], r["depth"]) for r in rows)

    def claimable(self, job_types: Sequence[str], limit: int = 100) -> list[Job]:
        types = msgspec.json.encode([str(t) for t in job_types]).decode()
        rows = self._conn().execute(self._q["claimable_chunks"], {"types": types, "limit": int(limit)})
        return [_job(r) for r in rows.fetchall()]

    def get(self, job_id: str) -> Job:
        job = self._get(self._conn(), job_id)
        if job is None:
            raise JobNotFound(f"job {job_id} does not exist")
        return job

    def children(self, parent_id: str) -> list[Job]:
        rows = self._conn().execute(self._q["children"], {"id": parent_id}).fetchall()
        return [_job(r) for r in rows]

    def parent_summary(self, parent_id: str) -> ParentSummary:
        with self._read() as conn:
            parent = self._get(conn, parent_id)
            if parent is None:
                raise JobNotFound(f"job {parent_id} does not exist")
            rows = conn.execute(self._q["children"], {"id": parent_id}).fetchall()
        return summarize(parent, ((r["state"], load_json(r["progress"])) for r in rows))

    def list_parents(self, job_type: str | None = None, limit: int = 100) -> list[ParentSummary]:
        with self._read() as conn:
            parents = [
                _job(r)
                for r in conn.execute(
                    self._q["list_parents"],
                    {"type": None if job_type is None else str(job_type), "limit": int(limit)},
                )
            ]
            ids = msgspec.json.encode([p.id for p in parents]).decode()
            rows = conn.execute(self._q["children_states"], {"ids": ids}).fetchall()
        by_parent: dict[str, list[tuple[str, dict[str, Any]]]] = {p.id: [] for p in parents}
        for r in rows:
            by_parent[r["parent_job_id"]].append((r["state"], load_json(r["progress"])))
        return [summarize(p, by_parent[p.id]) for p in parents]

    def cancel(self, job_id: str, reason: str = "cancelled by operator") -> int:
        with self._write() as conn:
            job = self._get(conn, job_id)
            if job is None:
                raise JobNotFound(f"cannot cancel job {job_id}: it does not exist")
            changed = conn.execute(
                self._q["fail_unfinished"], {"id": job_id, "error": reason}
            ).fetchall()
            count = len(changed)
            if job.kind == JobKind.PARENT:
                count += conn.execute(
                    self._q["fail_unfinished_children"], {"id": job_id, "error": reason}
                ).rowcount
            elif changed and job.parent_job_id is not None:
                count += len(
                    conn.execute(
                        self._q["fail_unfinished"],
                        {"id": job.parent_job_id, "error": f"chunk {job_id} cancelled: {reason}"},
                    ).fetchall()
                )
        return count

    def prune(self, older_than_seconds: float) -> int:
        age = {"age": float(older_than_seconds)}
        with self._write() as conn:
            ids = [r["id"] for r in conn.execute(self._q["prunable_parents"], age)]
            deleted = 0
            if ids:
                encoded = {"ids": msgspec.json.encode(ids).decode()}
                deleted += conn.execute(self._q["delete_children"], encoded).rowcount
                deleted += conn.execute(self._q["delete_jobs"], encoded).rowcount
            deleted += conn.execute(self._q["delete_finished_orphans"], age).rowcount
        return deleted
