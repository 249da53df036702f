"""Job store: the ``jobs`` table on SQLite or Postgres behind one interface (DESIGN §3)."""

from miroir_pipeline.queue.contract import *  # noqa: F403
from miroir_pipeline.queue.contract import __all__ as _base_all
from miroir_pipeline.queue.stores import default_dsn, open_store

__all__ = [*_base_all, "default_dsn", "open_store"]
