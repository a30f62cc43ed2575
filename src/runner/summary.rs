//! The end-of-run summary: one JSON object for `--json`, a few lines for people.

use serde::Serialize;

use crate::exit::Exit;
use crate::store::{ItemCounts, StatusReport};

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub run_id: i64,
    pub job: String,
    /// finished | too_many_failures | interrupted | budget | failed | waiting | running
    /// (`too_many_failures`: finished, with more than `limits.max_failed_share` of the items
    /// failed or rejected; exit 6)
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

/// What the requests of this run did, measured, with the controller's last limits beside.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ControllerSummary {
    /// Requests sent by this process and their rate over its whole run.
    pub requests: u64,
    pub requests_per_second: f64,
    /// The paced rate at the end (`null` when nothing paced the requests).
    pub requests_per_second_limit: Option<f64>,
    /// The most requests in flight at once, and the concurrency limit at the end.
    pub max_in_flight: u64,
    pub concurrency_limit: u32,
    /// Items per request: the run's average, and the controller's setting at the end.
    pub items_per_request: f64,
    pub items_per_request_limit: u32,
    pub rate_limited: u64,
    /// Requests cut for taking too long (end-of-queue hedges not included).
    pub timeouts: u64,
    /// Requests cut at the end of the queue and their items sent again (a server still
    /// computes a cut request, so these items were computed twice).
    pub hedged_requests: u64,
    pub hedged_items: u64,
    /// Answers that said how long the server worked on them (llama.cpp's `timings`, TGI's
    /// `x-inference-time`, …): on a server that queues, its queue is read from them.
    pub server_timed_answers: u64,
    /// Answers streamed, their first chunk told as it came (`model.stream`): on a server that
    /// shows nothing else, the requests waiting in its queue are seen from them.
    pub first_chunk_answers: u64,
    /// The requests the server said it works on at once before the run (llama.cpp's
    /// `GET /props`), which the run started at within `[limits] concurrency`, or that its
    /// gauges (`GET /metrics`, `GET /v1/loads`) or the run's streamed answers showed running
    /// while requests waited; `null` when none said.
    pub server_slots: Option<u32>,
    /// Items sent again after a failed attempt (missing, invalid or rejected answers, errors,
    /// timeouts, hedges) or in a request re-sent after a 429.
    pub retries: u64,
}

impl Summary {
    pub fn from_report(
        report: &StatusReport,
        exit: Exit,
        elapsed_seconds: f64,
        finished_here: u64,
        controller: ControllerSummary,
        error: Option<String>,
    ) -> Self {
        let tokens = TokensSummary {
            input: report.models.iter().map(|m| m.prompt_tokens).sum(),
            output: report.models.iter().map(|m| m.completion_tokens).sum(),
            cached: report.models.iter().map(|m| m.cached_tokens).sum(),
        };
        Summary {
            run_id: report.run.id,
            job: report.run.job.clone(),
            status: if exit == Exit::Failures { "too_many_failures".into() } else { report.run.status.as_str().into() },
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
             {}, tokens in {} / out {}, cost ${:.4}",
            self.run_id,
            self.job,
            self.status,
            self.items.done,
            self.items.failed,
            self.items.rejected,
            self.items.pending,
            self.items.total,
            plural(self.requests, "call", "calls"),
            self.tokens.input,
            self.tokens.output,
            self.cost_usd,
        );
        if self.possibly_billed_usd > 0.0 {
            out.push_str(&format!(" (+ up to ${:.4} possibly billed)", self.possibly_billed_usd));
        }
        if let Some(cap) = self.budget_usd {
            out.push_str(&format!(" of {} cap", crate::pricing::format_usd_cap(cap)));
        }
        let c = &self.controller;
        out.push_str(&format!(
            "\n  this run: {:.1}s, {:.2} items/s; {} at {:.2}/s, up to {} in flight (limit {}), {:.1} items/request; {} × 429, {}, {} items sent again",
            self.elapsed_seconds,
            self.items_per_second,
            plural(c.requests, "request", "requests"),
            c.requests_per_second,
            c.max_in_flight,
            c.concurrency_limit,
            c.items_per_request,
            c.rate_limited,
            plural(c.timeouts, "timeout", "timeouts"),
            c.retries
        ));
        if c.hedged_requests > 0 {
            out.push_str(&format!(
                "; {} cut at the end of the queue ({} items sent twice)",
                plural(c.hedged_requests, "request", "requests"),
                c.hedged_items
            ));
        }
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

/// "1 request", "2 requests".
/// "1 request", "2 requests".
pub fn plural(count: u64, one: &str, many: &str) -> String {
    format!("{count} {}", if count == 1 { one } else { many })
}
