//! A simulated LLM provider: token buckets on requests/min and tokens/min (prompt +
//! `max_tokens` reserved at admission, as OpenAI counts; optionally the unused part of
//! `max_tokens` given back when the request completes), instant 429s with `Retry-After`,
//! optional `x-ratelimit-*` headers, server slots with a queue (first come, first served; a
//! request the client gives up on is still computed) and 503s past its wait limit, continuous
//! batching (every request in service slows the others for as long as they share the server,
//! `Batching`), slots that follow the capacity steps, latency = base + per output token (log-normal noise), hung requests, truncation at
//! `max_tokens`, and items that go missing more often past a batch size.

use crate::protocol::ServerQueue;
use crate::simulation::scenario::{ProviderSpec, Scenario};

/// The provider's answer to one request, decided when it is sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SimAnswer {
    Completed {
        latency_s: f64,
        completion_tokens: u32,
        /// Items in the answer (not lost to truncation, not left out).
        returned: u32,
        /// Of those, rejected by post-processing.
        rejected: u32,
        truncated: bool,
        /// Seconds spent in the server's queue before a slot took it (included in latency).
        queue_wait_s: f64,
        /// Seconds from the send to the first streamed chunk: the queue wait and the prefill
        /// (the end, behind a proxy that buffers the answer); `None` when not streamed. (For
        /// the continuous-batching server the dispatcher learns it from `first_chunks`.)
        first_chunk_s: Option<f64>,
    },
    RateLimited {
        latency_s: f64,
        retry_after_s: f64,
    },
    Overloaded {
        latency_s: f64,
    },
    /// Admitted and never answered.
    Hang,
}

#[derive(Debug, Clone)]
struct SimBucket {
    per_minute: f64,
    burst_seconds: f64,
    level: f64,
    updated_at: f64,
    factor: f64,
}

impl SimBucket {
    fn new(per_minute: f64, burst_seconds: f64) -> Self {
        let mut bucket = Self {
            per_minute,
            burst_seconds,
            level: 0.0,
            updated_at: 0.0,
            factor: 1.0,
        };
        bucket.level = bucket.capacity();
        bucket
    }
    fn rate(&self) -> f64 {
        self.per_minute * self.factor / 60.0
    }
    fn capacity(&self) -> f64 {
        self.rate() * self.burst_seconds
    }
    fn refill(&mut self, now: f64, factor: f64) {
        if now > self.updated_at {
            self.level = (self.level + (now - self.updated_at) * self.rate()).min(self.capacity());
            self.updated_at = now;
        }
        if factor != self.factor {
            self.factor = factor;
            self.level = self.level.min(self.capacity());
        }
    }
    /// Seconds until `cost` is available (zero: now). Costs above capacity need a full bucket.
    fn shortfall_s(&self, cost: f64) -> f64 {
        let needed = cost.min(self.capacity());
        if self.level >= needed {
            0.0
        } else {
            (needed - self.level) / self.rate()
        }
    }
}

/// A request a continuous-batching server finished: when, and how long it waited for a
/// slot and was then served.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finished {
    pub job: u64,
    pub end_s: f64,
    pub queue_wait_s: f64,
    pub service_s: f64,
    /// A request that never answers: served all the same, its answer never sent.
    pub hung: bool,
}

/// The first streamed chunk of a continuous-batching server's job: when it went out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FirstChunk {
    pub job: u64,
    pub at_s: f64,
}

#[derive(Debug, Clone)]
struct BatchJob {
    job: u64,
    hung: bool,
    arrived_s: f64,
    started_s: f64,
    /// The server's progress (`Batching::progress`) at which it is done.
    done_at: f64,
    /// The progress at which its first chunk goes out, until it has (streamed answers).
    chunk_at: Option<f64>,
}

#[derive(Debug, Clone)]
struct QueuedJob {
    job: u64,
    hung: bool,
    arrived_s: f64,
    /// Seconds of service it needs served alone.
    work_s: f64,
    /// Of those, the seconds before its first chunk (streamed answers).
    chunk_work_s: Option<f64>,
}

/// A continuous-batching server: every request in service advances at once, each at
/// `1 / (1 + slowdown × (n − 1))` of its unloaded pace while `n` are in service (each decoding
/// step serves the whole batch, and takes longer the larger it is), so a request's service
/// time follows the load over its whole life, not only the load it found when it started:
/// the requests already in service slow down when more join them and speed up when others
/// end. Requests beyond the slots wait in a first-come, first-served queue.
#[derive(Debug, Clone, Default)]
struct Batching {
    /// The server's slots with no capacity step applied (each one's first request is cold).
    slots: usize,
    clock_s: f64,
    /// Unloaded seconds of service every request in service has received since the start of
    /// the run: all advance alike.
    progress: f64,
    in_service: Vec<BatchJob>,
    queue: std::collections::VecDeque<QueuedJob>,
    /// Requests started so far (a slot's first is cold).
    started: usize,
    finished: Vec<Finished>,
    first_chunks: Vec<FirstChunk>,
}

