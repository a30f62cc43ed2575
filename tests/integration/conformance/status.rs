//! What `status` and `report` read back: counts, cost per model, calls, workers and their share,
//! the ledger rows, the run's status rules, the controller state, and inspect's errors.

use std::sync::Arc;

use backfill::exit::UsageError;
use backfill::ident::Ident;
use backfill::store::RunStatus;

use super::*;

conformance!(
    status_shows_counts_money_calls_and_each_workers_share,
    finished_only_sticks_when_nothing_is_open,
    inspect_names_a_missing_table_or_column_and_a_bad_predicate,
    the_latest_run_or_trial_of_a_job_measures_its_model,
    earlier_runs_controller_states_come_newest_first,
);

async fn status_shows_counts_money_calls_and_each_workers_share(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 6).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    for (name, take, cost) in [("a", 4, 300), ("b", 2, 100)] {
        let w = worker(name);
        db.store.attach(run.id, &w, LEASE, false).await.unwrap();
        let claimed = db.store.claim(&t, run.id, &w, take, LEASE).await.unwrap().items;
        let call = reserve(&db, run.id, &w, &claimed, 1000).await;
        db.store.write_batch(&t, &batch(run.id, call, settled(cost, take as u32), done_all(&claimed, name))).await.unwrap();
    }
    db.store.save_controller_state(run.id, "{\"version\": 1}").await.unwrap();
    let report = db.store.status("conformance", None).await.unwrap().expect("a run");
    assert_eq!(report.run.id, run.id);
    assert_eq!(report.run.controller_state.as_deref(), Some("{\"version\": 1}"));
    assert_eq!((report.counts.done, report.counts.total()), (6, 6), "{}", db.backend);
    assert_eq!(report.spend.spent.0, 400);
    assert_eq!(report.models.len(), 1);
    let m = &report.models[0];
    assert_eq!((m.model.as_str(), m.calls, m.prompt_tokens, m.completion_tokens, m.cost.0), ("m", 2, 200, 80, 400));
    assert_eq!((report.calls.total, report.calls.in_flight, report.calls.items_sent), (2, 0, 6));
    assert_eq!(report.calls.by_outcome, [("ok".to_string(), 2)]);
    let shares: Vec<(&str, u64, u64, bool)> =
        report.workers.iter().map(|w| (w.worker.as_str(), w.items_done, w.calls, w.alive)).collect();
    assert_eq!(shares, [("host-a/1/1", 4, 1, true), ("host-b/1/1", 2, 1, true)]);
    let rows = db.store.calls(run.id).await.unwrap();
    assert_eq!(rows.iter().map(|r| (r.items, r.items_ok, r.cost.0)).collect::<Vec<_>>(), [(4, 4, 300), (2, 2, 100)]);
    assert_eq!(db.store.output_tokens_per_item("conformance", "m").await.unwrap(), Some(80.0 / 6.0));
    assert_eq!(db.store.output_tokens_per_item("conformance", "another-model").await.unwrap(), None, "calibration is per model");
}

async fn finished_only_sticks_when_nothing_is_open(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 2).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let a = worker("a");
    assert_eq!(db.store.set_status(run.id, RunStatus::Finished, None).await.unwrap(), RunStatus::Running, "{}", db.backend);
    let claimed = db.store.claim(&t, run.id, &a, 2, LEASE).await.unwrap().items;
    let call = reserve(&db, run.id, &a, &claimed, 10).await;
    db.store.write_batch(&t, &batch(run.id, call, settled(5, 2), done_all(&claimed, "x"))).await.unwrap();
    assert_eq!(db.store.set_status(run.id, RunStatus::Finished, None).await.unwrap(), RunStatus::Finished);
    let run = db.store.latest_run("conformance").await.unwrap().unwrap();
    assert!(run.finished_at.is_some());
    assert!(!run.status.is_unfinished());
    let interrupted = new_run(&db, &t, None).await;
    assert_eq!(interrupted.total_items, 0, "nothing is pending any more");
    let stored = db.store.set_status(interrupted.id, RunStatus::Budget, Some("the cap")).await.unwrap();
    assert_eq!(stored, RunStatus::Budget);
    assert_eq!(db.store.latest_run("conformance").await.unwrap().unwrap().last_error.as_deref(), Some("the cap"));
}

