//! A hostile provider: a raw HTTP/1.1 server on a TCP socket whose every answer is scripted by
//! a closure, down to the bytes and their timing (slow drips, bodies shorter than announced,
//! endless bodies, redirects, headers nobody sends). wiremock cannot misbehave at that level.
//!
//! Each connection carries one exchange and is closed after it (`connection: close`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::fake::{expected_output, items_in};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// 0-based, in arrival order.
    pub n: usize,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// `(id, title, body)` of each item in the prompt.
    pub items: Vec<(String, String, String)>,
    /// The request asked for a streamed answer (`"stream": true`).
    pub stream: bool,
}

impl Seen {
    /// The answer a good provider gives: every item's expected output, keyed by id.
    pub fn good_content(&self) -> String {
        let map: serde_json::Map<String, Value> = self
            .items
            .iter()
            .map(|(id, t, b)| (id.clone(), Value::String(expected_output(id, t, b))))
            .collect();
        Value::Object(map).to_string()
    }
}

/// How the body goes out.
#[derive(Debug, Clone)]
pub enum Body {
    Bytes(Vec<u8>),
    /// `chunk` every `every`, `times` times, with no `content-length` (ended by closing).
    Drip {
        chunk: Vec<u8>,
        every: Duration,
        times: usize,
    },
    /// Each part in turn, `every` apart, with no `content-length`.
    Parts {
        parts: Vec<Vec<u8>>,
        every: Duration,
    },
    /// Announces `content-length: announced` and sends only `bytes`, then closes.
    Short {
        bytes: Vec<u8>,
        announced: usize,
    },
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl Reply {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Body::Bytes(body.into()),
        }
    }

    pub fn json(status: u16, value: &Value) -> Reply {
        Reply::new(status, value.to_string())
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn with_body(mut self, body: Body) -> Reply {
        self.body = body;
        self
    }
}

/// A chat completion with `content` and a usage in the ordinary shape.
pub fn completion(content: &str) -> Value {
    json!({
        "id": "chatcmpl-hostile",
        "object": "chat.completion",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }],
        "usage": { "prompt_tokens": 200, "completion_tokens": 50, "total_tokens": 250 }
    })
}

/// `content` as a streamed answer (server-sent events, as llama.cpp and OpenAI send them): a
/// chunk with the role, the content in two chunks, the finish reason, then (`with_usage`) a
/// chunk with the usage and no choice, and `[DONE]`.
pub fn streamed(content: &str, with_usage: bool) -> Reply {
    let chunk = |choices: Value, usage: Value| {
        let event = json!({ "id": "chatcmpl-hostile", "object": "chat.completion.chunk", "choices": choices, "usage": usage });
        format!("data: {event}\n\n")
    };
    let delta = |delta: Value, finish: Value| json!([{ "index": 0, "delta": delta, "finish_reason": finish }]);
    let half = content.char_indices().nth(content.chars().count() / 2).map_or(content.len(), |(at, _)| at);
    let mut events = chunk(delta(json!({ "role": "assistant", "content": "" }), Value::Null), Value::Null);
    for part in [&content[..half], &content[half..]] {
        events += &chunk(delta(json!({ "content": part }), Value::Null), Value::Null);
    }
    events += &chunk(delta(json!({}), json!("stop")), Value::Null);
    if with_usage {
        events += &chunk(json!([]), json!({ "prompt_tokens": 200, "completion_tokens": 50, "total_tokens": 250 }));
    }
    events += "data: [DONE]\n\n";
    Reply::new(200, events).header("content-type", "text/event-stream")
}

/// The well-behaved answer to `seen`.
pub fn good(seen: &Seen) -> Reply {
    Reply::json(200, &completion(&seen.good_content()))
}

type Script = dyn Fn(&Seen) -> Reply + Send + Sync;

/// A server's answers to `GET …/props` and `GET …/metrics`, as `Hostile::start_showing` takes
/// them (a `None` is left out: 404).
pub fn shown(props: Option<Reply>, metrics: Option<Reply>) -> Vec<(&'static str, Reply)> {
    [("/props", props), ("/metrics", metrics)].into_iter().filter_map(|(path, reply)| Some((path, reply?))).collect()
}

pub struct Hostile {
    pub origin: String,
    log: Arc<Mutex<Vec<Seen>>>,
    asked: Arc<Mutex<Vec<&'static str>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Hostile {
    /// Starts the server; `script` answers every request of the API (a `GET …/props` gets
    /// 404, as from a hosted API).
    pub async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Hostile {
        Hostile::start_with_props(None, script).await
    }