impl Batching {
    /// Each request's pace while the server's requests in service are as now.
    fn pace(&self, spec: &ProviderSpec) -> f64 {
        1.0 / (1.0 + spec.slowdown_per_request * self.in_service.len().saturating_sub(1) as f64)
    }

    /// The progress at which the first request in service is done.
    fn least_done_at(&self) -> Option<f64> {
        self.in_service
            .iter()
            .map(|job| job.done_at)
            .min_by(f64::total_cmp)
    }

    /// When the next request in service ends at the current pace.
    fn next_end(&self, spec: &ProviderSpec) -> Option<f64> {
        let least = self.least_done_at()?;
        Some(self.clock_s + (least - self.progress).max(0.0) / self.pace(spec))
    }

    /// When the next first chunk goes out at the current pace.
    fn next_first_chunk(&self, spec: &ProviderSpec) -> Option<f64> {
        let least = self
            .in_service
            .iter()
            .filter_map(|job| job.chunk_at)
            .min_by(f64::total_cmp)?;
        Some(self.clock_s + (least - self.progress).max(0.0) / self.pace(spec))
    }

    /// Sends the first chunks of the requests in service whose progress reaches theirs by
    /// `to_progress` at the current pace (which holds until then): they do not change it.
    fn send_first_chunks(&mut self, to_progress: f64, spec: &ProviderSpec) {
        let pace = self.pace(spec);
        for job in &mut self.in_service {
            if let Some(chunk_at) = job.chunk_at.filter(|chunk_at| *chunk_at <= to_progress) {
                job.chunk_at = None;
                self.first_chunks.push(FirstChunk {
                    job: job.job,
                    at_s: self.clock_s + (chunk_at - self.progress).max(0.0) / pace,
                });
            }
        }
    }

    /// Serves until `to_s`: requests end (into `finished`) and queued ones start as slots free.
    fn advance(&mut self, to_s: f64, scenario: &Scenario) {
        let spec = &scenario.provider;
        loop {
            match (self.next_end(spec), self.least_done_at()) {
                (Some(end_s), Some(least)) if end_s <= to_s => {
                    self.send_first_chunks(least, spec);
                    self.progress = least;
                    self.clock_s = end_s.max(self.clock_s);
                    let clock_s = self.clock_s;
                    let finished = &mut self.finished;
                    self.in_service.retain(|job| {
                        let done = job.done_at <= least;
                        if done {
                            finished.push(Finished {
                                job: job.job,
                                end_s: clock_s,
                                queue_wait_s: job.started_s - job.arrived_s,
                                service_s: clock_s - job.started_s,
                                hung: job.hung,
                            });
                        }
                        !done
                    });
                    self.start_queued(scenario);
                }
                _ => {
                    if to_s > self.clock_s {
                        let to_progress = self.progress + (to_s - self.clock_s) * self.pace(spec);
                        self.send_first_chunks(to_progress, spec);
                        self.progress += (to_s - self.clock_s) * self.pace(spec);
                        self.clock_s = to_s;
                    }
                    self.start_queued(scenario);
                    return;
                }
            }
        }
    }

    fn start_queued(&mut self, scenario: &Scenario) {
        while self.in_service.len() < open_slots(scenario, self.slots, self.clock_s) {
            let Some(next) = self.queue.pop_front() else {
                break;
            };
            let cold = if self.started < self.slots {
                scenario.provider.cold_start_factor
            } else {
                1.0
            };
            let work_s = next.work_s * cold;
            self.started += 1;
            self.in_service.push(BatchJob {
                job: next.job,
                hung: next.hung,
                arrived_s: next.arrived_s,
                started_s: self.clock_s,
                done_at: self.progress + work_s,
                chunk_at: next.chunk_work_s.map(|chunk| self.progress + chunk * cold),
            });
        }
    }
}

#[derive(Debug)]
pub struct SimulatedProvider {
    scenario: Scenario,
    requests: Option<SimBucket>,
    tokens: Option<SimBucket>,
    slot_free_at: Vec<f64>,
    /// Whether each slot has served a request yet (a cold slot's first takes longer).
    slot_warm: Vec<bool>,
    /// When each request of the slot server starts and ends its service, until it ends (kept
    /// for a server that shows its gauges).
    slot_busy: Vec<(f64, f64)>,
    /// A server with slots whose requests slow each other (`slowdown_per_request` above 0).
    batching: Option<Batching>,
    next_job: u64,
    /// The job the last `submit` handed the batching server, if it did.
    submitted_job: Option<u64>,
    rng: fastrand::Rng,
}

