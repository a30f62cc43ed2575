//! The work queue: claiming ready items under a lease with `FOR UPDATE SKIP LOCKED` (workers
//! never wait for each other's claims and never claim the same item), and releasing them.

use std::collections::HashMap;
use std::time::Duration;

use sqlx::PgConnection;

use super::{PgStore, db_now_ms, source};
use crate::store::{Claim, Claimed, Item, ItemCounts, Lease, Tables, Worker, now_ms};

/// The run's items by state, from the counters that statement triggers keep in every
/// transaction that changes items (migration 5): a sum over one row per database connection
/// that changed the run, whatever the queue's size. A database without them (a read-only
/// `status` of runner tables an older backfill made) is counted instead.
pub(super) async fn counts(conn: &mut PgConnection, run_id: i64) -> Result<ItemCounts, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('backfill_item_counts') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return recount(conn, run_id).await;
    }
    let (pending, leased, done, failed, rejected): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(pending), 0)::bigint, COALESCE(SUM(leased), 0)::bigint, COALESCE(SUM(done), 0)::bigint, \
         COALESCE(SUM(failed), 0)::bigint, COALESCE(SUM(rejected), 0)::bigint FROM backfill_item_counts WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_one(&mut *conn)
    .await?;
    let n = |v: i64| v.max(0) as u64;
    Ok(ItemCounts { pending: n(pending), leased: n(leased), done: n(done), failed: n(failed), rejected: n(rejected) })
}

/// The run's items by state, counted item by item (what the counters must always equal).
pub(super) async fn recount(conn: &mut PgConnection, run_id: i64) -> Result<ItemCounts, sqlx::Error> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, COUNT(*) FROM backfill_items WHERE run_id = $1 GROUP BY state")
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
    store: &PgStore,
    tables: &Tables,
    run_id: i64,
    worker: &Worker,
    max_items: usize,
    lease: Duration,
) -> anyhow::Result<Claim> {
    let kind = store.id_kind(run_id).await?;
    let mut tx = store.begin_write().await?;
    // Fallback tiers first (they are few and late), then queue order. Rows another worker is
    // claiming right now are skipped, not waited for.
    let candidates: Vec<(String, i64, i64, Option<i64>)> = sqlx::query_as(concat!(
        "SELECT item_id, attempts, tier, group_limit FROM backfill_items \
         WHERE run_id = $1 AND state = 'pending' AND not_before <= ",
        db_now_ms!(),
        " ORDER BY tier DESC, seq LIMIT $2 FOR UPDATE SKIP LOCKED"
    ))
    .bind(run_id)
    .bind(max_items.max(1) as i64)
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| store.err(e))?;

    if candidates.is_empty() {
        // Nothing is ready (or what is, another worker is claiming right now): the pending items
        // wait out a backoff, few whatever the queue's size. The leased ones are counted by the
        // run's counters.
        let next_ready_at: Option<i64> =
            sqlx::query_scalar("SELECT MIN(not_before) FROM backfill_items WHERE run_id = $1 AND state = 'pending'")
                .bind(run_id)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| store.err(e))?;
        let leased = counts(&mut tx, run_id).await.map_err(|e| store.err(e))?.leased;
        tx.commit().await.map_err(|e| store.err(e))?;
        // Pending items locked by another worker's claim in progress count as in flight.
        return Ok(Claim { next_ready_at, leased, ..Claim::default() });
    }

    let chosen = crate::store::pick_batch(candidates, max_items);

    let token = new_token();
    let ids: Vec<String> = chosen.iter().map(|(id, _, _)| id.clone()).collect();
    sqlx::query(concat!(
        "UPDATE backfill_items SET state = 'leased', lease_owner = $1, lease_token = $2, \
         lease_expires_at = ",
        db_now_ms!(),
        " + $3, updated_at = $4 WHERE run_id = $5 AND item_id = ANY($6) AND state = 'pending'"
    ))
    .bind(&worker.id)
    .bind(token)
    .bind(lease.as_millis() as i64)
    .bind(now_ms())
    .bind(run_id)
    .bind(&ids)
    .execute(&mut *tx)
    .await
    .map_err(|e| store.err(e))?;
    let mut rows: HashMap<String, Item> = source::rows_by_id(&mut tx, tables, &kind, &ids)
        .await
        .map_err(|e| e.context(format!("reading rows of {}", tables.table.raw())))?
        .into_iter()
        .map(|item| (item.id.clone(), item))
        .collect();

    let mut claim = Claim::default();
    let mut vanished = Vec::new();
    for (id, attempts, item_tier) in chosen {
        match rows.remove(&id) {
            Some(item) => claim.items.push(Claimed {
                lease: Lease { item_id: id, token },
                attempts: attempts.max(0) as u32,
                tier: item_tier.max(0) as u32,
                item,
            }),
            None => vanished.push(id),
        }
    }
    if !vanished.is_empty() {
        // The source rows were deleted after the run started: nothing to do for them.
        let failed = sqlx::query(
            "UPDATE backfill_items SET state = 'failed', reason = 'source_row_missing', \
             last_error = 'the source row no longer exists', lease_owner = NULL, \
             lease_token = NULL, lease_expires_at = NULL, updated_at = $1 \
             WHERE run_id = $2 AND item_id = ANY($3)",
        )
        .bind(now_ms())
        .bind(run_id)
        .bind(&vanished)
        .execute(&mut *tx)
        .await
        .map_err(|e| store.err(e))?;
        claim.vanished = failed.rows_affected();
    }
    tx.commit().await.map_err(|e| store.err(e))?;
    Ok(claim)
}

