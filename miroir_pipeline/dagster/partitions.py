"""Dynamic partitions: one per chunk row, keyed by the chunk id."""

import dagster as dg

DUMP_CHUNKS = "dump_chunks"
RESHARD_CHUNKS = "reshard_chunks"

dump_chunks = dg.DynamicPartitionsDefinition(name=DUMP_CHUNKS)
reshard_chunks = dg.DynamicPartitionsDefinition(name=RESHARD_CHUNKS)

#: Run tags the worker pool sets so a run adopts the claim the worker already made.
TAG_CLAIM_TOKEN = "miroir/claim_token"
TAG_WORKER_ID = "miroir/worker_id"
TAG_REIMPORT = "miroir/reimport"
#: Tag every chunk run carries; the shipped dagster.yaml caps concurrent runs on it.
TAG_CHUNK_RUN = "miroir/chunk-run"
