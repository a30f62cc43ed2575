//! The run harness, written once for every engine: around the work of a run attached by
//! [`lifecycle::attach`], the progress counters, the writer task, the reporter and the
//! heartbeat; once the engine stops, the writer drained, the run's end recorded and the
//! summary made.
//!
//! An [`Engine`] is what works the queue off between the two: synchronous calls
//! (`sync/`), provider batches (`batch/`) or a local model (`local/`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::lifecycle::{self, Attached};
use super::progress::{self, Progress};
use super::summary::{ControllerSummary, Summary};
use super::writer;
use super::RunOutcome;
use crate::metrics::{Exporter, Snapshot};
use crate::pricing::Picos;
use crate::store::{BatchWrite, StatusReport};

/// Why an engine stopped working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// Every item is done, failed or rejected.
    Drained,
    /// SIGINT/SIGTERM.
    Interrupted,
    /// The next call would pass the budget cap.
    Budget,
    /// The provider refuses every call, cannot be reached, or the database failed.
    Failed(String),
    /// Batch mode: the wait ended with batches still at the provider.
    Waiting,
    /// Batch mode: past `--finish-sync-after`, the rest goes through the synchronous path.
    FinishSync,
}

/// One way of working a run's queue off. The harness ([`Session::drive`]) calls `work` once,
/// then `end`, which drops the engine (its handle on the writer with it), then `figures`
/// once every write is done.
pub trait Engine: Sized {
    /// What the engine counted, kept past its end for the summary.
    type Tally;

    /// Works until the queue drains or something stops the run.
    async fn work(&mut self, session: &Session, shutdown: &CancellationToken) -> anyhow::Result<Stop>;

    /// Ends the engine, keeping what it counted.
    fn end(self) -> Self::Tally;

    /// The summary's figures for this invocation; `requests_per_second` and `retries` are
    /// filled in by the harness.
    fn figures(tally: Self::Tally, progress: &Progress) -> Figures;
}

/// What an engine did in this invocation, for the summary.
pub struct Figures {
    pub controller: ControllerSummary,
    /// Local model: the time it computed.
    pub compute: Option<Duration>,
}

/// A run this process is attached to, with the tasks every engine shares.
pub struct Session {
    pub attached: Arc<Attached>,
    pub progress: Arc<Progress>,
    /// Into the writer task. Bounded (`writer::WRITE_QUEUE`): when the database falls behind,
    /// an engine waits here instead of piling up finished work in memory. Engines clone it;
    /// the writer ends once every clone and this one are dropped.
    writer: mpsc::Sender<BatchWrite>,
    /// Notified by the writer after each write, so a dispatcher waiting for room (budget, queue)
    /// looks again at once.
    pub written: Arc<Notify>,
    /// Cancelled once the work is over and the writer drained: ends the reporter and heartbeat.
    background: CancellationToken,
    tasks: Tasks,
    started: Instant,
    /// `--metrics-file`: written with the run's final figures.
    metrics_file: Option<std::path::PathBuf>,
}

struct Tasks {
    writer: JoinHandle<()>,
    reporter: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
    /// `--metrics-addr`: the server and the refresh of what it serves.
    metrics: Option<JoinHandle<()>>,
}

impl Session {
    /// Starts the shared tasks for an attached run. `cap` is the budget shown beside the
    /// spend (`None` for a local model, which costs nothing); `started` is when this
    /// invocation began, for the summary's rates.
    pub async fn open(
        attached: Attached,
        cap: Option<Picos>,
        quiet: bool,
        started: Instant,
        exporter: Option<Exporter>,
    ) -> anyhow::Result<Session> {
        let attached = Arc::new(attached);
        let store = attached.store.clone();
        let counts = store.item_counts(attached.run.id).await?;
        // A local model's calls cost nothing.
        let spent = if attached.job.chat().is_some() { store.spend(attached.run.id).await?.spent } else { Picos::ZERO };
        let progress = Arc::new(Progress::new(counts.total(), counts.done, counts.failed, counts.rejected, spent, cap));
        progress.queued.store(counts.pending as usize, Ordering::Relaxed);

        let (writer, write_rx) = mpsc::channel(writer::WRITE_QUEUE);
        let written = Arc::new(Notify::new());
        let background = CancellationToken::new();
        let tasks = Tasks {
            writer: tokio::spawn(writer::write_all(store, attached.tables.clone(), write_rx, written.clone(), progress.clone())),
            reporter: tokio::spawn(progress::report(progress.clone(), background.clone(), quiet)),
            heartbeat: tokio::spawn(lifecycle::keep_alive(attached.clone(), progress.clone(), background.clone())),
            metrics: None,
        };
        let (listener, metrics_file) = match exporter {
            Some(Exporter { listener, file }) => (listener, file),
            None => (None, None),
        };
        let mut tasks = tasks;
        if let Some(listener) = listener {
            tracing::info!("metrics at http://{}/metrics", listener.local_addr()?);
            tasks.metrics = Some(tokio::spawn(serve_metrics(attached.clone(), progress.clone(), listener, background.clone())));
        }
        Ok(Session { attached, progress, writer, written, background, tasks, started, metrics_file })
    }

    /// A handle on the writer task's queue.
    pub fn writer(&self) -> mpsc::Sender<BatchWrite> {
        self.writer.clone()
    }

