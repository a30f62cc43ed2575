//! Batch mode: the same multi-item requests as the synchronous path, sent through the
//! provider's batch API (OpenAI Batch, Anthropic Message Batches) at its batch price.
//!
//! A provider batch moves through phases that are each recorded before the next step, so a
//! crash at any moment resumes without submitting anything twice or writing anything twice:
//!
//! ```text
//! preparing ──upload──► uploaded ──► creating ──create──► submitted ──poll…──► ended ──collect──► collected
//!     └──(crash: nothing was sent)──► discarded      (crash here: find the batch the provider made)
//! ```
//!
//! Its requests are ledger rows reserved under the owner `batch:<id>` before the upload, and
//! their items are leased to that owner without expiry until the results are collected: one
//! write transaction per request, through the same validation, post-processing, writer and
//! ledger as the synchronous path. Requests that failed, expired or were cancelled put their
//! items back in the queue, for the next batch — or, after `--finish-sync-after`, for the
//! synchronous path.

mod collect;
mod submit;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use backfill_controller::ControllerStatus;

use super::RunOptions;
use super::context::RunContext;
use super::progress::Progress;
use super::session::{Engine, Figures, Session, Stop};
use super::sync::SyncEngine;
use crate::provider::batch::BatchApi;
use crate::provider::CallError;
use crate::store::{BatchPhase, BatchRecord, RunRecord, now_ms};

/// The longest the loop sleeps without looking at its batches and the queue again.
const IDLE: Duration = Duration::from_secs(5);
/// How often in a row a batch API call may fail transiently before the run stops.
const API_FAILURES: u32 = 8;

/// Batch mode: the run's provider batches, then — past `--finish-sync-after` — the
/// synchronous engine for the rest. The synchronous engine also settles, first, calls a crash
/// left answered in the response cache.
pub struct BatchEngine {
    ctx: Arc<RunContext>,
    sync: SyncEngine,
    options: RunOptions,
}

impl BatchEngine {
    pub fn new(ctx: Arc<RunContext>, sync: SyncEngine, options: &RunOptions) -> BatchEngine {
        BatchEngine { ctx, sync, options: options.clone() }
    }
}

impl Engine for BatchEngine {
    type Tally = ControllerStatus;

    async fn work(&mut self, session: &Session, shutdown: &CancellationToken) -> anyhow::Result<Stop> {
        self.sync.replay_lost_calls().await?;
        let chat = &self.ctx.chat;
        let api = crate::provider::batch::client(chat.batch.dialect, &chat.base_url, chat.api_key()?, chat.batch.limits)?;
        let mut batches = BatchRunner::new(self.ctx.clone(), api, session.progress.clone(), session.attached.run.clone());
        match batches.run(&self.options, shutdown).await? {
            // Past the deadline of --finish-sync-after: the rest goes out synchronously.
            Stop::FinishSync => {
                tracing::info!("finishing the run through the synchronous API (--finish-sync-after)");
                self.sync.dispatch(shutdown).await
            }
            stop => Ok(stop),
        }
    }

    fn end(self) -> ControllerStatus {
        self.sync.end()
    }

    fn figures(status: ControllerStatus, progress: &Progress) -> Figures {
        SyncEngine::figures(status, progress)
    }
}

/// Drives a run's provider batches until the queue drains or something stops the run.
struct BatchRunner {
    ctx: Arc<RunContext>,
    api: Box<dyn BatchApi>,
    progress: Arc<Progress>,
    run: RunRecord,
    /// Calls whose results this process has written (skipped when a batch is collected again).
    written: HashSet<i64>,
    /// The budget refused a request: no more batches are prepared.
    budget_reached: bool,
    api_failures: u32,
    /// Batches in `creating` whose provider batch may exist but cannot be proven ours yet:
    /// when to look again, and the wait before that look (it grows).
    unproven: HashMap<i64, (Instant, Duration)>,
}

impl BatchRunner {
    fn new(ctx: Arc<RunContext>, api: Box<dyn BatchApi>, progress: Arc<Progress>, run: RunRecord) -> Self {
        BatchRunner {
            ctx,
            api,
            progress,
            run,
            written: HashSet::new(),
            budget_reached: false,
            api_failures: 0,
            unproven: HashMap::new(),
        }
    }

