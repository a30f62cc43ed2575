//! The budget cap as a property: many workers reserve calls of random estimates against the
//! cap and settle them at random actual costs, and at every step spend stays within the cap
//! plus what settled calls overran their reservations — which is what a run can pass its cap
//! by, and only when the provider counts more tokens than the estimate did.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use backfill::pricing::{Picos, Tier, Usage};
use backfill::store::{BatchWrite, CallSettle, NewCall, Store, Tables, now_ms};

use super::*;

conformance!(reservations_under_random_costs_stay_within_the_cap_plus_overruns);

/// Three seeds of 16 concurrent reservers against a cap of $0.20 (2e11 picos): about 300 calls
/// of estimates from 1e6 to 2e9 picos each.
async fn reservations_under_random_costs_stay_within_the_cap_plus_overruns(db: Arc<Db>) {
    for seed in [7, 8, 9] {
        let table = format!("items_{seed}");
        db.source_table(&table, Ids::Integer, 1).await;
        let t = tables(&table);
        db.store.migrate().await.unwrap();
        let new = backfill::store::NewRun { job: format!("budget-{seed}"), target: "summary".into(), limit: None, max_usd: Some(0.2), ..Default::default() };
        let run = match db.store.create_run(&new, &t).await.unwrap() {
            backfill::store::Created::New(run) => run,
            backfill::store::Created::Existing(run) => panic!("run {} existed", run.id),
            backfill::store::Created::NothingPending => panic!("nothing pending"),
        };
        reservations_hold_the_cap(&db, t, run.id, Picos::from_usd(0.2), seed, 16).await;
    }
}

/// What the concurrent reservers did, shared between their tasks.
#[derive(Default)]
struct Ledger {
    granted: AtomicU64,
    refused: AtomicU64,
    /// Σ max(0, actual − estimate) over calls settled so far; added before each settle is
    /// written, so any spend a reader sees is covered.
    overrun: AtomicI64,
    /// Σ actual over calls settled as billed; Σ estimate over calls settled as lost.
    spent: AtomicI64,
    lost: AtomicI64,
}

/// Conformance (batches hold no items, so `tables` is never written): `tasks` tokio tasks reserve calls of random estimates against `cap` and settle
/// them at random actual costs (mostly below the estimate, one in ten up to 1.5× it; one in ten
/// "lost" at its estimate), with
/// a seeded RNG each. After every reservation and settlement, `spent + reserved + lost` stays
/// within `cap` plus the overruns settled so far; at the end the store's figures equal the sums
/// exactly, nothing stays reserved, and the cap admits a call of exactly what is left and
/// refuses one picodollar more.
async fn reservations_hold_the_cap(db: &Db, tables: Tables, run_id: i64, cap: Picos, seed: u64, tasks: usize) {
    let ledger = Arc::new(Ledger::default());
    let mut handles = Vec::new();
    for task in 0..tasks {
        // Each task its own store, as separate worker processes would have.
        let store = db.another_store().await;
        let (ledger, tables) = (ledger.clone(), tables.clone());
        handles.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(1_000_003).wrapping_add(task as u64));
            let worker = worker(&format!("reserver-{task}"));
            let mut refused_in_a_row = 0;
            while refused_in_a_row < 20 {
                let estimate = Picos(rng.i64(1..=2_000) * 1_000_000);
                let call = NewCall {
                    run_id,
                    worker: worker.id.clone(),
                    model: "m".into(),
                    price_tier: Tier::Sync,
                    request_hash: None,
                    item_ids: Vec::new(),
                    concurrency: tasks as u32,
                    estimated: estimate,
                    started_at: now_ms(),
                };
                let granted = store.reserve_call(&call, Some(cap)).await.unwrap();
                assert_within_cap(store.as_ref(), run_id, cap, &ledger).await;
                let Some(call_id) = granted else {
                    ledger.refused.fetch_add(1, Ordering::SeqCst);
                    refused_in_a_row += 1;
                    tokio::time::sleep(Duration::from_millis(rng.u64(0..3))).await;
                    continue;
                };
                refused_in_a_row = 0;
                ledger.granted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(rng.u64(0..4))).await;
                let lost = rng.u8(0..10) == 0;
                // Usually below the estimate (it is an upper bound); one in ten overruns it by
                // up to half (a provider tokenizer counting more than ours).
                let actual = match (lost, rng.u8(0..10)) {
                    (true, _) => estimate,
                    (false, 0) => Picos(rng.i64(estimate.0..=estimate.0 * 3 / 2)),
                    (false, _) => Picos(rng.i64(0..=estimate.0)),
                };
                if lost {
                    ledger.lost.fetch_add(estimate.0, Ordering::SeqCst);
                } else {
                    ledger.overrun.fetch_add((actual.0 - estimate.0).max(0), Ordering::SeqCst);
                    ledger.spent.fetch_add(actual.0, Ordering::SeqCst);
                }
                let settle = CallSettle {
                    latency_ms: Some(1),
                    outcome: if lost { "timeout".into() } else { "ok".into() },
                    usage: Usage::default(),
                    cost: actual,
                    cost_source: "price_table".into(),
                    lost,
                    ..CallSettle::default()
                };
                store.write_batch(&tables, &BatchWrite { run_id, call_id, settle, items: Vec::new() }).await.unwrap();
                assert_within_cap(store.as_ref(), run_id, cap, &ledger).await;
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    let store = &db.store;
    let spend = store.spend(run_id).await.unwrap();
    eprintln!(
        "{} seed {seed}: {} calls granted, {} refused; spent {} + lost {} of cap {} picos, overruns {}",
        db.backend,
        ledger.granted.load(Ordering::SeqCst),
        ledger.refused.load(Ordering::SeqCst),
        spend.spent.0,
        spend.lost.0,
        cap.0,
        ledger.overrun.load(Ordering::SeqCst)
    );
    assert_eq!(spend.reserved, Picos::ZERO, "reservations left after every call settled");
    assert_eq!(spend.spent.0, ledger.spent.load(Ordering::SeqCst), "spent is not the sum of actual costs");
    assert_eq!(spend.lost.0, ledger.lost.load(Ordering::SeqCst), "lost is not the sum of lost estimates");
    assert!(ledger.granted.load(Ordering::SeqCst) > 20 && ledger.refused.load(Ordering::SeqCst) > 0, "the cap never bit");
    // The boundary: what is left fits exactly, a picodollar more does not.
    let left = Picos(cap.0 - spend.committed().0);
    if left.0 > 0 {
        let mut call = NewCall {
            run_id,
            worker: worker("boundary").id,
            model: "m".into(),
            price_tier: Tier::Sync,
            request_hash: None,
            item_ids: Vec::new(),
            concurrency: 1,
            estimated: Picos(left.0 + 1),
            started_at: now_ms(),
        };
        assert_eq!(store.reserve_call(&call, Some(cap)).await.unwrap(), None, "a call past the cap was admitted");
        call.estimated = left;
        assert!(store.reserve_call(&call, Some(cap)).await.unwrap().is_some(), "a call of exactly what is left was refused");
    }
}

async fn assert_within_cap(store: &dyn Store, run_id: i64, cap: Picos, ledger: &Ledger) {
    let spend = store.spend(run_id).await.unwrap();
    // Read after the spend: every settlement the spend shows has its overrun counted already.
    let overrun = ledger.overrun.load(Ordering::SeqCst);
    assert!(
        spend.committed().0 <= cap.0 + overrun,
        "spent {} + reserved {} + lost {} passes the cap {} by more than the overruns {overrun}",
        spend.spent.0,
        spend.reserved.0,
        spend.lost.0,
        cap.0
    );
}

