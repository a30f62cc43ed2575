//! An in-process fake OpenAI-compatible provider, scripted for faults. It answers each request
//! from the items in the prompt, so every output names the row it was made for and tests can
//! check that no output landed on another row.
//!
//! Its usage is counted like OpenAI counts it: o200k_base tokens of the messages plus the chat
//! framing for `prompt_tokens`, tokens of the answer for `completion_tokens`; the first 32
//! prompt tokens of a long prompt are reported as cached.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use wiremock::matchers::{method, path};
use backfill::tokens::TokenCounter;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// What the fake does with one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Ok,
    /// Leave out the last `n` items.
    DropIds(usize),
    /// Add keys that are not ids of the batch, one carrying another item's output.
    ForeignIds,
    /// Prose and a code fence around the JSON.
    Prose,
    /// Not JSON at all.
    Malformed,
    /// `finish_reason = "length"`, cut inside the last item.
    Truncated,
    RateLimited { retry_after_s: f64 },
    ServerError(u16),
    /// Answer only after this long (past the client's timeout).
    Hang(Duration),
    /// An empty string and a number instead of texts for the first two items.
    WrongTypes,
    /// Every item's text padded to exactly this many tokens.
    Padded(usize),
    /// An answer with `usage.cost` (as OpenRouter sends it), computed at other prices than the
    /// job's: $0.10 per million prompt tokens and $0.40 per million completion tokens.
    ReportedCost,
}

/// The prices behind [`Reply::ReportedCost`], USD per token.
pub const REPORTED_PROMPT_USD: f64 = 0.10e-6;
pub const REPORTED_COMPLETION_USD: f64 = 0.40e-6;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Record {
    pub at: Instant,
    pub reply: Reply,
    pub ids: Vec<String>,
    /// `(prompt, completion, cached)` tokens reported, for answered (2xx) requests.
    pub usage: Option<(i64, i64, i64)>,
    /// `usage.cost` sent, in USD.
    pub reported_cost: Option<f64>,
    pub authorization: Option<String>,
}

#[derive(Default)]
struct Script {
    queue: VecDeque<Reply>,
    /// `(probability, reply)` drawn for requests past the queue.
    random: Vec<(f64, Reply)>,
    rng: Option<fastrand::Rng>,
}

struct State {
    script: Mutex<Script>,
    log: Mutex<Vec<Record>>,
    /// Every answer waits a uniform draw from this range (ms).
    latency_ms: (u64, u64),
}

pub struct FakeProvider {
    pub server: MockServer,
    state: Arc<State>,
}

/// The output the fake gives an item: names the id and a digest of the item's fields.
pub fn expected_output(id: &str, title: &str, body: &str) -> String {
    let digest = Sha256::digest(format!("{title}\u{1f}{body}").as_bytes());
    format!("Uitleg bij {id}: {}", hex::encode(&digest[..6]))
}

impl FakeProvider {
    /// Starts the fake with scripted replies for the first requests, then `random` faults
    /// (seeded), else `Reply::Ok`.
    pub async fn start(first: Vec<Reply>, random: Vec<(f64, Reply)>, seed: u64) -> FakeProvider {
        Self::start_with_latency(first, random, seed, (0, 0)).await
    }

    /// Like [`FakeProvider::start`], with every answer delayed by `latency_ms` (uniform range).
    pub async fn start_with_latency(first: Vec<Reply>, random: Vec<(f64, Reply)>, seed: u64, latency_ms: (u64, u64)) -> FakeProvider {
        Self::start_with(None, first, random, seed, latency_ms).await
    }

    /// Like [`FakeProvider::start`], listening on `listener` (a provider that comes up on a
    /// known port, after an outage).
    pub async fn start_on(listener: std::net::TcpListener, seed: u64) -> FakeProvider {
        Self::start_with(Some(listener), vec![], vec![], seed, (0, 0)).await
    }

