//! The data the store takes and returns.

use serde_json::Value;

use crate::pricing::{Picos, Tier, Usage};

/// One row as the model sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The row's id, as text (the key the model must answer under).
    pub id: String,
    /// `(column, value)` in the job's column order.
    pub fields: Vec<(String, Value)>,
}

impl Item {
    /// The item as one line of JSON: `{"id": "…", "col": …}`.
    pub fn to_json_line(&self) -> String {
        let mut line = String::with_capacity(64);
        line.push_str("{\"id\":");
        line.push_str(&serde_json::to_string(&self.id).expect("string serialises"));
        for (key, value) in &self.fields {
            line.push(',');
            line.push_str(&serde_json::to_string(key).expect("string serialises"));
            line.push(':');
            line.push_str(&serde_json::to_string(value).expect("JSON value serialises"));
        }
        line.push('}');
        line
    }
}

/// What the source looks like at run start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceInfo {
    pub pending: u64,
}

/// A run's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    /// Stopped by SIGINT/SIGTERM.
    Interrupted,
    /// Stopped at the budget cap.
    Budget,
    /// Stopped by an error (provider refusing every call, database failure).
    Failed,
    Finished,
    /// Given up on purpose with `backfill abandon`.
    Abandoned,
    /// Batch mode: left while the provider's batches run; `--resume` collects them.
    Waiting,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Budget => "budget",
            RunStatus::Failed => "failed",
            RunStatus::Finished => "finished",
            RunStatus::Abandoned => "abandoned",
            RunStatus::Waiting => "waiting",
        }
    }

    pub fn parse(s: &str) -> RunStatus {
        match s {
            "interrupted" => RunStatus::Interrupted,
            "budget" => RunStatus::Budget,
            "failed" => RunStatus::Failed,
            "finished" => RunStatus::Finished,
            "abandoned" => RunStatus::Abandoned,
            "waiting" => RunStatus::Waiting,
            _ => RunStatus::Running,
        }
    }

    /// Runs that `--resume` continues and plain `run` refuses to start beside.
    pub fn is_unfinished(self) -> bool {
        !matches!(self, RunStatus::Finished | RunStatus::Abandoned)
    }
}

/// A run as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub id: i64,
    pub job: String,
    pub status: RunStatus,
    pub target: String,
    pub total_items: u64,
    pub max_usd: Option<f64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub finished_at: Option<i64>,
    pub controller_state: Option<String>,
    pub last_error: Option<String>,
    /// `sync` or `batch` as the run was started (`None`: a local-model run, or a run from
    /// before runs kept their mode).
    pub mode: Option<String>,
    /// The `--limit` the run was started with (or changed to on a resume).
    pub limit: Option<u64>,
}

/// A run to create.
#[derive(Debug, Clone, Default)]
pub struct NewRun {
    pub job: String,
    pub target: String,
    pub limit: Option<u64>,
    pub max_usd: Option<f64>,
    /// `sync` or `batch` (chat runs).
    pub mode: Option<String>,
    /// Create no run when nothing is pending (`run --resume`).
    pub skip_if_empty: bool,
}

#[derive(Debug, Clone)]
pub enum Created {
    New(RunRecord),
    /// An unfinished run of the job already exists.
    Existing(RunRecord),
    /// No unfinished run, nothing pending, and `skip_if_empty`: no run was created.
    NothingPending,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Attach {
    Attached(Recovered),
    /// Another live worker holds the run.
    Busy { worker: String, seconds_left: f64 },
}

/// What recovery returned to the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    pub items: u64,
    pub calls_lost: u64,
}

/// The fencing token an item was claimed under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub item_id: String,
    pub token: i64,
}

/// A leased item with its source row.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub lease: Lease,
    pub attempts: u32,
    pub tier: u32,
    pub item: Item,
}

/// The result of a claim: items, or why there are none right now.
#[derive(Debug, Clone, Default)]
pub struct Claim {
    pub items: Vec<Claimed>,
    /// When the next item in backoff becomes ready (ms), if any is waiting.
    pub next_ready_at: Option<i64>,
    /// Items leased (in flight) by this or other workers.
    pub leased: u64,
    /// Items that failed at claim time because their source row is gone.
    pub vanished: u64,
}

