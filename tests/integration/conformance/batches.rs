//! Provider batches in the store: their records and request lines, items held by a batch
//! without expiry (recovery leaves them alone), and the ledger rows recorded under it.

use std::sync::Arc;
use std::time::Duration;

use backfill::store::{BatchPhase, Lease};

use super::*;

conformance!(batches_hold_their_items_and_keep_their_records);

async fn batches_hold_their_items_and_keep_their_records(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 4).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let mut batch = db.store.create_batch(run.id, "openai").await.unwrap();
    assert_eq!(batch.phase, BatchPhase::Preparing, "{}", db.backend);
    let owner = batch.owner();

    // Claimed under a short lease, then handed to the batch: no expiry any more.
    let claimed = db.store.claim(&t, run.id, &worker("a"), 3, Duration::from_millis(50)).await.unwrap().items;
    let mut leases: Vec<Lease> = claimed.iter().map(|c| c.lease.clone()).collect();
    leases.push(Lease { item_id: "4".into(), token: 1 }); // not leased: not held
    assert_eq!(db.store.hold(run.id, &leases, &owner).await.unwrap(), 3);
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(db.store.recover(run.id).await.unwrap().items, 0, "{}: held items do not expire", db.backend);
    let held = db.store.held(run.id, &owner).await.unwrap();
    assert_eq!(held.iter().map(|h| h.lease.clone()).collect::<Vec<_>>(), leases[..3].to_vec());

    // The batch's requests are ledger rows under its owner name.
    let mut call = new_call(run.id, &worker("a"), &claimed, 30, Some("h1"));
    call.worker = owner.clone();
    let call_id = db.store.reserve_call(&call, None).await.unwrap().unwrap();
    let calls = db.store.calls_of(run.id, &owner).await.unwrap();
    assert_eq!(calls.len(), 1);
    assert!(calls[0].open);
    assert_eq!((calls[0].call_id, calls[0].estimated.0, calls[0].request_hash.as_deref()), (call_id, 30, Some("h1")));
    assert_eq!(calls[0].item_ids, ["1", "2", "3"]);

    // Request lines are kept until the provider has the batch.
    db.store.set_batch_input(batch.id, Some(b"{\"custom_id\": \"r1\"}\n")).await.unwrap();
    assert_eq!(db.store.batch_input(batch.id).await.unwrap().as_deref(), Some(&b"{\"custom_id\": \"r1\"}\n"[..]));
    db.store.set_batch_input(batch.id, None).await.unwrap();
    assert_eq!(db.store.batch_input(batch.id).await.unwrap(), None);

    batch.phase = BatchPhase::Submitted;
    batch.provider_batch_id = Some("batch_abc".into());
    batch.requests = 1;
    batch.next_poll_at = 12345;
    db.store.update_batch(&batch).await.unwrap();
    let stored = db.store.batches(run.id).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!((stored[0].phase, stored[0].provider_batch_id.as_deref(), stored[0].requests), (BatchPhase::Submitted, Some("batch_abc"), 1));
    assert_eq!(stored[0].next_poll_at, 12345);

    // Results come back fenced by the held tokens; the call is settled.
    let held_claims: Vec<_> = claimed.clone();
    db.store.write_batch(&t, &batch_write(run.id, call_id, &held_claims)).await.unwrap();
    assert!(!db.store.calls_of(run.id, &owner).await.unwrap()[0].open);
    assert!(db.store.held(run.id, &owner).await.unwrap().is_empty());
    assert_eq!(db.count("SELECT COUNT(*) FROM items WHERE summary LIKE 'batch %'").await, 3);
    let report = db.store.status("conformance", Some(run.id)).await.unwrap().unwrap();
    assert_eq!(report.batches.len(), 1);
}

fn batch_write(run_id: i64, call_id: i64, claimed: &[backfill::store::Claimed]) -> backfill::store::BatchWrite {
    batch(run_id, call_id, settled(20, claimed.len() as u32), done_all(claimed, "batch"))
}
