//! Exit codes a cron job can trust: a run with too many failed items exits 6 naming the reasons
//! (and `check` exits 6 when the rules reject its text);
//! a job naming a key variable that is unset, or a value out of its range, exits 2 before
//! anything is sent or written.

use crate::support::*;

async fn runs(fx: &Fixture) -> i64 {
    let pool = fx.pool().await;
    let n = zero_while_missing(sqlx::query_scalar("SELECT COUNT(*) FROM backfill_runs").fetch_one(&pool).await);
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_with_more_failures_than_max_failed_share_exits_6_naming_the_reasons() {
    let fx = Fixture::new(20).await;
    // Every answer is malformed: with one attempt each, every item fails.
    let fake = FakeProvider::start(vec![], vec![(1.0, Reply::Malformed)], 61).await;
    fx.write_job(&fake.base_url(), "", "max_attempts = 1", "");
    let (output, summary) = run_json(&fx, &[]).await;
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(6), "{err}");
    assert_eq!(summary["status"], "too_many_failures", "{summary}");
    assert_eq!(summary["items"]["failed"], 20, "{summary}");
    let error = summary["error"].as_str().unwrap_or_default();
    for needle in ["finished with too many failures", "20 of 20 items", "max_failed_share", "20 failed: malformed", "e.g. \""] {
        assert!(error.contains(needle), "{needle:?} not in {error:?}");
        assert!(err.contains(needle), "{needle:?} not in stderr:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    // The run itself is finished (a new run takes the rows again), with the reason recorded.
    let status = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap(), "--json"], &[]).await;
    let status: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(status["status"], "finished", "{status}");
    assert!(status["last_error"].as_str().unwrap_or_default().contains("too many failures"), "{status}");

    // Within the threshold the same run exits 0.
    fx.write_job(&fake.base_url(), "", "max_attempts = 1\nmax_failed_share = 1.0", "");
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["status"], "finished", "{summary}");
    assert_eq!(summary["items"]["failed"], 20, "{summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_few_failures_within_the_share_exit_0() {
    let fx = Fixture::new(20).await;
    // The first request (10 items) is malformed; the rest answer; 10 of 20 failed with one
    // attempt, so 0.5 is within a share of 0.5 and above 0.4.
    let fake = FakeProvider::start(vec![Reply::Malformed], vec![], 62).await;
    fx.write_job(&fake.base_url(), "", "max_attempts = 1\nmax_failed_share = 0.5\nconcurrency = { start = 1, min = 1, max = 1 }", "");
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!((summary["items"]["failed"].as_u64(), summary["items"]["done"].as_u64()), (Some(10), Some(10)), "{summary}");

    let fx = Fixture::new(20).await;
    let fake = FakeProvider::start(vec![Reply::Malformed], vec![], 63).await;
    fx.write_job(&fake.base_url(), "", "max_attempts = 1\nmax_failed_share = 0.4\nconcurrency = { start = 1, min = 1, max = 1 }", "");
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert_eq!(summary["status"], "too_many_failures", "{summary}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_variable_the_job_names_must_be_set() {
    let fx = Fixture::new(5).await;
    let fake = FakeProvider::start(vec![], vec![], 64).await;
    fx.write_job(&fake.base_url(), "api_key_env = \"BACKFILL_TEST_PROVIDER_KEY\"", "", "");
    for env in [&[][..], &[("BACKFILL_TEST_PROVIDER_KEY", "")][..]] {
        let (output, _) = run_json_with(&fx, &[], env).await;
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{err}");
        assert!(err.contains("model.api_key_env") && err.contains("BACKFILL_TEST_PROVIDER_KEY"), "{err}");
    }
    assert!(fake.records().is_empty(), "a request went out without the key");
    assert_eq!(runs(&fx).await, 0, "a run was created");
    // Set, it is sent; a job naming no variable still calls without a key.
    let (output, _) = run_json_with(&fx, &[], &[("BACKFILL_TEST_PROVIDER_KEY", "sk-test-named")]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(fake.records().iter().all(|r| r.authorization.as_deref() == Some("Bearer sk-test-named")));
    let fx = Fixture::new(5).await;
    fx.write_job(&fake.base_url(), "", "", "");
    let (output, _) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread")]
async fn finite_but_huge_values_are_refused_with_the_key_and_the_range() {
    let fx = Fixture::new(2).await;
    let url = "http://127.0.0.1:9/v1";
    // (model extra, limits extra, tail, the key named)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("request_timeout_s = 1e300", "", "", "model.request_timeout_s"),
        ("mode = \"batch\"\nbatch_poll_s = 1e20", "", "", "model.batch_poll_s"),
        ("context_window = 4000000000", "", "", "model.context_window"),
        ("max_tokens = 4000000000", "", "", "model.max_tokens"),
        ("max_output_tokens_per_item = 4000000000", "", "", "model.max_output_tokens_per_item"),
        ("", "lease_seconds = 1e20", "", "limits.lease_seconds"),
        ("", "grace_seconds = 1e20", "", "limits.grace_seconds"),
        ("", "requests_per_minute = 1e-300", "", "limits.requests_per_minute"),
        ("", "tokens_per_minute = 1e300", "", "limits.tokens_per_minute"),
        ("", "max_attempts = 4000000000", "", "limits.max_attempts"),
        ("", "max_failed_share = 1.5", "", "limits.max_failed_share"),
        ("", "concurrency = { start = 4, min = 1, max = 4000000000 }", "", "limits.concurrency"),
        ("", "items_per_request = { start = 10, min = 1, max = 4000000000 }", "", "limits.items_per_request"),
        ("", "", "[cache]\nttl_hours = 1e20", "cache.ttl_hours"),
        ("", "", "[budget]\nmax_usd = 1e300", "budget.max_usd"),
    ];
    for (model, limits, tail, key) in cases {
        fx.write_job(url, model, limits, tail);
        let text = std::fs::read_to_string(&fx.job).unwrap();
        // The fixture sets max_output_tokens_per_item itself; a case that sets it replaces it.
        let text = if model.contains("max_output_tokens_per_item") { text.replacen("max_output_tokens_per_item = 60\n", "", 1) } else { text };
        std::fs::write(&fx.job, text).unwrap();
        let output = backfill(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--quiet"], &[]);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{key}: {err}");
        assert!(err.contains(key) && err.contains("at most"), "{key}: {err}");
        assert!(!err.contains("panicked"), "{key}: {err}");
    }
    // Command-line values too.
    fx.write_job(url, "", "", "");
    let job = fx.job.to_str().unwrap();
    for (args, named) in [
        (vec!["run", job, "--limit", "18446744073709551615"], "--limit"),
        (vec!["run", job, "--max-usd", "1e300"], "--max-usd"),
        (vec!["run", job, "--batch-api", "--wait", "100000000y"], "--wait"),
        (vec!["run", job, "--batch-api", "--finish-sync-after", "100000000y"], "--finish-sync-after"),
    ] {
        let output = backfill(fx.dir.path(), &args, &[]);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(named) && !err.contains("panicked"), "{args:?}: {err}");
    }
    assert_eq!(runs(&fx).await, 0);
}

/// `check` on a text read from stdin: `JOB`'s post-processing rules say what a run would do.
fn check(fx: &Fixture, text: &str, json: bool) -> std::process::Output {
    use std::io::Write;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_backfill"));
    command.current_dir(fx.dir.path()).args(["check", fx.job.to_str().unwrap()]);
    if json {
        command.arg("--json");
    }
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_exits_6_when_the_rules_reject_the_text() {
    let fx = Fixture::new(1).await;
    fx.write_job("http://127.0.0.1:9/v1", "", "", "[postprocess]\nmax_chars = 40\n");
    let kept = check(&fx, "Een korte uitleg.", false);
    assert_eq!(kept.status.code(), Some(0), "{}", stderr(&kept));
    let rejected = check(&fx, "Een uitleg die veel te lang is voor de regel van deze job.", false);
    assert_eq!(rejected.status.code(), Some(6), "{}{}", stdout(&rejected), stderr(&rejected));
    assert!(stdout(&rejected).contains("too_long"), "{}", stdout(&rejected));
    let json = check(&fx, "Een uitleg die veel te lang is voor de regel van deze job.", true);
    assert_eq!(json.status.code(), Some(6), "{}", stderr(&json));
    let outcome: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(outcome["rejections"].as_array().map(Vec::len), Some(1), "{outcome}");
}
