//! Parsing a chat completion body: content, finish reason, usage, reported cost and the
//! server's own time on the request.

use std::time::Duration;

use serde_json::Value;

use crate::pricing::Usage;
use crate::pipeline::answers::kind;

/// What the runner needs from a completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub content: String,
    pub finish_reason: Option<String>,
    /// `None` when the provider sent no `usage`.
    pub usage: Option<Usage>,
    /// `usage.cost` in USD, when the provider reports it (OpenRouter does).
    pub reported_cost_usd: Option<f64>,
    /// Why the body's usage cannot be true (a negative or fractional count, more cached
    /// tokens than prompt tokens, a `usage.cost` that is not a non-negative number).
    pub usage_problem: Option<String>,
    /// The body had no choice at all (`choices: []`) but a usage: billed, with no answer.
    pub no_choices: bool,
    /// How long the server says it worked on the request, its queue not included: llama.cpp's
    /// `timings` (`prompt_ms` + `predicted_ms`), vLLM's `metrics` (`time_to_first_token_ms` +
    /// `generation_time_ms`, from the moment its scheduler took the request up; sent when the
    /// server runs with `--enable-per-request-metrics`), or `prompt_time` + `completion_time`
    /// in seconds under `time_info` or `usage` (Cerebras, Groq); from the body alone (the client
    /// adds what a server says in its headers, `server_time_from_headers`). `None` when it
    /// does not say.
    pub server_time: Option<Duration>,
}

impl Completion {
    /// The answer may end mid-entry: cut off by `max_tokens`, or refused by the server's JSON
    /// check. Its complete entries count.
    pub fn may_end_mid_entry(&self) -> bool {
        self.truncated() || self.finish_reason.as_deref() == Some(JSON_REFUSED)
    }

    /// The answer was cut off by `max_tokens`.
    pub fn truncated(&self) -> bool {
        self.finish_reason.as_deref() == Some("length")
    }
}

/// The finish reason of an answer the server refused as JSON it could not parse
/// (`failed_generation`): it may end mid-entry, as one cut at `max_tokens` does.
pub const JSON_REFUSED: &str = "json_validate_failed";

/// Groq refuses an answer its JSON mode cannot parse (a 400, `json_validate_failed`) and sends
/// the answer along in `error.failed_generation`: that answer as an unstreamed body (without a
/// usage, as the refusal carries none), when the body is such a refusal.
pub fn failed_generation(status: u16, body: &str) -> Option<String> {
    if status != 400 || !body.contains("json_validate_failed") {
        return None;
    }
    let value: Value = serde_json::from_str(body).ok()?;
    let error = value.get("error")?;
    if error.get("code").and_then(Value::as_str) != Some("json_validate_failed") {
        return None;
    }
    let generated = error.get("failed_generation")?.as_str()?;
    let answer = serde_json::json!({
        "object": "chat.completion",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": generated }, "finish_reason": JSON_REFUSED }],
    });
    Some(answer.to_string())
}

pub fn parse_completion(body: &str) -> Result<Completion, String> {
    let value: Value = serde_json::from_str(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    if !value.is_object() {
        return Err(format!("the body is JSON but not an object ({})", kind(&value)));
    }
    let usage_value = value.get("usage").filter(|u| u.is_object());
    let choice = value.get("choices").and_then(|c| c.get(0));
    let no_choices = choice.is_none();
    if no_choices && usage_value.is_none() {
        if value.get("error").is_some_and(|e| !e.is_null()) {
            return Err(format!("the server answered with an error: {}", super::error::provider_message(body)));
        }
        return Err("the body has no `choices`".to_string());
    }
    let message = choice.and_then(|c| c.get("message"));
    let content = message
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| {
            let refusal = message?.get("refusal")?.as_str()?;
            Some(format!("(refusal) {refusal}"))
        })
        .unwrap_or_default();
    let finish_reason = choice.and_then(|c| c.get("finish_reason")).and_then(Value::as_str).map(str::to_owned);
    let mut problems = Vec::new();
    let usage = usage_value.map(|u| {
        let mut count = |name: &str, v: Option<&Value>| match v {
            None | Some(Value::Null) => 0,
            Some(v) => v.as_u64().unwrap_or_else(|| {
                problems.push(format!("usage.{name} = {} is not a token count", excerpt(v)));
                0
            }),
        };
        let prompt_tokens = count("prompt_tokens", u.get("prompt_tokens"));
        let completion_tokens = count("completion_tokens", u.get("completion_tokens"));
        // DeepSeek counts its cache hits in `prompt_cache_hit_tokens` (its `cached_tokens` may
        // stay 0).
        let cached_tokens =
            count("prompt_tokens_details.cached_tokens", u.get("prompt_tokens_details").and_then(|d| d.get("cached_tokens")))
                .max(count("prompt_cache_hit_tokens", u.get("prompt_cache_hit_tokens")));
        if cached_tokens > prompt_tokens {
            problems.push(format!("{cached_tokens} cached tokens of {prompt_tokens} prompt tokens"));
        }
        Usage { prompt_tokens, completion_tokens, cached_tokens }
    });
    let reported_cost_usd = match usage_value.and_then(|u| u.get("cost")) {
        None | Some(Value::Null) => None,
        Some(cost) => match cost.as_f64() {
            Some(usd) if usd.is_finite() && usd >= 0.0 => Some(usd),
            _ => {
                problems.push(format!("usage.cost = {} is not an amount of money", excerpt(cost)));
                None
            }
        },
    };
    let usage_problem = (!problems.is_empty()).then(|| problems.join("; "));
    let server_time = server_time(&value);
    Ok(Completion { content, finish_reason, usage, reported_cost_usd, usage_problem, no_choices, server_time })
}

