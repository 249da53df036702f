"""``miroir-pipeline import``: plan a dump import as a Dagster run, run its chunks in worker
processes scoped to it while a progress bar follows the bytes, then print the totals.

Exits 0 only when every chunk completed; ``--json`` prints the summary as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from miroir_pipeline.cli import runtime
from miroir_pipeline.cli.options import Subparsers, add_store_options
from miroir_pipeline.util.sizes import format_size, parse_size

if TYPE_CHECKING:
    from miroir_pipeline.queue.contract import JobStore, ParentSummary

__all__ = ["add_parser", "run"]


DESCRIPTION = (
    "Plan a dump import as a Dagster run, run its chunks in worker processes started for it "
    "while a progress bar follows the bytes, then print the totals. Exits 0 only when every "
    "chunk completed."
)


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
        help="the dump: a path, file://, s3://, gs:// or hdfs:// URI (inside the allowed roots)",
    )
    p.add_argument("--index", required=True, metavar="UID", help="uid of the index to import into")
    p.add_argument(
        "--primary-key",
        metavar="PK",
        help="primary-key field (default: a .dump's metadata, else the one field of the first document whose name ends in 'id')",
    )
    p.add_argument(
        "--workers", type=int, default=2, metavar="N", help="worker processes to start (default 2)"
    )
    p.add_argument(
        "--chunk-size",
        metavar="SIZE",
        help="bytes per chunk, plain or with units: 64KiB, 256MiB, 1GiB (default 256MiB)",
    )
    p.add_argument(
        "--on-invalid",
        choices=["fail", "skip"],
        default=None,
        help="an invalid document fails its chunk (fail) or goes to the dead-letter file and is counted (skip); default $MIROIR_ON_INVALID_DOCUMENT, else fail",
    )
    p.add_argument(
        "--json", action="store_true", help="print the summary as JSON (no progress bar)"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar; print only the summary"
    )
    add_store_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Plan, run and summarize one dump import."""
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
    names = runtime.names()
    parent_id = runtime.run_plan(
        names.plan_dump_import_job, names.plan_dump_import_op, config, runtime.instance()
    )
    quiet = args.json or args.no_progress
    started = time.monotonic()
    summary = runtime.run_workers_for(
        parent_id, args.workers, lambda procs: _watch(store, parent_id, procs, quiet=quiet)
    )
    elapsed = time.monotonic() - started
    prog = summary.progress
    result: dict[str, Any] = {
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
        "mb_per_s": round(prog.get("bytes_processed", 0) / 1e6 / elapsed, 1)
        if elapsed > 0
        else 0.0,
        "failed_chunks": runtime.failed_chunks(store, parent_id),
    }
    ok = summary.parent.state == JobState.COMPLETED
    if not ok and not result["failed_chunks"]:
        result["error"] = runtime.INCOMPLETE
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_summary(result)
    return 0 if ok else 1


def _watch(
    store: JobStore, parent_id: str, procs: Sequence[subprocess.Popen[bytes]], *, quiet: bool
) -> ParentSummary:
    """Progress bar over the dump's bytes until the import finishes or every worker exited."""
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
