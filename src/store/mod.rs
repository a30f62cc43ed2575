//! The store: runner tables (runs, workers, items, calls ledger, raw outputs, response cache)
//! and the job's source and target tables, behind one trait with a SQLite and a PostgreSQL
//! implementation chosen once from the URL scheme.
//!
//! Every method is one short transaction; none is held across a network call. Every write of
//! an item checks the lease token it was claimed under, so a stale worker cannot overwrite.

pub mod failpoint;
mod model;
pub mod postgres;
pub mod rate;
pub mod sqlite;
mod worker;

/// A statement slower than this is logged as a warning (sqlx's default, 1 s, fills a healthy
/// run's log with waits that mean nothing); faster ones are not logged. So is a wait for a
/// pooled connection (sqlx's default: 2 s).
pub(crate) const SLOW_STATEMENT: std::time::Duration = std::time::Duration::from_secs(10);

use std::sync::Arc;
use std::time::Duration;

/// Ids enqueued per chunk: one statement and one short transaction each, so a table of millions
/// of rows never holds a statement, the SQLite write lock or PostgreSQL's creation lock for
/// long (about 0.1 s a chunk).
const ENQUEUE_CHUNK: u64 = 10_000;

/// How long a process enqueueing a run counts as alive without finishing another chunk; past
/// it, another process takes the enqueue over from where it stopped.
pub(crate) const ENQUEUE_LEASE: Duration = Duration::from_secs(30);

/// How often a process that finds another one enqueueing the run looks again.
pub(crate) const ENQUEUE_POLL: Duration = Duration::from_millis(200);

/// One `create_run` call enqueueing a run, as recorded in the run's `enqueue_owner`: a number
/// unique in this process, then the process's worker id, so two calls in one process never take
/// each other for the same enqueue, and a call of a process that provably stopped is gone at once.
pub(crate) struct Enqueuer {
    pub token: String,
    worker: Worker,
}

impl Enqueuer {
    pub(crate) fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let worker = Worker::current();
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Enqueuer { token: format!("{n} {}", worker.id), worker }
    }

    /// Whether another call may still be enqueueing the run: it is recorded as `owner`, its
    /// lease (`expires_at`) has not run out and its process is not provably gone.
    pub(crate) fn other_alive(&self, owner: Option<&str>, expires_at: Option<i64>, now: i64) -> bool {
        let Some(owner) = owner else { return false };
        let process = owner.split_once(' ').map(|(_, id)| id).unwrap_or(owner);
        owner != self.token && expires_at.unwrap_or(0) > now && !self.worker.proves_gone(process)
    }

    pub(crate) fn expires_at(now: i64) -> i64 {
        now + ENQUEUE_LEASE.as_millis() as i64
    }
}

/// The chunk size: `ENQUEUE_CHUNK`, or `BACKFILL_ENQUEUE_CHUNK` in builds with test hooks.
pub(crate) fn enqueue_chunk() -> u64 {
    failpoint::number("BACKFILL_ENQUEUE_CHUNK").filter(|n| *n > 0).unwrap_or(ENQUEUE_CHUNK)
}

use async_trait::async_trait;
use futures_util::stream::BoxStream;

pub use model::*;
pub use rate::{RateCaps, RateCost, RateReport, RateTake};
pub use worker::{Worker, now_ms};

use crate::ident::Ident;
use crate::pricing::Picos;
use crate::secret::DatabaseUrl;

/// A token count as a database integer: counts beyond `i64::MAX` are stored as `i64::MAX`
/// (never wrapped to a negative number).
/// "it has tables a, b" for a message about a table that does not exist.
fn existing_tables(names: &[String]) -> String {
    match names {
        [] => "it has no tables".into(),
        names => format!("it has tables: {}", names.join(", ")),
    }
}

/// The items one claim takes from its ready candidates `(id, attempts, tier, group limit)`, in
/// claim order: one tier per batch (the first candidate's), and no more than the smallest group
/// limit among them (items whose batches kept coming back malformed go in smaller batches).
pub(crate) fn pick_batch(candidates: Vec<(String, i64, i64, Option<i64>)>, max_items: usize) -> Vec<(String, i64, i64)> {
    let Some(tier) = candidates.first().map(|c| c.2) else { return Vec::new() };
    let mut chosen = Vec::new();
    let mut limit = max_items.max(1);
    for (id, attempts, item_tier, group_limit) in candidates {
        if item_tier != tier {
            continue;
        }
        if let Some(g) = group_limit {
            limit = limit.min(g.max(1) as usize);
        }
        if chosen.len() >= limit {
            break;
        }
        chosen.push((id, attempts, item_tier));
    }
    chosen.truncate(limit);
    chosen
}

