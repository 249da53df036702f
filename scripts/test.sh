#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs (scripts/bootstrap.sh), then
# runs lint, type checks and pytest. The tests start and stop their own throwaway PostgreSQL
# cluster, Meilisearch fleet and Pushgateway on loopback ports; tests/packaging (marker
# `packaging`) builds the sdist and wheel and runs the installed CLI in a fresh virtualenv
# (its dependencies come from the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export MIROIR_MEILISEARCH_BIN="${MIROIR_MEILISEARCH_BIN:-${MIROIR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/miroir-pipeline}/meilisearch-1.21.0}"
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy (core)"; .venv/bin/mypy
echo "== pytest"
set +e
.venv/bin/pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
