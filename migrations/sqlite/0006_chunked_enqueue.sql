-- A run's pending ids are enqueued in chunks, each chunk its own short transaction, so a table
-- of millions of rows never holds the write lock (or one statement) for long. While that goes
-- on, `enqueued` is 0, `enqueue_cursor` holds the last source id enqueued (declared without a
-- type, so it keeps the id's own: an integer stays an integer) and `enqueue_owner` the process
-- doing it, alive while `enqueue_expires_at` is ahead; a process that finds the owner gone
-- takes the enqueue over from the cursor. Runs from before were enqueued in one transaction.
ALTER TABLE backfill_runs ADD COLUMN enqueued INTEGER NOT NULL DEFAULT 1;
ALTER TABLE backfill_runs ADD COLUMN enqueue_cursor;
ALTER TABLE backfill_runs ADD COLUMN enqueue_owner TEXT;
ALTER TABLE backfill_runs ADD COLUMN enqueue_expires_at INTEGER;