/// The server's own time on the request from the body, when it gives both parts (reading the
/// prompt, writing the answer) as finite non-negative numbers.
fn server_time(body: &Value) -> Option<Duration> {
    let sum = |object: &Value, prompt: &str, answer: &str, per_second: f64| {
        let part = |name: &str| object.get(name)?.as_f64().filter(|v| v.is_finite() && *v >= 0.0);
        Duration::try_from_secs_f64((part(prompt)? + part(answer)?) / per_second).ok()
    };
    if let Some(timings) = body.get("timings").filter(|t| t.is_object()) {
        return sum(timings, "prompt_ms", "predicted_ms", 1000.0);
    }
    if let Some(metrics) = body.get("metrics").filter(|m| m.is_object()) {
        return sum(metrics, "time_to_first_token_ms", "generation_time_ms", 1000.0);
    }
    ["time_info", "usage"]
        .iter()
        .filter_map(|key| body.get(*key).filter(|v| v.is_object()))
        .find_map(|object| sum(object, "prompt_time", "completion_time", 1.0))
}

/// The header in which Hugging Face's text-generation-inference (TGI) says how long it worked
/// on a request once a batch took it up, in whole milliseconds (`x-queue-time` beside it is the
/// wait before). Its chat completions carry no time in the body.
pub const INFERENCE_TIME_HEADER: &str = "x-inference-time";

/// The server's own time on the request from its response headers, when it says it there
/// (TGI's `x-inference-time`) as a finite non-negative number of milliseconds.
pub fn server_time_from_headers(headers: &[(String, String)]) -> Option<Duration> {
    let (_, value) = headers.iter().find(|(name, _)| name.eq_ignore_ascii_case(INFERENCE_TIME_HEADER))?;
    let millis = value.trim().parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0)?;
    Duration::try_from_secs_f64(millis / 1000.0).ok()
}

