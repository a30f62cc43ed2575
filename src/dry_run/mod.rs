//! `run --dry-run`: what a run would send and cost, with no request and no write. It reuses the
//! pure parts of a run — the packer, the token counter, the prices — over the pending rows, read
//! through a read-only connection.
//!
//! Input tokens are counted on the rendered prompts. Output tokens are the answers' JSON
//! structure (counted) plus `model.expected_output_tokens_per_item` per item — or, once earlier
//! runs of the job exist, the output tokens per item they measured (JSON included).
//!
//! Calibration comes from the latest trial or run of the job and model (`calibrate.rs`):
//! output tokens per item, items per request and the pace it measured. Without one, the cost is
//! a range from the job's bounds (answers from empty to `max_output_tokens_per_item`). The
//! estimate is compared with the budget cap, and everything the run validates before it sends
//! (the API key variable, the post-processing rules and their lexicons) is validated here too.

mod calibrate;
pub mod local;
mod plan;
mod view;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;

use serde::Serialize;

pub use calibrate::Calibration;
pub use local::LocalEstimate;
pub use plan::{AnswerShape, Planned, plan};
pub use view::humanize;

use crate::exit::usage;
use crate::job::{Job, Mode};
use crate::pipeline::pack::Packer;
use crate::pricing::{ModelPrice, Tier, Usage};
use crate::store::Tables;
use crate::tokens::TokenCounter;

/// Rows counted together (rounded to whole requests): memory holds two such chunks, one read
/// while the other is counted.
const CHUNK_ROWS: usize = 8192;

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
    /// What the latest trial or run of the job and model measured, when there is one.
    pub calibration: Option<Calibration>,
    /// Without calibration: the cost at sync prices of answers from empty (the JSON structure
    /// alone) to `model.max_output_tokens_per_item` each; `estimated_cost_usd` then assumes
    /// `model.expected_output_tokens_per_item`, an assumption, not a measurement.
    pub cost_range_usd: Option<[f64; 2]>,
    /// The budget cap the run would have (`--max-usd` or `[budget] max_usd`).
    pub budget_usd: Option<f64>,
    /// The estimate is above the cap: the run would stop there (exit 3).
    pub over_budget: bool,
    /// The top of the range is above the cap: the run may stop there.
    pub may_pass_budget: bool,
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
    /// Which limit sets `estimated_seconds`: "requests_per_minute" or "tokens_per_minute" (the
    /// job's), "announced_requests_per_minute" or "announced_tokens_per_minute" (the provider's,
    /// to the latest run).
    pub limited_by: Option<String>,
    /// The duration at the pace the latest trial or run measured (`calibration.items_per_second`).
    pub measured_seconds: Option<f64>,
}

