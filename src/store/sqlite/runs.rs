//! Runs and the workers attached to them: creation with enqueueing, attachment with the
//! single-owner rule, heartbeats, and recovery of what dead workers held.

use std::time::Duration;

use sqlx::{Row, Sqlite, Transaction};

use super::sql::runs::{Chunk, RUN_COLUMNS, run_from_row, take_over};
use super::{SqliteStore, source};
use crate::store::{
    Attach, Created, ENQUEUE_POLL, Enqueuer, NewRun, Recovered, RunRecord, RunStatus, Tables, Worker, now_ms,
};

/// Creates the job's run, unless an unfinished one exists. The run and the first chunk of its
/// ids are one transaction (nothing pending: no run, when `skip_if_empty`); the other chunks
/// follow, each its own transaction. A run whose enqueue another process is doing is waited
/// for; one whose enqueuer stopped is taken over from its cursor, so an interrupted enqueue
/// ends as if it had never stopped.
pub(super) async fn create_run(store: &SqliteStore, new: &NewRun, tables: &Tables) -> anyhow::Result<Created> {
    // An unfinished, fully enqueued run is found by a read, without the write lock: the process
    // working on it may hold that lock nearly all the time, and this one is then told at once
    // (by `attach`) that the run is taken, instead of waiting for a gap between its writes.
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM backfill_runs WHERE job = ? AND status NOT IN ('finished', 'abandoned') \
         AND enqueued <> 0 ORDER BY id DESC LIMIT 1"
    );
    let found = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(&new.job).fetch_optional(&store.pool).await.map_err(|e| store.err(e))?;
    if let Some(row) = found {
        return Ok(Created::Existing(run_from_row(&row).map_err(|e| store.err(e))?));
    }
    let me = Enqueuer::new();
    loop {
        let mut tx = store.begin_write().await?;
        let sql = format!(
            "SELECT {RUN_COLUMNS}, enqueued, enqueue_owner, enqueue_expires_at FROM backfill_runs WHERE job = ? \
             AND status NOT IN ('finished', 'abandoned') ORDER BY id DESC LIMIT 1"
        );
        let existing = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&new.job)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| store.err(e))?;
        if let Some(row) = existing {
            let run = run_from_row(&row).map_err(|e| store.err(e))?;
            let enqueued: i64 = row.try_get("enqueued").map_err(|e| store.err(e))?;
            if enqueued != 0 {
                return Ok(Created::Existing(run));
            }
            let owner: Option<String> = row.try_get("enqueue_owner").map_err(|e| store.err(e))?;
            let expires: Option<i64> = row.try_get("enqueue_expires_at").map_err(|e| store.err(e))?;
            if me.other_alive(owner.as_deref(), expires, now_ms()) {
                drop(tx);
                tokio::time::sleep(ENQUEUE_POLL).await;
                continue;
            }
            take_over(store, &mut tx, &run, new, &me).await?;
            tx.commit().await.map_err(|e| store.err(e))?;
            tracing::info!("run {}: continuing the enqueue a stopped process left at {} items", run.id, run.total_items);
            return Ok(Created::New(enqueue_rest(store, tables, run.id, &me).await?));
        }
        let kind = source::detect_id_kind(&mut tx, tables).await.map_err(|e| store.err(e))?;
        let now = now_ms();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO backfill_runs (job, status, target, id_kind, total_items, max_usd, mode, item_limit, created_at, \
             updated_at, enqueued, enqueue_owner, enqueue_expires_at) \
             VALUES (?, 'running', ?, ?, 0, ?, ?, ?, ?, ?, 0, ?, ?) RETURNING id",
        )
        .bind(&new.job)
        .bind(&new.target)
        .bind(if kind == super::IdKind::Integer { "integer" } else { "text" })
        .bind(new.max_usd)
        .bind(&new.mode)
        .bind(new.limit.map(|l| l.min(i64::MAX as u64) as i64))
        .bind(now)
        .bind(now)
        .bind(&me.token)
        .bind(Enqueuer::expires_at(now))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| store.err(e))?;
        let first = enqueue_chunk(store, &mut tx, tables, id, &me).await?;
        if first == Some(Chunk { total: 0, done: true }) && new.skip_if_empty {
            // Dropping the transaction rolls the run back: nothing pending makes no run.
            return Ok(Created::NothingPending);
        }
        tx.commit().await.map_err(|e| store.err(e))?;
        store.id_kinds.lock().expect("id kind cache").insert(id, kind);
        return Ok(Created::New(enqueue_rest(store, tables, id, &me).await?));
    }
}

