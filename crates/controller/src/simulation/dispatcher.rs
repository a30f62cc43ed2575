//! The simulated dispatcher: the loop the real tokio dispatcher runs, in simulated time.
//! It polls the policy, builds requests from the front of the queue, hands them to the
//! simulated provider, cuts them at their timeout, and puts every item that did not come back
//! valid straight back at the front of the queue, so retries interleave with new work.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

use crate::protocol::{
    CompletedRequest, Decision, Observation, Outcome, PipelineLoad, RequestShape, Ticket,
};
use crate::rate_limit_headers::parse_rate_limit_headers;
use crate::simulation::DispatchPolicy;
use crate::simulation::provider::{SimAnswer, SimulatedProvider};
use crate::simulation::scenario::Scenario;

/// How often the client reads a server's gauges (`queue_gauges`), as the real dispatcher
/// does.
const GAUGE_INTERVAL_S: f64 = 1.0;
/// A run that has not finished after this long is abandoned.
const SIMULATED_TIME_LIMIT_S: f64 = 6.0 * 3600.0;

/// What happened in one simulated run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunLog {
    pub policy: String,
    pub finished: bool,
    pub duration_s: f64,
    /// `(time, valid items)` of every completed request.
    pub completions: Vec<(f64, u32)>,
    pub requests: u64,
    pub rate_limited: u64,
    pub timed_out: u64,
    pub overloaded: u64,
    /// Requests abandoned at the policy's request (counted in `timed_out` too).
    pub abandoned: u64,
    pub final_items_per_request: u32,
    /// The most requests in flight at once.
    pub max_in_flight: usize,
    /// Seconds in the server's queue and in its service, summed over the answers it computed.
    pub queue_wait_s: f64,
    pub service_s: f64,
    pub computed_answers: u64,
    /// Items the server computed for requests the client had cut or timed out (and so sent
    /// again): computed twice.
    pub computed_twice_items: u64,
    /// `(time, items, requests in flight with it)` of every request sent.
    pub sends: Vec<(f64, u32, usize)>,
    /// Prompt and `max_tokens` of every request sent, summed: what a provider that counts
    /// `max_tokens` at admission charged against tokens/min.
    pub reserved_tokens: u64,
}

struct Pending {
    ticket: Ticket,
    items: Vec<usize>,
    sent_at: f64,
    prompt_tokens: u32,
    max_tokens: u32,
    answer: SimAnswer,
    timed_out: bool,
    /// The continuous-batching server's job: the answer comes when it finishes it (its
    /// entry in `endings` is then the client's timeout).
    job: Option<u64>,
}

fn nanos(seconds: f64) -> u64 {
    (seconds * 1e9).round() as u64
}

