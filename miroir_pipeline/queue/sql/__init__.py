"""SQL kept in ``.sql`` files: named queries for the job-store backends and the migrations.

A query file holds named statements in procrastinate's style::

    -- name_of_query --
    -- Why this statement looks the way it does.
    SELECT ...;

Comment lines are dropped when loading, so a ``%`` or ``:name`` inside a comment never
reaches the driver's placeholder parser.
"""

from __future__ import annotations

import os
import re
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["load_queries", "migration_files", "migrations_dir"]

_HEADER = re.compile(r"^--\s*([a-z_][a-z0-9_]*)\s*--\s*$")
_MIGRATION_NAME = re.compile(r"^\d{4}_[A-Za-z0-9_]+\.sql$")


@cache
def load_queries(name: str) -> dict[str, str]:
    """Named statements of ``<name>.sql`` in this package (``<name>_queries.sql`` also found).

    ``load_queries("postgres")`` and ``load_queries("postgres_queries")`` are the same file.
    """
    package = resources.files(__name__)
    candidates = [f"{name}.sql", f"{name}_queries.sql"]
    for filename in candidates:
        resource = package.joinpath(filename)
        if resource.is_file():
            return _parse(resource.read_text(encoding="utf-8"), filename)
    raise FileNotFoundError(
        f"no SQL query file {' or '.join(candidates)} in package {__name__}; "
        "is the package installed with its data files?"
    )


def _parse(text: str, filename: str) -> dict[str, str]:
    queries: dict[str, str] = {}
    current: str | None = None
    body: list[str] = []

    def flush() -> None:
        if current is None:
            return
        statement = "\n".join(body).strip()
        if not statement:
            raise ValueError(f"{filename}: query {current!r} has no statement")
        queries[current] = statement

    for line in text.splitlines():
        header = _HEADER.match(line.strip())
        if header:
            flush()
            current, body = header.group(1), []
            if current in queries:
                raise ValueError(f"{filename}: query {current!r} is defined twice")
            continue
        if current is None or line.lstrip().startswith("--"):
            continue
        body.append(line)
    flush()
    return queries


def migrations_dir() -> Traversable:
    """``$MIROIR_MIGRATIONS_DIR`` (an override for operators) or the ``migrations/`` folder shipped
    inside the package."""
    override = os.environ.get("MIROIR_MIGRATIONS_DIR")
    if override:
        return Path(override)
    return resources.files("miroir_pipeline.queue").joinpath("migrations")


def migration_files(dialect: str) -> list[tuple[str, str]]:
    """``(name, sql)`` of every numbered migration for ``dialect`` (``postgres``/``sqlite``), in order."""
    folder = migrations_dir().joinpath(dialect)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"migrations folder {folder} does not exist; is the package installed with its data "
            "files? (MIROIR_MIGRATIONS_DIR overrides it with a folder holding postgres/ and sqlite/)"
        )
    files = sorted(
        (p for p in folder.iterdir() if p.is_file() and p.name.endswith(".sql")), key=lambda p: p.name
    )
    bad = [p.name for p in files if not _MIGRATION_NAME.match(p.name)]
    if bad:
        raise ValueError(
            f"migration files in {folder} must be named NNNN_description.sql; rename {bad}"
        )
    return [(p.name.removesuffix(".sql"), p.read_text(encoding="utf-8")) for p in files]
