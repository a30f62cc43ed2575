//! The dispatcher: asks the controller what to send, claims and packs a batch, reserves its
//! cost, and spawns the call; hands every finished call to the writer. It owns the
//! controller, so every decision and observation goes through one place.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use backfill_controller::{Controller, Decision, PipelineLoad, RequestShape, ServerQueue, Ticket};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::breaker::{Breaker, Finished};
use super::budget::BudgetWait;
use super::call::{Answer, Call, Concluded, Request, SentAs, Verdict, execute};
use super::resends::Resends;
use super::shared_rate::SharedRate;
use super::streams::Streams;
use crate::runner::context::RunContext;
use crate::runner::progress::Progress;
use crate::runner::session::Stop;
use crate::ledger::CostSource;
use crate::pricing::Picos;
use crate::provider::GaugeSource;
use crate::store::{BatchWrite, NewCall, now_ms};

/// How often the controller's state is saved for `--resume`.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(5);
/// The longest the loop sleeps without looking at the queue again.
const IDLE_POLL: Duration = Duration::from_millis(500);
/// How often a server that shows its gauges of requests running and waiting is read.
const GAUGES_EVERY: Duration = Duration::from_secs(1);

pub struct Dispatcher {
    pub ctx: Arc<RunContext>,
    pub controller: Controller,
    pub clock: Instant,
    pub tasks: JoinSet<Concluded>,
    /// Finished calls' writes, into the writer task. Bounded: when the database falls behind,
    /// the dispatcher waits here, and so sends nothing new, instead of piling up answers.
    pub writer: mpsc::Sender<BatchWrite>,
    /// Notified by the writer after each write: a dispatcher waiting with nothing in flight
    /// (the budget refused, the queue looked empty) looks again at once, since a write may have
    /// freed money or returned items to the queue.
    pub written: Arc<Notify>,
    pub progress: Arc<Progress>,
    pub fatal: Option<String>,
    /// Per in-flight call, the token that cuts it (end-of-queue cuts by the controller).
    cuts: HashMap<Ticket, CancellationToken>,
    /// The provider account's rate, shared with other workers of the run (PostgreSQL).
    shared_rate: SharedRate,
    /// Stops the run when no call will ever succeed or the provider's bills cannot be trusted.
    breaker: Breaker,
    /// When each item was last refused as unavailable (503), while it is between 503s.
    unavailable_at: HashMap<String, Duration>,
    last_snapshot: Instant,
    /// The wait at the budget cap.
    budget: BudgetWait,
    /// Rate-limited requests to send again unchanged, with when.
    resends: Resends,
    /// The server's gauges, read every `GAUGES_EVERY` while the dispatch loop runs (`None`
    /// for a server that does not show them).
    gauges: Option<GaugeReader>,
    /// Whether answers are asked for as streams, and the first chunks they bring.
    streams: Streams,
}

/// A task reading the server's gauges every `GAUGES_EVERY` into a watch channel (a reading
/// that fails is skipped); it stops when this is dropped.
struct GaugeReader {
    readings: watch::Receiver<ServerQueue>,
    task: tokio::task::JoinHandle<()>,
}

impl GaugeReader {
    fn start(client: crate::provider::ChatClient, source: GaugeSource) -> GaugeReader {
        // The first value stands for no reading yet: it is never marked changed.
        let (sender, readings) = watch::channel(ServerQueue { running: 0, waiting: 0 });
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(GAUGES_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Some(reading) = client.read_gauges(source).await
                    && sender.send(reading.queue).is_err()
                {
                    break;
                }
            }
        });
        GaugeReader { readings, task }
    }
}

impl Drop for GaugeReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum Dispatched {
    Sent,
    Budget,
    Empty { next_ready_at: Option<i64>, leased: u64 },
    /// The account's shared rate is used up by all workers together: ask again after this.
    Paced(Duration),
}

impl Dispatcher {
    pub fn new(
        ctx: Arc<RunContext>,
        controller: Controller,
        writer: mpsc::Sender<BatchWrite>,
        written: Arc<Notify>,
        progress: Arc<Progress>,
    ) -> Self {
        let shared_rate = SharedRate::new(ctx.store.as_ref(), &ctx.chat, &ctx.limits);
        let breaker = Breaker::new(ctx.limits.outage_window);
        let streams = Streams::new(ctx.chat.stream, &ctx.chat.base_url, ctx.gauges.is_some() || ctx.server.is_some());
        Dispatcher {
            ctx,
            controller,
            clock: Instant::now(),
            tasks: JoinSet::new(),
            writer,
            written,
            progress,
            fatal: None,
            cuts: HashMap::new(),
            shared_rate,
            breaker,
            unavailable_at: HashMap::new(),
            last_snapshot: Instant::now(),
            budget: BudgetWait::default(),
            resends: Resends::default(),
            gauges: None,
            streams,
        }
    }

