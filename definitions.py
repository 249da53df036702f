"""Dagster entry point (``dagster dev`` loads this through ``[tool.dagster]`` in pyproject.toml)."""

from miroir_pipeline.dagster.definitions import defs

__all__ = ["defs"]
