//! Prometheus metrics of a run: served over HTTP while it runs (`run --metrics-addr`) and written
//! to a file when it ends (`run --metrics-file`, for node_exporter's textfile collector under
//! cron). Both are the Prometheus text format (0.0.4), encoded by `prometheus-client` from a
//! [`Snapshot`] of the run taken at that moment.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::exit::usage;

/// What the metrics say about a run at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub job: String,
    pub run_id: i64,
    /// Items of the run by state: pending, done, failed, rejected (and in flight: leased).
    pub items: Vec<(&'static str, u64)>,
    /// Requests of this process by outcome: answered, rate_limited, timeout, server_error, error.
    pub requests: Vec<(&'static str, u64)>,
    /// Items sent again after a failed attempt or in a request re-sent after a 429.
    pub retries: u64,
    pub in_flight: u64,
    /// Tokens by kind (input, output, cached) of the run's calls, from the ledger.
    pub tokens: Vec<(&'static str, u64)>,
    /// Money spent by the run, by model.
    pub cost_usd_by_model: Vec<(String, f64)>,
    /// Money reserved by calls in flight.
    pub reserved_usd: f64,
    pub budget_usd: Option<f64>,
    /// The controller's limits now.
    pub concurrency_limit: Option<u64>,
    pub requests_per_second_limit: Option<f64>,
    pub items_per_request_limit: Option<u64>,
}

type Labels = Vec<(String, String)>;

fn labels(snapshot: &Snapshot, more: &[(&str, &str)]) -> Labels {
    let mut labels = vec![("job".to_owned(), snapshot.job.clone()), ("run".to_owned(), snapshot.run_id.to_string())];
    labels.extend(more.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    labels
}

fn gauge_f64() -> Family<Labels, Gauge<f64, AtomicU64>> {
    Family::default()
}

/// The snapshot in the Prometheus text format.
pub fn render(snapshot: &Snapshot) -> String {
    let mut registry = <Registry>::with_prefix("backfill");

    let items = Family::<Labels, Gauge>::default();
    for (state, n) in &snapshot.items {
        items.get_or_create(&labels(snapshot, &[("state", state)])).set(*n as i64);
    }
    registry.register("items", "Items of the run by state", items);

    let requests = Family::<Labels, Counter>::default();
    for (outcome, n) in &snapshot.requests {
        requests.get_or_create(&labels(snapshot, &[("outcome", outcome)])).inc_by(*n);
    }
    registry.register("requests", "Requests sent by this process, by outcome", requests);

    let retries = Family::<Labels, Counter>::default();
    retries.get_or_create(&labels(snapshot, &[])).inc_by(snapshot.retries);
    registry.register("item_retries", "Items sent again (a failed attempt, or a request re-sent after a 429)", retries);

    let in_flight = Family::<Labels, Gauge>::default();
    in_flight.get_or_create(&labels(snapshot, &[])).set(snapshot.in_flight as i64);
    registry.register("requests_in_flight", "Requests in flight now", in_flight);

    let tokens = Family::<Labels, Counter>::default();
    for (kind, n) in &snapshot.tokens {
        tokens.get_or_create(&labels(snapshot, &[("kind", kind)])).inc_by(*n);
    }
    registry.register("tokens", "Tokens of the run's calls, by kind", tokens);

    let cost = gauge_f64();
    for (model, usd) in &snapshot.cost_usd_by_model {
        cost.get_or_create(&labels(snapshot, &[("model", model)])).set(*usd);
    }
    registry.register("cost_usd", "Money spent by the run, by model (USD)", cost);

    let reserved = gauge_f64();
    reserved.get_or_create(&labels(snapshot, &[])).set(snapshot.reserved_usd);
    registry.register("reserved_usd", "Money reserved by calls in flight (USD)", reserved);

    if let Some(budget) = snapshot.budget_usd {
        let cap = gauge_f64();
        cap.get_or_create(&labels(snapshot, &[])).set(budget);
        registry.register("budget_usd", "The run's budget cap (USD)", cap);
    }
    let limits = gauge_f64();
    for (limit, value) in [
        ("concurrency", snapshot.concurrency_limit.map(|v| v as f64)),
        ("requests_per_second", snapshot.requests_per_second_limit),
        ("items_per_request", snapshot.items_per_request_limit.map(|v| v as f64)),
    ] {
        if let Some(value) = value {
            limits.get_or_create(&labels(snapshot, &[("limit", limit)])).set(value);
        }
    }
    registry.register("controller_limit", "The adaptive controller's limits now", limits);

    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

/// Writes the metrics to `path` atomically (a temporary file beside it, then a rename), as
/// node_exporter's textfile collector wants: it never reads a half-written file.
pub fn write_file(path: &Path, snapshot: &Snapshot) -> anyhow::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}.tmp", std::process::id()));
    let temporary = std::path::PathBuf::from(temporary);
    std::fs::write(&temporary, render(snapshot))
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&temporary);
            anyhow::anyhow!("--metrics-file {}: cannot write it: {e}", path.display())
        })
}

