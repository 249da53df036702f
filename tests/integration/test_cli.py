"""The command line as an operator uses it: sample-dump + import on the embedded defaults,
status, migrate (twice, and on Postgres), a failing import's exit code and reason, reshard,
cancel and prune; and the parser itself: every subcommand and option explains itself."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import orjson
import pytest

from miroir_pipeline.cli.app import build_parser
from miroir_pipeline.dagster import miroir_definitions
from miroir_pipeline.dagster.names import MiroirNames
from miroir_pipeline.fleet.targets.local_store import LocalNodeStore
from miroir_pipeline.fleet.topology import default_topology
from tests.import_helpers import actual_placement, assert_exact_placement, expected_placement


def cli(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MIROIR_", "DAGSTER_HOME"))}
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "miroir_pipeline.cli", *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout
    )


def test_definitions_load_with_no_configuration() -> None:
    dg.Definitions.validate_loadable(miroir_definitions())


COMMANDS = ("import", "reshard", "worker", "status", "migrate", "cancel", "prune", "sample-dump")


def _help_texts(parser: argparse.ArgumentParser, path: str = "miroir-pipeline") -> list[tuple[str, str | None]]:
    """(where, help) for every argument and subcommand of ``parser``, recursively."""
    found: list[tuple[str, str | None]] = [(f"{path} (description)", parser.description)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found.append((f"{path} {name}", helps.get(name)))
                found += _help_texts(sub, f"{path} {name}")
        else:
            found.append((f"{path} {'/'.join(action.option_strings) or action.dest}", action.help))
    return found


def test_every_subcommand_and_option_has_help() -> None:
    texts = _help_texts(build_parser())
    missing = [where for where, text in texts if not (text and text.strip())]
    assert missing == [], f"no help text: {missing}"
    leaked = [where for where, text in texts if text and re.search(r"(?i)\bdesign\b|§", text)]
    assert leaked == [], f"help refers to a design document: {leaked}"
    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    summaries = {choice.dest: str(choice.help) for choice in commands._choices_actions}
    assert list(summaries) == list(COMMANDS)
    assert all("\n" not in summary for summary in summaries.values())


REPO = Path(__file__).resolve().parents[2]


def _readme_synopsis() -> dict[str, str]:
    """The README's command-line block, one entry per subcommand (continuation lines, and the
    several forms of one subcommand such as ``import URI …`` and ``import --resume …``, joined)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("## Command line", 1)[1].split("```", 2)[1]
    entries: dict[str, str] = {}
    current = ""
    for line in block.splitlines():
        if line.startswith("miroir-pipeline "):
            word = line.split()[1]
            current = "" if word.startswith("[") else word  # "" is the top-level usage line
            entries[current] = f"{entries[current]} {line}" if current in entries else line
        elif line.strip() and current:
            entries[current] += " " + line.strip()
    return entries


