//! Crash safety (no row lost, nothing paid twice, and the budget's "possibly billed"): `kill -9` at random
//! moments and `--resume`; SIGINT and SIGTERM; the single-owner lock; a locked, read-only or
//! full database.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::*;

fn spawn_run(fx: &Fixture, extra: &[&str], env: &[(&str, &str)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_backfill"));
    command.current_dir(fx.dir.path()).arg("run").arg(&fx.job).args(extra).arg("--quiet");
    for var in ["OPENAI_API_KEY", "OPENAI_BASE_URL", "RUST_LOG"] {
        command.env_remove(var);
    }
    command.env("NO_COLOR", "1").stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
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

/// `scalar` for a moment when the killed process may not have created the runner tables yet.
async fn scalar_or_zero(fx: &Fixture, sql: &str) -> i64 {
    let pool = fx.pool().await;
    let n = zero_while_missing(sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(&pool).await);
    pool.close().await;
    n
}

/// Waits until the run has sent at least `calls` requests (the fake saw them).
#[tokio::test(flavor = "multi_thread")]
async fn kill_nine_at_random_moments_then_resume_loses_nothing_and_pays_nothing_twice() {
    let rows = 240;
    let fx = Fixture::new(rows).await;
    let fake = FakeProvider::start_with_latency(vec![], vec![], 41, (40, 400)).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 6, min = 1, max = 8 }", "");
    let mut rng = fastrand::Rng::with_seed(42);
    let (mut kills, mut in_flight_at_kills, mut finished) = (0, 0, false);
    for round in 0..60 {
        // Every third round pauses inside the write transaction, so kills land there too.
        let env: &[(&str, &str)] = if round % 3 == 0 { &[("BACKFILL_FAILPOINT_PAUSE_MS", "write_batch:120")] } else { &[] };
        let mut child = spawn_run(&fx, &["--resume"], env);
        tokio::time::sleep(Duration::from_millis(rng.u64(60..900))).await;
        if let Some(status) = child.try_wait().unwrap() {
            let output = wait(child).await;
            assert_eq!(status.code(), Some(0), "{}", stderr(&output));
            finished = true;
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
        in_flight_at_kills += scalar_or_zero(&fx, "SELECT COUNT(*) FROM backfill_items WHERE state = 'leased'").await;
    }
    if !finished {
        let output = wait(spawn_run(&fx, &["--resume"], &[])).await;
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    }
    assert!(kills >= 5, "only {kills} kills landed");

    // One run, every item done, each written once, each to its own row.
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_runs").await, 1);
    let states = fx.item_states().await;
    assert_eq!(states.len(), rows);
    assert!(states.iter().all(|(_, s, _, _)| s == "done"), "{states:?}");
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM (SELECT item_id FROM backfill_outputs GROUP BY item_id HAVING COUNT(*) > 1)").await, 0);
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_outputs WHERE status <> 'written'").await, 0);
    for (id, title, body, summary) in fx.rows().await {
        assert_eq!(summary.as_deref(), Some(expected_output(&id.to_string(), &title, &body).as_str()), "row {id}");
    }

    // Every request the provider saw is in the ledger exactly once (reserved before sending);
    // none is left reserved; money adds up.
    let records = fake.records();
    let sent_calls = scalar(&fx, "SELECT COUNT(*) FROM backfill_calls WHERE outcome IS NULL OR outcome <> 'cached'").await as usize;
    // A kill between the reservation and the request leaves a call the provider never saw; it
    // is kept as lost (possibly billed), never as spent.
    let lost = scalar(&fx, "SELECT COUNT(*) FROM backfill_calls WHERE state = 'lost'").await as usize;
    assert!(
        records.len() <= sent_calls && sent_calls - records.len() <= lost,
        "ledger calls {sent_calls} ({lost} lost) vs provider requests {}",
        records.len()
    );
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_calls WHERE state = 'reserved'").await, 0);
    assert_eq!(scalar(&fx, "SELECT reserved_picos FROM backfill_runs").await, 0);
    assert_eq!(
        scalar(&fx, "SELECT spent_picos FROM backfill_runs").await,
        scalar(&fx, "SELECT COALESCE(SUM(cost_picos), 0) FROM backfill_calls WHERE state = 'settled'").await
    );
    assert_eq!(
        scalar(&fx, "SELECT lost_picos FROM backfill_runs").await,
        scalar(&fx, "SELECT COALESCE(SUM(estimated_picos), 0) FROM backfill_calls WHERE state = 'lost'").await
    );
    let settled_prompt = scalar(&fx, "SELECT COALESCE(SUM(prompt_tokens), 0) FROM backfill_calls WHERE state = 'settled'").await;
    let provider_prompt: i64 = records.iter().filter_map(|r| r.usage.map(|u| u.0)).sum();
    assert!(settled_prompt <= provider_prompt, "the ledger counts more than the provider billed");

    // Items sent again are bounded by what was in flight at the kills.
    let item_sends: usize = records.iter().map(|r| r.ids.len()).sum();
    assert!(
        item_sends - rows <= in_flight_at_kills as usize,
        "{} items re-sent, {in_flight_at_kills} were in flight at {kills} kills",
        item_sends - rows
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_finishes_calls_in_flight_records_them_and_exits_4() {
    let fx = Fixture::new(60).await;
    let fake = FakeProvider::start_with_latency(vec![], vec![], 51, (1500, 1500)).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 2, min = 1, max = 2 }", "");
    let child = spawn_run(&fx, &[], &[]);
    until_requests(&fake, 2).await;
    signal(&child, "INT");
    let output = wait(child).await;
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    assert!(stderr(&output).contains("SIGINT"), "{}", stderr(&output));
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_runs WHERE status = 'interrupted'").await, 1);
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_items WHERE state = 'leased'").await, 0);
    // The calls in flight finished within the grace period and were recorded.
    let settled = scalar(&fx, "SELECT COUNT(*) FROM backfill_calls WHERE state = 'settled' AND outcome = 'ok'").await;
    assert_eq!(settled as usize, fake.records().len());
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_items WHERE state = 'done'").await, scalar(&fx, "SELECT SUM(items_ok) FROM backfill_calls").await);
    // A plain run refuses beside the unfinished one and names --resume.
    let refused = backfill_async(fx.dir.path(), &["run", fx.job.to_str().unwrap()], &[]).await;
    assert_eq!(refused.status.code(), Some(2));
    assert!(stderr(&refused).contains("--resume") && stderr(&refused).contains("abandon"), "{}", stderr(&refused));
    let resumed = wait(spawn_run(&fx, &["--resume"], &[])).await;
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM items WHERE summary IS NOT NULL").await, 60);
}

/// `--resume` goes on at the requests in flight the run had found on a server that queues
/// (kept in the run's saved state), instead of climbing from `concurrency.start` again.
#[tokio::test(flavor = "multi_thread")]
async fn resume_goes_on_at_the_requests_in_flight_the_run_had_found() {
    let fx = Fixture::new(30).await;
    let fake = FakeProvider::start_with_latency(vec![], vec![], 52, (3000, 3000)).await;
    fx.write_job(&fake.base_url(), "request_timeout_s = 60", "items_per_request = { start = 1, min = 1, max = 1 }\nconcurrency = { start = 2, min = 1, max = 16 }", "");
    let child = spawn_run(&fx, &[], &[]);
    until_requests(&fake, 2).await;
    signal(&child, "INT");
    let output = wait(child).await;
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    let pool = fx.pool().await;
    let saved: String = sqlx::query_scalar("SELECT controller_state FROM backfill_runs").fetch_one(&pool).await.unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&saved).unwrap();
    assert!(state["delay"]["settled"].is_u64(), "the level is saved: {state}");
    // As a longer run would have found it: 12 at a time, sending 20 requests a second.
    state["delay"] = serde_json::json!({ "settled": 12, "bracketed": true });
    state["probed_requests_per_second"] = serde_json::json!(20.0);
    sqlx::query("UPDATE backfill_runs SET controller_state = ?").bind(state.to_string()).execute(&pool).await.unwrap();
    pool.close().await;
    let before = fake.records().len();
    let resumed = wait(spawn_run(&fx, &["--resume"], &[])).await;
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert!(stderr(&resumed).contains("it goes on with 12 at a time"), "{}", stderr(&resumed));
    // Every answer takes 3 s: what went out before the first one came back is the level the
    // run started at (a fresh start sends 2: requests of one item have no small first one).
    let records = fake.records();
    let start = records[before].at;
    let first_round = records[before..].iter().filter(|r| r.at < start + Duration::from_millis(2500)).count();
    assert_eq!(first_round, 12, "requests in the first round");
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM items WHERE summary IS NOT NULL").await, 30);
}

/// A fresh run starts at the requests in flight the job's last run on the same server had
/// settled on (kept in that run's saved state, with the server it was found on), instead of
/// climbing from `concurrency.start` again.
#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_run_starts_where_the_jobs_last_run_on_this_server_settled() {
    let fx = Fixture::new(30).await;
    let fake = FakeProvider::start_with_latency(vec![], vec![], 56, (3000, 3000)).await;
    fx.write_job(&fake.base_url(), "request_timeout_s = 60", "items_per_request = { start = 1, min = 1, max = 1 }\nconcurrency = { start = 2, min = 1, max = 16 }", "");
    let first = wait(spawn_run(&fx, &["--limit", "4"], &[])).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let pool = fx.pool().await;
    let saved: String = sqlx::query_scalar("SELECT controller_state FROM backfill_runs").fetch_one(&pool).await.unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&saved).unwrap();
    assert!(state["delay"]["settled"].is_u64(), "the level is saved: {state}");
    let server = state["server"].as_str().unwrap_or_default().to_owned();
    assert!(fake.base_url().starts_with(&server) && !server.is_empty(), "the server is saved: {state}");
    // As a longer run would have found it: 12 at a time.
    state["delay"] = serde_json::json!({ "settled": 12, "bracketed": true });
    sqlx::query("UPDATE backfill_runs SET controller_state = ?").bind(state.to_string()).execute(&pool).await.unwrap();
    pool.close().await;
    let before = fake.records().len();
    let second = wait(spawn_run(&fx, &[], &[])).await;
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    assert!(stderr(&second).contains("settled on 12 requests in flight"), "{}", stderr(&second));
    // Every answer takes 3 s. The first round is the job's start (2: requests of one item
    // have no small first one, and no latency is known before an answer); the second, paced
    // by the probed rate, climbs to the twelve the last run had settled on, where a run
    // without them doubles to 4.
    let records = fake.records();
    let start = records[before].at;
    let round = |from: u64, to: u64| {
        records[before..]
            .iter()
            .filter(|r| r.at >= start + Duration::from_millis(from) && r.at < start + Duration::from_millis(to))
            .count()
    };
    assert_eq!(round(0, 2500), 2, "requests in the first round");
    assert!(round(2500, 5500) >= 8, "requests in the second round: {}", round(2500, 5500));
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM items WHERE summary IS NOT NULL").await, 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_past_the_grace_period_abandons_calls_as_possibly_billed() {
    let fx = Fixture::new(30).await;
    let fake = FakeProvider::start_with_latency(vec![], vec![], 52, (6000, 6000)).await;
    fx.write_job(&fake.base_url(), "request_timeout_s = 30", "grace_seconds = 0.5", "");
    let child = spawn_run(&fx, &[], &[]);
    until_requests(&fake, 1).await;
    signal(&child, "TERM");
    let output = wait(child).await;
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_items WHERE state = 'leased'").await, 0);
    let lost = scalar(&fx, "SELECT COUNT(*) FROM backfill_calls WHERE state = 'lost'").await;
    assert!(lost >= 1, "abandoned calls count as possibly billed");
    assert!(scalar(&fx, "SELECT lost_picos FROM backfill_runs").await > 0);
    let status = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap()], &[]).await;
    assert!(stdout(&status).contains("possibly billed"), "{}", stdout(&status));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_aborts_at_once_and_resume_recovers_the_leases() {
    let fx = Fixture::new(30).await;
    let fake = FakeProvider::start_with_latency(vec![], vec![], 53, (5000, 5000)).await;
    fx.write_job(&fake.base_url(), "request_timeout_s = 30", "", "");
    let child = spawn_run(&fx, &[], &[]);
    until_requests(&fake, 1).await;
    signal(&child, "INT");
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&child, "INT");
    let started = std::time::Instant::now();
    let output = wait(child).await;
    assert!(started.elapsed() < Duration::from_secs(3), "the second signal did not abort at once");
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    assert!(scalar(&fx, "SELECT COUNT(*) FROM backfill_items WHERE state = 'leased'").await > 0);
    // The dead owner is provably gone: its items return to the queue at once on --resume.
    let resumed = wait(spawn_run(&fx, &["--resume"], &[])).await;
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM items WHERE summary IS NOT NULL").await, 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_process_on_the_same_sqlite_run_refuses_clearly() {
    let fx = Fixture::new(40).await;
    let fake = FakeProvider::start_with_latency(vec![], vec![], 54, (800, 800)).await;
    fx.write_job(&fake.base_url(), "", "concurrency = { start = 1, min = 1, max = 1 }", "");
    let first = spawn_run(&fx, &[], &[]);
    until_requests(&fake, 1).await;
    let second = backfill_async(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--resume"], &[]).await;
    assert_eq!(second.status.code(), Some(2), "{}", stderr(&second));
    assert!(stderr(&second).contains("being worked on by another process"), "{}", stderr(&second));
    // Refused, it changes nothing of the run: not its cap, not how many items it holds.
    let changing = backfill_async(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--resume", "--max-usd", "0.01", "--limit", "5"], &[]).await;
    assert_eq!(changing.status.code(), Some(2), "{}", stderr(&changing));
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_runs WHERE max_usd IS NOT NULL OR item_limit IS NOT NULL").await, 0);
    let output = wait(first).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM items WHERE summary IS NOT NULL").await, 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn abandon_lets_a_new_run_start() {
    let fx = Fixture::new(20).await;
    let fake = FakeProvider::start_with_latency(vec![], vec![], 55, (3000, 3000)).await;
    fx.write_job(&fake.base_url(), "", "", "");
    let mut child = spawn_run(&fx, &[], &[]);
    until_requests(&fake, 1).await;
    // Not while a process works on it.
    let refused = backfill_async(fx.dir.path(), &["abandon", fx.job.to_str().unwrap()], &[]).await;
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("being worked on") && stderr(&refused).contains("stop it first"), "{}", stderr(&refused));
    child.kill().unwrap();
    child.wait().unwrap();
    // `status` tells at once that nobody works on the run any more, though the dead process's
    // lease has not run out: no live worker, no call in flight, its calls possibly billed.
    let status = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap(), "--json"], &[]).await;
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let status: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(status["status"], "interrupted", "{status}");
    assert_eq!(status["live_workers"], 0, "{status}");
    assert_eq!(status["workers"][0]["alive"], false, "{status}");
    assert_eq!(status["calls"]["in_flight"], 0, "{status}");
    assert!(status["calls"]["possibly_billed"].as_u64().unwrap() >= 1, "{status}");
    let human = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap()], &[]).await;
    assert!(stdout(&human).contains("`backfill run --resume` continues it"), "{}", stdout(&human));
    let abandoned = backfill_async(fx.dir.path(), &["abandon", fx.job.to_str().unwrap()], &[]).await;
    assert_eq!(abandoned.status.code(), Some(0), "{}", stderr(&abandoned));
    // The killed process's calls in flight count as possibly billed; nothing stays leased.
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_calls WHERE run_id = 1 AND state = 'reserved'").await, 0);
    assert!(scalar(&fx, "SELECT COUNT(*) FROM backfill_calls WHERE run_id = 1 AND state = 'lost'").await >= 1);
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_items WHERE run_id = 1 AND state = 'leased'").await, 0);
    let fresh = wait(spawn_run(&fx, &[], &[])).await;
    assert_eq!(fresh.status.code(), Some(0), "{}", stderr(&fresh));
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_runs").await, 2);
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM items WHERE summary IS NOT NULL").await, 20);
}

