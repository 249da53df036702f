"""The ``store`` fixture: every conformance test runs unchanged on SQLite and on Postgres."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from miroir_pipeline.queue import JobStore, open_store

#: Retry backoff base for tests (seconds): short enough to wait out, long enough to observe.
TEST_BACKOFF_BASE = 0.05


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def jobs_dsn(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A DSN to a fresh, empty job store of each backend."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("jobs") / "jobs.sqlite3"
        return f"sqlite:///{path}"  # path is absolute: sqlite:////tmp/...
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


@pytest.fixture
def open_jobs(jobs_dsn: str) -> Iterator[Callable[..., JobStore]]:
    """Open more stores on the same database (closed after the test)."""
    opened: list[JobStore] = []

    def _open(**kw: Any) -> JobStore:
        kw.setdefault("retry_backoff_base", TEST_BACKOFF_BASE)
        store = open_store(jobs_dsn, **kw)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()


@pytest.fixture
def store(open_jobs: Callable[..., JobStore]) -> JobStore:
    """A migrated, empty job store (SQLite file or Postgres database)."""
    return open_jobs()