/// Enqueues the next chunk of the run's pending ids, after its cursor, in `tx`; `None` when
/// `me` is no longer the run's enqueuer (another process took it over).
async fn enqueue_chunk(
    store: &SqliteStore,
    tx: &mut Transaction<'static, Sqlite>,
    tables: &Tables,
    run_id: i64,
    me: &Enqueuer,
) -> anyhow::Result<Option<Chunk>> {
    let row = sqlx::query(
        "SELECT total_items, enqueued, enqueue_owner, item_limit, enqueue_cursor, status FROM backfill_runs WHERE id = ?",
    )
    .bind(run_id)
    .fetch_one(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    let e = |e| store.err(e);
    let total = row.try_get::<i64, _>("total_items").map_err(e)?.max(0) as u64;
    if row.try_get::<i64, _>("enqueued").map_err(e)? != 0 {
        return Ok(Some(Chunk { total, done: true }));
    }
    if row.try_get::<String, _>("status").map_err(e)? == "abandoned" {
        anyhow::bail!(crate::exit::UsageError(format!("run {run_id} was abandoned while its pending ids were enqueued")));
    }
    if row.try_get::<Option<String>, _>("enqueue_owner").map_err(e)?.as_deref() != Some(me.token.as_str()) {
        return Ok(None);
    }
    let limit = row.try_get::<Option<i64>, _>("item_limit").map_err(e)?.map(|l| l.max(0) as u64);
    let cursor = source::Cursor::read(&row, 4).map_err(e)?;
    let room = limit.map_or(u64::MAX, |l| l.saturating_sub(total));
    let want = crate::store::enqueue_chunk().min(room);
    let (added, last) = if want == 0 {
        (0, None)
    } else {
        source::enqueue_after(&mut **tx, tables, run_id, cursor.as_ref(), total, want, now_ms()).await.map_err(e)?
    };
    let done = added < want || added == room;
    let total = total + added;
    let now = now_ms();
    let query = sqlx::query(
        "UPDATE backfill_runs SET total_items = ?, enqueued = ?, enqueue_cursor = COALESCE(?, enqueue_cursor), \
         enqueue_owner = CASE WHEN ? THEN NULL ELSE enqueue_owner END, enqueue_expires_at = ?, updated_at = ? WHERE id = ?",
    )
    .bind(total as i64)
    .bind(done as i64);
    let query = match &last {
        Some(cursor) => cursor.bind(query),
        None => query.bind(None::<i64>),
    };
    query
        .bind(done)
        .bind(Enqueuer::expires_at(now))
        .bind(now)
        .bind(run_id)
        .execute(&mut **tx)
        .await
        .map_err(e)?;
    Ok(Some(Chunk { total, done }))
}

/// Enqueues the rest of the run's pending ids, one transaction a chunk, then reads the run.
/// When another process took the enqueue over, waits for it to finish.
async fn enqueue_rest(store: &SqliteStore, tables: &Tables, run_id: i64, me: &Enqueuer) -> anyhow::Result<RunRecord> {
    loop {
        let mut tx = store.begin_write().await?;
        let chunk = enqueue_chunk(store, &mut tx, tables, run_id, me).await?;
        tx.commit().await.map_err(|e| store.err(e))?;
        match chunk {
            Some(Chunk { done: true, .. }) => break,
            Some(_) => crate::store::failpoint::crash("enqueue_chunk"),
            None => tokio::time::sleep(ENQUEUE_POLL).await,
        }
    }
    let sql = format!("SELECT {RUN_COLUMNS} FROM backfill_runs WHERE id = ?");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(run_id).fetch_one(&store.pool).await.map_err(|e| store.err(e))?;
    run_from_row(&row).map_err(|e| store.err(e))
}

pub(super) async fn attach(
    store: &SqliteStore,
    run_id: i64,
    worker: &Worker,
    lease: Duration,
    exclusive: bool,
) -> anyhow::Result<Attach> {
    const OTHERS: &str = "SELECT worker, expires_at FROM backfill_workers \
         WHERE run_id = ? AND detached_at IS NULL AND worker <> ?";
    // The first other worker still alive on the run, as `Attach::Busy`.
    let busy = |others: &[(String, i64)], now: i64| {
        others.iter().find(|(other, expires_at)| *expires_at > now && !worker.proves_gone(other)).map(|(other, expires_at)| {
            Attach::Busy { worker: other.clone(), seconds_left: (*expires_at - now) as f64 / 1000.0 }
        })
    };
    if exclusive {
        // A live worker on the run is seen by a read, without waiting for the write lock that
        // it may hold nearly all the time; the check is made again under the lock below.
        let others: Vec<(String, i64)> =
            sqlx::query_as(OTHERS).bind(run_id).bind(&worker.id).fetch_all(&store.pool).await.map_err(|e| store.err(e))?;
        if let Some(busy) = busy(&others, now_ms()) {
            return Ok(busy);
        }
    }
    let mut tx = store.begin_write().await?;
    let now = now_ms();
    if exclusive {
        let others: Vec<(String, i64)> =
            sqlx::query_as(OTHERS).bind(run_id).bind(&worker.id).fetch_all(&mut *tx).await.map_err(|e| store.err(e))?;
        if let Some(busy) = busy(&others, now) {
            return Ok(busy);
        }
    }
    let expires = now + lease.as_millis() as i64;
    sqlx::query(
        "INSERT INTO backfill_workers (run_id, worker, host, pid, attached_at, heartbeat_at, expires_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (run_id, worker) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, \
         expires_at = excluded.expires_at, detached_at = NULL",
    )
    .bind(run_id)
    .bind(&worker.id)
    .bind(&worker.host)
    .bind(worker.pid as i64)
    .bind(now)
    .bind(now)
    .bind(expires)
    .execute(&mut *tx)
    .await
    .map_err(|e| store.err(e))?;
    let recovered = recover(store, &mut tx, run_id, worker).await?;
    sqlx::query("UPDATE backfill_runs SET status = 'running', updated_at = ?, last_error = NULL WHERE id = ?")
        .bind(now)
        .bind(run_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| store.err(e))?;
    tx.commit().await.map_err(|e| store.err(e))?;
    Ok(Attach::Attached(recovered))
}

/// Workers of the run that are gone: detached, expired, or provably dead on this host.
async fn gone_workers(
    store: &SqliteStore,
    tx: &mut Transaction<'static, Sqlite>,
    run_id: i64,
    me: &Worker,
    now: i64,
) -> anyhow::Result<Vec<String>> {
    let rows: Vec<(String, i64, Option<i64>)> =
        sqlx::query_as("SELECT worker, expires_at, detached_at FROM backfill_workers WHERE run_id = ?")
            .bind(run_id)
            .fetch_all(&mut **tx)
            .await
            .map_err(|e| store.err(e))?;
    Ok(rows
        .into_iter()
        .filter(|(w, expires_at, detached)| {
            w != &me.id && (detached.is_some() || *expires_at <= now || me.proves_gone(w))
        })
        .map(|(w, _, _)| w)
        .collect())
}

pub(super) async fn recover(
    store: &SqliteStore,
    tx: &mut Transaction<'static, Sqlite>,
    run_id: i64,
    me: &Worker,
) -> anyhow::Result<Recovered> {
    let now = now_ms();
    let gone = gone_workers(store, tx, run_id, me, now).await?;
    let mut recovered = Recovered::default();
    // Items whose lease expired, or whose owner is gone, go back to the queue. This is not an
    // attempt of theirs: the process died, not the item.
    let expired = sqlx::query(
        "UPDATE backfill_items SET state = 'pending', lease_owner = NULL, lease_token = NULL, \
         lease_expires_at = NULL, updated_at = ? \
         WHERE run_id = ? AND state = 'leased' AND lease_expires_at <= ?",
    )
    .bind(now)
    .bind(run_id)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    recovered.items += expired.rows_affected();
    for owner in &gone {
        let released = sqlx::query(
            "UPDATE backfill_items SET state = 'pending', lease_owner = NULL, lease_token = NULL, \
             lease_expires_at = NULL, updated_at = ? WHERE run_id = ? AND state = 'leased' AND lease_owner = ?",
        )
        .bind(now)
        .bind(run_id)
        .bind(owner)
        .execute(&mut **tx)
        .await
        .map_err(|e| store.err(e))?;
        recovered.items += released.rows_affected();
        // Calls they had in flight may have been billed: move their estimates to "lost".
        let lost: (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(estimated_picos), 0) FROM backfill_calls \
             WHERE run_id = ? AND state = 'reserved' AND worker = ?",
        )
        .bind(run_id)
        .bind(owner)
        .fetch_one(&mut **tx)
        .await
        .map_err(|e| store.err(e))?;
        if lost.0 > 0 {
            sqlx::query(
                "UPDATE backfill_calls SET state = 'lost', outcome = 'lost', \
                 error = 'in flight when its worker stopped; possibly billed' \
                 WHERE run_id = ? AND state = 'reserved' AND worker = ?",
            )
            .bind(run_id)
            .bind(owner)
            .execute(&mut **tx)
            .await
            .map_err(|e| store.err(e))?;
            sqlx::query(
                "UPDATE backfill_runs SET reserved_picos = reserved_picos - ?, lost_picos = lost_picos + ? WHERE id = ?",
            )
            .bind(lost.1)
            .bind(lost.1)
            .bind(run_id)
            .execute(&mut **tx)
            .await
            .map_err(|e| store.err(e))?;
            recovered.calls_lost += lost.0 as u64;
        }
        sqlx::query("UPDATE backfill_workers SET detached_at = COALESCE(detached_at, ?) WHERE run_id = ? AND worker = ?")
            .bind(now)
            .bind(run_id)
            .bind(owner)
            .execute(&mut **tx)
            .await
            .map_err(|e| store.err(e))?;
    }
    Ok(recovered)
}

