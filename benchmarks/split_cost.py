"""Split cost vs dump size: ``chunking.split_dump`` time and bytes read, vs a naive whole-file split.

Test dumps are sparse files: ``truncate`` to the size, then in every 256 KiB region one ``\\n``
is written at a random offset (seeded) with ``pwrite``. So a 10 GiB dump costs ~160 MiB of disk
and seconds to build, yet has a newline every ~256 KiB (a "line" of NUL bytes in between: the
splitter only looks for ``\\n``). Before each cold measurement the file's pages are dropped from
the page cache with ``posix_fadvise(DONTNEED)`` (this file only; nothing global).

Baseline in the same run (on the 1 GiB dump only): a naive split that reads the whole file in
8 MiB blocks and cuts at the first newline after each ``chunk_size`` boundary. Reading holes
is cheap (no disk), which flatters the naive split; so both are also run on a real 1 GiB
sample dump (``--real``), cold.

Goal: 10 GiB split in < 1 s reading < 0.1 % of the file.

    .venv/bin/python benchmarks/split_cost.py [--quick] [--sizes 1GiB,10GiB] [--chunk-size 256MiB]
"""

from __future__ import annotations

import argparse
import os
import random
from functools import partial
from pathlib import Path
from typing import Any

import _common as c

from miroir_pipeline.sources import resolve_dump
from miroir_pipeline.sources.split import ByteRange, split_dump

REGION = 256 * 1024


def make_sparse_dump(path: Path, size: int, seed: int = 0) -> int:
    """Sparse file of ``size`` bytes with one newline at a random offset per 256 KiB region."""
    rng = random.Random(seed)
    newlines = 0
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
    try:
        os.ftruncate(fd, size)
        for region in range(0, size, REGION):
            os.pwrite(fd, b"\n", region + rng.randrange(min(REGION, size - region)))
            newlines += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    return newlines


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def naive_split(path: Path, chunk_size: int) -> tuple[list[ByteRange], int]:
    """Read everything; cut at the first newline at or after each chunk boundary."""
    ranges: list[ByteRange] = []
    start = 0
    pos = 0
    read = 0
    want = chunk_size - 1
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(8 * c.MIB):
            read += len(block)
            i = 0
            while True:
                probe = max(start + want - pos, i)
                if probe >= len(block):
                    break
                nl = block.find(b"\n", probe)
                if nl < 0:
                    break
                cut = pos + nl + 1
                ranges.append(ByteRange(start, cut))
                start = cut
                i = nl + 1
            pos += len(block)
    if start < pos:
        ranges.append(ByteRange(start, pos))
    return ranges, read


def measure(
    res: c.Results, path: Path, label: str, chunk: int, repeat: int, *, naive: bool
) -> dict[str, Any]:
    """split_dump cold (page cache dropped) and warm; with ``naive``, the whole-file baseline too."""
    size = path.stat().st_size
    ref = resolve_dump(str(path), None)
    cold: list[float] = []
    warm: list[float] = []
    result = None
    for _ in range(repeat):
        drop_cache(path)
        dt, result = c.timed(partial(split_dump, ref, chunk))
        cold.append(dt)
        dt, _ = c.timed(partial(split_dump, ref, chunk))
        warm.append(dt)
    assert result is not None
    row: dict[str, Any] = {
        "dump": label,
        "method": "split_dump",
        "chunks": len(result.ranges),
        "cold_s": c.median(cold),
        "warm_s": c.median(warm),
        "bytes_read": result.bytes_read,
        "read_pct": round(100 * result.bytes_read / size, 4),
    }
    if naive:
        naive_cold: list[float] = []
        nranges: list[ByteRange] = []
        nread = 0
        for _ in range(repeat):
            drop_cache(path)
            dt, (nranges, nread) = c.timed(partial(naive_split, path, chunk))
            naive_cold.append(dt)
        if nranges != result.ranges:
            raise SystemExit(f"naive split and split_dump disagree on {path.name}")
        baseline = c.median(naive_cold)
        res.add(dump=label, method="naive (reads all)", chunks=len(nranges), cold_s=baseline, bytes_read=nread,
                read_pct=round(100 * nread / size, 2))  # fmt: skip
        row["speedup_vs_naive"] = round(baseline / row["cold_s"], 1)
    res.add(**row)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="1GiB,10GiB")
    ap.add_argument("--chunk-size", default="256MiB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="256MiB and 1GiB dumps, 1 pass")
    ap.add_argument("--keep", action="store_true", help="keep the sparse dumps")
    ap.add_argument(
        "--real", default="1GiB", help="also a real sample dump of this size, cold ('' to skip)"
    )
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.repeat, args.real = "256MiB,1GiB", 1, "128MiB"
    c.header("split cost vs dump size (sparse dumps, one newline per 256 KiB)", args)
    sizes = c.parse_sizes(args.sizes)
    chunk = c.parse_sizes(args.chunk_size)[0]
    res = c.Results("split_cost", vars(args))
    root = c.scratch_dir("split")
    try:
        for size in sizes:
            path = root / f"sparse-{size}.ndjson"
            built, newlines = c.timed(partial(make_sparse_dump, path, size))
            print(
                f"  built {path.name}: {c.fmt_size(size)} with {newlines:,} newlines in {built:.1f} s "
                f"({os.stat(path).st_blocks * 512 / c.MIB:.0f} MiB on disk)"
            )
            naive = size == c.GIB or (size == sizes[-1] and c.GIB not in sizes)
            row = measure(res, path, f"{c.fmt_size(size)} sparse", chunk, args.repeat, naive=naive)
            if size >= 10 * c.GIB:
                ok = row["cold_s"] < 1.0 and row["read_pct"] < 0.1
                print(
                    f"  goal: {c.fmt_size(size)} split in < 1 s reading < 0.1 % -> {'met' if ok else 'MISSED'}"
                )
            if not args.keep:
                path.unlink()
        if args.real:
            dump, _ = c.sample_dump(c.parse_sizes(args.real)[0])
            measure(
                res,
                dump,
                f"{c.fmt_size(dump.stat().st_size)} real NDJSON",
                chunk,
                args.repeat,
                naive=True,
            )
    finally:
        if not args.keep:
            for p in root.glob("sparse-*.ndjson"):
                p.unlink()
    print()
    c.print_table(
        res.rows,
        [
            "dump",
            "method",
            "chunks",
            "cold_s",
            "warm_s",
            "bytes_read",
            "read_pct",
            "speedup_vs_naive",
            "load1",
        ],
    )
    res.save()


if __name__ == "__main__":
    main()
