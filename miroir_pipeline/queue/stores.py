"""Open a job store from a DSN: SQLite (the embedded default) or Postgres (production).

With no DSN, ``$MIROIR_JOBS_DSN`` is used, then :func:`default_dsn` (a SQLite file under
``./.miroir/``).
"""

from __future__ import annotations

import os
from typing import Any

from miroir_pipeline.queue.contract import JobStore
from miroir_pipeline.queue.dsn import (
    ENV_DSN,
    default_dsn,
    redact_dsn,
    split_schema,
    sqlite_path_from_dsn,
)

__all__ = ["open_store"]


def open_store(dsn: str | None = None, *, migrate: bool = True, **kw: Any) -> JobStore:
    """Open the job store named by ``dsn`` (or ``$MIROIR_JOBS_DSN``, or the default).

    ``migrate`` applies pending migrations first (safe when several processes start at
    once). Extra keywords go to the backend: ``retry_backoff_base`` for both,
    ``busy_timeout`` for SQLite, ``schema``, ``min_size``/``max_size`` for Postgres.
    """
    if dsn is None:
        dsn = os.environ.get(ENV_DSN) or default_dsn()
    store: JobStore
    if dsn.startswith("sqlite:"):
        from miroir_pipeline.queue.sqlite import SqliteJobStore  # the driver only when used

        store = SqliteJobStore(sqlite_path_from_dsn(dsn), **kw)
    elif dsn.startswith(("postgresql://", "postgres://")):
        from miroir_pipeline.queue.postgres import PostgresJobStore

        conninfo, schema = split_schema(dsn)
        if kw.get("schema") is None and schema is not None:
            kw["schema"] = schema
        store = PostgresJobStore(conninfo, **kw)
    else:
        raise ValueError(
            f"unsupported jobs DSN {redact_dsn(dsn)!r}: use sqlite:///relative/path, "
            "sqlite:////absolute/path or postgresql://user@host:port/dbname "
            f"(set it with --jobs-dsn or ${ENV_DSN})"
        )
    if migrate:
        try:
            store.migrate()
        except BaseException:
            store.close()
            raise
    return store
