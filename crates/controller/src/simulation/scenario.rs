//! A scenario: a simulated provider, a workload, the job's limits and the expected ranges.
//! Scenario files are TOML (see `scenarios/`); this module also computes a scenario's
//! theoretical ceiling in items per second.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{ControllerConfig, StartMinMax};
use crate::simulation::fixed_client::{FIXED_CLIENT_ITEMS, FixedClient};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Items to process.
    pub items: u32,
    #[serde(default = "default_seed")]
    pub seed: u64,
    pub limits: JobLimits,
    pub provider: ProviderSpec,
    pub workload: WorkloadSpec,
    /// Items per request of the fixed client the scenario is measured against, when not
    /// `FIXED_CLIENT_ITEMS` (a server too slow for requests that large within the timeout).
    #[serde(default)]
    pub fixed_client_items: Option<u32>,
    #[serde(default)]
    pub expect: Expectations,
}

/// The job file's `[limits]` and the `[model]` keys the controller reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobLimits {
    pub requests_per_minute: Option<f64>,
    pub tokens_per_minute: Option<f64>,
    pub items_per_request: StartMinMax,
    pub concurrency: StartMinMax,
    pub max_output_tokens_per_item: u32,
    #[serde(default = "default_timeout")]
    pub request_timeout_s: f64,
    pub context_window: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSpec {
    pub requests_per_minute: Option<f64>,
    pub tokens_per_minute: Option<f64>,
    /// The provider's buckets hold this many seconds of their rate.
    #[serde(default = "default_burst")]
    pub burst_seconds: f64,
    /// Whether responses carry `x-ratelimit-*` headers.
    #[serde(default)]
    pub headers: bool,
    /// Requests the server works on at once; more wait in its queue.
    pub slots: Option<u32>,
    /// A request that would wait longer than this in the server's queue gets a 503.
    #[serde(default = "default_queue_wait")]
    pub queue_wait_limit_s: f64,
    /// Continuous batching: each other request in service makes a request this share slower.
    #[serde(default)]
    pub slowdown_per_request: f64,
    pub base_latency_s: f64,
    pub seconds_per_output_token: f64,
    /// Sigma of the log-normal factor on every latency (0: none).
    #[serde(default)]
    pub latency_sigma: f64,
    /// Share of admitted requests that never answer.
    #[serde(default)]
    pub hang_share: f64,
    /// How long a 429 or 503 takes to arrive.
    #[serde(default = "default_reject_latency")]
    pub reject_latency_s: f64,
    /// Whether the provider gives back, when a request completes, the part of `max_tokens`
    /// its answer did not use: it then counts prompt + completion tokens, fewer than the
    /// prompt + `max_tokens` it reserved at admission (and that the client counts).
    #[serde(default)]
    pub refunds_unused_tokens: bool,
    /// Whether answers say how long the server worked on each request, its queue not
    /// included (llama.cpp's `timings`).
    #[serde(default)]
    pub reports_service_time: bool,
    /// A server that warms up: the first request each slot serves takes this many times as
    /// long (an empty prompt cache, model pages read from disk; 1: none).
    #[serde(default = "default_cold_start")]
    pub cold_start_factor: f64,
    /// Whether the server says how many slots it has before the run (llama.cpp's
    /// `GET /props`, `total_slots`).
    #[serde(default)]
    pub announces_slots: bool,
    /// Whether the server shows its load in gauges the client reads every second (vLLM's,
    /// llama.cpp's, SGLang's and TGI's `GET /metrics`, SGLang's `GET /v1/loads`): requests
    /// running and requests waiting.
    #[serde(default)]
    pub queue_gauges: bool,
    /// Whether answers are streamed: the first chunk goes out once a slot took the request
    /// and prefilled its prompt (the base-latency part of its service time, slowed by the
    /// server's batching as the rest is), and the client tells the controller
    /// (`on_first_chunk`).
    #[serde(default)]
    pub streams: bool,
    /// A proxy in front of the streaming server that buffers the whole answer: the "first
    /// chunk" arrives with the end (only with `streams`).
    #[serde(default)]
    pub buffered_stream: bool,
    /// Capacity changes: from `at_s` on, both rate limits are `factor` times the base.
    #[serde(default)]
    pub capacity_steps: Vec<CapacityStep>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityStep {
    pub at_s: f64,
    pub factor: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub prompt_overhead_tokens: u32,
    pub input_tokens_per_item: u32,
    /// Items' input sizes vary uniformly by this share either side.
    #[serde(default)]
    pub input_tokens_spread: f64,
    pub output_tokens_per_item: f64,
    #[serde(default)]
    pub output_tokens_sd: f64,
    /// Per item, per attempt: left out of the answer.
    #[serde(default)]
    pub missing_share: f64,
    /// Per item, per attempt: rejected by post-processing.
    #[serde(default)]
    pub rejected_share: f64,
    /// Past this many items per request, items go missing more often...
    pub knee_items: Option<u32>,
    /// ...by this share per item past the knee.
    #[serde(default)]
    pub missing_share_per_item_past_knee: f64,
}

/// Expected ranges the scenario tests assert; all optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectations {
    /// Steady items/s over the ceiling, at least.
    pub min_steady_ratio: Option<f64>,
    /// Whole-run items/s (first send to last answer) over the ceiling, at least.
    pub min_whole_run_ratio: Option<f64>,
    /// 429 answers over requests sent, at most.
    pub max_rate_limited_share: Option<f64>,
    /// Whole-run duration over items ÷ steady items/s, at most.
    pub max_duration_ratio: Option<f64>,
    /// Seconds to reach 90% of the ceiling after the start or the last capacity step.
    pub max_converge_s: Option<f64>,
    /// Items per request at the end of the run, inclusive range.
    pub final_items_per_request: Option<[u32; 2]>,
    /// Steady items/s over the fixed rule's, at least.
    pub min_speedup_over_fixed_rule: Option<f64>,
    /// Whole-run items/s over a fixed client told the server's slots, at least.
    pub min_ratio_to_fixed_slots: Option<f64>,
    /// Mean wait in the server's queue over mean service time, at most.
    pub max_queue_wait_share: Option<f64>,
    /// Items the server computed for requests the client had given up on, over all items,
    /// at most.
    pub max_computed_twice_share: Option<f64>,
    /// Timeouts (requests cut for slowness, end-of-queue hedges excluded), at most.
    pub max_timeouts: Option<u64>,
}

