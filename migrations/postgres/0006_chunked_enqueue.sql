-- A run's pending ids are enqueued in chunks, each chunk its own short transaction, so a table
-- of millions of rows never holds one statement, or the creation lock other workers wait on,
-- for long. While that goes on, `enqueued` is false, `enqueue_cursor` holds the last source id
-- enqueued (as text; cast back to the id column's type) and `enqueue_owner` the process doing
-- it, alive while `enqueue_expires_at` is ahead; a process that finds the owner gone takes the
-- enqueue over from the cursor. Runs from before were enqueued in one transaction.
ALTER TABLE backfill_runs ADD COLUMN IF NOT EXISTS enqueued BOOLEAN NOT NULL DEFAULT true;
ALTER TABLE backfill_runs ADD COLUMN IF NOT EXISTS enqueue_cursor TEXT;
ALTER TABLE backfill_runs ADD COLUMN IF NOT EXISTS enqueue_owner TEXT;
ALTER TABLE backfill_runs ADD COLUMN IF NOT EXISTS enqueue_expires_at BIGINT;
