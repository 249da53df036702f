"""Argument-parser pieces shared by the subcommand modules: the parser class (a usage error is one
line), the subparsers type, the jobs-store and topology flags, and the argument types."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from typing import NoReturn, TypeAlias, TypeVar

__all__ = [
    "Parser",
    "Subparsers",
    "add_store_options",
    "is_debug",
    "log_level",
    "non_negative_int",
    "positive_float",
    "positive_int",
    "stdout_is_terminal",
]


N = TypeVar("N", int, float)

_DSN_HELP = "jobs store DSN: sqlite:///PATH or postgresql://... (default $MIROIR_JOBS_DSN, else $MIROIR_HOME/jobs.sqlite3)"
_TOPOLOGY_HELP = (
    "topology YAML (default $MIROIR_TOPOLOGY, else 3 local nodes under ./.miroir/nodes)"
)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (exit 2), pointing at
    ``--help`` instead of printing the whole usage block; its subparsers are ``Parser``s too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: What ``Parser.add_subparsers`` returns; each subcommand module adds its parsers to it.
#: (argparse has no public name for it.)
Subparsers: TypeAlias = "argparse._SubParsersAction[Parser]"


def add_store_options(
    parser: argparse.ArgumentParser, *, topology_help: str = _TOPOLOGY_HELP
) -> None:
    """``--jobs-dsn`` and ``--topology``; :func:`miroir_pipeline.cli.runtime.export_flags` turns
    them into environment so the worker processes a command starts see the same settings."""
    parser.add_argument("--jobs-dsn", metavar="DSN", help=_DSN_HELP)
    parser.add_argument("--topology", metavar="FILE", help=topology_help)


def log_level(text: str) -> str:
    """A ``logging`` level name, any case (``debug``, ``INFO``, ``warning``…), upper-cased."""
    name = text.strip().upper()
    if not isinstance(logging.getLevelName(name), int):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL)"
        )
    return name


def _number(text: str, parse: Callable[[str], N], accept: Callable[[N], bool], wanted: str) -> N:
    """``text`` parsed by ``parse`` if ``accept`` takes it; else the one-line usage error."""
    try:
        value = parse(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}") from None
    if not accept(value):
        raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1 (worker counts, shard counts, limits)."""
    return _number(text, int, lambda v: v >= 1, "a positive integer (1 or more)")


def positive_float(text: str) -> float:
    """A number of seconds above 0 (intervals)."""
    return _number(text, float, lambda v: 0 < v < math.inf, "a number of seconds above 0")


def non_negative_int(text: str) -> int:
    """A whole number of at least 0 (``--workers 0``: leave the chunks to a running pool)."""
    return _number(text, int, lambda v: v >= 0, "a whole number (0 or more)")


def is_debug(level: str) -> bool:
    """Whether ``--log-level`` asks for everything on stderr (Dagster's logs, tracebacks)."""
    return bool(logging.getLevelName(level) == logging.DEBUG)


def stdout_is_terminal() -> bool:
    """Whether progress may redraw a line in place (else plain periodic lines are printed)."""
    return sys.stdout.isatty()
