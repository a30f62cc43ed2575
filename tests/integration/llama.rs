//! End to end against the real llama.cpp server (`llama-server`, SmolLM2-135M): the request carries
//! a schema forcing exactly the batch's ids, and every item of a small run of real motions gets
//! an output. The tiny model writes poor Dutch, so the test checks structure, not content.
//! `scripts/test.sh` starts the server and sets BACKFILL_LLAMA_URL.

use crate::support::*;

/// One test at a time on the shared server: its two slots are what the tests measure against,
/// and a second client would queue ours behind its requests. The local MiniLM test, which
/// keeps both cores busy, takes it too.
pub(crate) static SERVER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(crate) fn llama_url() -> Option<String> {
    match std::env::var("BACKFILL_LLAMA_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("BACKFILL_LLAMA_URL is not set: run the tests with scripts/test.sh, which starts the llama.cpp server")
        }
        _ => {
            eprintln!("skipped: BACKFILL_LLAMA_URL is not set (scripts/test.sh starts the llama.cpp server and sets it)");
            None
        }
    }
}

/// `motions.db` in `dir`, built from the motions shipped in `data/`.
pub(crate) async fn motions_db(dir: &std::path::Path) -> std::path::PathBuf {
    let db = dir.join("motions.db");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = std::process::Command::new("python3")
        .arg(root.join("scripts/make-motions-db.py"))
        .arg(root.join("data/motions_sample.jsonl"))
        .arg(&db)
        .status()
        .unwrap();
    assert!(status.success());
    db
}

/// A job explaining the motions of `db` in one short Dutch sentence each on the llama.cpp
/// server at `url`, with `tail` (`[limits]`, `[postprocess]`) appended; returns its path.
pub(crate) fn motions_job(dir: &std::path::Path, db: &std::path::Path, url: &str, name: &str, tail: &str) -> std::path::PathBuf {
    std::fs::write(
        dir.join("prompt.md"),
        "Leg elke motie uit in één korte zin van hoogstens vijftien woorden. Antwoord met een JSON-object met de id's als sleutels.\n{{items}}\n",
    )
    .unwrap();
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"name = "{name}"
[source]
database = "sqlite://{db}"
table = "motions"
id = "id"
columns = ["title", "text"]
pending = "explanation IS NULL"
[target]
column = "explanation"
[prompt]
template = "prompt.md"
[model]
base_url = "{url}"
name = "smollm2-135m"
structured_output = "json_object_schema"
max_output_tokens_per_item = 60
temperature = 0.0
request_timeout_s = 300
context_window = 4096
[pricing.smollm2-135m]
input = 0.0
output = 0.0
{tail}"#,
            db = db.display()
        ),
    )
    .unwrap();
    job
}

/// A small run of real motions against llama.cpp's `llama-server` with two slots and a queue,
/// with no `[limits]` caps on concurrency: backfill finds the server's pace instead of filling
/// its queue, reading the queue from the server's own time in each answer (`timings`).
#[tokio::test(flavor = "multi_thread")]
async fn a_real_llama_server_with_two_slots_is_run_at_its_own_pace() {
    let Some(url) = llama_url() else { return };
    let _server = SERVER.lock().await;
    run_at_the_servers_own_pace(&url, "llama-slots", Said::Props(2)).await;
}

/// The same server seen as Hugging Face's text-generation-inference (TGI) shows itself: no time
/// in the body, the server's time on each request in an `x-inference-time` header
/// (`scripts/strip-timings-proxy.py --tgi-header` in front of it). The queue is read from the
/// header, with the same pace and limits.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_says_its_time_in_tgis_header_is_run_at_its_own_pace() {
    run_behind_the_timings_proxy("--tgi-header", "tgi-header").await;
}

/// The same server seen as vLLM shows itself when run with `--enable-per-request-metrics`: the
/// server's time on each request in a `metrics` object of the body
/// (`scripts/strip-timings-proxy.py --vllm-metrics` in front of it).
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_says_its_time_in_vllms_metrics_is_run_at_its_own_pace() {
    run_behind_the_timings_proxy("--vllm-metrics", "vllm-metrics").await;
}

/// The same server seen as vLLM and TGI show their load, with no time on any answer: the
/// requests it runs and those waiting, at `GET /metrics` (llama.cpp's own gauges, passed on by
/// `scripts/strip-timings-proxy.py --gauges`, which hides `/props` and the `timings`). The run
/// reads them every second: its requests waiting at two readings in a row show the server's
/// two slots.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_shows_its_queue_in_gauges_is_run_at_its_own_pace() {
    let Some(url) = llama_url() else { return };
    let _server = SERVER.lock().await;
    let proxy = TimingsProxy::start(&url, &["--gauges"]);
    run_at_the_servers_own_pace(&proxy.url, "gauges", Said::Gauges(2)).await;
}

