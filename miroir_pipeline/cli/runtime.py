"""What the subcommands share at run time: flags exported as environment, the Dagster
definitions and instance, planning a parent as a Dagster run, the worker processes that run its
chunks, and a failed run's root cause.

Dagster is imported when a function here first needs it, never at import time, so ``--help``,
``status`` or ``sample-dump`` start without paying for it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import dagster as dg

    from miroir_pipeline.dagster.names import MiroirNames
    from miroir_pipeline.queue.contract import JobStore

__all__ = [
    "INCOMPLETE",
    "QUIET_RUN_LOGS",
    "PlanRefused",
    "definitions",
    "export_flags",
    "failed_chunks",
    "instance",
    "names",
    "run_failure",
    "run_job",
    "run_plan",
    "run_workers_for",
    "worker_command",
]

T = TypeVar("T")

#: Run config that silences a run's console logs: the command prints its own summary.
QUIET_RUN_LOGS: Mapping[str, Any] = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}

#: Why a parent is unfinished when its workers exited without any chunk failing for good.
INCOMPLETE = "workers exited before every chunk completed; run `miroir-pipeline worker` to finish"

#: Seconds to let exiting workers finish recording their last run before they are stopped.
WORKER_EXIT_GRACE_S = 60.0


class PlanRefused(ValueError):
    """Planning refused the request (bad input or configuration); nothing was queued."""


def export_flags(args: argparse.Namespace) -> None:
    """``--jobs-dsn`` and ``--topology`` become ``MIROIR_JOBS_DSN`` / ``MIROIR_TOPOLOGY``, so the
    code that reads them (and the worker processes this command starts) sees the same values."""
    if getattr(args, "jobs_dsn", None):
        os.environ["MIROIR_JOBS_DSN"] = args.jobs_dsn
    if getattr(args, "topology", None):
        os.environ["MIROIR_TOPOLOGY"] = str(Path(args.topology).resolve())


@functools.cache
def definitions() -> dg.Definitions:
    """The Dagster definitions this process runs, built once by the public factory, after
    :func:`export_flags` (the factory follows the environment)."""
    from miroir_pipeline.dagster import miroir_definitions

    return miroir_definitions()


def names() -> MiroirNames:
    """The job, op and asset names of :func:`definitions` (the factory's default key prefix)."""
    from miroir_pipeline.dagster.names import MiroirNames

    return MiroirNames()


def instance() -> dg.DagsterInstance:
    """The instance of ``$DAGSTER_HOME`` (a home under ``./.miroir`` when unset), ready to use."""
    from miroir_pipeline.dagster.instance import open_instance

    return open_instance()


def run_job(
    job_name: str, ops_config: Mapping[str, Any], on: dg.DagsterInstance
) -> dg.ExecuteInProcessResult:
    """Execute a job of :func:`definitions` in this process with quiet logs; never raises for a
    failed step (read the result, or :func:`run_failure` for why)."""
    return (
        definitions()
        .resolve_job_def(job_name)
        .execute_in_process(
            run_config={"ops": dict(ops_config), **QUIET_RUN_LOGS},
            instance=on,
            raise_on_error=False,
        )
    )


def run_plan(job_name: str, op_name: str, config: Mapping[str, Any], on: dg.DagsterInstance) -> str:
    """Plan a parent as a Dagster run (so it shows in the UI) and return its job id.

    Raises :class:`PlanRefused` with the run's root cause when planning fails.
    """
    plan = run_job(job_name, {op_name: {"config": dict(config)}}, on)
    if not plan.success:
        raise PlanRefused(run_failure(plan))
    return str(plan.output_for_node(op_name))


def run_failure(result: dg.ExecuteInProcessResult) -> str:
    """The root cause of a failed in-process run, without Dagster's wrapping."""
    for event in result.all_events:
        if event.event_type_value != "STEP_FAILURE" or event.step_failure_data is None:
            continue
        err = event.step_failure_data.error
        while err is not None and err.cause is not None:
            err = err.cause
        if err is not None:
            # "pkg.module.SomeError: text" -> "text": the message already says what and where.
            message = str(err.message).strip()
            head, sep, tail = message.partition(": ")
            return tail if sep and " " not in head else message
    return "the Dagster run failed; see its logs in the Dagster UI"


def worker_command(parent_id: str) -> list[str]:
    """A worker process that runs only ``parent_id``'s chunks and exits when none is left."""
    return [
        sys.executable, "-m", "miroir_pipeline.cli",
        "worker", "--parent", parent_id, "--exit-when-empty", "--quiet",
    ]  # fmt: skip


def run_workers_for(
    parent_id: str, workers: int, watch: Callable[[Sequence[subprocess.Popen[bytes]]], T]
) -> T:
    """Start ``workers`` processes scoped to one parent, ``watch`` them, and leave none behind."""
    procs = [
        subprocess.Popen(worker_command(parent_id), env=os.environ.copy())
        for _ in range(max(1, workers))
    ]
    try:
        result = watch(procs)
        # Workers exit by themselves once nothing is left; give their last run time to finish
        # recording in Dagster before asking stragglers to drain.
        deadline = time.monotonic() + WORKER_EXIT_GRACE_S
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        return result
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()


def failed_chunks(store: JobStore, parent_id: str) -> list[dict[str, str | None]]:
    """The chunks of ``parent_id`` that failed for good, with their errors, for summaries."""
    from miroir_pipeline.queue.contract import JobState

    return [
        {"id": c.id, "error": c.error}
        for c in store.children(parent_id)
        if c.state == JobState.FAILED
    ]
