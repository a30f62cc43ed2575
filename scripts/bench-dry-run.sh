#!/usr/bin/env bash
# Benchmark `run --dry-run` on 30,000 pending items: builds a SQLite file from the real motions
# (../shared/data/motions/ or the sample in data/, repeated under new ids until there are
# N rows), then times the release binary estimating the example job against it, priced for
# a hosted model (BACKFILL_MODEL, default gpt-4o-mini) with a 128k context.
#   scripts/bench-dry-run.sh [N]        (default 30000)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rows="${1:-30000}"
work="${BENCH_DIR:-target/bench-dry-run}"
mkdir -p "$work"
db="$work/motions-$rows.db"
if [ ! -f "$db" ]; then
    python3 - "$db" "$rows" <<'PY'
import json, os, sqlite3, sys
db, rows = sys.argv[1], int(sys.argv[2])
shared = "../shared/data/motions/tk_moties_fulltext.jsonl"
source = shared if os.path.exists(shared) else "data/motions_sample.jsonl"
motions = [json.loads(line) for line in open(source, encoding="utf-8") if line.strip()]
con = sqlite3.connect(db + ".tmp")
con.execute("CREATE TABLE motions (id TEXT PRIMARY KEY, title TEXT NOT NULL, text TEXT NOT NULL, explanation TEXT)")
con.executemany(
    "INSERT INTO motions (id, title, text) VALUES (?, ?, ?)",
    ((f"{m['id']}-{i // len(motions)}", m["title"], m["text"]) for i, m in ((i, motions[i % len(motions)]) for i in range(rows))),
)
con.commit()
con.close()
os.replace(db + ".tmp", db)
print(f"{db}: {rows} rows from {len(motions)} motions in {source}", file=sys.stderr)
PY
fi
cargo build --quiet --release --locked --bin backfill
before=$(sha256sum "$db" | cut -d' ' -f1)
export BACKFILL_MODEL="${BACKFILL_MODEL:-gpt-4o-mini}" BACKFILL_CONTEXT_WINDOW=128000
start=$(date +%s.%N)
target/release/backfill run jobs/motions_nl.toml --database "sqlite://$db" --dry-run --json > "$work/estimate.json"
end=$(date +%s.%N)
after=$(sha256sum "$db" | cut -d' ' -f1)
python3 - "$work/estimate.json" "$start" "$end" "$before" "$after" <<'PY'
import json, sys
e = json.load(open(sys.argv[1]))
seconds = float(sys.argv[3]) - float(sys.argv[2])
print(f"dry run of {e['pending_items']} pending items on {e['model']}: {seconds:.2f} s wall "
      f"({e['pending_items'] / seconds:,.0f} items/s); {e['requests']} requests, "
      f"{e['input_tokens']:,} input / {e['output_tokens']:,} output tokens, ${e['estimated_cost_usd']:.2f}"
      + (f" (batch API ${e['batch_cost_usd']:.2f})" if e.get('batch_cost_usd') is not None else ""))
print("database unchanged" if sys.argv[4] == sys.argv[5] else "DATABASE CHANGED")
PY
