//! The controller: one pure object that a dispatcher asks what to send (`poll`), tells what
//! it sent (`on_sent`) and tells how each request ended (`on_outcome`). It never reads a
//! clock: every call carries `now`, time since an arbitrary epoch, so a tokio loop and the
//! discrete-event simulator drive the same code.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::batch_sizer::BatchSizer;
use crate::concurrency_limit::ConcurrencyLimit;
use crate::config::{ConfigError, ControllerConfig};
use crate::delay_limit::DelayLimit;
use crate::latency_window::LatencyWindow;
use crate::protocol::{Decision, PipelineLoad, RequestShape, ServerQueue, Ticket};
use crate::rate_pacer::{ALL_DIMENSIONS, RateDimension, RatePacer, request_costs};
use crate::status::{ControllerCounts, ControllerStatus};
use crate::token_estimates::TokenEstimates;

/// The run's small first request (`FirstAnswer`) is sent only when the smallest size is at
/// most this share of the start size: only then does its answer come well before the start's.
/// On a server that queues it is one more request at the head of the queue at the start (a
/// 2-slot `llama-server` serving requests of 2 items ran 5–6% slower over 40 items with a
/// first request of 1), which a request far smaller than the rest makes cheap.
const FIRST_ANSWER_SHARE: u32 = 4;
/// A wait on a bucket within this long counts as "the rate binds" (growth allowed).
const BINDING_MEMORY: Duration = Duration::from_secs(1);
/// Send times kept for the trailing admitted-rate estimate.
const SEND_HISTORY: Duration = Duration::from_secs(10);
/// Two readings of the server's gauges at most this far apart are in a row (the dispatcher
/// reads them every second; a reading that failed between two leaves them further apart).
const GAUGE_READINGS_APART: Duration = Duration::from_secs(3);
/// Shortest interval between congestion events that says something about the limit.
const ADMITTED_INTERVAL_MINIMUM: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy)]
pub(crate) struct InFlight {
    pub sent_at: Duration,
    pub shape: RequestShape,
    /// Cut by `requests_to_cut`: its timeout says nothing about overload.
    pub cut_at_end_of_queue: bool,
    /// The delay limit's generation and the requests in flight (itself included) when sent.
    pub generation: u64,
    /// Whether every request in flight when this one was sent was sent in the same
    /// generation: a request sent behind older ones waits for them at a server that queues,
    /// and measures the previous level as much as its own.
    pub clean: bool,
    pub level: u32,
    /// The run's first request, sent small to bring the first answer early
    /// (`FirstAnswer`); it is not counted among the requests in flight.
    pub first_answer: bool,
    /// Sent with a timeout the recent latencies made shorter than the job's.
    pub shortened_timeout: bool,
}

/// The run's first request goes out with the job's smallest size beside the start's requests
/// of full size: its answer comes within a short latency, and with it what a hosted API
/// announces in its headers (the pace, and the burst its bucket holds), where the start's
/// full requests would bring it only after a long one while the provider's bucket sits full.
/// It takes no slot of the start's concurrency, and tells the delay limit nothing of a level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FirstAnswer {
    /// Nothing sent yet.
    Pending,
    /// `poll` offered it; `on_sent` records it.
    Offered,
    InFlight(Ticket),
    Done,
}

