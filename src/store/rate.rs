//! A provider account's rate, shared by every worker through the database: the types the
//! `Store` trait takes, and the pure token-bucket arithmetic a store applies to its bucket row
//! inside one short transaction (so it is unit-tested without a database).
//!
//! The bucket refills at the smaller of the job's caps (`limits.requests_per_minute`,
//! `limits.tokens_per_minute`) and the limits the provider announced in `x-ratelimit-*`
//! headers times a safety share, holds half a second of its rate (so workers never burst past
//! the provider), and may go into debt for a request larger than it holds, which keeps the
//! long-run rate exact. A 429 reported by any worker pauses every worker for its
//! `Retry-After` and lowers the safety share a little (once per event); the share recovers.

use std::time::Duration;

/// Share of an announced limit the shared bucket paces at, its floor after 429s, the cut per
/// 429 event and the recovery per minute (the same figures as the controller's own pacer).
pub const ANNOUNCED_SAFETY: f64 = 0.98;
pub const SAFETY_FLOOR: f64 = 0.8;
pub const SAFETY_CUT: f64 = 0.97;
pub const SAFETY_RECOVERY_PER_MINUTE: f64 = 0.01;
/// The bucket holds this much of its rate.
pub const BURST: Duration = Duration::from_millis(500);
/// A 429 without `Retry-After` pauses everyone this long.
pub const DEFAULT_PAUSE: Duration = Duration::from_secs(1);

/// What one request costs, or a correction to what was taken (may be negative).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateCost {
    pub requests: f64,
    pub tokens: f64,
}

/// The job's own caps per minute (`None`: not capped by the job).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateCaps {
    pub requests_per_minute: Option<f64>,
    pub tokens_per_minute: Option<f64>,
}

/// One worker's request to send: take `cost` when the bucket holds it. `correction` is applied
/// first, unconditionally: the difference between what earlier takes estimated and what the
/// requests really cost (a refund when a take sent nothing).
#[derive(Debug, Clone, PartialEq)]
pub struct RateTake {
    /// The provider account: base URL, API key variable and model.
    pub account: String,
    pub cost: RateCost,
    pub correction: RateCost,
    pub caps: RateCaps,
}

/// What a worker learned from a response about the account.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateReport {
    /// Limits per minute announced by `x-ratelimit-limit-*` headers.
    pub announced_requests_per_minute: Option<f64>,
    pub announced_tokens_per_minute: Option<f64>,
    /// The response was a 429; with the provider's `Retry-After` when it sent one.
    pub rate_limited: bool,
    pub retry_after: Option<Duration>,
}

/// The bucket row's state. Times are the database clock's Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketState {
    pub request_level: f64,
    pub token_level: f64,
    pub announced_rpm: Option<f64>,
    pub announced_tpm: Option<f64>,
    pub safety: f64,
    pub paused_until: i64,
    pub updated_at: i64,
}

impl BucketState {
    /// A new bucket: `updated_at` zero, so the first take fills it.
    pub fn new() -> Self {
        BucketState {
            request_level: 0.0,
            token_level: 0.0,
            announced_rpm: None,
            announced_tpm: None,
            safety: ANNOUNCED_SAFETY,
            paused_until: 0,
            updated_at: 0,
        }
    }

    /// The paces per minute for these caps: requests and tokens (`None`: unlimited).
    pub fn per_minute(&self, caps: &RateCaps) -> (Option<f64>, Option<f64>) {
        let pace = |cap: Option<f64>, announced: Option<f64>| {
            let announced = announced.map(|a| a * self.safety);
            match (cap, announced) {
                (Some(c), Some(a)) => Some(c.min(a)),
                (c, a) => c.or(a),
            }
        };
        (pace(caps.requests_per_minute, self.announced_rpm), pace(caps.tokens_per_minute, self.announced_tpm))
    }

