//! Batch mode against the fake batch provider: the same multi-item requests through the
//! OpenAI Batch API and Anthropic's Message Batches, billed at batch prices; partial results
//! back into the queue; size limits; `--wait` and `--resume`; `--finish-sync-after`; and a
//! crash at every phase, after which nothing is submitted, written or billed twice.

use std::collections::HashMap;

use serde_json::Value;

use crate::support::batch_fake::{BatchFake, Fate};
use crate::support::*;

const BATCH: &str = "mode = \"batch\"\nbatch_poll_s = 0.05";

fn batch_job(fx: &Fixture, fake: &BatchFake, model_extra: &str, limits: &str) {
    fx.write_job(&fake.base_url(), &format!("{BATCH}\n{model_extra}"), limits, "");
}

async fn scalar(fx: &Fixture, sql: &str) -> i64 {
    let pool = fx.pool().await;
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&pool).await.unwrap();
    pool.close().await;
    n
}

/// Every row holds its own output, written once.
async fn assert_all_done_once(fx: &Fixture, rows: usize) {
    let states = fx.item_states().await;
    assert_eq!(states.len(), rows);
    assert!(states.iter().all(|(_, s, _, _)| s == "done"), "{states:?}");
    for (id, title, body, summary) in fx.rows().await {
        assert_eq!(summary.as_deref(), Some(expected_output(&id.to_string(), &title, &body).as_str()), "row {id}");
    }
    let twice = scalar(fx, "SELECT COUNT(*) FROM (SELECT item_id FROM backfill_outputs WHERE status = 'written' GROUP BY item_id HAVING COUNT(*) > 1)").await;
    assert_eq!(twice, 0, "an item was written twice");
}

