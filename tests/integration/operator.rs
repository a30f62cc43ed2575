//! The operator's commands through the binary: `failures` lists failed and rejected items with
//! their reasons and answers; `init` writes a job and prompt from a table (SQLite and
//! PostgreSQL) that passes the dry run; `batches` lists a run's provider batches and
//! `--cancel` cancels the unfinished ones at the provider.

use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

use crate::support::batch_fake::{BatchFake, Fate};
use crate::support::pg::PgFixture;
use crate::support::*;

fn json(output: &std::process::Output) -> Value {
    serde_json::from_str(&stdout(output)).unwrap_or_else(|e| panic!("{e}: {}{}", stdout(output), stderr(output)))
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_lists_failed_and_rejected_items_with_reasons_errors_and_answers() {
    let fx = Fixture::new(20).await;
    // The first request (items 1-10) is malformed: one attempt each, they fail. The rest answer,
    // and the rule below rejects every answer.
    let fake = FakeProvider::start(vec![Reply::Malformed], vec![], 71).await;
    fx.write_job(
        &fake.base_url(),
        "",
        "max_attempts = 1\nmax_failed_share = 1.0\nconcurrency = { start = 1, min = 1, max = 1 }",
        "[postprocess]\nmax_chars = 10",
    );
    let (output, summary) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!((summary["items"]["failed"].as_u64(), summary["items"]["rejected"].as_u64()), (Some(10), Some(10)), "{summary}");
    let job = fx.job.to_str().unwrap();

    let listed = backfill_async(fx.dir.path(), &["failures", job, "--json"], &[]).await;
    assert_eq!(listed.status.code(), Some(0), "{}", stderr(&listed));
    let listed = json(&listed);
    assert_eq!((listed["failed"].as_u64(), listed["rejected"].as_u64(), listed["shown"].as_u64()), (Some(10), Some(10), Some(20)), "{listed}");
    let items = listed["items"].as_array().unwrap();
    for item in items {
        assert_eq!(item["model"], "fake-model", "{item}");
        assert_eq!(item["attempts"], 1, "{item}");
        assert!(item["error"].as_str().is_some_and(|e| !e.is_empty()), "{item}");
        match item["state"].as_str().unwrap() {
            "failed" => {
                assert_eq!(item["reason"], "malformed", "{item}");
                assert!(item["answer"].is_null(), "a malformed answer keeps no per-item answer: {item}");
            }
            "rejected" => {
                assert_eq!(item["reason"], "too_long", "{item}");
                let id = item["item_id"].as_str().unwrap();
                let raw = item["answer"]["raw"].as_str().unwrap_or_default();
                assert!(raw.starts_with(&format!("Uitleg bij {id}:")), "the model's own answer: {item}");
                assert_eq!(item["answer"]["status"], "rejected", "{item}");
            }
            other => panic!("state {other}: {item}"),
        }
    }

    // For people: one block per item, the answer shown, and what was left out named.
    let text = backfill_async(fx.dir.path(), &["failures", job, "--limit", "3", "--state", "rejected"], &[]).await;
    assert_eq!(text.status.code(), Some(0), "{}", stderr(&text));
    let text = stdout(&text);
    assert!(text.contains("10 failed, 10 rejected"), "{text}");
    assert_eq!(text.matches("\nitem ").count(), 3, "{text}");
    assert!(text.contains("rejected (too_long), 1 attempt, model fake-model"), "{text}");
    assert!(text.contains("    Uitleg bij "), "{text}");
    assert!(text.contains("7 more not shown"), "{text}");

    // JSON lines for scripts, one per item.
    let lines = backfill_async(fx.dir.path(), &["failures", job, "--jsonl", "--state", "failed", "--run", &summary["run_id"].to_string()], &[]).await;
    assert_eq!(lines.status.code(), Some(0), "{}", stderr(&lines));
    let lines: Vec<Value> = stdout(&lines).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 10);
    assert!(lines.iter().all(|l| l["state"] == "failed"), "{lines:?}");

    // A run that does not exist, and a state that is not one, are usage errors.
    let missing = backfill_async(fx.dir.path(), &["failures", job, "--run", "99"], &[]).await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("has no run 99"), "{}", stderr(&missing));
    let bad = backfill_async(fx.dir.path(), &["failures", job, "--state", "done"], &[]).await;
    assert_eq!(bad.status.code(), Some(2));
}

