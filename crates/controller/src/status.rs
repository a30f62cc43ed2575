//! What the controller shows (`ControllerStatus`, for the progress bar and the `--json`
//! summary) and what it keeps across runs (`ControllerState`, for `run --resume`).

use serde::{Deserialize, Serialize};

use crate::batch_sizer::BatchSizer;
use crate::rate_probe::ProbePhase;
use crate::token_estimates::TokenEstimates;

/// Running counts since the controller was created (or restored, counts included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerCounts {
    pub requests_sent: u64,
    pub requests_completed: u64,
    /// Answers with HTTP 429.
    pub rate_limited: u64,
    pub timed_out: u64,
    pub server_errors: u64,
    pub other_errors: u64,
    /// Items sent again after an earlier attempt.
    pub retried_items: u64,
    pub items_sent: u64,
    pub items_valid: u64,
    pub items_missing: u64,
    pub items_rejected: u64,
    pub truncated_requests: u64,
    /// Multiplicative rate cuts (one per congestion event, not one per 429).
    pub rate_cuts: u64,
    /// Concurrency cuts after 503s or clustered timeouts.
    pub concurrency_cuts: u64,
    /// The most requests in flight at once.
    #[serde(default)]
    pub max_in_flight: u64,
    /// Requests cut at the end of the queue and their items sent again (a hedge: a server
    /// that queues still computes the cut request).
    #[serde(default)]
    pub hedged_requests: u64,
    #[serde(default)]
    pub hedged_items: u64,
    /// Answers that said how long the server worked on them (its queue then shows directly).
    #[serde(default)]
    pub server_timed: u64,
    /// Answers streamed with their first chunk told apart from their end (`on_first_chunk`):
    /// on a server that shows nothing else, its queue is read from them.
    #[serde(default)]
    pub first_chunk_answers: u64,
}

/// A point-in-time view for people and the run summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControllerStatus {
    /// Paced requests per second (all limits applied to the current request shape).
    pub requests_per_second: f64,
    /// Paced tokens per second, if tokens are limited.
    pub tokens_per_second: Option<f64>,
    pub concurrency_limit: u32,
    /// The delay limit's settled level: the requests in flight that the server turns into
    /// throughput, as measured so far.
    /// `None` when the provider announces rate limits (the delay limit does not apply).
    pub delay_limit: Option<u32>,
    pub items_per_request: u32,
    pub max_tokens: u32,
    pub timeout_seconds: f64,
    /// The request rate is being probed (no header announces it).
    pub probing: bool,
    pub probe_phase: ProbePhase,
    /// Seconds left of a `Retry-After` pause (0 when not paused).
    pub paused_seconds: f64,
    pub latency_p50_seconds: Option<f64>,
    pub latency_p90_seconds: Option<f64>,
    /// Smallest items-per-request found past the quality knee, if any.
    pub quality_knee: Option<u32>,
    /// The requests the server works on at once, when it said so before the run
    /// (`ControllerConfig::server_slots`) or its gauges (`Controller::on_server_queue`) or our
    /// streamed requests' first chunks (`Controller::on_first_chunk`) showed them running while
    /// requests waited.
    #[serde(default)]
    pub server_slots: Option<u32>,
    pub counts: ControllerCounts,
}

/// Everything learned that is worth keeping for `run --resume`. Times are not kept: a new
/// run has a new epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControllerState {
    /// Format version of this struct.
    pub version: u32,
    /// Limits the provider announced, per minute: requests, tokens, input, output tokens.
    pub announced_per_minute: [Option<f64>; 4],
    /// The probed request rate per second, when no header announced the request limit.
    pub probed_requests_per_second: Option<f64>,
    /// The concurrency overload cap, when 503s or timeouts had set one.
    pub overload_cap: Option<f64>,
    pub latency_p90_seconds: Option<f64>,
    pub batch: BatchSizer,
    pub tokens: TokenEstimates,
    pub counts: ControllerCounts,
    /// The level of requests in flight found on a server that queues (absent from states
    /// saved before it was kept, and when the provider announced rate limits).
    #[serde(default)]
    pub delay: Option<DelayState>,
    /// The server and the model the state was measured on, as the caller names them
    /// (`snapshot` leaves them empty): a level found on one says nothing of another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// What the delay limit found: the level it settled on, whether a probe had failed (the best
/// level lies between two measured ones; without that it was still doubling), and the slots
/// the server said before the run it was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelayState {
    pub settled: u32,
    pub bracketed: bool,
    #[serde(default)]
    pub slots: Option<u32>,
}

pub const STATE_VERSION: u32 = 1;
