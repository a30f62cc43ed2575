//! Discrete-event simulation of a provider and a dispatcher, so the controller can be driven
//! in simulated time exactly as the tokio dispatcher drives it in real time. The scenario
//! tests and the benchmark share it; `FixedRule` is the rule the project started from, run on
//! the same simulated provider for comparison.

mod dispatcher;
mod fixed_client;
mod fixed_rule;
mod provider;
mod report;
mod scenario;

use std::time::Duration;

use crate::controller::Controller;
use crate::protocol::{Decision, Observation, PipelineLoad, RequestShape, ServerQueue, Ticket};
use crate::status::ControllerState;

pub use dispatcher::{RunLog, simulate};
pub use fixed_client::{FIXED_CLIENT_ITEMS, FixedClient};
pub use fixed_rule::FixedRule;
#[cfg(test)]
pub(crate) use provider::normal;
pub use provider::{FirstChunk, SimAnswer, SimulatedProvider, go_duration};
pub use report::{RunReport, evaluate};
pub use scenario::{CapacityStep, Expectations, JobLimits, ProviderSpec, Scenario, WorkloadSpec};

/// The poll / on_sent / on_outcome surface a dispatcher drives.
pub trait DispatchPolicy {
    fn name(&self) -> &str;
    fn poll(&mut self, now: Duration, load: PipelineLoad) -> Decision;
    fn on_sent(&mut self, now: Duration, shape: RequestShape) -> Ticket;
    fn on_outcome(&mut self, now: Duration, ticket: Ticket, observation: Observation);
    /// Requests to abandon now (reported back as timeouts); none by default.
    fn requests_to_cut(&mut self, _now: Duration, _load: PipelineLoad) -> Vec<Ticket> {
        Vec::new()
    }
    /// What the server's gauges say of its load (a server with `queue_gauges`); ignored by
    /// default.
    fn on_server_queue(&mut self, _now: Duration, _queue: ServerQueue) {}
    /// Request `ticket`'s first streamed chunk came (a server that `streams`); ignored by
    /// default.
    fn on_first_chunk(&mut self, _now: Duration, _ticket: Ticket) {}
    /// Items per request the policy would use now.
    fn items_per_request(&self) -> u32;
}

impl DispatchPolicy for Controller {
    fn name(&self) -> &str {
        "adaptive"
    }
    fn poll(&mut self, now: Duration, load: PipelineLoad) -> Decision {
        Controller::poll(self, now, load)
    }
    fn on_sent(&mut self, now: Duration, shape: RequestShape) -> Ticket {
        Controller::on_sent(self, now, shape)
    }
    fn on_outcome(&mut self, now: Duration, ticket: Ticket, observation: Observation) {
        Controller::on_outcome(self, now, ticket, observation)
    }
    fn requests_to_cut(&mut self, now: Duration, load: PipelineLoad) -> Vec<Ticket> {
        Controller::requests_to_cut(self, now, load)
    }
    fn on_server_queue(&mut self, now: Duration, queue: ServerQueue) {
        Controller::on_server_queue(self, now, queue)
    }
    fn on_first_chunk(&mut self, now: Duration, ticket: Ticket) {
        Controller::on_first_chunk(self, now, ticket)
    }
    fn items_per_request(&self) -> u32 {
        self.status().items_per_request
    }
}

/// What the controller saved at the end of a whole run of `scenario`: the state a later run
/// of the same job finds.
pub fn state_at_the_end(scenario: &Scenario) -> ControllerState {
    let mut controller =
        Controller::new(scenario.controller_config(), Duration::ZERO).expect("valid limits");
    simulate(scenario, &mut controller);
    controller.snapshot()
}

/// What the controller saved halfway through a run of `scenario` (as the runner saves it every
/// few seconds): the state a run interrupted there is resumed from.
pub fn state_saved_halfway(scenario: &Scenario) -> ControllerState {
    let config = scenario.controller_config();
    let mut whole = Controller::new(config.clone(), Duration::ZERO).expect("valid limits");
    let duration = simulate(scenario, &mut whole).duration_s;
    let mut saving = SavedAt {
        controller: Controller::new(config, Duration::ZERO).expect("valid limits"),
        at: Duration::from_secs_f64(duration / 2.0),
        saved: None,
    };
    simulate(scenario, &mut saving);
    saving.saved.unwrap_or_else(|| saving.controller.snapshot())
}

/// A controller whose state is saved the first time the clock passes `at`.
struct SavedAt {
    controller: Controller,
    at: Duration,
    saved: Option<ControllerState>,
}

impl SavedAt {
    fn save(&mut self, now: Duration) {
        if now >= self.at && self.saved.is_none() {
            self.saved = Some(self.controller.snapshot());
        }
    }
}

impl DispatchPolicy for SavedAt {
    fn name(&self) -> &str {
        "adaptive"
    }
    fn poll(&mut self, now: Duration, load: PipelineLoad) -> Decision {
        self.save(now);
        self.controller.poll(now, load)
    }
    fn on_sent(&mut self, now: Duration, shape: RequestShape) -> Ticket {
        self.controller.on_sent(now, shape)
    }
    fn on_outcome(&mut self, now: Duration, ticket: Ticket, observation: Observation) {
        self.save(now);
        self.controller.on_outcome(now, ticket, observation);
    }
    fn requests_to_cut(&mut self, now: Duration, load: PipelineLoad) -> Vec<Ticket> {
        self.controller.requests_to_cut(now, load)
    }
    fn on_server_queue(&mut self, now: Duration, queue: ServerQueue) {
        self.controller.on_server_queue(now, queue);
    }
    fn on_first_chunk(&mut self, now: Duration, ticket: Ticket) {
        self.save(now);
        self.controller.on_first_chunk(now, ticket);
    }
    fn items_per_request(&self) -> u32 {
        self.controller.status().items_per_request
    }
}
