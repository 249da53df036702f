"""Local node store: a node of the fleet kept in one SQLite file (``local://PATH``).

The embedded default target. Documents of every index are keyed by primary key, so a re-sent
document replaces the old one as in Meilisearch, and are readable by shard for backfill and
verification. Several processes may write to the same store at once: every write is one
``BEGIN IMMEDIATE`` transaction (SQLite serialises writers, ``busy_timeout`` makes them wait),
and WAL mode lets readers run alongside. A write is committed, and on disk, when
``write_documents`` returns (``synchronous=FULL``: with NORMAL, a power loss could roll back
writes whose chunk cursor the jobs store had already saved, and they would never be re-sent;
the fsync per batch did not show in ``import_end_to_end.py``).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import sqlite3
import threading
import time
from bisect import bisect_right
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import accumulate, compress, pairwise
from pathlib import Path
from typing import Any

import msgspec
import orjson

from miroir_pipeline.fleet.document_rules import block_may_break_rules, document_problem
from miroir_pipeline.fleet.routing import SHARD_FIELD
from miroir_pipeline.fleet.targets._settings import merge_settings
from miroir_pipeline.fleet.targets._sql import load_statements
from miroir_pipeline.fleet.targets.base import (
    DocumentsRefused,
    IndexNotFound,
    NodeTarget,
    RefusedDocument,
    TargetError,
)
from miroir_pipeline.util.sqlite_wal import set_wal

__all__ = ["STORE_FILENAME", "LocalNodeStore"]

#: File name of a node's store inside its ``local://PATH`` directory.
STORE_FILENAME = "store.sqlite3"
#: Writers of one node take turns on this file (flock) before SQLite's own lock.
LOCK_FILENAME = "store.sqlite3.writer-lock"

_SQL = load_statements("local_store.sql")
#: Rows are (index id, primary key, shard, document); they are written in key order.
_SCHEMA = ("create_indexes_table", "create_documents_table", "create_documents_shard_index")
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


@functools.cache
def _key_decoder(primary_key: str) -> msgspec.json.Decoder[Any]:
    """A decoder that reads only the primary key and ``_miroir_shard`` of a document line.

    Everything else in the line is skipped by msgspec without building Python objects, which
    keeps the import hot path cheap. One decoder per primary-key field name, built once.
    """
    struct = msgspec.defstruct(
        "DocumentKey",
        [
            ("pk", str | int, msgspec.field(name=primary_key)),
            ("shard", int, msgspec.field(name=SHARD_FIELD)),
        ],
    )
    return msgspec.json.Decoder(struct)


#: Documents per upsert statement, in bytes: big enough that the GIL is taken a handful of
#: times per batch, small enough that joining a piece adds little memory.
_PIECE_BYTES = 4 << 20


class LocalNodeStore(NodeTarget):
    """One node's documents in ``PATH/store.sqlite3``.

    Safe to share between threads (one connection behind a lock) and between processes (each
    opens its own connection; a forked child reopens instead of reusing its parent's).
    """

    def __init__(
        self,
        node_id: str,
        path: str | os.PathLike[str],
        *,
        busy_timeout_s: float = 60.0,
        synchronous: str = "FULL",
        # Per node and process: a worker writes to every node, so this multiplies by the node
        # count. 8 MiB keeps a worker's memory flat whatever the chunk size (peak_rss.py).
        cache_size_kib: int = 8 * 1024,
        page_size: int = 65536,
        wal_autocheckpoint_pages: int = 2000,
    ) -> None:
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {_SYNCHRONOUS}, not {synchronous!r}")
        self.node_id = node_id
        self.path = Path(path)
        self.db_file = self.path / STORE_FILENAME
        self._busy_timeout_s = busy_timeout_s
        self._synchronous = synchronous.upper()
        self._cache_size_kib = cache_size_kib
        self._page_size = page_size
        self._wal_autocheckpoint_pages = wal_autocheckpoint_pages
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pid = os.getpid()
        self._lock_fd: int | None = None
        self._lock_pid = os.getpid()

    def __repr__(self) -> str:
        return f"LocalNodeStore(node_id={self.node_id!r}, path={str(self.path)!r})"

    # -- connection ---------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """The open connection (caller holds the lock); opens and migrates on first use."""
        if self._pid != os.getpid():
            # A connection must not cross fork(): abandon the parent's without closing it.
            self._conn, self._pid = None, os.getpid()
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.db_file,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise TargetError(
                f"node {self.node_id}: cannot open local node store {self.db_file}: {exc}",
                node_id=self.node_id,
            ) from exc
        try:
            # page_size only takes effect on a new file, before WAL is switched on.
            conn.execute(f"PRAGMA page_size = {int(self._page_size)}")
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            set_wal(conn, self._busy_timeout_s)
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute(f"PRAGMA cache_size = -{int(self._cache_size_kib)}")
            conn.execute(f"PRAGMA wal_autocheckpoint = {int(self._wal_autocheckpoint_pages)}")
            conn.execute("BEGIN IMMEDIATE")
            for name in _SCHEMA:
                conn.execute(_SQL[name])
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            raise TargetError(
                f"node {self.node_id}: cannot initialise local node store {self.db_file}: {exc}",
                node_id=self.node_id,
                retryable=isinstance(exc, sqlite3.OperationalError),
            ) from exc
        return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
            if self._lock_fd is not None and self._lock_pid == os.getpid():
                os.close(self._lock_fd)
            self._lock_fd = None

    def _error(self, what: str, index_uid: str | None, exc: sqlite3.Error) -> TargetError:
        where = f" index {index_uid}" if index_uid else ""
        # "database is locked" after busy_timeout, I/O hiccups: worth another attempt.
        return TargetError(
            f"node {self.node_id}:{where}: {what} failed in local node store {self.db_file}: {exc}",
            node_id=self.node_id,
            retryable=isinstance(exc, sqlite3.OperationalError),
        )

    @contextmanager
    def _write(self, what: str, index_uid: str | None) -> Iterator[sqlite3.Connection]:
        """One writer transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error),
        taken in turn with other processes' writers (see :meth:`_writer_turn`)."""
        with self._lock, self._writer_turn(what, index_uid):
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise self._error(what, index_uid, exc) from exc

    @contextmanager
    def _writer_turn(self, what: str, index_uid: str | None) -> Iterator[None]:
        """Wait for this node's write lock file (``flock``, released by the kernel if its holder
        dies) before ``BEGIN IMMEDIATE``. SQLite's own busy handler sleeps up to 100 ms between
        tries, so two workers writing one node lost much of their time asleep; this waits in
        1-5 ms steps, within the same ``busy_timeout_s``. Caller holds ``self._lock``."""
        if self._lock_fd is None or self._lock_pid != os.getpid():
            lock_file = self.path / LOCK_FILENAME
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                self._lock_fd, self._lock_pid = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644), os.getpid()
            except OSError as exc:
                raise TargetError(
                    f"node {self.node_id}: cannot open the writer lock file {lock_file} of local node store "
                    f"{self.db_file}: {exc.strerror}; the worker needs write access to that directory",
                    node_id=self.node_id,
                ) from None
        deadline = time.monotonic() + self._busy_timeout_s
        delay = 0.001
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    where = f" index {index_uid}:" if index_uid else ""
                    raise TargetError(
                        f"node {self.node_id}:{where} {what} waited {self._busy_timeout_s:.0f} s for another "
                        f"writer of local node store {self.db_file}; is a stopped process holding it?",
                        node_id=self.node_id,
                        retryable=True,
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.005)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextmanager
    def _read(self, what: str, index_uid: str | None) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise self._error(what, index_uid, exc) from exc

    def _index_row(self, conn: sqlite3.Connection, index_uid: str) -> tuple[int, str, str] | None:
        row = conn.execute(_SQL["get_index"], (index_uid,)).fetchone()
        return None if row is None else (int(row[0]), str(row[1]), str(row[2]))

    def _index_id(self, conn: sqlite3.Connection, index_uid: str) -> int:
        row = self._index_row(conn, index_uid)
        if row is None:
            raise IndexNotFound(
                f"node {self.node_id}: index {index_uid} does not exist in local node store {self.db_file}",
                node_id=self.node_id,
            )
        return row[0]

    def _create_or_check(
        self,
        conn: sqlite3.Connection,
        index_uid: str,
        primary_key: str,
        settings: Mapping[str, Any] | None,
        *,
        update_settings: bool,
    ) -> int:
        """Id of the index, creating it with ``primary_key`` if missing (caller is in a write
        transaction); refuses an index that already has another primary key."""
        row = self._index_row(conn, index_uid)
        if row is None:
            conn.execute(
                _SQL["insert_index"],
                (index_uid, primary_key, json.dumps(merge_settings({}, settings))),
            )
            row = self._index_row(conn, index_uid)
            assert row is not None
            return row[0]
        idx, existing_pk, stored = row
        if existing_pk != primary_key:
            raise TargetError(
                f"node {self.node_id}: index {index_uid} already has primary key {existing_pk!r}, "
                f"not {primary_key!r}; import with --primary-key {existing_pk} or into a new index uid",
                node_id=self.node_id,
            )
        if update_settings:
            merged = merge_settings(json.loads(stored), settings)
            conn.execute(_SQL["update_index_settings"], (json.dumps(merged), idx))
        return idx

    # -- NodeTarget ---------------------------------------------------------------------------

    def ensure_index(
        self,
        index_uid: str,
        primary_key: str,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        with self._write("ensure_index", index_uid) as conn:
            self._create_or_check(conn, index_uid, primary_key, settings, update_settings=True)

    def write_documents(self, index_uid: str, primary_key: str, ndjson: bytes, count: int) -> None:
        """Upsert NDJSON lines by primary key in one transaction (index created if missing)."""
        lines = ndjson.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        if len(lines) != count:
            raise TargetError(
                f"node {self.node_id}: index {index_uid}: batch holds {len(lines)} NDJSON lines "
                f"but {count} documents were announced; refusing a batch that does not add up",
                node_id=self.node_id,
            )
        decode = _key_decoder(primary_key).decode
        keys: list[str] = []
        shards: list[int] = []
        for number, line in enumerate(lines, 1):
            try:
                key = decode(line)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise TargetError(
                    f"node {self.node_id}: index {index_uid}: document {number} of the batch has no "
                    f"valid {primary_key!r} or {SHARD_FIELD!r}: {exc}",
                    node_id=self.node_id,
                ) from exc
            problem = document_problem(line, primary_key)
            if problem is not None:
                raise TargetError(
                    f"node {self.node_id}: index {index_uid}: document {number} of the batch: {problem}",
                    node_id=self.node_id,
                )
            keys.append(str(key.pk))
            shards.append(key.shard)
        self._upsert(index_uid, primary_key, keys, shards, lines)

    def write_routed(
        self,
        index_uid: str,
        primary_key: str,
        lines: Sequence[bytes],
        keys: Sequence[str | int],
        shards: Sequence[int],
        *,
        checked: bool = False,
    ) -> None:
        """Upsert lines whose primary keys and shards the router already parsed (no re-decode);
        the store's own document rules are skipped for a ``checked`` batch (the router applied
        the same rules to every line), which saves a pass under the GIL per batch and node."""
        if not len(lines) == len(keys) == len(shards):
            raise TargetError(
                f"node {self.node_id}: index {index_uid}: {len(lines)} lines but {len(keys)} keys "
                f"and {len(shards)} shards; refusing a batch that does not add up",
                node_id=self.node_id,
            )
        texts: Sequence[str] = list(map(str, keys))  # str() of a str is that very object
        refused = [] if checked else self._refuse_as_meilisearch_would(lines, primary_key)
        if refused:
            bad = {r.position for r in refused}
            keep = [i not in bad for i in range(len(lines))]
            texts = list(compress(texts, keep))
            shards = list(compress(shards, keep))
            lines = list(compress(lines, keep))
        self._upsert(index_uid, primary_key, texts, shards, lines)
        if refused:
            raise DocumentsRefused(self.node_id, index_uid, refused)

    def _refuse_as_meilisearch_would(self, lines: Sequence[bytes], primary_key: str) -> list[RefusedDocument]:
        """The documents a Meilisearch node would refuse, so the embedded default never accepts
        what production would not (cheap pre-filters first: almost no line is decoded)."""
        quoted = json.dumps(primary_key).encode()
        if not block_may_break_rules(b"\n".join(lines), lines, quoted):
            return []
        refused = []
        for i, line in enumerate(lines):
            problem = document_problem(line, primary_key, quoted)
            if problem is not None:
                refused.append(RefusedDocument(i, problem, "invalid_document"))
        return refused

    def _upsert(
        self,
        index_uid: str,
        primary_key: str,
        keys: Sequence[str],
        shards: Sequence[int],
        docs: Sequence[bytes],
    ) -> None:
        """Upsert documents given as parallel sequences, in key order (b-tree pages are touched
        in order) and in pieces of about :data:`_PIECE_BYTES`, each one statement (see
        ``upsert_documents`` in the SQL file). Arguments are built by C-level calls, with no
        per-document Python; a piece bounds the extra memory a write holds."""
        if not len(keys) == len(shards) == len(docs):
            raise ValueError(f"{len(docs)} documents, {len(keys)} keys and {len(shards)} shards")
        order = sorted(range(len(keys)), key=keys.__getitem__)  # stable: a repeated key's last version last
        docs = list(map(docs.__getitem__, order))
        keys = list(map(keys.__getitem__, order))
        shards = list(map(shards.__getitem__, order))
        lengths = list(map(len, docs))
        ends = list(accumulate(lengths))
        cuts = [0]
        while cuts[-1] < len(docs):  # one step per piece, not per document
            done = ends[cuts[-1] - 1] if cuts[-1] else 0
            cuts.append(max(bisect_right(ends, done + _PIECE_BYTES), cuts[-1] + 1))
        with self._write("write_documents", index_uid) as conn:
            idx = self._create_or_check(conn, index_uid, primary_key, None, update_settings=False)
            for lo, hi in pairwise(cuts):
                piece = lengths[lo:hi]
                # accumulate yields one offset more than there are documents: zip stops at the lengths.
                offsets = accumulate(piece, initial=0)
                meta = orjson.dumps(list(zip(keys[lo:hi], shards[lo:hi], offsets, piece, strict=False)))
                conn.execute(_SQL["upsert_documents"], (idx, meta, b"".join(docs[lo:hi])))

    def index_exists(self, index_uid: str) -> bool:
        with self._read("index_exists", index_uid) as conn:
            return self._index_row(conn, index_uid) is not None

    def get_primary_key(self, index_uid: str) -> str | None:
        with self._read("get_primary_key", index_uid) as conn:
            row = self._index_row(conn, index_uid)
        if row is None:
            raise IndexNotFound(
                f"node {self.node_id}: index {index_uid} does not exist in local node store {self.db_file}",
                node_id=self.node_id,
            )
        return row[1]

    def get_settings(self, index_uid: str) -> dict[str, Any]:
        with self._read("get_settings", index_uid) as conn:
            row = self._index_row(conn, index_uid)
        if row is None:
            raise IndexNotFound(
                f"node {self.node_id}: index {index_uid} does not exist in local node store {self.db_file}",
                node_id=self.node_id,
            )
        settings: dict[str, Any] = json.loads(row[2])
        return settings

    def fetch_shard(self, index_uid: str, shard: int, offset: int, limit: int) -> list[bytes]:
        with self._read("fetch_shard", index_uid) as conn:
            idx = self._index_id(conn, index_uid)
            cur = conn.execute(_SQL["fetch_shard"], (idx, shard, limit, offset))
            return [bytes(r[0]) for r in cur.fetchall()]

    def iter_documents(self, index_uid: str, page_size: int = 1000) -> Iterator[bytes]:
        after = ""
        while True:
            with self._read("iter_documents", index_uid) as conn:
                idx = self._index_id(conn, index_uid)
                page = conn.execute(
                    _SQL["iter_documents_after"], (idx, after, page_size)
                ).fetchall()
            for _pk, doc in page:
                yield bytes(doc)
            if len(page) < page_size:
                return
            after = page[-1][0]

    def count_documents(self, index_uid: str) -> int:
        with self._read("count_documents", index_uid) as conn:
            idx = self._index_id(conn, index_uid)
            return int(conn.execute(_SQL["count_documents"], (idx,)).fetchone()[0])

    def count_by_shard(self, index_uid: str) -> dict[int, int]:
        with self._read("count_by_shard", index_uid) as conn:
            idx = self._index_id(conn, index_uid)
            return {int(s): int(n) for s, n in conn.execute(_SQL["count_by_shard"], (idx,))}

    def delete_documents(self, index_uid: str, primary_keys: list[str]) -> None:
        with self._write("delete_documents", index_uid) as conn:
            idx = self._index_id(conn, index_uid)
            conn.executemany(_SQL["delete_document"], [(idx, str(pk)) for pk in primary_keys])

    def delete_index(self, index_uid: str) -> None:
        """Drop an index and its documents; a missing index is not an error."""
        with self._write("delete_index", index_uid) as conn:
            row = self._index_row(conn, index_uid)
            if row is not None:
                conn.execute(_SQL["delete_index_documents"], (row[0],))
                conn.execute(_SQL["delete_index"], (row[0],))