/// The adaptive throughput controller of the design: rate pacing, concurrency by Little's
/// law, items per request by throughput and quality, `max_tokens` and timeouts.
#[derive(Debug)]
pub struct Controller {
    pub(crate) config: ControllerConfig,
    pub(crate) pacer: RatePacer,
    pub(crate) concurrency: ConcurrencyLimit,
    pub(crate) delay: DelayLimit,
    pub(crate) batch: BatchSizer,
    pub(crate) tokens: TokenEstimates,
    pub(crate) latency: LatencyWindow,
    /// The same latencies, each taken in only once every request sent before it has ended:
    /// free of the bias of the recent window, where only the fast ones of the latest
    /// requests have answered yet (what the end of the queue plans with).
    pub(crate) settled_latency: LatencyWindow,
    /// Answered requests not yet taken into `settled_latency`: `(sent_at, latency, items)`.
    pub(crate) unsettled: VecDeque<(Duration, Duration, u32)>,
    pub(crate) in_flight: HashMap<Ticket, InFlight>,
    pub(crate) first_answer: FirstAnswer,
    next_ticket: u64,
    pub(crate) pause_until: Duration,
    /// Consecutive 429 pauses without a success in between (backoff without `Retry-After`).
    pub(crate) consecutive_pauses: u32,
    pub(crate) last_rate_cut_at: Option<Duration>,
    /// Counts at the last congestion event, for the admitted rate between events.
    pub(crate) sends_at_last_cut: u64,
    pub(crate) rejections_at_last_cut: u64,
    pub(crate) first_send_at: Option<Duration>,
    /// Recent send times and the send times of recent 429s (trailing admitted rate).
    pub(crate) recent_sends: VecDeque<Duration>,
    pub(crate) recent_rejections: VecDeque<Duration>,
    /// Whether each recent non-429 outcome was a timeout (timeout clusters).
    pub(crate) recent_timeouts: VecDeque<bool>,
    rate_blocked_at: Option<Duration>,
    /// The costs the last `Send` was decided on.
    admitted_costs: Option<[f64; 4]>,
    concurrency_blocked_at: Option<Duration>,
    pub(crate) counts: ControllerCounts,
    pub(crate) rng: fastrand::Rng,
    now: Duration,
    /// The service time the server reported (llama.cpp's `timings`) and the items it was
    /// for, summed over the answers to requests sent alone, each one's weight decaying by
    /// `SERVED_DECAY`.
    pub(crate) served: (f64, f64),
    /// A request cut at a timeout the recent latencies shortened, with no answer since: they
    /// do not describe the requests now sent, and the next ones get the job's timeout.
    pub(crate) shortened_timeout_missed: bool,
    /// The server's gauges at their previous reading, and when (`on_server_queue`).
    last_server_queue: Option<(Duration, ServerQueue)>,
    /// Whether the queue the gauges show now was followed already (once per queue).
    server_queue_followed: bool,
}

impl Controller {
    /// A controller for a new run, starting at `now`.
    pub fn new(config: ControllerConfig, now: Duration) -> Result<Self, ConfigError> {
        config.validate()?;
        let caps = [
            config.requests_per_minute.map(|rpm| rpm / 60.0),
            config.tokens_per_minute.map(|tpm| tpm / 60.0),
            None,
            None,
        ];
        let concurrency = config.starting_concurrency();
        if let Some(slots) = config.announced_slots() {
            tracing::debug!(
                slots,
                start = concurrency.start,
                "the server says how many requests it works on at once: the run starts at that many in flight"
            );
        }
        let initial_rate = f64::from(concurrency.start);
        Ok(Self {
            pacer: RatePacer::new(caps, initial_rate, now),
            concurrency: ConcurrencyLimit::new(concurrency),
            delay: DelayLimit::new(concurrency).with_server_slots(config.announced_slots()),
            batch: BatchSizer::new(config.items_per_request),
            tokens: TokenEstimates::new(
                config.initial_output_tokens_per_item,
                config.context_window_tokens,
            ),
            latency: LatencyWindow::default(),
            settled_latency: LatencyWindow::default(),
            unsettled: VecDeque::new(),
            in_flight: HashMap::new(),
            first_answer: FirstAnswer::Pending,
            next_ticket: 0,
            pause_until: Duration::ZERO,
            consecutive_pauses: 0,
            last_rate_cut_at: None,
            sends_at_last_cut: 0,
            rejections_at_last_cut: 0,
            first_send_at: None,
            recent_sends: VecDeque::new(),
            recent_rejections: VecDeque::new(),
            recent_timeouts: VecDeque::new(),
            rate_blocked_at: None,
            admitted_costs: None,
            concurrency_blocked_at: None,
            counts: ControllerCounts::default(),
            rng: fastrand::Rng::with_seed(config.seed),
            config,
            now,
            served: (0.0, 0.0),
            shortened_timeout_missed: false,
            last_server_queue: None,
            server_queue_followed: false,
        })
    }

