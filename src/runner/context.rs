//! Everything a run's tasks share, built once from the job.

use std::sync::Arc;
use std::time::Duration;

use crate::job::{CacheSettings, ChatModel, Job, Limits};
use crate::packer::Packer;
use crate::pricing::{ModelPrice, Picos, Tier};
use crate::provider::ChatClient;
use crate::store::{Store, Tables, Worker};
use crate::validate::{ItemOutput, OutputShape};

use super::policy::RetryPolicy;

/// Checks (and may rewrite) one output text; `Err((reason, detail))` rejects it.
pub trait OutputCheck: Send + Sync {
    fn check(&self, text: &str) -> Result<(String, Option<serde_json::Value>), (String, String)>;
}

/// The shared, read-only state of one run in this process.
pub struct RunContext {
    pub store: Arc<dyn Store>,
    pub tables: Tables,
    pub run_id: i64,
    pub worker: Worker,
    pub chat: ChatModel,
    pub client: ChatClient,
    pub packer: Packer,
    pub shape: OutputShape,
    /// Prices of the primary model and the fallbacks, in tier order.
    pub prices: Vec<ModelPrice>,
    pub price_tier: Tier,
    pub policy: RetryPolicy,
    pub check: Option<Arc<dyn OutputCheck>>,
    pub cache: CacheSettings,
    pub cap: Option<Picos>,
    pub lease: Duration,
    pub grace: Duration,
    /// The job's `[limits]` (the shared rate bucket's caps).
    pub limits: Limits,
    /// `[limits] items_per_request.start`: the request size where no controller chooses one
    /// (batch mode).
    pub items_per_request: usize,
}

/// Post-processed values to write, `(output key, text)`, and the changes made (JSON).
pub type Checked = (Vec<(String, String)>, Option<String>);
/// Why post-processing refused an output: `(reason, detail)`.
pub type Refusal = (String, String);

impl RunContext {
    pub fn new(
        job: &Job,
        chat: &ChatModel,
        store: Arc<dyn Store>,
        run_id: i64,
        client: ChatClient,
        packer: Packer,
        check: Option<Arc<dyn OutputCheck>>,
    ) -> Self {
        let shape = if job.target.is_object() {
            OutputShape::Object(job.target.outputs.iter().filter_map(|(k, _)| k.clone()).collect())
        } else {
            OutputShape::Text
        };
        let prices = chat
            .tiers()
            .map(|model| job.prices.get(model).copied().unwrap_or(ModelPrice::FREE))
            .collect();
        RunContext {
            store,
            tables: Tables::from_job(job),
            run_id,
            worker: Worker::current(),
            chat: chat.clone(),
            client,
            packer,
            shape,
            prices,
            price_tier: Tier::Sync,
            policy: RetryPolicy {
                max_attempts: job.limits.max_attempts,
                tiers: chat.tiers().count() as u32,
                base_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(60),
            },
            check,
            cache: job.cache,
            cap: job.budget_usd.map(Picos::from_usd),
            lease: job.limits.lease,
            grace: job.limits.grace,
            limits: job.limits.clone(),
            items_per_request: job.limits.items_per_request.start.max(1) as usize,
        }
    }

    pub fn chat_items_per_request(&self) -> usize {
        self.items_per_request
    }

    /// The model of a tier (0 = `model.name`, k = `model.fallback[k-1]`).
    pub fn model(&self, tier: u32) -> &str {
        self.chat.tiers().nth(tier as usize).unwrap_or(&self.chat.name)
    }

    pub fn price(&self, tier: u32, _model: &str) -> ModelPrice {
        self.prices.get(tier as usize).copied().unwrap_or(ModelPrice::FREE)
    }

    /// Runs the post-processing rules over every text of an output: the values to write and
    /// the changes made, or the first rejection.
    pub fn check_output(&self, output: &ItemOutput) -> Result<Checked, Refusal> {
        check_output(self.check.as_deref(), output)
    }
}

/// Runs the post-processing rules (`None`: none) over every text of an output: the values to
/// write and the changes made, or the first rejection. A run and `backfill trial` judge
/// answers through this one function.
pub fn check_output(check: Option<&dyn OutputCheck>, output: &ItemOutput) -> Result<Checked, Refusal> {
    let Some(check) = check else {
        return Ok((output.iter().map(|(k, v)| (k.clone(), v.clone())).collect(), None));
    };
    let mut values = Vec::with_capacity(output.len());
    let mut changes = serde_json::Map::new();
    for (key, text) in output {
        let (final_text, change) = check.check(text)?;
        if let Some(change) = change {
            changes.insert(key.clone(), change);
        }
        values.push((key.clone(), final_text));
    }
    let changes = (!changes.is_empty()).then(|| serde_json::Value::Object(changes).to_string());
    Ok((values, changes))
}
