#!/usr/bin/env bash
# Benchmark: does a run's cost per item and its memory stay flat as the table grows?
#
# Builds tables of 10,000, 100,000 and 1,000,000 synthetic rows (realistic lengths: a title and
# 300-600 characters of Dutch-like text each) in SQLite — and in PostgreSQL when it answers at
# BENCH_PG — and, for each size:
#
#   dry run   `run --dry-run` over every pending row: seconds and peak RSS;
#   start     `run` over the whole table (the run holds every row, as a real backfill would)
#             against a local fake provider with ample limits and no latency
#             (examples/fake_provider.rs), with every statement logged (RUST_LOG
#             sqlx::query=debug), stopped with SIGTERM once ITEMS/5 items were answered: the
#             enqueue and the first claims, for the longest statement and the start seconds;
#             PostgreSQL: BENCH_PG_WORKERS workers (default 4) on the one run;
#   run       `run --resume` for ITEMS more items, without the statement log: items/s, CPU;
#   status    `status` of the run: seconds and peak RSS.
#
# Printed per size: items/s and CPU ms per item (backfill's processes, user+sys, between the
# first answer and the stop), start seconds (launch to first answer: checks, enqueue, attach),
# peak RSS of run (start and run) and dry run, dry-run seconds, the longest statement (or wait
# for SQLite's write connection, logged by the store past 0.1 s in both phases), WARN
# lines on the runs' stderr, and `status`'s seconds and peak RSS; then the targets, with ratios
# against this run's smallest size.
#
#   scripts/bench-scale.sh                       # 10000 100000 1000000
#   scripts/bench-scale.sh 10000 100000          # other sizes
#   scripts/bench-scale.sh --ten-million         # 10000 and 10000000, SQLite only (about 15 GB
#                                                # of disk while it runs; the 10M files are
#                                                # deleted at the end unless BENCH_KEEP=1)
#   ITEMS=2000 BENCH_PG= scripts/bench-scale.sh  # fewer items, SQLite only
#   BENCH_BACKENDS=postgres scripts/bench-scale.sh  # one store only (sqlite or postgres)
#
# BACKFILL_BIN runs another build of backfill (the fake provider is built here either way).
# Databases are kept in BENCH_DIR (default target/bench-scale) and copied fresh for every size.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ITEMS="${ITEMS:-5000}"
PG="${BENCH_PG-postgres://postgres@127.0.0.1:5432/test}"
PORT="${BENCH_PORT:-18431}"
WORK="${BENCH_DIR:-target/bench-scale}"
sizes=("$@")
TEN_MILLION=
if [ "${1:-}" = "--ten-million" ]; then
  TEN_MILLION=1
  sizes=(10000 10000000)
  export BENCH_BACKENDS="${BENCH_BACKENDS:-sqlite}"
