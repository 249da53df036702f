"""What every chunk run does before and around its processing: get the lease (adopt the
worker's claim, claim by id, re-queue for a retry or re-import) and turn the ways a chunk can
stop without failing on its own merits into clear run failures."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from miroir_pipeline.dagster.names import TAG_ATTEMPT, TAG_CLAIM_TOKEN, TAG_REIMPORT, TAG_WORKER_ID
from miroir_pipeline.jobs.settings import PipelineSettings
from miroir_pipeline.queue.contract import JobNotClaimable, JobStore, Lease, LeaseLost
from miroir_pipeline.queue.lease import acquire_chunk, default_worker_id
from miroir_pipeline.queue.shutdown import ChunkHandedBack

NOOP_METADATA: dict[str, bool | str] = {"noop": True, "reason": "chunk already completed"}


#: Dagster's tag on a run its daemon re-executed by itself (run retries), not an operator.
_AUTOMATIC_RETRY_TAG = "dagster/retry_number"


def lease_for_run(context: dg.AssetExecutionContext, store: JobStore, settings: PipelineSettings) -> Lease | None:
    """The lease this run processes its partition under; None when there is nothing to do.

    A re-execution (from the UI, or the daemon's run retries) inherits its parent run's tags,
    among them the claim a pool worker handed to that run, which ended with it: it claims the
    chunk anew instead, as a run launched for the partition does."""
    tags = context.run.tags
    reexecution = context.run.parent_run_id is not None
    try:
        lease = acquire_chunk(
            store,
            context.partition_key,
            (None if reexecution else tags.get(TAG_WORKER_ID)) or default_worker_id(),
            settings.lease_ttl,
            adopt_token=None if reexecution else tags.get(TAG_CLAIM_TOKEN),
            reimport=tags.get(TAG_REIMPORT, "").lower() in ("1", "true", "yes"),
            # The dispatch sensor's runs carry the attempt they were meant to be; only a run an
            # operator launched (or re-executed) retries a chunk that failed for good (or was
            # cancelled) since; the daemon's own retries never do.
            retry_failed=_AUTOMATIC_RETRY_TAG not in tags and (reexecution or TAG_ATTEMPT not in tags),
        )
    except JobNotClaimable as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
    if lease is None:
        context.log.info(
            f"chunk {context.partition_key} is already completed; nothing to do "
            f"(run it with tag {TAG_REIMPORT}=true to import it again)"
        )
    return lease


@contextmanager
def stopped_chunks_fail_clearly() -> Iterator[None]:
    """A lost lease or a hand-back on shutdown ends the run with its reason, not a traceback."""
    try:
        yield
    except (LeaseLost, ChunkHandedBack) as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from None
