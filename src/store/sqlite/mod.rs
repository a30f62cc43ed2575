//! The SQLite store: WAL, one write connection, a few read connections, and a checkpointer.
//!
//! SQLite has one writer at a time. Every write of the process (claims, outputs, item states, the
//! ledger, the cache, heartbeats, reservations) goes through the store's single write
//! connection, one short `BEGIN IMMEDIATE` transaction after another, queued in the process in
//! the order they were asked for; so no statement of a run ever waits in SQLite's busy handler
//! for another of the run's own connections. Reads (claims' source rows, `status`, reports) use
//! the read connections beside it: WAL readers never block the writer, nor it them. The busy
//! timeout is left for other programs holding the database.
//!
//! Checkpoints are moved off the write path: the write connection never checkpoints on commit
//! (`wal_autocheckpoint = 0`); a background task runs a passive checkpoint on a read connection
//! once a second, which copies committed pages into the database file beside the writer
//! without blocking it, and the writer starts the log over once it has all been copied.

mod queue;
mod runs;
mod source;
#[path = "../sql/mod.rs"]
mod sql;

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

/// The store the shared statements (`store/sql/`) are compiled for here, and its driver.
type Backend = SqliteStore;
type Db = sqlx::Sqlite;
type DbRow = sqlx::sqlite::SqliteRow;
type Tx = sqlx::Transaction<'static, Db>;

/// Where SQLite's SQL differs from PostgreSQL's in the shared statements.
mod dialect {
    /// An exact sum of an integer column that cannot fail (`store::sqlite_sum`).
    pub(super) fn sum(column: &str) -> String {
        crate::store::sqlite_sum(column)
    }

    /// A column in a sum that must not overflow: SQLite turns an overflowing sum into a REAL.
    pub(super) fn wide(column: &str) -> String {
        column.to_owned()
    }

    /// `column + param`, saturating at `i64::MAX` instead of turning into a REAL.
    pub(super) fn saturating_add(column: &str, param: &str) -> String {
        format!(
            "CASE WHEN {column} > 9223372036854775807 - {param} THEN 9223372036854775807 ELSE {column} + {param} END"
        )
    }

    /// Appended to a read that the rest of the write transaction relies on: nothing, since
    /// `BEGIN IMMEDIATE` already holds the one write lock.
    pub(super) const LOCK_ROW: &str = "";

    /// Now, as Unix milliseconds.
    pub(super) const NOW_MS: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

    /// The bound `LIMIT` that means none.
    pub(super) const NO_LIMIT: Option<i64> = Some(-1);

    /// Expired cache entries are swept on every cache write (one process writes the cache).
    pub(super) const CACHE_SWEEP_EVERY: u32 = 1;

    /// How many of the ledger columns of migration 3 exist.
    pub(super) const COUNT_CHECK_COLUMNS: &str =
        "SELECT COUNT(*) FROM pragma_table_info('backfill_calls') WHERE name IN ('usage_flag', 'repair')";
}

/// How long a statement waits for another writer before failing with "database is locked",
/// unless `BACKFILL_BUSY_TIMEOUT_S` says otherwise.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a wait for the write lock goes unreported.
const LOCK_WAIT_NOTICE: Duration = Duration::from_secs(3);

/// How often the checkpointer copies the write-ahead log into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// The write-ahead log is truncated back to this size after the writer starts it over (a burst
/// of writes can grow it; the file need not stay that large).
const WAL_SIZE_LIMIT: &str = "67108864";

/// A wait for the write connection logged at debug level (a healthy run's writes wait a few
/// milliseconds for each other).
const WRITE_WAIT_LOGGED: Duration = Duration::from_millis(100);

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
    (5, "item counts", include_str!("../../../migrations/sqlite/0005_item_counts.sql")),
    (6, "chunked enqueue", include_str!("../../../migrations/sqlite/0006_chunked_enqueue.sql")),
];

/// How ids of a run's source table are bound: as integers or as text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdKind {
    Integer,
    Text,
}

pub struct SqliteStore {
    /// The read connections.
    pool: SqlitePool,
    /// The one write connection (the read pool itself when opened read-only).
    writer: SqlitePool,
    path: PathBuf,
    /// Id kind per run, read once: runs never change it.
    id_kinds: Mutex<HashMap<i64, IdKind>>,
    /// The background checkpointer, stopped with the store.
    _checkpointer: Option<AbortOnDrop>,
}

