//! Local-model jobs (`[model] kind = "onnx"`) through the real binary: the tiny models of
//! crates/onnx/tests/fixtures on SQLite (JSON and f32le embeddings, labels, `kill -9` and
//! `--resume`, a broken model, the dry run), all-MiniLM-L6-v2 on 200 real motions against
//! onnxruntime, and a PostgreSQL run writing bytea.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use backfill_onnx::pooling::cosine_similarity;
use backfill_onnx::{OnnxConfig, OnnxProcessor, Output, embedding_from_f32le};
use sqlx::Row;

use crate::support::pg::PgFixture;
use crate::support::*;

fn fixture_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/onnx/tests/fixtures").join(name)
}

const LABELS: &str = r#"["links", "midden", "rechts"]"#;

/// The `[model]` table of a tiny-model job.
fn tiny_model(model: &str, extra: &str) -> String {
    format!(
        "[model]\nkind = \"onnx\"\npath = \"{}\"\ntokenizer = \"{}\"\ninput = \"{{{{title}}}}\\n{{{{body}}}}\"\nmax_length = 16\n\
         max_batch_tokens = 64\nthreads = 2\n{extra}\n",
        fixture_file(model).display(),
        fixture_file("tiny_tokenizer.json").display()
    )
}

/// The fixture's table with the local models' output columns added.
async fn local_fixture(rows: usize) -> Fixture {
    let fx = Fixture::new(rows).await;
    let pool = fx.pool().await;
    for column in ["embedding TEXT", "vector BLOB", "label TEXT", "probability REAL"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("ALTER TABLE items ADD COLUMN {column}"))).execute(&pool).await.unwrap();
    }
    pool.close().await;
    fx
}

fn write_job(fx: &Fixture, target: &str, pending: &str, model: &str, limits: &str) {
    let text = format!(
        "name = \"local-job\"\n\n[source]\ndatabase = \"sqlite://{}\"\ntable = \"items\"\nid = \"id\"\ncolumns = [\"title\", \"body\"]\n\
         pending = \"{pending}\"\n\n[target]\n{target}\n\n{model}\n[limits]\n{limits}\n",
        fx.db.display()
    );
    std::fs::write(&fx.job, text).unwrap();
}

/// What the processor gives for the fixture's row `i`, in this process.
fn expected_outputs(config: OnnxConfig, rows: usize) -> Vec<Output> {
    let processor = OnnxProcessor::load(&config).unwrap();
    let texts: Vec<String> = (1..=rows)
        .map(|i| {
            format!(
                "Motie {i} over \"zaken\" {{items}}\nDe Kamer, gehoord de beraadslaging, verzoekt de regering punt {i} te regelen.\nTweede regel."
            )
        })
        .collect();
    processor.process(&texts).unwrap()
}

fn tiny_config(model: &str) -> OnnxConfig {
    let mut config = if model.contains("classifier") {
        OnnxConfig::classification(fixture_file(model), fixture_file("tiny_tokenizer.json"), vec!["links".into(), "midden".into(), "rechts".into()])
    } else {
        OnnxConfig::embedding(fixture_file(model), fixture_file("tiny_tokenizer.json"))
    };
    config.max_length = 16;
    config.max_batch_tokens = 64;
    config.threads = 1;
    config
}

/// The stored embedding is the processor's for the row (batches of other shapes may round the
/// last bits differently).
fn assert_same_embedding(stored: &[f32], expected: &Output, id: i64) {
    let expected = expected.as_embedding().unwrap();
    assert_eq!(stored.len(), expected.len(), "row {id}");
    assert!(cosine_similarity(stored, expected) > 0.999_99, "row {id}: {stored:?} vs {expected:?}");
}