pub(super) async fn claim_ids(
    store: &PgStore,
    tables: &Tables,
    run_id: i64,
    worker: &Worker,
    ids: &[String],
    lease: Duration,
) -> anyhow::Result<Option<Vec<Claimed>>> {
    let kind = store.id_kind(run_id).await?;
    let mut tx = store.begin_write().await?;
    let token = new_token();
    let meta: Vec<(String, i64, i64)> = sqlx::query_as(concat!(
        "UPDATE backfill_items SET state = 'leased', lease_owner = $1, lease_token = $2, \
         lease_expires_at = ",
        db_now_ms!(),
        " + $3, updated_at = $4 WHERE run_id = $5 AND item_id = ANY($6) AND state = 'pending' \
         RETURNING item_id, attempts, tier"
    ))
    .bind(&worker.id)
    .bind(token)
    .bind(lease.as_millis() as i64)
    .bind(now_ms())
    .bind(run_id)
    .bind(ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| store.err(e))?;
    let mut meta: HashMap<String, (i64, i64)> = meta.into_iter().map(|(id, a, t)| (id, (a, t))).collect();
    if meta.len() != ids.len() {
        tx.rollback().await.map_err(|e| store.err(e))?;
        return Ok(None);
    }
    let mut rows: HashMap<String, Item> = source::rows_by_id(&mut tx, tables, &kind, ids)
        .await?
        .into_iter()
        .map(|item| (item.id.clone(), item))
        .collect();
    let mut claimed = Vec::with_capacity(ids.len());
    for id in ids {
        let (Some(item), Some((attempts, tier))) = (rows.remove(id), meta.remove(id)) else {
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

pub(super) async fn release(store: &PgStore, run_id: i64, leases: &[Lease]) -> anyhow::Result<()> {
    if leases.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = leases.iter().map(|l| l.item_id.clone()).collect();
    let tokens: Vec<i64> = leases.iter().map(|l| l.token).collect();
    sqlx::query(
        "UPDATE backfill_items i SET state = 'pending', lease_owner = NULL, lease_token = NULL, \
         lease_expires_at = NULL, updated_at = $1 \
         FROM unnest($3::text[], $4::bigint[]) AS l (item_id, token) \
         WHERE i.run_id = $2 AND i.item_id = l.item_id AND i.state = 'leased' AND i.lease_token = l.token",
    )
    .bind(now_ms())
    .bind(run_id)
    .bind(&ids)
    .bind(&tokens)
    .execute(&store.pool)
    .await
    .map_err(|e| store.err(e))?;
    Ok(())
}
