//! Read-only queries behind `status` and `report`.

use sqlx::PgPool;

use super::runs::run_from_row;
use super::{PgStore, db_now_ms};
use crate::pricing::Picos;
use crate::store::{pg_sum, HISTORY, CallRow, CallStats, ItemCounts, JobTotals, ModelCost, RunRecord, StatusReport, WorkerRow};

pub(super) async fn item_counts(pool: &PgPool, run_id: i64) -> Result<ItemCounts, sqlx::Error> {
    super::queue::counts(&mut *pool.acquire().await?, run_id).await
}

pub(super) async fn status(store: &PgStore, job: &str, run: Option<i64>) -> anyhow::Result<Option<StatusReport>> {
    let pool = &store.pool;
    let e = |e| store.err(e);
    let columns = super::runs::RUN_COLUMNS;
    let chosen = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {columns} FROM backfill_runs WHERE job = $1 AND ($2 IS NULL OR id = $2) ORDER BY id DESC LIMIT 1"
    )))
    .bind(job)
    .bind(run)
    .fetch_optional(pool)
    .await
    .map_err(e)?;
    let chosen: Option<RunRecord> = chosen.as_ref().map(run_from_row).transpose().map_err(e)?;
    let Some(chosen) = chosen else { return Ok(None) };
    let run_id = chosen.id;

    let counts = item_counts(pool, run_id).await.map_err(e)?;
    let spend = super::ledger::spend(store, run_id).await?;
    let models = model_costs(store, Scope::Run(run_id)).await?;
    let reasons: Vec<(String, String, i64, Option<String>)> = sqlx::query_as(
        "SELECT state, COALESCE(reason, 'unknown'), COUNT(*), MAX(last_error) FROM backfill_items \
         WHERE run_id = $1 AND state IN ('failed', 'rejected') GROUP BY state, reason ORDER BY COUNT(*) DESC, reason",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
    .map_err(e)?;
    let outcomes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT COALESCE(outcome, state), COUNT(*) FROM backfill_calls WHERE run_id = $1 \
         GROUP BY COALESCE(outcome, state) ORDER BY COUNT(*) DESC",
    )
    .bind(run_id)
    .fetch_all(pool)
    .await
    .map_err(e)?;
    let (total, in_flight, lost, items_sent, first, last): (i64, i64, i64, i64, Option<i64>, Option<i64>) =
        sqlx::query_as(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE state = 'reserved'), COUNT(*) FILTER (WHERE state = 'lost'), \
             COALESCE(SUM(items), 0)::bigint, MIN(started_at), MAX(started_at + COALESCE(latency_ms, 0)) \
             FROM backfill_calls WHERE run_id = $1",
        )
        .bind(run_id)
        .fetch_one(pool)
        .await
        .map_err(e)?;
    // The columns of migration 3; a read-only `status` may look at a database no newer
    // backfill has migrated yet.
    let checked: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.columns WHERE table_schema = current_schema() \
         AND table_name = 'backfill_calls' AND column_name IN ('usage_flag', 'repair')",
    )
    .fetch_one(pool)
    .await
    .map_err(e)?;
    let (usage_distrusted, answers_repaired): (i64, i64) = if checked == 2 {
        sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE usage_flag IS NOT NULL), COUNT(*) FILTER (WHERE repair IS NOT NULL) \
             FROM backfill_calls WHERE run_id = $1",
        )
        .bind(run_id)
        .fetch_one(pool)
        .await
        .map_err(e)?
    } else {
        (0, 0)
    };
    let calls = CallStats {
        usage_distrusted: usage_distrusted as u64,
        answers_repaired: answers_repaired as u64,
        total: total as u64,
        by_outcome: outcomes.into_iter().map(|(o, n)| (o, n as u64)).collect(),
        in_flight: in_flight as u64,
        lost: lost as u64,
        items_sent: items_sent as u64,
        first_started_at: first,
        last_finished_at: last,
    };
    let workers: Vec<(String, i64, i64, bool, i64, i64)> = sqlx::query_as(concat!(
        "SELECT w.worker, w.attached_at, w.heartbeat_at, w.detached_at IS NULL AND w.expires_at > ",
        db_now_ms!(),
        ", (SELECT COUNT(*) FROM backfill_items i WHERE i.run_id = w.run_id AND i.done_by = w.worker), \
         (SELECT COUNT(*) FROM backfill_calls c WHERE c.run_id = w.run_id AND c.worker = w.worker) \
         FROM backfill_workers w WHERE w.run_id = $1 ORDER BY w.attached_at"
    ))
    .bind(run_id)
    .fetch_all(pool)
    .await
    .map_err(e)?;
    let workers = workers
        .into_iter()
        .map(|(worker, attached_at, heartbeat_at, alive, done, calls)| WorkerRow {
            worker,
            attached_at,
            heartbeat_at,
            alive,
            items_done: done as u64,
            calls: calls as u64,
        })
        .collect();
    let job_totals = job_totals(store, job).await?;
    let history = history(store, job, run_id, Some(HISTORY)).await?;
    Ok(Some(StatusReport {
        run: chosen,
        counts,
        spend,
        models,
        reason_errors: reasons
            .iter()
            .filter_map(|(s, r, _, error)| error.clone().map(|error| (s.clone(), r.clone(), error)))
            .collect(),
        reasons: reasons.into_iter().map(|(s, r, n, _)| (s, r, n as u64)).collect(),
        calls,
        workers,
        history,
        job_totals,
        batches: super::batches::batches(store, run_id).await?,
    }))
}

