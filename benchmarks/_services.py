"""Non-pytest launchers for the services benchmarks need, reusing the test fixtures' process code
(``tests/fixtures/postgres.py``, ``tests/fixtures/meilisearch.py``): a throwaway Postgres
cluster and a fleet of Meilisearch 1.21.0 processes, all on loopback, stopped on exit."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import _common  # noqa: F401 - puts the repo root on sys.path for `tests.fixtures`

from miroir_pipeline.fleet.topology import Group, Node, Topology
from tests.fixtures.meilisearch import MeiliProcess, verified_binary
from tests.fixtures.postgres import ENV_DSN, PostgresServer


@contextlib.contextmanager
def postgres() -> Iterator[PostgresServer]:
    """A throwaway cluster (initdb + pg_ctl, fsync off), or the server ``MIROIR_TEST_PG_DSN`` names."""
    external = os.environ.get(ENV_DSN)
    server = PostgresServer(external) if external else PostgresServer()
    if not external:
        try:
            server.init()
            server.start()
        except BaseException:
            server.cleanup()
            raise
    try:
        yield server
    finally:
        server.cleanup()


def restart_durable(server: PostgresServer) -> None:
    """Restart the throwaway cluster on the same port WITHOUT the fixture's ``fsync=off``,
    ``full_page_writes=off`` and ``synchronous_commit=off`` (command-line options beat
    ``ALTER SYSTEM``, so this needs its own ``pg_ctl start``)."""
    assert server.root is not None and server.bindir is not None and server.port
    server.stop()
    options = f"-p {server.port} -k {server.root} -c listen_addresses=127.0.0.1 -c max_connections=300 -c shared_buffers=32MB"
    server._run(  # the fixture's own runner: as the postgres user, errors carry the log tail
        [str(server.bindir / "pg_ctl"), "-D", str(server.root / "data"), "-l", str(server.root / "postgres.log"),
         "-w", "-t", "60", "-o", options, "start"],
        f"pg_ctl start (durable) on 127.0.0.1:{server.port}",
    )  # fmt: skip
    server._running = True


def fresh_database(server: PostgresServer) -> tuple[str, str]:
    """(name, DSN) of a new empty database; drop it with ``server.drop_database(name)``."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    return name, server.create_database(name)


#: Flags every benchmark Meilisearch process runs with (beyond the fixture's own defaults).
MEILI_FLAGS_NOTE = (
    "--env development --no-analytics --max-indexing-threads 1 --max-indexing-memory 256MiB "
    "--log-level WARN (tests/fixtures/meilisearch.py MeiliProcess defaults), loopback port, master key"
)


@contextlib.contextmanager
def meilisearch_fleet(
    root: Path, n: int = 3, extra_args: Sequence[str] = ()
) -> Iterator[list[MeiliProcess]]:
    """``n`` Meilisearch processes with data under ``root``, each in its own process group."""
    binary = verified_binary()
    procs = [MeiliProcess(binary, root / f"meili-{i}", extra_args=extra_args) for i in range(n)]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            p.stop()


def key_env(proc: MeiliProcess) -> str:
    return f"MIROIR_BENCH_MEILI_KEY_{proc.port}"


def meili_topology(procs: Sequence[MeiliProcess], *, shards: int = 64) -> Topology:
    """One replica group over ``procs``, RF 1; sets each node's key env var in this process."""
    nodes = []
    for i, p in enumerate(procs):
        os.environ[key_env(p)] = p.master_key
        nodes.append(Node(id=f"meili-{i}", url=p.url, api_key_env=key_env(p)))
    return Topology(shards=shards, replication_factor=1, groups=[Group(id=0, nodes=nodes)])
