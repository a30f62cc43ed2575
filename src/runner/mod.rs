//! A run, end to end: find or create the run, attach this process as a worker, start the
//! writer, reporter and heartbeat tasks, replay calls a crash left answered in the cache,
//! dispatch until the queue drains or something stops the run, then record how it ended.

mod batch;
mod call;
pub mod context;
mod dispatch;
mod lifecycle;
mod local;
pub mod policy;
pub mod progress;
mod shared_rate;
mod signals;
pub mod summary;
mod writer;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use backfill_controller::{Controller, ControllerConfig, ControllerState, StartMinMax};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

pub use context::{OutputCheck, RunContext};
pub use dispatch::Stop;
pub use signals::install as install_signals;
pub use summary::Summary;

use crate::exit::{Exit, usage};
use crate::job::{ChatModel, Job, Processor};
use crate::packer::Packer;
use crate::provider::ChatClient;
use crate::store::{RunRecord, Store};
use crate::tokens::TokenCounter;

/// How `run` was asked to go.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub resume: bool,
    pub limit: Option<u64>,
    /// No progress output (for `--json` consumers that also read stderr, and tests).
    pub quiet: bool,
    /// Batch mode: how long to wait for the provider's batches (`None`: until they end).
    pub wait: Option<Duration>,
    /// Batch mode: after this run age, finish through the synchronous API.
    pub finish_sync_after: Option<Duration>,
    /// `--max-usd` as given (a resumed run keeps its own cap without it).
    pub max_usd: Option<f64>,
    /// `--batch-api` was given (moves a resumed synchronous run to the batch API).
    pub batch_api: bool,
}

/// How a run ended: the summary (`None`: `--resume` found nothing pending and started no run)
/// and the exit code.
#[derive(Debug)]
pub struct RunOutcome {
    pub summary: Option<Summary>,
    pub exit: Exit,
}

impl RunOutcome {
    fn nothing_pending() -> RunOutcome {
        RunOutcome { summary: None, exit: Exit::Finished }
    }
}

/// Runs a job: a chat job here, a local-model job through [`local::run`].
pub async fn run(job: &Job, options: &RunOptions, shutdown: CancellationToken) -> anyhow::Result<RunOutcome> {
    let started = Instant::now();
    let chat = match &job.processor {
        Processor::Chat(chat) => chat,
        Processor::Onnx(model) => return local::run(job, model, options, shutdown).await,
    };
    // Everything that can be checked without the database and the network comes first.
    chat.api_key()?;
    let check: Option<Arc<dyn OutputCheck>> = match crate::postprocess::build(job)? {
        Some(p) => Some(p),
        None => None,
    };
    let Some(attached) = lifecycle::attach(job, options).await? else {
        return Ok(RunOutcome::nothing_pending());
    };
    let attached = Arc::new(attached);
    let (store, run) = (attached.store.clone(), attached.run.clone());
    // The run's own cap and mode, which a resume keeps.
    let job = &attached.job;
    let Processor::Chat(chat) = &job.processor else { unreachable!("a chat job stays a chat job") };
    if chat.mode != crate::job::Mode::Batch && (options.wait.is_some() || options.finish_sync_after.is_some()) {
        tracing::warn!("run {}: --wait and --finish-sync-after are ignored, the run is synchronous (--batch-api moves it to batches)", run.id);
    }

    let ctx = Arc::new(context_for(job, chat, store.clone(), run.id, check)?);
    let controller = controller_for(job, chat, &run)?;
    let counts = store.item_counts(run.id).await?;
    let spend = store.spend(run.id).await?;
    let progress = Arc::new(progress::Progress::new(counts.total(), counts.done, counts.failed, counts.rejected, spend.spent, ctx.cap));
    progress.queued.store(counts.pending as usize, Ordering::Relaxed);

    let (write_tx, write_rx) = mpsc::channel(writer::WRITE_QUEUE);
    let written = Arc::new(Notify::new());
    let writer = tokio::spawn(writer::write_all(store.clone(), ctx.tables.clone(), write_rx, written.clone(), progress.clone()));
    let background = CancellationToken::new();
    let reporter = tokio::spawn(progress::report(progress.clone(), background.clone(), options.quiet));
    let heartbeat = tokio::spawn(lifecycle::keep_alive(attached.clone(), progress.clone(), background.clone()));

    let mut dispatcher = dispatch::Dispatcher::new(ctx.clone(), controller, write_tx, written, progress.clone());
    let stop = match replay_lost_calls(&ctx, &mut dispatcher).await {
        Ok(()) if chat.mode == crate::job::Mode::Batch => match run_batches(&ctx, &progress, &run, options, &shutdown).await {
            // Past the deadline of --finish-sync-after: the rest goes out synchronously.
            Ok(Stop::FinishSync) => {
                tracing::info!("finishing the run through the synchronous API (--finish-sync-after)");
                dispatcher.run(&shutdown).await
            }
            other => other,
        },
        Ok(()) => dispatcher.run(&shutdown).await,
        Err(e) => Err(e),
    };
    let controller_status = dispatcher.controller.status();
    drop(dispatcher);
    let _ = writer.await;
    background.cancel();
    let _ = reporter.await;
    let _ = heartbeat.await;

    let stop = lifecycle::settle_stop(stop, &progress);
    let (report, exit, error) = lifecycle::end(&attached, job, &stop).await?;
    let counts = controller_status.counts;
    let requests_here = progress.requests.load(Ordering::Relaxed);
    let controller = summary::ControllerSummary {
        requests: requests_here,
        requests_per_second: requests_here as f64 / started.elapsed().as_secs_f64().max(0.001),
        requests_per_second_limit: Some(controller_status.requests_per_second).filter(|rate| rate.is_finite()),
        max_in_flight: counts.max_in_flight,
        concurrency_limit: controller_status.concurrency_limit,
        items_per_request: if counts.requests_sent == 0 { 0.0 } else { counts.items_sent as f64 / counts.requests_sent as f64 },
        items_per_request_limit: controller_status.items_per_request,
        rate_limited: counts.rate_limited,
        timeouts: counts.timed_out.saturating_sub(counts.hedged_requests),
        hedged_requests: counts.hedged_requests,
        hedged_items: counts.hedged_items,
        retries: progress.retries.load(Ordering::Relaxed),
    };
    let summary = Summary::from_report(
        &report,
        exit,
        started.elapsed().as_secs_f64(),
        progress.finished_here.load(Ordering::Relaxed),
        controller,
        error,
    );
    // A run that drained its own share while other workers still hold items is not finished
    // yet; this worker's part is.
    Ok(RunOutcome { summary: Some(summary), exit })
}

