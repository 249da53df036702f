"""``miroir-pipeline reshard``: plan a reshard as a Dagster run, backfill the shadow index
``{uid}__reshard_{N}`` through worker processes scoped to it, then record and verify the shadow
(a blocking asset check) and mark it ready for cutover.

``--resume JOB_ID`` runs the remaining chunks of an interrupted reshard, then verifies. Exits 0
only when every chunk completed and the shadow holds exactly the live documents.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from miroir_pipeline.cli import collector, pool, runtime
from miroir_pipeline.cli.errors import CliError, format_validation_error
from miroir_pipeline.cli.options import (
    Subparsers,
    add_store_options,
    non_negative_int,
    positive_int,
    stdout_is_terminal,
)

if TYPE_CHECKING:
    import dagster as dg

    from miroir_pipeline.jobs.reshard_backfill.params import ReshardRequest
    from miroir_pipeline.queue.contract import JobStore, ParentSummary

__all__ = ["add_parser", "run"]


DESCRIPTION = (
    "Re-hash every document of a live index under a new shard count into the shadow index "
    "{uid}__reshard_{N}, through worker processes started for it (or, with --workers 0, a worker "
    "pool already running); then verify that the shadow "
    "holds exactly the live documents and mark it ready for cutover. Exits 0 only when every "
    "chunk completed and the verification passed. Ctrl-C or SIGTERM hands the running chunks "
    "back at their cursors; --resume JOB_ID carries on from there."
)

#: Request fields and the flags that set them, for one-line validation errors.
FLAGS = {
    "index_uid": "--index",
    "new_shards": "--new-shards",
    "shards_per_chunk": "--shards-per-chunk",
}


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add ``reshard`` to the top-level subparsers."""
    p = subparsers.add_parser(
        "reshard",
        help="re-hash a live index into a shadow index {uid}__reshard_{N} and verify it",
        description=DESCRIPTION,
    )
    p.add_argument(
        "--index", metavar="UID", help="uid of the live index (required unless --resume)"
    )
    p.add_argument(
        "--new-shards",
        type=positive_int,
        metavar="N",
        help="shard count of the shadow index (required unless --resume)",
    )
    p.add_argument(
        "--new-topology",
        metavar="FILE",
        help="topology YAML of the shadow (default: the live nodes with the new shard count)",
    )
    p.add_argument(
        "--shards-per-chunk",
        type=positive_int,
        default=8,
        metavar="N",
        help="live shards per chunk (default 8)",
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=2,
        metavar="N",
        help="worker processes to start (default 2); 0 starts none and leaves the chunks to a "
        "worker pool already running against the same jobs store (`miroir-pipeline worker`), "
        "then verifies once the pool has run them",
    )
    p.add_argument(
        "--replace-shadow",
        action="store_true",
        help="delete a shadow index left by an earlier reshard first (on live and new nodes alike)",
    )
    p.add_argument(
        "--resume",
        metavar="JOB_ID",
        help="run the remaining chunks of an unfinished reshard from their cursors, then verify (nothing is planned again)",
    )
    p.add_argument(
        "--json", action="store_true", help="print only the summary, as JSON (no progress)"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar or lines; print only the summary"
    )
    add_store_options(
        p,
        topology_help="live topology YAML (default $MIROIR_TOPOLOGY, else 3 local nodes under ./.miroir/nodes)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Plan (or resume), backfill, verify and summarize one reshard."""
    from miroir_pipeline.queue import open_store

    if args.resume:
        return _resume(args)
    request = _request(args)
    store = open_store()
    logs = runtime.DagsterLogs.start("reshard", args.log_level)
    config = {
        **request.model_dump(),
        "new_topology_path": os.path.abspath(args.new_topology) if args.new_topology else None,
    }
    names = runtime.names()
    with runtime.raise_on_sigterm("the reshard"):
        try:
            parent_id = runtime.run_plan(
                names.plan_reshard_job, names.plan_reshard_op, config, runtime.instance(), logs
            )
        except runtime.PlanRefused:
            logs.discard()
            raise
    logs.adopt(parent_id)
    return _run_and_report(args, store, parent_id, logs)


def _request(args: argparse.Namespace) -> ReshardRequest:
    """The request the flags make, validated here so a mistake is one line naming the flag."""
    from pydantic import ValidationError

    from miroir_pipeline.jobs.dump_import.params import INDEX_UID_RULE
    from miroir_pipeline.jobs.reshard_backfill.params import ReshardRequest

    missing = [f for f, v in (("--index", args.index), ("--new-shards", args.new_shards)) if not v]
    if missing:
        raise CliError(
            f"reshard needs {' and '.join(missing)} (or --resume JOB_ID to continue an unfinished reshard)"
        )
    try:
        return ReshardRequest(
            index_uid=args.index,
            new_shards=args.new_shards,
            shards_per_chunk=args.shards_per_chunk,
            replace_shadow=bool(args.replace_shadow),
        )
    except ValidationError as exc:
        raise CliError(
            format_validation_error(exc, FLAGS, rules={"index_uid": INDEX_UID_RULE})
        ) from None


def _resume(args: argparse.Namespace) -> int:
    """Run the remaining chunks of an unfinished reshard, then verify; nothing is planned again."""
    from miroir_pipeline.jobs.reshard_backfill.params import RESHARD_BACKFILL

    planning = [
        flag
        for flag, value in (
            ("--index", args.index),
            ("--new-shards", args.new_shards),
            ("--new-topology", args.new_topology),
            ("--replace-shadow", args.replace_shadow),
        )
        if value
    ]
    job_id = args.resume
    store, _ = runtime.resumable_parent(
        job_id,
        job_type=RESHARD_BACKFILL,
        what="reshard",
        planning_flags=planning,
        restart_hint="run the reshard again with --replace-shadow",
    )
    return _run_and_report(args, store, job_id, runtime.DagsterLogs.of_job(job_id, args.log_level))


def _run_and_report(
    args: argparse.Namespace, store: JobStore, parent_id: str, logs: runtime.DagsterLogs
) -> int:
    """Backfill the parent's chunks in worker processes, verify, then print the summary."""
    from miroir_pipeline.queue.contract import JobState

    mode = "none" if args.json or args.no_progress else "bar" if stdout_is_terminal() else "plain"
    parent = store.get(parent_id)
    old_shards = int(parent.params["old_shards"])
    started = time.monotonic()
    before = store.parent_summary(parent_id)
    docs0 = int(before.progress.get("documents_backfilled", 0))
    if parent.state == JobState.COMPLETED:
        outcome: runtime.WorkersOutcome[ParentSummary] = runtime.WorkersOutcome(before, None, 0)
    elif args.workers == 0:
        collector.started()  # loaded; from here on it follows the pool's work, for hours maybe
        with runtime.StopSignal() as stop:
            followed = _watch(store, parent_id, old_shards, [], stop, mode=mode)
        if stop.requested:
            return pool.left_to_pool("reshard", store, parent_id, stop, as_json=args.json)
        outcome = runtime.WorkersOutcome(followed, None, 0)
    else:
        outcome = runtime.run_workers_for(
            parent_id,
            args.workers,
            lambda procs, stop: _watch(store, parent_id, old_shards, procs, stop, mode=mode),
            store=store,
            logs=logs,
        )
    backfill_s = time.monotonic() - started
    summary = store.parent_summary(parent_id)
    prog = summary.progress
    docs = int(prog.get("documents_backfilled", 0))
    result: dict[str, Any] = {
        "job_id": parent_id,
        "state": summary.parent.state,
        "index": parent.params["index_uid"],
        "shadow_index": parent.params["shadow_uid"],
        "old_shards": parent.params["old_shards"],
        "new_shards": parent.params["new_shards"],
        "documents": docs,
        "chunks": summary.chunks_total,
        "chunks_completed": summary.chunks_done,
        "per_node": dict(prog.get("per_node", {})),
        "backfill_s": round(backfill_s, 2),
        "docs_per_s": round((docs - docs0) / backfill_s, 1) if backfill_s > 0 else 0.0,
        "failed_chunks": runtime.failed_chunks(store, parent_id),
        "verification": "not run",
        "log_file": logs.display,
    }
    if outcome.interruption is not None:
        line = runtime.interrupted_line("reshard", parent_id, outcome.interruption, summary)
        if args.json:
            result["interrupted"] = outcome.interruption.signal_name
            result["resume"] = f"miroir-pipeline reshard --resume {parent_id}"
            print(json.dumps(result, indent=2, default=str))
        print(line, file=sys.stderr)
        return outcome.interruption.exit_code
    ok = summary.parent.state == JobState.COMPLETED
    if not ok:
        if not result["failed_chunks"]:
            result["error"] = runtime.incomplete("reshard", parent_id)
            if outcome.crashed:
                result["error"] += f"; {outcome.crashed} worker(s) exited with an error"
                if logs.display:
                    result["error"] += f", see {logs.display}"
    else:
        with runtime.raise_on_sigterm("the verification"):
            ok = _verify(parent_id, runtime.instance(), result, logs)
    runtime.record_outcome(parent_id)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_summary(result)
    if result["failed_chunks"]:
        first = result["failed_chunks"][0]
        more = len(result["failed_chunks"]) - 1
        print(
            f"error: reshard {parent_id} failed: {first['id']}: {first['error']}"
            + (f" (and {more} more failed chunk(s), listed in the summary)" if more else ""),
            file=sys.stderr,
        )
    elif "error" in result:
        print(f"error: {result['error']}", file=sys.stderr)
    return 0 if ok else 1


def _verify(
    parent_id: str,
    instance: dg.DagsterInstance,
    result: dict[str, Any],
    logs: runtime.DagsterLogs | None = None,
) -> bool:
    """Materialize the shadow and run its check; record the outcome in ``result``."""
    from miroir_pipeline.dagster.reshard_assets import latest_verification

    names = runtime.names()
    ops = {names.reshard_shadow_op: {"config": {"parent_job_id": parent_id}}}
    verify = runtime.run_job(names.reshard_verify_job, ops, instance, logs)
    passed, why, meta = latest_verification(instance, names.key_prefix, verify.run_id)
    if meta:
        result["per_node"] = meta.get("shadow_per_node", result["per_node"])
    if passed:
        result["verification"] = "passed"
        result["ready_for_cutover"] = verify.success
        if not verify.success:  # the check passed, but the cutover was not recorded
            result["error"] = (
                f"the shadow passed its check, but recording it as ready for cutover failed: "
                f"{runtime.run_failure(verify)}; run `miroir-pipeline reshard --resume {parent_id}` "
                "to verify and record it again"
            )
        return verify.success
    elif meta:
        result["verification"] = {
            "status": "failed",
            "summary": meta.get("summary", why),
            "live_documents": meta.get("live_documents"),
            "shadow_documents": meta.get("shadow_documents"),
            "missing_count": meta.get("missing_count"),
            "extra_count": meta.get("extra_count"),
            "altered_count": meta.get("altered_count"),
            "misplaced_count": meta.get("misplaced_count"),
            **(meta.get("divergences") or {}),
        }
    else:
        result["verification"] = {
            "status": "failed",
            "summary": f"{why}; {runtime.run_failure(verify)}",
        }
    return passed


def _watch(
    store: JobStore,
    parent_id: str,
    old_shards: int,
    procs: Sequence[subprocess.Popen[bytes]],
    stop: runtime.StopSignal,
    *,
    mode: str,
) -> ParentSummary:
    """Follow the backfill until it finishes, every worker exited or a signal came: a progress
    bar on a terminal, a plain line every few seconds on a pipe (``mode`` ``plain``), or nothing.
    With no ``procs`` a worker pool serves it, and a hint says so if none claims a chunk."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from miroir_pipeline.queue.contract import JobState

    finished = (JobState.COMPLETED, JobState.FAILED)
    t0 = time.monotonic()
    docs0 = int(store.parent_summary(parent_id).progress.get("documents_backfilled", 0))
    plain = runtime.PlainProgress()
    hint = pool.NoPoolHint("reshard", parent_id, "documents_backfilled", enabled=not procs)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("shards {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[docs]:>11,} docs"),
        TextColumn("{task.fields[docs_s]:>9,.0f} docs/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=mode != "bar", transient=False) as bar:
        task = bar.add_task(parent_id, total=old_shards, docs=0, docs_s=0.0)
        while True:
            summary = store.parent_summary(parent_id)
            docs = int(summary.progress.get("documents_backfilled", 0))
            shards = int(summary.progress.get("shards_done", 0))
            rate = (docs - docs0) / max(time.monotonic() - t0, 1e-6)
            bar.update(task, completed=shards, docs=docs, docs_s=rate)
            done = summary.parent.state in finished or (
                bool(procs) and all(p.poll() is not None for p in procs)
            )
            hint.observe(summary)
            if mode == "plain" and not stop.requested:
                plain.tick(
                    f"reshard {parent_id}: shards {shards}/{old_shards} {docs:,} docs "
                    f"{rate:,.0f} docs/s chunks {summary.chunks_done}/{summary.chunks_total}",
                    force=done,
                )
            if done or stop.requested:
                break
            time.sleep(0.25)
    return store.parent_summary(parent_id)


def _print_summary(r: dict[str, Any]) -> None:
    status = "completed" if r["state"] == "completed" else f"NOT completed ({r['state']})"
    print(
        f"reshard {r['job_id']}: {r['index']} {r['old_shards']} -> {r['new_shards']} shards "
        f"into {r['shadow_index']}: backfill {status}"
    )
    print(
        f"  documents {r['documents']:,}  chunks {r['chunks_completed']}/{r['chunks']}  "
        f"{r['backfill_s']} s, {r['docs_per_s']:,} docs/s"
    )
    for node, count in sorted(r["per_node"].items()):
        print(f"  {node}: {count:,} documents")
    for f in r["failed_chunks"]:
        print(f"  FAILED {f['id']}: {f['error']}")
    v = r["verification"]
    if v == "passed" and r.get("ready_for_cutover"):
        print("  verification: passed; the shadow is ready for cutover in Miroir")
    elif v == "passed":
        print("  verification: passed; NOT recorded as ready for cutover (below)")
    elif isinstance(v, dict):
        print(f"  verification: FAILED: {v.get('summary')}")
        for kind in ("missing", "extra", "altered"):
            if v.get(kind):
                print(f"    {kind}: {', '.join(map(str, v[kind]))}")
        for line in v.get("misplaced_detail") or []:
            print(f"    misplaced {line}")
    if "error" in r:
        print(f"  {r['error']}")
    if r.get("log_file"):
        print(f"  Dagster logs: {r['log_file']}")
