//! Bad job files: a bad job gives exit 2 and a message naming the key and the fix,
//! before anything is sent or written.

use crate::support::*;

fn run_bad(fx: &Fixture, job_text: &str) -> (Option<i32>, String) {
    std::fs::write(&fx.job, job_text).unwrap();
    let output = backfill(fx.dir.path(), &["run", fx.job.to_str().unwrap()], &[]);
    (output.status.code(), stderr(&output))
}

fn good_job(fx: &Fixture) -> String {
    fx.write_job("http://127.0.0.1:9/v1", "", "", "");
    std::fs::read_to_string(&fx.job).unwrap()
}

#[tokio::test]
async fn unknown_keys_are_named_with_the_expected_ones() {
    let fx = Fixture::new(1).await;
    let job = good_job(&fx).replace("columns = [", "colums = [");
    let (code, err) = run_bad(&fx, &job);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("source.colums") && err.contains("expected one of"), "{err}");
}

#[tokio::test]
async fn a_missing_template_file_names_the_key() {
    let fx = Fixture::new(1).await;
    let job = good_job(&fx).replace("prompt.md", "nowhere.md");
    let (code, err) = run_bad(&fx, &job);
    assert_eq!(code, Some(2));
    assert!(err.contains("prompt.template") && err.contains("nowhere.md"), "{err}");
}

#[tokio::test]
async fn a_model_without_a_price_stops_before_any_call() {
    let fx = Fixture::new(1).await;
    let job = good_job(&fx).replace("[pricing.fake-model]", "[pricing.other-model]");
    let (code, err) = run_bad(&fx, &job);
    assert_eq!(code, Some(2));
    assert!(err.contains("no price for model `fake-model`") && err.contains("--allow-unpriced"), "{err}");
}

#[tokio::test]
async fn a_model_name_one_edit_from_a_priced_one_gets_a_suggestion() {
    let fx = Fixture::new(1).await;
    let job = good_job(&fx).replace("name = \"fake-model\"", "name = \"fake-modle\"");
    assert!(job.contains("fake-modle"), "{job}");
    let (code, err) = run_bad(&fx, &job);
    assert_eq!(code, Some(2));
    assert!(err.contains("no price for model `fake-modle`: did you mean `fake-model`?"), "{err}");
}

#[tokio::test]
async fn a_table_that_does_not_exist_is_named_with_the_tables_that_do() {
    let fx = Fixture::new(1).await;
    let job = good_job(&fx).replace("table = \"items\"", "table = \"itmes\"");
    let (code, err) = run_bad(&fx, &job);
    assert_eq!(code, Some(2));
    assert!(err.contains("table itmes does not exist") && err.contains("it has tables: items"), "{err}");
}

#[tokio::test]
async fn bad_identifiers_are_refused() {
    let fx = Fixture::new(1).await;
    let job = good_job(&fx).replace("table = \"items\"", "table = \"items; DROP TABLE items\"");
    let (code, err) = run_bad(&fx, &job);
    assert_eq!(code, Some(2));
    assert!(err.contains("source.table") && err.contains("not a plain SQL identifier"), "{err}");
}

#[tokio::test]
async fn a_bad_pending_predicate_names_the_key_and_writes_nothing() {
    let fx = Fixture::new(3).await;
    let job = good_job(&fx).replace("summary IS NULL", "summary IS NUL");
    let (code, err) = run_bad(&fx, &job);
    assert_eq!(code, Some(2));
    assert!(err.contains("source.pending"), "{err}");
    let pool = fx.pool().await;
    let runs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM backfill_runs").fetch_one(&pool).await.unwrap();
    assert_eq!(runs, 0);
}

#[tokio::test]
async fn a_missing_table_or_column_is_named() {
    let fx = Fixture::new(1).await;
    let (code, err) = run_bad(&fx, &good_job(&fx).replace("table = \"items\"", "table = \"motions\""));
    assert_eq!(code, Some(2));
    assert!(err.contains("source.table") && err.contains("motions"), "{err}");
    let (code, err) = run_bad(&fx, &good_job(&fx).replace("\"body\"]", "\"text\"]"));
    assert_eq!(code, Some(2));
    assert!(err.contains("source.columns") && err.contains("has no column text"), "{err}");
}

#[tokio::test]
async fn an_unset_variable_is_named() {
    let fx = Fixture::new(1).await;
    let job = good_job(&fx).replace("http://127.0.0.1:9/v1", "${BACKFILL_TEST_UNSET_URL}");
    let (code, err) = run_bad(&fx, &job);
    assert_eq!(code, Some(2));
    assert!(err.contains("model.base_url") && err.contains("BACKFILL_TEST_UNSET_URL"), "{err}");
}

#[tokio::test]
async fn a_missing_database_file_is_named() {
    let fx = Fixture::new(1).await;
    let job = good_job(&fx).replace("source.db", "elsewhere.db");
    let (code, err) = run_bad(&fx, &job);
    assert_eq!(code, Some(2));
    assert!(err.contains("elsewhere.db"), "{err}");
}

#[tokio::test]
async fn an_unreachable_provider_stops_the_run_with_a_clear_message_and_loses_nothing() {
    let fx = Fixture::new(5).await;
    // No outage is ridden out: the run stops as soon as the breaker has seen enough.
    fx.write_job("http://127.0.0.1:9/v1", "", "outage_window_s = 0", "");
    let output = backfill(fx.dir.path(), &["run", fx.job.to_str().unwrap(), "--quiet"], &[]);
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot reach the provider") && err.contains("--resume"), "{err}");
    let states = fx.item_states().await;
    assert!(states.iter().all(|(_, s, attempts, _)| s == "pending" && *attempts == 0), "{states:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_outage_is_ridden_out_and_the_run_finishes_when_it_is_back() {
    let fx = Fixture::new(12).await;
    // A port nobody listens on yet: the provider is down when the run starts.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    // Two items a request: six requests fail at once, enough for the breaker to call it an outage.
    fx.write_job(&format!("http://127.0.0.1:{port}/v1"), "", "outage_window_s = 120\nitems_per_request = { start = 2, min = 1, max = 2 }", "");
    let job = fx.job.to_str().unwrap().to_owned();
    let dir = fx.dir.path().to_path_buf();
    let run = tokio::task::spawn_blocking(move || backfill(&dir, &["run", &job, "--json", "--quiet"], &[]));
    // The provider comes up on that port after some seconds.
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is still free");
    let fake = FakeProvider::start_on(listener, 77).await;
    let output = run.await.unwrap();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{err}");
    assert!(err.contains("riding out the outage for up to 120 s"), "{err}");
    assert!(err.contains("answers again after an outage of"), "{err}");
    let summary: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(summary["items"]["done"], 12, "{summary}");
    assert!(!fake.records().is_empty());
    // The outage cost the items no attempt.
    let states = fx.item_states().await;
    assert!(states.iter().all(|(_, s, _, _)| s == "done"), "{states:?}");
}