/// Runs `scenario` to the end under `policy`.
pub fn simulate(scenario: &Scenario, policy: &mut dyn DispatchPolicy) -> RunLog {
    let mut item_rng = fastrand::Rng::with_seed(scenario.seed.wrapping_add(1));
    let workload = &scenario.workload;
    let input_tokens: Vec<u32> = (0..scenario.items)
        .map(|_| {
            let spread = workload.input_tokens_spread * (2.0 * item_rng.f64() - 1.0);
            (f64::from(workload.input_tokens_per_item) * (1.0 + spread))
                .round()
                .max(1.0) as u32
        })
        .collect();
    let mut attempts = vec![0u32; input_tokens.len()];
    let mut queue: VecDeque<usize> = (0..input_tokens.len()).collect();
    let mut provider = SimulatedProvider::new(scenario, scenario.seed.wrapping_add(2));
    let mut endings: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
    // First streamed chunks of answers decided when they were sent: (time, sequence).
    let mut first_chunks: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    // The batching server's jobs the client still waits for: job → the request's sequence.
    let mut jobs: HashMap<u64, u64> = HashMap::new();
    let mut log = RunLog {
        policy: policy.name().to_string(),
        finished: false,
        duration_s: 0.0,
        completions: Vec::new(),
        requests: 0,
        rate_limited: 0,
        timed_out: 0,
        overloaded: 0,
        abandoned: 0,
        final_items_per_request: 0,
        max_in_flight: 0,
        queue_wait_s: 0.0,
        service_s: 0.0,
        computed_answers: 0,
        computed_twice_items: 0,
        sends: Vec::new(),
        reserved_tokens: 0,
    };
    let mut done = 0usize;
    let mut sequence = 0u64;
    let mut now = 0.0f64;
    let mut next_gauge_at = provider.shows_gauges().then_some(0.0f64);
    while done < input_tokens.len() && now < SIMULATED_TIME_LIMIT_S {
        // What ended by now: the batching server's answers first, then every request whose
        // time (an answer decided when it was sent, or the client's timeout) has come.
        let mut ended: Vec<(Pending, f64)> = Vec::new();
        let finished_now = provider.finished_by(now);
        // First chunks that came by now, before any answer that ends with them.
        let mut chunks: Vec<(f64, Ticket)> = provider
            .first_chunks()
            .into_iter()
            .filter_map(|chunk| {
                let id = jobs.get(&chunk.job)?;
                Some((chunk.at_s, pending.get(id)?.ticket))
            })
            .collect();
        while let Some(Reverse((at, id))) = first_chunks.peek().copied() {
            if at > nanos(now) {
                break;
            }
            first_chunks.pop();
            if let Some(request) = pending.get(&id) {
                chunks.push((at as f64 / 1e9, request.ticket));
            }
        }
        for (at_s, ticket) in chunks {
            policy.on_first_chunk(Duration::from_secs_f64(at_s), ticket);
        }
        for finished in finished_now {
            if finished.hung {
                // Never answered: the client waits for its timeout.
                jobs.remove(&finished.job);
                continue;
            }
            log.computed_answers += 1;
            log.queue_wait_s += finished.queue_wait_s;
            log.service_s += finished.service_s;
            let Some(id) = jobs.remove(&finished.job) else {
                continue; // given up on: computed for nothing
            };
            let mut request = pending.remove(&id).expect("a waiting request");
            if let SimAnswer::Completed {
                latency_s,
                queue_wait_s,
                first_chunk_s,
                ..
            } = &mut request.answer
            {
                *latency_s = finished.end_s - request.sent_at;
                *queue_wait_s = finished.queue_wait_s;
                *first_chunk_s = None;
            }
            ended.push((request, finished.end_s));
        }
        while let Some(Reverse((end, id))) = endings.peek().copied() {
            if end > nanos(now) {
                break;
            }
            endings.pop();
            let Some(mut request) = pending.remove(&id) else {
                continue; // abandoned earlier
            };
            let end_s = end as f64 / 1e9;
            if let Some(job) = request.job {
                // The client's timeout, before the batching server finished it.
                jobs.remove(&job);
                request.timed_out = true;
            }
            account_computed(&mut log, &request);
            ended.push((request, end_s));
        }
        for (request, end_s) in ended {
            let headers = scenario.provider.headers;
            done += deliver(
                &mut log,
                &mut provider,
                policy,
                &mut queue,
                &request,
                end_s,
                headers,
            );
        }
        if done >= input_tokens.len() {
            break;
        }
        // The server's gauges, read every `GAUGE_INTERVAL_S` while the run lasts.
        if let Some(at) = next_gauge_at.filter(|at| *at <= now) {
            let gauges = provider.queue_gauges(now);
            policy.on_server_queue(Duration::from_secs_f64(now), gauges);
            next_gauge_at = Some(at.max(now - GAUGE_INTERVAL_S) + GAUGE_INTERVAL_S);
        }
        // Abandon what the policy says to cut; the items go back to the queue.
        let load = PipelineLoad {
            in_flight: pending.len(),
            queued_items: queue.len(),
        };
        for ticket in policy.requests_to_cut(Duration::from_secs_f64(now), load) {
            let Some(id) = pending
                .iter()
                .find(|(_, request)| request.ticket == ticket)
                .map(|(id, _)| *id)
            else {
                continue;
            };
            let mut request = pending.remove(&id).expect("found above");
            request.timed_out = true;
            if let Some(job) = request.job {
                jobs.remove(&job);
            }
            account_computed(&mut log, &request);
            let (observation, _) = observe(&mut provider, &request, now, scenario.provider.headers);
            log.timed_out += 1;
            log.abandoned += 1;
            for item in request.items.iter().rev() {
                queue.push_front(*item);
            }
            policy.on_outcome(Duration::from_secs_f64(now), request.ticket, observation);
        }
        // Send while the policy says so.
        let wake_at = loop {
            let load = PipelineLoad {
                in_flight: pending.len(),
                queued_items: queue.len(),
            };
            match policy.poll(Duration::from_secs_f64(now), load) {
                Decision::Send {
                    items,
                    max_tokens,
                    timeout,
                } => {
                    let take = (items as usize).min(queue.len());
                    let batch: Vec<usize> = queue.drain(..take).collect();
                    let prompt_tokens = workload.prompt_overhead_tokens
                        + batch.iter().map(|item| input_tokens[*item]).sum::<u32>();
                    let retried_items =
                        batch.iter().filter(|item| attempts[**item] > 0).count() as u32;
                    for item in &batch {
                        attempts[*item] += 1;
                    }
                    let shape = RequestShape {
                        items: take as u32,
                        prompt_tokens,
                        max_tokens,
                        retried_items,
                        // Asked as a stream (behind a buffering proxy too).
                        streamed: scenario.provider.streams,
                    };
                    let ticket = policy.on_sent(Duration::from_secs_f64(now), shape);
                    let answer = provider.submit(now, take as u32, prompt_tokens, max_tokens);
                    let job = provider.submitted_job();
                    let timeout_s = timeout.as_secs_f64();
                    let latency_s = match answer {
                        _ if job.is_some() => f64::INFINITY,
                        SimAnswer::Completed { latency_s, .. }
                        | SimAnswer::RateLimited { latency_s, .. }
                        | SimAnswer::Overloaded { latency_s } => latency_s,
                        SimAnswer::Hang => f64::INFINITY,
                    };
                    let timed_out = latency_s > timeout_s && job.is_none();
                    let end = now + latency_s.min(timeout_s);
                    sequence += 1;
                    if let SimAnswer::Completed {
                        first_chunk_s: Some(first_chunk_s),
                        ..
                    } = answer
                        && job.is_none()
                        && first_chunk_s <= timeout_s
                    {
                        first_chunks.push(Reverse((nanos(now + first_chunk_s), sequence)));
                    }
                    if let Some(job) = job {
                        jobs.insert(job, sequence);
                    }
                    endings.push(Reverse((nanos(end), sequence)));
                    pending.insert(
                        sequence,
                        Pending {
                            ticket,
                            items: batch,
                            sent_at: now,
                            prompt_tokens,
                            max_tokens,
                            answer,
                            timed_out,
                            job,
                        },
                    );
                    log.requests += 1;
                    log.sends.push((now, take as u32, pending.len()));
                    log.reserved_tokens += u64::from(prompt_tokens) + u64::from(max_tokens);
                    log.max_in_flight = log.max_in_flight.max(pending.len());
                }
                Decision::Wait { until } => break until.map(|until| until.as_secs_f64()),
            }
        };
        let next_ending = endings.peek().map(|Reverse((end, _))| *end as f64 / 1e9);
        let next_ending = match (next_ending, provider.next_finish()) {
            (Some(ending), Some(finish)) => Some(ending.min(finish)),
            (ending, finish) => ending.or(finish),
        };
        let next_chunk = first_chunks.peek().map(|Reverse((at, _))| *at as f64 / 1e9);
        let next_chunk = match (next_chunk, provider.next_first_chunk()) {
            (Some(chunk), Some(batched)) => Some(chunk.min(batched)),
            (chunk, batched) => chunk.or(batched),
        };
        let next_ending = match (next_ending, next_chunk) {
            (Some(ending), Some(chunk)) => Some(ending.min(chunk)),
            (ending, chunk) => ending.or(chunk),
        };
        let next_ending = match (next_ending, next_gauge_at) {
            (Some(ending), Some(gauge)) => Some(ending.min(gauge)),
            (ending, gauge) => ending.or(gauge),
        };
        let next = match (wake_at, next_ending) {
            (Some(wake), Some(ending)) => wake.min(ending),
            (Some(wake), None) => wake,
            (None, Some(ending)) => ending,
            (None, None) => panic!(
                "{}: nothing in flight and the policy waits for nothing",
                log.policy
            ),
        };
        // Guard against a wake-up that does not move time forward.
        now = if next > now { next } else { now + 1e-6 };
    }
    log.finished = done >= input_tokens.len();
    log.duration_s = log.completions.last().map_or(now, |(at, _)| *at);
    log.final_items_per_request = policy.items_per_request();
    log
}

