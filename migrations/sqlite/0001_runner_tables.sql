-- Runner tables of backfill (SQLite). Times are Unix milliseconds; money is integer
-- pico-dollars (1e-12 USD).

CREATE TABLE IF NOT EXISTS backfill_runs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    job              TEXT    NOT NULL,
    status           TEXT    NOT NULL,   -- running | interrupted | budget | failed | finished | abandoned
    target           TEXT    NOT NULL,   -- table and column(s), for people
    id_kind          TEXT    NOT NULL,   -- integer | text
    total_items      INTEGER NOT NULL,
    max_usd          REAL,
    spent_picos      INTEGER NOT NULL DEFAULT 0,  -- settled calls
    reserved_picos   INTEGER NOT NULL DEFAULT 0,  -- calls in flight (estimates)
    lost_picos       INTEGER NOT NULL DEFAULT 0,  -- calls in flight at a crash: possibly billed
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    finished_at      INTEGER,
    controller_state TEXT,
    last_error       TEXT
);
CREATE INDEX IF NOT EXISTS backfill_runs_job ON backfill_runs (job, id);

CREATE TABLE IF NOT EXISTS backfill_workers (
    run_id       INTEGER NOT NULL REFERENCES backfill_runs (id),
    worker       TEXT    NOT NULL,   -- host/pid/process-start
    host         TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    attached_at  INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    detached_at  INTEGER,
    PRIMARY KEY (run_id, worker)
);

CREATE TABLE IF NOT EXISTS backfill_items (
    run_id           INTEGER NOT NULL REFERENCES backfill_runs (id),
    item_id          TEXT    NOT NULL,
    seq              INTEGER NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'pending',  -- pending | leased | done | failed | rejected
    attempts         INTEGER NOT NULL DEFAULT 0,
    tier             INTEGER NOT NULL DEFAULT 0,          -- 0 = model.name, k = model.fallback[k-1]
    group_limit      INTEGER,                             -- largest batch the item may go in
    not_before       INTEGER NOT NULL DEFAULT 0,          -- retry backoff
    lease_owner      TEXT,
    lease_token      INTEGER,
    lease_expires_at INTEGER,
    last_error       TEXT,
    reason           TEXT,                                -- short code of the last failure
    done_by          TEXT,
    updated_at       INTEGER NOT NULL,
    PRIMARY KEY (run_id, item_id)
);
CREATE INDEX IF NOT EXISTS backfill_items_queue ON backfill_items (run_id, state, tier, seq);

CREATE TABLE IF NOT EXISTS backfill_calls (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id            INTEGER NOT NULL REFERENCES backfill_runs (id),
    worker            TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    price_tier        TEXT    NOT NULL,   -- sync | batch
    state             TEXT    NOT NULL,   -- reserved | settled | lost
    request_hash      TEXT,
    item_ids          TEXT    NOT NULL,   -- JSON array, in prompt order
    items             INTEGER NOT NULL,
    concurrency       INTEGER,            -- the controller's limit when sent
    started_at        INTEGER NOT NULL,
    latency_ms        INTEGER,
    http_status       INTEGER,
    outcome           TEXT,               -- ok | cached | rate_limited | transient | timeout | ...
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    estimated_picos   INTEGER NOT NULL DEFAULT 0,
    cost_picos        INTEGER NOT NULL DEFAULT 0,
    cost_source       TEXT,               -- price_table | provider | estimate | cache | none
    items_ok          INTEGER NOT NULL DEFAULT 0,
    items_missing     INTEGER NOT NULL DEFAULT 0,
    items_invalid     INTEGER NOT NULL DEFAULT 0,
    items_rejected    INTEGER NOT NULL DEFAULT 0,
    foreign_keys      INTEGER NOT NULL DEFAULT 0,
    error             TEXT,
    content           TEXT                -- the answer, kept when it was malformed or had foreign keys
);
CREATE INDEX IF NOT EXISTS backfill_calls_run ON backfill_calls (run_id, state);

CREATE TABLE IF NOT EXISTS backfill_outputs (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id     INTEGER NOT NULL,
    call_id    INTEGER NOT NULL,
    item_id    TEXT    NOT NULL,
    status     TEXT    NOT NULL,   -- written | skipped | rejected | invalid
    raw        TEXT,               -- what the model returned for the item
    final      TEXT,               -- what was written (JSON: output key -> text)
    detail     TEXT,               -- JSON: post-processing changes or reasons
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS backfill_outputs_item ON backfill_outputs (run_id, item_id);

CREATE TABLE IF NOT EXISTS backfill_cache (
    request_hash TEXT    PRIMARY KEY,
    model        TEXT    NOT NULL,
    body         TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);
