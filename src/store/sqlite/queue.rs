//! The work queue: claiming ready items under a lease, and releasing them.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::SqliteConnection;

use super::{SqliteStore, source};
use crate::store::{Claim, Claimed, Item, ItemCounts, Lease, Tables, Worker, now_ms};

/// The run's items by state, from the counters that triggers keep in every transaction that
/// changes an item (migration 5): one row, whatever the queue's size. A database without them
/// (a read-only `status` of a file an older backfill made) is counted instead.
pub(super) async fn counts(conn: &mut SqliteConnection, run_id: i64) -> Result<ItemCounts, sqlx::Error> {
    let row: Result<Option<(i64, i64, i64, i64, i64)>, sqlx::Error> =
        sqlx::query_as("SELECT pending, leased, done, failed, rejected FROM backfill_item_counts WHERE run_id = ?")
            .bind(run_id)
            .fetch_optional(&mut *conn)
            .await;
    let n = |v: i64| v.max(0) as u64;
    match row {
        Ok(Some((pending, leased, done, failed, rejected))) => {
            Ok(ItemCounts { pending: n(pending), leased: n(leased), done: n(done), failed: n(failed), rejected: n(rejected) })
        }
        Ok(None) => Ok(ItemCounts::default()),
        Err(e) if e.to_string().contains("no such table") => recount(conn, run_id).await,
        Err(e) => Err(e),
    }
}

/// The run's items by state, counted item by item (what the counters must always equal).
pub(super) async fn recount(conn: &mut SqliteConnection, run_id: i64) -> Result<ItemCounts, sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, COUNT(*) FROM backfill_items WHERE run_id = ? GROUP BY state")
            .bind(run_id)
            .fetch_all(&mut *conn)
            .await?;
    Ok(ItemCounts::from_states(rows))
}

/// A random positive fencing token for one claim.
fn new_token() -> i64 {
    fastrand::i64(1..i64::MAX)
}

pub(super) async fn claim(
    store: &SqliteStore,
    tables: &Tables,
    run_id: i64,
    worker: &Worker,
    max_items: usize,
    lease: Duration,
) -> anyhow::Result<Claim> {
    let kind = store.id_kind(run_id).await?;
    let mut tx = store.begin_write().await?;
    let now = now_ms();
    // Fallback tiers first (they are few and late), then queue order.
    let candidates: Vec<(String, i64, i64, Option<i64>)> = sqlx::query_as(
        "SELECT item_id, attempts, tier, group_limit FROM backfill_items \
         WHERE run_id = ? AND state = 'pending' AND not_before <= ? \
         ORDER BY tier DESC, seq LIMIT ?",
    )
    .bind(run_id)
    .bind(now)
    .bind(max_items.max(1) as i64)
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| store.err(e))?;

    if candidates.is_empty() {
        // Nothing is ready, so every pending item waits out a backoff: few, whatever the queue's
        // size. The leased ones are counted by the run's counters.
        let next_ready_at: Option<i64> =
            sqlx::query_scalar("SELECT MIN(not_before) FROM backfill_items WHERE run_id = ? AND state = 'pending'")
                .bind(run_id)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| store.err(e))?;
        let leased = counts(&mut tx, run_id).await.map_err(|e| store.err(e))?.leased;
        tx.commit().await.map_err(|e| store.err(e))?;
        return Ok(Claim { next_ready_at, leased, ..Claim::default() });
    }

    let chosen = crate::store::pick_batch(candidates, max_items);

    let token = new_token();
    let expires = now + lease.as_millis() as i64;
    for (id, _, _) in &chosen {
        sqlx::query(
            "UPDATE backfill_items SET state = 'leased', lease_owner = ?, lease_token = ?, \
             lease_expires_at = ?, updated_at = ? WHERE run_id = ? AND item_id = ? AND state = 'pending'",
        )
        .bind(&worker.id)
        .bind(token)
        .bind(expires)
        .bind(now)
        .bind(run_id)
        .bind(id)
        .execute(&mut *tx)
        .await
        .map_err(|e| store.err(e))?;
    }
    let ids: Vec<String> = chosen.iter().map(|(id, _, _)| id.clone()).collect();
    let mut rows: HashMap<String, Item> = source::rows_by_id(&mut tx, tables, kind, &ids)
        .await?
        .into_iter()
        .map(|item| (item.id.clone(), item))
        .collect();

    let mut claim = Claim::default();
    for (id, attempts, item_tier) in chosen {
        match rows.remove(&id) {
            Some(item) => claim.items.push(Claimed {
                lease: Lease { item_id: id, token },
                attempts: attempts.max(0) as u32,
                tier: item_tier.max(0) as u32,
                item,
            }),
            None => {
                // The source row was deleted after the run started: nothing to do for it.
                sqlx::query(
                    "UPDATE backfill_items SET state = 'failed', reason = 'source_row_missing', \
                     last_error = 'the source row no longer exists', lease_owner = NULL, \
                     lease_token = NULL, lease_expires_at = NULL, updated_at = ? \
                     WHERE run_id = ? AND item_id = ?",
                )
                .bind(now)
                .bind(run_id)
                .bind(&id)
                .execute(&mut *tx)
                .await
                .map_err(|e| store.err(e))?;
                claim.vanished += 1;
            }
        }
    }
    tx.commit().await.map_err(|e| store.err(e))?;
    Ok(claim)
}

