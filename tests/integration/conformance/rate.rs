//! The provider account's shared rate: one bucket for every worker on PostgreSQL. (SQLite, whose
//! single process paces itself, has no shared rate: its store grants every take without a
//! query, so these bodies run on PostgreSQL only.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use backfill::store::{RateCaps, RateCost, RateReport, RateTake};

use super::*;

postgres_only!(workers_share_one_rate_bucket_per_account, a_429_reported_by_one_worker_pauses_all);

fn take(account: &str, rpm: f64) -> RateTake {
    RateTake {
        account: account.into(),
        cost: RateCost { requests: 1.0, tokens: 500.0 },
        correction: RateCost::default(),
        caps: RateCaps { requests_per_minute: Some(rpm), tokens_per_minute: None },
    }
}

async fn workers_share_one_rate_bucket_per_account(db: Arc<Db>) {
    db.store.migrate().await.unwrap();
    // Three workers take greedily from one account capped at 240/min (4/s) for 2.5 s.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let store = db.another_store().await;
        tasks.push(tokio::spawn(async move {
            let mut granted = 0u32;
            while started.elapsed() < Duration::from_millis(2500) {
                let wait = store.take_rate(&take("acct", 240.0)).await.unwrap();
                if wait.is_zero() {
                    granted += 1;
                } else {
                    tokio::time::sleep(wait).await;
                }
            }
            granted
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    // The bucket starts with 2 (half a second of rate), then 4/s for everyone together.
    let most = (2.0 + 4.0 * seconds).ceil() as u32;
    assert!(total <= most, "{total} grants in {seconds:.2}s, at most {most}");
    assert!(total >= 9, "{total} grants in {seconds:.2}s: the workers together did not use the rate");
    // Another account has its own bucket.
    assert_eq!(db.store.take_rate(&take("other", 240.0)).await.unwrap(), Duration::ZERO);
}

async fn a_429_reported_by_one_worker_pauses_all(db: Arc<Db>) {
    db.store.migrate().await.unwrap();
    let caps = RateCaps::default();
    let report = RateReport {
        announced_requests_per_minute: Some(6000.0),
        rate_limited: true,
        retry_after: Some(Duration::from_secs(2)),
        ..RateReport::default()
    };
    db.store.report_rate("acct", &caps, &report).await.unwrap();
    let other = db.another_store().await;
    let unlimited = RateTake { caps, ..take("acct", 1.0) };
    let wait = other.take_rate(&unlimited).await.unwrap();
    assert!(wait > Duration::from_millis(1000) && wait <= Duration::from_secs(2), "{wait:?}");
    let (announced, limited) = (
        db.count("SELECT announced_rpm::bigint FROM backfill_rate_buckets WHERE account = 'acct'").await,
        db.count("SELECT rate_limited FROM backfill_rate_buckets WHERE account = 'acct'").await,
    );
    assert_eq!((announced, limited), (6000, 1));
}
