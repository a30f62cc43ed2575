//! How a call can fail, classified for the runner: rate-limited, transient, fatal, bad output.

use std::time::Duration;

use backfill_controller::{LONGEST_WAIT, seconds_to_duration};

use super::RateHeaders;

/// The provider's rate-limit answer.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// From `retry-after-ms` or `retry-after`, when sent.
    pub retry_after: Option<Duration>,
    pub headers: RateHeaders,
}

/// A failed call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// HTTP 429: slow down and retry after the pause; the items are not at fault.
    #[error("rate limited (HTTP 429){}", .0.retry_after.map(|d| format!(", retry after {:.1}s", d.as_secs_f64())).unwrap_or_default())]
    RateLimited(RateLimit),
    /// 5xx, 408, connection failures: retry with backoff.
    #[error("transient error{}: {message}", .status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Transient { status: Option<u16>, message: String, headers: RateHeaders },
    /// The request took longer than `model.request_timeout_s`.
    #[error("no answer within {:.0}s (model.request_timeout_s)", .after.as_secs_f64())]
    Timeout { after: Duration },
    /// A 4xx about this request (too long, bad schema): the batch is retried smaller.
    #[error("request rejected (HTTP {status}): {message}")]
    Rejected { status: u16, message: String },
    /// A 4xx about the account or endpoint (401, 403, 404, quota): no call can succeed.
    #[error("the provider refuses every call (HTTP {status}): {message}")]
    Fatal { status: u16, message: String },
    /// A redirect that was not followed (to another origin, or one turning the POST into a
    /// GET): no call can succeed until model.base_url changes.
    #[error("{message}")]
    Redirected { message: String },
    /// A 2xx body longer than `model.max_response_bytes`: not read further, retried like a bad
    /// answer (the provider may have billed it).
    #[error("the answer (HTTP {status}) is longer than model.max_response_bytes ({limit} bytes) and was not read further; raise model.max_response_bytes if answers this long are expected")]
    TooLarge { limit: u64, status: u16 },
    /// A 2xx whose body is not a chat completion.
    #[error("bad answer (HTTP {status}): {reason}")]
    BadOutput { reason: String, status: u16, body: String },
}

