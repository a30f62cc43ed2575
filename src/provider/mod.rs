//! The OpenAI-compatible chat client: builds `/chat/completions` requests, sends them with a
//! per-request timeout and no library-level retries, and classifies every outcome so the runner
//! sees each one.

pub mod batch;
mod error;
mod gauges;
mod props;
mod request;
mod response;
mod stream;

use std::time::{Duration, Instant};

use tokio::sync::oneshot;

pub use error::{CallError, FLAGGED_BY_MODERATION, RateLimit, parse_retry_after};
pub use gauges::{GaugeReading, GaugeSource};
pub use props::ServerProps;
pub use request::{ChatRequest, Message, request_body, response_format};
pub use response::{Completion, JSON_REFUSED, parse_completion};

use crate::secret::ApiKey;

/// Headers worth keeping from a response: rate-limit state, retry hints and the server's own
/// time on the request (TGI's `x-inference-time`).
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
    /// How the answer came: `Delivery::Whole` (a plain JSON body: `send`, or a server that ignored
    /// `stream`), `Delivery::Streamed { first_chunk }` (SSE; time from the start of the call to the
    /// first chunk with generated text).
    pub delivery: Delivery,
}

/// How an answer came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Delivery {
    /// One plain JSON body.
    #[default]
    Whole,
    /// Server-Sent Events; `first_chunk` is the time from the start of the call to the first
    /// chunk carrying generated text or the finish reason (the whole call when none did).
    Streamed { first_chunk: Duration },
}

/// The chat client of one job.
#[derive(Debug, Clone)]
pub struct ChatClient {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    api_key: Option<ApiKey>,
    max_response_bytes: u64,
}

