//! What happens to an item after a call: the retry policy, as a pure function.
//!
//! Attempts count the item's own failures (missing from the answer, invalid, malformed batch,
//! transient errors). Rate limits and crashes are not the item's fault and cost no attempt.
//! When an item's attempts on one model are used up and the job names fallback models, it
//! moves to the next one with fresh attempts.

use std::time::Duration;

use crate::store::ItemChange;

/// Why the item did not get an output from this call.
#[derive(Debug, Clone, PartialEq)]
pub enum Setback {
    /// HTTP 429: wait for the provider, no attempt counted.
    RateLimited { retry_after: Option<Duration> },
    /// 5xx, a connection that broke.
    Transient(String),
    /// The provider could not be reached at all (an outage): no attempt counted, the items
    /// wait `wait`.
    Unreachable { message: String, wait: Duration },
    /// The provider answered that it cannot take requests now (HTTP 503: a model loading, its
    /// queue full, a proxy with no healthy server behind it): as `Unreachable`.
    Unavailable { message: String, wait: Duration },
    Timeout(String),
    /// The whole answer was not a JSON object, or the request was refused as too large.
    Malformed(String),
    /// The answer lacked this item.
    Missing,
    /// The item's entry was unusable.
    Invalid(String),
    /// Post-processing rejected the output.
    Rejected { reason: String, detail: String },
    /// The run is stopping (fatal provider error, shutdown): back to the queue untouched.
    Released,
}

impl Setback {
    fn reason(&self) -> &str {
        match self {
            Setback::RateLimited { .. } => "rate_limited",
            Setback::Transient(_) => "transient",
            Setback::Unreachable { .. } => "unreachable",
            Setback::Unavailable { .. } => "unavailable",
            Setback::Timeout(_) => "timeout",
            Setback::Malformed(_) => "malformed",
            Setback::Missing => "missing",
            Setback::Invalid(_) => "invalid",
            Setback::Rejected { reason, .. } => reason,
            Setback::Released => "released",
        }
    }

    fn message(&self) -> String {
        match self {
            Setback::RateLimited { .. } => "rate limited by the provider".into(),
            Setback::Unreachable { message, .. } | Setback::Unavailable { message, .. } => message.clone(),
            Setback::Transient(m) | Setback::Timeout(m) | Setback::Malformed(m) | Setback::Invalid(m) => m.clone(),
            Setback::Missing => "the answer did not contain this item's id".into(),
            Setback::Rejected { detail, .. } => detail.clone(),
            Setback::Released => "returned to the queue".into(),
        }
    }
}

/// The retry policy of a run.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    /// How many models there are (the primary plus fallbacks).
    pub tiers: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The item's next state. `attempts` and `tier` are what it was claimed with, `batch_len`
    /// the size of the batch it was in, `now` in ms, `jitter` in [0, 1).
    pub fn next(&self, setback: &Setback, attempts: u32, tier: u32, batch_len: usize, now: i64, jitter: f64) -> ItemChange {
        let reason = setback.reason().to_owned();
        let error = setback.message();
        let retry = |attempts, tier, group_limit, delay: Duration| ItemChange::Retry {
            attempts,
            tier,
            group_limit,
            not_before: now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            error: error.clone(),
            reason: reason.clone(),
        };
        match setback {
            Setback::Released => return retry(attempts, tier, None, Duration::ZERO),
            Setback::RateLimited { retry_after } => {
                let wait = retry_after.unwrap_or(Duration::from_secs(1));
                return retry(attempts, tier, None, wait.saturating_add(self::jitter(wait, 0.1 * jitter)));
            }
            Setback::Unreachable { wait, .. } | Setback::Unavailable { wait, .. } => {
                return retry(attempts, tier, None, wait.saturating_add(self::jitter(*wait, 0.2 * jitter)));
            }
            _ => {}
        }
        let used = attempts + 1;
        let rejected = matches!(setback, Setback::Rejected { .. });
        let has_fallback = tier + 1 < self.tiers;
        // A rejected output moves to the fallback model at once; other failures use up their
        // attempts on the current model first.
        if has_fallback && (rejected || used >= self.max_attempts) {
            return retry(0, tier + 1, None, Duration::ZERO);
        }
        if used >= self.max_attempts {
            return if rejected {
                ItemChange::Rejected { attempts: used, error, reason }
            } else {
                ItemChange::Failed { attempts: used, error, reason }
            };
        }
        match setback {
            // Missing, invalid and rejected items go straight back into the queue.
            Setback::Missing | Setback::Invalid(_) | Setback::Rejected { .. } => retry(used, tier, None, Duration::ZERO),
            // A malformed batch is retried once as it was, then in halves.
            Setback::Malformed(_) => {
                let group = (used >= 2).then(|| (batch_len as u32 / 2).max(1));
                retry(used, tier, group, self.backoff(used, jitter))
            }
            _ => retry(used, tier, None, self.backoff(used, jitter)),
        }
    }

    /// Exponential backoff with full jitter on the upper half: base × 2^(n-1) × [0.5, 1).
    fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self.base_backoff.saturating_mul(1u32 << (attempt.saturating_sub(1)).min(16));
        exp.min(self.max_backoff).mul_f64(0.5 + 0.5 * jitter)
    }
}

