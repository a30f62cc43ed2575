//! The PostgreSQL store: a connection pool, runner tables in the connection's schema, and the
//! same semantics as the SQLite store, made safe for several processes on several machines
//! working on one run: claims with `FOR UPDATE SKIP LOCKED`, leases timed by the database's
//! clock, writes fenced by the lease token, recovery by any worker, and a shared rate bucket.
//!
//! Runtime `query`/`query_as` only; no compile-time macros, no `sqlx::Any`.

mod batches;
mod error;
mod ledger;
mod queue;
mod rate;
mod report;
mod runs;
mod source;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};

pub use error::Server;

use super::*;
use crate::packer::Item;

/// The database clock as Unix milliseconds: every lease, heartbeat and rate bucket is timed
/// by it, so workers on machines whose clocks disagree still agree on expiry.
macro_rules! db_now_ms {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}
pub(crate) use db_now_ms;

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "runner tables", include_str!("../../../migrations/postgres/0001_runner_tables.sql")),
    (2, "provider batches", include_str!("../../../migrations/postgres/0002_batches.sql")),
    (3, "provider checks", include_str!("../../../migrations/postgres/0003_provider_checks.sql")),
    (4, "run settings", include_str!("../../../migrations/postgres/0004_run_settings.sql")),
];

/// Serialises migrations of concurrent workers (an arbitrary constant advisory-lock key).
const MIGRATION_LOCK: i64 = 0x6261_636b_6669_6c6c;

/// How long to wait for a pooled connection before giving up.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct PgStore {
    pool: PgPool,
    server: Server,
    /// The id column's SQL type per run, read once: runs never change it.
    id_types: Mutex<HashMap<i64, String>>,
    /// Column name → SQL type per table (as written in the job), read once per process.
    column_types: Mutex<HashMap<String, Vec<(String, String)>>>,
}

impl PgStore {
    pub async fn open(url: &DatabaseUrl) -> anyhow::Result<Self> {
        let options = PgConnectOptions::from_str(url.expose())
            .map_err(|e| crate::exit::usage(format!("{url} is not a valid PostgreSQL URL: {e}")))?
            .application_name("backfill")
            .log_slow_statements(log::LevelFilter::Warn, super::SLOW_STATEMENT);
        let server = Server {
            host: options.get_host().to_owned(),
            port: options.get_port(),
            database: options.get_database().unwrap_or(options.get_username()).to_owned(),
            user: options.get_username().to_owned(),
        };
        // One connection first, so a server that is not there fails at once with its own error
        // (the pool would retry until its acquire timeout and say only that it timed out).
        let probe = options.connect().await.map_err(|e| error::database_error(e, &server))?;
        let _ = probe.close().await;
        // The dispatcher, the writer, the heartbeat and the call tasks' cache writes each hold a
        // connection briefly; a few cover them without crowding the server's max_connections
        // when many workers attach.
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| error::database_error(e, &server))?;
        Ok(Self { pool, server, id_types: Mutex::new(HashMap::new()), column_types: Mutex::new(HashMap::new()) })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn err(&self, e: sqlx::Error) -> anyhow::Error {
        error::database_error(e, &self.server)
    }

    async fn begin(&self) -> anyhow::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        self.pool.begin().await.map_err(|e| self.err(e))
    }

    async fn id_type(&self, run_id: i64) -> anyhow::Result<String> {
        if let Some(kind) = self.id_types.lock().expect("id type cache").get(&run_id) {
            return Ok(kind.clone());
        }
        let kind: String = sqlx::query_scalar("SELECT id_kind FROM backfill_runs WHERE id = $1")
            .bind(run_id)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        self.id_types.lock().expect("id type cache").insert(run_id, kind.clone());
        Ok(kind)
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn shares_runs(&self) -> bool {
        true
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        let mut tx = self.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS backfill_schema (version BIGINT PRIMARY KEY, \
             description TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(e))?;
        let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM backfill_schema")
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        if let Some(newest) = applied.iter().max() {
            let known = MIGRATIONS.iter().map(|m| m.0).max().unwrap_or(0);
            if *newest > known {
                anyhow::bail!(
                    "the runner tables in {} are at schema version {newest}, newer than this backfill knows \
                     ({known}); upgrade backfill",
                    self.server
                );
            }
        }
        for (version, description, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            sqlx::raw_sql(*sql).execute(&mut *tx).await.map_err(|e| self.err(e))?;
            sqlx::query("INSERT INTO backfill_schema (version, description, applied_at) VALUES ($1, $2, $3)")
                .bind(version)
                .bind(*description)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(())
    }

    async fn runner_tables_exist(&self) -> anyhow::Result<bool> {
        sqlx::query_scalar("SELECT to_regclass('backfill_runs') IS NOT NULL")
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))
    }

    async fn output_tokens_per_item(&self, job: &str, model: &str) -> anyhow::Result<Option<f64>> {
        let (tokens, items): (Option<i64>, Option<i64>) = sqlx::query_as(
            sqlx::AssertSqlSafe(format!(
            "SELECT {}, SUM(c.items_ok + c.items_rejected + c.items_invalid)::bigint \
             FROM backfill_calls c JOIN backfill_runs r ON r.id = c.run_id \
             WHERE r.job = $1 AND c.model = $2 AND c.state = 'settled' AND c.outcome IN ('ok', 'truncated')",
            pg_sum("c.completion_tokens")
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
        let sql = latest_measure_sql(pg_sum, ["$1", "$2", "$3"]);
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
        let mut tx = self.begin().await?;
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
        sqlx::query("UPDATE backfill_runs SET controller_state = $1, updated_at = $2 WHERE id = $3")
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
        sqlx::query("UPDATE backfill_runs SET max_usd = $1, updated_at = $2 WHERE id = $3")
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

    async fn take_rate(&self, take: &RateTake) -> anyhow::Result<Duration> {
        rate::take(self, take).await.context("taking from the shared rate limit")
    }

    async fn report_rate(&self, account: &str, caps: &RateCaps, report: &RateReport) -> anyhow::Result<()> {
        rate::report(self, account, caps, report).await.context("reporting to the shared rate limit")
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
