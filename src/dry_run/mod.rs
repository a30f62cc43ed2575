//! `run --dry-run`: what a run would send and cost, with no request and no write. It reuses the
//! pure parts of a run — the packer, the token counter, the prices — over the pending rows, read
//! through a read-only connection.
//!
//! Input tokens are counted on the rendered prompts. Output tokens are the answers' JSON
//! structure (counted) plus `model.expected_output_tokens_per_item` per item — or, once earlier
//! runs of the job exist, the output tokens per item they measured (JSON included).

pub mod local;
mod plan;
mod view;

use std::collections::BTreeMap;

use serde::Serialize;

pub use local::LocalEstimate;
pub use plan::{AnswerShape, Planned, plan};

use crate::exit::usage;
use crate::job::{Job, Mode};
use crate::pipeline::pack::Packer;
use crate::pricing::{ModelPrice, Tier, Usage};
use crate::store::Tables;
use crate::tokens::TokenCounter;

/// What `--dry-run` prints (`--json`: this object).
#[derive(Debug, Clone, Serialize)]
pub struct Estimate {
    pub job: String,
    pub model: String,
    /// "sync" or "batch": the price column `estimated_cost_usd` uses.
    pub mode: String,
    pub pending_items: u64,
    pub requests: u64,
    /// Items per request assumed: the controller's starting point.
    pub items_per_request: u32,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Output tokens per item used, JSON structure included.
    pub output_tokens_per_item: f64,
    /// True when `output_tokens_per_item` was measured on earlier runs of the job.
    pub calibrated: bool,
    pub estimated_cost_usd: f64,
    /// The same requests at synchronous prices.
    pub sync_cost_usd: f64,
    /// The same requests at the provider's batch-API prices, when the price table has them.
    pub batch_cost_usd: Option<f64>,
    pub cost_by_model: BTreeMap<String, f64>,
    /// Where the model's price came from.
    pub prices: String,
    /// How long the job's rate limits make the run take at the least; `None` without limits.
    pub estimated_seconds: Option<f64>,
    /// Which limit sets `estimated_seconds`: "requests_per_minute" or "tokens_per_minute".
    pub limited_by: Option<String>,
}

pub async fn estimate(job: &Job, limit: Option<u64>) -> anyhow::Result<Estimate> {
    let chat = job
        .chat()
        .ok_or_else(|| usage("--dry-run estimates chat jobs; local-model jobs cost compute time only"))?;
    let started = std::time::Instant::now();
    // Loading the encoding takes a moment: do it while the rows are read.
    let encoding = chat.encoding.clone();
    let loading = tokio::task::spawn_blocking(move || TokenCounter::new(&encoding));
    let store = crate::store::open_read_only(&job.database).await?;
    let tables = Tables::from_job(job);
    store.inspect(&tables).await?;
    let rows = store.pending_rows(&tables, limit).await?;
    let read = started.elapsed();
    let measured = if store.runner_tables_exist().await? { store.output_tokens_per_item(&job.name, &chat.name).await? } else { None };

    let counter = loading.await??;
    let packer = Packer::new(&chat.template, chat.system.clone(), counter, chat.context_window, chat.max_tokens);
    let shape = if job.target.is_object() {
        AnswerShape::Object(job.target.outputs.iter().filter_map(|(k, _)| k.clone()).collect())
    } else {
        AnswerShape::Text
    };
    let items_per_request = job.limits.items_per_request.start;
    // The packer sizes requests by the output budget the runner starts with.
    let budget_per_item = f64::from(chat.max_output_tokens_per_item);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8);
    let planned = tokio::task::spawn_blocking(move || {
        plan(&packer, counter, &shape, &rows, items_per_request as usize, budget_per_item, threads)
    })
    .await?;
    tracing::debug!(
        rows = planned.items,
        read_s = read.as_secs_f64(),
        counted_s = (started.elapsed() - read).as_secs_f64(),
        threads,
        "dry run: pending rows read and their requests counted"
    );

    let (output_tokens, per_item) = match measured {
        Some(per_item) => ((per_item * planned.items as f64).round() as u64, per_item),
        None => {
            let text = u64::from(chat.expected_output_tokens_per_item) * planned.items;
            let total = planned.skeleton_tokens + text;
            (total, if planned.items > 0 { total as f64 / planned.items as f64 } else { 0.0 })
        }
    };
    let price = job.prices.get(&chat.name).copied().unwrap_or(ModelPrice::FREE);
    let usage = Usage { prompt_tokens: planned.prompt_tokens, completion_tokens: output_tokens, cached_tokens: 0 };
    let sync = price.cost(&usage, Tier::Sync);
    let batch = price.batch_known.then(|| price.cost(&usage, Tier::Batch));
    let chosen = match chat.mode {
        Mode::Batch => price.cost(&usage, Tier::Batch),
        Mode::Sync => sync,
    };
    let (estimated_seconds, limited_by) =
        rate_limited_seconds(planned.requests, planned.prompt_tokens + output_tokens, job.limits.requests_per_minute, job.limits.tokens_per_minute);
    Ok(Estimate {
        job: job.name.clone(),
        model: chat.name.clone(),
        mode: if chat.mode == Mode::Batch { "batch" } else { "sync" }.into(),
        pending_items: planned.items,
        requests: planned.requests,
        items_per_request,
        input_tokens: planned.prompt_tokens,
        output_tokens,
        output_tokens_per_item: per_item,
        calibrated: measured.is_some(),
        estimated_cost_usd: chosen.usd(),
        sync_cost_usd: sync.usd(),
        batch_cost_usd: batch.map(|b| b.usd()),
        cost_by_model: BTreeMap::from([(chat.name.clone(), chosen.usd())]),
        prices: job.prices.origin(&chat.name).map(|o| o.describe()).unwrap_or_else(|| "no price".into()),
        estimated_seconds,
        limited_by,
    })
}

/// The shortest time the requests and tokens take under the job's per-minute limits.
fn rate_limited_seconds(requests: u64, tokens: u64, rpm: Option<f64>, tpm: Option<f64>) -> (Option<f64>, Option<String>) {
    let by_requests = rpm.map(|rpm| requests as f64 / rpm * 60.0);
    let by_tokens = tpm.map(|tpm| tokens as f64 / tpm * 60.0);
    match (by_requests, by_tokens) {
        (Some(r), Some(t)) if t > r => (Some(t), Some("tokens_per_minute".into())),
        (Some(r), _) => (Some(r), Some("requests_per_minute".into())),
        (None, Some(t)) => (Some(t), Some("tokens_per_minute".into())),
        (None, None) => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tighter_limit_sets_the_duration() {
        assert_eq!(rate_limited_seconds(600, 1_000, Some(60.0), Some(1_000_000.0)), (Some(600.0), Some("requests_per_minute".into())));
        assert_eq!(rate_limited_seconds(10, 1_000_000, Some(60.0), Some(100_000.0)), (Some(600.0), Some("tokens_per_minute".into())));
        assert_eq!(rate_limited_seconds(10, 10, None, None), (None, None));
    }
}
