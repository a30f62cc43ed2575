//! Money and crashes: reservations against the cap (also from many workers at once),
//! settlement, calls lost with their worker and settled later from the cache, and the cache.

use std::sync::Arc;
use std::time::Duration;

use backfill::pricing::Picos;
use backfill::store::{Attach, CallSettle};

use super::*;

conformance!(
    reservations_stop_at_the_cap_and_settling_frees_the_estimate,
    concurrent_reservations_never_pass_the_cap,
    calls_of_a_dead_worker_are_lost_then_settled_from_the_cache,
    a_call_lost_without_an_answer_stays_possibly_billed,
    the_response_cache_keeps_answers_until_they_expire,
    a_ledger_summing_past_i64_saturates_and_still_reports,
);

/// Costs near `i64::MAX` (stored by a provider's absurd figure before costs were checked):
/// spend saturates instead of overflowing, the cap refuses instead of failing, and `status`
/// sums the ledger.
async fn a_ledger_summing_past_i64_saturates_and_still_reports(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 4).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let a = worker("a");
    let claimed = db.store.claim(&t, run.id, &a, 4, LEASE).await.unwrap().items;
    let huge = i64::MAX - 5;
    for pair in claimed.chunks(2) {
        let call = reserve(&db, run.id, &a, pair, 10).await;
        db.store.write_batch(&t, &batch(run.id, call, settled(huge, 2), done_all(pair, "x"))).await.unwrap();
    }
    let spend = db.store.spend(run.id).await.unwrap();
    assert_eq!(spend.spent, Picos(i64::MAX), "{}", db.backend);
    let refused = db.store.reserve_call(&new_call(run.id, &a, &claimed[..1], 10, None), Some(Picos(1_000))).await.unwrap();
    assert_eq!(refused, None, "{}: a saturated spend refuses, it does not fail", db.backend);
    let report = db.store.status(&run.job, None).await.unwrap().expect("the run");
    assert_eq!(report.models.iter().map(|m| m.cost).sum::<Picos>(), Picos(i64::MAX), "{}", db.backend);
    assert_eq!(report.job_totals.spent, Picos(i64::MAX), "{}", db.backend);
    assert!(db.store.calls(run.id).await.unwrap().iter().all(|c| c.cost.0 == huge));
}

async fn reservations_stop_at_the_cap_and_settling_frees_the_estimate(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 4).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let a = worker("a");
    let claimed = db.store.claim(&t, run.id, &a, 4, LEASE).await.unwrap().items;
    let (one, two) = claimed.split_at(2);
    let cap = Some(Picos(100));
    let first = db.store.reserve_call(&new_call(run.id, &a, one, 60, None), cap).await.unwrap().expect("60 of 100");
    assert_eq!(db.store.reserve_call(&new_call(run.id, &a, two, 60, None), cap).await.unwrap(), None, "{}", db.backend);
    let spend = db.store.spend(run.id).await.unwrap();
    assert_eq!((spend.spent.0, spend.reserved.0), (0, 60));
    // The answer cost 30: the estimate is released, 30 is spent, and 60 more fits again.
    db.store.write_batch(&t, &batch(run.id, first, settled(30, 2), done_all(one, "x"))).await.unwrap();
    let spend = db.store.spend(run.id).await.unwrap();
    assert_eq!((spend.spent.0, spend.reserved.0, spend.lost.0), (30, 0, 0));
    let second = db.store.reserve_call(&new_call(run.id, &a, two, 60, None), cap).await.unwrap();
    assert!(second.is_some());
    // Settling twice changes nothing.
    db.store.write_batch(&t, &batch(run.id, first, settled(30, 2), Vec::new())).await.unwrap();
    assert_eq!(db.store.spend(run.id).await.unwrap().spent.0, 30);
}

async fn concurrent_reservations_never_pass_the_cap(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 1).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let claimed = db.store.claim(&t, run.id, &worker("a"), 1, LEASE).await.unwrap().items;
    let mut tasks = Vec::new();
    for n in 0..4 {
        let store = db.another_store().await;
        let claimed = claimed.clone();
        tasks.push(tokio::spawn(async move {
            let me = worker(&format!("w{n}"));
            let mut granted = 0;
            for _ in 0..10 {
                if store.reserve_call(&new_call(run.id, &me, &claimed, 10, None), Some(Picos(255))).await.unwrap().is_some() {
                    granted += 1;
                }
            }
            granted
        }));
    }
    let mut granted = 0;
    for task in tasks {
        granted += task.await.unwrap();
    }
    assert_eq!(granted, 25, "{}: 40 reservations of 10 against a cap of 255", db.backend);
    assert_eq!(db.store.spend(run.id).await.unwrap().reserved.0, 250);
}

