"""Deleting the staged copies of dumps (decompressed gzip, extracted ``.dump`` documents) that
no import needs any more; prune runs it after deleting finished jobs."""

from __future__ import annotations

from miroir_pipeline.queue.contract import JobStore
from miroir_pipeline.sources.resolve import DumpSourceError
from miroir_pipeline.sources.staging import StagedRemoval, remove_unused_staged

__all__ = ["MIN_IDLE_S", "prune_staged_copies"]

#: A staged copy stays at least this long after it was staged or last reused, whatever the prune
#: age: a planning reuses a copy before the rows naming it exist.
MIN_IDLE_S = 3600.0


def prune_staged_copies(store: JobStore, staging_dir: str, older_than_s: float) -> StagedRemoval:
    """Delete the staged copies in ``staging_dir`` that no job row names (``data_uri``) and that
    were not staged or reused for ``older_than_s`` (at least :data:`MIN_IDLE_S`). A staging dir
    that cannot be cleaned does not fail the prune (its rows are gone already): ``error`` says
    why, for the caller to report."""
    try:
        return remove_unused_staged(staging_dir, store.param_values("data_uri"), max(older_than_s, MIN_IDLE_S))
    except DumpSourceError as exc:
        return StagedRemoval(removed=[], error=str(exc))
