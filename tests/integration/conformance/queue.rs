//! Runs, the queue and leases: enqueueing, claims, release, fencing of stale leases, heartbeats,
//! recovery of expired leases, and attachment.

use std::sync::Arc;
use std::time::Duration;

use backfill::store::{Attach, Created, Lease, NewRun, RunStatus, Worker};

use super::*;

conformance!(
    create_run_enqueues_pending_ids_in_order_and_one_run_at_a_time,
    a_large_enqueue_goes_in_chunks_and_a_stopped_one_is_taken_over,
    claims_lease_each_item_once_and_release_returns_them,
    concurrent_claims_never_share_an_item,
    a_stale_lease_cannot_write,
    heartbeats_keep_leases_and_expired_leases_return_to_the_queue,
    exclusive_attach_refuses_a_live_worker,
    a_dead_pid_proves_a_worker_gone_only_in_this_boot_and_pid_namespace,
);

async fn create_run_enqueues_pending_ids_in_order_and_one_run_at_a_time(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 12).await;
    db.exec("UPDATE items SET summary = 'al gedaan' WHERE id IN (2, 5)").await;
    let t = tables("items");
    assert_eq!(db.store.inspect(&t).await.unwrap().pending, 10);
    let run = new_run(&db, &t, Some(8)).await;
    assert_eq!(run.total_items, 8);
    assert_eq!(run.status, RunStatus::Running);
    let counts = db.store.item_counts(run.id).await.unwrap();
    assert_eq!((counts.pending, counts.total()), (8, 8));
    // Queue order is id order, without the rows already done.
    let claim = db.store.claim(&t, run.id, &worker("a"), 4, LEASE).await.unwrap();
    let ids: Vec<&str> = claim.items.iter().map(|c| c.item.id.as_str()).collect();
    assert_eq!(ids, ["1", "3", "4", "6"], "{}", db.backend);
    assert_eq!(claim.items[0].item.fields[0], ("title".to_string(), serde_json::json!("Motie 1")));
    // A second run of the job is refused while this one is unfinished.
    let again = NewRun { job: "conformance".into(), target: "summary".into(), limit: None, max_usd: None, ..Default::default() };
    assert!(matches!(db.store.create_run(&again, &t).await.unwrap(), Created::Existing(r) if r.id == run.id));
    assert_eq!(db.store.latest_run("conformance").await.unwrap().unwrap().id, run.id);
    assert!(db.store.runner_tables_exist().await.unwrap());
}

