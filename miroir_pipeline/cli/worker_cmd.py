"""``miroir-pipeline worker``: one member of the worker pool (the Deployment the HPA scales).

It claims chunks from the jobs table and runs each as a Dagster run in-process against the
shared instance, so every chunk shows in the Dagster UI without a process start per chunk.
SIGTERM or SIGINT drains it: it stops claiming and hands the running chunk back at its next
batch.
"""

from __future__ import annotations

import argparse
import logging
import os

from miroir_pipeline.cli import collector, runtime
from miroir_pipeline.cli.options import Subparsers, add_store_options, positive_float, positive_int

__all__ = ["add_parser", "metrics_port", "run"]

log = logging.getLogger(__name__)

#: Dagster console log level of the chunk runs: normal, and under ``--quiet``.
RUN_LOG_LEVEL = "WARNING"
QUIET_RUN_LOG_LEVEL = "ERROR"

#: Default of ``--metrics-port`` (``miroir_pipeline.metrics.METRICS_PORT_ENV``, not imported:
#: the parser is built for every command, and the metrics module loads ``prometheus_client``).
METRICS_PORT_ENV = "MIROIR_METRICS_PORT"


DESCRIPTION = (
    "One member of the worker pool: claim chunks from the jobs table and run each as a Dagster "
    "run in-process against the shared instance, so every chunk shows in the Dagster UI. "
    "SIGTERM or SIGINT drains it: it stops claiming and hands the running chunk back at once, "
    "at the cursor the nodes have acknowledged."
)


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add ``worker`` to the top-level subparsers (defaults read the environment now, not at import)."""
    p = subparsers.add_parser(
        "worker",
        help="claim chunks and run each as a Dagster run in-process",
        description=DESCRIPTION,
    )
    p.add_argument("--parent", metavar="JOB_ID", help="only run chunks of this parent job")
    p.add_argument(
        "--exit-when-empty",
        action="store_true",
        help="exit once no chunk is left to claim (default: wait for more)",
    )
    p.add_argument(
        "--max-chunks", type=positive_int, metavar="N", help="exit after running N chunks"
    )
    p.add_argument(
        "--wait-for-plan",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --parent: wait up to SECONDS for that parent to be planned (import starts its workers while it plans); default 0, a missing parent ends the worker",
    )
    p.add_argument(
        "--poll-interval",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="an idle worker is woken as soon as a chunk is queued (or its parent finishes) and "
        "otherwise claims again every SECONDS, for leases that expired (default 5)",
    )
    p.add_argument(
        "--metrics-port",
        type=metrics_port,
        # A string: argparse checks it with ``metrics_port`` only when the flag is not given.
        default=_FromEnvironment(os.environ.get(METRICS_PORT_ENV, "").strip() or "0"),
        metavar="PORT",
        help="serve Prometheus /metrics on PORT; 0 disables it (default $MIROIR_METRICS_PORT, else 0)",
    )
    p.add_argument(
        "--metrics-addr",
        default=os.environ.get("MIROIR_METRICS_ADDR", "127.0.0.1"),
        metavar="ADDR",
        help="address /metrics binds to; a pod uses 0.0.0.0 (default $MIROIR_METRICS_ADDR, else 127.0.0.1)",
    )
    p.add_argument(
        "--quiet",
        action="store_true",
        help="chunk runs log only errors to the console (default: warnings, or more at a lower --log-level)",
    )
    add_store_options(p)
    p.set_defaults(func=run)
    return p


class _FromEnvironment(str):
    """The default of ``--metrics-port``, read from ``$MIROIR_METRICS_PORT``: a refusal names it."""

    __slots__ = ()


def metrics_port(text: str) -> int:
    """The argument type of ``--metrics-port``: a port 0-65535, the rule of
    :func:`miroir_pipeline.metrics.parse_port` (also that of ``$MIROIR_METRICS_PORT``)."""
    from miroir_pipeline.metrics import parse_port  # prometheus_client loads for `worker` only

    try:
        return parse_port(text)
    except ValueError:
        source = f" (from ${METRICS_PORT_ENV})" if isinstance(text, _FromEnvironment) else ""
        raise argparse.ArgumentTypeError(
            f"must be a port number from 0 to 65535 (0 turns /metrics off), not {text!r}{source}"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Run the worker until it drains, runs out of chunks (``--exit-when-empty``) or ``--max-chunks``."""
    from miroir_pipeline.dagster.worker_pool import Worker
    from miroir_pipeline.jobs.settings import PipelineSettings
    from miroir_pipeline.metrics import start_metrics_server
    from miroir_pipeline.queue import open_store

    if args.metrics_port:
        start_metrics_server(args.metrics_port, addr=args.metrics_addr)
    worker = Worker(
        open_store(),
        runtime.instance(),
        runtime.definitions(),
        PipelineSettings.from_env(),
        parent_id=args.parent,
        exit_when_empty=args.exit_when_empty,
        max_chunks=args.max_chunks,
        run_log_level=_run_log_level(args),
        plan_wait_s=args.wait_for_plan,
        idle_max_sleep=args.poll_interval,
    )
    worker.install_signal_handlers()
    collector.started()  # Dagster and the definitions are loaded
    stats = worker.run()
    log.info(
        "worker %s: %d chunk run(s), %d failed",
        worker.worker_id,
        stats.chunks_run,
        stats.chunks_failed,
    )
    return 0


def _run_log_level(args: argparse.Namespace) -> str:
    """The chunk runs' console level: errors under ``--quiet``; else warnings, or the more
    verbose ``--log-level`` (``import`` starts its workers at INFO, their output going to the
    job's log file)."""
    if args.quiet:
        return QUIET_RUN_LOG_LEVEL
    wanted = logging.getLevelName(str(getattr(args, "log_level", RUN_LOG_LEVEL)))
    default = logging.getLevelName(RUN_LOG_LEVEL)
    return RUN_LOG_LEVEL if not isinstance(wanted, int) or wanted >= default else logging.getLevelName(wanted)
