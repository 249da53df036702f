"""The ``miroir-pipeline`` parser and entry point: build the parser from the subcommand modules,
configure logging, export the store flags, run the command and turn an expected failure into
one line on stderr (exit 2; a usage error too); tracebacks only at ``--log-level DEBUG``.
Ctrl-C or SIGTERM before a command's workers start is one line too (exit 130 or 143). A reader
that closes the output early (``status | head``) ends the command quietly with 141, as SIGPIPE
ends other tools."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from miroir_pipeline.cli import (
    admin_cmd,
    collector,
    import_cmd,
    reshard_cmd,
    runtime,
    sample_cmd,
    worker_cmd,
)
from miroir_pipeline.cli.errors import format_validation_error
from miroir_pipeline.cli.options import Parser, log_level, positive_int

__all__ = ["build_parser", "main", "program"]

log = logging.getLogger("miroir_pipeline")

DESCRIPTION = """\
Chunked, resumable Meilisearch dump imports and reshard backfills for a Miroir fleet,
run as Dagster chunk runs from a leased jobs table (SQLite or Postgres)."""
EPILOG = """\
environment:
  MIROIR_JOBS_DSN   jobs store: sqlite:///PATH or postgresql://... (default $MIROIR_HOME/jobs.sqlite3)
  MIROIR_TOPOLOGY   topology YAML (default: 3 local node stores under ./.miroir/nodes)
  MIROIR_HOME       home of the embedded defaults and of the import/reshard logs (default ./.miroir)
  MIROIR_ALLOWED_ROOTS  comma-separated roots dump URIs must lie under (default: the current directory)
  DAGSTER_HOME      Dagster instance the runs are recorded in (default $MIROIR_HOME/dagster)
  MIROIR_LOG_LEVEL  default of --log-level

exit status: 0 done, 1 the job did not complete (or verification failed), 2 refused or error,
130/143 interrupted by SIGINT/SIGTERM (resume with import --resume JOB_ID), 141 the output was
closed by its reader (e.g. piped into head).
"""

#: Exit status when standard output was closed under us: 128 + SIGPIPE, as a shell reports a
#: tool that SIGPIPE ended (Python ignores SIGPIPE, so the write raises instead).
EXIT_BROKEN_PIPE = 141

#: Commands that may leave work unfinished when they stop; the others only print.
_STARTS_WORK = ("import", "reshard")

#: Options of subcommands defined elsewhere that must be positive integers.
_POSITIVE = {"status": ("--limit",)}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; defaults that come from the environment are read now."""
    parser = Parser(
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
    for command, options in _POSITIVE.items():
        for action in sub.choices[command]._actions:
            if set(action.option_strings) & set(options):
                action.type = positive_int
    return parser


def program(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script and ``python -m miroir_pipeline.cli``: run :func:`main` as the
    process's program (the collector's phases, see ``cli.collector``), then exit with its status."""
    collector.starting()
    code = main(argv)
    collector.exiting()
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit status (0 done, 1 not completed, 2 refused or error, 141 the
    output was closed)."""
    try:
        return _main(argv)
    except BrokenPipeError:
        return _output_closed(argv)


def _output_closed(argv: Sequence[str] | None) -> int:
    """Standard output was closed by its reader: nothing more can be shown, so stop quietly.

    Output still buffered would raise again when Python flushes it at exit, so the stream is
    pointed at /dev/null first. A command that starts work says on stderr what was left."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((w for w in words if w in _STARTS_WORK), None)
    if command is not None:
        print(
            f"error: {command} could not write its output (broken pipe) and stopped; "
            "`miroir-pipeline status` shows whether its job finished, and "
            f"`miroir-pipeline {command} --resume JOB_ID` carries on an unfinished one",
            file=sys.stderr,
        )
    return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if logging.getLevelName(args.log_level) > logging.DEBUG:  # its set-up chatter, even at INFO
        logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        runtime.export_flags(args)
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe fails here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        raise  # an OSError, but not the command's failure: see main
    except (ValueError, OSError, RuntimeError) as exc:  # includes runtime.PlanRefused, CliError
        log.debug("%s failed", args.command, exc_info=True)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except runtime.Interrupted as exc:
        log.debug("%s interrupted", args.command, exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        log.debug("%s interrupted", args.command, exc_info=True)
        print(f"error: {args.command} was interrupted (SIGINT)", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """An error as one line: a pydantic ``ValidationError`` (settings from the environment,
    for instance) without pydantic's layout and links."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return format_validation_error(exc)
    return " ".join(str(exc).split()) if "\n" in str(exc) else str(exc)


if __name__ == "__main__":
    sys.exit(main())
