"""``miroir-pipeline`` command line (DESIGN §12): import, reshard, worker, status, migrate,
sample-dump. Imports run as Dagster chunk runs recorded in ``$DAGSTER_HOME``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from miroir_pipeline.jobs.settings import DEFAULT_HOME
from miroir_pipeline.util.sizes import format_size, parse_size

__all__ = ["main"]

log = logging.getLogger("miroir_pipeline")
T = TypeVar("T")


def _setup_env(args: argparse.Namespace) -> None:
    """Embedded defaults: Dagster home under ./.miroir/dagster; flags become env for workers."""
    if getattr(args, "jobs_dsn", None):
        os.environ["MIROIR_JOBS_DSN"] = args.jobs_dsn
    if getattr(args, "topology", None):
        os.environ["MIROIR_TOPOLOGY"] = str(Path(args.topology).resolve())
    home = Path(os.environ.setdefault("DAGSTER_HOME", str((DEFAULT_HOME / "dagster").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        shipped = Path(__file__).resolve().parent.parent / "dagster.yaml"
        if shipped.exists():
            (home / "dagster.yaml").write_text(shipped.read_text())


def _instance() -> Any:
    """The Dagster instance of ``$DAGSTER_HOME``, its storage created under a file lock.

    Workers started together on a fresh home would otherwise race to create Dagster's tables
    (and one killed half-way leaves the storage half-made for every later one).
    """
    import fcntl

    import dagster as dg

    home = Path(os.environ["DAGSTER_HOME"])
    with (home / ".miroir-init.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        instance = dg.DagsterInstance.get()
        instance.get_runs(limit=1)  # forces storage creation and migration while locked
    return instance


# -- import ---------------------------------------------------------------------------------
def cmd_import(args: argparse.Namespace) -> int:
    from miroir_pipeline.queue import open_store
    from miroir_pipeline.queue.contract import JobState

    store = open_store()
    config = {
        "uri": args.uri,
        "index_uid": args.index,
        "primary_key": args.primary_key,
        "chunk_size_bytes": parse_size(args.chunk_size) if args.chunk_size else None,
        "on_invalid_document": args.on_invalid,
    }
    parent_id = run_plan("plan_dump_import_job", "plan_dump_import_op", config, _instance())
    started = time.monotonic()
    summary = run_workers_for(
        parent_id, args.workers, lambda procs: _watch(store, parent_id, procs, quiet=args.json or args.no_progress)
    )
    elapsed = time.monotonic() - started
    prog = summary.progress
    failed = [c for c in store.children(parent_id) if c.state == JobState.FAILED]
    result = {
        "job_id": parent_id,
        "state": summary.parent.state,
        "index": args.index,
        "documents": int(prog.get("docs_routed", 0)),
        "bytes": int(prog.get("bytes_processed", 0)),
        "chunks": summary.chunks_total,
        "chunks_completed": summary.chunks_done,
        "per_node": prog.get("per_node", {}),
        "invalid_documents": int(prog.get("invalid_documents", 0)),
        "duration_s": round(elapsed, 2),
        "mb_per_s": round(prog.get("bytes_processed", 0) / 1e6 / elapsed, 1) if elapsed > 0 else 0.0,
        "failed_chunks": [{"id": c.id, "error": c.error} for c in failed],
    }
    ok = summary.parent.state == JobState.COMPLETED
    if not ok and not failed:
        result["error"] = "workers exited before every chunk completed; run `miroir-pipeline worker` to finish"
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_import_summary(result)
    return 0 if ok else 1


QUIET_RUN_LOGS = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


def run_plan(job_name: str, op_name: str, config: dict[str, Any], instance: Any) -> str:
    """Plan a parent as a Dagster run (so it shows in the UI); its id, or the run's root cause."""
    from miroir_pipeline.dagster.definitions import defs

    plan = defs.resolve_job_def(job_name).execute_in_process(
        run_config={"ops": {op_name: {"config": config}}, **QUIET_RUN_LOGS}, instance=instance, raise_on_error=False
    )
    if not plan.success:
        raise PlanRefused(_run_failure(plan))
    return str(plan.output_for_node(op_name))


class PlanRefused(ValueError):
    """Planning refused the request (bad input or configuration); nothing was queued."""


