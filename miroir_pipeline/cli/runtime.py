"""What the subcommands share at run time: flags exported as environment, the Dagster
definitions and instance, where Dagster's own logs go, planning a parent as a Dagster run, the
worker processes that run its chunks (and how a signal stops them cleanly), progress lines, and a
failed run's root cause.

Dagster is imported when a function here first needs it, never at import time, so ``--help``,
``status`` or ``sample-dump`` start without paying for it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, Generic, TypeVar

from miroir_pipeline.cli import collector
from miroir_pipeline.cli.errors import CliError
from miroir_pipeline.cli.options import is_debug

if TYPE_CHECKING:
    import dagster as dg

    from miroir_pipeline.dagster.names import MiroirNames
    from miroir_pipeline.queue.contract import Job, JobStore, ParentSummary

__all__ = [
    "QUIET_RUN_LOGS",
    "DagsterLogs",
    "Interrupted",
    "Interruption",
    "PlainProgress",
    "PlanRefused",
    "StopSignal",
    "WorkersOutcome",
    "definitions",
    "export_flags",
    "failed_chunks",
    "incomplete",
    "instance",
    "interrupted_line",
    "names",
    "raise_on_sigterm",
    "record_outcome",
    "resumable_parent",
    "run_failure",
    "run_job",
    "run_plan",
    "run_workers_for",
    "worker_command",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Run config that silences a run's console logs: the command prints its own summary.
QUIET_RUN_LOGS: Mapping[str, Any] = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}

#: Seconds to let exiting workers finish recording their last run before they are stopped.
WORKER_EXIT_GRACE_S = 60.0
#: Seconds interrupted workers get to hand their chunks back before they are killed (their
#: chunks then resume once their lease expires).
DRAIN_TIMEOUT_S = 60.0
#: Seconds between two plain progress lines when stdout is not a terminal.
PLAIN_PROGRESS_EVERY_S = 5.0


class PlanRefused(ValueError):
    """Planning refused the request (bad input or configuration); nothing was queued."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived before any worker was started (the command stops at once)."""

    def __init__(self, signum: int, what: str = "the command") -> None:
        super().__init__(f"{what} was interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def incomplete(command: str, parent_id: str) -> str:
    """Why a parent is unfinished when its workers exited without any chunk failing for good."""
    return (
        "workers exited before every chunk completed; resume with "
        f"`miroir-pipeline {command} --resume {parent_id}`"
    )


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


def resumable_parent(
    job_id: str, *, job_type: str, what: str, planning_flags: Sequence[str], restart_hint: str
) -> tuple[JobStore, Job]:
    """The unfinished parent ``--resume JOB_ID`` names, with its store; refuses (one line) when
    planning flags are given too, or the job is missing, of another kind, failed or never split.
    ``what`` is ``import``/``reshard``; ``restart_hint`` ends the refusal of a failed or unsplit job."""
    from miroir_pipeline.queue import open_store
    from miroir_pipeline.queue.contract import JobKind, JobNotFound, JobState

    article = "an" if what[0] in "aeiou" else "a"
    if planning_flags:
        raise CliError(
            f"--resume continues {article} {what} with the settings it was planned with; drop {', '.join(planning_flags)}"
        )
    store = open_store()
    try:
        parent = store.get(job_id)
    except JobNotFound:
        raise CliError(
            f"--resume {job_id}: no such job in the jobs store; `miroir-pipeline status` lists them"
        ) from None
    if parent.kind != JobKind.PARENT or parent.type != job_type:
        raise CliError(
            f"--resume {job_id}: not {article} {what} but a {parent.type} {parent.kind}; pass the id of "
            f"{article} {what} job (`miroir-pipeline status` lists them)"
        )
    if parent.state == JobState.FAILED:
        raise CliError(
            f"{what} {job_id} failed ({parent.error}); nothing to resume: fix the cause, then retry "
            f"its failed chunks from the Dagster UI, or {restart_hint}"
        )
    if parent.state == JobState.QUEUED and not store.parent_summary(job_id).chunks_total:
        raise CliError(
            f"{what} {job_id} was never split into chunks (its planning was cut short); cancel it "
            f"with `miroir-pipeline cancel` and {restart_hint}"
        )
    return store, parent


def record_outcome(parent_id: str) -> None:
    """Record a finished parent as its per-import (per-reshard) asset partition in Dagster, so the
    UI shows the run as a whole; a parent still running is left to the report sensor."""
    from miroir_pipeline.dagster import record_parent

    try:
        record_parent(definitions(), instance(), parent_id)
    except Exception as exc:  # the import's own outcome stands; the sensor records it later
        log.warning("could not record %s in Dagster (%s); the report sensor will", parent_id, exc)


def instance() -> dg.DagsterInstance:
    """The instance of ``$DAGSTER_HOME`` (a home under ``./.miroir`` when unset), ready to use."""
    from miroir_pipeline.dagster.instance import open_instance

    return open_instance()


# -- Dagster's own logs ------------------------------------------------------------------------


class DagsterLogs:
    """Where the Dagster output of one ``import`` or ``reshard`` goes: the plan and verification
    runs in this process and everything the worker processes print.

    Normally a file, ``$MIROIR_HOME/logs/<job id>.log`` (``./.miroir/logs/``), named in the
    summary, so the terminal shows only the command's own lines; at ``--log-level DEBUG``,
    stderr. The file is opened for appending, so resuming a job adds to the same log.
    """

    def __init__(self, path: Path | None, level: str) -> None:
        self.path = path
        #: Console log level of the in-process runs and of the workers.
        self.level = level

    @classmethod
    def start(cls, command: str, log_level: str) -> DagsterLogs:
        """Logs of a job not planned yet: a file named after the command and the time, renamed
        by :meth:`adopt` once the job id is known."""
        if is_debug(log_level):
            return cls(None, "DEBUG")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        return cls(cls._folder() / f"{command}-{stamp}-{os.getpid()}.log", "INFO")

    @classmethod
    def of_job(cls, job_id: str, log_level: str) -> DagsterLogs:
        """Logs of an existing job (a resume appends to its file)."""
        if is_debug(log_level):
            return cls(None, "DEBUG")
        return cls(cls._folder() / f"{job_id}.log", "INFO")

    @staticmethod
    def _folder() -> Path:
        from miroir_pipeline.util.home import default_home  # light: runs before the workers start

        folder = (default_home() / "logs").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @property
    def display(self) -> str | None:
        """The file as the operator can type it (relative to the current directory when inside)."""
        if self.path is None:
            return None
        with contextlib.suppress(ValueError):
            return str(self.path.relative_to(Path.cwd()))
        return str(self.path)

    def adopt(self, job_id: str) -> None:
        """Rename the file after the job it belongs to."""
        if self.path is None:
            return
        target = self.path.with_name(f"{job_id}.log")
        if self.path.exists():
            os.replace(self.path, target)
        self.path = target

    def discard(self) -> None:
        """Remove the file of a job that was refused (its one-line reason says it all)."""
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Send what an in-process run prints on stderr (Dagster's console logger, warnings) to
        the file while the block runs."""
        if self.path is None:
            yield
            return
        with self.path.open("a", encoding="utf-8") as out:
            saved, sys.stderr = sys.stderr, out
            try:
                yield
            finally:
                sys.stderr = saved

    @contextlib.contextmanager
    def for_workers(self) -> Iterator[IO[Any] | None]:
        """What a worker process's stdout and stderr are given: the file, opened for
        appending, or ``None`` (inherit this process's stderr at DEBUG)."""
        if self.path is None:
            yield None
            return
        with self.path.open("ab") as out:
            yield out

    def run_config(self) -> dict[str, Any]:
        return {"loggers": {"console": {"config": {"log_level": self.level}}}}


def run_job(
    job_name: str,
    ops_config: Mapping[str, Any],
    on: dg.DagsterInstance,
    logs: DagsterLogs | None = None,
) -> dg.ExecuteInProcessResult:
    """Execute a job of :func:`definitions` in this process, its logs going to ``logs`` (quiet
    without); never raises for a failed step (read the result, or :func:`run_failure` for why).

    A SIGINT or SIGTERM while it runs interrupts the run (Dagster's handling) and raises
    :class:`Interrupted`.
    """
    loggers = logs.run_config() if logs is not None else dict(QUIET_RUN_LOGS)
    job = definitions().resolve_job_def(job_name)
    with logs.capture() if logs is not None else contextlib.nullcontext():
        result = job.execute_in_process(
            run_config={"ops": dict(ops_config), **loggers}, instance=on, raise_on_error=False
        )
    if not result.success and _was_interrupted(result):
        raise Interrupted(signal.SIGINT, f"the {job_name} run")
    return result


def run_plan(
    job_name: str,
    op_name: str,
    config: Mapping[str, Any],
    on: dg.DagsterInstance,
    logs: DagsterLogs | None = None,
) -> str:
    """Plan a parent as a Dagster run (so it shows in the UI) and return its job id.

    Raises :class:`PlanRefused` with the run's root cause when planning fails.
    """
    plan = run_job(job_name, {op_name: {"config": dict(config)}}, on, logs)
    if not plan.success:
        raise PlanRefused(run_failure(plan))
    return str(plan.output_for_node(op_name))


def _errors(result: dg.ExecuteInProcessResult) -> Iterator[Any]:
    """The root error of every failed step of ``result`` (Dagster's wrapping unwound)."""
    for event in result.all_events:
        if event.event_type_value != "STEP_FAILURE" or event.step_failure_data is None:
            continue
        err = event.step_failure_data.error
        while err is not None and err.cause is not None:
            err = err.cause
        if err is not None:
            yield err


def _was_interrupted(result: dg.ExecuteInProcessResult) -> bool:
    return any(
        "Interrupt" in str(getattr(err, "cls_name", "") or "") for err in _errors(result)
    ) or any(event.event_type_value == "RUN_CANCELED" for event in result.all_events)


def run_failure(result: dg.ExecuteInProcessResult) -> str:
    """The root cause of a failed in-process run, without Dagster's wrapping."""
    for err in _errors(result):
        # "pkg.module.SomeError: text" -> "text": the message already says what and where.
        message = str(err.message).strip()
        head, sep, tail = message.partition(": ")
        return tail if sep and " " not in head else message
    return "the Dagster run failed; see its logs in the Dagster UI"


# -- signals -----------------------------------------------------------------------------------


@contextlib.contextmanager
def raise_on_sigterm(what: str) -> Iterator[None]:
    """Until workers are started, SIGTERM stops the command like Ctrl-C does (raising
    :class:`Interrupted`), instead of killing it without a word."""

    def _raise(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum, what)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopSignal:
    """SIGINT and SIGTERM, while worker processes run: noted, not raised, so the command can
    drain its workers; a second signal asks to stop waiting for them."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


@dataclass(frozen=True)
class Interruption:
    """How an interrupted command's workers ended."""

    signum: int
    #: Chunks that were running when the signal came and went back to the queue at their cursor.
    handed_back: int
    #: Chunks still leased (a worker did not drain in time and was killed): they resume once
    #: their lease expires.
    still_leased: int

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


@dataclass(frozen=True)
class WorkersOutcome(Generic[T]):
    """What :func:`run_workers_for` saw: the watcher's result, an interruption, and how many
    workers exited with an error (their output is in the Dagster log)."""

    value: T
    interruption: Interruption | None
    crashed: int


def interrupted_line(command: str, parent_id: str, stop: Interruption, summary: ParentSummary) -> str:
    """The one line an interrupted ``import`` or ``reshard`` prints."""
    line = (
        f"{command} {parent_id} interrupted ({stop.signal_name}): {stop.handed_back} running "
        f"chunk(s) handed back at their cursors, {summary.chunks_done}/{summary.chunks_total} "
        f"chunks done; resume with `miroir-pipeline {command} --resume {parent_id}`"
    )
    if stop.still_leased:
        line += (
            f" ({stop.still_leased} chunk(s) still leased by a worker that did not stop in time "
            "resume once their lease expires)"
        )
    return line


#: How long the workers ``import`` starts wait for the parent it is planning meanwhile (staging a
#: remote dump can take a while); the command stops them at once if planning fails.
PLAN_WAIT_S = 3600.0


def worker_command(parent_id: str, log_level: str = "INFO", *, planning: bool = False) -> list[str]:
    """A worker process that runs only ``parent_id``'s chunks and exits when none is left;
    ``planning``: the parent is being planned, so the worker waits for it."""
    wait = ["--wait-for-plan", str(PLAN_WAIT_S)] if planning else []
    return [
        sys.executable, "-m", "miroir_pipeline.cli", "--log-level", log_level,
        "worker", "--parent", parent_id, "--exit-when-empty", *wait,
    ]  # fmt: skip


def run_workers_for(
    parent_id: str,
    workers: int,
    watch: Callable[[Sequence[subprocess.Popen[bytes]], StopSignal], T],
    *,
    store: JobStore,
    logs: DagsterLogs | None = None,
    planning: bool = False,
) -> WorkersOutcome[T]:
    """Start ``workers`` processes scoped to one parent, ``watch`` them, and leave none behind.

    ``planning``: the parent does not exist yet; ``watch`` plans it while the workers start up.

    ``watch`` returns when the parent finished, every worker exited, or the :class:`StopSignal`
    it is given was requested. On SIGINT or SIGTERM the workers are sent SIGTERM: each hands
    its running chunk back at its committed cursor and exits; they get
    :data:`DRAIN_TIMEOUT_S` (less on a second signal) before they are killed.
    """
    collector.started()  # the command is loaded; from here on it waits for its workers
    level = logs.level if logs is not None else "INFO"
    with StopSignal() as stop, (logs.for_workers() if logs is not None else _no_stream()) as out:
        procs = [
            subprocess.Popen(
                worker_command(parent_id, level, planning=planning),
                env=os.environ.copy(),
                stdin=subprocess.DEVNULL,
                stdout=out if out is not None else sys.stderr,
                stderr=out,
            )
            for _ in range(max(1, workers))
        ]
        interruption: Interruption | None = None
        try:
            value = watch(procs, stop)
            if not stop.requested:
                # Workers exit by themselves once nothing is left; give their last run time to
                # finish recording in Dagster before asking stragglers to drain.
                _wait_all(procs, time.monotonic() + WORKER_EXIT_GRACE_S, stop)
            if stop.requested:
                interruption = _drain(procs, store, parent_id, stop)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            _wait_all(procs, time.monotonic() + DRAIN_TIMEOUT_S, None)
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
    crashed = sum(1 for p in procs if p.returncode not in (0, -signal.SIGTERM))
    return WorkersOutcome(value, interruption, 0 if interruption is not None else crashed)


@contextlib.contextmanager
def _no_stream() -> Iterator[None]:
    yield None


def _wait_all(
    procs: Sequence[subprocess.Popen[bytes]], deadline: float, stop: StopSignal | None
) -> None:
    """Wait until every process exited, ``deadline`` passed, or (when given) ``stop`` is asked."""
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if stop is not None and stop.requested:
            return
        time.sleep(0.1)


def _drain(
    procs: Sequence[subprocess.Popen[bytes]], store: JobStore, parent_id: str, stop: StopSignal
) -> Interruption:
    from miroir_pipeline.queue.contract import JobState

    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    running = {c.id for c in store.children(parent_id) if c.state == JobState.IN_PROGRESS}
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline and stop.count < 2:
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    children = store.children(parent_id)
    assert stop.signum is not None
    return Interruption(
        signum=stop.signum,
        handed_back=sum(1 for c in children if c.id in running and c.state == JobState.QUEUED),
        still_leased=sum(1 for c in children if c.state == JobState.IN_PROGRESS),
    )


# -- progress ----------------------------------------------------------------------------------


class PlainProgress:
    """Progress for a stdout that is not a terminal (a pipe, a CI log): one plain line now and
    then instead of a bar redrawn in place."""

    def __init__(self, every: float = PLAIN_PROGRESS_EVERY_S) -> None:
        self.every = every
        self._next = 0.0

    def tick(self, line: str, *, force: bool = False) -> None:
        """Print ``line`` if the last one is old enough (or ``force``)."""
        now = time.monotonic()
        if force or now >= self._next:
            print(line, flush=True)
            self._next = now + self.every


def failed_chunks(store: JobStore, parent_id: str) -> list[dict[str, str | None]]:
    """The chunks of ``parent_id`` that failed for good, with their errors, for summaries."""
    from miroir_pipeline.queue.contract import JobState

    return [
        {"id": c.id, "error": c.error}
        for c in store.children(parent_id)
        if c.state == JobState.FAILED
    ]
