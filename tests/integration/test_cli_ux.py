"""The command line as a person meets it: every mistake is one line on stderr with exit 2 and no
traceback; an invalid document under ``--on-invalid fail`` is one line too, Dagster's output going
to a log file named in the summary; Ctrl-C and SIGTERM hand the running chunks back and say how
to resume, ``--resume`` finishes with exact counts, an identical re-run is refused unless
``--new``; a ``.dump``'s index imported under another name; plain progress lines on a pipe; a
pipe closed by its reader ends the command quietly.

Real subprocesses of the CLI on the embedded defaults (SQLite jobs store, local node stores).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from miroir_pipeline.cli import worker_cmd
from miroir_pipeline.cli.admin_cmd import parse_age
from miroir_pipeline.cli.app import build_parser
from miroir_pipeline.fleet.targets.local_store import LocalNodeStore
from miroir_pipeline.fleet.topology import default_topology
from miroir_pipeline.metrics import METRICS_PORT_ENV
from miroir_pipeline.queue import open_store
from miroir_pipeline.queue.contract import JobState, JobStore
from tests.import_helpers import actual_placement, assert_exact_placement, expected_placement
from tests.integration.test_cli import cli

T = TypeVar("T")

#: Progress is committed batch by batch; small reads and tiny batches make a 16 MiB import commit
#: often and last long enough to be interrupted mid-chunk, without changing what a chunk is.
SLOW = {"MIROIR_READ_BLOCK_BYTES": "4KiB", "MIROIR_BATCH_SIZE": "2"}


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIROIR_", "DAGSTER_HOME"))}
    env.update(extra or {})
    return env


def one_line(out: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The single stderr line of a refused command (and that it was refused as it should be)."""
    assert out.returncode == code, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    assert "pydantic" not in lines[0] and "errors.pydantic.dev" not in lines[0], lines[0]
    return lines[0]


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 120.0) -> T:
    """Poll ``probe`` until it returns something (observed state, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found is not None and found is not False:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def store_of(cwd: Path) -> JobStore:
    return open_store(f"sqlite:///{cwd}/.miroir/jobs.sqlite3")


# -- arguments and inputs: one line, exit 2 ----------------------------------------------------


def _inputs(root: Path) -> None:
    (root / "d.ndjson").write_bytes(b'{"id": 1}\n{"id": 2}\n')
    (root / "array.json").write_bytes(b'  \n[{"id": 1},\n {"id": 2}]\n')
    (root / "empty.ndjson").write_bytes(b"")
    (root / "blank.ndjson").write_bytes(b"\n  \n\r\n\n")


REFUSED = [
    (("import", "d.ndjson", "--index", "x", "--workers", "two"), "argument --workers: must be a whole number (0 or more)"),
    (("import", "d.ndjson", "--index", "x", "--workers", "-3"), "argument --workers: must be a whole number (0 or more)"),
    (("reshard", "--index", "x", "--new-shards", "8", "--workers", "-1"), "argument --workers: must be a whole number (0 or more)"),
    (("reshard", "--index", "x", "--new-shards", "8", "--shards-per-chunk", "0"), "argument --shards-per-chunk: must be a positive integer"),
    (("reshard", "--index", "x", "--new-shards", "-2"), "argument --new-shards: must be a positive integer"),
    (("status", "--limit", "0"), "argument --limit: must be a positive integer"),
    (("worker", "--max-chunks", "0"), "argument --max-chunks: must be a positive integer"),
    (("worker", "--poll-interval", "0"), "argument --poll-interval: must be a number of seconds above 0, not '0'"),
    (("worker", "--poll-interval", "nan"), "argument --poll-interval: must be a number of seconds above 0, not 'nan'"),
    (
        ("import", "d.ndjson", "--index", "bad index!"),
        "--index 'bad index!': index uid may use only letters, digits, - and _ (1-400 characters)",
    ),
    (
        ("reshard", "--index", "bad index!", "--new-shards", "8"),
        "--index 'bad index!': index uid may use only letters, digits, - and _ (1-400 characters)",
    ),
    (("import", "d.ndjson", "--index", "x", "--chunk-size", "0"), "--chunk-size '0': must be a positive size"),
    (("import", "d.ndjson", "--index", "x", "--chunk-size", "lots"), "--chunk-size 'lots': write a byte count"),
    (("import", "d.ndjson"), "import needs --index (or --resume JOB_ID"),
    (
        ("import", "array.json", "--index", "x"),
        "array.json is a JSON array, not NDJSON (one document per line); convert it, e.g. `jq -c '.[]' array.json > array.ndjson`",
    ),
    (("import", "array.json", "--index", "x", "--primary-key", "id"), "array.json is a JSON array, not NDJSON"),
    (("import", "empty.ndjson", "--index", "x", "--primary-key", "id"), "empty.ndjson is empty: no documents to import; pass --allow-empty"),
    (("import", "blank.ndjson", "--index", "x", "--primary-key", "id"), "blank.ndjson holds only blank lines: no documents to import; pass --allow-empty"),
    (("import", "s3://bucket/dumps/d.ndjson", "--index", "x"), "MIROIR_ALLOWED_ROOTS"),
    (("import", "d.ndjson", "--index", "x", "--source-index", "y"), "applies only to a Meilisearch .dump archive"),
    (("import", "--resume", "import-nope-1"), "--resume import-nope-1: no such job"),
    (("import", "d.ndjson", "--index", "x", "--resume", "import-nope-1"), "--resume continues an import with the settings it was planned with; drop URI, --index"),
]


@pytest.mark.timeout(600)
def test_every_refusal_is_one_line_with_exit_2(tmp_path: Path) -> None:
    _inputs(tmp_path)
    for args, expected in REFUSED:
        line = one_line(cli(tmp_path, *args, timeout=120))
        assert expected in line, (args, line)
    # Nothing refused left a job or a log behind.
    store = store_of(tmp_path)
    assert store.list_parents() == []
    logs = tmp_path / ".miroir" / "logs"
    assert not logs.exists() or list(logs.iterdir()) == []


@pytest.mark.timeout(300)
def test_prune_refuses_a_negative_or_non_finite_age(tmp_path: Path) -> None:
    # A negative age would prune every finished job, however recent; NaN or inf is no age at all.
    for age in ("-1", "-5d", "nan", "inf", "-inf", "1e400", "nand"):
        line = one_line(cli(tmp_path, "prune", f"--older-than={age}", timeout=120))  # "=": -5d is no option
        assert line == (
            f"error: --older-than {age!r}: must be a finite age of 0 or more: seconds or a number "
            "with s, m, h or d (e.g. 7d)"
        ), (age, line)
    assert not (tmp_path / ".miroir").exists()  # refused before the jobs store is opened
    assert parse_age("0") == 0 and parse_age("7d") == 7 * 86400 and parse_age(" 1.5h ") == 5400


@pytest.mark.timeout(300)
def test_worker_refuses_a_metrics_port_outside_0_65535(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wanted = "argument --metrics-port: must be a port number from 0 to 65535 (0 turns /metrics off), not "
    for port in ("99999", "65536", "-1", "http"):
        line = one_line(cli(tmp_path, "worker", "--metrics-port", port, timeout=120))
        assert line == f"miroir-pipeline worker: error: {wanted}{port!r} (see miroir-pipeline worker --help)"
    # The same rule for the environment default, and the refusal says where the value came from.
    line = one_line(cli(tmp_path, "worker", env={METRICS_PORT_ENV: "99999"}, timeout=120))
    assert f"{wanted}'99999' (from ${METRICS_PORT_ENV})" in line, line
    assert worker_cmd.METRICS_PORT_ENV == METRICS_PORT_ENV
    # A flag overrides a bad environment value; an empty one is off, as for the metrics module.
    monkeypatch.setenv(METRICS_PORT_ENV, "99999")
    assert build_parser().parse_args(["worker", "--metrics-port", "9108"]).metrics_port == 9108
    for value, expected in (("", 0), (" 9108 ", 9108), ("65535", 65535)):
        monkeypatch.setenv(METRICS_PORT_ENV, value)
        assert build_parser().parse_args(["worker"]).metrics_port == expected


@pytest.mark.timeout(300)
def test_empty_dumps_with_allow_empty_and_a_blank_dump_found_only_on_import(tmp_path: Path) -> None:
    _inputs(tmp_path)
    ok = cli(tmp_path, "import", "empty.ndjson", "--index", "e", "--primary-key", "id", "--allow-empty", "--json")
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr[-3000:]
    assert json.loads(ok.stdout)["documents"] == 0
    # Bigger than what planning reads: only the import finds out there was nothing in it.
    (tmp_path / "big-blank.ndjson").write_bytes(b"\n" * (1 << 20) + b"   \n" * 1000)
    blank = cli(tmp_path, "import", "big-blank.ndjson", "--index", "b", "--primary-key", "id", "--workers", "1")
    line = one_line(blank, code=1)
    assert line == "error: no documents found in big-blank.ndjson; pass --allow-empty if that is expected"
    allowed = cli(tmp_path, "import", "big-blank.ndjson", "--index", "b2", "--primary-key", "id", "--workers", "1", "--allow-empty", "--json")
    assert allowed.returncode == 0 and allowed.stderr == "", allowed.stderr[-3000:]


# -- an invalid document under --on-invalid fail -----------------------------------------------


@pytest.mark.timeout(300)
def test_an_invalid_document_is_one_line_and_dagster_logs_go_to_a_file(tmp_path: Path) -> None:
    good = b"".join(orjson.dumps({"id": i, "title": "x" * 40}) + b"\n" for i in range(10))
    (tmp_path / "bad.ndjson").write_bytes(good + b'{"id": 2.5}\n')
    run = cli(tmp_path, "import", "bad.ndjson", "--index", "bad", "--workers", "1")
    assert run.returncode == 1, run.stderr[-3000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) < 5 and "Stack Trace" not in run.stderr and "Traceback" not in run.stderr, run.stderr
    [line] = lines
    assert f"bad.ndjson: line 11, byte offset {len(good)}: primary key is a float" in line
    assert "1 invalid document" in line and "--on-invalid skip" in line
    assert "invalid documents 1" in run.stdout, run.stdout
    [log_file] = re.findall(r"Dagster logs: (\S+)", run.stdout)
    log = (tmp_path / log_file).read_text()
    assert log_file.startswith(".miroir/logs/import-bad-") and log_file.endswith(".log")
    assert "miroir_dump_chunk_job" in log and "Stack Trace" in log  # the worker's chunk run

    as_json = cli(tmp_path, "import", "bad.ndjson", "--index", "bad2", "--workers", "1", "--json")
    assert as_json.returncode == 1 and len(as_json.stderr.strip().splitlines()) == 1, as_json.stderr
    summary = json.loads(as_json.stdout)
    assert summary["invalid_documents"] == 1 and (tmp_path / summary["log_file"]).is_file()

    debug = cli(tmp_path, "--log-level", "debug", "import", "bad.ndjson", "--index", "bad3", "--workers", "1", "--json")
    assert debug.returncode == 1
    assert "Stack Trace" in debug.stderr and "miroir_dump_chunk_job" in debug.stderr
    assert json.loads(debug.stdout)["log_file"] is None


# -- hundreds of tiny chunks -------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_hundreds_of_tiny_chunks_get_a_warning(tmp_path: Path) -> None:
    assert cli(tmp_path, "sample-dump", "d.ndjson", "--size", "300KiB").returncode == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "miroir_pipeline.cli", "import", "d.ndjson", "--index", "tiny", "--primary-key", "id", "--chunk-size", "1KiB", "--no-progress"],
        cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        warning = proc.stderr.readline()  # printed once planned, before any chunk runs
        proc.send_signal(signal.SIGINT)  # no need to run 300 chunks
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert re.fullmatch(
        r"warning: chunk size 1KiB splits 300(\.\d+)?KiB into \d{3} chunks; .* try --chunk-size 1MiB\n", warning
    ), warning
    assert proc.returncode == 130 and "Traceback" not in rest, rest
    assert len(rest.strip().splitlines()) == 1 and "interrupted (SIGINT)" in rest, rest


# -- Ctrl-C, SIGTERM and --resume --------------------------------------------------------------


def _start_slow_import(cwd: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "miroir_pipeline.cli", "import", "d.ndjson", "--index", "items", "--primary-key", "id", "--workers", "2", "--chunk-size", "4MiB", *extra],
        cwd=cwd, env=clean_env(SLOW), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _interrupt_mid_chunk(cwd: Path, proc: subprocess.Popen[str], sig: int) -> tuple[str, str, str, dict[str, int]]:
    """Wait until a chunk is leased (and, for a while, until it committed progress), send
    ``sig``; return the parent id, stdout, stderr and the cursors observed before the signal."""

    def leased() -> tuple[JobStore, str] | None:
        assert proc.poll() is None, proc.communicate()
        if not (cwd / ".miroir" / "jobs.sqlite3").exists():
            return None
        try:
            store = open_store(f"sqlite:///{cwd}/.miroir/jobs.sqlite3", migrate=False)
            parents = store.list_parents()
        except Exception:
            return None
        if not parents or not any(c.state == JobState.IN_PROGRESS for c in store.children(parents[0].parent.id)):
            return None
        return store, parents[0].parent.id

    store, parent_id = wait_for("a leased chunk", leased, timeout=180)

    def cursors() -> dict[str, int]:
        return {
            c.id: int(c.progress["last_cursor"])
            for c in store.children(parent_id)
            if c.state == JobState.IN_PROGRESS and int(c.progress.get("last_cursor", 0)) > int(c.params["start"])
        }

    # Prefer a chunk with committed progress, so the hand-back has a cursor to keep (bounded:
    # a leased chunk is enough to test the interruption itself).
    deadline = time.monotonic() + 5
    observed = cursors()
    while not observed and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        observed = cursors()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    return parent_id, out, err, observed


def _assert_handed_back(cwd: Path, parent_id: str, observed: dict[str, int]) -> None:
    store = store_of(cwd)
    chunks = store.children(parent_id)
    assert {c.state for c in chunks} <= {JobState.QUEUED, JobState.COMPLETED}, [(c.id, c.state) for c in chunks]
    assert store.get(parent_id).state == JobState.IN_PROGRESS
    by_id = {c.id: c for c in chunks}
    for chunk_id, cursor in observed.items():  # a cursor seen committed is never lost
        after = by_id[chunk_id]
        assert int(after.progress["last_cursor"]) >= cursor > int(after.params["start"])
        if after.state == JobState.QUEUED:  # handed back, its attempt given back
            assert after.claim_token is None and after.attempts == 0
    for c in chunks:
        if c.state == JobState.QUEUED and c.progress:
            assert int(c.params["start"]) < int(c.progress["last_cursor"]) <= int(c.params["end"])


def _interrupted_line(err: str, parent_id: str, sig_name: str) -> re.Match[str]:
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    match = re.fullmatch(
        rf"import {parent_id} interrupted \({sig_name}\): (\d+) running chunk\(s\) handed back at their "
        rf"cursors, (\d+)/(\d+) chunks done; resume with `miroir-pipeline import --resume {parent_id}`",
        lines[0],
    )
    assert match, lines[0]
    return match


def _assert_exact_import(cwd: Path, summary: dict[str, Any], dump: Path) -> None:
    lines = dump.read_bytes().splitlines()
    assert summary["state"] == "completed" and summary["chunks_completed"] == summary["chunks"]
    assert summary["documents"] == len(lines) and summary["bytes"] == dump.stat().st_size
    topo = default_topology(cwd / ".miroir")
    expected = expected_placement([orjson.loads(x) for x in lines], topo)
    assert summary["per_node"] == {n: len(d) for n, d in expected.items()}
    targets = {n.id: LocalNodeStore(n.id, n.local_path) for n in topo.all_nodes()}
    assert_exact_placement(expected, actual_placement(targets, "items"))


@pytest.mark.timeout(900)
def test_ctrl_c_hands_chunks_back_then_resume_finishes_exactly(tmp_path: Path) -> None:
    assert cli(tmp_path, "sample-dump", "d.ndjson", "--size", "16MiB").returncode == 0
    proc = _start_slow_import(tmp_path, "--no-progress")
    parent_id, out, err, observed = _interrupt_mid_chunk(tmp_path, proc, signal.SIGINT)
    assert proc.returncode == 130, (out, err[-3000:])
    match = _interrupted_line(err, parent_id, "SIGINT")
    assert int(match[3]) == 4 and int(match[2]) < 4
    _assert_handed_back(tmp_path, parent_id, observed)

    # The same request again is refused, pointing at the unfinished import.
    again = cli(tmp_path, "import", "d.ndjson", "--index", "items", "--primary-key", "id", "--chunk-size", "4MiB")
    line = one_line(again)
    assert re.fullmatch(
        rf"error: an identical import {parent_id} is unfinished \(\d/4 chunks done\); resume it with "
        rf"--resume {parent_id}, or pass --new to start another",
        line,
    ), line
    # Another chunk size is another request; --new starts another import of the same one.
    other = cli(tmp_path, "import", "d.ndjson", "--index", "items", "--primary-key", "id", "--new", "--json")
    assert other.returncode == 0 and other.stderr == "", other.stderr[-3000:]
    assert json.loads(other.stdout)["job_id"] != parent_id

    resumed = cli(tmp_path, "import", "--resume", parent_id, "--json")
    assert resumed.returncode == 0 and resumed.stderr == "", resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["job_id"] == parent_id
    _assert_exact_import(tmp_path, summary, tmp_path / "d.ndjson")
    assert store_of(tmp_path).get(parent_id).state == JobState.COMPLETED

    done = cli(tmp_path, "import", "--resume", parent_id)
    assert done.returncode == 0 and "already completed" in done.stderr and f"import {parent_id}" in done.stdout


@pytest.mark.timeout(900)
def test_sigterm_hands_chunks_back_and_piped_progress_is_plain_lines(tmp_path: Path) -> None:
    assert cli(tmp_path, "sample-dump", "d.ndjson", "--size", "16MiB").returncode == 0
    proc = _start_slow_import(tmp_path)  # stdout is a pipe: plain progress lines
    parent_id, out, err, observed = _interrupt_mid_chunk(tmp_path, proc, signal.SIGTERM)
    assert proc.returncode == 143, (out, err[-3000:])
    _interrupted_line(err, parent_id, "SIGTERM")
    _assert_handed_back(tmp_path, parent_id, observed)
    progress = re.compile(rf"import {parent_id}: \d+% \d+\.\d MB/s [\d,]+ docs chunks \d/4")
    assert out.strip() and all(progress.fullmatch(line) for line in out.strip().splitlines()), out
    assert "\x1b" not in out and "━" not in out

    resumed = cli(tmp_path, "import", "--resume", parent_id)
    assert resumed.returncode == 0 and resumed.stderr == "", resumed.stderr[-3000:]
    ticks = [x for x in resumed.stdout.splitlines() if "%" in x]
    assert ticks and all(progress.fullmatch(x) for x in ticks), resumed.stdout
    assert re.fullmatch(rf"import {parent_id}: 100% .* chunks 4/4", ticks[-1]), resumed.stdout
    assert f"import {parent_id} into index items: completed" in resumed.stdout
    docs = len((tmp_path / "d.ndjson").read_bytes().splitlines())
    assert f"documents {docs:,}" in resumed.stdout


@pytest.mark.timeout(900)
def test_ctrl_c_hands_reshard_chunks_back_then_resume_verifies(tmp_path: Path) -> None:
    from miroir_pipeline.jobs.reshard_backfill import parse_cursor

    assert cli(tmp_path, "sample-dump", "d.ndjson", "--size", "2MiB").returncode == 0
    imported = cli(tmp_path, "import", "d.ndjson", "--index", "items", "--primary-key", "id", "--json")
    assert imported.returncode == 0, imported.stderr[-3000:]
    docs = json.loads(imported.stdout)["documents"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "miroir_pipeline.cli", "reshard", "--index", "items", "--new-shards", "8", "--workers", "2", "--no-progress"],
        cwd=tmp_path, env=clean_env(SLOW), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    store = store_of(tmp_path)

    def committed() -> tuple[str, dict[str, tuple[int, int]]] | None:
        """The reshard parent and the cursors its leased chunks committed, once there is one."""
        assert proc.poll() is None, proc.communicate()
        reshards = [p for p in store.list_parents("reshard_backfill")]
        if not reshards:
            return None
        parent_id = reshards[0].parent.id
        cursors = {  # every chunk starts at "shard_start:0"; past it, a batch was committed
            c.id: at
            for c in store.children(parent_id)
            if c.state == JobState.IN_PROGRESS
            and (at := parse_cursor(c.progress["last_cursor"])) > (int(c.params["shard_start"]), 0)
        }
        return (parent_id, cursors) if cursors else None

    try:
        parent_id, observed = wait_for("a reshard chunk with a committed cursor", committed, timeout=300)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err[-3000:])
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-3000:]
    assert re.fullmatch(
        rf"reshard {parent_id} interrupted \(SIGINT\): \d+ running chunk\(s\) handed back at their "
        rf"cursors, \d+/\d+ chunks done; resume with `miroir-pipeline reshard --resume {parent_id}`",
        err.strip(),
    ), err
    chunks = {c.id: c for c in store.children(parent_id)}
    assert {c.state for c in chunks.values()} <= {JobState.QUEUED, JobState.COMPLETED}
    assert store.get(parent_id).state == JobState.IN_PROGRESS
    for chunk_id, cursor in observed.items():  # a cursor seen committed is never lost
        after = chunks[chunk_id]
        if after.state == JobState.QUEUED:
            assert parse_cursor(after.progress["last_cursor"]) >= cursor
            assert after.claim_token is None and after.attempts == 0  # handed back, not failed

    resumed = cli(tmp_path, "reshard", "--resume", parent_id, "--json")
    assert resumed.returncode == 0 and resumed.stderr == "", resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["job_id"] == parent_id and summary["state"] == "completed"
    assert summary["documents"] == docs and summary["verification"] == "passed"
    assert summary["ready_for_cutover"] is True
    assert sum(summary["per_node"].values()) == docs  # RF 1 in the default topology


# -- output closed by its reader (``| head``) ---------------------------------------------------


def _with_stdout_closed(cwd: Path, *args: str) -> tuple[int, str]:
    """Run the CLI with its standard output's read end already closed, as ``| head`` leaves it
    once it has read enough: every write the command makes fails with EPIPE."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "miroir_pipeline.cli", *args],
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(timeout=240), err