fn default_seed() -> u64 {
    1
}
fn default_timeout() -> f64 {
    120.0
}
fn default_burst() -> f64 {
    3.0
}
fn default_cold_start() -> f64 {
    1.0
}

fn default_queue_wait() -> f64 {
    f64::INFINITY
}
fn default_reject_latency() -> f64 {
    0.05
}

/// Quality tolerance of the ceiling: sizes whose missing share exceeds the smallest size's by
/// more than this are not counted (they trade quality for speed).
const CEILING_QUALITY_TOLERANCE: f64 = 0.03;

impl Scenario {
    pub fn controller_config(&self) -> ControllerConfig {
        ControllerConfig {
            requests_per_minute: self.limits.requests_per_minute,
            tokens_per_minute: self.limits.tokens_per_minute,
            items_per_request: self.limits.items_per_request,
            concurrency: self.limits.concurrency,
            initial_output_tokens_per_item: self.limits.max_output_tokens_per_item,
            context_window_tokens: self.limits.context_window,
            request_timeout: Duration::from_secs_f64(self.limits.request_timeout_s),
            seed: self.seed,
            server_slots: self
                .provider
                .slots
                .filter(|_| self.provider.announces_slots),
        }
    }

    /// The fixed client this scenario's server is measured against: told the server's
    /// `slots`, with requests of `fixed_client_items` (`FIXED_CLIENT_ITEMS` unless set).
    pub fn fixed_client(&self, slots: u32) -> FixedClient {
        FixedClient::with_items(
            &self.controller_config(),
            slots,
            self.fixed_client_items.unwrap_or(FIXED_CLIENT_ITEMS),
        )
    }

