//! End to end against the real llama.cpp server of PEERS.md (SmolLM2-135M): the request carries
//! a schema forcing exactly the batch's ids, and every item of a small run of real motions gets
//! an output. The tiny model writes poor Dutch, so the test checks structure, not content.
//! `scripts/test.sh` starts the server and sets BACKFILL_LLAMA_URL.

use crate::support::*;

fn llama_url() -> Option<String> {
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

#[tokio::test(flavor = "multi_thread")]
async fn every_item_of_a_small_run_gets_an_output_from_a_real_llama_server() {
    let Some(url) = llama_url() else { return };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("motions.db");
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/motions_sample.jsonl");
    let status = std::process::Command::new("python3")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make-motions-db.py"))
        .arg(&sample)
        .arg(&db)
        .status()
        .unwrap();
    assert!(status.success());
    // Keep four short motions: the model's context is 4096 tokens.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display())).await.unwrap();
    sqlx::query("DELETE FROM motions WHERE id NOT IN (SELECT id FROM motions ORDER BY length(text) LIMIT 4)")
        .execute(&pool)
        .await
        .unwrap();
    std::fs::write(dir.path().join("prompt.md"), "Leg elke motie uit in één zin. Antwoord met een JSON-object met de id's als sleutels.\n{{items}}\n").unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"name = "llama-e2e"
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
request_timeout_s = 600
context_window = 4096
[pricing.smollm2-135m]
input = 0.0
output = 0.0
[limits]
items_per_request = {{ start = 2, min = 1, max = 2 }}
concurrency = {{ start = 1, min = 1, max = 1 }}
max_attempts = 6
"#,
            db = db.display()
        ),
    )
    .unwrap();
    let output = backfill_async(dir.path(), &["run", job.to_str().unwrap(), "--json", "--quiet"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(summary["items"]["total"], 4);
    assert_eq!(summary["items"]["done"], 4, "{summary}");
    let rows: Vec<(String, Option<String>)> = sqlx::query_as("SELECT id, explanation FROM motions").fetch_all(&pool).await.unwrap();
    assert_eq!(rows.len(), 4);
    for (id, explanation) in rows {
        let text = explanation.unwrap_or_default();
        assert!(!text.trim().is_empty(), "motion {id} has no explanation");
    }
    // The ledger holds the server's own token counts.
    let (calls, prompt): (i64, i64) = sqlx::query_as("SELECT COUNT(*), SUM(prompt_tokens) FROM backfill_calls WHERE outcome IN ('ok', 'truncated')")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(calls >= 2 && prompt > 50, "{calls} calls, {prompt} prompt tokens");
}
