//! Paces requests and tokens below the provider's limits.
//!
//! Four dimensions, each with its own token bucket: requests, tokens (prompt + `max_tokens`,
//! the OpenAI rule), input tokens and output tokens (Anthropic's separate limits). A
//! dimension's rate is the smallest of: the job's hard cap, the limit the provider announces
//! in its headers (times a safety share), and, for requests when no header announces a limit,
//! the probed rate of `rate_probe`.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::rate_limit_headers::{LimitWindow, RateLimitInfo};
use crate::rate_probe::{ProbePhase, RateProbe};
use crate::token_bucket::TokenBucket;

/// Share of an announced limit we pace at; lowered by 429s that come despite it.
const ANNOUNCED_SAFETY: f64 = 0.98;
const ANNOUNCED_SAFETY_FLOOR: f64 = 0.8;
/// How far one 429 lowers the announced-limit safety share, and how fast it recovers.
const ANNOUNCED_SAFETY_STEP: f64 = 0.97;
const ANNOUNCED_SAFETY_RECOVERY_PER_MINUTE: f64 = 0.01;
/// A 429 under an announced limit cuts the pace to this share, recovering with this time
/// constant (the bucket was empty; let it fill a little).
const ANNOUNCED_CUT: f64 = 0.85;
const ANNOUNCED_RECOVERY_TIME_CONSTANT: Duration = Duration::from_secs(2);
/// Weight of one request in the running error of the cost estimates (about the last 50),
/// and the standard deviations of that error our level keeps below the provider's count.
const ADMITTED_ERROR_WEIGHT: f64 = 0.02;
const ADMITTED_ERROR_SIGMAS: f64 = 4.0;
/// Our buckets hold this much of their rate: small, so we never burst past a provider.
const BURST: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RateDimension {
    Requests,
    Tokens,
    InputTokens,
    OutputTokens,
}

pub const ALL_DIMENSIONS: [RateDimension; 4] = [
    RateDimension::Requests,
    RateDimension::Tokens,
    RateDimension::InputTokens,
    RateDimension::OutputTokens,
];

/// What one request costs in each dimension, in `ALL_DIMENSIONS` order.
pub fn request_costs(prompt_tokens: f64, max_tokens: f64) -> [f64; 4] {
    [1.0, prompt_tokens + max_tokens, prompt_tokens, max_tokens]
}

fn window(info: &RateLimitInfo, dimension: RateDimension) -> &LimitWindow {
    match dimension {
        RateDimension::Requests => &info.requests,
        RateDimension::Tokens => &info.tokens,
        RateDimension::InputTokens => &info.input_tokens,
        RateDimension::OutputTokens => &info.output_tokens,
    }
}

#[derive(Debug, Clone)]
struct DimensionPacer {
    cap_per_second: Option<f64>,
    announced_per_second: Option<f64>,
    /// The provider's own bucket, in seconds of its announced rate: what it says remains
    /// plus what its reset says is missing (remaining + reset × rate), once it said so.
    provider_burst: Option<Duration>,
    bucket: Option<TokenBucket>,
}

#[derive(Debug, Clone)]
pub struct RatePacer {
    dimensions: [DimensionPacer; 4],
    /// The probed request rate, while no header announces the request limit.
    probe: RateProbe,
    announced_safety: f64,
    announced_recovery: f64,
    /// How a request's real cost lately differed from the cost it was admitted on (the
    /// dispatcher packs the request after the decision), per dimension: the running mean and
    /// variance of `real − estimated`, and the requests seen.
    admitted_error: [(f64, f64); 4],
    admitted_requests: u32,
    updated_at: Duration,
}

impl RatePacer {
    /// `caps` are the job's hard caps per second in `ALL_DIMENSIONS` order; `initial_rate` the
    /// request rate to start probing from when neither a cap nor a header gives one.
    pub fn new(caps: [Option<f64>; 4], initial_rate: f64, now: Duration) -> Self {
        let (start, phase) = match caps[0] {
            Some(cap) => (cap, ProbePhase::Hold),
            None => (initial_rate, ProbePhase::SlowStart),
        };
        let mut pacer = Self {
            dimensions: caps.map(|cap_per_second| DimensionPacer {
                cap_per_second,
                announced_per_second: None,
                provider_burst: None,
                bucket: None,
            }),
            probe: RateProbe::new(start, phase, now),
            announced_safety: ANNOUNCED_SAFETY,
            announced_recovery: 1.0,
            admitted_error: [(0.0, 0.0); 4],
            admitted_requests: 0,
            updated_at: now,
        };
        pacer.sync_buckets(now);
        pacer
    }

