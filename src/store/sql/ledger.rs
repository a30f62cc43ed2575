//! The calls ledger, budget reservations against the run's row (the cap check and the
//! increment are one `UPDATE`, so concurrent reservations never pass the cap together), the
//! per-batch write transaction and the response cache.

use std::time::Duration;

use async_trait::async_trait;

use super::{Backend, Tx, dialect};
use crate::pricing::{Picos, Tier};
use crate::store::{
    BatchWrite, Cache, ItemChange, ItemUpdate, Ledger, LostCall, NewCall, Spend, Tables, WriteReport, db_count, now_ms,
};

#[async_trait]
impl Ledger for Backend {
    async fn reserve_call(&self, call: &NewCall, cap: Option<Picos>) -> anyhow::Result<Option<i64>> {
        let mut tx = self.begin_write().await?;
        // Concurrent reservations queue on the run's row (PostgreSQL re-checks the condition on
        // the row as the previous reservation left it; SQLite has one writer), so together they
        // never pass the cap.
        let reserved = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE backfill_runs SET reserved_picos = reserved_picos + $1, updated_at = $2 \
             WHERE id = $3 AND ($4 IS NULL OR {} + reserved_picos + lost_picos + $1 <= $4)",
            dialect::wide("spent_picos")
        )))
        .bind(call.estimated.0)
        .bind(now_ms())
        .bind(call.run_id)
        .bind(cap.map(|c| c.0))
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        if reserved.rows_affected() == 0 {
            tx.rollback().await.map_err(|e| self.err(e))?;
            return Ok(None);
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO backfill_calls (run_id, worker, model, price_tier, state, request_hash, item_ids, \
             items, concurrency, started_at, estimated_picos) \
             VALUES ($1, $2, $3, $4, 'reserved', $5, $6, $7, $8, $9, $10) RETURNING id",
        )
        .bind(call.run_id)
        .bind(&call.worker)
        .bind(&call.model)
        .bind(match call.price_tier {
            Tier::Sync => "sync",
            Tier::Batch => "batch",
        })
        .bind(&call.request_hash)
        .bind(serde_json::to_string(&call.item_ids).expect("ids serialise"))
        .bind(call.item_ids.len() as i64)
        .bind(call.concurrency as i64)
        .bind(call.started_at)
        .bind(call.estimated.0)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(Some(id))
    }

    async fn write_batch(&self, tables: &Tables, batch: &BatchWrite) -> anyhow::Result<WriteReport> {
        let kind = self.id_kind(batch.run_id).await?;
        let mut tx = self.begin_write().await?;
        settle(self, &mut tx, batch).await?;
        let now = now_ms();
        let mut report = WriteReport::default();
        for update in &batch.items {
            if !fence(self, &mut tx, batch.run_id, update, now).await? {
                report.stale += 1;
                continue;
            }
            let mut status = update.output.as_ref().map(|o| o.status.clone());
            if let ItemChange::Done { values } = &update.change {
                if self.write_target(&mut tx, tables, &kind, &update.lease.item_id, values).await? {
                    report.written += 1;
                } else {
                    report.skipped += 1;
                    status = Some("skipped".into());
                    sqlx::query("UPDATE backfill_items SET reason = 'target_not_empty' WHERE run_id = $1 AND item_id = $2")
                        .bind(batch.run_id)
                        .bind(&update.lease.item_id)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.err(e))?;
                }
            }
            if let (Some(output), Some(status)) = (&update.output, status) {
                sqlx::query(
                    "INSERT INTO backfill_outputs (run_id, call_id, item_id, status, raw, final, detail, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(batch.run_id)
                .bind(batch.call_id)
                .bind(&update.lease.item_id)
                .bind(status)
                .bind(&output.raw)
                .bind(&output.final_json)
                .bind(&output.detail)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
            }
        }
        crate::store::failpoint::pause("write_batch").await;
        crate::store::failpoint::crash("write_batch");
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(report)
    }

    async fn spend(&self, run_id: i64) -> anyhow::Result<Spend> {
        // Through `CAST`: an older SQLite file may hold a sum that overflowed into a REAL.
        let row: Option<(i64, i64, i64)> = sqlx::query_as(
            "SELECT CAST(spent_picos AS BIGINT), CAST(reserved_picos AS BIGINT), CAST(lost_picos AS BIGINT) \
             FROM backfill_runs WHERE id = $1",
        )
        .bind(run_id)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        let (spent, reserved, lost) = row.unwrap_or_default();
        Ok(Spend { spent: Picos(spent), reserved: Picos(reserved), lost: Picos(lost) })
    }

    async fn lost_calls(&self, run_id: i64) -> anyhow::Result<Vec<LostCall>> {
        let rows: Vec<(i64, String, String, String, i64)> = sqlx::query_as(
            "SELECT c.id, c.model, c.item_ids, c.request_hash, c.estimated_picos FROM backfill_calls c \
             JOIN backfill_cache k ON k.request_hash = c.request_hash AND k.expires_at > $1 \
             WHERE c.run_id = $2 AND c.state = 'lost' ORDER BY c.id",
        )
        .bind(now_ms())
        .bind(run_id)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        rows.into_iter()
            .map(|(call_id, model, ids, request_hash, estimated)| {
                Ok(LostCall { call_id, model, item_ids: serde_json::from_str(&ids)?, request_hash, estimated: Picos(estimated) })
            })
            .collect()
    }
}