    fn advance(&mut self, now: i64, caps: &RateCaps) {
        let elapsed = (now - self.updated_at).max(0) as f64 / 1000.0;
        self.safety = (self.safety + SAFETY_RECOVERY_PER_MINUTE * elapsed / 60.0).min(ANNOUNCED_SAFETY);
        let (rpm, tpm) = self.per_minute(caps);
        if let Some(rpm) = rpm {
            let rate = rpm / 60.0;
            self.request_level = (self.request_level + elapsed * rate).min(capacity(rate));
        }
        if let Some(tpm) = tpm {
            let rate = tpm / 60.0;
            self.token_level = (self.token_level + elapsed * rate).min(capacity(rate));
        }
        self.updated_at = self.updated_at.max(now);
    }

    /// Applies a take at `now`: the wait before the request may go (zero: taken now).
    pub fn take(&mut self, now: i64, take: &RateTake) -> Duration {
        self.advance(now, &take.caps);
        self.request_level -= take.correction.requests;
        self.token_level -= take.correction.tokens;
        if now < self.paused_until {
            return Duration::from_millis((self.paused_until - now) as u64);
        }
        let (rpm, tpm) = self.per_minute(&take.caps);
        let wait_for = |level: f64, cost: f64, per_minute: Option<f64>| -> f64 {
            let Some(per_minute) = per_minute else { return 0.0 };
            let rate = per_minute / 60.0;
            let needed = cost.min(capacity(rate));
            if level >= needed { 0.0 } else { (needed - level) / rate }
        };
        let wait = wait_for(self.request_level, take.cost.requests, rpm).max(wait_for(self.token_level, take.cost.tokens, tpm));
        if wait > 0.0 {
            // Round up to whole milliseconds, so the retry finds the bucket full enough.
            return Duration::from_millis((wait * 1000.0).ceil() as u64);
        }
        self.request_level -= take.cost.requests;
        self.token_level -= take.cost.tokens;
        Duration::ZERO
    }

    /// Learns announced limits; a 429 pauses everyone and (once per event) lowers the share.
    pub fn report(&mut self, now: i64, caps: &RateCaps, report: &RateReport) {
        self.advance(now, caps);
        if let Some(rpm) = report.announced_requests_per_minute.filter(|r| *r > 0.0) {
            self.announced_rpm = Some(rpm);
        }
        if let Some(tpm) = report.announced_tokens_per_minute.filter(|t| *t > 0.0) {
            self.announced_tpm = Some(tpm);
        }
        if report.rate_limited {
            let new_event = now >= self.paused_until;
            if new_event {
                self.safety = (self.safety * SAFETY_CUT).max(SAFETY_FLOOR);
                self.request_level = self.request_level.min(0.0);
                self.token_level = self.token_level.min(0.0);
            }
            let pause = report.retry_after.unwrap_or(DEFAULT_PAUSE);
            self.paused_until = self.paused_until.max(now + pause.as_millis() as i64);
        }
    }
}

impl Default for BucketState {
    fn default() -> Self {
        Self::new()
    }
}

fn capacity(rate_per_second: f64) -> f64 {
    (rate_per_second * BURST.as_secs_f64()).max(1.0)
}

