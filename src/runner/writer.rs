//! The writer: one database transaction per finished request (a call's settlement and its
//! items' changes: the store's `BatchWrite`), in arrival order. A bounded
//! channel in front of it holds back the dispatcher when the database falls behind.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Notify, mpsc};

use super::progress::Progress;
use crate::store::{BatchWrite, ItemChange, Store, Tables, WriteReport};

/// Batches that may wait for the writer; beyond this the dispatcher waits.
pub const WRITE_QUEUE: usize = 64;

/// How often a failed write is tried again before the run stops.
const WRITE_TRIES: u32 = 4;

pub async fn write_all(
    store: Arc<dyn Store>,
    tables: Tables,
    // Bounded by `WRITE_QUEUE` at the sender; ends when every sender is dropped.
    mut writes: mpsc::Receiver<BatchWrite>,
    // Notified after each write, so a dispatcher waiting for room looks again at once.
    written: Arc<Notify>,
    progress: Arc<Progress>,
) {
    while let Some(write) = writes.recv().await {
        if write_one(store.as_ref(), &tables, &write, &progress).await.is_none() {
            // The database is gone: stop taking writes; their items stay leased and return to
            // the queue when the lease expires (or at once on --resume).
            written.notify_waiters();
            return;
        }
        written.notify_waiters();
    }
}

/// Writes one request's outcome (retrying a failed write a few times) and counts it in the progress.
/// `None` when the database kept failing: the run must stop (the reason is in `progress`).
pub async fn write_one(store: &dyn Store, tables: &Tables, write: &BatchWrite, progress: &Progress) -> Option<WriteReport> {
    let mut tries = 0;
    let report = loop {
        tries += 1;
        match store.write_batch(tables, write).await {
            Ok(report) => break report,
            Err(e) if tries < WRITE_TRIES => {
                tracing::warn!("writing a batch failed (try {tries} of {WRITE_TRIES}): {e:#}");
                tokio::time::sleep(Duration::from_millis(500 * 2u64.pow(tries))).await;
            }
            Err(e) => {
                progress.fail_writer(format!("{e:#}"));
                return None;
            }
        }
    };
    progress.add_spent(if write.settle.lost { crate::pricing::Picos::ZERO } else { write.settle.cost });
    let mut finished = 0;
    for update in &write.items {
        let counter = match update.change {
            ItemChange::Done { .. } => &progress.done,
            ItemChange::Failed { .. } => &progress.failed,
            ItemChange::Rejected { .. } => &progress.rejected,
            ItemChange::Retry { .. } => {
                progress.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        finished += 1;
    }
    let finished = finished - report.stale.min(finished);
    progress.finished_here.fetch_add(finished, Ordering::Relaxed);
    if report.stale > 0 {
        tracing::warn!(stale = report.stale, "items of a batch had lost their lease: nothing written for them");
    }
    Some(report)
}
