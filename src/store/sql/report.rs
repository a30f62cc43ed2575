//! Read-only queries behind `status`, `report` and the dry run.

use async_trait::async_trait;

use super::runs::{RUN_COLUMNS, earlier_runs, run_from_row};
use super::{Backend, dialect};
use crate::pricing::Picos;
use crate::store::{
    Batches, CallRow, CallStats, FailureRow, HISTORY, ItemCounts, JobTotals, Ledger, Measured, ModelCost, Reports, RunRecord,
    StatusReport, StoredAnswer, WorkerRow,
};

/// model, calls, prompt, completion and cached tokens, cost, provider-costed, estimate-costed.
type ModelRow = (String, i64, i64, i64, i64, i64, i64, i64);
/// `started_at, latency_ms, items, items_ok, outcome, concurrency, cost_picos, model`.
type LedgerRow = (i64, Option<i64>, i64, i64, Option<String>, Option<i64>, i64, String);
/// An item's `item_id, state, reason, last_error, attempts, tier, updated_at`, then its last
/// output's `status, raw, detail, call_id, created_at` and that call's `model`.
type FailureSql = (
    String,
    String,
    Option<String>,
    Option<String>,
    i64,
    i64,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<String>,
);

/// Which calls a total covers.
enum Scope<'a> {
    Run(i64),
    Job(&'a str),
}

#[async_trait]
impl Reports for Backend {
    async fn item_counts(&self, run_id: i64) -> anyhow::Result<ItemCounts> {
        // The counters the queue keeps (O(1)), not a count of the queue.
        let mut conn = self.pool().acquire().await.map_err(|e| self.err(e))?;
        super::queue::counts(&mut conn, run_id).await.map_err(|e| self.err(e))
    }

    async fn status(&self, job: &str, run: Option<i64>) -> anyhow::Result<Option<StatusReport>> {
        let pool = self.pool();
        let e = |e| self.err(e);
        let Some(chosen) = self.find_run(job, run).await? else { return Ok(None) };
        let run_id = chosen.id;

        let counts = self.item_counts(run_id).await?;
        let spend = self.spend(run_id).await?;
        let models = model_costs(self, Scope::Run(run_id)).await?;
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
                 CAST(COALESCE(SUM(items), 0) AS BIGINT), MIN(started_at), MAX(started_at + COALESCE(latency_ms, 0)) \
                 FROM backfill_calls WHERE run_id = $1",
            )
            .bind(run_id)
            .fetch_one(pool)
            .await
            .map_err(e)?;
        // The columns of migration 3; a read-only `status` may look at a database no newer
        // backfill has migrated yet.
        let checked: i64 = sqlx::query_scalar(dialect::COUNT_CHECK_COLUMNS).fetch_one(pool).await.map_err(e)?;
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
        let workers: Vec<(String, i64, i64, bool, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT w.worker, w.attached_at, w.heartbeat_at, w.detached_at IS NULL AND w.expires_at > {now}, \
             (SELECT COUNT(*) FROM backfill_items i WHERE i.run_id = w.run_id AND i.done_by = w.worker), \
             (SELECT COUNT(*) FROM backfill_calls c WHERE c.run_id = w.run_id AND c.worker = w.worker) \
             FROM backfill_workers w WHERE w.run_id = $1 ORDER BY w.attached_at",
            now = dialect::NOW_MS
        )))
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
        let job_totals = job_totals(self, job).await?;
        let history = self.history(job, run_id, Some(HISTORY)).await?;
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
            batches: self.batches(run_id).await?,
        }))
    }

    async fn history(&self, job: &str, before: i64, limit: Option<u64>) -> anyhow::Result<Vec<(RunRecord, Picos)>> {
        let mut history = Vec::new();
        for r in earlier_runs(self, job, before, limit).await? {
            let spent = self.spend(r.id).await?.spent;
            history.push((r, spent));
        }
        Ok(history)
    }

    async fn find_run(&self, job: &str, run: Option<i64>) -> anyhow::Result<Option<RunRecord>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {RUN_COLUMNS} FROM backfill_runs WHERE job = $1 AND ($2 IS NULL OR id = $2) ORDER BY id DESC LIMIT 1"
        )))
        .bind(job)
        .bind(run)
        .fetch_optional(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        row.as_ref().map(run_from_row).transpose().map_err(|e| self.err(e))
    }

    async fn failures(&self, run_id: i64, state: Option<&str>, limit: Option<u64>) -> anyhow::Result<Vec<FailureRow>> {
        let rows: Vec<FailureSql> = sqlx::query_as(
            "SELECT i.item_id, i.state, i.reason, i.last_error, i.attempts, i.tier, i.updated_at, \
             o.status, o.raw, o.detail, o.call_id, o.created_at, c.model \
             FROM backfill_items i \
             LEFT JOIN backfill_outputs o ON o.id = \
               (SELECT MAX(l.id) FROM backfill_outputs l WHERE l.run_id = i.run_id AND l.item_id = i.item_id) \
             LEFT JOIN backfill_calls c ON c.id = o.call_id \
             WHERE i.run_id = $1 AND i.state IN ('failed', 'rejected') AND ($2 IS NULL OR i.state = $2) \
             ORDER BY i.seq LIMIT $3",
        )
        .bind(run_id)
        .bind(state)
        .bind(limit.map(|l| l.min(i64::MAX as u64) as i64).or(dialect::NO_LIMIT))
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(rows
            .into_iter()
            .map(|(item_id, state, reason, error, attempts, tier, updated_at, status, raw, detail, call_id, created_at, model)| {
                FailureRow {
                    item_id,
                    state,
                    reason,
                    error,
                    attempts: attempts.clamp(0, u32::MAX as i64) as u32,
                    tier: tier.clamp(0, u32::MAX as i64) as u32,
                    updated_at,
                    answer: status.map(|status| StoredAnswer {
                        status,
                        raw,
                        detail,
                        call_id: call_id.unwrap_or_default(),
                        model,
                        created_at: created_at.unwrap_or_default(),
                    }),
                }
            })
            .collect())
    }

    async fn calls(&self, run_id: i64) -> anyhow::Result<Vec<CallRow>> {
        let rows: Vec<LedgerRow> = sqlx::query_as(
            "SELECT started_at, latency_ms, items, items_ok, outcome, concurrency, CAST(cost_picos AS BIGINT), model \
             FROM backfill_calls WHERE run_id = $1 ORDER BY started_at, id",
        )
        .bind(run_id)
        .fetch_all(self.pool())
        .await
        .map_err(|e| self.err(e))?;
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

    async fn output_tokens_per_item(&self, job: &str, model: &str) -> anyhow::Result<Option<f64>> {
        let (tokens, items): (Option<i64>, Option<i64>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {}, CAST(SUM(c.items_ok + c.items_rejected + c.items_invalid) AS BIGINT) \
             FROM backfill_calls c JOIN backfill_runs r ON r.id = c.run_id \
             WHERE r.job = $1 AND c.model = $2 AND c.state = 'settled' AND c.outcome IN ('ok', 'truncated')",
            dialect::sum("c.completion_tokens")
        )))
        .bind(job)
        .bind(model)
        .fetch_one(self.pool())
        .await
        .map_err(|e| self.err(e))?;
        Ok(match (tokens, items) {
            (Some(t), Some(i)) if i > 0 && t > 0 => Some(t as f64 / i as f64),
            _ => None,
        })
    }

    async fn latest_measure(&self, jobs: [&str; 2], model: &str) -> anyhow::Result<Option<Measured>> {
        // The answered calls of the model in the latest run of either job that has any.
        let sql = format!(
            "SELECT c.run_id, r.job, COUNT(*), {}, {}, {}, {}, MIN(c.started_at), \
             MAX(c.started_at + COALESCE(c.latency_ms, 0)), r.controller_state \
             FROM backfill_calls c JOIN backfill_runs r ON r.id = c.run_id \
             WHERE c.run_id = (SELECT MAX(l.run_id) FROM backfill_calls l JOIN backfill_runs lr ON lr.id = l.run_id \
                               WHERE lr.job IN ($1, $2) AND l.model = $3 AND l.state = 'settled' \
                               AND l.outcome IN ('ok', 'truncated')) \
             AND c.model = $3 AND c.state = 'settled' AND c.outcome IN ('ok', 'truncated') \
             GROUP BY c.run_id, r.job, r.controller_state",
            dialect::sum("c.items"),
            dialect::sum("c.items_ok + c.items_rejected + c.items_invalid"),
            dialect::sum("c.items_ok"),
            dialect::sum("c.completion_tokens"),
        );
        let row: Option<MeasuredRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(jobs[0])
            .bind(jobs[1])
            .bind(model)
            .fetch_optional(self.pool())
            .await
            .map_err(|e| self.err(e))?;
        let count = |n: i64| n.max(0) as u64;
        Ok(row.map(|row| Measured {
            run_id: row.0,
            job: row.1,
            calls: count(row.2),
            items: count(row.3),
            items_answered: count(row.4),
            items_ok: count(row.5),
            completion_tokens: count(row.6),
            first_started_at: row.7,
            last_ended_at: row.8,
            controller_state: row.9,
        }))
    }
}