/// A task aborted when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl SqliteStore {
    pub async fn open(url: &DatabaseUrl) -> anyhow::Result<Self> {
        let options = Self::options(url)?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            // SQLite's default page cache (2 MB) holds the top of a small table's B-trees but
            // not of a million-row queue and source: 8 MB per connection keeps their upper
            // levels in memory.
            .pragma("cache_size", "-8192")
            // No checkpoint on commit: the checkpointer does it beside the writer.
            .pragma("wal_autocheckpoint", "0")
            .pragma("journal_size_limit", WAL_SIZE_LIMIT);
        // The writer first: it sets WAL mode before any reader opens the file.
        let path = options.get_filename().to_path_buf();
        let writer = Self::open_pool(options.clone(), 1).await?;
        let pool = Self::open_pool(options, 3).await?;
        let checkpointer = AbortOnDrop(tokio::spawn(checkpoint_loop(pool.clone(), path.clone())));
        Ok(Self::new(pool, writer, path, Some(checkpointer)))
    }

    /// Opens the database for reading only (`status`, `report`, `run --dry-run`): no journal
    /// mode is set (switching to WAL would rewrite the file's header) and no write is possible.
    pub async fn open_read_only(url: &DatabaseUrl) -> anyhow::Result<Self> {
        let options = Self::options(url)?.read_only(true);
        let path = options.get_filename().to_path_buf();
        let pool = Self::open_pool(options, 2).await?;
        Ok(Self::new(pool.clone(), pool, path, None))
    }

    fn new(pool: SqlitePool, writer: SqlitePool, path: PathBuf, checkpointer: Option<AbortOnDrop>) -> Self {
        Self { pool, writer, path, id_kinds: Mutex::new(HashMap::new()), _checkpointer: checkpointer }
    }

    fn options(url: &DatabaseUrl) -> anyhow::Result<SqliteConnectOptions> {
        Ok(SqliteConnectOptions::from_str(url.expose())
            .with_context(|| format!("{url} is not a valid SQLite URL"))?
            .create_if_missing(false)
            .busy_timeout(busy_timeout())
            .log_slow_statements(log::LevelFilter::Warn, super::SLOW_STATEMENT))
    }

    async fn open_pool(options: SqliteConnectOptions, max_connections: u32) -> anyhow::Result<SqlitePool> {
        let path = options.get_filename().to_path_buf();
        if !path.exists() {
            return Err(crate::exit::usage(format!(
                "SQLite database {} does not exist; check `source.database` or --database",
                path.display()
            )));
        }
        SqlitePoolOptions::new()
            .max_connections(max_connections)
            // A write waits for the writes queued before it, each of which may wait up to the
            // busy timeout for another program: the pool's own timeout is not what gives up.
            .acquire_timeout(busy_timeout() * 4 + Duration::from_secs(5))
            // sqlx warns of a wait for a connection past 2 s: as with statements, only past the
            // wait that means trouble.
            .acquire_slow_threshold(super::SLOW_STATEMENT)
            .connect_with(options)
            .await
            .map_err(|e| database_error(e, &path))
    }

    /// The read connections (writes go through the store's methods, on the write connection).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Where the shared statements write: the one write connection.
    fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    async fn begin_write(&self) -> anyhow::Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        let begin = self.writer.begin_with("BEGIN IMMEDIATE");
        tokio::pin!(begin);
        // SQLite waits for the write lock silently (up to the busy timeout): say what the run
        // waits on once it has waited long enough to be noticed.
        let started = std::time::Instant::now();
        let result = tokio::select! {
            result = &mut begin => result,
            _ = tokio::time::sleep(LOCK_WAIT_NOTICE) => {
                tracing::warn!(
                    "waiting for the write lock of {}: another program holds it (an open transaction, \
                     a backup, a DB browser); the run goes on when it is released, or stops after {:.0} s",
                    self.path.display(),
                    busy_timeout().as_secs_f64()
                );
                let result = begin.await;
                if result.is_ok() {
                    tracing::info!("got the write lock of {} after {:.1} s", self.path.display(), started.elapsed().as_secs_f64());
                }
                result
            }
        };
        let waited = started.elapsed();
        if waited >= WRITE_WAIT_LOGGED {
            tracing::debug!(elapsed_secs = waited.as_secs_f64(), summary = "waiting for the writer", "a write waited {:.3} s for the write connection", waited.as_secs_f64());
        }
        result.map_err(|e| database_error(e, &self.path))
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

    /// Writes one item's outputs; false when the target already held a value or the row is gone.
    async fn write_target(
        &self,
        tx: &mut Tx,
        tables: &Tables,
        kind: &IdKind,
        id: &str,
        values: &[(String, OutputValue)],
    ) -> anyhow::Result<bool> {
        source::write_target(tx, tables, *kind, id, values).await.map_err(|e| self.err(e))
    }
}

/// Copies the write-ahead log into the database file every `CHECKPOINT_EVERY`, beside the
/// writer: a passive checkpoint takes no lock the writer needs and copies what no reader still
/// reads. A checkpoint that fails is logged and tried again.
async fn checkpoint_loop(pool: SqlitePool, path: PathBuf) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&pool).await {
            Ok((_, log, copied)) => {
                tracing::trace!("checkpoint of {}: {copied} of {log} log pages copied", path.display())
            }
            Err(e) => tracing::debug!("checkpoint of {} failed, tried again in {:?}: {e}", path.display(), CHECKPOINT_EVERY),
        }
    }
}

/// Turns a driver error into a message that names the cause and the fix.
pub(crate) fn database_error(e: sqlx::Error, path: &std::path::Path) -> anyhow::Error {
    let shown = path.display();
    let message = e.to_string();
    let lower = message.to_lowercase();
    // A write that timed out waiting for the write connection waited behind writes that were
    // themselves waiting for the database lock.
    let hint = if lower.contains("database is locked") || lower.contains("database is busy") || matches!(e, sqlx::Error::PoolTimedOut) {
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
        // Up to date is seen by a read: another process working on the database may hold the
        // write lock nearly all the time, and a run that is then refused or has nothing to do
        // should not wait for it.
        let applied: Result<Vec<i64>, _> = sqlx::query_scalar("SELECT version FROM backfill_schema").fetch_all(&self.pool).await;
        if let Ok(applied) = applied
            && MIGRATIONS.iter().all(|(version, _, _)| applied.contains(version))
            && applied.iter().all(|version| MIGRATIONS.iter().any(|m| m.0 == *version))
        {
            return Ok(());
        }
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
}

/// One process owns a SQLite run and its controller paces it: nothing to share.
#[async_trait]
impl SharedRate for SqliteStore {
    async fn take_rate(&self, _take: &RateTake) -> anyhow::Result<Duration> {
        Ok(Duration::ZERO)
    }

    async fn report_rate(&self, _account: &str, _caps: &RateCaps, _report: &RateReport) -> anyhow::Result<()> {
        Ok(())
    }
}
