//! The SQLite store: WAL, a busy timeout, and `BEGIN IMMEDIATE` for every write transaction so
//! writers queue on the database lock instead of failing on a lock upgrade.

mod batches;
mod ledger;
mod queue;
mod report;
mod runs;
mod source;

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sqlx::ConnectOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use super::*;
use crate::packer::Item;

/// How long a statement waits for another writer before failing with "database is locked",
/// unless `BACKFILL_BUSY_TIMEOUT_S` says otherwise.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

fn busy_timeout() -> Duration {
    std::env::var("BACKFILL_BUSY_TIMEOUT_S")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(BUSY_TIMEOUT)
}

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "runner tables", include_str!("../../../migrations/sqlite/0001_runner_tables.sql")),
    (2, "provider batches", include_str!("../../../migrations/sqlite/0002_batches.sql")),
    (3, "provider checks", include_str!("../../../migrations/sqlite/0003_provider_checks.sql")),
    (4, "run settings", include_str!("../../../migrations/sqlite/0004_run_settings.sql")),
];

/// How ids of a run's source table are bound: as integers or as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdKind {
    Integer,
    Text,
}

pub struct SqliteStore {
    pool: SqlitePool,
    path: PathBuf,
    /// Id kind per run, read once: runs never change it.
    id_kinds: Mutex<HashMap<i64, IdKind>>,
}