/// A call about to be sent.
#[derive(Debug, Clone)]
pub struct NewCall {
    pub run_id: i64,
    pub worker: String,
    pub model: String,
    pub price_tier: Tier,
    pub request_hash: Option<String>,
    pub item_ids: Vec<String>,
    pub concurrency: u32,
    pub estimated: Picos,
    pub started_at: i64,
}

/// How a call ended, for the ledger.
#[derive(Debug, Clone, Default)]
pub struct CallSettle {
    pub latency_ms: Option<i64>,
    pub http_status: Option<u16>,
    pub outcome: String,
    pub usage: Usage,
    pub cost: Picos,
    /// price_table | provider | estimate | cache | none
    pub cost_source: String,
    pub items_ok: u32,
    pub items_missing: u32,
    pub items_invalid: u32,
    pub items_rejected: u32,
    pub foreign_keys: u32,
    pub error: Option<String>,
    /// The answer, kept for audit when it was malformed or held foreign keys.
    pub content: Option<String>,
    /// No answer came back but the provider may have billed the call (timeout, dropped
    /// connection): the call stays "possibly billed" at its estimate instead of settling.
    pub lost: bool,
    /// Why the provider's usage or cost was not trusted (the call is costed at its estimate).
    pub usage_flag: Option<String>,
    /// How a nearly-right answer was repaired before validation.
    pub repair: Option<String>,
}

/// One value written into a target column.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputValue {
    /// Text: a chat model's output, a label, a JSON array of floats.
    Text(String),
    /// Bytes: an embedding as little-endian float32 (a BLOB in SQLite, bytea in PostgreSQL).
    Blob(Vec<u8>),
    /// A number: a classification's probability.
    Real(f64),
}

/// What happens to one item of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemChange {
    /// Write these `(output key, value)` pairs and mark the item done.
    Done { values: Vec<(String, OutputValue)> },
    /// Back to the queue.
    Retry {
        attempts: u32,
        tier: u32,
        group_limit: Option<u32>,
        not_before: i64,
        error: String,
        reason: String,
    },
    /// Terminal: attempts exhausted.
    Failed { attempts: u32, error: String, reason: String },
    /// Terminal: post-processing kept rejecting the output.
    Rejected { attempts: u32, error: String, reason: String },
}

/// An item's line in the audit table.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRecord {
    /// written | rejected | invalid (skipped is decided by the store)
    pub status: String,
    pub raw: Option<String>,
    pub final_json: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ItemUpdate {
    pub lease: Lease,
    pub change: ItemChange,
    pub output: Option<OutputRecord>,
}

/// One batch's results, written in one transaction.
#[derive(Debug, Clone)]
pub struct BatchWrite {
    pub run_id: i64,
    pub call_id: i64,
    pub settle: CallSettle,
    pub items: Vec<ItemUpdate>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Outputs written into the target.
    pub written: u64,
    /// Done, but the target already held a value (not overwritten).
    pub skipped: u64,
    /// Items whose lease was lost: nothing written for them.
    pub stale: u64,
}

/// A run's money.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spend {
    pub spent: Picos,
    pub reserved: Picos,
    /// Estimates of calls in flight when their worker died: possibly billed.
    pub lost: Picos,
}

impl Spend {
    /// What counts against the cap.
    pub fn committed(&self) -> Picos {
        self.spent + self.reserved + self.lost
    }
}

/// A call lost in a crash whose answer had reached the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct LostCall {
    pub call_id: i64,
    pub model: String,
    pub item_ids: Vec<String>,
    pub request_hash: String,
    pub estimated: Picos,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ItemCounts {
    pub pending: u64,
    pub leased: u64,
    pub done: u64,
    pub failed: u64,
    pub rejected: u64,
}

impl ItemCounts {
    /// From `(state, count)` rows, as a `GROUP BY state` over the queue gives them.
    pub fn from_states(rows: Vec<(String, i64)>) -> ItemCounts {
        let mut counts = ItemCounts::default();
        for (state, n) in rows {
            let n = n.max(0) as u64;
            match state.as_str() {
                "pending" => counts.pending = n,
                "leased" => counts.leased = n,
                "done" => counts.done = n,
                "failed" => counts.failed = n,
                "rejected" => counts.rejected = n,
                _ => {}
            }
        }
        counts
    }