def test_readme_synopsis_matches_the_parser() -> None:
    """Every option and argument of every subcommand is in the README, and nothing else is."""
    synopsis = _readme_synopsis()
    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(synopsis) == {"", *COMMANDS}
    for name, sub in commands.choices.items():
        entry = synopsis[name]
        documented = set(re.findall(r"--[a-z][a-z-]*", entry))
        options = {o for a in sub._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
        assert documented == options, (name, documented ^ options)
        for action in sub._actions:
            if not action.option_strings:
                assert re.search(rf"\b{action.metavar}\b", entry), (name, action.metavar)
    assert "--log-level LEVEL" in synopsis[""]


def test_top_level_help_lists_every_subcommand(tmp_path: Path) -> None:
    out = cli(tmp_path, "--help", timeout=60)
    assert out.returncode == 0, out.stderr
    for command in COMMANDS:
        assert re.search(rf"^\s+{re.escape(command)}\s+\w", out.stdout, re.MULTILINE), (command, out.stdout)
    assert not re.search(r"(?i)\bdesign\b|§", out.stdout)


def test_the_command_line_starts_without_dagster() -> None:
    """``--help``, ``status`` and ``sample-dump`` stay fast: Dagster loads when a command needs it."""
    code = "import sys, miroir_pipeline.cli; sys.exit(any(m.split('.')[0] == 'dagster' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


#: Run the program as the console script does, and say on stderr how it left the collector.
_GC_AT_EXIT = (
    "import atexit, gc, sys\n"
    "atexit.register(lambda: print(f'gc enabled={gc.isenabled()} frozen={gc.get_freeze_count()}', file=sys.stderr))\n"
    "from miroir_pipeline.cli import main\n"
    "main(sys.argv[1:])\n"
)


def _gc_at_exit(cwd: Path, *args: str) -> tuple[bool, int]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MIROIR_", "DAGSTER_HOME"))}
    out = subprocess.run([sys.executable, "-c", _GC_AT_EXIT, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    found = re.search(r"gc enabled=(True|False) frozen=(\d+)", out.stderr)
    assert found, out.stderr
    return found.group(1) == "True", int(found.group(2))


@pytest.mark.timeout(300)
def test_the_program_collects_again_once_a_command_starts_its_work(tmp_path: Path) -> None:
    """The program loads without the cyclic collector and freezes the heap at exit (a faster
    start and exit); a worker turns the collector back on before it runs chunks, while a short
    command like ``status`` never needs it. ``cli.app.main`` called in-process changes nothing."""
    enabled, frozen = _gc_at_exit(tmp_path, "worker", "--exit-when-empty")
    assert enabled and frozen > 0
    enabled, frozen = _gc_at_exit(tmp_path, "status")
    assert not enabled and frozen > 0
    code = (
        "import gc, sys\n"
        "from miroir_pipeline.cli.app import main\n"
        "assert main(['status']) == 0\n"
        "sys.exit(0 if gc.isenabled() and gc.get_freeze_count() == 0 else 3)\n"
    )
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MIROIR_", "DAGSTER_HOME"))}
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=full, timeout=120).returncode == 0


@pytest.mark.timeout(300)
def test_sample_dump_then_import_on_embedded_defaults(tmp_path: Path) -> None:
    made = cli(tmp_path, "sample-dump", "dump.ndjson", "--size", "3MiB", "--seed", "7")
    assert made.returncode == 0, made.stderr
    run = cli(tmp_path, "import", "dump.ndjson", "--index", "products", "--primary-key", "id", "--workers", "2", "--chunk-size", "512KiB", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    lines = (tmp_path / "dump.ndjson").read_bytes().splitlines()
    assert summary["state"] == "completed"
    assert summary["documents"] == len(lines)
    assert summary["bytes"] == (tmp_path / "dump.ndjson").stat().st_size
    assert summary["chunks"] == summary["chunks_completed"] >= 6
    assert summary["invalid_documents"] == 0

    topo = default_topology(tmp_path / ".miroir")
    docs = [orjson.loads(x) for x in lines]
    expected = expected_placement(docs, topo)
    assert summary["per_node"] == {n: len(d) for n, d in expected.items()}
    targets = {n.id: LocalNodeStore(n.id, n.local_path) for n in topo.all_nodes()}
    assert_exact_placement(expected, actual_placement(targets, "products"))

    # The runs are in the Dagster home, so `dagster dev` shows them afterwards.
    with dg.DagsterInstance.from_config(str(tmp_path / ".miroir" / "dagster")) as instance:
        runs = instance.get_run_records(dg.RunsFilter(job_name=MiroirNames().chunk_job("dump_import")))
        assert len(runs) == summary["chunks"]
        assert all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        # Planned in the command, not in a Dagster run: the workers registered every chunk and
        # the import itself as partitions.
        names = MiroirNames()
        chunk_parts = instance.get_dynamic_partitions(names.partitions("dump_import"))
        assert sorted(chunk_parts) == sorted(r.dagster_run.tags["dagster/partition"] for r in runs)
        assert instance.get_dynamic_partitions(names.parent_partitions("dump_import")) == [summary["job_id"]]
        # ...and the import as a whole is recorded once, by the two workers between them.
        reports = instance.get_run_records(
            dg.RunsFilter(job_name=names.parent_report_job("dump_import"), tags={"dagster/partition": summary["job_id"]})
        )
        assert [r.dagster_run.status for r in reports] == [dg.DagsterRunStatus.SUCCESS]

    status = cli(tmp_path, "status", "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["queue_depth"] == {"dump_import": 0, "reshard_backfill": 0}
    [parent] = data["parents"]
    assert parent["id"] == summary["job_id"] and parent["state"] == "completed"
    assert parent["chunks_done"] == parent["chunks_total"] == summary["chunks"]
    assert parent["documents"] == summary["documents"]
    human = cli(tmp_path, "status")
    assert summary["job_id"] in human.stdout and "completed" in human.stdout


def test_failing_import_exits_nonzero_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "bad.ndjson").write_bytes(b'{"id": 1}\n{"id": 2.5}\n')
    run = cli(tmp_path, "import", "bad.ndjson", "--index", "bad", "--primary-key", "id", "--workers", "1", "--json")
    assert run.returncode == 1
    summary = json.loads(run.stdout)
    assert summary["state"] == "failed"
    [failed] = summary["failed_chunks"]
    assert "bad.ndjson: line 2, byte offset 10" in failed["error"] and "float" in failed["error"]

    outside = cli(tmp_path, "import", "/etc/hostname", "--index", "x")
    assert outside.returncode == 2 and "outside the allowed dump roots" in outside.stderr


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migrate_twice_is_a_noop(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> None:
    dsn = f"sqlite:///{tmp_path}/jobs.sqlite3" if backend == "sqlite" else request.getfixturevalue("pg_dsn")
    first = cli(tmp_path, "migrate", "--jobs-dsn", dsn)
    assert first.returncode == 0 and "applied: 0001_jobs, 0002_unfinished_children_index, 0003_work_signal" in first.stdout, first.stderr
    second = cli(tmp_path, "migrate", "--jobs-dsn", dsn)
    assert second.returncode == 0 and "schema up to date" in second.stdout, second.stderr
    if backend == "postgres":
        assert "password" not in first.stdout + first.stderr


@pytest.mark.timeout(300)
def test_reshard_after_import_verifies_the_shadow(tmp_path: Path) -> None:
    assert cli(tmp_path, "sample-dump", "dump.ndjson", "--size", "1MiB").returncode == 0
    assert cli(tmp_path, "import", "dump.ndjson", "--index", "items", "--primary-key", "id", "--workers", "1", "--json").returncode == 0
    run = cli(tmp_path, "reshard", "--index", "items", "--new-shards", "16", "--workers", "1", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    lines = (tmp_path / "dump.ndjson").read_bytes().splitlines()
    assert out["verification"] == "passed" and out["shadow_index"] == "items__reshard_16"
    assert out["documents"] == len(lines) == sum(out["per_node"].values())
    same = cli(tmp_path, "reshard", "--index", "items", "--new-shards", "64")
    assert same.returncode == 2 and "64" in same.stderr
    missing = cli(tmp_path, "reshard", "--index", "nope", "--new-shards", "8")
    assert missing.returncode == 2 and "nope" in missing.stderr


def test_cancel_and_prune(tmp_path: Path) -> None:
    assert cli(tmp_path, "sample-dump", "d.ndjson", "--size", "64KiB").returncode == 0
    done = json.loads(cli(tmp_path, "import", "d.ndjson", "--index", "a", "--primary-key", "id", "--workers", "1", "--json").stdout)
    from miroir_pipeline.fleet.targets.factory import open_targets
    from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import
    from miroir_pipeline.jobs.settings import PipelineSettings
    from miroir_pipeline.queue import open_store

    store = open_store(f"sqlite:///{tmp_path}/.miroir/jobs.sqlite3")
    topo = default_topology(tmp_path / ".miroir")
    queued = plan_dump_import(store, DumpImportRequest(uri=str(tmp_path / "d.ndjson"), index_uid="b", primary_key="id"), topo, open_targets(topo), PipelineSettings(allowed_roots=[str(tmp_path)]))
    out = cli(tmp_path, "cancel", queued.parent.id, "--reason", "wrong index")
    assert out.returncode == 0, out.stderr
    assert store.get(queued.parent.id).state == "failed" and store.get(queued.chunk_ids[0]).error == "wrong index"
    assert cli(tmp_path, "prune", "--older-than", "1h").stdout.startswith("pruned 0 ")
    time.sleep(1.1)
    pruned = cli(tmp_path, "prune", "--older-than", "1s")
    assert pruned.returncode == 0 and pruned.stdout.startswith(f"pruned {2 + done['chunks'] + len(queued.chunk_ids)} ")
    assert store.list_parents() == []
    bad = cli(tmp_path, "prune", "--older-than", "soon")
    assert bad.returncode == 2 and "--older-than" in bad.stderr


def test_prune_deletes_the_staged_copies_no_job_names(tmp_path: Path) -> None:
    """A gzip'd dump's staged copy goes once its import is pruned and the copy sat unused for the
    age (at least an hour); the copy an unfinished import reads, and files not named like staged
    copies, stay."""
    import gzip

    from miroir_pipeline.fleet.targets.factory import open_targets
    from miroir_pipeline.jobs.dump_import import DumpImportRequest, plan_dump_import
    from miroir_pipeline.jobs.settings import PipelineSettings
    from miroir_pipeline.queue import open_store

    assert cli(tmp_path, "sample-dump", "d.ndjson", "--size", "64KiB").returncode == 0
    lines = (tmp_path / "d.ndjson").read_bytes().splitlines(keepends=True)
    (tmp_path / "a.ndjson.gz").write_bytes(gzip.compress(b"".join(lines[: len(lines) // 2])))
    (tmp_path / "b.ndjson.gz").write_bytes(gzip.compress(b"".join(lines[len(lines) // 2 :])))
    done = cli(tmp_path, "import", "a.ndjson.gz", "--index", "a", "--primary-key", "id", "--workers", "1", "--json")
    assert done.returncode == 0, done.stderr
    store = open_store(f"sqlite:///{tmp_path}/.miroir/jobs.sqlite3")
    topo = default_topology(tmp_path / ".miroir")
    settings = PipelineSettings(allowed_roots=[str(tmp_path)], staging_dir=str(tmp_path / ".miroir" / "staging"))
    unfinished = plan_dump_import(store, DumpImportRequest(uri=str(tmp_path / "b.ndjson.gz"), index_uid="b", primary_key="id"), topo, open_targets(topo), settings)
    staging = tmp_path / ".miroir" / "staging"
    copy_a = Path(store.children(json.loads(done.stdout)["job_id"])[0].params["data_uri"])
    copy_b = Path(unfinished.parent.params["data_uri"])
    assert copy_a.parent == copy_b.parent == staging.resolve() and copy_a != copy_b
    (staging / "README.txt").write_text("an operator's note")
    time.sleep(1.1)
    recent = cli(tmp_path, "prune", "--older-than", "1s")
    assert recent.returncode == 0, recent.stderr
    assert "deleted 0 staged dump file(s)" in recent.stdout and "1 used recently" in recent.stdout
    assert copy_a.exists(), "staged less than an hour ago: kept, whatever the age asked"
    two_hours_ago = time.time() - 7200
    for f in staging.iterdir():
        os.utime(f, (two_hours_ago, two_hours_ago))
    pruned = cli(tmp_path, "prune", "--older-than", "1s")
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted 2 staged dump file(s)" in pruned.stdout and "kept 1 in use" in pruned.stdout
    assert not copy_a.exists() and not Path(f"{copy_a}.complete").exists()
    assert copy_b.exists() and Path(f"{copy_b}.complete").exists() and (staging / "README.txt").exists()
    assert store.get(unfinished.parent.id).state not in ("completed", "failed")


def test_workers_started_together_on_a_fresh_dagster_home_all_start(tmp_path: Path) -> None:
    """They used to race to create Dagster's tables ('table alembic_version already exists')."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIROIR_", "DAGSTER_HOME"))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "miroir_pipeline.cli", "worker", "--exit-when-empty"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(4)
    ]
    outcomes = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err[-1500:] for _, err in outcomes]


def _background(cwd: Path, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A CLI process of its own group, its output in ``name.log``; stopped by the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MIROIR_", "DAGSTER_HOME"))}
    log = cwd / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "miroir_pipeline.cli", *args],
            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    return proc, log


def _wait_log(proc: subprocess.Popen[bytes], log: Path, text: str, timeout: float) -> None:
    """Until ``text`` shows in the process's log; fails if it exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in {log.name} (exit {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.timeout(420)
def test_import_with_no_workers_is_served_by_a_running_pool(tmp_path: Path) -> None:
    """``import --workers 0`` on the embedded defaults: with no pool it says so and Ctrl-C leaves
    the import queued; a worker started later runs it; and once that worker is idle, a second
    import wakes it at once (its poll interval is ten minutes, so only the wake-up can make the
    second import finish within the test's bound) and it records both imports in Dagster."""
    assert cli(tmp_path, "sample-dump", "a.ndjson", "--size", "256KiB", "--seed", "1").returncode == 0
    assert cli(tmp_path, "sample-dump", "b.ndjson", "--size", "256KiB", "--seed", "2").returncode == 0
    names = MiroirNames()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # -- no pool: the command says so, and Ctrl-C leaves the import to a pool to come -----
        lonely, lonely_log = _background(
            tmp_path, "lonely", "import", "a.ndjson", "--index", "a", "--primary-key", "id", "--workers", "0", "--no-progress"
        )
        procs.append(lonely)
        _wait_log(lonely, lonely_log, "no worker has claimed a chunk of import", 120)
        lonely.send_signal(signal.SIGINT)
        assert lonely.wait(timeout=60) == 130, lonely_log.read_text()
        said = lonely_log.read_text()
        first_id = re.search(r"stopped following import (\S+) \(SIGINT\); the worker pool carries on", said)
        assert first_id, said
        from miroir_pipeline.queue import open_store

        store = open_store(f"sqlite:///{tmp_path}/.miroir/jobs.sqlite3")
        summary = store.parent_summary(first_id.group(1))
        assert summary.chunks_total > 0 and summary.chunks_by_state["queued"] == summary.chunks_total

        # -- a pool member starts, runs the queued import, then waits for work --------------
        worker, worker_log = _background(
            tmp_path, "worker", "--log-level", "INFO", "worker", "--poll-interval", "600"
        )
        procs.append(worker)
        # the command the interrupted one named follows the import again, to its end
        assert f"`miroir-pipeline import --resume {first_id.group(1)} --workers 0` follows it again" in said, said
        again = cli(tmp_path, "import", "--resume", first_id.group(1), "--workers", "0", "--json", timeout=240)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["state"] == "completed"
        assert store.get(first_id.group(1)).state == "completed"
        _wait_log(worker, worker_log, "waiting for work", 180)

        # -- a second import is claimed by the idle worker, woken by the queued chunks ------
        run = cli(tmp_path, "import", "b.ndjson", "--index", "b", "--primary-key", "id", "--workers", "0", "--json", timeout=240)
        assert run.returncode == 0, run.stderr
        summary_b = json.loads(run.stdout)
        assert summary_b["state"] == "completed" and summary_b["log_file"] is None
        lines = (tmp_path / "b.ndjson").read_bytes().splitlines()
        assert summary_b["documents"] == len(lines)
        topo = default_topology(tmp_path / ".miroir")
        targets = {n.id: LocalNodeStore(n.id, n.local_path) for n in topo.all_nodes()}
        for index, dump in (("a", "a.ndjson"), ("b", "b.ndjson")):
            docs = [orjson.loads(x) for x in (tmp_path / dump).read_bytes().splitlines()]
            assert_exact_placement(expected_placement(docs, topo), actual_placement(targets, index))

        # -- the pool member records each import it finished as the parent-level partition --
        parents = {first_id.group(1), summary_b["job_id"]}
        with dg.DagsterInstance.from_config(str(tmp_path / ".miroir" / "dagster")) as instance:
            def recorded() -> set[str]:
                runs = instance.get_run_records(dg.RunsFilter(job_name=names.parent_report_job("dump_import")))
                return {r.dagster_run.tags["dagster/partition"] for r in runs if r.dagster_run.status == dg.DagsterRunStatus.SUCCESS}

            deadline = time.monotonic() + 120
            while recorded() != parents and time.monotonic() < deadline and worker.poll() is None:
                time.sleep(0.25)
            assert recorded() == parents, worker_log.read_text()[-3000:]
        store.close()

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0, worker_log.read_text()[-3000:]
    finally:
        for proc in procs:
            _stop_group(proc)


@pytest.mark.timeout(420)
def test_reshard_with_no_workers_is_served_by_a_running_pool(tmp_path: Path) -> None:
    """``reshard --workers 0``: with no pool it says so and Ctrl-C leaves the backfill queued;
    the command it names follows the backfill again once a pool worker runs it, and verifies the
    shadow."""
    assert cli(tmp_path, "sample-dump", "dump.ndjson", "--size", "512KiB", "--seed", "3").returncode == 0
    imported = cli(tmp_path, "import", "dump.ndjson", "--index", "items", "--primary-key", "id", "--workers", "1", "--json")
    assert imported.returncode == 0, imported.stderr
    procs: list[subprocess.Popen[bytes]] = []
    try:
        lonely, lonely_log = _background(
            tmp_path, "lonely", "reshard", "--index", "items", "--new-shards", "16", "--shards-per-chunk", "16",
            "--workers", "0", "--no-progress",
        )  # fmt: skip
        procs.append(lonely)
        _wait_log(lonely, lonely_log, "no worker has claimed a chunk of reshard", 180)
        lonely.send_signal(signal.SIGINT)
        assert lonely.wait(timeout=60) == 130, lonely_log.read_text()
        said = lonely_log.read_text()
        found = re.search(r"stopped following reshard (\S+) \(SIGINT\); the worker pool carries on", said)
        assert found, said
        parent_id = found.group(1)
        from miroir_pipeline.queue import open_store

        store = open_store(f"sqlite:///{tmp_path}/.miroir/jobs.sqlite3")
        summary = store.parent_summary(parent_id)
        assert summary.chunks_total == 4 and summary.chunks_by_state["queued"] == 4  # 64 live shards / 16
        store.close()

        worker, worker_log = _background(tmp_path, "worker", "--log-level", "INFO", "worker")
        procs.append(worker)
        assert f"`miroir-pipeline reshard --resume {parent_id} --workers 0` follows it again" in said, said
        run = cli(tmp_path, "reshard", "--resume", parent_id, "--workers", "0", "--json", timeout=300)
        assert run.returncode == 0, run.stderr + worker_log.read_text()[-3000:]
        out = json.loads(run.stdout)
        lines = (tmp_path / "dump.ndjson").read_bytes().splitlines()
        assert out["state"] == "completed" and out["verification"] == "passed", out
        assert out["shadow_index"] == "items__reshard_16" and out["chunks_completed"] == 4
        assert out["documents"] == len(lines) == sum(out["per_node"].values())
        assert "claimed" not in run.stderr  # the pool took the chunks: no hint this time

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0, worker_log.read_text()[-3000:]
    finally:
        for proc in procs:
            _stop_group(proc)