def run_workers_for(parent_id: str, workers: int, watch: Callable[[Sequence[subprocess.Popen[bytes]]], T]) -> T:
    """Start worker processes scoped to one parent, watch them, and leave none behind."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "miroir_pipeline.cli.main", "worker", "--parent", parent_id, "--exit-when-empty", "--quiet"],
            env=os.environ.copy(),
        )
        for _ in range(max(1, workers))
    ]
    try:
        result = watch(procs)
        # Workers exit by themselves once nothing is left; give their last run time to finish
        # recording in Dagster before asking stragglers to drain.
        deadline = time.monotonic() + 60
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()


def _watch(store: Any, parent_id: str, procs: Sequence[subprocess.Popen[bytes]], *, quiet: bool) -> Any:
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from miroir_pipeline.queue.contract import JobState

    summary = store.parent_summary(parent_id)
    total = int(summary.parent.params.get("bytes_total", 0)) or 1
    finished = (JobState.COMPLETED, JobState.FAILED)
    t0 = time.monotonic()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TransferSpeedColumn(),
        TextColumn("{task.fields[docs_s]:>9,.0f} docs/s"),
        TextColumn("chunks {task.fields[done]}/{task.fields[chunks]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=quiet, transient=False) as bar:
        task = bar.add_task(parent_id, total=total, docs_s=0.0, done=0, chunks=summary.chunks_total)
        while True:
            summary = store.parent_summary(parent_id)
            prog = summary.progress
            dt = max(time.monotonic() - t0, 1e-6)
            bar.update(
                task,
                completed=int(prog.get("bytes_processed", 0)),
                docs_s=prog.get("docs_routed", 0) / dt,
                done=summary.chunks_done,
            )
            if summary.parent.state in finished or all(p.poll() is not None for p in procs):
                break
            time.sleep(0.25)
    return store.parent_summary(parent_id)


def _print_import_summary(r: dict[str, Any]) -> None:
    status = "completed" if r["state"] == "completed" else f"NOT completed ({r['state']})"
    print(f"import {r['job_id']} into index {r['index']}: {status}")
    print(f"  documents {r['documents']:,}  bytes {format_size(r['bytes'])}  chunks {r['chunks_completed']}/{r['chunks']}")
    print(f"  {r['duration_s']} s, {r['mb_per_s']} MB/s, invalid documents {r['invalid_documents']}")
    for node, count in sorted(r["per_node"].items()):
        print(f"  {node}: {count:,} documents")
    for f in r["failed_chunks"]:
        print(f"  FAILED {f['id']}: {f['error']}")
    if "error" in r:
        print(f"  {r['error']}")


def _run_failure(result: Any) -> str:
    """The root cause of a failed in-process run, without Dagster's wrapping."""
    for event in result.all_events:
        if event.event_type_value != "STEP_FAILURE":
            continue
        err = event.step_failure_data.error
        while err is not None and err.cause is not None:
            err = err.cause
        if err is not None:
            # "pkg.module.SomeError: text" -> "text": the message already says what and where.
            message = str(err.message).strip()
            head, sep, tail = message.partition(": ")
            return tail if sep and " " not in head else message
    return "the Dagster run failed; see its logs in the Dagster UI"


# -- worker ---------------------------------------------------------------------------------
def cmd_worker(args: argparse.Namespace) -> int:
    from miroir_pipeline.dagster.definitions import defs
    from miroir_pipeline.dagster.worker_pool import Worker
    from miroir_pipeline.jobs.settings import PipelineSettings
    from miroir_pipeline.metrics import start_metrics_server
    from miroir_pipeline.queue import open_store

    if args.metrics_port:
        start_metrics_server(args.metrics_port, addr=args.metrics_addr)
    worker = Worker(
        open_store(),
        _instance(),
        defs,
        PipelineSettings.from_env(),
        parent_id=args.parent,
        exit_when_empty=args.exit_when_empty,
        max_chunks=args.max_chunks,
    )
    worker.install_signal_handlers()
    stats = worker.run()
    log.info("worker %s: %d chunk run(s), %d failed", worker.worker_id, stats.chunks_run, stats.chunks_failed)
    return 0