impl SqliteStore {
    pub async fn open(url: &DatabaseUrl) -> anyhow::Result<Self> {
        let options = Self::options(url)?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal);
        // The pool is small: SQLite has one writer at a time; a few connections let reads
        // (status, claims' row fetches) proceed beside a write.
        Self::connect(options, 4).await
    }

    /// Opens the database for reading only (`status`, `report`, `run --dry-run`): no journal
    /// mode is set (switching to WAL would rewrite the file's header) and no write is possible.
    pub async fn open_read_only(url: &DatabaseUrl) -> anyhow::Result<Self> {
        Self::connect(Self::options(url)?.read_only(true), 2).await
    }

    fn options(url: &DatabaseUrl) -> anyhow::Result<SqliteConnectOptions> {
        Ok(SqliteConnectOptions::from_str(url.expose())
            .with_context(|| format!("{url} is not a valid SQLite URL"))?
            .create_if_missing(false)
            .busy_timeout(busy_timeout())
            .log_slow_statements(log::LevelFilter::Warn, super::SLOW_STATEMENT))
    }

    async fn connect(options: SqliteConnectOptions, max_connections: u32) -> anyhow::Result<Self> {
        let path = options.get_filename().to_path_buf();
        if !path.exists() {
            return Err(crate::exit::usage(format!(
                "SQLite database {} does not exist; check `source.database` or --database",
                path.display()
            )));
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(busy_timeout() + Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(|e| database_error(e, &path))?;
        Ok(Self { pool, path, id_kinds: Mutex::new(HashMap::new()) })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn begin_write(&self) -> anyhow::Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        self.pool.begin_with("BEGIN IMMEDIATE").await.map_err(|e| database_error(e, &self.path))
    }

    fn err(&self, e: sqlx::Error) -> anyhow::Error {
        database_error(e, &self.path)
    }

    async fn id_kind(&self, run_id: i64) -> anyhow::Result<IdKind> {
        if let Some(kind) = self.id_kinds.lock().expect("id kind cache").get(&run_id) {
            return Ok(*kind);
        }
        let kind: String = sqlx::query_scalar("SELECT id_kind FROM backfill_runs WHERE id = ?")
            .bind(run_id)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        let kind = if kind == "integer" { IdKind::Integer } else { IdKind::Text };
        self.id_kinds.lock().expect("id kind cache").insert(run_id, kind);
        Ok(kind)
    }
}

/// Turns a driver error into a message that names the cause and the fix.
pub(crate) fn database_error(e: sqlx::Error, path: &std::path::Path) -> anyhow::Error {
    let shown = path.display();
    let message = e.to_string();
    let lower = message.to_lowercase();
    let hint = if lower.contains("database is locked") || lower.contains("database is busy") {
        Some(format!(
            "SQLite database {shown} stayed locked by another program for {waited}; \
             close the program holding it (or wait) and run again with --resume",
            waited = match busy_timeout().as_secs_f64() {
                s if s < 10.0 => format!("{s:.1}s"),
                s => format!("{s:.0}s"),
            }
        ))
    } else if lower.contains("disk is full") || lower.contains("database or disk is full") {
        Some(format!("the disk holding {shown} is full; free space and run again with --resume"))
    } else if lower.contains("readonly") || lower.contains("read-only") {
        Some(format!(
            "SQLite database {shown} is read-only; give this user write access to the file and its \
             directory (WAL needs both), then run again with --resume"
        ))
    } else if lower.contains("unable to open") {
        Some(format!(
            "cannot open SQLite database {shown}; check the path and that its directory is writable"
        ))
    } else {
        None
    };
    match hint {
        Some(hint) => anyhow::Error::new(e).context(hint),
        None => anyhow::Error::new(e).context(format!("SQLite database {shown}")),
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn shares_runs(&self) -> bool {
        false
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS backfill_schema (version INTEGER PRIMARY KEY, \
             description TEXT NOT NULL, applied_at INTEGER NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM backfill_schema")
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        for (version, description, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(|e| self.err(e))?;
            sqlx::query("INSERT INTO backfill_schema (version, description, applied_at) VALUES (?, ?, ?)")
                .bind(version)
                .bind(*description)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        if let Some(newest) = applied.iter().max() {
            let known = MIGRATIONS.iter().map(|m| m.0).max().unwrap_or(0);
            if *newest > known {
                anyhow::bail!(
                    "the runner tables in {} are at schema version {newest}, newer than this \
                     backfill knows ({known}); upgrade backfill",
                    self.path.display()
                );
            }
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn runner_tables_exist(&self) -> anyhow::Result<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'backfill_runs'",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(n > 0)
    }

    async fn output_tokens_per_item(&self, job: &str, model: &str) -> anyhow::Result<Option<f64>> {
        let (tokens, items): (Option<i64>, Option<i64>) = sqlx::query_as(
            sqlx::AssertSqlSafe(format!(
            "SELECT {}, SUM(c.items_ok + c.items_rejected + c.items_invalid) \
             FROM backfill_calls c JOIN backfill_runs r ON r.id = c.run_id \
             WHERE r.job = ? AND c.model = ? AND c.state = 'settled' AND c.outcome IN ('ok', 'truncated')",
            sqlite_sum("c.completion_tokens")
        )))
        .bind(job)
        .bind(model)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(e))?;
        Ok(match (tokens, items) {
            (Some(t), Some(i)) if i > 0 && t > 0 => Some(t as f64 / i as f64),
            _ => None,
        })
    }

    async fn latest_measure(&self, jobs: [&str; 2], model: &str) -> anyhow::Result<Option<Measured>> {
        let sql = latest_measure_sql(sqlite_sum, ["?1", "?2", "?3"]);
        let row: Option<MeasuredRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(jobs[0])
            .bind(jobs[1])
            .bind(model)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(row.map(measured_from))
    }

    async fn inspect(&self, tables: &Tables) -> anyhow::Result<SourceInfo> {
        source::inspect(self, tables).await
    }

    async fn pending_rows(&self, tables: &Tables, limit: Option<u64>) -> anyhow::Result<Vec<Item>> {
        source::pending_rows(self, tables, limit).await
    }

    async fn latest_run(&self, job: &str) -> anyhow::Result<Option<RunRecord>> {
        runs::latest_run(self, job).await
    }

    async fn create_run(&self, new: &NewRun, tables: &Tables) -> anyhow::Result<Created> {
        runs::create_run(self, new, tables).await
    }

    async fn attach(&self, run_id: i64, worker: &Worker, lease: Duration, exclusive: bool) -> anyhow::Result<Attach> {
        runs::attach(self, run_id, worker, lease, exclusive).await
    }

    async fn heartbeat(&self, run_id: i64, worker: &Worker, lease: Duration) -> anyhow::Result<bool> {
        runs::heartbeat(self, run_id, worker, lease).await
    }

    async fn recover(&self, run_id: i64) -> anyhow::Result<Recovered> {
        let mut tx = self.begin_write().await?;
        let recovered = runs::recover(self, &mut tx, run_id, &Worker::current()).await?;
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(recovered)
    }

    async fn detach(&self, run_id: i64, worker: &Worker) -> anyhow::Result<()> {
        runs::detach(self, run_id, worker).await
    }

    async fn set_status(&self, run_id: i64, status: RunStatus, error: Option<&str>) -> anyhow::Result<RunStatus> {
        runs::set_status(self, run_id, status, error).await
    }

    async fn save_controller_state(&self, run_id: i64, state: &str) -> anyhow::Result<()> {
        sqlx::query("UPDATE backfill_runs SET controller_state = ?, updated_at = ? WHERE id = ?")
            .bind(state)
            .bind(now_ms())
            .bind(run_id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn set_limit(&self, tables: &Tables, run_id: i64, limit: u64) -> anyhow::Result<u64> {
        runs::set_limit(self, tables, run_id, limit).await
    }

    async fn set_mode(&self, run_id: i64, mode: &str) -> anyhow::Result<()> {
        runs::set_mode(self, run_id, mode).await
    }

    async fn history(&self, job: &str, before: i64, limit: Option<u64>) -> anyhow::Result<Vec<(RunRecord, Picos)>> {
        report::history(self, job, before, limit).await
    }

    async fn set_budget(&self, run_id: i64, max_usd: Option<f64>) -> anyhow::Result<()> {
        sqlx::query("UPDATE backfill_runs SET max_usd = ?, updated_at = ? WHERE id = ?")
            .bind(max_usd)
            .bind(now_ms())
            .bind(run_id)
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn claim(&self, tables: &Tables, run_id: i64, worker: &Worker, max_items: usize, lease: Duration) -> anyhow::Result<Claim> {
        queue::claim(self, tables, run_id, worker, max_items, lease).await
    }

    async fn claim_ids(&self, tables: &Tables, run_id: i64, worker: &Worker, ids: &[String], lease: Duration) -> anyhow::Result<Option<Vec<Claimed>>> {
        queue::claim_ids(self, tables, run_id, worker, ids, lease).await
    }

    async fn release(&self, run_id: i64, leases: &[Lease]) -> anyhow::Result<()> {
        queue::release(self, run_id, leases).await
    }

    async fn reserve_call(&self, call: &NewCall, cap: Option<Picos>) -> anyhow::Result<Option<i64>> {
        ledger::reserve_call(self, call, cap).await
    }

    async fn write_batch(&self, tables: &Tables, batch: &BatchWrite) -> anyhow::Result<WriteReport> {
        ledger::write_batch(self, tables, batch).await
    }

    async fn spend(&self, run_id: i64) -> anyhow::Result<Spend> {
        ledger::spend(self, run_id).await
    }

    async fn cache_get(&self, hash: &str) -> anyhow::Result<Option<String>> {
        ledger::cache_get(self, hash).await
    }

    async fn cache_put(&self, hash: &str, model: &str, body: &str, ttl: Duration) -> anyhow::Result<()> {
        ledger::cache_put(self, hash, model, body, ttl).await
    }

    async fn cache_drop(&self, hash: &str) -> anyhow::Result<()> {
        ledger::cache_drop(self, hash).await
    }

    async fn lost_calls(&self, run_id: i64) -> anyhow::Result<Vec<LostCall>> {
        ledger::lost_calls(self, run_id).await
    }

    async fn item_counts(&self, run_id: i64) -> anyhow::Result<ItemCounts> {
        report::item_counts(&self.pool, run_id).await.map_err(|e| self.err(e))
    }

    async fn status(&self, job: &str, run: Option<i64>) -> anyhow::Result<Option<StatusReport>> {
        report::status(self, job, run).await
    }

    async fn calls(&self, run_id: i64) -> anyhow::Result<Vec<CallRow>> {
        report::calls(self, run_id).await
    }

    /// One process owns a SQLite run and its controller paces it: nothing to share.
    async fn take_rate(&self, _take: &RateTake) -> anyhow::Result<Duration> {
        Ok(Duration::ZERO)
    }

    async fn report_rate(&self, _account: &str, _caps: &RateCaps, _report: &RateReport) -> anyhow::Result<()> {
        Ok(())
    }

    async fn create_batch(&self, run_id: i64, dialect: &str) -> anyhow::Result<BatchRecord> {
        batches::create_batch(self, run_id, dialect).await
    }

    async fn update_batch(&self, batch: &BatchRecord) -> anyhow::Result<()> {
        batches::update_batch(self, batch).await
    }

    async fn batches(&self, run_id: i64) -> anyhow::Result<Vec<BatchRecord>> {
        batches::batches(self, run_id).await
    }

    async fn set_batch_input(&self, batch_id: i64, jsonl: Option<&[u8]>) -> anyhow::Result<()> {
        batches::set_batch_input(self, batch_id, jsonl).await
    }

    async fn batch_input(&self, batch_id: i64) -> anyhow::Result<Option<Vec<u8>>> {
        batches::batch_input(self, batch_id).await
    }

    async fn hold(&self, run_id: i64, leases: &[Lease], owner: &str) -> anyhow::Result<u64> {
        batches::hold(self, run_id, leases, owner).await
    }

    async fn held(&self, run_id: i64, owner: &str) -> anyhow::Result<Vec<HeldItem>> {
        batches::held(self, run_id, owner).await
    }

    async fn calls_of(&self, run_id: i64, owner: &str) -> anyhow::Result<Vec<OwnedCall>> {
        batches::calls_of(self, run_id, owner).await
    }
}
