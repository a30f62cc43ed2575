//! Runs and the workers attached to them: creation with enqueueing (one per job at a time, even
//! when several workers start at once), attachment, heartbeats that re-attach a worker others
//! had given up on, and recovery of what dead workers held, by any live worker.

use std::time::Duration;

use sqlx::{Postgres, Row, Transaction};

use super::sql::runs::{Chunk, RUN_COLUMNS, run_from_row, take_over};
use super::{PgStore, db_now_ms, source};
use crate::store::{
    Attach, Created, ENQUEUE_LEASE, ENQUEUE_POLL, Enqueuer, NewRun, Recovered, RunRecord, RunStatus, Tables, Worker,
    now_ms,
};

/// Creates the job's run, unless an unfinished one exists; one per job even when several
/// workers start at once. The run and the first chunk of its ids are one transaction (nothing
/// pending: no run, when `skip_if_empty`); the other chunks follow, each its own transaction,
/// so the creation lock other workers queue on is held for one chunk at a time. A run whose
/// enqueue another process is doing is waited for; one whose enqueuer stopped is taken over from
/// its cursor, so an interrupted enqueue ends as if it had never stopped.
pub(super) async fn create_run(store: &PgStore, new: &NewRun, tables: &Tables) -> anyhow::Result<Created> {
    let kind = source::id_kind(store, tables).await?;
    let me = Enqueuer::new();
    loop {
        let mut tx = store.begin_write().await?;
        // Workers of one job starting at the same moment queue here, so only one creates the run.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('backfill run of ' || $1, 0))")
            .bind(&new.job)
            .execute(&mut *tx)
            .await
            .map_err(|e| store.err(e))?;
        let sql = format!(
            "SELECT {RUN_COLUMNS}, enqueued, enqueue_owner, enqueue_expires_at, {} AS now FROM backfill_runs WHERE job = $1 \
             AND status NOT IN ('finished', 'abandoned') ORDER BY id DESC LIMIT 1",
            db_now_ms!()
        );
        let existing = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&new.job)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| store.err(e))?;
        if let Some(row) = existing {
            let run = run_from_row(&row).map_err(|e| store.err(e))?;
            let e = |e| store.err(e);
            if row.try_get::<bool, _>("enqueued").map_err(e)? {
                return Ok(Created::Existing(run));
            }
            let owner: Option<String> = row.try_get("enqueue_owner").map_err(e)?;
            let expires: Option<i64> = row.try_get("enqueue_expires_at").map_err(e)?;
            if me.other_alive(owner.as_deref(), expires, row.try_get("now").map_err(e)?) {
                drop(tx);
                tokio::time::sleep(ENQUEUE_POLL).await;
                continue;
            }
            take_over(store, &mut tx, &run, new, &me).await?;
            tx.commit().await.map_err(|e| store.err(e))?;
            tracing::info!("run {}: continuing the enqueue a stopped process left at {} items", run.id, run.total_items);
            store.id_kinds.lock().expect("id kind cache").insert(run.id, kind);
            return Ok(Created::New(enqueue_rest(store, tables, run.id, &me).await?));
        }
        let id: i64 = sqlx::query_scalar(concat!(
            "INSERT INTO backfill_runs (job, status, target, id_kind, total_items, max_usd, mode, item_limit, created_at, \
             updated_at, enqueued, enqueue_owner, enqueue_expires_at) \
             VALUES ($1, 'running', $2, $3, 0, $4, $5, $6, $7, $7, false, $8, ",
            db_now_ms!(),
            " + $9) RETURNING id"
        ))
        .bind(&new.job)
        .bind(&new.target)
        .bind(&kind)
        .bind(new.max_usd)
        .bind(&new.mode)
        .bind(new.limit.map(|l| l.min(i64::MAX as u64) as i64))
        .bind(now_ms())
        .bind(&me.token)
        .bind(ENQUEUE_LEASE.as_millis() as i64)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| store.err(e))?;
        let first = enqueue_chunk(store, &mut tx, tables, id, &kind, &me).await?;
        if first == Some(Chunk { total: 0, done: true }) && new.skip_if_empty {
            // Dropping the transaction rolls the run back: nothing pending makes no run.
            return Ok(Created::NothingPending);
        }
        tx.commit().await.map_err(|e| store.err(e))?;
        store.id_kinds.lock().expect("id kind cache").insert(id, kind.clone());
        return Ok(Created::New(enqueue_rest(store, tables, id, &me).await?));
    }
}