/// The same server seen as Ollama, llama-cpp-python's server or a proxy that passes only the
/// standard fields show themselves: no time on any answer, no `/props`, no `/metrics`
/// (`scripts/strip-timings-proxy.py`, passing streamed answers on event by event). Only the
/// streamed answers' first chunks show when a slot took a request up: the requests waiting
/// for one are seen from them.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_shows_nothing_but_its_streamed_answers_is_run_at_its_own_pace() {
    let Some(url) = llama_url() else { return };
    let _server = SERVER.lock().await;
    let proxy = TimingsProxy::start(&url, &[]);
    run_at_the_servers_own_pace(&proxy.url, "streams", Said::FirstChunks).await;
}

/// `run_at_the_servers_own_pace` through the timings proxy in the form `option` gives.
async fn run_behind_the_timings_proxy(option: &str, name: &str) {
    let Some(url) = llama_url() else { return };
    let _server = SERVER.lock().await;
    let proxy = TimingsProxy::start(&url, &[option]);
    run_at_the_servers_own_pace(&proxy.url, name, Said::Time).await;
}

/// What the server shows of itself besides its answers.
#[derive(Clone, Copy)]
enum Said {
    /// Its slots before the run (`GET /props`), and its time on each answer.
    Props(u64),
    /// Only its time on each answer (asked for whole: the proxy passes no time in a stream).
    Time,
    /// Nothing but its streamed answers, their first chunks as they come.
    FirstChunks,
    /// Only its gauges of requests running and waiting (`GET /metrics`), which show these
    /// slots once requests wait.
    Gauges(u64),
}

/// `scripts/strip-timings-proxy.py` in front of the server at `upstream`, stopped on drop.
struct TimingsProxy {
    child: std::process::Child,
    url: String,
}

impl TimingsProxy {
    fn start(upstream: &str, options: &[&str]) -> TimingsProxy {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let upstream_root = upstream.trim_end_matches('/').trim_end_matches("/v1");
        let child = std::process::Command::new("python3")
            .arg(root.join("scripts/strip-timings-proxy.py"))
            .arg(port.to_string())
            .arg(upstream_root)
            .args(options)
            .spawn()
            .expect("python3 runs the timings proxy");
        let proxy = TimingsProxy { child, url: format!("http://127.0.0.1:{port}/v1") };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "the timings proxy did not listen on {port}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        proxy
    }
}