pub fn db_count(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// An exact SQLite sum of an integer column that cannot fail: `SUM` raises "integer overflow"
/// past `i64`, so the column is summed in two parts (billions and the rest, each far from
/// overflowing) and recombined; a total beyond `i64` becomes a REAL, which `CAST` saturates to
/// `i64::MAX`. `NULL` on no rows, like `SUM`. Values stored as REAL by an older overflow are
/// read through `CAST` too.
pub fn sqlite_sum(column: &str) -> String {
    format!(
        "CAST(SUM(CAST({column} AS INTEGER) / 1000000000) * 1000000000 + SUM(CAST({column} AS INTEGER) % 1000000000) AS INTEGER)"
    )
}

/// A PostgreSQL sum of a `bigint` column as a `bigint` that cannot fail: `SUM` is `numeric`
/// (exact); a total beyond `bigint` is clamped instead of raising "bigint out of range".
pub fn pg_sum(column: &str) -> String {
    format!("LEAST(GREATEST(SUM({column}), -9223372036854775808), 9223372036854775807)::bigint")
}
/// How many earlier runs `status` and `report` show (`status --all`: every one).
pub const HISTORY: u64 = 10;

/// The job's tables as the store needs them.
#[derive(Debug, Clone)]
pub struct Tables {
    pub table: Ident,
    pub id: Ident,
    pub columns: Vec<Ident>,
    pub pending: String,
    /// `(output key, column)`; key `""` for a single text output.
    pub outputs: Vec<(String, Ident)>,
    pub overwrite: bool,
}

impl Tables {
    pub fn from_job(job: &crate::job::Job) -> Self {
        Tables {
            table: job.source.table.clone(),
            id: job.source.id.clone(),
            columns: job.source.columns.clone(),
            pending: job.source.pending.clone(),
            outputs: job
                .target
                .outputs
                .iter()
                .map(|(key, column)| (key.clone().unwrap_or_default(), column.clone()))
                .collect(),
            overwrite: job.target.overwrite,
        }
    }
}

/// The whole store: every part below, behind one `Arc<dyn Store>` chosen by `store::open`.
/// Methods of the parts can be called on a `dyn Store` without importing them.
#[async_trait]
pub trait Store: Source + Runs + Queue + Ledger + Cache + Batches + Reports + SharedRate {
    /// "sqlite" or "postgres".
    fn backend(&self) -> &'static str;

    /// True when several processes may work on one run at once.
    fn shares_runs(&self) -> bool;

    /// Creates or upgrades the runner tables.
    async fn migrate(&self) -> anyhow::Result<()>;

    /// Whether the runner tables exist (read-only commands never create them).
    async fn runner_tables_exist(&self) -> anyhow::Result<bool>;
}

/// The job's own tables: checked, and read for a dry run.
#[async_trait]
pub trait Source: Send + Sync {
    /// Checks that the source and target tables and columns exist and the pending predicate
    /// runs; returns how many rows are pending.
    async fn inspect(&self, tables: &Tables) -> anyhow::Result<SourceInfo>;

    /// What `inspect` checks, without counting the pending rows (which reads the whole table).
    async fn check(&self, tables: &Tables) -> anyhow::Result<()> {
        self.inspect(tables).await.map(|_| ())
    }

    /// Streams up to `limit` pending rows in id order (for a dry run; writes nothing). Rows are
    /// read as the stream is consumed, so a reader that keeps a bounded number of them holds
    /// bounded memory whatever the table's size.
    fn pending_rows<'a>(&'a self, tables: &'a Tables, limit: Option<u64>) -> BoxStream<'a, anyhow::Result<Item>>;

    /// The columns of a table in their order (`backfill init`); a table that does not exist
    /// is a usage error naming the tables that do.
    async fn describe(&self, table: &Ident) -> anyhow::Result<Vec<ColumnShape>>;
}

/// Runs and the workers attached to them.
#[async_trait]
pub trait Runs: Send + Sync {
    async fn latest_run(&self, job: &str) -> anyhow::Result<Option<RunRecord>>;

    /// Creates a run and enqueues the pending ids (at most `limit`) — unless an unfinished run
    /// of the job exists, which is returned instead. The ids go in chunks of `ENQUEUE_CHUNK`,
    /// one short transaction each, the first with the run; a run whose enqueue another process
    /// is doing is waited for, one whose enqueuer stopped is enqueued on from where it stopped
    /// (and returned as new: nobody worked on it yet).
    async fn create_run(&self, new: &NewRun, tables: &Tables) -> anyhow::Result<Created>;

    /// Attaches a worker to a run. With `exclusive`, refuses while another live worker is
    /// attached. Leases of workers that are gone return to the queue.
    async fn attach(&self, run_id: i64, worker: &Worker, lease: Duration, exclusive: bool) -> anyhow::Result<Attach>;

    /// Extends the worker's and its items' leases; returns false when the worker lost its
    /// attachment (another process took the run over).
    async fn heartbeat(&self, run_id: i64, worker: &Worker, lease: Duration) -> anyhow::Result<bool>;

    /// Returns expired leases to the queue and marks calls of dead workers lost.
    async fn recover(&self, run_id: i64) -> anyhow::Result<Recovered>;

    async fn detach(&self, run_id: i64, worker: &Worker) -> anyhow::Result<()>;

    /// Sets the run's status (and `last_error`). `finished` only sticks when no item is
    /// pending or leased.
    async fn set_status(&self, run_id: i64, status: RunStatus, error: Option<&str>) -> anyhow::Result<RunStatus>;

    async fn save_controller_state(&self, run_id: i64, state: &str) -> anyhow::Result<()>;

    /// The controller states saved by the job's runs before `before`, newest first, at most
    /// `limit` of them (runs that saved none are skipped).
    async fn earlier_controller_states(&self, job: &str, before: i64, limit: u64) -> anyhow::Result<Vec<String>>;

    /// Records the budget cap a run continues under (`--resume` with another `--max-usd`).
    async fn set_budget(&self, run_id: i64, max_usd: Option<f64>) -> anyhow::Result<()>;

    /// Changes the run's `--limit` (a resume with `--limit`): never-attempted pending items
    /// leave it from its end, or pending source rows join it; returns its items after.
    async fn set_limit(&self, tables: &Tables, run_id: i64, limit: u64) -> anyhow::Result<u64>;

    /// Changes the run's mode (`sync` or `batch`).
    async fn set_mode(&self, run_id: i64, mode: &str) -> anyhow::Result<()>;
}

/// The work queue: items leased under a fencing token.
#[async_trait]
pub trait Queue: Send + Sync {
    /// Leases up to `max_items` ready items of one tier and reads their source rows.
    async fn claim(&self, tables: &Tables, run_id: i64, worker: &Worker, max_items: usize, lease: Duration) -> anyhow::Result<Claim>;

    /// Leases exactly these items, when they are all pending (replaying a call after a crash).
    async fn claim_ids(&self, tables: &Tables, run_id: i64, worker: &Worker, ids: &[String], lease: Duration) -> anyhow::Result<Option<Vec<Claimed>>>;

    /// Returns leased items to the queue untouched (no attempt counted).
    async fn release(&self, run_id: i64, leases: &[Lease]) -> anyhow::Result<()>;
}

/// The money path: calls reserved against the cap, and the write that settles them.
#[async_trait]
pub trait Ledger: Send + Sync {
    /// Records a call about to be sent, reserving its estimated cost against the cap.
    /// `None` when the reservation would pass the cap.
    async fn reserve_call(&self, call: &NewCall, cap: Option<Picos>) -> anyhow::Result<Option<i64>>;

    /// One transaction: target writes (fenced by lease), item states, raw outputs, and the
    /// call's settlement in the ledger.
    async fn write_batch(&self, tables: &Tables, batch: &BatchWrite) -> anyhow::Result<WriteReport>;

    /// The run's money: settled, reserved for calls in flight, and lost in crashes.
    async fn spend(&self, run_id: i64) -> anyhow::Result<Spend>;

    /// Calls of the run that were in flight when their worker died, with an answer in the cache.
    async fn lost_calls(&self, run_id: i64) -> anyhow::Result<Vec<LostCall>>;
}

/// The response cache, keyed by the request's hash.
#[async_trait]
pub trait Cache: Send + Sync {
    async fn cache_get(&self, hash: &str) -> anyhow::Result<Option<String>>;
    async fn cache_put(&self, hash: &str, model: &str, body: &str, ttl: Duration) -> anyhow::Result<()>;
    async fn cache_drop(&self, hash: &str) -> anyhow::Result<()>;
}

/// Provider batches of a run, the items they hold and the ledger rows of their requests.
#[async_trait]
pub trait Batches: Send + Sync {
    /// Records a new provider batch of the run, in phase `preparing`.
    async fn create_batch(&self, run_id: i64, dialect: &str) -> anyhow::Result<BatchRecord>;

    /// Saves a batch's phase, provider ids, counts and polling schedule.
    async fn update_batch(&self, batch: &BatchRecord) -> anyhow::Result<()>;

    /// The run's provider batches, oldest first.
    async fn batches(&self, run_id: i64) -> anyhow::Result<Vec<BatchRecord>>;

    /// Keeps (or, with `None`, forgets) a batch's request lines until the provider has created
    /// the batch, so a resumed run can submit exactly what was prepared.
    async fn set_batch_input(&self, batch_id: i64, jsonl: Option<&[u8]>) -> anyhow::Result<()>;

    async fn batch_input(&self, batch_id: i64) -> anyhow::Result<Option<Vec<u8>>>;

    /// Hands leased items over to `owner`, which holds them without expiry (a provider batch
    /// can take a day). Returns how many were handed over.
    async fn hold(&self, run_id: i64, leases: &[Lease], owner: &str) -> anyhow::Result<u64>;

    /// Items leased to `owner`.
    async fn held(&self, run_id: i64, owner: &str) -> anyhow::Result<Vec<HeldItem>>;

    /// Ledger rows recorded under `owner` (`NewCall::worker`), in id order.
    async fn calls_of(&self, run_id: i64, owner: &str) -> anyhow::Result<Vec<OwnedCall>>;

    /// Records what an operator asked of a submitted batch (`backfill batches --cancel`) and
    /// what the provider then said, and has the run poll it at once; only these columns
    /// change, so a runner working on the batch meanwhile loses nothing. False when the batch
    /// is no longer `submitted`.
    async fn note_batch(&self, batch_id: i64, note: &BatchNote) -> anyhow::Result<bool>;
}

/// What `status`, `report` and the dry run read: counts, history, ledger rows.
#[async_trait]
pub trait Reports: Send + Sync {
    async fn item_counts(&self, run_id: i64) -> anyhow::Result<ItemCounts>;

    /// Everything `status` and `report` show about a job's runs.
    async fn status(&self, job: &str, run: Option<i64>) -> anyhow::Result<Option<StatusReport>>;

    /// Runs of the job before `before`, newest first, with their spend (`limit`: at most that many).
    async fn history(&self, job: &str, before: i64, limit: Option<u64>) -> anyhow::Result<Vec<(RunRecord, Picos)>>;

    /// The run `run` of the job, or its latest run.
    async fn find_run(&self, job: &str, run: Option<i64>) -> anyhow::Result<Option<RunRecord>>;

    /// Failed and rejected items of a run (`state`: only those), in queue order, at most
    /// `limit`, each with its last stored answer.
    async fn failures(&self, run_id: i64, state: Option<&str>, limit: Option<u64>) -> anyhow::Result<Vec<FailureRow>>;

    /// Ledger rows of a run in time order (for the report's chart).
    async fn calls(&self, run_id: i64) -> anyhow::Result<Vec<CallRow>>;

    /// Output tokens per returned item, measured over the job's answered calls of `model`.
    async fn output_tokens_per_item(&self, job: &str, model: &str) -> anyhow::Result<Option<f64>>;

    /// What the latest run among `jobs` (a job's runs and its trials) that has answered calls
    /// of `model` measured over those calls; `None` when no such run exists.
    async fn latest_measure(&self, jobs: [&str; 2], model: &str) -> anyhow::Result<Option<Measured>>;
}

/// The provider account's rate, shared by every worker that uses the account (see `store::rate`).
#[async_trait]
pub trait SharedRate: Send + Sync {
    /// Takes one request's cost from the account's rate: zero when it may go now, else how
    /// long to wait first (nothing is taken then; `take.correction` is applied either way). A
    /// store that does not share runs grants everything: its one process paces itself.
    async fn take_rate(&self, take: &RateTake) -> anyhow::Result<Duration>;

    /// Publishes what a response said about the account: announced limits, a 429's pause.
    async fn report_rate(&self, account: &str, caps: &RateCaps, report: &RateReport) -> anyhow::Result<()>;
}

/// Opens the store for reading only (`status`, `report`, `run --dry-run`): on SQLite the file
/// is opened read-only and its journal mode left alone, so these commands never change it.
pub async fn open_read_only(url: &DatabaseUrl) -> anyhow::Result<Arc<dyn Store>> {
    if url.is_sqlite() {
        Ok(Arc::new(sqlite::SqliteStore::open_read_only(url).await?))
    } else {
        open(url).await
    }
}

/// Opens the store for a database URL: `sqlite://…` or `postgres://…`.
pub async fn open(url: &DatabaseUrl) -> anyhow::Result<Arc<dyn Store>> {
    if url.is_sqlite() {
        Ok(Arc::new(sqlite::SqliteStore::open(url).await?))
    } else if url.is_postgres() {
        Ok(Arc::new(postgres::PgStore::open(url).await?))
    } else {
        anyhow::bail!(crate::exit::UsageError(format!(
            "{url}: not a database URL backfill knows; use sqlite://path.db or postgres://user@host/db"
        )))
    }
}
