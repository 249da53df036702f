"""Peak RSS of a worker process vs chunk size.

For each chunk size a fresh job store (SQLite) and 3 fresh local node stores are planned over
the same ~1 KiB-document dump (``plan_dump_import``, in this process); then a subprocess
claims the first chunk (a full ``chunk_size`` range) and processes it with
``process_dump_chunk`` under default settings (``memory_buffer_bytes`` 128 MiB, 4 MiB reads),
or with ``--memory-buffer``.
Its peak RSS is ``ru_maxrss`` from ``os.wait4`` on that child (the per-child form of
``getrusage(RUSAGE_CHILDREN)``). Baseline in the same run: the same subprocess that imports
everything and opens the store and targets but processes nothing.

``--local-cache-kib N`` sets each local node store's SQLite page cache (the store's default is
8 MiB per node, 3 nodes), to show how much of the peak is that cache rather than the pipeline.

Goal: flat within 20 % from 64 MiB to 1 GiB chunks with the window full. Under the default
128 MiB buffer a 64 MiB chunk ends before its window fills (it never holds more than itself);
``--memory-buffer 32MiB`` (8 MiB batches, a 24 MiB window) is filled by every chunk size.

    .venv/bin/python benchmarks/peak_rss.py [--quick] [--chunk-sizes 64MiB,256MiB,512MiB,1GiB]
        [--memory-buffer 32MiB] [--local-cache-kib N]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import _common as c

CHILD = r"""
import sys, json, os
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue import open_store
from miroir_pipeline.jobs.dump_import import process_dump_chunk
from miroir_pipeline.fleet.targets.factory import open_targets
from miroir_pipeline.fleet.topology import load_topology

root, chunk_id, mode, cache_kib, buffer = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[5]), int(sys.argv[6])
store = open_store(f"sqlite:///{root}/jobs.sqlite3", migrate=False)
local = {"cache_size_kib": cache_kib} if cache_kib > 0 else None
targets = open_targets(load_topology(f"{root}/topology.yaml"), local_options=local)
sized = {"memory_buffer_bytes": buffer} if buffer > 0 else {}
settings = PipelineSettings(allowed_roots=[sys.argv[4]], staging_dir=f"{root}/staging", dead_letter_dir=f"{root}/dlq", **sized)
if mode == "process":
    lease = store.claim_by_id(chunk_id, "rss-bench")
    report = process_dump_chunk(store, lease, targets, settings)
    print(json.dumps({"documents": report.documents, "bytes": report.bytes, "mb_s": report.mb_per_s}))
else:
    print(json.dumps({"documents": 0, "bytes": 0, "mb_s": 0}))
"""


def plan(root: Path, dump: Path, chunk_size: int) -> tuple[str, int]:
    """Plan the import into fresh stores under ``root``; return (first chunk id, its size)."""
    import yaml

    topo, store, targets, _settings, planned = c.plan_local_import(root, dump, chunk_size)
    (root / "topology.yaml").write_text(yaml.safe_dump(topo.model_dump(mode="json", exclude_none=True)))
    try:
        first = store.get(planned.chunk_ids[0])
        return first.id, int(first.params["end"]) - int(first.params["start"])
    finally:
        for t in targets.values():
            t.close()
        store.close()


def run_child(
    root: Path, chunk_id: str, mode: str, dump_dir: Path, cache_kib: int = 0, buffer: int = 0
) -> tuple[int, str]:
    """Run the child and reap it with ``os.wait4`` to read its own ``ru_maxrss`` (KiB on Linux)."""
    env = {**os.environ, "PYTHONPATH": str(c.REPO_ROOT)}
    out_path = root / f"child-{mode}.out"
    err_path = root / f"child-{mode}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        pid = os.posix_spawn(sys.executable, [sys.executable, "-c", CHILD, str(root), chunk_id, mode, str(dump_dir), str(cache_kib), str(buffer)], env,
                             file_actions=[(os.POSIX_SPAWN_DUP2, out.fileno(), 1), (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])  # fmt: skip
        _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"worker child failed: {err_path.read_text()[-3000:]}")
    return usage.ru_maxrss * 1024, out_path.read_text()


def main() -> None:
    import json

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--chunk-sizes", default="64MiB,256MiB,512MiB,1GiB")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "--local-cache-kib",
        type=int,
        default=0,
        help="diagnostic: SQLite page cache per local node store (default: the store's own, 64 MiB)",
    )
    ap.add_argument(
        "--memory-buffer",
        default="",
        help="the chunk's memory buffer (default: the settings' own, 128 MiB); a buffer the "
        "smallest chunk fills (e.g. 32MiB: 8 MiB batches, a 24 MiB window) is the window-full case",
    )
    ap.add_argument(
        "--quick", action="store_true", help="16MiB,64MiB,128MiB chunks of a 128MiB dump"
    )
    args = ap.parse_args()
    if args.quick:
        args.chunk_sizes = "16MiB,64MiB,128MiB"
    c.header("peak RSS of a worker process vs chunk size", args)
    sizes = c.parse_sizes(args.chunk_sizes)
    buffer = c.parse_sizes(args.memory_buffer)[0] if args.memory_buffer else 0
    dump, _docs = c.sample_dump(max(sizes))
    res = c.Results("peak_rss", vars(args))
    with c.scratch_subdir("rss-idle") as root:
        chunk_id, _ = plan(root, dump, max(sizes))
        idle = c.median(
            [
                run_child(root, chunk_id, "idle", dump.parent, args.local_cache_kib, buffer)[0]
                for _ in range(args.repeat)
            ]
        )
    res.add(
        chunk="none (imports + open store/targets)",
        chunk_bytes=0,
        peak_rss_mib=round(idle / c.MIB, 1),
    )
    print(f"  baseline (no chunk processed): {idle / c.MIB:.1f} MiB")
    peaks: dict[int, float] = {}
    for size in sizes:
        rss = []
        info: dict[str, float] = {}
        for _ in range(args.repeat):
            with c.scratch_subdir("rss-run") as root:
                chunk_id, actual = plan(root, dump, size)
                peak, out = run_child(root, chunk_id, "process", dump.parent, args.local_cache_kib, buffer)
                info = json.loads(out)
                rss.append(peak)
        peaks[size] = c.median(rss)
        res.add(
            chunk=c.fmt_size(size),
            chunk_bytes=actual,
            peak_rss_mib=round(peaks[size] / c.MIB, 1),
            above_baseline_mib=round((peaks[size] - idle) / c.MIB, 1),
            chunk_mb_s=round(info["mb_s"], 1),
        )
        print(
            f"  chunk {c.fmt_size(size)} ({actual / c.MIB:.0f} MiB): peak RSS {peaks[size] / c.MIB:.1f} MiB "
            f"(load {c.loadavg()[0]:.2f})"
        )
    print()
    c.print_table(
        res.rows,
        ["chunk", "chunk_bytes", "peak_rss_mib", "above_baseline_mib", "chunk_mb_s", "load1"],
    )
    smallest = peaks[min(sizes)]
    for size in sizes[1:]:
        ratio = peaks[size] / smallest
        print(
            f"  {c.fmt_size(size)} / {c.fmt_size(min(sizes))} peak RSS = {ratio:.2f} (goal <= 1.20) -> {'met' if ratio <= 1.2 else 'MISSED'}"
        )
    res.rows.append(
        {"ratios_vs_smallest": {c.fmt_size(s): round(peaks[s] / smallest, 3) for s in sizes}}
    )
    res.save()


if __name__ == "__main__":
    main()
