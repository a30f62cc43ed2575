//! Test hooks for crash tests, driven by the environment; unset, each costs one lookup.
//! They exist only in builds with the `failpoints` feature (the tests turn it on, Cargo.toml);
//! in any other build both functions are empty and the variables do nothing.
//!
//! - `BACKFILL_FAILPOINT_PAUSE_MS=write_batch:200` sleeps 200 ms at the named point (inside the
//!   batch write transaction, before its commit), so a test can kill the process there.
//! - `BACKFILL_FAILPOINT_CRASH=batch_after_upload` (or `name:N` for the N-th time the point is
//!   reached) aborts the process at the named point, as `kill -9` would, without running any
//!   destructor or flushing anything.
//! - `BACKFILL_ENQUEUE_CHUNK=50` enqueues a new run's ids 50 per chunk (`store::enqueue_chunk`).

#[cfg(feature = "failpoints")]
use std::sync::atomic::{AtomicU64, Ordering};
#[cfg(feature = "failpoints")]
use std::time::Duration;

#[cfg(not(feature = "failpoints"))]
pub async fn pause(_point: &str) {}

#[cfg(not(feature = "failpoints"))]
pub fn crash(_point: &str) {}

#[cfg(not(feature = "failpoints"))]
pub fn number(_var: &str) -> Option<u64> {
    None
}

/// A number from the environment (`BACKFILL_ENQUEUE_CHUNK=50` makes small tables enqueue in
/// several chunks).
#[cfg(feature = "failpoints")]
pub fn number(var: &str) -> Option<u64> {
    std::env::var(var).ok()?.parse().ok()
}

#[cfg(feature = "failpoints")]
pub async fn pause(point: &str) {
    let Ok(spec) = std::env::var("BACKFILL_FAILPOINT_PAUSE_MS") else { return };
    if let Some((name, ms)) = spec.split_once(':')
        && name == point
            && let Ok(ms) = ms.parse::<u64>() {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
}

/// How many times a crash point named by the environment was reached.
#[cfg(feature = "failpoints")]
static HITS: AtomicU64 = AtomicU64::new(0);

#[cfg(feature = "failpoints")]
pub fn crash(point: &str) {
    let Ok(spec) = std::env::var("BACKFILL_FAILPOINT_CRASH") else { return };
    let (name, nth) = match spec.split_once(':') {
        Some((name, n)) => (name, n.parse::<u64>().unwrap_or(1)),
        None => (spec.as_str(), 1),
    };
    if name == point && HITS.fetch_add(1, Ordering::SeqCst) + 1 >= nth {
        eprintln!("backfill: crash point {point} reached (BACKFILL_FAILPOINT_CRASH)");
        std::process::abort();
    }
}
