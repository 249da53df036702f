"""One SQLite detail both SQLite users (the job store, the local node store) need."""

from __future__ import annotations

import sqlite3
import time

__all__ = ["set_wal"]


def set_wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """Switch ``conn``'s database to WAL.

    On a fresh file another process doing the same can make this report "locked" without
    calling the busy handler, so retry within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
