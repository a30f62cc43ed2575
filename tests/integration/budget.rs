//! The budget cap through the real binary: it stops near the cap (exit 3) without passing it,
//! and goes on after `--resume` with a higher one. The store-level property test of the cap is
//! in the conformance suite (`conformance::budget`), run on SQLite and PostgreSQL.

use serde_json::Value;

use crate::support::*;

/// The bug: a $5.00 cap fired at $1.78 of real spend, because estimates were counted
/// as spend. Here the cap holds (spend never passes it), the run uses most of it before it stops
/// with exit 3, and `--resume` with a higher cap finishes the run.
#[tokio::test(flavor = "multi_thread")]
async fn the_cap_stops_the_run_near_the_cap_and_a_higher_cap_resumes_it() {
    let fx = Fixture::new(300).await;
    // Eight calls in flight, each reserving room for 200 output tokens per item while the
    // model writes about 20: the reservations far exceed what the calls cost.
    let fake = FakeProvider::start_with_latency(vec![], vec![(1.0, Reply::Padded(20))], 41, (50, 150)).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 8, min = 8, max = 8 }", "");
    let text = std::fs::read_to_string(&fx.job).unwrap();
    std::fs::write(&fx.job, text.replace("max_output_tokens_per_item = 60", "max_output_tokens_per_item = 200")).unwrap();
    let cap = 0.004;
    let (output, summary) = run_json(&fx, &["--max-usd", &cap.to_string()]).await;
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert_eq!(summary["status"], "budget");
    let spent = summary["cost_usd"].as_f64().unwrap();
    let possibly = summary["possibly_billed_usd"].as_f64().unwrap();
    assert!(spent + possibly <= cap, "spent ${spent} (+${possibly} possibly billed) passes the cap ${cap}");
    eprintln!("stopped at ${spent:.6} (+${possibly:.6} possibly billed) of the ${cap} cap");
    assert!(spent > 0.8 * cap, "the cap fired at ${spent} of ${cap}: estimates counted as spend?");
    let done = summary["items"]["done"].as_u64().unwrap();
    assert!(done > 0 && done < 300, "{done} done");
    assert!(stderr(&output).contains("--max-usd"), "the message says how to go on: {}", stderr(&output));

    // Resuming under the same cap sends nothing and stops again.
    let sent = fake.records().len();
    let (output, _) = run_json(&fx, &["--resume", "--max-usd", &cap.to_string()]).await;
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert_eq!(fake.records().len(), sent, "a call was sent past the cap");

    let (output, summary) = run_json(&fx, &["--resume", "--max-usd", "1.00"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["status"], "finished");
    assert_eq!(summary["items"]["done"], 300);
    assert_eq!(summary["budget_usd"], 1.0);
    assert_ledger_matches(&fx, &fake).await;
    let status = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap(), "--json"], &[]).await;
    let status: Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(status["budget_usd"], 1.0, "status shows the cap the run continued under");
}
