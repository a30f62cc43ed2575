//! The shared rate bucket row of a provider account: locked, advanced by the pure arithmetic of
//! `store::rate`, written back, in one short transaction timed by the database clock.

use std::time::Duration;

use sqlx::{Postgres, Transaction};

use super::{PgStore, db_now_ms};
use crate::store::rate::{BucketState, RateCaps, RateReport, RateTake};

/// Locks the account's row (creating it on first use) and reads it with the database's now.
async fn lock(
    store: &PgStore,
    tx: &mut Transaction<'static, Postgres>,
    account: &str,
) -> anyhow::Result<(BucketState, i64)> {
    // An upsert that changes nothing still locks the row and returns it, in one round trip.
    let row: (f64, f64, Option<f64>, Option<f64>, f64, i64, i64, i64) = sqlx::query_as(concat!(
        "INSERT INTO backfill_rate_buckets (account, updated_at) VALUES ($1, 0) \
         ON CONFLICT (account) DO UPDATE SET account = excluded.account \
         RETURNING request_level, token_level, announced_rpm, announced_tpm, safety, paused_until, updated_at, ",
        db_now_ms!()
    ))
    .bind(account)
    .fetch_one(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    let (request_level, token_level, announced_rpm, announced_tpm, safety, paused_until, updated_at, now) = row;
    Ok((
        BucketState { request_level, token_level, announced_rpm, announced_tpm, safety, paused_until, updated_at },
        now,
    ))
}

async fn save(
    store: &PgStore,
    tx: &mut Transaction<'static, Postgres>,
    account: &str,
    state: &BucketState,
    caps: &RateCaps,
    granted: bool,
    rate_limited: bool,
) -> anyhow::Result<()> {
    let (rpm, tpm) = state.per_minute(caps);
    sqlx::query(
        "UPDATE backfill_rate_buckets SET request_level = $2, token_level = $3, announced_rpm = $4, \
         announced_tpm = $5, safety = $6, paused_until = $7, updated_at = $8, requests_per_min = $9, \
         tokens_per_min = $10, granted = granted + $11, rate_limited = rate_limited + $12 WHERE account = $1",
    )
    .bind(account)
    .bind(state.request_level)
    .bind(state.token_level)
    .bind(state.announced_rpm)
    .bind(state.announced_tpm)
    .bind(state.safety)
    .bind(state.paused_until)
    .bind(state.updated_at)
    .bind(rpm)
    .bind(tpm)
    .bind(i64::from(granted))
    .bind(i64::from(rate_limited))
    .execute(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    Ok(())
}

pub(super) async fn take(store: &PgStore, take: &RateTake) -> anyhow::Result<Duration> {
    let mut tx = store.begin_write().await?;
    let (mut state, now) = lock(store, &mut tx, &take.account).await?;
    let wait = state.take(now, take);
    save(store, &mut tx, &take.account, &state, &take.caps, wait.is_zero(), false).await?;
    tx.commit().await.map_err(|e| store.err(e))?;
    Ok(wait)
}

pub(super) async fn report(store: &PgStore, account: &str, caps: &RateCaps, report: &RateReport) -> anyhow::Result<()> {
    let mut tx = store.begin_write().await?;
    let (mut state, now) = lock(store, &mut tx, account).await?;
    state.report(now, caps, report);
    save(store, &mut tx, account, &state, caps, false, report.rate_limited).await?;
    tx.commit().await.map_err(|e| store.err(e))?;
    Ok(())
}
