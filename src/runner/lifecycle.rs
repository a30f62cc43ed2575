//! What every run does around its work, whatever the processor: find or create the run (or
//! continue it with `--resume`), attach this process as its worker (refusing while another
//! process holds a SQLite run), heartbeat the leases while it works, and record how it ended.
//!
//! [`super::run`] attaches; the harness ([`super::session`]) heartbeats and ends, the same for
//! every engine.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::RunOptions;
use super::session::Stop;
use super::progress::Progress;
use crate::exit::{Exit, usage};
use crate::job::{Job, Mode};
use crate::store::{Attach, Created, NewRun, RunRecord, RunStatus, StatusReport, Store, Tables, Worker};

/// A run this process is attached to, with the settings it keeps (`job` as this process
/// runs it: the run's budget cap and mode in place of the job file's).
pub struct Attached {
    pub job: Job,
    pub store: Arc<dyn Store>,
    pub tables: Tables,
    pub run: RunRecord,
    pub worker: Worker,
    pub lease: Duration,
}

/// Opens the store, checks the job's tables, finds or creates the run and attaches to it;
/// `None` when `--resume` found no unfinished run and nothing pending (no run is created).
pub async fn attach(job: &Job, options: &RunOptions) -> anyhow::Result<Option<Attached>> {
    let store = crate::store::open(&job.database).await?;
    store.migrate().await?;
    let tables = Tables::from_job(job);
    store.check(&tables).await?;
    let Some(found) = find_or_create(job, options, store.as_ref(), &tables).await? else {
        return Ok(None);
    };
    let (run, resumed) = match found {
        Found::New(run) => (run, false),
        Found::Resumed(run) => (run, true),
    };
    crate::exit::json_line::set_run(run.id);
    let worker = Worker::current();
    match store.attach(run.id, &worker, job.limits.lease, !store.shares_runs()).await? {
        Attach::Attached(recovered) => {
            if recovered.items > 0 || recovered.calls_lost > 0 {
                tracing::info!(
                    items = recovered.items,
                    calls = recovered.calls_lost,
                    "run {}: items leased by a stopped process are back in the queue",
                    run.id
                );
            }
        }
        Attach::Busy { worker: other, seconds_left } => {
            return Err(usage(format!(
                "run {} of job `{}` is being worked on by another process ({other}); a SQLite run takes \
                 one process at a time. Wait for it to end (its lease runs out {seconds_left:.0}s after its \
                 last heartbeat), or stop it; for several workers use PostgreSQL",
                run.id, job.name
            )));
        }
    }
    // Only once attached: a process refused because another works on the run changes nothing.
    let run = if resumed { apply_resume_flags(job, options, store.as_ref(), &tables, run).await? } else { run };
    let job = with_run_settings(job, &run);
    let lease = job.limits.lease;
    Ok(Some(Attached { job, store, tables, run, worker, lease }))
}

/// A run found or created for this command.
enum Found {
    New(RunRecord),
    /// An unfinished run `--resume` continues, as it was: its flags are applied once attached.
    Resumed(RunRecord),
}

/// The job as this run goes: the run's budget cap and mode (as started, or as a flag of this
/// resume changed them) in place of the job file's.
fn with_run_settings(job: &Job, run: &RunRecord) -> Job {
    let mut job = job.clone();
    job.budget_usd = run.max_usd;
    if let (crate::job::Processor::Chat(chat), Some(mode)) = (&mut job.processor, run.mode.as_deref()) {
        chat.mode = if mode == "batch" { Mode::Batch } else { Mode::Sync };
    }
    job
}

fn mode_name(job: &Job) -> Option<&'static str> {
    job.chat().map(|chat| if chat.mode == Mode::Batch { "batch" } else { "sync" })
}

fn cap_text(cap: Option<f64>) -> String {
    cap.map(crate::pricing::format_usd_cap).unwrap_or_else(|| "none".into())
}

