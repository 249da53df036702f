"""The cyclic garbage collector over the life of a ``miroir-pipeline`` process.

Loading Dagster, its instance and the definitions allocates a few hundred thousand container
objects that live until the process ends. The collector walks them over and over while they are
created, and once more in full when the interpreter exits: on a 2-core box, 0.27 s of a worker's
2.25 s start-up and 0.6 s of its exit. So the program starts with the collector off, and at the
end of start-up (:func:`started`) moves everything alive into the permanent generation, where
collections no longer look, and turns it back on for the real work. At exit (:func:`exiting`)
the heap is frozen again: the operating system frees it at once. Nothing is kept alive by this
that was not alive anyway; only garbage made during start-up, if any, is never collected.

Only the program does this (``cli.app.program``, the console script and ``python -m
miroir_pipeline.cli``): a caller of ``cli.app.main`` in its own process, or the library inside
someone's Dagster deployment, keeps its collector as it was.
"""

from __future__ import annotations

import gc

__all__ = ["exiting", "started", "starting"]


def starting() -> None:
    """The program starts: no collections while it loads."""
    gc.disable()


def exiting() -> None:
    """The program ends: the interpreter's final collection skips the whole heap."""
    gc.freeze()


def started() -> None:
    """A command's start-up is over: freeze what it loaded and collect again from here on.

    A no-op where the collector is on (not started by :func:`program`), and after the first
    call."""
    if gc.isenabled():
        return
    gc.freeze()
    gc.enable()
