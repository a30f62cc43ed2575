//! The types a dispatcher exchanges with the controller: what it asks (`poll`), what it tells
//! when it sends (`on_sent`) and what it tells when a request ends (`on_outcome`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::rate_limit_headers::RateLimitInfo;

/// What the dispatcher knows about its pipeline when it asks for the next decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineLoad {
    /// Requests sent and not yet ended.
    pub in_flight: usize,
    /// Items waiting to be sent (retries included); `usize::MAX` when unknown.
    pub queued_items: usize,
}

/// The controller's answer to `poll`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Build one request now with up to `items` items, ask for at most `max_tokens` output
    /// tokens, cut it after `timeout`, then call `on_sent` before polling again.
    Send {
        items: u32,
        max_tokens: u32,
        timeout: Duration,
    },
    /// Send nothing now; poll again at `until`, or when a request ends (or work arrives)
    /// if `until` is `None`.
    Wait { until: Option<Duration> },
}

/// The request actually built after a `Send` (it may hold fewer items than offered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestShape {
    pub items: u32,
    /// Prompt tokens counted by the tokenizer.
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    /// How many of the items were attempted before (for the retry count).
    pub retried_items: u32,
    /// Sent asking for a streamed answer: its first chunk will be told (`on_first_chunk`).
    /// Only such requests are read as running or waiting from their first chunks.
    #[serde(default)]
    pub streamed: bool,
}

/// What a self-hosted server's own gauges say of its load at one moment (vLLM's
/// `vllm:num_requests_running` and `vllm:num_requests_waiting`, llama.cpp's
/// `llamacpp:requests_processing` and `llamacpp:requests_deferred`, TGI's
/// `tgi_batch_current_size` and `tgi_queue_size`), everyone's requests counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerQueue {
    /// Requests the server is working on.
    pub running: u32,
    /// Requests waiting in its queue for a slot.
    pub waiting: u32,
}

/// Identifies one in-flight request between `on_sent` and `on_outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// How a completed (HTTP 2xx, parsed) request went, item by item.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletedRequest {
    /// Items returned that passed validation and post-processing.
    pub items_valid: u32,
    /// Items absent from the answer (including those lost to truncation).
    pub items_missing: u32,
    /// Items returned but rejected by post-processing.
    pub items_rejected: u32,
    /// The answer stopped at `max_tokens` (`finish_reason = "length"`).
    pub truncated: bool,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// How long the server says it worked on the request, its own queue not included
    /// (llama.cpp's `timings`; some hosted APIs' `time_info` or `usage` times); `None` when
    /// it does not say. Latency beyond it (and the network's share) is time spent queued.
    #[serde(default)]
    pub server_time: Option<Duration>,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Completed(CompletedRequest),
    /// HTTP 429. The wait asked for is in `Observation::rate_limits.retry_after`.
    RateLimited,
    /// Cut by the timeout the dispatcher was given.
    TimedOut,
    /// HTTP 5xx (503 overloaded, 500, 502, 504, 529 ...).
    ServerError {
        status: u16,
    },
    /// Anything else (connection reset, unparsable body); counted, not acted on.
    OtherError,
}

/// Everything measured about one ended request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// From sending to the end (to the cut, for a timeout).
    pub latency: Duration,
    pub outcome: Outcome,
    /// Parsed with `parse_rate_limit_headers`; empty when the provider sent none.
    pub rate_limits: RateLimitInfo,
}

impl Observation {
    pub fn new(latency: Duration, outcome: Outcome, rate_limits: RateLimitInfo) -> Self {
        Self {
            latency,
            outcome,
            rate_limits,
        }
    }
}