async fn find_or_create(job: &Job, options: &RunOptions, store: &dyn Store, tables: &Tables) -> anyhow::Result<Option<Found>> {
    let new = NewRun {
        job: job.name.clone(),
        target: format!(
            "{}({})",
            tables.table.raw(),
            tables.outputs.iter().map(|(_, c)| c.name().to_owned()).collect::<Vec<_>>().join(", ")
        ),
        limit: options.limit,
        max_usd: job.budget_usd,
        mode: mode_name(job).map(str::to_owned),
        skip_if_empty: options.resume,
    };
    match store.create_run(&new, tables).await? {
        Created::New(run) => {
            if options.resume {
                tracing::info!("no unfinished run of `{}` to resume: started run {}", job.name, run.id);
            }
            tracing::info!("run {}: {} items queued", run.id, run.total_items);
            Ok(Some(Found::New(run)))
        }
        Created::NothingPending => Ok(None),
        Created::Existing(run) if options.resume => {
            tracing::info!("resuming run {} ({})", run.id, run.status.as_str());
            Ok(Some(Found::Resumed(run)))
        }
        Created::Existing(run) => Err(usage(format!(
            "job `{}` has an unfinished run {} ({}, started {}); continue it with `backfill run {} --resume`, \
             or give it up with `backfill abandon {}` and start again",
            job.name,
            run.id,
            run.status.as_str(),
            crate::time::format_ms(run.created_at),
            job.path.display(),
            job.path.display()
        ))),
    }
}

/// The flags of `--resume` that change a run (`--max-usd`, `--batch-api`, `--limit`), applied
/// to it; what they leave is kept, and the log says which is which.
async fn apply_resume_flags(job: &Job, options: &RunOptions, store: &dyn Store, tables: &Tables, mut run: RunRecord) -> anyhow::Result<RunRecord> {
    let (mut kept, mut changed) = (Vec::new(), Vec::new());
    // The budget cap: the run's, unless --max-usd changes it.
    match options.max_usd {
        Some(cap) if run.max_usd != Some(cap) => {
            changed.push(format!("budget cap {} (was {})", cap_text(Some(cap)), cap_text(run.max_usd)));
            store.set_budget(run.id, Some(cap)).await?;
            run.max_usd = Some(cap);
        }
        _ => {
            kept.push(format!("budget cap {}", cap_text(run.max_usd)));
            if options.max_usd.is_none() && job.budget_usd != run.max_usd {
                tracing::info!(
                    "run {}: the job file's budget cap {} is not applied to a resumed run; pass --max-usd to change the cap",
                    run.id,
                    cap_text(job.budget_usd)
                );
            }
        }
    }
    // The mode: the run's, unless --batch-api moves a synchronous run to the batch API.
    match (run.mode.as_deref(), mode_name(job)) {
        (Some("sync"), Some("batch")) if options.batch_api => {
            changed.push("mode batch (was sync)".to_owned());
            store.set_mode(run.id, "batch").await?;
            run.mode = Some("batch".into());
        }
        (Some(mode), _) => kept.push(format!("mode {mode}")),
        // A run from before runs kept their mode goes as this command says, from now on.
        (None, Some(mode)) => {
            store.set_mode(run.id, mode).await?;
            run.mode = Some(mode.to_owned());
        }
        (None, None) => {}
    }
    // The limit: the run's items, unless --limit changes how many it holds.
    match options.limit {
        Some(limit) if run.limit != Some(limit) => {
            let total = store.set_limit(tables, run.id, limit).await?;
            changed.push(format!(
                "limit {limit} (was {}; the run now holds {total} items)",
                run.limit.map(|l| l.to_string()).unwrap_or_else(|| "none".into())
            ));
            run.limit = Some(limit);
            run.total_items = total;
        }
        _ => kept.push(format!("limit {}", run.limit.map(|l| l.to_string()).unwrap_or_else(|| "none".into()))),
    }
    if !kept.is_empty() {
        tracing::info!(
            "run {}: kept what it was started with: {} (--max-usd, --batch-api, --limit change them)",
            run.id,
            kept.join(", ")
        );
    }
    if !changed.is_empty() {
        tracing::info!("run {}: changed by this command: {}", run.id, changed.join(", "));
    }
    Ok(run)
}

/// Heartbeats the worker's leases, returns expired leases of others to the queue, and keeps the
/// queue size in `progress` fresh. Ends when `stop` is cancelled or the run was taken over.
pub async fn keep_alive(attached: Arc<Attached>, progress: Arc<Progress>, stop: CancellationToken) {
    let (store, run_id, worker, lease) = (&attached.store, attached.run.id, &attached.worker, attached.lease);
    let every = (lease / 4).max(Duration::from_secs(1));
    let mut beat = tokio::time::interval(every);
    let mut count = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = count.tick() => {
                if let Ok(counts) = store.item_counts(run_id).await {
                    progress.queued.store(counts.pending as usize, Ordering::Relaxed);
                }
            }
            _ = beat.tick() => {
                match store.heartbeat(run_id, worker, lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        progress.fail_writer(format!("this process lost its attachment to run {run_id} (it was taken over)"));
                        return;
                    }
                    Err(e) => tracing::warn!("heartbeat failed: {e:#}"),
                }
                if store.shares_runs()
                    && let Err(e) = store.recover(run_id).await
                {
                    tracing::warn!("lease recovery failed: {e:#}");
                }
            }
        }
    }
}