impl ChatClient {
    /// `base_url` is the API root (`…/v1`); the endpoint is `base_url/chat/completions`.
    /// `connect_timeout` bounds connection set-up; each call gets its own overall timeout.
    /// An answer longer than `max_response_bytes` is a failed call.
    pub fn new(base_url: &str, api_key: Option<ApiKey>, connect_timeout: Duration, max_response_bytes: u64) -> anyhow::Result<Self> {
        let base = base_url.trim_end_matches('/');
        let endpoint = reqwest::Url::parse(&format!("{base}/chat/completions"))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10).min(connect_timeout))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("backfill/", env!("CARGO_PKG_VERSION")))
            // Every request is a POST: a redirect that would turn it into a GET, or one to
            // another origin (which would receive the prompt and the key), is refused.
            .redirect(redirect_policy(&endpoint, true))
            .build()?;
        Ok(Self { http, endpoint, api_key, max_response_bytes })
    }

    pub fn endpoint(&self) -> &reqwest::Url {
        &self.endpoint
    }

    /// Sends one request body (already serialised), cut after `timeout`, and classifies the
    /// outcome.
    pub async fn send(&self, body: &[u8], timeout: Duration) -> Result<Answer, CallError> {
        let started = Instant::now();
        let exchange = async { read_whole(self.post(body.to_vec()).await?, self.max_response_bytes).await };
        let whole = within(timeout, exchange).await?;
        whole.into_answer(started.elapsed())
    }

    /// Sends `body` (the same serialised request object `send` takes) asking for a streamed answer:
    /// `"stream": true` and `"stream_options": {"include_usage": true}` are spliced in after its
    /// opening `{`. `first_chunk` is sent the `Instant` at which the first SSE event carrying
    /// generated text (or the finish reason) arrived — not a delta with the role alone, which
    /// some servers send before a slot takes the request up — at most once, and not at all when
    /// the answer never streams. Cut after `timeout` overall, like `send`.
    ///
    /// An error status, or a 2xx that is not `text/event-stream` (a server or proxy that ignored
    /// `stream`), is read and classified exactly as `send` does (`Delivery::Whole`), unless that
    /// 2xx body is an SSE stream all the same (it starts with `data:`, maybe after `:` comments: a
    /// mislabelled stream), which is then folded as one (`Delivery::Streamed`, its first chunk at
    /// the end of the call since it was not read as it came; its raw bytes held to
    /// `max_response_bytes`, as the unstreamed body it was sent as). A stream is read event by event and
    /// folded back into the body an unstreamed answer would have had (`Answer.body`, for the cache
    /// and audit), which is parsed as `send` parses one; that body is held to
    /// `max_response_bytes`, as an unstreamed one is, and the bytes of the stream (many times
    /// more per token) to `RAW_FACTOR` times it. The call ends at `data: [DONE]`; the rest of the
    /// body is read and dropped apart from it (for at most `DRAIN_TIME`, within `timeout`) so
    /// that the connection can be reused; nothing there fails the call.
    pub async fn send_streamed(&self, body: &[u8], timeout: Duration, first_chunk: oneshot::Sender<Instant>) -> Result<Answer, CallError> {
        let started = Instant::now();
        let limit = self.max_response_bytes;
        let exchange = async {
            let response = self.post(stream::streamed_body(body)).await?;
            let status = response.status().as_u16();
            if !(200..300).contains(&status) {
                return Ok(Reply::Whole(read_whole(response, limit).await?));
            }
            if !stream::is_event_stream(response.headers()) {
                let whole = read_whole(response, limit).await?;
                if !stream::looks_like_sse(&whole.text) {
                    return Ok(Reply::Whole(whole));
                }
                let text = fold_sse(&whole.text, status, &whole.headers, limit)?;
                return Ok(Reply::Streamed(Whole { text, ..whole }, None, None));
            }
            let headers = keep_headers(response.headers());
            let streamed = read_stream(response, status, &headers, limit, first_chunk).await?;
            Ok(Reply::Streamed(Whole { status, headers, text: streamed.text }, streamed.first, streamed.rest))
        };
        match within(timeout, exchange).await? {
            Reply::Whole(whole) => whole.into_answer(started.elapsed()),
            Reply::Streamed(whole, first, rest) => {
                let latency = started.elapsed();
                if let Some(rest) = rest {
                    // Apart from the call: the answer is complete, and neither its latency nor a
                    // cut at the end of the queue may wait on what follows it.
                    let budget = DRAIN_TIME.min(timeout.saturating_sub(latency));
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(budget, rest.drain()).await;
                    });
                }
                // A stream with no chunk carrying text (usage alone) had its first one at its end.
                let first_chunk = first.map_or(latency, |at| at.saturating_duration_since(started));
                whole.completed(latency, Delivery::Streamed { first_chunk })
            }
        }
    }

    /// Posts `body` with the key, as every chat call does.
    async fn post(&self, body: Vec<u8>) -> Result<reqwest::Response, CallError> {
        let mut request = self
            .http
            .post(self.endpoint.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose());
        }
        request.send().await.map_err(|e| CallError::from_transport(&e))
    }
}

/// How `send_streamed` was answered.
enum Reply {
    /// A plain body (an error, or a server that ignored `stream`).
    Whole(Whole),
    /// An SSE stream, its body rebuilt unstreamed, when its first chunk with text came, and
    /// what is left of its body after `data: [DONE]`.
    Streamed(Whole, Option<Instant>, Option<Rest>),
}

/// A response's status, kept headers and body.
struct Whole {
    status: u16,
    headers: RateHeaders,
    text: String,
}

impl Whole {
    /// The answer, or the error a non-2xx status stands for.
    fn into_answer(self, latency: Duration) -> Result<Answer, CallError> {
        if !(200..300).contains(&self.status) {
            if let Some(text) = response::failed_generation(self.status, &self.text) {
                // The model's answer, refused by the server's JSON check: read as the answer
                // it is, so that its complete entries are kept.
                return Whole { text, ..self }.completed(latency, Delivery::Whole);
            }
            return Err(CallError::from_status(self.status, &self.headers, &self.text));
        }
        self.completed(latency, Delivery::Whole)
    }