@pytest.mark.timeout(300)
def test_a_closed_output_ends_the_command_quietly_with_141(tmp_path: Path) -> None:
    _inputs(tmp_path)
    # A listing stops without a word: no traceback, no "Exception ignored" at exit.
    assert _with_stdout_closed(tmp_path, "status") == (141, "")
    assert _with_stdout_closed(tmp_path, "status", "--json") == (141, "")
    # An import that cannot print says so in one line, and where to look; this one had finished
    # its work before it printed the summary, and the store says so.
    code, err = _with_stdout_closed(tmp_path, "import", "d.ndjson", "--index", "x", "--primary-key", "id", "--json")
    assert code == 141, err[-3000:]
    assert err.splitlines() == [
        "error: import could not write its output (broken pipe) and stopped; `miroir-pipeline status` "
        "shows whether its job finished, and `miroir-pipeline import --resume JOB_ID` carries on an "
        "unfinished one"
    ], err[-3000:]
    [parent] = store_of(tmp_path).list_parents()
    assert parent.parent.state == JobState.COMPLETED and parent.progress["docs_routed"] == 2


# -- a .dump's index under another name --------------------------------------------------------


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _meilisearch_dump(path: Path, uid: str, docs: list[dict[str, Any]], pk: str) -> Path:
    """A minimal v6 ``.dump``, laid out the way Meilisearch writes one."""
    with tarfile.open(path, "w:gz") as tar:
        _member(tar, "./metadata.json", json.dumps({"dumpVersion": "V6", "dbVersion": "1.21.0"}).encode())
        _member(tar, f"./indexes/{uid}/metadata.json", json.dumps({"uid": uid, "primaryKey": pk}).encode())
        _member(tar, f"./indexes/{uid}/settings.json", json.dumps({"searchableAttributes": ["title"]}).encode())
        _member(tar, f"./indexes/{uid}/documents.jsonl", b"".join(orjson.dumps(d) + b"\n" for d in docs))
    return path


@pytest.mark.timeout(300)
def test_a_dump_index_imported_under_another_name(tmp_path: Path) -> None:
    docs = [{"sku": f"s-{i}", "title": f"item {i}"} for i in range(120)]
    _meilisearch_dump(tmp_path / "shop.dump", "products", docs, "sku")

    missing = cli(tmp_path, "import", "shop.dump", "--index", "products_v2")
    assert "has no documents for index 'products_v2' (indexes found: products)" in one_line(missing)
    assert "--source-index" in missing.stderr

    run = cli(tmp_path, "import", "shop.dump", "--index", "products_v2", "--source-index", "products", "--workers", "1", "--json")
    assert run.returncode == 0 and run.stderr == "", run.stderr[-3000:]
    summary = json.loads(run.stdout)
    assert summary["index"] == "products_v2" and summary["documents"] == len(docs)
    topo = default_topology(tmp_path / ".miroir")
    targets = {n.id: LocalNodeStore(n.id, n.local_path) for n in topo.all_nodes()}
    assert_exact_placement(expected_placement(docs, topo, pk="sku"), actual_placement(targets, "products_v2", pk="sku"))
    assert not any(t.index_exists("products") for t in targets.values())
