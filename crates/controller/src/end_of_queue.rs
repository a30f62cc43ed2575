//! No tail: timeouts that follow the recent latencies, and the end of the queue, where the
//! last items are spread over smaller requests and slow requests are cut and sent again
//! rather than waited for.

use std::time::Duration;

use crate::controller::Controller;
use crate::protocol::{PipelineLoad, Ticket};

/// Latencies needed before the controller proposes its own timeout.
const LATENCIES_FOR_TIMEOUT: usize = 20;
const MINIMUM_TIMEOUT: Duration = Duration::from_secs(5);
/// At the end of the queue, requests are not made smaller than the batch size over this.
const END_OF_QUEUE_SMALLEST_SHARE: u32 = 4;
/// At the end of the queue, requests older than this many p90 latencies are cut and resent.
const END_OF_QUEUE_CUT_P90S: f64 = 1.0;
/// Cut requests are hedges: the provider still computes them (and a hosted API bills them),
/// so their items are computed twice. At most this share of the items sent so far is sent
/// again that way...
const HEDGE_BUDGET_SHARE: f64 = 0.02;
/// ...and at most this share on a server that queues, where the copy also waits behind the
/// request it hedges and its short last round leaves hedges little to win.
const HEDGE_BUDGET_SHARE_QUEUEING: f64 = 0.01;

impl Controller {
    /// Requests the dispatcher should abandon now, reporting each as `Outcome::TimedOut` so
    /// its items go back to the queue and are sent again at once. Only when no item waits
    /// (`queued_items == 0`, the end of the run): then a request older than
    /// `END_OF_QUEUE_CUT_P90S` × the recent p90 latency is more likely to finish late than a
    /// fresh one, and waiting for it (or for a hung one to time out) is the run's tail. Call
    /// it after each wake-up; `poll` wakes the dispatcher when the next one falls due.
    pub fn requests_to_cut(&mut self, now: Duration, load: PipelineLoad) -> Vec<Ticket> {
        if load.queued_items > 0 {
            return Vec::new();
        }
        let Some(cut_age) = self.end_of_queue_cut_age() else {
            return Vec::new();
        };
        let mut overdue: Vec<Ticket> = self
            .in_flight
            .iter()
            .filter(|(_, request)| {
                now.saturating_sub(request.sent_at) >= cut_age(request.shape.items)
            })
            .map(|(ticket, _)| *ticket)
            .collect();
        drop(cut_age);
        // Oldest first, within the hedge budget.
        overdue.sort_by_key(|ticket| self.in_flight.get(ticket).map(|request| request.sent_at));
        let mut kept = Vec::with_capacity(overdue.len());
        for ticket in overdue {
            let left = self.hedge_budget_left();
            let Some(request) = self.in_flight.get_mut(&ticket) else {
                continue;
            };
            let items = u64::from(request.shape.items);
            if request.cut_at_end_of_queue || items > left {
                continue;
            }
            request.cut_at_end_of_queue = true;
            self.counts.hedged_items += items;
            self.counts.hedged_requests += 1;
            kept.push(ticket);
        }
        let overdue = kept;
        if !overdue.is_empty() {
            tracing::debug!(
                count = overdue.len(),
                "end of queue: cutting slow requests to resend their items"
            );
        }
        overdue
    }