/// Runs of the job before `before`, newest first, with what each spent (`limit`: at most that many).
pub(super) async fn history(store: &PgStore, job: &str, before: i64, limit: Option<u64>) -> anyhow::Result<Vec<(RunRecord, Picos)>> {
    let mut history = Vec::new();
    for r in super::runs::earlier_runs(store, job, before, limit).await? {
        let spent = super::ledger::spend(store, r.id).await?.spent;
        history.push((r, spent));
    }
    Ok(history)
}

/// model, calls, prompt, completion and cached tokens, cost, provider-costed, estimate-costed.
type ModelRow = (String, i64, i64, i64, i64, i64, i64, i64);

/// Which calls a total covers.
enum Scope<'a> {
    Run(i64),
    Job(&'a str),
}

/// Cost and tokens per model over the settled calls of a run or of all a job's runs.
async fn model_costs(store: &PgStore, scope: Scope<'_>) -> anyhow::Result<Vec<ModelCost>> {
    let filter = match scope {
        Scope::Run(_) => "c.run_id = $1",
        Scope::Job(_) => "r.job = $1",
    };
    let query = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT c.model, COUNT(*), {prompt}, {completion}, \
         {cached}, {cost}, COUNT(*) FILTER (WHERE c.cost_source = 'provider'), \
         COUNT(*) FILTER (WHERE c.cost_source = 'estimate') \
         FROM backfill_calls c JOIN backfill_runs r ON r.id = c.run_id \
         WHERE {filter} AND c.state = 'settled' GROUP BY c.model ORDER BY c.model",
        prompt = pg_sum("c.prompt_tokens"),
        completion = pg_sum("c.completion_tokens"),
        cached = pg_sum("c.cached_tokens"),
        cost = pg_sum("c.cost_picos"),
    )));
    let query = match scope {
        Scope::Run(id) => query.bind(id),
        Scope::Job(job) => query.bind(job),
    };
    let rows: Vec<ModelRow> = query.fetch_all(&store.pool).await.map_err(|e| store.err(e))?;
    Ok(rows
        .into_iter()
        .map(|(model, calls, p, c, k, cost, provider, estimate)| ModelCost {
            model,
            calls: calls as u64,
            prompt_tokens: p as u64,
            completion_tokens: c as u64,
            cached_tokens: k as u64,
            cost: Picos(cost),
            provider_costed: provider as u64,
            estimate_costed: estimate as u64,
        })
        .collect())
}

async fn job_totals(store: &PgStore, job: &str) -> anyhow::Result<JobTotals> {
    let (runs, spent, lost): (i64, i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*), COALESCE({}, 0), COALESCE({}, 0) FROM backfill_runs WHERE job = $1",
        pg_sum("spent_picos"),
        pg_sum("lost_picos")
    )))
    .bind(job)
    .fetch_one(&store.pool)
    .await
    .map_err(|e| store.err(e))?;
    let models = model_costs(store, Scope::Job(job)).await?;
    Ok(JobTotals { runs: runs as u64, spent: Picos(spent), lost: Picos(lost), models })
}

/// `started_at, latency_ms, items, items_ok, outcome, concurrency, cost_picos, model`.
type LedgerRow = (i64, Option<i64>, i64, i64, Option<String>, Option<i64>, i64, String);

pub(super) async fn calls(store: &PgStore, run_id: i64) -> anyhow::Result<Vec<CallRow>> {
    let rows: Vec<LedgerRow> = sqlx::query_as(
        "SELECT started_at, latency_ms, items, items_ok, outcome, concurrency, cost_picos, model \
         FROM backfill_calls WHERE run_id = $1 ORDER BY started_at, id",
    )
    .bind(run_id)
    .fetch_all(&store.pool)
    .await
    .map_err(|e| store.err(e))?;
    Ok(rows
        .into_iter()
        .map(|(started_at, latency_ms, items, items_ok, outcome, concurrency, cost, model)| CallRow {
            started_at,
            latency_ms,
            items: items as u32,
            items_ok: items_ok as u32,
            outcome,
            concurrency: concurrency.map(|c| c as u32),
            cost: Picos(cost),
            model,
        })
        .collect())
}
