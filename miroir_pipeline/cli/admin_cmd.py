"""Operator commands over the jobs table: ``status``, ``migrate``, ``cancel`` and ``prune``.

They talk to the jobs store only (no Dagster), so they start fast and work while the Dagster
instance is down.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from miroir_pipeline.cli.options import Subparsers, add_store_options
from miroir_pipeline.util.sizes import format_size

__all__ = ["add_parsers", "parse_age", "run_cancel", "run_migrate", "run_prune", "run_status"]

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_parsers(subparsers: Subparsers) -> None:
    """Add ``status``, ``migrate``, ``cancel`` and ``prune`` to the top-level subparsers."""
    st = subparsers.add_parser(
        "status",
        help="queue depth and per-job progress",
        description="Queue depth per job type and the newest parent jobs.",
    )
    st.add_argument("--json", action="store_true", help="print queue depth and jobs as JSON")
    st.add_argument(
        "--limit",
        type=int,
        default=20,
        metavar="N",
        help="show the N newest parent jobs (default 20)",
    )
    add_store_options(st)
    st.set_defaults(func=run_status)

    mg = subparsers.add_parser(
        "migrate",
        help="apply pending jobs-table migrations",
        description="Apply pending jobs-table migrations in order; a no-op when the schema is up to date.",
    )
    add_store_options(mg)
    mg.set_defaults(func=run_migrate)

    cc = subparsers.add_parser(
        "cancel",
        help="fail a job (parent and unfinished chunks) or one chunk for good",
        description="Fail a parent job and its unfinished chunks, or one chunk, for good; a running chunk stops at its next batch.",
    )
    cc.add_argument("job_id", metavar="JOB_ID", help="id of a parent job or of one chunk")
    cc.add_argument(
        "--reason",
        default="cancelled by operator",
        metavar="TEXT",
        help="error recorded on the failed rows (default: 'cancelled by operator')",
    )
    add_store_options(cc)
    cc.set_defaults(func=run_cancel)

    pr = subparsers.add_parser(
        "prune",
        help="delete finished jobs older than an age, and staged dump copies no job names",
        description=(
            "Delete completed and failed parent jobs (with their chunks) finished longer ago than an "
            "age, then the staged dump copies (decompressed gzip, extracted .dump documents) that no "
            "remaining job names and that were not staged or reused for that age (at least an hour)."
        ),
    )
    pr.add_argument(
        "--older-than",
        default="7d",
        metavar="AGE",
        help="seconds, or a number with s, m, h or d: 90s, 12h, 7d (default 7d)",
    )
    add_store_options(pr)
    pr.set_defaults(func=run_prune)


def run_status(args: argparse.Namespace) -> int:
    """Print the queue depth of every registered job kind and the newest parents' progress."""
    from miroir_pipeline.jobs.registry import job_types
    from miroir_pipeline.queue import open_store

    store = open_store()
    depth = store.queue_depth(job_types())
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
                "documents": int(s.progress.get(_documents_key(s.parent.type), 0)),
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


def run_migrate(args: argparse.Namespace) -> int:
    """Apply pending migrations and list them."""
    from miroir_pipeline.queue import open_store

    applied = open_store(migrate=False).migrate()
    print("applied: " + ", ".join(applied) if applied else "schema up to date")
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    """Fail a job or chunk for good with the operator's reason."""
    from miroir_pipeline.queue import open_store

    changed = open_store().cancel(args.job_id, args.reason)
    print(f"cancelled {args.job_id}: {changed} row(s) failed with reason {args.reason!r}")
    return 0


def run_prune(args: argparse.Namespace) -> int:
    """Delete finished rows older than ``--older-than``, and their Dagster partitions."""
    from miroir_pipeline.cli.runtime import instance
    from miroir_pipeline.dagster.prune import prune_finished
    from miroir_pipeline.jobs.dump_import.staged_copies import prune_staged_copies
    from miroir_pipeline.jobs.settings import PipelineSettings
    from miroir_pipeline.queue import open_store

    age = parse_age(args.older_than)
    store = open_store()
    # The instance first: if it cannot be opened, nothing is deleted and no partition is orphaned.
    outcome = prune_finished(store, instance(), age)
    print(
        f"pruned {outcome.pruned.rows} finished row(s) older than {args.older_than}; "
        f"removed {outcome.partitions_removed} Dagster partition(s)"
    )
    staging_dir = PipelineSettings.from_env().staging_dir
    staged = prune_staged_copies(store, staging_dir, age)
    if staged.error:
        print(f"warning: staged dump copies were not pruned: {staged.error}", file=sys.stderr)
    print(
        f"deleted {len(staged.removed)} staged dump file(s) no job names ({staged.bytes_freed} bytes) "
        f"from {staging_dir}; kept {staged.kept_in_use} in use and {staged.kept_recent} used recently"
    )
    return 0


def _documents_key(job_type: str) -> str:
    """The progress key that counts a parent's documents, as its job kind declares it."""
    from miroir_pipeline.jobs.registry import UnknownJobKind, kind_for

    try:
        return kind_for(job_type).documents_key
    except UnknownJobKind:
        return "documents"


def parse_age(text: str) -> float:
    """Seconds from ``90s``, ``30m``, ``12h``, ``7d`` or plain seconds, 0 or more and finite;
    ``ValueError`` otherwise (a negative age would prune every finished job, NaN none or all)."""
    t = text.strip().lower()
    try:
        age = float(t[:-1]) * _AGE_UNITS[t[-1]] if t and t[-1] in _AGE_UNITS else float(t)
    except ValueError:
        raise ValueError(
            f"--older-than {text!r}: use seconds or a number with s, m, h or d (e.g. 7d)"
        ) from None
    if not 0 <= age < math.inf:  # also refuses NaN
        raise ValueError(
            f"--older-than {text!r}: must be a finite age of 0 or more: seconds or a number "
            "with s, m, h or d (e.g. 7d)"
        )
    return age