/// Settles the call and moves its money from reserved (or lost) to spent. The call's row is
/// locked first, so a worker recovering it as lost at the same moment waits and sees it settled.
async fn settle(store: &Backend, tx: &mut Tx, batch: &BatchWrite) -> anyhow::Result<()> {
    let previous: Option<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT state, estimated_picos FROM backfill_calls WHERE id = $1 AND run_id = $2{}",
        dialect::LOCK_ROW
    )))
    .bind(batch.call_id)
    .bind(batch.run_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    let Some((state, estimated)) = previous else {
        anyhow::bail!("call {} of run {} is not in the ledger", batch.call_id, batch.run_id);
    };
    if state == "settled" {
        return Ok(());
    }
    let s = &batch.settle;
    sqlx::query(
        "UPDATE backfill_calls SET state = $1, latency_ms = $2, http_status = $3, outcome = $4, \
         prompt_tokens = $5, completion_tokens = $6, cached_tokens = $7, cost_picos = $8, cost_source = $9, \
         items_ok = $10, items_missing = $11, items_invalid = $12, items_rejected = $13, foreign_keys = $14, \
         error = $15, content = $16, usage_flag = $17, repair = $18 WHERE id = $19",
    )
    .bind(if s.lost { "lost" } else { "settled" })
    .bind(s.latency_ms)
    .bind(s.http_status.map(i64::from))
    .bind(&s.outcome)
    .bind(db_count(s.usage.prompt_tokens))
    .bind(db_count(s.usage.completion_tokens))
    .bind(db_count(s.usage.cached_tokens))
    .bind(s.cost.0)
    .bind(&s.cost_source)
    .bind(s.items_ok as i64)
    .bind(s.items_missing as i64)
    .bind(s.items_invalid as i64)
    .bind(s.items_rejected as i64)
    .bind(s.foreign_keys as i64)
    .bind(&s.error)
    .bind(&s.content)
    .bind(&s.usage_flag)
    .bind(&s.repair)
    .bind(batch.call_id)
    .execute(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    // Money moves from where it was (reserved, or lost in a crash) to spent — or, for a call
    // that may have been billed without an answer, to lost. Spend saturates at i64::MAX.
    let (from_reserved, from_lost) = if state == "lost" { (0, estimated) } else { (estimated, 0) };
    let (to_spent, to_lost) = if s.lost { (0, estimated) } else { (s.cost.0, 0) };
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE backfill_runs SET reserved_picos = reserved_picos - $1, lost_picos = lost_picos - $2 + $3, \
         spent_picos = {}, updated_at = $5 WHERE id = $6",
        dialect::saturating_add("spent_picos", "$4")
    )))
    .bind(from_reserved)
    .bind(from_lost)
    .bind(to_lost)
    .bind(to_spent)
    .bind(now_ms())
    .bind(batch.run_id)
    .execute(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    Ok(())
}

