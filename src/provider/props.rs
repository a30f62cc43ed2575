//! What a self-hosted server says of itself before the run: llama.cpp's `llama-server`
//! answers `GET /props` with the requests it works on at once (`total_slots`) and the context
//! each of them holds (`default_generation_settings.n_ctx`). Other servers answer 404 or
//! something else, and the run goes on without it.

use std::time::Duration;

use serde::Deserialize;

use super::{ChatClient, Limited, read_limited};

/// How long the question may take: a server that does not answer it at once is asked no more.
const PROPS_TIMEOUT: Duration = Duration::from_secs(3);
/// The most of the answer read (it carries the chat template, a few kilobytes).
const PROPS_MAX_BYTES: u64 = 1 << 20;

/// What the server announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerProps {
    /// Requests the server works on at once; more wait in its queue.
    pub slots: u32,
    /// The context window of one slot, in tokens, when it says so.
    pub slot_context: Option<u32>,
}

#[derive(Deserialize)]
struct PropsBody {
    total_slots: Option<i64>,
    default_generation_settings: Option<GenerationSettings>,
}

#[derive(Deserialize)]
struct GenerationSettings {
    n_ctx: Option<i64>,
}

/// Reads `GET /props`'s body; `None` unless it names at least one slot.
pub fn parse_props(body: &str) -> Option<ServerProps> {
    let props: PropsBody = serde_json::from_str(body).ok()?;
    let slots = u32::try_from(props.total_slots?).ok().filter(|slots| *slots > 0)?;
    let slot_context = props
        .default_generation_settings
        .and_then(|settings| settings.n_ctx)
        .and_then(|n_ctx| u32::try_from(n_ctx).ok())
        .filter(|n_ctx| *n_ctx > 0);
    Some(ServerProps { slots, slot_context })
}

/// The server's own endpoint `name` (a path, and a query after `?`) beside the API root of
/// the chat `endpoint` (`…/v1/chat/completions` → `…/name`): `http://host:8080/v1` →
/// `http://host:8080/props`.
pub fn beside_the_root(endpoint: &reqwest::Url, name: &str) -> Option<reqwest::Url> {
    let path = endpoint.path().trim_end_matches('/');
    let root = path.strip_suffix("/chat/completions")?;
    let root = root.strip_suffix("/v1").unwrap_or(root);
    let (name, query) = match name.split_once('?') {
        Some((name, query)) => (name, Some(query)),
        None => (name, None),
    };
    let mut url = endpoint.clone();
    url.set_path(&format!("{root}/{name}"));
    url.set_query(query);
    Some(url)
}

impl ChatClient {
    /// Asks the server what it announces of itself (`GET /props`, with the job's key), once,
    /// within a few seconds; any failure is `None`.
    pub async fn server_props(&self) -> Option<ServerProps> {
        let body = self.get_beside_the_root("props", PROPS_MAX_BYTES, PROPS_TIMEOUT).await?;
        parse_props(&body)
    }

    /// The body of the server's own endpoint `name` beside the API root (`GET`, with the
    /// job's key), when it answers with success, whole within `max_bytes` and `timeout`.
    pub(super) async fn get_beside_the_root(&self, name: &str, max_bytes: u64, timeout: Duration) -> Option<String> {
        let url = beside_the_root(&self.endpoint, name)?;
        let ask = async {
            let mut request = self.http.get(url);
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key.expose());
            }
            let response = request.send().await.ok()?;
            if !response.status().is_success() {
                tracing::debug!(status = response.status().as_u16(), "the server does not answer GET /{name}");
                return None;
            }
            match read_limited(response, max_bytes).await.ok()? {
                Limited::Whole(body) => Some(body),
                Limited::Cut(_) => None,
            }
        };
        tokio::time::timeout(timeout, ask).await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_servers_props_give_its_slots_and_their_context() {
        let body = r#"{"default_generation_settings":{"params":{"n_predict":-1},"n_ctx":4096},
            "total_slots":2,"model_alias":"smollm2-135m","chat_template":"{{ x }}","is_sleeping":false}"#;
        assert_eq!(parse_props(body), Some(ServerProps { slots: 2, slot_context: Some(4096) }));
    }

    #[test]
    fn props_without_slots_say_nothing() {
        for body in [
            "{}",
            r#"{"total_slots":0}"#,
            r#"{"total_slots":-1}"#,
            r#"{"total_slots":"4"}"#,
            r#"{"error":{"code":404,"message":"File Not Found"}}"#,
            "<html>not found</html>",
            "[]",
        ] {
            assert_eq!(parse_props(body), None, "{body}");
        }
        assert_eq!(parse_props(r#"{"total_slots":3}"#), Some(ServerProps { slots: 3, slot_context: None }));
        assert_eq!(
            parse_props(r#"{"total_slots":3,"default_generation_settings":{"n_ctx":0}}"#),
            Some(ServerProps { slots: 3, slot_context: None })
        );
    }

    #[test]
    fn props_sit_beside_the_api_root() {
        let cases = [
            ("http://127.0.0.1:8080/v1/chat/completions", "http://127.0.0.1:8080/props"),
            ("http://127.0.0.1:8080/chat/completions", "http://127.0.0.1:8080/props"),
            ("https://gpu.example.org/llama/v1/chat/completions", "https://gpu.example.org/llama/props"),
        ];
        for (endpoint, props) in cases {
            let endpoint = reqwest::Url::parse(endpoint).unwrap();
            assert_eq!(beside_the_root(&endpoint, "props").unwrap().as_str(), props, "{endpoint}");
        }
        let endpoint = reqwest::Url::parse("http://127.0.0.1:30000/v1/chat/completions?api-version=1").unwrap();
        assert_eq!(
            beside_the_root(&endpoint, "v1/loads?include=core").unwrap().as_str(),
            "http://127.0.0.1:30000/v1/loads?include=core"
        );
        assert_eq!(beside_the_root(&endpoint, "metrics").unwrap().as_str(), "http://127.0.0.1:30000/metrics");
    }
}
