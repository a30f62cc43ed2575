//! Scenario tests: each file in `scenarios/` drives the controller against the simulated
//! provider in simulated time and checks the figures against the file's `[expect]` ranges,
//! at the file's seed and two more, so a range is not met by one lucky draw.

use std::path::PathBuf;
use std::time::Duration;

use backfill_controller::Controller;
use backfill_controller::simulation::{
    FixedRule, Scenario, evaluate, simulate, state_saved_halfway,
};

fn scenario_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(format!("{name}.toml"))
}

fn load(name: &str) -> Scenario {
    let path = scenario_path(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    toml::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

/// Seeds added to the file's seed.
const SEED_OFFSETS: [u64; 3] = [0, 1000, 2000];

/// Runs the scenario at each seed and returns every expectation it missed.
fn misses(name: &str) -> Vec<String> {
    let mut scenario = load(name);
    let base = scenario.seed;
    let mut misses = Vec::new();
    for offset in SEED_OFFSETS {
        scenario.seed = base + offset;
        for miss in misses_at_seed(&scenario) {
            misses.push(format!("seed {}: {miss}", scenario.seed));
        }
    }
    misses
}

fn misses_at_seed(scenario: &Scenario) -> Vec<String> {
    let config = scenario.controller_config();
    let mut controller = Controller::new(config.clone(), Duration::ZERO).expect("valid limits");
    let report = evaluate(scenario, &simulate(scenario, &mut controller));
    let expect = &scenario.expect;
    let mut misses = Vec::new();
    if !report.finished {
        misses.push("run did not finish".to_string());
    }
    if let Some(minimum) = expect.min_steady_ratio
        && report.steady_ratio < minimum
    {
        misses.push(format!(
            "steady ratio {:.3} < {minimum}",
            report.steady_ratio
        ));
    }
    if let Some(minimum) = expect.min_whole_run_ratio {
        let ratio = report.overall_items_per_second / report.ceiling_items_per_second;
        if ratio < minimum {
            misses.push(format!("whole-run ratio {ratio:.3} < {minimum}"));
        }
    }
    if let Some(maximum) = expect.max_rate_limited_share
        && report.rate_limited_share > maximum
    {
        misses.push(format!(
            "429 share {:.4} > {maximum}",
            report.rate_limited_share
        ));
    }
    if let Some(maximum) = expect.max_duration_ratio
        && report.duration_ratio > maximum
    {
        misses.push(format!(
            "duration ratio {:.3} > {maximum}",
            report.duration_ratio
        ));
    }
    if let Some(maximum) = expect.max_converge_s {
        match report.converge_s {
            Some(seconds) if seconds <= maximum => {}
            other => misses.push(format!("converged after {other:?} s, wanted <= {maximum}")),
        }
    }
    if let Some([low, high]) = expect.final_items_per_request
        && !(low..=high).contains(&report.final_items_per_request)
    {
        misses.push(format!(
            "final items per request {} not in {low}..={high}",
            report.final_items_per_request
        ));
    }
    if let Some(minimum) = expect.min_ratio_to_fixed_slots {
        let slots = scenario
            .provider
            .slots
            .expect("a fixed client needs the server's slots");
        let mut fixed_client = scenario.fixed_client(slots);
        let fixed = evaluate(scenario, &simulate(scenario, &mut fixed_client));
        let ratio = report.overall_items_per_second / fixed.overall_items_per_second;
        if ratio < minimum {
            misses.push(format!(
                "items/s {:.2} over the fixed client's {:.2}: {ratio:.3} < {minimum}",
                report.overall_items_per_second, fixed.overall_items_per_second
            ));
        }
    }
    if let Some(maximum) = expect.max_queue_wait_share
        && report.queue_wait_share > maximum
    {
        misses.push(format!(
            "queue wait over service time {:.3} > {maximum}",
            report.queue_wait_share
        ));
    }
    if let Some(maximum) = expect.max_computed_twice_share
        && report.computed_twice_share > maximum
    {
        misses.push(format!(
            "items computed twice {:.4} > {maximum}",
            report.computed_twice_share
        ));
    }
    if let Some(maximum) = expect.max_timeouts
        && report.timeouts_for_slowness > maximum
    {
        misses.push(format!(
            "{} requests timed out, wanted <= {maximum}",
            report.timeouts_for_slowness
        ));
    }
    if let Some(minimum) = expect.min_speedup_over_fixed_rule {
        let mut fixed_rule = FixedRule::new(&config);
        let fixed = evaluate(scenario, &simulate(scenario, &mut fixed_rule));
        let speedup = report.steady_items_per_second / fixed.steady_items_per_second;
        if speedup < minimum {
            misses.push(format!(
                "speedup over the fixed rule {speedup:.2} < {minimum}"
            ));
        }
    }
    misses
}

/// `run --resume` on a server that queues: the run goes on from the requests in flight it had
/// found (saved halfway through a run at another seed), not from `concurrency.start`: that
/// level is in flight within the first round of answers, and on servers where the climb to it
/// costs a short run most (16 and 64 slots, a start the timeout cannot serve) the resumed run
/// is faster than a fresh one, over the test seeds.
#[test]
fn a_resumed_run_goes_on_at_the_level_it_had_found() {
    for (name, climbs) in [
        ("batching_16_slots", true),
        ("batching_64_slots", true),
        ("slower_than_the_timeout", true),
        ("queue_2_slots", false),
        ("gauges_16_slots", false),
    ] {
        let mut scenario = load(name);
        let base = scenario.seed;
        let (mut resumed_total, mut fresh_total) = (0.0, 0.0);
        for offset in SEED_OFFSETS {
            scenario.seed = base + offset + 500;
            let state = state_saved_halfway(&scenario);
            let level = state.delay.expect("a level of requests in flight").settled as usize;
            scenario.seed = base + offset;
            let config = scenario.controller_config();
            let mut resumed = Controller::restore(config.clone(), state, Duration::ZERO).unwrap();
            let log = simulate(&scenario, &mut resumed);
            let first_answer = log.completions.first().map_or(0.0, |(at, _)| *at);
            // Sent before the first answer of a full-sized request (the small first request
            // is answered sooner): the sends of the first round.
            let first_round = log
                .completions
                .iter()
                .map(|(at, _)| *at)
                .find(|at| *at > first_answer)
                .unwrap_or(f64::INFINITY);
            // The level, and the small first request beside it while it lasts.
            let most = log
                .sends
                .iter()
                .filter(|(at, _, _)| *at < first_round)
                .map(|(_, _, in_flight)| *in_flight)
                .max()
                .unwrap_or(0);
            assert!(
                (level..=level + 1).contains(&most),
                "{name} seed {}: {most} in flight in the first round, {level} found before",
                scenario.seed
            );
            let mut fresh = Controller::new(config, Duration::ZERO).unwrap();
            resumed_total += evaluate(&scenario, &log).overall_items_per_second;
            fresh_total +=
                evaluate(&scenario, &simulate(&scenario, &mut fresh)).overall_items_per_second;
        }
        if climbs {
            assert!(
                resumed_total > fresh_total,
                "{name}: resumed {resumed_total:.2} items/s over the seeds, fresh {fresh_total:.2}"
            );
        }
    }
}

/// A proxy that buffers each whole answer delivers its first chunk with its end: the
/// controller does not trust such first chunks, and the run is the run without streaming,
/// request for request.
#[test]
fn first_chunks_that_come_with_the_end_change_nothing() {
    for name in [
        "queue_2_slots",
        "batching_16_slots",
        "slower_than_the_timeout",
    ] {
        let plain = load(name);
        let mut buffered = plain.clone();
        buffered.provider.streams = true;
        buffered.provider.buffered_stream = true;
        let run = |scenario: &Scenario| {
            let mut controller =
                Controller::new(scenario.controller_config(), Duration::ZERO).unwrap();
            simulate(scenario, &mut controller)
        };
        assert_eq!(run(&plain), run(&buffered), "{name}");
    }
}

macro_rules! scenario_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let misses = misses(stringify!($name));
                assert!(misses.is_empty(), "{}: {}", stringify!($name), misses.join("; "));
            }
        )*

        #[test]
        fn every_scenario_file_has_a_test() {
            let tested = [$(stringify!($name)),*];
            let directory = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios");
            for entry in std::fs::read_dir(directory).expect("scenarios directory") {
                let path = entry.expect("entry").path();
                let stem = path.file_stem().and_then(|stem| stem.to_str()).unwrap_or_default().to_string();
                assert!(tested.contains(&stem.as_str()), "scenarios/{stem}.toml has no test");
            }
        }
    };
}

scenario_tests!(
    announced_3000_items,
    announced_counts_written,
    rpm_bound,
    tpm_bound,
    latency_bound,
    concurrency_bound,
    capacity_step_down,
    capacity_step_up,
    no_headers,
    no_headers_step,
    heavy_tail,
    quality_knee,
    motions_3000rpm,
    queue_1_slot,
    queue_2_slots,
    queue_4_slots,
    batching_16_slots,
    batching_64_slots,
    queue_slots_change,
    hosted_rate_and_slots,
    timed_queue_1_slot,
    timed_queue_2_slots,
    timed_batching_16_slots,
    timed_queue_slots_change,
    slower_than_the_timeout,
    announced_2_slots,
    announced_16_slots,
    announced_64_slots,
    gauges_2_slots,
    gauges_16_slots,
    gauges_64_slots,
    gauges_slots_change,
    streamed_2_slots,
    streamed_16_slots,
    streamed_64_slots,
);
