#!/usr/bin/env bash
# Where a SQLite run's CPU goes, at each table size: `perf record` of a steady run over the
# tables scripts/bench-scale.sh built (target/bench-scale/rows-N.db; run it first), against the
# same fake provider, for WINDOW seconds (default 2) once 500 items were answered.
#
# Printed per size: backfill's CPU (perf's cpu-clock samples) per answered item in the window,
# and the shares of its samples in thread handoffs (scheduler, futexes, channel wake-ups), SQLite's
# own code, file reads (page-cache copies, block I/O) and the rest; with ratios against the
# first size. A wide window smooths the up to 1,280 items the writer queue may hold answered but
# not yet written at either end of it.
#
#   scripts/profile-scale.sh 10000 1000000
#   WINDOW=4 scripts/profile-scale.sh 10000 1000000
#
# Needs `perf` allowed to record this user's processes (kernel.perf_event_paranoid <= 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -gt 0 ] || set -- 10000 1000000
WINDOW="${WINDOW:-2}"
PORT="${BENCH_PORT:-18432}"
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="${BACKFILL_BIN:-$TARGET/release/backfill}"
FAKE="$TARGET/release/examples/fake_provider"
BENCH="${BENCH_DIR:-target/bench-scale}"
WORK="$BENCH/profile"
command -v perf >/dev/null || { echo "perf is not installed" >&2; exit 1; }
[ -x "$BIN" ] && [ -x "$FAKE" ] || { echo "build first: cargo build --release --bin backfill --example fake_provider" >&2; exit 1; }
mkdir -p "$WORK"
printf 'Explain each of these {{count}} motions in one sentence.\nAnswer with a JSON object keyed by id.\n{{items}}\n' > "$WORK/prompt.md"

"$FAKE" --port "$PORT" --rpm 100000000 --burst-s 1 --latency-ms 0-0 2>/dev/null &
fake=$!
trap 'kill -INT $fake 2>/dev/null; wait $fake 2>/dev/null; rm -f "$WORK"/work.db*' EXIT
answered() { python3 -c "import json,urllib.request; print(json.load(urllib.request.urlopen('http://127.0.0.1:$PORT/_stats'))['answered'] * 20)"; }
until answered >/dev/null 2>&1; do sleep 0.1; done

for n in "$@"; do
  [ -f "$BENCH/rows-$n.db" ] || { echo "$BENCH/rows-$n.db is missing: run scripts/bench-scale.sh $n first" >&2; exit 1; }
  rm -f "$WORK"/work.db*
  cp "$BENCH/rows-$n.db" "$WORK/work.db"
  cat > "$WORK/job.toml" <<EOF
name = "profile-scale"

[source]
database = "sqlite://$(cd "$WORK" && pwd)/work.db"
table = "docs"
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
expected_output_tokens_per_item = 30
context_window = 128000
request_timeout_s = 30

[pricing.fake-model]
input = 0.15
output = 0.60

[limits]
items_per_request = { start = 20, min = 20, max = 20 }
concurrency = { start = 4, min = 1, max = 8 }
EOF
  NO_COLOR=1 "$BIN" run "$WORK/job.toml" --json >"$WORK/run-$n.json" 2>"$WORK/run-$n.stderr" &
  pid=$!
  base=$(answered)
  until [ $(( $(answered) - base )) -ge 500 ]; do sleep 0.05; done
  a0=$(answered)
  perf record -q -F 1999 -p "$pid" -o "$WORK/perf-$n.data" -- sleep "$WINDOW" 2>/dev/null
  a1=$(answered)
  kill -TERM "$pid"; wait "$pid" || true
  perf report -i "$WORK/perf-$n.data" --stdio --no-children --sort sym 2>/dev/null > "$WORK/report-$n.txt"
  echo "$n $((a1 - a0))" >> "$WORK/items.txt.$$"
done

python3 - "$WORK" "$$" "$@" <<'PY'
import re, sys
work, me, sizes = sys.argv[1], sys.argv[2], sys.argv[3:]
items = dict(line.split() for line in open(f"{work}/items.txt.{me}"))
KINDS = [
    ("thread handoffs", r"finish_task_switch|_raw_spin_unlock|futex|schedule|lock_contended|unpark|flume|try_to_wake"),
    ("SQLite", r"sqlite3|pcache|[bB]tree|wal[A-Z]"),
    ("file reads", r"copy_to_iter|filemap|iowrite|blk_|virtio|page_cache|read_iter|ext4|xfs"),
]
rows = []
for n in sizes:
    text = open(f"{work}/report-{n}.txt").read()
    ns = float(re.search(r"Event count \(approx\.\): (\d+)", text).group(1))
    shares = {k: 0.0 for k, _ in KINDS}
    shares["other"] = 0.0
    for m in re.finditer(r"^\s+([0-9.]+)%\s+\[.\]\s+(.*)$", text, re.M):
        kind = next((k for k, pattern in KINDS if re.search(pattern, m.group(2))), "other")
        shares[kind] += float(m.group(1))
    rows.append((n, ns / 1e6 / max(1, int(items[n])), int(items[n]), shares))
print(f"{'rows':>9}{'items':>7}{'CPU ms/item':>12}" + "".join(f"{k:>17}" for k in rows[0][3]))
for n, ms, count, shares in rows:
    print(f"{n:>9}{count:>7}{ms:>12.3f}" + "".join(f"{v:>16.1f}%" for v in shares.values()))
first = rows[0][1]
for n, ms, _, _ in rows[1:]:
    print(f"CPU per item at {n} rows: {ms / first:.2f}x the figure at {rows[0][0]}")
PY
rm -f "$WORK/items.txt.$$"
