//! `run --dry-run`: what a run would send and cost, with no request and no write. It reuses the
//! pure parts of a run — the packer, the token counter, the prices — over the pending rows.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::exit::usage;
use crate::job::Job;
use crate::packer::Packer;
use crate::pricing::{Tier, Usage};
use crate::store::Tables;
use crate::tokens::TokenCounter;

/// Output tokens per item spent on JSON structure, added to the expected text length.
const JSON_OVERHEAD_PER_ITEM: f64 = 8.0;

#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub job: String,
    pub pending_items: u64,
    pub requests: u64,
    pub items_per_request: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Output tokens per item used: measured from earlier runs when there are any.
    pub output_tokens_per_item: f64,
    pub calibrated: bool,
    pub estimated_cost_usd: f64,
    pub cost_by_model: BTreeMap<String, f64>,
    /// What the job's rate limits allow; `None` without limits.
    pub estimated_seconds: Option<f64>,
}

pub async fn estimate(job: &Job, limit: Option<u64>, _resume: bool) -> anyhow::Result<Estimate> {
    let chat = job.chat().ok_or_else(|| usage("--dry-run estimates chat jobs; local-model jobs cost compute time only"))?;
    let store = crate::store::open(&job.database).await?;
    let tables = Tables::from_job(job);
    store.inspect(&tables).await?;
    let rows = store.pending_rows(&tables, limit).await?;
    let measured = if store.runner_tables_exist().await? { store.output_tokens_per_item(&job.name).await? } else { None };
    let per_item_text = measured.unwrap_or(f64::from(chat.max_output_tokens_per_item));
    let per_item = if measured.is_some() { per_item_text } else { per_item_text + JSON_OVERHEAD_PER_ITEM };

    let packer = Packer::new(&chat.template, chat.system.clone(), TokenCounter::new(&chat.encoding)?, chat.context_window, chat.max_tokens);
    let start = job.limits.items_per_request.start as usize;
    let (mut requests, mut input, mut output) = (0u64, 0u64, 0f64);
    let mut at = 0;
    while at < rows.len() {
        let end = (at + start).min(rows.len());
        let packed = packer.pack(&rows[at..end], f64::from(chat.max_output_tokens_per_item) + JSON_OVERHEAD_PER_ITEM);
        requests += 1;
        input += packed.prompt_tokens;
        output += per_item * packed.items as f64;
        at += packed.items;
    }
    let output = output.round() as u64;
    let price = job.prices.get(&chat.name).copied().unwrap_or(crate::pricing::ModelPrice::FREE);
    let tier = if chat.mode == crate::job::Mode::Batch { Tier::Batch } else { Tier::Sync };
    let cost = price.cost(&Usage { prompt_tokens: input, completion_tokens: output, cached_tokens: 0 }, tier);
    let by_requests = job.limits.requests_per_minute.map(|rpm| requests as f64 / rpm * 60.0);
    let by_tokens = job.limits.tokens_per_minute.map(|tpm| (input + output) as f64 / tpm * 60.0);
    let estimated_seconds = match (by_requests, by_tokens) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    Ok(Estimate {
        job: job.name.clone(),
        pending_items: rows.len() as u64,
        requests,
        items_per_request: start as u32,
        input_tokens: input,
        output_tokens: output,
        output_tokens_per_item: per_item,
        calibrated: measured.is_some(),
        estimated_cost_usd: cost.usd(),
        cost_by_model: BTreeMap::from([(chat.name.clone(), cost.usd())]),
        estimated_seconds,
    })
}

impl Estimate {
    pub fn human(&self) -> String {
        let duration = match self.estimated_seconds {
            Some(s) => format!("at least {} by the job's rate limits", humanize(s)),
            None => "unknown (no rate limits in the job)".into(),
        };
        format!(
            "dry run of {}: nothing sent, nothing written\n  pending items: {}\n  requests: {} ({} items per request)\n  \
             input tokens: {}\n  output tokens: {} ({:.0} per item, {})\n  estimated cost: ${:.4}\n  duration: {}",
            self.job,
            self.pending_items,
            self.requests,
            self.items_per_request,
            self.input_tokens,
            self.output_tokens,
            self.output_tokens_per_item,
            if self.calibrated { "measured on earlier runs" } else { "the job's max_output_tokens_per_item" },
            self.estimated_cost_usd,
            duration
        )
    }
}

fn humanize(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{seconds:.0}s")
    } else if seconds < 5400.0 {
        format!("{:.0} min", seconds / 60.0)
    } else {
        format!("{:.1} h", seconds / 3600.0)
    }
}