impl SimulatedProvider {
    pub fn new(scenario: &Scenario, seed: u64) -> Self {
        let spec: &ProviderSpec = &scenario.provider;
        Self {
            requests: spec
                .requests_per_minute
                .map(|rpm| SimBucket::new(rpm, spec.burst_seconds)),
            tokens: spec
                .tokens_per_minute
                .map(|tpm| SimBucket::new(tpm, spec.burst_seconds)),
            slot_free_at: vec![0.0; spec.slots.unwrap_or(0) as usize],
            slot_warm: vec![false; spec.slots.unwrap_or(0) as usize],
            slot_busy: Vec::new(),
            batching: spec
                .slots
                .filter(|_| spec.slowdown_per_request > 0.0)
                .map(|slots| Batching {
                    slots: slots as usize,
                    ..Batching::default()
                }),
            next_job: 0,
            submitted_job: None,
            rng: fastrand::Rng::with_seed(seed),
            scenario: scenario.clone(),
        }
    }

    /// Decides the fate of a request of `items` items sent at `now`.
    pub fn submit(
        &mut self,
        now: f64,
        items: u32,
        prompt_tokens: u32,
        max_tokens: u32,
    ) -> SimAnswer {
        self.submitted_job = None;
        let factor = self.scenario.capacity_factor(now);
        let spec = self.scenario.provider.clone();
        let token_cost = f64::from(prompt_tokens) + f64::from(max_tokens);
        let mut shortfall: f64 = 0.0;
        for (bucket, cost) in [
            (self.requests.as_mut(), 1.0),
            (self.tokens.as_mut(), token_cost),
        ] {
            if let Some(bucket) = bucket {
                bucket.refill(now, factor);
                shortfall = shortfall.max(bucket.shortfall_s(cost));
            }
        }
        if shortfall > 0.0 {
            return SimAnswer::RateLimited {
                latency_s: spec.reject_latency_s,
                retry_after_s: shortfall,
            };
        }
        for (bucket, cost) in [
            (self.requests.as_mut(), 1.0),
            (self.tokens.as_mut(), token_cost),
        ] {
            if let Some(bucket) = bucket {
                bucket.level -= cost;
            }
        }
        let answer = self.generate_answer(items, max_tokens);
        let (service_s, prefill_s) = match answer {
            SimAnswer::Completed {
                latency_s,
                first_chunk_s,
                ..
            } => (latency_s, first_chunk_s),
            _ => (spec.base_latency_s, None),
        };
        // Behind a proxy that buffers the answer, the first chunk comes with the end.
        let prefill_s = match prefill_s {
            Some(_) if spec.buffered_stream => Some(service_s),
            prefill_s => prefill_s,
        };
        if self.batching.is_some() {
            return self.submit_batching(now, answer, service_s, prefill_s);
        }
        let mut queue_wait_s = 0.0;
        let mut service_s = service_s;
        let mut prefill_s = prefill_s;
        let slots = open_slots(&self.scenario, self.slot_free_at.len(), now);
        let open = &mut self.slot_free_at[..slots];
        if let Some(index) = (0..open.len()).min_by(|a, b| open[*a].total_cmp(&open[*b])) {
            let start = open[index].max(now);
            queue_wait_s = start - now;
            if queue_wait_s > spec.queue_wait_limit_s {
                return SimAnswer::Overloaded {
                    latency_s: spec.reject_latency_s,
                };
            }
            // Requests that do not slow each other: each takes its own service time from the
            // moment a slot frees (continuous batching is `submit_batching`).
            if !std::mem::replace(&mut self.slot_warm[index], true) {
                service_s *= spec.cold_start_factor;
                prefill_s = prefill_s.map(|prefill_s| prefill_s * spec.cold_start_factor);
            }
            open[index] = start + service_s;
            if spec.queue_gauges {
                self.slot_busy.push((start, start + service_s));
            }
        }
        if self.rng.f64() < spec.hang_share {
            return SimAnswer::Hang;
        }
        match answer {
            SimAnswer::Completed {
                completion_tokens,
                returned,
                rejected,
                truncated,
                ..
            } => SimAnswer::Completed {
                latency_s: service_s + queue_wait_s,
                completion_tokens,
                returned,
                rejected,
                truncated,
                queue_wait_s,
                first_chunk_s: prefill_s.map(|prefill_s| queue_wait_s + prefill_s),
            },
            other => other,
        }
    }

