"""Postgres job store: production backend — psycopg 3 with a connection pool.

The table lives in its own schema (default ``miroir``; Dagster's storage has its own
``jobs`` table). Every connection runs READ COMMITTED in UTC with ``search_path`` set to that
schema; time comes from the database clock (``now()``). Connections are autocommit, so the
single statements of the claim path are one round trip each. Before lending a connection the
pool looks at its socket and checks it only if the server spoke (see ``_check_connection``),
so the store carries on after a database restart.

Lock order, which keeps concurrent writers deadlock-free: a parent row before its chunks,
several parents in id order; the claim locks one chunk only and never waits (SKIP LOCKED).
"""

from __future__ import annotations

import hashlib
import select
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime

import msgspec
import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import set_json_loads
from psycopg_pool import ConnectionPool

from miroir_pipeline.queue.contract import (
    RETRY_BACKOFF_BASE,
    RETRY_BACKOFF_CAP,
    Job,
    JobStoreError,
    WorkSignal,
)
from miroir_pipeline.queue.dsn import (
    check_url_credentials,
    redact_dsn,
    scrub_password,
    validate_schema,
)
from miroir_pipeline.queue.shutdown import Shutdown
from miroir_pipeline.queue.sql_store import EncodedChunk, Row, SqlJobStore

__all__ = ["DEFAULT_SCHEMA", "PostgresJobStore"]

DEFAULT_SCHEMA = "miroir"
Conn = psycopg.Connection[DictRow]
#: Longest a waiting worker goes without looking at its shutdown request.
WORK_WAIT_SLICE_S = 0.25