/// The row of [`Reports::latest_measure`]: run, job, calls, items, answered, ok, completion
/// tokens, first start, last end, controller state.
type MeasuredRow = (i64, String, i64, i64, i64, i64, i64, i64, i64, Option<String>);

/// Cost and tokens per model over the settled calls of a run or of all a job's runs.
async fn model_costs(store: &Backend, scope: Scope<'_>) -> anyhow::Result<Vec<ModelCost>> {
    let filter = match scope {
        Scope::Run(_) => "c.run_id = $1",
        Scope::Job(_) => "r.job = $1",
    };
    let query = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT c.model, COUNT(*), {prompt}, {completion}, {cached}, {cost}, \
         COUNT(*) FILTER (WHERE c.cost_source = 'provider'), COUNT(*) FILTER (WHERE c.cost_source = 'estimate') \
         FROM backfill_calls c JOIN backfill_runs r ON r.id = c.run_id \
         WHERE {filter} AND c.state = 'settled' GROUP BY c.model ORDER BY c.model",
        prompt = dialect::sum("c.prompt_tokens"),
        completion = dialect::sum("c.completion_tokens"),
        cached = dialect::sum("c.cached_tokens"),
        cost = dialect::sum("c.cost_picos"),
    )));
    let query = match scope {
        Scope::Run(id) => query.bind(id),
        Scope::Job(job) => query.bind(job),
    };
    let rows: Vec<ModelRow> = query.fetch_all(store.pool()).await.map_err(|e| store.err(e))?;
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

async fn job_totals(store: &Backend, job: &str) -> anyhow::Result<JobTotals> {
    let (runs, spent, lost): (i64, i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*), COALESCE({}, 0), COALESCE({}, 0) FROM backfill_runs WHERE job = $1",
        dialect::sum("spent_picos"),
        dialect::sum("lost_picos")
    )))
    .bind(job)
    .fetch_one(store.pool())
    .await
    .map_err(|e| store.err(e))?;
    let models = model_costs(store, Scope::Job(job)).await?;
    Ok(JobTotals { runs: runs as u64, spent: Picos(spent), lost: Picos(lost), models })
}
