//! What cron reads: every `run --json` exit writes its one JSON line on stdout (refusals, errors
//! and aborts included); `--resume` with nothing pending starts no run; `status` keeps its
//! history short; a resumed run keeps the mode, cap and limit it was started with.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

fn spawn_run(fx: &Fixture, extra: &[&str]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_backfill"));
    command.current_dir(fx.dir.path()).arg("run").arg(&fx.job).args(extra).arg("--quiet");
    for var in ["OPENAI_API_KEY", "OPENAI_BASE_URL", "RUST_LOG"] {
        command.env_remove(var);
    }
    command.env("NO_COLOR", "1").stdout(Stdio::piped()).stderr(Stdio::piped());
    command.spawn().expect("backfill starts")
}

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill").arg(format!("-{name}")).arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
}

async fn wait(child: Child) -> std::process::Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap()
}

async fn until_requests(fake: &FakeProvider, calls: usize) {
    for _ in 0..400 {
        if fake.records().len() >= calls {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the run never sent {calls} requests");
}

async fn scalar(fx: &Fixture, sql: &str) -> i64 {
    let pool = fx.pool().await;
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&pool).await.unwrap();
    pool.close().await;
    n
}

/// Stdout holds exactly one line, a JSON object: it.
fn the_one_line(output: &std::process::Output) -> Value {
    let out = stdout(output);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "stdout must be one JSON line: {out:?}\nstderr: {}", stderr(output));
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {}", lines[0]))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_json_exit_writes_one_line_with_status_and_error() {
    let fx = Fixture::new(40).await;
    let fake = FakeProvider::start_with_latency(vec![], vec![], 171, (800, 800)).await;
    fx.write_job(&fake.base_url(), "request_timeout_s = 30", "concurrency = { start = 1, min = 1, max = 1 }", "");

    // Another process holds the run: exit 2, and the line says so.
    let first = spawn_run(&fx, &["--json"]);
    until_requests(&fake, 1).await;
    let (second, line) = run_json(&fx, &["--resume"]).await;
    assert_eq!(second.status.code(), Some(2), "{}", stderr(&second));
    let line_again = the_one_line(&second);
    assert_eq!(line, line_again);
    assert_eq!(line["status"], "refused", "{line}");
    assert_eq!(line["exit_code"], 2, "{line}");
    assert_eq!(line["job"], "test-job", "{line}");
    assert_eq!(line["run_id"], 1, "{line}");
    assert!(line["error"].as_str().unwrap().contains("being worked on by another process"), "{line}");

    // The first process is aborted by a second signal: its line says `aborted`, exit 4.
    signal(&first, "INT");
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&first, "INT");
    let aborted = wait(first).await;
    assert_eq!(aborted.status.code(), Some(4), "{}", stderr(&aborted));
    let line = the_one_line(&aborted);
    assert_eq!(line["status"], "aborted", "{line}");
    assert_eq!(line["exit_code"], 4, "{line}");
    assert_eq!(line["run_id"], 1, "{line}");
    assert!(line["error"].as_str().unwrap().contains("second signal"), "{line}");

    // A plain run beside the unfinished one is refused, with its line.
    let (refused, line) = run_json(&fx, &[]).await;
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    the_one_line(&refused);
    assert_eq!(line["status"], "refused", "{line}");
    assert!(line["error"].as_str().unwrap().contains("--resume"), "{line}");

    // A bad job file: refused before anything is read, the line names the cause.
    let text = std::fs::read_to_string(&fx.job).unwrap().replace("[target]", "[target]\ncolunm = \"x\"");
    std::fs::write(&fx.job, text).unwrap();
    let (bad, line) = run_json(&fx, &["--resume"]).await;
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    the_one_line(&bad);
    assert_eq!(line["status"], "refused", "{line}");
    assert_eq!(line["run_id"], Value::Null, "{line}");
    assert!(line["error"].as_str().unwrap().contains("colunm"), "{line}");

    // A flag the command line refuses, too.
    let job = fx.job.to_str().unwrap();
    let flag = backfill_async(fx.dir.path(), &["run", job, "--json", "--limit", "many"], &[]).await;
    assert_eq!(flag.status.code(), Some(2), "{}", stderr(&flag));
    let line = the_one_line(&flag);
    assert_eq!(line["status"], "refused", "{line}");
    assert!(line["error"].as_str().unwrap().contains("many"), "{line}");

    // Without --json, stdout stays empty.
    let quiet = backfill_async(fx.dir.path(), &["run", job, "--resume"], &[]).await;
    assert_eq!(quiet.status.code(), Some(2));
    assert_eq!(stdout(&quiet), "");
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_runs").await, 1);
}
