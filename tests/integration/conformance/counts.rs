//! The run's item counters (kept by triggers in every transaction that changes an item, so that
//! progress, `status` and the end of a run never count the queue) always equal a full recount,
//! after any sequence of claims, writes (done, retried, failed, rejected, stale), releases,
//! expired leases, workers that vanish (as after `kill -9`), source rows deleted under a run,
//! and changes of the run's `--limit`.

use std::sync::Arc;
use std::time::Duration;

use backfill::store::{Claimed, ItemChange, ItemCounts, ItemUpdate, Lease, OutputRecord, OutputValue, Worker};

use super::*;

conformance!(counters_equal_a_full_recount_after_random_operations);

/// The item counts, counted row by row from the database itself.
async fn recount(db: &Db, run_id: i64) -> ItemCounts {
    let n = |state: &'static str| format!("SELECT COUNT(*) FROM backfill_items WHERE run_id = {run_id} AND state = '{state}'");
    ItemCounts {
        pending: db.count(&n("pending")).await as u64,
        leased: db.count(&n("leased")).await as u64,
        done: db.count(&n("done")).await as u64,
        failed: db.count(&n("failed")).await as u64,
        rejected: db.count(&n("rejected")).await as u64,
    }
}

fn change(rng: &mut fastrand::Rng, c: &Claimed) -> ItemUpdate {
    let attempts = c.attempts + 1;
    let change = match rng.u8(0..10) {
        0..=4 => ItemChange::Done { values: vec![(String::new(), OutputValue::Text(format!("ok {}", c.item.id)))] },
        5 | 6 => ItemChange::Retry {
            attempts,
            tier: c.tier + u32::from(rng.bool()),
            group_limit: rng.bool().then(|| rng.u32(1..4)),
            // Half the retries wait out a backoff, the other half are ready at once.
            not_before: if rng.bool() { backfill::store::now_ms() + 60_000 } else { 0 },
            error: "try again".into(),
            reason: "transient".into(),
        },
        7 | 8 => ItemChange::Failed { attempts, error: "gave up".into(), reason: "invalid".into() },
        _ => ItemChange::Rejected { attempts, error: "kept refusing".into(), reason: "language".into() },
    };
    ItemUpdate {
        lease: c.lease.clone(),
        change,
        output: Some(OutputRecord { status: "written".into(), raw: None, final_json: None, detail: None }),
    }
}

async fn counters_equal_a_full_recount_after_random_operations(db: Arc<Db>) {
    const ROWS: usize = 120;
    db.source_table("items", Ids::Integer, ROWS).await;
    let t = tables("items");
    let run = new_run(&db, &t, Some(90)).await;
    let workers: Vec<Worker> = ["a", "b", "c"].iter().map(|n| worker(n)).collect();
    // What each worker holds: claims not yet written (some of them stale by now).
    let mut held: Vec<Vec<Claimed>> = vec![Vec::new(); workers.len()];
    let mut rng = fastrand::Rng::with_seed(0x5ca1e);
    for step in 0..160 {
        let w = rng.usize(0..workers.len());
        let op = rng.u8(0..12);
        match op {
            // Claim, with a normal lease or one that runs out at once.
            0..=3 => {
                let lease = if rng.u8(0..4) == 0 { Duration::from_millis(1) } else { LEASE };
                let claim = db.store.claim(&t, run.id, &workers[w], rng.usize(1..12), lease).await.unwrap();
                held[w].extend(claim.items);
            }
            // Write some of what the worker holds (stale leases are fenced off).
            4..=6 if !held[w].is_empty() => {
                let n = rng.usize(1..=held[w].len());
                let claimed: Vec<Claimed> = held[w].drain(..n).collect();
                let call = reserve(&db, run.id, &workers[w], &claimed, 10).await;
                let items = claimed.iter().map(|c| change(&mut rng, c)).collect();
                db.store.write_batch(&t, &batch(run.id, call, settled(3, n as u32), items)).await.unwrap();
            }
            // Give some back untouched.
            7 if !held[w].is_empty() => {
                let n = rng.usize(1..=held[w].len());
                let leases: Vec<Lease> = held[w].drain(..n).map(|c| c.lease).collect();
                db.store.release(run.id, &leases).await.unwrap();
            }
            // Leases that ran out go back to the queue.
            8 => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                db.store.recover(run.id).await.unwrap();
            }
            // The worker vanishes (kill -9): another one's recovery returns what it held. It
            // keeps its stale claims, whose later writes must change nothing.
            9 => {
                db.store.attach(run.id, &workers[w], Duration::from_millis(1), false).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
                let other = &workers[(w + 1) % workers.len()];
                db.store.attach(run.id, other, LEASE, false).await.unwrap();
            }
            // A source row is deleted under the run: its claim fails it.
            10 => {
                let id = rng.usize(1..=ROWS);
                db.exec(&format!("DELETE FROM items WHERE id = {id} AND summary IS NULL")).await;
            }
            // The run's --limit changes on a resume: never-attempted items leave or rows join.
            11 => {
                db.store.set_limit(&t, run.id, rng.u64(40..=ROWS as u64)).await.unwrap();
            }
            _ => {}
        }
        let counted = db.store.item_counts(run.id).await.unwrap();
        let expected = recount(&db, run.id).await;
        assert_eq!(counted, expected, "{}: step {step} (operation {op}): counters differ from a recount", db.backend);
        let status = db.store.status("conformance", Some(run.id)).await.unwrap().unwrap();
        assert_eq!(status.counts, expected, "{}: step {step}: status differs from a recount", db.backend);
    }
    // The run ends only when nothing is open, as the counters say.
    let open = recount(&db, run.id).await.open();
    let status = db.store.set_status(run.id, backfill::store::RunStatus::Finished, None).await.unwrap();
    assert_eq!(status == backfill::store::RunStatus::Finished, open == 0, "{}", db.backend);
}
