//! A fake provider account with a real requests-per-minute limit: a token bucket shared by
//! everyone calling it, `x-ratelimit-*` headers on every answer, and 429 with `retry-after`
//! (and `retry-after-ms`) when the bucket is empty, as OpenAI-style providers do. Answers are
//! the fake's usual per-item outputs, after a latency drawn from a range.
//!
//! Also compiled into `examples/fake_provider.rs` (the benchmark's standalone server).

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::fake::{Reply, answer, items_in};

/// The account's limit and how the fake answers.
#[derive(Debug, Clone, Copy)]
pub struct AccountLimit {
    pub requests_per_minute: f64,
    /// How much of its rate the bucket holds: a short burst, like a strict provider.
    pub burst: Duration,
    /// Every admitted answer waits a uniform draw from this range (ms).
    pub latency_ms: (u64, u64),
}

struct Bucket {
    level: f64,
    updated: Instant,
}

struct Account {
    limit: AccountLimit,
    bucket: Mutex<Bucket>,
    /// The status of every request, in arrival order.
    seen: Mutex<Vec<u16>>,
    rng: Mutex<fastrand::Rng>,
}

impl Account {
    fn rate(&self) -> f64 {
        self.limit.requests_per_minute / 60.0
    }

    fn capacity(&self) -> f64 {
        (self.rate() * self.limit.burst.as_secs_f64()).max(1.0)
    }

    /// Admits one request now, or says how long until one would be admitted; with what remains.
    fn admit(&self) -> (Result<(), Duration>, f64) {
        let mut bucket = self.bucket.lock().unwrap();
        let now = Instant::now();
        let earned = now.duration_since(bucket.updated).as_secs_f64() * self.rate();
        bucket.level = (bucket.level + earned).min(self.capacity());
        bucket.updated = now;
        if bucket.level >= 1.0 {
            bucket.level -= 1.0;
            (Ok(()), bucket.level)
        } else {
            (Err(Duration::from_secs_f64((1.0 - bucket.level) / self.rate())), bucket.level)
        }
    }
}

pub struct LimitedProvider {
    pub server: MockServer,
    account: Arc<Account>,
}

impl LimitedProvider {
    pub async fn start(limit: AccountLimit) -> LimitedProvider {
        Self::start_on(TcpListener::bind("127.0.0.1:0").expect("a free port"), limit).await
    }

    pub async fn start_on(listener: TcpListener, limit: AccountLimit) -> LimitedProvider {
        let server = MockServer::builder().listener(listener).disable_request_recording().start().await;
        let account = Arc::new(Account {
            limit,
            bucket: Mutex::new(Bucket { level: 0.0, updated: Instant::now() }),
            seen: Mutex::new(Vec::new()),
            rng: Mutex::new(fastrand::Rng::with_seed(7)),
        });
        account.bucket.lock().unwrap().level = account.capacity();
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .respond_with(Limited(account.clone()))
            .mount(&server)
            .await;
        LimitedProvider { server, account }
    }

    pub fn base_url(&self) -> String {
        format!("{}/v1", self.server.uri())
    }

    /// Serves `GET /_stats`: `{"answered": N, "rate_limited": N}` (for the standalone server).
    #[allow(dead_code)] // used by examples/fake_provider.rs
    pub async fn mount_stats(&self) {
        Mock::given(method("GET"))
            .and(path("/_stats"))
            .respond_with(Stats(self.account.clone()))
            .mount(&self.server)
            .await;
    }

    /// `(answered, rate limited)` requests so far.
    pub fn counts(&self) -> (usize, usize) {
        let seen = self.account.seen.lock().unwrap();
        let limited = seen.iter().filter(|status| **status == 429).count();
        (seen.len() - limited, limited)
    }
}

struct Stats(Arc<Account>);

impl Respond for Stats {
    fn respond(&self, _request: &Request) -> ResponseTemplate {
        let seen = self.0.seen.lock().unwrap();
        let limited = seen.iter().filter(|status| **status == 429).count();
        ResponseTemplate::new(200).set_body_json(json!({ "answered": seen.len() - limited, "rate_limited": limited }))
    }
}

struct Limited(Arc<Account>);

impl Respond for Limited {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let account = &self.0;
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let user = body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("");
        let items = items_in(user);
        let (admitted, remaining) = account.admit();
        let to_full = (account.capacity() - remaining).max(0.0) / account.rate();
        let limit = format!("{}", account.limit.requests_per_minute.round() as u64);
        let (status, template) = match admitted {
            Ok(()) => {
                let (low, high) = account.limit.latency_ms;
                let delay = account.rng.lock().unwrap().u64(low..=high.max(low));
                let (template, _) = answer(&Reply::Ok, &items, user);
                (200, template.set_delay(Duration::from_millis(delay)))
            }
            Err(wait) => (
                429,
                ResponseTemplate::new(429)
                    .insert_header("retry-after", format!("{}", wait.as_secs_f64().ceil().max(1.0) as u64).as_str())
                    .insert_header("retry-after-ms", format!("{}", wait.as_millis().max(1)).as_str())
                    .set_body_json(json!({
                        "error": { "message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded" }
                    })),
            ),
        };
        account.seen.lock().unwrap().push(status);
        template
            .insert_header("x-ratelimit-limit-requests", limit.as_str())
            .insert_header("x-ratelimit-remaining-requests", format!("{}", remaining.floor().max(0.0) as u64).as_str())
            .insert_header("x-ratelimit-reset-requests", format!("{to_full:.3}s").as_str())
    }
}
