//! Adaptive throughput controller for LLM backfills.
//!
//! Hosted LLM APIs enforce token buckets on requests/min and tokens/min and answer overload
//! with an instant 429, so this controller controls the *rate* first: it paces requests and
//! tokens below the limits the provider announces (`x-ratelimit-*`, `anthropic-ratelimit-*`)
//! or, without headers, below the rate it found by probing up to the first 429. Concurrency
//! follows from the rate by Little's law; items per request grow while they raise items/s and
//! quality holds; `max_tokens` and the request timeout follow observed outputs and latencies.
//!
//! The controller is a pure unit: no clock, no I/O, no async. A dispatcher drives it:
//!
//! ```
//! use std::time::Duration;
//! use backfill_controller::*;
//!
//! let mut controller = Controller::new(ControllerConfig::with_defaults(), Duration::ZERO).unwrap();
//! let now = Duration::ZERO;
//! match controller.poll(now, PipelineLoad { in_flight: 0, queued_items: 100 }) {
//!     Decision::Send { items, max_tokens, .. } => {
//!         let shape = RequestShape { items, prompt_tokens: 900, max_tokens, retried_items: 0, streamed: false };
//!         let ticket = controller.on_sent(now, shape);
//!         // ... the request runs; when it ends:
//!         let completed = CompletedRequest {
//!             items_valid: items, prompt_tokens: 900, completion_tokens: 700,
//!             ..CompletedRequest::default()
//!         };
//!         let headers = parse_rate_limit_headers([("x-ratelimit-limit-requests", "600")]);
//!         let later = now + Duration::from_secs(3);
//!         controller.on_outcome(later, ticket, Observation::new(
//!             Duration::from_secs(3), Outcome::Completed(completed), headers));
//!     }
//!     Decision::Wait { .. } => unreachable!("a fresh controller sends"),
//! }
//! assert_eq!(controller.status().counts.requests_completed, 1);
//! ```
//!
//! `simulation` holds a simulated provider and dispatcher that drive the same code in
//! simulated time; the scenario tests and the benchmark use it.

mod batch_sizer;
mod concurrency_limit;
mod config;
mod controller;
#[cfg(test)]
mod controller_tests;
mod delay_limit;
mod end_of_queue;
mod first_chunks;
mod latency_window;
mod outcomes;
mod protocol;
mod rate_limit_headers;
mod rate_pacer;
mod rate_probe;
mod resume;
pub mod simulation;
mod status;
mod time_formats;
mod token_bucket;
mod token_estimates;

pub use batch_sizer::BatchSizer;
pub use config::{ConfigError, ControllerConfig, StartMinMax};
pub use controller::Controller;
pub use protocol::{
    CompletedRequest, Decision, Observation, Outcome, PipelineLoad, RequestShape, ServerQueue,
    Ticket,
};
pub use rate_limit_headers::{LimitWindow, RateLimitInfo, parse_rate_limit_headers};
pub use rate_pacer::RateDimension;
pub use rate_probe::ProbePhase;
pub use status::{ControllerCounts, ControllerState, ControllerStatus, DelayState};
pub use time_formats::{LONGEST as LONGEST_WAIT, seconds_to_duration};
pub use token_bucket::TokenBucket;
pub use token_estimates::{ENCLOSING_OBJECT_TOKENS, TokenEstimates};