    pub fn total(&self) -> u64 {
        self.pending + self.leased + self.done + self.failed + self.rejected
    }

    /// Items not yet in a terminal state.
    pub fn open(&self) -> u64 {
        self.pending + self.leased
    }
}

/// Cost and tokens of one model in a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelCost {
    pub model: String,
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub cost: Picos,
    /// Calls whose cost is the provider's own figure.
    pub provider_costed: u64,
    /// Answered calls without usage, costed at their reservation's estimate.
    pub estimate_costed: u64,
}

/// A job's money over all its runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobTotals {
    pub runs: u64,
    pub spent: Picos,
    /// Estimates of calls that may have been billed without an answer.
    pub lost: Picos,
    pub models: Vec<ModelCost>,
}

/// Counts of calls by outcome.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallStats {
    pub total: u64,
    pub by_outcome: Vec<(String, u64)>,
    pub in_flight: u64,
    pub lost: u64,
    pub items_sent: u64,
    pub first_started_at: Option<i64>,
    pub last_finished_at: Option<i64>,
    /// Calls whose reported usage or cost could not be true (costed at their reservation).
    pub usage_distrusted: u64,
    /// Answers repaired before validation (raw control characters, trailing commas, prose).
    pub answers_repaired: u64,
}

/// A worker attached to a run.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    pub worker: String,
    pub attached_at: i64,
    pub heartbeat_at: i64,
    pub alive: bool,
    pub items_done: u64,
    /// Calls the worker made (its share of the requests).
    pub calls: u64,
}

/// Everything `status` shows.
#[derive(Debug, Clone)]
pub struct StatusReport {
    pub run: RunRecord,
    pub counts: ItemCounts,
    pub spend: Spend,
    pub models: Vec<ModelCost>,
    /// `(state, reason, count)` of failed and rejected items.
    pub reasons: Vec<(String, String, u64)>,
    /// `(state, reason, error)`: one stored error message for each reason, when items have one.
    pub reason_errors: Vec<(String, String, String)>,
    pub calls: CallStats,
    pub workers: Vec<WorkerRow>,
    /// Earlier runs of the job, newest first, with their cost.
    pub history: Vec<(RunRecord, Picos)>,
    /// Every run of the job together.
    pub job_totals: JobTotals,
    /// The run's provider batches (batch mode), oldest first.
    pub batches: Vec<BatchRecord>,
}

/// The answered calls (`ok`, `truncated`) of one model in one run, summed: what the dry run
/// calibrates its estimate with.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub run_id: i64,
    /// The run's job name (a trial's ends in [`crate::job::TRIAL_SUFFIX`]).
    pub job: String,
    pub calls: u64,
    /// Items sent in those calls.
    pub items: u64,
    /// Items the answers held (valid, invalid or rejected).
    pub items_answered: u64,
    pub items_ok: u64,
    pub completion_tokens: u64,
    /// When the first call started and the last one ended (Unix ms).
    pub first_started_at: i64,
    pub last_ended_at: i64,
    /// The run's saved controller state (JSON), with the limits the provider announced.
    pub controller_state: Option<String>,
}

/// One ledger row, for charts.
#[derive(Debug, Clone, PartialEq)]
pub struct CallRow {
    pub started_at: i64,
    pub latency_ms: Option<i64>,
    pub items: u32,
    pub items_ok: u32,
    pub outcome: Option<String>,
    pub concurrency: Option<u32>,
    pub cost: Picos,
    pub model: String,
}

/// Where a provider batch of a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchPhase {
    /// Requests are being packed and reserved; nothing has left this machine.
    Preparing,
    /// The request file is at the provider; no batch was created from it yet.
    Uploaded,
    /// The batch is being created at the provider (it may exist if the process died here).
    Creating,
    /// Created at the provider: polled until it ends.
    Submitted,
    /// Ended at the provider (completed, expired, cancelled or failed): results to collect.
    Ended,
    /// Every request's result is in the ledger.
    Collected,
    /// Given up before it was created at the provider: nothing was sent or billed.
    Discarded,
}

