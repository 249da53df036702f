"""The package as a user gets it: build the sdist and the wheel from this checkout, install the
wheel into a fresh virtualenv, and run the installed ``miroir-pipeline`` console script from an
empty directory with no ``MIROIR_*`` / ``DAGSTER_HOME`` in the environment — on the embedded
defaults (SQLite jobs store, 3 local nodes, Dagster home under ./.miroir) and with only
``MIROIR_JOBS_DSN`` pointing at the suite's throwaway Postgres.

Everything the CLI reads at run time (migrations, named SQL, the Dagster instance template) must
come from the installed package: a data file left outside the package, or out of package-data,
makes ``migrate`` or ``import`` fail here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

pytestmark = [pytest.mark.packaging, pytest.mark.timeout(1200)]

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "miroir_pipeline"
BUILD_TIMEOUT_S = 300
INSTALL_TIMEOUT_S = 900
COMMAND_TIMEOUT_S = 300
#: What stderr must never say: the package could not find its own data files.
MISSING_DATA = ("MIROIR_MIGRATIONS_DIR", "No dagster.yaml found")
#: Environment that would point the installed package elsewhere than a user's fresh shell.
STRIPPED_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONUSERBASE", "VIRTUAL_ENV", "DAGSTER_HOME")


@dataclass
class Built:
    wheel: Path
    sdist: Path
    seconds: float


@dataclass
class Installed:
    wheel: Path
    venv: Path
    python: Path
    script: Path
    timings: dict[str, float] = field(default_factory=dict)


def log(message: str) -> None:
    print(f"[packaging] {message}", file=sys.stderr, flush=True)


def run(
    cmd: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = COMMAND_TIMEOUT_S,
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``cmd`` in its own process group (the CLI starts worker processes) and leave nothing
    of that group behind, whatever happens; return the result and its duration in seconds."""
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, err = proc.communicate()
        pytest.fail(
            f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} did not finish in {timeout:g} s\n"
            f"--- stderr (tail) ---\n{err[-4000:]}",
            pytrace=False,
        )
    finally:
        _kill_group(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.monotonic() - started


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def user_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without any ``MIROIR_*`` variable, ``DAGSTER_HOME`` or Python path
    overrides, plus ``extra``: what a user's fresh shell would have."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MIROIR_") and k not in STRIPPED_ENV
    }
    env.update(extra or {})
    return env


def check(proc: subprocess.CompletedProcess[str], what: str) -> None:
    """Exit 0 and no sign on stderr of a data file the installed package could not find."""
    assert proc.returncode == 0, (
        f"{what} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n"
        f"--- stderr ---\n{proc.stderr[-6000:]}"
    )
    for needle in MISSING_DATA:
        assert needle not in proc.stderr, (
            f"{what}: stderr mentions {needle!r}:\n{proc.stderr[-6000:]}"
        )