/// Enqueues the next chunk of the run's pending ids, after its cursor, in `tx` (holding the
/// run's row lock); `None` when `me` is no longer the run's enqueuer (another process took it
/// over).
async fn enqueue_chunk(
    store: &PgStore,
    tx: &mut Transaction<'static, Postgres>,
    tables: &Tables,
    run_id: i64,
    id_type: &str,
    me: &Enqueuer,
) -> anyhow::Result<Option<Chunk>> {
    let e = |e| store.err(e);
    type RunRow = (i64, bool, Option<String>, Option<i64>, Option<String>, String);
    let (total, enqueued, owner, limit, cursor, status): RunRow = sqlx::query_as(
        "SELECT total_items, enqueued, enqueue_owner, item_limit, enqueue_cursor, status FROM backfill_runs \
         WHERE id = $1 FOR UPDATE",
    )
    .bind(run_id)
    .fetch_one(&mut **tx)
    .await
    .map_err(e)?;
    let total = total.max(0) as u64;
    if enqueued {
        return Ok(Some(Chunk { total, done: true }));
    }
    if status == "abandoned" {
        anyhow::bail!(crate::exit::UsageError(format!("run {run_id} was abandoned while its pending ids were enqueued")));
    }
    if owner.as_deref() != Some(me.token.as_str()) {
        return Ok(None);
    }
    let room = limit.map_or(u64::MAX, |l| (l.max(0) as u64).saturating_sub(total));
    let want = crate::store::enqueue_chunk().min(room);
    let (added, last) = if want == 0 {
        (0, None)
    } else {
        source::enqueue_after(&mut **tx, tables, run_id, id_type, cursor.as_deref(), total, want, now_ms()).await.map_err(e)?
    };
    let done = added < want || added == room;
    let total = total + added;
    sqlx::query(concat!(
        "UPDATE backfill_runs SET total_items = $1, enqueued = $2, enqueue_cursor = COALESCE($3, enqueue_cursor), \
         enqueue_owner = CASE WHEN $2 THEN NULL ELSE enqueue_owner END, enqueue_expires_at = ",
        db_now_ms!(),
        " + $4, updated_at = $5 WHERE id = $6"
    ))
    .bind(total as i64)
    .bind(done)
    .bind(last)
    .bind(ENQUEUE_LEASE.as_millis() as i64)
    .bind(now_ms())
    .bind(run_id)
    .execute(&mut **tx)
    .await
    .map_err(e)?;
    Ok(Some(Chunk { total, done }))
}