    /// The pace of `dimension` per second, `None` when unlimited.
    pub fn rate(&self, dimension: RateDimension) -> Option<f64> {
        let pacer = &self.dimensions[dimension as usize];
        let announced = pacer
            .announced_per_second
            .map(|rate| rate * self.announced_safety * self.announced_recovery);
        let learned = match (dimension, announced) {
            (RateDimension::Requests, None) => Some(self.probe.rate()),
            (_, announced) => announced,
        };
        match (pacer.cap_per_second, learned) {
            (Some(cap), Some(learned)) => Some(cap.min(learned)),
            (cap, learned) => cap.or(learned),
        }
    }

    /// True while no header has announced the request limit (the rate is being probed).
    pub fn is_probing(&self) -> bool {
        self.dimensions[0].announced_per_second.is_none()
    }

    pub fn probe_phase(&self) -> ProbePhase {
        self.probe.phase()
    }

    /// Requests per second allowed by all dimensions for requests of this cost.
    pub fn request_rate(&self, costs: [f64; 4]) -> f64 {
        ALL_DIMENSIONS
            .iter()
            .zip(costs)
            .filter_map(|(dimension, cost)| Some(self.rate(*dimension)? / cost.max(1.0)))
            .fold(f64::INFINITY, f64::min)
    }

    /// Requests of these costs that the provider's burst lets go out at once, beyond the
    /// paced rate: the fewest that fill any bucket, once the provider said how much its
    /// buckets hold (zero before).
    pub fn burst_requests(&self, costs: [f64; 4]) -> f64 {
        if self
            .dimensions
            .iter()
            .all(|pacer| pacer.provider_burst.is_none())
        {
            return 0.0;
        }
        self.dimensions
            .iter()
            .zip(costs)
            .filter_map(|(pacer, cost)| Some(pacer.bucket.as_ref()?.capacity() / cost.max(1.0)))
            .fold(f64::INFINITY, f64::min)
            .min(f64::from(u32::MAX))
    }

    /// Moves learned rates forward to `now`.
    pub fn advance(&mut self, now: Duration, requests_binding: bool) {
        let elapsed = now.saturating_sub(self.updated_at).as_secs_f64();
        self.updated_at = now.max(self.updated_at);
        let cap = self.dimensions[0].cap_per_second.unwrap_or(f64::INFINITY);
        self.probe.advance(now, requests_binding, cap);
        let closed = 1.0 - (-elapsed / ANNOUNCED_RECOVERY_TIME_CONSTANT.as_secs_f64()).exp();
        self.announced_recovery += (1.0 - self.announced_recovery) * closed;
        self.announced_safety = (self.announced_safety
            + ANNOUNCED_SAFETY_RECOVERY_PER_MINUTE * elapsed / 60.0)
            .min(ANNOUNCED_SAFETY);
        self.sync_buckets(now);
    }

    /// Learns announced limits, takes the provider's bucket size from its remaining and reset
    /// headers, and sets our buckets to what the provider says remains (less the recent error
    /// of our cost estimates when that raises them).
    pub fn observe_headers(&mut self, now: Duration, info: &RateLimitInfo) {
        for dimension in ALL_DIMENSIONS {
            let reported = window(info, dimension);
            let pacer = &mut self.dimensions[dimension as usize];
            if let Some(limit) = reported.limit.filter(|limit| *limit > 0) {
                let per_second = limit as f64 / 60.0;
                if pacer.announced_per_second != Some(per_second) {
                    tracing::info!(?dimension, per_minute = limit, "provider announced limit");
                    pacer.announced_per_second = Some(per_second);
                }
            }
        }
        self.sync_buckets(now);
        for dimension in ALL_DIMENSIONS {
            let reported = window(info, dimension);
            let margin = self.admitted_margin(dimension);
            let pacer = &mut self.dimensions[dimension as usize];
            let (Some(remaining), Some(announced), Some(bucket)) = (
                reported.remaining,
                pacer.announced_per_second,
                pacer.bucket.as_mut(),
            ) else {
                if let (Some(remaining), Some(bucket)) = (reported.remaining, pacer.bucket.as_mut())
                {
                    bucket.limit_level(remaining as f64, now);
                }
                continue;
            };
            // The provider's bucket holds what remains plus what refills until its reset; ours
            // holds as much (of our slightly lower rate), so the burst the provider grants is
            // used, and never more than it says remains.
            let remaining = remaining as f64;
            let provider_burst = Duration::from_secs_f64(
                remaining / announced + reported.reset.map_or(0.0, |reset| reset.as_secs_f64()),
            )
            .max(BURST);
            pacer.provider_burst = Some(provider_burst);
            bucket.set_burst(provider_burst, now);
            // Paced on the provider's own count: what it says remains (it counts our requests
            // as it admits them), less what a request lately cost beyond the estimate it was
            // sent on. Above that our level is lowered to it; below, raised to it: the
            // provider may count fewer tokens than we do (its own tokenizer, no reservation
            // of `max_tokens`), and our pace runs a little below its refill.
            let level = bucket.level(now);
            if level > remaining {
                bucket.set_level(remaining, now);
            } else if level < remaining - margin {
                bucket.set_level(remaining - margin, now);
            }
        }
    }

