//! The dispatcher's wait at the budget cap, pure. The cap refused a call; calls still in flight
//! (here, waiting for the writer, or of other workers) settle at their actual cost, usually
//! below the estimate they reserved, and may make room. The run stops at the cap only when
//! nothing is in flight here and nothing is reserved any more, or after a lease's time of
//! refusals (a reservation of a worker that died is recovered by then).

use std::time::{Duration, Instant};

use crate::pricing::Picos;

#[derive(Debug, Default)]
pub struct BudgetWait {
    /// Since when the cap has refused every call.
    refused_since: Option<Instant>,
}

impl BudgetWait {
    /// A call was reserved: the cap has room again.
    pub fn sent(&mut self) {
        self.refused_since = None;
    }

    /// The cap refused a call at `now`.
    pub fn refused(&mut self, now: Instant) {
        self.refused_since.get_or_insert(now);
    }

    /// Whether the run stops at the cap, with nothing in flight here and `reserved` still
    /// reserved in the run at `now`.
    pub fn exhausted(&self, now: Instant, reserved: Picos, lease: Duration) -> bool {
        reserved == Picos::ZERO || self.refused_since.is_some_and(|since| now.saturating_duration_since(since) > lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stops_the_run_once_nothing_is_reserved_or_after_a_lease_of_refusals() {
        let (start, lease) = (Instant::now(), Duration::from_secs(60));
        let mut wait = BudgetWait::default();
        wait.refused(start);
        assert!(!wait.exhausted(start + Duration::from_secs(10), Picos(5), lease));
        assert!(wait.exhausted(start + Duration::from_secs(10), Picos::ZERO, lease));
        // Refused again later: the wait still counts from the first refusal.
        wait.refused(start + Duration::from_secs(30));
        assert!(wait.exhausted(start + Duration::from_secs(61), Picos(5), lease));
        // A call that went out resets it.
        wait.sent();
        wait.refused(start + Duration::from_secs(61));
        assert!(!wait.exhausted(start + Duration::from_secs(100), Picos(5), lease));
    }
}