    /// The 2xx body parsed as a completion, with the server's time from the headers when the
    /// body does not say it.
    fn completed(self, latency: Duration, delivery: Delivery) -> Result<Answer, CallError> {
        let Whole { status, headers, text } = self;
        if let Some(error) = CallError::carried(&text, &headers) {
            return Err(error);
        }
        let mut completion = parse_completion(&text).map_err(|reason| CallError::BadOutput {
            reason,
            status,
            body: text.clone(),
        })?;
        if completion.server_time.is_none() {
            completion.server_time = response::server_time_from_headers(&headers);
        }
        Ok(Answer { completion, body: text, status, latency, headers, delivery })
    }
}

/// `exchange`, or `CallError::Timeout` when it takes longer than `timeout`.
async fn within<T>(timeout: Duration, exchange: impl Future<Output = Result<T, CallError>>) -> Result<T, CallError> {
    tokio::time::timeout(timeout, exchange).await.unwrap_or(Err(CallError::Timeout { after: timeout }))
}

/// A response read whole, a 2xx body held to `limit`.
async fn read_whole(response: reqwest::Response, limit: u64) -> Result<Whole, CallError> {
    let status = response.status().as_u16();
    let headers = keep_headers(response.headers());
    let text = match read_limited(response, limit).await.map_err(|e| CallError::from_transport(&e))? {
        Limited::Whole(text) => text,
        // An error's body is only read for its message: what fits is enough.
        Limited::Cut(prefix) if !(200..300).contains(&status) => prefix,
        Limited::Cut(_) => return Err(CallError::TooLarge { limit, status }),
    };
    Ok(Whole { status, headers, text })
}

/// How many times `max_response_bytes` the raw bytes of a stream may take: a streamed chunk
/// costs some 150 to 300 bytes per token (more with OpenAI's `obfuscation`), the folded answer
/// some 4.
const RAW_FACTOR: u64 = 64;

/// How much of a stream's raw bytes is kept for a failed call's body (`BadOutput`).
const ERROR_BODY_BYTES: usize = 64 << 10;

/// How long the rest of a body after `data: [DONE]` is read at most.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// A stream read: the rebuilt unstreamed body, when its first chunk with text came, and what is
/// left of its body after `data: [DONE]`.
struct Streamed {
    text: String,
    first: Option<Instant>,
    rest: Option<Rest>,
}

/// A response whose answer is read (up to `data: [DONE]`), the rest of its body unread, and how
/// many more bytes may be read of it.
struct Rest {
    response: reqwest::Response,
    budget: usize,
}

impl Rest {
    /// Reads the rest of the body and drops it, so that the connection goes back to the pool;
    /// gives up (dropping the connection) past the budget or on an error.
    async fn drain(mut self) {
        while let Ok(Some(chunk)) = self.response.chunk().await {
            match self.budget.checked_sub(chunk.len()) {
                Some(budget) => self.budget = budget,
                None => return,
            }
        }
    }
}

/// The rebuilt unstreamed body of an SSE stream read whole (`text`, a 2xx of status `status`),
/// held to `limit`; a stream that is no answer is `BadOutput` with `text` as its body (or the
/// error its error event names, `failed_stream`).
fn fold_sse(text: &str, status: u16, headers: &RateHeaders, limit: u64) -> Result<String, CallError> {
    let mut reader = stream::StreamReader::default();
    let fed = reader.feed(text.as_bytes()).and_then(|_| reader.end());
    fed.map_err(|reason| failed_stream(reason, &reader, status, headers, text.as_bytes()))?;
    let rebuilt = reader
        .into_body()
        .map_err(|reason| CallError::BadOutput { reason, status, body: text.to_owned() })?;
    if rebuilt.len() as u64 > limit {
        return Err(CallError::TooLarge { limit, status });
    }
    Ok(rebuilt)
}

