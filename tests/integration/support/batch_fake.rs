//! An in-process fake of the provider batch APIs, with realistic state changes: OpenAI
//! (`/files`, `/batches`, `/files/{id}/content`; validating → in_progress → finalizing →
//! completed, or failed, expired with partial output, cancelled) and Anthropic
//! (`/messages/batches`, in_progress → ended, a results stream), per-request errors, and size
//! limits. Each status request moves a batch one step on, and so does each listing (time passes
//! for every batch of the account); listings come newest first, in pages (`limit`, OpenAI
//! `after`, Anthropic `after_id`, `has_more`). Other jobs' batches can be added to the account
//! ([`BatchFake::add_foreign`]); they are never billed to this run. It also answers synchronous
//! `/chat/completions` (for `--finish-sync-after`). Answers are those of the chat fake:
//! `expected_output` per item, usage from the prompt's length.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::fake::{expected_output, items_in};

/// What happens to a batch once created.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// validating → in_progress → finalizing → completed.
    Complete,
    /// validating → failed (the whole batch, with errors).
    Fail,
    /// in_progress → expired, with this share of the requests answered.
    Expire(f64),
    /// Stays in progress until cancelled; then half of its requests are answered.
    Stall,
}

/// One batch as the fake holds it.
#[derive(Debug, Clone)]
pub struct FakeBatch {
    pub id: String,
    pub dialect: &'static str,
    pub input_file_id: Option<String>,
    pub metadata: Value,
    /// `(custom_id, request body)` in input order.
    pub requests: Vec<(String, Value)>,
    pub fate: Fate,
    pub step: u32,
    pub status: String,
    pub cancelled: bool,
    pub created_at_s: f64,
    /// Another job's batch on the same account.
    pub foreign: bool,
}

impl FakeBatch {
    /// The item ids of each request, in input order.
    pub fn item_ids(&self) -> Vec<Vec<String>> {
        self.requests
            .iter()
            .map(|(_, line)| {
                let request = if line.get("body").is_some() { &line["body"] } else { line };
                items_in(&user_prompt(request)).into_iter().map(|(id, _, _)| id).collect()
            })
            .collect()
    }
}

#[derive(Default)]
struct State {
    files: HashMap<String, Vec<u8>>,
    batches: Vec<FakeBatch>,
    fates: Vec<Fate>,
    /// Every n-th request of a batch (1-based) fails with a 500 in the error file.
    error_every: Option<usize>,
    max_file_bytes: Option<usize>,
    max_requests: Option<usize>,
    uploads: usize,
    sync_requests: usize,
    listings: usize,
    /// `(prompt, completion, cached)` tokens of every answer billed, by custom id (batch) or
    /// `sync-N` (synchronous).
    billed: Vec<(String, i64, i64, i64)>,
    billed_ids: std::collections::HashSet<String>,
    next_id: u64,
}

impl State {
    /// A provider bills each answered request once, however often its results are read;
    /// another job's requests are that job's bill.
    fn bill(&mut self, batch: &FakeBatch, id: &str, prompt: i64, completion: i64, cached: i64) {
        if !batch.foreign && self.billed_ids.insert(id.to_owned()) {
            self.billed.push((id.to_owned(), prompt, completion, cached));
        }
    }
}

pub struct BatchFake {
    server: MockServer,
    state: Arc<Mutex<State>>,
}