pub(super) async fn heartbeat(store: &SqliteStore, run_id: i64, worker: &Worker, lease: Duration) -> anyhow::Result<bool> {
    let mut tx = store.begin_write().await?;
    let now = now_ms();
    let expires = now + lease.as_millis() as i64;
    let attached = sqlx::query(
        "UPDATE backfill_workers SET heartbeat_at = ?, expires_at = ? \
         WHERE run_id = ? AND worker = ? AND detached_at IS NULL",
    )
    .bind(now)
    .bind(expires)
    .bind(run_id)
    .bind(&worker.id)
    .execute(&mut *tx)
    .await
    .map_err(|e| store.err(e))?
    .rows_affected()
        > 0;
    if attached {
        sqlx::query(
            "UPDATE backfill_items SET lease_expires_at = ? WHERE run_id = ? AND state = 'leased' AND lease_owner = ?",
        )
        .bind(expires)
        .bind(run_id)
        .bind(&worker.id)
        .execute(&mut *tx)
        .await
        .map_err(|e| store.err(e))?;
    }
    tx.commit().await.map_err(|e| store.err(e))?;
    Ok(attached)
}

pub(super) async fn detach(store: &SqliteStore, run_id: i64, worker: &Worker) -> anyhow::Result<()> {
    let mut tx = store.begin_write().await?;
    let now = now_ms();
    sqlx::query("UPDATE backfill_workers SET detached_at = ? WHERE run_id = ? AND worker = ?")
        .bind(now)
        .bind(run_id)
        .bind(&worker.id)
        .execute(&mut *tx)
        .await
        .map_err(|e| store.err(e))?;
    // Whatever this worker still holds returns to the queue; calls it abandoned are lost.
    recover_own(store, &mut tx, run_id, worker, now).await?;
    tx.commit().await.map_err(|e| store.err(e))?;
    Ok(())
}