/// A run's ids are enqueued a chunk a transaction; a process killed between two chunks leaves a
/// run half enqueued, which the next `run` (with or without `--resume`) enqueues on from where
/// it stopped: one run, every pending row in it once, in id order.
#[tokio::test(flavor = "multi_thread")]
async fn a_kill_during_the_enqueue_is_taken_over_from_where_it_stopped() {
    let rows = 240;
    for resume in [false, true] {
        let fx = Fixture::new(rows).await;
        let fake = FakeProvider::start(vec![], vec![], 57).await;
        fx.write_job(&fake.base_url(), "", "", "");
        let chunked = [("BACKFILL_ENQUEUE_CHUNK", "50")];
        let crash = [chunked[0], ("BACKFILL_FAILPOINT_CRASH", "enqueue_chunk:2")];
        let crashed = wait(spawn_run(&fx, &[], &crash)).await;
        assert_eq!(crashed.status.code(), None, "the process should have aborted\n{}", stderr(&crashed));
        assert!(stderr(&crashed).contains("crash point enqueue_chunk"), "{}", stderr(&crashed));
        // Three chunks were committed: the first with the run, two more.
        assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_items").await, 150);
        assert_eq!(scalar(&fx, "SELECT total_items FROM backfill_runs").await, 150);
        assert_eq!(scalar(&fx, "SELECT enqueued FROM backfill_runs").await, 0);
        assert!(fake.records().is_empty(), "nothing is sent before the run is enqueued");
        let extra: &[&str] = if resume { &["--resume"] } else { &[] };
        let output = wait(spawn_run(&fx, extra, &chunked)).await;
        assert_eq!(output.status.code(), Some(0), "resume {resume}: {}", stderr(&output));
        assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_runs").await, 1);
        assert_eq!(scalar(&fx, "SELECT total_items FROM backfill_runs").await, rows as i64);
        let states = fx.item_states().await;
        assert_eq!(states.len(), rows);
        assert!(states.iter().all(|(_, s, _, _)| s == "done"), "{states:?}");
        // Queue order is id order across the chunks of both processes.
        let out_of_order = scalar(
            &fx,
            "SELECT COUNT(*) FROM (SELECT CAST(item_id AS INTEGER) AS id, LAG(CAST(item_id AS INTEGER)) OVER (ORDER BY seq) AS before \
             FROM backfill_items) q WHERE id <= before",
        )
        .await;
        assert_eq!(out_of_order, 0);
        assert_eq!(scalar(&fx, "SELECT MAX(seq) - MIN(seq) + 1 FROM backfill_items").await, rows as i64);
        assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM items WHERE summary IS NOT NULL").await, rows as i64);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_identical_request_is_answered_from_the_cache_unless_no_cache() {
    let fx = Fixture::new(40).await;
    let fake = FakeProvider::start(vec![], vec![], 56).await;
    // One request at a time in a fixed size, so the second run packs exactly the same prompts.
    fx.write_job(&fake.base_url(), "", "items_per_request = { start = 10, min = 10, max = 10 }\nconcurrency = { start = 1, min = 1, max = 1 }", "");
    let first = wait(spawn_run(&fx, &[], &[])).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let sent = fake.records().len();
    assert_eq!(sent, 4);

    // The outputs are lost (say, the target column was cleared): the same requests again.
    let pool = fx.pool().await;
    sqlx::query("UPDATE items SET summary = NULL").execute(&pool).await.unwrap();
    pool.close().await;
    let second = wait(spawn_run(&fx, &[], &[])).await;
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    assert_eq!(fake.records().len(), sent, "an answer already paid for was bought again");
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM backfill_calls WHERE run_id = 2 AND outcome = 'cached' AND cost_picos = 0").await, 4);
    assert_eq!(scalar(&fx, "SELECT COUNT(*) FROM items WHERE summary IS NOT NULL").await, 40);

    let pool = fx.pool().await;
    sqlx::query("UPDATE items SET summary = NULL").execute(&pool).await.unwrap();
    pool.close().await;
    let third = wait(spawn_run(&fx, &["--no-cache"], &[])).await;
    assert_eq!(third.status.code(), Some(0), "{}", stderr(&third));
    assert_eq!(fake.records().len(), sent * 2, "--no-cache sends every request");
}