/// 25,000 rows enqueue in three chunks (of 10,000), in id order; a run whose enqueuer stopped
/// between chunks (its lease run out) is taken over from its cursor by the next `create_run`,
/// with that call's settings: a lower `--limit` drops the last items enqueued.
async fn a_large_enqueue_goes_in_chunks_and_a_stopped_one_is_taken_over(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 0).await;
    let pg = db.is_postgres();
    db.exec(if pg {
        "INSERT INTO items (id, title) SELECT i, 'Motie ' || i FROM generate_series(1, 25000) i"
    } else {
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 25000) \
         INSERT INTO items (id, title) SELECT i, 'Motie ' || i FROM n"
    })
    .await;
    db.exec("UPDATE items SET summary = 'al gedaan' WHERE id % 7 = 0").await;
    let pending = 25000 - 25000 / 7;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let int = if pg { "BIGINT" } else { "INTEGER" };
    let in_order = |run_id: i64| {
        format!(
            "SELECT COUNT(*) FROM (SELECT CAST(item_id AS {int}) AS id, LAG(CAST(item_id AS {int})) OVER (ORDER BY seq) AS before \
             FROM backfill_items WHERE run_id = {run_id}) q WHERE id <= before"
        )
    };
    let check = |total: i64| {
        let db = db.clone();
        let sql = in_order(run.id);
        async move {
            assert_eq!(db.count(&format!("SELECT COUNT(*) FROM backfill_items WHERE run_id = {}", run.id)).await, total, "{}", db.backend);
            assert_eq!(db.count(&format!("SELECT MAX(seq) FROM backfill_items WHERE run_id = {}", run.id)).await, total, "{}", db.backend);
            assert_eq!(db.count(&sql).await, 0, "{}: queue order is id order", db.backend);
            assert_eq!(db.store.item_counts(run.id).await.unwrap().pending, total as u64, "{}", db.backend);
        }
    };
    assert_eq!(run.total_items, pending);
    check(pending as i64).await;
    let (done, not_done) = if pg { ("true", "false") } else { ("1", "0") };
    assert_eq!(db.count(&format!("SELECT COUNT(*) FROM backfill_runs WHERE enqueued = {done} AND enqueue_owner IS NULL")).await, 1);

    // A process that stopped after 12,000 ids, its lease run out on another host.
    let stop_at = |n: i64| {
        let cursor = if pg { "item_id" } else { "CAST(item_id AS INTEGER)" };
        format!(
            "DELETE FROM backfill_items WHERE run_id = {id} AND seq > {n}; \
             UPDATE backfill_runs SET total_items = {n}, enqueued = {not_done}, enqueue_owner = '1 host-gone/1/1', \
             enqueue_expires_at = 0, enqueue_cursor = (SELECT {cursor} FROM backfill_items WHERE run_id = {id} AND seq = {n}) \
             WHERE id = {id}",
            id = run.id
        )
    };
    db.exec(&stop_at(12000)).await;
    let again = NewRun { job: "conformance".into(), target: "summary".into(), ..Default::default() };
    match db.store.create_run(&again, &t).await.unwrap() {
        Created::New(taken) => assert_eq!((taken.id, taken.total_items), (run.id, pending), "{}", db.backend),
        other => panic!("{}: {other:?}", db.backend),
    }
    check(pending as i64).await;
    // Now it is enqueued: the run exists for any later call.
    assert!(matches!(db.store.create_run(&again, &t).await.unwrap(), Created::Existing(r) if r.id == run.id));

    // Stopped again; the call that takes over says --limit 5000.
    db.exec(&stop_at(12000)).await;
    let limited = NewRun { limit: Some(5000), ..again.clone() };
    match db.store.create_run(&limited, &t).await.unwrap() {
        Created::New(taken) => assert_eq!((taken.total_items, taken.limit), (5000, Some(5000)), "{}", db.backend),
        other => panic!("{}: {other:?}", db.backend),
    }
    check(5000).await;
    // And with a limit beyond what was enqueued, the enqueue stops at the limit.
    db.exec(&stop_at(4000)).await;
    let limited = NewRun { limit: Some(14000), ..again.clone() };
    match db.store.create_run(&limited, &t).await.unwrap() {
        Created::New(taken) => assert_eq!(taken.total_items, 14000, "{}", db.backend),
        other => panic!("{}: {other:?}", db.backend),
    }
    check(14000).await;
}

async fn claims_lease_each_item_once_and_release_returns_them(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 6).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let (a, b) = (worker("a"), worker("b"));
    let first = db.store.claim(&t, run.id, &a, 4, LEASE).await.unwrap();
    let second = db.store.claim(&t, run.id, &b, 4, LEASE).await.unwrap();
    assert_eq!((first.items.len(), second.items.len()), (4, 2));
    let empty = db.store.claim(&t, run.id, &a, 4, LEASE).await.unwrap();
    assert!(empty.items.is_empty());
    assert_eq!(empty.leased, 6);
    assert_eq!(empty.next_ready_at, None);
    // A release under a wrong token does nothing; the right one returns the items.
    let wrong: Vec<Lease> = first.items.iter().map(|c| Lease { item_id: c.lease.item_id.clone(), token: c.lease.token ^ 1 }).collect();
    db.store.release(run.id, &wrong).await.unwrap();
    assert_eq!(db.store.item_counts(run.id).await.unwrap().pending, 0);
    let leases: Vec<Lease> = first.items.iter().map(|c| c.lease.clone()).collect();
    db.store.release(run.id, &leases).await.unwrap();
    let counts = db.store.item_counts(run.id).await.unwrap();
    assert_eq!((counts.pending, counts.leased), (4, 2));
    let again = db.store.claim(&t, run.id, &b, 10, LEASE).await.unwrap();
    assert_eq!(again.items.len(), 4);
    assert!(again.items.iter().all(|c| c.attempts == 0), "a release is not an attempt");
}

