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
    /// The controller's latest status, set by the dispatcher, read by the reporter. A mutex
    /// because the status is not one atomic value; held only to copy it.
    controller: Mutex<Option<ControllerStatus>>,
    /// Why the writer (or the heartbeat) gave up, set once, read by every engine's loop to
    /// stop. A mutex for the same reason; held only to copy it.
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

    /// The time left at this invocation's pace: items still open over the items this process
    /// finished per second (not the run's count from 0, which a resume would inflate); `None`
    /// before this process has finished an item.
    pub fn eta(&self, elapsed: Duration) -> Option<Duration> {
        let here = self.finished_here.load(Ordering::Relaxed);
        if here == 0 || elapsed.is_zero() {
            return None;
        }
        let left = self.total.load(Ordering::Relaxed).saturating_sub(self.terminal());
        Some(Duration::from_secs_f64(left as f64 * elapsed.as_secs_f64() / here as f64))
    }

    /// One line for people: counts, rate, time left, money, and the controller's choices.
    pub fn line(&self, elapsed: Duration) -> String {
        let rate = self.finished_here.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64().max(0.001);
        let eta = self.eta(elapsed).map(format_eta).unwrap_or_else(|| "unknown".into());
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
            "{}/{} items ({} failed, {} rejected), {:.2} items/s, ETA {}, {}, {} requests{}",
            self.terminal(),
            self.total.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
            rate,
            eta,
            money,
            self.requests.load(Ordering::Relaxed),
            controller
        )
    }
}

impl Progress {
    /// The bar's message: the same figures as [`Progress::line`], shortest form, most wanted
    /// first, so that on a narrow terminal the bar cuts its tail and stays on one line.
    pub fn bar_line(&self, elapsed: Duration) -> String {
        let rate = self.finished_here.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64().max(0.001);
        let eta = self.eta(elapsed).map(format_eta).unwrap_or_else(|| "?".into());
        let mut parts = vec![
            format!("{}/{}", self.terminal(), self.total.load(Ordering::Relaxed)),
            format!("{rate:.1}/s"),
            format!("ETA {eta}"),
            match self.cap {
                Some(cap) => format!("{}/{}", self.spent(), cap),
                None => self.spent().to_string(),
            },
        ];
        if let Some(c) = self.controller() {
            let sent_per_second = self.requests.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64().max(0.001);
            parts.push(format!("{}/{} in flight", self.in_flight.load(Ordering::Relaxed), c.concurrency_limit));
            parts.push(format!("{sent_per_second:.1} req/s"));
            parts.push(format!("{}/req", c.items_per_request));
            if c.counts.rate_limited > 0 {
                parts.push(format!("{}×429", c.counts.rate_limited));
            }
        }
        for (count, what) in [(&self.failed, "failed"), (&self.rejected, "rejected")] {
            let n = count.load(Ordering::Relaxed);
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        parts.join(" · ")
    }
}

/// `45s`, `2m 09s`, `1h 02m`.
pub fn format_eta(left: Duration) -> String {
    let secs = left.as_secs_f64().round() as u64;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {:02}s", secs / 60, secs % 60),
        _ => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
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
        // The ETA is in the message: indicatif's own would count a resumed run's items as
        // done in the first tick.
        // `wide_msg` fits the message to the terminal's width (cutting its tail), so the bar
        // stays one line on an 80-column terminal; the count is in the message, not repeated.
        let style = ProgressStyle::with_template("{bar:20} {wide_msg}").unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        crate::logging::set_bar(Some(bar.clone()));
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => break,
            }
            bar.set_length(progress.total.load(Ordering::Relaxed));
            bar.set_position(progress.terminal());
            bar.set_message(progress.bar_line(started.elapsed()));
        }
        bar.finish_and_clear();
        crate::logging::set_bar(None);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_of_a_resumed_run_is_at_this_invocations_pace() {
        // 600 of 1,000 items were done before; this process finished 100 in 50 s (2/s).
        let progress = Progress::new(1_000, 700, 0, 0, Picos::ZERO, None);
        progress.finished_here.store(100, Ordering::Relaxed);
        assert_eq!(progress.eta(Duration::from_secs(50)), Some(Duration::from_secs(150)));
        assert!(progress.line(Duration::from_secs(50)).contains("2.00 items/s, ETA 2m 30s"), "{}", progress.line(Duration::from_secs(50)));
        progress.finished_here.store(0, Ordering::Relaxed);
        assert_eq!(progress.eta(Duration::from_secs(50)), None);
        assert!(progress.line(Duration::from_secs(50)).contains("ETA unknown"));
    }

    #[test]
    fn the_bar_line_puts_count_pace_time_and_money_first_and_fits_80_columns_without_the_tail() {
        let progress = Progress::new(1_000, 700, 3, 0, Picos::ZERO, Some(Picos::from_usd(5.0)));
        progress.finished_here.store(100, Ordering::Relaxed);
        let line = progress.bar_line(Duration::from_secs(50));
        assert!(line.starts_with("703/1000 · 2.0/s · ETA 2m 29s · $0.0000/$5.0000"), "{line}");
        assert!(line.ends_with("3 failed"), "{line}");
        // Without the controller's figures, the line and a 20-column bar fit 80 columns.
        assert!(20 + 1 + line.chars().count() <= 80, "{} columns: {line}", line.chars().count());
    }

    #[test]
    fn etas_read_as_seconds_minutes_or_hours() {
        assert_eq!(format_eta(Duration::from_secs(45)), "45s");
        assert_eq!(format_eta(Duration::from_secs(129)), "2m 09s");
        assert_eq!(format_eta(Duration::from_secs(3720)), "1h 02m");
    }
}
