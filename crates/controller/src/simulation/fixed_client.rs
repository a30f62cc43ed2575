//! A baseline for servers that queue: a client told the server's true slot count, keeping
//! exactly that many requests of a fixed size in flight, with the job's timeout. Nothing
//! adaptive can beat it by much on such a server; the scenario tests measure the controller
//! against it in the same simulated run.

use std::time::Duration;

use crate::config::ControllerConfig;
use crate::protocol::{Decision, Observation, PipelineLoad, RequestShape, Ticket};
use crate::simulation::DispatchPolicy;

/// Items per request of the baseline (within the job's range).
pub const FIXED_CLIENT_ITEMS: u32 = 20;

#[derive(Debug)]
pub struct FixedClient {
    concurrency: u32,
    items: u32,
    output_tokens_per_item: u32,
    timeout: Duration,
    next_ticket: u64,
}

impl FixedClient {
    /// `concurrency` requests of `FIXED_CLIENT_ITEMS` items (clamped to the job's range).
    pub fn new(config: &ControllerConfig, concurrency: u32) -> Self {
        Self::with_items(config, concurrency, FIXED_CLIENT_ITEMS)
    }

    /// `concurrency` requests of `items` items (clamped to the job's range).
    pub fn with_items(config: &ControllerConfig, concurrency: u32, items: u32) -> Self {
        Self {
            concurrency: concurrency.max(1),
            items: config.items_per_request.clamp(items),
            output_tokens_per_item: config.initial_output_tokens_per_item,
            timeout: config.request_timeout,
            next_ticket: 0,
        }
    }
}

impl DispatchPolicy for FixedClient {
    fn name(&self) -> &str {
        "fixed client"
    }

    fn poll(&mut self, _now: Duration, load: PipelineLoad) -> Decision {
        if load.queued_items > 0 && load.in_flight < self.concurrency as usize {
            return Decision::Send {
                items: self.items,
                max_tokens: self.items * self.output_tokens_per_item,
                timeout: self.timeout,
            };
        }
        Decision::Wait { until: None }
    }

    fn on_sent(&mut self, _now: Duration, _shape: RequestShape) -> Ticket {
        self.next_ticket += 1;
        Ticket(self.next_ticket)
    }

    fn on_outcome(&mut self, _now: Duration, _ticket: Ticket, _observation: Observation) {}

    fn items_per_request(&self) -> u32 {
        self.items
    }
}
