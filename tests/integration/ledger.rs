//! The cost ledger against the provider's own account: over many calls with retries and
//! failures, every answered call costs exactly its usage × the job's price — or, when the
//! provider reports a cost (as OpenRouter does), exactly that figure, flagged as such — and
//! `status` adds it up per run, per model and per job.

use serde_json::Value;

use crate::support::*;
use backfill::pricing::Picos;

/// The ledger's total if it took the provider's `usage.cost` where sent and usage × price
/// elsewhere; and how many answers carried a cost.
fn provider_account(fake: &FakeProvider) -> (i64, usize) {
    let mut cost = 0;
    let mut reported = 0;
    for record in fake.records() {
        match (record.usage, record.reported_cost) {
            (Some(_), Some(usd)) => {
                cost += Picos::from_usd(usd).0;
                reported += 1;
            }
            (Some((p, c, k)), None) => cost += fixture_cost(p, c, k),
            _ => {}
        }
    }
    (cost, reported)
}

async fn status_json(fx: &Fixture, extra: &[&str]) -> Value {
    let job = fx.job.to_str().unwrap().to_owned();
    let mut args = vec!["status", job.as_str(), "--json"];
    args.extend_from_slice(extra);
    let output = backfill_async(fx.dir.path(), &args, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    serde_json::from_str(&stdout(&output)).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ledger_is_usage_times_price_or_the_providers_own_cost_to_the_picodollar() {
    let fx = Fixture::new(400).await;
    let faults = vec![
        (0.30, Reply::ReportedCost),
        (0.05, Reply::ServerError(500)),
        (0.05, Reply::Malformed),
        (0.05, Reply::DropIds(2)),
        (0.05, Reply::Truncated),
        (0.04, Reply::RateLimited { retry_after_s: 0.1 }),
    ];
    let fake = FakeProvider::start(vec![], faults, 51).await;
    fx.write_job(&fake.base_url(), "", "", "");
    let job = fx.job.to_str().unwrap().to_owned();

    let first = backfill_async(fx.dir.path(), &["run", &job, "--json", "--quiet", "--limit", "200"], &[]).await;
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let first: Value = serde_json::from_str(&stdout(&first)).unwrap();
    let (account_first, _) = provider_account(&fake);
    let second = backfill_async(fx.dir.path(), &["run", &job, "--json", "--quiet"], &[]).await;
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    let second: Value = serde_json::from_str(&stdout(&second)).unwrap();

    let (account, reported) = provider_account(&fake);
    let (calls, prompt, completion, ledger) = fx.ledger_totals().await;
    assert!(reported > 5 && (reported as i64) < calls, "{reported} of {calls} calls reported a cost");
    assert_eq!(ledger, account, "the ledger differs from the provider's account");
    let answered: Vec<_> = fake.records().iter().filter_map(|r| r.usage).collect();
    assert_eq!((prompt, completion), (answered.iter().map(|u| u.0).sum(), answered.iter().map(|u| u.1).sum()));
    // Taking usage × price for the reported calls too would give another figure.
    let priced: i64 = answered.iter().map(|&(p, c, k)| fixture_cost(p, c, k)).sum();
    assert_ne!(ledger, priced, "the test cannot tell the provider's cost from usage × price");

    // Per run: each run's summary is its own ledger share, to the picodollar.
    assert_eq!(Picos::from_usd(first["cost_usd"].as_f64().unwrap()).0, account_first);
    assert_eq!(Picos::from_usd(second["cost_usd"].as_f64().unwrap()).0, account - account_first);

    // Per model and per job in `status --json`, the provider-costed calls flagged.
    let status = status_json(&fx, &[]).await;
    let model = &status["models"][0];
    assert_eq!(model["model"], "fake-model");
    assert_eq!(Picos::from_usd(model["cost_usd"].as_f64().unwrap()).0, account - account_first);
    let totals = &status["job_totals"];
    assert_eq!(totals["runs"], 2);
    assert_eq!(Picos::from_usd(totals["cost_usd"].as_f64().unwrap()).0, account);
    assert_eq!(totals["models"][0]["provider_costed_calls"], reported);
    let pool = fx.pool().await;
    let flagged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM backfill_calls WHERE cost_source = 'provider'").fetch_one(&pool).await.unwrap();
    assert_eq!(flagged as usize, reported);
    // The first run, asked for by id.
    let earlier = status_json(&fx, &[]).await["earlier_runs"][0]["run_id"].as_i64().unwrap();
    let report = backfill_async(fx.dir.path(), &["report", &job, "--json", "--run", &earlier.to_string()], &[]).await;
    let report: Value = serde_json::from_str(&stdout(&report)).unwrap();
    assert_eq!(Picos::from_usd(report["cost_usd"].as_f64().unwrap()).0, account_first);
}