    /// Hands the controller the first chunks of streamed answers that arrived (before the
    /// calls they belong to are finished).
    fn take_first_chunks(&mut self) {
        for (ticket, at) in self.streams.arrived() {
            self.controller.on_first_chunk(at.saturating_duration_since(self.clock), ticket);
        }
    }

    /// Starts reading the server's gauges, when it shows them.
    fn read_gauges(&mut self) {
        if let Some(shown) = self.ctx.gauges
            && self.gauges.is_none()
        {
            self.gauges = Some(GaugeReader::start(self.ctx.client.clone(), shown.source));
        }
    }

    /// Hands the controller the gauges' latest reading, if one came since the last.
    fn take_gauges(&mut self) {
        let Some(reader) = self.gauges.as_mut() else { return };
        if !reader.readings.has_changed().unwrap_or(false) {
            return;
        }
        let queue = *reader.readings.borrow_and_update();
        tracing::trace!(running = queue.running, waiting = queue.waiting, "the server's gauges");
        let now = self.clock.elapsed();
        self.controller.on_server_queue(now, queue);
    }

    fn now(&self) -> Duration {
        self.clock.elapsed()
    }

    /// Dispatches until the queue is drained or something stops the run, then lets in-flight
    /// calls finish (within the grace period when interrupted or failing).
    pub async fn run(&mut self, shutdown: &CancellationToken) -> anyhow::Result<Stop> {
        self.read_gauges();
        let stop = loop {
            while let Some(done) = self.tasks.try_join_next() {
                self.finish(done).await?;
            }
            if let Some(reason) = self.fatal.clone().or_else(|| self.progress.writer_failure()) {
                break Stop::Failed(reason);
            }
            if shutdown.is_cancelled() {
                break Stop::Interrupted;
            }
            self.maybe_snapshot().await;
            self.take_gauges();
            self.take_first_chunks();
            self.progress.in_flight.store(self.tasks.len(), Ordering::Relaxed);
            let load = PipelineLoad {
                in_flight: self.tasks.len(),
                queued_items: self.progress.queued.load(Ordering::Relaxed) + self.resend_items_due(),
            };
            for ticket in self.controller.requests_to_cut(self.now(), load) {
                if let Some(cut) = self.cuts.get(&ticket) {
                    tracing::debug!(?ticket, "cutting a slow call at the end of the queue; its items go out again");
                    cut.cancel();
                }
            }
            match self.controller.poll(self.now(), load) {
                Decision::Send { items, max_tokens, timeout } => {
                    let dispatched = match self.resend().await? {
                        Some(resent) => resent,
                        None => self.dispatch(items, max_tokens, timeout).await?,
                    };
                    match dispatched {
                        Dispatched::Sent => {
                            self.budget.sent();
                            continue;
                        }
                        Dispatched::Budget => {
                            if self.budget_exhausted().await? {
                                break Stop::Budget;
                            }
                            self.wait(None, shutdown).await?;
                        }
                        Dispatched::Paced(wait) => self.wait(Some(self.now() + wait), shutdown).await?,
                        Dispatched::Empty { next_ready_at, leased } => {
                            if self.tasks.is_empty() && leased == 0 && next_ready_at.is_none() && self.resends.is_empty() {
                                break Stop::Drained;
                            }
                            let resend_at = self.next_resend().map(|at| at.saturating_sub(self.now()).as_millis() as i64 + now_ms());
                            let next_ready_at = match (next_ready_at, resend_at) {
                                (Some(a), Some(b)) => Some(a.min(b)),
                                (a, b) => a.or(b),
                            };
                            let wait = next_ready_at
                                .map(|at| Duration::from_millis((at - now_ms()).max(0) as u64))
                                .unwrap_or(IDLE_POLL)
                                .min(IDLE_POLL);
                            self.wait(Some(self.now() + wait), shutdown).await?;
                        }
                    }
                }
                Decision::Wait { until } => {
                    // The controller waits while it believes nothing is queued; with nothing in
                    // flight either, the store says whether the run is drained.
                    let until = match (until, self.next_resend()) {
                        (Some(a), Some(b)) => Some(a.min(b.max(self.now()))),
                        (a, b) => a.or(b),
                    };
                    if self.tasks.is_empty() && load.queued_items == 0 && self.resends.is_empty() {
                        let counts = self.ctx.store.item_counts(self.ctx.run_id).await?;
                        if counts.open() == 0 {
                            break Stop::Drained;
                        }
                        self.progress.queued.store(counts.pending as usize, Ordering::Relaxed);
                        if counts.pending > 0 {
                            continue;
                        }
                    }
                    self.wait(until, shutdown).await?
                }
            }
        };
        // Nothing more is sent: the gauges are read no more.
        self.gauges = None;
        self.progress.set_controller(self.controller.status());
        self.drain(&stop).await?;
        self.release_resends().await?;
        self.maybe_snapshot_now().await;
        Ok(stop)
    }

