#!/usr/bin/env bash
# Sets up and runs the example job (jobs/motions_nl.toml): plain-Dutch explanations of Dutch
# parliamentary motions, read from and written back to a SQLite database.
#
#   scripts/example.sh [backfill run options]      # default: --resume --limit 20
#
# 1. builds data/motions.db from ../shared/data/motions (or the shipped sample) if it is missing;
# 2. without OPENAI_BASE_URL: installs (once, cached) and starts the local llama.cpp server with
#    SmolLM2-135M on 127.0.0.1:8081 — a tiny model, so the plumbing is real and the prose poor;
#    with OPENAI_BASE_URL (and OPENAI_API_KEY, BACKFILL_MODEL): calls your provider instead;
# 3. builds backfill (release), shows the dry-run estimate, runs the job, and prints its status.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -e data/motions.db ]; then
  python3 scripts/make-motions-db.py
fi

if [ -z "${OPENAI_BASE_URL:-}" ]; then
  scripts/peers.sh start-llama
  echo "example: using the local llama.cpp server (set OPENAI_BASE_URL to use your provider)" >&2
else
  echo "example: using the provider at $OPENAI_BASE_URL, model ${BACKFILL_MODEL:-smollm2-135m}" >&2
fi

cargo build --release --locked --bin backfill
bin=target/release/backfill
args=("$@")
if [ ${#args[@]} -eq 0 ]; then args=(--resume --limit 20); fi

"$bin" run jobs/motions_nl.toml --dry-run "${args[@]}"
status=0
"$bin" run jobs/motions_nl.toml "${args[@]}" || status=$?
"$bin" status jobs/motions_nl.toml
exit "$status"
