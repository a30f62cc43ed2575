#!/usr/bin/env bash
# Benchmark a local-model job end to end against onnxruntime, in one run on the same motions,
# model (all-MiniLM-L6-v2 int8) and thread count: for each max_batch_tokens in
# {default, 1024, 8192, 32768}, the release `backfill run` as a user runs it (whole process:
# load, claim, tokenise, compute, write) and onnxruntime's best configuration at the same
# budget, with items/s, the ratio and peak RSS of each.
#   scripts/bench-onnx.sh [--items 1000] [--threads 2] [--baseline path/to/backfill]
# --baseline: also run another backfill binary (e.g. a build of an earlier commit) at each
# budget, in the same run, so that a before/after comparison shares the machine's load.
# --dev: the dev build (tract and tokenizers are optimised in it too; about 2/3 of release
# speed), when a release build would take too long.
# The processor alone: cargo run --release --example bench_onnx -p backfill-onnx (crates/onnx).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
items=1000
threads=2
baseline=""
profile=release
while [ $# -gt 0 ]; do
    case "$1" in
        --items) items="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --baseline) baseline="$(realpath "$2")"; shift 2 ;;
        --dev) profile=debug; shift ;;
        *) echo "bench-onnx: unknown argument $1 (use --items N --threads N --baseline BIN)" >&2; exit 2 ;;
    esac
done
eval "$(scripts/fetch-models.sh)"
eval "$(scripts/onnx/setup-venv.sh)"
motions="${BACKFILL_MOTIONS:-../shared/data/motions/tk_moties_fulltext.jsonl}"
[ -f "$motions" ] || { echo "bench-onnx: $motions is missing: set BACKFILL_MOTIONS to the motions JSONL" >&2; exit 2; }
if [ "$profile" = release ]; then cargo build --quiet --release --bin backfill; else cargo build --quiet --bin backfill; fi
target_dir="$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
backfill="$target_dir/$profile/backfill"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 scripts/make-motions-db.py "$motions" "$work/fresh.db" >/dev/null
# The rows the job computes (the first $items by id), as onnxruntime's input.
python3 - "$work/fresh.db" "$items" "$work/texts.jsonl" <<'EOF'
import json, sqlite3, sys
db, items, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = sqlite3.connect(db).execute(
    "SELECT title, text FROM motions WHERE embedding IS NULL ORDER BY id LIMIT ?", (items,))
with open(out, "w") as f:
    for title, text in rows:
        f.write(json.dumps({"text": f"{title or ''}\n{text or ''}"}) + "\n")
EOF

# Peak RSS (KiB), wall and user+system seconds of a command, from GNU time.
measure() { /usr/bin/time -f '%M %e %U %S' -o "$work/time" "$@" >"$work/out" 2>"$work/err" \
    || { cat "$work/err" >&2; exit 1; }; }

printf '%s motions, all-MiniLM-L6-v2 int8, max_length 256, threads %s, %s build, %s\n' "$items" "$threads" "$profile" "$(date -u +%FT%TZ)"
printf 'load average %s\n' "$(cut -d' ' -f1-3 /proc/loadavg)"
printf '| max_batch_tokens | backfill items/s | CPU/wall | load | computing | peak RSS | onnxruntime items/s (best config) | peak RSS | ratio |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
runs=("this build:$backfill")
[ -z "$baseline" ] || runs=("baseline:$baseline" "${runs[@]}")
for budget in default 1024 8192 32768; do
for run in "${runs[@]}"; do
    label="${run%%:*}"
    binary="${run#*:}"
    # A fresh copy, without the previous run's -wal/-shm files (SQLite would apply them to it).
    rm -f "$work/motions.db" "$work/motions.db-wal" "$work/motions.db-shm"
    cp "$work/fresh.db" "$work/motions.db"
    bound_line=""
    [ "$budget" = default ] || bound_line="max_batch_tokens = $budget"
    cat >"$work/job.toml" <<EOF
name = "bench-embed"
[source]
database = "sqlite://$work/motions.db"
table = "motions"
id = "id"
columns = ["title", "text"]
pending = "embedding IS NULL"
[target]
column = "embedding"
format = "f32le"
[model]
kind = "onnx"
path = "$BACKFILL_MINILM_MODEL"
tokenizer = "$BACKFILL_MINILM_TOKENIZER"
input = "{{title}}\n{{text}}"
max_length = 256
$bound_line
threads = $threads
[limits]
items_per_request = { start = 64, min = 1, max = 64 }
EOF
    measure "$binary" run "$work/job.toml" --limit "$items" --json --quiet
    cp "$work/out" "$work/summary.json"
    cp "$work/err" "$work/log"
    read -r rss wall user sys <"$work/time"
    done_items="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["items"]["done"])' "$work/out" 2>/dev/null \
        || sqlite3 "$work/motions.db" 'SELECT count(*) FROM motions WHERE embedding IS NOT NULL' 2>/dev/null || echo "$items")"
    ort_budget="$([ "$budget" = default ] && echo 256 || echo "$budget")"
    measure "$BACKFILL_PY" scripts/onnx/reference_embeddings.py bench --model "$BACKFILL_MINILM_MODEL" \
        --tokenizer "$BACKFILL_MINILM_TOKENIZER" --input "$work/texts.jsonl" --threads "$threads" \
        --max-length 256 --max-batch-tokens "$ort_budget" --rounds 1
    read -r ort_rss _ _ _ <"$work/time"
    shown="$budget"
    [ -z "$baseline" ] || shown="$budget ($label)"
    python3 - "$shown" "$done_items" "$wall" "$user" "$sys" "$rss" "$ort_rss" "$work/out" "$work/summary.json" "$work/log" <<'EOF'
import json, re, sys
budget, done, wall, user, sys_s, rss, ort_rss, out, summary, log = sys.argv[1:]
done, wall = int(done), float(wall)
best = min((json.loads(line) for line in open(out) if line.strip()), key=lambda row: row["seconds"])
ours = done / wall
theirs = best["items"] / best["seconds"]
# The model's load (parse, fold, test pass, pass-size probe or its cache) from the run's log,
# and the seconds the model computed batches from its summary, as shares of the wall time.
loaded = [float(m.group(1)) for line in open(log) if "loaded local model" in line
          for m in [re.search(r"seconds=([0-9.]+)", line)] if m]
load = f"{loaded[0]:.1f} s" if loaded else "?"
try:
    compute = json.load(open(summary)).get("compute_seconds")
except ValueError:
    compute = None
computing = f"{compute / wall * 100:.0f} %" if compute else "?"
print(f"| {budget} | {ours:.1f} | {(float(user) + float(sys_s)) / wall:.2f} | {load} | {computing} | {int(rss) / 1024:.0f} MB "
      f"| {theirs:.1f} ({best['name']}) | {int(ort_rss) / 1024:.0f} MB | {ours / theirs:.2f}× |")
EOF
done
done
echo "backfill: the whole process (load, claim, tokenise, compute, write) over its wall time;"
echo "load: the model's load in it (parse, fold, test pass, pass size); computing: its batches' compute time over the wall time;"
echo "onnxruntime: its best configuration's compute time only (no load, no database)."