/// Where a run's metrics go: `--metrics-addr` (already bound) and `--metrics-file`.
#[derive(Debug)]
pub struct Exporter {
    pub listener: Option<TcpListener>,
    pub file: Option<PathBuf>,
}

/// Checks `--metrics-addr` and `--metrics-file` before the run is touched: the address is
/// bound and the file's folder exists, or the command stops with exit 2.
pub async fn prepare(addr: Option<&str>, file: Option<&Path>) -> anyhow::Result<Option<Exporter>> {
    if addr.is_none() && file.is_none() {
        return Ok(None);
    }
    if let Some(file) = file {
        let folder = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !folder.is_dir() {
            return Err(usage(format!(
                "--metrics-file {}: the folder {} does not exist; create it or name another file",
                file.display(),
                folder.display()
            )));
        }
    }
    let listener = match addr {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    Ok(Some(Exporter { listener, file: file.map(Path::to_path_buf) }))
}

/// Binds `--metrics-addr` before the run starts, so that a taken or bad address is a usage
/// error (exit 2) and not a surprise halfway through the night.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|e| usage(format!("--metrics-addr {addr}: {e}; write an address and a port, e.g. 127.0.0.1:9464")))?;
    TcpListener::bind(parsed)
        .await
        .map_err(|e| usage(format!("--metrics-addr {addr}: cannot listen there: {e}; choose another port")))
}

/// The largest request read: a scrape is one short GET.
const MAX_REQUEST: usize = 8 * 1024;

/// Serves the metrics on `listener` until `shutdown`: `GET /metrics` (or `/`) answers the text
/// of a fresh snapshot, anything else 404. One task per connection, each answering one request
/// and closing it.
pub async fn serve(
    listener: TcpListener,
    snapshot: Arc<dyn Fn() -> Snapshot + Send + Sync>,
    shutdown: CancellationToken,
) {
    loop {
        let (mut stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!("metrics: accept failed: {e}");
                    continue;
                }
            },
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(512);
            let mut buffer = [0u8; 1024];
            // Read up to the end of the headers; a slow or silent client is dropped.
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
                    let n = stream.read(&mut buffer).await?;
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&buffer[..n]);
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            let path = path.split('?').next().unwrap_or_default();
            let response = if method == "GET" && (path == "/metrics" || path == "/") {
                let body = render(&snapshot());
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 27\r\nConnection: close\r\n\r\nonly GET /metrics is here.\n"
                    .to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            job: "motions".into(),
            run_id: 3,
            items: vec![("pending", 10), ("done", 85), ("failed", 2), ("rejected", 3)],
            requests: vec![("answered", 9), ("rate_limited", 4)],
            retries: 5,
            in_flight: 2,
            tokens: vec![("input", 1200), ("output", 800), ("cached", 0)],
            cost_usd_by_model: vec![("gpt-4o-mini".into(), 0.0125)],
            reserved_usd: 0.001,
            budget_usd: Some(5.0),
            concurrency_limit: Some(8),
            requests_per_second_limit: None,
            items_per_request_limit: Some(20),
        }
    }

    #[test]
    fn the_text_format_carries_every_figure_with_its_labels() {
        let text = render(&snapshot());
        for line in [
            "# TYPE backfill_items gauge",
            "backfill_items{job=\"motions\",run=\"3\",state=\"done\"} 85",
            "backfill_requests_total{job=\"motions\",run=\"3\",outcome=\"rate_limited\"} 4",
            "backfill_item_retries_total{job=\"motions\",run=\"3\"} 5",
            "backfill_requests_in_flight{job=\"motions\",run=\"3\"} 2",
            "backfill_tokens_total{job=\"motions\",run=\"3\",kind=\"output\"} 800",
            "backfill_cost_usd{job=\"motions\",run=\"3\",model=\"gpt-4o-mini\"} 0.0125",
            "backfill_budget_usd{job=\"motions\",run=\"3\"} 5.0",
            "backfill_controller_limit{job=\"motions\",run=\"3\",limit=\"concurrency\"} 8.0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("requests_per_second"), "{text}");
        assert!(!text.contains("# EOF"), "the textfile collector reads the Prometheus format:\n{text}");
    }

    #[tokio::test]
    async fn the_server_answers_a_scrape_and_refuses_other_paths() {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, Arc::new(snapshot), shutdown.clone()));
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let answer = get("/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK") && answer.contains("backfill_items{"), "{answer}");
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        shutdown.cancel();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_taken_address_is_a_usage_error() {
        let first = bind("127.0.0.1:0").await.unwrap();
        let addr = first.local_addr().unwrap().to_string();
        let error = bind(&addr).await.unwrap_err();
        assert_eq!(crate::exit::exit_for_error(&error), crate::exit::Exit::Usage);
        assert!(bind("nonsense").await.is_err());
    }

    #[test]
    fn the_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backfill.prom");
        write_file(&path, &snapshot()).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("backfill_items{"), "{text}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }
}
