"""``miroir-pipeline sample-dump``: write a synthetic NDJSON dump (for demos and benchmarks)."""

from __future__ import annotations

import argparse

from miroir_pipeline.cli.options import Subparsers
from miroir_pipeline.util.sizes import format_size, parse_size

__all__ = ["add_parser", "run"]


DESCRIPTION = (
    "Write a synthetic NDJSON dump of ~1 KiB documents (string and integer ids in the field id, "
    "nested fields, unicode), the same file for the same seed and size."
)


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add ``sample-dump`` to the top-level subparsers."""
    p = subparsers.add_parser(
        "sample-dump",
        help="write a synthetic NDJSON dump (primary key id) for demos and benchmarks",
        description=DESCRIPTION,
    )
    p.add_argument("path", metavar="PATH", help="file to write (parent folders are created)")
    p.add_argument(
        "--size",
        default="64MiB",
        metavar="SIZE",
        help="about how many bytes to write, e.g. 3MiB, 1GiB (default 64MiB)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="N",
        help="random seed; the same seed and size write the same file (default 0)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Write the dump and say how much was written."""
    from miroir_pipeline.jobs.dump_import.sample_dump import write_sample_dump

    docs, written = write_sample_dump(args.path, parse_size(args.size), seed=args.seed)
    print(f"wrote {docs:,} documents ({format_size(written)}) to {args.path}")
    return 0
