//! No tail: timeouts that follow the recent latencies, and the end of the queue, where the
//! last items are spread over smaller requests and slow requests are cut and sent again
//! rather than waited for.

use std::time::Duration;

use crate::controller::Controller;
use crate::latency_window::LatencyModel;
use crate::protocol::{PipelineLoad, Ticket};

/// Latencies needed before the controller proposes its own timeout.
const LATENCIES_FOR_TIMEOUT: usize = 20;
const MINIMUM_TIMEOUT: Duration = Duration::from_secs(5);
/// At the end of the queue, requests are not made smaller than the batch size over this.
const END_OF_QUEUE_SMALLEST_SHARE: u32 = 4;
/// Settled latencies the last round on a paced API is planned with (before: the recent ones).
const SETTLED_LATENCIES_TO_PLAN: usize = 10;
/// The last round is planned so that each request ends with the last one at its p99.9
/// latency: in standard deviations of a log-normal spread, which the measured p90 (1.282 of
/// them) scales; the measured p99 counts when it is higher (a heavier tail). A straggler
/// costs the whole run a latency, a smaller request only a little more per item.
const TAIL_SIGMAS: f64 = 3.09;
const P90_SIGMAS: f64 = 1.282;
/// Cut requests are hedges: the provider still computes them (and a hosted API bills them),
/// so their items are computed twice. At most this share of the items sent so far is sent
/// again that way...
const HEDGE_BUDGET_SHARE: f64 = 0.02;
/// ...and at most this share on a server that queues, where the copy also waits behind the
/// request it hedges and its short last round leaves hedges little to win.
const HEDGE_BUDGET_SHARE_QUEUEING: f64 = 0.01;
/// Requests grow only while one of them takes at most this share of `request_timeout_s`
/// at the server's unloaded pace: a request's latency varies (its output's length, the
/// server's load), and one that outlasts the timeout is computed for nothing (and billed)
/// while its items wait out the timeout before they are sent again.
const TIMEOUT_SHARE_AT_UNLOADED_PACE: f64 = 0.5;
/// At the end of the queue, a request older than the larger of these multiples of its size's
/// p90 and p99 latency is taken as hung and cut whatever the hedge budget has left: waiting
/// out its timeout would be the run's tail.
const HUNG_P90S: f64 = 2.0;
const HUNG_P99S: f64 = 1.5;

impl Controller {
    /// Requests the dispatcher should abandon now, reporting each as `Outcome::TimedOut` so
    /// its items go back to the queue and are sent again at once. Only when no item waits
    /// (`queued_items == 0`, the end of the run): then a request older than its size's hedge
    /// latency (`LatencyModel::ratio_hedge`: past it, requests took on average another median
    /// latency) ends later than a copy sent now, and waiting for it (or for a hung one to time
    /// out) is the run's tail. Call it after each wake-up; `poll` wakes the dispatcher when
    /// the next one falls due.
    pub fn requests_to_cut(&mut self, now: Duration, load: PipelineLoad) -> Vec<Ticket> {
        if load.queued_items > 0 {
            return Vec::new();
        }
        let Some(cut_age) = self.end_of_queue_cut_age() else {
            return Vec::new();
        };
        // Most overdue first (a hung request before one just past its hedge age), within
        // the hedge budget.
        let hung_age = self.hung_age();
        let mut overdue: Vec<(f64, Duration, Ticket, bool)> = self
            .in_flight
            .iter()
            .filter_map(|(ticket, request)| {
                let age = now.saturating_sub(request.sent_at);
                let allowed = cut_age(request.shape.items);
                let hung = hung_age
                    .as_ref()
                    .is_some_and(|hung_age| age >= hung_age(request.shape.items));
                (age >= allowed || hung).then(|| {
                    let overdue = age.as_secs_f64() / allowed.as_secs_f64().max(1e-9);
                    (overdue, request.sent_at, *ticket, hung)
                })
            })
            .collect();
        drop(cut_age);
        drop(hung_age);
        // Ties broken by the ticket, the order sent: the in-flight map's order is arbitrary,
        // and the same run must cut the same requests.
        overdue.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut kept = Vec::with_capacity(overdue.len());
        for (_, _, ticket, hung) in overdue {
            let left = self.hedge_budget_left();
            let Some(request) = self.in_flight.get_mut(&ticket) else {
                continue;
            };
            let items = u64::from(request.shape.items);
            if request.cut_at_end_of_queue || (items > left && !hung) {
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

    /// How old a request of a given size may get at the end of the queue before it is cut:
    /// its hedge latency.
    fn end_of_queue_cut_age(&self) -> Option<impl Fn(u32) -> Duration + use<'_>> {
        // The fit may extrapolate badly to sizes far below the usual: keep a floor.
        self.age_bound(|model, items| model.ratio_hedge * model.expected(items))
    }

    /// How old a request of a given size may get before it is taken as hung: far beyond
    /// what its size's latencies make likely (a live one takes this long about once in
    /// several thousand at a log-normal spread). Only on a paced API: on a server that
    /// queues, a request's age includes its wait behind ours.
    fn hung_age(&self) -> Option<impl Fn(u32) -> Duration + use<'_>> {
        if !self.paced_api() {
            return None;
        }
        self.age_bound(|model, items| {
            (HUNG_P90S * model.p90(items)).max(HUNG_P99S * model.p99(items))
        })
    }

    /// An age per request size from the latency fit, once enough latencies are known, at
    /// least `MINIMUM_TIMEOUT` and at most the request's timeout.
    fn age_bound<F: Fn(&LatencyModel, u32) -> f64>(
        &self,
        seconds: F,
    ) -> Option<impl Fn(u32) -> Duration + use<'_, F>> {
        let model = self
            .latency
            .model()
            .filter(|_| self.latency.len() >= LATENCIES_FOR_TIMEOUT)?;
        Some(move |items: u32| {
            Duration::from_secs_f64(seconds(&model, items))
                .max(MINIMUM_TIMEOUT)
                .min(self.timeout_for(items))
        })
    }

