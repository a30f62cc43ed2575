#!/usr/bin/env bash
# Create (once) the Python virtualenv used by the ONNX tests and benchmark, under
# ${BACKFILL_CACHE:-$HOME/.cache/backfill}/venv-onnx, with the pinned packages of
# scripts/onnx/requirements.txt. A re-run with the same requirements installs nothing.
# Progress goes to stderr; stdout gets `BACKFILL_PY=...` so `eval "$(scripts/onnx/setup-venv.sh)"`
# exports the interpreter the tests call.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
requirements="$here/requirements.txt"
cache_dir="${BACKFILL_CACHE:-$HOME/.cache/backfill}"
venv_dir="$cache_dir/venv-onnx"
stamp="$venv_dir/.requirements.sha256"
wanted="$(sha256sum "$requirements" | cut -d' ' -f1)"

if [[ -x "$venv_dir/bin/python" && -f "$stamp" && "$(cat "$stamp")" == "$wanted" ]]; then
    echo "setup-venv: $venv_dir is up to date" >&2
else
    echo "setup-venv: installing $requirements into $venv_dir" >&2
    mkdir -p "$cache_dir"
    python3 -m venv "$venv_dir"
    "$venv_dir/bin/python" -m pip install --quiet --only-binary=:all: -r "$requirements" >&2
    echo "$wanted" > "$stamp"
fi

echo "BACKFILL_PY='$venv_dir/bin/python'"
echo "export BACKFILL_PY"
