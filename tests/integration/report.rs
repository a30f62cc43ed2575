//! `report`: the run over time from the ledger, as text, as JSON, and as an SVG chart whose
//! series are checked by parsing the file.

use serde_json::Value;

use crate::support::*;
use backfill::report::chart::SERIES;

/// `(x, y)` points of every `<polyline>` drawn in `color`.
fn polylines(doc: &roxmltree::Document, color: &str) -> Vec<Vec<(f64, f64)>> {
    doc.descendants()
        .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke").is_some_and(|s| s.eq_ignore_ascii_case(color)))
        .map(|n| {
            n.attribute("points")
                .unwrap_or("")
                .split_whitespace()
                .map(|p| {
                    let (x, y) = p.split_once(',').expect("x,y");
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_report_follows_the_run_over_time_and_charts_every_series() {
    let fx = Fixture::new(200).await;
    let faults = vec![(0.10, Reply::RateLimited { retry_after_s: 0.2 }), (0.05, Reply::Malformed)];
    let fake = FakeProvider::start_with_latency(vec![], faults, 61, (40, 160)).await;
    fx.write_job(&fake.base_url(), "", "", "");
    let job = fx.job.to_str().unwrap().to_owned();
    let run = backfill_async(fx.dir.path(), &["run", &job, "--json", "--quiet"], &[]).await;
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let summary: Value = serde_json::from_str(&stdout(&run)).unwrap();

    let chart = fx.dir.path().join("run.svg");
    let output = backfill_async(fx.dir.path(), &["report", &job, "--json", "--chart", chart.to_str().unwrap()], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let report: Value = serde_json::from_str(&stdout(&output)).unwrap();

    // The timeline adds up to the ledger and the provider's log.
    let buckets = report["timeline"]["buckets"].as_array().unwrap();
    assert!(buckets.len() >= 2, "{buckets:?}");
    let sum = |key: &str| buckets.iter().map(|b| b[key].as_u64().unwrap()).sum::<u64>();
    let requests = fake.records().len() as u64;
    assert_eq!(sum("requests"), requests);
    assert_eq!(report["throughput"]["requests"], requests);
    let limited = fake.records().iter().filter(|r| matches!(r.reply, Reply::RateLimited { .. })).count() as u64;
    assert!(limited > 0, "no 429 was scripted");
    assert_eq!(sum("rate_limited"), limited);
    assert_eq!(sum("items_done"), summary["items"]["done"].as_u64().unwrap());
    let final_cost = buckets.last().unwrap()["cumulative_cost_usd"].as_f64().unwrap();
    assert!((final_cost - summary["cost_usd"].as_f64().unwrap()).abs() < 1e-12, "{final_cost} vs {}", summary["cost_usd"]);
    assert!(buckets.iter().any(|b| b["concurrency_limit"].as_u64().is_some_and(|c| c > 0)));
    assert_eq!(report["items"]["done"], summary["items"]["done"]);
    assert!(report["job_totals"]["cost_usd"].as_f64().unwrap() > 0.0);

    // The chart: a valid SVG with every series, one point per bucket, cost never falling.
    let text = std::fs::read_to_string(&chart).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("the chart is valid XML");
    assert!(doc.root_element().has_tag_name("svg"));
    let texts: Vec<&str> = doc.descendants().filter(|n| n.has_tag_name("text")).filter_map(|n| n.text()).collect();
    for (name, color) in SERIES {
        assert!(texts.iter().any(|t| t.contains(name)), "no label {name:?} in {texts:?}");
        let hex = format!("#{:02X}{:02X}{:02X}", color.0, color.1, color.2);
        let lines = polylines(&doc, &hex);
        let series = lines.iter().max_by_key(|l| l.len()).unwrap_or_else(|| panic!("no {name} line ({hex})"));
        assert_eq!(series.len(), buckets.len(), "{name}: one point per bucket");
        assert!(series.windows(2).all(|w| w[0].0 < w[1].0), "{name}: x goes forward");
        if *name == "cumulative cost (USD)" {
            // SVG y grows downwards: a rising cost has falling y.
            assert!(series.windows(2).all(|w| w[1].1 <= w[0].1), "the cost line falls: {series:?}");
            assert!(series.last().unwrap().1 < series.first().unwrap().1, "the cost line is flat");
        }
    }

    // The text report: throughput and the controller's path.
    let human = backfill_async(fx.dir.path(), &["report", &job], &[]).await;
    let human = stdout(&human);
    assert!(human.contains("throughput:") && human.contains("controller's path"), "{human}");
    // The same buckets as the chart and the JSON.
    let width = backfill::report::chart::bucket_width(report["timeline"]["bucket_seconds"].as_u64().unwrap());
    assert!(human.contains(&format!("(buckets of {width}, as in the chart)")), "{human}");
    let rows = human.lines().skip_while(|l| !l.contains("controller's path")).skip(2).filter(|l| !l.trim().is_empty()).count();
    let busy = buckets
        .iter()
        .filter(|b| b["requests"].as_u64() > Some(0) || b["items_done"].as_u64() > Some(0) || b["in_flight"].as_f64() >= Some(0.01))
        .count();
    assert_eq!(rows, busy, "{human}");
    assert!(human.contains("job total over 1 run"), "{human}");
    // `status` stays the short view.
    let status = stdout(&backfill_async(fx.dir.path(), &["status", &job], &[]).await);
    assert!(!status.contains("controller's path"), "{status}");
}