impl BatchPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchPhase::Preparing => "preparing",
            BatchPhase::Uploaded => "uploaded",
            BatchPhase::Creating => "creating",
            BatchPhase::Submitted => "submitted",
            BatchPhase::Ended => "ended",
            BatchPhase::Collected => "collected",
            BatchPhase::Discarded => "discarded",
        }
    }

    pub fn parse(s: &str) -> BatchPhase {
        match s {
            "uploaded" => BatchPhase::Uploaded,
            "creating" => BatchPhase::Creating,
            "submitted" => BatchPhase::Submitted,
            "ended" => BatchPhase::Ended,
            "collected" => BatchPhase::Collected,
            "discarded" => BatchPhase::Discarded,
            _ => BatchPhase::Preparing,
        }
    }

    /// Not yet collected or discarded.
    pub fn is_open(self) -> bool {
        !matches!(self, BatchPhase::Collected | BatchPhase::Discarded)
    }
}

/// A provider batch (OpenAI Batch API, Anthropic Message Batches) of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRecord {
    pub id: i64,
    pub run_id: i64,
    /// openai | anthropic
    pub dialect: String,
    pub phase: BatchPhase,
    /// The provider's own status word (validating, in_progress, ended, expired, …).
    pub provider_status: Option<String>,
    pub input_file_id: Option<String>,
    pub provider_batch_id: Option<String>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub results_url: Option<String>,
    pub requests: u64,
    pub bytes: u64,
    /// Requests the provider reports finished and failed.
    pub completed: u64,
    pub failed: u64,
    pub created_at: i64,
    pub updated_at: i64,
    pub submitted_at: Option<i64>,
    pub ended_at: Option<i64>,
    /// When to poll next (ms) and the current interval, which backs off.
    pub next_poll_at: i64,
    pub poll_interval_ms: i64,
    pub error: Option<String>,
}

impl BatchRecord {
    /// The owner name its items are held under and its calls are recorded under.
    pub fn owner(&self) -> String {
        format!("batch:{}", self.id)
    }
}

/// A ledger row of a call recorded under one owner (a provider batch's requests).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedCall {
    pub call_id: i64,
    pub model: String,
    pub item_ids: Vec<String>,
    /// Still `reserved`: no result recorded yet.
    pub open: bool,
    pub estimated: Picos,
    pub request_hash: Option<String>,
}

/// An item leased to an owner, with the token its writes are fenced by.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldItem {
    pub lease: Lease,
    pub attempts: u32,
    pub tier: u32,
}

/// A failed or rejected item of a run, with what the store kept about it (`backfill failures`).
#[derive(Debug, Clone, PartialEq)]
pub struct FailureRow {
    pub item_id: String,
    /// failed | rejected
    pub state: String,
    /// The short code of the last failure (`malformed`, `too_long`, …).
    pub reason: Option<String>,
    /// The stored error message of the last failure.
    pub error: Option<String>,
    pub attempts: u32,
    /// The model tier the item was last on (0 = `model.name`, k = `model.fallback[k-1]`).
    pub tier: u32,
    pub updated_at: i64,
    /// The last answer stored for the item (`backfill_outputs`), with its status and the model
    /// of the call that returned it.
    pub answer: Option<StoredAnswer>,
}

/// An item's answer as `backfill_outputs` keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAnswer {
    /// written | skipped | rejected | invalid
    pub status: String,
    pub raw: Option<String>,
    /// Post-processing changes or reasons (JSON).
    pub detail: Option<String>,
    pub call_id: i64,
    pub model: Option<String>,
    pub created_at: i64,
}

/// One column of a table as the database describes it (`backfill init`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnShape {
    pub name: String,
    /// The declared type as the database spells it (`TEXT`, `character varying(200)`, …).
    pub sql_type: String,
    /// Part of the table's primary key.
    pub primary_key: bool,
}

impl ColumnShape {
    /// Whether the column holds text a prompt can quote: SQLite's text affinity (a declared
    /// type containing CHAR, CLOB or TEXT) or PostgreSQL's character types.
    pub fn is_text(&self) -> bool {
        let t = self.sql_type.to_ascii_lowercase();
        ["char", "clob", "text"].iter().any(|k| t.contains(k))
    }
}

/// What an operator's request did to a submitted batch (see `Batches::note_batch`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchNote {
    /// The provider's status word after the request, when it could be read.
    pub provider_status: Option<String>,
    pub completed: Option<u64>,
    pub failed: Option<u64>,
    /// Recorded as the batch's `error`: what was asked and how it went.
    pub note: String,
}
