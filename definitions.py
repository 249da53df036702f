"""The default code location (``dagster dev`` loads it through ``[tool.dagster]`` in
pyproject.toml): Miroir's definitions, configured by the environment when they run."""

from miroir_pipeline.dagster import miroir_definitions

defs = miroir_definitions()

__all__ = ["defs"]