pub async fn estimate(job: &Job, limit: Option<u64>) -> anyhow::Result<Estimate> {
    let chat = job
        .chat()
        .ok_or_else(|| usage("--dry-run estimates chat jobs; local-model jobs cost compute time only"))?;
    // What the run refuses before it sends anything, the dry run refuses too (exit 2).
    chat.api_key()?;
    crate::pipeline::postprocess::build(job)?;
    let started = std::time::Instant::now();
    // Loading the encoding takes a moment: do it while the rows are read.
    let encoding = chat.encoding.clone();
    let loading = tokio::task::spawn_blocking(move || TokenCounter::new(&encoding));
    let store = crate::store::open_read_only(&job.database).await?;
    let tables = Tables::from_job(job);
    store.check(&tables).await?;
    let measured = if store.runner_tables_exist().await? {
        let trials = crate::job::trial_job(&job.name);
        store.latest_measure([job.name.as_str(), trials.as_str()], &chat.name).await?
    } else {
        None
    };
    let calibration = measured.as_ref().and_then(Calibration::from_measured);

    let counter = loading.await??;
    let packer = Arc::new(Packer::new(&chat.template, chat.system.clone(), counter, chat.context_window, chat.max_tokens));
    let shape = Arc::new(if job.target.is_object() {
        AnswerShape::Object(job.target.outputs.iter().filter_map(|(k, _)| k.clone()).collect())
    } else {
        AnswerShape::Text
    });
    // The request size the latest trial or run reached (its controller grows it), else the start.
    let bounds = job.limits.items_per_request;
    let items_per_request = match &calibration {
        Some(c) => (c.items_per_request.round() as u32).clamp(bounds.min.max(1), bounds.max.max(1)),
        None => bounds.start,
    };
    // The packer sizes requests by the output budget the runner starts with.
    let budget_per_item = f64::from(chat.max_output_tokens_per_item);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8);
    // The rows stream in chunks of whole requests: one chunk is counted on every core while the
    // next is read, so memory holds two chunks whatever the table's size.
    let per_request = items_per_request.max(1) as usize;
    let chunk = (CHUNK_ROWS / per_request).max(threads) * per_request;
    let mut rows = store.pending_rows(&tables, limit);
    let mut planned = Planned::default();
    let mut counting: Option<tokio::task::JoinHandle<Planned>> = None;
    let mut read = std::time::Duration::ZERO;
    loop {
        let reading = std::time::Instant::now();
        let mut part = Vec::with_capacity(chunk);
        while part.len() < chunk {
            match rows.next().await {
                Some(row) => part.push(row?),
                None => break,
            }
        }
        read += reading.elapsed();
        if let Some(previous) = counting.take() {
            planned += previous.await?;
        }
        if part.is_empty() {
            break;
        }
        let (packer, shape) = (packer.clone(), shape.clone());
        counting = Some(tokio::task::spawn_blocking(move || {
            plan(&packer, counter, &shape, &part, per_request, budget_per_item, threads)
        }));
    }
    drop(rows);
    tracing::debug!(
        rows = planned.items,
        read_s = read.as_secs_f64(),
        total_s = started.elapsed().as_secs_f64(),
        threads,
        "dry run: pending rows read and their requests counted"
    );

    let expected = |per_item_text: u64| planned.skeleton_tokens + per_item_text * planned.items;
    let (output_tokens, per_item) = match &calibration {
        Some(c) => ((c.output_tokens_per_item * planned.items as f64).round() as u64, c.output_tokens_per_item),
        None => {
            let total = expected(u64::from(chat.expected_output_tokens_per_item));
            (total, if planned.items > 0 { total as f64 / planned.items as f64 } else { 0.0 })
        }
    };
    let price = job.prices.get(&chat.name).copied().unwrap_or(ModelPrice::FREE);
    let tier = if chat.mode == Mode::Batch { Tier::Batch } else { Tier::Sync };
    let cost_of = |output_tokens: u64, tier: Tier| {
        price.cost(&Usage { prompt_tokens: planned.prompt_tokens, completion_tokens: output_tokens, cached_tokens: 0 }, tier)
    };
    let sync = cost_of(output_tokens, Tier::Sync);
    let batch = price.batch_known.then(|| cost_of(output_tokens, Tier::Batch));
    let chosen = cost_of(output_tokens, tier);
    let cost_range = calibration.is_none().then(|| {
        [cost_of(expected(0), tier).usd(), cost_of(expected(u64::from(chat.max_output_tokens_per_item)), tier).usd()]
    });
    let rpm = job.limits.requests_per_minute.map(|r| (r, "requests_per_minute"));
    let rpm = rpm.or(calibration.as_ref().and_then(|c| c.announced_requests_per_minute).map(|r| (r, "announced_requests_per_minute")));
    let tpm = job.limits.tokens_per_minute.map(|t| (t, "tokens_per_minute"));
    let tpm = tpm.or(calibration.as_ref().and_then(|c| c.announced_tokens_per_minute).map(|t| (t, "announced_tokens_per_minute")));
    let (estimated_seconds, limited_by) =
        rate_limited_seconds(planned.requests, planned.prompt_tokens + output_tokens, rpm.map(|r| r.0), tpm.map(|t| t.0));
    let limited_by = limited_by.map(|by| {
        let named = if by == "requests_per_minute" { rpm.map(|r| r.1) } else { tpm.map(|t| t.1) };
        named.map(str::to_owned).unwrap_or(by)
    });
    let measured_seconds = calibration.as_ref().and_then(|c| c.items_per_second).map(|rate| planned.items as f64 / rate);
    let budget = job.budget_usd;
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
        calibrated: calibration.is_some(),
        calibration,
        cost_range_usd: cost_range,
        budget_usd: budget,
        over_budget: budget.is_some_and(|cap| chosen.usd() > cap),
        may_pass_budget: budget.is_some_and(|cap| cost_range.map_or(chosen.usd(), |r| r[1]) > cap),
        estimated_cost_usd: chosen.usd(),
        sync_cost_usd: sync.usd(),
        batch_cost_usd: batch.map(|b| b.usd()),
        cost_by_model: BTreeMap::from([(chat.name.clone(), chosen.usd())]),
        prices: job.prices.origin(&chat.name).map(|o| o.describe()).unwrap_or_else(|| "no price".into()),
        estimated_seconds,
        limited_by,
        measured_seconds,
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