impl Drop for TimingsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs 12 real motions at `url` (the llama.cpp server with two slots, or a proxy in front of
/// it) with no `[limits]` caps on concurrency, and checks that backfill found the server's pace
/// instead of filling its queue: after the start, no more than 4 requests in flight; no request
/// times out and none is cut (so no item is computed twice); after the start, the median call
/// takes at most twice the server's own time for a call (from its log); every item gets an
/// output or fails for a reason other than time; no call's answer runs past the job's output
/// tokens per item; and the answers said how long the server worked on them, where it says
/// (`said`). A server that says its slots (llama.cpp's `GET /props`) is started at them: no
/// more requests in flight than that before the first answer. One that shows only its gauges is
/// found to have its slots from them. Answers are streamed only where the server shows nothing
/// of its load (`model.stream = "auto"`).
async fn run_at_the_servers_own_pace(url: &str, name: &str, said: Said) {
    let log = std::env::var("BACKFILL_LLAMA_LOG").ok().filter(|path| !path.is_empty());
    if log.is_none() && std::env::var("CI").as_deref() == Ok("true") {
        panic!("BACKFILL_LLAMA_LOG is not set: run the tests with scripts/test.sh");
    }
    let log_start = log.as_ref().map(|path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0));
    let dir = tempfile::tempdir().unwrap();
    let db = motions_db(dir.path()).await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await.unwrap();
    sqlx::query("DELETE FROM motions WHERE id NOT IN (SELECT id FROM motions ORDER BY length(text) LIMIT 12)")
        .execute(&pool)
        .await
        .unwrap();
    let job = motions_job(dir.path(), &db, url, name, "[limits]\nitems_per_request = { start = 2, min = 1, max = 2 }\nmax_attempts = 3\nmax_failed_share = 1.0\n");
    if matches!(said, Said::Time) {
        let text = std::fs::read_to_string(&job).unwrap().replace("[model]\n", "[model]\nstream = \"never\"\n");
        std::fs::write(&job, text).unwrap();
    }
    let output = backfill_async(dir.path(), &["run", job.to_str().unwrap(), "--json", "--quiet"], &[]).await;
    let summary: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap_or_else(|e| panic!("{e}: {}", stderr(&output)));
    assert_eq!(summary["items"]["total"], 12, "{summary}");
    assert_eq!(
        summary["items"]["done"].as_u64().unwrap() + summary["items"]["failed"].as_u64().unwrap() + summary["items"]["rejected"].as_u64().unwrap(),
        12,
        "{summary}"
    );
    assert_eq!(summary["controller"]["timeouts"], 0, "{summary}");
    assert_eq!(summary["controller"]["hedged_items"], 0, "{summary}");
    let slots = match said {
        Said::Props(slots) | Said::Gauges(slots) => Some(slots),
        Said::Time | Said::FirstChunks => None,
    };
    match said {
        // Requests seen waiting for a slot show the most that ran at once: at most the two.
        Said::FirstChunks => assert!(summary["controller"]["server_slots"].as_u64().is_none_or(|s| s <= 2), "{summary}"),
        _ => assert_eq!(summary["controller"]["server_slots"].as_u64(), slots, "{summary}"),
    }
    if let Said::Props(slots) = said {
        let told = format!("works on {slots} requests at once (GET /props)");
        assert!(stderr(&output).contains(&told), "{}", stderr(&output));
    }
    let gauges_read = stderr(&output).contains("shows the requests it runs and those waiting at GET /metrics (llama.cpp's llamacpp:requests_deferred)");
    assert_eq!(gauges_read, matches!(said, Said::Props(_) | Said::Gauges(_)), "{}", stderr(&output));
    // Streamed only where the server shows no gauges and the job does not say otherwise.
    let first_chunks = summary["controller"]["first_chunk_answers"].as_u64().unwrap();
    match said {
        Said::FirstChunks => assert!(first_chunks >= 6, "{summary}"),
        _ => assert_eq!(first_chunks, 0, "{summary}"),
    }
    // The queue was read from the server's own time, which the server's answers said, or
    // from its gauges alone.
    let timed = summary["controller"]["server_timed_answers"].as_u64().unwrap();
    match said {
        Said::Gauges(_) | Said::FirstChunks => assert_eq!(timed, 0, "{summary}"),
        _ => assert!(timed >= 6, "{summary}"),
    }
    // Items that failed failed for what the model wrote, not for time.
    let timed_out: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM backfill_calls WHERE outcome = 'timeout'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(timed_out, 0, "{summary}");
    let failures: Vec<Option<String>> = sqlx::query_scalar("SELECT last_error FROM backfill_items WHERE state = 'failed'")
        .fetch_all(&pool)
        .await
        .unwrap();
    for error in &failures {
        let error = error.clone().unwrap_or_default();
        assert!(!error.contains("timed out") && !error.contains("timeout"), "failed for time: {error}");
    }
    // No call let the model write more than the job allows per item (60) plus the enclosing
    // object's allowance, however long its answers ran before.
    let outputs: Vec<(i64, i64)> = sqlx::query_as("SELECT items, completion_tokens FROM backfill_calls WHERE completion_tokens IS NOT NULL")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(!outputs.is_empty());
    for (items, tokens) in &outputs {
        let allowed = items * 60 + i64::from(backfill_controller::ENCLOSING_OBJECT_TOKENS);
        assert!(*tokens <= allowed, "{tokens} output tokens for {items} items at 60 per item; {summary}");
    }
    // Requests in flight, from the ledger: after the first third of the run, at most 4.
    let calls: Vec<(i64, i64)> = sqlx::query_as("SELECT started_at, started_at + latency_ms FROM backfill_calls WHERE latency_ms IS NOT NULL ORDER BY started_at")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(calls.len() >= 6, "{} calls", calls.len());
    let first = calls[0].0;
    if let Said::Props(slots) = said {
        let first_end = calls.iter().map(|(_, end)| *end).min().unwrap();
        let at_the_start = calls.iter().filter(|(start, _)| *start < first_end).count();
        assert!(at_the_start as u64 <= slots, "{at_the_start} requests sent before the first answer on {slots} slots; {summary}");
    }
    let last = calls.iter().map(|(_, end)| *end).max().unwrap();
    let settled_from = first + (last - first) / 3;
    let most_in_flight = calls
        .iter()
        .filter(|(start, _)| *start >= settled_from)
        .map(|(start, _)| calls.iter().filter(|(s, e)| s <= start && e > start).count())
        .max()
        .unwrap_or(0);
    assert!(most_in_flight <= 4, "{most_in_flight} requests in flight after the start; {summary}");
    // The median call against the server's own median time per call.
    if let (Some(path), Some(offset)) = (log, log_start) {
        let text = std::fs::read(&path).unwrap();
        let appended = String::from_utf8_lossy(&text[(offset as usize).min(text.len())..]).to_string();
        let mut server_ms: Vec<f64> = appended
            .lines()
            .filter_map(|line| line.split("total time =").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect();
        assert!(server_ms.len() >= calls.len() / 2, "{} timings in the server's log for {} calls", server_ms.len(), calls.len());
        server_ms.sort_by(f64::total_cmp);
        let mut latencies: Vec<i64> = calls
            .iter()
            .filter(|(start, _)| *start >= settled_from)
            .map(|(start, end)| end - start)
            .collect();
        latencies.sort();
        let median_latency = latencies[latencies.len() / 2] as f64;
        let median_server = server_ms[server_ms.len() / 2];
        assert!(
            median_latency <= 2.0 * median_server,
            "median call {median_latency} ms against the server's own {median_server} ms; {summary}"
        );
        eprintln!("median call {median_latency} ms, server's own {median_server} ms, at most {most_in_flight} in flight after the start; {summary}");
    }
}