impl BatchFake {
    pub async fn start() -> BatchFake {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(State::default()));
        Mock::given(wiremock::matchers::any()).respond_with(Responder { state: state.clone(), base: server.uri() }).mount(&server).await;
        BatchFake { server, state }
    }

    pub fn base_url(&self) -> String {
        format!("{}/v1", self.server.uri())
    }

    /// Fates of the next batches created, in order; later ones complete.
    pub fn script(&self, fates: Vec<Fate>) {
        self.state.lock().unwrap().fates = fates;
    }

    pub fn fail_every(&self, n: usize) {
        self.state.lock().unwrap().error_every = Some(n);
    }

    pub fn limit(&self, max_file_bytes: Option<usize>, max_requests: Option<usize>) {
        let mut state = self.state.lock().unwrap();
        state.max_file_bytes = max_file_bytes;
        state.max_requests = max_requests;
    }

    /// This run's batches (not the other jobs' ones added with [`BatchFake::add_foreign`]).
    pub fn batches(&self) -> Vec<FakeBatch> {
        self.state.lock().unwrap().batches.iter().filter(|b| !b.foreign).cloned().collect()
    }

    /// Adds `count` batches of another job to the account, created now, each with `requests`
    /// requests (custom ids `other-N-M`), OpenAI metadata `metadata`, already ended when `ended`.
    pub fn add_foreign(&self, dialect: &'static str, count: usize, requests: usize, metadata: Value, ended: bool) {
        let mut state = self.state.lock().unwrap();
        for _ in 0..count {
            state.next_id += 1;
            let n = state.next_id;
            let body = json!({ "model": "fake-model", "max_tokens": 10, "messages": [{ "role": "user", "content": "[]" }] });
            let requests = (0..requests)
                .map(|m| {
                    let custom_id = format!("other-{n}-{m}");
                    let line = if dialect == "openai" { json!({ "custom_id": custom_id, "method": "POST", "body": body }) } else { body.clone() };
                    (custom_id, line)
                })
                .collect();
            let batch = FakeBatch {
                id: format!("{}_{n}", if dialect == "openai" { "batch" } else { "msgbatch" }),
                dialect,
                input_file_id: (dialect == "openai").then(|| format!("file-other-{n}")),
                metadata: metadata.clone(),
                requests,
                fate: Fate::Complete,
                step: if ended { 3 } else { 0 },
                status: match (ended, dialect) {
                    (true, "openai") => "completed",
                    (true, _) => "ended",
                    (false, "openai") => "validating",
                    (false, _) => "in_progress",
                }
                .into(),
                cancelled: false,
                created_at_s: now_s(),
                foreign: true,
            };
            state.batches.push(batch);
        }
    }

    /// How many listing pages were read.
    pub fn listings(&self) -> usize {
        self.state.lock().unwrap().listings
    }

    pub fn uploads(&self) -> usize {
        self.state.lock().unwrap().uploads
    }

    pub fn sync_requests(&self) -> usize {
        self.state.lock().unwrap().sync_requests
    }

    /// `(id, prompt, completion, cached)` of every answer the fake gave (and billed).
    pub fn billed(&self) -> Vec<(String, i64, i64, i64)> {
        self.state.lock().unwrap().billed.clone()
    }
}

fn user_prompt(body: &Value) -> String {
    body["messages"].as_array().and_then(|m| m.iter().rev().find(|m| m["role"] == "user")).and_then(|m| m["content"].as_str()).unwrap_or("").to_owned()
}

/// The answer to one request and its usage.
fn answer(body: &Value) -> (String, i64, i64, i64) {
    let user = user_prompt(body);
    let outputs: serde_json::Map<String, Value> =
        items_in(&user).into_iter().map(|(id, title, text)| (id.clone(), Value::String(expected_output(&id, &title, &text)))).collect();
    let content = Value::Object(outputs).to_string();
    let prompt = (user.len() / 4) as i64 + 7;
    let completion = (content.len() / 4) as i64 + 1;
    let cached = if prompt > 64 { 32 } else { 0 };
    (content, prompt, completion, cached)
}

fn chat_completion(content: &str, prompt: i64, completion: i64, cached: i64) -> Value {
    json!({
        "id": "chatcmpl-batch", "object": "chat.completion",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }],
        "usage": { "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                   "prompt_tokens_details": { "cached_tokens": cached } }
    })
}

/// The `file` part of a multipart upload.
fn multipart_file(request: &Request) -> Option<Vec<u8>> {
    let content_type = request.headers.get("content-type")?.to_str().ok()?;
    let boundary = content_type.split("boundary=").nth(1)?.trim_matches('"');
    let delimiter = format!("--{boundary}");
    let body = &request.body;
    let text = String::from_utf8_lossy(body);
    for part in text.split(delimiter.as_str()) {
        if part.contains("name=\"file\"") {
            let start = part.find("\r\n\r\n")? + 4;
            let content = part[start..].strip_suffix("\r\n").unwrap_or(&part[start..]);
            return Some(content.as_bytes().to_vec());
        }
    }
    None
}

fn error(status: u16, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({ "error": { "message": message, "type": "invalid_request_error" } }))
}

fn now_s() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

fn rfc3339(secs: f64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(secs)).to_string()
}

struct Responder {
    state: Arc<Mutex<State>>,
    base: String,
}

