-- A run's items by state, kept by triggers in the transaction that inserts, changes or deletes
-- an item: progress, the dispatcher, `status` and the end of a run read one row instead of
-- counting the queue, whatever its size.
CREATE TABLE IF NOT EXISTS backfill_item_counts (
    run_id   INTEGER PRIMARY KEY,
    pending  INTEGER NOT NULL DEFAULT 0,
    leased   INTEGER NOT NULL DEFAULT 0,
    done     INTEGER NOT NULL DEFAULT 0,
    failed   INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0
);
INSERT OR REPLACE INTO backfill_item_counts (run_id, pending, leased, done, failed, rejected)
SELECT run_id, SUM(state = 'pending'), SUM(state = 'leased'), SUM(state = 'done'), SUM(state = 'failed'),
       SUM(state = 'rejected')
FROM backfill_items GROUP BY run_id;

CREATE TRIGGER IF NOT EXISTS backfill_items_counted_insert AFTER INSERT ON backfill_items
BEGIN
    INSERT INTO backfill_item_counts (run_id, pending, leased, done, failed, rejected)
    VALUES (new.run_id, new.state = 'pending', new.state = 'leased', new.state = 'done', new.state = 'failed',
            new.state = 'rejected')
    ON CONFLICT (run_id) DO UPDATE SET pending = pending + excluded.pending, leased = leased + excluded.leased,
        done = done + excluded.done, failed = failed + excluded.failed, rejected = rejected + excluded.rejected;
END;

CREATE TRIGGER IF NOT EXISTS backfill_items_counted_update AFTER UPDATE OF state ON backfill_items
WHEN old.state IS NOT new.state
BEGIN
    UPDATE backfill_item_counts SET
        pending  = pending  + (new.state = 'pending')  - (old.state = 'pending'),
        leased   = leased   + (new.state = 'leased')   - (old.state = 'leased'),
        done     = done     + (new.state = 'done')     - (old.state = 'done'),
        failed   = failed   + (new.state = 'failed')   - (old.state = 'failed'),
        rejected = rejected + (new.state = 'rejected') - (old.state = 'rejected')
    WHERE run_id = new.run_id;
END;

CREATE TRIGGER IF NOT EXISTS backfill_items_counted_delete AFTER DELETE ON backfill_items
BEGIN
    UPDATE backfill_item_counts SET
        pending  = pending  - (old.state = 'pending'),
        leased   = leased   - (old.state = 'leased'),
        done     = done     - (old.state = 'done'),
        failed   = failed   - (old.state = 'failed'),
        rejected = rejected - (old.state = 'rejected')
    WHERE run_id = old.run_id;
END;

-- Claims take the highest tier first, then queue order: an index in exactly that order lets a
-- claim read the few items it takes instead of sorting the whole queue.
DROP INDEX IF EXISTS backfill_items_queue;
CREATE INDEX IF NOT EXISTS backfill_items_queue ON backfill_items (run_id, state, tier DESC, seq);

-- The items each worker finished (`status`), without reading the queue.
CREATE INDEX IF NOT EXISTS backfill_items_done_by ON backfill_items (run_id, done_by) WHERE done_by IS NOT NULL;

-- Expired cache entries are deleted as new ones come in: by index, not by reading the cache.
CREATE INDEX IF NOT EXISTS backfill_cache_expiry ON backfill_cache (expires_at);
