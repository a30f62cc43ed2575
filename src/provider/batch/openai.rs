//! OpenAI's Batch API: upload a JSONL file (`purpose = batch`), create a batch on
//! `/v1/chat/completions` with a 24-hour window, poll it, and read its output and error files.

use async_trait::async_trait;
use serde_json::{Value, json};

use super::http::Http;
use super::{BatchApi, BatchLimits, BatchStatus, CLOCK_SLACK_MS, Dialect, Found, MAX_LISTING_PAGES, RequestResult, ResultLine, Wanted};
use crate::provider::{CallError, ChatRequest};

pub struct OpenAiBatches {
    http: Http,
    limits: BatchLimits,
}

impl OpenAiBatches {
    pub(super) fn new(http: Http, limits: BatchLimits) -> Self {
        Self { http, limits }
    }
}

fn text(value: &Value, key: &str) -> Option<String> {
    value.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn id_of(value: &Value, what: &str) -> Result<String, CallError> {
    text(value, "id").ok_or_else(|| CallError::BadOutput {
        reason: format!("the {what} answer has no `id`"),
        status: 200,
        body: value.to_string().chars().take(500).collect(),
    })
}

/// One line of an output or error file.
fn result_line(value: &Value) -> Option<ResultLine> {
    let custom_id = text(value, "custom_id")?;
    let response = value.get("response").filter(|r| r.is_object());
    let error = value.get("error").filter(|e| e.is_object());
    let result = match (response, error) {
        (Some(response), _) => {
            let status = response.get("status_code").and_then(Value::as_u64).unwrap_or(0) as u16;
            let body = response.get("body").cloned().unwrap_or(Value::Null);
            if (200..300).contains(&status) {
                RequestResult::Answered { body: body.to_string() }
            } else {
                let message = body
                    .get("error")
                    .and_then(|e| e.get("message"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| body.to_string());
                RequestResult::Failed { status: Some(status), message }
            }
        }
        (None, Some(error)) => {
            let code = text(error, "code").unwrap_or_default();
            let message = text(error, "message").unwrap_or_else(|| code.clone());
            match code.as_str() {
                "batch_expired" | "batch_cancelled" => RequestResult::NotRun { why: message },
                _ => RequestResult::Failed { status: None, message },
            }
        }
        (None, None) => RequestResult::Failed { status: None, message: "the result line has neither a response nor an error".into() },
    };
    Some(ResultLine { custom_id, result })
}

/// A listed batch is ours when its metadata carries our tag or it was made from our file.
fn is_ours(batch: &Value, wanted: &Wanted<'_>) -> bool {
    let same_file = wanted.file_id.is_some() && text(batch, "input_file_id").as_deref() == wanted.file_id;
    let same_tag = batch.get("metadata").and_then(|m| m.get("backfill")).and_then(Value::as_str) == Some(wanted.tag);
    same_file || same_tag
}

/// The listing says it has more but names no new place to go on from.
pub(super) fn listing_stuck(path: &str) -> CallError {
    CallError::BadOutput {
        reason: format!("the batch listing ({path}) says it has more batches but gives no new position to read on from"),
        status: 200,
        body: String::new(),
    }
}

pub(super) fn listing_too_long() -> CallError {
    CallError::Fatal {
        status: 200,
        message: format!(
            "the provider's batch listing goes on beyond {} pages without reaching the time this run's batch was \
             created; cannot tell whether it exists, so nothing is created twice: look for the batch in the provider's \
             console, or cancel old batches, and run again",
            MAX_LISTING_PAGES
        ),
    }
}

fn parse_lines(text: &str) -> Vec<ResultLine> {
    text.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter_map(|v| result_line(&v)).collect()
}

#[async_trait]
impl BatchApi for OpenAiBatches {
    fn dialect(&self) -> Dialect {
        Dialect::OpenAi
    }

    fn limits(&self) -> BatchLimits {
        self.limits
    }

    fn line(&self, custom_id: &str, request: &ChatRequest) -> String {
        json!({ "custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": request }).to_string()
    }

    async fn upload(&self, jsonl: &[u8]) -> Result<Option<String>, CallError> {
        let file = self.http.post_file("/files", "batch", "backfill-batch.jsonl", jsonl.to_vec()).await?;
        Ok(Some(id_of(&file, "file upload")?))
    }

    async fn create(&self, file_id: Option<&str>, _jsonl: &[u8], tag: &str) -> Result<String, CallError> {
        let body = json!({
            "input_file_id": file_id.unwrap_or_default(),
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": { "backfill": tag },
        });
        id_of(&self.http.post_json("/batches", &body).await?, "batch creation")
    }

    async fn find(&self, wanted: &Wanted<'_>) -> Result<Found, CallError> {
        let mut after: Option<String> = None;
        for _ in 0..MAX_LISTING_PAGES {
            let path = match &after {
                Some(id) => format!("/batches?limit=100&after={id}"),
                None => "/batches?limit=100".to_owned(),
            };
            let page = self.http.get_json(&path).await?;
            let data = page.get("data").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
            if let Some(found) = data.iter().find(|b| is_ours(b, wanted)) {
                return Ok(Found::Ours(id_of(found, "batch listing")?));
            }
            // Newest first: once a page reaches batches created before ours went out, the rest
            // of the listing is older still.
            let oldest_ms = data.iter().filter_map(|b| b.get("created_at").and_then(Value::as_i64)).min().map(|s| s.saturating_mul(1000));
            if oldest_ms.is_some_and(|at| at < wanted.since_ms - CLOCK_SLACK_MS) {
                return Ok(Found::Nothing);
            }
            let has_more = page.get("has_more").and_then(Value::as_bool).unwrap_or(false);
            let last = text(&page, "last_id").or_else(|| data.last().and_then(|b| text(b, "id")));
            match last {
                Some(last) if has_more && after.as_deref() != Some(last.as_str()) => after = Some(last),
                Some(_) if has_more => return Err(listing_stuck(&path)),
                _ => return Ok(Found::Nothing),
            }
        }
        Err(listing_too_long())
    }

    async fn status(&self, batch_id: &str) -> Result<BatchStatus, CallError> {
        let b = self.http.get_json(&format!("/batches/{batch_id}")).await?;
        let status = text(&b, "status").unwrap_or_default();
        let count = |key: &str| b.get("request_counts").and_then(|c| c.get(key)).and_then(Value::as_u64).unwrap_or(0);
        let errors = b.get("errors").and_then(|e| e.get("data")).and_then(Value::as_array).filter(|d| !d.is_empty()).map(|d| {
            d.iter().filter_map(|e| text(e, "message")).collect::<Vec<_>>().join("; ")
        });
        Ok(BatchStatus {
            ended: matches!(status.as_str(), "completed" | "failed" | "expired" | "cancelled"),
            status,
            total: count("total"),
            completed: count("completed"),
            failed: count("failed"),
            output_file_id: text(&b, "output_file_id"),
            error_file_id: text(&b, "error_file_id"),
            results_url: None,
            errors,
        })
    }

    async fn results(&self, _batch_id: &str, status: &BatchStatus) -> Result<Vec<ResultLine>, CallError> {
        let mut lines = Vec::new();
        for file in [&status.output_file_id, &status.error_file_id].into_iter().flatten() {
            lines.extend(parse_lines(&self.http.get_text(&format!("/files/{file}/content")).await?));
        }
        Ok(lines)
    }

    async fn cancel(&self, batch_id: &str) -> Result<(), CallError> {
        self.http.post_json(&format!("/batches/{batch_id}/cancel"), &json!({})).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(since_ms: i64) -> Wanted<'static> {
        Wanted { file_id: Some("file-ours"), tag: "job:items:run1:batch1:1", custom_id_prefix: "bf-x-", since_ms, requests: 2 }
    }

    async fn serve(listing: Value) -> (wiremock::MockServer, OpenAiBatches) {
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(wiremock::matchers::path("/v1/batches"))
            .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(listing))
            .mount(&server)
            .await;
        let http = Http::new(&format!("{}/v1", server.uri()), None, Dialect::OpenAi, std::time::Duration::from_secs(5)).unwrap();
        (server, OpenAiBatches::new(http, BatchLimits::OPENAI))
    }

    #[tokio::test]
    async fn a_listing_that_never_moves_on_is_an_error_not_a_loop() {
        let now = crate::store::now_ms();
        let page = json!({ "data": [{ "id": "b1", "created_at": now / 1000, "metadata": { "backfill": "other" } }], "has_more": true, "last_id": "b1" });
        let (_server, api) = serve(page).await;
        let error = api.find(&wanted(now)).await.unwrap_err();
        assert!(error.to_string().contains("has more batches"), "{error}");
    }

    #[tokio::test]
    async fn a_listing_reaching_back_before_the_batch_ends_the_search() {
        let now = crate::store::now_ms();
        let page = json!({ "data": [{ "id": "b1", "created_at": now / 1000 - 3600 }], "has_more": true, "last_id": "b1" });
        let (_server, api) = serve(page).await;
        assert_eq!(api.find(&wanted(now)).await.unwrap(), Found::Nothing);
        let ours = json!({ "data": [{ "id": "b2", "created_at": now / 1000, "metadata": { "backfill": "job:items:run1:batch1:1" } }], "has_more": false });
        let (_server, api) = serve(ours).await;
        assert_eq!(api.find(&wanted(now)).await.unwrap(), Found::Ours("b2".into()));
    }

    #[test]
    fn output_and_error_lines_are_told_apart() {
        let text = r#"{"id":"r1","custom_id":"call-1","response":{"status_code":200,"body":{"choices":[]}},"error":null}
{"id":"r2","custom_id":"call-2","response":{"status_code":400,"body":{"error":{"message":"bad schema"}}},"error":null}
{"id":"r3","custom_id":"call-3","response":null,"error":{"code":"batch_expired","message":"not run in time"}}
{"id":"r4","custom_id":"call-4","response":null,"error":{"code":"server_error","message":"boom"}}
"#;
        let lines = parse_lines(text);
        assert_eq!(lines.len(), 4);
        assert!(matches!(&lines[0].result, RequestResult::Answered { body } if body.contains("choices")));
        assert_eq!(lines[1].result, RequestResult::Failed { status: Some(400), message: "bad schema".into() });
        assert!(matches!(&lines[2].result, RequestResult::NotRun { .. }));
        assert_eq!(lines[3].result, RequestResult::Failed { status: None, message: "boom".into() });
    }
}
