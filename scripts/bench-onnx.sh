#!/usr/bin/env bash
# Benchmark the local-model processor against onnxruntime on 1,000 real motions, same model
# (all-MiniLM-L6-v2 int8), same thread count, side by side in one run.
# Arguments go to the bench binary, e.g. scripts/bench-onnx.sh --threads 2 --max-batch-tokens 4096
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(scripts/fetch-models.sh)"
eval "$(scripts/onnx/setup-venv.sh)"
cargo build --quiet --release --manifest-path crates/onnx/Cargo.toml --example bench_onnx
target_dir="$(cargo metadata --format-version 1 --no-deps --manifest-path crates/onnx/Cargo.toml \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
exec "$target_dir/release/examples/bench_onnx" "$@"