    /// What to do now. After `Decision::Send`, build the request and call `on_sent` before
    /// polling again.
    pub fn poll(&mut self, now: Duration, load: PipelineLoad) -> Decision {
        self.advance(now);
        let load = self.counted_load(load);
        if load.queued_items == 0 {
            return Decision::Wait {
                until: self.next_end_of_queue_cut(),
            };
        }
        if now < self.pause_until {
            return Decision::Wait {
                until: Some(self.pause_until),
            };
        }
        let limit = self.concurrency_limit_for(self.batch.current());
        let first_answer = self.first_answer_size(load);
        if first_answer.is_none() && load.in_flight >= limit as usize {
            self.concurrency_blocked_at = Some(now);
            return Decision::Wait { until: None };
        }
        let items = first_answer.unwrap_or_else(|| self.items_to_send(load, limit));
        let max_tokens = self.max_tokens(items);
        let costs = request_costs(self.tokens.prompt_tokens(items), f64::from(max_tokens));
        let wait = self.pacer.wait_for(costs, now);
        if wait > Duration::ZERO {
            self.rate_blocked_at = Some(now);
            return Decision::Wait {
                until: Some(now + wait),
            };
        }
        self.admitted_costs = Some(costs);
        if first_answer.is_some() {
            self.first_answer = FirstAnswer::Offered;
        }
        Decision::Send {
            items,
            max_tokens,
            timeout: self.timeout_with_queue(items, load.in_flight),
        }
    }

    /// Records a request built after `Send`; the ticket goes back in `on_outcome`.
    pub fn on_sent(&mut self, now: Duration, shape: RequestShape) -> Ticket {
        self.advance(now);
        let costs = request_costs(f64::from(shape.prompt_tokens), f64::from(shape.max_tokens));
        if let Some(admitted) = self.admitted_costs.take() {
            self.pacer.on_admitted(admitted, costs);
        }
        self.pacer.take(costs, now);
        self.tokens.record_prompt(shape.items, shape.prompt_tokens);
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        let first_answer = self.first_answer == FirstAnswer::Offered;
        if first_answer {
            self.first_answer = FirstAnswer::InFlight(ticket);
        }
        let level = u32::try_from(self.counted_in_flight() + 1).unwrap_or(u32::MAX);
        let generation = self.delay.generation();
        let clean = self.delay.raised()
            || self
                .in_flight
                .values()
                .all(|earlier| earlier.generation == generation);
        self.in_flight.insert(
            ticket,
            InFlight {
                sent_at: now,
                shape,
                cut_at_end_of_queue: false,
                generation,
                clean,
                level,
                first_answer,
                shortened_timeout: self.timeout_for(shape.items) < self.config.request_timeout,
            },
        );
        self.counts.max_in_flight = self.counts.max_in_flight.max(u64::from(level));
        self.first_send_at.get_or_insert(now);
        self.recent_sends.push_back(now);
        self.counts.requests_sent += 1;
        self.counts.items_sent += u64::from(shape.items);
        self.counts.retried_items += u64::from(shape.retried_items);
        tracing::trace!(
            ?ticket,
            items = shape.items,
            prompt_tokens = shape.prompt_tokens,
            "sent"
        );
        ticket
    }

    /// What the server's own gauges say of its load now (read every second or so, see
    /// `ServerQueue`). Nothing waiting, with every request the limit allows in flight and as
    /// many running at the server, shows the level within its slots: slow start doubles at
    /// once instead of after a measured round. Requests waiting show the server full when two
    /// readings in a row (at most `GAUGE_READINGS_APART` apart) show them and it took no more
    /// in between (one reading is not enough: a request just arrived may wait for the
    /// server's next step with a slot free). Then the most it ran is its slots, and the limit
    /// drops to our share of them: our requests in flight times the share of all its
    /// requests that its slots hold (all of them, when ours are all it has; fewer when other
    /// clients or other workers of the run queue there too). That is done once per queue: not
    /// again until a reading shows none waiting. Gauges that count fewer than half our
    /// requests in flight are another server's (one replica behind a balancer) and are not
    /// followed.
    pub fn on_server_queue(&mut self, now: Duration, queue: ServerQueue) {
        self.advance(now);
        let previous = self
            .last_server_queue
            .replace((now, queue))
            .filter(|(at, _)| now.saturating_sub(*at) <= GAUGE_READINGS_APART)
            .map(|(_, previous)| previous);
        let ours = self.in_flight.len() as u64;
        if u64::from(queue.running) + u64::from(queue.waiting) < ours.div_ceil(2) {
            return;
        }
        if queue.waiting == 0 {
            self.server_queue_followed = false;
            let limit = self.delay.limit();
            if self.delay_limit_applies()
                && self.counted_in_flight() >= limit as usize
                && queue.running >= limit
            {
                self.delay.on_server_took_all(queue.running);
            }
            return;
        }
        let Some(previous) = previous.filter(|previous| previous.waiting > 0) else {
            return;
        };
        if self.server_queue_followed
            || ours == 0
            || queue.running == 0
            || queue.running > previous.running
        {
            return;
        }
        let slots = queue.running.max(previous.running);
        let all = f64::from(slots) + f64::from(queue.waiting);
        let share = (ours as f64 * f64::from(slots) / all).round().max(1.0) as u32;
        self.delay.on_server_full(now, slots, share.min(slots));
        self.server_queue_followed = true;
    }