    /// One congestion event (a 429 for a request sent after the previous cut).
    pub fn on_congestion(&mut self, now: Duration, admitted_request_rate: Option<f64>) {
        if self.is_probing() {
            self.probe.on_congestion(now, admitted_request_rate);
        } else {
            self.announced_recovery = ANNOUNCED_CUT;
            self.announced_safety =
                (self.announced_safety * ANNOUNCED_SAFETY_STEP).max(ANNOUNCED_SAFETY_FLOOR);
            tracing::info!(
                safety = self.announced_safety,
                "429 under announced limits: pace cut"
            );
        }
        for pacer in &mut self.dimensions {
            if let Some(bucket) = pacer.bucket.as_mut() {
                bucket.drain(now);
            }
        }
        self.sync_buckets(now);
    }

    /// How long from `now` until a request of these costs fits every bucket.
    pub fn wait_for(&mut self, costs: [f64; 4], now: Duration) -> Duration {
        self.dimensions
            .iter_mut()
            .zip(costs)
            .filter_map(|(pacer, cost)| Some(pacer.bucket.as_mut()?.wait_for(cost, now)))
            .max()
            .unwrap_or(Duration::ZERO)
    }

    /// A request admitted on `estimated` costs went out costing `actual`.
    pub fn on_admitted(&mut self, estimated: [f64; 4], actual: [f64; 4]) {
        self.admitted_requests = self.admitted_requests.saturating_add(1);
        let weight = (1.0 / f64::from(self.admitted_requests)).max(ADMITTED_ERROR_WEIGHT);
        for (((mean, variance), estimated), actual) in self
            .admitted_error
            .iter_mut()
            .map(|(mean, variance)| (mean, variance))
            .zip(estimated)
            .zip(actual)
        {
            let deviation = actual - estimated - *mean;
            *mean += weight * deviation;
            *variance += weight * ((1.0 - weight) * deviation * deviation - *variance);
        }
    }

    /// How far below the provider's count our level stays when it follows it up: what a
    /// request may cost beyond the estimate it is admitted on, at `ADMITTED_ERROR_SIGMAS`.
    fn admitted_margin(&self, dimension: RateDimension) -> f64 {
        let (mean, variance) = self.admitted_error[dimension as usize];
        (mean + ADMITTED_ERROR_SIGMAS * variance.max(0.0).sqrt()).max(0.0)
    }

    pub fn take(&mut self, costs: [f64; 4], now: Duration) {
        for (pacer, cost) in self.dimensions.iter_mut().zip(costs) {
            if let Some(bucket) = pacer.bucket.as_mut() {
                bucket.take(cost, now);
            }
        }
    }

    /// Announced limits per second (for the state snapshot).
    pub fn announced(&self) -> [Option<f64>; 4] {
        self.dimensions
            .clone()
            .map(|pacer| pacer.announced_per_second)
    }

    /// Restores announced limits and the probed rate from a snapshot.
    pub fn restore(
        &mut self,
        announced: [Option<f64>; 4],
        probed_rate: Option<f64>,
        now: Duration,
    ) {
        for (pacer, announced) in self.dimensions.iter_mut().zip(announced) {
            pacer.announced_per_second = announced;
        }
        if let Some(rate) = probed_rate {
            self.probe = RateProbe::new(rate, ProbePhase::Hold, now);
        }
        self.sync_buckets(now);
    }

    pub fn probed_rate(&self) -> f64 {
        self.probe.rate()
    }

