use backfill_controller::Controller;
use backfill_controller::simulation::{Scenario, evaluate, simulate};
fn main() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    for path in paths {
        let mut scenario: Scenario =
            toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut rows = Vec::new();
        let base = scenario.seed;
        for seed in [base, base + 1000, base + 2000] {
            scenario.seed = seed;
            let mut c =
                Controller::new(scenario.controller_config(), std::time::Duration::ZERO).unwrap();
            let r = evaluate(&scenario, &simulate(&scenario, &mut c));
            rows.push((
                r.steady_ratio,
                r.rate_limited_share,
                r.duration_ratio,
                r.converge_s.unwrap_or(999.0),
                r.final_items_per_request,
            ));
        }
        let f = |g: &dyn Fn(&(f64, f64, f64, f64, u32)) -> f64| {
            let v: Vec<f64> = rows.iter().map(g).collect();
            (
                v.iter().cloned().fold(f64::INFINITY, f64::min),
                v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            )
        };
        println!(
            "{:20} ratio {:.3?} 429 {:.4?} dur {:.3?} conv {:.1?} ipr {:?}",
            scenario.name,
            f(&|r| r.0),
            f(&|r| r.1),
            f(&|r| r.2),
            f(&|r| r.3),
            rows.iter().map(|r| r.4).collect::<Vec<_>>()
        );
    }
}