fn excerpt(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 40 { format!("{}…", text.chars().take(40).collect::<String>()) } else { text }
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
        let groq = r#"{"error":{"message":"Failed to generate JSON. Please adjust your prompt. See 'failed_generation' for more details.","type":"invalid_request_error","code":"json_validate_failed","failed_generation":"{\"1\": \"een\", \"2\": \"tw"}}"#;
        let answer = parse_completion(&failed_generation(400, groq).unwrap()).unwrap();
        assert_eq!((answer.content.as_str(), answer.usage), ("{\"1\": \"een\", \"2\": \"tw", None));
        assert!(answer.may_end_mid_entry() && !answer.truncated());
        let ids = ["1".to_string(), "2".to_string()];
        let kept = crate::pipeline::answers::validate(&answer.content, &ids, &crate::pipeline::answers::OutputShape::Text, answer.may_end_mid_entry()).unwrap();
        assert_eq!(kept.outputs.len(), 1, "the complete entry is kept");
        assert_eq!(failed_generation(422, groq), None);
        assert_eq!(failed_generation(400, r#"{"error":{"message":"json_validate_failed","code":"other"}}"#), None);
        let deepseek = r#"{"choices":[{"message":{"content":"{}"}}],"usage":{"prompt_tokens":120,"completion_tokens":30,
            "prompt_cache_hit_tokens":96,"prompt_cache_miss_tokens":24,"prompt_tokens_details":{"cached_tokens":0}}}"#;
        assert_eq!(parse_completion(deepseek).unwrap().usage.map(|u| u.cached_tokens), Some(96));
        assert_eq!(c.reported_cost_usd, Some(0.00042));
        assert_eq!(c.usage_problem, None);
    }

    #[test]
    fn impossible_usage_is_named_not_zeroed_silently() {
        let c = parse_completion(r#"{"choices":[{"message":{"content":"{}"}}],"usage":{"prompt_tokens":-5,"completion_tokens":1.5}}"#).unwrap();
        let problem = c.usage_problem.unwrap();
        assert!(problem.contains("usage.prompt_tokens = -5") && problem.contains("usage.completion_tokens = 1.5"), "{problem}");
        let c = parse_completion(r#"{"choices":[{"message":{"content":"{}"}}],"usage":{"prompt_tokens":5,"cost":-1}}"#).unwrap();
        assert!(c.usage_problem.unwrap().contains("usage.cost = -1"));
        let c = parse_completion(r#"{"choices":[{"message":{"content":"{}"}}],"usage":{"prompt_tokens":"12"}}"#).unwrap();
        assert!(c.usage_problem.unwrap().contains("\"12\""));
    }

    #[test]
    fn no_choices_with_usage_is_billed() {
        let c = parse_completion(r#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":0}}"#).unwrap();
        assert!(c.no_choices);
        assert_eq!(c.usage.unwrap().prompt_tokens, 10);
        assert!(parse_completion(r#"{"choices":[]}"#).is_err());
        assert!(parse_completion("[1,2]").is_err());
    }

    #[test]
    fn truncation_and_missing_usage() {
        let c = parse_completion(r#"{"choices":[{"message":{"content":"{\"1\":"},"finish_reason":"length"}]}"#).unwrap();
        assert!(c.truncated());
        assert_eq!(c.usage, None);
    }

    #[test]
    fn the_servers_own_time_is_read_where_each_server_puts_it() {
        let time = |body: &str| parse_completion(body).unwrap().server_time;
        let choice = r#""choices":[{"message":{"content":"{}"},"finish_reason":"stop"}]"#;
        // llama.cpp's llama-server.
        let llama = format!(r#"{{{choice},"timings":{{"prompt_n":57,"prompt_ms":120.5,"predicted_n":40,"predicted_ms":879.5}}}}"#);
        assert_eq!(time(&llama), Some(Duration::from_millis(1000)));
        // vLLM with --enable-per-request-metrics: the time from scheduling to the first token
        // and from it to the last; `queue_time_ms` is the wait before, not the server's work.
        let vllm = format!(
            r#"{{{choice},"metrics":{{"time_to_first_token_ms":85.25,"generation_time_ms":1240.5,"queue_time_ms":912.3,"mean_itl_ms":9.1,"tokens_per_second":103.2}}}}"#
        );
        assert_eq!(time(&vllm), Some(Duration::from_micros(1_325_750)));
        let unknown = format!(r#"{{{choice},"metrics":{{"time_to_first_token_ms":null,"generation_time_ms":null,"queue_time_ms":null}}}}"#);
        assert_eq!(time(&unknown), None);
        assert_eq!(time(&format!(r#"{{{choice},"metrics":null}}"#)), None);
        // Cerebras (`time_info`) and Groq (`usage`), in seconds.
        let cerebras = format!(r#"{{{choice},"time_info":{{"queue_time":0.5,"prompt_time":0.25,"completion_time":1.0}}}}"#);
        assert_eq!(time(&cerebras), Some(Duration::from_millis(1250)));
        let groq = format!(r#"{{{choice},"usage":{{"prompt_tokens":5,"completion_tokens":3,"queue_time":2.0,"prompt_time":0.5,"completion_time":0.5}}}}"#);
        assert_eq!(time(&groq), Some(Duration::from_secs(1)));
        // Not said, said in half, or said wrongly: nothing is made up.
        assert_eq!(time(&format!("{{{choice}}}")), None);
        assert_eq!(time(&format!(r#"{{{choice},"timings":{{"prompt_ms":120.5}}}}"#)), None);
        assert_eq!(time(&format!(r#"{{{choice},"timings":{{"prompt_ms":-1,"predicted_ms":5}}}}"#)), None);
        assert_eq!(time(&format!(r#"{{{choice},"timings":{{"prompt_ms":"1","predicted_ms":5}}}}"#)), None);
        assert_eq!(time(&format!(r#"{{{choice},"timings":{{"prompt_ms":1e308,"predicted_ms":1e308}}}}"#)), None);
    }

    #[test]
    fn tgis_time_is_read_from_its_header() {
        let headers = |value: &str| vec![("x-queue-time".to_owned(), "2000".to_owned()), ("X-Inference-Time".to_owned(), value.to_owned())];
        assert_eq!(server_time_from_headers(&headers("1250")), Some(Duration::from_millis(1250)));
        assert_eq!(server_time_from_headers(&headers(" 0 ")), Some(Duration::ZERO));
        // Not said, or said wrongly: nothing is made up.
        assert_eq!(server_time_from_headers(&[("x-queue-time".to_owned(), "2000".to_owned())]), None);
        for wrong in ["", "-5", "soon", "NaN", "inf", "1e400"] {
            assert_eq!(server_time_from_headers(&headers(wrong)), None, "{wrong}");
        }
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_completion("<html>502</html>").is_err());
        assert!(parse_completion("{}").is_err());
    }
}
