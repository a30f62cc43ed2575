//! `run --dry-run` of a local-model job: the pending items, the batches the runner would claim,
//! the model's forward passes and tokens — no cost, a local model costs time only — and the
//! time it would take, measured on a short sample of the pending rows. Nothing is written.

use futures_util::StreamExt;
use serde::Serialize;

use crate::exit::usage;
use crate::job::{Job, OnnxModel};
use crate::store::Tables;

/// Rows the model runs on to time the estimate (after one untimed pass that compiles plans).
const SAMPLE_ROWS: usize = 16;

/// Rows rendered and counted together (rounded to whole batches).
const CHUNK_ROWS: usize = 4096;

/// What `--dry-run` prints for a local-model job (`--json`: this object).
#[derive(Debug, Clone, Serialize)]
pub struct LocalEstimate {
    pub job: String,
    pub model: String,
    pub pending_items: u64,
    /// Batches the runner claims (`limits.items_per_request.start` items each).
    pub batches: u64,
    pub items_per_batch: u32,
    /// The model's forward passes (batches cut by `model.max_batch_tokens`).
    pub forward_passes: u64,
    /// Tokens after truncation at `model.max_length`, special tokens included.
    pub input_tokens: u64,
    /// Tokens computed, padding included.
    pub padded_tokens: u64,
    /// Rows truncated at `model.max_length`.
    pub truncated_items: u64,
    pub estimated_cost_usd: f64,
    /// From the sample's measured time per padded token.
    pub estimated_seconds: Option<f64>,
    pub sample_items: u64,
    pub threads: u32,
}

/// Counts over the pending rows, and the sample's timing: `(rows, seconds, padded tokens)`.
struct Planned {
    tokens: u64,
    padded: u64,
    passes: u64,
    truncated: u64,
    timed: Option<(u64, f64, u64)>,
}

pub async fn estimate(job: &Job, model: &OnnxModel, limit: Option<u64>) -> anyhow::Result<LocalEstimate> {
    // Loading the model takes seconds: do it while the rows are read.
    let owned = model.clone();
    let loading = tokio::spawn(async move { crate::local_model::load(&owned).await });
    let store = crate::store::open_read_only(&job.database).await?;
    let tables = Tables::from_job(job);
    let pending = store.inspect(&tables).await?.pending;
    let expected = limit.map_or(pending, |l| l.min(pending)) as usize;
    let processor = loading.await??;
    let per_batch = job.limits.items_per_request.start.max(1) as usize;
    let max_length = model.max_length as usize;
    // The rows stream in chunks of whole batches, rendered and counted one chunk at a time, so
    // memory holds one chunk whatever the table's size; the timing sample is a spread of the
    // rows, taken as they pass.
    let chunk = (CHUNK_ROWS / per_batch).max(1) * per_batch;
    let step = (expected / SAMPLE_ROWS).max(1);
    let mut rows = store.pending_rows(&tables, limit);
    let mut planned = Planned { tokens: 0, padded: 0, passes: 0, truncated: 0, timed: None };
    let mut sample: Vec<String> = Vec::new();
    let mut seen = 0usize;
    loop {
        let mut texts = Vec::with_capacity(chunk);
        while texts.len() < chunk {
            match rows.next().await {
                Some(row) => texts.push(crate::local_model::render(&model.input, &row?)),
                None => break,
            }
        }
        if texts.is_empty() {
            break;
        }
        for (i, text) in texts.iter().enumerate() {
            if (seen + i).is_multiple_of(step) && sample.len() < SAMPLE_ROWS {
                sample.push(text.clone());
            }
        }
        seen += texts.len();
        let counted = processor.clone();
        let (tokens, padded, passes, truncated) = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, u64, u64, u64)> {
            let (mut tokens, mut padded, mut passes, mut truncated) = (0u64, 0u64, 0u64, 0u64);
            for chunk in texts.chunks(per_batch) {
                let lengths = counted.token_counts(chunk).map_err(|e| usage(e.to_string()))?;
                tokens += lengths.iter().sum::<usize>() as u64;
                truncated += lengths.iter().filter(|&&n| n >= max_length).count() as u64;
                let plan = counted.plan_summary(chunk).map_err(|e| usage(e.to_string()))?;
                padded += plan.padded_tokens as u64;
                passes += plan.batches as u64;
            }
            Ok((tokens, padded, passes, truncated))
        })
        .await??;
        planned.tokens += tokens;
        planned.padded += padded;
        planned.passes += passes;
        planned.truncated += truncated;
    }
    drop(rows);
    let counted = processor.clone();
    planned.timed = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<(u64, f64, u64)>> {
        // A spread of the pending rows, run twice: the first pass compiles the plans.
        if sample.is_empty() {
            return Ok(None);
        }
        counted.process(&sample).map_err(|e| anyhow::anyhow!("the model failed on the sample: {e}"))?;
        let started = std::time::Instant::now();
        counted.process(&sample).map_err(|e| anyhow::anyhow!("the model failed on the sample: {e}"))?;
        let seconds = started.elapsed().as_secs_f64();
        let sample_padded = counted.plan_summary(&sample).map(|p| p.padded_tokens as u64).unwrap_or(0);
        Ok(Some((sample.len() as u64, seconds, sample_padded)))
    })
    .await??;
    let Planned { tokens: input_tokens, padded: padded_tokens, passes: forward_passes, truncated: truncated_items, timed } = planned;
    let estimated_seconds = timed.map(|(_, seconds, sample_padded)| seconds / sample_padded.max(1) as f64 * padded_tokens as f64);
    Ok(LocalEstimate {
        job: job.name.clone(),
        model: crate::local_model::ledger_name(model),
        pending_items: seen as u64,
        batches: seen.div_ceil(per_batch) as u64,
        items_per_batch: per_batch as u32,
        forward_passes,
        input_tokens,
        padded_tokens,
        truncated_items,
        estimated_cost_usd: 0.0,
        estimated_seconds,
        sample_items: timed.map_or(0, |(n, _, _)| n),
        threads: model.threads,
    })
}

impl LocalEstimate {
    pub fn human(&self) -> String {
        let mut out = format!(
            "dry run of {} on local model {}: nothing written\n  pending items: {}\n  batches: {} ({} items each), \
             {} forward passes\n  input tokens: {} ({} computed with padding; {} items truncated at model.max_length)\n  \
             cost: none (a local model costs compute time)\n",
            self.job,
            self.model,
            self.pending_items,
            self.batches,
            self.items_per_batch,
            self.forward_passes,
            self.input_tokens,
            self.padded_tokens,
            self.truncated_items,
        );
        match self.estimated_seconds {
            Some(s) => out.push_str(&format!(
                "  duration: about {} on {} threads (measured on {} pending items)",
                super::view::humanize(s),
                self.threads,
                self.sample_items
            )),
            None => out.push_str("  duration: nothing to do"),
        }
        out
    }
}