def package_data_files() -> set[str]:
    """Every data file under the package in this checkout (what package-data must ship)."""
    root = REPO_ROOT / PACKAGE
    return {
        p.relative_to(REPO_ROOT).as_posix()
        for pattern in ("*.sql", "*.yaml", "py.typed")
        for p in root.rglob(pattern)
        if "__pycache__" not in p.parts
    }


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The sdist, and the wheel built from that sdist (``python -m build``), as a release would."""
    out = tmp_path_factory.mktemp("dist")
    proc, seconds = run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(REPO_ROOT)],
        cwd=out,
        env=user_env(),
        timeout=BUILD_TIMEOUT_S,
    )
    assert proc.returncode == 0, (
        f"python -m build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    [wheel] = out.glob("*.whl")
    [sdist] = out.glob("*.tar.gz")
    log(f"sdist + wheel build: {seconds:.1f} s")
    return Built(wheel=wheel, sdist=sdist, seconds=seconds)


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """A fresh virtualenv with the wheel and its dependencies (from the package index) in it;
    removed afterwards (Dagster and pyarrow make it some 500 MB)."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    proc, venv_s = run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv.parent, env=user_env()
    )
    assert proc.returncode == 0, proc.stderr
    python = venv / "bin" / "python"
    # This interpreter's pip installs into the new venv (`--python`), so the venv gets no pip of
    # its own; `--no-compile` skips byte-compiling Dagster, which the test does not need.
    proc, install_s = run(
        [
            sys.executable, "-m", "pip", "--python", str(python), "install",
            "--no-compile", "--progress-bar", "off", "--quiet", str(built.wheel),
        ],
        cwd=venv.parent,
        env=user_env(),
        timeout=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, f"pip install of the wheel failed:\n{proc.stderr[-6000:]}"
    log(
        f"fresh venv: {venv_s:.1f} s; pip install of the wheel and its dependencies: {install_s:.1f} s"
    )
    script = venv / "bin" / "miroir-pipeline"
    assert script.is_file(), "the wheel installed no `miroir-pipeline` console script"
    yield Installed(
        wheel=built.wheel,
        venv=venv,
        python=python,
        script=script,
        timings={"build": built.seconds, "venv": venv_s, "install": install_s},
    )
    shutil.rmtree(venv, ignore_errors=True)


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    assert not any(work.iterdir())
    return work


# -- the artifacts ---------------------------------------------------------------------------
def test_wheel_and_sdist_ship_the_package_with_its_data_and_nothing_else(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as zf:
        names = set(zf.namelist())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line.removeprefix("Requires-Dist: ")
            for line in zf.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist: ")
        ]

    top = {n.split("/", 1)[0] for n in names}
    assert top == {PACKAGE, f"{PACKAGE}-0.1.0.dist-info"}, (
        f"unexpected top-level entries: {sorted(top)}"
    )
    missing = package_data_files() - names
    assert not missing, f"package data missing from the wheel: {sorted(missing)}"
    for dialect in ("sqlite", "postgres"):
        assert any(
            re.fullmatch(rf"{PACKAGE}/queue/migrations/{dialect}/\d{{4}}_\w+\.sql", n)
            for n in names
        ), f"no {dialect} migrations in the wheel"
    assert f"{PACKAGE}/dagster/dagster.yaml" in names
    assert f"{PACKAGE}/py.typed" in names
    assert re.search(r"^miroir-pipeline\s*=\s*miroir_pipeline\.cli:main\s*$", scripts, re.M), (
        scripts
    )

    # The UI is an extra: the library and the CLI do not pull in the webserver.
    unconditional = [r for r in requires if "extra ==" not in r]
    assert not [r for r in unconditional if r.startswith(("dagster-webserver", "dagster-graphql"))]
    assert any(r.startswith("dagster-webserver") and 'extra == "ui"' in r for r in requires)

    with tarfile.open(built.sdist) as tf:
        members = [m.split("/", 1)[1] for m in tf.getnames() if "/" in m]
    leaked = sorted(
        {m.split("/", 1)[0] for m in members}
        & {"tests", "benchmarks", "scripts", "k8s", ".ci", "conftest.py", "definitions.py"}
    )
    assert not leaked, f"the sdist carries {leaked}"
    assert not (package_data_files() - set(members)), "the sdist lacks package data"


# -- the installed console script ------------------------------------------------------------
def test_installed_script_runs_an_import_on_the_embedded_defaults(
    installed: Installed, empty_dir: Path
) -> None:
    env = user_env()
    where, _ = run(
        [str(installed.python), "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"],
        cwd=empty_dir,
        env=env,
    )
    check(where, "import miroir_pipeline")
    purelib, _ = run(
        [str(installed.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=empty_dir,
        env=env,
    )
    site = Path(purelib.stdout.strip()).resolve()
    module = Path(where.stdout.strip()).resolve()
    assert module.is_relative_to(site), f"miroir_pipeline imported from {module}, not {site}"
    assert not module.is_relative_to(REPO_ROOT), "the fresh venv imported the repo checkout"
    assert site.is_relative_to(installed.venv.resolve())
    assert (site / PACKAGE / "dagster" / "dagster.yaml").is_file()
    assert sysconfig.get_paths()["purelib"] != str(site)  # not this test's own environment

    timings = dict(installed.timings)
    summary, status = _migrate_sample_import_status(installed, empty_dir, env, timings, "sqlite")

    home = empty_dir / ".miroir"
    assert (home / "jobs.sqlite3").is_file(), "the embedded SQLite jobs store was not used"
    shipped = (site / PACKAGE / "dagster" / "dagster.yaml").read_text()
    assert (home / "dagster" / "dagster.yaml").read_text() == shipped
    assert sorted(p.name for p in (home / "nodes").iterdir()) == sorted(summary["per_node"])
    assert status["queue_depth"] and not any(status["queue_depth"].values()), status


@pytest.mark.postgres
def test_installed_script_runs_an_import_on_postgres(
    installed: Installed, empty_dir: Path, pg_dsn: str
) -> None:
    timings: dict[str, float] = {}
    env = user_env({"MIROIR_JOBS_DSN": pg_dsn})
    summary, _ = _migrate_sample_import_status(installed, empty_dir, env, timings, "postgres")

    assert not (empty_dir / ".miroir" / "jobs.sqlite3").exists(), (
        "jobs went to SQLite, not Postgres"
    )
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute(
            "SELECT state FROM miroir.jobs WHERE id = %s", (summary["job_id"],)
        ).fetchone()
        chunks = conn.execute(
            "SELECT count(*) FROM miroir.jobs WHERE parent_job_id = %s AND state = 'completed'",
            (summary["job_id"],),
        ).fetchone()
    assert row is not None and row[0] == "completed"
    assert chunks is not None and chunks[0] == summary["chunks"]


def _migrate_sample_import_status(
    installed: Installed, cwd: Path, env: Mapping[str, str], timings: dict[str, float], label: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """migrate, sample-dump (8 MiB), import --json and status --json through the installed
    console script on the ``label`` jobs store (``sqlite`` / ``postgres``); checks every exit
    code, stderr and the summary; returns (import summary, status)."""
    script = str(installed.script)

    migrate, timings["migrate"] = run([script, "migrate"], cwd=cwd, env=env)
    check(migrate, "migrate")
    with zipfile.ZipFile(installed.wheel) as zf:
        shipped = sorted(
            Path(n).stem
            for n in zf.namelist()
            if n.startswith(f"{PACKAGE}/queue/migrations/{label}/") and n.endswith(".sql")
        )
    assert shipped, f"no {label} migrations in the wheel"
    # A fresh store: every migration the wheel ships is applied, read from the installed files.
    assert migrate.stdout.strip() == "applied: " + ", ".join(shipped), migrate.stdout

    sample, timings["sample-dump"] = run(
        [script, "sample-dump", "d.ndjson", "--size", "8MiB"], cwd=cwd, env=env
    )
    check(sample, "sample-dump")
    with (cwd / "d.ndjson").open("rb") as fh:
        lines = sum(1 for line in fh if line.strip())
    assert lines > 1000

    imported, timings["import"] = run(
        [script, "import", "d.ndjson", "--index", "products", "--json"], cwd=cwd, env=env
    )
    check(imported, "import")
    summary: dict[str, Any] = json.loads(imported.stdout)
    assert summary["state"] == "completed", summary
    # Dagster's own output (the plan run, the workers' chunk runs) goes to the log file the
    # summary names: it must not complain of a data file the package could not find either.
    assert summary.get("log_file"), summary
    dagster_log = (cwd / summary["log_file"]).read_text(errors="replace")
    assert dagster_log.strip(), "the Dagster log file is empty"
    for needle in MISSING_DATA:
        assert needle not in dagster_log, f"the Dagster log mentions {needle!r}:\n{dagster_log[-6000:]}"
    assert summary["documents"] == lines
    assert summary["bytes"] == (cwd / "d.ndjson").stat().st_size
    assert len(summary["per_node"]) == 3, summary["per_node"]  # default topology: 3 local nodes
    assert sum(summary["per_node"].values()) == summary["documents"]  # RF 1: each doc once
    assert summary["invalid_documents"] == 0
    assert summary["failed_chunks"] == []
    assert summary["chunks"] == summary["chunks_completed"] >= 1

    status_proc, timings["status"] = run([script, "status", "--json"], cwd=cwd, env=env)
    check(status_proc, "status")
    status: dict[str, Any] = json.loads(status_proc.stdout)
    [parent] = [p for p in status["parents"] if p["id"] == summary["job_id"]]
    assert parent["state"] == "completed"
    assert parent["type"] == "dump_import"
    assert parent["documents"] == lines
    assert parent["chunks_done"] == parent["chunks_total"] == summary["chunks"]

    log(f"{label}: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return summary, status
