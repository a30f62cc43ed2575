//! The PostgreSQL store: a connection pool, runner tables in the connection's schema, and the
//! same semantics as the SQLite store, made safe for several processes on several machines
//! working on one run: claims with `FOR UPDATE SKIP LOCKED`, leases timed by the database's
//! clock, writes fenced by the lease token, recovery by any worker, and a shared rate bucket.
//!
//! Runtime `query`/`query_as` only; no compile-time macros, no `sqlx::Any`.

mod error;
mod queue;
mod rate;
mod runs;
mod source;
#[path = "../sql/mod.rs"]
mod sql;

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

/// The database clock as Unix milliseconds: every lease, heartbeat and rate bucket is timed
/// by it, so workers on machines whose clocks disagree still agree on expiry.
macro_rules! db_now_ms {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}
pub(crate) use db_now_ms;

/// The store the shared statements (`store/sql/`) are compiled for here, and its driver.
type Backend = PgStore;
type Db = sqlx::Postgres;
type DbRow = sqlx::postgres::PgRow;
type Tx = sqlx::Transaction<'static, Db>;

/// How ids of a run's source table are bound: as text cast to the id column's SQL type
/// (`integer`, `uuid`, `text`, …), stored with the run.
pub(crate) type IdKind = String;

/// Where PostgreSQL's SQL differs from SQLite's in the shared statements.
mod dialect {
    /// An exact sum of a `bigint` column that cannot fail (`store::pg_sum`).
    pub(super) fn sum(column: &str) -> String {
        crate::store::pg_sum(column)
    }

    /// A column in a sum that must not overflow: `numeric`, instead of "bigint out of range".
    pub(super) fn wide(column: &str) -> String {
        format!("{column}::numeric")
    }

    /// `column + param`, saturating at `i64::MAX` instead of failing with "bigint out of range".
    pub(super) fn saturating_add(column: &str, param: &str) -> String {
        format!("LEAST({column}::numeric + {param}, 9223372036854775807)::bigint")
    }

    /// Appended to a read that the rest of the write transaction relies on: locks the row
    /// against other workers until the transaction ends.
    pub(super) const LOCK_ROW: &str = " FOR UPDATE";

    /// Now, as Unix milliseconds on the database's clock, which every worker shares.
    pub(super) const NOW_MS: &str = super::db_now_ms!();

    /// The bound `LIMIT` that means none.
    pub(super) const NO_LIMIT: Option<i64> = None;

    /// Expired cache entries are swept on one cache write in this many: every worker writes here.
    pub(super) const CACHE_SWEEP_EVERY: u32 = 64;

    /// How many of the ledger columns of migration 3 exist.
    pub(super) const COUNT_CHECK_COLUMNS: &str = "SELECT COUNT(*) FROM information_schema.columns \
        WHERE table_schema = current_schema() AND table_name = 'backfill_calls' AND column_name IN ('usage_flag', 'repair')";
}

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "runner tables", include_str!("../../../migrations/postgres/0001_runner_tables.sql")),
    (2, "provider batches", include_str!("../../../migrations/postgres/0002_batches.sql")),
    (3, "provider checks", include_str!("../../../migrations/postgres/0003_provider_checks.sql")),
    (4, "run settings", include_str!("../../../migrations/postgres/0004_run_settings.sql")),
    (5, "item counts", include_str!("../../../migrations/postgres/0005_item_counts.sql")),
    (6, "chunked enqueue", include_str!("../../../migrations/postgres/0006_chunked_enqueue.sql")),
];

/// Serialises migrations of concurrent workers (an arbitrary constant advisory-lock key).
const MIGRATION_LOCK: i64 = 0x6261_636b_6669_6c6c;

/// How long to wait for a pooled connection before giving up.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct PgStore {
    pool: PgPool,
    server: Server,
    /// Id kind per run, read once: runs never change it.
    id_kinds: Mutex<HashMap<i64, IdKind>>,
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
            // sqlx warns of a wait for a connection past 2 s: as with statements, only past the
            // wait that means trouble.
            .acquire_slow_threshold(super::SLOW_STATEMENT)
            .connect_with(options)
            .await
            .map_err(|e| error::database_error(e, &server))?;
        Ok(Self { pool, server, id_kinds: Mutex::new(HashMap::new()), column_types: Mutex::new(HashMap::new()) })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Where the shared statements write: any pooled connection (PostgreSQL locks rows, not
    /// the database).
    fn writer(&self) -> &PgPool {
        &self.pool
    }

    fn err(&self, e: sqlx::Error) -> anyhow::Error {
        error::database_error(e, &self.server)
    }

    async fn begin_write(&self) -> anyhow::Result<Tx> {
        self.pool.begin().await.map_err(|e| self.err(e))
    }

    async fn id_kind(&self, run_id: i64) -> anyhow::Result<IdKind> {
        if let Some(kind) = self.id_kinds.lock().expect("id kind cache").get(&run_id) {
            return Ok(kind.clone());
        }
        let kind: String = sqlx::query_scalar("SELECT id_kind FROM backfill_runs WHERE id = $1")
            .bind(run_id)
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        self.id_kinds.lock().expect("id kind cache").insert(run_id, kind.clone());
        Ok(kind)
    }

    /// Writes one item's outputs; false when the target already held a value or the row is gone.
    async fn write_target(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        kind: &IdKind,
        id: &str,
        values: &[(String, OutputValue)],
    ) -> anyhow::Result<bool> {
        source::write_target(self, tx, tables, kind, id, values).await
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
        let mut tx = self.begin_write().await?;
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
}

#[async_trait]
impl SharedRate for PgStore {
    async fn take_rate(&self, take: &RateTake) -> anyhow::Result<Duration> {
        rate::take(self, take).await.context("taking from the shared rate limit")
    }

    async fn report_rate(&self, account: &str, caps: &RateCaps, report: &RateReport) -> anyhow::Result<()> {
        rate::report(self, account, caps, report).await.context("reporting to the shared rate limit")
    }
}
