#!/usr/bin/env bash
# The main job on the embedded defaults: SQLite jobs store, 3 local node stores and a Dagster
# home, all under ./.miroir. Writes a 256 MiB synthetic dump and imports it with 2 workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
SIZE="${1:-256MiB}"
mkdir -p .miroir
.venv/bin/miroir-pipeline sample-dump .miroir/sample.ndjson --size "$SIZE"
.venv/bin/miroir-pipeline import .miroir/sample.ndjson --index products --primary-key id --workers 2 --chunk-size 64MiB
.venv/bin/miroir-pipeline status
