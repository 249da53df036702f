"""The ``miroir-pipeline`` command line: dump imports, reshard backfills, the worker pool and
operator commands over the jobs table. ``main`` is the console script's entry point."""

from miroir_pipeline.cli.app import main

__all__ = ["main"]