    pub(crate) fn next_end_of_queue_cut(&self) -> Option<Duration> {
        let cut_age = self.end_of_queue_cut_age()?;
        let hung_age = self.hung_age();
        let left = self.hedge_budget_left();
        self.in_flight
            .values()
            .filter(|request| !request.cut_at_end_of_queue)
            .filter_map(|request| {
                let items = request.shape.items;
                let hung = hung_age.as_ref().map(|hung_age| hung_age(items));
                let age = if u64::from(items) <= left {
                    hung.map_or(cut_age(items), |hung| hung.min(cut_age(items)))
                } else {
                    hung?
                };
                Some(request.sent_at + age)
            })
            .min()
    }

    /// Items that may still be sent twice by end-of-queue cuts.
    fn hedge_budget_left(&self) -> u64 {
        let share = if self.queueing_server(self.concurrency_limit_for(self.batch.current())) {
            HEDGE_BUDGET_SHARE_QUEUEING
        } else {
            HEDGE_BUDGET_SHARE
        };
        // A share of the distinct items sent: retries do not widen the budget.
        let distinct = self
            .counts
            .items_sent
            .saturating_sub(self.counts.retried_items);
        let budget = (share * distinct as f64).floor() as u64;
        budget.saturating_sub(self.counts.hedged_items)
    }

    /// The timeout to give a request now: `[model] request_timeout_s`, shortened to a few
    /// times the recent latency once enough latencies are known, so a hung request does not
    /// hold its items (or the end of the run) for long.
    /// It grows with the request's size when that exceeds the recent requests' mean.
    pub fn timeout_for(&self, items: u32) -> Duration {
        match self.latency.model() {
            Some(model)
                if self.latency.len() >= LATENCIES_FOR_TIMEOUT
                    && !self.shortened_timeout_missed =>
            {
                let proposed =
                    Duration::from_secs_f64((3.0 * model.p90(items)).max(1.5 * model.p99(items)));
                proposed
                    .max(MINIMUM_TIMEOUT)
                    .min(self.config.request_timeout)
            }
            _ => self.config.request_timeout,
        }
    }

    /// The largest request the job's `[model] request_timeout_s` leaves room for: one that
    /// takes at most `TIMEOUT_SHARE_AT_UNLOADED_PACE` of it at the server's unloaded pace
    /// per item, the lower of the delay limit's baseline (the least loaded level measured)
    /// and the mean service time per item the server reports for requests sent alone (a
    /// larger request beats either, its fixed part shared by more items). Before either is
    /// known, the job's largest size.
    pub(crate) fn largest_size_within_the_timeout(&self) -> u32 {
        let range = self.config.items_per_request;
        let (served_seconds, served_items) = self.served;
        let served = (served_items > 0.0).then(|| served_seconds / served_items);
        let paces = [self.delay.baseline(), served];
        let Some(per_item) = paces
            .into_iter()
            .flatten()
            .filter(|per_item| *per_item > 0.0)
            .min_by(f64::total_cmp)
        else {
            return range.max;
        };
        let allowed = TIMEOUT_SHARE_AT_UNLOADED_PACE * self.config.request_timeout.as_secs_f64();
        let items = (allowed / per_item).floor().min(f64::from(u32::MAX));
        (items as u32).clamp(range.min, range.max)
    }

