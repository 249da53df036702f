"""Run config that sets the console log level of a run Miroir launches itself (worker pool,
parent reports), for whatever loggers the job has: a code location that gives its jobs its
own loggers (``Definitions(loggers=...)``) has no ``console`` logger to configure, and run
config naming one would be refused."""

from __future__ import annotations

from typing import Any

import dagster as dg

__all__ = ["console_log_level"]


def console_log_level(job_def: dg.JobDefinition, level: str) -> dict[str, Any]:
    """``{"loggers": {"console": {"config": {"log_level": level}}}}`` when ``job_def`` logs to
    Dagster's console logger, else nothing (its own loggers keep their own configuration)."""
    if "console" not in job_def.loggers:
        return {}
    return {"loggers": {"console": {"config": {"log_level": level}}}}
