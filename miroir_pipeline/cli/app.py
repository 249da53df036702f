"""The ``miroir-pipeline`` parser and entry point: build the parser from the subcommand modules,
configure logging, export the store flags, run the command and turn an expected failure into
one line on stderr (exit 2); tracebacks only at ``--log-level DEBUG``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from miroir_pipeline.cli import admin_cmd, import_cmd, reshard_cmd, runtime, sample_cmd, worker_cmd
from miroir_pipeline.cli.options import log_level

__all__ = ["build_parser", "main"]

log = logging.getLogger("miroir_pipeline")

DESCRIPTION = """\
Chunked, resumable Meilisearch dump imports and reshard backfills for a Miroir fleet,
run as Dagster chunk runs from a leased jobs table (SQLite or Postgres)."""
EPILOG = """\
environment:
  MIROIR_JOBS_DSN   jobs store: sqlite:///PATH or postgresql://... (default ./.miroir/jobs.sqlite3)
  MIROIR_TOPOLOGY   topology YAML (default: 3 local node stores under ./.miroir/nodes)
  MIROIR_HOME       home of the embedded defaults (default ./.miroir)
  DAGSTER_HOME      Dagster instance the runs are recorded in (default $MIROIR_HOME/dagster)
  MIROIR_LOG_LEVEL  default of --log-level

exit status: 0 done, 1 the job did not complete (or verification failed), 2 refused or error.
"""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; defaults that come from the environment are read now."""
    parser = argparse.ArgumentParser(
        prog="miroir-pipeline",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        type=log_level,
        default=os.environ.get("MIROIR_LOG_LEVEL", "WARNING"),
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (default $MIROIR_LOG_LEVEL, else WARNING)",
    )
    sub = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    import_cmd.add_parser(sub)
    reshard_cmd.add_parser(sub)
    worker_cmd.add_parser(sub)
    admin_cmd.add_parsers(sub)
    sample_cmd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status (0 done, 1 not completed, 2 refused or error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        runtime.export_flags(args)
        return int(args.func(args))
    except (ValueError, OSError, RuntimeError) as exc:  # includes runtime.PlanRefused
        log.debug("%s failed", args.command, exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