    fn generate_answer(&mut self, items: u32, max_tokens: u32) -> SimAnswer {
        let workload = &self.scenario.workload;
        let missing_share = self.scenario.missing_share(items);
        let mut written = 8.0; // braces and separators
        let mut fitted = 0;
        let mut truncated = false;
        for _ in 0..items {
            let tokens = (workload.output_tokens_per_item
                + workload.output_tokens_sd * normal(&mut self.rng))
            .max(5.0);
            if written + tokens > f64::from(max_tokens) {
                truncated = true;
                break;
            }
            written += tokens;
            fitted += 1;
        }
        let completion_tokens = if truncated {
            max_tokens
        } else {
            written.round() as u32
        };
        let returned = (0..fitted)
            .filter(|_| self.rng.f64() >= missing_share)
            .count() as u32;
        let rejected = (0..returned)
            .filter(|_| self.rng.f64() < workload.rejected_share)
            .count() as u32;
        let spec = &self.scenario.provider;
        let noise = (spec.latency_sigma * normal(&mut self.rng)).exp();
        let latency_s = (spec.base_latency_s
            + spec.seconds_per_output_token * f64::from(completion_tokens))
            * noise;
        SimAnswer::Completed {
            latency_s,
            completion_tokens,
            returned,
            rejected,
            truncated,
            queue_wait_s: 0.0,
            // The prefill: the base-latency part of the service time, with the same noise.
            first_chunk_s: spec.streams.then_some(spec.base_latency_s * noise),
        }
    }

    /// A request for the continuous-batching server: queued, started when a slot is free,
    /// and answered when `finished` says (its latency is not known when it is sent).
    fn submit_batching(
        &mut self,
        now: f64,
        answer: SimAnswer,
        work_s: f64,
        chunk_work_s: Option<f64>,
    ) -> SimAnswer {
        let scenario = &self.scenario;
        let spec = &scenario.provider;
        let server = self.batching.as_mut().expect("a batching server");
        server.advance(now, scenario);
        // How long it would wait were nothing more sent: the queue ahead served first.
        let queue_wait_s = if server.queue.is_empty()
            && server.in_service.len() < open_slots(scenario, server.slots, now)
        {
            0.0
        } else {
            let mut projected = server.clone();
            projected.queue.push_back(QueuedJob {
                job: u64::MAX,
                hung: false,
                arrived_s: now,
                work_s,
                chunk_work_s: None,
            });
            let mut to_s = now;
            while !projected.in_service.iter().any(|job| job.job == u64::MAX) {
                match projected.next_end(spec) {
                    Some(end_s) => to_s = end_s,
                    None => break,
                }
                projected.advance(to_s, scenario);
            }
            to_s - now
        };
        if queue_wait_s > spec.queue_wait_limit_s {
            return SimAnswer::Overloaded {
                latency_s: spec.reject_latency_s,
            };
        }
        let job = self.next_job;
        self.next_job += 1;
        let hung = self.rng.f64() < spec.hang_share;
        server.queue.push_back(QueuedJob {
            job,
            hung,
            arrived_s: now,
            work_s,
            // A request that never answers streams nothing either.
            chunk_work_s: chunk_work_s.filter(|_| !hung),
        });
        server.start_queued(scenario);
        self.submitted_job = Some(job);
        if hung { SimAnswer::Hang } else { answer }
    }

    /// What the server's gauges show at `now`: requests in its slots, requests waiting.
    pub fn queue_gauges(&mut self, now: f64) -> ServerQueue {
        if let Some(server) = self.batching.as_mut() {
            server.advance(now, &self.scenario);
            return ServerQueue {
                running: server.in_service.len() as u32,
                waiting: server.queue.len() as u32,
            };
        }
        self.slot_busy.retain(|(_, end)| *end > now);
        let running = self
            .slot_busy
            .iter()
            .filter(|(start, _)| *start <= now)
            .count();
        ServerQueue {
            running: running as u32,
            waiting: (self.slot_busy.len() - running) as u32,
        }
    }

    /// Whether the server shows its gauges (`queue_gauges`).
    pub fn shows_gauges(&self) -> bool {
        self.scenario.provider.queue_gauges
    }

    /// The job the last `submit` handed the continuous-batching server (its answer comes
    /// when the server finishes it), or `None` when its latency was decided at once.
    pub fn submitted_job(&self) -> Option<u64> {
        self.submitted_job
    }

    /// When the continuous-batching server next finishes a request at its current load, or
    /// next has news: a request it finished while taking another that `finished_by` has not
    /// handed out yet (now), or a capacity step that lets a queued request start.
    pub fn next_finish(&self) -> Option<f64> {
        let server = self.batching.as_ref()?;
        if !server.finished.is_empty() {
            return Some(server.clock_s);
        }
        let end = server.next_end(&self.scenario.provider);
        let step = if server.queue.is_empty() {
            None
        } else {
            self.scenario
                .provider
                .capacity_steps
                .iter()
                .map(|step| step.at_s)
                .filter(|at_s| *at_s > server.clock_s)
                .min_by(f64::total_cmp)
        };
        match (end, step) {
            (Some(end), Some(step)) => Some(end.min(step)),
            (end, step) => end.or(step),
        }
    }