async fn calls_of_a_dead_worker_are_lost_then_settled_from_the_cache(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 3).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let (dead, alive) = (worker("dead"), worker("alive"));
    let short = Duration::from_millis(100);
    assert!(matches!(db.store.attach(run.id, &dead, short, false).await.unwrap(), Attach::Attached(_)));
    let claimed = db.store.claim(&t, run.id, &dead, 3, short).await.unwrap().items;
    let call = db.store.reserve_call(&new_call(run.id, &dead, &claimed, 40, Some("hash-1")), None).await.unwrap().unwrap();
    // The provider answered and the answer reached the cache; then the worker died.
    db.store.cache_put("hash-1", "m", "{\"answer\": true}", Duration::from_secs(3600)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let Attach::Attached(recovered) = db.store.attach(run.id, &alive, LEASE, false).await.unwrap() else { panic!("attach") };
    assert_eq!((recovered.items, recovered.calls_lost), (3, 1), "{}", db.backend);
    let spend = db.store.spend(run.id).await.unwrap();
    assert_eq!((spend.reserved.0, spend.lost.0), (0, 40));
    let lost = db.store.lost_calls(run.id).await.unwrap();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].item_ids, ["1", "2", "3"]);
    assert_eq!(lost[0].estimated.0, 40);
    // Another recovery does not count the same money again.
    assert_eq!(db.store.recover(run.id).await.unwrap().calls_lost, 0);
    assert_eq!(db.store.spend(run.id).await.unwrap().lost.0, 40);
    // The live worker replays the call from the cache: items done, money spent once.
    let replay = db.store.claim_ids(&t, run.id, &alive, &lost[0].item_ids, LEASE).await.unwrap().expect("all pending");
    db.store.write_batch(&t, &batch(run.id, call, settled(35, 3), done_all(&replay, "cached"))).await.unwrap();
    let spend = db.store.spend(run.id).await.unwrap();
    assert_eq!((spend.spent.0, spend.reserved.0, spend.lost.0), (35, 0, 0));
    assert!(db.store.lost_calls(run.id).await.unwrap().is_empty());
    assert_eq!(db.count("SELECT COUNT(*) FROM items WHERE summary LIKE 'cached %'").await, 3);
}

async fn a_call_lost_without_an_answer_stays_possibly_billed(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 2).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let a = worker("a");
    let claimed = db.store.claim(&t, run.id, &a, 2, LEASE).await.unwrap().items;
    let call = reserve(&db, run.id, &a, &claimed, 25).await;
    // A timeout: the provider may have billed it, and nothing came back.
    let timeout = CallSettle { outcome: "timeout".into(), lost: true, cost_source: "none".into(), ..CallSettle::default() };
    db.store.write_batch(&t, &batch(run.id, call, timeout, Vec::new())).await.unwrap();
    let spend = db.store.spend(run.id).await.unwrap();
    assert_eq!((spend.spent.0, spend.reserved.0, spend.lost.0), (0, 0, 25), "{}", db.backend);
    assert_eq!(spend.committed().0, 25);
    // Leaving the run returns the items it still held.
    db.store.attach(run.id, &a, LEASE, false).await.unwrap();
    db.store.detach(run.id, &a).await.unwrap();
    assert_eq!(db.store.item_counts(run.id).await.unwrap().pending, 2);
}

async fn the_response_cache_keeps_answers_until_they_expire(db: Arc<Db>) {
    db.store.migrate().await.unwrap();
    let store = &db.store;
    assert_eq!(store.cache_get("h").await.unwrap(), None);
    store.cache_put("h", "m", "body 1", Duration::from_secs(60)).await.unwrap();
    store.cache_put("h", "m", "body 2", Duration::from_secs(60)).await.unwrap();
    assert_eq!(store.cache_get("h").await.unwrap().as_deref(), Some("body 2"), "{}", db.backend);
    store.cache_put("gone", "m", "old", Duration::ZERO).await.unwrap();
    assert_eq!(store.cache_get("gone").await.unwrap(), None);
    store.cache_drop("h").await.unwrap();
    assert_eq!(store.cache_get("h").await.unwrap(), None);
}