    /// A view for the progress bar and the run summary.
    pub fn status(&self) -> ControllerStatus {
        let items = self.batch.current();
        let max_tokens = self.max_tokens(items);
        let costs = request_costs(self.tokens.prompt_tokens(items), f64::from(max_tokens));
        let model = self.latency.model();
        ControllerStatus {
            requests_per_second: self.pacer.request_rate(costs),
            tokens_per_second: self.pacer.rate(RateDimension::Tokens),
            concurrency_limit: self.concurrency_limit_for(items),
            delay_limit: self.delay_limit_applies().then(|| self.delay.settled()),
            items_per_request: items,
            max_tokens,
            timeout_seconds: self.timeout_for(items).as_secs_f64(),
            probing: self.pacer.is_probing(),
            probe_phase: self.pacer.probe_phase(),
            paused_seconds: self.pause_until.saturating_sub(self.now).as_secs_f64(),
            latency_p50_seconds: model.map(|model| model.p50(items)),
            latency_p90_seconds: model.map(|model| model.p90(items)),
            quality_knee: self.batch.knee(),
            server_slots: self.delay.server_slots(),
            counts: self.counts,
        }
    }

    pub fn counts(&self) -> ControllerCounts {
        self.counts
    }

    /// The size of the run's first request, when `poll` is to send it now: before anything
    /// was sent, while nothing is announced, when the job's concurrency cap leaves room for
    /// it beside the start's requests (`concurrency.max` is a hard cap: a job that says one
    /// at a time gets one at a time), when the job's smallest size is at most
    /// `1 / FIRST_ANSWER_SHARE` of the current one and more items wait than it takes.
    fn first_answer_size(&self, load: PipelineLoad) -> Option<u32> {
        let smallest = self.config.items_per_request.min;
        let concurrency = self.config.concurrency;
        (self.first_answer == FirstAnswer::Pending
            && self.config.announced_slots().is_none()
            && concurrency.start < concurrency.max
            && self.delay_limit_applies()
            && smallest.saturating_mul(FIRST_ANSWER_SHARE) <= self.batch.current()
            && load.queued_items > smallest as usize)
            .then_some(smallest)
    }

    /// Whether the first answer's request is still in flight.
    fn first_answer_in_flight(&self) -> bool {
        matches!(self.first_answer, FirstAnswer::InFlight(ticket) if self.in_flight.contains_key(&ticket))
    }

    /// Requests in flight, the first answer's request not counted.
    fn counted_in_flight(&self) -> usize {
        self.in_flight.len() - usize::from(self.first_answer_in_flight())
    }

    /// The dispatcher's load with the first answer's request not counted in flight.
    fn counted_load(&self, load: PipelineLoad) -> PipelineLoad {
        PipelineLoad {
            in_flight: load
                .in_flight
                .saturating_sub(usize::from(self.first_answer_in_flight())),
            ..load
        }
    }

    /// `max_tokens` for a request of `items` items, beside the run's requests of the batch size.
    pub(crate) fn max_tokens(&self, items: u32) -> u32 {
        self.tokens.max_tokens(items, self.batch.current())
    }

