//! Several `backfill run --resume` processes sharing one PostgreSQL run and one provider
//! account: the queue (SKIP LOCKED), the rate limit (the shared bucket), and a worker killed
//! with SIGKILL midway whose items the others finish.

use std::time::Duration;

use crate::postgres::{spawn_worker, wait_for};
use crate::support::limited::{AccountLimit, LimitedProvider};
use crate::support::pg::PgFixture;
use crate::support::*;

/// Worker processes, killed if the test fails before they end.
struct Workers(Vec<Option<std::process::Child>>);

impl Drop for Workers {
    fn drop(&mut self) {
        for child in self.0.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn three_workers_share_one_run_and_one_rate_limit_and_survive_a_sigkill() {
    let rows = 600;
    let Some(fx) = PgFixture::new(module_path!(), rows).await else { return };
    // 600 requests/min with a one-second burst; the job does not say the limit: the workers
    // learn it from the headers and share it through the database.
    let account = LimitedProvider::start(AccountLimit {
        requests_per_minute: 600.0,
        burst: Duration::from_secs(1),
        latency_ms: (50, 250),
    })
    .await;
    fx.write_job(
        &account.base_url(),
        "",
        "items_per_request = { start = 5, min = 1, max = 5 }\nconcurrency = { start = 2, min = 1, max = 16 }\nlease_seconds = 8",
    );
    let mut workers = Workers((0..3).map(|_| Some(spawn_worker(fx.dir.path(), &fx.job, &[]))).collect());

    // SIGKILL the second worker once a third of the items are done.
    let mut killed = false;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let done = fx.scalar_or_zero("SELECT COUNT(*) FROM backfill_items WHERE state = 'done'").await;
        if done >= rows as i64 / 3 {
            let mut victim = workers.0[1].take().unwrap();
            victim.kill().unwrap();
            victim.wait().unwrap();
            killed = true;
            break;
        }
    }
    assert!(killed, "the run never got a third of the way");
    for worker in std::mem::take(&mut workers.0).into_iter().flatten() {
        let output = wait_for(worker).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    }

    // Every item done exactly once, each written to its own row.
    assert_eq!(fx.scalar("SELECT COUNT(*) FROM backfill_runs").await, 1);
    assert_eq!(fx.scalar("SELECT COUNT(*) FROM backfill_items WHERE state = 'done'").await, rows as i64);
    assert_eq!(
        fx.scalar("SELECT COUNT(*) FROM (SELECT item_id FROM backfill_outputs WHERE status = 'written' GROUP BY item_id HAVING COUNT(*) > 1) d").await,
        0
    );
    assert_eq!(fx.scalar("SELECT COUNT(DISTINCT item_id) FROM backfill_outputs WHERE status = 'written'").await, rows as i64);
    for (id, title, body, summary) in fx.rows().await {
        assert_eq!(summary.as_deref(), Some(expected_output(&id.to_string(), &title, &body).as_str()), "row {id}");
    }

    // Together they kept under the account's limit: few 429s.
    let (answered, limited) = account.counts();
    let requests = answered + limited;
    assert!(limited * 50 <= requests, "{limited} of {requests} requests were rate limited (more than 2%)");
    let learned = fx.scalar("SELECT COALESCE(announced_rpm, 0)::bigint FROM backfill_rate_buckets").await;
    assert_eq!(learned, 600, "the limit from the headers is shared through the database");

    // status: three workers, the killed one gone, each with its share.
    let status = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap(), "--json"], &[]).await;
    let status: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(status["status"], "finished", "{status}");
    let workers = status["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3, "{status}");
    let done: u64 = workers.iter().map(|w| w["items_done"].as_u64().unwrap()).sum();
    assert_eq!(done, rows as u64);
    assert!(workers.iter().all(|w| w["items_done"].as_u64().unwrap() > 0), "every worker did a share: {status}");
    assert!(workers.iter().all(|w| w["alive"] == false), "all detached or gone at the end: {status}");
    eprintln!(
        "three workers: {requests} requests, {limited} × 429, shares {:?}",
        workers.iter().map(|w| w["items_done"].as_u64().unwrap()).collect::<Vec<_>>()
    );
}
