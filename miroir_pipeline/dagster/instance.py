"""The Dagster instance the CLI and the worker pool run against: ``$DAGSTER_HOME``, else a home
under the embedded defaults, seeded with the instance config shipped inside this package."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import dagster as dg

from miroir_pipeline.jobs.settings import default_home

__all__ = ["INSTANCE_TEMPLATE", "home_lock", "open_instance", "prepare_dagster_home"]

#: The local instance config (run-queue caps on chunk runs, retries of crashed runs only).
INSTANCE_TEMPLATE = "dagster.yaml"


def prepare_dagster_home() -> Path:
    """``$DAGSTER_HOME`` (set to ``<miroir home>/dagster`` when unset), created and seeded with
    the shipped ``dagster.yaml`` if it has none; an operator's own ``dagster.yaml`` is kept."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str((default_home() / "dagster").resolve())))
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        template = resources.files(__package__ or "miroir_pipeline.dagster").joinpath(INSTANCE_TEMPLATE)
        tmp = home / f".dagster.yaml.{os.getpid()}"
        tmp.write_text(template.read_text(encoding="utf-8"), encoding="utf-8")
        os.replace(tmp, config)  # atomic: workers starting together never see half a file
    return home


@contextlib.contextmanager
def home_lock(home: Path, name: str) -> Iterator[None]:
    """An exclusive lock file ``name`` in a local Dagster home, held while the block runs: what
    processes sharing that home must not do at the same time."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / name).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def open_instance() -> dg.DagsterInstance:
    """The instance of :func:`prepare_dagster_home`, its storage created under a file lock.

    Workers started together on a fresh home would otherwise race to create Dagster's tables
    (and one killed half-way leaves the storage half-made for every later one).
    """
    with home_lock(prepare_dagster_home(), ".miroir-init.lock"):
        instance = dg.DagsterInstance.get()
        instance.get_runs(limit=1)  # forces storage creation and migration while locked
    return instance