impl CallError {
    pub fn from_transport(error: &reqwest::Error) -> Self {
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            if let Some(refused) = cause.downcast_ref::<super::RedirectRefused>() {
                return CallError::Redirected { message: refused.0.clone() };
            }
            source = cause.source();
        }
        let what = if error.is_connect() {
            "cannot connect"
        } else if error.is_body() || error.is_decode() {
            "connection dropped while reading the answer"
        } else {
            "request failed"
        };
        // reqwest's message names the URL (shown without user info or query) but never the
        // headers, so no credential leaks.
        let mut text = error.to_string();
        if let Some(url) = error.url() {
            text = text.replace(url.as_str(), &super::shown_url(url));
        }
        CallError::Transient { status: None, message: format!("{what}: {text}"), headers: Vec::new() }
    }

    pub fn from_status(status: u16, headers: &RateHeaders, body: &str) -> Self {
        let message = provider_message(body);
        match status {
            // A budget set at a proxy (LiteLLM's `budget_exceeded`, with whatever 4xx it is
            // sent) is used up: no call succeeds until someone raises it.
            400..=499 if budget_used_up(&message) => CallError::Fatal {
                status,
                message: format!("{message} (a budget set at the provider or proxy is used up: raise it, then run again with --resume)"),
            },
            429 if quota_used_up(&message) => {
                CallError::Fatal { status, message: format!("{message} (the account's quota is used up)") }
            }
            // Gemini's daily quota, worded as its per-minute one: waiting it out is a stall.
            429 if body.contains("PerDay") => CallError::Fatal {
                status,
                message: format!("{message} (a daily quota is used up: run again with --resume once it resets)"),
            },
            429 => {
                // A wait the body alone names is taken as the header it stands for, so that the
                // controller pauses on it and a wait too long stops the run as a header's would.
                let mut headers = headers.clone();
                if parse_retry_after(&headers).is_none()
                    && let Some(wait) = retry_delay_in_body(body)
                {
                    // In place of one that cannot be read, which would be read first.
                    headers.retain(|(name, _)| !name.eq_ignore_ascii_case("retry-after") && !name.eq_ignore_ascii_case("retry-after-ms"));
                    headers.push(("retry-after".to_owned(), format!("{:.3}", wait.as_secs_f64())));
                }
                CallError::RateLimited(RateLimit { retry_after: parse_retry_after(&headers), headers })
            }
            // A field every request carries that the model refuses (OpenAI's reasoning models:
            // `max_tokens`, a `temperature` other than 1): no call succeeds as the job stands.
            400 if (message.contains("unsupported_parameter") || message.contains("unsupported_value")) && !about_streaming(body) => CallError::Fatal {
                status,
                message: format!(
                    "{message} (the model refuses a field of every request: for `max_tokens` set model.max_tokens_field = \"max_completion_tokens\", for `temperature` leave model.temperature out)"
                ),
            },
            // The account's credit is used up (OpenRouter).
            402 => CallError::Fatal {
                status,
                message: format!("{message} (the account has no credit left: add credit, then run again with --resume)"),
            },
            // OpenRouter's moderation refuses one request's input: the items' fault, not the key's.
            403 if flagged_by_moderation(body) => CallError::Rejected { status, message: format!("{message}{FLAGGED_BY_MODERATION}") },
            401 | 403 => CallError::Fatal {
                status,
                message: format!("{message} (check the API key in the variable named by model.api_key_env)"),
            },
            404 => CallError::Fatal {
                status,
                message: format!("{message} (check model.base_url and model.name)"),
            },
            408 | 409 | 425 | 500..=599 => {
                CallError::Transient { status: Some(status), message, headers: headers.clone() }
            }
            _ => CallError::Rejected { status, message },
        }
    }

    pub fn http_status(&self) -> Option<u16> {
        match self {
            CallError::RateLimited(_) => Some(429),
            CallError::Transient { status, .. } => *status,
            CallError::Timeout { .. } | CallError::Redirected { .. } => None,
            CallError::Rejected { status, .. } | CallError::Fatal { status, .. } => Some(*status),
            CallError::BadOutput { status, .. } | CallError::TooLarge { status, .. } => Some(*status),
        }
    }
}

impl CallError {
    /// The error a 2xx answer carries instead of a completion (a whole body, or an event of a
    /// stream whose status was sent before the server failed), classified by the HTTP status it
    /// names — as vLLM, SGLang and OpenRouter send them: `{"error": {"code": 503, …}}`, or
    /// SGLang's `{"object": "error", "code": …}`. `None` when it names none, or the body holds
    /// a choice.
    pub fn carried(body: &str, headers: &RateHeaders) -> Option<CallError> {
        // Every answer passes here: most are read no further.
        if !body.contains("\"error\"") {
            return None;
        }
        let value: serde_json::Value = serde_json::from_str(body).ok()?;
        // An answer with a choice, or a usage to bill (it is read as an answer without one).
        if value.get("choices").is_some() || value.get("usage").is_some_and(|u| u.is_object()) {
            return None;
        }
        let error = match value.get("error") {
            Some(error) if error.is_object() => error,
            _ if value.get("object").and_then(|o| o.as_str()) == Some("error") => &value,
            _ => return None,
        };
        let status = ["code", "status"].iter().find_map(|key| {
            let code = error.get(key)?;
            code.as_u64().or_else(|| code.as_str()?.trim().parse().ok()).filter(|code| (400..=599).contains(code))
        })?;
        let status = u16::try_from(status).ok()?;
        Some(CallError::from_status(status, headers, body))
    }
}

/// A refusal naming `stream` or `stream_options` as its parameter: the streamed request's
/// (an unstreamed copy may be taken), not every request's.
fn about_streaming(body: &str) -> bool {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(body) else { return false };
    let error = value.get("error").unwrap_or(&value);
    matches!(error.get("param").and_then(|p| p.as_str()), Some("stream" | "stream_options"))
}