    /// Runs `engine` until it stops, then drains the writer, stops the background tasks,
    /// records the run's end and makes the summary.
    pub async fn drive<E: Engine>(self, mut engine: E, shutdown: CancellationToken) -> anyhow::Result<RunOutcome> {
        let stop = engine.work(&self, &shutdown).await;
        let tally = engine.end();
        let Session { attached, progress, writer, written: _, background, tasks, started, metrics_file } = self;
        drop(writer);
        let _ = tasks.writer.await;
        background.cancel();
        let _ = tasks.reporter.await;
        let _ = tasks.heartbeat.await;
        if let Some(metrics) = tasks.metrics {
            let _ = metrics.await;
        }

        let stop = lifecycle::settle_stop(stop, &progress);
        let (report, exit, error) = lifecycle::end(&attached, &attached.job, &stop).await?;
        if let Some(path) = &metrics_file {
            // The night's figures for node_exporter's textfile collector; a file that cannot be
            // written is said, and the run's own outcome stands.
            if let Err(e) = crate::metrics::write_file(path, &snapshot(&attached, &progress, Some(&report))) {
                tracing::warn!("{e:#}");
            }
        }
        let Figures { mut controller, compute } = E::figures(tally, &progress);
        let elapsed = started.elapsed().as_secs_f64();
        controller.requests_per_second = controller.requests as f64 / elapsed.max(0.001);
        controller.retries = progress.retries.load(Ordering::Relaxed);
        let mut summary = Summary::from_report(&report, exit, elapsed, progress.finished_here.load(Ordering::Relaxed), controller, error);
        summary.compute_seconds = compute.map(|c| c.as_secs_f64());
        // A run that drained its own share while other workers still hold items is not
        // finished yet; this worker's part is.
        Ok(RunOutcome { summary: Some(summary), exit })
    }
}

/// How often the served metrics re-read the run's figures from the store (other workers'
/// items and the ledger's money); what this process counts itself is read at each scrape.
const METRICS_REFRESH: Duration = Duration::from_secs(5);

/// Serves `--metrics-addr` until the session's background tasks end.
async fn serve_metrics(attached: Arc<Attached>, progress: Arc<Progress>, listener: tokio::net::TcpListener, stop: CancellationToken) {
    // The latest figures read from the store, shared with the server's scrapes. A std mutex:
    // held only to clone or replace the report, never across an await.
    let latest: Arc<std::sync::Mutex<Option<StatusReport>>> = Arc::default();
    let scrape = {
        let (attached, progress, latest) = (attached.clone(), progress.clone(), latest.clone());
        Arc::new(move || snapshot(&attached, &progress, latest.lock().expect("metrics lock").as_ref()))
    };
    let server = tokio::spawn(crate::metrics::serve(listener, scrape, stop.clone()));
    loop {
        match attached.store.status(&attached.job.name, Some(attached.run.id)).await {
            Ok(report) => *latest.lock().expect("metrics lock") = report,
            Err(e) => tracing::debug!("metrics: reading the run's figures failed: {e:#}"),
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(METRICS_REFRESH) => {}
        }
    }
    let _ = server.await;
}

/// The run's metrics now: items and money from `report` (the store's view, every worker
/// included) when there is one, else from this process's counters; requests and limits from
/// this process's controller.
fn snapshot(attached: &Attached, progress: &Progress, report: Option<&StatusReport>) -> Snapshot {
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    let items = match report {
        Some(r) => vec![
            ("pending", r.counts.pending),
            ("leased", r.counts.leased),
            ("done", r.counts.done),
            ("failed", r.counts.failed),
            ("rejected", r.counts.rejected),
        ],
        None => vec![
            ("pending", progress.queued.load(Ordering::Relaxed) as u64),
            ("done", load(&progress.done)),
            ("failed", load(&progress.failed)),
            ("rejected", load(&progress.rejected)),
        ],
    };
    let controller = progress.controller();
    let requests = controller
        .as_ref()
        .map(|status| {
            let c = &status.counts;
            let errors = c.rate_limited + c.timed_out + c.server_errors + c.other_errors;
            vec![
                ("answered", c.requests_completed.saturating_sub(errors)),
                ("rate_limited", c.rate_limited),
                ("timeout", c.timed_out),
                ("server_error", c.server_errors),
                ("error", c.other_errors),
            ]
        })
        .unwrap_or_default();
    let models = report.map(|r| r.models.as_slice()).unwrap_or_default();
    let sum = |f: fn(&crate::store::ModelCost) -> u64| models.iter().map(f).sum::<u64>();
    Snapshot {
        job: attached.job.name.clone(),
        run_id: attached.run.id,
        items,
        requests,
        retries: load(&progress.retries),
        in_flight: progress.in_flight.load(Ordering::Relaxed) as u64,
        tokens: if models.is_empty() {
            Vec::new()
        } else {
            vec![("input", sum(|m| m.prompt_tokens)), ("output", sum(|m| m.completion_tokens)), ("cached", sum(|m| m.cached_tokens))]
        },
        cost_usd_by_model: models.iter().map(|m| (m.model.clone(), m.cost.usd())).collect(),
        reserved_usd: report.map_or(0.0, |r| r.spend.reserved.usd()),
        budget_usd: progress.cap.map(Picos::usd),
        concurrency_limit: controller.as_ref().map(|c| u64::from(c.concurrency_limit)),
        requests_per_second_limit: controller.as_ref().map(|c| c.requests_per_second).filter(|r| r.is_finite()),
        items_per_request_limit: controller.as_ref().map(|c| u64::from(c.items_per_request)),
    }
}
