"""Migrations: numbered files applied in order, recorded once, idempotent, safe when several
processes migrate at once — on both backends. Also how stores are opened from a DSN."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from miroir_pipeline.queue import JobStore, JobStoreError, default_dsn, open_store
from miroir_pipeline.queue.dsn import redact_dsn
from miroir_pipeline.queue.sql import migration_files, migrations_dir

JOBS_COLUMNS = {
    "id", "type", "kind", "params", "state", "claimed_by", "claim_token", "claim_expires_at",
    "progress", "attempts", "max_attempts", "error", "parent_job_id", "chunk_index",
    "total_chunks", "available_at", "created_at", "updated_at", "finished_at",
}  # fmt: skip
#: The migrations the project ships, in order (test-only migrations are numbered 9xxx).
SHIPPED = ["0001_jobs", "0002_unfinished_children_index", "0003_work_signal"]

JOBS_INDEXES = {
    "jobs_claimable_idx", "jobs_parent_job_id_idx", "jobs_lease_expiry_idx",
    "jobs_parents_created_idx", "jobs_unfinished_children_idx",
}  # fmt: skip


def _dialect(dsn: str) -> str:
    return "sqlite" if dsn.startswith("sqlite:") else "postgres"


def introspect(dsn: str, schema: str = "miroir") -> dict[str, Any]:
    """Columns and indexes of ``jobs`` and rows of ``schema_migrations``, read directly."""
    if _dialect(dsn) == "sqlite":
        with sqlite3.connect(dsn.removeprefix("sqlite:///")) as conn:
            cols = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
            idx = {r[1] for r in conn.execute("PRAGMA index_list(jobs)")}
            migs = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY 1")]
        return {"columns": cols, "indexes": idx, "migrations": migs}
    with psycopg.connect(dsn) as conn:
        cols = {
            r[0]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = 'jobs'",
                (schema,),
            )
        }
        idx = {
            r[0]
            for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = 'jobs'",
                (schema,),
            )
        }
        migs = [
            r[0]
            for r in conn.execute(
                f'SELECT name FROM "{schema}".schema_migrations ORDER BY 1'  # test-only name
            )
        ]
    return {"columns": cols, "indexes": idx, "migrations": migs}


def insert_raw(dsn: str, state: str, kind: str) -> None:
    """Insert a row bypassing the store, to prove the database itself rejects bad values."""
    if _dialect(dsn) == "sqlite":
        with sqlite3.connect(dsn.removeprefix("sqlite:///")) as conn:
            conn.execute(
                "INSERT INTO jobs (id, type, kind, state, available_at, created_at, updated_at)"
                " VALUES ('raw', 'dump_import', ?, ?, 0, 0, 0)",
                (kind, state),
            )
        return
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO miroir.jobs (id, type, kind, state) VALUES ('raw', 'dump_import', %s, %s)",
            (kind, state),
        )


@pytest.fixture
def own_migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the migrations folder, selected through MIROIR_MIGRATIONS_DIR."""
    folder = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), folder)
    monkeypatch.setenv("MIROIR_MIGRATIONS_DIR", str(folder))
    return folder


def add_migration(folder: Path, name: str, postgres: str, sqlite: str | None = None) -> None:
    (folder / "postgres" / f"{name}.sql").write_text(postgres)
    (folder / "sqlite" / f"{name}.sql").write_text(sqlite if sqlite is not None else postgres)


# -- both backends -----------------------------------------------------------------------------


def test_migrate_twice_gives_one_correct_schema(jobs_dsn: str) -> None:
    store = open_store(jobs_dsn, migrate=False)
    try:
        names = [n for n, _ in migration_files(_dialect(jobs_dsn))]
        assert store.migrate() == names == SHIPPED
        assert store.migrate() == []
        assert open_store(jobs_dsn).migrate() == []  # open_store migrates; nothing is left
    finally:
        store.close()
    shape = introspect(jobs_dsn)
    assert shape["columns"] == JOBS_COLUMNS
    assert shape["indexes"] >= JOBS_INDEXES
    assert shape["migrations"] == SHIPPED
    for state, kind in (("bogus", "chunk"), ("queued", "bogus")):
        with pytest.raises((sqlite3.IntegrityError, psycopg.errors.CheckViolation)):
            insert_raw(jobs_dsn, state, kind)