    async fn start_with(
        listener: Option<std::net::TcpListener>,
        first: Vec<Reply>,
        random: Vec<(f64, Reply)>,
        seed: u64,
        latency_ms: (u64, u64),
    ) -> FakeProvider {
        // Load the tokenizer now, not inside the first answer (it takes a while in debug builds
        // and would delay that answer past short client timeouts).
        tokio::task::spawn_blocking(|| counter().count("warm")).await.expect("the tokenizer loads");
        let server = match listener {
            Some(listener) => MockServer::builder().listener(listener).start().await,
            None => MockServer::start().await,
        };
        let state = Arc::new(State {
            script: Mutex::new(Script { queue: first.into(), random, rng: Some(fastrand::Rng::with_seed(seed)) }),
            log: Mutex::new(Vec::new()),
            latency_ms,
        });
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .respond_with(Responder(state.clone()))
            .mount(&server)
            .await;
        FakeProvider { server, state }
    }

    pub fn base_url(&self) -> String {
        format!("{}/v1", self.server.uri())
    }

    pub fn records(&self) -> Vec<Record> {
        self.state.log.lock().unwrap().clone()
    }
}

struct Responder(Arc<State>);

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let user = body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("");
        let system = body["messages"]
            .as_array()
            .and_then(|m| m.first())
            .filter(|m| m["role"] == "system")
            .and_then(|m| m["content"].as_str());
        let items = items_in(user);
        let reply = {
            let mut script = self.0.script.lock().unwrap();
            match script.queue.pop_front() {
                Some(reply) => reply,
                None => {
                    let draw = script.rng.as_mut().map(|r| r.f64()).unwrap_or(1.0);
                    let mut acc = 0.0;
                    let mut chosen = Reply::Ok;
                    for (p, reply) in &script.random {
                        acc += p;
                        if draw < acc {
                            chosen = reply.clone();
                            break;
                        }
                    }
                    chosen
                }
            }
        };
        let prompt = Prompt { system, user };
        let (template, usage, reported_cost) = answer_to(&reply, &items, &prompt);
        let (low, high) = self.0.latency_ms;
        let template = if high > 0 && !matches!(reply, Reply::Hang(_)) {
            let ms = { self.0.script.lock().unwrap().rng.as_mut().map(|r| r.u64(low..=high)).unwrap_or(low) };
            template.set_delay(Duration::from_millis(ms))
        } else {
            template
        };
        self.0.log.lock().unwrap().push(Record {
            at: Instant::now(),
            reply,
            ids: items.iter().map(|(id, _, _)| id.clone()).collect(),
            usage,
            reported_cost,
            authorization: request.headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned),
        });
        template
    }
}

/// `(id, title, body)` of each item line in the prompt.
pub fn items_in(user: &str) -> Vec<(String, String, String)> {
    user.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line.trim_end_matches(',')).ok())
        .filter_map(|v| {
            let id = v.get("id")?.as_str()?.to_owned();
            let title = v.get("title").and_then(Value::as_str).unwrap_or("").to_owned();
            let body = v.get("body").and_then(Value::as_str).unwrap_or("").to_owned();
            Some((id, title, body))
        })
        .collect()
}

/// The request's messages.
struct Prompt<'a> {
    system: Option<&'a str>,
    user: &'a str,
}

fn counter() -> TokenCounter {
    TokenCounter::new("o200k_base").expect("o200k_base is embedded")
}

type Answer = (ResponseTemplate, Option<(i64, i64, i64)>, Option<f64>);

fn completion(content: &str, finish: &str, prompt: &Prompt, report_cost: bool) -> Answer {
    let counter = counter();
    let prompt_tokens = counter.chat(prompt.system, prompt.user) as i64;
    let completion = counter.count(content) as i64;
    let cached = if prompt_tokens > 64 { 32 } else { 0 };
    let mut usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": { "cached_tokens": cached }
    });
    let cost = report_cost.then_some(prompt_tokens as f64 * REPORTED_PROMPT_USD + completion as f64 * REPORTED_COMPLETION_USD);
    if let Some(cost) = cost {
        usage["cost"] = json!(cost);
    }
    let body = json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": finish }],
        "usage": usage
    });
    (ResponseTemplate::new(200).set_body_json(body), Some((prompt_tokens, completion, cached)), cost)
}

