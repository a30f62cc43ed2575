//! Parsing a chat completion body: content, finish reason, usage and reported cost.

use serde_json::Value;

use crate::pricing::Usage;

/// What the runner needs from a completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub content: String,
    pub finish_reason: Option<String>,
    /// `None` when the provider sent no `usage`.
    pub usage: Option<Usage>,
    /// `usage.cost` in USD, when the provider reports it (OpenRouter does).
    pub reported_cost_usd: Option<f64>,
}

impl Completion {
    /// The answer was cut off by `max_tokens`.
    pub fn truncated(&self) -> bool {
        self.finish_reason.as_deref() == Some("length")
    }
}

pub fn parse_completion(body: &str) -> Result<Completion, String> {
    let value: Value = serde_json::from_str(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let choice = value
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| "the body has no `choices`".to_string())?;
    let message = choice.get("message");
    let content = message
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| {
            let refusal = message?.get("refusal")?.as_str()?;
            Some(format!("(refusal) {refusal}"))
        })
        .unwrap_or_default();
    let finish_reason = choice.get("finish_reason").and_then(Value::as_str).map(str::to_owned);
    let usage = value.get("usage").filter(|u| u.is_object()).map(|u| {
        let int = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
        Usage {
            prompt_tokens: int(u.get("prompt_tokens")),
            completion_tokens: int(u.get("completion_tokens")),
            cached_tokens: int(u.get("prompt_tokens_details").and_then(|d| d.get("cached_tokens"))),
        }
    });
    let reported_cost_usd = value
        .get("usage")
        .and_then(|u| u.get("cost"))
        .and_then(Value::as_f64)
        .filter(|c| c.is_finite() && *c >= 0.0);
    Ok(Completion { content, finish_reason, usage, reported_cost_usd })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_and_openrouter_bodies() {
        let body = r#"{"choices":[{"message":{"role":"assistant","content":"{\"1\":\"x\"}"},"finish_reason":"stop"}],
            "usage":{"prompt_tokens":120,"completion_tokens":30,"prompt_tokens_details":{"cached_tokens":64},"cost":0.00042}}"#;
        let c = parse_completion(body).unwrap();
        assert_eq!(c.content, "{\"1\":\"x\"}");
        assert!(!c.truncated());
        assert_eq!(c.usage, Some(Usage { prompt_tokens: 120, completion_tokens: 30, cached_tokens: 64 }));
        assert_eq!(c.reported_cost_usd, Some(0.00042));
    }

    #[test]
    fn truncation_and_missing_usage() {
        let c = parse_completion(r#"{"choices":[{"message":{"content":"{\"1\":"},"finish_reason":"length"}]}"#).unwrap();
        assert!(c.truncated());
        assert_eq!(c.usage, None);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_completion("<html>502</html>").is_err());
        assert!(parse_completion("{}").is_err());
    }
}
