//! The walking pipeline against the scripted fake provider: every fault the answer validation
//! handles (ARCHITECTURE.md, "Item lifecycle"), asserting rows, item states and the ledger.

use std::time::Duration;


use crate::support::*;

/// Every written summary is the one made for its own row.
async fn assert_no_misplaced(fx: &Fixture) -> usize {
    let mut written = 0;
    for (id, title, body, summary) in fx.rows().await {
        if let Some(summary) = summary {
            assert_eq!(summary, expected_output(&id.to_string(), &title, &body), "row {id} holds another row's output");
            written += 1;
        }
    }
    written
}

#[tokio::test(flavor = "multi_thread")]
async fn happy_path_writes_every_row_once_and_ledgers_every_call() {
    let fx = Fixture::new(95).await;
    let fake = FakeProvider::start(vec![], vec![], 1).await;
    fx.write_job(&fake.base_url(), "", "", "");
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 95);
    assert_eq!(summary["items"]["pending"], 0);
    assert_eq!(summary["status"], "finished");
    assert_eq!(assert_no_misplaced(&fx).await, 95);
    let states = fx.item_states().await;
    assert!(states.iter().all(|(_, state, attempts, _)| state == "done" && *attempts == 0));
    let (calls, _, _, _) = fx.ledger_totals().await;
    assert_eq!(calls as usize, fake.records().len());
    assert_eq!(summary["requests"], calls);
    assert_ledger_matches(&fx, &fake).await;
    let cost: f64 = summary["cost_usd"].as_f64().unwrap();
    let by_model: f64 = summary["cost_by_model"]["fake-model"].as_f64().unwrap();
    assert!(cost > 0.0 && (cost - by_model).abs() < 1e-12);
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_ids_go_back_to_the_queue() {
    let fx = Fixture::new(40).await;
    let fake = FakeProvider::start(vec![Reply::DropIds(3), Reply::DropIds(3), Reply::DropIds(10)], vec![], 2).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 1, min = 1, max = 1 }", "");
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 40);
    assert_eq!(assert_no_misplaced(&fx).await, 40);
    // Each item left out of an answer costs it one attempt.
    let dropped: usize = fake
        .records()
        .iter()
        .map(|r| match r.reply {
            Reply::DropIds(n) => n.min(r.ids.len()),
            _ => 0,
        })
        .sum();
    let attempts: i64 = fx.item_states().await.iter().map(|(_, _, attempts, _)| attempts).sum();
    assert_eq!(attempts as usize, dropped);
    assert_eq!(dropped, 16);
    assert_ledger_matches(&fx, &fake).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn foreign_ids_are_discarded_and_counted_never_written() {
    let fx = Fixture::new(30).await;
    let fake = FakeProvider::start(vec![Reply::ForeignIds; 3], vec![], 3).await;
    fx.write_job(&fake.base_url(), "", "", "");
    let (output, _) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(assert_no_misplaced(&fx).await, 30);
    let pool = fx.pool().await;
    let foreign: i64 = sqlx::query_scalar("SELECT SUM(foreign_keys) FROM backfill_calls").fetch_one(&pool).await.unwrap();
    assert_eq!(foreign, 6);
    let strays: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE summary LIKE '%niemand%'").fetch_one(&pool).await.unwrap();
    assert_eq!(strays, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn prose_and_code_fences_around_the_json_are_tolerated() {
    let fx = Fixture::new(12).await;
    let fake = FakeProvider::start(vec![], vec![(1.0, Reply::Prose)], 4).await;
    fx.write_job(&fake.base_url(), "", "", "");
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 12);
    assert_eq!(assert_no_misplaced(&fx).await, 12);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_answers_are_retried_then_the_run_completes() {
    let fx = Fixture::new(20).await;
    let fake = FakeProvider::start(vec![Reply::Malformed, Reply::Malformed], vec![], 5).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 1, min = 1, max = 1 }", "");
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 20);
    assert_eq!(assert_no_misplaced(&fx).await, 20);
    let pool = fx.pool().await;
    let malformed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM backfill_calls WHERE outcome = 'malformed' AND content IS NOT NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(malformed, 2, "malformed answers are kept for audit");
    assert_ledger_matches(&fx, &fake).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn always_malformed_batches_are_split_then_fail_with_the_reason() {
    let fx = Fixture::new(8).await;
    let fake = FakeProvider::start(vec![], vec![(1.0, Reply::Malformed)], 6).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 1, min = 1, max = 1 }", "");
    let (output, summary) = run_json(&fx, &[]).await;
    // Every item failed: the run finished, but with more failures than `max_failed_share`.
    assert_eq!(output.status.code(), Some(6), "{}", stderr(&output));
    assert_eq!(summary["status"], "too_many_failures", "{summary}");
    assert_eq!(summary["items"]["failed"], 8);
    for (id, state, attempts, reason) in fx.item_states().await {
        assert_eq!((state.as_str(), attempts, reason.as_deref()), ("failed", 4, Some("malformed")), "item {id}");
    }
    assert_eq!(assert_no_misplaced(&fx).await, 0);
    let sizes: Vec<usize> = fake.records().iter().map(|r| r.ids.len()).collect();
    assert_eq!(sizes[0], 8);
    assert!(sizes.iter().any(|&n| n <= 4), "batches were split: {sizes:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_answers_keep_their_complete_entries() {
    let fx = Fixture::new(10).await;
    let fake = FakeProvider::start(vec![Reply::Truncated], vec![], 7).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 1, min = 1, max = 1 }", "");
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 10);
    assert_eq!(assert_no_misplaced(&fx).await, 10);
    let first = &fake.records()[0];
    let second = &fake.records()[1];
    assert_eq!(first.ids.len(), 10);
    assert_eq!(second.ids.len(), 1, "only the cut-off item was sent again: {:?}", second.ids);
    let pool = fx.pool().await;
    let truncated: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM backfill_calls WHERE outcome = 'truncated' AND items_ok = 9")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(truncated, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_value_types_are_invalid_and_retried() {
    let fx = Fixture::new(10).await;
    let fake = FakeProvider::start(vec![Reply::WrongTypes], vec![], 8).await;
    // One request at a time, so the first answer (a blank string for its first item, a
    // number for its second) holds both wrong types.
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 1, min = 1, max = 1 }", "");
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 10);
    assert_eq!(assert_no_misplaced(&fx).await, 10);
    let pool = fx.pool().await;
    let invalid: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM backfill_outputs WHERE status = 'invalid'").fetch_one(&pool).await.unwrap();
    assert_eq!(invalid, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limited_requests_wait_for_retry_after() {
    let fx = Fixture::new(20).await;
    let fake = FakeProvider::start(vec![Reply::RateLimited { retry_after_s: 1.5 }], vec![], 9).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 1, min = 1, max = 1 }", "");
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 20);
    assert_eq!(summary["controller"]["rate_limited"], 1);
    let records = fake.records();
    let waited = records[1].at.duration_since(records[0].at);
    assert!(waited >= Duration::from_millis(1500), "retried after {waited:?}, before Retry-After");
    // A 429 is not the items' fault: no attempt is counted.
    assert!(fx.item_states().await.iter().all(|(_, _, attempts, _)| *attempts == 0));
    assert_ledger_matches(&fx, &fake).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limited_request_goes_out_again_unchanged() {
    let fx = Fixture::new(20).await;
    let limited = Reply::RateLimited { retry_after_s: 0.3 };
    let fake = FakeProvider::start(vec![limited.clone(), limited.clone(), limited.clone(), limited], vec![], 19).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 1, min = 1, max = 1 }", "");
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 20);
    let records = fake.records();
    // The first request and its three resends carry the same items; each waited Retry-After.
    for pair in records[..4].windows(2) {
        assert_eq!(pair[0].ids, pair[1].ids);
        assert!(pair[1].at.duration_since(pair[0].at) >= Duration::from_millis(300));
    }
    let pool = fx.pool().await;
    let calls: Vec<(String, String)> = sqlx::query_as("SELECT request_hash, outcome FROM backfill_calls ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(calls[..4].iter().all(|c| c == &calls[0] || (c.0 == calls[0].0 && c.1 == "rate_limited")), "{calls:?}");
    assert_eq!(calls[0].1, "rate_limited");
    // Past three resends the items went back to the queue and came out again.
    assert_eq!(assert_no_misplaced(&fx).await, 20);
    assert!(fx.item_states().await.iter().all(|(_, _, attempts, _)| *attempts == 0));
    assert_ledger_matches(&fx, &fake).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn server_errors_are_retried_with_backoff() {
    let fx = Fixture::new(20).await;
    let fake = FakeProvider::start(vec![Reply::ServerError(500), Reply::ServerError(503), Reply::ServerError(502)], vec![], 10).await;
    fx.write_job(&fake.base_url(), "", "", "");
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 20);
    assert_eq!(assert_no_misplaced(&fx).await, 20);
    let pool = fx.pool().await;
    let transient: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM backfill_calls WHERE outcome = 'transient' AND cost_picos = 0")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(transient, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_request_is_cut_by_its_timeout_and_its_items_retried() {
    let fx = Fixture::new(30).await;
    let fake = FakeProvider::start(vec![Reply::Hang(Duration::from_secs(30))], vec![], 11).await;
    fx.write_job(&fake.base_url(), "", "", "");
    std::fs::write(&fx.job, std::fs::read_to_string(&fx.job).unwrap().replace("request_timeout_s = 5", "request_timeout_s = 1")).unwrap();
    let started = std::time::Instant::now();
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert!(started.elapsed() < Duration::from_secs(25), "the run waited for the hung request");
    assert_eq!(summary["items"]["done"], 30);
    assert_eq!(assert_no_misplaced(&fx).await, 30);
    let pool = fx.pool().await;
    let (timeouts, state): (i64, String) =
        sqlx::query_as("SELECT COUNT(*), MAX(state) FROM backfill_calls WHERE outcome = 'timeout'").fetch_one(&pool).await.unwrap();
    assert_eq!((timeouts, state.as_str()), (1, "lost"), "a timed-out call counts as possibly billed");
    assert!(summary["possibly_billed_usd"].as_f64().unwrap() > 0.0);
}

