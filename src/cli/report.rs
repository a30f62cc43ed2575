//! `report`: one run in full — what `status` shows (items by state, rejection reasons, cost per
//! model and per job), its throughput, and the controller's path over time from the ledger;
//! `--chart FILE.svg` draws that path.

use std::path::Path;

use serde::Serialize;

use super::print_json;
use super::status::{StatusJson, human, load, to_json};
use crate::exit::{Exit, usage};
use crate::job::Job;
use crate::report::{Timeline, render_svg};
use crate::store::{CallRow, StatusReport};

/// Buckets of the controller's path: the same ones in the text, the chart and `--json`.
const BUCKETS: usize = 48;

#[derive(Debug, Serialize)]
struct ReportJson {
    #[serde(flatten)]
    status: StatusJson,
    throughput: Throughput,
    /// The controller's path: the ledger bucketed over the run's time.
    timeline: Timeline,
    #[serde(skip_serializing_if = "Option::is_none")]
    chart: Option<String>,
}

#[derive(Debug, Serialize)]
struct Throughput {
    /// From the first call's start to the last call's end (all invocations of the run).
    call_seconds: f64,
    items_done: u64,
    items_per_second: f64,
    requests: u64,
    items_per_request: f64,
    rate_limited: u64,
    /// Share of the run's cost per finished item, in USD.
    cost_per_item_usd: Option<f64>,
}

fn throughput(calls: &[CallRow], report: &StatusReport) -> Throughput {
    let first = calls.iter().map(|c| c.started_at).min();
    let last = calls.iter().map(|c| c.started_at + c.latency_ms.unwrap_or(0)).max();
    let call_seconds = match (first, last) {
        (Some(a), Some(b)) => (b - a).max(0) as f64 / 1000.0,
        _ => 0.0,
    };
    let items_done: u64 = calls.iter().map(|c| u64::from(c.items_ok)).sum();
    let items_sent: u64 = calls.iter().map(|c| u64::from(c.items)).sum();
    let finished = report.counts.done + report.counts.failed + report.counts.rejected;
    Throughput {
        call_seconds,
        items_done,
        items_per_second: if call_seconds > 0.0 { items_done as f64 / call_seconds } else { 0.0 },
        requests: calls.len() as u64,
        items_per_request: if calls.is_empty() { 0.0 } else { items_sent as f64 / calls.len() as f64 },
        rate_limited: calls.iter().filter(|c| c.outcome.as_deref() == Some("rate_limited")).count() as u64,
        cost_per_item_usd: (finished > 0).then(|| report.spend.spent.usd() / finished as f64),
    }
}

pub async fn report(job: &Job, run: Option<i64>, json: bool, chart: Option<&Path>) -> anyhow::Result<Exit> {
    let (store, report) = load(job, run).await?;
    let calls = store.calls(report.run.id).await?;
    let timeline = Timeline::from_calls(&calls, BUCKETS);
    let status = to_json(job, &report);
    let throughput = throughput(&calls, &report);
    let chart_written = match chart {
        Some(path) => {
            let title = format!(
                "run {} of {}: {}, {} of {} items, ${:.4}",
                report.run.id,
                job.name,
                report.run.status.as_str(),
                report.counts.done,
                report.counts.total(),
                report.spend.spent.usd()
            );
            let svg = render_svg(&timeline, &title)
                .map_err(|e| usage(format!("--chart: {e:#}")))?;
            std::fs::write(path, svg).map_err(|e| usage(format!("--chart: cannot write {}: {e}", path.display())))?;
            eprintln!("chart of run {} written to {}", report.run.id, path.display());
            Some(path.display().to_string())
        }
        None => None,
    };
    if json {
        print_json(&ReportJson { status, throughput, timeline, chart: chart_written })?;
    } else {
        let mut out = human(&status);
        out.push_str(&throughput_lines(&throughput));
        out.push_str(&path_table(&timeline));
        println!("{}", out.trim_end());
    }
    Ok(Exit::Finished)
}

fn throughput_lines(t: &Throughput) -> String {
    let mut out = format!(
        "\n  throughput: {} items answered in {:.1}s of calls, {:.2} items/s; {} requests, {:.1} items per request, {} × 429",
        t.items_done, t.call_seconds, t.items_per_second, t.requests, t.items_per_request, t.rate_limited
    );
    if let Some(per_item) = t.cost_per_item_usd {
        out.push_str(&format!("; ${per_item:.6} per finished item"));
    }
    out.push('\n');
    out
}

/// The controller's path as a table: one row per bucket with any traffic.
fn path_table(timeline: &Timeline) -> String {
    if timeline.buckets.is_empty() {
        return "  controller's path: no calls yet\n".into();
    }
    let by_clock = timeline.reads_by_clock();
    let mut out = format!(
        "  controller's path (buckets of {}, as in the chart):\n  {:>8} {:>6} {:>9} {:>6} {:>9} {:>8} {:>5} {:>12}\n",
        crate::report::chart::bucket_width(timeline.bucket_seconds),
        if by_clock { "UTC" } else { "t (s)" },
        "req",
        "items/req",
        "limit",
        "in flight",
        "items/s",
        "429",
        "cost so far"
    );
    for b in &timeline.buckets {
        if b.requests == 0 && b.items_done == 0 && b.in_flight < 0.01 {
            continue;
        }
        out.push_str(&format!(
            "  {:>8} {:>6} {:>9} {:>6} {:>9.1} {:>8.2} {:>5} {:>12}\n",
            if by_clock { timeline.clock(b.start_s) } else { format!("{:.0}", b.start_s) },
            b.requests,
            b.items_per_request.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into()),
            b.concurrency_limit.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            b.in_flight,
            b.items_per_second,
            b.rate_limited,
            format!("${:.6}", b.cumulative_cost_usd)
        ));
    }
    out
}
