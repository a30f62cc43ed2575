//! Progress: shared counters, an indicatif bar on a terminal, and a plain log line every few
//! seconds without one (cron).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backfill_controller::ControllerStatus;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::pricing::Picos;

/// Counters updated by the dispatcher and the writer, read by the reporter and the summary.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicU64,
    /// Terminal counts for the whole run (earlier invocations included).
    pub done: AtomicU64,
    pub failed: AtomicU64,
    pub rejected: AtomicU64,
    /// Items that reached a terminal state in this invocation.
    pub finished_here: AtomicU64,
    pub requests: AtomicU64,
    /// Items sent again: back to the queue (missing, invalid, errors) or in a request re-sent after a 429.
    pub retries: AtomicU64,
    pub queued: AtomicUsize,
    /// Requests in flight now (set by the dispatcher).
    pub in_flight: AtomicUsize,
    spent: AtomicI64,
    reserved: AtomicI64,
    pub cap: Option<Picos>,
    controller: Mutex<Option<ControllerStatus>>,
    writer_failure: Mutex<Option<String>>,
}

impl Progress {
    pub fn new(total: u64, done: u64, failed: u64, rejected: u64, spent: Picos, cap: Option<Picos>) -> Self {
        let progress = Progress { cap, ..Progress::default() };
        progress.total.store(total, Ordering::Relaxed);
        progress.done.store(done, Ordering::Relaxed);
        progress.failed.store(failed, Ordering::Relaxed);
        progress.rejected.store(rejected, Ordering::Relaxed);
        progress.spent.store(spent.0, Ordering::Relaxed);
        progress
    }

    pub fn reserve(&self, amount: Picos) {
        self.reserved.fetch_add(amount.0, Ordering::Relaxed);
    }

    pub fn unreserve(&self, amount: Picos) {
        self.reserved.fetch_sub(amount.0, Ordering::Relaxed);
    }

    pub fn add_spent(&self, amount: Picos) {
        self.spent.fetch_add(amount.0, Ordering::Relaxed);
    }

    pub fn spent(&self) -> Picos {
        Picos(self.spent.load(Ordering::Relaxed))
    }

    pub fn set_controller(&self, status: ControllerStatus) {
        *self.controller.lock().expect("progress lock") = Some(status);
    }

    pub fn controller(&self) -> Option<ControllerStatus> {
        self.controller.lock().expect("progress lock").clone()
    }

    pub fn fail_writer(&self, why: String) {
        self.writer_failure.lock().expect("progress lock").get_or_insert(why);
    }

    pub fn writer_failure(&self) -> Option<String> {
        self.writer_failure.lock().expect("progress lock").clone()
    }

    fn terminal(&self) -> u64 {
        self.done.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed) + self.rejected.load(Ordering::Relaxed)
    }

    /// One line for people: counts, rate, money, and the controller's choices.
    pub fn line(&self, elapsed: Duration) -> String {
        let rate = self.finished_here.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64().max(0.001);
        let money = match self.cap {
            Some(cap) => format!("{} of {}", self.spent(), cap),
            None => self.spent().to_string(),
        };
        // What was achieved, with the controller's limits beside it.
        let sent_per_second = self.requests.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64().max(0.001);
        let controller = self
            .controller()
            .map(|c| {
                let paced = if c.requests_per_second.is_finite() {
                    format!(" (paced ≤ {:.1})", c.requests_per_second)
                } else {
                    String::new()
                };
                format!(
                    " | {:.2} req/s{}, {} in flight (limit {}), {} items/request{}",
                    sent_per_second,
                    paced,
                    self.in_flight.load(Ordering::Relaxed),
                    c.concurrency_limit,
                    c.items_per_request,
                    if c.counts.rate_limited > 0 { format!(", {} × 429", c.counts.rate_limited) } else { String::new() }
                )
            })
            .unwrap_or_default();
        format!(
            "{}/{} items ({} failed, {} rejected), {:.2} items/s, {}, {} requests{}",
            self.terminal(),
            self.total.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
            rate,
            money,
            self.requests.load(Ordering::Relaxed),
            controller
        )
    }
}

/// The reporter: a bar on a terminal, log lines otherwise. Stops when `stop` is cancelled.
pub async fn report(progress: std::sync::Arc<Progress>, stop: CancellationToken, quiet: bool) {
    let started = Instant::now();
    if quiet {
        stop.cancelled().await;
        return;
    }
    if std::io::stderr().is_terminal() {
        let bar = ProgressBar::with_draw_target(Some(progress.total.load(Ordering::Relaxed)), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template("{bar:30} {pos}/{len} eta {eta} | {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        crate::cli::logging::set_bar(Some(bar.clone()));
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            bar.set_length(progress.total.load(Ordering::Relaxed));
            bar.set_position(progress.terminal());
            bar.set_message(progress.line(started.elapsed()));
        }
        bar.finish_and_clear();
        crate::cli::logging::set_bar(None);
    } else {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => tracing::info!("{}", progress.line(started.elapsed())),
                _ = stop.cancelled() => break,
            }
        }
    }
}