fi
[ ${#sizes[@]} -eq 0 ] && sizes=(10000 100000 1000000)
mkdir -p "$WORK"
if [ -n "$TEN_MILLION" ]; then
  free_gb=$(df -Pk "$WORK" | awk 'NR == 2 { print int($4 / 1048576) }')
  if [ "$free_gb" -lt 16 ]; then
    echo "--ten-million needs about 16 GB free in $WORK; $free_gb GB are" >&2
    exit 1
  fi
fi
export PGOPTIONS="${PGOPTIONS:--c client_min_messages=warning}"

cargo build --quiet --release --locked --bin backfill --example fake_provider >&2
TARGET="${CARGO_TARGET_DIR:-target}"
BIN="${BACKFILL_BIN:-$TARGET/release/backfill}"
FAKE="$TARGET/release/examples/fake_provider"

backends=(sqlite)
if [ -n "${BENCH_BACKENDS:-}" ]; then
  read -r -a backends <<< "$BENCH_BACKENDS"
elif [ -n "$PG" ] && command -v psql >/dev/null && psql "$PG" -Atqc 'SELECT 1' >/dev/null 2>&1; then
  backends+=(postgres)
else
  echo "PostgreSQL not reachable at ${PG:-(BENCH_PG empty)}: SQLite only" >&2
fi

BIN="$BIN" FAKE="$FAKE" PORT="$PORT" WORK="$WORK" ITEMS="$ITEMS" PG="$PG" \
  exec python3 - "${backends[*]}" "${sizes[@]}" <<'PY'
import json, os, random, re, shutil, signal, sqlite3, subprocess, sys, time, urllib.request

BIN, FAKE, PORT, WORK, PG = (os.environ[k] for k in ("BIN", "FAKE", "PORT", "WORK", "PG"))
ITEMS = int(os.environ["ITEMS"])
WORKERS_PG = int(os.environ.get("BENCH_PG_WORKERS", "4"))
PER_REQUEST = 20
BIG = 5_000_000  # tables from this size are not kept between runs of the script
backends, sizes = sys.argv[1].split(), [int(s) for s in sys.argv[2:]]
TICK = os.sysconf("SC_CLK_TCK")

# ---- data: the same synthetic rows for both stores -------------------------------------------
WORDS = ("de het een van en in op te dat voor met is niet aan door bij regering kamer motie "
         "verzoekt constaterende overwegende dat gemeenten zorg onderwijs woningbouw stikstof "
         "klimaat energie belasting pensioen veiligheid politie defensie onderwijsinstellingen "
         "jongeren ouderen huurders boeren ondernemers subsidie wetgeving uitvoering toezicht "
         "financiering begroting middelen ministerie staatssecretaris provincie waterschap").split()
rng = random.Random(15)
PARAS = [" ".join(rng.choice(WORDS) for _ in range(110)) for _ in range(997)]

def row(i):
    return (i, f"Motie {i} over {WORDS[i % len(WORDS)]} en {WORDS[(i * 7) % len(WORDS)]}",
            PARAS[i % 997][: 300 + (i * 13) % 300])

def sqlite_table(n):
    path = f"{WORK}/rows-{n}.db"
    if not os.path.exists(path):
        t = time.monotonic()
        con = sqlite3.connect(path + ".tmp")
        con.execute("PRAGMA journal_mode = OFF")
        con.execute("PRAGMA synchronous = OFF")
        con.execute("CREATE TABLE docs (id INTEGER PRIMARY KEY, title TEXT NOT NULL, body TEXT NOT NULL, summary TEXT)")
        con.executemany("INSERT INTO docs (id, title, body) VALUES (?, ?, ?)", (row(i) for i in range(1, n + 1)))
        con.commit(); con.close()
        os.replace(path + ".tmp", path)
        print(f"  built {path} in {time.monotonic() - t:.1f} s", file=sys.stderr)
    work = f"{WORK}/work.db"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(work + suffix):
            os.remove(work + suffix)
    if n >= BIG:
        os.replace(path, work)  # too big to copy: the table is built again next time
    else:
        shutil.copyfile(path, work)
    return f"sqlite://{os.path.abspath(work)}", "docs"

def psql(sql, url=None):
    subprocess.run(["psql", url or PG, "-q", "-v", "ON_ERROR_STOP=1", "-c", sql], check=True, stdout=subprocess.DEVNULL)

def pg_table(n):
    schema = f"bf_scale_{n}"
    sep = "&" if "?" in PG else "?"
    url = f"{PG}{sep}options=-c%20search_path%3D{schema}"
    exists = subprocess.run(["psql", PG, "-Atqc", f"SELECT count(*) FROM {schema}.docs"], capture_output=True, text=True)
    if exists.returncode != 0 or exists.stdout.strip() != str(n):
        t = time.monotonic()
        psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; "
             f"CREATE TABLE {schema}.docs (id BIGINT PRIMARY KEY, title TEXT NOT NULL, body TEXT NOT NULL, summary TEXT)")
        copy = subprocess.Popen(["psql", PG, "-q", "-v", "ON_ERROR_STOP=1", "-c",
                                 f"COPY {schema}.docs (id, title, body) FROM STDIN"], stdin=subprocess.PIPE, text=True)
        for i in range(1, n + 1):
            copy.stdin.write("%d\t%s\t%s\n" % row(i))
        copy.stdin.close()
        assert copy.wait() == 0
        psql(f"VACUUM ANALYZE {schema}.docs")
        print(f"  built {schema}.docs in {time.monotonic() - t:.1f} s", file=sys.stderr)
    else:
        # A fresh start: no runner tables, no outputs.
        psql(f"DO $$ DECLARE t text; BEGIN FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = '{schema}' "
             f"AND tablename LIKE 'backfill%' LOOP EXECUTE format('DROP TABLE {schema}.%I CASCADE', t); END LOOP; END $$; "
             f"UPDATE {schema}.docs SET summary = NULL WHERE summary IS NOT NULL")
        psql(f"VACUUM ANALYZE {schema}.docs")
    return url, f"{schema}.docs"

def job_file(url, table):
    with open(f"{WORK}/prompt.md", "w") as f:
        f.write("Explain each of these {{count}} motions in one sentence.\nAnswer with a JSON object keyed by id.\n{{items}}\n")
    path = f"{WORK}/job.toml"
    with open(path, "w") as f:
        f.write(f'''name = "bench-scale"

[source]
database = "{url}"
table = "{table}"
id = "id"
columns = ["title", "body"]
pending = "summary IS NULL"

[target]
column = "summary"

[prompt]
template = "prompt.md"

[model]
base_url = "http://127.0.0.1:{PORT}/v1"
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
items_per_request = {{ start = {PER_REQUEST}, min = {PER_REQUEST}, max = {PER_REQUEST} }}
concurrency = {{ start = 4, min = 1, max = 8 }}
''')
    return path

# ---- processes ---------------------------------------------------------------------------------
def answered():
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/_stats", timeout=5) as r:
        return json.load(r)["answered"] * PER_REQUEST

def cpu_seconds(pid):
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (FileNotFoundError, ProcessLookupError):
        return None

def backfill(args, n_procs, stop_after, log, env_extra=None):
    """Starts n_procs `backfill run` processes; SIGTERM once `stop_after` more items were
    answered. Returns start seconds, window (s, items, cpu), peak RSS (MB), stderr paths."""
    env = dict(os.environ, NO_COLOR="1", **(env_extra or {}))
    base = answered()
    t0 = time.monotonic()
    procs, errs = [], []
    for k in range(n_procs):
        err = f"{log}.{k}.stderr"
        errs.append(err)
        procs.append(subprocess.Popen([BIN, "run", f"{WORK}/job.toml", *args, "--json"], env=env,
                                      stdout=open(f"{log}.{k}.json", "w"), stderr=open(err, "w")))
    live = {p.pid: p for p in procs}
    usage = {}
    first = stop = None
    while live:
        for pid in list(live):
            got, status, ru = os.wait4(pid, os.WNOHANG)
            if got:
                usage[pid] = ru
                del live[pid]
        if not live:
            break
        now_items = answered() - base
        if first is None and now_items > 0:
            first = (time.monotonic(), now_items, sum(c for c in map(cpu_seconds, live) if c is not None))
        if stop is None and now_items >= stop_after:
            cpu = sum(c for c in map(cpu_seconds, live) if c is not None)
            stop = (time.monotonic(), now_items, cpu)
            for pid in live:
                os.kill(pid, signal.SIGTERM)
        time.sleep(0.02)
    if first is None or stop is None:
        raise SystemExit(f"backfill ended before {stop_after} items were answered; see {errs[0]}:\n" + open(errs[0]).read()[-3000:])
    rss = max(ru.ru_maxrss for ru in usage.values()) / 1024
    window = (stop[0] - first[0], stop[1] - first[1], stop[2] - first[2])
    return first[0] - t0, window, rss, errs

def status(log):
    t0 = time.monotonic()
    p = subprocess.Popen([BIN, "status", f"{WORK}/job.toml", "--json"],
                         stdout=open(f"{log}.json", "w"), stderr=open(f"{log}.stderr", "w"))
    _, code, ru = os.wait4(p.pid, 0)
    if code != 0:
        raise SystemExit(f"status failed: {open(log + '.stderr').read()[-2000:]}")
    return time.monotonic() - t0, ru.ru_maxrss / 1024

def dry_run(log):
    t0 = time.monotonic()
    p = subprocess.Popen([BIN, "run", f"{WORK}/job.toml", "--dry-run", "--json"],
                         stdout=open(f"{log}.json", "w"), stderr=open(f"{log}.stderr", "w"))
    _, status, ru = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"dry run failed: {open(log + '.stderr').read()[-2000:]}")
    return time.monotonic() - t0, ru.ru_maxrss / 1024, json.load(open(f"{log}.json"))["pending_items"]

UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}
def longest_statement(paths):
    worst, what = 0.0, ""
    for path in paths:
        for line in open(path, errors="replace"):
            m = re.search(r"elapsed_secs=([0-9.eE+-]+)", line)
            s = float(m.group(1)) if m else None
            if m is None and (m := re.search(r"elapsed=([0-9.]+)(s|ms|µs|us|ns)\b", line)):
                s = float(m.group(1)) * UNITS[m.group(2)]
            if s is not None and s > worst:
                found = re.search(r'summary="([^"]*)"', line)
                worst, what = s, (found.group(1) if found else line.strip())[:60]
    return worst, what

def warns(paths):
    # The benchmark's own SIGTERM is announced with a WARN: not counted.
    return sum(1 for p in paths for line in open(p, errors="replace")
               if re.search(r"\bWARN\b", line) and "SIGTERM: stopping" not in line)

# ---- the benchmark ---------------------------------------------------------------------------
fake = subprocess.Popen([FAKE, "--port", PORT, "--rpm", "100000000", "--burst-s", "1", "--latency-ms", "0-0"],
                        stderr=open(f"{WORK}/fake.log", "w"))
try:
    for _ in range(100):
        try:
            answered(); break
        except OSError:
            time.sleep(0.1)
    results = []
    for backend in backends:
        procs = WORKERS_PG if backend == "postgres" else 1
        for n in sizes:
            print(f"{backend} {n} rows ...", file=sys.stderr)
            url, table = sqlite_table(n) if backend == "sqlite" else pg_table(n)
            job_file(url, table)
            log = f"{WORK}/{backend}-{n}"
            dry_s, dry_rss, pending = dry_run(f"{log}-dry")
            assert pending == n, f"dry run counted {pending} of {n}"
            # Workers of one PostgreSQL run all say --resume: the first creates the run, the
            # others join it (a plain `run` beside an unfinished run is refused).
            first = ["--resume"] if backend == "postgres" else []
            # Waits for SQLite's write connection past 0.1 s are logged at debug level by
            # backfill::store, in both phases: they count as statement waits.
            waits = "warn,backfill=info,backfill_controller=info,backfill::store=debug"
            extra = {"RUST_LOG": f"{waits},sqlx::query=debug"}
            start_s, _, start_rss, started = backfill(first, procs, max(ITEMS // 5, PER_REQUEST), f"{log}-start", extra)
            _, (secs, items, cpu), rss, errs = backfill(["--resume"], procs, ITEMS, f"{log}-run", {"RUST_LOG": waits})
            worst, what = longest_statement(started + errs)
            status_s, status_rss = status(f"{log}-status")
            r = dict(backend=backend, rows=n, items_per_s=items / secs, cpu_ms_per_item=cpu * 1000 / items,
                     start_s=start_s, run_rss_mb=max(rss, start_rss), dry_rss_mb=dry_rss, dry_s=dry_s,
                     longest_statement_s=worst, longest_statement=what, warn_lines=warns(started + errs),
                     status_s=status_s, status_rss_mb=status_rss)
            results.append(r)
            print(f"  {json.dumps(r)}", file=sys.stderr)
finally:
    fake.send_signal(signal.SIGINT)
    fake.wait()
    if any(n >= BIG for n in sizes) and not os.environ.get("BENCH_KEEP"):
        for name in os.listdir(WORK):
            m = re.fullmatch(r"(work|rows-(\d+))\.db(-wal|-shm|\.tmp)?", name)
            if m and (m.group(2) is None or int(m.group(2)) >= BIG):
                os.remove(os.path.join(WORK, name))

stamp = time.strftime("%Y-%m-%dT%H%M%S")
json.dump(results, open(f"{WORK}/results-{stamp}.json", "w"), indent=1)
cores = os.cpu_count()
load = open("/proc/loadavg").read().split()[0]
print(f"\n{ITEMS} items per run, {PER_REQUEST} per request, fake provider without latency; {cores} cores, load {load}")
print(f"{'store':<9}{'rows':>9}{'items/s':>9}{'CPU ms/item':>12}{'start s':>9}{'run RSS MB':>11}"
      f"{'dry RSS MB':>11}{'dry s':>7}{'longest stmt s':>15}{'WARN':>6}{'status s':>9}{'status RSS MB':>14}")
for r in results:
    print(f"{r['backend']:<9}{r['rows']:>9}{r['items_per_s']:>9.0f}{r['cpu_ms_per_item']:>12.3f}{r['start_s']:>9.1f}"
          f"{r['run_rss_mb']:>11.0f}{r['dry_rss_mb']:>11.0f}{r['dry_s']:>7.1f}{r['longest_statement_s']:>15.3f}{r['warn_lines']:>6}"
          f"{r['status_s']:>9.1f}{r['status_rss_mb']:>14.0f}")

print("\ntargets (ratios against the smallest size of this run):")
ok_all = True
def target(ok, text):
    global ok_all
    ok_all &= ok
    print(f"  [{'ok' if ok else 'MISSED'}] {text}")
for backend in backends:
    rs = [r for r in results if r["backend"] == backend]
    if not rs:
        continue
    small, big = rs[0], rs[-1]
    ratio = big["cpu_ms_per_item"] / small["cpu_ms_per_item"]
    target(ratio <= 1.2, f"{backend}: CPU/item at {big['rows']} rows = {ratio:.2f}x the figure at {small['rows']} (<= 1.2x)")
    worst = max(r["cpu_ms_per_item"] for r in rs)
    target(worst <= 0.5, f"{backend}: CPU/item at most {worst:.3f} ms at every size (<= 0.5 ms)")
    # Memory is flat up to a million rows; ten million may hold a little more.
    cap = 200 if big["rows"] >= BIG else 150
    target(big["run_rss_mb"] <= cap, f"{backend}: run peak RSS at {big['rows']} rows {big['run_rss_mb']:.0f} MB (<= {cap} MB)")
    target(big["dry_rss_mb"] <= cap, f"{backend}: dry-run peak RSS at {big['rows']} rows {big['dry_rss_mb']:.0f} MB (<= {cap} MB)")
    target(big["status_rss_mb"] <= cap, f"{backend}: status peak RSS at {big['rows']} rows {big['status_rss_mb']:.0f} MB (<= {cap} MB)")
    dry_cap = 20 * max(1, big["rows"] / 1_000_000)
    target(big["dry_s"] <= dry_cap, f"{backend}: dry run of {big['rows']} rows {big['dry_s']:.1f} s (<= {dry_cap:.0f} s)")
    slow = max(rs, key=lambda r: r["longest_statement_s"])
    target(slow["longest_statement_s"] <= 1, f"{backend}: longest statement {slow['longest_statement_s']:.3f} s "
           f"({slow['rows']} rows: {slow['longest_statement']}) (<= 1 s)")
    target(sum(r["warn_lines"] for r in rs) == 0, f"{backend}: {sum(r['warn_lines'] for r in rs)} WARN lines (0)")
print(f"results: {WORK}/results-{stamp}.json")
PY