/// Hands the policy the outcome of a request that ends at `end_s`, counts it, and puts its
/// items that did not come back valid at the front of the queue; returns the valid items.
fn deliver(
    log: &mut RunLog,
    provider: &mut SimulatedProvider,
    policy: &mut dyn DispatchPolicy,
    queue: &mut VecDeque<usize>,
    request: &Pending,
    end_s: f64,
    headers: bool,
) -> usize {
    let (observation, valid) = observe(provider, request, end_s, headers);
    match observation.outcome {
        Outcome::RateLimited => log.rate_limited += 1,
        Outcome::TimedOut => log.timed_out += 1,
        Outcome::ServerError { .. } => log.overloaded += 1,
        _ => {}
    }
    if valid > 0 {
        log.completions.push((end_s, valid));
    }
    for item in request.items.iter().skip(valid as usize).rev() {
        queue.push_front(*item);
    }
    policy.on_outcome(Duration::from_secs_f64(end_s), request.ticket, observation);
    valid as usize
}

/// Counts the server's work for a request that ends now (answered, timed out or cut): a
/// request it computes whose answer the client does not use was computed for nothing.
fn account_computed(log: &mut RunLog, request: &Pending) {
    if request.job.is_some() {
        // The batching server's work is counted when it finishes (`finished_by`); given up
        // on before, it is computed for nothing.
        if request.timed_out && matches!(request.answer, SimAnswer::Completed { .. }) {
            log.computed_twice_items += request.items.len() as u64;
        }
        return;
    }
    if let SimAnswer::Completed {
        latency_s,
        queue_wait_s,
        ..
    } = request.answer
    {
        log.computed_answers += 1;
        log.queue_wait_s += queue_wait_s;
        log.service_s += latency_s - queue_wait_s;
        if request.timed_out {
            log.computed_twice_items += request.items.len() as u64;
        }
    }
}

