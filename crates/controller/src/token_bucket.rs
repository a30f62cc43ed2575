//! A token bucket driven by an explicit `now`, so real time and simulated time use the same
//! code. A request may cost more than the bucket holds (a large prompt under a small
//! tokens/min limit): it is admitted once the bucket is full enough, and the bucket goes into
//! debt, which keeps the long-run rate exact.

use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate_per_second: f64,
    burst: Duration,
    level: f64,
    updated_at: Duration,
}

impl TokenBucket {
    /// A full bucket refilling at `rate_per_second` and holding `burst` worth of rate.
    pub fn new(rate_per_second: f64, burst: Duration, now: Duration) -> Self {
        let mut bucket = Self {
            rate_per_second: rate_per_second.max(f64::MIN_POSITIVE),
            burst,
            level: 0.0,
            updated_at: now,
        };
        bucket.level = bucket.capacity();
        bucket
    }

    pub fn rate_per_second(&self) -> f64 {
        self.rate_per_second
    }

    pub fn capacity(&self) -> f64 {
        (self.rate_per_second * self.burst.as_secs_f64()).max(1.0)
    }

    /// The level at `now` (negative while in debt).
    pub fn level(&mut self, now: Duration) -> f64 {
        self.refill(now);
        self.level
    }

    /// Changes the refill rate from `now` on; what was earned so far is kept.
    pub fn set_rate(&mut self, rate_per_second: f64, now: Duration) {
        self.refill(now);
        self.rate_per_second = rate_per_second.max(f64::MIN_POSITIVE);
        self.level = self.level.min(self.capacity());
    }

    /// How long from `now` until a request costing `cost` is admitted (zero: now).
    pub fn wait_for(&mut self, cost: f64, now: Duration) -> Duration {
        self.refill(now);
        let needed = cost.min(self.capacity());
        if self.level >= needed {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((needed - self.level) / self.rate_per_second)
    }

    /// Takes `cost` at `now`, going into debt if needed.
    pub fn take(&mut self, cost: f64, now: Duration) {
        self.refill(now);
        self.level -= cost;
    }

    /// Holds `burst` worth of rate from `now` on (the level is kept within it).
    pub fn set_burst(&mut self, burst: Duration, now: Duration) {
        self.refill(now);
        self.burst = burst;
        self.level = self.level.min(self.capacity());
    }

    /// Sets the level to `level` within the capacity (e.g. what the provider says remains
    /// when nothing of ours is known to it yet).
    pub fn set_level(&mut self, level: f64, now: Duration) {
        self.refill(now);
        self.level = level.min(self.capacity());
    }

    /// Lowers the level to `at_most` (e.g. what the provider says remains).
    pub fn limit_level(&mut self, at_most: f64, now: Duration) {
        self.refill(now);
        self.level = self.level.min(at_most);
    }

    /// Empties the bucket (after the provider said it was empty).
    pub fn drain(&mut self, now: Duration) {
        self.limit_level(0.0, now);
    }

    fn refill(&mut self, now: Duration) {
        if now > self.updated_at {
            let earned = (now - self.updated_at).as_secs_f64() * self.rate_per_second;
            self.level = (self.level + earned).min(self.capacity());
            self.updated_at = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn paces_at_the_rate_after_the_burst() {
        let mut bucket = TokenBucket::new(10.0, SECOND, Duration::ZERO);
        let mut now = Duration::ZERO;
        let mut sent = 0;
        while now < Duration::from_secs(10) {
            let wait = bucket.wait_for(1.0, now);
            now += wait;
            bucket.take(1.0, now);
            sent += 1;
        }
        // 10 burst + 10/s for 10 s, give or take the last one.
        assert!((109..=111).contains(&sent), "sent {sent}");
    }

    #[test]
    fn large_cost_waits_for_a_full_bucket_then_goes_into_debt() {
        let mut bucket = TokenBucket::new(100.0, SECOND, Duration::ZERO);
        assert_eq!(bucket.wait_for(500.0, Duration::ZERO), Duration::ZERO);
        bucket.take(500.0, Duration::ZERO);
        // Debt of 400 plus a full bucket of 100 again: 5 s.
        let wait = bucket.wait_for(500.0, Duration::ZERO);
        assert!((wait.as_secs_f64() - 5.0).abs() < 1e-9, "{wait:?}");
    }

    #[test]
    fn lowering_the_rate_keeps_the_earned_level_within_the_new_capacity() {
        let mut bucket = TokenBucket::new(100.0, SECOND, Duration::ZERO);
        bucket.set_rate(10.0, SECOND);
        assert_eq!(bucket.level(SECOND), 10.0);
        bucket.drain(SECOND);
        let wait = bucket.wait_for(1.0, SECOND);
        assert!((wait.as_secs_f64() - 0.1).abs() < 1e-9);
    }
}
