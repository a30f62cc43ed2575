//! What the examples share: the server variants and the run length, set from the environment.

use backfill_controller::Controller;
use backfill_controller::ControllerState;
use backfill_controller::simulation::{Scenario, state_at_the_end, state_saved_halfway};

/// `SERVICE_TIME=1` has the server report its service time (as llama.cpp's `timings` do);
/// `COLD_START=k` has the first request each slot serves take `k` times as long (a server
/// that warms up); `ANNOUNCE_SLOTS=1` has the server say its slots before the run (as
/// llama.cpp's `GET /props` does); `QUEUE_GAUGES=1` has it show requests running and waiting
/// (as vLLM's `GET /metrics` does); `STREAMS=1` has it stream its answers (the first chunk once
/// a slot took the request and prefilled it), `STREAMS=buffered` behind a proxy that buffers
/// each whole answer (the first chunk with the end); `ITEMS=n` runs the scenario over `n`
/// items instead of its own count.
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
    match std::env::var("STREAMS").as_deref() {
        Ok("1") => scenario.provider.streams = true,
        Ok("buffered") => {
            scenario.provider.streams = true;
            scenario.provider.buffered_stream = true;
        }
        _ => {}
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

/// With `EARLIER_RUN=1`, the level a whole earlier run of the job found on the same server (at
/// the seed + 500); with `EARLIER_RUN=NAME`, on the server of scenario file `NAME` (a server
/// changed since): a fresh run starts there (`Controller::start_where_found`).
pub fn earlier_state(scenario: &Scenario) -> Option<ControllerState> {
    let earlier = std::env::var("EARLIER_RUN").ok()?;
    let mut earlier_run = if earlier == "1" {
        scenario.clone()
    } else {
        let path = format!("{}/scenarios/{earlier}.toml", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).expect("scenario file");
        let mut other: Scenario = toml::from_str(&text).expect("scenario");
        other.limits = scenario.limits.clone();
        other.items = scenario.items;
        other
    };
    earlier_run.seed = scenario.seed + 500;
    Some(state_at_the_end(&earlier_run))
}

/// A fresh controller for `scenario`, started where an earlier run found its server when
/// `EARLIER_RUN` is set.
pub fn fresh_controller(scenario: &Scenario) -> Controller {
    let mut controller = Controller::new(scenario.controller_config(), std::time::Duration::ZERO)
        .expect("valid limits");
    if let Some(earlier) = earlier_state(scenario) {
        controller.start_where_found(&earlier);
    }
    controller
}
