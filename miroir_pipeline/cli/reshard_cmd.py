"""``miroir-pipeline reshard``: plan a reshard as a Dagster run, backfill the shadow index
``{uid}__reshard_{N}`` through worker processes scoped to it, then record and verify the shadow
(a blocking asset check) and mark it ready for cutover.

Exits 0 only when every chunk completed and the shadow holds exactly the live documents.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from miroir_pipeline.cli import runtime
from miroir_pipeline.cli.options import Subparsers, add_store_options

if TYPE_CHECKING:
    import dagster as dg

    from miroir_pipeline.queue.contract import JobStore, ParentSummary

__all__ = ["add_parser", "run"]


DESCRIPTION = (
    "Re-hash every document of a live index under a new shard count into the shadow index "
    "{uid}__reshard_{N}, through worker processes started for it; then verify that the shadow "
    "holds exactly the live documents and mark it ready for cutover. Exits 0 only when every "
    "chunk completed and the verification passed."
)


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add ``reshard`` to the top-level subparsers."""
    p = subparsers.add_parser(
        "reshard",
        help="re-hash a live index into a shadow index {uid}__reshard_{N} and verify it",
        description=DESCRIPTION,
    )
    p.add_argument("--index", required=True, metavar="UID", help="uid of the live index")
    p.add_argument(
        "--new-shards", type=int, required=True, metavar="N", help="shard count of the shadow index"
    )
    p.add_argument(
        "--new-topology",
        metavar="FILE",
        help="topology YAML of the shadow (default: the live nodes with the new shard count)",
    )
    p.add_argument(
        "--shards-per-chunk",
        type=int,
        default=8,
        metavar="N",
        help="live shards per chunk (default 8)",
    )
    p.add_argument(
        "--workers", type=int, default=2, metavar="N", help="worker processes to start (default 2)"
    )
    p.add_argument(
        "--replace-shadow",
        action="store_true",
        help="delete a shadow index left by an earlier reshard first",
    )
    p.add_argument(
        "--json", action="store_true", help="print the summary as JSON (no progress bar)"
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar; print only the summary"
    )
    add_store_options(
        p,
        topology_help="live topology YAML (default $MIROIR_TOPOLOGY, else 3 local nodes under ./.miroir/nodes)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Plan, backfill, verify and summarize one reshard."""
    from miroir_pipeline.queue import open_store
    from miroir_pipeline.queue.contract import JobState

    quiet = args.json or args.no_progress
    store = open_store()
    instance = runtime.instance()
    config = {
        "index_uid": args.index,
        "new_shards": args.new_shards,
        "shards_per_chunk": args.shards_per_chunk,
        "new_topology_path": os.path.abspath(args.new_topology) if args.new_topology else None,
        "replace_shadow": bool(args.replace_shadow),
    }
    names = runtime.names()
    parent_id = runtime.run_plan(names.plan_reshard_job, names.plan_reshard_op, config, instance)
    parent = store.get(parent_id)
    old_shards = int(parent.params["old_shards"])
    started = time.monotonic()
    summary = runtime.run_workers_for(
        parent_id,
        args.workers,
        lambda procs: _watch(store, parent_id, old_shards, procs, quiet=quiet),
    )
    backfill_s = time.monotonic() - started
    prog = summary.progress
    result: dict[str, Any] = {
        "job_id": parent_id,
        "state": summary.parent.state,
        "index": args.index,
        "shadow_index": parent.params["shadow_uid"],
        "old_shards": parent.params["old_shards"],
        "new_shards": parent.params["new_shards"],
        "documents": int(prog.get("documents_backfilled", 0)),
        "chunks": summary.chunks_total,
        "chunks_completed": summary.chunks_done,
        "per_node": dict(prog.get("per_node", {})),
        "backfill_s": round(backfill_s, 2),
        "docs_per_s": round(prog.get("documents_backfilled", 0) / backfill_s, 1)
        if backfill_s > 0
        else 0.0,
        "failed_chunks": runtime.failed_chunks(store, parent_id),
        "verification": "not run",
    }
    ok = summary.parent.state == JobState.COMPLETED
    if not ok:
        if not result["failed_chunks"]:
            result["error"] = runtime.INCOMPLETE
    else:
        ok = _verify(parent_id, instance, result)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_summary(result)
    return 0 if ok else 1


def _verify(parent_id: str, instance: dg.DagsterInstance, result: dict[str, Any]) -> bool:
    """Materialize the shadow and run its check; record the outcome in ``result``."""
    from miroir_pipeline.dagster.reshard_assets import latest_verification

    names = runtime.names()
    ops = {names.reshard_shadow_op: {"config": {"parent_job_id": parent_id}}}
    verify = runtime.run_job(names.reshard_verify_job, ops, instance)
    passed, why, meta = latest_verification(instance, names.key_prefix)
    if meta:
        result["per_node"] = meta.get("shadow_per_node", result["per_node"])
    if passed:
        result["verification"] = "passed"
        result["ready_for_cutover"] = verify.success
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
    *,
    quiet: bool,
) -> ParentSummary:
    """Progress bar over the live shards until the reshard finishes or every worker exited."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from miroir_pipeline.queue.contract import JobState

    finished = (JobState.COMPLETED, JobState.FAILED)
    t0 = time.monotonic()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("shards {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[docs]:>11,} docs"),
        TextColumn("{task.fields[docs_s]:>9,.0f} docs/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=quiet, transient=False) as bar:
        task = bar.add_task(parent_id, total=old_shards, docs=0, docs_s=0.0)
        while True:
            summary = store.parent_summary(parent_id)
            docs = int(summary.progress.get("documents_backfilled", 0))
            bar.update(
                task,
                completed=int(summary.progress.get("shards_done", 0)),
                docs=docs,
                docs_s=docs / max(time.monotonic() - t0, 1e-6),
            )
            if summary.parent.state in finished or all(p.poll() is not None for p in procs):
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
    if v == "passed":
        print("  verification: passed; the shadow is ready for cutover in Miroir")
    elif isinstance(v, dict):
        print(f"  verification: FAILED: {v.get('summary')}")
        for kind in ("missing", "extra", "altered"):
            if v.get(kind):
                print(f"    {kind}: {', '.join(map(str, v[kind]))}")
        for line in v.get("misplaced_detail") or []:
            print(f"    misplaced {line}")
    if "error" in r:
        print(f"  {r['error']}")