/// Property-style: under random adversarial answers (dropped, foreign, malformed, truncated,
/// wrong types, errors), no row ever receives another row's output and every item ends done or
/// failed with a reason.
#[tokio::test(flavor = "multi_thread")]
async fn adversarial_answers_never_misplace_an_output() {
    for seed in [21, 22, 23] {
        let fx = Fixture::new(60).await;
        let faults = vec![
            (0.12, Reply::DropIds(2)),
            (0.12, Reply::ForeignIds),
            (0.08, Reply::Malformed),
            (0.08, Reply::Truncated),
            (0.08, Reply::WrongTypes),
            (0.06, Reply::ServerError(500)),
            (0.05, Reply::RateLimited { retry_after_s: 0.2 }),
            (0.05, Reply::Prose),
        ];
        let fake = FakeProvider::start(vec![], faults, seed).await;
        fx.write_job(&fake.base_url(), "", "", "");
        let (output, summary) = run_json(&fx, &[]).await;
        assert_eq!(output.status.code(), Some(0), "seed {seed}: {}", stderr(&output));
        let written = assert_no_misplaced(&fx).await;
        let states = fx.item_states().await;
        assert!(states.iter().all(|(_, s, _, r)| s == "done" || (s == "failed" && r.is_some())), "seed {seed}: {states:?}");
        assert_eq!(written, states.iter().filter(|(_, s, _, _)| s == "done").count());
        assert_eq!(summary["items"]["pending"], 0);
        assert_ledger_matches(&fx, &fake).await;
    }
}

/// The acceptance run: 1,000 items against a provider with 1% 5xx, 1% malformed
/// answers and occasionally dropped items ends with every item done or failed with a reason,
/// no misplaced output, exit 0, and a ledger equal to usage × price.
#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_items_through_a_faulty_provider() {
    let fx = Fixture::new(1000).await;
    let faults = vec![(0.01, Reply::ServerError(500)), (0.01, Reply::Malformed), (0.03, Reply::DropIds(1))];
    let fake = FakeProvider::start(vec![], faults, 1000).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 8, min = 1, max = 32 }", "");
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["total"], 1000);
    assert_eq!(summary["items"]["pending"], 0);
    let states = fx.item_states().await;
    assert!(states.iter().all(|(_, s, _, r)| s == "done" || (s == "failed" && r.is_some())));
    let written = assert_no_misplaced(&fx).await;
    assert_eq!(written as u64, summary["items"]["done"].as_u64().unwrap());
    assert_ledger_matches(&fx, &fake).await;
}
