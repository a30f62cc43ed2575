-- What a run was started with, kept by `run --resume` unless a flag changes it: its mode
-- (sync | batch; NULL for local-model runs and runs from before this migration) and its
-- `--limit` (NULL: no limit). The budget cap is `max_usd`.
ALTER TABLE backfill_runs ADD COLUMN IF NOT EXISTS mode TEXT;
ALTER TABLE backfill_runs ADD COLUMN IF NOT EXISTS item_limit BIGINT;
