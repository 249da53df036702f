"""Postgres job store: production backend — psycopg 3 with a connection pool (DESIGN §3).

The table lives in its own schema (default ``miroir``; Dagster's storage has its own
``jobs`` table). Every connection runs READ COMMITTED in UTC with ``search_path`` set to that
schema; time comes from the database clock (``now()``). The pool checks each connection
before lending it, so the store carries on after a database restart.

Lock order, which keeps concurrent writers deadlock-free: a parent row before its chunks,
several parents in id order; the claim locks one chunk only and never waits (SKIP LOCKED).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg_pool import ConnectionPool

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
    redact_dsn,
    retry_backoff,
    summarize,
    validate_schema,
)
from miroir_pipeline.sql import load_queries, migration_files

__all__ = ["DEFAULT_SCHEMA", "PostgresJobStore"]

DEFAULT_SCHEMA = "miroir"
Conn = psycopg.Connection[DictRow]


def _ts(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _job(row: Mapping[str, Any]) -> Job:
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
        created_at=row["created_at"].astimezone(UTC),
        updated_at=row["updated_at"].astimezone(UTC),
        finished_at=_ts(row["finished_at"]),
        available_at=_ts(row["available_at"]),
    )


def _migration_lock_key(schema: str) -> int:
    """A stable signed 64-bit advisory-lock key per schema."""
    digest = hashlib.blake2b(f"miroir-pipeline:migrate:{schema}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


class PostgresJobStore(JobStore):
    """The job store in ``<schema>.jobs`` on Postgres (``postgresql://…``)."""

    dsn_scheme = "postgresql"

    def __init__(
        self,
        conninfo: str,
        *,
        schema: str | None = DEFAULT_SCHEMA,
        min_size: int = 1,
        max_size: int = 10,
        connect_timeout: float = 10.0,
        retry_backoff_base: float = RETRY_BACKOFF_BASE,
        retry_backoff_cap: float = RETRY_BACKOFF_CAP,
    ) -> None:
        self.schema = validate_schema(schema or DEFAULT_SCHEMA)
        self.retry_backoff_base = float(retry_backoff_base)
        self.retry_backoff_cap = float(retry_backoff_cap)
        self._where = redact_dsn(conninfo)
        self._q = load_queries("postgres")
        # Connect once up front: a wrong host or password fails here with libpq's reason
        # (which never contains the password) instead of as a pool timeout later.
        try:
            psycopg.connect(conninfo, connect_timeout=max(1, int(connect_timeout))).close()
        except psycopg.Error as exc:
            raise JobStoreError(
                f"cannot connect to the jobs database {self._where}: {exc}".rstrip()
                + " — check the host, port, user and password in the jobs DSN"
            ) from None
        self._pool: ConnectionPool[Conn] = ConnectionPool(
            conninfo,
            connection_class=psycopg.Connection[DictRow],
            kwargs={"row_factory": dict_row, "connect_timeout": max(1, int(connect_timeout))},
            min_size=min_size,
            max_size=max_size,
            open=True,
            configure=self._configure,
            check=ConnectionPool.check_connection,
            name=f"miroir-jobs-{self.schema}",
            timeout=max(30.0, connect_timeout),
        )

    def _configure(self, conn: Conn) -> None:
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        conn.execute(sql.SQL(self._q["set_search_path"]).format(schema=sql.Identifier(self.schema)))
        conn.execute("SET TIME ZONE 'UTC'")
        conn.commit()

    @contextmanager
    def _tx(self) -> Iterator[Conn]:
        """One transaction: committed when the block ends, rolled back on an exception."""
        with self._pool.connection() as conn:
            yield conn

    def _get(self, conn: Conn, job_id: str, *, lock: bool = False) -> Job | None:
        row = conn.execute(self._q["lock_job" if lock else "get_job"], {"id": job_id}).fetchone()
        return None if row is None else _job(row)

    # -- lifecycle -------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        files = migration_files("postgres")
        schema = sql.Identifier(self.schema)
        applied: list[str] = []
        with self._tx() as conn:
            conn.execute(self._q["migration_lock"], {"key": _migration_lock_key(self.schema)})
            conn.execute(sql.SQL(self._q["create_schema"]).format(schema=schema))
            conn.execute(sql.SQL(self._q["set_search_path"]).format(schema=schema))
            conn.execute(self._q["create_schema_migrations"])
            done = {r["name"] for r in conn.execute(self._q["applied_migrations"])}
            for name, script in files:
                if name in done:
                    continue
                try:
                    conn.execute(script.encode())
                except psycopg.Error as exc:
                    raise JobStoreError(
                        f"Postgres migration {name} failed in schema {self.schema} on "
                        f"{self._where}: {exc}"
                    ) from exc
                conn.execute(self._q["record_migration"], {"name": name})
                applied.append(name)
        return applied

    def close(self) -> None:
        self._pool.close()

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
            with self._tx() as conn:
                row = conn.execute(self._q["insert_job"], args).fetchone()
        except psycopg.errors.UniqueViolation:
            raise JobStoreError(f"job id {job_id!r} already exists; pick another id") from None
        assert row is not None
        return _job(row)

    def split(self, parent_id: str, chunks: Sequence[NewChunk]) -> list[Job]:
        check_chunks(parent_id, chunks)
        total = len(chunks)
        with self._tx() as conn:
            parent = self._get(conn, parent_id, lock=True)
            if parent is None:
                raise JobNotFound(f"cannot split job {parent_id}: it does not exist")
            if parent.kind != JobKind.PARENT:
                raise SplitRefused(f"cannot split job {parent_id}: it is a chunk, not a parent")
            if parent.state != JobState.QUEUED or parent.total_chunks is not None:
                raise SplitRefused(
                    f"cannot split job {parent_id} again: it is already split "
                    f"({parent.total_chunks} chunks, state {parent.state})"
                )
            rows: list[DictRow] = []
            if chunks:
                rows = conn.execute(
                    self._q["insert_chunks"],
                    {
                        "type": parent.type,
                        "max_attempts": parent.max_attempts,
                        "parent_id": parent_id,
                        "total": total,
                        "ids": [chunk_id(parent_id, c.chunk_index, total) for c in chunks],
                        "indexes": [c.chunk_index for c in chunks],
                        "params": [
                            dump_json(c.params, f"params of chunk {c.chunk_index}") for c in chunks
                        ],
                        "progresses": [
                            dump_json(c.progress, f"progress of chunk {c.chunk_index}")
                            for c in chunks
                        ],
                    },
                ).fetchall()
            conn.execute(
                self._q["mark_split"],
                {
                    "id": parent_id,
                    "state": str(JobState.COMPLETED if total == 0 else JobState.IN_PROGRESS),
                    "total": total,
                    "finished": total == 0,
                },
            )
        return sorted((_job(r) for r in rows), key=lambda j: j.chunk_index or 0)

    # -- workers ---------------------------------------------------------------------------
    def _fail_exhausted(self, conn: Conn) -> int:
        """Fail expired leases that were on their last attempt, and their parents."""
        found = conn.execute(self._q["expired_exhausted"]).fetchall()
        if not found:
            return 0
        parents = sorted({r["parent_job_id"] for r in found if r["parent_job_id"] is not None})
        if parents:
            conn.execute(self._q["lock_jobs"], {"ids": parents}).fetchall()
        failed = conn.execute(
            self._q["fail_expired_exhausted"], {"ids": [r["id"] for r in found]}
        ).fetchall()
        for row in failed:
            if row["parent_job_id"] is not None:
                conn.execute(
                    self._q["fail_unfinished"],
                    {
                        "id": row["parent_job_id"],
                        "error": f"chunk {row['id']} failed for good: {row['error']}",
                    },
                )
        return len(failed)

    @staticmethod
    def _lease(row: Mapping[str, Any], token: str, worker_id: str) -> Lease:
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
        with self._tx() as conn:
            self._fail_exhausted(conn)
            row = conn.execute(
                self._q["claim_next"],
                {"types": types, "worker_id": worker_id, "token": token, "ttl": check_ttl(ttl)},
            ).fetchone()
        return None if row is None else self._lease(row, token, worker_id)

    def claim_by_id(self, job_id: str, worker_id: str, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        token = new_token()
        with self._tx() as conn:
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

    def _fenced(self, conn: Conn, query: str, lease: Lease, **args: Any) -> DictRow:
        row = conn.execute(
            self._q[query], {"id": lease.job_id, "token": lease.token, **args}
        ).fetchone()
        if row is None:
            raise lease_lost(lease.job_id, lease.token, self._get(conn, lease.job_id))
        return row

    def renew(self, lease: Lease, ttl: float = DEFAULT_LEASE_TTL) -> Lease:
        with self._tx() as conn:
            row = self._fenced(conn, "renew_lease", lease, ttl=check_ttl(ttl))
        return self._lease(row, lease.token, lease.worker_id)

    def save_progress(self, lease: Lease, progress: Mapping[str, Any]) -> None:
        encoded = dump_json(progress, f"progress of job {lease.job_id}")
        with self._tx() as conn:
            self._fenced(conn, "save_progress", lease, progress=encoded)

    def complete(self, lease: Lease, progress: Mapping[str, Any] | None = None) -> Job:
        encoded = None if progress is None else dump_json(progress, f"progress of {lease.job_id}")
        parent_id = lease.job.parent_job_id
        with self._tx() as conn:
            if parent_id is not None:
                conn.execute(self._q["lock_job"], {"id": parent_id}).fetchall()
            job = _job(self._fenced(conn, "complete_chunk", lease, progress=encoded))
            if parent_id is not None:
                conn.execute(self._q["complete_parent_if_done"], {"id": parent_id}).fetchall()
        return job

    def fail(self, lease: Lease, error: str, *, retryable: bool = True) -> Job:
        attempts = lease.job.attempts  # fenced: the row's count is the lease's
        retry = retryable and attempts < lease.job.max_attempts
        backoff = retry_backoff(attempts, self.retry_backoff_base, self.retry_backoff_cap)
        parent_id = lease.job.parent_job_id
        with self._tx() as conn:
            if parent_id is not None:
                conn.execute(self._q["lock_job"], {"id": parent_id}).fetchall()
            job = _job(
                self._fenced(
                    conn, "fail_chunk", lease, retry=retry, error=str(error), backoff=backoff
                )
            )
            if job.state == JobState.FAILED and parent_id is not None:
                conn.execute(
                    self._q["fail_unfinished"],
                    {
                        "id": parent_id,
                        "error": f"chunk {job.id} failed for good after {job.attempts} "
                        f"attempt(s): {error}",
                    },
                ).fetchall()
        return job

    def release(self, lease: Lease) -> Job:
        with self._tx() as conn:
            return _job(self._fenced(conn, "release_chunk", lease))

    def requeue(self, job_id: str, *, reset_progress: bool = False) -> Job:
        with self._tx() as conn:
            job = self._get(conn, job_id)
            if job is None:
                raise JobNotFound(f"cannot re-queue job {job_id}: it does not exist")
            if job.parent_job_id is not None:  # lock order: parent first
                conn.execute(self._q["lock_job"], {"id": job.parent_job_id}).fetchall()
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
        with self._tx() as conn:
            failed = self._fail_exhausted(conn)
            requeued = conn.execute(self._q["requeue_expired"]).rowcount
        return failed + max(requeued, 0)

    # -- observers / operators -------------------------------------------------------------
    def queue_depth(self) -> dict[str, int]:
        with self._tx() as conn:
            rows = conn.execute(self._q["queue_depth"]).fetchall()
        return depth_for_all_types((r["type"], r["depth"]) for r in rows)

    def claimable(self, job_types: Sequence[str], limit: int = 100) -> list[Job]:
        with self._tx() as conn:
            rows = conn.execute(
                self._q["claimable_chunks"], {"types": [str(t) for t in job_types], "limit": int(limit)}
            ).fetchall()
        return [_job(r) for r in rows]

    def get(self, job_id: str) -> Job:
        with self._tx() as conn:
            job = self._get(conn, job_id)
        if job is None:
            raise JobNotFound(f"job {job_id} does not exist")
        return job

    def children(self, parent_id: str) -> list[Job]:
        with self._tx() as conn:
            rows = conn.execute(self._q["children"], {"id": parent_id}).fetchall()
        return [_job(r) for r in rows]

    def parent_summary(self, parent_id: str) -> ParentSummary:
        with self._tx() as conn:
            parent = self._get(conn, parent_id)
            if parent is None:
                raise JobNotFound(f"job {parent_id} does not exist")
            rows = conn.execute(self._q["children_states"], {"ids": [parent_id]}).fetchall()
        return summarize(parent, ((r["state"], load_json(r["progress"])) for r in rows))

    def list_parents(self, job_type: str | None = None, limit: int = 100) -> list[ParentSummary]:
        with self._tx() as conn:
            parents = [
                _job(r)
                for r in conn.execute(
                    self._q["list_parents"],
                    {"type": None if job_type is None else str(job_type), "limit": int(limit)},
                ).fetchall()
            ]
            rows = conn.execute(
                self._q["children_states"], {"ids": [p.id for p in parents]}
            ).fetchall()
        by_parent: dict[str, list[tuple[str, dict[str, Any]]]] = {p.id: [] for p in parents}
        for r in rows:
            by_parent[r["parent_job_id"]].append((r["state"], load_json(r["progress"])))
        return [summarize(p, by_parent[p.id]) for p in parents]

    def cancel(self, job_id: str, reason: str = "cancelled by operator") -> int:
        with self._tx() as conn:
            job = self._get(conn, job_id)
            if job is None:
                raise JobNotFound(f"cannot cancel job {job_id}: it does not exist")
            if job.parent_job_id is not None:  # lock order: parent first
                conn.execute(self._q["lock_job"], {"id": job.parent_job_id}).fetchall()
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
        with self._tx() as conn:
            ids = [r["id"] for r in conn.execute(self._q["prunable_parents"], age).fetchall()]
            deleted = 0
            if ids:
                deleted += conn.execute(self._q["delete_children"], {"ids": ids}).rowcount
                deleted += conn.execute(self._q["delete_jobs"], {"ids": ids}).rowcount
            deleted += conn.execute(self._q["delete_finished_orphans"], age).rowcount
        return deleted