    /// The cap refused a call: whether the run stops at the cap (see [`BudgetWait`]).
    async fn budget_exhausted(&mut self) -> anyhow::Result<bool> {
        self.budget.refused(Instant::now());
        if !self.tasks.is_empty() {
            return Ok(false);
        }
        let spend = self.ctx.store.spend(self.ctx.run_id).await?;
        Ok(self.budget.exhausted(Instant::now(), spend.reserved, self.ctx.lease))
    }

    async fn dispatch(&mut self, items: u32, max_tokens: u32, timeout: Duration) -> anyhow::Result<Dispatched> {
        let ctx = self.ctx.clone();
        if let Some(wait) = self.shared_rate.take(ctx.store.as_ref(), items, max_tokens).await? {
            return Ok(Dispatched::Paced(wait));
        }
        let claim = ctx.store.claim(&ctx.tables, ctx.run_id, &ctx.worker, items.max(1) as usize, ctx.lease).await?;
        if claim.vanished > 0 {
            self.progress.failed.fetch_add(claim.vanished, Ordering::Relaxed);
        }
        if claim.items.is_empty() {
            self.shared_rate.unused();
            return Ok(Dispatched::Empty { next_ready_at: claim.next_ready_at, leased: claim.leased });
        }
        // The controller's `max_tokens` holds the enclosing object's allowance, which the
        // packer adds again for the items it packs.
        let per_item = f64::from(max_tokens.saturating_sub(crate::pipeline::pack::ENCLOSING_OBJECT_TOKENS).max(1)) / f64::from(items.max(1));
        let packed = ctx.pack(claim.items, per_item, ctx.price_column);
        let mut request = packed.request;
        self.shared_rate.packed(request.claimed.len(), request.prompt_tokens, request.prompt_tokens + u64::from(request.max_tokens));
        if !packed.rest.is_empty() {
            let rest: Vec<_> = packed.rest.into_iter().map(|c| c.lease).collect();
            ctx.store.release(ctx.run_id, &rest).await?;
        }
        let cached = if ctx.cache.enabled { ctx.store.cache_get(&request.hash).await? } else { None };
        request.timeout = timeout;
        self.send(request, cached).await
    }

    /// Sends a rate-limited request again, unchanged, once its wait is over.
    async fn resend(&mut self) -> anyhow::Result<Option<Dispatched>> {
        let now = self.now();
        let Some((at, mut request)) = self.resends.take_due(now) else {
            return Ok(None);
        };
        let ctx = self.ctx.clone();
        if let Some(wait) = self.shared_rate.take(ctx.store.as_ref(), request.claimed.len() as u32, request.max_tokens).await? {
            self.resends.push(at, request);
            return Ok(Some(Dispatched::Paced(wait)));
        }
        self.shared_rate.packed(request.claimed.len(), request.prompt_tokens, request.prompt_tokens + u64::from(request.max_tokens));
        // A rate-limited request goes out again as it first went, streamed or not (its body
        // unchanged); one whose streamed send failed on the stream goes out unstreamed (`send`).
        if request.sent_as != SentAs::StreamFailed {
            self.progress.retries.fetch_add(request.claimed.len() as u64, Ordering::Relaxed);
            request.resends += 1;
        }
        // The timeout of now, not the one it first went out with: the controller judges a
        // timeout by what it gives a request of that size now.
        request.timeout = self.controller.timeout_with_queue(request.claimed.len() as u32, self.tasks.len());
        self.send(request, None).await.map(Some)
    }

