"""``--workers 0``: an ``import`` or ``reshard`` that starts no worker and follows a parent that a
worker pool already running against the same jobs store (``miroir-pipeline worker``) serves.

The command only watches: a signal stops the watching, never the pool, so the parent carries on
and the command says how to follow it again or stop it. When no chunk is claimed for a while it
says once that it sees no pool, and keeps waiting.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import TYPE_CHECKING

from miroir_pipeline.cli.runtime import StopSignal

if TYPE_CHECKING:
    from miroir_pipeline.queue.contract import JobStore, ParentSummary

__all__ = ["POOL_HINT_AFTER_S", "NoPoolHint", "left_to_pool"]

#: Seconds without any chunk claimed before the command says it sees no worker pool.
POOL_HINT_AFTER_S = 10.0


class NoPoolHint:
    """Says once, on stderr, that no worker has claimed a chunk of the parent after
    :data:`POOL_HINT_AFTER_S`; silent for good once one has. ``progress_key`` is the progress
    field a running chunk moves (a claimed chunk that failed back to the queue has moved it)."""

    def __init__(self, command: str, parent_id: str, progress_key: str, *, enabled: bool) -> None:
        self._command = command
        self._parent_id = parent_id
        self._progress_key = progress_key
        self._since: float | None = time.monotonic() if enabled else None

    def observe(self, summary: ParentSummary) -> None:
        """Look at the parent's latest summary; print the hint when it is due."""
        if self._since is None:
            return
        if not self._unclaimed(summary):
            self._since = None  # a worker of the pool took a chunk
        elif time.monotonic() - self._since >= POOL_HINT_AFTER_S:
            print(self.line(), file=sys.stderr, flush=True)
            self._since = None  # said once

    def line(self) -> str:
        return (
            f"warning: no worker has claimed a chunk of {self._command} {self._parent_id} after "
            f"{POOL_HINT_AFTER_S:.0f} s with --workers 0; is a worker pool (`miroir-pipeline worker`) "
            f"running against this jobs store? Still waiting; Ctrl-C leaves the {self._command} queued."
        )

    def _unclaimed(self, summary: ParentSummary) -> bool:
        from miroir_pipeline.queue.contract import JobState

        queued = summary.chunks_by_state.get(JobState.QUEUED, 0)
        return (
            summary.chunks_total > 0
            and queued == summary.chunks_total
            and not summary.progress.get(self._progress_key)
        )


def left_to_pool(
    command: str, store: JobStore, parent_id: str, stop: StopSignal, *, as_json: bool
) -> int:
    """Ctrl-C or SIGTERM while a worker pool serves the parent: the command only stopped
    following it. One line says so and how to follow it again or stop it; the exit status."""
    assert stop.signum is not None
    summary = store.parent_summary(parent_id)
    name = signal.Signals(stop.signum).name
    line = (
        f"stopped following {command} {parent_id} ({name}); the worker pool carries on with it, "
        f"{summary.chunks_done}/{summary.chunks_total} chunks done: `miroir-pipeline {command} "
        f"--resume {parent_id} --workers 0` follows it again, `miroir-pipeline status` lists it, "
        f"`miroir-pipeline cancel {parent_id}` stops it"
    )
    if as_json:
        print(json.dumps({"job_id": parent_id, "state": summary.parent.state, "left_to_pool": True,
                          "interrupted": name}, indent=2))  # fmt: skip
    print(line, file=sys.stderr)
    return 128 + stop.signum
