"""Routing throughput per core: ``DocumentRouter.route_block`` vs a naive json router.

Both routers read the same ~1 KiB-document NDJSON dump (``write_sample_dump``) from a file in
one process, hash ``xxh64(pk + 0xFF) % 64`` the same way, put ``_miroir_shard`` into each
document and append it to the buffer of its node (topology: 1 group x 3 local nodes, RF 1,
S 64); every 10,000 documents the buffers are taken and dropped, as a flush would.

- routed: 4 MiB line-aligned blocks via ``sources.iter_line_blocks`` and ``route_block`` on
  each in place, as ``process_dump_chunk`` reads and routes, ``take_buffers()`` at the batch size;
- naive: ``for line in file``, ``json.loads``, set ``_miroir_shard``, ``json.dumps``.

Prints MB/s of each (median of ``--repeat`` interleaved passes, file in the page cache) and
the ratio. Goals: >= 5x and >= 400 MB/s (issue 3), >= 7x and >= 500 MB/s (issue 6).

    .venv/bin/python benchmarks/routing_throughput.py [--quick] [--size 256MiB] [--repeat 3]
        [--profile] [--py-spy]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path

import _common as c

from miroir_pipeline.fleet.routing import SHARD_FIELD, Router
from miroir_pipeline.fleet.topology import Topology
from miroir_pipeline.jobs.dump_import.document_router import DocumentRouter, InvalidLine
from miroir_pipeline.sources import iter_line_blocks, resolve_dump

BLOCK = 4 * c.MIB
BATCH_DOCS = 10_000
GOALS = {"issue 3": (5.0, 400.0), "issue 6": (7.0, 500.0)}


def bench_topology() -> Topology:
    return Topology.parse(
        {
            "shards": 64,
            "replication_factor": 1,
            "groups": [
                {
                    "id": 0,
                    "nodes": [
                        {"id": f"node-{i}", "url": f"local:///nonexistent/node-{i}"}
                        for i in range(3)
                    ],
                }
            ],
        }
    )


def routed(path: Path, router: Router) -> list[int]:
    """The pipeline's hot path over the whole file; returns documents per node."""
    ref = resolve_dump(str(path), None)
    dr = DocumentRouter(router, "id", 100 * c.MIB)
    invalid: list[InvalidLine] = []
    for data, at, end, _overlong in iter_line_blocks(ref, 0, ref.size, BLOCK):
        dr.route_block(data, at_file_start=at == 0, invalid=invalid, end=end)
        if dr.buffered_docs >= BATCH_DOCS:
            dr.take_buffers()  # handed to the writers and dropped
    dr.take_buffers()
    if invalid:
        raise SystemExit(
            f"routed path found {len(invalid)} invalid lines in a sample dump: {invalid[0]}"
        )
    return dr.per_node_docs


def naive(path: Path, router: Router) -> list[int]:
    """The baseline: full json.loads / json.dumps per line, same hash and node table."""
    import xxhash

    shards = router.shards
    targets = router.targets
    n = len(router.node_ids)
    buffers: list[list[bytes]] = [[] for _ in range(n)]
    counts = [0] * n
    buffered = 0
    with open(path, "rb", buffering=BLOCK) as fh:
        for line in fh:
            if not line.strip():
                continue
            doc = json.loads(line)
            pk = doc["id"]
            key = pk if isinstance(pk, str) else str(pk)
            shard = xxhash.xxh64_intdigest(key.encode() + b"\xff") % shards
            doc[SHARD_FIELD] = shard
            out = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
            for node in targets[shard]:
                buffers[node].append(out)
                counts[node] += 1
            buffered += 1
            if buffered >= BATCH_DOCS:
                buffers = [[] for _ in range(n)]
                buffered = 0
    return counts