    /// Requests per second the pacer allows for requests of `items` items.
    pub(crate) fn paced_request_rate(&self, items: u32) -> f64 {
        let costs = request_costs(
            self.tokens.prompt_tokens(items),
            f64::from(self.max_tokens(items)),
        );
        self.pacer.request_rate(costs)
    }

    /// Requests in flight allowed now: what the paced rate needs (Little's law) and what the
    /// server turns into throughput (the delay limit), the smaller of the two. A provider
    /// that announces its rate limits in headers is a rate-limited API that answers as fast
    /// at any concurrency: its rate is paced, and the delay limit does not apply.
    pub(crate) fn concurrency_limit_for(&self, items: u32) -> u32 {
        let p90 = self.latency.model().map(|model| model.p90(items));
        let costs = request_costs(
            self.tokens.prompt_tokens(items),
            f64::from(self.max_tokens(items)),
        );
        let burst = self.pacer.burst_requests(costs);
        let paced = self
            .concurrency
            .limit(self.paced_request_rate(items), p90, burst);
        if self.delay_limit_applies() {
            paced.min(self.delay.limit())
        } else {
            paced
        }
    }

    /// Whether the server behaves as one that queues: it never refused with a 429, announced
    /// no rate limits, and the delay limit is what bounds the requests in flight (`limit`).
    pub(crate) fn queueing_server(&self, limit: u32) -> bool {
        !self.paced_api() && self.delay.limit() <= limit
    }

    /// Whether the provider is a paced API: it announced rate limits or answered 429.
    pub(crate) fn paced_api(&self) -> bool {
        !self.delay_limit_applies() || self.counts.rate_limited > 0
    }

    /// Whether the delay limit binds: not once the provider has announced rate limits.
    pub(crate) fn delay_limit_applies(&self) -> bool {
        self.pacer.announced().iter().all(Option::is_none)
    }

    pub(crate) fn advance(&mut self, now: Duration) {
        self.now = self.now.max(now);
        let recently =
            |at: Option<Duration>| at.is_some_and(|at| now.saturating_sub(at) <= BINDING_MEMORY);
        self.pacer.advance(now, recently(self.rate_blocked_at));
        let cap_binding = recently(self.concurrency_blocked_at)
            && self.concurrency.overload_cap()
                <= f64::from(self.concurrency_limit_for(self.batch.current()));
        let typical = self
            .latency
            .model()
            .map(|model| Duration::from_secs_f64(model.p50(self.batch.current())))
            .unwrap_or(Duration::from_secs(1));
        self.concurrency.advance(now, cap_binding, typical);
        while self
            .recent_sends
            .front()
            .is_some_and(|at| now.saturating_sub(*at) > SEND_HISTORY)
        {
            self.recent_sends.pop_front();
        }
        while self
            .recent_rejections
            .front()
            .is_some_and(|at| now.saturating_sub(*at) > SEND_HISTORY)
        {
            self.recent_rejections.pop_front();
        }
    }

    /// Requests per second the provider admitted since the last congestion event (a lower
    /// bound of its limit, since its bucket was empty at both ends), or over the trailing
    /// window before the first event.
    pub(crate) fn admitted_request_rate(&self, now: Duration) -> Option<f64> {
        let admitted_since = |since: Duration, sent: f64, rejected: f64| {
            let interval = now.saturating_sub(since);
            (interval >= ADMITTED_INTERVAL_MINIMUM)
                .then(|| (sent - rejected).max(0.0) / interval.as_secs_f64())
        };
        match self.last_rate_cut_at {
            Some(cut) => admitted_since(
                cut,
                (self.counts.requests_sent - self.sends_at_last_cut) as f64,
                (self.counts.rate_limited - self.rejections_at_last_cut) as f64,
            ),
            None => {
                let since = now.saturating_sub(SEND_HISTORY).max(self.first_send_at?);
                admitted_since(
                    since,
                    self.recent_sends.len() as f64,
                    self.recent_rejections.len() as f64,
                )
            }
        }
    }

    /// All dimensions' paced rates per second, for logs.
    pub fn paced_rates(&self) -> [Option<f64>; 4] {
        ALL_DIMENSIONS.map(|dimension| self.pacer.rate(dimension))
    }
}