/// The observation the dispatcher hands the policy, and how many items came back valid.
fn observe(
    provider: &mut SimulatedProvider,
    request: &Pending,
    end_s: f64,
    headers_sent: bool,
) -> (Observation, u32) {
    let latency = Duration::from_secs_f64(end_s - request.sent_at);
    if let SimAnswer::Completed {
        completion_tokens, ..
    } = request.answer
        && !request.timed_out
    {
        provider.on_completed(end_s, request.max_tokens, completion_tokens);
    }
    let mut headers = provider.rate_limit_headers(end_s);
    let (outcome, valid) = match request.answer {
        _ if request.timed_out => (Outcome::TimedOut, 0),
        SimAnswer::Completed {
            completion_tokens,
            returned,
            rejected,
            truncated,
            latency_s,
            queue_wait_s,
            ..
        } => {
            let sent = request.items.len() as u32;
            let valid = returned - rejected;
            let completed = CompletedRequest {
                items_valid: valid,
                items_missing: sent - returned,
                items_rejected: rejected,
                truncated,
                prompt_tokens: request.prompt_tokens,
                completion_tokens,
                server_time: provider
                    .reports_service_time()
                    .then(|| Duration::from_secs_f64(latency_s - queue_wait_s)),
            };
            (Outcome::Completed(completed), valid)
        }
        SimAnswer::RateLimited { retry_after_s, .. } => {
            headers.push((
                "retry-after".into(),
                format!("{}", retry_after_s.ceil().max(1.0)),
            ));
            if headers_sent {
                headers.push((
                    "retry-after-ms".into(),
                    format!("{:.0}", (retry_after_s * 1000.0).ceil()),
                ));
            }
            (Outcome::RateLimited, 0)
        }
        SimAnswer::Overloaded { .. } => (Outcome::ServerError { status: 503 }, 0),
        SimAnswer::Hang => (Outcome::TimedOut, 0),
    };
    let rate_limits = parse_rate_limit_headers(
        headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str())),
    );
    (Observation::new(latency, outcome, rate_limits), valid)
}
