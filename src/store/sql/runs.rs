//! Runs as rows: reading them, and the updates that mean the same on both backends, among them
//! the take-over of an enqueue a stopped process left. Creation and the enqueue's chunks,
//! attachment, heartbeats, recovery, the status and the limit are the backend's own (`runs`).

use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;

use super::{Backend, DbRow, Tx, dialect};
use crate::store::{
    Attach, Created, ENQUEUE_LEASE, Enqueuer, NewRun, Recovered, RunRecord, RunStatus, Runs, Tables, Worker, now_ms,
};

pub(crate) const RUN_COLUMNS: &str = "id, job, status, target, total_items, max_usd, created_at, updated_at, \
                                      finished_at, controller_state, last_error, mode, item_limit";

pub(crate) fn run_from_row(row: &DbRow) -> Result<RunRecord, sqlx::Error> {
    Ok(RunRecord {
        id: row.try_get("id")?,
        job: row.try_get("job")?,
        status: RunStatus::parse(&row.try_get::<String, _>("status")?),
        target: row.try_get("target")?,
        total_items: row.try_get::<i64, _>("total_items")?.max(0) as u64,
        max_usd: row.try_get("max_usd")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
        controller_state: row.try_get("controller_state")?,
        last_error: row.try_get("last_error")?,
        mode: row.try_get("mode")?,
        limit: row.try_get::<Option<i64>, _>("item_limit")?.map(|l| l.max(0) as u64),
    })
}

/// Runs of the job before `before`, newest first (`limit`: at most that many).
pub(super) async fn earlier_runs(store: &Backend, job: &str, before: i64, limit: Option<u64>) -> anyhow::Result<Vec<RunRecord>> {
    let sql = format!("SELECT {RUN_COLUMNS} FROM backfill_runs WHERE job = $1 AND id < $2 ORDER BY id DESC LIMIT $3");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(job)
        .bind(before)
        .bind(limit.map(|l| l.min(i64::MAX as u64) as i64).or(dialect::NO_LIMIT))
        .fetch_all(store.pool())
        .await
        .map_err(|e| store.err(e))?;
    rows.iter().map(run_from_row).collect::<Result<_, _>>().map_err(|e| store.err(e))
}

/// Where a run's enqueue stands after a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub total: u64,
    pub done: bool,
}

/// Makes `me` the enqueuer of a run whose enqueuer stopped, with this command's settings (the
/// run was never worked on: it is this command's run now). A lower `--limit` than the items
/// already enqueued drops the last of them.
pub(crate) async fn take_over(
    store: &Backend,
    tx: &mut Tx,
    run: &RunRecord,
    new: &NewRun,
    me: &Enqueuer,
) -> anyhow::Result<()> {
    let limit = new.limit.map(|l| l.min(i64::MAX as u64) as i64);
    if let Some(limit) = limit.filter(|l| *l < run.total_items as i64) {
        sqlx::query("DELETE FROM backfill_items WHERE run_id = $1 AND state = 'pending' AND tier = 0 AND seq > $2")
            .bind(run.id)
            .bind(limit)
            .execute(&mut **tx)
            .await
            .map_err(|e| store.err(e))?;
        sqlx::query("UPDATE backfill_runs SET total_items = $1 WHERE id = $2")
            .bind(limit)
            .bind(run.id)
            .execute(&mut **tx)
            .await
            .map_err(|e| store.err(e))?;
    }
    let sql = format!(
        "UPDATE backfill_runs SET target = $1, max_usd = $2, mode = $3, item_limit = $4, enqueue_owner = $5, \
         enqueue_expires_at = {} + $6, updated_at = $7 WHERE id = $8",
        dialect::NOW_MS
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&new.target)
        .bind(new.max_usd)
        .bind(&new.mode)
        .bind(limit)
        .bind(&me.token)
        .bind(ENQUEUE_LEASE.as_millis() as i64)
        .bind(now_ms())
        .bind(run.id)
        .execute(&mut **tx)
        .await
        .map_err(|e| store.err(e))?;
    Ok(())
}

impl Backend {
    /// Sets one column of the run's row (and `updated_at`).
    async fn set_run_column<'q, T>(&self, run_id: i64, column: &str, value: T) -> anyhow::Result<()>
    where
        T: 'q + Send + sqlx::Encode<'q, super::Db> + sqlx::Type<super::Db>,
    {
        sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE backfill_runs SET {column} = $1, updated_at = $2 WHERE id = $3")))
            .bind(value)
            .bind(now_ms())
            .bind(run_id)
            .execute(self.writer())
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

#[async_trait]
impl Runs for Backend {
    async fn latest_run(&self, job: &str) -> anyhow::Result<Option<RunRecord>> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM backfill_runs WHERE job = $1 ORDER BY id DESC LIMIT 1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| self.err(e))?;
        row.as_ref().map(run_from_row).transpose().map_err(|e| self.err(e))
    }

    async fn create_run(&self, new: &NewRun, tables: &Tables) -> anyhow::Result<Created> {
        super::super::runs::create_run(self, new, tables).await
    }

    async fn attach(&self, run_id: i64, worker: &Worker, lease: Duration, exclusive: bool) -> anyhow::Result<Attach> {
        super::super::runs::attach(self, run_id, worker, lease, exclusive).await
    }

    async fn heartbeat(&self, run_id: i64, worker: &Worker, lease: Duration) -> anyhow::Result<bool> {
        super::super::runs::heartbeat(self, run_id, worker, lease).await
    }

    async fn recover(&self, run_id: i64) -> anyhow::Result<Recovered> {
        let mut tx = self.begin_write().await?;
        let recovered = super::super::runs::recover(self, &mut tx, run_id, &Worker::current()).await?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(recovered)
    }

    async fn detach(&self, run_id: i64, worker: &Worker) -> anyhow::Result<()> {
        super::super::runs::detach(self, run_id, worker).await
    }

    async fn set_status(&self, run_id: i64, status: RunStatus, error: Option<&str>) -> anyhow::Result<RunStatus> {
        super::super::runs::set_status(self, run_id, status, error).await
    }

    async fn save_controller_state(&self, run_id: i64, state: &str) -> anyhow::Result<()> {
        self.set_run_column(run_id, "controller_state", state).await
    }

    async fn earlier_controller_states(&self, job: &str, before: i64, limit: u64) -> anyhow::Result<Vec<String>> {
        sqlx::query_scalar(
            "SELECT controller_state FROM backfill_runs \
             WHERE job = $1 AND id < $2 AND controller_state IS NOT NULL ORDER BY id DESC LIMIT $3",
        )
        .bind(job)
        .bind(before)
        .bind(limit.min(i64::MAX as u64) as i64)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))
    }

    async fn set_budget(&self, run_id: i64, max_usd: Option<f64>) -> anyhow::Result<()> {
        self.set_run_column(run_id, "max_usd", max_usd).await
    }

    async fn set_limit(&self, tables: &Tables, run_id: i64, limit: u64) -> anyhow::Result<u64> {
        super::super::runs::set_limit(self, tables, run_id, limit).await
    }

    /// Records the run's mode (`sync` or `batch`).
    async fn set_mode(&self, run_id: i64, mode: &str) -> anyhow::Result<()> {
        self.set_run_column(run_id, "mode", mode).await
    }
}
