-- Provider batches (OpenAI Batch API, Anthropic Message Batches) of a run. Their requests are
-- rows of backfill_calls whose worker is 'batch:<id>'; their items are leased to that owner
-- with no expiry until the results are collected.

CREATE TABLE IF NOT EXISTS backfill_batches (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id            INTEGER NOT NULL REFERENCES backfill_runs (id),
    dialect           TEXT    NOT NULL,   -- openai | anthropic
    phase             TEXT    NOT NULL,   -- preparing | uploaded | creating | submitted | ended | collected | discarded
    provider_status   TEXT,
    input_file_id     TEXT,
    provider_batch_id TEXT,
    output_file_id    TEXT,
    error_file_id     TEXT,
    results_url       TEXT,
    requests          INTEGER NOT NULL DEFAULT 0,
    bytes             INTEGER NOT NULL DEFAULT 0,
    completed         INTEGER NOT NULL DEFAULT 0,
    failed            INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    submitted_at      INTEGER,
    ended_at          INTEGER,
    next_poll_at      INTEGER NOT NULL DEFAULT 0,
    poll_interval_ms  INTEGER NOT NULL DEFAULT 0,
    error             TEXT
);
CREATE INDEX IF NOT EXISTS backfill_batches_run ON backfill_batches (run_id, phase);

-- The request lines of a batch until the provider has created it.
CREATE TABLE IF NOT EXISTS backfill_batch_inputs (
    batch_id INTEGER PRIMARY KEY REFERENCES backfill_batches (id),
    body     BLOB    NOT NULL
);

CREATE INDEX IF NOT EXISTS backfill_calls_worker ON backfill_calls (run_id, worker, state);
CREATE INDEX IF NOT EXISTS backfill_items_owner ON backfill_items (run_id, lease_owner);
