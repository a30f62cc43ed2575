//! The end-of-run summary: one JSON object for `--json`, a few lines for people.

use serde::Serialize;

use crate::store::{ItemCounts, StatusReport};

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_id: i64,
    pub job: String,
    /// finished | interrupted | budget | failed | running
    pub status: String,
    pub items: ItemsSummary,
    /// Calls made in the run (all invocations), by the ledger.
    pub requests: u64,
    pub tokens: TokensSummary,
    /// Settled spend of the run in USD (all invocations).
    pub cost_usd: f64,
    pub cost_by_model: std::collections::BTreeMap<String, f64>,
    /// Estimates of calls that may have been billed without an answer (timeouts, crashes).
    pub possibly_billed_usd: f64,
    pub budget_usd: Option<f64>,
    /// This invocation's wall time and throughput.
    pub elapsed_seconds: f64,
    pub items_per_second: f64,
    pub controller: ControllerSummary,
    /// Answers whose reported usage or cost could not be true: each is costed at its
    /// reservation and flagged in the ledger (`backfill_calls.usage_flag`).
    pub usage_distrusted: u64,
    /// Nearly-right answers repaired before validation (`backfill_calls.repair` says how).
    pub answers_repaired: u64,
    /// Local-model runs: seconds the model computed in this invocation (its ledger rows cost
    /// nothing; time is what they take).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ItemsSummary {
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    pub rejected: u64,
    pub pending: u64,
}

impl From<ItemCounts> for ItemsSummary {
    fn from(c: ItemCounts) -> Self {
        ItemsSummary { total: c.total(), done: c.done, failed: c.failed, rejected: c.rejected, pending: c.open() }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TokensSummary {
    pub input: u64,
    pub output: u64,
    pub cached: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ControllerSummary {
    pub items_per_request: u32,
    pub concurrency: u32,
    pub requests_per_second: f64,
    pub requests: u64,
    pub rate_limited: u64,
    pub timeouts: u64,
    pub retries: u64,
}

impl Summary {
    pub fn from_report(report: &StatusReport, elapsed_seconds: f64, finished_here: u64, controller: ControllerSummary, error: Option<String>) -> Self {
        let tokens = TokensSummary {
            input: report.models.iter().map(|m| m.prompt_tokens).sum(),
            output: report.models.iter().map(|m| m.completion_tokens).sum(),
            cached: report.models.iter().map(|m| m.cached_tokens).sum(),
        };
        Summary {
            run_id: report.run.id,
            job: report.run.job.clone(),
            status: report.run.status.as_str().into(),
            items: report.counts.into(),
            requests: report.calls.total,
            tokens,
            cost_usd: report.spend.spent.usd(),
            cost_by_model: report.models.iter().map(|m| (m.model.clone(), m.cost.usd())).collect(),
            possibly_billed_usd: report.spend.lost.usd(),
            budget_usd: report.run.max_usd,
            elapsed_seconds,
            items_per_second: finished_here as f64 / elapsed_seconds.max(0.001),
            controller,
            usage_distrusted: report.calls.usage_distrusted,
            answers_repaired: report.calls.answers_repaired,
            compute_seconds: None,
            error,
        }
    }

    /// The lines printed to stderr at the end of a run.
    pub fn human(&self) -> String {
        let mut out = format!(
            "run {} of {}: {}\n  items: {} done, {} failed, {} rejected, {} pending (of {})\n  \
             calls: {}, tokens in {} / out {}, cost ${:.4}",
            self.run_id,
            self.job,
            self.status,
            self.items.done,
            self.items.failed,
            self.items.rejected,
            self.items.pending,
            self.items.total,
            self.requests,
            self.tokens.input,
            self.tokens.output,
            self.cost_usd,
        );
        if self.possibly_billed_usd > 0.0 {
            out.push_str(&format!(" (+ up to ${:.4} possibly billed)", self.possibly_billed_usd));
        }
        if let Some(cap) = self.budget_usd {
            out.push_str(&format!(" of ${cap:.2} cap"));
        }
        out.push_str(&format!(
            "\n  this run: {:.1}s, {:.2} items/s; {} items/request, concurrency {}, {} × 429, {} retries",
            self.elapsed_seconds,
            self.items_per_second,
            self.controller.items_per_request,
            self.controller.concurrency,
            self.controller.rate_limited,
            self.controller.retries
        ));
        if self.answers_repaired > 0 {
            out.push_str(&format!("\n  {} answers repaired before validation (see backfill_calls.repair)", self.answers_repaired));
        }
        if self.usage_distrusted > 0 {
            out.push_str(&format!(
                "\n  {} answers with impossible usage or cost, costed at their reservations (see backfill_calls.usage_flag)",
                self.usage_distrusted
            ));
        }
        if let Some(compute) = self.compute_seconds {
            out.push_str(&format!(
                "\n  local model: {compute:.1}s computing, {:.1} ms/item",
                compute * 1000.0 / (self.items_per_second * self.elapsed_seconds).max(1.0)
            ));
        }
        if let Some(error) = &self.error {
            out.push_str(&format!("\n  stopped: {error}"));
        }
        out
    }
}