impl Responder {
    fn create(&self, state: &mut State, dialect: &'static str, input_file_id: Option<String>, metadata: Value, requests: Vec<(String, Value)>) -> FakeBatch {
        state.next_id += 1;
        let fate = if state.fates.is_empty() { Fate::Complete } else { state.fates.remove(0) };
        let too_many = state.max_requests.is_some_and(|max| requests.len() > max);
        let batch = FakeBatch {
            id: format!("{}_{}", if dialect == "openai" { "batch" } else { "msgbatch" }, state.next_id),
            dialect,
            input_file_id,
            metadata,
            requests,
            fate: if too_many { Fate::Fail } else { fate },
            step: 0,
            status: if dialect == "openai" { "validating" } else { "in_progress" }.into(),
            cancelled: false,
            created_at_s: now_s(),
            foreign: false,
        };
        state.batches.push(batch.clone());
        batch
    }

    /// Moves the batch one step on.
    fn advance(batch: &mut FakeBatch) {
        batch.step += 1;
        let openai = batch.dialect == "openai";
        let status = if batch.cancelled {
            if openai { "cancelled" } else { "ended" }
        } else {
            match (&batch.fate, openai, batch.step) {
                (Fate::Fail, true, _) => "failed",
                (Fate::Fail, false, _) => "ended",
                (Fate::Stall, _, _) => "in_progress",
                (Fate::Expire(_), _, 1) => "in_progress",
                (Fate::Expire(_), true, _) => "expired",
                (Fate::Expire(_), false, _) => "ended",
                (Fate::Complete, _, 1) => "in_progress",
                (Fate::Complete, true, 2) => "finalizing",
                (Fate::Complete, true, _) => "completed",
                (Fate::Complete, false, _) => "ended",
            }
        };
        batch.status = status.into();
    }

    /// Each request with whether it got an answer: `(custom_id, body, answered)`.
    fn outcomes(state: &State, batch: &FakeBatch) -> Vec<(String, Value, bool)> {
        let share = match (&batch.fate, batch.cancelled) {
            (Fate::Fail, _) => 0.0,
            (_, true) => 0.5,
            (Fate::Expire(share), _) => *share,
            _ => 1.0,
        };
        let answered = (batch.requests.len() as f64 * share).round() as usize;
        batch
            .requests
            .iter()
            .enumerate()
            .map(|(i, (id, body))| {
                let errored = state.error_every.is_some_and(|n| (i + 1) % n == 0);
                (id.clone(), body.clone(), i < answered && !errored)
            })
            .collect()
    }

    fn ended(batch: &FakeBatch) -> bool {
        matches!(batch.status.as_str(), "completed" | "failed" | "expired" | "cancelled" | "ended")
    }

    /// One page of the dialect's batches, newest first, after the batch `after` (when given):
    /// every batch of the account moves one step on (time passes).
    fn listing(&self, state: &mut State, request: &Request, dialect: &'static str) -> Value {
        state.listings += 1;
        for batch in state.batches.iter_mut().filter(|b| b.dialect == dialect && !Self::ended(b)) {
            Self::advance(batch);
        }
        let query: HashMap<String, String> = request.url.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(20).clamp(1, 100);
        let after = query.get(if dialect == "openai" { "after" } else { "after_id" });
        let newest_first: Vec<&FakeBatch> = state.batches.iter().rev().filter(|b| b.dialect == dialect).collect();
        let start = match after {
            Some(id) => newest_first.iter().position(|b| &b.id == id).map(|i| i + 1).unwrap_or(newest_first.len()),
            None => 0,
        };
        let page: Vec<&FakeBatch> = newest_first.iter().skip(start).take(limit).copied().collect();
        let data: Vec<Value> = page
            .iter()
            .map(|b| if dialect == "openai" { self.openai_status(state, b) } else { self.anthropic_status(state, b) })
            .collect();
        json!({
            "object": "list", "data": data,
            "first_id": page.first().map(|b| b.id.clone()), "last_id": page.last().map(|b| b.id.clone()),
            "has_more": start + page.len() < newest_first.len(),
        })
    }

    fn openai_status(&self, state: &State, batch: &FakeBatch) -> Value {
        let ended = Self::ended(batch) && batch.status != "failed";
        let outcomes = if ended { Self::outcomes(state, batch) } else { Vec::new() };
        let completed = outcomes.iter().filter(|o| o.2).count();
        json!({
            "id": batch.id, "object": "batch", "endpoint": "/v1/chat/completions",
            "input_file_id": batch.input_file_id, "status": batch.status, "metadata": batch.metadata,
            "created_at": batch.created_at_s as i64,
            "output_file_id": if ended && completed > 0 { Some(format!("out-{}", batch.id)) } else { None },
            "error_file_id": if ended && completed < batch.requests.len() { Some(format!("err-{}", batch.id)) } else { None },
            "request_counts": { "total": batch.requests.len(), "completed": completed, "failed": if ended { batch.requests.len() - completed } else { 0 } },
            "errors": if batch.status == "failed" { json!({ "data": [{ "code": "too_many_requests", "message": "the batch holds too many requests" }] }) } else { Value::Null },
        })
    }