/// `text` followed by " ja" until it is `tokens` tokens long (or longer, if it already is).
pub fn padded(text: &str, tokens: usize) -> String {
    let counter = counter();
    let mut out = text.to_owned();
    while (counter.count(&out) as usize) < tokens {
        out.push_str(" ja");
    }
    out
}

/// The answer to a request whose last message is `user` (no system message counted).
pub(crate) fn answer(reply: &Reply, items: &[(String, String, String)], user: &str) -> (ResponseTemplate, Option<(i64, i64, i64)>) {
    let (template, usage, _) = answer_to(reply, items, &Prompt { system: None, user });
    (template, usage)
}

fn answer_to(reply: &Reply, items: &[(String, String, String)], user: &Prompt) -> Answer {
    let outputs = |items: &[(String, String, String)]| -> serde_json::Map<String, Value> {
        items.iter().map(|(id, title, body)| (id.clone(), Value::String(expected_output(id, title, body)))).collect()
    };
    match reply {
        Reply::Ok => completion(&Value::Object(outputs(items)).to_string(), "stop", user, false),
        Reply::DropIds(n) => {
            let keep = items.len().saturating_sub(*n);
            completion(&Value::Object(outputs(&items[..keep])).to_string(), "stop", user, false)
        }
        Reply::ForeignIds => {
            let mut map = outputs(items);
            let stolen = items.first().map(|(id, t, b)| expected_output(id, t, b)).unwrap_or_default();
            map.insert("999999".into(), Value::String(stolen));
            map.insert("not-an-id".into(), Value::String("Uitleg bij niemand".into()));
            completion(&Value::Object(map).to_string(), "stop", user, false)
        }
        Reply::Prose => {
            let text = format!("Natuurlijk! Hier is het antwoord:\n```json\n{}\n```\nSucces.", Value::Object(outputs(items)));
            completion(&text, "stop", user, false)
        }
        Reply::Malformed => completion("Sorry, ik kan dit niet in JSON zetten.", "stop", user, false),
        Reply::Truncated => {
            let full = Value::Object(outputs(items)).to_string();
            let cut = full.len() - 12.min(full.len());
            completion(&full[..cut], "length", user, false)
        }
        Reply::WrongTypes => {
            let mut map = outputs(items);
            if let Some((id, _, _)) = items.first() {
                map.insert(id.clone(), Value::String("  ".into()));
            }
            if let Some((id, _, _)) = items.get(1) {
                map.insert(id.clone(), json!(42));
            }
            completion(&Value::Object(map).to_string(), "stop", user, false)
        }
        Reply::Padded(tokens) => {
            let map: serde_json::Map<String, Value> = items
                .iter()
                .map(|(id, title, body)| (id.clone(), Value::String(padded(&expected_output(id, title, body), *tokens))))
                .collect();
            completion(&Value::Object(map).to_string(), "stop", user, false)
        }
        Reply::ReportedCost => completion(&Value::Object(outputs(items)).to_string(), "stop", user, true),
        Reply::RateLimited { retry_after_s } => (
            ResponseTemplate::new(429)
                .insert_header("retry-after", format!("{retry_after_s}").as_str())
                .insert_header("x-ratelimit-limit-requests", "60")
                .insert_header("x-ratelimit-remaining-requests", "0")
                .insert_header("x-ratelimit-reset-requests", format!("{retry_after_s}s").as_str())
                .set_body_json(json!({ "error": { "message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded" } })),
            None,
            None,
        ),
        Reply::ServerError(status) => (
            ResponseTemplate::new(*status).set_body_json(json!({ "error": { "message": "The server had an error", "type": "server_error" } })),
            None,
            None,
        ),
        Reply::Hang(delay) => {
            let (template, _, _) = completion(&Value::Object(outputs(items)).to_string(), "stop", user, false);
            (template.set_delay(*delay), None, None)
        }
    }
}