async fn concurrent_claims_never_share_an_item(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 200).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = db.another_store().await;
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let me = worker(&format!("w{n}"));
            let mut mine = Vec::new();
            loop {
                let claim = store.claim(&t, run.id, &me, 7, LEASE).await.unwrap();
                if claim.items.is_empty() {
                    return mine;
                }
                mine.extend(claim.items.into_iter().map(|c| c.item.id));
            }
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_by_key(|id| id.parse::<i64>().unwrap());
    let expected: Vec<String> = (1..=200).map(|i| i.to_string()).collect();
    assert_eq!(all, expected, "{}: every item claimed exactly once", db.backend);
}

async fn a_stale_lease_cannot_write(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 3).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let (slow, fast) = (worker("slow"), worker("fast"));
    let old = db.store.claim(&t, run.id, &slow, 3, Duration::from_millis(50)).await.unwrap().items;
    let old_call = reserve(&db, run.id, &slow, &old, 10).await;
    tokio::time::sleep(Duration::from_millis(120)).await;
    let recovered = db.store.recover(run.id).await.unwrap();
    assert_eq!(recovered.items, 3, "{}: expired leases go back to the queue", db.backend);
    let new = db.store.claim(&t, run.id, &fast, 3, LEASE).await.unwrap().items;
    assert_eq!(new.len(), 3);
    // The slow worker wakes up and writes under its old lease: nothing lands.
    let report = db.store.write_batch(&t, &batch(run.id, old_call, settled(7, 3), done_all(&old, "stale"))).await.unwrap();
    assert_eq!((report.written, report.stale), (0, 3));
    assert_eq!(db.count("SELECT COUNT(*) FROM items WHERE summary IS NOT NULL").await, 0);
    let new_call = reserve(&db, run.id, &fast, &new, 10).await;
    let report = db.store.write_batch(&t, &batch(run.id, new_call, settled(7, 3), done_all(&new, "fresh"))).await.unwrap();
    assert_eq!((report.written, report.stale), (3, 0));
    assert_eq!(db.text("SELECT summary FROM items WHERE id = 2").await.as_deref(), Some("fresh 2"));
    assert_eq!(db.count("SELECT COUNT(*) FROM backfill_items WHERE done_by = 'host-fast/1/1'").await, 3);
    // Both calls were answered and paid: the ledger has both.
    assert_eq!(db.store.spend(run.id).await.unwrap().spent.0, 14);
}

async fn heartbeats_keep_leases_and_expired_leases_return_to_the_queue(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 4).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let (a, b) = (worker("a"), worker("b"));
    for w in [&a, &b] {
        assert!(matches!(db.store.attach(run.id, w, Duration::from_millis(1500), false).await.unwrap(), Attach::Attached(_)));
    }
    let kept = db.store.claim(&t, run.id, &a, 2, Duration::from_millis(1500)).await.unwrap().items;
    let dropped = db.store.claim(&t, run.id, &b, 2, Duration::from_millis(1500)).await.unwrap().items;
    assert_eq!((kept.len(), dropped.len()), (2, 2));
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(db.store.heartbeat(run.id, &a, Duration::from_millis(1500)).await.unwrap());
    }
    // b's lease ran out 300 ms ago: its items are back; a's, renewed, are still a's.
    let recovered = db.store.recover(run.id).await.unwrap();
    assert_eq!(recovered.items, 2, "{}", db.backend);
    let counts = db.store.item_counts(run.id).await.unwrap();
    assert_eq!((counts.pending, counts.leased), (2, 2));
    let report = db.store.status("conformance", Some(run.id)).await.unwrap().unwrap();
    let alive: Vec<(&str, bool)> = report.workers.iter().map(|w| (w.worker.as_str(), w.alive)).collect();
    assert_eq!(alive, [("host-a/1/1", true), ("host-b/1/1", false)]);
}