/// Batch mode: the provider's batch API instead of synchronous calls.
async fn run_batches(
    ctx: &Arc<RunContext>,
    progress: &Arc<progress::Progress>,
    run: &RunRecord,
    options: &RunOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<Stop> {
    let chat = &ctx.chat;
    let api_key = chat.api_key()?;
    let api = crate::provider::batch::client(chat.batch.dialect, &chat.base_url, api_key, chat.batch.limits)?;
    batch::BatchRunner::new(ctx.clone(), api, progress.clone(), run.clone()).run(options, shutdown).await
}

fn context_for(
    job: &Job,
    chat: &ChatModel,
    store: Arc<dyn Store>,
    run_id: i64,
    check: Option<Arc<dyn OutputCheck>>,
) -> anyhow::Result<RunContext> {
    let api_key = chat.api_key()?;
    if api_key.is_none() {
        tracing::info!("{} is not set: calling {} without an API key", chat.api_key_env, crate::secret::redact_url(&chat.base_url));
    }
    let client = ChatClient::new(&chat.base_url, api_key, chat.request_timeout, chat.max_response_bytes)?;
    let packer = Packer::new(
        &chat.template,
        chat.system.clone(),
        TokenCounter::new(&chat.encoding)?,
        chat.context_window,
        chat.max_tokens,
    );
    Ok(RunContext::new(job, chat, store, run_id, client, packer, check))
}

fn controller_for(job: &Job, chat: &ChatModel, run: &RunRecord) -> anyhow::Result<Controller> {
    let limits = &job.limits;
    let config = ControllerConfig {
        requests_per_minute: limits.requests_per_minute,
        tokens_per_minute: limits.tokens_per_minute,
        items_per_request: StartMinMax::new(limits.items_per_request.start, limits.items_per_request.min, limits.items_per_request.max),
        concurrency: StartMinMax::new(limits.concurrency.start, limits.concurrency.min, limits.concurrency.max),
        initial_output_tokens_per_item: chat.max_output_tokens_per_item,
        context_window_tokens: Some(chat.context_window),
        request_timeout: chat.request_timeout.max(Duration::from_secs(1)),
        seed: fastrand::u64(..),
    };
    let restored = run
        .controller_state
        .as_deref()
        .and_then(|s| serde_json::from_str::<ControllerState>(s).ok())
        .map(|state| Controller::restore(config.clone(), state, Duration::ZERO));
    let controller = match restored {
        Some(Ok(controller)) => {
            tracing::info!("controller resumed from the run's saved state");
            controller
        }
        _ => Controller::new(config, Duration::ZERO).map_err(|e| usage(e.to_string()))?,
    };
    Ok(controller)
}

/// Calls lost in a crash whose answer had reached the cache are settled from it: their items
/// get the answer they were billed for, and nothing is paid twice.
async fn replay_lost_calls(ctx: &Arc<RunContext>, dispatcher: &mut dispatch::Dispatcher) -> anyhow::Result<()> {
    if !ctx.cache.enabled {
        return Ok(());
    }
    for lost in ctx.store.lost_calls(ctx.run_id).await? {
        let Some(claimed) = ctx.store.claim_ids(&ctx.tables, ctx.run_id, &ctx.worker, &lost.item_ids, ctx.lease).await? else {
            continue;
        };
        let Some(body) = ctx.store.cache_get(&lost.request_hash).await? else {
            let leases: Vec<_> = claimed.into_iter().map(|c| c.lease).collect();
            ctx.store.release(ctx.run_id, &leases).await?;
            continue;
        };
        tracing::info!(call = lost.call_id, items = claimed.len(), "settling a call lost in a crash from its cached answer");
        let tier = claimed.first().map(|c| c.tier).unwrap_or(0);
        let prepared = call::PreparedCall {
            call_id: lost.call_id,
            ticket: None,
            claimed,
            tier,
            model: lost.model,
            body: Vec::new(),
            hash: lost.request_hash,
            estimate: lost.estimated,
            cached: Some(body),
            replay: true,
            timeout: ctx.chat.request_timeout,
            cut: CancellationToken::new(),
            billing: ctx.price_tier,
            resendable: None,
        };
        let concluded = call::execute(ctx.clone(), prepared).await;
        dispatcher.finish(Ok(concluded)).await?;
    }
    Ok(())
}
