//! The budget cap: reservations before sending, settlement after, and the invariant that spend
//! never passes the cap by more than calls overran their reservations. A store-level property
//! test any `Store` backend can run, and the real binary stopping at the cap (exit 3) and going
//! on after `--resume` with a higher one.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use backfill::job::{Job, LoadOptions};
use backfill::pricing::{Picos, Tier, Usage};
use backfill::store::{BatchWrite, CallSettle, Created, NewCall, NewRun, Store, Tables, Worker, now_ms};
use serde_json::Value;

use crate::support::*;

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
pub async fn reservations_hold_the_cap(store: Arc<dyn Store>, tables: Tables, run_id: i64, cap: Picos, seed: u64, tasks: usize) {
    let ledger = Arc::new(Ledger::default());
    let mut handles = Vec::new();
    for task in 0..tasks {
        let (store, ledger, tables) = (store.clone(), ledger.clone(), tables.clone());
        handles.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed.wrapping_mul(1_000_003).wrapping_add(task as u64));
            let worker = Worker::current();
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
    let spend = store.spend(run_id).await.unwrap();
    eprintln!(
        "seed {seed}: {} calls granted, {} refused; spent {} + lost {} of cap {} picos, overruns {}",
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
            worker: Worker::current().id,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reservations_hold_the_cap_on_sqlite() {
    for seed in [7, 8, 9] {
        let fx = Fixture::new(5).await;
        fx.write_job("http://127.0.0.1:9/v1", "", "", "");
        let job = Job::load(&fx.job, &LoadOptions::default()).unwrap();
        let store = backfill::store::open(&job.database).await.unwrap();
        store.migrate().await.unwrap();
        let tables = Tables::from_job(&job);
        let new = NewRun { job: job.name.clone(), target: "items(summary)".into(), limit: None, max_usd: Some(0.2) };
        let Created::New(run) = store.create_run(&new, &tables).await.unwrap() else { panic!("a run existed") };
        // $0.20 = 2e11 picos: about 200 calls of estimates from 1e6 to 2e9 picos.
        reservations_hold_the_cap(store, tables, run.id, Picos::from_usd(0.2), seed, 16).await;
    }
}

async fn run_json(fx: &Fixture, extra: &[&str]) -> (std::process::Output, Value) {
    let job = fx.job.to_str().unwrap().to_owned();
    let mut args = vec!["run", job.as_str(), "--json", "--quiet"];
    args.extend_from_slice(extra);
    let output = backfill_async(fx.dir.path(), &args, &[]).await;
    let summary = serde_json::from_str(&stdout(&output)).unwrap_or(Value::Null);
    (output, summary)
}

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