/// A stream that failed: the error its server's error event names by an HTTP status (an
/// overloaded SGLang's 503, a proxy's 502 from the model behind it), classified as that status
/// would be; else `BadOutput` with `reason` and the bytes `received` as its body.
fn failed_stream(reason: String, reader: &stream::StreamReader, status: u16, headers: &RateHeaders, received: &[u8]) -> CallError {
    reader
        .server_error()
        .and_then(|data| CallError::carried(data, headers))
        .unwrap_or_else(|| CallError::BadOutput { reason, status, body: String::from_utf8_lossy(received).into_owned() })
}

/// Reads an SSE answer chunk by chunk, sending `first_chunk` the moment the first event with
/// generated text or a finish reason arrived (also when the failure that ends the stream came
/// with it), until `data: [DONE]` or the end of the body; returns the rebuilt unstreamed
/// body, that moment, and the rest of the body after `[DONE]`. The rebuilt body is held to
/// `limit` (as an unstreamed one is), the bytes read to `RAW_FACTOR` times it: past either, the
/// call is `TooLarge`. A connection dropped mid-body is the transport error `send` would give; a
/// stream the server failed, or that is no answer, is `BadOutput` with the first
/// `ERROR_BODY_BYTES` received as its body.
async fn read_stream(
    mut response: reqwest::Response,
    status: u16,
    headers: &RateHeaders,
    limit: u64,
    first_chunk: oneshot::Sender<Instant>,
) -> Result<Streamed, CallError> {
    let max = usize::try_from(limit).unwrap_or(usize::MAX);
    let raw_max = usize::try_from(limit.saturating_mul(RAW_FACTOR)).unwrap_or(usize::MAX);
    let too_large = || CallError::TooLarge { limit, status };
    let mut reader = stream::StreamReader::default();
    let mut received = Vec::new();
    let mut first_chunk = Some(first_chunk);
    let mut first = None;
    let bad = |reason: String, reader: &stream::StreamReader, received: &[u8]| failed_stream(reason, reader, status, headers, received);
    let rest = loop {
        let Some(chunk) = response.chunk().await.map_err(|e| CallError::from_transport(&e))? else { break None };
        let arrived = Instant::now();
        if reader.read.saturating_add(chunk.len()) > raw_max {
            return Err(too_large());
        }
        let room = ERROR_BODY_BYTES.saturating_sub(received.len()).min(chunk.len());
        received.extend_from_slice(&chunk[..room]);
        let fed = told(reader.feed(&chunk), &reader, arrived, &mut first_chunk, &mut first);
        // One event may hold the whole answer (some servers send it so), with its escapes.
        if reader.rebuilt_len() > max || reader.held() > max.saturating_mul(2) {
            return Err(too_large());
        }
        let fed = fed.map_err(|reason| bad(reason, &reader, &received))?;
        if fed.done {
            break Some(Rest { budget: raw_max - reader.read, response });
        }
    };
    if rest.is_none() {
        told(reader.end(), &reader, Instant::now(), &mut first_chunk, &mut first).map_err(|reason| bad(reason, &reader, &received))?;
    }
    let text = reader
        .into_body()
        .map_err(|reason| CallError::BadOutput { reason, status, body: String::from_utf8_lossy(&received).into_owned() })?;
    if text.len() > max {
        return Err(too_large());
    }
    Ok(Streamed { text, first, rest })
}

/// What a network chunk (or the body's end) brought, with the moment of the first chunk with
/// generated text told at `arrived` — also when that text came with the failure that ends the
/// call, as it still came first.
fn told(
    fed: Result<stream::Fed, String>,
    reader: &stream::StreamReader,
    arrived: Instant,
    first_chunk: &mut Option<oneshot::Sender<Instant>>,
    first: &mut Option<Instant>,
) -> Result<stream::Fed, String> {
    let first_now = match &fed {
        Ok(fed) => fed.first_choice,
        Err(_) => reader.produced(),
    };
    if first_now {
        first.get_or_insert(arrived);
        if let Some(sender) = first_chunk.take() {
            // The caller may have stopped listening; the call goes on.
            let _ = sender.send(arrived);
        }
    }
    fed
}

