//! HTTP for the batch APIs: the job's base URL, the provider's authentication headers, and
//! every non-2xx answer classified like a chat call's.

use std::time::Duration;

use serde_json::Value;

use super::Dialect;
use crate::provider::CallError;
use crate::secret::ApiKey;

/// Anthropic's API version header value.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The longest body a batch API answer may have (a results file of a full batch included); a
/// longer one is not read further and the step fails, naming the limit.
pub const BATCH_BODY_LIMIT: u64 = 1 << 30;

pub struct Http {
    client: reqwest::Client,
    base: String,
    /// The base URL's origin: the only one credentials are ever sent to.
    origin: reqwest::Url,
    api_key: Option<ApiKey>,
    dialect: Dialect,
}

impl Http {
    pub fn new(base_url: &str, api_key: Option<ApiKey>, dialect: Dialect, timeout: Duration) -> anyhow::Result<Self> {
        let base = base_url.trim_end_matches('/').to_owned();
        let origin = reqwest::Url::parse(&base)?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(timeout)
            .user_agent(concat!("backfill/", env!("CARGO_PKG_VERSION")))
            .redirect(crate::provider::redirect_policy(&origin, false))
            .build()?;
        Ok(Self { client, base, origin, api_key, dialect })
    }

    /// `path` below the base URL (`/batches`), or a full URL the provider gave (`results_url`)
    /// when it has the base URL's origin (scheme, host and port): the key is sent with every
    /// request, so a URL elsewhere is refused, whatever the provider says.
    fn url(&self, path: &str) -> Result<String, CallError> {
        if !(path.starts_with("http://") || path.starts_with("https://")) {
            return Ok(format!("{}{path}", self.base));
        }
        let url = reqwest::Url::parse(path).map_err(|e| CallError::BadOutput {
            reason: format!("the batch API named a URL that does not parse ({e})"),
            status: 200,
            body: String::new(),
        })?;
        if url.origin() != self.origin.origin() {
            return Err(CallError::Redirected {
                message: format!(
                    "the batch API named {} for the results, another host than model.base_url's ({}); \
                     the key is never sent there. Download them yourself, or check model.base_url",
                    crate::provider::shown_url(&url),
                    self.origin.origin().ascii_serialization()
                ),
            });
        }
        Ok(url.to_string())
    }

    fn authorised(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match (&self.api_key, self.dialect) {
            (Some(key), Dialect::OpenAi) => request.bearer_auth(key.expose()),
            (Some(key), Dialect::Anthropic) => request.header("x-api-key", key.expose()).header("anthropic-version", ANTHROPIC_VERSION),
            (None, Dialect::Anthropic) => request.header("anthropic-version", ANTHROPIC_VERSION),
            (None, Dialect::OpenAi) => request,
        }
    }

    /// Sends one request and reads its body, at most `BATCH_BODY_LIMIT` bytes.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<String, CallError> {
        let response = self.authorised(request).send().await.map_err(|e| CallError::from_transport(&e))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .filter(|(n, _)| n.starts_with("retry-after") || n.contains("ratelimit"))
            .collect();
        let text = match crate::provider::read_limited(response, BATCH_BODY_LIMIT).await.map_err(|e| CallError::from_transport(&e))? {
            crate::provider::Limited::Whole(text) => text,
            // An error's body is only read for its message: what fits is enough.
            crate::provider::Limited::Cut(prefix) if !(200..300).contains(&status) => prefix,
            crate::provider::Limited::Cut(prefix) => {
                return Err(CallError::BadOutput {
                    reason: format!("the batch API's answer is longer than {BATCH_BODY_LIMIT} bytes and was not read further"),
                    status,
                    body: prefix.chars().take(2000).collect(),
                });
            }
        };
        if !(200..300).contains(&status) {
            return Err(CallError::from_status(status, &headers, &text));
        }
        Ok(text)
    }

    fn json(text: &str) -> Result<Value, CallError> {
        serde_json::from_str(text).map_err(|e| CallError::BadOutput {
            reason: format!("the batch API answered with something that is not JSON: {e}"),
            status: 200,
            body: text.chars().take(2000).collect(),
        })
    }

    pub async fn get_json(&self, path: &str) -> Result<Value, CallError> {
        Self::json(&self.send(self.client.get(self.url(path)?)).await?)
    }

    pub async fn get_text(&self, path: &str) -> Result<String, CallError> {
        self.send(self.client.get(self.url(path)?)).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, CallError> {
        Self::json(&self.send(self.client.post(self.url(path)?).json(body)).await?)
    }

    /// A JSON body already serialised (large inline batches are not parsed twice).
    pub async fn post_raw_json(&self, path: &str, body: Vec<u8>) -> Result<Value, CallError> {
        let request = self.client.post(self.url(path)?).header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        Self::json(&self.send(request).await?)
    }

    pub async fn post_file(&self, path: &str, purpose: &str, file_name: &str, bytes: Vec<u8>) -> Result<Value, CallError> {
        let part = reqwest::multipart::Part::bytes(bytes)
            .file_name(file_name.to_owned())
            .mime_str("application/jsonl")
            .map_err(|e| CallError::from_transport(&e))?;
        let form = reqwest::multipart::Form::new().text("purpose", purpose.to_owned()).part("file", part);
        Self::json(&self.send(self.client.post(self.url(path)?).multipart(form)).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_goes_only_to_the_base_urls_origin() {
        let http = Http::new("https://api.anthropic.com/v1/", Some(ApiKey::new("k".into())), Dialect::Anthropic, Duration::from_secs(5)).unwrap();
        assert_eq!(http.url("/messages/batches").unwrap(), "https://api.anthropic.com/v1/messages/batches");
        assert_eq!(http.url("https://api.anthropic.com/v1/messages/batches/b/results").unwrap(), "https://api.anthropic.com/v1/messages/batches/b/results");
        for elsewhere in [
            "https://evil.example/v1/messages/batches/b/results",
            "http://api.anthropic.com/v1/results",
            "https://api.anthropic.com:8443/v1/results",
            "https://api.anthropic.com.evil.example/v1/results",
            "https://user@evil.example/results?token=x",
        ] {
            let refused = http.url(elsewhere).unwrap_err();
            assert!(matches!(refused, CallError::Redirected { .. }), "{elsewhere}");
            assert!(refused.to_string().contains("never sent there"), "{refused}");
            assert!(!refused.to_string().contains("token=x"), "{refused}");
        }
    }
}
