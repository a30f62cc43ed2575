-- Provider batches (OpenAI Batch API, Anthropic Message Batches) of a run. Their requests are
-- rows of backfill_calls whose worker is 'batch:<id>'; their items are leased to that owner
-- with no expiry until the results are collected.

CREATE TABLE IF NOT EXISTS backfill_batches (
    id                BIGSERIAL PRIMARY KEY,
    run_id            BIGINT  NOT NULL REFERENCES backfill_runs (id),
    dialect           TEXT    NOT NULL,   -- openai | anthropic
    phase             TEXT    NOT NULL,   -- preparing | uploaded | creating | submitted | ended | collected | discarded
    provider_status   TEXT,
    input_file_id     TEXT,
    provider_batch_id TEXT,
    output_file_id    TEXT,
    error_file_id     TEXT,
    results_url       TEXT,
    requests          BIGINT  NOT NULL DEFAULT 0,
    bytes             BIGINT  NOT NULL DEFAULT 0,
    completed         BIGINT  NOT NULL DEFAULT 0,
    failed            BIGINT  NOT NULL DEFAULT 0,
    created_at        BIGINT  NOT NULL,
    updated_at        BIGINT  NOT NULL,
    submitted_at      BIGINT,
    ended_at          BIGINT,
    next_poll_at      BIGINT  NOT NULL DEFAULT 0,
    poll_interval_ms  BIGINT  NOT NULL DEFAULT 0,
    error             TEXT
);
CREATE INDEX IF NOT EXISTS backfill_batches_run ON backfill_batches (run_id, phase);

-- The request lines of a batch until the provider has created it.
CREATE TABLE IF NOT EXISTS backfill_batch_inputs (
    batch_id BIGINT PRIMARY KEY REFERENCES backfill_batches (id),
    body     BYTEA  NOT NULL
);

CREATE INDEX IF NOT EXISTS backfill_calls_worker ON backfill_calls (run_id, worker, state);