    /// How old a request of a given size may get at the end of the queue before it is cut.
    fn end_of_queue_cut_age(&self) -> Option<impl Fn(u32) -> Duration + use<'_>> {
        let model = self
            .latency
            .model()
            .filter(|_| self.latency.len() >= LATENCIES_FOR_TIMEOUT)?;
        Some(move |items: u32| {
            // The fit may extrapolate badly to sizes far below the usual: keep a floor.
            Duration::from_secs_f64(model.p90(items) * END_OF_QUEUE_CUT_P90S)
                .max(MINIMUM_TIMEOUT)
                .min(self.timeout_for(items))
        })
    }

    pub(crate) fn next_end_of_queue_cut(&self) -> Option<Duration> {
        let cut_age = self.end_of_queue_cut_age()?;
        let left = self.hedge_budget_left();
        self.in_flight
            .values()
            .filter(|request| {
                !request.cut_at_end_of_queue && u64::from(request.shape.items) <= left
            })
            .map(|request| request.sent_at + cut_age(request.shape.items))
            .min()
    }

    /// Items that may still be sent twice by end-of-queue cuts.
    fn hedge_budget_left(&self) -> u64 {
        let share = if self.queueing_server(self.concurrency_limit_for(self.batch.current())) {
            HEDGE_BUDGET_SHARE_QUEUEING
        } else {
            HEDGE_BUDGET_SHARE
        };
        let budget = (share * self.counts.items_sent as f64).floor() as u64;
        budget.saturating_sub(self.counts.hedged_items)
    }

    /// The timeout to give a request now: `[model] request_timeout_s`, shortened to a few
    /// times the recent latency once enough latencies are known, so a hung request does not
    /// hold its items (or the end of the run) for long.
    /// It grows with the request's size when that exceeds the recent requests' mean.
    pub fn timeout_for(&self, items: u32) -> Duration {
        match self.latency.model() {
            Some(model) if self.latency.len() >= LATENCIES_FOR_TIMEOUT => {
                let proposed =
                    Duration::from_secs_f64((3.0 * model.p90(items)).max(1.5 * model.p99(items)));
                proposed
                    .max(MINIMUM_TIMEOUT)
                    .min(self.config.request_timeout)
            }
            _ => self.config.request_timeout,
        }
    }

    /// The timeout for a request sent behind `ahead` of our own requests: `timeout_for`
    /// bounds the server's work on it, and a server that queues serves the ones ahead first,
    /// so it gets one more such time per round of them it waits for (all of them in one
    /// line before the server's parallelism is measured). A request is never cut because the
    /// server is busy with our other requests.
    pub fn timeout_with_queue(&self, items: u32, ahead: usize) -> Duration {
        let ahead = ahead as f64;
        let rounds = match self.delay.parallelism() {
            _ if !self.delay_limit_applies() => 0.0,
            Some(parallel) => (ahead / parallel).ceil(),
            None => ahead,
        };
        self.timeout_for(items).mul_f64(1.0 + rounds.min(ahead))
    }

    /// The batch size, smaller at the end of the queue so the last items spread over the
    /// requests that can start within one typical latency instead of waiting in one long one.
    pub(crate) fn items_to_send(&self, load: PipelineLoad, limit: u32) -> u32 {
        let size = self.batch.current();
        let free = limit.saturating_sub(load.in_flight as u32).max(1);
        let starts_per_latency = match self.latency.model() {
            Some(model) => (self.paced_request_rate(size) * model.p50(size)).max(1.0),
            None => f64::from(free),
        };
        let spread_over = f64::from(free).min(starts_per_latency);
        let queued = load.queued_items.min(u32::MAX as usize) as f64;
        // On a server that queues (no 429 yet, the delay limit binds), the run's last round
        // (every request in flight finishing while fewer and fewer run) costs about half the
        // items in flight, `limit · n / 2`, and each request its fixed latency, `fixed ÷
        // per_item` items' worth: the run's time over the `queued` items left is least at
        // n = √(2 · queued · fixed ÷ (per_item · limit)).
        let size = match self.latency.model() {
            Some(model) if self.queueing_server(limit) && model.per_item > 0.0 => {
                let fixed_items = model.fixed / model.per_item;
                let best = (2.0 * queued * fixed_items / f64::from(limit)).sqrt().ceil();
                (best.min(f64::from(u32::MAX)) as u32).clamp(self.config.items_per_request.min, size)
            }
            _ => size,
        };
        if queued >= spread_over * f64::from(size) {
            return size;
        }
        let spread = (queued / spread_over).ceil() as u32;
        let floor = (size / END_OF_QUEUE_SMALLEST_SHARE).max(self.config.items_per_request.min);
        spread.clamp(floor.min(size), size)
    }
}
