//! The job file as written: the TOML shape, deserialised with unknown keys refused.
//!
//! Every key is documented in README.md ("Job file reference"). Validation beyond the shape
//! (identifiers, files, prices, ranges) happens in [`super::validate`].

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub name: String,
    pub source: SourceFile,
    pub target: TargetFile,
    pub prompt: Option<PromptFile>,
    pub model: ModelFile,
    /// Price files (relative to the job file) whose `[models.NAME]` tables supply prices.
    #[serde(default)]
    pub prices: Vec<String>,
    /// Prices per model, USD per million tokens; these override the price files.
    #[serde(default)]
    pub pricing: BTreeMap<String, PriceFile>,
    #[serde(default)]
    pub limits: LimitsFile,
    /// Post-processing rules (see `backfill_postprocess::PostprocessConfig`).
    pub postprocess: Option<backfill_postprocess::PostprocessConfig>,
    #[serde(default)]
    pub budget: BudgetFile,
    #[serde(default)]
    pub cache: CacheFile,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceFile {
    pub database: Option<String>,
    pub table: String,
    pub id: String,
    pub columns: Vec<String>,
    pub pending: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetFile {
    pub column: Option<String>,
    /// Output key → column, when the model returns an object per item.
    pub columns: Option<BTreeMap<String, String>>,
    /// Write even where the target already holds a value.
    #[serde(default)]
    pub overwrite: bool,
    /// Local-model jobs: "json" (array of floats) or "f32le" (BLOB / bytea).
    pub format: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptFile {
    pub system: Option<String>,
    pub template: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    #[serde(default = "default_kind")]
    pub kind: String,
    // chat
    pub base_url: Option<String>,
    pub structured_output: Option<String>,
    pub api_key_env: Option<String>,
    pub name: Option<String>,
    #[serde(default)]
    pub fallback: Vec<String>,
    pub mode: Option<String>,
    /// "auto" (stream answers from a server at a local or private address that shows nothing of
    /// its load), "always" or "never".
    pub stream: Option<String>,
    /// Batch mode: "openai" (Batch API) or "anthropic" (Message Batches).
    pub batch_api: Option<String>,
    /// Batch mode: seconds before the first poll of a submitted batch (it backs off from there).
    pub batch_poll_s: Option<f64>,
    /// Batch mode: at most this many requests per provider batch (default: the provider's limit).
    pub batch_max_requests: Option<u64>,
    /// Batch mode: at most this many MB of requests per provider batch.
    pub batch_max_mb: Option<f64>,
    pub max_output_tokens_per_item: Option<u32>,
    /// Output tokens one item's answer usually takes (dry-run estimates before any run).
    pub expected_output_tokens_per_item: Option<u32>,
    pub temperature: Option<f64>,
    pub request_timeout_s: Option<f64>,
    pub context_window: Option<u32>,
    pub max_tokens: Option<u32>,
    /// The request field that carries the answer's token cap: "max_tokens" or
    /// "max_completion_tokens" (default: the latter for OpenAI's and Azure's hosts).
    pub max_tokens_field: Option<String>,
    pub encoding: Option<String>,
    /// The largest response body accepted, in bytes (default 8 MiB).
    pub max_response_bytes: Option<u64>,
    // onnx
    pub path: Option<String>,
    pub tokenizer: Option<String>,
    pub input: Option<String>,
    pub output: Option<String>,
    pub labels: Option<Vec<String>>,
    pub pooling: Option<String>,
    pub max_length: Option<u32>,
    pub max_batch_tokens: Option<u32>,
    pub threads: Option<u32>,
    /// "auto" (the linear layers in bf16 where the CPU has AVX512-BF16) or "f32".
    pub precision: Option<String>,
}

fn default_kind() -> String {
    "chat".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriceFile {
    pub input: f64,
    pub output: f64,
    pub cached_input: Option<f64>,
    pub batch_input: Option<f64>,
    pub batch_output: Option<f64>,
    /// The tiktoken encoding that counts this model's tokens best (used unless the job sets
    /// `model.encoding`).
    pub encoding: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    pub requests_per_minute: Option<f64>,
    pub tokens_per_minute: Option<f64>,
    #[serde(default = "default_items")]
    pub items_per_request: RangeFile,
    #[serde(default = "default_concurrency")]
    pub concurrency: RangeFile,
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// How long a claimed item stays leased without a heartbeat.
    #[serde(default = "default_lease")]
    pub lease_seconds: f64,
    /// After SIGINT/SIGTERM, how long in-flight calls may finish.
    #[serde(default = "default_grace")]
    pub grace_seconds: f64,
    /// A run that ends with more than this share of its items failed or rejected exits 6.
    #[serde(default = "default_max_failed_share")]
    pub max_failed_share: f64,
    /// The longest wait a provider may ask for (`retry-after`, an exhausted limit's reset)
    /// before the run stops instead of waiting.
    #[serde(default = "default_max_retry_after")]
    pub max_retry_after_s: f64,
    /// How long the provider may stay unreachable (connection refused, no route) before the
    /// run stops; its items wait, attempts untouched. 0: stop at once.
    #[serde(default = "default_outage_window")]
    pub outage_window_s: f64,
}

impl Default for LimitsFile {
    fn default() -> Self {
        Self {
            requests_per_minute: None,
            tokens_per_minute: None,
            items_per_request: default_items(),
            concurrency: default_concurrency(),
            max_attempts: default_attempts(),
            lease_seconds: default_lease(),
            grace_seconds: default_grace(),
            max_failed_share: default_max_failed_share(),
            max_retry_after_s: default_max_retry_after(),
            outage_window_s: default_outage_window(),
        }
    }
}

/// `{ start, min, max }`, each of them optional: what is left out follows from the key's
/// defaults and what is given (`concurrency = { max = 2 }` is `{ start = 2, min = 1, max = 2 }`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RangeFile {
    pub start: Option<u32>,
    pub min: Option<u32>,
    pub max: Option<u32>,
}

/// The defaults of `limits.items_per_request` and `limits.concurrency`: `(start, min, max)`.
pub const DEFAULT_ITEMS: (u32, u32, u32) = (10, 1, 40);
pub const DEFAULT_CONCURRENCY: (u32, u32, u32) = (4, 1, 64);

impl RangeFile {
    /// `(start, min, max)`: the values given, the rest from `defaults` — a bound left out
    /// widened to take in the values given, a start left out held between the bounds.
    pub fn resolve(self, defaults: (u32, u32, u32)) -> (u32, u32, u32) {
        let (start, min, max) = defaults;
        let given_low = [self.min, self.start, self.max].into_iter().flatten().min();
        let given_high = [self.min, self.start, self.max].into_iter().flatten().max();
        let min = self.min.unwrap_or_else(|| given_low.map_or(min, |low| min.min(low)));
        let max = self.max.unwrap_or_else(|| given_high.map_or(max, |high| max.max(high)));
        let start = self.start.unwrap_or_else(|| start.clamp(min.min(max), max.max(min)));
        (start, min, max)
    }
}

fn default_items() -> RangeFile {
    RangeFile::default()
}
fn default_concurrency() -> RangeFile {
    RangeFile::default()
}
fn default_attempts() -> u32 {
    4
}
fn default_lease() -> f64 {
    60.0
}
fn default_max_retry_after() -> f64 {
    3600.0
}
fn default_outage_window() -> f64 {
    300.0
}
fn default_grace() -> f64 {
    30.0
}
fn default_max_failed_share() -> f64 {
    0.1
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetFile {
    pub max_usd: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_ttl")]
    pub ttl_hours: f64,
}

impl Default for CacheFile {
    fn default() -> Self {
        Self { enabled: true, ttl_hours: default_ttl() }
    }
}

fn default_true() -> bool {
    true
}
fn default_ttl() -> f64 {
    24.0 * 7.0
}
