//! The job: a validated job file, ready to build the run's collaborators from.
//!
//! [`Job::load`] reads the TOML, expands `${VAR}`, refuses unknown keys, and checks everything
//! that can be checked before touching the database or the network: identifiers, files, prices,
//! ranges. Every error is a [`crate::exit::UsageError`] (exit 2) naming the key and the fix.

pub mod env;
pub mod file;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ident::Ident;
use crate::pricing::PriceTable;
use crate::secret::DatabaseUrl;

pub use validate::LoadOptions;
pub(crate) use validate::database_url;

/// A validated job.
#[derive(Debug, Clone)]
pub struct Job {
    /// The job file's path, as given.
    pub path: PathBuf,
    /// The directory relative paths in the job resolve against.
    pub dir: PathBuf,
    pub name: String,
    pub database: DatabaseUrl,
    pub source: Source,
    pub target: Target,
    pub processor: Processor,
    pub prices: PriceTable,
    pub limits: Limits,
    pub budget_usd: Option<f64>,
    /// The `[postprocess]` rules; files they name are read when the post-processor is built.
    pub postprocess: Option<backfill_postprocess::PostprocessConfig>,
    pub cache: CacheSettings,
}

/// What to read.
#[derive(Debug, Clone)]
pub struct Source {
    pub table: Ident,
    pub id: Ident,
    pub columns: Vec<Ident>,
    /// The operator's SQL predicate selecting rows still to do.
    pub pending: String,
}

/// Where results go.
#[derive(Debug, Clone)]
pub struct Target {
    /// `(output key, column)`; the key is `None` when the model returns one string per item.
    pub outputs: Vec<(Option<String>, Ident)>,
    pub overwrite: bool,
    pub format: TargetFormat,
}

impl Target {
    pub fn columns(&self) -> impl Iterator<Item = &Ident> {
        self.outputs.iter().map(|(_, column)| column)
    }

    /// True when each item's output is an object whose keys map to columns.
    pub fn is_object(&self) -> bool {
        self.outputs.iter().any(|(key, _)| key.is_some())
    }
}

/// How a local model's vector output is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetFormat {
    Text,
    JsonArray,
    F32Le,
}

/// The processor that turns items into outputs.
#[derive(Debug, Clone)]
pub enum Processor {
    Chat(ChatModel),
    Onnx(OnnxModel),
}

/// How the request asks for structured output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StructuredOutput {
    /// OpenAI `response_format: {type: "json_schema", strict: true}`.
    JsonSchema,
    /// llama.cpp `response_format: {type: "json_object", schema: ...}`.
    JsonObjectSchema,
    /// `response_format: {type: "json_object"}`.
    JsonObject,
    /// No `response_format`; the prompt alone asks for JSON.
    None,
}

/// Synchronous chat calls, or the provider's batch API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Sync,
    Batch,
}

/// How batch mode talks to the provider's batch API.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSettings {
    pub dialect: crate::provider::batch::Dialect,
    /// The first poll interval; it grows to [`BatchSettings::MAX_POLL`].
    pub poll: Duration,
    /// Smaller limits than the provider's, when the job sets them.
    pub limits: Option<crate::provider::batch::BatchLimits>,
}

impl BatchSettings {
    /// Polls back off to at most this interval.
    pub const MAX_POLL: Duration = Duration::from_secs(600);
}

/// When a chat job asks for streamed answers (`model.stream`). A streamed answer's first chunk
/// tells when the server's slot took the request up, so requests waiting in a self-hosted
/// server's queue are seen while they wait; the answer itself is the same.
/// The field of a chat request that caps its answer's tokens. OpenAI's reasoning models
/// (o-series, gpt-5) refuse `max_tokens`; its other models and Azure's take
/// `max_completion_tokens` too; most other servers know only `max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxTokensField {
    MaxTokens,
    MaxCompletionTokens,
}

