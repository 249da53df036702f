"""Open a job store from a DSN, plus the small rules both backends share.

``sqlite:///relative/path`` / ``sqlite:////absolute/path`` open :class:`SqliteJobStore`;
``postgresql://…`` / ``postgres://…`` open :class:`PostgresJobStore` (``?schema=NAME`` or the
``schema=`` keyword picks the schema, default ``miroir``). With no DSN, ``$MIROIR_JOBS_DSN``
is used, then :func:`default_dsn` (a SQLite file under ``./.miroir/``).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import msgspec

from miroir_pipeline.queue.contract import (
    RETRY_BACKOFF_CAP,
    Job,
    JobKind,
    JobNotClaimable,
    JobState,
    JobStore,
    JobType,
    LeaseLost,
    NewChunk,
    ParentSummary,
    rollup_progress,
)

__all__ = ["DEFAULT_SQLITE_PATH", "default_dsn", "open_store", "redact_dsn"]

DEFAULT_SQLITE_PATH = "./.miroir/jobs.sqlite3"
ENV_DSN = "MIROIR_JOBS_DSN"
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def default_dsn() -> str:
    """The embedded default: a SQLite file under ``./.miroir/`` (the folder is created)."""
    os.makedirs(os.path.dirname(DEFAULT_SQLITE_PATH), exist_ok=True)
    return "sqlite:///" + DEFAULT_SQLITE_PATH


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, safe to show in errors and logs."""
    if "://" not in dsn:
        return _KV_PASSWORD.sub(r"\1***", dsn)
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparseable DSN>"
    netloc, query, changed = parts.netloc, parts.query, False
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc, changed = userinfo.split(":", 1)[0] + ":***@" + host, True
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k.lower() == "password" for k, _ in pairs):
        query = urlencode(
            [(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*"
        )
        changed = True
    if not changed:
        return dsn
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


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
        from miroir_pipeline.queue.sqlite import SqliteJobStore

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


def sqlite_path_from_dsn(dsn: str) -> str:
    """``sqlite:///rel/path`` → ``rel/path``; ``sqlite:////abs/path`` → ``/abs/path``."""
    prefix = "sqlite:///"
    if not dsn.startswith(prefix):
        raise ValueError(
            f"bad SQLite DSN {dsn!r}: write sqlite:///relative/path or sqlite:////absolute/path"
        )
    path = dsn[len(prefix) :].split("?", 1)[0]
    if not path or path == ":memory:":
        raise ValueError(
            f"bad SQLite DSN {dsn!r}: the job store needs a file path shared by all "
            "processes (e.g. sqlite:///.miroir/jobs.sqlite3)"
        )
    return path


def split_schema(dsn: str) -> tuple[str, str | None]:
    """Remove ``schema=NAME`` from a Postgres URL's query; return (DSN for psycopg, NAME)."""
    parts = urlsplit(dsn)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    schema = None
    kept = []
    for key, value in pairs:
        if key == "schema":
            schema = value
        else:
            kept.append((key, value))
    if schema is None:
        return dsn, None
    query = urlencode(kept, quote_via=quote)  # %20, not "+": libpq does not decode "+"
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment)), schema


def validate_schema(schema: str) -> str:
    """A plain SQL identifier (letters, digits, underscore; not starting with a digit)."""
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(
            f"invalid Postgres schema name {schema!r}: use letters, digits and underscores, "
            "starting with a letter or underscore, at most 63 characters"
        )
    return schema


# -- rules shared by both backends ---------------------------------------------------------


def dump_json(value: Mapping[str, Any] | None, what: str) -> str:
    """JSON text of a params/progress mapping; names the field when it cannot be encoded."""
    try:
        return msgspec.json.encode(dict(value or {})).decode()
    except (TypeError, msgspec.EncodeError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from None


def load_json(value: Any) -> dict[str, Any]:
    """A JSON column read back (text on SQLite, already decoded on Postgres)."""
    if value is None:
        return {}
    if isinstance(value, str | bytes):
        decoded = msgspec.json.decode(value)
        return decoded if isinstance(decoded, dict) else {"value": decoded}
    return dict(value)


def new_token() -> str:
    return uuid.uuid4().hex


def new_job_id() -> str:
    return uuid.uuid4().hex


def check_new_job(job_type: str, kind: str, max_attempts: int) -> None:
    if not job_type:
        raise ValueError("job_type must be a non-empty string")
    if kind not in (JobKind.PARENT, JobKind.CHUNK):
        raise ValueError(f"kind must be 'parent' or 'chunk', not {kind!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")


def check_chunks(parent_id: str, chunks: Sequence[NewChunk]) -> None:
    """Chunk indexes must be exactly 0..n-1 (they order claims and name partitions)."""
    indexes = sorted(c.chunk_index for c in chunks)
    if indexes != list(range(len(chunks))):
        raise ValueError(
            f"split of {parent_id!r}: chunk_index values must be 0..{len(chunks) - 1} with "
            f"no gaps or repeats, got {indexes[:10]}{'…' if len(indexes) > 10 else ''}"
        )


def check_ttl(ttl: float) -> float:
    if not ttl > 0:
        raise ValueError(f"lease ttl must be a positive number of seconds, not {ttl!r}")
    return float(ttl)


def retry_backoff(attempts: int, base: float, cap: float = RETRY_BACKOFF_CAP) -> float:
    """Seconds before a failed attempt's retry: ``base * 2**(attempts-1)``, capped."""
    return float(min(base * 2 ** max(attempts - 1, 0), cap))


def lease_lost(job_id: str, token: str, current: Job | None) -> LeaseLost:
    if current is None:
        return LeaseLost(f"lease on job {job_id} lost: the row no longer exists (pruned?)")
    holder = (
        f", now leased by {current.claimed_by}"
        if current.state == JobState.IN_PROGRESS and current.claimed_by
        else ""
    )
    return LeaseLost(
        f"lease on job {job_id} lost (token …{token[-6:]} no longer matches; the row is "
        f"{current.state}{holder}): stop writing to it — another worker owns it now or it "
        "was cancelled"
    )


def not_claimable(job: Job, worker_id: str) -> JobNotClaimable:
    if job.kind == JobKind.PARENT:
        why = "it is a parent job; claim its chunks"
    elif job.state == JobState.IN_PROGRESS:
        why = f"it is leased by {job.claimed_by} until {job.claim_expires_at}"
    elif job.state == JobState.QUEUED:
        why = f"it is out of attempts ({job.attempts}/{job.max_attempts})"
    else:
        why = f"it is already {job.state}"
        if job.error:
            why += f" ({job.error})"
    return JobNotClaimable(f"job {job.id} cannot be claimed by {worker_id}: {why}", job)


def depth_for_all_types(rows: Iterable[tuple[str, int]]) -> dict[str, int]:
    depth: dict[str, int] = {str(t): 0 for t in JobType}
    for job_type, count in rows:
        depth[job_type] = int(count)
    return depth


def summarize(parent: Job, children: Iterable[tuple[str, Mapping[str, Any]]]) -> ParentSummary:
    """ParentSummary from (state, progress) of each child."""
    by_state: dict[str, int] = {str(s): 0 for s in JobState}
    progresses: list[Mapping[str, Any]] = []
    total = 0
    for state, progress in children:
        total += 1
        by_state[state] = by_state.get(state, 0) + 1
        progresses.append(progress)
    return ParentSummary(
        parent=parent,
        chunks_total=total,
        chunks_by_state=by_state,
        progress=rollup_progress(progresses),
    )