    /// Reserves a packed request's cost in the ledger, tells the controller, and spawns the call.
    /// A request going out again goes as `Request::sent_as` says; a new one as the run sends now.
    async fn send(&mut self, mut request: Request, cached: Option<String>) -> anyhow::Result<Dispatched> {
        let ctx = self.ctx.clone();
        // The tokenizer may not be the model's own: reserve a tenth more input than counted.
        let estimate =
            ctx.price(request.fallback).estimate(request.prompt_tokens * 11 / 10, u64::from(request.max_tokens), request.price_column);
        let status = self.controller.status();
        let call = NewCall {
            run_id: ctx.run_id,
            worker: ctx.worker.id.clone(),
            model: request.model.clone(),
            price_tier: request.price_column,
            request_hash: Some(request.hash.clone()),
            item_ids: request.claimed.iter().map(|c| c.item.id.clone()).collect(),
            concurrency: status.concurrency_limit,
            estimated: if cached.is_some() { Picos::ZERO } else { estimate },
            started_at: now_ms(),
        };
        let Some(call_id) = ctx.store.reserve_call(&call, ctx.cap).await? else {
            self.shared_rate.unused();
            let leases: Vec<_> = request.claimed.into_iter().map(|c| c.lease).collect();
            ctx.store.release(ctx.run_id, &leases).await?;
            return Ok(Dispatched::Budget);
        };
        if cached.is_some() {
            self.shared_rate.unused();
        } else {
            self.shared_rate.sent();
        }
        let stream = match (&cached, request.sent_as) {
            (None, SentAs::NotSent) => self.streams.for_call(),
            (None, SentAs::Streamed) => Some(self.streams.for_resend()),
            _ => None,
        };
        request.sent_as = match (stream.is_some(), request.sent_as) {
            (true, _) => SentAs::Streamed,
            (false, SentAs::StreamFailed | SentAs::UnstreamedAgain) => SentAs::UnstreamedAgain,
            (false, _) => SentAs::Whole,
        };
        let ticket = cached.is_none().then(|| {
            let claimed = &request.claimed;
            self.controller.on_sent(
                self.now(),
                RequestShape {
                    items: claimed.len() as u32,
                    prompt_tokens: request.prompt_tokens.min(u64::from(u32::MAX)) as u32,
                    max_tokens: request.max_tokens,
                    streamed: stream.is_some(),
                    retried_items: if request.resends > 0 {
                        claimed.len() as u32
                    } else {
                        claimed.iter().filter(|c| c.attempts > 0).count() as u32
                    },
                },
            )
        });
        self.progress.requests.fetch_add(1, Ordering::Relaxed);
        self.progress.reserve(call.estimated);
        let answer = match cached {
            Some(body) => Answer::Cached(body),
            None => {
                let cut = CancellationToken::new();
                if let Some(ticket) = ticket {
                    self.cuts.insert(ticket, cut.clone());
                }
                Answer::Provider { cut, stream }
            }
        };
        self.tasks.spawn(execute(ctx, Call { call_id, ticket, estimate: call.estimated, answer, request }));
        Ok(Dispatched::Sent)
    }

    /// Rate-limited requests still waiting to go out again: their items back to the queue
    /// untouched (the run is stopping).
    async fn release_resends(&mut self) -> anyhow::Result<()> {
        let leases: Vec<_> = self.resends.drain().flat_map(|request| request.claimed.into_iter().map(|c| c.lease)).collect();
        if !leases.is_empty() {
            self.ctx.store.release(self.ctx.run_id, &leases).await?;
        }
        Ok(())
    }

    /// Items of rate-limited requests waiting to go out again whose wait is over.
    fn resend_items_due(&self) -> usize {
        let now = self.now();
        self.resends.items_due(now)
    }

    /// When the next rate-limited request may go out again.
    fn next_resend(&self) -> Option<Duration> {
        self.resends.next_at()
    }

