//! Anthropic's Message Batches API: the requests go inline in `POST /v1/messages/batches`
//! (Messages API parameters), the batch is polled until `processing_status = ended`, and the
//! results come as a JSONL stream from `results_url`. Each answer is converted to the shape
//! of an OpenAI chat completion so the rest of the runner reads one format.

use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use serde_json::{Value, json};

use super::http::Http;
use super::{BatchApi, BatchLimits, BatchStatus, CLOCK_SLACK_MS, Dialect, Found, MAX_LISTING_PAGES, RequestResult, ResultLine, Wanted};
use crate::provider::{CallError, ChatRequest};

pub struct AnthropicBatches {
    http: Http,
    limits: BatchLimits,
}

impl AnthropicBatches {
    pub(super) fn new(http: Http, limits: BatchLimits) -> Self {
        Self { http, limits }
    }
}

fn text(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// The Messages API parameters of a chat request.
fn params(request: &ChatRequest) -> Value {
    let system: Vec<&str> = request.messages.iter().filter(|m| m.role == "system").map(|m| m.content.as_str()).collect();
    let messages: Vec<Value> = request
        .messages
        .iter()
        .filter(|m| m.role != "system")
        .map(|m| json!({ "role": m.role, "content": m.content }))
        .collect();
    let mut params = json!({ "model": request.model, "max_tokens": request.max_tokens, "messages": messages });
    if !system.is_empty() {
        params["system"] = Value::String(system.join("\n\n"));
    }
    if let Some(t) = request.temperature {
        params["temperature"] = json!(t);
    }
    params
}

/// An Anthropic message as an OpenAI chat-completion body.
fn as_completion(message: &Value) -> Value {
    let content: String = message
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|block| block.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|block| block.get("text").and_then(Value::as_str))
        .collect();
    let finish = match message.get("stop_reason").and_then(Value::as_str) {
        Some("max_tokens") => "length",
        _ => "stop",
    };
    let usage = message.get("usage").cloned().unwrap_or(Value::Null);
    let count = |key: &str| usage.get(key).and_then(Value::as_u64).unwrap_or(0);
    let cached = count("cache_read_input_tokens");
    let prompt = count("input_tokens") + cached + count("cache_creation_input_tokens");
    json!({
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": finish }],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": count("output_tokens"),
            "prompt_tokens_details": { "cached_tokens": cached }
        }
    })
}

fn result_line(value: &Value) -> Option<ResultLine> {
    let custom_id = text(value, "custom_id")?;
    let result = value.get("result")?;
    let result = match result.get("type").and_then(Value::as_str) {
        Some("succeeded") => RequestResult::Answered { body: as_completion(result.get("message")?).to_string() },
        Some("errored") => {
            let error = result.get("error").map(|e| e.get("error").unwrap_or(e)).cloned().unwrap_or(Value::Null);
            let message = text(&error, "message").unwrap_or_else(|| error.to_string());
            let status = match error.get("type").and_then(Value::as_str) {
                Some("invalid_request_error") => Some(400),
                Some("authentication_error") => Some(401),
                Some("permission_error") => Some(403),
                Some("not_found_error") => Some(404),
                Some("rate_limit_error") => Some(429),
                Some("overloaded_error") => Some(529),
                Some("api_error") => Some(500),
                _ => None,
            };
            RequestResult::Failed { status, message }
        }
        Some(kind @ ("canceled" | "expired")) => RequestResult::NotRun { why: format!("the batch {kind} before this request ran") },
        _ => RequestResult::Failed { status: None, message: format!("unknown result: {result}") },
    };
    Some(ResultLine { custom_id, result })
}

/// The requests of a listed or polled batch, whatever state they are in.
fn total(batch: &Value) -> u64 {
    let counts = batch.get("request_counts");
    ["processing", "succeeded", "errored", "canceled", "expired"]
        .iter()
        .filter_map(|k| counts.and_then(|c| c.get(*k)).and_then(Value::as_u64))
        .fold(0u64, u64::saturating_add)
}

fn batch_status(b: &Value) -> BatchStatus {
    let count = |key: &str| b.get("request_counts").and_then(|c| c.get(key)).and_then(Value::as_u64).unwrap_or(0);
    let status = text(b, "processing_status").unwrap_or_default();
    BatchStatus {
        ended: status == "ended",
        total: total(b),
        completed: count("succeeded"),
        failed: count("errored").saturating_add(count("canceled")).saturating_add(count("expired")),
        output_file_id: None,
        error_file_id: None,
        results_url: text(b, "results_url"),
        errors: None,
        status,
    }
}

