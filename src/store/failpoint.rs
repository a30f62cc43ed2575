//! A test hook: `BACKFILL_FAILPOINT_PAUSE_MS=write_batch:200` makes the store sleep 200 ms at
//! the named point (inside the batch write transaction, before its commit), so crash tests
//! can kill the process there. Unset, it costs one environment lookup per batch.

use std::time::Duration;

pub async fn pause(point: &str) {
    let Ok(spec) = std::env::var("BACKFILL_FAILPOINT_PAUSE_MS") else { return };
    if let Some((name, ms)) = spec.split_once(':') {
        if name == point {
            if let Ok(ms) = ms.parse::<u64>() {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
    }
}
