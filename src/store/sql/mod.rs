//! The statements both stores share: the ledger and the response cache, provider batches, the
//! reports and the simple updates of runs, written once and compiled once per backend.
//!
//! `sqlite/mod.rs` and `postgres/mod.rs` each mount this folder (`#[path = "../sql/mod.rs"]`),
//! so here `super` is the backend: its store type (`Backend`), its driver (`Db`, `Tx`), the few
//! fragments of SQL in which the two differ (`dialect`), and its own modules for what differs in
//! substance (`runs`, `queue`, `source`: claims with `FOR UPDATE SKIP LOCKED`, leases on the
//! database clock, one writer). Every statement uses `$N` placeholders, which both drivers
//! accept, and standard SQL that SQLite and PostgreSQL read alike (`FILTER (WHERE …)`,
//! `CAST(… AS BIGINT)`, `ON CONFLICT … DO UPDATE`, `RETURNING`).

mod batches;
mod ledger;
mod report;
pub(super) mod runs;

use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

use super::{Backend, Db, DbRow, Tx, dialect, queue, source};
use crate::ident::Ident;
use crate::store::{Claim, Claimed, ColumnShape, Item, Lease, Queue, Source, SourceInfo, Tables, Worker};

#[async_trait]
impl Source for Backend {
    async fn inspect(&self, tables: &Tables) -> anyhow::Result<SourceInfo> {
        source::inspect(self, tables, true).await
    }

    async fn check(&self, tables: &Tables) -> anyhow::Result<()> {
        source::inspect(self, tables, false).await.map(|_| ())
    }

    fn pending_rows<'a>(&'a self, tables: &'a Tables, limit: Option<u64>) -> BoxStream<'a, anyhow::Result<Item>> {
        source::pending_rows(self, tables, limit)
    }

    async fn describe(&self, table: &Ident) -> anyhow::Result<Vec<ColumnShape>> {
        source::describe(self, table).await
    }
}

#[async_trait]
impl Queue for Backend {
    async fn claim(&self, tables: &Tables, run_id: i64, worker: &Worker, max_items: usize, lease: Duration) -> anyhow::Result<Claim> {
        queue::claim(self, tables, run_id, worker, max_items, lease).await
    }

    async fn claim_ids(&self, tables: &Tables, run_id: i64, worker: &Worker, ids: &[String], lease: Duration) -> anyhow::Result<Option<Vec<Claimed>>> {
        queue::claim_ids(self, tables, run_id, worker, ids, lease).await
    }

    async fn release(&self, run_id: i64, leases: &[Lease]) -> anyhow::Result<()> {
        queue::release(self, run_id, leases).await
    }
}
