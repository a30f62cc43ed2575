#!/usr/bin/env bash
# Runs every test of the project: installs the real peers into the cache (once), starts them,
# then `cargo test` over the whole workspace. CI runs exactly this (.ci/run).
#
#   scripts/test.sh [extra cargo test arguments]
#
# Cache: ${BACKFILL_CACHE:-$HOME/.cache/backfill} (virtualenvs, model files). A fresh machine
# spends about 7 minutes building llama.cpp's llama-server once, and a minute fetching the ONNX
# model and the onnxruntime venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export BACKFILL_CACHE="${BACKFILL_CACHE:-$HOME/.cache/backfill}"
export LLAMA_PORT="${LLAMA_PORT:-8081}"
export LLMOCK_PORT="${LLMOCK_PORT:-8411}"

trap 'scripts/peers.sh stop' EXIT
scripts/peers.sh start-llama
export BACKFILL_LLAMA_URL="http://127.0.0.1:$LLAMA_PORT/v1"
# The server log carries its own time per request, which the llama.cpp test sets against ours.
export BACKFILL_LLAMA_LOG="${BACKFILL_PEERS_RUN:-$BACKFILL_CACHE/run}/llama.log"
# llmock at 60 requests/min with 20% random 429s: its verdict judges the client.
scripts/peers.sh start-llmock --rpm 60 --error-rate 429=0.2 --log-level warning
export BACKFILL_LLMOCK_URL="http://127.0.0.1:$LLMOCK_PORT"

# The local-model tests: all-MiniLM-L6-v2 int8 and its tokenizer (downloaded once into the
# cache) and the onnxruntime venv of the reference embeddings (created once); both re-run in
# about a second. They export BACKFILL_MINILM_MODEL, BACKFILL_MINILM_TOKENIZER, BACKFILL_PY.
eval "$(scripts/fetch-models.sh)"
eval "$(scripts/onnx/setup-venv.sh)"

cargo test --workspace --locked "$@"