def test_new_migrations_are_applied_in_order(jobs_dsn: str, own_migrations: Path) -> None:
    store = open_store(jobs_dsn)
    try:
        add_migration(own_migrations, "9003_second", "ALTER TABLE jobs ADD COLUMN note2 text;")
        add_migration(own_migrations, "9002_first", "ALTER TABLE jobs ADD COLUMN note1 text;")
        assert store.migrate() == ["9002_first", "9003_second"]
        assert store.migrate() == []
    finally:
        store.close()
    shape = introspect(jobs_dsn)
    assert {"note1", "note2"} <= shape["columns"]
    assert shape["migrations"] == [*SHIPPED, "9002_first", "9003_second"]


def test_failed_migration_is_rolled_back_and_named(jobs_dsn: str, own_migrations: Path) -> None:
    store = open_store(jobs_dsn)
    try:
        add_migration(
            own_migrations,
            "9002_broken",
            "ALTER TABLE jobs ADD COLUMN half_done text;\nTHIS IS NOT SQL;\n",
        )
        with pytest.raises(JobStoreError, match="9002_broken"):
            store.migrate()
    finally:
        store.close()
    shape = introspect(jobs_dsn)
    assert "half_done" not in shape["columns"]
    assert shape["migrations"] == SHIPPED


def _migrate_process(dsn: str, start: Any, out: str) -> None:
    store = open_store(dsn, migrate=False)
    try:
        start.wait(timeout=60)
        applied = store.migrate()
    finally:
        store.close()
    Path(out).write_text(json.dumps(applied))


@pytest.mark.timeout(120)
def test_processes_migrating_at_once_apply_each_migration_once(
    jobs_dsn: str, own_migrations: Path, tmp_path: Path
) -> None:
    # Not idempotent on purpose: applying it twice would fail with "already exists".
    add_migration(own_migrations, "9002_marker", "CREATE TABLE marker (id integer);")
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(4)
    outs = [tmp_path / f"migrator-{i}.json" for i in range(4)]
    procs = [ctx.Process(target=_migrate_process, args=(jobs_dsn, start, str(o))) for o in outs]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=100)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * len(procs)
    applied = [name for o in outs for name in json.loads(o.read_text())]
    assert sorted(applied) == [*SHIPPED, "9002_marker"]
    shape = introspect(jobs_dsn)
    assert shape["columns"] == JOBS_COLUMNS
    assert shape["migrations"] == [*SHIPPED, "9002_marker"]


# -- opening stores ----------------------------------------------------------------------------


def test_sqlite_dsn_forms_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MIROIR_JOBS_DSN", raising=False)
    stores: list[JobStore] = []
    try:
        stores.append(open_store("sqlite:///rel/dir/jobs.db"))
        assert (tmp_path / "rel/dir/jobs.db").is_file()
        stores.append(open_store(f"sqlite:///{tmp_path}/abs.db"))  # sqlite:////tmp/...
        assert (tmp_path / "abs.db").is_file()
        monkeypatch.setenv("MIROIR_JOBS_DSN", "sqlite:///from-env.db")
        stores.append(open_store())
        assert (tmp_path / "from-env.db").is_file()
        monkeypatch.delenv("MIROIR_JOBS_DSN")
        monkeypatch.delenv("MIROIR_HOME", raising=False)
        assert default_dsn() == "sqlite:///./.miroir/jobs.sqlite3"
        stores.append(open_store())
        assert (tmp_path / ".miroir/jobs.sqlite3").is_file()
        # The home of the embedded defaults holds it, relative or absolute.
        monkeypatch.setenv("MIROIR_HOME", "rel-home")
        assert default_dsn() == "sqlite:///./rel-home/jobs.sqlite3"
        stores.append(open_store())
        assert (tmp_path / "rel-home/jobs.sqlite3").is_file()
        monkeypatch.setenv("MIROIR_HOME", str(tmp_path / "abs-home"))
        assert default_dsn() == f"sqlite:///{tmp_path}/abs-home/jobs.sqlite3"
        stores.append(open_store())
        assert (tmp_path / "abs-home/jobs.sqlite3").is_file()
    finally:
        for s in stores:
            s.close()
    with pytest.raises(ValueError, match="file path"):
        open_store("sqlite:///:memory:")


