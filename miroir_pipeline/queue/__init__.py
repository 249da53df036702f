"""The leased queue: the ``jobs`` table on SQLite or Postgres behind one contract, its SQL and
migrations, and every way a lease begins and ends (:mod:`miroir_pipeline.queue.lease`).

It knows nothing of documents, nodes or Dagster: a job is a typed row with JSON params and
progress that workers claim with a lease.
"""

from miroir_pipeline.queue.contract import *  # noqa: F403
from miroir_pipeline.queue.contract import __all__ as _contract_all
from miroir_pipeline.queue.dsn import default_dsn, redact_dsn
from miroir_pipeline.queue.stores import open_store

__all__ = [*_contract_all, "default_dsn", "open_store", "redact_dsn"]