/// Why the work stopped, once the writer has drained: a writer failure outranks the rest.
pub fn settle_stop(stop: anyhow::Result<Stop>, progress: &Progress) -> Stop {
    match stop {
        Ok(stop) => match progress.writer_failure() {
            Some(why) => Stop::Failed(why),
            None => stop,
        },
        Err(e) => Stop::Failed(format!("{e:#}")),
    }
}

/// Records the run's end (status, detach) and reads back its report; returns the exit code
/// and the error to show with the summary.
pub async fn end(attached: &Attached, job: &Job, stop: &Stop) -> anyhow::Result<(StatusReport, Exit, Option<String>)> {
    let (status, exit, error) = match stop {
        Stop::Drained => (RunStatus::Finished, Exit::Finished, None),
        Stop::Interrupted => (RunStatus::Interrupted, Exit::Interrupted, None),
        Stop::Budget => (
            RunStatus::Budget,
            Exit::Budget,
            Some("the next call would pass the budget cap; raise it with --max-usd and run with --resume".to_string()),
        ),
        Stop::Failed(why) => (RunStatus::Failed, Exit::Error, Some(why.clone())),
        Stop::Waiting => (
            RunStatus::Waiting,
            Exit::Waiting,
            Some("the provider's batches are still running; collect them with --resume".to_string()),
        ),
        Stop::FinishSync => (RunStatus::Running, Exit::Error, Some("the synchronous finish did not run".to_string())),
    };
    let (store, run_id) = (&attached.store, attached.run.id);
    // Record the end even if the database is struggling; report what could not be recorded.
    if let Err(e) = store.set_status(run_id, status, error.as_deref()).await {
        tracing::error!("could not record the run's end: {e:#}");
    }
    if let Err(e) = store.detach(run_id, &attached.worker).await {
        tracing::error!("could not detach from the run: {e:#}");
    }
    let mut report = store.status(&job.name, Some(run_id)).await?.ok_or_else(|| anyhow::anyhow!("run {run_id} disappeared"))?;
    // A finished run (every item terminal, whichever worker ended it) with too many failures
    // exits 6, so a cron job does not take it for a success.
    if matches!(stop, Stop::Drained)
        && report.run.status == RunStatus::Finished
        && let Some(message) = too_many_failures(&report, job.limits.max_failed_share)
    {
        if let Err(e) = store.set_status(run_id, RunStatus::Finished, Some(&message)).await {
            tracing::error!("could not record the run's failures: {e:#}");
        }
        report.run.last_error = Some(message.clone());
        return Ok((report, Exit::Failures, Some(message)));
    }
    Ok((report, exit, error))
}

/// How many reasons the exit-6 message names.
const TOP_REASONS: usize = 3;

/// The message of a run whose failed and rejected items are more than `max_share` of its
/// items, naming the most frequent reasons with one stored error each; `None` when within.
pub fn too_many_failures(report: &StatusReport, max_share: f64) -> Option<String> {
    let counts = report.counts;
    let total = counts.total();
    let unsuccessful = counts.failed + counts.rejected;
    if total == 0 || unsuccessful as f64 <= max_share * total as f64 {
        return None;
    }
    let reasons: Vec<String> = report
        .reasons
        .iter()
        .take(TOP_REASONS)
        .map(|(state, reason, n)| {
            let example = report
                .reason_errors
                .iter()
                .find(|(s, r, _)| s == state && r == reason)
                .map(|(_, _, error)| format!(", e.g. \"{}\"", shorten(error, 160)))
                .unwrap_or_default();
            format!("{n} {state}: {reason}{example}")
        })
        .collect();
    Some(format!(
        "finished with too many failures: {unsuccessful} of {total} items ({:.1}%) failed or were rejected, above \
         `limits.max_failed_share` = {max_share}; top reasons: {}. Fix the cause and run again (failed rows are \
         still pending for a new run), or raise `limits.max_failed_share`",
        100.0 * unsuccessful as f64 / total as f64,
        reasons.join("; ")
    ))
}

/// The first `max` characters of `text`, on one line.
fn shorten(text: &str, max: usize) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}
