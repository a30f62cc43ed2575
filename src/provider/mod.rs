//! The OpenAI-compatible chat client: builds `/chat/completions` requests, sends them with a
//! per-request timeout and no library-level retries, and classifies every outcome so the runner
//! sees each one.

pub mod batch;
mod error;
mod request;
mod response;

use std::time::{Duration, Instant};

pub use error::{CallError, RateLimit, parse_retry_after};
pub use request::{ChatRequest, Message, request_body, response_format};
pub use response::{Completion, parse_completion};

use crate::secret::ApiKey;

/// Headers worth keeping from a response: rate-limit state and retry hints.
pub type RateHeaders = Vec<(String, String)>;

/// A successful HTTP exchange: the parsed completion and what it took.
#[derive(Debug, Clone)]
pub struct Answer {
    pub completion: Completion,
    /// The response body as received (for the cache and audit).
    pub body: String,
    pub status: u16,
    pub latency: Duration,
    pub headers: RateHeaders,
}

/// The chat client of one job.
#[derive(Debug, Clone)]
pub struct ChatClient {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    api_key: Option<ApiKey>,
}

impl ChatClient {
    /// `base_url` is the API root (`…/v1`); the endpoint is `base_url/chat/completions`.
    /// `connect_timeout` bounds connection set-up; each call gets its own overall timeout.
    pub fn new(base_url: &str, api_key: Option<ApiKey>, connect_timeout: Duration) -> anyhow::Result<Self> {
        let base = base_url.trim_end_matches('/');
        let endpoint = reqwest::Url::parse(&format!("{base}/chat/completions"))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10).min(connect_timeout))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("backfill/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, endpoint, api_key })
    }

    pub fn endpoint(&self) -> &reqwest::Url {
        &self.endpoint
    }

    /// Sends one request body (already serialised), cut after `timeout`, and classifies the
    /// outcome.
    pub async fn send(&self, body: &[u8], timeout: Duration) -> Result<Answer, CallError> {
        let started = Instant::now();
        let exchange = async {
            let mut request = self
                .http
                .post(self.endpoint.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_vec());
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key.expose());
            }
            let response = request.send().await?;
            let status = response.status().as_u16();
            let headers = keep_headers(response.headers());
            let text = response.text().await?;
            Ok::<_, reqwest::Error>((status, headers, text))
        };
        let (status, headers, text) = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => return Err(CallError::Timeout { after: timeout }),
            Ok(Err(e)) => return Err(CallError::from_transport(&e)),
            Ok(Ok(parts)) => parts,
        };
        let latency = started.elapsed();
        if !(200..300).contains(&status) {
            return Err(CallError::from_status(status, &headers, &text));
        }
        let completion = parse_completion(&text).map_err(|reason| CallError::BadOutput {
            reason,
            status,
            body: text.clone(),
        })?;
        Ok(Answer { completion, body: text, status, latency, headers })
    }
}

fn keep_headers(headers: &reqwest::header::HeaderMap) -> RateHeaders {
    headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            n.starts_with("x-ratelimit-")
                || n.starts_with("anthropic-ratelimit-")
                || n == "retry-after"
                || n == "retry-after-ms"
        })
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
        .collect()
}
