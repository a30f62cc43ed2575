//! Streamed answers: the request asks for `"stream": true` and the server answers with
//! Server-Sent Events, one `chat.completion.chunk` per `data:` event, ended by `data: [DONE]`.
//! The events are read as they arrive (so the caller learns when the first one came: on a server
//! that queues, a request waiting for a slot gets none until a slot takes it) and folded back into
//! the body an unstreamed answer would have had, which then goes through `parse_completion` as
//! any other answer does.

use serde_json::{Map, Value};

use crate::pipeline::answers::kind;

use super::error::provider_message;

/// What is spliced in after the opening `{` of the request object.
const STREAM_FIELDS: &str = r#""stream":true,"stream_options":{"include_usage":true}"#;

/// The request body asking for a streamed answer with its usage: the two fields spliced in after
/// the object's opening `{`, the rest of the body untouched. A body that is not an object (never
/// one this client serialises) goes out unchanged and is answered whole.
pub(super) fn streamed_body(body: &[u8]) -> Vec<u8> {
    let Some(open) = body.iter().position(|b| !b.is_ascii_whitespace()).filter(|&i| body[i] == b'{') else {
        return body.to_vec();
    };
    let empty = body[open + 1..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
    let mut out = Vec::with_capacity(body.len() + STREAM_FIELDS.len() + 1);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(STREAM_FIELDS.as_bytes());
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(&body[open + 1..]);
    out
}

/// Whether a body read whole (a 2xx whose `Content-Type` is not `text/event-stream`: a server or
/// proxy that mislabels its stream) is an SSE stream all the same: after a BOM and whitespace, it
/// starts with a `data:` line, maybe after `:` comment lines.
pub(super) fn looks_like_sse(body: &str) -> bool {
    let mut rest = body.strip_prefix('\u{feff}').unwrap_or(body);
    loop {
        rest = rest.trim_start();
        if rest.starts_with("data:") {
            return true;
        }
        if !rest.starts_with(':') {
            return false;
        }
        match rest.find(['\n', '\r']) {
            Some(end) => rest = &rest[end..],
            None => return false,
        }
    }
}

/// Whether the response's `Content-Type` is `text/event-stream` (any parameters aside).
pub(super) fn is_event_stream(headers: &reqwest::header::HeaderMap) -> bool {
    headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// One dispatched event: its `event:` type, its `data:` lines joined with `\n`, and the lines of
/// a non-standard `error:` field (older llama.cpp servers report a failure mid-stream as
/// `error: {…}` instead of `data: {…}`).
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct SseEvent {
    pub kind: Option<String>,
    pub data: Option<String>,
    pub error: Option<String>,
}

/// Splits a byte stream into events as the SSE format has it: lines end with `\n`, `\r\n` or `\r`
/// (also when a network chunk ends between the `\r` and the `\n`), a blank line dispatches the
/// event, `data:` lines are joined with `\n`, one space after the colon is dropped, lines starting
/// with `:` are comments (keep-alives), `id:`, `retry:` and unknown fields are ignored. Unlike a
/// browser, the last event is taken at the end of the body even without its blank line.
#[derive(Debug, Default)]
pub(super) struct SseParser {
    line: Vec<u8>,
    /// The last byte fed was a `\r`: a `\n` right after it ends no second line.
    after_cr: bool,
    started: bool,
    kind: Option<String>,
    data: Option<Vec<String>>,
    error: Option<Vec<String>>,
    /// Bytes of the `data:` and `error:` lines of the event not yet dispatched.
    held: usize,
}

impl SseParser {
    /// Bytes held for the line and the event not yet complete: a server that never ends a
    /// line or an event must not fill the memory.
    pub fn held(&self) -> usize {
        self.line.len() + self.held
    }

    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) {
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.after_cr {
                self.after_cr = false;
                if rest[0] == b'\n' {
                    rest = &rest[1..];
                    continue;
                }
            }
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                None => {
                    self.line.extend_from_slice(rest);
                    return;
                }
                Some(end) => {
                    self.line.extend_from_slice(&rest[..end]);
                    self.after_cr = rest[end] == b'\r';
                    rest = &rest[end + 1..];
                    self.end_line(out);
                }
            }
        }
    }

    /// The end of the body: a last line and event without their terminators are taken.
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) {
        if !self.line.is_empty() {
            self.end_line(out);
        }
        self.dispatch(out);
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) {
        let mut line = std::mem::take(&mut self.line);
        if !self.started {
            self.started = true;
            if line.starts_with("\u{feff}".as_bytes()) {
                line.drain(..3);
            }
        }
        if line.is_empty() {
            return self.dispatch(out);
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (&line[..], &[][..]),
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match field {
            b"data" | b"error" => self.held += value.len() + 1,
            _ => {}
        }
        match field {
            b"data" => self.data.get_or_insert_with(Vec::new).push(value),
            b"error" => self.error.get_or_insert_with(Vec::new).push(value),
            b"event" => self.kind = Some(value),
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        self.held = 0;
        let kind = self.kind.take();
        let data = self.data.take().map(|lines| lines.join("\n"));
        let error = self.error.take().map(|lines| lines.join("\n"));
        if data.is_some() || error.is_some() {
            out.push(SseEvent { kind, data, error });
        }
    }
}

/// What one event added to the answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Step {
    /// A chunk carrying the first choice (a delta, or a whole message, with a role or text, or a
    /// finish reason).
    Choice,
    /// A chunk without a choice (the usage-only last chunk of `include_usage`).
    Other,
    /// `data: [DONE]`.
    Done,
}

/// The answer folded together from its chunks.
#[derive(Debug, Default)]
pub(super) struct StreamAnswer {
    /// The last non-null value of each top-level field but `choices` and `object` (`id`,
    /// `model`, `created`, `usage`, llama.cpp's `timings`, vLLM's `metrics`, `time_info`, …).
    top: Map<String, Value>,
    /// The serialised size of the values in `top`.
    top_len: usize,
    /// The first choice's message: `role`, and each string field of its deltas (`content`,
    /// `refusal`, `reasoning_content`, …) concatenated.
    message: Map<String, Value>,
    /// The bytes of the strings in `message`.
    message_len: usize,
    finish_reason: Option<Value>,
    chunks: usize,
    choices: usize,
    /// A chunk of the first choice has carried generated text (or the finish reason): the
    /// server is working on the request. (Some servers send the role alone at once, before a
    /// slot takes the request up.)
    produced: bool,
    done: bool,
    /// The data of the error event the server ended the stream with, if it did.
    server_error: Option<String>,
}

