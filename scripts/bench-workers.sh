#!/usr/bin/env bash
# Benchmark: items/s of 1, 2 and 4 `backfill run --resume` workers sharing one PostgreSQL run,
# against a fake provider account with a requests/min limit (examples/fake_provider.rs):
#
#   A "rate-limited": fast answers; one worker alone can reach the account's limit.
#   B "slow answers": 2-3 s per answer and at most 4 calls in flight per worker, so one
#     worker alone reaches about a third of the limit; more workers add up to the limit.
#
# The job does not state the limit: the workers learn it from the x-ratelimit-* headers and
# share it through the database. Prints, per scenario and worker count, from the ledger:
# items/s over the whole run (first call's start to last call's end, so start-up and the last
# answers' latency count) and in steady state (items of the calls sent in the middle 80% of
# the sending span, over that span); the account's limit in items/s; steady/limit; requests
# and 429s as the provider counted them; and each worker's share of the items.
#
#   scripts/bench-workers.sh            # debug build (the warm one)
#   PROFILE=release scripts/bench-workers.sh
#
# Needs PostgreSQL (BENCH_PG, default postgres://postgres@127.0.0.1:5432/test) and psql.
set -euo pipefail
cd "$(dirname "$0")/.."
PG="${BENCH_PG:-postgres://postgres@127.0.0.1:5432/test}"
PROFILE="${PROFILE:-debug}"
PORT="${BENCH_PORT:-18411}"
ITEMS_PER_REQUEST=10
export PGOPTIONS="${PGOPTIONS:--c client_min_messages=warning}"

flag=(); [ "$PROFILE" = release ] && flag=(--release)
cargo build --locked "${flag[@]}" --bin backfill --example fake_provider >&2
BIN="target/$PROFILE/backfill"
FAKE="target/$PROFILE/examples/fake_provider"
WORK="$(mktemp -d)"
FAKE_PID=""
SCHEMA=""
cleanup() {
  [ -n "$FAKE_PID" ] && kill "$FAKE_PID" 2>/dev/null && wait "$FAKE_PID" 2>/dev/null
  [ -n "$SCHEMA" ] && psql "$PG" -q -c "DROP SCHEMA IF EXISTS $SCHEMA CASCADE" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT

printf 'Explain each of these {{count}} motions in one sentence.\nAnswer with a JSON object keyed by id.\n{{items}}\n' > "$WORK/prompt.md"

stat() { curl -fsS "http://127.0.0.1:$PORT/_stats" | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['answered'], d['rate_limited'])"; }

# scenario NAME RPM LATENCY CONCURRENCY_MAX ROWS_PER_WORKER_COUNT...
scenario() {
  local name=$1 rpm=$2 latency=$3 concurrency=$4; shift 4
  "$FAKE" --port "$PORT" --rpm "$rpm" --burst-s 1 --latency-ms "$latency" 2>"$WORK/fake.log" &
  FAKE_PID=$!
  for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$PORT/_stats" >/dev/null 2>&1 && break; sleep 0.1; done
  local limit
  limit=$(python3 -c "print(round($rpm / 60 * $ITEMS_PER_REQUEST, 1))")
  for spec in "$@"; do
    local workers=${spec%%:*} rows=${spec##*:}
    SCHEMA="bf_bench_$$_${name//-/_}_${workers}"
    local url="$PG?options=-c%20search_path%3D$SCHEMA"
    psql "$PG" -q -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE SCHEMA $SCHEMA;
CREATE TABLE $SCHEMA.items (id BIGINT PRIMARY KEY, title TEXT NOT NULL, body TEXT, summary TEXT);
INSERT INTO $SCHEMA.items (id, title, body)
SELECT i, 'Motie ' || i, 'De Kamer, gehoord de beraadslaging, verzoekt de regering punt ' || i || ' te regelen.'
FROM generate_series(1, $rows) AS i;
SQL
    cat > "$WORK/job.toml" <<TOML
name = "bench-$name"

[source]
database = "$url"
table = "$SCHEMA.items"
id = "id"
columns = ["title", "body"]
pending = "summary IS NULL"

[target]
column = "summary"

[prompt]
template = "prompt.md"

[model]
base_url = "http://127.0.0.1:$PORT/v1"
name = "fake-model"
structured_output = "json_schema"
max_output_tokens_per_item = 60
request_timeout_s = 30

[pricing.fake-model]
input = 0.15
output = 0.60

[limits]
items_per_request = { start = $ITEMS_PER_REQUEST, min = $ITEMS_PER_REQUEST, max = $ITEMS_PER_REQUEST }
concurrency = { start = $concurrency, min = 1, max = $concurrency }
TOML
    read -r answered_before limited_before < <(stat)
    local pids=()
    for w in $(seq "$workers"); do
      "$BIN" run "$WORK/job.toml" --resume --quiet >/dev/null 2>"$WORK/worker$w.log" &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do
      wait "$pid" || { echo "worker $pid failed:" >&2; cat "$WORK"/worker*.log >&2; exit 1; }
    done
    read -r answered limited < <(stat)
    "$BIN" status "$WORK/job.toml" --json > "$WORK/status.json"
    local steady
    steady=$(psql "$url" -At -c "WITH c AS (SELECT started_at, items_ok FROM backfill_calls WHERE outcome = 'ok'), \
      b AS (SELECT MIN(started_at) AS s, MAX(started_at) AS e FROM c) \
      SELECT COALESCE(SUM(items_ok) FILTER (WHERE started_at >= s + (e - s) * 0.1 AND started_at < e - (e - s) * 0.1), 0) \
      / GREATEST((e - s) * 0.8 / 1000.0, 0.001) FROM c, b GROUP BY s, e")
    python3 - "$WORK/status.json" "$name" "$workers" "$rows" "$limit" $((answered - answered_before)) $((limited - limited_before)) "$steady" <<'PY'
import json, sys
status = json.load(open(sys.argv[1]))
name, workers, rows, limit, answered, limited = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
steady = float(sys.argv[8])
done = status["items"]["done"]
whole = status["calls"]["items_per_second"] or 0.0
shares = [w["items_done"] for w in status["workers"]]
requests = answered + limited
print(f"{name:<13} {workers:>7} {done:>6} {whole:>8.1f} {steady:>8.1f} {limit:>7.1f} {steady / limit:>6.2f} {requests:>8} {limited:>5}  {shares}")
assert done == rows, f"{done} of {rows} items done"
PY
    psql "$PG" -q -c "DROP SCHEMA $SCHEMA CASCADE" >/dev/null
    SCHEMA=""
  done
  kill "$FAKE_PID"; wait "$FAKE_PID" 2>/dev/null || true; FAKE_PID=""
}

echo "profile: $PROFILE; $ITEMS_PER_REQUEST items per request; the limit is learned from the provider's headers"
printf '%-13s %7s %6s %8s %8s %7s %6s %8s %5s  %s\n' scenario workers items "whole/s" "steady/s" "limit/s" ratio requests 429s "items per worker"
scenario rate-limited 600 100-300 16 1:2000 2:2000 4:2000
scenario slow-answers 300 2000-3000 4 1:600 2:900 4:1500
