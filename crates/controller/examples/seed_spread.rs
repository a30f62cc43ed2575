//! Runs every scenario at the seeds the scenario tests use (the file's seed, +1000, +2000)
//! under the controller and prints the smallest and largest of each figure, to see how much
//! of the benchmark table is the draw.
//!
//! ```text
//! cargo run --release --example seed_spread --manifest-path crates/controller/Cargo.toml
//! ```

use std::path::Path;
use std::time::Duration;

use backfill_controller::Controller;
use backfill_controller::simulation::{RunReport, Scenario, evaluate, simulate};

const SEED_OFFSETS: [u64; 3] = [0, 1000, 2000];

fn main() {
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
        "| scenario | steady/ceiling | whole run/ceiling | 429 share | converge s | duration ratio | whole run vs fixed client | queue wait ÷ service | computed twice |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for path in paths {
        let text = std::fs::read_to_string(&path).expect("scenario file");
        let mut scenario: Scenario = toml::from_str(&text).expect("scenario");
        let base = scenario.seed;
        // Each seed's controller report, and its whole-run items/s over a fixed client told
        // the server's slots (servers with slots only).
        let runs: Vec<(RunReport, Option<f64>)> = SEED_OFFSETS
            .iter()
            .map(|offset| {
                scenario.seed = base + offset;
                let config = scenario.controller_config();
                let mut controller =
                    Controller::new(config.clone(), Duration::ZERO).expect("valid limits");
                let report = evaluate(&scenario, &simulate(&scenario, &mut controller));
                let against_client = scenario.provider.slots.map(|slots| {
                    let mut client = scenario.fixed_client(slots);
                    let fixed = evaluate(&scenario, &simulate(&scenario, &mut client));
                    report.overall_items_per_second / fixed.overall_items_per_second
                });
                (report, against_client)
            })
            .collect();
        let reports: Vec<RunReport> = runs.iter().map(|(report, _)| report.clone()).collect();
        let against_client: Vec<f64> = runs.iter().filter_map(|(_, ratio)| *ratio).collect();
        let spread = |figure: &dyn Fn(&RunReport) -> f64, digits: usize| {
            let values = reports.iter().map(figure);
            let low = values.clone().fold(f64::INFINITY, f64::min);
            let high = values.fold(f64::NEG_INFINITY, f64::max);
            format!("{low:.digits$} – {high:.digits$}")
        };
        let client = if against_client.is_empty() {
            String::new()
        } else {
            let low = against_client.iter().copied().fold(f64::INFINITY, f64::min);
            let high = against_client
                .iter()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            format!("{low:.2} – {high:.2}x")
        };
        println!(
            "| {} | {} | {} | {}% | {} | {} | {} | {} | {}% |",
            scenario.name,
            spread(&|report| report.steady_ratio, 3),
            spread(
                &|report| report.overall_items_per_second / report.ceiling_items_per_second,
                3
            ),
            spread(&|report| 100.0 * report.rate_limited_share, 2),
            spread(&|report| report.converge_s.unwrap_or(f64::INFINITY), 1),
            spread(&|report| report.duration_ratio, 3),
            client,
            spread(&|report| report.queue_wait_share, 2),
            spread(&|report| 100.0 * report.computed_twice_share, 2),
        );
    }
}