/// `share` of `wait` (share in 0..=1), never overflowing.
pub fn jitter(wait: Duration, share: f64) -> Duration {
    Duration::try_from_secs_f64(wait.as_secs_f64() * share.clamp(0.0, 1.0)).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(tiers: u32) -> RetryPolicy {
        RetryPolicy { max_attempts: 3, tiers, base_backoff: Duration::from_secs(1), max_backoff: Duration::from_secs(60) }
    }

    #[test]
    fn rate_limits_cost_no_attempt_and_wait_retry_after() {
        let change = policy(1).next(&Setback::RateLimited { retry_after: Some(Duration::from_secs(5)) }, 2, 0, 10, 1_000, 0.0);
        assert!(matches!(change, ItemChange::Retry { attempts: 2, not_before: 6_000, .. }), "{change:?}");
    }

    #[test]
    fn failures_end_after_max_attempts_with_the_reason() {
        let p = policy(1);
        assert!(matches!(p.next(&Setback::Missing, 0, 0, 10, 0, 0.5), ItemChange::Retry { attempts: 1, not_before: 0, .. }));
        let last = p.next(&Setback::Missing, 2, 0, 10, 0, 0.5);
        assert!(matches!(&last, ItemChange::Failed { attempts: 3, reason, .. } if reason == "missing"), "{last:?}");
        let rejected = p.next(&Setback::Rejected { reason: "foreign_words".into(), detail: "12 English words".into() }, 2, 0, 10, 0, 0.5);
        assert!(matches!(&rejected, ItemChange::Rejected { reason, .. } if reason == "foreign_words"));
    }

    #[test]
    fn malformed_batches_are_retried_then_split() {
        let p = policy(1);
        assert!(matches!(p.next(&Setback::Malformed("x".into()), 0, 0, 20, 0, 0.0), ItemChange::Retry { group_limit: None, .. }));
        assert!(matches!(p.next(&Setback::Malformed("x".into()), 1, 0, 20, 0, 0.0), ItemChange::Retry { group_limit: Some(10), .. }));
    }

    #[test]
    fn fallback_models_get_fresh_attempts() {
        let p = policy(2);
        assert!(matches!(p.next(&Setback::Timeout("t".into()), 2, 0, 5, 0, 0.0), ItemChange::Retry { attempts: 0, tier: 1, .. }));
        let rejected = Setback::Rejected { reason: "too_long".into(), detail: String::new() };
        assert!(matches!(p.next(&rejected, 0, 0, 5, 0, 0.0), ItemChange::Retry { tier: 1, attempts: 0, .. }));
        assert!(matches!(p.next(&rejected, 2, 1, 5, 0, 0.0), ItemChange::Rejected { .. }));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = policy(1);
        assert_eq!(p.backoff(1, 0.5), Duration::from_millis(750));
        assert_eq!(p.backoff(3, 0.0), Duration::from_secs(2));
        assert_eq!(p.backoff(30, 0.0), Duration::from_secs(30));
    }
}
