//! Pure parser from HTTP response headers to the rate-limit facts the controller learns from.
//!
//! Understood: the OpenAI dialect `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
//! (reset as a Go duration such as "6m0s" or "20ms"), the Anthropic dialect
//! `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}`
//! (reset as an RFC 3339 time, made relative with the response's `date` header), and
//! `retry-after` (seconds or an HTTP date) / `retry-after-ms`, and Mistral's per-minute
//! `x-ratelimit-{limit,remaining}-{req,tokens}-minute`. Limits are taken as per minute, which
//! is what these dialects report.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time_formats::{parse_go_duration, parse_http_date, parse_rfc3339, seconds_to_duration};

/// One limit's state as the provider reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LimitWindow {
    /// The account's limit per minute.
    pub limit: Option<u64>,
    /// What is left of it now.
    pub remaining: Option<u64>,
    /// Time until the limit is fully replenished.
    pub reset: Option<Duration>,
}

impl LimitWindow {
    pub fn is_empty(&self) -> bool {
        self.limit.is_none() && self.remaining.is_none() && self.reset.is_none()
    }
}

/// The rate-limit facts of one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RateLimitInfo {
    pub requests: LimitWindow,
    /// Combined prompt + output tokens (OpenAI `tokens`, Anthropic `tokens`).
    pub tokens: LimitWindow,
    /// Anthropic's separate input-token limit.
    pub input_tokens: LimitWindow,
    /// Anthropic's separate output-token limit.
    pub output_tokens: LimitWindow,
    /// How long the provider asked us to wait before the next request.
    pub retry_after: Option<Duration>,
}

impl RateLimitInfo {
    /// True when no rate-limit header was present.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
            && self.tokens.is_empty()
            && self.input_tokens.is_empty()
            && self.output_tokens.is_empty()
            && self.retry_after.is_none()
    }
}

enum Field {
    Limit,
    Remaining,
    Reset,
}

/// Parses `(name, value)` header pairs (names in any case). Unknown headers and values that
/// do not parse are ignored, so a provider's odd header never fails a response.
pub fn parse_rate_limit_headers<'a, I>(headers: I) -> RateLimitInfo
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    let pairs: Vec<(String, &str)> = headers
        .into_iter()
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim()))
        .collect();
    let response_date = pairs
        .iter()
        .find(|(name, _)| name == "date")
        .and_then(|(_, value)| parse_http_date(value));

    let mut info = RateLimitInfo::default();
    let mut retry_after_ms = None;
    for (name, value) in &pairs {
        match name.as_str() {
            "retry-after" => {
                info.retry_after = parse_go_duration(value).or_else(|| {
                    let at = parse_http_date(value)?;
                    seconds_to_duration(at - response_date?)
                });
            }
            "retry-after-ms" => {
                retry_after_ms = value
                    .parse::<f64>()
                    .ok()
                    .and_then(|ms| seconds_to_duration(ms / 1000.0));
            }
            _ => {
                if let Some((window, field)) = classify(name, &mut info) {
                    apply(window, field, value, response_date);
                }
            }
        }
    }
    if retry_after_ms.is_some() {
        info.retry_after = retry_after_ms;
    }
    info
}

fn classify<'i>(name: &str, info: &'i mut RateLimitInfo) -> Option<(&'i mut LimitWindow, Field)> {
    if let Some(rest) = name.strip_prefix("x-ratelimit-") {
        let (field, dimension) = rest.split_once('-')?;
        let field = match field {
            "limit" => Field::Limit,
            "remaining" => Field::Remaining,
            "reset" => Field::Reset,
            _ => return None,
        };
        // Mistral's per-minute windows: `x-ratelimit-limit-req-minute`,
        // `x-ratelimit-remaining-tokens-minute` (its `-month` windows pace nothing here).
        let window = match dimension {
            "requests" | "req-minute" => &mut info.requests,
            "tokens" | "tokens-minute" => &mut info.tokens,
            _ => return None,
        };
        return Some((window, field));
    }
    let rest = name.strip_prefix("anthropic-ratelimit-")?;
    let (dimension, field) = rest.rsplit_once('-')?;
    let field = match field {
        "limit" => Field::Limit,
        "remaining" => Field::Remaining,
        "reset" => Field::Reset,
        _ => return None,
    };
    let window = match dimension {
        "requests" => &mut info.requests,
        "tokens" => &mut info.tokens,
        "input-tokens" => &mut info.input_tokens,
        "output-tokens" => &mut info.output_tokens,
        _ => return None,
    };
    Some((window, field))
}

fn apply(window: &mut LimitWindow, field: Field, value: &str, response_date: Option<f64>) {
    match field {
        Field::Limit => window.limit = parse_count(value),
        Field::Remaining => window.remaining = parse_count(value),
        Field::Reset => window.reset = parse_reset(value, response_date),
    }
}