/// The account key of a chat model: whose limits the requests count against. It is stored
/// (`backfill_rate_buckets.account`), so it holds the base URL without any credential in it
/// (user info, query) and the key's variable name, never the key.
pub fn account_key(base_url: &str, api_key_env: &str, model: &str) -> String {
    format!("{}|{api_key_env}|{model}", crate::secret::public_url(base_url.trim_end_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(requests: f64, tokens: f64, rpm: Option<f64>, tpm: Option<f64>) -> RateTake {
        RateTake {
            account: "a".into(),
            cost: RateCost { requests, tokens },
            correction: RateCost::default(),
            caps: RateCaps { requests_per_minute: rpm, tokens_per_minute: tpm },
        }
    }

    /// Simulates greedy takers: every grant at the earliest moment the bucket allows.
    fn grants_in(seconds: i64, t: &RateTake) -> u64 {
        let mut bucket = BucketState::new();
        let (mut now, mut granted) = (1_000_000, 0);
        let end = now + seconds * 1000;
        while now < end {
            let wait = bucket.take(now, t);
            if wait.is_zero() {
                granted += 1;
            } else {
                now += wait.as_millis() as i64;
            }
        }
        granted
    }

    #[test]
    fn greedy_takers_get_the_cap_and_no_more() {
        // 600/min for 60 s: 600 plus the initial burst of 5.
        let granted = grants_in(60, &take(1.0, 0.0, Some(600.0), None));
        assert!((600..=606).contains(&granted), "{granted}");
    }

    #[test]
    fn tokens_per_minute_binds_when_smaller() {
        // 1000 tokens per request under 60,000 tokens/min: 60 requests/min, not 600.
        let granted = grants_in(60, &take(1.0, 1000.0, Some(600.0), Some(60_000.0)));
        assert!((59..=62).contains(&granted), "{granted}");
    }

    #[test]
    fn announced_limits_pace_below_the_limit_and_caps_still_win() {
        let mut bucket = BucketState::new();
        bucket.report(0, &RateCaps::default(), &RateReport { announced_requests_per_minute: Some(600.0), ..RateReport::default() });
        assert_eq!(bucket.per_minute(&RateCaps::default()).0, Some(600.0 * ANNOUNCED_SAFETY));
        let capped = RateCaps { requests_per_minute: Some(100.0), tokens_per_minute: None };
        assert_eq!(bucket.per_minute(&capped).0, Some(100.0));
    }

    #[test]
    fn nothing_limited_grants_everything() {
        let mut bucket = BucketState::new();
        for i in 0..1000 {
            assert_eq!(bucket.take(i, &take(1.0, 1e6, None, None)), Duration::ZERO);
        }
    }

    #[test]
    fn a_429_pauses_everyone_and_cuts_once_per_event() {
        let caps = RateCaps::default();
        let mut bucket = BucketState::new();
        let announced = RateReport { announced_requests_per_minute: Some(60.0), ..RateReport::default() };
        bucket.report(0, &caps, &announced);
        let limited = RateReport { rate_limited: true, retry_after: Some(Duration::from_secs(2)), ..announced };
        bucket.report(1000, &caps, &limited);
        bucket.report(1500, &caps, &limited); // the same event, seen by another worker
        assert!((bucket.safety - ANNOUNCED_SAFETY * SAFETY_CUT).abs() < 1e-3, "{}", bucket.safety);
        assert_eq!(bucket.paused_until, 3500);
        let wait = bucket.take(2000, &take(1.0, 0.0, None, None));
        assert_eq!(wait, Duration::from_millis(1500));
    }

    #[test]
    fn corrections_apply_even_when_the_take_waits() {
        let t = take(1.0, 0.0, Some(60.0), None);
        let mut bucket = BucketState::new();
        assert!(bucket.take(1_000_000, &t).is_zero());
        // A refund of the request just taken makes the next one go at once.
        let refund = RateTake { correction: RateCost { requests: -1.0, tokens: 0.0 }, ..t.clone() };
        assert!(bucket.take(1_000_001, &refund).is_zero());
        assert!(!bucket.take(1_000_002, &t).is_zero());
    }

    #[test]
    fn account_keys_ignore_a_trailing_slash() {
        assert_eq!(account_key("http://h/v1/", "KEY", "m"), account_key("http://h/v1", "KEY", "m"));
        assert_ne!(account_key("http://h/v1", "KEY", "m"), account_key("http://h/v1", "KEY", "n"));
        assert!(!account_key("https://u:s3cret@h/v1?token=t0k", "KEY", "m").contains("s3cret"));
        assert!(!account_key("https://u:s3cret@h/v1?token=t0k", "KEY", "m").contains("t0k"));
    }
}