fn run_json(fx: &Fixture, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["run", fx.job.to_str().unwrap(), "--json", "--quiet"];
    args.extend_from_slice(extra);
    let output = backfill(fx.dir.path(), &args, &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    serde_json::from_str(&stdout(&output)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn local_embeddings_as_json_and_f32le_fill_every_row() {
    let rows = 45;
    let fx = local_fixture(rows).await;
    let expected = expected_outputs(tiny_config("tiny_embedder.onnx"), rows);

    write_job(&fx, "column = \"embedding\"\nformat = \"json\"", "embedding IS NULL", &tiny_model("tiny_embedder.onnx", ""), "items_per_request = { start = 8, min = 1, max = 8 }");
    let summary = run_json(&fx, &[]);
    assert_eq!(summary["status"], "finished", "{summary}");
    assert_eq!(summary["items"]["done"], rows, "{summary}");
    assert_eq!(summary["requests"], 6, "45 items in batches of 8: {summary}");
    assert_eq!(summary["cost_usd"], 0.0);
    assert!(summary["tokens"]["input"].as_u64().unwrap() > 0, "{summary}");
    assert!(summary["compute_seconds"].as_f64().is_some(), "{summary}");

    write_job(&fx, "column = \"vector\"\nformat = \"f32le\"", "vector IS NULL", &tiny_model("tiny_embedder.onnx", ""), "");
    let output = backfill(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--quiet"], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    let pool = fx.pool().await;
    let stored = sqlx::query("SELECT id, embedding, vector FROM items ORDER BY id").fetch_all(&pool).await.unwrap();
    pool.close().await;
    assert_eq!(stored.len(), rows);
    for (row, expected) in stored.iter().zip(&expected) {
        let id: i64 = row.get(0);
        let json: Vec<f32> = serde_json::from_str(&row.get::<String, _>(1)).unwrap();
        let blob: Vec<u8> = row.get(2);
        assert_eq!(blob.len(), 8 * 4, "row {id}: 8 float32");
        assert_same_embedding(&embedding_from_f32le(&blob).unwrap(), expected, id);
        assert_same_embedding(&json, expected, id);
    }

    // status and report read the ledger of a local run.
    let status = backfill(fx.dir.path(), &["status", fx.job.to_str().unwrap(), "--json"], &[]);
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let report = backfill(fx.dir.path(), &["report", fx.job.to_str().unwrap()], &[]);
    assert_eq!(report.status.code(), Some(0), "{}", stderr(&report));
    assert!(stdout(&report).contains("fixtures/tiny_embedder.onnx"), "{}", stdout(&report));
}

#[tokio::test(flavor = "multi_thread")]
async fn local_classification_writes_labels_and_probabilities() {
    let rows = 30;
    let fx = local_fixture(rows).await;
    let expected = expected_outputs(tiny_config("tiny_classifier.onnx"), rows);
    let model = tiny_model("tiny_classifier.onnx", &format!("output = \"classification\"\nlabels = {LABELS}"));
    write_job(&fx, "columns = { label = \"label\", probability = \"probability\" }", "label IS NULL", &model, "");
    let summary = run_json(&fx, &[]);
    assert_eq!(summary["items"]["done"], rows, "{summary}");
    let pool = fx.pool().await;
    let stored: Vec<(i64, String, f64)> = sqlx::query_as("SELECT id, label, probability FROM items ORDER BY id").fetch_all(&pool).await.unwrap();
    pool.close().await;
    for ((id, label, probability), expected) in stored.iter().zip(&expected) {
        let Output::Classification { label: want, probability: p } = expected else { panic!() };
        assert_eq!(label, want, "row {id}");
        assert!((probability - f64::from(*p)).abs() < 1e-6, "row {id}: {probability} vs {p}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn local_kill_nine_midway_then_resume_loses_nothing_and_writes_nothing_twice() {
    let rows = 300;
    let fx = local_fixture(rows).await;
    let expected = expected_outputs(tiny_config("tiny_embedder.onnx"), rows);
    write_job(&fx, "column = \"vector\"\nformat = \"f32le\"", "vector IS NULL", &tiny_model("tiny_embedder.onnx", ""), "items_per_request = { start = 10, min = 1, max = 10 }");
    // Each batch's write pauses inside its transaction, so the kill lands midway, often there.
    let mut child = Command::new(env!("CARGO_BIN_EXE_backfill"))
        .current_dir(fx.dir.path())
        .args(["run", fx.job.to_str().unwrap(), "--quiet"])
        .env("BACKFILL_FAILPOINT_PAUSE_MS", "write_batch:80")
        .env("NO_COLOR", "1")
        .env("BACKFILL_CACHE", test_cache(fx.dir.path()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pool = fx.pool().await;
    let mut done_at_kill = 0;
    for _ in 0..400 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        done_at_kill = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM items WHERE vector IS NOT NULL").fetch_one(&pool).await.unwrap();
        if done_at_kill >= 60 {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(done_at_kill > 0 && (done_at_kill as usize) < rows, "killed with {done_at_kill} of {rows} written");

    let plain = backfill(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--quiet"], &[]);
    assert_eq!(plain.status.code(), Some(2), "an unfinished run needs --resume: {}", stderr(&plain));
    let summary = run_json(&fx, &["--resume"]);
    assert_eq!(summary["status"], "finished", "{summary}");
    assert_eq!(summary["items"]["done"], rows, "{summary}");

    let runs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM backfill_runs").fetch_one(&pool).await.unwrap();
    assert_eq!(runs, 1);
    // Every item was written by exactly one settled batch.
    let written: i64 = sqlx::query_scalar("SELECT COALESCE(SUM(items_ok), 0) FROM backfill_calls WHERE state = 'settled'").fetch_one(&pool).await.unwrap();
    assert_eq!(written as usize, rows, "items written by settled batches");
    let done_by_one: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM backfill_items WHERE state = 'done'").fetch_one(&pool).await.unwrap();
    assert_eq!(done_by_one as usize, rows);
    let stored: Vec<(i64, Vec<u8>)> = sqlx::query_as("SELECT id, vector FROM items ORDER BY id").fetch_all(&pool).await.unwrap();
    pool.close().await;
    for ((id, blob), expected) in stored.iter().zip(&expected) {
        assert_same_embedding(&embedding_from_f32le(blob).unwrap(), expected, *id);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn local_broken_model_exits_2_naming_the_file() {
    let fx = local_fixture(5).await;
    let missing = tiny_model("tiny_embedder.onnx", "").replace("tiny_embedder.onnx", "no_such_model.onnx");
    write_job(&fx, "column = \"embedding\"", "embedding IS NULL", &missing, "");
    let output = backfill(fx.dir.path(), &["run", fx.job.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("`model.path`") && stderr(&output).contains("no_such_model.onnx"), "{}", stderr(&output));

    let garbage = fx.dir.path().join("broken.onnx");
    std::fs::write(&garbage, "version https://git-lfs.github.com/spec/v1\n").unwrap();
    let broken = tiny_model("tiny_embedder.onnx", "").replace(&fixture_file("tiny_embedder.onnx").display().to_string(), &garbage.display().to_string());
    write_job(&fx, "column = \"embedding\"", "embedding IS NULL", &broken, "");
    let output = backfill(fx.dir.path(), &["run", fx.job.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let message = stderr(&output);
    assert!(message.contains("broken.onnx") && message.contains("could not be loaded as ONNX"), "{message}");
    // Nothing was started: the model is checked before the database.
    let pool = fx.pool().await;
    let runs: Result<i64, _> = sqlx::query_scalar("SELECT COUNT(*) FROM backfill_runs").fetch_one(&pool).await;
    pool.close().await;
    assert!(runs.is_err() || runs.unwrap() == 0);
}

/// `model.precision = "f32"` keeps every product in f32: the stored embeddings are the f32
/// processor's; a value that is neither "auto" nor "f32" is a usage error naming the key.
#[tokio::test(flavor = "multi_thread")]
async fn local_precision_f32_runs_in_f32_and_a_wrong_value_is_named() {
    let rows = 12;
    let fx = local_fixture(rows).await;
    let mut f32_config = tiny_config("tiny_embedder.onnx");
    f32_config.bf16_products = false;
    let expected = expected_outputs(f32_config, rows);
    let model = tiny_model("tiny_embedder.onnx", "precision = \"f32\"");
    write_job(&fx, "column = \"embedding\"\nformat = \"json\"", "embedding IS NULL", &model, "");
    let summary = run_json(&fx, &[]);
    assert_eq!(summary["items"]["done"], rows, "{summary}");
    let pool = fx.pool().await;
    let stored = sqlx::query("SELECT id, embedding FROM items ORDER BY id").fetch_all(&pool).await.unwrap();
    pool.close().await;
    for (row, expected) in stored.iter().zip(&expected) {
        let json: Vec<f32> = serde_json::from_str(&row.get::<String, _>(1)).unwrap();
        assert_same_embedding(&json, expected, row.get(0));
    }

    let wrong = tiny_model("tiny_embedder.onnx", "precision = \"fp16\"");
    write_job(&fx, "column = \"vector\"\nformat = \"f32le\"", "vector IS NULL", &wrong, "");
    let output = backfill(fx.dir.path(), &["run", fx.job.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("`model.precision`") && stderr(&output).contains("\"f32\""), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread")]
async fn local_dry_run_counts_batches_and_tokens_and_writes_nothing() {
    let fx = local_fixture(25).await;
    write_job(&fx, "column = \"embedding\"", "embedding IS NULL", &tiny_model("tiny_embedder.onnx", ""), "items_per_request = { start = 10, min = 1, max = 10 }");
    let output = backfill(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--dry-run", "--json"], &[]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let estimate: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(estimate["pending_items"], 25);
    assert_eq!(estimate["batches"], 3);
    assert_eq!(estimate["estimated_cost_usd"], 0.0);
    assert!(estimate["input_tokens"].as_u64().unwrap() >= 25 * 3, "{estimate}");
    assert!(estimate["estimated_seconds"].as_f64().is_some(), "{estimate}");
    let pool = fx.pool().await;
    let written: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE embedding IS NOT NULL").fetch_one(&pool).await.unwrap();
    pool.close().await;
    assert_eq!(written, 0);
}

/// A prerequisite of the MiniLM test, or why it is missing (skipped; failed under CI=true).
fn prerequisite(var: &str, fix: &str) -> Option<PathBuf> {
    let found = std::env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from).filter(|p| p.exists());
    if found.is_none() {
        let message = format!("{var} is not set or missing: {fix}");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{message} (CI=true: this test must run)");
        }
        eprintln!("SKIPPED local MiniLM test: {message}");
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn local_minilm_on_200_motions_matches_onnxruntime() {
    let fetch = "run `eval \"$(scripts/fetch-models.sh)\"` (or scripts/test.sh)";
    let (Some(model), Some(tokenizer), Some(python)) = (
        prerequisite("BACKFILL_MINILM_MODEL", fetch),
        prerequisite("BACKFILL_MINILM_TOKENIZER", fetch),
        prerequisite("BACKFILL_PY", "run `eval \"$(scripts/onnx/setup-venv.sh)\"` (or scripts/test.sh)"),
    ) else {
        return;
    };
    // Not beside the llama.cpp tests: this one keeps both cores busy, and they measure their
    // calls against the server's own time per call, which a shared machine would skew.
    let _server = crate::llama::SERVER.lock().await;
    let motions = std::env::var_os("BACKFILL_MOTIONS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/motions/tk_moties_fulltext.jsonl"));
    let motions: Vec<serde_json::Value> =
        std::fs::read_to_string(&motions).unwrap().lines().take(200).map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(motions.len(), 200);

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("motions.db");
    let pool = sqlx::sqlite::SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(&db).create_if_missing(true)).await.unwrap();
    sqlx::query("CREATE TABLE motions (id TEXT PRIMARY KEY, title TEXT NOT NULL, text TEXT NOT NULL, embedding TEXT)").execute(&pool).await.unwrap();
    let mut texts = Vec::new();
    for m in &motions {
        let (id, title, text) = (m["id"].as_str().unwrap(), m["title"].as_str().unwrap(), m["text"].as_str().unwrap());
        sqlx::query("INSERT INTO motions (id, title, text) VALUES (?, ?, ?)").bind(id).bind(title).bind(text).execute(&pool).await.unwrap();
        texts.push((id.to_owned(), format!("{title}\n{text}")));
    }
    let job = dir.path().join("embed.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"minilm\"\n[source]\ndatabase = \"sqlite://{}\"\ntable = \"motions\"\nid = \"id\"\ncolumns = [\"title\", \"text\"]\n\
             pending = \"embedding IS NULL\"\n[target]\ncolumn = \"embedding\"\nformat = \"json\"\n[model]\nkind = \"onnx\"\npath = \"{}\"\n\
             tokenizer = \"{}\"\ninput = \"{{{{title}}}}\\n{{{{text}}}}\"\nmax_length = 256\n[limits]\nitems_per_request = {{ start = 50, min = 1, max = 50 }}\n",
            db.display(),
            model.display(),
            tokenizer.display()
        ),
    )
    .unwrap();
    let output = backfill_async(dir.path(), &["run", job.to_str().unwrap(), "--quiet", "--json"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));

    // onnxruntime's embeddings of the same texts, one at a time, unpadded.
    let input = dir.path().join("texts.jsonl");
    let lines: Vec<String> = texts.iter().map(|(_, t)| serde_json::json!({ "text": t }).to_string()).collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let reference = dir.path().join("reference.jsonl");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/onnx/reference_embeddings.py");
    let status = Command::new(&python)
        .arg(script)
        .args(["embed", "--model"])
        .arg(&model)
        .arg("--tokenizer")
        .arg(&tokenizer)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&reference)
        .args(["--max-length", "256"])
        .status()
        .unwrap();
    assert!(status.success(), "reference_embeddings.py failed");
    let reference: Vec<Vec<f32>> = std::fs::read_to_string(&reference)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect())
        .collect();

    let mut worst = 1.0f32;
    for ((id, _), want) in texts.iter().zip(&reference) {
        let stored: String = sqlx::query_scalar("SELECT embedding FROM motions WHERE id = ?").bind(id).fetch_one(&pool).await.unwrap();
        let got: Vec<f32> = serde_json::from_str(&stored).unwrap();
        assert_eq!(got.len(), 384, "motion {id}");
        let cosine = cosine_similarity(&got, want);
        worst = worst.min(cosine);
        assert!(cosine >= 0.999, "motion {id}: cosine {cosine} with onnxruntime");
    }
    pool.close().await;
    eprintln!("MiniLM through the binary vs onnxruntime on 200 motions: lowest cosine {worst:.6}");
}

#[tokio::test(flavor = "multi_thread")]
async fn local_embeddings_on_postgres_are_bytea() {
    let rows = 40;
    let Some(fx) = PgFixture::new(module_path!(), rows).await else { return };
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ALTER TABLE {}.items ADD COLUMN vector BYTEA", fx.schema))).execute(&fx.pool).await.unwrap();
    std::fs::write(
        &fx.job,
        format!(
            "name = \"pg-local\"\n[source]\ndatabase = \"{}\"\ntable = \"{}.items\"\nid = \"id\"\ncolumns = [\"title\", \"body\"]\n\
             pending = \"vector IS NULL\"\n[target]\ncolumn = \"vector\"\nformat = \"f32le\"\n{}\n[limits]\nitems_per_request = {{ start = 16, min = 1, max = 16 }}\n",
            fx.url,
            fx.schema,
            tiny_model("tiny_embedder.onnx", "")
        ),
    )
    .unwrap();
    let output = backfill_async(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--json", "--quiet"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(summary["items"]["done"], rows, "{summary}");
    let expected = expected_outputs(tiny_config("tiny_embedder.onnx"), rows);
    let stored: Vec<(i64, Vec<u8>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT id, vector FROM {}.items ORDER BY id", fx.schema))).fetch_all(&fx.pool).await.unwrap();
    assert_eq!(stored.len(), rows);
    for ((id, bytes), expected) in stored.iter().zip(&expected) {
        assert_same_embedding(&embedding_from_f32le(bytes).unwrap(), expected, *id);
    }
}

/// Starts a local run whose batch writes pause inside their transaction, so it takes a while.
fn spawn_slow(fx: &Fixture, pause_ms: u32) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_backfill"))
        .current_dir(fx.dir.path())
        .args(["run", fx.job.to_str().unwrap(), "--quiet", "--json"])
        .env("BACKFILL_FAILPOINT_PAUSE_MS", format!("write_batch:{pause_ms}"))
        .env("NO_COLOR", "1")
        .env("BACKFILL_CACHE", test_cache(fx.dir.path()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn count(fx: &Fixture, sql: &str) -> i64 {
    let pool = fx.pool().await;
    let n = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&pool).await.unwrap();
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn local_sigint_records_the_batch_in_progress_and_exits_4_and_a_second_process_is_refused() {
    let rows = 200;
    let fx = local_fixture(rows).await;
    write_job(&fx, "column = \"vector\"\nformat = \"f32le\"", "vector IS NULL", &tiny_model("tiny_embedder.onnx", ""), "items_per_request = { start = 10, min = 1, max = 10 }");
    // 300 ms a write: 20 writes take 6 s, so the refused second process and the signal land mid-run.
    let child = spawn_slow(&fx, 300);
    for _ in 0..400 {
        if count(&fx, "SELECT COUNT(*) FROM items WHERE vector IS NOT NULL").await >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let second = backfill(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--resume", "--quiet"], &[]);
    assert_eq!(second.status.code(), Some(2), "{}", stderr(&second));
    assert!(stderr(&second).contains("being worked on by another process"), "{}", stderr(&second));

    let status = Command::new("kill").arg("-INT").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(summary["status"], "interrupted", "{summary}");
    let done = summary["items"]["done"].as_i64().unwrap();
    assert!(done > 0 && done < rows as i64, "{summary}");
    // Nothing is left leased or reserved: the batch in progress was written or given back.
    assert_eq!(count(&fx, "SELECT COUNT(*) FROM backfill_items WHERE state = 'leased'").await, 0);
    assert_eq!(count(&fx, "SELECT COUNT(*) FROM backfill_calls WHERE state <> 'settled'").await, 0);
    assert_eq!(count(&fx, "SELECT COUNT(*) FROM items WHERE vector IS NOT NULL").await, done);
    assert_eq!(count(&fx, "SELECT COALESCE(SUM(items_ok), 0) FROM backfill_calls").await, done);

    let summary = run_json(&fx, &["--resume"]);
    assert_eq!(summary["items"]["done"], rows, "{summary}");
    assert_eq!(count(&fx, "SELECT COALESCE(SUM(items_ok), 0) FROM backfill_calls").await, rows as i64);
}

#[tokio::test(flavor = "multi_thread")]
async fn local_input_naming_an_unknown_column_exits_2() {
    let fx = local_fixture(3).await;
    let model = tiny_model("tiny_embedder.onnx", "").replace("{{body}}", "{{text}}");
    write_job(&fx, "column = \"embedding\"", "embedding IS NULL", &model, "");
    let output = backfill(fx.dir.path(), &["run", fx.job.to_str().unwrap()], &[]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("`{{text}}` is not in `source.columns`"), "{}", stderr(&output));
}

#[tokio::test(flavor = "multi_thread")]
async fn local_cls_pooling_takes_the_first_token() {
    let rows = 12;
    let fx = local_fixture(rows).await;
    let mut config = tiny_config("tiny_embedder.onnx");
    config.pooling = backfill_onnx::Pooling::Cls;
    let expected = expected_outputs(config, rows);
    let mean = expected_outputs(tiny_config("tiny_embedder.onnx"), rows);
    write_job(&fx, "column = \"vector\"\nformat = \"f32le\"", "vector IS NULL", &tiny_model("tiny_embedder.onnx", "pooling = \"cls\""), "");
    assert_eq!(run_json(&fx, &[])["items"]["done"], rows);
    let pool = fx.pool().await;
    let stored: Vec<(i64, Vec<u8>)> = sqlx::query_as("SELECT id, vector FROM items ORDER BY id").fetch_all(&pool).await.unwrap();
    pool.close().await;
    for (((id, blob), expected), mean) in stored.iter().zip(&expected).zip(&mean) {
        assert_same_embedding(&embedding_from_f32le(blob).unwrap(), expected, *id);
        assert_ne!(expected, mean, "row {id}: cls and mean pooling differ");
    }
}
