//! In-flight requests: enough to carry the paced rate (Little's law: rate × recent p90
//! latency × headroom), within the job's `[limits] concurrency`, and under an overload cap
//! that 503s and clustered timeouts cut multiplicatively (once per event) and that grows back
//! by one request per typical latency while it is what holds the dispatcher back.

use std::time::Duration;

use crate::config::StartMinMax;

/// Headroom over rate × p90 latency, so pacing and not concurrency binds.
const HEADROOM: f64 = 1.3;
/// The overload cap after a 503 or timeout cluster, as a share of what was in flight (a
/// gentle cut, as vector's adaptive concurrency uses: a server's queue absorbs the rest).
const OVERLOAD_CUT: f64 = 0.9;

#[derive(Debug, Clone, PartialEq)]
pub struct ConcurrencyLimit {
    range: StartMinMax,
    overload_cap: f64,
    last_cut_at: Option<Duration>,
    last_increase_at: Duration,
}

impl ConcurrencyLimit {
    pub fn new(range: StartMinMax) -> Self {
        Self {
            range,
            overload_cap: f64::from(range.max),
            last_cut_at: None,
            last_increase_at: Duration::ZERO,
        }
    }

    pub fn overload_cap(&self) -> f64 {
        self.overload_cap
    }

    pub fn set_overload_cap(&mut self, cap: f64) {
        self.overload_cap = cap.clamp(f64::from(self.range.min), f64::from(self.range.max));
    }

    /// The limit for a paced rate of `requests_per_second` (infinite when unpaced) and the
    /// recent p90 latency of such requests, if known, plus the `burst` of requests a
    /// provider's bucket lets go out at once on top of that rate.
    pub fn limit(&self, requests_per_second: f64, p90_seconds: Option<f64>, burst: f64) -> u32 {
        let little = match p90_seconds {
            Some(p90) if requests_per_second.is_finite() => {
                (requests_per_second * p90 * HEADROOM + burst).ceil() + 1.0
            }
            Some(_) => f64::from(self.range.max),
            None => f64::from(self.range.start) + burst.ceil(),
        };
        let limit = little.min(self.overload_cap).max(1.0);
        self.range.clamp(limit.min(f64::from(u32::MAX)) as u32)
    }

    /// A request sent at `sent_at` ended overloaded (503, timeout cluster). Cuts once per
    /// event: requests sent before the previous cut do not cut again.
    pub fn on_overload(&mut self, now: Duration, sent_at: Duration, in_flight: usize) -> bool {
        if self.last_cut_at.is_some_and(|cut| sent_at < cut) {
            return false;
        }
        let before = self.overload_cap;
        let base = (in_flight as f64).min(self.overload_cap).max(1.0);
        self.set_overload_cap((base * OVERLOAD_CUT).floor());
        self.last_cut_at = Some(now);
        self.last_increase_at = now;
        tracing::info!(
            from = before,
            to = self.overload_cap,
            "overload: concurrency cut"
        );
        true
    }

    /// Grows the overload cap by one per `typical_latency` while it binds.
    pub fn advance(&mut self, now: Duration, cap_binding: bool, typical_latency: Duration) {
        if !cap_binding {
            self.last_increase_at = self
                .last_increase_at
                .max(now.saturating_sub(typical_latency));
            return;
        }
        if now.saturating_sub(self.last_increase_at) >= typical_latency
            && self.overload_cap < f64::from(self.range.max)
        {
            self.set_overload_cap(self.overload_cap + 1.0);
            self.last_increase_at = now;
            tracing::debug!(cap = self.overload_cap, "concurrency cap raised");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn littles_law_within_the_range() {
        let limit = ConcurrencyLimit::new(StartMinMax::new(4, 1, 64));
        assert_eq!(limit.limit(10.0, None, 0.0), 4);
        assert_eq!(limit.limit(10.0, Some(2.0), 0.0), 27);
        assert_eq!(limit.limit(100.0, Some(2.0), 0.0), 64);
        assert_eq!(limit.limit(0.01, Some(2.0), 0.0), 2);
        // A provider's burst of 10 requests goes out on top of the paced rate.
        assert_eq!(limit.limit(10.0, Some(2.0), 10.0), 37);
        assert_eq!(limit.limit(10.0, None, 10.0), 14);
    }

    #[test]
    fn one_cut_per_overload_event() {
        let mut limit = ConcurrencyLimit::new(StartMinMax::new(4, 1, 64));
        let second = Duration::from_secs(1);
        assert!(limit.on_overload(10 * second, 9 * second, 40));
        assert_eq!(limit.overload_cap(), 36.0);
        // Sent before the cut: same event.
        assert!(!limit.on_overload(10 * second, 9 * second, 39));
        assert!(limit.on_overload(12 * second, 11 * second, 30));
        assert_eq!(limit.overload_cap(), 27.0);
    }

    #[test]
    fn cap_grows_back_only_while_binding() {
        let mut limit = ConcurrencyLimit::new(StartMinMax::new(4, 1, 64));
        let second = Duration::from_secs(1);
        limit.on_overload(second, second, 20);
        limit.advance(10 * second, false, second);
        assert_eq!(limit.overload_cap(), 18.0);
        limit.advance(11 * second, true, second);
        limit.advance(12 * second, true, second);
        assert_eq!(limit.overload_cap(), 20.0);
    }
}
