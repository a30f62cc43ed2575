#!/usr/bin/env bash
# Runs every test of the project: installs the real peers into the cache (once), starts them,
# then `cargo test` over the whole workspace. CI runs exactly this (.ci/run).
#
#   scripts/test.sh [extra cargo test arguments]
#
# Cache: ${BACKFILL_CACHE:-$HOME/.cache/backfill} (virtualenvs, model files). A fresh machine
# spends about 6 minutes building the llama.cpp server once.
set -euo pipefail
cd "$(dirname "$0")/.."
export BACKFILL_CACHE="${BACKFILL_CACHE:-$HOME/.cache/backfill}"
export LLAMA_PORT="${LLAMA_PORT:-8081}"

scripts/peers.sh start-llama
trap 'scripts/peers.sh stop' EXIT
export BACKFILL_LLAMA_URL="http://127.0.0.1:$LLAMA_PORT/v1"

cargo test --workspace --locked "$@"