def test_bad_dsn_errors_never_show_the_password() -> None:
    with pytest.raises(ValueError) as err:
        open_store("mysql://miroir:hunter2-secret@db.example/jobs")
    assert "hunter2-secret" not in str(err.value) and "sqlite:///" in str(err.value)
    assert redact_dsn("postgresql://u:p%40ss@h:5432/d?sslmode=require") == (
        "postgresql://u:***@h:5432/d?sslmode=require"
    )
    assert redact_dsn("postgresql://h/d?password=s3cret&x=1") == "postgresql://h/d?password=***&x=1"
    assert redact_dsn("host=h password='a b' user=u") == "host=h password=*** user=u"
    assert redact_dsn("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize("password", ["S3cr#tPw", "S3cr?tPw", "S3cr%tPw", "a:b#c"])
def test_passwords_libpq_takes_raw_are_redacted_and_scrubbed(password: str) -> None:
    """libpq reads the user info up to the first '@' before any '/', so a password may hold a
    raw '#', '?' or ':' that a URL parser takes for something else; and it quotes a token it
    cannot parse (a raw '%') in its own error. Neither may reach a message."""
    dsn = f"postgresql://miroir:{password}@127.0.0.1:1/jobs"
    assert redact_dsn(dsn) == "postgresql://miroir:***@127.0.0.1:1/jobs"
    with pytest.raises(JobStoreError) as err:
        open_store(dsn, connect_timeout=1)
    assert password not in str(err.value) and "S3cr" not in str(err.value)
    assert "127.0.0.1:1/jobs" in str(err.value)


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://127.0.0.1:1,127.0.0.1:2/jobs?user=admin@srv&password=S3cr-qp",
        "postgresql://[::1]:1/jobs?application_name=svc@x&password=S3cr-qp",
    ],
)
def test_an_at_sign_in_a_query_parameter_is_not_taken_for_credentials(dsn: str) -> None:
    """Valid DSNs (Azure-style user names, application names): tried, not refused, and the
    password parameter is still hidden in what is shown."""
    with pytest.raises(JobStoreError) as err:
        open_store(dsn, connect_timeout=1)
    assert "cannot connect" in str(err.value) and "S3cr" not in str(err.value)
    assert "password=***" in redact_dsn(dsn)


@pytest.mark.parametrize("password", ["S3cr/tPw", "S3cr@tPw", "a/b@c"])
def test_passwords_libpq_would_misread_are_refused_without_showing_them(password: str) -> None:
    """A raw '/' or '@' in the password makes libpq take part of it for the host, port or
    database (and quote it back in its error): refused before any connection, redacted."""
    dsn = f"postgresql://miroir:{password}@127.0.0.1:1/jobs"
    assert redact_dsn(dsn) == "postgresql://miroir:***@127.0.0.1:1/jobs"
    with pytest.raises(ValueError, match=r"percent-encode"):
        open_store(f"postgresql://mi/roir:{password}@127.0.0.1:1/jobs", connect_timeout=1)  # in the user
    with pytest.raises(ValueError, match=r"percent-encode") as err:
        open_store(dsn, connect_timeout=1)
    assert "S3cr" not in str(err.value) and "a/b" not in str(err.value)
    assert "127.0.0.1:1/jobs" in str(err.value)


def test_secret_query_parameters_are_redacted_and_an_at_sign_in_a_parameter_is_not_a_password() -> None:
    dsn = "postgresql://h:1/jobs?sslpassword=K3yPass&sslmode=require"
    assert redact_dsn(dsn) == "postgresql://h:1/jobs?sslpassword=***&sslmode=require"
    with pytest.raises(JobStoreError) as err:
        open_store(dsn, connect_timeout=1)
    assert "K3yPass" not in str(err.value)
    plain = "postgresql://h:5432/db?application_name=etl@nightly"
    assert redact_dsn(plain) == plain


# -- Postgres only -----------------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_wrong_password_is_reported_without_it(pg_server: Any, pg_dsn: str) -> None:
    bad = pg_dsn.replace(pg_server.password, "not-the-Secret-42")
    with pytest.raises(JobStoreError) as err:
        open_store(bad)
    message = str(err.value)
    assert "not-the-Secret-42" not in message and pg_server.password not in message
    assert "***" in message and "password" in message


@pytest.mark.postgres
def test_postgres_schema_is_configurable_and_validated(pg_dsn: str) -> None:
    for store in (open_store(pg_dsn + "?schema=tenant_a"), open_store(pg_dsn, schema="tenant_b")):
        try:
            store.enqueue("dump_import", {})
        finally:
            store.close()
    for schema in ("tenant_a", "tenant_b"):
        assert introspect(pg_dsn, schema)["columns"] == JOBS_COLUMNS
    with psycopg.connect(pg_dsn) as conn:
        tables = {
            (r[0], r[1])
            for r in conn.execute(
                "SELECT table_schema, table_name FROM information_schema.tables "
                "WHERE table_name IN ('jobs', 'schema_migrations')"
            )
        }
    assert ("public", "jobs") not in tables and ("miroir", "jobs") not in tables
    with pytest.raises(ValueError, match="schema"):
        open_store(pg_dsn + '?schema=x";drop')