    /// Starts the server with `props` as its answer to `GET …/props` (what llama.cpp's
    /// server says of itself before a run).
    pub async fn start_with_props(props: Option<Reply>, script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Hostile {
        Hostile::start_with(props, None, script).await
    }

    /// Starts the server with `props` as its answer to `GET …/props` and `metrics` to
    /// `GET …/metrics` (the gauges of requests running and waiting that vLLM shows), each 404
    /// when `None`.
    pub async fn start_with(props: Option<Reply>, metrics: Option<Reply>, script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Hostile {
        Hostile::start_showing(shown(props, metrics), script).await
    }

    /// Starts the server with its own answers to `GET`s of these paths beside the API (what a
    /// server says of itself and its gauges: `/props`, `/metrics`, `/v1/loads`); any other
    /// `GET` of those is 404.
    pub async fn start_showing(shown: Vec<(&'static str, Reply)>, script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Hostile {
        // Load the tokenizer the fake's helpers use now, not inside the first answer.
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a local port");
        let origin = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let count = Arc::new(AtomicUsize::new(0));
        let task = {
            let (log, asked) = (log.clone(), asked.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((socket, _)) = listener.accept().await else {
                        return;
                    };
                    let (log, asked, script, count) = (log.clone(), asked.clone(), script.clone(), count.clone());
                    let shown = shown.clone();
                    tokio::spawn(async move {
                        let _ = serve(socket, &log, &asked, script.as_ref(), &count, &shown).await;
                    });
                }
            })
        };
        Hostile { origin, log, asked, task }
    }

    /// The base URL a job names (`…/v1`).
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.origin)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    /// How many times the server was asked `GET …path` of what it says of itself and its
    /// gauges (`/props`, `/metrics`, `/v1/loads`).
    pub fn asked(&self, path: &str) -> usize {
        self.asked.lock().unwrap().iter().filter(|asked| **asked == path).count()
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut socket: TcpStream,
    log: &Mutex<Vec<Seen>>,
    asked: &Mutex<Vec<&'static str>>,
    script: &Script,
    count: &AtomicUsize,
    shown: &[(&'static str, Reply)],
) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or("").split(' ');
    let method = request_line.next().unwrap_or("").to_owned();
    let path = request_line.next().unwrap_or("").to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buffer[head_end..].to_vec();
    while body.len() < length {
        let n = socket.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    // What a server says of itself before a run (llama.cpp's `GET /props`) and its gauges
    // (`GET /metrics`, SGLang's `GET /v1/loads`) are answered apart: the scripts number and see
    // only the API's requests.
    let path_asked = path.split('?').next().unwrap_or("").trim_end_matches('/');
    for endpoint in ["/props", "/metrics", "/v1/loads"] {
        if method == "GET" && path_asked.ends_with(endpoint) {
            asked.lock().unwrap().push(endpoint);
            let reply = shown
                .iter()
                .find(|(path, _)| *path == endpoint)
                .map(|(_, reply)| reply.clone())
                .unwrap_or_else(|| Reply::new(404, r#"{"error":"not found"}"#));
            return write_reply(&mut socket, &reply).await;
        }
    }
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let user = parsed["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    let seen = Seen {
        n: count.fetch_add(1, Ordering::SeqCst),
        method,
        path,
        headers,
        items: items_in(user),
        stream: parsed["stream"] == Value::Bool(true),
    };
    log.lock().unwrap().push(seen.clone());
    let reply = script(&seen);
    write_reply(&mut socket, &reply).await
}

async fn write_reply(socket: &mut TcpStream, reply: &Reply) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} Hostile\r\nconnection: close\r\n", reply.status);
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    match &reply.body {
        Body::Bytes(bytes) => {
            if !reply
                .headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            {
                head.push_str(&format!("content-length: {}\r\n", bytes.len()));
            }
            head.push_str("\r\n");
            socket.write_all(head.as_bytes()).await?;
            for part in bytes.chunks(64 * 1024) {
                socket.write_all(part).await?;
            }
        }
        Body::Drip {
            chunk,
            every,
            times,
        } => {
            head.push_str("\r\n");
            socket.write_all(head.as_bytes()).await?;
            for _ in 0..*times {
                socket.write_all(chunk).await?;
                socket.flush().await?;
                tokio::time::sleep(*every).await;
            }
        }
        Body::Parts { parts, every } => {
            head.push_str("\r\n");
            socket.write_all(head.as_bytes()).await?;
            for part in parts {
                socket.write_all(part).await?;
                socket.flush().await?;
                tokio::time::sleep(*every).await;
            }
        }
        Body::Short { bytes, announced } => {
            head.push_str(&format!("content-length: {announced}\r\n\r\n"));
            socket.write_all(head.as_bytes()).await?;
            socket.write_all(bytes).await?;
        }
    }
    socket.flush().await?;
    socket.shutdown().await
}
