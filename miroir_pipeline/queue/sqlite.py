"""SQLite job store: the embedded default — one file, one host, many processes.

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from miroir_pipeline.queue.contract import (
    RETRY_BACKOFF_BASE,
    RETRY_BACKOFF_CAP,
    Job,
    JobStoreError,
    WorkSignal,
)
from miroir_pipeline.queue.dsn import ENV_DSN
from miroir_pipeline.queue.shutdown import Shutdown
from miroir_pipeline.queue.sql_store import EncodedChunk, Row, SqlJobStore
from miroir_pipeline.util.sqlite_wal import set_wal

__all__ = ["SqliteJobStore"]

#: Seconds between two reads of the work counter by an idle worker.
WORK_POLL_S = 0.05


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


class SqliteJobStore(SqlJobStore[sqlite3.Connection]):
    """The job store in one SQLite file (``sqlite:///path``)."""

    dsn_scheme = "sqlite"
    dialect = "sqlite"
    duplicate_key_errors = (sqlite3.IntegrityError,)

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
        super().__init__(retry_backoff_base=retry_backoff_base, retry_backoff_cap=retry_backoff_cap)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.RLock()  # a finished thread's connection may be dropped while held
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
        held: _ThreadConnection | None = getattr(self._local, "held", None)
        if held is not None and held.pid == os.getpid():
            return held.conn  # (after a fork the child opens its own connection)
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
        try:
            with self._lock_errors():
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
                set_wal(conn, self.busy_timeout)
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()  # not registered yet: nothing else would close it
            raise
        with self._lock:
            self._connections.append(conn)
        self._local.held = _ThreadConnection(conn, self._connections, self._lock)
        return conn

    @contextmanager
    def _lock_errors(self) -> Iterator[None]:
        """SQLite's "database is locked" (busy/locked past ``busy_timeout``) as a
        :class:`JobStoreError` saying where, why and what to do; other errors pass through."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            code = getattr(exc, "sqlite_errorcode", None)  # unset on an error raised by hand
            if code is None or code & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            raise JobStoreError(
                f"the SQLite jobs file {self.path} is locked ({exc}): another process held its "
                f"write lock for longer than the busy timeout ({self.busy_timeout:g} s). A SQLite "
                "jobs store is for one host and a few processes; for many concurrent workers "
                f"use Postgres (set {ENV_DSN}=postgresql://...), or raise busy_timeout "
                "(open_store(..., busy_timeout=SECONDS))"
            ) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One writer transaction, lock taken up front."""
        conn = self._conn()
        with self._lock_errors():
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.Error:
                if conn.in_transaction:  # e.g. busy on COMMIT: never leave the connection in it
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self, *, snapshot: bool = False) -> Iterator[sqlite3.Connection]:
        """Reads run on this thread's connection; a snapshot inside one read transaction."""
        conn = self._conn()
        with self._lock_errors():
            if not snapshot:
                yield conn
                return
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    # -- dialect hooks ---------------------------------------------------------------------
    def _ts(self, value: float | None) -> datetime | None:
        """Epoch seconds (SQLite's clock) as an aware UTC datetime."""
        return None if value is None else datetime.fromtimestamp(value, tz=UTC)

    def _list_param(self, values: Sequence[str]) -> str:
        """Lists travel as a JSON array, read back with ``json_each``."""
        return msgspec.json.encode(list(values)).decode()

    def _param_key(self, key: str) -> dict[str, str]:
        return {"path": "$." + key}  # an identifier (checked by param_values)

    def _insert_chunks(
        self, conn: sqlite3.Connection, parent: Job, chunks: Sequence[EncodedChunk]
    ) -> list[Job]:
        conn.executemany(
            self._q["insert_chunk"],
            [
                {
                    "id": c.id,
                    "type": parent.type,
                    "params": c.params,
                    "progress": c.progress,
                    "max_attempts": parent.max_attempts,
                    "parent_id": parent.id,
                    "chunk_index": c.chunk_index,
                    "total": len(chunks),
                }
                for c in chunks
            ],
        )
        return [self._job(r) for r in self._rows(conn, "children", {"id": parent.id})]

    def _fail_expired_exhausted(self, conn: sqlite3.Connection) -> list[Row]:
        # One UPDATE: no other writer runs inside BEGIN IMMEDIATE, so no lock order to keep.
        return self._rows(conn, "fail_expired_exhausted")

    def _begin_migrations(self, conn: sqlite3.Connection) -> None:
        """Nothing to do: ``BEGIN IMMEDIATE`` already serialises concurrent migrators."""

    def _apply_migration(self, conn: sqlite3.Connection, name: str, script: str) -> None:
        try:
            for statement in split_script(script):
                conn.execute(statement)
        except (sqlite3.Error, ValueError) as exc:
            raise JobStoreError(f"SQLite migration {name} failed on {self.path}: {exc}") from exc

    def work_signal(self) -> WorkSignal:
        return _SqliteWorkSignal(self)

    def _work_seq(self) -> int:
        with self._read() as conn:
            row = self._run(conn, "work_signal").fetchone()
        return int(row[0]) if row is not None else 0

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._connections:
                conn.close()
            self._connections.clear()


class _ThreadConnection:
    """One thread's connection, closed when the thread ends (its thread-local data goes with
    it): a worker starts a heartbeat thread per chunk, and each would otherwise keep a
    connection (two file descriptors) until the store is closed."""

    def __init__(
        self, conn: sqlite3.Connection, registry: list[sqlite3.Connection], lock: threading.RLock
    ) -> None:
        self.conn = conn
        self.pid = os.getpid()
        self._registry = registry
        self._lock = lock

    def __del__(self, _getpid: Callable[[], int] = os.getpid) -> None:
        # (bound at definition: at interpreter exit the module's globals may be gone already)
        if _getpid() != self.pid:
            return  # a forked child never touches its parent's connection
        with self._lock:
            if self.conn in self._registry:
                self._registry.remove(self.conn)
        self.conn.close()


class _SqliteWorkSignal(WorkSignal):
    """Polls the counter the triggers of migration 0003 bump: a one-row read every
    :data:`WORK_POLL_S`, woken when it moved since the last wake-up (or since creation)."""

    def __init__(self, store: SqliteJobStore) -> None:
        self._store = store
        self._seen = store._work_seq()

    def wait(self, timeout: float, shutdown: Shutdown | None = None) -> bool:
        pause = shutdown if shutdown is not None else Shutdown()
        deadline = time.monotonic() + timeout
        while True:
            try:
                seq = self._store._work_seq()
            except (sqlite3.Error, JobStoreError):
                # The file is locked out or gone: sleep the interval, then let the claim
                # report what is wrong.
                pause.wait(max(0.0, deadline - time.monotonic()))
                return not pause.requested
            if seq != self._seen:
                self._seen = seq
                return True
            left = deadline - time.monotonic()
            if left <= 0 or pause.wait(min(WORK_POLL_S, left)):
                return False