    fn sync_buckets(&mut self, now: Duration) {
        for dimension in ALL_DIMENSIONS {
            let rate = self.rate(dimension);
            let pacer = &mut self.dimensions[dimension as usize];
            match (rate, pacer.bucket.as_mut()) {
                (None, _) => pacer.bucket = None,
                (Some(rate), Some(bucket)) => bucket.set_rate(rate, now),
                (Some(rate), None) => {
                    let burst = pacer.provider_burst.unwrap_or(BURST);
                    pacer.bucket = Some(TokenBucket::new(rate, burst, now))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit_headers::parse_rate_limit_headers;

    #[test]
    fn the_hard_cap_wins_over_an_announced_limit() {
        let mut pacer = RatePacer::new([Some(5.0), None, None, None], 1.0, Duration::ZERO);
        let info = parse_rate_limit_headers([("x-ratelimit-limit-requests", "600")]);
        pacer.observe_headers(Duration::ZERO, &info);
        assert_eq!(pacer.rate(RateDimension::Requests), Some(5.0));
        assert!(!pacer.is_probing());
    }

    #[test]
    fn announced_limits_are_paced_just_below() {
        let mut pacer = RatePacer::new([None; 4], 1.0, Duration::ZERO);
        let info = parse_rate_limit_headers([
            ("x-ratelimit-limit-requests", "600"),
            ("x-ratelimit-limit-tokens", "60000"),
        ]);
        pacer.observe_headers(Duration::ZERO, &info);
        assert_eq!(
            pacer.rate(RateDimension::Requests),
            Some(10.0 * ANNOUNCED_SAFETY)
        );
        assert_eq!(
            pacer.rate(RateDimension::Tokens),
            Some(1000.0 * ANNOUNCED_SAFETY)
        );
        assert_eq!(pacer.rate(RateDimension::InputTokens), None);
        // 1,000 tokens per request: tokens bind at 0.98 requests/s.
        let rate = pacer.request_rate(request_costs(600.0, 400.0));
        assert!((rate - 0.98).abs() < 1e-9, "{rate}");
    }

    #[test]
    fn remaining_zero_makes_us_wait() {
        let mut pacer = RatePacer::new([None; 4], 1.0, Duration::ZERO);
        let info = parse_rate_limit_headers([
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-remaining-requests", "0"),
        ]);
        pacer.observe_headers(Duration::ZERO, &info);
        let wait = pacer.wait_for(request_costs(10.0, 10.0), Duration::ZERO);
        assert!(wait > Duration::from_millis(900), "{wait:?}");
    }

    #[test]
    fn the_burst_the_provider_announces_goes_out_at_once_then_the_rate() {
        let mut pacer = RatePacer::new([None; 4], 1.0, Duration::ZERO);
        // 60,000 tokens/min = 1,000/s; 2,500 remain and the bucket is full in 0.5 s: it
        // holds 3,000 (3 s of rate), of which 2,500 may go out now.
        let info = parse_rate_limit_headers([
            ("x-ratelimit-limit-requests", "6000"),
            ("x-ratelimit-remaining-requests", "299"),
            ("x-ratelimit-reset-requests", "10ms"),
            ("x-ratelimit-limit-tokens", "60000"),
            ("x-ratelimit-remaining-tokens", "2500"),
            ("x-ratelimit-reset-tokens", "500ms"),
        ]);
        pacer.observe_headers(Duration::ZERO, &info);
        let costs = request_costs(400.0, 100.0);
        let mut sent = 0;
        while pacer.wait_for(costs, Duration::ZERO) == Duration::ZERO {
            pacer.take(costs, Duration::ZERO);
            sent += 1;
        }
        assert_eq!(sent, 5, "2,500 tokens of 500-token requests");
        assert!((pacer.burst_requests(costs) - 3000.0 * ANNOUNCED_SAFETY / 500.0).abs() < 1e-6);
        // Then the announced rate: one 500-token request per ~0.51 s.
        let wait = pacer.wait_for(costs, Duration::ZERO).as_secs_f64();
        assert!(
            (wait - 500.0 / (1000.0 * ANNOUNCED_SAFETY)).abs() < 1e-6,
            "{wait}"
        );
        // A later answer saying less remains lowers the level...
        let remaining = |tokens: &'static str| {
            parse_rate_limit_headers([
                ("x-ratelimit-limit-tokens", "60000"),
                ("x-ratelimit-remaining-tokens", tokens),
                ("x-ratelimit-reset-tokens", "2s"),
            ])
        };
        let now = Duration::from_secs(1);
        pacer.observe_headers(now, &remaining("0"));
        assert!(pacer.wait_for(costs, now) >= Duration::from_millis(500));
        // ...and one saying more remains (the provider counts fewer tokens than we do)
        // raises it, less what requests lately cost beyond the estimate they were sent on.
        for _ in 0..50 {
            pacer.on_admitted(costs, costs.map(|cost| cost + 50.0));
        }
        pacer.observe_headers(now, &remaining("1500"));
        let bucket = pacer.dimensions[1].bucket.as_mut().unwrap();
        let level = bucket.level(now);
        assert!((level - 1450.0).abs() < 1.0, "{level}");
    }

    #[test]
    fn a_429_under_announced_limits_cuts_then_recovers() {
        let mut pacer = RatePacer::new([None; 4], 1.0, Duration::ZERO);
        let info = parse_rate_limit_headers([("x-ratelimit-limit-requests", "600")]);
        pacer.observe_headers(Duration::ZERO, &info);
        pacer.on_congestion(Duration::ZERO, None);
        let cut = pacer.rate(RateDimension::Requests).unwrap();
        assert!(cut < 8.6, "{cut}");
        pacer.advance(Duration::from_secs(20), true);
        let recovered = pacer.rate(RateDimension::Requests).unwrap();
        assert!(recovered > 9.4 && recovered < 9.8, "{recovered}");
    }
}
