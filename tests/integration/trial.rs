//! `backfill trial` through the binary: two models on one seeded sample, judged by the job's
//! own validation and post-processing, nothing written to the target column, every call in the
//! ledger under the job's trial run, costs and projections equal to tokens × prices, one HTML
//! page with every sampled row once per model — and a dry run calibrated by the trial that
//! predicts the real run.

use std::sync::{Arc, Mutex};

use backfill::tokens::TokenCounter;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::support::fake::items_in;
use crate::support::*;

/// Two models behind one endpoint, told apart by the request's `model`: `fake-nl` answers in
/// clean Dutch; `fake-mixed` adds a line of Arabic to even ids and writes odd ids half in
/// English. Usage is counted as the fixture's fake counts it (o200k_base).
struct TwoModels {
    server: MockServer,
    /// `(model, prompt tokens, completion tokens)` of every answer.
    usage: Arc<Mutex<Vec<(String, i64, i64)>>>,
}

struct Answers(Arc<Mutex<Vec<(String, i64, i64)>>>);

fn dutch(id: &str) -> String {
    format!("De motie {id} vraagt de regering om een plan voor mensen met een laag inkomen.")
}

fn mixed(id: &str) -> String {
    if id.parse::<u64>().unwrap_or(0) % 2 == 0 {
        format!("{}\nو في نفس الوقت أقول بأن الشيخ", dutch(id))
    } else {
        format!("The motion {id} asks the government om een plan for people with a low income.")
    }
}

impl Respond for Answers {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap();
        let model = body["model"].as_str().unwrap().to_owned();
        let messages = body["messages"].as_array().unwrap();
        let user = messages.last().unwrap()["content"].as_str().unwrap();
        let system = messages.first().filter(|m| m["role"] == "system").and_then(|m| m["content"].as_str());
        let answer: serde_json::Map<String, Value> = items_in(user)
            .into_iter()
            .map(|(id, _, _)| {
                let text = if model == "fake-nl" { dutch(&id) } else { mixed(&id) };
                (id, Value::String(text))
            })
            .collect();
        let content = Value::Object(answer).to_string();
        let counter = TokenCounter::new("o200k_base").unwrap();
        let (prompt, completion) = (counter.chat(system, user) as i64, counter.count(&content) as i64);
        self.0.lock().unwrap().push((model, prompt, completion));
        ResponseTemplate::new(200).set_body_json(json!({
            "id": "chatcmpl-two",
            "object": "chat.completion",
            "choices": [{ "index": 0, "message": { "role": "assistant", "content": content }, "finish_reason": "stop" }],
            "usage": { "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion }
        }))
    }
}

impl TwoModels {
    async fn start() -> TwoModels {
        tokio::task::spawn_blocking(|| TokenCounter::new("o200k_base").unwrap().count("warm")).await.unwrap();
        let server = MockServer::start().await;
        let usage = Arc::new(Mutex::new(Vec::new()));
        Mock::given(method("POST"))
            .and(path("/v1/chat/completions"))
            .respond_with(Answers(usage.clone()))
            .mount(&server)
            .await;
        TwoModels { server, usage }
    }

    fn base_url(&self) -> String {
        format!("{}/v1", self.server.uri())
    }
}

/// USD per million tokens of the two models: `(input, output, batch input, batch output)`.
const NL: (f64, f64) = (0.15, 0.60);
const MIXED: (f64, f64, f64, f64) = (0.10, 0.40, 0.05, 0.20);

const RULES: &str = r#"
[pricing.fake-nl]
input = 0.15
output = 0.60

[pricing.fake-mixed]
input = 0.10
output = 0.40
batch_input = 0.05
batch_output = 0.20

[postprocess]
script = "Latin"
language = "nl"
max_foreign_words = 2
min_chars = 20
"#;

