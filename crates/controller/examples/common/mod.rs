//! What the examples share: the server variants and the run length, set from the environment.

use backfill_controller::ControllerState;
use backfill_controller::simulation::{Scenario, state_saved_halfway};

/// `SERVICE_TIME=1` has the server report its service time (as llama.cpp's `timings` do);
/// `COLD_START=k` has the first request each slot serves take `k` times as long (a server
/// that warms up); `ANNOUNCE_SLOTS=1` has the server say its slots before the run (as
/// llama.cpp's `GET /props` does); `QUEUE_GAUGES=1` has it show requests running and waiting
/// (as vLLM's `GET /metrics` does); `ITEMS=n` runs the scenario over `n` items instead of its own count.
pub fn scenario_from_env(scenario: &mut Scenario) {
    if let Some(items) = std::env::var("ITEMS")
        .ok()
        .and_then(|items| items.parse().ok())
    {
        scenario.items = items;
    }
    if std::env::var_os("SERVICE_TIME").is_some_and(|value| value == "1") {
        scenario.provider.reports_service_time = true;
    }
    if std::env::var_os("ANNOUNCE_SLOTS").is_some_and(|value| value == "1") {
        scenario.provider.announces_slots = true;
    }
    if std::env::var_os("QUEUE_GAUGES").is_some_and(|value| value == "1") {
        scenario.provider.queue_gauges = true;
    }
    if let Some(factor) = std::env::var("COLD_START")
        .ok()
        .and_then(|factor| factor.parse().ok())
    {
        scenario.provider.cold_start_factor = factor;
    }
}

/// With `RESUME=1`, the state a run of `scenario` resumes from: what the controller saved
/// halfway through a run on the same server at the seed + 500.
pub fn state_to_resume(scenario: &Scenario) -> Option<ControllerState> {
    if std::env::var_os("RESUME").is_none_or(|value| value != "1") {
        return None;
    }
    let mut earlier_run = scenario.clone();
    earlier_run.seed += 500;
    Some(state_saved_halfway(&earlier_run))
}
