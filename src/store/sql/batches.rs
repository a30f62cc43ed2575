//! Provider batches: their records, the request lines kept until the provider has the batch,
//! the items they hold, and the ledger rows of their requests.

use async_trait::async_trait;
use sqlx::Row;

use super::{Backend, DbRow};
use crate::pricing::Picos;
use crate::store::{BatchNote, BatchPhase, BatchRecord, Batches, HeldItem, Lease, OwnedCall, now_ms};

const BATCH_COLUMNS: &str = "id, run_id, dialect, phase, provider_status, input_file_id, provider_batch_id, \
                             output_file_id, error_file_id, results_url, requests, bytes, completed, failed, \
                             created_at, updated_at, submitted_at, ended_at, next_poll_at, poll_interval_ms, error";

fn batch_from_row(row: &DbRow) -> Result<BatchRecord, sqlx::Error> {
    let count = |name: &str| -> Result<u64, sqlx::Error> { Ok(row.try_get::<i64, _>(name)?.max(0) as u64) };
    Ok(BatchRecord {
        id: row.try_get("id")?,
        run_id: row.try_get("run_id")?,
        dialect: row.try_get("dialect")?,
        phase: BatchPhase::parse(&row.try_get::<String, _>("phase")?),
        provider_status: row.try_get("provider_status")?,
        input_file_id: row.try_get("input_file_id")?,
        provider_batch_id: row.try_get("provider_batch_id")?,
        output_file_id: row.try_get("output_file_id")?,
        error_file_id: row.try_get("error_file_id")?,
        results_url: row.try_get("results_url")?,
        requests: count("requests")?,
        bytes: count("bytes")?,
        completed: count("completed")?,
        failed: count("failed")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        submitted_at: row.try_get("submitted_at")?,
        ended_at: row.try_get("ended_at")?,
        next_poll_at: row.try_get("next_poll_at")?,
        poll_interval_ms: row.try_get("poll_interval_ms")?,
        error: row.try_get("error")?,
    })
}

