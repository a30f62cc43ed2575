//! Test helpers: a fixture (temp dir, SQLite source table, job file), running the binary, and
//! the fake provider.

pub mod batch_fake;
pub mod fake;
pub mod hostile;
pub mod limited;
pub mod pg;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

pub use fake::{FakeProvider, Reply, expected_output};

/// A temp dir with a SQLite database holding `items(id, title, body, summary)`.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub job: PathBuf,
}

impl Fixture {
    pub async fn new(rows: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("source.db");
        let pool = SqlitePool::connect_with(SqliteConnectOptions::new().filename(&db).create_if_missing(true)).await.unwrap();
        sqlx::query("CREATE TABLE items (id INTEGER PRIMARY KEY, title TEXT NOT NULL, body TEXT, summary TEXT)")
            .execute(&pool)
            .await
            .unwrap();
        let mut tx = pool.begin().await.unwrap();
        for i in 1..=rows {
            sqlx::query("INSERT INTO items (id, title, body) VALUES (?, ?, ?)")
                .bind(i as i64)
                .bind(format!("Motie {i} over \"zaken\" {{items}}"))
                .bind(format!("De Kamer, gehoord de beraadslaging, verzoekt de regering punt {i} te regelen.\nTweede regel."))
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
        pool.close().await;
        std::fs::write(dir.path().join("prompt.md"), "Explain each of these {{count}} motions in one sentence.\nAnswer with a JSON object keyed by id.\n{{items}}\n").unwrap();
        let job = dir.path().join("job.toml");
        Fixture { dir, db, job }
    }

    /// Writes the job file: the standard job with `extra` TOML appended to the sections.
    pub fn write_job(&self, base_url: &str, model_extra: &str, limits_extra: &str, tail: &str) {
        let text = format!(
            r#"name = "test-job"

[source]
database = "sqlite://{db}"
table = "items"
id = "id"
columns = ["title", "body"]
pending = "summary IS NULL"

[target]
column = "summary"

[prompt]
template = "prompt.md"

[model]
base_url = "{base_url}"
name = "fake-model"
{structured}
max_output_tokens_per_item = 60
{timeout}
{model_extra}

[pricing.fake-model]
input = 0.15
output = 0.60
cached_input = 0.075
batch_input = 0.075
batch_output = 0.30

[limits]
{items}
{concurrency}
{attempts}
{limits_extra}
{tail}
"#,
            db = self.db.display(),
            items = if limits_extra.contains("items_per_request") { "" } else { "items_per_request = { start = 10, min = 1, max = 20 }" },
            timeout = if model_extra.contains("request_timeout_s") { "" } else { "request_timeout_s = 5" },
            structured = if model_extra.contains("structured_output") { "" } else { "structured_output = \"json_schema\"" },
            attempts = if limits_extra.contains("max_attempts") { "" } else { "max_attempts = 4" },
            concurrency = if limits_extra.contains("concurrency") { "" } else { "concurrency = { start = 4, min = 1, max = 8 }" },
        );
        std::fs::write(&self.job, text).unwrap();
    }

    pub async fn pool(&self) -> SqlitePool {
        SqlitePool::connect_with(SqliteConnectOptions::new().filename(&self.db)).await.unwrap()
    }

    /// `(id, title, body, summary)` of every row.
    pub async fn rows(&self) -> Vec<(i64, String, String, Option<String>)> {
        let pool = self.pool().await;
        let rows = sqlx::query_as("SELECT id, title, body, summary FROM items ORDER BY id").fetch_all(&pool).await.unwrap();
        pool.close().await;
        rows
    }

    pub async fn item_states(&self) -> Vec<(String, String, i64, Option<String>)> {
        let pool = self.pool().await;
        let rows = sqlx::query_as(
            "SELECT item_id, state, attempts, reason FROM backfill_items WHERE run_id = (SELECT MAX(id) FROM backfill_runs) ORDER BY CAST(item_id AS INTEGER)",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        rows
    }

    /// Sum over settled calls: (calls, prompt tokens, completion tokens, cost in picos).
    pub async fn ledger_totals(&self) -> (i64, i64, i64, i64) {
        let pool = self.pool().await;
        let row = sqlx::query_as(
            "SELECT COUNT(*), COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cost_picos), 0) \
             FROM backfill_calls WHERE state = 'settled'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        row
    }
}

/// The cache folder of a binary run from `dir` (a test's temporary folder): the local model's
/// probed pass size lands there, never in the user's cache.
pub fn test_cache(dir: &Path) -> PathBuf {
    dir.join("cache")
}

/// Runs the real binary with a clean provider environment and its cache in `dir`.
pub fn backfill(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_backfill"));
    command.current_dir(dir).args(args).env("BACKFILL_CACHE", test_cache(dir));
    for var in ["OPENAI_API_KEY", "OPENAI_BASE_URL", "RUST_LOG", "BACKFILL_DATABASE"] {
        command.env_remove(var);
    }
    command.env("NO_COLOR", "1");
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().expect("the backfill binary runs")
}

/// Waits (up to 30 s: the binary shares the machine with the other tests) until the fake
/// provider has received `calls` requests.
pub async fn until_requests(fake: &FakeProvider, calls: usize) {
    for _ in 0..1200 {
        if fake.records().len() >= calls {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the run never sent {calls} requests");
}

/// Runs the binary off the async runtime (the fake provider lives on it).
pub async fn backfill_async(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = dir.to_path_buf();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        backfill(&dir, &args, &env)
    })
    .await
    .unwrap()
}

/// `backfill run JOB --json --quiet EXTRA…` on the fixture's job: the output and the summary
/// (`null` when stdout holds none).
pub async fn run_json_with(fx: &Fixture, extra: &[&str], env: &[(&str, &str)]) -> (Output, serde_json::Value) {
    let job = fx.job.to_str().unwrap().to_owned();
    let mut args = vec!["run", job.as_str(), "--json", "--quiet"];
    args.extend_from_slice(extra);
    let output = backfill_async(fx.dir.path(), &args, env).await;
    let summary = serde_json::from_str(&stdout(&output)).unwrap_or(serde_json::Value::Null);
    (output, summary)
}

pub async fn run_json(fx: &Fixture, extra: &[&str]) -> (Output, serde_json::Value) {
    run_json_with(fx, extra, &[]).await
}

/// A count read while a run may not have created the runner tables yet: 0 while the table is
/// missing (SQLite "no such table", PostgreSQL 42P01); any other error fails the test.
pub fn zero_while_missing(result: Result<i64, sqlx::Error>) -> i64 {
    match result {
        Ok(n) => n,
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") || e.message().contains("no such table") => 0,
        Err(e) => panic!("the count failed: {e}"),
    }
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Exact cost in picos of `usage` at the fixture's prices (0.15 / 0.60 / 0.075 USD per M).
pub fn fixture_cost(prompt: i64, completion: i64, cached: i64) -> i64 {
    (prompt - cached) * 150_000 + cached * 75_000 + completion * 600_000
}

/// The ledger's tokens and cost equal the provider's usage × price, call for call.
pub async fn assert_ledger_matches(fx: &Fixture, fake: &FakeProvider) {
    let answered: Vec<(i64, i64, i64)> = fake.records().iter().filter_map(|r| r.usage).collect();
    let prompt: i64 = answered.iter().map(|u| u.0).sum();
    let completion: i64 = answered.iter().map(|u| u.1).sum();
    let cost: i64 = answered.iter().map(|&(p, c, k)| fixture_cost(p, c, k)).sum();
    let (_, ledger_prompt, ledger_completion, ledger_cost) = fx.ledger_totals().await;
    assert_eq!((ledger_prompt, ledger_completion), (prompt, completion), "ledger tokens differ from the provider's usage");
    assert_eq!(ledger_cost, cost, "ledger cost differs from usage × price");
}

/// Exact cost in picos of `usage` at the fixture's batch prices (0.075 / 0.30 USD per M).
pub fn fixture_batch_cost(prompt: i64, completion: i64, cached: i64) -> i64 {
    (prompt - cached) * 75_000 + cached * 75_000 + completion * 300_000
}