async fn recover_own(
    store: &SqliteStore,
    tx: &mut Transaction<'static, Sqlite>,
    run_id: i64,
    worker: &Worker,
    now: i64,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE backfill_items SET state = 'pending', lease_owner = NULL, lease_token = NULL, \
         lease_expires_at = NULL, updated_at = ? WHERE run_id = ? AND state = 'leased' AND lease_owner = ?",
    )
    .bind(now)
    .bind(run_id)
    .bind(&worker.id)
    .execute(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    let (count, picos): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COALESCE(SUM(estimated_picos), 0) FROM backfill_calls \
         WHERE run_id = ? AND state = 'reserved' AND worker = ?",
    )
    .bind(run_id)
    .bind(&worker.id)
    .fetch_one(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    if count > 0 {
        sqlx::query(
            "UPDATE backfill_calls SET state = 'lost', outcome = 'abandoned', \
             error = 'still in flight when the worker stopped; possibly billed' \
             WHERE run_id = ? AND state = 'reserved' AND worker = ?",
        )
        .bind(run_id)
        .bind(&worker.id)
        .execute(&mut **tx)
        .await
        .map_err(|e| store.err(e))?;
        sqlx::query("UPDATE backfill_runs SET reserved_picos = reserved_picos - ?, lost_picos = lost_picos + ? WHERE id = ?")
            .bind(picos)
            .bind(picos)
            .bind(run_id)
            .execute(&mut **tx)
            .await
            .map_err(|e| store.err(e))?;
    }
    Ok(())
}

