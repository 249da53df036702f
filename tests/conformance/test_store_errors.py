"""What a job store says when it refuses: the store's own errors, naming what was wrong,
where, and what to do — never a raw driver error, never a ``None`` in the text."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from miroir_pipeline.queue import (
    JobState,
    JobStore,
    JobStoreError,
    NewChunk,
    SplitRefused,
    open_store,
)
from miroir_pipeline.queue.sqlite import SqliteJobStore

DUMP = "dump_import"
#: Short enough to wait out in a test; what the lock errors must report.
BUSY_TIMEOUT = 0.2


@contextmanager
def write_lock(path: Path, begin: str = "BEGIN IMMEDIATE") -> Iterator[sqlite3.Connection]:
    """Hold the jobs file's write lock from another, plain ``sqlite3`` connection."""
    holder = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        holder.execute(begin)
        yield holder
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()


def assert_lock_message(exc: JobStoreError, path: Path) -> None:
    message = str(exc)
    assert str(path) in message, message
    assert "another process held" in message and "busy timeout (0.2 s)" in message, message
    assert "MIROIR_JOBS_DSN" in message and "busy_timeout" in message, message


def test_write_to_a_locked_sqlite_store_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    store = open_store(f"sqlite:///{path}", busy_timeout=BUSY_TIMEOUT)
    try:
        with write_lock(path), pytest.raises(JobStoreError) as info:
            store.enqueue(DUMP, {"uri": "x"})
        assert_lock_message(info.value, path)
        # The failed write left no transaction open: the store works once the lock is gone.
        job = store.enqueue(DUMP, {"uri": "x"})
        assert store.get(job.id).state == JobState.QUEUED
    finally:
        store.close()


def test_opening_a_locked_sqlite_store_is_a_store_error(tmp_path: Path) -> None:
    """Opening migrates (a write): a worker starting while the file is locked is told why."""
    path = tmp_path / "jobs.sqlite3"
    open_store(f"sqlite:///{path}").close()
    with write_lock(path), pytest.raises(JobStoreError) as info:
        open_store(f"sqlite:///{path}", busy_timeout=BUSY_TIMEOUT)
    assert_lock_message(info.value, path)


def test_opening_a_new_sqlite_file_locked_exclusively_is_a_store_error(tmp_path: Path) -> None:
    """Before WAL is on, an exclusive lock keeps even the journal-mode switch out."""
    path = tmp_path / "jobs.sqlite3"
    with write_lock(path, "BEGIN EXCLUSIVE"), pytest.raises(JobStoreError) as info:
        open_store(f"sqlite:///{path}", busy_timeout=BUSY_TIMEOUT)
    assert_lock_message(info.value, path)


def test_other_sqlite_errors_are_left_alone(tmp_path: Path) -> None:
    """Only the locked/busy family is translated."""
    path = tmp_path / "jobs.sqlite3"
    store = open_store(f"sqlite:///{path}", busy_timeout=BUSY_TIMEOUT)
    assert isinstance(store, SqliteJobStore)
    try:
        with (
            pytest.raises(sqlite3.OperationalError, match="no such table"),
            store._write() as conn,
        ):
            conn.execute("SELECT * FROM no_such_table")
        assert store.enqueue(DUMP, {}).state == JobState.QUEUED  # rolled back, still usable
    finally:
        store.close()


def test_split_of_a_cancelled_parent_says_so(store: JobStore) -> None:
    parent = store.enqueue(DUMP, {"uri": "x"})
    assert store.cancel(parent.id, "operator: wrong dump") == 1
    with pytest.raises(SplitRefused) as info:
        store.split(parent.id, [NewChunk(0, {})])
    message = str(info.value)
    assert "None" not in message, message
    assert parent.id in message and "cancelled or failed" in message, message
    assert "operator: wrong dump" in message and "cannot be split" in message, message
    assert store.children(parent.id) == []
    got = store.get(parent.id)
    assert got.state == JobState.FAILED and got.total_chunks is None


def test_resplit_still_reports_the_chunk_count(store: JobStore) -> None:
    parent = store.enqueue(DUMP, {})
    store.split(parent.id, [NewChunk(i, {}) for i in range(2)])
    with pytest.raises(SplitRefused, match=r"already split \(2 chunks, state in_progress\)"):
        store.split(parent.id, [NewChunk(0, {})])
