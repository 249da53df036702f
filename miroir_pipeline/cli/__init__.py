"""The ``miroir-pipeline`` command line: dump imports, reshard backfills, the worker pool and
operator commands over the jobs table. ``main`` is the console script's entry point: it runs
``cli.app.main`` as the process's program (``cli.app.program``) and exits with its status."""

from miroir_pipeline.cli.app import program as main

__all__ = ["main"]
