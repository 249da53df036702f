"""``miroir-pipeline reshard`` (DESIGN §12): plan as a Dagster run, backfill through worker
subprocesses scoped to the reshard, then record and verify the shadow (blocking asset check)
and mark it ready for cutover. Exits 0 only when every chunk completed and the check passed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["add_reshard_parser", "cmd_reshard"]


def add_reshard_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``reshard`` subcommand to ``subparsers`` (``build_parser``'s ``add_subparsers``)."""
    rs = subparsers.add_parser(
        "reshard",
        help="re-hash a live index into a shadow index {uid}__reshard_{N} and verify it",
    )
    rs.add_argument("--index", required=True, help="uid of the live index")
    rs.add_argument("--new-shards", type=int, required=True, help="shard count of the shadow index")
    rs.add_argument("--new-topology", help="topology YAML of the shadow (default: the live nodes with the new shard count)")
    rs.add_argument("--shards-per-chunk", type=int, default=8, help="live shards per chunk (default 8)")
    rs.add_argument("--workers", type=int, default=2)
    rs.add_argument("--replace-shadow", action="store_true", help="delete a shadow index left by an earlier reshard first")
    rs.add_argument("--json", action="store_true")
    rs.add_argument("--no-progress", action="store_true")
    rs.add_argument("--jobs-dsn", help="jobs store DSN (default $MIROIR_JOBS_DSN or a SQLite file under ./.miroir)")
    rs.add_argument("--topology", help="live topology YAML (default $MIROIR_TOPOLOGY or 3 local nodes under ./.miroir/nodes)")
    rs.set_defaults(func=cmd_reshard)
    return rs  # type: ignore[no-any-return]


def cmd_reshard(args: argparse.Namespace) -> int:
    from miroir_pipeline.cli.main import (
        QUIET_RUN_LOGS,
        _instance,
        _run_failure,
        run_plan,
        run_workers_for,
    )
    from miroir_pipeline.dagster.definitions import defs
    from miroir_pipeline.dagster.reshard_assets import latest_verification
    from miroir_pipeline.queue import open_store
    from miroir_pipeline.queue.contract import JobState

    quiet = args.json or args.no_progress
    store = open_store()
    instance = _instance()
    config = {
        "index_uid": args.index,
        "new_shards": args.new_shards,
        "shards_per_chunk": args.shards_per_chunk,
        "new_topology_path": os.path.abspath(args.new_topology) if args.new_topology else None,
        "replace_shadow": bool(args.replace_shadow),
    }
    parent_id = run_plan("plan_reshard_job", "plan_reshard_op", config, instance)
    parent = store.get(parent_id)
    started = time.monotonic()
    summary = run_workers_for(
        parent_id, args.workers, lambda procs: _watch(store, parent_id, int(parent.params["old_shards"]), procs, quiet=quiet)
    )
    backfill_s = time.monotonic() - started
    prog = summary.progress
    failed = [c for c in store.children(parent_id) if c.state == JobState.FAILED]
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
        "docs_per_s": round(prog.get("documents_backfilled", 0) / backfill_s, 1) if backfill_s > 0 else 0.0,
        "failed_chunks": [{"id": c.id, "error": c.error} for c in failed],
        "verification": "not run",
    }
    ok = summary.parent.state == JobState.COMPLETED
    if not ok:
        if not failed:
            result["error"] = "workers exited before every chunk completed; run `miroir-pipeline worker` to finish"
    else:
        verify = defs.resolve_job_def("reshard_verify_job").execute_in_process(
            run_config={"ops": {"miroir__reshard_shadow": {"config": {"parent_job_id": parent_id}}}, **QUIET_RUN_LOGS},
            instance=instance,
            raise_on_error=False,
        )
        passed, why, meta = latest_verification(instance)
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
            result["verification"] = {"status": "failed", "summary": f"{why}; {_run_failure(verify)}"}
        ok = passed
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_summary(result)
    return 0 if ok else 1


def _watch(store: Any, parent_id: str, old_shards: int, procs: Sequence[subprocess.Popen[bytes]], *, quiet: bool) -> Any:
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