/// A body read up to a limit.
pub enum Limited {
    Whole(String),
    /// Longer than the limit: the first `limit` bytes (lossily decoded), the rest unread.
    Cut(String),
}

/// Reads a response body chunk by chunk, stopping at `limit` bytes, so an endless or huge
/// answer never sits in memory whole. (No response is decompressed: the client announces no
/// `Accept-Encoding` and has no decoder, so the bytes counted are the bytes received.)
pub async fn read_limited(mut response: reqwest::Response, limit: u64) -> Result<Limited, reqwest::Error> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let announced = response.content_length().and_then(|n| usize::try_from(n).ok());
    let mut bytes = Vec::with_capacity(announced.unwrap_or(0).min(limit).min(1 << 20));
    while let Some(chunk) = response.chunk().await? {
        if bytes.len() + chunk.len() > limit {
            let room = limit - bytes.len();
            bytes.extend_from_slice(&chunk[..room]);
            return Ok(Limited::Cut(String::from_utf8_lossy(&bytes).into_owned()));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok(Limited::Whole(match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }))
}

/// Why a redirect was not followed; its message names where it pointed.
#[derive(Debug)]
pub struct RedirectRefused(pub String);

impl std::fmt::Display for RedirectRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RedirectRefused {}

/// A URL as it may be shown: scheme, host, port and path; no user info, query or fragment
/// (they may carry credentials).
pub fn shown_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    shown.to_string()
}

/// Follows a redirect only to the same origin (scheme, host and port) as `base`, at most 10
/// times; with `post_only`, never one (301, 302, 303) that would resend the request as a GET.
pub fn redirect_policy(base: &reqwest::Url, post_only: bool) -> reqwest::redirect::Policy {
    let origin = base.origin();
    let shown_origin = origin.ascii_serialization();
    reqwest::redirect::Policy::custom(move |attempt| {
        let status = attempt.status().as_u16();
        let target = shown_url(attempt.url());
        if attempt.url().origin() != origin {
            let why = format!(
                "the provider redirected the request (HTTP {status}) to {target}, another host than \
                 model.base_url's ({shown_origin}); the request (with the key and the rows) is not sent \
                 there. If the provider moved, set model.base_url to the new address"
            );
            return attempt.error(RedirectRefused(why));
        }
        if post_only && matches!(status, 301..=303) {
            let why = format!(
                "the provider redirected the request (HTTP {status}) to {target}; following it would \
                 resend the POST as a GET. Set model.base_url to the address it names"
            );
            return attempt.error(RedirectRefused(why));
        }
        if attempt.previous().len() >= 10 {
            return attempt.error(RedirectRefused(format!("more than 10 redirects, the last to {target}")));
        }
        attempt.follow()
    })
}

fn keep_headers(headers: &reqwest::header::HeaderMap) -> RateHeaders {
    headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            n.starts_with("x-ratelimit-")
                || n.starts_with("anthropic-ratelimit-")
                // Resets given as a time of day are read against the answer's own clock.
                || n == "date"
                || n == "retry-after"
                || n == "retry-after-ms"
                || n == response::INFERENCE_TIME_HEADER
        })
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
        .collect()
}

/// What tests of the chat client and its callers share: a local HTTP/1.1 endpoint's reading of
/// a request.
#[cfg(test)]
pub(crate) mod test_http {
    use tokio::io::AsyncReadExt;

    /// Reads one request (its head and `content-length` body, none without one) from `socket`,
    /// `buf` holding what was read past the previous one on the connection; `None` once the
    /// client hung up.
    pub async fn read_request(socket: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let n = socket.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize =
            head.lines().find_map(|l| l.strip_prefix("content-length:")).map(|v| v.trim().parse().unwrap()).unwrap_or(0);
        while buf.len() < head_end + length {
            let n = socket.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
            buf.extend_from_slice(&chunk[..n]);
        }
        Some(buf.drain(..head_end + length).skip(head_end).collect())
    }
}
