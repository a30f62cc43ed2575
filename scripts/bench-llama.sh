#!/usr/bin/env bash
# Benchmark: backfill against a real self-hosted server that queues instead of refusing —
# llama.cpp's `llama-server` with SmolLM2-135M (scripts/peers.sh) — with 2, 4 and 8 slots, each
# against a client fixed at the server's true slot count on the same table and server.
#
# Both clients run the same job (the shortest motions of data/motions_sample.jsonl, 2 per
# request) through the real binary; the fixed one has `concurrency = { start = S, min = S,
# max = S }`, the adaptive one no concurrency caps at all. Prints per slot count and client,
# from the ledger and the server's log: items done or failed (the tiny model's output fails
# some) over the run (first call's start to the
# last call's end), that against the fixed client's, the most requests in flight, the median
# call against the server's own median time per call, timeouts and items computed twice
# (hedged), and the share of prompt tokens the server found cached. Each run gets a freshly
# started server, so neither client finds the other's prompts in its cache.
#
#   scripts/bench-llama.sh                    # 2, 4 and 8 slots, 40 motions, one round each
#   SLOTS="4" ITEMS=60 ROUNDS=2 scripts/bench-llama.sh
#   SLOTS=1 ITEMS=30 PER_REQUEST="{ start = 10, min = 1, max = 10 }" TIMEOUT=5 scripts/bench-llama.sh
#                                             # a start size the server cannot answer in time
#   NO_TIMINGS=1 SLOTS="2 4" scripts/bench-llama.sh
#                                             # through scripts/strip-timings-proxy.py: a server
#                                             # that does not report its time (vLLM, Ollama)
#   NO_TIMINGS=tgi SLOTS="2 16" scripts/bench-llama.sh
#                                             # the proxy moves the server's time into an
#                                             # x-inference-time header, as TGI sends it
#   NO_TIMINGS=vllm SLOTS="2 16" scripts/bench-llama.sh
#                                             # into a metrics object, as vLLM sends it with
#                                             # --enable-per-request-metrics
#   NO_TIMINGS=gauges SLOTS="2 16" scripts/bench-llama.sh
#                                             # no time, no /props: only the server's gauges
#                                             # of requests running and waiting at /metrics,
#                                             # as vLLM and TGI show them
#   AGAIN=1 NO_TIMINGS=1 SLOTS="16" scripts/bench-llama.sh
#                                             # the adaptive client runs the job a second time
#                                             # (client `again`) on the same database, its
#                                             # column and response cache emptied, against a
#                                             # fresh server: a new
#                                             # run that starts where the job's last run on
#                                             # that server settled
#   WHOLE=1 NO_TIMINGS=1 SLOTS="2 16" scripts/bench-llama.sh
#                                             # the adaptive client also once with its answers
#                                             # asked for whole (client `whole`, model.stream =
#                                             # "never"), against a fresh server: what the
#                                             # streamed answers' first chunks change
#   BACKFILL_BIN=/path/to/backfill scripts/bench-llama.sh   # another build of backfill
#   KEEP=/tmp/runs RUST_LOG=backfill_controller=debug scripts/bench-llama.sh
#                                             # keeps every run's job, database (its calls in
#                                             # backfill_calls) and log in /tmp/runs
#
# The server shares the machine's cores with the client: run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
SLOTS="${SLOTS:-2 4 8}"
ITEMS="${ITEMS:-40}"
ROUNDS="${ROUNDS:-1}"
PER_REQUEST="${PER_REQUEST:-{ start = 2, min = 1, max = 2 \}}"
TIMEOUT="${TIMEOUT:-300}"
PORT="${BENCH_LLAMA_PORT:-18081}"
NO_TIMINGS="${NO_TIMINGS:-}"
# The port the clients call: the server's own, or the proxy's in front of it.
CLIENT_PORT="$PORT"
[ -n "$NO_TIMINGS" ] && CLIENT_PORT=$((PORT + 1))

if [ -n "${BACKFILL_BIN:-}" ]; then
  BIN="$BACKFILL_BIN"
