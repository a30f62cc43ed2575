//! Figures of one simulated run against its scenario's ceiling: steady items/s, its ratio to
//! the ceiling, the 429 share, time to converge, and the whole run's duration against
//! items ÷ steady items/s.

use crate::simulation::dispatcher::RunLog;
use crate::simulation::scenario::Scenario;

/// The steady window starts this long after the start or the last capacity step...
const SETTLE_S: f64 = 30.0;
/// ...and not before this share of the items is done; it ends when this share is done.
const STEADY_FROM_DONE: f64 = 0.2;
const STEADY_UNTIL_DONE: f64 = 0.95;
/// Converged: the trailing window's items/s reaches this share of the ceiling.
const CONVERGED_SHARE: f64 = 0.9;
const CONVERGE_WINDOW_S: f64 = 5.0;

#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    pub policy: String,
    pub finished: bool,
    pub duration_s: f64,
    /// Items over the whole run's duration.
    pub overall_items_per_second: f64,
    /// Items per second in the steady window (after settling, before the last items).
    pub steady_items_per_second: f64,
    /// The ceiling in force during the steady window.
    pub ceiling_items_per_second: f64,
    pub steady_ratio: f64,
    pub rate_limited_share: f64,
    pub timeouts: u64,
    /// Timeouts other than end-of-queue cuts: requests cut for slowness.
    pub timeouts_for_slowness: u64,
    pub overloaded: u64,
    pub requests: u64,
    /// Seconds from the start, or from the last capacity step, to 90% of the ceiling.
    pub converge_s: Option<f64>,
    /// Duration over items ÷ steady items/s.
    pub duration_ratio: f64,
    pub final_items_per_request: u32,
    pub max_in_flight: usize,
    /// Mean wait in the server's queue over its mean service time.
    pub queue_wait_share: f64,
    /// Items computed for requests the client had given up on, over the run's items.
    pub computed_twice_share: f64,
}

/// Computes the figures of `log` for `scenario`.
pub fn evaluate(scenario: &Scenario, log: &RunLog) -> RunReport {
    let total_items: f64 = log
        .completions
        .iter()
        .map(|(_, items)| f64::from(*items))
        .sum();
    let phase_start = scenario
        .provider
        .capacity_steps
        .iter()
        .map(|step| step.at_s)
        .filter(|at| *at < log.duration_s)
        .fold(0.0, f64::max);
    let ceiling = scenario.ceiling_items_per_second(scenario.capacity_factor(phase_start));
    let time_when_done = |share: f64| {
        let mut sum = 0.0;
        for (at, items) in &log.completions {
            sum += f64::from(*items);
            if sum >= share * total_items {
                return *at;
            }
        }
        log.duration_s
    };
    let steady_from = (phase_start + SETTLE_S).max(time_when_done(STEADY_FROM_DONE));
    let steady_until = time_when_done(STEADY_UNTIL_DONE);
    let steady = if steady_until > steady_from {
        let items: f64 = log
            .completions
            .iter()
            .filter(|(at, _)| *at > steady_from && *at <= steady_until)
            .map(|(_, items)| f64::from(*items))
            .sum();
        items / (steady_until - steady_from)
    } else {
        total_items / log.duration_s.max(f64::MIN_POSITIVE)
    };
    RunReport {
        policy: log.policy.clone(),
        finished: log.finished,
        duration_s: log.duration_s,
        overall_items_per_second: total_items / log.duration_s.max(f64::MIN_POSITIVE),
        steady_items_per_second: steady,
        ceiling_items_per_second: ceiling,
        steady_ratio: steady / ceiling,
        rate_limited_share: log.rate_limited as f64 / (log.requests as f64).max(1.0),
        timeouts: log.timed_out,
        timeouts_for_slowness: log.timed_out - log.abandoned,
        overloaded: log.overloaded,
        requests: log.requests,
        converge_s: converge_time(log, phase_start, ceiling),
        duration_ratio: log.duration_s / (total_items / steady),
        final_items_per_request: log.final_items_per_request,
        max_in_flight: log.max_in_flight,
        queue_wait_share: log.queue_wait_s / log.service_s.max(f64::MIN_POSITIVE),
        computed_twice_share: log.computed_twice_items as f64 / f64::from(scenario.items.max(1)),
    }
}

/// First time after `phase_start` at which the trailing window reaches 90% of `ceiling`,
/// relative to `phase_start`.
fn converge_time(log: &RunLog, phase_start: f64, ceiling: f64) -> Option<f64> {
    let needed = CONVERGED_SHARE * ceiling * CONVERGE_WINDOW_S;
    let mut window_items = 0.0;
    let mut window_start = 0;
    for (at, items) in &log.completions {
        window_items += f64::from(*items);
        while log.completions[window_start].0 <= at - CONVERGE_WINDOW_S {
            window_items -= f64::from(log.completions[window_start].1);
            window_start += 1;
        }
        if *at >= phase_start + CONVERGE_WINDOW_S && window_items >= needed {
            return Some(at - phase_start);
        }
    }
    None
}