    /// The timeout for a request sent with `in_flight` of our own requests in flight:
    /// `timeout_for` bounds the server's work on it, and a server that queues serves the
    /// ones ahead first, so it gets one more such time per round of them it waits for (all
    /// of them in one line before the server's parallelism is measured, unless it said its
    /// slots). Those beside it are the ones in flight, or, when it is one of a burst filling
    /// the level, the rest of the level: a server that batches serves the first request of a
    /// burst beside all the others, each slowing the rest, which the same round covers. A
    /// request is never cut because the server is busy with our other requests.
    pub fn timeout_with_queue(&self, items: u32, in_flight: usize) -> Duration {
        let level = self.concurrency_limit_for(self.batch.current());
        let ahead = in_flight.max(level.saturating_sub(1) as usize);
        let ahead = ahead as f64;
        let rounds = match self
            .delay
            .parallelism()
            .or(self.config.announced_slots().map(f64::from))
        {
            _ if !self.delay_limit_applies() => 0.0,
            Some(parallel) => (ahead / parallel).ceil(),
            None => ahead,
        };
        self.timeout_for(items).mul_f64(1.0 + rounds.min(ahead))
    }

    /// The request size near the end of the queue on a paced API (a hosted API that
    /// announced its limits or answered 429). A request of `n` items sent now ends a tail
    /// latency later (`TAIL_SIGMAS`), `tail(n) = k · n + tail(0)` with `k` the tail latency
    /// per item; if sizes shrink by one item per `k` seconds of sending, every request ends
    /// when the last one does instead of the run waiting for large requests sent late. The
    /// sizes from `last` up to `n` then hold `k · Σ R(j)` items (R(j): the paced items/s at
    /// size j), which gives `n` for the items still queued. Smaller requests cost more per
    /// item (the prompt's fixed part and `max_tokens`' margin under tokens/min, a whole
    /// request under requests/min): the items sent at size j take `k` seconds instead of
    /// `k · R(j) ÷ R` at full size. `last` is the size that makes that extra sending time
    /// plus its own tail latency least.
    fn paced_last_round_size(
        &self,
        model: LatencyModel,
        queued: f64,
        limit: u32,
        size: u32,
    ) -> u32 {
        let smallest = self.config.items_per_request.min.min(size);
        // Planned with the settled latencies once there are enough of them.
        let model = match self.settled_latency.model() {
            Some(settled) if self.settled_latency.len() >= SETTLED_LATENCIES_TO_PLAN => settled,
            _ => model,
        };
        let tail_ratio = model
            .ratio_p99
            .max(model.ratio_p90.max(1.0).powf(TAIL_SIGMAS / P90_SIGMAS));
        let tail = |items: u32| tail_ratio * model.expected(items);
        let per_item_tail = tail_ratio * model.per_item;
        let items_per_second = |items: u32| {
            let paced = f64::from(items) * self.paced_request_rate(items);
            let carried = f64::from(limit) * f64::from(items) / model.p50(items).max(1e-9);
            paced.min(carried)
        };
        let full = items_per_second(size);
        if !(per_item_tail > 0.0 && full.is_finite() && full > 0.0) {
            return size;
        }
        // Sizes shrink by one item per `k` seconds of sending, so every request ends when
        // the last one does; the items sent at size `n` take `k` seconds instead of
        // `k · R(n) ÷ R` at full size.
        if queued >= per_item_tail * full * f64::from(size - smallest) {
            return size;
        }
        let mut extra = 0.0;
        let mut best = (tail(size), size);
        for last in (smallest..size).rev() {
            extra += per_item_tail * (1.0 - items_per_second(last) / full).max(0.0);
            let total = extra + tail(last);
            if total < best.0 {
                best = (total, last);
            }
        }
        let last = best.1;
        // The largest size whose planned remainder still holds `queued` items.
        let mut planned = 0.0;
        let mut chosen = last;
        while chosen < size {
            planned += per_item_tail * items_per_second(chosen);
            if planned > queued {
                break;
            }
            chosen += 1;
        }
        chosen
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
                let best = (2.0 * queued * fixed_items / f64::from(limit))
                    .sqrt()
                    .ceil();
                (best.min(f64::from(u32::MAX)) as u32)
                    .clamp(self.config.items_per_request.min, size)
            }
            // On a paced API the last round is planned whole: no further spreading.
            Some(model) if self.paced_api() => {
                return self.paced_last_round_size(model, queued, limit, size);
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