async fn inspect_names_a_missing_table_or_column_and_a_bad_predicate(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 1).await;
    let usage = |e: anyhow::Error| e.downcast_ref::<UsageError>().map(|u| u.0.clone()).unwrap_or_else(|| format!("not a usage error: {e:#}"));
    let missing_table = db.store.inspect(&tables("nope")).await.unwrap_err();
    let message = usage(missing_table);
    assert!(message.contains("`source.table`") && message.contains("nope"), "{}: {message}", db.backend);
    let mut t = tables("items");
    t.columns.push(Ident::column("titel").unwrap());
    let message = usage(db.store.inspect(&t).await.unwrap_err());
    assert!(message.contains("no column titel") && message.contains("title"), "{}: {message}", db.backend);
    let mut t = tables("items");
    t.pending = "summary IS NUL".into();
    let message = usage(db.store.inspect(&t).await.unwrap_err());
    assert!(message.contains("`source.pending`"), "{}: {message}", db.backend);
}

async fn the_latest_run_or_trial_of_a_job_measures_its_model(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 4).await;
    let t = tables("items");
    let run = new_run(&db, &t, None).await;
    let w = worker("a");
    db.store.attach(run.id, &w, LEASE, false).await.unwrap();
    let claimed = db.store.claim(&t, run.id, &w, 4, LEASE).await.unwrap().items;
    let call = reserve(&db, run.id, &w, &claimed, 1000).await;
    db.store.write_batch(&t, &batch(run.id, call, settled(300, 4), done_all(&claimed, "a"))).await.unwrap();
    let jobs = ["conformance", "conformance:trial"];
    let m = db.store.latest_measure(jobs, "m").await.unwrap().expect("the run measured m");
    assert_eq!((m.run_id, m.calls, m.items, m.items_answered, m.items_ok, m.completion_tokens), (run.id, 1, 4, 4, 4, 40), "{}", db.backend);
    assert!(m.last_ended_at >= m.first_started_at + 120, "{m:?}");
    assert_eq!(db.store.latest_measure(jobs, "another-model").await.unwrap(), None, "per model");

    // A later trial — a run of its own under `<job>:trial`, holding no items — is the latest.
    let new = NewRun { job: "conformance:trial".into(), target: "t".into(), limit: Some(0), ..Default::default() };
    let trial = match db.store.create_run(&new, &t).await.unwrap() {
        Created::New(trial) => trial,
        other => panic!("{}: {other:?}", db.backend),
    };
    assert_eq!(trial.total_items, 0);
    let call = NewCall { item_ids: vec!["1".into(), "2".into()], ..new_call(trial.id, &w, &[], 10, None) };
    let call = db.store.reserve_call(&call, None).await.unwrap().expect("no cap");
    let settle = CallSettle {
        usage: backfill::pricing::Usage { prompt_tokens: 50, completion_tokens: 90, cached_tokens: 0 },
        items_rejected: 1,
        ..settled(20, 1)
    };
    db.store.write_batch(&t, &batch(trial.id, call, settle, Vec::new())).await.unwrap();
    let m = db.store.latest_measure(jobs, "m").await.unwrap().expect("the trial measured m");
    assert_eq!(
        (m.run_id, m.job.as_str(), m.items, m.items_answered, m.items_ok, m.completion_tokens),
        (trial.id, "conformance:trial", 2, 2, 1, 90),
        "{}",
        db.backend
    );
    assert_eq!(db.store.item_counts(trial.id).await.unwrap().total(), 0, "a trial holds no items");
}

/// The controller states a new run of a job looks through for where its server was found:
/// the job's earlier runs that saved one, newest first, no other job's.
async fn earlier_runs_controller_states_come_newest_first(db: Arc<Db>) {
    db.source_table("items", Ids::Integer, 2).await;
    let t = tables("items");
    db.store.migrate().await.unwrap();
    let mut ids = Vec::new();
    for (job, state) in [("conformance", Some("a")), ("other", Some("x")), ("conformance", None), ("conformance", Some("b")), ("conformance", None)] {
        let new = NewRun { job: job.into(), target: "t".into(), limit: Some(0), ..Default::default() };
        let run = match db.store.create_run(&new, &t).await.unwrap() {
            Created::New(run) => run,
            other => panic!("{}: {other:?}", db.backend),
        };
        if let Some(state) = state {
            db.store.save_controller_state(run.id, state).await.unwrap();
        }
        assert_eq!(db.store.set_status(run.id, RunStatus::Finished, None).await.unwrap(), RunStatus::Finished, "{}", db.backend);
        ids.push(run.id);
    }
    let last = ids[4];
    assert_eq!(db.store.earlier_controller_states("conformance", last, 10).await.unwrap(), ["b", "a"], "{}", db.backend);
    assert_eq!(db.store.earlier_controller_states("conformance", last, 1).await.unwrap(), ["b"]);
    assert_eq!(db.store.earlier_controller_states("conformance", ids[3], 10).await.unwrap(), ["a"], "before the run only");
    assert_eq!(db.store.earlier_controller_states("other", last, 10).await.unwrap(), ["x"]);
    assert!(db.store.earlier_controller_states("nobody", last, 10).await.unwrap().is_empty());
}