impl StreamAnswer {
    /// Folds in one event; `Err` (the reason) for an error the server sent, or data that is not
    /// a JSON object. An event of another type than the default `message` (and `error`), such
    /// as `event: ping`, and one whose data is blank (a keep-alive sent as `data:`), add nothing.
    pub fn event(&mut self, event: &SseEvent) -> Result<Step, String> {
        if let Some(error) = &event.error {
            return Err(format!("the server sent an error in the stream: {}", provider_message(error)));
        }
        let Some(data) = &event.data else { return Ok(Step::Other) };
        if !matches!(event.kind.as_deref(), None | Some("message" | "error")) {
            return Ok(Step::Other);
        }
        if data.trim() == "[DONE]" {
            self.done = true;
            return Ok(Step::Done);
        }
        if event.kind.as_deref() == Some("error") {
            self.server_error = Some(data.clone());
            return Err(format!("the server sent an error in the stream: {}", provider_message(data)));
        }
        if data.trim().is_empty() {
            return Ok(Step::Other);
        }
        let value: Value = serde_json::from_str(data)
            .map_err(|e| format!("a streamed event's data is not JSON ({e}): {}", excerpt(data)))?;
        if value.get("error").is_some_and(|e| !e.is_null()) {
            self.server_error = Some(data.clone());
            return Err(format!("the server sent an error in the stream: {}", provider_message(data)));
        }
        let Value::Object(chunk) = value else {
            return Err(format!("a streamed event's data is JSON but not an object ({}): {}", kind(&value), excerpt(data)));
        };
        self.chunks += 1;
        let mut step = Step::Other;
        for (key, value) in chunk {
            match key.as_str() {
                "choices" => {
                    let first = value.as_array().and_then(|choices| {
                        choices.iter().find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0)
                    });
                    if let Some(choice) = first {
                        self.choice(choice);
                        step = Step::Choice;
                    }
                }
                // Per-chunk noise (OpenAI's `obfuscation` pads each chunk against length side channels).
                "object" | "obfuscation" => {}
                _ if value.is_null() => {}
                _ => {
                    let len = json_len(&value);
                    if let Some(old) = self.top.insert(key, value) {
                        self.top_len -= json_len(&old);
                    }
                    self.top_len += len;
                }
            }
        }
        if step == Step::Choice {
            self.choices += 1;
        }
        Ok(step)
    }

    /// Folds in the first choice's `delta`, or its whole `message` (some servers and proxies send
    /// the whole answer as one event), and its finish reason.
    fn choice(&mut self, choice: &Value) {
        let delta = match choice.get("delta") {
            Some(Value::Object(delta)) => Some(delta),
            _ => choice.get("message").and_then(Value::as_object),
        };
        if let Some(delta) = delta {
            for (key, value) in delta {
                match (key.as_str(), value) {
                    ("role", Value::String(_)) => {
                        self.message.insert(key.clone(), value.clone());
                    }
                    (_, Value::String(part)) => {
                        self.produced |= !part.is_empty();
                        self.message_len += part.len();
                        match self.message.get_mut(key) {
                        Some(Value::String(text)) => text.push_str(part),
                        _ => {
                            self.message.insert(key.clone(), value.clone());
                        }
                    }},
                    _ => {}
                }
            }
        }
        if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
            self.finish_reason = Some(reason.clone());
            self.produced = true;
        }
    }

    /// `data: [DONE]` came.
    pub fn done(&self) -> bool {
        self.done
    }

    /// At most the size the rebuilt body will have: its folded strings and top-level fields.
    pub fn rebuilt_len(&self) -> usize {
        self.message_len + self.top_len
    }

    /// The body an unstreamed answer would have had, serialised; `Err` (the reason) when the
    /// stream held no chunk, or ended before `[DONE]` without a finish reason.
    pub fn into_body(self) -> Result<String, String> {
        if self.chunks == 0 {
            return Err("the streamed answer held no chunk".to_owned());
        }
        if !self.done && self.finish_reason.is_none() {
            return Err(format!(
                "the stream ended early: the server closed it before `data: [DONE]` and before any finish_reason ({} chunks read)",
                self.chunks
            ));
        }
        let mut top = self.top;
        let mut body = Map::new();
        for key in ["id", "created", "model"] {
            if let Some(value) = top.remove(key) {
                body.insert(key.to_owned(), value);
            }
        }
        body.insert("object".to_owned(), Value::from("chat.completion"));
        let choices = if self.choices == 0 {
            Vec::new()
        } else {
            let mut message = self.message;
            let role = message.remove("role").unwrap_or_else(|| Value::from("assistant"));
            let content = message
                .remove("content")
                .unwrap_or_else(|| if message.contains_key("refusal") { Value::Null } else { Value::from("") });
            let mut whole = Map::new();
            whole.insert("role".to_owned(), role);
            whole.insert("content".to_owned(), content);
            whole.extend(message);
            let mut choice = Map::new();
            choice.insert("index".to_owned(), Value::from(0));
            choice.insert("message".to_owned(), Value::Object(whole));
            choice.insert("finish_reason".to_owned(), self.finish_reason.unwrap_or(Value::Null));
            vec![Value::Object(choice)]
        };
        body.insert("choices".to_owned(), Value::Array(choices));
        // Groq streams its usage under `x_groq` when it is not asked for at the top.
        if !top.contains_key("usage")
            && let Some(usage) = top.get("x_groq").and_then(|x| x.get("usage")).filter(|u| u.is_object())
        {
            body.insert("usage".to_owned(), usage.clone());
        }
        body.extend(top);
        Ok(serde_json::to_string(&Value::Object(body)).expect("a JSON value serialises"))
    }
}

/// The events of a body being read and the answer folded from them.
#[derive(Debug, Default)]
pub(super) struct StreamReader {
    parser: SseParser,
    answer: StreamAnswer,
    events: Vec<SseEvent>,
    /// Bytes read so far.
    pub read: usize,
}

/// What a network chunk brought.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub(super) struct Fed {
    /// It held the answer's first chunk with generated text (or its finish reason).
    pub first_choice: bool,
    /// It held `data: [DONE]`: nothing more is read.
    pub done: bool,
}

