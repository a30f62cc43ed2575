//! One database per test: a SQLite file in a temp dir, or a fresh PostgreSQL schema on
//! 127.0.0.1:5432 (its runner tables go there through the URL's search_path), dropped when the
//! test ends, whether it passed or not. PostgreSQL tests say they were skipped when the server
//! is unreachable, and fail instead under `CI=true`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backfill::ident::Ident;
use backfill::secret::DatabaseUrl;
use backfill::store::{Store, Tables};
use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

/// The server the PostgreSQL tests use, unless `BACKFILL_TEST_POSTGRES` names another.
pub const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/test";

pub type Body = fn(Arc<Db>) -> Pin<Box<dyn Future<Output = ()> + Send>>;

/// How the source table's ids are typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ids {
    Integer,
    Text,
    /// PostgreSQL only.
    Uuid,
}

impl Ids {
    pub fn id(self, i: usize) -> String {
        match self {
            Ids::Integer => i.to_string(),
            Ids::Text => format!("item-{i:03}"),
            Ids::Uuid => format!("00000000-0000-4000-8000-{i:012}"),
        }
    }
}

enum Admin {
    Sqlite(SqlitePool),
    Postgres { pool: PgPool, schema: String },
}

/// A test's database: the store under test and a raw connection to set up and check tables.
pub struct Db {
    pub backend: &'static str,
    pub url: DatabaseUrl,
    pub store: Arc<dyn Store>,
    admin: Admin,
    _dir: Option<tempfile::TempDir>,
}

pub fn postgres_base() -> String {
    std::env::var("BACKFILL_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_POSTGRES.into())
}

/// Whether PostgreSQL answers; `None` (after saying so) when the test should be skipped.
pub fn postgres_or_skip(test: &str) -> Option<String> {
    let base = postgres_base();
    let options: sqlx::postgres::PgConnectOptions = base.parse().expect("BACKFILL_TEST_POSTGRES is a PostgreSQL URL");
    let address = format!("{}:{}", options.get_host(), options.get_port());
    let reachable = std::net::ToSocketAddrs::to_socket_addrs(&address)
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok());
    if reachable {
        return Some(base);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: PostgreSQL not reachable at {address}, and CI=true requires the PostgreSQL tests to run");
    }
    eprintln!("{test}: skipped: PostgreSQL not reachable at {address} (start it, or set BACKFILL_TEST_POSTGRES)");
    None
}

/// A schema name no other test (or test process) uses.
pub fn unique_schema(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}_{}_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed), fastrand::u32(..100_000))
}

/// A URL whose connections put `schema` first on the search_path.
pub fn with_search_path(base: &str, schema: &str) -> String {
    let separator = if base.contains('?') { '&' } else { '?' };
    format!("{base}{separator}options=-c%20search_path%3D{schema}")
}

impl Db {
    pub async fn sqlite() -> Db {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conformance.db");
        let admin = SqlitePool::connect_with(SqliteConnectOptions::new().filename(&path).create_if_missing(true)).await.unwrap();
        let url = DatabaseUrl::new(format!("sqlite://{}", path.display()));
        let store = backfill::store::open(&url).await.unwrap();
        Db { backend: "sqlite", url, store, admin: Admin::Sqlite(admin), _dir: Some(dir) }
    }

    pub async fn postgres(base: &str) -> Db {
        let schema = unique_schema("bf_conf");
        let pool = PgPool::connect(&with_search_path(base, &schema)).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&pool).await.unwrap();
        let url = DatabaseUrl::new(with_search_path(base, &schema));
        let store = backfill::store::open(&url).await.unwrap();
        Db { backend: "postgres", url, store, admin: Admin::Postgres { pool, schema }, _dir: None }
    }

    pub fn is_postgres(&self) -> bool {
        self.backend == "postgres"
    }

    /// Another store on the same database, as a second process would open it.
    pub async fn another_store(&self) -> Arc<dyn Store> {
        backfill::store::open(&self.url).await.unwrap()
    }

    /// Runs SQL (no parameters) on the test database.
    pub async fn exec(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.admin {
            Admin::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
            Admin::Postgres { pool, .. } => sqlx::raw_sql(sql).execute(pool).await.map(|_| ()),
        }
        .unwrap_or_else(|e| panic!("{}: {e}", self.backend));
    }

    pub async fn count(&self, sql: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.admin {
            Admin::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            Admin::Postgres { pool, .. } => sqlx::query_scalar(sql).fetch_one(pool).await,
        }
        .unwrap_or_else(|e| panic!("{}: {e}", self.backend))
    }

    /// A text value (the first column of the first row).
    pub async fn text(&self, sql: &str) -> Option<String> {
        let sql = sqlx::AssertSqlSafe(sql.to_owned());
        match &self.admin {
            Admin::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await,
            Admin::Postgres { pool, .. } => sqlx::query_scalar(sql).fetch_one(pool).await,
        }
        .unwrap_or_else(|e| panic!("{}: {e}", self.backend))
    }

    /// Creates `table(id, title, body, summary, topic, score, embedding)` with `rows` rows.
    pub async fn source_table(&self, table: &str, ids: Ids, rows: usize) {
        let pg = self.is_postgres();
        let id_type = match (ids, pg) {
            (Ids::Integer, false) => "INTEGER",
            (Ids::Integer, true) => "BIGINT",
            (Ids::Text, _) => "TEXT",
            // SQLite takes any declared type: `UUID` (numeric affinity), as ORMs declare it, with
            // the uuids stored as text.
            (Ids::Uuid, _) => "UUID",
        };
        let (real, blob) = if pg { ("DOUBLE PRECISION", "BYTEA") } else { ("REAL", "BLOB") };
        self.exec(&format!(
            "CREATE TABLE {table} (id {id_type} PRIMARY KEY, title TEXT NOT NULL, body TEXT, summary TEXT, \
             topic TEXT, score {real}, embedding {blob})"
        ))
        .await;
        let mut values = Vec::new();
        for i in 1..=rows {
            let id = match ids {
                Ids::Integer => ids.id(i),
                _ => format!("'{}'", ids.id(i)),
            };
            values.push(format!("({id}, 'Motie {i}', 'Tekst van motie {i}')"));
        }
        if !values.is_empty() {
            self.exec(&format!("INSERT INTO {table} (id, title, body) VALUES {}", values.join(", "))).await;
        }
    }

    async fn drop_everything(&self) {
        if let Admin::Postgres { pool, schema } = &self.admin {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))).execute(pool).await;
            pool.close().await;
        }
    }
}

/// The job tables of the standard test table: summary as the single text output.
pub fn tables(table: &str) -> Tables {
    Tables {
        table: Ident::table(table).unwrap(),
        id: Ident::column("id").unwrap(),
        columns: vec![Ident::column("title").unwrap(), Ident::column("body").unwrap()],
        pending: "summary IS NULL".into(),
        outputs: vec![(String::new(), Ident::column("summary").unwrap())],
        overwrite: false,
    }
}

/// Runs a body against `db`, then drops the database even when the body panicked.
async fn run_on(db: Db, body: Body) {
    let db = Arc::new(db);
    let outcome = tokio::spawn(body(db.clone())).await;
    db.drop_everything().await;
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("{}: the test body was cancelled: {e}", db.backend),
        }
    }
}

pub async fn run_sqlite(body: Body) {
    run_on(Db::sqlite().await, body).await;
}

pub async fn run_postgres(test: &str, body: Body) {
    let Some(base) = postgres_or_skip(test) else { return };
    run_on(Db::postgres(&base).await, body).await;
}
