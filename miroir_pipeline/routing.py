"""Stable import path of the routing formula; it lives in :mod:`miroir_pipeline.fleet.routing`."""

from miroir_pipeline.fleet.routing import *  # noqa: F403
from miroir_pipeline.fleet.routing import __all__ as __all__