/// A 429 that says the account's quota is used up (OpenAI's `insufficient_quota`), not a rate
/// limit: Gemini words its per-minute limits "You exceeded your current quota" too, but says
/// when to retry, or names a per-minute quota.
fn quota_used_up(message: &str) -> bool {
    if message.contains("insufficient_quota") {
        return true;
    }
    message.contains("exceeded your current quota")
        && !message.contains("retry in")
        && !message.contains("PerMinute")
        && !message.to_ascii_lowercase().contains("per minute")
}

/// How long a 429's body asks to wait when no header says it: Gemini's `retryDelay` ("34s")
/// or its message's "Please retry in 34.5s".
fn retry_delay_in_body(body: &str) -> Option<Duration> {
    let seconds = |text: &str| -> Option<Duration> {
        let digits: String = text.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        let value = digits.parse::<f64>().ok()?;
        let unit = text[digits.len()..].trim_start();
        let value = if unit.starts_with("ms") { value / 1000.0 } else if unit.starts_with('s') { value } else { return None };
        seconds_to_duration(value)
    };
    for marker in ["\"retryDelay\": \"", "\"retryDelay\":\"", "retry in "] {
        if let Some(at) = body.find(marker)
            && let Some(wait) = seconds(&body[at + marker.len()..])
        {
            return Some(wait);
        }
    }
    None
}

/// A budget at the provider or at a proxy in front of it is used up (LiteLLM says so with
/// `budget_exceeded` and a 400, 422 or 429).
fn budget_used_up(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    ["budget_exceeded", "budget has been exceeded", "max budget limit reached"].iter().any(|sign| message.contains(sign))
}

/// Ends the message of a refusal by the provider's moderation.
pub const FLAGGED_BY_MODERATION: &str = " (the provider's moderation flagged this request's input)";

/// OpenRouter's 403 for input its moderation flagged (`error.metadata.flagged_input`).
fn flagged_by_moderation(body: &str) -> bool {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(body) else { return false };
    let error = value.get("error").unwrap_or(&value);
    error.get("metadata").is_some_and(|m| m.get("flagged_input").is_some())
        || error.get("message").and_then(|m| m.as_str()).is_some_and(|m| m.to_ascii_lowercase().contains("input was flagged"))
}

/// The `error.message` (and `error.code`) of an OpenAI-style error body, else an excerpt.
pub(super) fn provider_message(body: &str) -> String {
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(body) {
        // Gemini's OpenAI-compatible endpoint sends its errors in an array.
        let value = match &value {
            serde_json::Value::Array(items) if items.len() == 1 => &items[0],
            _ => &value,
        };
        let error = value.get("error").unwrap_or(value);
        let message = error.get("message").and_then(|m| m.as_str()).or_else(|| error.as_str());
        let code = error.get("code").and_then(|c| c.as_str()).or_else(|| error.get("type").and_then(|t| t.as_str()));
        if let Some(message) = message {
            return match code {
                Some(code) => format!("{message} [{code}]"),
                None => message.to_owned(),
            };
        }
    }
    let mut excerpt: String = body.chars().take(200).collect();
    if excerpt.len() < body.len() {
        excerpt.push('…');
    }
    if excerpt.trim().is_empty() { "(empty body)".into() } else { excerpt }
}

