-- Runner tables of backfill (PostgreSQL), created in the connection's current schema (the first
-- schema of search_path). Times are Unix milliseconds from the database's clock, so workers on
-- several machines agree on lease expiry; money is integer pico-dollars (1e-12 USD).

CREATE TABLE IF NOT EXISTS backfill_runs (
    id               BIGSERIAL PRIMARY KEY,
    job              TEXT    NOT NULL,
    status           TEXT    NOT NULL,   -- running | interrupted | budget | failed | finished | abandoned
    target           TEXT    NOT NULL,   -- table and column(s), for people
    id_kind          TEXT    NOT NULL,   -- the id column's SQL type (bigint, text, uuid, ...)
    total_items      BIGINT  NOT NULL,
    max_usd          DOUBLE PRECISION,
    spent_picos      BIGINT  NOT NULL DEFAULT 0,  -- settled calls
    reserved_picos   BIGINT  NOT NULL DEFAULT 0,  -- calls in flight (estimates)
    lost_picos       BIGINT  NOT NULL DEFAULT 0,  -- calls in flight at a crash: possibly billed
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    finished_at      BIGINT,
    controller_state TEXT,
    last_error       TEXT
);
CREATE INDEX IF NOT EXISTS backfill_runs_job ON backfill_runs (job, id);

CREATE TABLE IF NOT EXISTS backfill_workers (
    run_id       BIGINT  NOT NULL REFERENCES backfill_runs (id),
    worker       TEXT    NOT NULL,   -- host/pid/process-start
    host         TEXT    NOT NULL,
    pid          BIGINT  NOT NULL,
    attached_at  BIGINT  NOT NULL,
    heartbeat_at BIGINT  NOT NULL,
    expires_at   BIGINT  NOT NULL,
    detached_at  BIGINT,
    PRIMARY KEY (run_id, worker)
);

CREATE TABLE IF NOT EXISTS backfill_items (
    run_id           BIGINT  NOT NULL REFERENCES backfill_runs (id),
    item_id          TEXT    NOT NULL,
    seq              BIGINT  NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'pending',  -- pending | leased | done | failed | rejected
    attempts         BIGINT  NOT NULL DEFAULT 0,
    tier             BIGINT  NOT NULL DEFAULT 0,          -- 0 = model.name, k = model.fallback[k-1]
    group_limit      BIGINT,                              -- largest batch the item may go in
    not_before       BIGINT  NOT NULL DEFAULT 0,          -- retry backoff
    lease_owner      TEXT,
    lease_token      BIGINT,
    lease_expires_at BIGINT,
    last_error       TEXT,
    reason           TEXT,                                -- short code of the last failure
    done_by          TEXT,
    updated_at       BIGINT  NOT NULL,
    PRIMARY KEY (run_id, item_id)
);
CREATE INDEX IF NOT EXISTS backfill_items_queue ON backfill_items (run_id, state, tier, seq);
CREATE INDEX IF NOT EXISTS backfill_items_owner ON backfill_items (run_id, lease_owner) WHERE state = 'leased';

CREATE TABLE IF NOT EXISTS backfill_calls (
    id                BIGSERIAL PRIMARY KEY,
    run_id            BIGINT  NOT NULL REFERENCES backfill_runs (id),
    worker            TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    price_tier        TEXT    NOT NULL,   -- sync | batch
    state             TEXT    NOT NULL,   -- reserved | settled | lost
    request_hash      TEXT,
    item_ids          TEXT    NOT NULL,   -- JSON array, in prompt order
    items             BIGINT  NOT NULL,
    concurrency       BIGINT,             -- the controller's limit when sent
    started_at        BIGINT  NOT NULL,
    latency_ms        BIGINT,
    http_status       BIGINT,
    outcome           TEXT,               -- ok | cached | rate_limited | transient | timeout | ...
    prompt_tokens     BIGINT  NOT NULL DEFAULT 0,
    completion_tokens BIGINT  NOT NULL DEFAULT 0,
    cached_tokens     BIGINT  NOT NULL DEFAULT 0,
    estimated_picos   BIGINT  NOT NULL DEFAULT 0,
    cost_picos        BIGINT  NOT NULL DEFAULT 0,
    cost_source       TEXT,               -- price_table | provider | estimate | cache | none
    items_ok          BIGINT  NOT NULL DEFAULT 0,
    items_missing     BIGINT  NOT NULL DEFAULT 0,
    items_invalid     BIGINT  NOT NULL DEFAULT 0,
    items_rejected    BIGINT  NOT NULL DEFAULT 0,
    foreign_keys      BIGINT  NOT NULL DEFAULT 0,
    error             TEXT,
    content           TEXT                -- the answer, kept when it was malformed or had foreign keys
);
CREATE INDEX IF NOT EXISTS backfill_calls_run ON backfill_calls (run_id, state);

CREATE TABLE IF NOT EXISTS backfill_outputs (
    id         BIGSERIAL PRIMARY KEY,
    run_id     BIGINT  NOT NULL,
    call_id    BIGINT  NOT NULL,
    item_id    TEXT    NOT NULL,
    status     TEXT    NOT NULL,   -- written | skipped | rejected | invalid
    raw        TEXT,               -- what the model returned for the item
    final      TEXT,               -- what was written (JSON: output key -> text)
    detail     TEXT,               -- JSON: post-processing changes or reasons
    created_at BIGINT  NOT NULL
);
CREATE INDEX IF NOT EXISTS backfill_outputs_item ON backfill_outputs (run_id, item_id);

CREATE TABLE IF NOT EXISTS backfill_cache (
    request_hash TEXT    PRIMARY KEY,
    model        TEXT    NOT NULL,
    body         TEXT    NOT NULL,
    created_at   BIGINT  NOT NULL,
    expires_at   BIGINT  NOT NULL
);

-- One provider account's shared rate (base URL, API key variable and model): a token bucket
-- per dimension that every worker of every run debits before it sends, so all of them
-- together stay under the account's limit.
CREATE TABLE IF NOT EXISTS backfill_rate_buckets (
    account            TEXT             PRIMARY KEY,
    request_level      DOUBLE PRECISION NOT NULL DEFAULT 0,  -- requests in the bucket (negative: debt)
    token_level        DOUBLE PRECISION NOT NULL DEFAULT 0,
    requests_per_min   DOUBLE PRECISION,                     -- the pace last applied (NULL: unlimited)
    tokens_per_min     DOUBLE PRECISION,
    announced_rpm      DOUBLE PRECISION,                     -- limits the provider's headers announced
    announced_tpm      DOUBLE PRECISION,
    safety             DOUBLE PRECISION NOT NULL DEFAULT 0.98, -- share of announced limits paced at
    paused_until       BIGINT           NOT NULL DEFAULT 0,  -- after a 429's Retry-After
    rate_limited       BIGINT           NOT NULL DEFAULT 0,  -- 429s reported by workers
    granted            BIGINT           NOT NULL DEFAULT 0,  -- requests let through
    updated_at         BIGINT           NOT NULL
);
