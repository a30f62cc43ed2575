//! Learning a request rate the provider does not announce: grow until the first 429, then
//! settle just below the rate the provider admitted, hold, and probe upward again slowly at
//! first and faster the longer no 429 comes (so a raised limit is found within seconds).
//!
//! The provider's token bucket stores what we leave unused while below its limit and gives it
//! back while we probe above it, so this sawtooth costs little throughput; what it costs is a
//! few 429s per probe, which the controller answers with one cut and a `Retry-After` pause.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Growth per second of slow start (before the first 429).
const SLOW_START_GROWTH_PER_SECOND: f64 = 1.3;
/// After a 429 the rate never stays above this share of the rate offered at the time.
const CUT_FACTOR: f64 = 0.85;
/// The settle target as a share of the rate the provider admitted since the last 429.
const SETTLE_SHARE_OF_ADMITTED: f64 = 0.97;
/// Time constant of the approach to the settle target.
const RECOVER_TIME_CONSTANT: Duration = Duration::from_secs(2);
/// How long to stay at the settle target before probing above it.
const HOLD: Duration = Duration::from_secs(2);
/// Probe growth starts at this rate per second and doubles every `PROBE_DOUBLING`.
const PROBE_INITIAL_GROWTH: f64 = 0.05;
const PROBE_DOUBLING: Duration = Duration::from_secs(2);
const PROBE_MAX_GROWTH: f64 = 0.25;
const MINIMUM_RATE: f64 = 0.01;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbePhase {
    /// No 429 seen yet: multiplicative growth.
    SlowStart,
    /// Just cut: approaching the settle target.
    Recover,
    /// At the settle target, waiting before probing.
    Hold,
    /// Growing above the last known good rate.
    Probe,
}

/// The probed request rate (requests per second).
#[derive(Debug, Clone, PartialEq)]
pub struct RateProbe {
    rate: f64,
    target: f64,
    phase: ProbePhase,
    phase_since: Duration,
    updated_at: Duration,
}

impl RateProbe {
    pub fn new(rate: f64, phase: ProbePhase, now: Duration) -> Self {
        Self {
            rate: rate.max(MINIMUM_RATE),
            target: rate.max(MINIMUM_RATE),
            phase,
            phase_since: now,
            updated_at: now,
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn phase(&self) -> ProbePhase {
        self.phase
    }

    /// Moves the rate forward to `now`. Growth (slow start, probe) only happens while the
    /// rate is what holds the dispatcher back (`rate_is_binding`), never above `ceiling`.
    pub fn advance(&mut self, now: Duration, rate_is_binding: bool, ceiling: f64) {
        let elapsed = now.saturating_sub(self.updated_at).as_secs_f64();
        self.updated_at = now.max(self.updated_at);
        if elapsed <= 0.0 {
            return;
        }
        match self.phase {
            ProbePhase::SlowStart if rate_is_binding => {
                self.rate *= SLOW_START_GROWTH_PER_SECOND.powf(elapsed);
            }
            ProbePhase::Recover => {
                let closed = 1.0 - (-elapsed / RECOVER_TIME_CONSTANT.as_secs_f64()).exp();
                self.rate += (self.target - self.rate) * closed;
                if self.rate >= 0.99 * self.target {
                    self.rate = self.target;
                    self.enter(ProbePhase::Hold, now);
                }
            }
            ProbePhase::Hold if now.saturating_sub(self.phase_since) >= HOLD => {
                self.enter(ProbePhase::Probe, now);
            }
            ProbePhase::Probe if rate_is_binding => {
                let probing_for = now.saturating_sub(self.phase_since).as_secs_f64();
                let growth = (PROBE_INITIAL_GROWTH
                    * 2f64.powf(probing_for / PROBE_DOUBLING.as_secs_f64()))
                .min(PROBE_MAX_GROWTH);
                self.rate *= (growth * elapsed).exp();
            }
            _ => {}
        }
        self.rate = self.rate.min(ceiling).max(MINIMUM_RATE);
    }

    /// One congestion event (the first 429 of requests sent after the previous cut).
    /// `admitted_rate` is the rate the provider accepted since the previous event, when that
    /// interval is long enough to mean something; the provider's limit is at least that.
    pub fn on_congestion(&mut self, now: Duration, admitted_rate: Option<f64>) {
        let offered = self.rate;
        let target = match admitted_rate {
            Some(admitted) => (SETTLE_SHARE_OF_ADMITTED * admitted).min(offered),
            None => CUT_FACTOR * offered,
        };
        self.target = target.max(MINIMUM_RATE);
        self.rate = (CUT_FACTOR * offered).min(self.target).max(MINIMUM_RATE);
        self.enter(ProbePhase::Recover, now);
        tracing::info!(
            offered_per_s = offered,
            admitted_per_s = admitted_rate,
            new_per_s = self.rate,
            settle_per_s = self.target,
            "rate cut after 429"
        );
    }

    fn enter(&mut self, phase: ProbePhase, now: Duration) {
        if phase != self.phase {
            tracing::debug!(?phase, rate_per_s = self.rate, "rate probe phase");
        }
        self.phase = phase;
        self.phase_since = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seconds(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn slow_start_grows_only_while_binding() {
        let mut probe = RateProbe::new(1.0, ProbePhase::SlowStart, Duration::ZERO);
        probe.advance(seconds(1.0), false, f64::INFINITY);
        assert_eq!(probe.rate(), 1.0);
        probe.advance(seconds(2.0), true, f64::INFINITY);
        assert!((probe.rate() - 1.3).abs() < 1e-9);
    }

    #[test]
    fn cut_settles_below_the_admitted_rate_then_holds_then_probes() {
        let mut probe = RateProbe::new(20.0, ProbePhase::SlowStart, Duration::ZERO);
        probe.on_congestion(seconds(10.0), Some(10.0));
        assert!(probe.rate() <= 9.7 + 1e-9);
        let mut now = 10.0;
        while probe.phase() == ProbePhase::Recover {
            now += 0.1;
            probe.advance(seconds(now), true, f64::INFINITY);
        }
        assert!((probe.rate() - 9.7).abs() < 1e-9);
        now += HOLD.as_secs_f64() + 0.1;
        probe.advance(seconds(now), true, f64::INFINITY);
        assert_eq!(probe.phase(), ProbePhase::Probe);
        for _ in 0..200 {
            now += 0.1;
            probe.advance(seconds(now), true, f64::INFINITY);
        }
        // 20 s of accelerating probe more than doubles the rate: a doubled limit is found.
        assert!(probe.rate() > 19.4, "{}", probe.rate());
    }

    #[test]
    fn never_exceeds_the_ceiling() {
        let mut probe = RateProbe::new(5.0, ProbePhase::SlowStart, Duration::ZERO);
        probe.advance(seconds(30.0), true, 8.0);
        assert_eq!(probe.rate(), 8.0);
    }
}