#[async_trait]
impl Batches for Backend {
    async fn create_batch(&self, run_id: i64, dialect: &str) -> anyhow::Result<BatchRecord> {
        let now = now_ms();
        let sql = format!(
            "INSERT INTO backfill_batches (run_id, dialect, phase, created_at, updated_at) \
             VALUES ($1, $2, 'preparing', $3, $4) RETURNING {BATCH_COLUMNS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(run_id)
            .bind(dialect)
            .bind(now)
            .bind(now)
            .fetch_one(self.pool())
            .await
            .map_err(|e| self.err(e))?;
        batch_from_row(&row).map_err(|e| self.err(e))
    }

    async fn update_batch(&self, b: &BatchRecord) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE backfill_batches SET phase = $1, provider_status = $2, input_file_id = $3, provider_batch_id = $4, \
             output_file_id = $5, error_file_id = $6, results_url = $7, requests = $8, bytes = $9, completed = $10, \
             failed = $11, updated_at = $12, submitted_at = $13, ended_at = $14, next_poll_at = $15, poll_interval_ms = $16, \
             error = $17 WHERE id = $18",
        )
        .bind(b.phase.as_str())
        .bind(&b.provider_status)
        .bind(&b.input_file_id)
        .bind(&b.provider_batch_id)
        .bind(&b.output_file_id)
        .bind(&b.error_file_id)
        .bind(&b.results_url)
        .bind(b.requests as i64)
        .bind(b.bytes as i64)
        .bind(b.completed as i64)
        .bind(b.failed as i64)
        .bind(now_ms())
        .bind(b.submitted_at)
        .bind(b.ended_at)
        .bind(b.next_poll_at)
        .bind(b.poll_interval_ms)
        .bind(&b.error)
        .bind(b.id)
        .execute(self.writer())
        .await
        .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn batches(&self, run_id: i64) -> anyhow::Result<Vec<BatchRecord>> {
        let sql = format!("SELECT {BATCH_COLUMNS} FROM backfill_batches WHERE run_id = $1 ORDER BY id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(run_id).fetch_all(self.pool()).await.map_err(|e| self.err(e))?;
        rows.iter().map(batch_from_row).collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    async fn set_batch_input(&self, batch_id: i64, jsonl: Option<&[u8]>) -> anyhow::Result<()> {
        let query = match jsonl {
            Some(body) => sqlx::query(
                "INSERT INTO backfill_batch_inputs (batch_id, body) VALUES ($1, $2) \
                 ON CONFLICT (batch_id) DO UPDATE SET body = excluded.body",
            )
            .bind(batch_id)
            .bind(body.to_vec()),
            None => sqlx::query("DELETE FROM backfill_batch_inputs WHERE batch_id = $1").bind(batch_id),
        };
        query.execute(self.writer()).await.map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn batch_input(&self, batch_id: i64) -> anyhow::Result<Option<Vec<u8>>> {
        sqlx::query_scalar("SELECT body FROM backfill_batch_inputs WHERE batch_id = $1")
            .bind(batch_id)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| self.err(e))
    }

    async fn hold(&self, run_id: i64, leases: &[Lease], owner: &str) -> anyhow::Result<u64> {
        let mut tx = self.begin_write().await?;
        let now = now_ms();
        let mut held = 0;
        for lease in leases {
            held += sqlx::query(
                "UPDATE backfill_items SET lease_owner = $1, lease_expires_at = NULL, updated_at = $2 \
                 WHERE run_id = $3 AND item_id = $4 AND state = 'leased' AND lease_token = $5",
            )
            .bind(owner)
            .bind(now)
            .bind(run_id)
            .bind(&lease.item_id)
            .bind(lease.token)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?
            .rows_affected();
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(held)
    }

    async fn held(&self, run_id: i64, owner: &str) -> anyhow::Result<Vec<HeldItem>> {
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT item_id, lease_token, attempts, tier FROM backfill_items \
             WHERE run_id = $1 AND lease_owner = $2 AND state = 'leased' ORDER BY seq",
        )
        .bind(run_id)
        .bind(owner)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|(item_id, token, attempts, tier)| HeldItem {
                lease: Lease { item_id, token },
                attempts: attempts.max(0) as u32,
                tier: tier.max(0) as u32,
            })
            .collect())
    }

    async fn calls_of(&self, run_id: i64, owner: &str) -> anyhow::Result<Vec<OwnedCall>> {
        let rows: Vec<(i64, String, String, String, i64, Option<String>)> = sqlx::query_as(
            "SELECT id, model, item_ids, state, estimated_picos, request_hash FROM backfill_calls \
             WHERE run_id = $1 AND worker = $2 ORDER BY id",
        )
        .bind(run_id)
        .bind(owner)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        rows.into_iter()
            .map(|(call_id, model, ids, state, estimated, request_hash)| {
                Ok(OwnedCall {
                    call_id,
                    model,
                    item_ids: serde_json::from_str(&ids)?,
                    open: state == "reserved",
                    estimated: Picos(estimated),
                    request_hash,
                })
            })
            .collect()
    }

    async fn note_batch(&self, batch_id: i64, note: &BatchNote) -> anyhow::Result<bool> {
        let now = now_ms();
        let noted = sqlx::query(
            "UPDATE backfill_batches SET provider_status = COALESCE($1, provider_status), \
             completed = COALESCE($2, completed), failed = COALESCE($3, failed), error = $4, \
             next_poll_at = $5, updated_at = $5 WHERE id = $6 AND phase = 'submitted'",
        )
        .bind(&note.provider_status)
        .bind(note.completed.map(|n| n as i64))
        .bind(note.failed.map(|n| n as i64))
        .bind(&note.note)
        .bind(now)
        .bind(batch_id)
        .execute(self.writer())
        .await
        .map_err(|e| self.err(e))?;
        Ok(noted.rows_affected() == 1)
    }
}
