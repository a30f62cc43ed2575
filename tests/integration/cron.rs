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

#[tokio::test(flavor = "multi_thread")]
async fn resume_with_nothing_pending_starts_no_run_and_status_shows_the_last_ten() {
    let fx = Fixture::new(5).await;
    let fake = FakeProvider::start(vec![], vec![], 172).await;
    fx.write_job(&fake.base_url(), "", "", "");
    let (first, summary) = run_json(&fx, &["--resume"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    assert_eq!(summary["items"]["done"], 5, "{summary}");

    // Nothing pending, no unfinished run: exit 0, no run, and the line and stderr say so.
    let (idle, line) = run_json(&fx, &["--resume"]).await;
    assert_eq!(idle.status.code(), Some(0), "{}", stderr(&idle));
    the_one_line(&idle);
    assert_eq!(line["status"], "nothing_pending", "{line}");
    assert_eq!(line["exit_code"], 0, "{line}");
    assert_eq!(line["run_id"], Value::Null, "{line}");
    assert_eq!(line["error"], Value::Null, "{line}");
    assert!(stderr(&idle).contains("nothing pending"), "{}", stderr(&idle));
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_runs").await, 1, "an empty run was created");

    // Twelve more nights with one row each: thirteen runs.
    let pool = fx.pool().await;
    for night in 0..12 {
        sqlx::query("UPDATE items SET summary = NULL WHERE id = ?").bind(1 + night % 5).execute(&pool).await.unwrap();
        let (output, summary) = run_json(&fx, &["--resume", "--no-cache"]).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        assert_eq!(summary["items"]["total"], 1, "{summary}");
    }
    pool.close().await;
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_runs").await, 13);

    let job = fx.job.to_str().unwrap();
    let status = backfill_async(fx.dir.path(), &["status", job, "--json"], &[]).await;
    let view: Value = serde_json::from_str(&stdout(&status)).unwrap();
    let earlier = view["earlier_runs"].as_array().unwrap();
    assert_eq!(earlier.len(), 10, "{view}");
    assert_eq!(earlier[0]["run_id"], 12);
    assert_eq!(earlier[9]["run_id"], 3);
    assert_eq!(view["earlier_runs_not_shown"], 2, "{view}");
    // Times in JSON are RFC 3339 (UTC, `Z`); the text shows them for people.
    let rfc3339 = |v: &Value| {
        let t = v.as_str().unwrap_or_else(|| panic!("no time: {v}"));
        let b = t.as_bytes();
        assert!(
            t.len() == 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':' && b[16] == b':' && t.ends_with('Z'),
            "not RFC 3339: {t}"
        );
    };
    rfc3339(&view["created_at"]);
    rfc3339(&view["updated_at"]);
    rfc3339(&earlier[0]["created_at"]);
    rfc3339(&view["workers"][0]["attached_at"]);
    rfc3339(&view["workers"][0]["last_heartbeat"]);
    let text = backfill_async(fx.dir.path(), &["status", job], &[]).await;
    assert_eq!(stdout(&text).matches("earlier run ").count(), 10, "{}", stdout(&text));
    assert!(stdout(&text).contains("and 2 older runs (`status --all` lists every one)"), "{}", stdout(&text));
    assert!(
        stdout(&text).contains(&format!("started {} UTC", view["created_at"].as_str().unwrap().trim_end_matches('Z').replace('T', " "))),
        "{}",
        stdout(&text)
    );

    let all = backfill_async(fx.dir.path(), &["status", job, "--json", "--all"], &[]).await;
    let view: Value = serde_json::from_str(&stdout(&all)).unwrap();
    assert_eq!(view["earlier_runs"].as_array().unwrap().len(), 12, "{view}");
    assert_eq!(view["earlier_runs_not_shown"], 0, "{view}");

    // A report on an early run lists only the runs before it as earlier.
    let report = backfill_async(fx.dir.path(), &["report", job, "--run", "2", "--json"], &[]).await;
    assert_eq!(report.status.code(), Some(0), "{}", stderr(&report));
    let view: Value = serde_json::from_str(&stdout(&report)).unwrap();
    let ids: Vec<i64> = view["earlier_runs"].as_array().unwrap().iter().map(|r| r["run_id"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![1], "{view}");
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_keeps_the_cap_and_limit_the_run_started_with_unless_a_flag_changes_them() {
    let fx = Fixture::new(40).await;
    let fake = FakeProvider::start(vec![], vec![], 173).await;
    fx.write_job(&fake.base_url(), "", "", "\n[budget]\nmax_usd = 5.0\n");

    // A cap below one request's estimate: exit 3 at once, the cap shown as it is.
    let (first, summary) = run_json(&fx, &["--limit", "30", "--max-usd", "0.00005"]).await;
    assert_eq!(first.status.code(), Some(3), "{}", stderr(&first));
    assert_eq!(summary["items"]["total"], 30, "{summary}");
    assert_eq!(summary["budget_usd"], 0.00005, "{summary}");
    assert!(stderr(&first).contains("of $0.00005 cap"), "{}", stderr(&first));

    // A plain --resume keeps the cap (not the job file's $5) and the limit, and says so.
    let (again, summary) = run_json(&fx, &["--resume"]).await;
    assert_eq!(again.status.code(), Some(3), "{}", stderr(&again));
    assert_eq!(summary["budget_usd"], 0.00005, "{summary}");
    assert_eq!(summary["items"]["total"], 30, "{summary}");
    assert!(stderr(&again).contains("kept what it was started with: budget cap $0.00005, mode sync, limit 30"), "{}", stderr(&again));
    assert!(stderr(&again).contains("the job file's budget cap $5.00 is not applied"), "{}", stderr(&again));
    assert_eq!(fake.records().len(), 0, "nothing may be sent past the cap");
    let status = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap()], &[]).await;
    assert!(stdout(&status).contains("cap $0.00005"), "{}", stdout(&status));

    // Flags given again change them, and stderr says which.
    let (changed, summary) = run_json(&fx, &["--resume", "--limit", "10", "--max-usd", "2"]).await;
    assert_eq!(changed.status.code(), Some(0), "{}", stderr(&changed));
    assert!(
        stderr(&changed)
            .contains("changed by this command: budget cap $2.00 (was $0.00005), limit 10 (was 30; the run now holds 10 items)"),
        "{}",
        stderr(&changed)
    );
    assert!(stderr(&changed).contains("kept what it was started with: mode sync"), "{}", stderr(&changed));
    assert_eq!(summary["items"]["total"], 10, "{summary}");
    assert_eq!(summary["items"]["done"], 10, "{summary}");
    assert_eq!(summary["budget_usd"], 2.0, "{summary}");
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM items WHERE summary IS NOT NULL").await, 10);
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_runs").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_larger_limit_on_resume_adds_pending_rows_to_the_run() {
    let fx = Fixture::new(30).await;
    let fake = FakeProvider::start(vec![], vec![], 174).await;
    fx.write_job(&fake.base_url(), "", "", "");
    let (first, _) = run_json(&fx, &["--limit", "10", "--max-usd", "0.00005"]).await;
    assert_eq!(first.status.code(), Some(3), "{}", stderr(&first));
    let (grown, summary) = run_json(&fx, &["--resume", "--limit", "25", "--max-usd", "1"]).await;
    assert_eq!(grown.status.code(), Some(0), "{}", stderr(&grown));
    assert!(stderr(&grown).contains("limit 25 (was 10; the run now holds 25 items)"), "{}", stderr(&grown));
    assert_eq!(summary["items"]["done"], 25, "{summary}");
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM items WHERE summary IS NOT NULL").await, 25);
    assert_eq!(scalar(&fx, "SELECT COUNT(DISTINCT seq) FROM backfill_items").await, 25);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_started_with_batch_api_resumes_in_batch_mode() {
    use crate::support::batch_fake::BatchFake;
    let fx = Fixture::new(30).await;
    let fake = BatchFake::start().await;
    // The job file says nothing of batch mode: only the flag does.
    fx.write_job(&fake.base_url(), "batch_poll_s = 0.05", "", "");
    let (first, summary) = run_json(&fx, &["--batch-api", "--wait", "0"]).await;
    assert_eq!(first.status.code(), Some(5), "{}", stderr(&first));
    assert_eq!(summary["status"], "waiting", "{summary}");
    // `--wait` with a plain resume: the run's mode decides (the job file says sync).
    let (resumed, summary) = run_json(&fx, &["--resume", "--wait", "1h"]).await;
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert!(stderr(&resumed).contains("kept what it was started with: budget cap none, mode batch"), "{}", stderr(&resumed));
    assert_eq!(summary["items"]["done"], 30, "{summary}");
    assert_eq!(fake.batches().len(), 1, "the resume collects the batch, it does not submit again");
    assert_eq!(fake.sync_requests(), 0, "a batch run resumed without --batch-api went synchronous");
}

/// Seconds of an ETA as the log line writes it (`45s`, `2m 09s`, `1h 02m`).
fn eta_seconds(text: &str) -> f64 {
    let mut total = 0.0;
    for part in text.split_whitespace() {
        let (number, unit) = part.split_at(part.len() - 1);
        let n: f64 = number.parse().unwrap_or_else(|_| panic!("not an ETA: {text}"));
        total += n * match unit {
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => panic!("not an ETA: {text}"),
        };
    }
    total
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cron_log_line_after_a_resume_carries_an_eta_at_this_invocations_pace() {
    let fx = Fixture::new(150).await;
    let fake = FakeProvider::start_with_latency(vec![], vec![], 175, (400, 400)).await;
    fx.write_job(
        &fake.base_url(),
        "request_timeout_s = 30",
        "items_per_request = { start = 2, min = 2, max = 2 }\nconcurrency = { start = 1, min = 1, max = 1 }",
        "",
    );
    // The first night is interrupted after about 30 items.
    let first = spawn_run(&fx, &[]);
    until_requests(&fake, 15).await;
    signal(&first, "INT");
    let first = wait(first).await;
    assert_eq!(first.status.code(), Some(4), "{}", stderr(&first));
    let before = scalar(&fx, "SELECT COUNT(*) FROM backfill_items WHERE state = 'done'").await;
    assert!(before >= 25, "{before}");

    // The resume, without a terminal: a progress line every 10 s on stderr.
    let job = fx.job.to_str().unwrap();
    let resumed = backfill_async(fx.dir.path(), &["run", job, "--resume", "--json"], &[]).await;
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    let summary: Value = serde_json::from_str(stdout(&resumed).trim()).unwrap();
    let log = stderr(&resumed);
    let line = log.lines().find(|l| l.contains(" items/s, ETA ")).unwrap_or_else(|| panic!("no progress line with an ETA:\n{log}"));
    // "… N/150 items (0 failed, 0 rejected), R items/s, ETA E, …"
    let counts = line.split(" items (").next().unwrap().rsplit(' ').next().unwrap();
    let (done, total) = counts.split_once('/').unwrap();
    let (done, total): (f64, f64) = (done.parse().unwrap(), total.parse().unwrap());
    let rate: f64 = line.split(" items/s").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    let eta = eta_seconds(line.split("ETA ").nth(1).unwrap().split(',').next().unwrap());
    assert_eq!(total, 150.0, "{line}");
    assert!(done > before as f64, "{line}");
    // At this invocation's pace (items finished here per second), not the run's count from 0.
    let here = (total - done) / rate;
    assert!((eta - here).abs() <= 1.5, "ETA {eta}s, expected {here:.1}s at this invocation's pace: {line}");
    let from_zero = (total - done) / (done / 10.0);
    assert!((eta - from_zero).abs() > 2.0, "the ETA counts the earlier night's items: {line}");
    // And it came true: the line is written at 10 s; the run ended about ETA later.
    let actual = summary["elapsed_seconds"].as_f64().unwrap() - 10.0;
    assert!((actual - eta).abs() <= 0.35 * eta + 2.0, "ETA {eta}s at 10 s, the run took {actual:.1}s more: {line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn on_postgresql_a_resume_keeps_and_changes_the_limit_and_an_idle_night_starts_no_run() {
    let Some(fx) = crate::support::pg::PgFixture::new(module_path!(), 12).await else { return };
    let fake = FakeProvider::start(vec![], vec![], 176).await;
    fx.write_job(&fake.base_url(), "", "");
    let job = fx.job.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", job, "--json", "--quiet"];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let dir = fx.dir.path().to_path_buf();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let output = backfill_async(&dir, &args, &[]).await;
            let line: Value = serde_json::from_str(stdout(&output).trim()).unwrap_or(Value::Null);
            (output, line)
        }
    };
    let (first, summary) = run(&["--limit", "4", "--max-usd", "0.00005"]).await;
    assert_eq!(first.status.code(), Some(3), "{}", stderr(&first));
    assert_eq!(summary["items"]["total"], 4, "{summary}");
    let (kept, summary) = run(&["--resume"]).await;
    assert_eq!(kept.status.code(), Some(3), "{}", stderr(&kept));
    assert!(stderr(&kept).contains("kept what it was started with: budget cap $0.00005, mode sync, limit 4"), "{}", stderr(&kept));
    assert_eq!(summary["budget_usd"], 0.00005, "{summary}");
    let (grown, summary) = run(&["--resume", "--limit", "12", "--max-usd", "1"]).await;
    assert_eq!(grown.status.code(), Some(0), "{}", stderr(&grown));
    assert!(stderr(&grown).contains("limit 12 (was 4; the run now holds 12 items)"), "{}", stderr(&grown));
    assert_eq!(summary["items"]["done"], 12, "{summary}");
    let (idle, line) = run(&["--resume"]).await;
    assert_eq!(idle.status.code(), Some(0), "{}", stderr(&idle));
    assert_eq!(line["status"], "nothing_pending", "{line}");
    let runs: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {}.backfill_runs", fx.schema)))
        .fetch_one(&fx.pool)
        .await
        .unwrap();
    assert_eq!(runs, 1);
    let status = backfill_async(fx.dir.path(), &["status", job, "--json"], &[]).await;
    let view: Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(view["earlier_runs"].as_array().unwrap().len(), 0, "{view}");
    assert_eq!(view["run_id"], 1, "{view}");
}

/// A free port on the loopback (bound, then let go for the run to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_served_while_the_run_goes_and_written_when_it_ends() {
    let fx = Fixture::new(40).await;
    let fake = FakeProvider::start_with_latency(vec![], vec![], 181, (300, 300)).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 1, min = 1, max = 1 }\nitems_per_request = { start = 4, min = 4, max = 4 }", "");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let file = fx.dir.path().join("backfill.prom");
    let child = spawn_run(&fx, &["--json", "--metrics-addr", &addr, "--metrics-file", file.to_str().unwrap()]);
    until_requests(&fake, 3).await;
    // A scrape while the run goes: the run's items by state and the requests answered so far.
    let mut scraped = String::new();
    for _ in 0..100 {
        match reqwest::get(format!("http://{addr}/metrics")).await {
            Ok(response) if response.status().is_success() => {
                scraped = response.text().await.unwrap();
                if scraped.contains("backfill_cost_usd{") {
                    break;
                }
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(scraped.contains("backfill_items{job=\"test-job\",run=\"1\",state=\"done\"}"), "{scraped}");
    assert!(scraped.contains("backfill_requests_total{job=\"test-job\",run=\"1\",outcome=\"answered\"}"), "{scraped}");
    assert!(scraped.contains("backfill_controller_limit{job=\"test-job\",run=\"1\",limit=\"concurrency\"} 1"), "{scraped}");
    let output = wait(child).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let summary = the_one_line(&output);

    // The file at the end holds the night's final figures, equal to the summary's.
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("backfill_items{job=\"test-job\",run=\"1\",state=\"done\"} 40"), "{text}");
    let cost: f64 = text
        .lines()
        .find(|l| l.starts_with("backfill_cost_usd{job=\"test-job\",run=\"1\",model=\"fake-model\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no cost line in {text}"));
    assert!((cost - summary["cost_usd"].as_f64().unwrap()).abs() < 1e-12, "{cost} vs {summary}");
    let requests = fake.records().len();
    assert!(text.contains(&format!("outcome=\"answered\"}} {requests}")), "{requests} requests:\n{text}");

    // A taken address is refused before the run is touched.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let refused = backfill_async(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--metrics-addr", &taken], &[]).await;
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("--metrics-addr") && stderr(&refused).contains("choose another port"), "{}", stderr(&refused));
}

#[tokio::test(flavor = "multi_thread")]
async fn where_ids_and_retry_failed_start_runs_over_just_those_rows() {
    let fx = Fixture::new(30).await;
    // Every answer leaves out the last item of its request, and an item gets one attempt: the
    // first run fails some rows.
    let dropping = FakeProvider::start(vec![], vec![(1.0, Reply::DropIds(1))], 191).await;
    fx.write_job(&dropping.base_url(), "", "max_attempts = 1\nmax_failed_share = 1.0\nitems_per_request = { start = 5, min = 5, max = 5 }", "");
    let job = fx.job.to_str().unwrap().to_owned();

    // --where: only ids up to 10.
    let (output, summary) = run_json_with(&fx, &["--where", "id <= 10"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["total"], 10, "{summary}");
    let failed = summary["items"]["failed"].as_u64().unwrap();
    assert!(failed > 0 && summary["items"]["done"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM items WHERE summary IS NOT NULL AND id > 10").await, 0);

    // --retry-failed: a new run over exactly the rows that failed, against a provider that answers.
    let good = FakeProvider::start(vec![], vec![], 192).await;
    fx.write_job(&good.base_url(), "", "max_attempts = 1\nitems_per_request = { start = 5, min = 5, max = 5 }", "");
    let (output, summary) = run_json_with(&fx, &["--retry-failed"], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["total"].as_u64(), Some(failed), "{summary}");
    assert_eq!(summary["items"]["done"].as_u64(), Some(failed), "{summary}");
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM items WHERE summary IS NOT NULL AND id <= 10").await, 10);

    // --ids FILE: just the listed ids.
    let list = fx.dir.path().join("ids.txt");
    std::fs::write(&list, "21\n22\n\n23\n").unwrap();
    let (output, summary) = run_json_with(&fx, &["--ids", list.to_str().unwrap()], &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(summary["items"]["total"], 3, "{summary}");
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM items WHERE summary IS NOT NULL").await, 13);

    // They start new runs: with --resume they are refused.
    let refused = backfill_async(fx.dir.path(), &["run", &job, "--resume", "--where", "id > 1"], &[]).await;
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
}

#[tokio::test(flavor = "multi_thread")]
async fn on_an_80_column_terminal_the_bar_stays_on_one_line() {
    let fx = Fixture::new(60).await;
    let fake = FakeProvider::start_with_latency(vec![], vec![], 201, (250, 350)).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 1, min = 1, max = 1 }\nitems_per_request = { start = 2, min = 2, max = 2 }", "");
    // `script` gives the binary a terminal of 80 columns (util-linux, on every Debian machine).
    let command = format!("stty cols 80 rows 24; exec {} run {} --max-usd 5", env!("CARGO_BIN_EXE_backfill"), fx.job.display());
    let dir = fx.dir.path().to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("script").args(["-qec", &command, "/dev/null"]).current_dir(dir).env("NO_COLOR", "1").output()
    })
    .await
    .unwrap()
    .expect("script (util-linux) runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    let screen = String::from_utf8_lossy(&output.stdout);
    let escapes = regex::Regex::new(r"\x1b\[[0-9;?]*[A-Za-z]").unwrap();
    let plain = escapes.replace_all(&screen, "");
    let bars: Vec<&str> = plain.split(['\r', '\n']).filter(|line| line.contains("/60")).collect();
    assert!(!bars.is_empty(), "no progress bar drawn:\n{plain}");
    for bar in &bars {
        assert!(bar.trim_end().chars().count() <= 80, "{} columns: {bar:?}", bar.trim_end().chars().count());
        assert_eq!(bar.matches("/60").count(), 1, "the count once: {bar:?}");
    }
}
