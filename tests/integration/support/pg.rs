//! A PostgreSQL fixture for runs of the real binary: a fresh schema holding the source table
//! `items(id, title, body, summary)` and (through the URL's search_path) the runner tables, a
//! job file pointing there, and helpers to read it back. The schema is dropped when the fixture
//! goes, also after a failed assertion.

use std::path::PathBuf;

use sqlx::postgres::PgPool;

use crate::conformance::harness::{postgres_or_skip, unique_schema, with_search_path};

pub struct PgFixture {
    pub dir: tempfile::TempDir,
    pub schema: String,
    /// The database URL the job uses (runner tables in `schema`).
    pub url: String,
    pub job: PathBuf,
    base: String,
    pub pool: PgPool,
}

impl PgFixture {
    /// `None` (after saying why) when PostgreSQL is unreachable outside CI.
    pub async fn new(test: &str, rows: usize) -> Option<PgFixture> {
        let base = postgres_or_skip(test)?;
        let schema = unique_schema("bf_e2e");
        let url = with_search_path(&base, &schema);
        let pool = PgPool::connect(&url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA {schema}; \
             CREATE TABLE {schema}.items (id BIGINT PRIMARY KEY, title TEXT NOT NULL, body TEXT, summary TEXT); \
             INSERT INTO {schema}.items (id, title, body) \
             SELECT i, format('Motie %s over \"zaken\" {{items}}', i), \
                    format(E'De Kamer, gehoord de beraadslaging, verzoekt de regering punt %s te regelen.\\nTweede regel.', i) \
             FROM generate_series(1, {rows}) AS i"
        )))
        .execute(&pool)
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("prompt.md"),
            "Explain each of these {{count}} motions in one sentence.\nAnswer with a JSON object keyed by id.\n{{items}}\n",
        )
        .unwrap();
        let job = dir.path().join("job.toml");
        Some(PgFixture { dir, schema, url, job, base, pool })
    }

    /// Writes the job: the same job as the SQLite fixture's, on `schema.items`.
    pub fn write_job(&self, base_url: &str, model_extra: &str, limits: &str) {
        let text = format!(
            r#"name = "pg-job"

[source]
database = "{url}"
table = "{schema}.items"
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
structured_output = "json_schema"
max_output_tokens_per_item = 60
request_timeout_s = 10
{model_extra}

[pricing.fake-model]
input = 0.15
output = 0.60
cached_input = 0.075

[limits]
max_attempts = 4
{limits}
"#,
            url = self.url,
            schema = self.schema,
        );
        std::fs::write(&self.job, text).unwrap();
    }

    pub async fn scalar(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&self.pool).await.unwrap()
    }

    /// Like `scalar`, but 0 while the runner tables are not there yet; other errors fail.
    pub async fn scalar_or_zero(&self, sql: &str) -> i64 {
        super::zero_while_missing(sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&self.pool).await)
    }

    /// `(id, title, body, summary)` of every row.
    pub async fn rows(&self) -> Vec<(i64, String, String, Option<String>)> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT id, title, body, summary FROM {}.items ORDER BY id", self.schema)))
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }
}

impl Drop for PgFixture {
    fn drop(&mut self) {
        // Off the test's runtime (it may be shutting down after a panic), on a runtime of its own.
        let (base, schema) = (self.base.clone(), self.schema.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let pool = PgPool::connect(&base).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))).execute(&pool).await?;
                pool.close().await;
                Ok::<_, sqlx::Error>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test schema {}: {dropped:?}", self.schema);
        }
    }
}
