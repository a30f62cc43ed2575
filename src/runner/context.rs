//! Everything a run's tasks share, built once from the job.

use std::sync::Arc;
use std::time::Duration;

use crate::job::{CacheSettings, ChatModel, Job, Limits};
use crate::pipeline::pack::Packer;
use crate::pipeline::postprocess::OutputCheck;
use crate::pricing::{ModelPrice, Picos, Tier};
use crate::provider::{ChatClient, ChatRequest, GaugeReading, ServerProps, request_body, response_format};
use crate::store::{Claimed, Store, Tables, Worker};
use crate::pipeline::answers::{ItemOutput, OutputShape};

use super::policy::RetryPolicy;
use super::sync::{Request, SentAs};

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
    /// The price column synchronous calls are billed at.
    pub price_column: Tier,
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
    /// What the server announced of itself before the run (its slots), if anything.
    pub server: Option<ServerProps>,
    /// The server's gauges of requests running and waiting, as first read before the run,
    /// when it shows them: the dispatcher reads them on through the run.
    pub gauges: Option<GaugeReading>,
    /// What answers reporting far fewer prompt tokens than counted have shown so far, per
    /// model (a fallback model has its own context).
    pub cut_prompts: std::sync::Mutex<std::collections::HashMap<String, crate::runner::sync::cut_prompts::CutPrompts>>,
}

/// A request packed from claimed items.
pub struct Packed {
    pub request: Request,
    /// What its body says (a provider batch writes it into its own line format).
    pub chat: ChatRequest,
    /// The claimed items that did not fit, still leased.
    pub rest: Vec<Claimed>,
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
            price_column: Tier::Sync,
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
            server: None,
            gauges: None,
            cut_prompts: Default::default(),
        }
    }

    /// The model of a tier (0 = `model.name`, k = `model.fallback[k-1]`).
    pub fn model(&self, tier: u32) -> &str {
        self.chat.tiers().nth(tier as usize).unwrap_or(&self.chat.name)
    }

    /// The price of a step of the fallback chain, as [`RunContext::model`] names its model.
    pub fn price(&self, fallback: u32) -> ModelPrice {
        self.prices.get(fallback as usize).copied().unwrap_or(ModelPrice::FREE)
    }

    /// Packs the longest prefix of `claimed` (all at one step of the fallback chain) that fits
    /// into one request; the items left out come back in `rest`, still leased.
    pub fn pack(&self, mut claimed: Vec<Claimed>, output_tokens_per_item: f64, price_column: Tier) -> Packed {
        let fallback = claimed[0].tier;
        let model = self.model(fallback).to_owned();
        let rows: Vec<_> = claimed.iter().map(|c| c.item.clone()).collect();
        let packed = self.packer.pack(&rows, output_tokens_per_item);
        let rest = if packed.items < claimed.len() { claimed.split_off(packed.items) } else { Vec::new() };
        let ids: Vec<String> = claimed.iter().map(|c| c.item.id.clone()).collect();
        let format = response_format(self.chat.structured_output, &ids, &self.shape);
        let chat = ChatRequest::new(&model, packed.system.as_deref(), packed.user, self.chat.temperature, packed.max_tokens, format)
            .with_max_tokens_field(self.chat.max_tokens_field);
        let (body, hash) = request_body(&chat);
        let request = Request {
            claimed,
            fallback,
            model,
            body,
            hash,
            prompt_tokens: packed.prompt_tokens,
            max_tokens: packed.max_tokens,
            timeout: Duration::ZERO,
            price_column,
            resends: 0,
            sent_as: SentAs::NotSent,
        };
        Packed { request, chat, rest }
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