    /// When the continuous-batching server next sends a first chunk at its current load.
    pub fn next_first_chunk(&self) -> Option<f64> {
        let server = self.batching.as_ref()?;
        if !server.first_chunks.is_empty() {
            return Some(server.clock_s);
        }
        server.next_first_chunk(&self.scenario.provider)
    }

    /// The first chunks the continuous-batching server sent by the time it was last served to
    /// (`finished_by`), in the order they went out.
    pub fn first_chunks(&mut self) -> Vec<FirstChunk> {
        let Some(server) = self.batching.as_mut() else {
            return Vec::new();
        };
        let mut chunks = std::mem::take(&mut server.first_chunks);
        chunks.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
        chunks
    }

    /// Serves until `now` and returns the requests the continuous-batching server finished
    /// (in the order they ended), whether the client still waits for them or not.
    pub fn finished_by(&mut self, now: f64) -> Vec<Finished> {
        let Some(server) = self.batching.as_mut() else {
            return Vec::new();
        };
        server.advance(now, &self.scenario);
        std::mem::take(&mut server.finished)
    }

    /// Whether answers say how long the server worked on them (llama.cpp's `timings`).
    pub fn reports_service_time(&self) -> bool {
        self.scenario.provider.reports_service_time
    }

    /// A request that reserved `max_tokens` ends at `now` having written `completion_tokens`:
    /// a provider that counts what was written gives the rest back.
    pub fn on_completed(&mut self, now: f64, max_tokens: u32, completion_tokens: u32) {
        if !self.scenario.provider.refunds_unused_tokens {
            return;
        }
        let factor = self.scenario.capacity_factor(now);
        if let Some(bucket) = self.tokens.as_mut() {
            bucket.refill(now, factor);
            let unused = f64::from(max_tokens.saturating_sub(completion_tokens));
            bucket.level = (bucket.level + unused).min(bucket.capacity());
        }
    }

    /// The `x-ratelimit-*` headers a response ending at `now` carries (none if the provider
    /// sends none), as text, so the real parser reads them.
    pub fn rate_limit_headers(&mut self, now: f64) -> Vec<(String, String)> {
        if !self.scenario.provider.headers {
            return Vec::new();
        }
        let factor = self.scenario.capacity_factor(now);
        let mut headers = Vec::new();
        for (name, bucket) in [
            ("requests", self.requests.as_mut()),
            ("tokens", self.tokens.as_mut()),
        ] {
            let Some(bucket) = bucket else { continue };
            bucket.refill(now, factor);
            let reset_s = (bucket.capacity() - bucket.level).max(0.0) / bucket.rate();
            headers.push((
                format!("x-ratelimit-limit-{name}"),
                format!("{}", (bucket.per_minute * factor).round()),
            ));
            headers.push((
                format!("x-ratelimit-remaining-{name}"),
                format!("{}", bucket.level.max(0.0).floor()),
            ));
            headers.push((format!("x-ratelimit-reset-{name}"), go_duration(reset_s)));
        }
        headers
    }
}

/// The slots of a server with `total` open at `at_s`: they follow the capacity steps (a
/// server restarted with fewer or more slots), at least one.
fn open_slots(scenario: &Scenario, total: usize, at_s: f64) -> usize {
    let factor = scenario.capacity_factor(at_s);
    ((total as f64 * factor).round() as usize).clamp(1.min(total), total)
}

/// Formats seconds like Go and OpenAI do: "20ms", "1.5s", "6m0s".
pub fn go_duration(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{}ms", (seconds * 1000.0).round())
    } else if seconds < 60.0 {
        format!("{:.3}s", seconds)
    } else {
        format!("{}m{:.0}s", (seconds / 60.0).floor(), seconds % 60.0)
    }
}