# -- status / migrate -----------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    from miroir_pipeline.queue import open_store

    store = open_store()
    depth = store.queue_depth()
    parents = store.list_parents(limit=args.limit)
    data: dict[str, Any] = {
        "queue_depth": depth,
        "parents": [
            {
                "id": s.parent.id,
                "type": s.parent.type,
                "state": s.parent.state,
                "chunks_done": s.chunks_done,
                "chunks_total": s.chunks_total,
                "chunks_by_state": s.chunks_by_state,
                "documents": int(s.progress.get("docs_routed", s.progress.get("documents_backfilled", 0))),
                "bytes": int(s.progress.get("bytes_processed", 0)),
                "error": s.parent.error,
            }
            for s in parents
        ],
    }
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print("queue depth: " + ", ".join(f"{t}={n}" for t, n in sorted(depth.items())))
    if not parents:
        print("no jobs yet")
    for p in data["parents"]:
        print(
            f"{p['id']}  {p['type']}  {p['state']}  chunks {p['chunks_done']}/{p['chunks_total']}  "
            f"documents {p['documents']:,}  bytes {format_size(p['bytes'])}"
            + (f"  error: {p['error']}" if p["error"] else "")
        )
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from miroir_pipeline.queue import open_store

    store = open_store(migrate=False)
    applied = store.migrate()
    print("applied: " + ", ".join(applied) if applied else "schema up to date")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from miroir_pipeline.queue import open_store

    changed = open_store().cancel(args.job_id, args.reason)
    print(f"cancelled {args.job_id}: {changed} row(s) failed with reason {args.reason!r}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from miroir_pipeline.queue import open_store

    seconds = _parse_age(args.older_than)
    deleted = open_store().prune(seconds)
    print(f"pruned {deleted} finished row(s) older than {args.older_than}")
    return 0


def _parse_age(text: str) -> float:
    """``90s``, ``30m``, ``12h``, ``7d`` or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise ValueError(f"--older-than {text!r}: use seconds or a number with s, m, h or d (e.g. 7d)") from None


def cmd_sample_dump(args: argparse.Namespace) -> int:
    from miroir_pipeline.jobs.dump_import.sample_dump import write_sample_dump

    docs, written = write_sample_dump(args.path, parse_size(args.size), seed=args.seed)
    print(f"wrote {docs:,} documents ({format_size(written)}) to {args.path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="miroir-pipeline", description=__doc__)
    p.add_argument("--log-level", default=os.environ.get("MIROIR_LOG_LEVEL", "WARNING"))
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--jobs-dsn", help="jobs store DSN (default $MIROIR_JOBS_DSN or a SQLite file under ./.miroir)")
        sp.add_argument("--topology", help="topology YAML (default $MIROIR_TOPOLOGY or 3 local nodes under ./.miroir/nodes)")

    imp = sub.add_parser("import", help="import an NDJSON / gzip / Meilisearch .dump file through Dagster chunk runs")
    imp.add_argument("uri")
    imp.add_argument("--index", required=True)
    imp.add_argument("--primary-key")
    imp.add_argument("--workers", type=int, default=2)
    imp.add_argument("--chunk-size", help="e.g. 64MiB (default 256MiB)")
    imp.add_argument("--on-invalid", choices=["fail", "skip"], default=None)
    imp.add_argument("--json", action="store_true")
    imp.add_argument("--no-progress", action="store_true")
    common(imp)
    imp.set_defaults(func=cmd_import)

    from miroir_pipeline.cli.reshard_cmd import add_reshard_parser

    add_reshard_parser(sub)

    wk = sub.add_parser("worker", help="claim chunks and run each as a Dagster run in-process")
    wk.add_argument("--parent", help="only chunks of this parent job")
    wk.add_argument("--exit-when-empty", action="store_true")
    wk.add_argument("--max-chunks", type=int)
    wk.add_argument("--metrics-port", type=int, default=int(os.environ.get("MIROIR_METRICS_PORT", "0")))
    wk.add_argument("--metrics-addr", default=os.environ.get("MIROIR_METRICS_ADDR", "127.0.0.1"))
    wk.add_argument("--quiet", action="store_true")
    common(wk)
    wk.set_defaults(func=cmd_worker)

    st = sub.add_parser("status", help="queue depth and per-job progress")
    st.add_argument("--json", action="store_true")
    st.add_argument("--limit", type=int, default=20)
    common(st)
    st.set_defaults(func=cmd_status)

    mg = sub.add_parser("migrate", help="apply pending jobs-table migrations")
    common(mg)
    mg.set_defaults(func=cmd_migrate)

    cc = sub.add_parser("cancel", help="fail a job (parent and unfinished chunks) or one chunk for good")
    cc.add_argument("job_id")
    cc.add_argument("--reason", default="cancelled by operator")
    common(cc)
    cc.set_defaults(func=cmd_cancel)

    pr = sub.add_parser("prune", help="delete finished jobs older than an age")
    pr.add_argument("--older-than", default="7d", help="e.g. 12h, 7d (default 7d)")
    common(pr)
    pr.set_defaults(func=cmd_prune)

    sd = sub.add_parser("sample-dump", help="write a synthetic NDJSON dump")
    sd.add_argument("path")
    sd.add_argument("--size", default="64MiB")
    sd.add_argument("--seed", type=int, default=0)
    sd.set_defaults(func=cmd_sample_dump)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _setup_env(args)
    try:
        return int(args.func(args))
    except (ValueError, OSError, RuntimeError) as exc:  # includes PlanRefused
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