    /// Capacity factor in force at `at_s` seconds.
    pub fn capacity_factor(&self, at_s: f64) -> f64 {
        self.provider
            .capacity_steps
            .iter()
            .filter(|step| step.at_s <= at_s)
            .map(|step| step.factor)
            .next_back()
            .unwrap_or(1.0)
    }

    /// Missing share per item at `items` items per request.
    pub fn missing_share(&self, items: u32) -> f64 {
        let past_knee = self
            .workload
            .knee_items
            .map_or(0, |knee| items.saturating_sub(knee));
        (self.workload.missing_share
            + self.workload.missing_share_per_item_past_knee * f64::from(past_knee))
        .min(1.0)
    }

    /// Mean latency of a request of `items` items, without queueing.
    pub fn mean_latency_s(&self, items: u32) -> f64 {
        let service = self.provider.base_latency_s
            + self.provider.seconds_per_output_token
                * f64::from(items)
                * self.workload.output_tokens_per_item;
        service * (self.provider.latency_sigma.powi(2) / 2.0).exp()
    }

    /// The tokens a request of `items` items takes against tokens/min when exactly its mean
    /// output is reserved: the prompt's fixed part, and each item's input and output.
    pub fn tokens_per_request(&self, items: u32) -> f64 {
        let workload = &self.workload;
        f64::from(workload.prompt_overhead_tokens)
            + f64::from(items)
                * (f64::from(workload.input_tokens_per_item) + workload.output_tokens_per_item)
    }

    /// The best valid items/s any sender could reach under capacity `factor`: the best size
    /// within the quality tolerance, each size limited by requests/min × size, tokens/min ÷
    /// tokens per item (reserving exactly the output), and slots or the job's concurrency
    /// × size ÷ latency; less the items that fail and must be sent again.
    pub fn ceiling_items_per_second(&self, factor: f64) -> f64 {
        let range = self.limits.items_per_request;
        let tolerated = self.missing_share(range.min) + CEILING_QUALITY_TOLERANCE;
        let workload = &self.workload;
        let slots = self
            .provider
            .slots
            .map(|slots| ((f64::from(slots) * factor).round() as u32).max(1));
        let concurrency = f64::from(slots.unwrap_or(u32::MAX).min(self.limits.concurrency.max));
        // Continuous batching slows each request by the others served with it.
        let slowdown = match slots {
            Some(_) => 1.0 + self.provider.slowdown_per_request * (concurrency - 1.0),
            None => 1.0,
        };
        let mut best: f64 = 0.0;
        for items in range.min..=range.max {
            if self.missing_share(items) > tolerated {
                continue;
            }
            let b = f64::from(items);
            let tokens_per_request = self.tokens_per_request(items);
            let mut requests_per_second = concurrency / (self.mean_latency_s(items) * slowdown);
            let limits = [
                (
                    self.provider.requests_per_minute.map(|rpm| rpm * factor),
                    1.0,
                ),
                (self.limits.requests_per_minute, 1.0),
                (
                    self.provider.tokens_per_minute.map(|tpm| tpm * factor),
                    tokens_per_request,
                ),
                (self.limits.tokens_per_minute, tokens_per_request),
            ];
            for (per_minute, cost) in limits {
                if let Some(per_minute) = per_minute {
                    requests_per_second = requests_per_second.min(per_minute / 60.0 / cost);
                }
            }
            let success = (1.0 - self.missing_share(items))
                * (1.0 - workload.rejected_share)
                * (1.0 - self.provider.hang_share);
            best = best.max(requests_per_second * b * success);
        }
        best
    }
}