fn parse_count(value: &str) -> Option<u64> {
    value.parse::<u64>().ok().or_else(|| {
        value
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .map(|v| v as u64)
    })
}

/// A reset is a duration ("6m0s", "1.5"), an RFC 3339 time, or Unix seconds (milliseconds
/// past 10¹²); absolute times need the response's `date` header to become a duration.
fn parse_reset(value: &str, response_date: Option<f64>) -> Option<Duration> {
    if let Ok(number) = value.parse::<f64>()
        && number > 1_000_000_000.0
    {
        let seconds = if number > 1e12 { number / 1000.0 } else { number };
        return seconds_to_duration(seconds - response_date?);
    }
    parse_go_duration(value).or_else(|| seconds_to_duration(parse_rfc3339(value)? - response_date?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_dialect() {
        let info = parse_rate_limit_headers([
            ("X-RateLimit-Limit-Requests", "3000"),
            ("x-ratelimit-remaining-requests", "2999"),
            ("x-ratelimit-reset-requests", "20ms"),
            ("x-ratelimit-limit-tokens", "2000000"),
            ("x-ratelimit-remaining-tokens", "1990000"),
            ("x-ratelimit-reset-tokens", "6m0s"),
            ("content-type", "application/json"),
        ]);
        assert_eq!(info.requests.limit, Some(3000));
        assert_eq!(info.requests.remaining, Some(2999));
        assert_eq!(info.requests.reset, Some(Duration::from_millis(20)));
        assert_eq!(info.tokens.limit, Some(2_000_000));
        assert_eq!(info.tokens.reset, Some(Duration::from_secs(360)));
        assert_eq!(info.retry_after, None);
    }

    #[test]
    fn a_reset_in_unix_milliseconds_is_read_as_such() {
        let info = parse_rate_limit_headers([
            ("date", "Wed, 01 May 2024 12:00:00 GMT"),
            ("x-ratelimit-reset-requests", "1714564830000"),
            ("x-ratelimit-reset-tokens", "1714564815"),
        ]);
        assert_eq!(info.requests.reset, Some(Duration::from_secs(30)));
        assert_eq!(info.tokens.reset, Some(Duration::from_secs(15)));
    }

    #[test]
    fn mistral_dialect_per_minute_windows() {
        let info = parse_rate_limit_headers([
            ("x-ratelimit-limit-req-minute", "360"),
            ("x-ratelimit-remaining-req-minute", "359"),
            ("x-ratelimit-limit-tokens-minute", "500000"),
            ("x-ratelimit-remaining-tokens-minute", "499000"),
            ("x-ratelimit-limit-tokens-month", "1000000000"),
            ("x-ratelimit-remaining-tokens-month", "999999000"),
        ]);
        assert_eq!((info.requests.limit, info.requests.remaining), (Some(360), Some(359)));
        assert_eq!((info.tokens.limit, info.tokens.remaining), (Some(500_000), Some(499_000)));
        assert!(info.input_tokens.is_empty() && info.output_tokens.is_empty());
    }

    #[test]
    fn anthropic_dialect_resets_are_relative_to_the_date_header() {
        let info = parse_rate_limit_headers([
            ("date", "Wed, 01 May 2024 12:00:00 GMT"),
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2024-05-01T12:00:01Z"),
            ("anthropic-ratelimit-input-tokens-limit", "40000"),
            ("anthropic-ratelimit-output-tokens-remaining", "7000"),
        ]);
        assert_eq!(info.requests.limit, Some(50));
        assert_eq!(info.requests.reset, Some(Duration::from_secs(1)));
        assert_eq!(info.input_tokens.limit, Some(40_000));
        assert_eq!(info.output_tokens.remaining, Some(7_000));
        assert!(info.tokens.is_empty());
    }

    #[test]
    fn retry_after_forms() {
        let seconds = parse_rate_limit_headers([("retry-after", "7")]);
        assert_eq!(seconds.retry_after, Some(Duration::from_secs(7)));
        let precise = parse_rate_limit_headers([("retry-after", "1"), ("retry-after-ms", "250")]);
        assert_eq!(precise.retry_after, Some(Duration::from_millis(250)));
        let dated = parse_rate_limit_headers([
            ("date", "Wed, 01 May 2024 12:00:00 GMT"),
            ("retry-after", "Wed, 01 May 2024 12:00:30 GMT"),
        ]);
        assert_eq!(dated.retry_after, Some(Duration::from_secs(30)));
        let undated = parse_rate_limit_headers([("retry-after", "Wed, 01 May 2024 12:00:30 GMT")]);
        assert_eq!(undated.retry_after, None);
    }

    #[test]
    fn garbage_is_ignored() {
        let info = parse_rate_limit_headers([
            ("x-ratelimit-limit-requests", "lots"),
            ("x-ratelimit-reset-tokens", "soon"),
            ("x-ratelimit-limit-widgets", "5"),
        ]);
        assert!(info.is_empty());
    }
}