/// Enqueues the rest of the run's pending ids, one transaction a chunk, then has the planner
/// learn the queue's size and reads the run. When another process took the enqueue over, waits
/// for it to finish.
async fn enqueue_rest(store: &PgStore, tables: &Tables, run_id: i64, me: &Enqueuer) -> anyhow::Result<RunRecord> {
    let id_type = store.id_kind(run_id).await?;
    loop {
        let mut tx = store.begin_write().await?;
        let chunk = enqueue_chunk(store, &mut tx, tables, run_id, &id_type, me).await?;
        tx.commit().await.map_err(|e| store.err(e))?;
        match chunk {
            Some(Chunk { done: true, .. }) => break,
            Some(_) => crate::store::failpoint::crash("enqueue_chunk"),
            None => tokio::time::sleep(ENQUEUE_POLL).await,
        }
    }
    // The planner must know the queue's size now, not at autovacuum's next visit: with the
    // statistics of an empty table it sorts every pending item for each claim instead of
    // walking the queue index in claim order.
    if let Err(e) = sqlx::query("ANALYZE backfill_items").execute(&store.pool).await {
        tracing::debug!("ANALYZE backfill_items after enqueueing: {e}");
    }
    let sql = format!("SELECT {RUN_COLUMNS} FROM backfill_runs WHERE id = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(run_id).fetch_one(&store.pool).await.map_err(|e| store.err(e))?;
    run_from_row(&row).map_err(|e| store.err(e))
}

pub(super) async fn attach(
    store: &PgStore,
    run_id: i64,
    worker: &Worker,
    lease: Duration,
    exclusive: bool,
) -> anyhow::Result<Attach> {
    let mut tx = store.begin_write().await?;
    // Attachments of one run are serialised by the run's row lock.
    let now: i64 = sqlx::query_scalar(concat!("SELECT ", db_now_ms!(), " FROM backfill_runs WHERE id = $1 FOR UPDATE"))
        .bind(run_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| store.err(e))?;
    if exclusive {
        let others: Vec<(String, i64)> = sqlx::query_as(
            "SELECT worker, expires_at FROM backfill_workers \
             WHERE run_id = $1 AND detached_at IS NULL AND worker <> $2",
        )
        .bind(run_id)
        .bind(&worker.id)
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| store.err(e))?;
        for (other, expires_at) in &others {
            if *expires_at > now && !worker.proves_gone(other) {
                return Ok(Attach::Busy { worker: other.clone(), seconds_left: (*expires_at - now) as f64 / 1000.0 });
            }
        }
    }
    upsert_worker(store, &mut tx, run_id, worker, lease).await?;
    let recovered = recover(store, &mut tx, run_id, worker).await?;
    sqlx::query("UPDATE backfill_runs SET status = 'running', updated_at = $1, last_error = NULL WHERE id = $2")
        .bind(now_ms())
        .bind(run_id)
        .execute(&mut *tx)
        .await
        .map_err(|e| store.err(e))?;
    tx.commit().await.map_err(|e| store.err(e))?;
    Ok(Attach::Attached(recovered))
}

