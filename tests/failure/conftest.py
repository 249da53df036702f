"""Shared machinery of the failure suite: worker subprocesses started in their own
process group and always stopped by pgid, a worker environment with short leases, a
topology file, and a PostgreSQL cluster owned by one test (for the restart scenario, so the
session's shared server is never disturbed)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.settings import PipelineSettings
from tests.fixtures.postgres import PostgresServer

REPO = Path(__file__).resolve().parents[2]

#: Short leases so takeovers happen within a second or two (the defaults are 30 s / 10 s).
LEASE_TTL = 2.0
HEARTBEAT = 0.4


def write_topology(path: Path, topology: Topology) -> Path:
    path.write_text(yaml.safe_dump(topology.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return path


def settings_for(root: Path, **kw: object) -> PipelineSettings:
    """Settings confined to ``root`` (allowed roots, staging, dead letters)."""
    base: dict[str, object] = {
        "allowed_roots": [str(root)],
        "staging_dir": str(root / "staging"),
        "dead_letter_dir": str(root / "dlq"),
    }
    base.update(kw)
    return PipelineSettings(**base)  # type: ignore[arg-type]


def worker_env(root: Path, dsn: str, topology_file: Path, **extra: str) -> dict[str, str]:
    """Environment of a `miroir-pipeline worker` subprocess: short leases, small batches."""
    env = dict(os.environ)
    env.update(
        {
            "MIROIR_JOBS_DSN": dsn,
            "MIROIR_TOPOLOGY": str(topology_file),
            "MIROIR_ALLOWED_ROOTS": str(root),
            "MIROIR_STAGING_DIR": str(root / "staging"),
            "MIROIR_DEAD_LETTER_DIR": str(root / "dlq"),
            "DAGSTER_HOME": str(root / "dagster"),
            "MIROIR_LEASE_TTL": str(LEASE_TTL),
            "MIROIR_HEARTBEAT_INTERVAL": str(HEARTBEAT),
            "MIROIR_BATCH_SIZE": "50",
            "MIROIR_READ_BLOCK_BYTES": "16KiB",
        }
    )
    env.update(extra)
    init_dagster_home(root / "dagster")
    return env


def init_dagster_home(home: Path) -> None:
    """Create the Dagster instance's storage once, before several workers start on it.

    Workers started together on a fresh SQLite ``DAGSTER_HOME`` race to create Dagster's
    schema (``table alembic_version already exists``), and one SIGKILLed in the middle
    leaves it half-made; the ``import`` command avoids this by planning first.
    """
    import dagster as dg

    home.mkdir(parents=True, exist_ok=True)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.get_runs(limit=1)


@dataclass
class WorkerProc:
    """One worker subprocess; its stderr goes to a log file (no pipe that could fill up)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it."""
        self.signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Workers:
    """Starts worker subprocesses and guarantees every one is stopped (by pgid) at teardown."""

    root: Path
    started: list[WorkerProc] = field(default_factory=list)

    def start(self, env: dict[str, str], name: str, *args: str) -> WorkerProc:
        logs = self.root / "worker-logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"{name}.log"
        env = {**env, "POD_NAME": name}  # the worker id recorded in claimed_by
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "miroir_pipeline.cli", "--log-level", "WARNING", "worker", *args],
                env=env,
                cwd=REPO,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        wp = WorkerProc(name, proc, log)
        self.started.append(wp)
        return wp

    def stop_all(self) -> None:
        for wp in self.started:
            if wp.alive():
                wp.signal(signal.SIGCONT)  # a stopped group must be able to die
                wp.kill()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    pool = Workers(tmp_path)
    try:
        yield pool
    finally:
        pool.stop_all()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster owned by this test alone, so it may be stopped and started."""
    server = PostgresServer()
    try:
        server.init()
        server.start()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        server.cleanup()
        pytest.fail(f"could not start a dedicated PostgreSQL cluster: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.cleanup()