/// `init` then `run --dry-run` with the key a hosted provider needs and the job's default model.
async fn init_then_dry_run(dir: &std::path::Path, database: &str, table: &str, job: &str) -> String {
    let init = backfill_async(dir, &["init", "--database", database, "--table", table, "--column", "summary", "--output", job], &[]).await;
    assert_eq!(init.status.code(), Some(0), "{}", stderr(&init));
    let text = std::fs::read_to_string(dir.join(job)).unwrap();
    let env = [("OPENAI_API_KEY", "sk-test"), ("BACKFILL_MODEL", ""), ("OPENAI_BASE_URL", "")];
    let dry = backfill_async(dir, &["run", job, "--dry-run"], &env).await;
    assert_eq!(dry.status.code(), Some(0), "the written job:\n{text}\n{}{}", stdout(&dry), stderr(&dry));
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn init_writes_a_job_and_prompt_from_a_sqlite_table_that_passes_the_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("notes.db");
    let pool = SqlitePool::connect_with(SqliteConnectOptions::new().filename(&db).create_if_missing(true)).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, title TEXT NOT NULL, body VARCHAR(500), stars INTEGER, summary TEXT); \
         INSERT INTO notes (id, title, body, stars) VALUES (1, 'One', 'The first note.', 3), (2, 'Two', 'The second.', 5);",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let text = init_then_dry_run(dir.path(), "sqlite://notes.db", "notes", "notes.toml").await;
    assert!(text.contains("columns = [\"title\", \"body\"]"), "{text}");
    assert!(text.contains("pending = \"summary IS NULL\""), "{text}");
    assert!(text.contains("${OPENAI_BASE_URL:-"), "{text}");
    assert!(text.contains("database = \"sqlite://notes.db\""), "relative to the job: {text}");
    assert!(text.contains("\n[postprocess]\n"), "{text}");
    let prompt = std::fs::read_to_string(dir.path().join("notes.prompt.md")).unwrap();
    assert!(prompt.contains("`title`, `body`") && prompt.contains("{{items}}"), "{prompt}");

    // Existing files are never overwritten, and nothing half is left behind.
    let again = backfill_async(dir.path(), &["init", "--database", "sqlite://notes.db", "--table", "notes", "--column", "summary", "--output", "notes.toml"], &[]).await;
    assert_eq!(again.status.code(), Some(2));
    assert!(stderr(&again).contains("exists already"), "{}", stderr(&again));
    assert_eq!(std::fs::read_to_string(dir.path().join("notes.toml")).unwrap(), text);

    // A wrong table names the tables there are; a wrong column names the columns.
    let wrong = backfill_async(dir.path(), &["init", "--database", "sqlite://notes.db", "--table", "note", "--column", "summary"], &[]).await;
    assert_eq!(wrong.status.code(), Some(2));
    assert!(stderr(&wrong).contains("it has tables: notes"), "{}", stderr(&wrong));
    let wrong = backfill_async(dir.path(), &["init", "--database", "sqlite://notes.db", "--table", "notes", "--column", "summry", "--output", "x.toml"], &[]).await;
    assert_eq!(wrong.status.code(), Some(2));
    assert!(stderr(&wrong).contains("title, body, stars, summary"), "{}", stderr(&wrong));
    assert!(!dir.path().join("x.toml").exists() && !dir.path().join("x.prompt.md").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn init_reads_a_postgres_table_from_the_catalogue() {
    let Some(fx) = PgFixture::new(module_path!(), 3).await else { return };
    let text = init_then_dry_run(fx.dir.path(), &fx.url, "items", "pg.toml").await;
    assert!(text.contains("id = \"id\""), "the primary key: {text}");
    assert!(text.contains("columns = [\"title\", \"body\"]"), "{text}");
    let wrong = backfill_async(fx.dir.path(), &["init", "--database", &fx.url, "--table", "itemz", "--column", "summary"], &[]).await;
    assert_eq!(wrong.status.code(), Some(2));
    assert!(stderr(&wrong).contains("items"), "{}", stderr(&wrong));
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_lists_a_runs_provider_batches_and_cancel_cancels_the_unfinished_ones() {
    let fx = Fixture::new(30).await;
    let fake = BatchFake::start().await;
    fake.script(vec![Fate::Stall]);
    fx.write_job(&fake.base_url(), "mode = \"batch\"\nbatch_poll_s = 0.05", "", "");
    let (output, summary) = run_json_with(&fx, &["--wait", "0"], &[]).await;
    assert_eq!(output.status.code(), Some(5), "{}", stderr(&output));
    assert_eq!(summary["status"], "waiting", "{summary}");
    let job = fx.job.to_str().unwrap();

    let listed = backfill_async(fx.dir.path(), &["batches", job, "--json"], &[]).await;
    assert_eq!(listed.status.code(), Some(0), "{}", stderr(&listed));
    let listed = json(&listed);
    assert_eq!(listed["batches"].as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed["batches"][0]["phase"], "submitted", "{listed}");
    let provider_id = listed["batches"][0]["provider_batch_id"].as_str().unwrap().to_owned();
    let text = stdout(&backfill_async(fx.dir.path(), &["batches", job], &[]).await);
    assert!(text.contains(&provider_id) && text.contains("submitted"), "{text}");

    let cancelled = backfill_async(fx.dir.path(), &["batches", job, "--cancel", "--json"], &[]).await;
    assert_eq!(cancelled.status.code(), Some(0), "{}", stderr(&cancelled));
    let cancelled = json(&cancelled);
    assert_eq!(cancelled["cancel"][0]["outcome"], "cancel_requested", "{cancelled}");
    assert!(fake.batches()[0].cancelled, "the provider was asked");
    // The outcome is recorded on the batch, as the provider reported it.
    let batch = &cancelled["batches"][0];
    assert_eq!(batch["provider_status"], "cancelled", "{cancelled}");
    assert!(batch["error"].as_str().unwrap_or_default().contains("backfill batches --cancel"), "{cancelled}");

    // The next resume collects what the provider finished and sends the rest again.
    let (output, summary) = run_json_with(&fx, &["--resume"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["done"], 30, "{summary}");
    let again = backfill_async(fx.dir.path(), &["batches", job, "--cancel"], &[]).await;
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(stderr(&again).contains("nothing to cancel"), "{}", stderr(&again));
}