    /// Runs until every item is done, failed or rejected (`Drained`), the budget stops new
    /// batches, the wait ends with batches still at the provider (`Waiting`), the
    /// `--finish-sync-after` deadline hands the rest to the synchronous path (`FinishSync`),
    /// or a signal (`Interrupted`: the provider goes on; `--resume` collects).
    async fn run(&mut self, options: &RunOptions, shutdown: &CancellationToken) -> anyhow::Result<Stop> {
        let started = Instant::now();
        let deadline = options.finish_sync_after.map(|d| self.run.created_at + d.as_millis() as i64);
        loop {
            if shutdown.is_cancelled() {
                return Ok(Stop::Interrupted);
            }
            if let Some(why) = self.progress.writer_failure() {
                return Ok(Stop::Failed(why));
            }
            let past_deadline = deadline.is_some_and(|d| now_ms() >= d);
            let step = self.step(past_deadline).await;
            match step {
                Ok(()) => self.api_failures = 0,
                Err(e) => match e.downcast_ref::<CallError>() {
                    Some(CallError::Fatal { .. }) | Some(CallError::Rejected { .. }) | Some(CallError::Redirected { .. }) => {
                        return Ok(Stop::Failed(format!("the batch API refused: {e:#}")));
                    }
                    Some(_) if self.api_failures + 1 < API_FAILURES => {
                        self.api_failures += 1;
                        tracing::warn!(try_ = self.api_failures, "the batch API failed; trying again: {e:#}");
                    }
                    Some(_) => return Ok(Stop::Failed(format!("the batch API kept failing: {e:#}"))),
                    None => return Err(e),
                },
            }
            let open: Vec<BatchRecord> = self.ctx.store.batches(self.ctx.run_id).await?.into_iter().filter(|b| b.phase.is_open()).collect();
            if open.is_empty() {
                let counts = self.ctx.store.item_counts(self.ctx.run_id).await?;
                if counts.open() == 0 {
                    return Ok(Stop::Drained);
                }
                if past_deadline {
                    return Ok(Stop::FinishSync);
                }
                if self.budget_reached {
                    return Ok(Stop::Budget);
                }
            }
            if let Some(wait) = options.wait
                && started.elapsed() >= wait && !open.is_empty() {
                    return Ok(Stop::Waiting);
                }
            let next_poll = open
                .iter()
                .filter(|b| b.phase == BatchPhase::Submitted)
                .map(|b| b.next_poll_at)
                .min()
                .map(|at| Duration::from_millis((at - now_ms()).max(0) as u64));
            let mut nap = next_poll.unwrap_or(IDLE).min(IDLE);
            if let Some(next) = self.unproven.values().map(|(at, _)| *at).min() {
                nap = nap.min(next.saturating_duration_since(Instant::now()));
            }
            if self.api_failures > 0 {
                nap = nap.max(Duration::from_millis(250 * 2u64.pow(self.api_failures.min(6))));
            }
            if let Some(wait) = options.wait {
                nap = nap.min(wait.saturating_sub(started.elapsed()));
            }
            tokio::select! {
                _ = tokio::time::sleep(nap) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }

    /// Moves every open batch one step on, then submits what is ready in the queue.
    async fn step(&mut self, past_deadline: bool) -> anyhow::Result<()> {
        for batch in self.ctx.store.batches(self.ctx.run_id).await? {
            match batch.phase {
                // Left by a process that stopped while preparing it: nothing was sent.
                BatchPhase::Preparing => self.discard(batch, "prepared but never submitted: the process stopped").await?,
                BatchPhase::Uploaded => self.create(batch).await?,
                BatchPhase::Creating => self.find_or_create(batch).await?,
                BatchPhase::Submitted => self.poll(batch, past_deadline).await?,
                BatchPhase::Ended => self.collect(batch).await?,
                BatchPhase::Collected | BatchPhase::Discarded => {}
            }
        }
        if !past_deadline && !self.budget_reached {
            while self.submit().await? {}
        }
        Ok(())
    }

    /// Polls a submitted batch when it is due; past the deadline, cancels it once.
    async fn poll(&mut self, mut batch: BatchRecord, past_deadline: bool) -> anyhow::Result<()> {
        let Some(provider_id) = batch.provider_batch_id.clone() else {
            anyhow::bail!("batch {} is submitted but has no provider id", batch.id);
        };
        let cancelling = batch.error.as_deref().is_some_and(|e| e.starts_with(CANCELLED_FOR_DEADLINE));
        if past_deadline && !cancelling {
            tracing::info!(batch = %provider_id, "deadline of --finish-sync-after: cancelling the batch; its unfinished requests go through the synchronous API");
            self.api.cancel(&provider_id).await?;
            batch.error = Some(CANCELLED_FOR_DEADLINE.into());
            batch.next_poll_at = now_ms();
            self.ctx.store.update_batch(&batch).await?;
        }
        if now_ms() < batch.next_poll_at {
            return Ok(());
        }
        let status = self.api.status(&provider_id).await?;
        crate::store::failpoint::crash("batch_polling");
        batch.provider_status = Some(status.status.clone());
        batch.completed = status.completed;
        batch.failed = status.failed;
        if status.ended {
            tracing::info!(batch = %provider_id, status = %status.status, completed = status.completed, failed = status.failed, "batch ended");
            batch.phase = BatchPhase::Ended;
            batch.ended_at = Some(now_ms());
            batch.output_file_id = status.output_file_id;
            batch.error_file_id = status.error_file_id;
            batch.results_url = status.results_url;
            if let Some(errors) = status.errors {
                batch.error = Some(errors);
            }
            self.ctx.store.update_batch(&batch).await?;
            return self.collect(batch).await;
        }
        let interval = Duration::from_millis(batch.poll_interval_ms.max(1) as u64);
        let next = interval.mul_f64(1.5).min(crate::job::BatchSettings::MAX_POLL.max(self.ctx.chat.batch.poll));
        batch.poll_interval_ms = next.as_millis() as i64;
        batch.next_poll_at = now_ms() + interval.as_millis() as i64;
        tracing::debug!(batch = %provider_id, status = %status.status, completed = status.completed, total = status.total, "batch polled");
        self.ctx.store.update_batch(&batch).await?;
        Ok(())
    }
}

/// Recorded on a batch cancelled so the deadline of `--finish-sync-after` is met.
const CANCELLED_FOR_DEADLINE: &str = "cancelled for --finish-sync-after";