pub(super) async fn claim_ids(
    store: &SqliteStore,
    tables: &Tables,
    run_id: i64,
    worker: &Worker,
    ids: &[String],
    lease: Duration,
) -> anyhow::Result<Option<Vec<Claimed>>> {
    let kind = store.id_kind(run_id).await?;
    let mut tx = store.begin_write().await?;
    let now = now_ms();
    let token = new_token();
    let expires = now + lease.as_millis() as i64;
    let mut meta = Vec::with_capacity(ids.len());
    for id in ids {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "UPDATE backfill_items SET state = 'leased', lease_owner = ?, lease_token = ?, \
             lease_expires_at = ?, updated_at = ? WHERE run_id = ? AND item_id = ? AND state = 'pending' \
             RETURNING attempts, tier",
        )
        .bind(&worker.id)
        .bind(token)
        .bind(expires)
        .bind(now)
        .bind(run_id)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| store.err(e))?;
        match row {
            Some(m) => meta.push(m),
            None => {
                tx.rollback().await.map_err(|e| store.err(e))?;
                return Ok(None);
            }
        }
    }
    let mut rows: HashMap<String, Item> = source::rows_by_id(&mut tx, tables, kind, ids)
        .await?
        .into_iter()
        .map(|item| (item.id.clone(), item))
        .collect();
    let mut claimed = Vec::with_capacity(ids.len());
    for (id, (attempts, tier)) in ids.iter().zip(meta) {
        let Some(item) = rows.remove(id) else {
            tx.rollback().await.map_err(|e| store.err(e))?;
            return Ok(None);
        };
        claimed.push(Claimed {
            lease: Lease { item_id: id.clone(), token },
            attempts: attempts.max(0) as u32,
            tier: tier.max(0) as u32,
            item,
        });
    }
    tx.commit().await.map_err(|e| store.err(e))?;
    Ok(Some(claimed))
}

pub(super) async fn release(store: &SqliteStore, run_id: i64, leases: &[Lease]) -> anyhow::Result<()> {
    if leases.is_empty() {
        return Ok(());
    }
    let mut tx = store.begin_write().await?;
    let now = now_ms();
    for lease in leases {
        sqlx::query(
            "UPDATE backfill_items SET state = 'pending', lease_owner = NULL, lease_token = NULL, \
             lease_expires_at = NULL, updated_at = ? \
             WHERE run_id = ? AND item_id = ? AND state = 'leased' AND lease_token = ?",
        )
        .bind(now)
        .bind(run_id)
        .bind(&lease.item_id)
        .bind(lease.token)
        .execute(&mut *tx)
        .await
        .map_err(|e| store.err(e))?;
    }
    tx.commit().await.map_err(|e| store.err(e))?;
    Ok(())
}
