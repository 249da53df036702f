"""``miroir-pipeline import``: start worker processes scoped to a new dump import, plan it here
while they load Dagster, follow the bytes with a progress bar, then print the totals.

``--resume JOB_ID`` runs the chunks of an unfinished import instead (nothing is planned again):
the way on after Ctrl-C, SIGTERM or workers that stopped early. Exits 0 only when every chunk
completed; ``--json`` prints the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from miroir_pipeline.cli import collector, pool, runtime
from miroir_pipeline.cli.errors import CliError, format_validation_error
from miroir_pipeline.cli.options import (
    Subparsers,
    add_store_options,
    non_negative_int,
    stdout_is_terminal,
)
from miroir_pipeline.util.sizes import format_size, parse_size

if TYPE_CHECKING:
    from miroir_pipeline.jobs.dump_import import DumpImportRequest
    from miroir_pipeline.queue.contract import JobStore, ParentSummary

__all__ = ["add_parser", "run"]


DESCRIPTION = (
    "Plan a dump import while worker processes started for it load Dagster; they run each "
    "chunk as a Dagster run while a progress bar follows the bytes, then print the totals. "
    "Exits 0 only when every chunk completed. Ctrl-C or SIGTERM hands the running chunks back at their cursors; "
    "--resume JOB_ID carries on from there. Dagster's own output goes to a log file under "
    "./.miroir/logs named in the summary (to stderr at --log-level debug)."
)

#: Above this many chunks, chunks smaller than :data:`TINY_CHUNK_BYTES` earn a warning: every
#: chunk is a Dagster run with a fixed cost, so tiny ones make an import slow.
MANY_CHUNKS = 200
TINY_CHUNK_BYTES = 1 << 20
#: The largest chunk size the warning suggests (the default chunk size).
SUGGESTED_MAX_BYTES = 256 << 20

#: Request fields and the flags that set them, for one-line validation errors.
FLAGS = {
    "uri": "URI",
    "index_uid": "--index",
    "primary_key": "--primary-key",
    "chunk_size_bytes": "--chunk-size",
    "on_invalid_document": "--on-invalid",
    "source_index_uid": "--source-index",
}


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add ``import`` to the top-level subparsers."""
    p = subparsers.add_parser(
        "import",
        help="import an NDJSON, gzip'd NDJSON or Meilisearch .dump file through Dagster chunk runs",
        description=DESCRIPTION,
    )
    p.add_argument(
        "uri",
        metavar="URI",
        nargs="?",
        help="the dump: a path, file://, s3://, gs:// or hdfs:// URI (inside the allowed roots); not with --resume",
    )
    p.add_argument("--index", metavar="UID", help="uid of the index to import into (required unless --resume)")
    p.add_argument(
        "--source-index",
        metavar="UID",
        help="the index to read from a Meilisearch .dump, to import it under the --index name (default: the --index name); not for NDJSON",
    )
    p.add_argument(
        "--primary-key",
        metavar="PK",
        help="primary-key field (default: a .dump's metadata, else the one field of the first document whose name ends in 'id')",
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=2,
        metavar="N",
        help="worker processes to start (default 2); 0 starts none and leaves the chunks to a "
        "worker pool already running against the same jobs store (`miroir-pipeline worker`), "
        "which claims them as soon as they are planned",
    )
    p.add_argument(
        "--chunk-size",
        metavar="SIZE",
        help="bytes per chunk, plain or with units: 64KiB, 256MiB, 1GiB (default $MIROIR_CHUNK_SIZE_BYTES, else 256MiB)",
    )
    p.add_argument(
        "--on-invalid",
        choices=["fail", "skip"],
        default=None,
        help="an invalid document fails its chunk (fail) or goes to the dead-letter file and is counted (skip); default $MIROIR_ON_INVALID_DOCUMENT, else fail",
    )
    p.add_argument(
        "--allow-empty",
        action="store_true",
        help="accept a dump with no documents (empty, or blank lines only) instead of refusing it",
    )
    p.add_argument(
        "--resume",
        metavar="JOB_ID",
        help="run the remaining chunks of an unfinished import from their cursors (nothing is planned again)",
    )
    p.add_argument(
        "--new",
        action="store_true",
        help="start a new import even when an identical one is unfinished (default: refuse and point at it)",
    )
    p.add_argument(
        "--json", action="store_true", help="print only the summary, as JSON (no progress)"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar or lines; print only the summary"
    )
    add_store_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Plan, run and summarize one dump import (or resume one).

    The workers start as soon as the job has an id: their Dagster start-up is most of a small
    import's time. The request is validated and planned here while they load (a refusal stops
    them, leaves no job, and is printed as raised)."""
    if args.resume:
        return _resume(args)
    _require_uri_and_index(args)

    from miroir_pipeline.jobs.ids import new_parent_id
    from miroir_pipeline.queue import open_store

    try:
        parent_id = new_parent_id("import", args.index)
    except ValueError as exc:
        raise CliError(f"--index {exc}") from None
    store = open_store()
    logs = runtime.DagsterLogs.of_job(parent_id, args.log_level)

    def plan() -> None:
        """Planned here with the library, while the workers load Dagster: the plan needs no
        Dagster run, and each worker registers the chunks as partitions when it sees them."""
        from miroir_pipeline.fleet.targets.factory import open_targets
        from miroir_pipeline.jobs.dump_import.plan import (
            plan_dump_import,
            unfinished_identical_import,
        )
        from miroir_pipeline.jobs.settings import PipelineSettings, resolve_topology

        request = _request(args)
        settings = PipelineSettings.from_env()
        if not args.new:
            earlier = unfinished_identical_import(store, request, settings)
            if earlier is not None:
                job = earlier.parent.id
                raise CliError(
                    f"an identical import {job} is unfinished ({earlier.chunks_done}/"
                    f"{earlier.chunks_total} chunks done); resume it with --resume {job}, or pass "
                    "--new to start another"
                )
        topology = resolve_topology()
        plan_dump_import(
            store, request, topology, open_targets(topology), settings, parent_id=parent_id
        )
        _warn_tiny_chunks(store.parent_summary(parent_id), args.workers)

    try:
        return _run_and_report(args, store, parent_id, logs, plan=plan)
    except runtime.PlanRefused as exc:
        logs.discard()
        raise (exc.__cause__ or exc) from None  # the refusal itself, worded as raised


def _require_uri_and_index(args: argparse.Namespace) -> None:
    """A new import names its dump and its index."""
    missing = [name for name, value in (("URI", args.uri), ("--index", args.index)) if not value]
    if missing:
        raise CliError(
            f"import needs {' and '.join(missing)} (or --resume JOB_ID to continue an unfinished import)"
        )


def _request(args: argparse.Namespace) -> DumpImportRequest:
    """The request the flags make, validated here so a mistake is one line naming the flag."""
    from pydantic import ValidationError

    from miroir_pipeline.jobs.dump_import.params import INDEX_UID_RULE, DumpImportRequest

    try:
        chunk_size = parse_size(args.chunk_size) if args.chunk_size is not None else None
    except ValueError as exc:
        why = str(exc).removeprefix(f"invalid size {args.chunk_size!r}: ")
        raise CliError(f"--chunk-size {args.chunk_size!r}: {why}") from None
    try:
        return DumpImportRequest(
            uri=args.uri,
            index_uid=args.index,
            primary_key=args.primary_key,
            chunk_size_bytes=chunk_size,
            on_invalid_document=args.on_invalid,
            source_index_uid=args.source_index,
            allow_empty=bool(args.allow_empty),
        )
    except ValidationError as exc:
        raise CliError(
            format_validation_error(
                exc,
                FLAGS,
                given={"chunk_size_bytes": args.chunk_size},
                rules={
                    "index_uid": INDEX_UID_RULE,
                    "source_index_uid": INDEX_UID_RULE,
                    "chunk_size_bytes": "must be a positive size, e.g. 64MiB",
                    "primary_key": "must not be empty",
                },
            )
        ) from None


def _resume(args: argparse.Namespace) -> int:
    """Run the remaining chunks of an unfinished import; nothing is planned again."""
    from miroir_pipeline.jobs.dump_import.params import DUMP_IMPORT
    from miroir_pipeline.queue.contract import JobState

    planning = [
        flag
        for flag, value in (
            ("URI", args.uri),
            ("--index", args.index),
            ("--source-index", args.source_index),
            ("--primary-key", args.primary_key),
            ("--chunk-size", args.chunk_size),
            ("--on-invalid", args.on_invalid),
            ("--allow-empty", args.allow_empty),
            ("--new", args.new),
        )
        if value
    ]
    job_id = args.resume
    store, parent = runtime.resumable_parent(
        job_id, job_type=DUMP_IMPORT, what="import", planning_flags=planning, restart_hint="start a new import"
    )
    logs = runtime.DagsterLogs.of_job(job_id, args.log_level)
    if parent.state == JobState.COMPLETED:
        print(f"import {job_id} had already completed; nothing to resume", file=sys.stderr)
    return _run_and_report(args, store, job_id, logs)


def _run_and_report(
    args: argparse.Namespace,
    store: JobStore,
    parent_id: str,
    logs: runtime.DagsterLogs,
    *,
    plan: Callable[[], None] | None = None,
) -> int:
    """Run the parent's chunks in worker processes, then print the summary; the exit status.

    With ``plan``, the parent does not exist yet: the workers start first, and ``plan`` makes
    the parent while they load (a refusal raises :class:`runtime.PlanRefused` once they are
    stopped)."""
    from miroir_pipeline.queue.contract import JobState

    mode = "none" if args.json or args.no_progress else "bar" if stdout_is_terminal() else "plain"
    started = time.monotonic()
    planned: list[ParentSummary] = []

    def watch(procs: Sequence[subprocess.Popen[bytes]], stop: runtime.StopSignal) -> ParentSummary:
        if plan is not None:
            try:
                plan()
            except (ValueError, OSError, RuntimeError) as exc:
                raise runtime.PlanRefused(str(exc)) from exc
        planned.append(store.parent_summary(parent_id))
        return _watch(store, planned[0], procs, stop, mode=mode)

    finished = store.parent_summary(parent_id) if plan is None else None
    from_pool = args.workers == 0
    if finished is not None and finished.parent.state == JobState.COMPLETED:
        planned.append(finished)
        outcome: runtime.WorkersOutcome[ParentSummary] = runtime.WorkersOutcome(finished, None, 0)
    elif from_pool:
        logs.discard()  # this command runs no Dagster; the pool's workers log where they run
        logs = runtime.DagsterLogs(None, logs.level)
        collector.started()  # loaded; from here on it follows the pool's work, for hours maybe
        with runtime.StopSignal() as stop:
            outcome = runtime.WorkersOutcome(watch([], stop), None, 0)
        if stop.requested:
            return pool.left_to_pool("import", store, parent_id, stop, as_json=args.json)
    else:
        outcome = runtime.run_workers_for(
            parent_id, args.workers, watch, store=store, logs=logs, planning=plan is not None
        )
    before = planned[0]
    params = before.parent.params
    elapsed = time.monotonic() - started
    summary = store.parent_summary(parent_id)
    prog = summary.progress
    failed = runtime.failed_chunks(store, parent_id)
    # imported once the workers run: the package is most of what planning loads
    from miroir_pipeline.jobs.dump_import.params import is_invalid_document_error

    stopped_at_invalid = sum(1 for f in failed if is_invalid_document_error(f["error"]))
    moved = int(prog.get("bytes_processed", 0)) - int(before.progress.get("bytes_processed", 0))
    result: dict[str, Any] = {
        "job_id": parent_id,
        "state": summary.parent.state,
        "index": params.get("index_uid"),
        "source": params.get("source_uri"),
        "documents": int(prog.get("docs_routed", 0)),
        "bytes": int(prog.get("bytes_processed", 0)),
        "chunks": summary.chunks_total,
        "chunks_completed": summary.chunks_done,
        "per_node": prog.get("per_node", {}),
        "invalid_documents": int(prog.get("invalid_documents", 0)) + stopped_at_invalid,
        "duration_s": round(elapsed, 2),
        "mb_per_s": round(moved / 1e6 / elapsed, 1) if elapsed > 0 else 0.0,
        "failed_chunks": failed,
        "log_file": logs.display,
    }
    if outcome.interruption is not None:
        line = runtime.interrupted_line("import", parent_id, outcome.interruption, summary)
        if args.json:
            result["interrupted"] = outcome.interruption.signal_name
            result["resume"] = f"miroir-pipeline import --resume {parent_id}"
            print(json.dumps(result, indent=2))
        print(line, file=sys.stderr)
        return outcome.interruption.exit_code
    ok = summary.parent.state == JobState.COMPLETED
    if not ok and not failed:
        result["error"] = runtime.incomplete("import", parent_id)
        if outcome.crashed:
            result["error"] += f"; {outcome.crashed} worker(s) exited with an error"
            if logs.display:
                result["error"] += f", see {logs.display}"
    if outcome.crashed or before.parent.state == JobState.COMPLETED:
        # The workers record a finished import themselves; here only when one may not have.
        runtime.record_outcome(parent_id)
    empty = (
        ok
        and result["documents"] == 0
        and result["invalid_documents"] == 0
        and not params.get("allow_empty")
    )
    if empty:
        result["error"] = (
            f"no documents found in {params.get('source_uri')}; pass --allow-empty if that is expected"
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_summary(result)
    if failed:
        print(_failure_line(result, stopped_at_invalid), file=sys.stderr)
    elif "error" in result:
        print(f"error: {result['error']}", file=sys.stderr)
    return 0 if ok and not empty else 1


def _failure_line(r: dict[str, Any], stopped_at_invalid: int) -> str:
    """The one line on stderr for an import whose chunks failed for good."""
    failed = r["failed_chunks"]
    first = failed[0]
    more = f" (and {len(failed) - 1} more failed chunk(s), listed in the summary)" if len(failed) > 1 else ""
    if stopped_at_invalid:
        return (
            f"error: import {r['job_id']} stopped at {r['invalid_documents']} invalid "
            f"document(s): {first['error']}{more}"
        )
    return f"error: import {r['job_id']} failed: {first['id']}: {first['error']}{more}"


def _warn_tiny_chunks(summary: ParentSummary, workers: int) -> None:
    """One line on stderr when the chunk size planned hundreds of tiny chunks."""
    chunk_size = int(summary.parent.params.get("chunk_size_bytes", 0))
    total = int(summary.parent.params.get("bytes_total", 0))
    if summary.chunks_total <= MANY_CHUNKS or chunk_size >= TINY_CHUNK_BYTES:
        return
    suggested = TINY_CHUNK_BYTES
    target = total // max(8, 4 * workers)  # a few chunks per worker, each well past 1 MiB
    while suggested < target and suggested < SUGGESTED_MAX_BYTES:
        suggested *= 2
    print(
        f"warning: chunk size {format_size(chunk_size)} splits {format_size(total)} into "
        f"{summary.chunks_total} chunks; every chunk is a Dagster run with a fixed cost, so "
        f"tiny chunks make the import slow: try --chunk-size {format_size(suggested)}",
        file=sys.stderr,
    )


def _watch(
    store: JobStore,
    before: ParentSummary,
    procs: Sequence[subprocess.Popen[bytes]],
    stop: runtime.StopSignal,
    *,
    mode: str,
) -> ParentSummary:
    """Follow the import until it finishes, every worker exited or a signal came: a progress bar
    on a terminal, a plain line every few seconds on a pipe (``mode`` ``plain``), or nothing."""
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from miroir_pipeline.queue.contract import JobState

    parent_id = before.parent.id
    hint = pool.NoPoolHint("import", parent_id, "bytes_processed", enabled=not procs)
    total = int(before.parent.params.get("bytes_total", 0)) or 1
    bytes0 = int(before.progress.get("bytes_processed", 0))
    docs0 = int(before.progress.get("docs_routed", 0))
    finished = (JobState.COMPLETED, JobState.FAILED)
    t0 = time.monotonic()
    plain = runtime.PlainProgress()

    def line(s: ParentSummary) -> str:
        done = int(s.progress.get("bytes_processed", 0))
        rate = (done - bytes0) / 1e6 / max(time.monotonic() - t0, 1e-6)
        return (
            f"import {parent_id}: {100 * done / total:.0f}% {rate:.1f} MB/s "
            f"{int(s.progress.get('docs_routed', 0)):,} docs chunks {s.chunks_done}/{s.chunks_total}"
        )

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TransferSpeedColumn(),
        TextColumn("{task.fields[docs_s]:>9,.0f} docs/s"),
        TextColumn("chunks {task.fields[done]}/{task.fields[chunks]}"),
        TimeRemainingColumn(),
    )
    summary = before
    with Progress(*columns, disable=mode != "bar", transient=False) as bar:
        task = bar.add_task(
            parent_id, total=total, completed=bytes0, docs_s=0.0, done=0, chunks=before.chunks_total
        )
        while True:
            summary = store.parent_summary(parent_id)
            prog = summary.progress
            dt = max(time.monotonic() - t0, 1e-6)
            bar.update(
                task,
                completed=int(prog.get("bytes_processed", 0)),
                docs_s=(prog.get("docs_routed", 0) - docs0) / dt,
                done=summary.chunks_done,
            )
            done = summary.parent.state in finished or (
                bool(procs) and all(p.poll() is not None for p in procs)
            )
            hint.observe(summary)
            if mode == "plain" and not stop.requested:
                plain.tick(line(summary), force=done)
            if done or stop.requested:
                break
            time.sleep(0.25)
    return store.parent_summary(parent_id)


def _print_summary(r: dict[str, Any]) -> None:
    status = "completed" if r["state"] == "completed" else f"NOT completed ({r['state']})"
    print(f"import {r['job_id']} into index {r['index']}: {status}")
    print(
        f"  documents {r['documents']:,}  bytes {format_size(r['bytes'])}  chunks {r['chunks_completed']}/{r['chunks']}"
    )
    print(
        f"  {r['duration_s']} s, {r['mb_per_s']} MB/s, invalid documents {r['invalid_documents']}"
    )
    for node, count in sorted(r["per_node"].items()):
        print(f"  {node}: {count:,} documents")
    for f in r["failed_chunks"]:
        print(f"  FAILED {f['id']}: {f['error']}")
    if "error" in r:
        print(f"  {r['error']}")
    if r["log_file"]:
        print(f"  Dagster logs: {r['log_file']}")
