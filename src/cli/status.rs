//! `status` and `abandon`: a job's latest run read back, and giving it up.

use serde::Serialize;

use super::print_json;
use crate::time::{readable, rfc3339_ms};
use crate::exit::{Exit, usage};
use crate::runner::summary::plural;
use crate::job::Job;
use crate::store::{BatchRecord, JobTotals, ModelCost, RunRecord, RunStatus, StatusReport, Store};

#[derive(Debug, Serialize)]
pub(super) struct StatusJson {
    job: String,
    run_id: i64,
    status: String,
    created_at: String,
    updated_at: String,
    last_error: Option<String>,
    items: ItemsJson,
    cost_usd: f64,
    in_flight_usd: f64,
    possibly_billed_usd: f64,
    budget_usd: Option<f64>,
    models: Vec<ModelJson>,
    failed_by_reason: std::collections::BTreeMap<String, u64>,
    rejected_by_reason: std::collections::BTreeMap<String, u64>,
    calls: CallsJson,
    workers: Vec<WorkerJson>,
    /// Workers attached and not proven gone: 0 for a run left "running" by a process that died.
    live_workers: u64,
    earlier_runs: Vec<EarlierRunJson>,
    /// Earlier runs left out of `earlier_runs` (`status --all` lists every one).
    earlier_runs_not_shown: u64,
    job_totals: JobTotalsJson,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    batches: Vec<BatchJson>,
}

#[derive(Debug, Serialize)]
struct JobTotalsJson {
    runs: u64,
    cost_usd: f64,
    possibly_billed_usd: f64,
    models: Vec<ModelJson>,
}

