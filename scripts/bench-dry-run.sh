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
load=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?")
python3 - "$db" "$work/estimate.json" <<'PY'
import resource, subprocess, sys, time
db, out = sys.argv[1], sys.argv[2]
start = time.monotonic()
with open(out, "w") as f:
    subprocess.run(["target/release/backfill", "run", "jobs/motions_nl.toml", "--database", f"sqlite://{db}",
                    "--dry-run", "--json"], stdout=f, check=True)
wall = time.monotonic() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
open(out + ".time", "w").write(f"{wall} {usage.ru_utime + usage.ru_stime}")
PY
after=$(sha256sum "$db" | cut -d' ' -f1)
python3 - "$work/estimate.json" "$load" "$before" "$after" <<'PY'
import json, os, sys
e = json.load(open(sys.argv[1]))
seconds, cpu = map(float, open(sys.argv[1] + ".time").read().split())
print(f"dry run of {e['pending_items']} pending items on {e['model']}: {seconds:.2f} s wall, {cpu:.2f} s CPU "
      f"on {os.cpu_count()} cores (load average {sys.argv[2]} before); {e['requests']} requests, "
      f"{e['input_tokens']:,} input / {e['output_tokens']:,} output tokens, ${e['estimated_cost_usd']:.2f}"
      + (f" (batch API ${e['batch_cost_usd']:.2f})" if e.get('batch_cost_usd') is not None else ""))
print("database unchanged" if sys.argv[3] == sys.argv[4] else "DATABASE CHANGED")
PY