else
  cargo build --locked --bin backfill >&2
  BIN="$PWD/target/debug/backfill"
fi
WORK="$(mktemp -d)"
export BACKFILL_PEERS_RUN="$WORK/peers"
PROXY_PID=""
cleanup() {
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null || true
  BACKFILL_PEERS_RUN="$WORK/peers" scripts/peers.sh stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
if [ -n "$NO_TIMINGS" ]; then
  proxy_options=()
  [ "$NO_TIMINGS" = tgi ] && proxy_options=(--tgi-header)
  [ "$NO_TIMINGS" = vllm ] && proxy_options=(--vllm-metrics)
  [ "$NO_TIMINGS" = gauges ] && proxy_options=(--gauges)
  python3 scripts/strip-timings-proxy.py "$CLIENT_PORT" "http://127.0.0.1:$PORT" "${proxy_options[@]}" &
  PROXY_PID=$!
fi

python3 scripts/make-motions-db.py data/motions_sample.jsonl "$WORK/motions.db" >&2
python3 - "$WORK/motions.db" "$ITEMS" <<'EOF'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("DELETE FROM motions WHERE id NOT IN (SELECT id FROM motions ORDER BY length(text) LIMIT ?)", (int(sys.argv[2]),))
db.commit()
db.execute("VACUUM")
EOF
cat >"$WORK/prompt.md" <<'EOF'
Leg elke motie uit in één korte zin van hoogstens vijftien woorden. Antwoord met een JSON-object met de id's als sleutels.
{{items}}
EOF

# job FILE DB CONCURRENCY_LINE
job() {
  cat >"$1" <<EOF
name = "bench-llama"
[source]
database = "sqlite://$2"
table = "motions"
id = "id"
columns = ["title", "text"]
pending = "explanation IS NULL"
[target]
column = "explanation"
[prompt]
template = "$WORK/prompt.md"
[model]
base_url = "http://127.0.0.1:$CLIENT_PORT/v1"
${MODEL_EXTRA:-}
name = "smollm2-135m"
structured_output = "json_object_schema"
max_output_tokens_per_item = 60
temperature = 0.0
request_timeout_s = $TIMEOUT
context_window = 4096
[pricing.smollm2-135m]
input = 0.0
output = 0.0
[limits]
items_per_request = $PER_REQUEST
max_attempts = 3
max_failed_share = 1.0
$3
EOF
}

# run SLOTS CLIENT CONCURRENCY_LINE [EARLIER_DIR] -> one result line (python dict) on stdout;
# with EARLIER_DIR, on that run's database (its ledger and saved state), the column emptied.
run() {
  local slots="$1" client="$2" line="$3" dir="$WORK/run-$1-$2-$RANDOM"
  mkdir -p "$dir"
  LAST_DIR="$dir"
  if [ -n "${4:-}" ]; then
    cp "$4/motions.db" "$dir/motions.db"
    # The answers cached by the earlier run would spare this one most of its calls.
    python3 -c 'import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); db.execute("UPDATE motions SET explanation = NULL"); db.execute("DELETE FROM backfill_cache"); db.commit()' "$dir/motions.db"
  else
    cp "$WORK/motions.db" "$dir/motions.db"
  fi
  job "$dir/job.toml" "$dir/motions.db" "$line"
  local log="$WORK/peers/llama.log" offset
  offset=$(stat -c %s "$log")
  (cd "$dir" && "$BIN" run job.toml --json --quiet >"$dir/summary.json" 2>"$dir/stderr.log") || true
  python3 - "$dir" "$log" "$offset" "$slots" "$client" <<'EOF'
import json, sqlite3, statistics, sys
dir, log, offset, slots, client = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
try:
    summary = json.load(open(f"{dir}/summary.json"))
except Exception:
    sys.exit(f"{client} at {slots} slots: no summary; stderr: {open(dir + '/stderr.log').read()[-2000:]}")
db = sqlite3.connect(f"{dir}/motions.db")
run_id = db.execute("SELECT MAX(id) FROM backfill_runs").fetchone()[0]
calls = db.execute("SELECT started_at, started_at + latency_ms, outcome FROM backfill_calls WHERE latency_ms IS NOT NULL AND run_id = ? ORDER BY started_at", (run_id,)).fetchall()
first, last = calls[0][0], max(end for _, end, _ in calls)
most = max(sum(1 for s, e, _ in calls if s <= start < e) for start, _, _ in calls)
median_call = statistics.median(e - s for s, e, _ in calls) / 1000
timeouts = sum(1 for *_, outcome in calls if outcome == "timeout")
text = open(log, "rb").read()[offset:].decode("utf-8", "replace")
own = [float(line.split("total time =")[1].split()[0]) for line in text.splitlines() if "total time =" in line]
print(json.dumps({
    "slots": int(slots), "client": client, "span_s": (last - first) / 1000,
    "done": summary["items"]["done"], "failed": summary["items"]["failed"] + summary["items"]["rejected"], "calls": len(calls),
    "most_in_flight": most, "median_call_s": median_call,
    "server_median_s": statistics.median(own) / 1000 if own else None,
    "timeouts": timeouts, "hedged_items": summary["controller"]["hedged_items"],
    "cached_share": sum(c or 0 for (c,) in db.execute("SELECT cached_tokens FROM backfill_calls WHERE run_id = ?", (run_id,))) / max(1, sum(p or 0 for (p,) in db.execute("SELECT prompt_tokens FROM backfill_calls WHERE run_id = ?", (run_id,)))),
}))
EOF
  if [ -n "${KEEP:-}" ]; then
    mkdir -p "$KEEP"
    cp -r "$dir" "$KEEP/"
  fi
}

# A fresh server for every run: llama-server keeps each slot's last prompt cached, and a
# client run after another on the same table would find most of its prompts already there.
fresh_server() {
  BACKFILL_PEERS_RUN="$WORK/peers" scripts/peers.sh stop >/dev/null 2>&1 || true
  while curl -fsS -o /dev/null "http://127.0.0.1:$PORT/health" 2>/dev/null; do sleep 0.5; done
  LLAMA_PORT="$PORT" LLAMA_SLOTS="$1" LLAMA_CTX=$((4096 * $1)) scripts/peers.sh start-llama 2>/dev/null
}

results="$WORK/results.jsonl"
for slots in $SLOTS; do
  for ((round = 1; round <= ROUNDS; round++)); do
    fresh_server "$slots"
    run "$slots" backfill "" >>"$results"
    if [ -n "${AGAIN:-}" ]; then
      fresh_server "$slots"
      run "$slots" again "" "$LAST_DIR" >>"$results"
    fi
    if [ -n "${WHOLE:-}" ]; then
      fresh_server "$slots"
      MODEL_EXTRA='stream = "never"' run "$slots" whole "" >>"$results"
    fi
    fresh_server "$slots"
    run "$slots" fixed "concurrency = { start = $slots, min = $slots, max = $slots }" >>"$results"
  done
done

python3 - "$results" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print("| slots | client | items/s | vs fixed | run s | done/failed | calls | most in flight | median call s | server's own s | call ÷ own | timeouts | computed twice | prompt cached |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
fixed = {}
for r in rows:
    if r["client"] == "fixed":
        fixed.setdefault(r["slots"], []).append((r["done"] + r["failed"]) / r["span_s"])
for r in rows:
    rate = (r["done"] + r["failed"]) / r["span_s"]
    base = sum(fixed[r["slots"]]) / len(fixed[r["slots"]])
    own = r["server_median_s"]
    print(f"| {r['slots']} | {r['client']} | {rate:.3f} | {rate / base:.2f} | {r['span_s']:.0f} | {r['done']}/{r['failed']} | {r['calls']} | {r['most_in_flight']} "
          f"| {r['median_call_s']:.1f} | {own:.1f} | {r['median_call_s'] / own:.2f} | {r['timeouts']} | {r['hedged_items']} | {100 * r['cached_share']:.0f}% |")
EOF
