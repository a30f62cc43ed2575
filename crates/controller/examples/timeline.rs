//! One scenario under the controller, seed by seed: the whole run's items/s over the ceiling,
//! its duration against the ideal (items ÷ ceiling), when the first answer came and how many
//! items had gone out by then, the last send, timeouts and cuts, the items sent (retries
//! included) and the tokens reserved (prompt and `max_tokens`, summed over every request) over
//! what the ceiling's best size would reserve for the run; with `DETAIL=1` every 2 s of
//! each run (items and requests sent, their mean size, the most in flight, items done); with
//! `TRACE=<filter>` (for example `backfill_controller=debug`) the controller's own log.
//!
//! ```text
//! cargo run --release --example timeline --manifest-path crates/controller/Cargo.toml -- NAME [SEEDS]
//! ```
//! NAME is a scenario file's stem (`announced_3000_items`); the seeds are the file's + 0,
//! 1000, …; `OFFSET=N` starts at the file's seed + N; `RESUME=1` restores each run from what
//! the controller saved halfway through a run at the seed + 500; `SERVICE_TIME=1` has the server report
//! its service time (as llama.cpp's `timings` do); `COLD_START=k` has the first request each
//! slot serves take `k` times as long (a server that warms up); `ITEMS=n` runs the scenario
//! over `n` items; `QUEUE_GAUGES=1` has the server show its gauges, `STREAMS=1` stream its
//! answers and `STREAMS=buffered` stream them through a proxy that buffers each answer.

mod common;

use std::path::Path;
use std::time::Duration;

use backfill_controller::Controller;
use backfill_controller::simulation::{Scenario, evaluate, simulate};

const WINDOW_S: f64 = 2.0;

fn main() {
    if let Ok(filter) = std::env::var("TRACE") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .without_time()
            .init();
    }
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = arguments.first() else {
        eprintln!("usage: timeline NAME [SEEDS]");
        std::process::exit(2);
    };
    let seeds: u64 = arguments
        .get(1)
        .and_then(|seeds| seeds.parse().ok())
        .unwrap_or(1);
    let offset: u64 = std::env::var("OFFSET")
        .ok()
        .and_then(|offset| offset.parse().ok())
        .unwrap_or(0);
    let detail = std::env::var_os("DETAIL").is_some();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&path).expect("scenario file");
    let mut scenario: Scenario = toml::from_str(&text).expect("scenario");
    common::scenario_from_env(&mut scenario);
    let base = scenario.seed;
    // Tokens the run would reserve in requests of the largest size with exactly the mean
    // output.
    let largest = scenario.limits.items_per_request.max;
    let ideal_tokens =
        f64::from(scenario.items) / f64::from(largest) * scenario.tokens_per_request(largest);
    println!(
        "seed | whole run/ceiling | duration s | ideal s | first answer s | items sent by then | last send s | end − last send s | timeouts | cut | requests | items sent | tokens reserved ÷ ideal | computed twice %"
    );
    for seed in 0..seeds {
        scenario.seed = base + offset + seed * 1000;
        let config = scenario.controller_config();
        let mut controller = match common::state_to_resume(&scenario) {
            Some(state) => {
                Controller::restore(config, state, Duration::ZERO).expect("valid limits")
            }
            None => common::fresh_controller(&scenario),
        };
        let log = simulate(&scenario, &mut controller);
        let report = evaluate(&scenario, &log);
        let first = log.completions.first().map_or(0.0, |(at, _)| *at);
        let last_send = log.sends.last().map_or(0.0, |(at, _, _)| *at);
        let sent_by_first: u32 = log
            .sends
            .iter()
            .filter(|(at, _, _)| *at <= first)
            .map(|(_, items, _)| items)
            .sum();
        let items_sent: u32 = log.sends.iter().map(|(_, items, _)| items).sum();
        println!(
            "{} | {:.3} | {:.1} | {:.1} | {:.2} | {} | {:.1} | {:.1} | {} | {} | {} | {} | {:.3} | {:.2}",
            scenario.seed,
            report.overall_items_per_second / report.ceiling_items_per_second,
            log.duration_s,
            f64::from(scenario.items) / report.ceiling_items_per_second,
            first,
            sent_by_first,
            last_send,
            log.duration_s - last_send,
            log.timed_out,
            log.abandoned,
            log.requests,
            items_sent,
            log.reserved_tokens as f64 / ideal_tokens,
            100.0 * report.computed_twice_share,
        );
        if detail {
            let mut start = 0.0;
            while start < log.duration_s {
                let end = start + WINDOW_S;
                let sends: Vec<_> = log
                    .sends
                    .iter()
                    .filter(|(at, _, _)| (start..end).contains(at))
                    .collect();
                let items: u32 = sends.iter().map(|(_, items, _)| items).sum();
                let done: u32 = log
                    .completions
                    .iter()
                    .filter(|(at, _)| (start..end).contains(at))
                    .map(|(_, items)| items)
                    .sum();
                let in_flight = sends.iter().map(|(_, _, with)| *with).max().unwrap_or(0);
                println!(
                    "  {start:6.1} s: sent {items:5} items in {:4} requests (mean {:5.1}), at most {in_flight:3} in flight, {done:5} items done",
                    sends.len(),
                    f64::from(items) / sends.len().max(1) as f64,
                );
                start = end;
            }
        }
    }
}