fn created_ms(batch: &Value) -> Option<i64> {
    let created = humantime::parse_rfc3339_weak(batch.get("created_at")?.as_str()?.trim_end_matches('Z')).ok()?;
    Some(created.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64)
}

#[async_trait]
impl BatchApi for AnthropicBatches {
    fn dialect(&self) -> Dialect {
        Dialect::Anthropic
    }

    fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn line(&self, custom_id: &str, request: &ChatRequest) -> String {
        json!({ "custom_id": custom_id, "params": params(request) }).to_string()
    }

    async fn upload(&self, _jsonl: &[u8]) -> Result<Option<String>, CallError> {
        Ok(None)
    }

    async fn create(&self, _file_id: Option<&str>, jsonl: &[u8], _tag: &str) -> Result<String, CallError> {
        let mut body = Vec::with_capacity(jsonl.len() + 16);
        body.extend_from_slice(b"{\"requests\":[");
        for (i, line) in jsonl.split(|b| *b == b'\n').filter(|l| !l.is_empty()).enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(line);
        }
        body.extend_from_slice(b"]}");
        let batch = self.http.post_raw_json("/messages/batches", body).await?;
        text(&batch, "id").ok_or_else(|| CallError::BadOutput {
            reason: "the batch creation answer has no `id`".into(),
            status: 200,
            body: batch.to_string().chars().take(500).collect(),
        })
    }

    async fn find(&self, wanted: &Wanted<'_>) -> Result<Found, CallError> {
        let mut candidates: Vec<Value> = Vec::new();
        let mut after: Option<String> = None;
        let mut pages = 0;
        loop {
            if pages == MAX_LISTING_PAGES {
                return Err(super::openai::listing_too_long());
            }
            pages += 1;
            let path = match &after {
                Some(id) => format!("/messages/batches?limit=100&after_id={id}"),
                None => "/messages/batches?limit=100".to_owned(),
            };
            let page = self.http.get_json(&path).await?;
            let data = page.get("data").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
            let window = wanted.since_ms - CLOCK_SLACK_MS;
            // Created after ours went out, with as many requests: may be ours.
            candidates.extend(
                data.iter().filter(|b| created_ms(b).is_some_and(|at| at >= window) && total(b) == wanted.requests).cloned(),
            );
            // Newest first: a page reaching back before that time ends the search.
            if data.iter().filter_map(created_ms).any(|at| at < window) {
                break;
            }
            let has_more = page.get("has_more").and_then(Value::as_bool).unwrap_or(false);
            let last = text(&page, "last_id").or_else(|| data.last().and_then(|b| text(b, "id")));
            match last {
                Some(last) if has_more && after.as_deref() != Some(last.as_str()) => after = Some(last),
                Some(_) if has_more => return Err(super::openai::listing_stuck(&path)),
                _ => break,
            }
        }
        // Only its requests prove a batch ours: every custom_id carries this batch's prefix.
        // They can be read once the batch has ended.
        let mut unproven = Vec::new();
        for candidate in candidates {
            let Some(id) = text(&candidate, "id") else { continue };
            let status = batch_status(&candidate);
            if !status.ended {
                unproven.push(id);
                continue;
            }
            let lines = self.results(&id, &status).await?;
            if !lines.is_empty() && lines.iter().all(|l| l.custom_id.starts_with(wanted.custom_id_prefix)) {
                return Ok(Found::Ours(id));
            }
        }
        Ok(if unproven.is_empty() { Found::Nothing } else { Found::Unproven(unproven) })
    }

    async fn status(&self, batch_id: &str) -> Result<BatchStatus, CallError> {
        Ok(batch_status(&self.http.get_json(&format!("/messages/batches/{batch_id}")).await?))
    }

    async fn results(&self, batch_id: &str, status: &BatchStatus) -> Result<Vec<ResultLine>, CallError> {
        let url = status.results_url.clone().unwrap_or_else(|| format!("/messages/batches/{batch_id}/results"));
        let text = self.http.get_text(&url).await?;
        Ok(text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter_map(|v| result_line(&v)).collect())
    }

    async fn cancel(&self, batch_id: &str) -> Result<(), CallError> {
        self.http.post_json(&format!("/messages/batches/{batch_id}/cancel"), &json!({})).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listing of `batches`, with results for the ended ones under `/results`.
    async fn serve(batches: Vec<Value>, results: &str) -> (wiremock::MockServer, AnthropicBatches) {
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(wiremock::matchers::path("/v1/messages/batches"))
            .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(json!({ "data": batches, "has_more": false })))
            .mount(&server)
            .await;
        wiremock::Mock::given(wiremock::matchers::path_regex("/v1/messages/batches/.*/results"))
            .respond_with(wiremock::ResponseTemplate::new(200).set_body_string(results.to_owned()))
            .mount(&server)
            .await;
        let http = Http::new(&format!("{}/v1", server.uri()), None, Dialect::Anthropic, std::time::Duration::from_secs(5)).unwrap();
        (server, AnthropicBatches::new(http, BatchLimits::ANTHROPIC))
    }

    fn listed(id: &str, status: &str, requests: u64) -> Value {
        let created = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        json!({ "id": id, "processing_status": status, "created_at": created,
                "request_counts": { "processing": if status == "ended" { 0 } else { requests }, "succeeded": if status == "ended" { requests } else { 0 } } })
    }

    #[tokio::test]
    async fn only_results_with_our_custom_ids_prove_a_batch_ours() {
        let wanted = Wanted { file_id: None, tag: "t", custom_id_prefix: "bf-0123456789abcdef-", since_ms: crate::store::now_ms(), requests: 2 };
        let theirs = "{\"custom_id\":\"other-1\",\"result\":{\"type\":\"expired\"}}\n{\"custom_id\":\"other-2\",\"result\":{\"type\":\"expired\"}}\n";
        // Same time, same size, ended, but another job's requests: not ours, nothing to wait for.
        let (_s, api) = serve(vec![listed("msgbatch_1", "ended", 2)], theirs).await;
        assert_eq!(api.find(&wanted).await.unwrap(), Found::Nothing);
        // Still running: it cannot be told yet.
        let (_s, api) = serve(vec![listed("msgbatch_2", "in_progress", 2)], theirs).await;
        assert_eq!(api.find(&wanted).await.unwrap(), Found::Unproven(vec!["msgbatch_2".into()]));
        let ours = "{\"custom_id\":\"bf-0123456789abcdef-1\",\"result\":{\"type\":\"expired\"}}\n{\"custom_id\":\"bf-0123456789abcdef-2\",\"result\":{\"type\":\"expired\"}}\n";
        let (_s, api) = serve(vec![listed("msgbatch_3", "ended", 2), listed("msgbatch_4", "ended", 3)], ours).await;
        assert_eq!(api.find(&wanted).await.unwrap(), Found::Ours("msgbatch_3".into()));
    }

    #[test]
    fn requests_become_messages_api_params() {
        let request = ChatRequest::new("claude-x", Some("be brief"), "hi".into(), Some(0.2), 300, None);
        let p = params(&request);
        assert_eq!(p["system"], "be brief");
        assert_eq!(p["messages"], json!([{ "role": "user", "content": "hi" }]));
        assert_eq!(p["max_tokens"], 300);
    }

    #[test]
    fn results_become_completions() {
        let line = json!({ "custom_id": "c1", "result": { "type": "succeeded", "message": {
            "content": [{ "type": "text", "text": "{\"1\":\"x\"}" }], "stop_reason": "max_tokens",
            "usage": { "input_tokens": 100, "output_tokens": 20, "cache_read_input_tokens": 50 } } } });
        let ResultLine { result: RequestResult::Answered { body }, .. } = result_line(&line).unwrap() else { panic!() };
        let completion = crate::provider::parse_completion(&body).unwrap();
        assert_eq!(completion.content, "{\"1\":\"x\"}");
        assert!(completion.truncated());
        let usage = completion.usage.unwrap();
        assert_eq!((usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens), (150, 20, 50));
        let errored = json!({ "custom_id": "c2", "result": { "type": "errored", "error": { "type": "error",
            "error": { "type": "invalid_request_error", "message": "too long" } } } });
        assert_eq!(result_line(&errored).unwrap().result, RequestResult::Failed { status: Some(400), message: "too long".into() });
        let expired = json!({ "custom_id": "c3", "result": { "type": "expired" } });
        assert!(matches!(result_line(&expired).unwrap().result, RequestResult::NotRun { .. }));
    }

    #[test]
    fn creation_times_parse() {
        assert_eq!(created_ms(&json!({ "created_at": "1970-01-01T00:00:01.5Z" })), Some(1500));
    }
}