/// `retry-after-ms`, else `retry-after` in seconds or as an HTTP date. Absurd values
/// (`1e20`, `99999999999999999999`) come back clamped to [`LONGEST_WAIT`], never as a panic:
/// the caller compares the wait with `limits.max_retry_after_s`.
pub fn parse_retry_after(headers: &RateHeaders) -> Option<Duration> {
    let get = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim());
    if let Some(wait) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()).and_then(|ms| seconds_to_duration(ms / 1000.0)) {
        return Some(wait);
    }
    let value = get("retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return seconds_to_duration(secs);
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO).min(LONGEST_WAIT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> RateHeaders {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn classifies_statuses() {
        assert!(matches!(CallError::from_status(429, &headers(&[("retry-after", "2")]), ""), CallError::RateLimited(RateLimit { retry_after: Some(d), .. }) if d == Duration::from_secs(2)));
        assert!(matches!(CallError::from_status(503, &vec![], "busy"), CallError::Transient { status: Some(503), .. }));
        assert!(matches!(CallError::from_status(401, &vec![], r#"{"error":{"message":"bad key"}}"#), CallError::Fatal { status: 401, .. }));
        assert!(matches!(CallError::from_status(400, &vec![], r#"{"error":{"message":"context too long"}}"#), CallError::Rejected { status: 400, .. }));
        let quota = r#"{"error":{"message":"You exceeded your current quota","code":"insufficient_quota"}}"#;
        assert!(matches!(CallError::from_status(429, &vec![], quota), CallError::Fatal { status: 429, .. }));
    }

    #[test]
    fn a_used_up_budget_or_credit_stops_the_run_and_flagged_input_is_the_requests_fault() {
        // OpenRouter: no credit left.
        let credit = CallError::from_status(402, &vec![], r#"{"error":{"code":402,"message":"Insufficient credits"}}"#);
        assert!(matches!(&credit, CallError::Fatal { status: 402, message } if message.contains("add credit")), "{credit}");
        // LiteLLM's budget, with its default 400 and as a 429 (older versions).
        for status in [400, 422, 429] {
            let body = r#"{"error":{"message":"Budget has been exceeded! Current cost: 5.01, Max budget: 5.0","type":"budget_exceeded","param":null,"code":"400"}}"#;
            let error = CallError::from_status(status, &vec![], body);
            assert!(matches!(&error, CallError::Fatal { message, .. } if message.contains("budget set at the provider or proxy")), "{status}: {error}");
        }
        // OpenRouter's moderation: one request's input, not the key.
        let flagged = r#"{"error":{"code":403,"message":"openai/gpt-4o requires moderation on OpenRouter. Your input was flagged for \"harassment\"","metadata":{"reasons":["harassment"],"flagged_input":"…","provider_name":"OpenAI","model_slug":"openai/gpt-4o"}}}"#;
        assert!(matches!(CallError::from_status(403, &vec![], flagged), CallError::Rejected { status: 403, .. }));
        assert!(matches!(CallError::from_status(403, &vec![], r#"{"error":{"message":"Forbidden"}}"#), CallError::Fatal { status: 403, .. }));
    }

    #[test]
    fn a_per_minute_quota_is_a_rate_limit_with_the_wait_its_body_names_and_a_refused_field_is_fatal() {
        // Gemini's per-minute limit, in an array, its wait only in the body.
        let gemini = r#"[{"error":{"code":429,"message":"You exceeded your current quota, please check your plan and billing details. Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_free_tier_requests, limit: 5, model: gemini-2.5-flash\nPlease retry in 34.5s.","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"34s"}]}}]"#;
        let limited = CallError::from_status(429, &vec![], gemini);
        assert!(matches!(&limited, CallError::RateLimited(RateLimit { retry_after: Some(d), headers }) if *d == Duration::from_secs(34)
            && headers.contains(&("retry-after".to_string(), "34.000".to_string()))), "{limited:?}");
        let unreadable = CallError::from_status(429, &vec![("retry-after".to_string(), "soon".to_string())], gemini);
        assert!(matches!(unreadable, CallError::RateLimited(RateLimit { retry_after: Some(d), .. }) if d == Duration::from_secs(34)));
        let daily = gemini.replace("Please retry in 34.5s.", "Please retry in 61234s.").replace("RetryInfo", "QuotaFailure\",\"violations\":[{\"quotaId\":\"GenerateRequestsPerDayPerProjectPerModel-FreeTier\"}]},{\"@type\":\"RetryInfo");
        assert!(matches!(CallError::from_status(429, &vec![], &daily), CallError::Fatal { .. }), "{daily}");
        assert!(provider_message(gemini).starts_with("You exceeded your current quota"), "{}", provider_message(gemini));
        // OpenAI's used-up quota stays fatal, with or without its code.
        let openai = r#"{"error":{"message":"You exceeded your current quota, please check your plan and billing details.","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert!(matches!(CallError::from_status(429, &vec![], openai), CallError::Fatal { .. }));
        assert!(matches!(CallError::from_status(429, &vec![], r#"{"error":{"message":"You exceeded your current quota."}}"#), CallError::Fatal { .. }));
        // OpenAI's reasoning models refuse `max_tokens`: every request would.
        let refused = r#"{"error":{"message":"Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.","type":"invalid_request_error","param":"max_tokens","code":"unsupported_parameter"}}"#;
        let fatal = CallError::from_status(400, &vec![], refused);
        assert!(matches!(&fatal, CallError::Fatal { message, .. } if message.contains("model.max_tokens_field")), "{fatal}");
        let streaming = r#"{"error":{"message":"Unsupported value: 'stream' does not support true with this model.","type":"invalid_request_error","param":"stream","code":"unsupported_value"}}"#;
        assert!(matches!(CallError::from_status(400, &vec![], streaming), CallError::Rejected { .. }));
        assert_eq!(retry_delay_in_body("Please retry in 250ms"), Some(Duration::from_millis(250)));
        assert_eq!(retry_delay_in_body("retry in a while"), None);
    }

    #[test]
    fn an_error_a_2xx_answer_carries_is_classified_by_the_status_it_names() {
        let none = Vec::new();
        // vLLM's and OpenRouter's shape, SGLang's unwrapped one, a code as a string.
        let overloaded = CallError::carried(r#"{"error":{"object":"error","message":"The waiting queue is full","type":"ServiceUnavailableError","code":503}}"#, &none);
        assert!(matches!(overloaded, Some(CallError::Transient { status: Some(503), .. })), "{overloaded:?}");
        let sglang = CallError::carried(r#"{"object":"error","message":"Input is too long","type":"BadRequestError","param":null,"code":400}"#, &none);
        assert!(matches!(sglang, Some(CallError::Rejected { status: 400, .. })), "{sglang:?}");
        let limited = CallError::carried(r#"{"error":{"code":"429","message":"Rate limit exceeded upstream"}}"#, &vec![("retry-after".to_string(), "3".to_string())]);
        assert!(matches!(limited, Some(CallError::RateLimited(RateLimit { retry_after: Some(d), .. })) if d == Duration::from_secs(3)), "{limited:?}");
        // No status named, a code that is no HTTP status, or an answer with choices: not carried.
        assert!(CallError::carried(r#"{"error":{"message":"something broke"}}"#, &none).is_none());
        assert!(CallError::carried(r#"{"error":{"message":"x","code":"invalid_prompt"}}"#, &none).is_none());
        assert!(CallError::carried(r#"{"error":{"code":200}}"#, &none).is_none());
        assert!(CallError::carried(r#"{"choices":[{"message":{"content":"{}"}}],"error":{"code":500}}"#, &none).is_none());
        assert!(CallError::carried(r#"{"usage":{"prompt_tokens":10,"completion_tokens":5},"error":{"code":502}}"#, &none).is_none());
        assert!(CallError::carried("not json", &none).is_none());
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "3"), ("retry-after-ms", "1500")])), Some(Duration::from_millis(1500)));
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "0.25")])), Some(Duration::from_millis(250)));
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "Thu, 01 Jan 1970 00:00:00 GMT")])), Some(Duration::ZERO));
    }

    #[test]
    fn absurd_retry_after_values_clamp_instead_of_panicking() {
        let longest = backfill_controller::LONGEST_WAIT;
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "1e20")])), Some(longest));
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "1e308")])), Some(longest));
        assert_eq!(parse_retry_after(&headers(&[("retry-after-ms", "99999999999999999999")])), Some(longest));
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "1e999")])), None);
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "-5")])), None);
        assert_eq!(parse_retry_after(&headers(&[("retry-after", "NaN")])), None);
    }

    #[test]
    fn error_message_is_taken_from_the_body() {
        let e = CallError::from_status(404, &vec![], r#"{"error":{"message":"model `x` not found","code":"model_not_found"}}"#);
        assert!(e.to_string().contains("model `x` not found [model_not_found]"), "{e}");
    }
}