impl MaxTokensField {
    pub fn name(self) -> &'static str {
        match self {
            MaxTokensField::MaxTokens => "max_tokens",
            MaxTokensField::MaxCompletionTokens => "max_completion_tokens",
        }
    }

    /// The field a job that does not name one sends to `base_url`: `max_completion_tokens` to
    /// OpenAI's and Azure OpenAI's hosts, `max_tokens` elsewhere.
    pub fn for_url(base_url: &str) -> MaxTokensField {
        let host = reqwest::Url::parse(base_url).ok().and_then(|u| u.host_str().map(str::to_ascii_lowercase)).unwrap_or_default();
        if host == "api.openai.com" || host.ends_with(".openai.azure.com") {
            MaxTokensField::MaxCompletionTokens
        } else {
            MaxTokensField::MaxTokens
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Streaming {
    /// Streamed against a server at a local or private address that says neither its slots
    /// nor its gauges before the run (Ollama, llama-cpp-python's server, a proxy hiding them);
    /// not again in the run once the provider announces rate limits, streams an answer without
    /// its token counts, or answers unstreamed a request it failed streamed before any streamed
    /// answer came whole.
    Auto,
    /// Every request streamed (a streamed answer without token counts is costed at its
    /// reservation).
    Always,
    Never,
}

/// An OpenAI-compatible chat model.
#[derive(Debug, Clone)]
pub struct ChatModel {
    pub base_url: String,
    pub api_key_env: String,
    /// The job names `model.api_key_env` itself: the variable must then hold a key.
    pub api_key_required: bool,
    pub name: String,
    pub fallback: Vec<String>,
    pub structured_output: StructuredOutput,
    pub mode: Mode,
    /// Whether answers are asked for as a stream (`model.stream`).
    pub stream: Streaming,
    pub batch: BatchSettings,
    pub max_output_tokens_per_item: u32,
    /// Output tokens an item's answer usually takes; `max_output_tokens_per_item` by default.
    pub expected_output_tokens_per_item: u32,
    pub temperature: Option<f64>,
    pub request_timeout: Duration,
    pub context_window: u32,
    /// The model's own cap on output tokens per call, when it has one.
    pub max_tokens: Option<u32>,
    /// The request field that carries the answer's token cap (`model.max_tokens_field`).
    pub max_tokens_field: MaxTokensField,
    /// tiktoken encoding used to count prompt tokens.
    pub encoding: String,
    /// A response body longer than this is a failed call (`model.max_response_bytes`).
    pub max_response_bytes: u64,
    pub template: String,
    pub system: Option<String>,
}

impl ChatModel {
    /// `model.max_response_bytes` when the job does not set it.
    pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 8 * 1024 * 1024;

    /// Model names in escalation order: the primary, then the fallbacks.
    pub fn tiers(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.name.as_str()).chain(self.fallback.iter().map(String::as_str))
    }

    /// The API key from the variable `model.api_key_env` names. When the job names that
    /// variable, it must be set and non-empty (exit 2 before any request); when the job names
    /// none, the default `OPENAI_API_KEY` may be unset and calls go without a key (local
    /// servers).
    pub fn api_key(&self) -> anyhow::Result<Option<crate::secret::ApiKey>> {
        match std::env::var(&self.api_key_env) {
            Ok(key) if !key.is_empty() => Ok(Some(crate::secret::ApiKey::new(key))),
            _ if self.api_key_required => Err(crate::exit::usage(format!(
                "`model.api_key_env` names {var}, which is not set (or empty): export {var} with the provider's \
                 API key, or remove `model.api_key_env` from the job to call a server that needs no key",
                var = self.api_key_env
            ))),
            _ => Ok(None),
        }
    }
}

/// A local ONNX model (`[model] kind = "onnx"`).
#[derive(Debug, Clone)]
pub struct OnnxModel {
    pub path: PathBuf,
    pub tokenizer: PathBuf,
    pub input: String,
    pub output: OnnxOutput,
    /// Embeddings: how token states become one vector.
    pub pooling: backfill_onnx::Pooling,
    pub max_length: u32,
    pub max_batch_tokens: u32,
    pub threads: u32,
    /// The linear layers' products in bf16 with f32 sums where the CPU has AVX512-BF16
    /// (`precision = "auto"`, the default); `false` (`"f32"`) keeps every product in f32.
    pub bf16_products: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnnxOutput {
    Embedding,
    Classification { labels: Vec<String> },
}

/// `[limits]`.
#[derive(Debug, Clone)]
pub struct Limits {
    pub requests_per_minute: Option<f64>,
    pub tokens_per_minute: Option<f64>,
    pub items_per_request: Bounds,
    pub concurrency: Bounds,
    pub max_attempts: u32,
    pub lease: Duration,
    pub grace: Duration,
    /// A finished run with a larger share of failed or rejected items exits 6.
    pub max_failed_share: f64,
    /// A provider asking to wait longer than this stops the run (`limits.max_retry_after_s`).
    pub max_retry_after: Duration,
    /// How long an unreachable provider is waited for before the run stops
    /// (`limits.outage_window_s`).
    pub outage_window: Duration,
}

/// A `{ start, min, max }` range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub start: u32,
    pub min: u32,
    pub max: u32,
}

/// `[cache]`: the response cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    pub enabled: bool,
    pub ttl: Duration,
}

/// The job name a trial of a job (`backfill trial`) records its run and ledger rows under:
/// `<job>:trial`, so the job's own runs never see it and the dry run can learn from it.
pub const TRIAL_SUFFIX: &str = ":trial";

pub fn trial_job(job: &str) -> String {
    format!("{job}{TRIAL_SUFFIX}")
}

impl Job {
    /// Reads and validates a job file.
    pub fn load(path: &Path, options: &LoadOptions) -> anyhow::Result<Job> {
        validate::load(path, options)
    }

    pub fn chat(&self) -> Option<&ChatModel> {
        match &self.processor {
            Processor::Chat(chat) => Some(chat),
            Processor::Onnx(_) => None,
        }
    }
}