    fn anthropic_status(&self, state: &State, batch: &FakeBatch) -> Value {
        let ended = Self::ended(batch);
        let outcomes = if ended { Self::outcomes(state, batch) } else { Vec::new() };
        let succeeded = outcomes.iter().filter(|o| o.2).count();
        let total = batch.requests.len();
        json!({
            "id": batch.id, "type": "message_batch", "processing_status": batch.status,
            "created_at": rfc3339(batch.created_at_s),
            "request_counts": {
                "processing": if ended { 0 } else { total }, "succeeded": succeeded,
                "errored": if ended { total - succeeded } else { 0 }, "canceled": 0, "expired": 0
            },
            "results_url": if ended { Some(format!("{}/v1/messages/batches/{}/results", self.base, batch.id)) } else { None },
        })
    }

    /// The output (`errors = false`) or error file of an ended OpenAI batch; bills answers.
    fn openai_file(state: &mut State, batch: &FakeBatch, errors: bool) -> String {
        let mut lines = Vec::new();
        let error_every = state.error_every;
        for (i, (custom_id, body, answered)) in Self::outcomes(state, batch).into_iter().enumerate() {
            if answered && !errors {
                let (content, p, c, k) = answer(&body["body"]);
                state.bill(batch, &custom_id, p, c, k);
                lines.push(json!({ "id": format!("req-{i}"), "custom_id": custom_id,
                    "response": { "status_code": 200, "request_id": format!("r{i}"), "body": chat_completion(&content, p, c, k) }, "error": null }));
            } else if !answered && errors {
                let failed = error_every.is_some_and(|n| (i + 1) % n == 0);
                lines.push(if failed {
                    json!({ "id": format!("req-{i}"), "custom_id": custom_id,
                        "response": { "status_code": 500, "request_id": format!("r{i}"), "body": { "error": { "message": "The server had an error" } } }, "error": null })
                } else {
                    let code = if batch.cancelled { "batch_cancelled" } else { "batch_expired" };
                    json!({ "id": format!("req-{i}"), "custom_id": custom_id, "response": null,
                        "error": { "code": code, "message": "This request could not be executed before the batch ended." } })
                });
            }
        }
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    fn anthropic_results(state: &mut State, batch: &FakeBatch) -> String {
        let mut lines = Vec::new();
        let error_every = state.error_every;
        for (i, (custom_id, params, answered)) in Self::outcomes(state, batch).into_iter().enumerate() {
            let line = if answered {
                let (content, p, c, k) = answer(&params);
                state.bill(batch, &custom_id, p, c, k);
                json!({ "custom_id": custom_id, "result": { "type": "succeeded", "message": {
                    "id": format!("msg_{i}"), "type": "message", "role": "assistant",
                    "content": [{ "type": "text", "text": content }], "stop_reason": "end_turn",
                    "usage": { "input_tokens": p - k, "output_tokens": c, "cache_read_input_tokens": k } } } })
            } else if batch.fate == Fate::Fail {
                json!({ "custom_id": custom_id, "result": { "type": "errored", "error": { "type": "error",
                    "error": { "type": "invalid_request_error", "message": "the batch holds too many requests" } } } })
            } else if error_every.is_some_and(|n| (i + 1) % n == 0) {
                json!({ "custom_id": custom_id, "result": { "type": "errored", "error": { "type": "error",
                    "error": { "type": "api_error", "message": "Internal server error" } } } })
            } else {
                json!({ "custom_id": custom_id, "result": { "type": if batch.cancelled { "canceled" } else { "expired" } } })
            };
            lines.push(format!("{line}\n"));
        }
        lines.concat()
    }
}

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut state = self.state.lock().unwrap();
        let path = request.url.path().trim_start_matches("/v1").to_owned();
        let method = request.method.as_str().to_owned();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (method.as_str(), segments.as_slice()) {
            ("POST", ["chat", "completions"]) => {
                let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
                let (content, p, c, k) = answer(&body);
                state.sync_requests += 1;
                let id = format!("sync-{}", state.sync_requests);
                if state.billed_ids.insert(id.clone()) {
                    state.billed.push((id, p, c, k));
                }
                ResponseTemplate::new(200).set_body_json(chat_completion(&content, p, c, k))
            }
            ("POST", ["files"]) => {
                let Some(file) = multipart_file(request) else { return error(400, "no file part") };
                if state.max_file_bytes.is_some_and(|max| file.len() > max) {
                    return error(400, "the file is larger than the batch limit");
                }
                state.uploads += 1;
                state.next_id += 1;
                let id = format!("file-{}", state.next_id);
                state.files.insert(id.clone(), file);
                ResponseTemplate::new(200).set_body_json(json!({ "id": id, "object": "file", "purpose": "batch" }))
            }
            ("POST", ["batches"]) => {
                let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
                let file_id = body["input_file_id"].as_str().unwrap_or_default().to_owned();
                let Some(file) = state.files.get(&file_id).cloned() else { return error(404, "no such file") };
                let requests: Vec<(String, Value)> = String::from_utf8_lossy(&file)
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .map(|v| (v["custom_id"].as_str().unwrap_or_default().to_owned(), v))
                    .collect();
                let batch = self.create(&mut state, "openai", Some(file_id), body["metadata"].clone(), requests);
                let status = self.openai_status(&state, &batch);
                ResponseTemplate::new(200).set_body_json(status)
            }
            ("GET", ["batches"]) => ResponseTemplate::new(200).set_body_json(self.listing(&mut state, request, "openai")),
            ("GET", ["batches", id]) => {
                let Some(i) = state.batches.iter().position(|b| b.id == *id) else { return error(404, "no such batch") };
                if !Self::ended(&state.batches[i]) {
                    Self::advance(&mut state.batches[i]);
                }
                let batch = state.batches[i].clone();
                ResponseTemplate::new(200).set_body_json(self.openai_status(&state, &batch))
            }
            ("POST", ["batches", id, "cancel"]) | ("POST", ["messages", "batches", id, "cancel"]) => {
                let Some(batch) = state.batches.iter_mut().find(|b| b.id == *id) else { return error(404, "no such batch") };
                batch.cancelled = true;
                batch.status = if batch.dialect == "openai" { "cancelling".into() } else { "canceling".into() };
                ResponseTemplate::new(200).set_body_json(json!({ "id": id, "status": batch.status }))
            }
            ("GET", ["files", id, "content"]) => {
                let (batch_id, errors) = match (id.strip_prefix("out-"), id.strip_prefix("err-")) {
                    (Some(b), _) => (b.to_owned(), false),
                    (_, Some(b)) => (b.to_owned(), true),
                    _ => return error(404, "no such file"),
                };
                let Some(batch) = state.batches.iter().find(|b| b.id == batch_id).cloned() else { return error(404, "no such file") };
                let body = Self::openai_file(&mut state, &batch, errors);
                ResponseTemplate::new(200).set_body_string(body)
            }
            ("POST", ["messages", "batches"]) => {
                let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
                let requests: Vec<(String, Value)> = body["requests"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| (r["custom_id"].as_str().unwrap_or_default().to_owned(), r["params"].clone()))
                    .collect();
                if state.max_file_bytes.is_some_and(|max| request.body.len() > max) {
                    return error(413, "the batch is larger than the limit");
                }
                let batch = self.create(&mut state, "anthropic", None, Value::Null, requests);
                let status = self.anthropic_status(&state, &batch);
                ResponseTemplate::new(200).set_body_json(status)
            }
            ("GET", ["messages", "batches"]) => ResponseTemplate::new(200).set_body_json(self.listing(&mut state, request, "anthropic")),
            ("GET", ["messages", "batches", id]) => {
                let Some(i) = state.batches.iter().position(|b| b.id == *id) else { return error(404, "no such batch") };
                if !Self::ended(&state.batches[i]) {
                    Self::advance(&mut state.batches[i]);
                }
                let batch = state.batches[i].clone();
                ResponseTemplate::new(200).set_body_json(self.anthropic_status(&state, &batch))
            }
            ("GET", ["messages", "batches", id, "results"]) => {
                let Some(batch) = state.batches.iter().find(|b| b.id == *id).cloned() else { return error(404, "no such batch") };
                let body = Self::anthropic_results(&mut state, &batch);
                ResponseTemplate::new(200).set_body_string(body)
            }
            _ => error(404, &format!("no route {method} {path}")),
        }
    }
}