    /// Takes one finished call: tells the controller, trips the breaker, queues the write.
    pub async fn finish(&mut self, joined: Result<Concluded, tokio::task::JoinError>) -> anyhow::Result<()> {
        let concluded = match joined {
            Ok(c) => c,
            Err(e) if e.is_cancelled() => return Ok(()),
            Err(e) => anyhow::bail!("a call task failed: {e}"),
        };
        let mut concluded = concluded;
        let latency = concluded.observation.latency;
        self.take_first_chunks();
        if self.streams.observe(concluded.stream.as_ref(), &concluded.observation.rate_limits) {
            self.controller.streaming_stopped();
        }
        if let Some((after, request)) = concluded.resend.take() {
            self.resends.push(self.now() + after, request);
        }
        if let Some(ticket) = concluded.ticket {
            self.cuts.remove(&ticket);
            let observation = &concluded.observation;
            self.shared_rate.learn(self.ctx.store.as_ref(), &observation.outcome, &observation.rate_limits).await;
            self.controller.on_outcome(self.now(), ticket, concluded.observation);
        }
        let finished = Finished {
            verdict: &concluded.verdict,
            usage_flag: concluded.write.settle.usage_flag.as_deref(),
            billed_answer: concluded.write.settle.http_status == Some(200) && concluded.cost_source != CostSource::Cache,
        };
        if let Some(why) = self.breaker.observe(self.now(), &finished, || crate::provider::shown_url(self.ctx.client.endpoint())) {
            self.fatal.get_or_insert(why);
        }
        let now = self.now();
        if concluded.ticket.is_some() && matches!(concluded.verdict, Verdict::Succeeded) {
            // The server took that request when it was sent.
            self.breaker.answered(now.saturating_sub(latency));
        }
        if let Some(charged) = concluded.lone_unavailable.take() {
            // An item refused as unavailable (503) again, when the provider answered a request
            // sent after its last refusal, was refused on its own: it uses an attempt. A server
            // that takes no new request (a model loading, an outage, an overload finishing what
            // it took before) costs none.
            for (update, charged) in concluded.write.items.iter_mut().zip(charged) {
                let previous = self.unavailable_at.insert(update.lease.item_id.clone(), now);
                if previous.is_some_and(|at| self.breaker.answered_since(at)) {
                    *update = charged;
                }
            }
        } else if !self.unavailable_at.is_empty() {
            // Items that went out and came back otherwise start afresh: the map holds only
            // items between 503s.
            for update in &concluded.write.items {
                self.unavailable_at.remove(&update.lease.item_id);
            }
        }
        if let Some(notice) = self.breaker.take_notice() {
            tracing::warn!("{notice}");
        }
        if let Some(hash) = &concluded.drop_cache
            && let Err(e) = self.ctx.store.cache_drop(hash).await {
                tracing::warn!("could not drop a cache entry: {e:#}");
            }
        self.progress.unreserve(concluded.estimate);
        self.progress.set_controller(self.controller.status());
        self.writer
            .send(concluded.write)
            .await
            .map_err(|_| anyhow::anyhow!("the writer stopped: {}", self.progress.writer_failure().unwrap_or_default()))?;
        Ok(())
    }

    async fn wait(&mut self, until: Option<Duration>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let deadline = until.map(|u| u.min(self.now() + IDLE_POLL)).unwrap_or(self.now() + IDLE_POLL);
        let sleep = tokio::time::sleep_until((self.clock + deadline).into());
        let written = self.written.clone();
        if self.tasks.is_empty() {
            tokio::select! {
                _ = sleep => {}
                _ = shutdown.cancelled() => {}
                _ = written.notified() => {}
            }
            return Ok(());
        }
        tokio::select! {
            Some(done) = self.tasks.join_next() => self.finish(done).await?,
            Some((ticket, at)) = self.streams.next() => {
                self.controller.on_first_chunk(at.saturating_duration_since(self.clock), ticket);
            }
            _ = sleep => {}
            _ = shutdown.cancelled() => {}
        }
        Ok(())
    }

    /// Lets the calls in flight finish and takes their writes: within the grace period when
    /// the run stops on a signal or a failure, else for as long as they take.
    async fn drain(&mut self, stop: &Stop) -> anyhow::Result<()> {
        let grace = match stop {
            Stop::Interrupted | Stop::Failed(_) => Some(self.ctx.grace),
            _ => None,
        };
        if !self.tasks.is_empty() {
            tracing::info!(in_flight = self.tasks.len(), "waiting for calls in flight");
        }
        let deadline = grace.map(|g| tokio::time::Instant::now() + g);
        while !self.tasks.is_empty() {
            let next = self.tasks.join_next();
            let joined = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, next).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        tracing::warn!(
                            abandoned = self.tasks.len(),
                            "grace period over: abandoning calls in flight (their items return to the queue)"
                        );
                        self.tasks.abort_all();
                        while self.tasks.join_next().await.is_some() {}
                        break;
                    }
                },
                None => next.await,
            };
            if let Some(joined) = joined {
                self.finish(joined).await?;
            }
        }
        Ok(())
    }

    async fn maybe_snapshot(&mut self) {
        if self.last_snapshot.elapsed() >= SNAPSHOT_EVERY {
            self.maybe_snapshot_now().await;
        }
    }

    async fn maybe_snapshot_now(&mut self) {
        self.last_snapshot = Instant::now();
        let mut state = self.controller.snapshot();
        state.server = Some(super::server_name(&self.ctx.chat));
        state.model = Some(self.ctx.chat.name.clone());
        let state = match serde_json::to_string(&state) {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!("controller state not saved: {e}");
                return;
            }
        };
        if let Err(e) = self.ctx.store.save_controller_state(self.ctx.run_id, &state).await {
            tracing::warn!("controller state not saved: {e:#}");
        }
    }
}