async fn trial(fx: &Fixture, extra: &[&str]) -> (std::process::Output, Value) {
    let job = fx.job.to_str().unwrap().to_owned();
    let mut args = vec!["trial", job.as_str(), "--json"];
    args.extend_from_slice(extra);
    let output = backfill_async(fx.dir.path(), &args, &[]).await;
    let value = serde_json::from_str(&stdout(&output)).unwrap_or(Value::Null);
    (output, value)
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 + 1e-9 * b.abs()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_models_are_ranked_by_the_jobs_rules_and_nothing_is_written() {
    let fx = Fixture::new(80).await;
    let provider = TwoModels::start().await;
    fx.write_job(&provider.base_url(), "", "", RULES);
    let page = fx.dir.path().join("trial.html");
    let (output, trial) = trial(&fx, &["--models", "fake-mixed,fake-nl", "--sample", "20", "--seed", "3", "--html", page.to_str().unwrap()]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(trial["sampled_items"], 20, "{trial}");
    assert_eq!(trial["pending_items"], 80);

    // Ranked by the job's rules: clean Dutch first, though the mixed model is cheaper.
    let models = trial["models"].as_array().unwrap();
    assert_eq!(models[0]["model"], "fake-nl", "{trial}");
    assert_eq!((models[0]["rank"].as_u64(), models[1]["rank"].as_u64()), (Some(1), Some(2)));
    let (nl, mixed) = (&models[0], &models[1]);
    assert_eq!((nl["valid"].as_u64(), nl["rejected"].as_u64(), nl["edited"].as_u64()), (Some(20), Some(0), Some(0)), "{nl}");
    let (valid, rejected, edited) = (mixed["valid"].as_u64().unwrap(), mixed["rejected"].as_u64().unwrap(), mixed["edited"].as_u64().unwrap());
    assert_eq!(valid + rejected, 20, "{mixed}");
    assert!(rejected > 0 && edited > 0 && edited == valid, "{mixed}");
    assert_eq!(mixed["rejected_by_rule"]["foreign_words"].as_u64(), Some(rejected), "{mixed}");
    assert_eq!(mixed["edits_by_rule"]["script_dropped_line"].as_u64(), Some(edited), "{mixed}");
    for (model, sampled) in [(nl, 20), (mixed, 20)] {
        assert_eq!(model["malformed"].as_u64().unwrap() + model["missing"].as_u64().unwrap(), 0, "{model}");
        assert_eq!(model["items"], sampled);
    }

    // Nothing written to the target column; the trial's run holds no item.
    assert!(fx.rows().await.iter().all(|row| row.3.is_none()), "the trial wrote to the target column");
    let pool = fx.pool().await;
    let items: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM backfill_items").fetch_one(&pool).await.unwrap();
    assert_eq!(items, 0);
    // Every call is in the ledger, under the job's trial run, costed at usage × price.
    let ledger: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT r.job, c.model, c.prompt_tokens, c.completion_tokens, c.cost_picos FROM backfill_calls c \
         JOIN backfill_runs r ON r.id = c.run_id WHERE c.state = 'settled'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let sent = provider.usage.lock().unwrap().clone();
    assert_eq!(ledger.len(), sent.len());
    assert_eq!(ledger.len() as u64, 2 * trial["requests_per_model"].as_u64().unwrap());
    assert!(ledger.iter().all(|row| row.0 == "test-job:trial"), "{ledger:?}");
    for (model, report, (input, output)) in [("fake-nl", nl, NL), ("fake-mixed", mixed, (MIXED.0, MIXED.1))] {
        let calls: Vec<_> = ledger.iter().filter(|row| row.1 == model).collect();
        let (prompt, completion, picos): (i64, i64, i64) =
            calls.iter().fold((0, 0, 0), |acc, row| (acc.0 + row.2, acc.1 + row.3, acc.2 + row.4));
        let provider_prompt: i64 = sent.iter().filter(|u| u.0 == model).map(|u| u.1).sum();
        let provider_completion: i64 = sent.iter().filter(|u| u.0 == model).map(|u| u.2).sum();
        assert_eq!((prompt, completion), (provider_prompt, provider_completion), "{model}: ledger tokens differ from the provider's");
        let usd = prompt as f64 * input / 1e6 + completion as f64 * output / 1e6;
        assert!(close(picos as f64 / 1e12, usd), "{model}: ledger {picos} picos vs tokens × prices {usd}");
        assert!(close(report["cost_usd"].as_f64().unwrap(), usd), "{report}");
        assert!(close(report["input_tokens_per_item"].as_f64().unwrap(), prompt as f64 / 20.0), "{report}");
        assert!(close(report["output_tokens_per_item"].as_f64().unwrap(), completion as f64 / 20.0), "{report}");
        // The whole pending set: tokens per item × pending items, × prices.
        let projected = &report["projected"];
        let (p_in, p_out) = (projected["input_tokens"].as_f64().unwrap(), projected["output_tokens"].as_f64().unwrap());
        assert!((p_in - prompt as f64 / 20.0 * 80.0).abs() <= 0.5 && (p_out - completion as f64 / 20.0 * 80.0).abs() <= 0.5, "{projected}");
        assert!(close(projected["sync_cost_usd"].as_f64().unwrap(), p_in * input / 1e6 + p_out * output / 1e6), "{projected}");
        assert!(report["latency_p50_s"].as_f64().unwrap() <= report["latency_p95_s"].as_f64().unwrap());
    }
    let batch = mixed["projected"]["batch_cost_usd"].as_f64().unwrap();
    let (p_in, p_out) = (mixed["projected"]["input_tokens"].as_f64().unwrap(), mixed["projected"]["output_tokens"].as_f64().unwrap());
    assert!(close(batch, p_in * MIXED.2 / 1e6 + p_out * MIXED.3 / 1e6), "{mixed}");
    assert!(nl["projected"]["batch_cost_usd"].is_null(), "fake-nl has no batch prices");

    // One self-contained page: every sampled row once per model, no script, nothing fetched.
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    for forbidden in ["<script", "src=", "href=", "@import", "url("] {
        assert!(!html.contains(forbidden), "the page holds `{forbidden}`");
    }
    assert_eq!(html.matches("<section class=\"row\"").count(), 20);
    assert_eq!(html.matches("<article class=\"answer").count(), 40);
    for row in trial["rows"].as_array().unwrap() {
        let id = row["id"].as_str().unwrap();
        assert_eq!(html.matches(&format!("id=\"row-{id}\"")).count(), 1, "row {id}");
        for model in ["fake-nl", "fake-mixed"] {
            assert_eq!(html.matches(&format!("data-item=\"{id}\" data-model=\"{model}\"")).count(), 1, "row {id}, {model}");
        }
        assert_eq!(row["answers"][0]["final"].as_str(), Some(dutch(id).as_str()));
    }
    // Post-processing's edits are marked: the dropped Arabic line is shown struck out.
    assert!(html.contains("script_dropped_line (Arabic): <del>"), "no marked edit");

    // The trial is not a run of the job: `status` does not show it.
    let status = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap(), "--json"], &[]).await;
    assert!(!stdout(&status).contains("test-job:trial"), "{}", stdout(&status));

    // For people: the table on stdout, best first.
    let job = fx.job.to_str().unwrap();
    let table = backfill_async(fx.dir.path(), &["trial", job, "--models", "fake-mixed,fake-nl", "--sample", "20", "--seed", "3"], &[]).await;
    assert_eq!(table.status.code(), Some(0), "{}", stderr(&table));
    let text = stdout(&table);
    eprintln!("{text}");
    assert!(text.contains("best by the job's rules: fake-nl (20 of 20 answers valid)"), "{text}");
    assert!(text.contains("fake-mixed: rejected by rule: foreign_words"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_trial_stops_at_the_budget_cap() {
    let fx = Fixture::new(40).await;
    let provider = TwoModels::start().await;
    fx.write_job(&provider.base_url(), "", "", RULES);
    // One request reserves about 10 items × 60 output tokens at $0.60/M ≈ $0.0004.
    let (output, trial) = trial(&fx, &["--models", "fake-nl", "--sample", "20", "--max-usd", "0.0005"]).await;
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert!(trial["stopped"].as_str().unwrap().contains("budget cap"), "{trial}");
    assert!(trial["spent_usd"].as_f64().unwrap() <= 0.0005, "{trial}");
    assert!(trial["models"][0]["failed"].as_u64().unwrap() > 0, "{trial}");
}

fn relative_error(estimate: f64, actual: f64) -> f64 {
    (estimate - actual).abs() / actual
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_after_a_trial_predicts_the_real_run_within_10_percent() {
    let fx = Fixture::new(300).await;
    // The job expects 15 tokens per answer; the model writes 45.
    let fake = FakeProvider::start(vec![], vec![(1.0, Reply::Padded(45))], 9).await;
    fx.write_job(&fake.base_url(), "expected_output_tokens_per_item = 15", "", "");
    let job = fx.job.to_str().unwrap().to_owned();
    let dry = |extra: &'static [&'static str]| {
        let (fx, job) = (&fx, job.clone());
        async move {
            let mut args = vec!["run", job.as_str(), "--dry-run"];
            args.extend_from_slice(extra);
            let output = backfill_async(fx.dir.path(), &args, &[]).await;
            assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
            stdout(&output)
        }
    };
    let before: Value = serde_json::from_str(&dry(&["--json"]).await).unwrap();
    assert_eq!(before["calibrated"], false);
    let range = before["cost_range_usd"].as_array().unwrap();
    assert!(range[0].as_f64().unwrap() < range[1].as_f64().unwrap(), "{before}");
    let text = dry(&[]).await;
    assert!(text.contains("not measured yet") && text.contains("backfill trial"), "{text}");

    let (output, trial) = trial(&fx, &["--sample", "20"]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(trial["models"][0]["valid"], 20, "{trial}");

    let after: Value = serde_json::from_str(&dry(&["--json"]).await).unwrap();
    assert_eq!(after["calibrated"], true, "{after}");
    assert_eq!(after["calibration"]["source"], "trial", "{after}");
    assert_eq!(after["pending_items"], 300, "the trial wrote nothing");
    assert!(after["cost_range_usd"].is_null());
    assert!(after["measured_seconds"].as_f64().is_some(), "{after}");

    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 300);
    let actual = summary["cost_usd"].as_f64().unwrap();
    let predicted = after["estimated_cost_usd"].as_f64().unwrap();
    let naive = before["estimated_cost_usd"].as_f64().unwrap();
    eprintln!(
        "after a 20-item trial: ${predicted:.6} vs real ${actual:.6} ({:.2}% off); before it: ${naive:.6} ({:.1}% off)",
        relative_error(predicted, actual) * 100.0,
        relative_error(naive, actual) * 100.0
    );
    assert!(relative_error(predicted, actual) < 0.10, "the dry run after the trial said ${predicted:.6}, the run cost ${actual:.6}");
    assert!(relative_error(naive, actual) > 0.10, "the answers were not long enough to need calibration");
}

/// The real llama.cpp server (SmolLM2-135M) as the model on trial, on real motions: every
/// sampled row gets a verdict, the ledger holds the calls under the trial run, and the motions
/// table is untouched. The tiny model's Dutch is poor, so the test checks the accounting, not
/// the ranking.
#[tokio::test(flavor = "multi_thread")]
async fn a_trial_of_the_real_llama_server_judges_every_sampled_row_and_writes_nothing() {
    let Some(url) = crate::llama::llama_url() else { return };
    let _server = crate::llama::SERVER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let db = crate::llama::motions_db(dir.path()).await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await.unwrap();
    sqlx::query("DELETE FROM motions WHERE id NOT IN (SELECT id FROM motions ORDER BY length(text) LIMIT 40)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let tail = "[limits]\nitems_per_request = { start = 2, min = 1, max = 2 }\nconcurrency = { start = 2, min = 1, max = 2 }\n\
                [postprocess]\nscript = \"Latin\"\nmin_chars = 10\n";
    let job = crate::llama::motions_job(dir.path(), &db, &url, "llama-trial", tail);
    let page = dir.path().join("trial.html");
    let output = backfill_async(
        dir.path(),
        &["trial", job.to_str().unwrap(), "--sample", "6", "--seed", "2", "--json", "--html", page.to_str().unwrap()],
        &[],
    )
    .await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let trial: Value = serde_json::from_str(&stdout(&output)).unwrap();
    let model = &trial["models"][0];
    let verdicts: u64 = ["valid", "malformed", "missing", "rejected", "failed"].iter().map(|k| model[*k].as_u64().unwrap()).sum();
    assert_eq!(verdicts, 6, "{model}");
    assert_eq!(model["requests"], 3, "{model}");
    assert!(model["failed"].as_u64() == Some(0), "the server answered every request: {model}");
    assert!(model["latency_p50_s"].as_f64().is_some_and(|s| s > 0.0), "{model}");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await.unwrap();
    let written: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM motions WHERE explanation IS NOT NULL").fetch_one(&pool).await.unwrap();
    let calls: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM backfill_calls c JOIN backfill_runs r ON r.id = c.run_id WHERE r.job = 'llama-trial:trial' AND c.state = 'settled'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    assert_eq!((written, calls), (0, 3));
    let html = std::fs::read_to_string(&page).unwrap();
    assert_eq!(html.matches("<article class=\"answer").count(), 6);
}
