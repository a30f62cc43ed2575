//! Provider batch APIs behind one trait: OpenAI's Batch API (`/files`, `/batches`, output via
//! `/files/{id}/content`) and Anthropic's Message Batches (`/messages/batches`, a results
//! stream). Both take the same multi-item chat requests the synchronous path sends, run them
//! within 24 hours, and bill them at the provider's batch price.
//!
//! Every step is its own call so the runner can record it before the next one: upload the
//! request lines, create the batch, find a batch created just before a crash, poll, fetch the
//! results, cancel.

mod anthropic;
mod http;
mod openai;

use std::time::Duration;

use async_trait::async_trait;

pub use anthropic::AnthropicBatches;
pub use openai::OpenAiBatches;

use super::{CallError, ChatRequest};
use crate::secret::ApiKey;

/// Which provider's batch API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::OpenAi => "openai",
            Dialect::Anthropic => "anthropic",
        }
    }
}

/// The most one batch may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_requests: usize,
    pub max_bytes: usize,
}

impl BatchLimits {
    /// OpenAI: 50,000 requests and 200 MB per input file.
    pub const OPENAI: BatchLimits = BatchLimits { max_requests: 50_000, max_bytes: 200 * 1024 * 1024 };
    /// Anthropic: 100,000 requests or 256 MB per batch.
    pub const ANTHROPIC: BatchLimits = BatchLimits { max_requests: 100_000, max_bytes: 256 * 1024 * 1024 };
}

/// A batch as the provider reports it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchStatus {
    /// The provider's status word.
    pub status: String,
    /// No more results will come: completed, failed, expired, cancelled (OpenAI) or ended
    /// (Anthropic).
    pub ended: bool,
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub results_url: Option<String>,
    /// Why the whole batch failed (validation errors), when it did.
    pub errors: Option<String>,
}

/// What came back for one request of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestResult {
    /// An answer, as an OpenAI chat-completion body (Anthropic messages are converted).
    Answered { body: String },
    /// The request failed at the provider (HTTP status when there was one).
    Failed { status: Option<u16>, message: String },
    /// The batch expired or was cancelled before this request ran: not billed.
    NotRun { why: String },
}

/// One result line.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultLine {
    pub custom_id: String,
    pub result: RequestResult,
}

#[async_trait]
pub trait BatchApi: Send + Sync {
    fn dialect(&self) -> Dialect;

    fn limits(&self) -> BatchLimits;

    /// One request line (without the newline) for `custom_id`.
    fn line(&self, custom_id: &str, request: &ChatRequest) -> String;

    /// Uploads the request lines; the file id, or `None` where the API takes the requests
    /// inline when the batch is created (Anthropic).
    async fn upload(&self, jsonl: &[u8]) -> Result<Option<String>, CallError>;

    /// Creates the batch; its id. `tag` identifies it in the provider's listing.
    async fn create(&self, file_id: Option<&str>, jsonl: &[u8], tag: &str) -> Result<String, CallError>;

    /// The batch a process created just before it died, before it could record its id: it
    /// pages through the provider's whole listing (back to `since_ms`, when the batch went to
    /// be created) and only adopts a batch that is provably this one: OpenAI by the `tag` in
    /// its metadata or its input file, Anthropic by its results, every `custom_id` of which
    /// must start with `custom_id_prefix`.
    async fn find(&self, wanted: &Wanted<'_>) -> Result<Found, CallError>;

    async fn status(&self, batch_id: &str) -> Result<BatchStatus, CallError>;

    /// Every result line the provider has for an ended batch.
    async fn results(&self, batch_id: &str, status: &BatchStatus) -> Result<Vec<ResultLine>, CallError>;

    async fn cancel(&self, batch_id: &str) -> Result<(), CallError>;
}

/// What identifies a batch this run created, for [`BatchApi::find`].
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    /// The uploaded request file (OpenAI).
    pub file_id: Option<&'a str>,
    /// The run's and batch's identity, put in the batch's metadata when it is created.
    pub tag: &'a str,
    /// What every `custom_id` of the batch starts with.
    pub custom_id_prefix: &'a str,
    /// When the batch went to be created (ms); the provider created it after.
    pub since_ms: i64,
    /// How many requests it holds.
    pub requests: u64,
}

/// What [`BatchApi::find`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// This provider batch is the one.
    Ours(String),
    /// No batch of the listing is or may be the one: it was never created.
    Nothing,
    /// These batches look like the one but cannot be proven ours yet (Anthropic shows a
    /// batch's requests only once it has ended): ask again later, create nothing meanwhile.
    Unproven(Vec<String>),
}

/// How far before the recorded time a batch found in a listing may have been created (the
/// provider's clock and ours differ).
pub const CLOCK_SLACK_MS: i64 = 120_000;

/// The most listing pages `find` reads (100 batches each) before it gives up with an error
/// rather than create a batch twice.
pub const MAX_LISTING_PAGES: usize = 2_000;

/// The batch API of a job's provider.
pub fn client(dialect: Dialect, base_url: &str, api_key: Option<ApiKey>, limits: Option<BatchLimits>) -> anyhow::Result<Box<dyn BatchApi>> {
    let http = http::Http::new(base_url, api_key, dialect, Duration::from_secs(600))?;
    Ok(match dialect {
        Dialect::OpenAi => Box::new(OpenAiBatches::new(http, limits.unwrap_or(BatchLimits::OPENAI))),
        Dialect::Anthropic => Box::new(AnthropicBatches::new(http, limits.unwrap_or(BatchLimits::ANTHROPIC))),
    })
}
