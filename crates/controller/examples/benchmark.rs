//! Runs every scenario in `scenarios/` on the simulated provider, once under the adaptive
//! controller and once under the fixed rule, and for servers with slots once more under a
//! fixed client told the true slot count, and prints the figures as a Markdown table.
//!
//! ```text
//! cargo run --release --example benchmark --manifest-path crates/controller/Cargo.toml [NAME_FILTER] [--timeline]
//! ```
//! `--timeline` adds, per scenario, the adaptive run's valid items/s per 10 s window and the
//! most requests in flight × the largest request per window; with `BENCHMARK_SENDS=1` also
//! every request sent (time, items, requests in flight) and every answer (time, valid items).
//! `BENCHMARK_SEED_OFFSET=1000` runs the
//! scenarios at another of the seeds the scenario tests use.

use std::path::Path;

use backfill_controller::Controller;
use backfill_controller::simulation::{FixedRule, RunReport, Scenario, evaluate, simulate};

fn main() {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let timeline = arguments.iter().any(|argument| argument == "--timeline");
    let filter = arguments
        .iter()
        .find(|argument| !argument.starts_with("--"));
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
        "| scenario | policy | items/s (whole run) | steady items/s | ceiling | steady/ceiling | 429 share | converge s | duration ratio | timeouts | 503s | items/request | max in flight | queue wait ÷ service | computed twice | steady vs fixed rule | whole run vs fixed client |"
    );
    println!(
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("scenario file");
        let mut scenario: Scenario =
            toml::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
        // BENCHMARK_SEED_OFFSET=1000 runs a scenario at another of the tests' seeds.
        if let Some(offset) = std::env::var("BENCHMARK_SEED_OFFSET")
            .ok()
            .and_then(|offset| offset.parse::<u64>().ok())
        {
            scenario.seed += offset;
        }
        if filter.is_some_and(|filter| !scenario.name.contains(filter.as_str())) {
            continue;
        }
        let config = scenario.controller_config();
        let mut controller =
            Controller::new(config.clone(), std::time::Duration::ZERO).expect("valid limits");
        let adaptive_log = simulate(&scenario, &mut controller);
        let adaptive = evaluate(&scenario, &adaptive_log);
        let mut fixed_rule = FixedRule::new(&config);
        let fixed = evaluate(&scenario, &simulate(&scenario, &mut fixed_rule));
        let speedup = adaptive.steady_items_per_second / fixed.steady_items_per_second;
        let fixed_client = scenario.provider.slots.map(|slots| {
            let mut client = scenario.fixed_client(slots);
            evaluate(&scenario, &simulate(&scenario, &mut client))
        });
        let against_client = fixed_client
            .as_ref()
            .map(|client| adaptive.overall_items_per_second / client.overall_items_per_second);
        print_row(&scenario.name, &adaptive, Some(speedup), against_client);
        print_row(&scenario.name, &fixed, None, None);
        if let Some(client) = &fixed_client {
            print_row(&scenario.name, client, None, None);
        }
        if timeline {
            let mut windows = vec![0u32; (adaptive_log.duration_s / 10.0) as usize + 1];
            for (at, items) in &adaptive_log.completions {
                windows[(*at / 10.0) as usize] += items;
            }
            let rates: Vec<String> = windows
                .iter()
                .map(|items| format!("{:.0}", f64::from(*items) / 10.0))
                .collect();
            eprintln!("{} items/s per 10 s: {}", scenario.name, rates.join(" "));
            // Per window: the most requests in flight at a send, and the largest request.
            let mut shapes = vec![(0usize, 0u32); windows.len()];
            for (at, items, in_flight) in &adaptive_log.sends {
                if let Some(shape) = shapes.get_mut((*at / 10.0) as usize) {
                    *shape = (shape.0.max(*in_flight), shape.1.max(*items));
                }
            }
            let shapes: Vec<String> = shapes
                .iter()
                .map(|(in_flight, items)| format!("{in_flight}x{items}"))
                .collect();
            eprintln!(
                "{} in flight x items per 10 s: {}",
                scenario.name,
                shapes.join(" ")
            );
            if std::env::var_os("BENCHMARK_SENDS").is_some() {
                for (at, items, in_flight) in &adaptive_log.sends {
                    eprintln!("send {at:.2} {items} {in_flight}");
                }
                for (at, items) in &adaptive_log.completions {
                    eprintln!("answer {at:.2} {items}");
                }
            }
            eprintln!("{} final status: {:?}", scenario.name, controller.status());
        }
    }
}

fn print_row(name: &str, report: &RunReport, speedup: Option<f64>, against_client: Option<f64>) {
    let converge = report
        .converge_s
        .map_or("never".to_string(), |seconds| format!("{seconds:.1}"));
    let finished = if report.finished { "" } else { " (unfinished)" };
    println!(
        "| {name} | {}{finished} | {:.1} | {:.1} | {:.1} | {:.3} | {:.2}% | {converge} | {:.3} | {} | {} | {} | {} | {:.2} | {:.2}% | {} | {} |",
        report.policy,
        report.overall_items_per_second,
        report.steady_items_per_second,
        report.ceiling_items_per_second,
        report.steady_ratio,
        100.0 * report.rate_limited_share,
        report.duration_ratio,
        report.timeouts,
        report.overloaded,
        report.final_items_per_request,
        report.max_in_flight,
        report.queue_wait_share,
        100.0 * report.computed_twice_share,
        speedup.map_or(String::new(), |speedup| format!("{speedup:.1}x")),
        against_client.map_or(String::new(), |ratio| format!("{ratio:.2}x")),
    );
}
