-- A run's items by state, kept by statement triggers in the transaction that inserts, changes
-- or deletes items: progress, the dispatcher, `status` and the end of a run sum a few rows
-- instead of counting the queue, whatever its size. Each database connection adds its changes
-- to a row of its own (shard = its backend pid), so workers never wait for each other on a
-- counter; a run's counts are the sum of its rows.
CREATE TABLE IF NOT EXISTS backfill_item_counts (
    run_id   BIGINT  NOT NULL,
    shard    INTEGER NOT NULL,
    pending  BIGINT  NOT NULL DEFAULT 0,
    leased   BIGINT  NOT NULL DEFAULT 0,
    done     BIGINT  NOT NULL DEFAULT 0,
    failed   BIGINT  NOT NULL DEFAULT 0,
    rejected BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, shard)
);
INSERT INTO backfill_item_counts (run_id, shard, pending, leased, done, failed, rejected)
SELECT run_id, 0, COUNT(*) FILTER (WHERE state = 'pending'), COUNT(*) FILTER (WHERE state = 'leased'),
       COUNT(*) FILTER (WHERE state = 'done'), COUNT(*) FILTER (WHERE state = 'failed'),
       COUNT(*) FILTER (WHERE state = 'rejected')
FROM backfill_items GROUP BY run_id
ON CONFLICT (run_id, shard) DO NOTHING;

-- The net change of a statement: +1 per new row in a state, -1 per old row in a state.
CREATE OR REPLACE FUNCTION backfill_items_counted() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO backfill_item_counts AS c (run_id, shard, pending, leased, done, failed, rejected)
        SELECT run_id, pg_backend_pid(), COUNT(*) FILTER (WHERE state = 'pending'), COUNT(*) FILTER (WHERE state = 'leased'),
               COUNT(*) FILTER (WHERE state = 'done'), COUNT(*) FILTER (WHERE state = 'failed'),
               COUNT(*) FILTER (WHERE state = 'rejected')
        FROM new_rows GROUP BY run_id
        ON CONFLICT (run_id, shard) DO UPDATE SET pending = c.pending + excluded.pending, leased = c.leased + excluded.leased,
            done = c.done + excluded.done, failed = c.failed + excluded.failed, rejected = c.rejected + excluded.rejected;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO backfill_item_counts AS c (run_id, shard, pending, leased, done, failed, rejected)
        SELECT run_id, pg_backend_pid(), -COUNT(*) FILTER (WHERE state = 'pending'), -COUNT(*) FILTER (WHERE state = 'leased'),
               -COUNT(*) FILTER (WHERE state = 'done'), -COUNT(*) FILTER (WHERE state = 'failed'),
               -COUNT(*) FILTER (WHERE state = 'rejected')
        FROM old_rows GROUP BY run_id
        ON CONFLICT (run_id, shard) DO UPDATE SET pending = c.pending + excluded.pending, leased = c.leased + excluded.leased,
            done = c.done + excluded.done, failed = c.failed + excluded.failed, rejected = c.rejected + excluded.rejected;
    ELSE
        INSERT INTO backfill_item_counts AS c (run_id, shard, pending, leased, done, failed, rejected)
        SELECT run_id, pg_backend_pid(), SUM(p), SUM(l), SUM(d), SUM(f), SUM(r)
        FROM (SELECT run_id, (state = 'pending')::int AS p, (state = 'leased')::int AS l, (state = 'done')::int AS d,
                     (state = 'failed')::int AS f, (state = 'rejected')::int AS r FROM new_rows
              UNION ALL
              SELECT run_id, -(state = 'pending')::int, -(state = 'leased')::int, -(state = 'done')::int,
                     -(state = 'failed')::int, -(state = 'rejected')::int FROM old_rows) d
        GROUP BY run_id
        HAVING SUM(p) <> 0 OR SUM(l) <> 0 OR SUM(d) <> 0 OR SUM(f) <> 0 OR SUM(r) <> 0
        ON CONFLICT (run_id, shard) DO UPDATE SET pending = c.pending + excluded.pending, leased = c.leased + excluded.leased,
            done = c.done + excluded.done, failed = c.failed + excluded.failed, rejected = c.rejected + excluded.rejected;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER backfill_items_counted_insert AFTER INSERT ON backfill_items
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION backfill_items_counted();
CREATE TRIGGER backfill_items_counted_update AFTER UPDATE ON backfill_items
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION backfill_items_counted();
CREATE TRIGGER backfill_items_counted_delete AFTER DELETE ON backfill_items
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION backfill_items_counted();

-- Claims take the highest tier first, then queue order: an index in exactly that order lets a
-- claim read the few items it takes instead of sorting the whole queue.
DROP INDEX IF EXISTS backfill_items_queue;
CREATE INDEX IF NOT EXISTS backfill_items_queue ON backfill_items (run_id, state, tier DESC, seq);

-- The items each worker finished (`status`), without reading the queue.
CREATE INDEX IF NOT EXISTS backfill_items_done_by ON backfill_items (run_id, done_by) WHERE done_by IS NOT NULL;

-- Expired cache entries are deleted as new ones come in: by index, not by reading the cache.
CREATE INDEX IF NOT EXISTS backfill_cache_expiry ON backfill_cache (expires_at);
