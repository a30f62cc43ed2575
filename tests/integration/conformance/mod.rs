//! The store conformance suite: the same test bodies drive the `Store` trait of the SQLite and
//! the PostgreSQL store through the library crate, so both behave alike. Every body becomes two
//! tests, `conformance::<body>::sqlite` and `conformance::<body>::postgres`.

mod batches;
mod budget;
mod counts;
pub mod harness;
mod money;
mod queue;
mod rate;
mod status;
mod writes;

use std::time::Duration;

use backfill::pricing::{Picos, Tier};
use backfill::store::{
    BatchWrite, CallSettle, Claimed, Created, ItemChange, ItemUpdate, NewCall, NewRun, OutputRecord, OutputValue, RunRecord,
    Tables, Worker,
};

pub use harness::{Db, Ids, tables};

/// Turns `async fn name(db: Arc<Db>)` bodies into a SQLite and a PostgreSQL test each.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread")]
                async fn sqlite() {
                    crate::conformance::harness::run_sqlite(|db| Box::pin(super::$name(db))).await;
                }

                #[tokio::test(flavor = "multi_thread")]
                async fn postgres() {
                    crate::conformance::harness::run_postgres(module_path!(), |db| Box::pin(super::$name(db))).await;
                }
            }
        )*
    };
}
pub(crate) use conformance;

/// For what only PostgreSQL has (the shared rate: one SQLite process paces itself, so its store
/// grants every take without a query): `conformance::<body>::postgres` alone.
macro_rules! postgres_only {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread")]
                async fn postgres() {
                    crate::conformance::harness::run_postgres(module_path!(), |db| Box::pin(super::$name(db))).await;
                }
            }
        )*
    };
}
pub(crate) use postgres_only;

/// A worker on another host: never provably gone, only by its lease.
pub fn worker(name: &str) -> Worker {
    Worker { id: format!("host-{name}/1/1"), host: format!("host-{name}"), pid: 1 }
}

pub const LEASE: Duration = Duration::from_secs(60);

/// Migrates and creates a run of `tables`, which must be new.
pub async fn new_run(db: &Db, tables: &Tables, limit: Option<u64>) -> RunRecord {
    db.store.migrate().await.unwrap();
    let new = NewRun { job: "conformance".into(), target: "summary".into(), limit, max_usd: None, ..Default::default() };
    match db.store.create_run(&new, tables).await.unwrap() {
        Created::New(run) => run,
        Created::Existing(run) => panic!("{}: run {} already existed", db.backend, run.id),
        Created::NothingPending => panic!("{}: nothing pending", db.backend),
    }
}

/// Reserves a call for these claimed items (estimate in picos).
pub async fn reserve(db: &Db, run_id: i64, worker: &Worker, claimed: &[Claimed], estimate: i64) -> i64 {
    let call = new_call(run_id, worker, claimed, estimate, None);
    db.store.reserve_call(&call, None).await.unwrap().expect("no cap, so the reservation holds")
}

pub fn new_call(run_id: i64, worker: &Worker, claimed: &[Claimed], estimate: i64, hash: Option<&str>) -> NewCall {
    NewCall {
        run_id,
        worker: worker.id.clone(),
        model: "m".into(),
        price_tier: Tier::Sync,
        request_hash: hash.map(str::to_owned),
        item_ids: claimed.iter().map(|c| c.item.id.clone()).collect(),
        concurrency: 4,
        estimated: Picos(estimate),
        started_at: backfill::store::now_ms(),
    }
}

/// A settled, answered call costing `cost` picos.
pub fn settled(cost: i64, items_ok: u32) -> CallSettle {
    CallSettle {
        latency_ms: Some(120),
        http_status: Some(200),
        outcome: "ok".into(),
        usage: backfill::pricing::Usage { prompt_tokens: 100, completion_tokens: 40, cached_tokens: 0 },
        cost: Picos(cost),
        cost_source: "price_table".into(),
        items_ok,
        ..CallSettle::default()
    }
}

/// Every claimed item done with `"<prefix> <id>"` as its text output.
pub fn done_all(claimed: &[Claimed], prefix: &str) -> Vec<ItemUpdate> {
    claimed
        .iter()
        .map(|c| ItemUpdate {
            lease: c.lease.clone(),
            change: ItemChange::Done { values: vec![(String::new(), OutputValue::Text(format!("{prefix} {}", c.item.id)))] },
            output: Some(OutputRecord { status: "written".into(), raw: None, final_json: None, detail: None }),
        })
        .collect()
}

pub fn batch(run_id: i64, call_id: i64, settle: CallSettle, items: Vec<ItemUpdate>) -> BatchWrite {
    BatchWrite { run_id, call_id, settle, items }
}

/// SQL quoting of an id as the test table stores it.
pub fn id_literal(db: &Db, ids: Ids, id: &str) -> String {
    match ids {
        Ids::Integer => id.to_owned(),
        Ids::Uuid if db.is_postgres() => format!("'{id}'::uuid"),
        _ => format!("'{id}'"),
    }
}
