"""Argument-parser pieces shared by the subcommand modules: the subparsers type, the jobs-store
and topology flags, and the log-level argument type."""

from __future__ import annotations

import argparse
import logging
from typing import TypeAlias

__all__ = ["Subparsers", "add_store_options", "log_level"]

#: What ``ArgumentParser.add_subparsers`` returns; each subcommand module adds its parsers to it.
#: (argparse has no public name for it.)
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

_DSN_HELP = "jobs store DSN: sqlite:///PATH or postgresql://... (default $MIROIR_JOBS_DSN, else a SQLite file under ./.miroir)"
_TOPOLOGY_HELP = (
    "topology YAML (default $MIROIR_TOPOLOGY, else 3 local nodes under ./.miroir/nodes)"
)


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
