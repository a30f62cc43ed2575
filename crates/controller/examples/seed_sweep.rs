//! Runs every scenario of a server with slots (servers that queue) at 20 seeds (the file's
//! seed + 0, 1000, …, 19000) under the controller and under a fixed client told the true slot
//! count, and prints min / median / mean of the whole-run items/s over the fixed client's,
//! of the mean queue wait over the mean service time, and of the items computed twice.
//!
//! ```text
//! cargo run --release --example seed_sweep --manifest-path crates/controller/Cargo.toml [NAME] [--seeds]
//! ```
//! `--seeds` also prints each seed's figures (to find the bad ones); `SWEEP_SEEDS=N` runs N
//! seeds instead of 20; `SERVICE_TIME=1` has every server report its service time (as
//! llama.cpp's `timings` do); `COLD_START=k` has the first request each slot serves take `k`
//! times as long (a server that warms up); `ITEMS=n` runs every scenario over `n` items (how
//! much of a run the search for the server's pace costs, run against run length); `RESUME=1`
//! measures resumed runs: each seed's run is restored (`run --resume`) from what the
//! controller saved halfway through an earlier run on the same server (the seed + 500);
//! `QUEUE_GAUGES=1` has every server show its gauges, `STREAMS=1` stream its answers (the
//! first chunk once a slot took the request and prefilled it) and `STREAMS=buffered` stream
//! them through a proxy that buffers each whole answer.

mod common;

use std::path::Path;
use std::time::Duration;

use backfill_controller::Controller;
use backfill_controller::simulation::{Scenario, evaluate, simulate};

fn main() {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let per_seed = arguments.iter().any(|argument| argument == "--seeds");
    let filter = arguments
        .iter()
        .find(|argument| !argument.starts_with("--"));
    let seeds: u64 = std::env::var("SWEEP_SEEDS")
        .ok()
        .and_then(|seeds| seeds.parse().ok())
        .unwrap_or(20);
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut paths: Vec<_> = std::fs::read_dir(&directory)
        .expect("scenarios directory")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "toml")
        })
        .collect();
    paths.sort();
    println!(
        "| scenario | vs fixed client min | median | mean | queue wait ÷ service max | median | mean | computed twice max | mean |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("scenario file");
        let mut scenario: Scenario = toml::from_str(&text).expect("scenario");
        common::scenario_from_env(&mut scenario);
        let Some(slots) = scenario.provider.slots else {
            continue;
        };
        if filter.is_some_and(|filter| !scenario.name.contains(filter.as_str())) {
            continue;
        }
        let base = scenario.seed;
        let mut ratios = Vec::new();
        let mut waits = Vec::new();
        let mut twice = Vec::new();
        for index in 0..seeds {
            let offset = index * 1000;
            scenario.seed = base + offset;
            let config = scenario.controller_config();
            let mut controller = match common::state_to_resume(&scenario) {
                Some(state) => {
                    if per_seed {
                        eprintln!(
                            "{} offset {offset}: resumed from {:?}",
                            scenario.name, state.delay
                        );
                    }
                    Controller::restore(config.clone(), state, Duration::ZERO)
                        .expect("valid limits")
                }
                None => common::fresh_controller(&scenario),
            };
            let report = evaluate(&scenario, &simulate(&scenario, &mut controller));
            let mut client = scenario.fixed_client(slots);
            let fixed = evaluate(&scenario, &simulate(&scenario, &mut client));
            let ratio = report.overall_items_per_second / fixed.overall_items_per_second;
            if per_seed {
                eprintln!(
                    "{} offset {offset}: {ratio:.2}x, queue wait {:.2}, computed twice {:.2}%, timeouts {} ({} cut)",
                    scenario.name,
                    report.queue_wait_share,
                    100.0 * report.computed_twice_share,
                    report.timeouts,
                    report.timeouts - report.timeouts_for_slowness
                );
            }
            ratios.push(ratio);
            waits.push(report.queue_wait_share);
            twice.push(100.0 * report.computed_twice_share);
        }
        let (ratio_min, ratio_median, ratio_mean) = summary(&mut ratios);
        let (_, wait_median, wait_mean) = summary(&mut waits);
        let (_, _, twice_mean) = summary(&mut twice);
        println!(
            "| {} | {ratio_min:.2}x | {ratio_median:.2}x | {ratio_mean:.2}x | {:.2} | {wait_median:.2} | {wait_mean:.2} | {:.2}% | {twice_mean:.2}% |",
            scenario.name,
            waits.last().copied().unwrap_or(f64::NAN),
            twice.last().copied().unwrap_or(f64::NAN),
        );
    }
}

/// Sorts the values and returns their minimum, median and mean.
fn summary(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let count = values.len();
    let median = if count.is_multiple_of(2) {
        (values[count / 2 - 1] + values[count / 2]) / 2.0
    } else {
        values[count / 2]
    };
    let mean = values.iter().sum::<f64>() / count as f64;
    (values[0], median, mean)
}