def profile_routed(path: Path, router: Router, top: int = 18) -> str:
    prof = cProfile.Profile()
    prof.enable()
    routed(path, router)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def py_spy_summary(path: Path, top: int = 15) -> str:
    """Run one routed pass under ``py-spy record --native`` and sum samples by leaf frame."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return "py-spy not installed (pip install py-spy)"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "routed.txt"
        cmd = [exe, "record", "--native", "--rate", "250", "--format", "raw", "-o", str(raw), "--",
               sys.executable, __file__, "--routed-only", str(path)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0 or not raw.exists():
            return f"py-spy failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
        leaf: Counter[str] = Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = stack.split(";")
            n = int(count)
            total += n
            leaf[frames[-1]] += n
    lines = [f"py-spy --native: {total} samples, self time by leaf frame"]
    for frame, n in leaf.most_common(top):
        lines.append(f"  {100 * n / total:5.1f}%  {frame[:110]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", default="256MiB", help="dump size (default 256MiB)")
    ap.add_argument(
        "--repeat", type=int, default=3, help="passes of each router; the median counts"
    )
    ap.add_argument("--quick", action="store_true", help="32MiB, 1 pass: a smoke run")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="cProfile one routed pass (top functions by self time)",
    )
    ap.add_argument(
        "--py-spy", action="store_true", help="py-spy (native frames) summary of one routed pass"
    )
    ap.add_argument("--routed-only", metavar="PATH", help=argparse.SUPPRESS)
    args = ap.parse_args()
    router = Router(bench_topology())
    if args.routed_only:  # the py-spy target: 3 passes, so start-up is a small share of samples
        for _ in range(3):
            routed(Path(args.routed_only), router)
        return
    if args.quick:
        args.size, args.repeat = "32MiB", 1
    c.header("routing throughput per core: DocumentRouter.route_block vs naive json router", args)
    path, docs = c.sample_dump(c.parse_sizes(args.size)[0])
    size = path.stat().st_size
    res = c.Results("routing_throughput", vars(args))
    # warm the page cache and check both routers place the same documents on the same nodes
    expect = naive(path, router)
    got = routed(path, router)
    if got != expect or sum(got) != docs:
        raise SystemExit(
            f"routers disagree: routed per node {got}, naive {expect}, dump has {docs} documents"
        )
    times: dict[str, list[float]] = {"routed": [], "naive": []}
    for i in range(args.repeat):
        for name, fn in (("routed", routed), ("naive", naive)):
            load = c.loadavg()[0]
            dt, _ = c.timed(partial(fn, path, router))
            times[name].append(dt)
            print(
                f"  pass {i + 1} {name:6s}: {size / 1e6 / dt:8.1f} MB/s ({dt:.2f} s, load {load:.2f})"
            )
    mbs = {k: size / 1e6 / c.median(v) for k, v in times.items()}
    ratio = mbs["routed"] / mbs["naive"]
    for name in ("routed", "naive"):
        res.add(
            router=name,
            mb_s=round(mbs[name], 1),
            docs_s=round(docs / c.median(times[name])),
            passes=len(times[name]),
            all_mb_s=[round(size / 1e6 / t, 1) for t in times[name]],
        )
    print()
    c.print_table(res.rows, ["router", "mb_s", "docs_s", "passes", "all_mb_s", "load1"])
    print(
        f"\n  dump {c.fmt_size(size)}, {docs:,} documents ({size / docs:.0f} B each); ratio routed/naive = {ratio:.2f}x"
    )
    for goal, (want_ratio, want_mbs) in GOALS.items():
        ok = ratio >= want_ratio and mbs["routed"] >= want_mbs
        print(
            f"  goal {goal}: >= {want_ratio:.0f}x and >= {want_mbs:.0f} MB/s -> {'met' if ok else 'MISSED'}"
        )
    res.rows.append({"ratio": round(ratio, 2), "size": size, "documents": docs})
    if args.profile:
        res.note("cProfile of the routed pass:\n" + profile_routed(path, router))
    if args.py_spy:
        res.note(py_spy_summary(path))
    res.save()


if __name__ == "__main__":
    main()
