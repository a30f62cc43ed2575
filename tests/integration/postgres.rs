//! The real binary against the real PostgreSQL server: a whole run, `kill -9` at random moments
//! and `--resume`, and the messages for a server that is not there or a schema that is missing.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::pg::PgFixture;
use crate::support::*;

/// Starts `backfill run JOB --resume --quiet` in the background.
pub fn spawn_worker(dir: &std::path::Path, job: &std::path::Path, env: &[(&str, &str)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_backfill"));
    command.current_dir(dir).arg("run").arg(job).arg("--resume").arg("--quiet").arg("--json");
    for var in ["OPENAI_API_KEY", "OPENAI_BASE_URL", "RUST_LOG", "BACKFILL_DATABASE"] {
        command.env_remove(var);
    }
    command.env("NO_COLOR", "1").stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    command.spawn().expect("backfill starts")
}

pub async fn wait_for(child: Child) -> std::process::Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_on_postgres_writes_every_row_and_status_shows_its_worker() {
    let Some(fx) = PgFixture::new(module_path!(), 60).await else { return };
    let fake = FakeProvider::start(vec![Reply::DropIds(2), Reply::ServerError(503)], vec![], 3).await;
    fx.write_job(&fake.base_url(), "", "items_per_request = { start = 10, min = 1, max = 20 }");
    let output = backfill_async(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--json", "--quiet"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let summary: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(summary["items"]["done"], 60, "{summary}");
    for (id, title, body, summary) in fx.rows().await {
        assert_eq!(summary.as_deref(), Some(expected_output(&id.to_string(), &title, &body).as_str()), "row {id}");
    }
    // The runner tables are in the fixture's schema, not in public.
    let in_schema = fx.scalar(&format!("SELECT COUNT(*) FROM pg_tables WHERE schemaname = '{}' AND tablename LIKE 'backfill_%'", fx.schema)).await;
    assert!(in_schema >= 7, "{in_schema} runner tables in the schema");
    let status = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap(), "--json"], &[]).await;
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let status: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(status["status"], "finished");
    assert_eq!(status["workers"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["workers"][0]["items_done"], 60);
    assert_eq!(status["workers"][0]["share_of_done"], 1.0);
    assert_eq!(status["calls"]["total"].as_u64().unwrap() as usize, fake.records().len());
    let human = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap()], &[]).await;
    assert!(stdout(&human).contains("60 items done (100%)"), "{}", stdout(&human));
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_nine_on_postgres_then_resume_loses_nothing_and_writes_nothing_twice() {
    let rows = 150;
    let Some(fx) = PgFixture::new(module_path!(), rows).await else { return };
    let fake = FakeProvider::start_with_latency(vec![], vec![], 11, (40, 400)).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 6, min = 1, max = 8 }\nitems_per_request = { start = 10, min = 1, max = 20 }");
    let mut rng = fastrand::Rng::with_seed(12);
    let (mut kills, mut finished) = (0, false);
    for round in 0..40 {
        let env: &[(&str, &str)] = if round % 3 == 0 { &[("BACKFILL_FAILPOINT_PAUSE_MS", "write_batch:120")] } else { &[] };
        let mut child = spawn_worker(fx.dir.path(), &fx.job, env);
        tokio::time::sleep(Duration::from_millis(rng.u64(100..900))).await;
        if child.try_wait().unwrap().is_some() {
            let output = wait_for(child).await;
            assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
            finished = true;
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    if !finished {
        let output = wait_for(spawn_worker(fx.dir.path(), &fx.job, &[])).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    }
    assert!(kills >= 3, "only {kills} kills landed");
    assert_eq!(fx.scalar("SELECT COUNT(*) FROM backfill_runs").await, 1);
    assert_eq!(fx.scalar("SELECT COUNT(*) FROM backfill_items WHERE state = 'done'").await, rows as i64);
    assert_eq!(fx.scalar("SELECT COUNT(*) FROM (SELECT item_id FROM backfill_outputs GROUP BY item_id HAVING COUNT(*) > 1) d").await, 0);
    for (id, title, body, summary) in fx.rows().await {
        assert_eq!(summary.as_deref(), Some(expected_output(&id.to_string(), &title, &body).as_str()), "row {id}");
    }
    // Every request the provider saw is in the ledger; a kill between the reservation and the
    // request leaves a call the provider never saw, kept as lost (possibly billed), never as
    // spent.
    let sent = fx.scalar("SELECT COUNT(*) FROM backfill_calls WHERE outcome IS NULL OR outcome <> 'cached'").await as usize;
    let lost = fx.scalar("SELECT COUNT(*) FROM backfill_calls WHERE state = 'lost'").await as usize;
    let seen = fake.records().len();
    assert!(seen <= sent && sent - seen <= lost, "ledger calls {sent} ({lost} lost) vs provider requests {seen}");
    assert_eq!(fx.scalar("SELECT COUNT(*) FROM backfill_calls WHERE state = 'reserved'").await, 0);
    assert_eq!(
        fx.scalar("SELECT spent_picos FROM backfill_runs").await,
        fx.scalar("SELECT COALESCE(SUM(cost_picos), 0)::bigint FROM backfill_calls WHERE state = 'settled'").await
    );
    assert_eq!(
        fx.scalar("SELECT lost_picos FROM backfill_runs").await,
        fx.scalar("SELECT COALESCE(SUM(estimated_picos), 0)::bigint FROM backfill_calls WHERE state = 'lost'").await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_server_is_named_with_the_fix_and_no_password() {
    let fx = Fixture::new(1).await;
    let fake = FakeProvider::start(vec![], vec![], 1).await;
    fx.write_job(&fake.base_url(), "", "", "");
    let url = "postgres://app:s3cr3t-pw@127.0.0.1:1/prod";
    let output = backfill_async(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--database", url], &[]).await;
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains("is PostgreSQL running at 127.0.0.1:1?"), "{err}");
    assert!(err.contains("--database"), "{err}");
    assert!(!err.contains("s3cr3t-pw"), "the password leaked: {err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_search_path_schema_that_does_not_exist_is_named() {
    let Some(fx) = PgFixture::new(module_path!(), 1).await else { return };
    let fake = FakeProvider::start(vec![], vec![], 1).await;
    fx.write_job(&fake.base_url(), "", "");
    let url = fx.url.replace(&format!("search_path%3D{}", fx.schema), "search_path%3Dbf_no_such_schema");
    let output = backfill_async(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--database", &url], &[]).await;
    let err = stderr(&output);
    assert_ne!(output.status.code(), Some(0), "{err}");
    assert!(err.contains("search_path") && err.contains("CREATE SCHEMA"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_mode_run_on_postgres_collects_every_row() {
    let Some(fx) = PgFixture::new(module_path!(), 40).await else { return };
    let fake = crate::support::batch_fake::BatchFake::start().await;
    fx.write_job(&fake.base_url(), "mode = \"batch\"\nbatch_poll_s = 0.05", "");
    let output = backfill_async(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--json", "--quiet"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    for (id, title, body, summary) in fx.rows().await {
        assert_eq!(summary.as_deref(), Some(expected_output(&id.to_string(), &title, &body).as_str()), "row {id}");
    }
    assert_eq!(fake.batches().len(), 1);
    assert_eq!(fx.scalar("SELECT COUNT(*) FROM backfill_calls WHERE price_tier = 'batch' AND state = 'settled'").await, 4);
    let status = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap(), "--json"], &[]).await;
    let status: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(status["batches"][0]["phase"], "collected", "{status}");
}