#[derive(Debug, Serialize)]
pub(super) struct BatchJson {
    id: i64,
    provider_batch_id: Option<String>,
    dialect: String,
    phase: String,
    provider_status: Option<String>,
    requests: u64,
    completed: u64,
    failed: u64,
    submitted_at: Option<String>,
    ended_at: Option<String>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct ItemsJson {
    total: u64,
    pending: u64,
    leased: u64,
    done: u64,
    failed: u64,
    rejected: u64,
}

#[derive(Debug, Serialize)]
struct ModelJson {
    model: String,
    calls: u64,
    input_tokens: u64,
    output_tokens: u64,
    cached_tokens: u64,
    cost_usd: f64,
    /// Calls whose cost is the provider's own `usage.cost`; the rest are usage × price, or
    /// (`estimate_costed_calls`) an answer without usage at its reservation's estimate.
    provider_costed_calls: u64,
    estimate_costed_calls: u64,
}

fn model_json(m: &ModelCost) -> ModelJson {
    ModelJson {
        model: m.model.clone(),
        calls: m.calls,
        input_tokens: m.prompt_tokens,
        output_tokens: m.completion_tokens,
        cached_tokens: m.cached_tokens,
        cost_usd: m.cost.usd(),
        provider_costed_calls: m.provider_costed,
        estimate_costed_calls: m.estimate_costed,
    }
}

fn job_totals_json(t: &JobTotals) -> JobTotalsJson {
    JobTotalsJson {
        runs: t.runs,
        cost_usd: t.spent.usd(),
        possibly_billed_usd: t.lost.usd(),
        models: t.models.iter().map(model_json).collect(),
    }
}

#[derive(Debug, Serialize)]
struct CallsJson {
    total: u64,
    in_flight: u64,
    possibly_billed: u64,
    by_outcome: std::collections::BTreeMap<String, u64>,
    items_per_second: Option<f64>,
    /// Answers whose usage or cost could not be true, costed at their reservations.
    usage_distrusted: u64,
    /// Nearly-right answers repaired before validation.
    answers_repaired: u64,
}

#[derive(Debug, Serialize)]
struct WorkerJson {
    worker: String,
    alive: bool,
    attached_at: String,
    last_heartbeat: String,
    items_done: u64,
    /// This worker's share of the run's done items (0..1).
    share_of_done: f64,
    calls: u64,
}

#[derive(Debug, Serialize)]
struct EarlierRunJson {
    run_id: i64,
    status: String,
    created_at: String,
    items: u64,
    cost_usd: f64,
}

pub(super) fn to_json(job: &Job, r: &StatusReport) -> StatusJson {
    // A worker whose lease has not run out yet may still be gone: a process on this machine
    // that no longer runs (killed, or stopped by a second signal) is shown as gone at once,
    // by the same rule `abandon` applies.
    let me = crate::store::Worker::current();
    let alive: Vec<bool> = r.workers.iter().map(|w| w.alive && !me.proves_gone(&w.worker)).collect();
    // An unfinished run nobody works on: its calls in flight will never be settled by their
    // process, and the next `--resume` counts them as possibly billed; say so now.
    let orphaned = r.run.status == RunStatus::Running && !alive.contains(&true);
    let (in_flight, in_flight_usd) = if orphaned { (0, 0.0) } else { (r.calls.in_flight, r.spend.reserved.usd()) };
    let (lost, lost_usd) = if orphaned {
        (r.calls.lost + r.calls.in_flight, r.spend.lost.usd() + r.spend.reserved.usd())
    } else {
        (r.calls.lost, r.spend.lost.usd())
    };
    let reasons = |state: &str| {
        r.reasons.iter().filter(|(s, _, _)| s == state).map(|(_, reason, n)| (reason.clone(), *n)).collect()
    };
    let span = match (r.calls.first_started_at, r.calls.last_finished_at) {
        (Some(a), Some(b)) if b > a => Some((b - a) as f64 / 1000.0),
        _ => None,
    };
    StatusJson {
        job: job.name.clone(),
        run_id: r.run.id,
        status: if orphaned { "interrupted".into() } else { r.run.status.as_str().into() },
        created_at: rfc3339_ms(r.run.created_at),
        updated_at: rfc3339_ms(r.run.updated_at),
        last_error: r.run.last_error.clone(),
        items: ItemsJson {
            total: r.counts.total(),
            pending: r.counts.pending,
            leased: r.counts.leased,
            done: r.counts.done,
            failed: r.counts.failed,
            rejected: r.counts.rejected,
        },
        cost_usd: r.spend.spent.usd(),
        in_flight_usd,
        possibly_billed_usd: lost_usd,
        budget_usd: r.run.max_usd.or(job.budget_usd),
        models: r.models.iter().map(model_json).collect(),
        failed_by_reason: reasons("failed"),
        rejected_by_reason: reasons("rejected"),
        calls: CallsJson {
            total: r.calls.total,
            in_flight,
            possibly_billed: lost,
            by_outcome: r.calls.by_outcome.iter().cloned().collect(),
            items_per_second: span.map(|s| (r.counts.done + r.counts.failed + r.counts.rejected) as f64 / s),
            usage_distrusted: r.calls.usage_distrusted,
            answers_repaired: r.calls.answers_repaired,
        },
        workers: r
            .workers
            .iter()
            .zip(&alive)
            .map(|(w, alive)| WorkerJson {
                worker: w.worker.clone(),
                alive: *alive,
                attached_at: rfc3339_ms(w.attached_at),
                last_heartbeat: rfc3339_ms(w.heartbeat_at),
                items_done: w.items_done,
                share_of_done: w.items_done as f64 / r.counts.done.max(1) as f64,
                calls: w.calls,
            })
            .collect(),
        live_workers: alive.iter().filter(|a| **a).count() as u64,
        earlier_runs: r
            .history
            .iter()
            .map(|(run, cost)| EarlierRunJson {
                run_id: run.id,
                status: run.status.as_str().into(),
                created_at: rfc3339_ms(run.created_at),
                items: run.total_items,
                cost_usd: cost.usd(),
            })
            .collect(),
        earlier_runs_not_shown: 0,
        job_totals: job_totals_json(&r.job_totals),
        batches: r.batches.iter().map(batch_json).collect(),
    }
}

/// A provider batch as `status` and `batches` show it.
pub(super) fn batch_json(b: &BatchRecord) -> BatchJson {
    BatchJson {
        id: b.id,
        provider_batch_id: b.provider_batch_id.clone(),
        dialect: b.dialect.clone(),
        phase: b.phase.as_str().into(),
        provider_status: b.provider_status.clone(),
        requests: b.requests,
        completed: b.completed,
        failed: b.failed,
        submitted_at: b.submitted_at.map(rfc3339_ms),
        ended_at: b.ended_at.map(rfc3339_ms),
        error: b.error.clone(),
    }
}

/// One line for a provider batch: where it stands at the provider and what it holds.
pub(super) fn batch_line(b: &BatchJson) -> String {
    format!(
        "batch {} ({} {}): {}{}, {} requests, {} completed, {} failed{}",
        b.id,
        b.dialect,
        b.provider_batch_id.as_deref().unwrap_or("not created"),
        b.phase,
        b.provider_status.as_deref().map(|p| format!(" / {p}")).unwrap_or_default(),
        b.requests,
        b.completed,
        b.failed,
        b.error.as_deref().map(|e| format!(" — {e}")).unwrap_or_default(),
    )
}

pub(super) fn human(s: &StatusJson) -> String {
    let mut out = format!(
        "job {} — run {} ({}), started {}, updated {}\n",
        s.job,
        s.run_id,
        s.status,
        readable(&s.created_at),
        readable(&s.updated_at)
    );
    if let Some(error) = &s.last_error {
        out.push_str(&format!("  last error: {error}\n"));
    }
    if s.status == "interrupted" && s.live_workers == 0 && s.last_error.is_none() {
        out.push_str("  no process works on this run (its last one is gone); `backfill run --resume` continues it\n");
    }
    let i = &s.items;
    out.push_str(&format!(
        "  items: {} total — {} done, {} failed, {} rejected, {} pending, {} in flight\n",
        i.total, i.done, i.failed, i.rejected, i.pending, i.leased
    ));
    out.push_str(&format!("  cost: ${:.4} spent", s.cost_usd));
    if s.in_flight_usd > 0.0 {
        out.push_str(&format!(", ${:.4} reserved in flight", s.in_flight_usd));
    }
    if s.possibly_billed_usd > 0.0 {
        out.push_str(&format!(", up to ${:.4} possibly billed ({} calls without an answer)", s.possibly_billed_usd, s.calls.possibly_billed));
    }
    if let Some(cap) = s.budget_usd {
        out.push_str(&format!(" — cap {}", crate::pricing::format_usd_cap(cap)));
    }
    out.push('\n');
    for m in &s.models {
        out.push_str(&model_line(m));
    }
    for (label, map) in [("failed", &s.failed_by_reason), ("rejected", &s.rejected_by_reason)] {
        if !map.is_empty() {
            let parts: Vec<String> = map.iter().map(|(r, n)| format!("{r} ×{n}")).collect();
            out.push_str(&format!("  {label} by reason: {}\n", parts.join(", ")));
        }
    }
    if s.calls.total > 0 {
        let parts: Vec<String> = s.calls.by_outcome.iter().map(|(o, n)| format!("{o} {n}")).collect();
        out.push_str(&format!("  {} in all ({})\n", plural(s.calls.total, "call", "calls"), parts.join(", ")));
    }
    if s.calls.answers_repaired > 0 {
        out.push_str(&format!("  answers repaired before validation: {}\n", s.calls.answers_repaired));
    }
    if s.calls.usage_distrusted > 0 {
        out.push_str(&format!(
            "  answers with impossible usage or cost: {} (costed at their reservations; see backfill_calls.usage_flag)\n",
            s.calls.usage_distrusted
        ));
    }
    if s.workers.len() > 1 {
        let attached = s.workers.iter().filter(|w| w.alive).count();
        out.push_str(&format!("  workers: {} ({attached} attached)\n", s.workers.len()));
    }
    for w in &s.workers {
        out.push_str(&format!(
            "  worker {}: {}, {} items done ({:.0}%), {}, last heartbeat {}\n",
            w.worker,
            if w.alive { "attached" } else { "gone" },
            w.items_done,
            w.share_of_done * 100.0,
            plural(w.calls, "call", "calls"),
            readable(&w.last_heartbeat)
        ));
    }
    for b in &s.batches {
        out.push_str(&format!("  {}\n", batch_line(b)));
    }
    for r in &s.earlier_runs {
        out.push_str(&format!("  earlier run {} ({}), {}: {} items, ${:.4}\n", r.run_id, r.status, readable(&r.created_at), r.items, r.cost_usd));
    }
    if s.earlier_runs_not_shown > 0 {
        out.push_str(&format!("  … and {} older runs (`status --all` lists every one)\n", s.earlier_runs_not_shown));
    }
    out.push_str(&job_totals_lines(&s.job_totals));
    out.trim_end().to_owned()
}

/// The job's store when it has runner tables; read-only unless `write`.
/// One model's line: calls, tokens, cost and where the cost came from.
fn model_line(m: &ModelJson) -> String {
    let mut sources = Vec::new();
    if m.provider_costed_calls > 0 {
        sources.push(format!("{} costed by the provider", m.provider_costed_calls));
    }
    if m.estimate_costed_calls > 0 {
        sources.push(format!("{} without usage, at their estimate", m.estimate_costed_calls));
    }
    format!(
        "  {}: {} settled, {} input / {} output tokens ({} cached), ${:.4}{}\n",
        m.model,
        plural(m.calls, "call", "calls"),
        m.input_tokens,
        m.output_tokens,
        m.cached_tokens,
        m.cost_usd,
        if sources.is_empty() { String::new() } else { format!(" ({})", sources.join(", ")) }
    )
}

fn job_totals_lines(t: &JobTotalsJson) -> String {
    let mut out = format!("  job total over {} run{}: ${:.4}", t.runs, if t.runs == 1 { "" } else { "s" }, t.cost_usd);
    if t.possibly_billed_usd > 0.0 {
        out.push_str(&format!(" (+ up to ${:.4} possibly billed)", t.possibly_billed_usd));
    }
    out.push('\n');
    if t.models.len() > 1 {
        for m in &t.models {
            out.push_str(&format!("  {}", model_line(m)));
        }
    }
    out
}

async fn open_existing(job: &Job, write: bool) -> anyhow::Result<Option<std::sync::Arc<dyn Store>>> {
    let store = if write { crate::store::open(&job.database).await? } else { crate::store::open_read_only(&job.database).await? };
    Ok(if store.runner_tables_exist().await? { Some(store) } else { None })
}

/// The run asked for (the latest by default) in a store that has runner tables; read-only
/// unless `write`.
pub(super) async fn chosen_run(job: &Job, run: Option<i64>, write: bool) -> anyhow::Result<(std::sync::Arc<dyn Store>, RunRecord)> {
    let store = open_existing(job, write).await?;
    let found = match &store {
        Some(store) => store.find_run(&job.name, run).await?,
        None => None,
    };
    match (store, found) {
        (Some(store), Some(found)) => Ok((store, found)),
        _ => Err(usage(match run {
            Some(id) => format!("job `{}` has no run {id}", job.name),
            None => format!("job `{}` has no runs yet in {}; start one with `backfill run`", job.name, job.database),
        })),
    }
}

/// The store (read-only) and what it says about a run of the job (the latest by default).
pub(super) async fn load(job: &Job, run: Option<i64>) -> anyhow::Result<(std::sync::Arc<dyn Store>, StatusReport)> {
    let (store, found) = chosen_run(job, run, false).await?;
    let report = store.status(&job.name, Some(found.id)).await?;
    let report = report.ok_or_else(|| usage(format!("job `{}` has no run {}", job.name, found.id)))?;
    Ok((store, report))
}

pub async fn status(job: &Job, json: bool, all: bool) -> anyhow::Result<Exit> {
    let (store, mut report) = load(job, None).await?;
    if all {
        report.history = store.history(&job.name, report.run.id, None).await?;
    }
    let mut view = to_json(job, &report);
    // The latest run: every other run of the job is an earlier one.
    view.earlier_runs_not_shown = report.job_totals.runs.saturating_sub(1 + report.history.len() as u64);
    if json {
        print_json(&view)?;
    } else {
        println!("{}", human(&view));
    }
    Ok(Exit::Finished)
}

pub async fn abandon(job: &Job) -> anyhow::Result<Exit> {
    let store = open_existing(job, true).await?;
    let latest = match &store {
        Some(store) => store.latest_run(&job.name).await?,
        None => None,
    };
    match (store, latest) {
        (Some(store), Some(run)) if run.status.is_unfinished() => {
            // A run still being worked on is stopped first: abandoning it under a live process
            // would let two runs write the same rows.
            let me = crate::store::Worker::current();
            let report = store.status(&job.name, Some(run.id)).await?;
            let live: Vec<String> = report
                .map(|r| r.workers.into_iter().filter(|w| w.alive && !me.proves_gone(&w.worker)).map(|w| w.worker).collect())
                .unwrap_or_default();
            if !live.is_empty() {
                return Err(usage(format!(
                    "run {} of job `{}` is being worked on by {}; stop it first (SIGINT or SIGTERM lets it \
                     record its calls in flight), then abandon the run",
                    run.id,
                    job.name,
                    live.join(", ")
                )));
            }
            // What dead workers left leased returns to the queue, and their calls in flight count
            // as possibly billed.
            store.recover(run.id).await?;
            store.set_status(run.id, RunStatus::Abandoned, Some("abandoned with `backfill abandon`")).await?;
            eprintln!(
                "run {} of job `{}` abandoned; its outputs stay written, and `backfill run` starts a new run",
                run.id, job.name
            );
            Ok(Exit::Finished)
        }
        _ => Err(usage(format!("job `{}` has no unfinished run to abandon", job.name))),
    }
}