pub(super) async fn set_status(
    store: &SqliteStore,
    run_id: i64,
    status: RunStatus,
    error: Option<&str>,
) -> anyhow::Result<RunStatus> {
    let mut tx = store.begin_write().await?;
    let now = now_ms();
    let open = super::queue::counts(&mut tx, run_id).await.map_err(|e| store.err(e))?.open();
    let status = if status == RunStatus::Finished && open > 0 { RunStatus::Running } else { status };
    let finished_at = matches!(status, RunStatus::Finished | RunStatus::Abandoned).then_some(now);
    sqlx::query(
        "UPDATE backfill_runs SET status = ?, updated_at = ?, finished_at = COALESCE(?, finished_at), \
         last_error = COALESCE(?, last_error) WHERE id = ?",
    )
    .bind(status.as_str())
    .bind(now)
    .bind(finished_at)
    .bind(error)
    .bind(run_id)
    .execute(&mut *tx)
    .await
    .map_err(|e| store.err(e))?;
    tx.commit().await.map_err(|e| store.err(e))?;
    Ok(status)
}

/// Changes a run's `--limit` on a resume: pending items never attempted leave the run from its
/// end while it holds more than `limit`; pending source rows not in the run join it while it
/// holds fewer. Returns the run's items after the change.
pub(super) async fn set_limit(store: &SqliteStore, tables: &Tables, run_id: i64, limit: u64) -> anyhow::Result<u64> {
    let mut tx = store.begin_write().await?;
    let e = |e| store.err(e);
    let total = super::queue::counts(&mut tx, run_id).await.map_err(e)?.total().min(i64::MAX as u64) as i64;
    let limit = limit.min(i64::MAX as u64) as i64;
    if total > limit {
        sqlx::query(
            "DELETE FROM backfill_items WHERE run_id = ? AND item_id IN (SELECT item_id FROM backfill_items \
             WHERE run_id = ? AND state = 'pending' AND attempts = 0 AND tier = 0 ORDER BY seq DESC LIMIT ?)",
        )
        .bind(run_id)
        .bind(run_id)
        .bind(total - limit)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
    } else if total < limit {
        let sql = format!(
            "INSERT INTO backfill_items (run_id, item_id, seq, state, updated_at) \
             SELECT ?, CAST(q.id AS TEXT), (SELECT COALESCE(MAX(seq), 0) FROM backfill_items WHERE run_id = ?) \
             + ROW_NUMBER() OVER (ORDER BY q.id), 'pending', ? \
             FROM (SELECT {id} AS id FROM {table} WHERE ({pending}) AND {id} IS NOT NULL \
             AND CAST({id} AS TEXT) NOT IN (SELECT item_id FROM backfill_items WHERE run_id = ?) ORDER BY {id} LIMIT ?) q",
            id = tables.id,
            table = tables.table,
            pending = tables.pending
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(run_id)
            .bind(run_id)
            .bind(now_ms())
            .bind(run_id)
            .bind(limit - total)
            .execute(&mut *tx)
            .await
            .map_err(e)?;
    }
    let total = super::queue::counts(&mut tx, run_id).await.map_err(e)?.total().min(i64::MAX as u64) as i64;
    sqlx::query("UPDATE backfill_runs SET item_limit = ?, updated_at = ?, total_items = ? WHERE id = ?")
        .bind(limit)
        .bind(now_ms())
        .bind(total)
        .bind(run_id)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
    tx.commit().await.map_err(e)?;
    Ok(total.max(0) as u64)
}