def _check_connection(conn: Conn) -> None:
    """Before a pooled connection is lent: a round trip only if the server said something.

    An idle connection has nothing to read. A server that shut down or restarted sent a
    FATAL message or closed the socket, so the socket polls readable, and only then is the
    full check run (it fails, and the pool replaces the connection). A healthy connection
    costs no round trip, which on the claim path is half the statements."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
    if poller.poll(0):
        ConnectionPool.check_connection(conn)


def _migration_lock_key(schema: str) -> int:
    """A stable signed 64-bit advisory-lock key per schema."""
    digest = hashlib.blake2b(f"miroir-pipeline:migrate:{schema}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


class PostgresJobStore(SqlJobStore[Conn]):
    """The job store in ``<schema>.jobs`` on Postgres (``postgresql://…``)."""

    dsn_scheme = "postgresql"
    dialect = "postgres"
    row_locks = True  # a parent row before its chunks, parents in id order
    duplicate_key_errors = (psycopg.errors.UniqueViolation,)

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
        check_url_credentials(conninfo)
        super().__init__(retry_backoff_base=retry_backoff_base, retry_backoff_cap=retry_backoff_cap)
        self._where = redact_dsn(conninfo)
        self._conninfo = conninfo
        self._connect_timeout = max(1, int(connect_timeout))
        self._signals: list[_PostgresWorkSignal] = []
        self._signals_lock = threading.Lock()
        # Connect once up front: a wrong host or password fails here with libpq's reason
        # instead of as a pool timeout later (scrubbed: libpq quotes a token it cannot parse).
        try:
            psycopg.connect(conninfo, connect_timeout=max(1, int(connect_timeout))).close()
        except psycopg.Error as exc:
            raise JobStoreError(
                f"cannot connect to the jobs database {self._where}: {scrub_password(str(exc), conninfo)}".rstrip()
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
            check=_check_connection,
            name=f"miroir-jobs-{self.schema}",
            timeout=max(30.0, connect_timeout),
        )

    def _configure(self, conn: Conn) -> None:
        """Pooled connections are autocommit: a lone statement is one round trip, and a
        transaction is an explicit block (``_write``)."""
        conn.autocommit = True
        set_json_loads(msgspec.json.decode, conn)  # jsonb columns: the stdlib decoder is slower
        conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
        conn.execute(sql.SQL(self._q["set_search_path"]).format(schema=sql.Identifier(self.schema)))
        conn.execute("SET TIME ZONE 'UTC'")

    @contextmanager
    def _write(self) -> Iterator[Conn]:
        """One transaction: committed when the block ends, rolled back on an exception."""
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    @contextmanager
    def _statement(self) -> Iterator[Conn]:
        """A pooled autocommit connection: each statement commits on its own."""
        with self._pool.connection() as conn:
            yield conn

    def _read(self, *, snapshot: bool = False) -> AbstractContextManager[Conn]:
        """A lone read needs no transaction; several that must agree share one snapshot."""
        return self._snapshot() if snapshot else self._statement()

    @contextmanager
    def _snapshot(self) -> Iterator[Conn]:
        """A read-only transaction on one snapshot (READ COMMITTED takes one per statement)."""
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(self._q["begin_snapshot"])
            yield conn

    # -- dialect hooks ---------------------------------------------------------------------
    def _ts(self, value: datetime | None) -> datetime | None:
        """timestamptz as UTC (the session is UTC already; this pins the tzinfo)."""
        return None if value is None else value.astimezone(UTC)

    def _list_param(self, values: Sequence[str]) -> list[str]:
        """Lists travel as Postgres arrays (``= ANY(%(ids)s)``, ``%(types)s::text[]``)."""
        return list(values)

    def _param_key(self, key: str) -> dict[str, str]:
        return {"key": key}  # params ->> key

    def _insert_chunks(self, conn: Conn, parent: Job, chunks: Sequence[EncodedChunk]) -> list[Job]:
        """All children in one statement (unnest of parallel arrays): one round trip."""
        rows = self._rows(
            conn,
            "insert_chunks",
            {
                "type": parent.type,
                "max_attempts": parent.max_attempts,
                "parent_id": parent.id,
                "total": len(chunks),
                "ids": [c.id for c in chunks],
                "indexes": [c.chunk_index for c in chunks],
                "params": [c.params for c in chunks],
                "progresses": [c.progress for c in chunks],
            },
        )
        return sorted((self._job(r) for r in rows), key=lambda j: j.chunk_index or 0)

    def _fail_expired_exhausted(self, conn: Conn) -> list[Row]:
        """Found without locks first, so their parents are locked before them (in id order);
        then failed with the conditions re-checked under the row lock."""
        found = self._rows(conn, "expired_exhausted")
        if not found:
            return []
        parents = sorted({r["parent_job_id"] for r in found if r["parent_job_id"] is not None})
        if parents:
            self._rows(conn, "lock_jobs", {"ids": parents})
        return self._rows(conn, "fail_expired_exhausted", {"ids": [r["id"] for r in found]})

    def _begin_migrations(self, conn: Conn) -> None:
        """Serialise migrators (advisory lock per schema), then create and enter the schema."""
        schema = sql.Identifier(self.schema)
        self._run(conn, "migration_lock", {"key": _migration_lock_key(self.schema)})
        conn.execute(sql.SQL(self._q["create_schema"]).format(schema=schema))
        conn.execute(sql.SQL(self._q["set_search_path"]).format(schema=schema))

    def _apply_migration(self, conn: Conn, name: str, script: str) -> None:
        try:
            conn.execute(script.encode())
        except psycopg.Error as exc:
            raise JobStoreError(
                f"Postgres migration {name} failed in schema {self.schema} on {self._where}: {exc}"
            ) from exc

    def work_signal(self) -> WorkSignal:
        signal = _PostgresWorkSignal(self)
        with self._signals_lock:
            self._signals.append(signal)
        return signal

    def _forget(self, signal: _PostgresWorkSignal) -> None:
        """A closed signal leaves the list ``close()`` walks, so a long-lived store does not keep
        one per worker run."""
        with self._signals_lock:
            if signal in self._signals:
                self._signals.remove(signal)

    def _listen(self) -> psycopg.Connection[tuple[object, ...]]:
        """A connection of its own, outside the pool, listening on the work channel: it
        stays idle in LISTEN, and a pooled one would be lent to other statements meanwhile."""
        conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=self._connect_timeout)
        try:
            conn.execute(self._q["listen_work"])
        except BaseException:
            conn.close()
            raise
        return conn

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        with self._signals_lock:
            signals, self._signals = self._signals, []
        for signal in signals:
            signal.close()
        self._pool.close()


class _PostgresWorkSignal(WorkSignal):
    """LISTENs on the work channel (migration 0003's trigger notifies it) on a connection of
    its own; notifications of other schemas sharing the database are ignored."""

    def __init__(self, store: PostgresJobStore) -> None:
        self._store = store
        self._conn: psycopg.Connection[tuple[object, ...]] | None = store._listen()

    def wait(self, timeout: float, shutdown: Shutdown | None = None) -> bool:
        pause = shutdown if shutdown is not None else Shutdown()
        if self._conn is None or self._conn.closed:
            # Lost with the database (restart, failover): listen again. What was notified in
            # between is gone, so wake once and let the worker claim.
            try:
                self._conn = self._store._listen()
            except psycopg.Error:
                self._conn = None
                pause.wait(timeout)
            return not pause.requested
        deadline = time.monotonic() + timeout
        while not pause.requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                got = [
                    n.payload
                    for n in self._conn.notifies(timeout=min(WORK_WAIT_SLICE_S, left), stop_after=1)
                ]
                if got:  # take whatever else already arrived, so it does not wake us again
                    got += [n.payload for n in self._conn.notifies(timeout=0)]
            except psycopg.Error:
                self.close()
                return not pause.requested  # wake: the claim reports the database's state
            if self._store.schema in got:
                return True
        return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._store._forget(self)