async fn exclusive_attach_refuses_a_live_worker(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 2).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let (a, b) = (worker("a"), worker("b"));
    assert!(matches!(db.store.attach(run.id, &a, LEASE, true).await.unwrap(), Attach::Attached(_)));
    match db.store.attach(run.id, &b, LEASE, true).await.unwrap() {
        Attach::Busy { worker, seconds_left } => {
            assert_eq!(worker, a.id);
            assert!(seconds_left > 50.0, "{seconds_left}");
        }
        other => panic!("{}: {other:?}", db.backend),
    }
    assert!(matches!(db.store.attach(run.id, &b, LEASE, false).await.unwrap(), Attach::Attached(_)));
    // Once a detaches, an exclusive attach goes through.
    db.store.detach(run.id, &a).await.unwrap();
    db.store.detach(run.id, &b).await.unwrap();
    assert!(matches!(db.store.attach(run.id, &b, LEASE, true).await.unwrap(), Attach::Attached(_)));
}

/// The pid of a process that has just ended.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

async fn a_dead_pid_proves_a_worker_gone_only_in_this_boot_and_pid_namespace(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 6).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    // This process: `host/pid/start/instance`, the instance naming its boot and PID namespace.
    let me = Worker::current();
    let instance = me.id.rsplit('/').next().unwrap().to_owned();
    assert_eq!(me.id.split('/').count(), 4, "no boot and namespace in {}", me.id);
    let elsewhere = if instance == "0123456789abcdef" { "fedcba9876543210" } else { "0123456789abcdef" };
    let pid = dead_pid();
    let at = |id: String| Worker { id, host: me.host.clone(), pid };
    // A dead process of this host, boot and namespace; one of another container (or boot) with
    // the same host name and pid; one recorded without an instance.
    let (ours, other_container, unproven) =
        (at(format!("{}/{pid}/7/{instance}", me.host)), at(format!("{}/{pid}/7/{elsewhere}", me.host)), at(format!("{}/{pid}/7", me.host)));
    for w in [&ours, &other_container, &unproven] {
        assert!(matches!(db.store.attach(run.id, w, LEASE, false).await.unwrap(), Attach::Attached(_)));
        assert_eq!(db.store.claim(&t, run.id, w, 2, LEASE).await.unwrap().items.len(), 2);
    }
    // Only the dead process of this boot and namespace is gone; the others keep their leases
    // until they run out.
    let recovered = db.store.recover(run.id).await.unwrap();
    assert_eq!(recovered.items, 2, "{}", db.backend);
    let held = |w: &Worker| format!("SELECT COUNT(*) FROM backfill_items WHERE state = 'leased' AND lease_owner = '{}'", w.id);
    assert_eq!(db.count(&held(&ours)).await, 0);
    assert_eq!(db.count(&held(&other_container)).await, 2);
    assert_eq!(db.count(&held(&unproven)).await, 2);
    // An exclusive attach of this process is refused while they hold the run.
    match db.store.attach(run.id, &me, LEASE, true).await.unwrap() {
        Attach::Busy { worker, .. } => assert!(worker == other_container.id || worker == unproven.id, "{worker}"),
        other => panic!("{}: {other:?}", db.backend),
    }
    // Once they are gone by their leases, it goes through and gets their items back.
    let short = Duration::from_millis(300);
    for w in [&other_container, &unproven] {
        assert!(db.store.heartbeat(run.id, w, short).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    match db.store.attach(run.id, &me, LEASE, true).await.unwrap() {
        Attach::Attached(recovered) => assert_eq!(recovered.items, 4, "{}", db.backend),
        other => panic!("{}: {other:?}", db.backend),
    }
}