/// Applies an item's new state if it is still leased under the same token (the claim, and so
/// the attempt, it was sent under).
async fn fence(store: &Backend, tx: &mut Tx, run_id: i64, update: &ItemUpdate, now: i64) -> anyhow::Result<bool> {
    let (state, attempts, tier, group_limit, not_before, error, reason) = match &update.change {
        ItemChange::Done { .. } => ("done", None, None, None, 0, None, None),
        ItemChange::Retry { attempts, tier, group_limit, not_before, error, reason } => {
            ("pending", Some(*attempts), Some(*tier), *group_limit, *not_before, Some(error), Some(reason))
        }
        ItemChange::Failed { attempts, error, reason } => ("failed", Some(*attempts), None, None, 0, Some(error), Some(reason)),
        ItemChange::Rejected { attempts, error, reason } => {
            ("rejected", Some(*attempts), None, None, 0, Some(error), Some(reason))
        }
    };
    let done = sqlx::query(
        "UPDATE backfill_items SET state = $1, attempts = COALESCE($2, attempts), tier = COALESCE($3, tier), \
         group_limit = COALESCE($4, group_limit), not_before = $5, last_error = $6, reason = $7, \
         lease_owner = NULL, lease_token = NULL, lease_expires_at = NULL, updated_at = $8, \
         done_by = CASE WHEN $1 = 'done' THEN lease_owner ELSE done_by END \
         WHERE run_id = $9 AND item_id = $10 AND state = 'leased' AND lease_token = $11",
    )
    .bind(state)
    .bind(attempts.map(i64::from))
    .bind(tier.map(i64::from))
    .bind(group_limit.map(i64::from))
    .bind(not_before)
    .bind(error)
    .bind(reason)
    .bind(now)
    .bind(run_id)
    .bind(&update.lease.item_id)
    .bind(update.lease.token)
    .execute(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    Ok(done.rows_affected() > 0)
}

#[async_trait]
impl Cache for Backend {
    async fn cache_get(&self, hash: &str) -> anyhow::Result<Option<String>> {
        sqlx::query_scalar("SELECT body FROM backfill_cache WHERE request_hash = $1 AND expires_at > $2")
            .bind(hash)
            .bind(now_ms())
            .fetch_optional(self.pool())
            .await
            .map_err(|e| self.err(e))
    }

    async fn cache_put(&self, hash: &str, model: &str, body: &str, ttl: Duration) -> anyhow::Result<()> {
        let now = now_ms();
        sqlx::query(
            "INSERT INTO backfill_cache (request_hash, model, body, created_at, expires_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (request_hash) DO UPDATE SET body = excluded.body, created_at = excluded.created_at, \
             expires_at = excluded.expires_at",
        )
        .bind(hash)
        .bind(model)
        .bind(body)
        .bind(now)
        .bind(now + ttl.as_millis() as i64)
        .execute(self.writer())
        .await
        .map_err(|e| self.err(e))?;
        // Expired entries go as new ones come in (on a shared database, now and then).
        if fastrand::u32(..dialect::CACHE_SWEEP_EVERY) == 0 {
            sqlx::query("DELETE FROM backfill_cache WHERE expires_at <= $1")
                .bind(now)
                .execute(self.writer())
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    async fn cache_drop(&self, hash: &str) -> anyhow::Result<()> {
        sqlx::query("DELETE FROM backfill_cache WHERE request_hash = $1")
            .bind(hash)
            .execute(self.writer())
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}