/// A standard normal sample (Box-Muller).
pub fn normal(rng: &mut fastrand::Rng) -> f64 {
    let u1 = rng.f64().max(f64::MIN_POSITIVE);
    let u2 = rng.f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulation::scenario::CapacityStep;

    fn scenario() -> Scenario {
        let text = include_str!("../../scenarios/rpm_bound.toml");
        let mut scenario: Scenario = toml::from_str(text).expect("scenario");
        scenario.provider.requests_per_minute = Some(60.0);
        scenario.provider.burst_seconds = 2.0;
        scenario
    }

    #[test]
    fn go_durations_look_like_openai_headers() {
        assert_eq!(go_duration(0.02), "20ms");
        assert_eq!(go_duration(1.5), "1.500s");
        assert_eq!(go_duration(360.0), "6m0s");
    }

    #[test]
    fn the_request_bucket_answers_429_with_the_wait_until_a_token() {
        let mut provider = SimulatedProvider::new(&scenario(), 1);
        // A burst of two at 1 request/s, then a 429 asking to wait one second.
        for _ in 0..2 {
            assert!(matches!(
                provider.submit(0.0, 10, 2000, 1000),
                SimAnswer::Completed { .. } | SimAnswer::Hang
            ));
        }
        match provider.submit(0.0, 10, 2000, 1000) {
            SimAnswer::RateLimited { retry_after_s, .. } => {
                assert!((retry_after_s - 1.0).abs() < 1e-9)
            }
            other => panic!("expected a 429, got {other:?}"),
        }
        let headers = provider.rate_limit_headers(0.5);
        assert!(headers.contains(&("x-ratelimit-limit-requests".to_string(), "60".to_string())));
        assert!(headers.contains(&(
            "x-ratelimit-remaining-requests".to_string(),
            "0".to_string()
        )));
    }

    #[test]
    fn the_gauges_count_the_requests_in_the_slots_and_those_waiting() {
        for file in [
            include_str!("../../scenarios/queue_2_slots.toml"),
            include_str!("../../scenarios/batching_16_slots.toml"),
        ] {
            let mut scenario: Scenario = toml::from_str(file).expect("scenario");
            scenario.provider.hang_share = 0.0;
            scenario.provider.queue_gauges = true;
            let slots = scenario.provider.slots.expect("slots");
            let mut provider = SimulatedProvider::new(&scenario, 5);
            for _ in 0..slots + 3 {
                provider.submit(0.0, 10, 2000, 2000);
            }
            let name = &scenario.name;
            assert_eq!(
                provider.queue_gauges(0.0),
                ServerQueue {
                    running: slots,
                    waiting: 3
                },
                "{name}"
            );
            // Long after, all served.
            assert_eq!(
                provider.queue_gauges(3600.0),
                ServerQueue {
                    running: 0,
                    waiting: 0
                },
                "{name}"
            );
        }
    }

    #[test]
    fn a_server_that_warms_up_serves_each_slots_first_request_slower() {
        let text = include_str!("../../scenarios/queue_2_slots.toml");
        let mut scenario: Scenario = toml::from_str(text).expect("scenario");
        scenario.provider.latency_sigma = 0.0;
        scenario.provider.hang_share = 0.0;
        scenario.workload.output_tokens_sd = 0.0;
        let service = |scenario: &Scenario, at: f64| {
            let mut provider = SimulatedProvider::new(scenario, 3);
            // Both slots serve one request, then the first slot a second one.
            let mut latencies = Vec::new();
            for now in [0.0, 0.0, at] {
                match provider.submit(now, 10, 2000, 2000) {
                    SimAnswer::Completed {
                        latency_s,
                        queue_wait_s,
                        ..
                    } => latencies.push(latency_s - queue_wait_s),
                    other => panic!("expected an answer, got {other:?}"),
                }
            }
            latencies
        };
        let warm = service(&scenario, 100.0);
        assert!((warm[0] - warm[2]).abs() < 1e-9 && (warm[1] - warm[2]).abs() < 1e-9);
        scenario.provider.cold_start_factor = 3.0;
        let cold = service(&scenario, 100.0);
        // Each slot's first request takes three times as long; a slot's second does not.
        assert!(
            (cold[0] - 3.0 * warm[0]).abs() < 1e-9,
            "{cold:?} vs {warm:?}"
        );
        assert!(
            (cold[1] - 3.0 * warm[1]).abs() < 1e-9,
            "{cold:?} vs {warm:?}"
        );
        assert!((cold[2] - warm[2]).abs() < 1e-9, "{cold:?} vs {warm:?}");
    }

    /// The 16-slot batching server with every latency exactly its mean and no hung requests.
    fn batching_server() -> Scenario {
        let text = include_str!("../../scenarios/batching_16_slots.toml");
        let mut scenario: Scenario = toml::from_str(text).expect("scenario");
        scenario.provider.latency_sigma = 0.0;
        scenario.provider.hang_share = 0.0;
        scenario.workload.output_tokens_sd = 0.0;
        scenario
    }

    #[test]
    fn continuous_batching_slows_every_request_for_as_long_as_others_share_the_server() {
        let scenario = batching_server();
        let slowdown = scenario.provider.slowdown_per_request;
        let mut provider = SimulatedProvider::new(&scenario, 4);
        let alone = match provider.submit(0.0, 10, 2000, 2000) {
            SimAnswer::Completed { latency_s, .. } => latency_s,
            other => panic!("expected an answer, got {other:?}"),
        };
        let first = provider.submitted_job().expect("a batching job");
        // Half-way through, a second request of the same size joins it.
        assert!(provider.finished_by(alone / 2.0).is_empty());
        provider.submit(alone / 2.0, 10, 2000, 2000);
        let second = provider.submitted_job().expect("a batching job");
        // Both now advance at 1 / (1 + slowdown): the first's remaining half takes that much
        // longer, and the second, done by half in that time, finishes its other half alone.
        let first_end = alone / 2.0 + (1.0 + slowdown) * alone / 2.0;
        let second_end = first_end + alone / 2.0;
        assert_eq!(provider.next_finish(), Some(first_end));
        let finished = provider.finished_by(second_end + 1.0);
        assert_eq!(finished.len(), 2);
        assert_eq!(finished[0].job, first);
        assert!((finished[0].end_s - first_end).abs() < 1e-9, "{finished:?}");
        assert!((finished[0].service_s - first_end).abs() < 1e-9);
        assert_eq!(finished[1].job, second);
        assert!(
            (finished[1].end_s - second_end).abs() < 1e-9,
            "{finished:?}"
        );
        assert!(finished[1].queue_wait_s.abs() < 1e-12);
    }

    #[test]
    fn a_request_refused_with_a_429_is_no_job_of_the_batching_server() {
        let mut scenario = batching_server();
        scenario.provider.requests_per_minute = Some(60.0);
        scenario.provider.burst_seconds = 1.0;
        let mut provider = SimulatedProvider::new(&scenario, 6);
        provider.submit(0.0, 10, 2000, 2000);
        assert!(provider.submitted_job().is_some());
        let refused = provider.submit(0.0, 10, 2000, 2000);
        assert!(
            matches!(refused, SimAnswer::RateLimited { .. }),
            "{refused:?}"
        );
        assert_eq!(provider.submitted_job(), None);
    }

    #[test]
    fn a_request_finished_while_the_server_takes_another_is_still_reported() {
        // A request arrives the least time before another ends, and the server's progress,
        // rounded, reaches that end as it takes the new one: the finished request must still
        // be reported at once. Latencies vary with the seed; the first seed whose rounding
        // does that is the case.
        let mut scenario = batching_server();
        scenario.provider.latency_sigma = 0.2;
        let case = (0..2000).find_map(|seed| {
            let mut provider = SimulatedProvider::new(&scenario, seed);
            provider.submit(0.0, 10, 2000, 2000);
            provider.submit(0.0, 7, 2000, 2000);
            let end = provider.next_finish()?;
            let just_before = f64::from_bits(end.to_bits() - 1);
            let early = provider.finished_by(just_before);
            let server = provider.batching.as_ref()?;
            let reached = server
                .in_service
                .iter()
                .any(|job| job.done_at <= server.progress);
            (early.is_empty() && reached).then_some((provider, end, just_before))
        });
        let (mut provider, end, just_before) = case.expect("a seed whose rounding reaches an end");
        provider.submit(just_before, 10, 2000, 2000);
        let next = provider.next_finish().expect("news from the server");
        assert!(next <= end, "reported at {next}, finished at {end}");
        assert_eq!(provider.finished_by(next).len(), 1);
    }

    #[test]
    fn a_batching_server_starts_its_queued_requests_when_its_slots_grow() {
        // Half the slots until 5 s, then all: the request queued behind the first eight
        // starts at the step, long before any of them ends.
        let mut scenario = batching_server();
        scenario.provider.capacity_steps = vec![
            CapacityStep {
                at_s: 0.0,
                factor: 0.5,
            },
            CapacityStep {
                at_s: 5.0,
                factor: 1.0,
            },
        ];
        let mut provider = SimulatedProvider::new(&scenario, 8);
        for _ in 0..9 {
            provider.submit(0.0, 40, 7000, 4000);
        }
        let queued = provider.submitted_job().expect("a batching job");
        assert_eq!(provider.next_finish(), Some(5.0));
        assert!(provider.finished_by(5.0).is_empty());
        let server = provider.batching.as_ref().expect("a batching server");
        assert!(
            server
                .in_service
                .iter()
                .any(|job| job.job == queued && job.started_s == 5.0)
        );
    }

    #[test]
    fn a_batching_server_queues_what_its_slots_do_not_hold() {
        let scenario = batching_server();
        let slots = scenario.provider.slots.expect("slots") as usize;
        let mut provider = SimulatedProvider::new(&scenario, 5);
        for _ in 0..=slots {
            provider.submit(0.0, 10, 2000, 2000);
        }
        let waiting = provider.submitted_job().expect("a batching job");
        // All the slots' requests end together; the one queued starts then, alone.
        let round = provider.next_finish().expect("requests in service");
        let finished = provider.finished_by(round);
        assert_eq!(finished.len(), slots);
        assert!(finished.iter().all(|done| done.job != waiting));
        let last = provider.finished_by(10.0 * round);
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].job, waiting);
        assert!((last[0].queue_wait_s - round).abs() < 1e-9, "{last:?}");
        let slowdown = scenario.provider.slowdown_per_request;
        let alone = round / (1.0 + slowdown * (slots - 1) as f64);
        assert!((last[0].service_s - alone).abs() < 1e-9, "{last:?}");
    }

    #[test]
    fn a_streamed_first_chunk_comes_after_the_queue_wait_and_the_prefill() {
        let text = include_str!("../../scenarios/queue_2_slots.toml");
        let mut scenario: Scenario = toml::from_str(text).expect("scenario");
        scenario.provider.hang_share = 0.0;
        scenario.provider.streams = true;
        let spec = scenario.provider.clone();
        let mut provider = SimulatedProvider::new(&scenario, 7);
        // Two slots, five requests: two served at once, three queued behind them.
        let mut queued = 0;
        for _ in 0..5 {
            match provider.submit(0.0, 10, 2000, 2000) {
                SimAnswer::Completed {
                    latency_s,
                    queue_wait_s,
                    first_chunk_s,
                    completion_tokens,
                    ..
                } => {
                    // The prefill is the base-latency part of the service time, with its noise.
                    let service_s = latency_s - queue_wait_s;
                    let prefill_s = service_s * spec.base_latency_s
                        / (spec.base_latency_s
                            + spec.seconds_per_output_token * f64::from(completion_tokens));
                    let first_chunk_s = first_chunk_s.expect("streamed");
                    assert!((first_chunk_s - (queue_wait_s + prefill_s)).abs() < 1e-9);
                    queued += usize::from(queue_wait_s > 0.0);
                }
                other => panic!("expected an answer, got {other:?}"),
            }
        }
        assert_eq!(queued, 3);
        // Behind a proxy that buffers the answer, the first chunk comes with the end.
        scenario.provider.buffered_stream = true;
        let mut provider = SimulatedProvider::new(&scenario, 7);
        for _ in 0..3 {
            match provider.submit(0.0, 10, 2000, 2000) {
                SimAnswer::Completed {
                    latency_s,
                    first_chunk_s,
                    ..
                } => assert_eq!(first_chunk_s, Some(latency_s)),
                other => panic!("expected an answer, got {other:?}"),
            }
        }
        // Not streamed: none.
        scenario.provider.streams = false;
        let mut provider = SimulatedProvider::new(&scenario, 7);
        assert!(matches!(
            provider.submit(0.0, 10, 2000, 2000),
            SimAnswer::Completed {
                first_chunk_s: None,
                ..
            }
        ));
    }

    #[test]
    fn a_batching_server_streams_a_first_chunk_after_the_queue_and_a_prefill_slowed_by_its_batch() {
        let mut scenario = batching_server();
        scenario.provider.streams = true;
        let slots = scenario.provider.slots.expect("slots") as usize;
        let prefill = scenario.provider.base_latency_s;
        let slowdown = scenario.provider.slowdown_per_request;
        let mut provider = SimulatedProvider::new(&scenario, 5);
        for _ in 0..=slots {
            provider.submit(0.0, 10, 2000, 2000);
        }
        let waiting = provider.submitted_job().expect("a batching job");
        // The slots' requests prefill together, each at the pace of the whole batch.
        let at = provider.next_first_chunk().expect("requests in service");
        let batched = prefill * (1.0 + slowdown * (slots - 1) as f64);
        assert!((at - batched).abs() < 1e-9, "{at} vs {batched}");
        assert!(provider.finished_by(at).is_empty());
        let chunks = provider.first_chunks();
        assert_eq!(chunks.len(), slots);
        assert!(chunks.iter().all(|chunk| chunk.job != waiting));
        // The one queued starts when they end, alone: its first chunk a prefill later.
        let round = provider.next_finish().expect("requests in service");
        assert_eq!(provider.finished_by(round).len(), slots);
        let at = provider.next_first_chunk().expect("the queued request");
        assert!(
            (at - (round + prefill)).abs() < 1e-9,
            "{at} vs {round} + {prefill}"
        );
        provider.finished_by(at);
        let chunks = provider.first_chunks();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].job, waiting);
        assert!((chunks[0].at_s - (round + prefill)).abs() < 1e-9);
    }

    #[test]
    fn answers_are_truncated_at_max_tokens_keeping_complete_items() {
        let mut provider = SimulatedProvider::new(&scenario(), 2);
        match provider.submit(0.0, 40, 6000, 500) {
            SimAnswer::Completed {
                truncated,
                returned,
                completion_tokens,
                ..
            } => {
                assert!(truncated && completion_tokens == 500);
                assert!(returned < 10, "{returned} items cannot fit 500 tokens");
            }
            other => panic!("expected an answer, got {other:?}"),
        }
    }
}