async fn upsert_worker(
    store: &PgStore,
    tx: &mut Transaction<'static, Postgres>,
    run_id: i64,
    worker: &Worker,
    lease: Duration,
) -> anyhow::Result<()> {
    sqlx::query(concat!(
        "INSERT INTO backfill_workers (run_id, worker, host, pid, attached_at, heartbeat_at, expires_at) \
         SELECT $1, $2, $3, $4, t.now, t.now, t.now + $5 FROM (SELECT ",
        db_now_ms!(),
        " AS now) t \
         ON CONFLICT (run_id, worker) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, \
         expires_at = excluded.expires_at, detached_at = NULL"
    ))
    .bind(run_id)
    .bind(&worker.id)
    .bind(&worker.host)
    .bind(worker.pid as i64)
    .bind(lease.as_millis() as i64)
    .execute(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    Ok(())
}

/// Returns what gone workers held to the queue: leases that expired, and the leases and calls
/// of workers that detached, stopped heartbeating, or are provably dead on this host. Every
/// update says what it changed (`RETURNING`), so two workers recovering at once never count
/// the same call's money twice.
pub(super) async fn recover(
    store: &PgStore,
    tx: &mut Transaction<'static, Postgres>,
    run_id: i64,
    me: &Worker,
) -> anyhow::Result<Recovered> {
    let rows: Vec<(String, i64, Option<i64>, i64)> = sqlx::query_as(concat!(
        "SELECT worker, expires_at, detached_at, ",
        db_now_ms!(),
        " FROM backfill_workers WHERE run_id = $1"
    ))
    .bind(run_id)
    .fetch_all(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    let gone: Vec<String> = rows
        .into_iter()
        .filter(|(w, expires_at, detached, now)| {
            w != &me.id && (detached.is_some() || *expires_at <= *now || me.proves_gone(w))
        })
        .map(|(w, _, _, _)| w)
        .collect();
    let mut recovered = Recovered::default();
    // Not an attempt of the items: the process died, not the item.
    let expired = sqlx::query(concat!(
        "UPDATE backfill_items SET state = 'pending', lease_owner = NULL, lease_token = NULL, \
         lease_expires_at = NULL, updated_at = $1 \
         WHERE run_id = $2 AND state = 'leased' AND (lease_expires_at <= ",
        db_now_ms!(),
        " OR lease_owner = ANY($3))"
    ))
    .bind(now_ms())
    .bind(run_id)
    .bind(&gone)
    .execute(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    recovered.items += expired.rows_affected();
    if gone.is_empty() {
        return Ok(recovered);
    }
    let lost: Vec<i64> = sqlx::query_scalar(
        "UPDATE backfill_calls SET state = 'lost', outcome = 'lost', \
         error = 'in flight when its worker stopped; possibly billed' \
         WHERE run_id = $1 AND state = 'reserved' AND worker = ANY($2) RETURNING estimated_picos",
    )
    .bind(run_id)
    .bind(&gone)
    .fetch_all(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    if !lost.is_empty() {
        let picos: i64 = lost.iter().sum();
        sqlx::query("UPDATE backfill_runs SET reserved_picos = reserved_picos - $1, lost_picos = lost_picos + $1 WHERE id = $2")
            .bind(picos)
            .bind(run_id)
            .execute(&mut **tx)
            .await
            .map_err(|e| store.err(e))?;
        recovered.calls_lost += lost.len() as u64;
    }
    sqlx::query(concat!(
        "UPDATE backfill_workers SET detached_at = ",
        db_now_ms!(),
        " WHERE run_id = $1 AND worker = ANY($2) AND detached_at IS NULL"
    ))
    .bind(run_id)
    .bind(&gone)
    .execute(&mut **tx)
    .await
    .map_err(|e| store.err(e))?;
    Ok(recovered)
}

/// Extends the worker's and its items' leases. A worker that others had given up on (its
/// lease ran out during a pause) attaches again: the items it lost have new tokens, so its
/// late writes for them are fenced off, and it carries on with new claims.
pub(super) async fn heartbeat(store: &PgStore, run_id: i64, worker: &Worker, lease: Duration) -> anyhow::Result<bool> {
    let mut tx = store.begin_write().await?;
    upsert_worker(store, &mut tx, run_id, worker, lease).await?;
    sqlx::query(concat!(
        "UPDATE backfill_items SET lease_expires_at = ",
        db_now_ms!(),
        " + $1 WHERE run_id = $2 AND state = 'leased' AND lease_owner = $3"
    ))
    .bind(lease.as_millis() as i64)
    .bind(run_id)
    .bind(&worker.id)
    .execute(&mut *tx)
    .await
    .map_err(|e| store.err(e))?;
    tx.commit().await.map_err(|e| store.err(e))?;
    Ok(true)
}

pub(super) async fn detach(store: &PgStore, run_id: i64, worker: &Worker) -> anyhow::Result<()> {
    let mut tx = store.begin_write().await?;
    sqlx::query(concat!("UPDATE backfill_workers SET detached_at = ", db_now_ms!(), " WHERE run_id = $1 AND worker = $2"))
        .bind(run_id)
        .bind(&worker.id)
        .execute(&mut *tx)
        .await
        .map_err(|e| store.err(e))?;
    // Whatever this worker still holds returns to the queue; calls it abandoned are lost.
    sqlx::query(
        "UPDATE backfill_items SET state = 'pending', lease_owner = NULL, lease_token = NULL, \
         lease_expires_at = NULL, updated_at = $1 WHERE run_id = $2 AND state = 'leased' AND lease_owner = $3",
    )
    .bind(now_ms())
    .bind(run_id)
    .bind(&worker.id)
    .execute(&mut *tx)
    .await
    .map_err(|e| store.err(e))?;
    let abandoned: Vec<i64> = sqlx::query_scalar(
        "UPDATE backfill_calls SET state = 'lost', outcome = 'abandoned', \
         error = 'still in flight when the worker stopped; possibly billed' \
         WHERE run_id = $1 AND state = 'reserved' AND worker = $2 RETURNING estimated_picos",
    )
    .bind(run_id)
    .bind(&worker.id)
    .fetch_all(&mut *tx)
    .await
    .map_err(|e| store.err(e))?;
    if !abandoned.is_empty() {
        sqlx::query("UPDATE backfill_runs SET reserved_picos = reserved_picos - $1, lost_picos = lost_picos + $1 WHERE id = $2")
            .bind(abandoned.iter().sum::<i64>())
            .bind(run_id)
            .execute(&mut *tx)
            .await
            .map_err(|e| store.err(e))?;
    }
    tx.commit().await.map_err(|e| store.err(e))?;
    Ok(())
}

/// Sets the run's status. `finished` only sticks when no item is open; a worker stopping
/// (interrupted, failed) while other workers are still attached leaves the run `running`,
/// since it goes on without this one.
pub(super) async fn set_status(
    store: &PgStore,
    run_id: i64,
    status: RunStatus,
    error: Option<&str>,
) -> anyhow::Result<RunStatus> {
    let mut tx = store.begin_write().await?;
    let live_workers: i64 = sqlx::query_scalar(concat!(
        "SELECT (SELECT COUNT(*) FROM backfill_workers WHERE run_id = $1 AND detached_at IS NULL AND expires_at > ",
        db_now_ms!(),
        ") FROM backfill_runs WHERE id = $1 FOR UPDATE"
    ))
    .bind(run_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| store.err(e))?;
    let open = super::queue::counts(&mut tx, run_id).await.map_err(|e| store.err(e))?.open();
    let status = match status {
        RunStatus::Finished if open > 0 => RunStatus::Running,
        RunStatus::Interrupted | RunStatus::Failed if live_workers > 1 && open > 0 => RunStatus::Running,
        other => other,
    };
    let now = now_ms();
    let finished_at = matches!(status, RunStatus::Finished | RunStatus::Abandoned).then_some(now);
    // A worker's error is kept for people even when the run goes on.
    sqlx::query(
        "UPDATE backfill_runs SET status = $1, updated_at = $2, finished_at = COALESCE($3, finished_at), \
         last_error = COALESCE($4, last_error) WHERE id = $5",
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
pub(super) async fn set_limit(store: &PgStore, tables: &Tables, run_id: i64, limit: u64) -> anyhow::Result<u64> {
    let mut tx = store.begin_write().await?;
    let e = |e| store.err(e);
    // Serialise with claims of other workers on the run.
    sqlx::query("SELECT id FROM backfill_runs WHERE id = $1 FOR UPDATE").bind(run_id).execute(&mut *tx).await.map_err(e)?;
    let total = super::queue::counts(&mut tx, run_id).await.map_err(e)?.total().min(i64::MAX as u64) as i64;
    let limit = limit.min(i64::MAX as u64) as i64;
    if total > limit {
        sqlx::query(
            "DELETE FROM backfill_items WHERE run_id = $1 AND item_id IN (SELECT item_id FROM backfill_items \
             WHERE run_id = $1 AND state = 'pending' AND attempts = 0 AND tier = 0 ORDER BY seq DESC LIMIT $2 \
             FOR UPDATE SKIP LOCKED)",
        )
        .bind(run_id)
        .bind(total - limit)
        .execute(&mut *tx)
        .await
        .map_err(e)?;
    } else if total < limit {
        let sql = format!(
            "INSERT INTO backfill_items (run_id, item_id, seq, state, updated_at) \
             SELECT $1, q.id::text, (SELECT COALESCE(MAX(seq), 0) FROM backfill_items WHERE run_id = $1) \
             + ROW_NUMBER() OVER (ORDER BY q.id), 'pending', $2 \
             FROM (SELECT {id} AS id FROM {table} WHERE ({pending}) AND {id} IS NOT NULL \
             AND {id}::text NOT IN (SELECT item_id FROM backfill_items WHERE run_id = $1) ORDER BY {id} LIMIT $3) q",
            id = tables.id,
            table = tables.table,
            pending = tables.pending
        );
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(run_id)
            .bind(now_ms())
            .bind(limit - total)
            .execute(&mut *tx)
            .await
            .map_err(e)?;
    }
    let total = super::queue::counts(&mut tx, run_id).await.map_err(e)?.total().min(i64::MAX as u64) as i64;
    sqlx::query("UPDATE backfill_runs SET item_limit = $1, updated_at = $2, total_items = $3 WHERE id = $4")
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