/// The ledger bills exactly what the provider billed, each request once, at batch prices
/// (synchronous answers at sync prices).
async fn assert_ledger_is_the_bill(fx: &Fixture, fake: &BatchFake) {
    let billed = fake.billed();
    let batch_billed: Vec<_> = billed.iter().filter(|b| !b.0.starts_with("sync-")).collect();
    let sync_billed: Vec<_> = billed.iter().filter(|b| b.0.starts_with("sync-")).collect();
    let expected: i64 = batch_billed.iter().map(|b| fixture_batch_cost(b.1, b.2, b.3)).sum::<i64>()
        + sync_billed.iter().map(|b| fixture_cost(b.1, b.2, b.3)).sum::<i64>();
    let pool = fx.pool().await;
    let (answered, cost, prompt): (i64, i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COALESCE(SUM(cost_picos), 0), COALESCE(SUM(prompt_tokens), 0) FROM backfill_calls \
         WHERE state = 'settled' AND outcome IN ('ok', 'truncated')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let batch_answered: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM backfill_calls WHERE state = 'settled' AND outcome = 'ok' AND price_tier = 'batch'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let spent: i64 = sqlx::query_scalar("SELECT spent_picos FROM backfill_runs ORDER BY id DESC LIMIT 1").fetch_one(&pool).await.unwrap();
    let reserved: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM backfill_calls WHERE state = 'reserved'").fetch_one(&pool).await.unwrap();
    pool.close().await;
    assert_eq!(answered as usize, billed.len(), "ledger answers vs requests the provider billed");
    assert_eq!(batch_answered as usize, batch_billed.len(), "batch answers at the batch price");
    assert_eq!(prompt, billed.iter().map(|b| b.1).sum::<i64>());
    assert_eq!(cost, expected, "ledger cost vs usage × batch price");
    assert_eq!(spent, cost);
    assert_eq!(reserved, 0, "a request is still reserved");
}

/// No request was in two created batches, and no item in two, unless its request failed.
fn assert_nothing_submitted_twice(fake: &BatchFake, may_repeat: bool) {
    let mut custom_ids = HashMap::new();
    let mut items: HashMap<String, usize> = HashMap::new();
    for batch in fake.batches() {
        for (custom_id, _) in &batch.requests {
            *custom_ids.entry(custom_id.clone()).or_insert(0) += 1;
        }
        for id in batch.item_ids().into_iter().flatten() {
            *items.entry(id).or_insert(0) += 1;
        }
    }
    assert!(custom_ids.values().all(|n| *n == 1), "a request was submitted twice: {custom_ids:?}");
    if !may_repeat {
        assert!(items.values().all(|n| *n == 1), "an item was submitted twice: {items:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_run_packs_many_items_per_request_and_bills_the_batch_price() {
    let fx = Fixture::new(60).await;
    let fake = BatchFake::start().await;
    batch_job(&fx, &fake, "", "");
    let (output, summary) = run_json_with(&fx, &[], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 60, "{summary}");
    assert_all_done_once(&fx, 60).await;
    let batches = fake.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].requests.len(), 6, "10 items per request");
    assert!(batches[0].item_ids().iter().all(|ids| ids.len() == 10), "{:?}", batches[0].item_ids());
    assert_eq!(fake.uploads(), 1);
    assert_eq!(fake.sync_requests(), 0);
    assert_ledger_is_the_bill(&fx, &fake).await;
    assert_nothing_submitted_twice(&fake, false);
    // Half the synchronous price: the same usage at sync prices costs twice as much.
    let billed = fake.billed();
    let sync: i64 = billed.iter().map(|b| fixture_cost(b.1, b.2, b.3)).sum();
    let batch: i64 = billed.iter().map(|b| fixture_batch_cost(b.1, b.2, b.3)).sum();
    assert!(batch * 2 <= sync + sync / 20, "batch {batch} vs sync {sync}");

    let status = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap(), "--json"], &[]).await;
    let status: Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(status["batches"][0]["phase"], "collected", "{status}");
    assert_eq!(status["batches"][0]["provider_status"], "completed");
    assert_eq!(status["batches"][0]["requests"], 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_are_split_by_the_request_and_size_limits() {
    let fx = Fixture::new(50).await;
    let fake = BatchFake::start().await;
    batch_job(&fx, &fake, "batch_max_requests = 2", "");
    let (output, _) = run_json_with(&fx, &[], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let sizes: Vec<usize> = fake.batches().iter().map(|b| b.requests.len()).collect();
    assert_eq!(sizes, vec![2, 2, 1], "50 items, 10 per request, 2 requests per batch");
    assert_all_done_once(&fx, 50).await;

    // By size: requests of about 1.3 kB in batches of at most 3 kB.
    let fx = Fixture::new(50).await;
    let fake = BatchFake::start().await;
    fake.limit(Some(3 * 1024), None);
    batch_job(&fx, &fake, "batch_max_mb = 0.0029", "");
    let (output, _) = run_json_with(&fx, &[], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let batches = fake.batches();
    assert!(batches.len() >= 3, "{} batches", batches.len());
    assert_eq!(batches.iter().map(|b| b.requests.len()).sum::<usize>(), 5);
    assert_all_done_once(&fx, 50).await;
    assert_nothing_submitted_twice(&fake, false);
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_expired_and_errored_requests_go_into_the_next_batch() {
    let fx = Fixture::new(80).await;
    let fake = BatchFake::start().await;
    // The first batch fails validation, the second expires with 60% done, and every 4th
    // request of every batch errors with a 500.
    fake.script(vec![Fate::Fail, Fate::Expire(0.6)]);
    fake.fail_every(4);
    batch_job(&fx, &fake, "", "max_attempts = 6");
    let (output, summary) = run_json_with(&fx, &[], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 80, "{summary}");
    assert_all_done_once(&fx, 80).await;
    let batches = fake.batches();
    assert!(batches.len() >= 3, "{} batches", batches.len());
    assert_eq!(batches[0].status, "failed");
    assert_eq!(batches[1].status, "expired");
    assert_ledger_is_the_bill(&fx, &fake).await;
    assert_nothing_submitted_twice(&fake, true);
    // Failures and expiries are not billed and are in the ledger with their reason.
    assert!(scalar(&fx, "SELECT COUNT(*) FROM backfill_calls WHERE outcome = 'not_run' AND cost_picos = 0").await > 0);
    assert!(scalar(&fx, "SELECT COUNT(*) FROM backfill_calls WHERE outcome = 'batch_error' AND cost_picos = 0").await > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_zero_submits_and_exits_5_then_resume_collects() {
    let fx = Fixture::new(30).await;
    let fake = BatchFake::start().await;
    batch_job(&fx, &fake, "", "");
    let (output, summary) = run_json_with(&fx, &["--wait", "0"], &[]).await;
    assert_eq!(output.status.code(), Some(5), "{}", stderr(&output));
    assert_eq!(summary["status"], "waiting", "{summary}");
    assert_eq!(fake.batches().len(), 1);
    // A plain run refuses beside it; --resume collects.
    let refused = backfill_async(fx.dir.path(), &["run", fx.job.to_str().unwrap()], &[]).await;
    assert_eq!(refused.status.code(), Some(2));
    let (output, summary) = run_json_with(&fx, &["--resume"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 30, "{summary}");
    assert_eq!(fake.batches().len(), 1, "resume must not submit again");
    assert_all_done_once(&fx, 30).await;
    assert_ledger_is_the_bill(&fx, &fake).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn finish_sync_after_cancels_the_batch_and_sends_the_rest_synchronously() {
    let fx = Fixture::new(40).await;
    let fake = BatchFake::start().await;
    fake.script(vec![Fate::Stall]);
    batch_job(&fx, &fake, "", "");
    // Long enough for the batch to be submitted first (the run's clock starts at its creation).
    let (output, summary) = run_json_with(&fx, &["--finish-sync-after", "4s"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 40, "{summary}");
    let batches = fake.batches();
    assert_eq!(batches.len(), 1);
    assert!(batches[0].cancelled);
    assert!(fake.sync_requests() > 0, "the rest went out synchronously");
    assert_all_done_once(&fx, 40).await;
    assert_ledger_is_the_bill(&fx, &fake).await;
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_calls WHERE price_tier = 'sync' AND outcome = 'ok'").await as usize, fake.sync_requests());
}

#[tokio::test(flavor = "multi_thread")]
async fn anthropic_message_batches_work_the_same_way() {
    let fx = Fixture::new(50).await;
    let fake = BatchFake::start().await;
    fake.script(vec![Fate::Expire(0.5)]);
    fake.fail_every(5);
    batch_job(&fx, &fake, "batch_api = \"anthropic\"\nstructured_output = \"none\"", "");
    let (output, summary) = run_json_with(&fx, &[], &[("OPENAI_API_KEY", "sk-ant-test")]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 50, "{summary}");
    let batches = fake.batches();
    assert!(batches.iter().all(|b| b.dialect == "anthropic"));
    assert!(batches.len() >= 2);
    assert_eq!(fake.uploads(), 0, "Anthropic takes the requests inline");
    assert_all_done_once(&fx, 50).await;
    assert_ledger_is_the_bill(&fx, &fake).await;
    assert_nothing_submitted_twice(&fake, true);
}

/// A crash at `point` (the process aborts there, like `kill -9`), then `--resume`.
async fn crash_then_resume(point: &str, dialect: &str) {
    let rows = 45;
    let fx = Fixture::new(rows).await;
    let fake = BatchFake::start().await;
    let extra = if dialect == "anthropic" { "batch_api = \"anthropic\"\nstructured_output = \"none\"" } else { "" };
    // Two requests per batch, so collection writes several requests and batches overlap.
    batch_job(&fx, &fake, &format!("{extra}\nbatch_max_requests = 2"), "");
    let (crashed, _) = run_json_with(&fx, &[], &[("BACKFILL_FAILPOINT_CRASH", point)]).await;
    assert_eq!(crashed.status.code(), None, "{point}: the process should have aborted\n{}", stderr(&crashed));
    let name = point.split(':').next().unwrap();
    assert!(stderr(&crashed).contains(&format!("crash point {name}")), "{}", stderr(&crashed));
    let (output, summary) = run_json_with(&fx, &["--resume"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{point}: {}", stderr(&output));
    assert_eq!(summary["items"]["done"], rows as u64, "{point}: {summary}");
    assert_all_done_once(&fx, rows).await;
    assert_nothing_submitted_twice(&fake, false);
    assert_ledger_is_the_bill(&fx, &fake).await;
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_runs").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_before_the_upload_loses_nothing() {
    crash_then_resume("batch_before_upload", "openai").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_upload_before_the_batch_exists_submits_once() {
    crash_then_resume("batch_after_upload", "openai").await;
    crash_then_resume("batch_before_create", "openai").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_provider_created_the_batch_adopts_it() {
    crash_then_resume("batch_after_create", "openai").await;
    crash_then_resume("batch_after_create", "anthropic").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_while_polling_downloading_or_writing_resumes_exactly() {
    crash_then_resume("batch_polling", "openai").await;
    crash_then_resume("batch_during_download", "openai").await;
    crash_then_resume("batch_during_writes:2", "openai").await;
    crash_then_resume("batch_during_writes:3", "anthropic").await;
    // Inside the write transaction of the second request, before it commits.
    crash_then_resume("write_batch:2", "openai").await;
}

/// A crash right after the provider created the batch, on an account busy with another job's
/// batches: 150 created since, so ours is on the second page of the listing, among them
/// look-alikes with as many requests (one ended, one still running) whose metadata names
/// another job. `--resume` pages on, adopts exactly its own batch, creates nothing twice and
/// bills nothing twice.
async fn crash_then_resume_on_a_busy_account(dialect: &'static str) {
    let rows = 20;
    let fx = Fixture::new(rows).await;
    let fake = BatchFake::start().await;
    let extra = if dialect == "anthropic" { "batch_api = \"anthropic\"\nstructured_output = \"none\"" } else { "" };
    batch_job(&fx, &fake, &format!("{extra}\nbatch_max_requests = 2"), "");
    let (crashed, _) = run_json_with(&fx, &[], &[("BACKFILL_FAILPOINT_CRASH", "batch_after_create")]).await;
    assert_eq!(crashed.status.code(), None, "{}", stderr(&crashed));
    let ours = fake.batches();
    assert_eq!(ours.len(), 1);
    let requests = ours[0].requests.len();
    let other_job = serde_json::json!({ "backfill": format!("other-job:items:run1:batch1:{}", 1) });
    fake.add_foreign(dialect, 1, requests, other_job.clone(), true);
    fake.add_foreign(dialect, 147, requests + 1, other_job.clone(), true);
    fake.add_foreign(dialect, 1, requests, other_job.clone(), false);
    fake.add_foreign(dialect, 1, requests, other_job, true);
    let (output, summary) = run_json_with(&fx, &["--resume"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{dialect}: {}", stderr(&output));
    assert_eq!(summary["items"]["done"], rows as u64, "{dialect}: {summary}");
    assert_eq!(fake.batches().len(), 1, "{dialect}: the batch was created again");
    assert!(fake.listings() >= 2, "{dialect}: the listing was read {} time(s)", fake.listings());
    let pool = fx.pool().await;
    let adopted: Vec<String> = sqlx::query_scalar("SELECT provider_batch_id FROM backfill_batches WHERE provider_batch_id IS NOT NULL")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert_eq!(adopted, [ours[0].id.clone()], "{dialect}");
    assert_all_done_once(&fx, rows).await;
    assert_nothing_submitted_twice(&fake, false);
    assert_ledger_is_the_bill(&fx, &fake).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_create_finds_the_batch_past_the_first_page_and_never_adopts_a_look_alike() {
    crash_then_resume_on_a_busy_account("openai").await;
    crash_then_resume_on_a_busy_account("anthropic").await;
}
