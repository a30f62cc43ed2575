//! `run --dry-run` against the real run it predicts: the same job, the same rows, the fake
//! provider answering with outputs of a known length. The dry run must come within 5% of the
//! real cost when the outputs are as long as the job expects, within 10% once calibrated on an
//! earlier run when they are not — and send no request and write nothing.

use std::path::Path;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::*;

fn file_digest(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

async fn dry_run(fx: &Fixture, extra: &[&str]) -> Value {
    let job = fx.job.to_str().unwrap().to_owned();
    let mut args = vec!["run", job.as_str(), "--dry-run", "--json"];
    args.extend_from_slice(extra);
    let output = backfill_async(fx.dir.path(), &args, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    serde_json::from_str(&stdout(&output)).unwrap_or_else(|e| panic!("{e}: {}", stdout(&output)))
}

async fn real_run(fx: &Fixture, extra: &[&str]) -> Value {
    let (output, summary) = run_json(fx, extra).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(!summary.is_null(), "no JSON summary on stdout: {}", stdout(&output));
    summary
}

/// `(runs, calls)` rows in the runner tables, `None` when they do not exist.
async fn runner_rows(fx: &Fixture) -> Option<(i64, i64)> {
    let pool = fx.pool().await;
    let tables: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sqlite_master WHERE name = 'backfill_runs'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let rows = if tables == 0 {
        None
    } else {
        Some(
            sqlx::query_as("SELECT (SELECT COUNT(*) FROM backfill_runs), (SELECT COUNT(*) FROM backfill_calls)")
                .fetch_one(&pool)
                .await
                .unwrap(),
        )
    };
    pool.close().await;
    rows
}

fn relative_error(estimate: f64, actual: f64) -> f64 {
    (estimate - actual).abs() / actual
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_predicts_the_cost_within_5_percent_and_sends_and_writes_nothing() {
    let fx = Fixture::new(300).await;
    let fake = FakeProvider::start(vec![], vec![(1.0, Reply::Padded(40))], 31).await;
    fx.write_job(&fake.base_url(), "expected_output_tokens_per_item = 40", "", "");

    let before = file_digest(&fx.db);
    let estimate = dry_run(&fx, &[]).await;
    assert!(fake.records().is_empty(), "the dry run sent {} requests", fake.records().len());
    assert_eq!(file_digest(&fx.db), before, "the dry run changed the database file");
    assert!(!fx.db.with_extension("db-wal").exists(), "the dry run left a WAL file");
    assert_eq!(runner_rows(&fx).await, None, "the dry run created runner tables");
    assert_eq!(estimate["pending_items"], 300);
    assert_eq!(estimate["calibrated"], false);
    for key in ["estimated_cost_usd", "requests", "input_tokens", "output_tokens"] {
        assert!(estimate[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {estimate}");
    }
    assert!(estimate.get("estimated_seconds").is_some(), "{estimate}");

    let summary = real_run(&fx, &[]).await;
    assert_eq!(summary["items"]["done"], 300);
    let actual = summary["cost_usd"].as_f64().unwrap();
    let predicted = estimate["estimated_cost_usd"].as_f64().unwrap();
    let error = relative_error(predicted, actual);
    eprintln!(
        "dry run ${predicted:.6} vs real ${actual:.6} ({:.2}% off); input {} vs {}, output {} vs {}, requests {} vs {}",
        error * 100.0,
        estimate["input_tokens"],
        summary["tokens"]["input"],
        estimate["output_tokens"],
        summary["tokens"]["output"],
        estimate["requests"],
        summary["requests"]
    );
    assert!(error < 0.05, "the dry run said ${predicted:.6}, the run cost ${actual:.6}");
    let output_error = relative_error(estimate["output_tokens"].as_f64().unwrap(), summary["tokens"]["output"].as_f64().unwrap());
    assert!(output_error < 0.05, "output tokens {} vs {}", estimate["output_tokens"], summary["tokens"]["output"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_run_the_dry_run_calibrates_output_tokens_from_the_ledger() {
    let fx = Fixture::new(400).await;
    // The job expects 15 tokens per answer; the model writes 50.
    let fake = FakeProvider::start(vec![], vec![(1.0, Reply::Padded(50))], 32).await;
    fx.write_job(&fake.base_url(), "expected_output_tokens_per_item = 15", "", "");

    let uncalibrated = dry_run(&fx, &[]).await;
    assert_eq!(uncalibrated["calibrated"], false);
    let first = real_run(&fx, &["--limit", "200"]).await;
    assert_eq!(first["items"]["done"], 200);

    let requests_before = fake.records().len();
    let rows_before = runner_rows(&fx).await;
    let before = file_digest(&fx.db);
    let calibrated = dry_run(&fx, &[]).await;
    assert_eq!(fake.records().len(), requests_before, "the dry run sent requests");
    assert_eq!(file_digest(&fx.db), before, "the dry run changed the database file");
    assert_eq!(runner_rows(&fx).await, rows_before, "the dry run wrote runner rows");
    assert_eq!(calibrated["calibrated"], true);
    assert_eq!(calibrated["pending_items"], 200);

    let second = real_run(&fx, &[]).await;
    assert_eq!(second["items"]["done"], 200, "the second run did the rest");
    assert!(fx.rows().await.iter().all(|r| r.3.is_some()));
    // The second run's own cost: its run's spend (runs are separate in the ledger).
    let actual = second["cost_usd"].as_f64().unwrap();
    let predicted = calibrated["estimated_cost_usd"].as_f64().unwrap();
    let error = relative_error(predicted, actual);
    let naive = uncalibrated["estimated_cost_usd"].as_f64().unwrap() / 2.0;
    eprintln!(
        "calibrated ${predicted:.6} vs real ${actual:.6} ({:.2}% off); uncalibrated said ${naive:.6} ({:.1}% off)",
        error * 100.0,
        relative_error(naive, actual) * 100.0
    );
    assert!(error < 0.10, "the calibrated dry run said ${predicted:.6}, the run cost ${actual:.6}");
    assert!(relative_error(naive, actual) > 0.10, "the outputs were not long enough to need calibration");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dry_run_reports_on_stdout_and_warns_when_the_estimate_passes_the_cap() {
    let fx = Fixture::new(200).await;
    let fake = FakeProvider::start(vec![], vec![], 33).await;
    fx.write_job(&fake.base_url(), "expected_output_tokens_per_item = 40", "", "");
    let job = fx.job.to_str().unwrap().to_owned();
    // The report is the command's output: `--dry-run > estimate.txt` keeps it.
    let output = backfill_async(fx.dir.path(), &["run", &job, "--dry-run", "--max-usd", "0.0001"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.contains("dry run of test-job") && text.contains("estimated cost"), "{text}");
    assert!(text.contains("warning: the estimate") && text.contains("over the budget cap $0.0001"), "{text}");
    // Not measured yet: a range from the job's bounds, and the way to measure.
    assert!(text.contains("between $") && text.contains("backfill trial"), "{text}");
    let estimate = dry_run(&fx, &["--max-usd", "0.0001"]).await;
    assert_eq!((estimate["over_budget"].as_bool(), estimate["budget_usd"].as_f64()), (Some(true), Some(0.0001)), "{estimate}");
    let roomy = dry_run(&fx, &["--max-usd", "100"]).await;
    assert_eq!((roomy["over_budget"].as_bool(), roomy["may_pass_budget"].as_bool()), (Some(false), Some(false)), "{roomy}");

    // After a run, the duration comes from the pace it measured.
    real_run(&fx, &["--limit", "100"]).await;
    let output = backfill_async(fx.dir.path(), &["run", &job, "--dry-run"], &[]).await;
    let text = stdout(&output);
    assert!(text.contains("at the pace run") && !text.contains("duration: unknown"), "{text}");
    let estimate = dry_run(&fx, &[]).await;
    assert_eq!(estimate["calibration"]["source"], "run", "{estimate}");
    assert!(estimate["measured_seconds"].as_f64().is_some_and(|s| s > 0.0), "{estimate}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_lexicon_fails_the_dry_run_as_it_fails_the_run() {
    let fx = Fixture::new(10).await;
    let fake = FakeProvider::start(vec![], vec![], 34).await;
    fx.write_job(&fake.base_url(), "", "", "[postprocess]\nlanguage = \"nl\"\nlexicon_dir = \"no-such-dir\"\n");
    let job = fx.job.to_str().unwrap().to_owned();
    let dry = backfill_async(fx.dir.path(), &["run", &job, "--dry-run"], &[]).await;
    let run = backfill_async(fx.dir.path(), &["run", &job, "--quiet"], &[]).await;
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    assert_eq!(dry.status.code(), Some(2), "the dry run passed a job the run refuses: {}", stdout(&dry));
    assert!(stderr(&dry).contains("postprocess"), "{}", stderr(&dry));
    assert!(fake.records().is_empty());
}