impl StreamReader {
    /// Folds in the bytes of one network chunk; after `[DONE]`, the rest is ignored.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Fed, String> {
        self.read += bytes.len();
        self.parser.feed(bytes, &mut self.events);
        self.take_events()
    }

    /// Bytes held for a line or an event not yet complete (none counted after `[DONE]`).
    pub fn held(&self) -> usize {
        if self.answer.done() { 0 } else { self.parser.held() }
    }

    /// At most the size the rebuilt body will have, so far (the bytes read may be many times it).
    pub fn rebuilt_len(&self) -> usize {
        self.answer.rebuilt_len()
    }

    /// The end of the body (or `[DONE]`): the rebuilt unstreamed body.
    #[cfg(test)]
    pub fn finish(mut self) -> Result<String, String> {
        self.end()?;
        self.into_body()
    }

    /// The end of the body: its last event, taken without its blank line, folded in as a
    /// network chunk's would be (nothing after `[DONE]`).
    pub fn end(&mut self) -> Result<Fed, String> {
        if self.answer.done() {
            return Ok(Fed::default());
        }
        self.parser.finish(&mut self.events);
        self.take_events()
    }

    /// The rebuilt unstreamed body, once the body ended.
    pub fn into_body(self) -> Result<String, String> {
        self.answer.into_body()
    }

    /// The answer has generated text (or a finish reason) so far.
    pub fn produced(&self) -> bool {
        self.answer.produced
    }

    /// The data of the error event the server ended the stream with, if it did.
    pub fn server_error(&self) -> Option<&str> {
        self.answer.server_error.as_deref()
    }

    fn take_events(&mut self) -> Result<Fed, String> {
        let mut fed = Fed::default();
        for event in std::mem::take(&mut self.events) {
            if self.answer.done() {
                break;
            }
            let before = self.answer.produced;
            match self.answer.event(&event)? {
                Step::Choice => fed.first_choice |= !before && self.answer.produced,
                Step::Done => fed.done = true,
                Step::Other => {}
            }
        }
        Ok(fed)
    }
}

/// The size of `value` serialised.
fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).expect("a JSON value serialises");
    count.0
}

