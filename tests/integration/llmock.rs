//! Against llmock (a Python package), a mock provider with real rate-limit behaviour: 60 requests/min
//! and 20% of requests answered 429 at random. Its resilience verdict judges how the client
//! reacted to every fault (Retry-After honoured, backoff, no retry storms, no giving up), and
//! must find nothing — no error and no warning. `scripts/test.sh` starts llmock with those
//! settings and sets BACKFILL_LLMOCK_URL.

use serde_json::Value;

use crate::support::*;

fn llmock_url() -> Option<String> {
    match std::env::var("BACKFILL_LLMOCK_URL") {
        Ok(url) if !url.is_empty() => Some(url.trim_end_matches('/').to_owned()),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("BACKFILL_LLMOCK_URL is not set: run the tests with scripts/test.sh, which starts llmock")
        }
        _ => {
            eprintln!("skipped: BACKFILL_LLMOCK_URL is not set (scripts/test.sh starts llmock and sets it)");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn llmock_finds_nothing_against_backfill_under_random_429s() {
    let Some(url) = llmock_url() else { return };
    let http = reqwest::Client::new();
    http.post(format!("{url}/_llmock/reset")).send().await.unwrap().error_for_status().unwrap();

    // At most 3 items per request: at least 40 calls, so that llmock's random 20 % draws a fault
    // on all but about one run in 7,000 (0.8^40).
    let fx = Fixture::new(120).await;
    fx.write_job(&format!("{url}/v1"), "", "items_per_request = { start = 2, min = 1, max = 3 }", "");
    let output = backfill_async(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--json", "--quiet"], &[("OPENAI_API_KEY", "sk-llmock")]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let summary: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(summary["items"]["done"], 120, "{summary}");

    let verdict: Value = http
        .get(format!("{url}/_llmock/verdict?format=json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = http.get(format!("{url}/_llmock/verdict?format=text")).send().await.unwrap().text().await.unwrap();
    assert!(verdict["faults_injected"].as_u64().unwrap_or(0) > 0, "llmock injected no fault: is it running with --error-rate 429=0.2?\n{text}");
    // The questions of what the server says of itself and whether it shows its gauges are
    // asked once each, on purpose: a server that answers them 429 is a rate-limited API, not
    // llama.cpp's, vLLM's or SGLang's, and has nothing to say there. That is the one finding
    // llmock may make (when its random 429 falls on one of those requests).
    let before_the_run = |request: &str| ["GET /metrics", "GET /props", "GET /v1/loads"].contains(&request.split('?').next().unwrap_or(""));
    let findings: Vec<&Value> = verdict["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| !(f["code"] == "gave_up" && before_the_run(f["path"].as_str().unwrap_or(""))))
        .collect();
    assert!(findings.is_empty(), "{text}");
    // Every 429 was counted by the run and every chat request is in the ledger; the three
    // other requests are the questions before the run of what the server says of itself
    // (`GET /props`) and of its gauges (`GET /metrics`, `GET /v1/loads`), which llmock does
    // not serve.
    let journal: Value = http.get(format!("{url}/_llmock/requests")).send().await.unwrap().json().await.unwrap();
    let requests = journal["requests"].as_array().unwrap();
    let chat = requests.iter().filter(|r| r["method"] == "POST" && r["path"].as_str().unwrap_or("").ends_with("/chat/completions")).count();
    let mut other: Vec<String> = requests
        .iter()
        .filter(|r| !(r["method"] == "POST" && r["path"].as_str().unwrap_or("").ends_with("/chat/completions")))
        .map(|r| format!("{} {}", r["method"].as_str().unwrap_or(""), r["path"].as_str().unwrap_or("").split('?').next().unwrap_or("")))
        .collect();
    other.sort();
    assert_eq!(other, ["GET /metrics", "GET /props", "GET /v1/loads"], "requests other than the API's\n{text}");
    assert_eq!(chat + other.len(), verdict["attempts"].as_u64().unwrap() as usize, "{text}");
    let ledger = fx.ledger_totals().await;
    assert_eq!(ledger.0 as usize, chat, "ledger calls vs llmock's chat requests\n{text}");
    assert!(summary["controller"]["rate_limited"].as_u64().unwrap() > 0, "{summary}");
}
