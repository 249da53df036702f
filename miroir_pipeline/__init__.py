"""miroir-pipeline: chunked, resumable Meilisearch dump imports and reshard backfills."""
