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
use crate::first_chunks::{FirstChunks, READING_INTERVAL};
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
    /// When its first streamed chunk came (`on_first_chunk`).
    pub first_chunk_at: Option<Duration>,
}

/// Where a reading of the server's queue comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueSource {
    /// The server's own gauges (`on_server_queue`): everyone's requests.
    Gauges,
    /// Our requests in flight, running once their first chunk came (`on_first_chunk`).
    FirstChunks,
}

/// The previous reading of one source, and whether the queue it shows now was followed
/// already (once per queue).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct QueueReadings {
    last: Option<(Duration, ServerQueue)>,
    followed: bool,
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
    /// The server's gauges at their previous reading (`on_server_queue`).
    gauge_readings: QueueReadings,
    /// Our requests in flight read as a queue from their first chunks, at the previous reading.
    chunk_readings: QueueReadings,
    /// Whether the server has shown its gauges: its first chunks are then not read as a queue.
    gauges_shown: bool,
    /// Times to first chunk, and whether the answers streamed (`on_first_chunk`).
    pub(crate) first_chunks: FirstChunks,
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
            gauge_readings: QueueReadings::default(),
            chunk_readings: QueueReadings::default(),
            gauges_shown: false,
            first_chunks: FirstChunks::default(),
        })
    }

    /// What to do now. After `Decision::Send`, build the request and call `on_sent` before
    /// polling again.
    pub fn poll(&mut self, now: Duration, load: PipelineLoad) -> Decision {
        self.advance(now);
        self.read_first_chunks(now);
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
            // While first chunks are read as a queue, the next reading is due then.
            return Decision::Wait {
                until: self.next_first_chunk_reading(),
            };
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
                first_chunk_at: None,
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
        if !self.gauges_shown {
            self.gauges_shown = true;
            tracing::debug!("the server shows its gauges: first chunks are not read as a queue");
        }
        self.follow_queue(now, queue, QueueSource::Gauges);
    }

    /// Request `ticket`'s first streamed chunk came (the first chunk with generated content:
    /// a server takes a request into a slot, prefills its prompt, then streams). Call it once
    /// per request, before `on_outcome`; unknown or ended tickets are ignored. From these, the
    /// controller reads its own requests in flight as the server's gauges would show them
    /// (see `read_first_chunks`): nothing else is needed from the caller.
    pub fn on_first_chunk(&mut self, now: Duration, ticket: Ticket) {
        self.advance(now);
        let Some(request) = self.in_flight.get_mut(&ticket) else {
            return;
        };
        if request.first_chunk_at.is_some() {
            return;
        }
        request.first_chunk_at = Some(now);
        let (sent_at, prompt_tokens) = (request.sent_at, request.shape.prompt_tokens);
        self.first_chunks
            .record_first_chunk(sent_at, now, prompt_tokens);
    }

    /// The caller stopped asking for streamed answers (a provider that streams without token
    /// counts, or answered unstreamed a request it refused streamed): nothing more is read from
    /// first chunks until streamed answers with their first chunk clearly before their end come
    /// again. Requests
    /// are told sent unstreamed in `RequestShape::streamed`; this drops at once the trust
    /// that the last answers, streamed, had given.
    pub fn streaming_stopped(&mut self) {
        self.first_chunks.streaming_stopped();
        self.chunk_readings = QueueReadings::default();
        tracing::debug!("streaming stopped: first chunks are not read as a queue");
    }

    /// Whether our requests' first chunks are read as the server's queue now: they are a real
    /// signal (`FirstChunks::trusted`) and the server shows no gauges (which count everyone's
    /// requests, and win).
    pub(crate) fn reads_first_chunks(&self) -> bool {
        !self.gauges_shown && self.delay_limit_applies() && self.first_chunks.trusted()
    }

    /// When the next reading of the first chunks is due, while they are read.
    fn next_first_chunk_reading(&self) -> Option<Duration> {
        if !self.reads_first_chunks() || self.in_flight.is_empty() {
            return None;
        }
        Some(
            self.first_chunks
                .last_reading
                .map_or(self.now, |at| at + READING_INTERVAL),
        )
    }

    /// About once a second while the first chunks are read: our requests in flight as a
    /// reading of the server's queue, followed as the gauges are (`follow_queue`). Running:
    /// those whose first chunk came. Waiting: those without one for longer than
    /// `FirstChunks::waiting_after` (clearly longer than a prefill takes at the present
    /// load), unless one sent after it (by more than a prefill) already streamed: a queue is
    /// served in order, and a request passed by a later one is hung, not queued; and only if
    /// one of ours ended since its send or no first chunk came within that time
    /// (`FirstChunks::may_be_queued`): a queued request gets a slot only when one of ours
    /// ends, so while first chunks keep coming with none ended the server is still taking
    /// requests in. Requests
    /// younger than that are neither, but for the handovers (`FirstChunks::handovers`): an
    /// answer that ended within that time freed a slot that a request without a first chunk
    /// yet took (the oldest waiting one, or else one just sent), unless a first chunk came
    /// since: each such slot counts one of them running, as the gauges would.
    fn read_first_chunks(&mut self, now: Duration) {
        if !self.reads_first_chunks() {
            return;
        }
        // Only requests sent streamed can be told running or waiting, and one sent unstreamed
        // holds a slot or waits for one unseen: a reading is one only when all ours streamed.
        if self
            .in_flight
            .values()
            .any(|request| !request.shape.streamed)
        {
            self.chunk_readings.last = None;
            // Taken all the same: the next one is due a reading's interval later, not at once.
            self.first_chunks.last_reading = Some(now);
            return;
        }
        let queue = self.first_chunk_reading(now);
        // Read once a second, as gauges are; but a level all running is followed at once
        // (what slow start waits for: the sooner it doubles, the better).
        let due = self
            .first_chunks
            .last_reading
            .is_none_or(|at| now >= at + READING_INTERVAL);
        let limit = self.delay.limit();
        let took_all = queue.waiting == 0
            && queue.running >= limit
            && self.counted_in_flight() >= limit as usize;
        if !due && !took_all {
            return;
        }
        self.first_chunks.last_reading = Some(now);
        tracing::trace!(
            running = queue.running,
            waiting = queue.waiting,
            "first chunks read as the server's queue"
        );
        self.follow_queue(now, queue, QueueSource::FirstChunks);
    }

    /// Our requests in flight at `now` as the server's gauges would count them, from their
    /// first chunks (see `read_first_chunks`).
    pub(crate) fn first_chunk_reading(&mut self, now: Duration) -> ServerQueue {
        // Requests sent unstreamed never have a first chunk: they count towards neither.
        let streamed = || {
            self.in_flight
                .values()
                .filter(|request| request.shape.streamed)
        };
        let latest_running = streamed()
            .filter(|request| request.first_chunk_at.is_some())
            .map(|request| request.sent_at)
            .max();
        let (mut running, mut waiting, mut young) = (0u32, 0u32, 0u32);
        // The longest time a request without a first chunk may be young.
        let mut window = Duration::ZERO;
        for request in streamed() {
            if request.first_chunk_at.is_some() {
                running += 1;
                continue;
            }
            let prompt = request.shape.prompt_tokens;
            let (Some(reference), Some(after)) = (
                self.first_chunks.reference(prompt),
                self.first_chunks.waiting_after(prompt),
            ) else {
                continue;
            };
            window = window.max(after);
            let passed = latest_running.is_some_and(|latest| request.sent_at + reference < latest);
            if now.saturating_sub(request.sent_at) <= after {
                young += 1;
            } else if !passed && self.first_chunks.may_be_queued(request.sent_at, now, after) {
                waiting += 1;
            }
        }
        let handovers = self.first_chunks.handovers(now, window);
        let taken_from_queue = handovers.min(waiting);
        running += taken_from_queue + (handovers - taken_from_queue).min(young);
        waiting -= taken_from_queue;
        ServerQueue { running, waiting }
    }

    /// One reading of the server's queue, from its gauges or from our first chunks: the
    /// rules of `on_server_queue`. From first chunks, the reading counts only our requests
    /// (and only those it can tell running or waiting): they are all ours, so the share of
    /// the slots is what ran of them, and the requests not yet told apart count towards
    /// neither.
    fn follow_queue(&mut self, now: Duration, queue: ServerQueue, source: QueueSource) {
        let readings = self.queue_readings(source);
        let previous = readings
            .last
            .replace((now, queue))
            .filter(|(at, _)| now.saturating_sub(*at) <= GAUGE_READINGS_APART)
            .map(|(_, previous)| previous);
        let followed = readings.followed;
        let ours = self.in_flight.len() as u64;
        if u64::from(queue.running) + u64::from(queue.waiting) < ours.div_ceil(2) {
            return;
        }
        if queue.waiting == 0 {
            self.queue_readings(source).followed = false;
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
        if followed || ours == 0 || queue.running == 0 || queue.running > previous.running {
            return;
        }
        let slots = queue.running.max(previous.running);
        // Gauges count everyone's requests: ours are their share of all. From first chunks
        // every request counted is ours, and what ran of them is our share.
        let share = match source {
            QueueSource::Gauges => {
                let all = f64::from(slots) + f64::from(queue.waiting);
                (ours as f64 * f64::from(slots) / all).round().max(1.0) as u32
            }
            QueueSource::FirstChunks => slots,
        };
        self.delay.on_server_full(now, slots, share.min(slots));
        self.queue_readings(source).followed = true;
    }

    fn queue_readings(&mut self, source: QueueSource) -> &mut QueueReadings {
        match source {
            QueueSource::Gauges => &mut self.gauge_readings,
            QueueSource::FirstChunks => &mut self.chunk_readings,
        }
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