fn excerpt(text: &str) -> String {
    let mut excerpt: String = text.chars().take(80).collect();
    if excerpt.len() < text.len() {
        excerpt.push('…');
    }
    excerpt
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::pricing::Usage;
    use crate::provider::{CallError, parse_completion};

    /// The rebuilt body of a stream fed in the given pieces.
    fn read(pieces: &[&[u8]]) -> Result<String, String> {
        let mut reader = StreamReader::default();
        for piece in pieces {
            if reader.feed(piece)?.done {
                break;
            }
        }
        reader.finish()
    }

    /// `bytes` read whole, and split in two at every position, and byte by byte: the same result
    /// each time.
    fn read_split_everywhere(bytes: &[u8]) -> Result<String, String> {
        let whole = read(&[bytes]);
        for at in 0..=bytes.len() {
            assert_eq!(read(&[&bytes[..at], &bytes[at..]]), whole, "split at {at}");
        }
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(read(&singles), whole, "byte by byte");
        whole
    }

    fn events(bytes: &[u8]) -> Vec<SseEvent> {
        let mut parser = SseParser::default();
        let mut out = Vec::new();
        parser.feed(bytes, &mut out);
        parser.finish(&mut out);
        out
    }

    fn data(text: &str) -> SseEvent {
        SseEvent { data: Some(text.to_owned()), ..SseEvent::default() }
    }

    const LLAMA: &str = concat!(
        r#"data: {"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],"created":1754000000,"id":"chatcmpl-abc","model":"qwen","system_fingerprint":"b6000","object":"chat.completion.chunk"}"#,
        "\n\n",
        r#"data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"{\"1\":"}}],"created":1754000000,"id":"chatcmpl-abc","model":"qwen","object":"chat.completion.chunk"}"#,
        "\n\n",
        r#"data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":"\"héllo\"}"}}],"created":1754000000,"id":"chatcmpl-abc","model":"qwen","object":"chat.completion.chunk"}"#,
        "\n\n",
        r#"data: {"choices":[{"finish_reason":"stop","index":0,"delta":{}}],"created":1754000001,"id":"chatcmpl-abc","model":"qwen","object":"chat.completion.chunk","usage":{"completion_tokens":6,"prompt_tokens":57,"total_tokens":63},"timings":{"prompt_n":57,"prompt_ms":120.5,"predicted_n":6,"predicted_ms":879.5}}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );

    const OPENAI: &str = concat!(
        ": OPENROUTER PROCESSING\n\n",
        r#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}],"usage":null,"obfuscation":"a1"}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}],"usage":null}"#,
        "\n\n",
        ": keep-alive\n\n",
        r#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"finish_reason":"length"}],"usage":null}"#,
        "\n\n",
        r#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":120,"completion_tokens":30,"total_tokens":150,"prompt_tokens_details":{"cached_tokens":64},"cost":0.00042}}"#,
        "\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn a_llama_cpp_stream_becomes_its_unstreamed_body() {
        let body = read_split_everywhere(LLAMA.as_bytes()).unwrap();
        let value: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["object"], "chat.completion");
        assert_eq!(value["id"], "chatcmpl-abc");
        assert_eq!(value["model"], "qwen");
        assert_eq!(value["created"], 1754000001, "the last chunk's");
        assert_eq!(value["system_fingerprint"], "b6000");
        assert_eq!(value["choices"], json!([{ "index": 0, "message": { "role": "assistant", "content": "{\"1\":\"héllo\"}" }, "finish_reason": "stop" }]));
        let c = parse_completion(&body).unwrap();
        assert_eq!(c.content, "{\"1\":\"héllo\"}");
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        assert_eq!(c.usage, Some(Usage { prompt_tokens: 57, completion_tokens: 6, cached_tokens: 0 }));
        assert_eq!(c.server_time, Some(Duration::from_millis(1000)), "from llama.cpp's timings");
        assert!(!c.no_choices);
    }

    #[test]
    fn an_openai_stream_with_its_usage_in_a_last_chunk_without_choices() {
        let body = read_split_everywhere(OPENAI.as_bytes()).unwrap();
        let value: Value = serde_json::from_str(&body).unwrap();
        assert!(value.get("obfuscation").is_none());
        let c = parse_completion(&body).unwrap();
        assert_eq!(c.content, "Hi");
        assert!(c.truncated());
        assert_eq!(c.usage, Some(Usage { prompt_tokens: 120, completion_tokens: 30, cached_tokens: 64 }));
        assert_eq!(c.reported_cost_usd, Some(0.00042));
        assert_eq!(c.server_time, None);
    }

    #[test]
    fn vllm_metrics_and_cerebras_time_info_are_carried_over() {
        let stream = concat!(
            r#"data: {"id":"v","choices":[{"index":0,"delta":{"role":"assistant","content":"ok"},"finish_reason":null}]}"#,
            "\n\n",
            r#"data: {"id":"v","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"metrics":{"time_to_first_token_ms":85.25,"generation_time_ms":1240.5}}"#,
            "\n\n",
            r#"data: {"id":"v","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1},"time_info":{"prompt_time":0.25,"completion_time":1.0}}"#,
            "\n\ndata: [DONE]\n\n",
        );
        let body = read(&[stream.as_bytes()]).unwrap();
        let value: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["time_info"]["prompt_time"], 0.25);
        assert_eq!(parse_completion(&body).unwrap().server_time, Some(Duration::from_micros(1_325_750)), "metrics first, as unstreamed");
    }

    #[test]
    fn crlf_and_lone_cr_line_endings() {
        let crlf = LLAMA.replace('\n', "\r\n");
        assert_eq!(read_split_everywhere(crlf.as_bytes()), read(&[LLAMA.as_bytes()]));
        let cr = LLAMA.replace('\n', "\r");
        assert_eq!(read_split_everywhere(cr.as_bytes()), read(&[LLAMA.as_bytes()]));
    }

    #[test]
    fn the_parser_follows_the_sse_format() {
        let got = events(b"\xEF\xBB\xBFdata: a\r\n: comment\r\nid: 7\r\nretry: 100\r\ndata:b\ndata\n\nevent: ping\n\nevent: x\ndata:  two spaces\n\ndata: last");
        assert_eq!(
            got,
            vec![
                data("a\nb\n"),
                SseEvent { kind: Some("x".into()), data: Some(" two spaces".into()), error: None },
                data("last"),
            ],
            "BOM dropped, comments and id/retry ignored, data lines joined, an event without data not dispatched"
        );
        assert_eq!(events(b": only keep-alives\n\n:\n\n"), vec![]);
        assert_eq!(events(b"error: {\"code\":500}\n\n"), vec![SseEvent { error: Some("{\"code\":500}".into()), ..SseEvent::default() }]);
    }

    #[test]
    fn a_json_payload_over_several_data_lines() {
        let stream = "data: {\"choices\":[{\"index\":0,\n data: \"delta\":{\"content\":\"x\"},\"finish_reason\":\"stop\"}]}\n\n";
        // The second line is a field named " data" (leading space): ignored, so the JSON is cut.
        assert!(read(&[stream.as_bytes()]).unwrap_err().contains("not JSON"));
        let stream = "data: {\"choices\":[{\"index\":0,\ndata: \"delta\":{\"content\":\"x\"},\"finish_reason\":\"stop\"}]}\n\n";
        assert_eq!(parse_completion(&read(&[stream.as_bytes()]).unwrap()).unwrap().content, "x");
    }

    #[test]
    fn an_error_event_fails_the_call_with_the_servers_message() {
        let head = r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":"a"}}]}"#;
        let openai = format!("{head}\n\ndata: {{\"error\":{{\"message\":\"the model crashed\",\"type\":\"server_error\"}}}}\n\n");
        let reason = read_split_everywhere(openai.as_bytes()).unwrap_err();
        assert_eq!(reason, "the server sent an error in the stream: the model crashed [server_error]");
        let old_llama = format!("{head}\n\nerror: {{\"code\":500,\"message\":\"slot unavailable\",\"type\":\"server_error\"}}\n\n");
        assert!(read(&[old_llama.as_bytes()]).unwrap_err().contains("slot unavailable"));
        let typed = format!("{head}\n\nevent: error\ndata: {{\"message\":\"overloaded\"}}\n\n");
        assert!(read(&[typed.as_bytes()]).unwrap_err().contains("overloaded"));
        let plain = format!("{head}\n\nevent: error\ndata: upstream went away\n\n");
        assert_eq!(read(&[plain.as_bytes()]).unwrap_err(), "the server sent an error in the stream: upstream went away");
        // A null `error` is no error.
        let fine = format!("{head}\n\ndata: {{\"error\":null,\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\ndata: [DONE]\n\n");
        assert_eq!(parse_completion(&read(&[fine.as_bytes()]).unwrap()).unwrap().content, "a");
    }

    #[test]
    fn data_that_is_not_a_json_object_is_named() {
        let reason = read(&[b"data: <html>502 Bad Gateway</html>\n\n"]).unwrap_err();
        assert!(reason.starts_with("a streamed event's data is not JSON") && reason.contains("<html>502"), "{reason}");
        let reason = read(&[b"data: [1,2]\n\n"]).unwrap_err();
        assert!(reason.contains("not an object") && reason.contains("[1,2]"), "{reason}");
    }

    #[test]
    fn a_stream_without_done() {
        // Closed after a finish reason: taken.
        let cut = LLAMA.strip_suffix("data: [DONE]\n\n").unwrap();
        assert_eq!(read_split_everywhere(cut.as_bytes()), read(&[LLAMA.as_bytes()]));
        // The last event without its blank line is still taken.
        let unterminated = cut.strip_suffix("\n\n").unwrap();
        assert_eq!(read(&[unterminated.as_bytes()]), read(&[LLAMA.as_bytes()]));
        // Closed before one: cut short.
        let early = LLAMA.split("\n\n").take(2).collect::<Vec<_>>().join("\n\n") + "\n\n";
        let reason = read_split_everywhere(early.as_bytes()).unwrap_err();
        assert!(reason.starts_with("the stream ended early") && reason.contains("2 chunks"), "{reason}");
    }

    #[test]
    fn a_stream_with_no_chunk() {
        for empty in ["", "data: [DONE]\n\n", ": keep-alive\n\n", "\n\n\n"] {
            assert_eq!(read(&[empty.as_bytes()]).unwrap_err(), "the streamed answer held no chunk", "{empty:?}");
        }
    }

    #[test]
    fn nothing_after_done_is_read() {
        let more = format!("{LLAMA}data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"more\"}}}}]}}\n\ndata: not json\n\n");
        assert_eq!(read_split_everywhere(more.as_bytes()), read(&[LLAMA.as_bytes()]));
    }

    #[test]
    fn a_refusal_is_read_as_an_unstreamed_one_is() {
        let stream = concat!(
            r#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null,"refusal":""}}]}"#,
            "\n\n",
            r#"data: {"choices":[{"index":0,"delta":{"refusal":"I can't "}}]}"#,
            "\n\n",
            r#"data: {"choices":[{"index":0,"delta":{"refusal":"help."},"finish_reason":"stop"}]}"#,
            "\n\ndata: [DONE]\n\n",
        );
        let body = read_split_everywhere(stream.as_bytes()).unwrap();
        let value: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["choices"][0]["message"], json!({ "role": "assistant", "content": null, "refusal": "I can't help." }));
        assert_eq!(parse_completion(&body).unwrap().content, "(refusal) I can't help.");
    }

    #[test]
    fn only_the_first_choice_is_kept_and_only_a_choice_counts_as_the_first_chunk() {
        let mut reader = StreamReader::default();
        let usage_only = br#"data: {"choices":[],"usage":{"prompt_tokens":3}}"#;
        assert_eq!(reader.feed(b": keep-alive\n\n").unwrap(), Fed::default());
        assert_eq!(reader.feed(usage_only).unwrap(), Fed::default(), "not dispatched before its blank line");
        assert_eq!(reader.feed(b"\n\n").unwrap(), Fed::default(), "no choice");
        let second = br#"data: {"choices":[{"index":1,"delta":{"role":"assistant","content":"other"}}]}"#;
        assert_eq!(reader.feed(second).unwrap(), Fed::default());
        assert_eq!(reader.feed(b"\n\n").unwrap(), Fed::default(), "a second choice (n > 1) is not the answer");
        let role = br#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(reader.feed(role).unwrap(), Fed::default());
        assert_eq!(reader.feed(b"\n").unwrap(), Fed::default());
        assert_eq!(reader.feed(b"\n").unwrap(), Fed::default(), "a role with no text yet does not count");
        let content = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n";
        assert_eq!(reader.feed(content).unwrap(), Fed { first_choice: true, done: false }, "the first text counts");
        let end = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        assert_eq!(reader.feed(end).unwrap(), Fed { first_choice: false, done: true });
        let c = parse_completion(&reader.finish().unwrap()).unwrap();
        assert_eq!(c.content, "x");
        assert_eq!(c.usage.unwrap().prompt_tokens, 3);
    }

    #[test]
    fn a_stream_of_usage_alone_is_billed_without_an_answer() {
        let body = read(&[b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":0}}\n\ndata: [DONE]\n\n"]).unwrap();
        let c = parse_completion(&body).unwrap();
        assert!(c.no_choices);
        assert_eq!(c.usage.unwrap().prompt_tokens, 10);
    }

    #[test]
    fn blank_data_and_events_of_other_types_are_skipped() {
        let ping = "event: ping\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"PING\"},\"finish_reason\":\"stop\"}],\"model\":\"p\"}\n\n";
        let noise = format!("data:\n\ndata: \t \n\ndata:\ndata:\n\n{ping}event: ping\ndata: [DONE]\n\nevent: ping\ndata: not json\n\n");
        let stream = format!("{noise}event: message\n{}", LLAMA.replace("\n\ndata: {", &format!("\n\n{noise}data: {{")));
        assert_eq!(read_split_everywhere(stream.as_bytes()), read(&[LLAMA.as_bytes()]));
        // A ping with text is no first chunk.
        let mut reader = StreamReader::default();
        assert_eq!(reader.feed(ping.as_bytes()).unwrap(), Fed::default());
        assert_eq!(reader.feed(b"data:\n\ndata: [DONE]\n\n").unwrap(), Fed { first_choice: false, done: true });
        assert_eq!(reader.finish().unwrap_err(), "the streamed answer held no chunk");
        // `event: error` still fails the call.
        assert!(read(&[b"event: error\ndata: {\"message\":\"gone\"}\n\n"]).unwrap_err().contains("gone"));
    }

    #[test]
    fn a_whole_message_in_one_event_is_folded_like_a_delta() {
        let whole = concat!(
            r#"data: {"id":"w","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"the whole answer"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":3}}"#,
            "\n\ndata: [DONE]\n\n",
        );
        let mut reader = StreamReader::default();
        assert_eq!(reader.feed(whole.as_bytes()).unwrap(), Fed { first_choice: true, done: true }, "its text is the first chunk");
        let body = reader.finish().unwrap();
        let value: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["object"], "chat.completion");
        assert_eq!(value["choices"], json!([{ "index": 0, "message": { "role": "assistant", "content": "the whole answer" }, "finish_reason": "stop" }]));
        let c = parse_completion(&body).unwrap();
        assert_eq!(c.content, "the whole answer");
        assert_eq!(c.usage.unwrap().completion_tokens, 3);
        // Its text alone, without a finish reason, counts too; a refusal is folded as well.
        let mut reader = StreamReader::default();
        let refusal = br#"data: {"choices":[{"index":0,"message":{"role":"assistant","content":null,"refusal":"no."}}]}"#;
        assert_eq!(reader.feed(refusal).unwrap(), Fed::default());
        assert_eq!(reader.feed(b"\n\ndata: [DONE]\n\n").unwrap(), Fed { first_choice: true, done: true });
        assert_eq!(parse_completion(&reader.finish().unwrap()).unwrap().content, "(refusal) no.");
    }

    #[test]
    fn a_mislabelled_stream_is_recognised_by_its_start() {
        for sse in ["data: {}", "\n\r\n  data:x", ": OPENROUTER PROCESSING\n\ndata: {}", "\u{feff}data: {}", ": a\r: b\r\n\ndata:"] {
            assert!(looks_like_sse(sse), "{sse:?}");
        }
        for not in ["{\"choices\":[]}", "", "  ", ": a comment alone", ": a comment\n{}", "dat", "<html>data:</html>"] {
            assert!(!looks_like_sse(not), "{not:?}");
        }
    }

    #[test]
    fn the_rebuilt_length_is_at_most_the_rebuilt_body() {
        for stream in [LLAMA, OPENAI] {
            let mut reader = StreamReader::default();
            reader.feed(stream.as_bytes()).unwrap();
            let (len, read) = (reader.rebuilt_len(), reader.read);
            let body = reader.finish().unwrap();
            assert!(len <= body.len() && body.len() < read, "{len} {} {read}", body.len());
            assert!(body.len() - len < 256, "short of it by the body's frame alone: {len} {}", body.len());
        }
    }

    #[test]
    fn the_stream_fields_are_spliced_into_the_request() {
        let spliced = |body: &str| String::from_utf8(streamed_body(body.as_bytes())).unwrap();
        let body = spliced(r#"{"model":"m","messages":[],"max_tokens":5}"#);
        assert_eq!(body, r#"{"stream":true,"stream_options":{"include_usage":true},"model":"m","messages":[],"max_tokens":5}"#);
        let value: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["model"], "m");
        assert_eq!(spliced("{}"), r#"{"stream":true,"stream_options":{"include_usage":true}}"#);
        assert!(serde_json::from_str::<Value>(&spliced(" { \n } ")).is_ok());
        assert_eq!(spliced("[1]"), "[1]");
    }

    /// What the local server does, in turn.
    enum Part {
        Send(Vec<u8>),
        /// Waits until the test lets it go on (or drops the sender).
        Wait(tokio::sync::oneshot::Receiver<()>),
    }

    /// A chat endpoint on a local port answering one request with `head` and then `script`,
    /// then closing the connection; the receiver gets the request's body.
    async fn serve(head: &str, script: Vec<Part>) -> (String, tokio::sync::oneshot::Receiver<Vec<u8>>) {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let (request_tx, request_rx) = tokio::sync::oneshot::channel();
        let head = head.replace('\n', "\r\n");
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let request = read_request(&mut socket, &mut Vec::new()).await.unwrap();
            let _ = request_tx.send(request);
            socket.write_all(format!("{head}\r\n").as_bytes()).await.unwrap();
            for part in script {
                match part {
                    Part::Send(bytes) => {
                        if socket.write_all(&bytes).await.is_err() {
                            return;
                        }
                        socket.flush().await.unwrap();
                    }
                    Part::Wait(go) => {
                        let _ = go.await;
                    }
                }
            }
        });
        (url, request_rx)
    }

    const SSE: &str = "HTTP/1.1 200 OK\ncontent-type: text/event-stream; charset=utf-8\ncache-control: no-cache\nconnection: close\n";
    const REQUEST: &[u8] = br#"{"model":"qwen","messages":[{"role":"user","content":"hi"}],"max_tokens":16}"#;

    fn client(url: &str, max_response_bytes: u64) -> crate::provider::ChatClient {
        crate::provider::ChatClient::new(url, None, Duration::from_secs(5), max_response_bytes).unwrap()
    }

    fn send(bytes: impl Into<Vec<u8>>) -> Part {
        Part::Send(bytes.into())
    }

    #[tokio::test]
    async fn the_first_chunk_is_told_before_the_call_returns() {
        // The role alone, then the first text: the first chunk is the one with text.
        let second_end = LLAMA.match_indices("\n\n").nth(1).unwrap().0 + 2;
        let (first_event, rest) = LLAMA.split_at(second_end);
        let (go, gate) = tokio::sync::oneshot::channel();
        let (url, request) = serve(SSE, vec![send(first_event), Part::Wait(gate), send(rest)]).await;
        let client = client(&url, 1 << 20);
        let started = std::time::Instant::now();
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let call = tokio::spawn(async move { client.send_streamed(REQUEST, Duration::from_secs(10), first_tx).await });
        let first = first_rx.await.expect("the first chunk is told");
        assert!(!call.is_finished(), "the rest of the answer has not been sent yet");
        go.send(()).unwrap();
        let answer = call.await.unwrap().unwrap();
        let returned = std::time::Instant::now();
        assert!(started <= first && first < returned);
        let crate::provider::Delivery::Streamed { first_chunk } = answer.delivery else { panic!("{:?}", answer.delivery) };
        assert!(first_chunk <= answer.latency, "{first_chunk:?} {:?}", answer.latency);
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, read(&[LLAMA.as_bytes()]).unwrap(), "the rebuilt unstreamed body, for the cache");
        assert_eq!(answer.completion, parse_completion(&answer.body).unwrap());
        assert_eq!(answer.completion.content, "{\"1\":\"héllo\"}");
        assert_eq!(answer.completion.server_time, Some(Duration::from_millis(1000)));
        let sent: Value = serde_json::from_slice(&request.await.unwrap()).unwrap();
        assert_eq!(sent["stream"], true);
        assert_eq!(sent["stream_options"], json!({ "include_usage": true }));
        assert_eq!(sent["max_tokens"], 16);
    }

    #[tokio::test]
    async fn a_server_that_ignores_stream_is_read_as_send_reads_it() {
        let json = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":4,"completion_tokens":1}}"#;
        let head = format!("HTTP/1.1 200 OK\ncontent-type: application/json\ncontent-length: {}\nx-inference-time: 250\n", json.len());
        let (url, _) = serve(&head, vec![send(json)]).await;
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let streamed = client(&url, 1 << 20).send_streamed(REQUEST, Duration::from_secs(10), first_tx).await.unwrap();
        assert!(first_rx.await.is_err(), "no first chunk for an answer that never streamed");
        assert_eq!(streamed.delivery, crate::provider::Delivery::Whole);
        let (url, _) = serve(&head, vec![send(json)]).await;
        let whole = client(&url, 1 << 20).send(REQUEST, Duration::from_secs(10)).await.unwrap();
        assert_eq!(whole.delivery, crate::provider::Delivery::Whole);
        assert_eq!((&streamed.body, &streamed.completion, &streamed.headers), (&whole.body, &whole.completion, &whole.headers));
        assert_eq!(streamed.body, json);
        assert_eq!(streamed.completion.server_time, Some(Duration::from_millis(250)), "from TGI's header");
    }

    #[tokio::test]
    async fn a_429_is_rate_limited_as_with_send() {
        let json = r#"{"error":{"message":"slow down"}}"#;
        let head = format!("HTTP/1.1 429 Too Many Requests\ncontent-type: application/json\nretry-after: 2\ncontent-length: {}\n", json.len());
        let (url, _) = serve(&head, vec![send(json)]).await;
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let error = client(&url, 1 << 20).send_streamed(REQUEST, Duration::from_secs(10), first_tx).await.unwrap_err();
        assert!(matches!(&error, CallError::RateLimited(limit) if limit.retry_after == Some(Duration::from_secs(2))), "{error:?}");
        assert!(first_rx.await.is_err());
    }

    /// One streamed call to a `serve`d endpoint answering with `head` and `script`: its result and
    /// whether the first chunk was told.
    async fn call_with(head: &str, script: Vec<Part>, limit: u64, timeout: Duration) -> (Result<crate::provider::Answer, CallError>, bool) {
        let (url, _) = serve(head, script).await;
        let (first_tx, first_rx) = tokio::sync::oneshot::channel();
        let result = client(&url, limit).send_streamed(REQUEST, timeout, first_tx).await;
        (result, first_rx.await.is_ok())
    }

    /// A streamed chunk of `content`, padded as OpenAI pads them.
    fn padded(content: &str, finish: &str) -> String {
        let pad = "x".repeat(200);
        format!(
            "data: {{\"id\":\"chatcmpl-x\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":{finish}}}],\"obfuscation\":\"{pad}\"}}\n\n"
        )
    }

    /// `n` padded chunks of `content`, a last one with the finish reason, and `[DONE]`.
    fn padded_stream(n: usize, content: &str) -> String {
        let mut stream = padded(content, "null").repeat(n);
        stream.push_str(&padded("", "\"stop\""));
        stream.push_str("data: [DONE]\n\n");
        stream
    }

    #[tokio::test]
    async fn the_size_limit_holds_the_rebuilt_answer_and_the_raw_bytes_a_multiple_of_it() {
        let long = Duration::from_secs(10);
        let limit = 1024;
        // 100 chunks: some 35 KB streamed for 200 bytes of text; it fits as it would unstreamed.
        let fits = padded_stream(100, "ab");
        assert!(fits.len() > 30 * limit as usize);
        let (result, told) = call_with(SSE, vec![send(fits.as_str())], limit, long).await;
        let answer = result.unwrap();
        assert!(told);
        assert_eq!(answer.completion.content, "ab".repeat(100));
        assert!(answer.body.len() < limit as usize, "{}", answer.body.len());
        // The text alone is longer than the limit.
        let (result, _) = call_with(SSE, vec![send(padded_stream(60, "twenty bytes of text"))], limit, long).await;
        assert!(matches!(result, Err(CallError::TooLarge { limit: 1024, status: 200 })), "{result:?}");
        // So is the last field folded in.
        let usage = format!("data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":1,\"padding\":\"{}\"}}}}\n\n", "u".repeat(1100));
        let (result, _) = call_with(SSE, vec![send(format!("{usage}{}", padded_stream(1, "a")))], limit, long).await;
        assert!(matches!(result, Err(CallError::TooLarge { .. })), "{result:?}");
        // Streamed bytes past 64 times the limit, for little text.
        let bloated = padded_stream(250, "ab");
        assert!(bloated.len() > 64 * limit as usize);
        let (result, _) = call_with(SSE, vec![send(bloated)], limit, long).await;
        assert!(matches!(result, Err(CallError::TooLarge { limit: 1024, status: 200 })), "{result:?}");
        // A failed stream keeps only the first 64 KiB it read for its body.
        let cut = padded("ab", "null").repeat(300);
        assert!(cut.len() > 64 << 10);
        let (result, _) = call_with(SSE, vec![send(cut.as_str())], 1 << 20, long).await;
        let Err(CallError::BadOutput { reason, body, .. }) = result else { panic!("{result:?}") };
        assert!(reason.starts_with("the stream ended early"), "{reason}");
        assert_eq!(body, cut[..64 << 10]);
    }

    #[tokio::test]
    async fn a_line_or_an_event_that_never_ends_is_held_to_twice_the_limit() {
        let long = Duration::from_secs(10);
        let limit = 1024;
        // One `data:` line that goes on and on, then one event of many short lines: each stops
        // the call once past twice the limit, though far below the raw bytes allowed.
        let endless_line = format!("data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}", "a".repeat(3000));
        let endless_event = "data: x\n".repeat(2000);
        for stream in [endless_line, endless_event] {
            let (_hold, gate) = tokio::sync::oneshot::channel::<()>();
            let (result, _) = call_with(SSE, vec![send(stream), Part::Wait(gate)], limit, long).await;
            assert!(matches!(result, Err(CallError::TooLarge { limit: 1024, status: 200 })), "{result:?}");
        }
        // A whole answer in one event, as some servers send it, fits as it would unstreamed.
        let message = r#"data: {"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;
        let (result, _) = call_with(SSE, vec![send(format!("{message}\n\ndata: [DONE]\n\n"))], limit, long).await;
        assert_eq!(result.unwrap().completion.content, "ok");
    }

    #[tokio::test]
    async fn text_that_comes_with_the_failure_that_ends_the_stream_is_told_first() {
        let long = Duration::from_secs(10);
        let text = r#"data: {"choices":[{"index":0,"delta":{"content":"{\"a\""},"finish_reason":null}]}"#;
        let failure = r#"data: {"error":{"message":"the model crashed"}}"#;
        // In one network chunk with the failure.
        let (result, told) = call_with(SSE, vec![send(format!("{text}\n\n{failure}\n\n"))], 1 << 20, long).await;
        assert!(matches!(&result, Err(CallError::BadOutput { reason, .. }) if reason.contains("the model crashed")), "{result:?}");
        assert!(told, "the text came before the failure");
        // As the body's last event, without its blank line: taken at the end of the body.
        let (result, told) = call_with(SSE, vec![send(text)], 1 << 20, long).await;
        assert!(matches!(&result, Err(CallError::BadOutput { reason, .. }) if reason.starts_with("the stream ended early")), "{result:?}");
        assert!(told, "the text came before the body ended");
        // A failure before any text: nothing is told.
        let (result, told) = call_with(SSE, vec![send(format!("{failure}\n\n"))], 1 << 20, long).await;
        assert!(result.is_err());
        assert!(!told);
    }

    #[tokio::test]
    async fn what_follows_done_is_read_for_a_while_and_never_fails_the_call() {
        let after = format!("data: not json\n\n{}", "garbage ".repeat(20_000));
        // Past the raw limit, and a body that never ends, cut by the call's timeout: still answered.
        let (_hold, gate) = tokio::sync::oneshot::channel::<()>();
        let started = std::time::Instant::now();
        let script = vec![send(LLAMA), send(after.as_str()), Part::Wait(gate)];
        let (result, _) = call_with(SSE, script, 1024, Duration::from_millis(700)).await;
        assert_eq!(result.unwrap().body, read(&[LLAMA.as_bytes()]).unwrap());
        assert!(started.elapsed() < Duration::from_millis(1800), "{:?}", started.elapsed());
        // A body that never ends, within a long timeout: the call ends at `[DONE]`, the rest is
        // read apart from it.
        let (_hold, gate) = tokio::sync::oneshot::channel::<()>();
        let started = std::time::Instant::now();
        let (result, _) = call_with(SSE, vec![send(LLAMA), send("data: more\n\n"), Part::Wait(gate)], 1 << 20, Duration::from_secs(10)).await;
        let answer = result.unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert!(answer.latency < Duration::from_secs(1), "{:?}", answer.latency);
    }

    #[tokio::test]
    async fn what_follows_done_is_read_apart_from_the_call_for_two_seconds_at_most() {
        use tokio::io::AsyncWriteExt;
        // An endpoint that goes on sending keep-alives after `[DONE]` until the client hangs up,
        // and says how long after `[DONE]` that was.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let (hung_up_tx, hung_up) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            read_request(&mut socket, &mut Vec::new()).await.unwrap();
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n";
            socket.write_all(format!("{head}{LLAMA}").as_bytes()).await.unwrap();
            let done = std::time::Instant::now();
            while socket.write_all(b": keep-alive\n\n").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ = hung_up_tx.send(done.elapsed());
        });
        let (first_tx, _first_rx) = tokio::sync::oneshot::channel();
        let started = std::time::Instant::now();
        let answer = client(&url, 1 << 20).send_streamed(REQUEST, Duration::from_secs(30), first_tx).await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1), "the call ends at [DONE]: {:?}", started.elapsed());
        assert_eq!(answer.body, read(&[LLAMA.as_bytes()]).unwrap());
        let after = tokio::time::timeout(Duration::from_secs(10), hung_up).await.expect("the rest is read for ever").unwrap();
        assert!(Duration::from_millis(1500) <= after && after < Duration::from_secs(5), "{after:?}");
    }

    use crate::provider::test_http::read_request;

    #[tokio::test]
    async fn the_connection_is_kept_for_the_next_call_after_done() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::AsyncWriteExt;
        // An endpoint keeping its connections open, sending the end of each chunked body a
        // moment after its `data: [DONE]`.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let connections = std::sync::Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while read_request(&mut socket, &mut buf).await.is_some() {
                        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                        let chunk = format!("{head}{:x}\r\n{LLAMA}\r\n", LLAMA.len());
                        if socket.write_all(chunk.as_bytes()).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        if socket.write_all(b"0\r\n\r\n").await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let client = client(&url, 1 << 20);
        for _ in 0..3 {
            let (first_tx, _first_rx) = tokio::sync::oneshot::channel();
            let answer = client.send_streamed(REQUEST, Duration::from_secs(10), first_tx).await.unwrap();
            assert_eq!(answer.body, read(&[LLAMA.as_bytes()]).unwrap());
            // The next call once the body's end came (150 ms after `[DONE]`, read apart from
            // the call), with room for a busy machine.
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1, "one connection for the three calls");
    }

    #[tokio::test]
    async fn a_stream_sent_with_another_content_type_is_read_as_a_stream() {
        let long = Duration::from_secs(10);
        for (content_type, stream) in [("content-type: application/json\n", OPENAI), ("content-type: text/plain\n", OPENAI), ("", LLAMA)] {
            let stream = format!("\n{stream}");
            let head = format!("HTTP/1.1 200 OK\n{content_type}content-length: {}\n", stream.len());
            let (result, told) = call_with(&head, vec![send(stream.as_str())], 1 << 20, long).await;
            let answer = result.unwrap();
            assert!(!told, "not read as it came");
            assert_eq!(answer.delivery, crate::provider::Delivery::Streamed { first_chunk: answer.latency }, "{content_type}");
            assert_eq!(answer.body, read(&[stream.as_bytes()]).unwrap());
            assert_eq!(answer.completion, parse_completion(&answer.body).unwrap());
        }
        // One that is no answer keeps its body.
        let broken = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n";
        let head = format!("HTTP/1.1 200 OK\ncontent-type: application/json\ncontent-length: {}\n", broken.len());
        let (result, _) = call_with(&head, vec![send(broken)], 1 << 20, long).await;
        let Err(CallError::BadOutput { reason, body, .. }) = result else { panic!("{result:?}") };
        assert!(reason.starts_with("the stream ended early"), "{reason}");
        assert_eq!(body, broken);
    }

    #[tokio::test]
    async fn failed_streams() {
        let call = |script: Vec<Part>, limit: u64, timeout: Duration| async move {
            let (url, _) = serve(SSE, script).await;
            let (first_tx, first_rx) = tokio::sync::oneshot::channel();
            let result = client(&url, limit).send_streamed(REQUEST, timeout, first_tx).await;
            (result, first_rx.await.is_ok())
        };
        let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"a\"}}]}\n\n";
        let long = Duration::from_secs(10);
        // Closed before a finish reason.
        let (result, told) = call(vec![send(role)], 1 << 20, long).await;
        let Err(CallError::BadOutput { reason, status: 200, body }) = result else { panic!("{result:?}") };
        assert!(reason.starts_with("the stream ended early"), "{reason}");
        assert_eq!((body.as_str(), told), (role, true));
        // The server's own error, mid-stream.
        let error = "data: {\"error\":{\"message\":\"the context is full\",\"type\":\"exceed_context_size_error\"}}\n\n";
        let (result, _) = call(vec![send(role), send(error)], 1 << 20, long).await;
        let Err(CallError::BadOutput { reason, .. }) = result else { panic!("{result:?}") };
        assert_eq!(reason, "the server sent an error in the stream: the context is full [exceed_context_size_error]");
        // Nothing but a keep-alive and [DONE].
        let (result, told) = call(vec![send(": ping\n\ndata: [DONE]\n\n")], 1 << 20, long).await;
        assert!(matches!(&result, Err(CallError::BadOutput { reason, .. }) if reason == "the streamed answer held no chunk"), "{result:?}");
        assert!(!told);
        // (Too large: `the_size_limit_holds_the_rebuilt_answer_and_the_raw_bytes_a_multiple_of_it`.)
        // Cut by the overall timeout after the first chunk.
        let (_hold, gate) = tokio::sync::oneshot::channel::<()>();
        let (result, told) = call(vec![send(role), Part::Wait(gate)], 1 << 20, Duration::from_millis(300)).await;
        assert!(matches!(result, Err(CallError::Timeout { .. })), "{result:?}");
        assert!(told);
    }
}
