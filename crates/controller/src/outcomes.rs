//! How the controller learns from each ended request: latencies, output sizes and quality
//! from completed answers; one rate cut per congestion event and a `Retry-After` pause from
//! 429s; a concurrency cut from 503s and from timeouts that cluster (a single hung request is
//! not congestion).

use std::time::Duration;

use crate::controller::{Controller, FirstAnswer, InFlight};
use crate::delay_limit::DelayLimit;
use crate::protocol::{CompletedRequest, Observation, Outcome, Ticket};
use crate::rate_limit_headers::RateLimitInfo;

/// Outcomes remembered to tell overload (many timeouts) from hung requests and heavy-tailed
/// latencies (a few): a cut needs this many timeouts among the last `TIMEOUT_MEMORY`.
const TIMEOUT_MEMORY: usize = 50;
const TIMEOUTS_FOR_OVERLOAD: usize = 8;
/// Pause after a 429 without `Retry-After` or reset: doubling from this, up to the maximum.
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(32);
/// A request this close to the context window had no room for a larger `max_tokens`.
const CONTEXT_WINDOW_SLACK_TOKENS: u32 = 16;
/// Each answer's weight in the mean service time per item the server reports, relative to
/// the next answer's.
const SERVED_DECAY: f64 = 0.95;
/// Jitter added to every pause: up to this share of it plus a fixed amount.
const JITTER_SHARE: f64 = 0.1;
const JITTER_FIXED: Duration = Duration::from_millis(100);

impl Controller {
    /// Learns from one ended request. Unknown tickets are ignored.
    pub fn on_outcome(&mut self, now: Duration, ticket: Ticket, observation: Observation) {
        self.advance(now);
        let Some(sent) = self.in_flight.remove(&ticket) else {
            tracing::warn!(?ticket, "outcome for an unknown ticket ignored");
            return;
        };
        if sent.first_answer {
            self.first_answer = FirstAnswer::Done;
        }
        if sent.first_chunk_at.is_some() || matches!(observation.outcome, Outcome::Completed(_)) {
            self.first_chunks.record_end(now);
        }
        if !observation.rate_limits.is_empty() {
            self.pacer.observe_headers(now, &observation.rate_limits);
        }
        if matches!(observation.outcome, Outcome::Completed(_)) {
            let first_chunk = sent
                .first_chunk_at
                .map(|at| at.saturating_sub(sent.sent_at));
            self.first_chunks
                .record_answer(now, observation.latency, first_chunk);
            self.counts.first_chunk_answers += u64::from(first_chunk.is_some());
        }
        match observation.outcome {
            Outcome::Completed(completed) => {
                self.on_completed(now, sent, observation.latency, completed)
            }
            Outcome::RateLimited => {
                self.on_rate_limited(now, sent.sent_at, &observation.rate_limits)
            }
            Outcome::TimedOut if sent.cut_at_end_of_queue => {
                self.counts.timed_out += 1;
                tracing::debug!(
                    ?ticket,
                    "request cut at the end of the queue; its items are sent again"
                );
            }
            Outcome::TimedOut => {
                self.counts.timed_out += 1;
                self.remember_timeout(true);
                // Only a timeout at the job's `request_timeout_s` says the request was too
                // large for it: one the recent latencies shortened says it was far slower than
                // they are (hung, or the tail of a heavy one), and the requests after it get
                // the job's timeout until an answer comes, so a size every request of which
                // outlasts the shortened one is found too large instead of cut without end.
                if sent.shortened_timeout {
                    self.shortened_timeout_missed = true;
                } else if self.batch.on_timeout(now, sent.shape.items) {
                    self.delay.on_size_change();
                }
                let cluster = self
                    .recent_timeouts
                    .iter()
                    .filter(|timeout| **timeout)
                    .count();
                if cluster >= TIMEOUTS_FOR_OVERLOAD {
                    self.on_overload(now, sent.sent_at, "timeouts");
                } else {
                    tracing::debug!(?ticket, "lone timeout: items go back to the queue, no cut");
                }
            }
            Outcome::ServerError { status } => {
                self.counts.server_errors += 1;
                self.remember_timeout(false);
                if matches!(status, 502 | 503 | 504 | 529) {
                    self.on_overload(now, sent.sent_at, "server overloaded");
                }
                if let Some(wait) = observation.rate_limits.retry_after {
                    self.pause(now, wait);
                }
            }
            Outcome::OtherError => {
                self.counts.other_errors += 1;
                self.remember_timeout(false);
            }
        }
        self.settle_latencies(now);
    }

    /// Takes into `settled_latency` the answered requests sent before every request still in
    /// flight (a request older than its timeout would allow is taken as hung, not waited for).
    fn settle_latencies(&mut self, now: Duration) {
        let model = self.latency.model();
        let oldest = self
            .in_flight
            .values()
            .filter(|request| {
                let hung_after =
                    model.map_or(f64::INFINITY, |model| 3.0 * model.p90(request.shape.items));
                now.saturating_sub(request.sent_at).as_secs_f64() <= hung_after
            })
            .map(|request| request.sent_at)
            .min();
        while let Some((sent_at, latency, items)) = self.unsettled.front().copied() {
            if oldest.is_some_and(|oldest| sent_at > oldest) {
                break;
            }
            self.unsettled.pop_front();
            self.settled_latency.record(latency, items);
        }
    }

    fn on_completed(
        &mut self,
        now: Duration,
        sent: InFlight,
        latency: Duration,
        completed: CompletedRequest,
    ) {
        self.shortened_timeout_missed = false;
        let shape = sent.shape;
        let items_sent = shape.items;
        // Retries split into groups smaller than the current size take another time per item:
        // levels are compared on the requests of new work.
        let small_retry = shape.retried_items >= items_sent && items_sent < self.batch.current();
        // A request that filled the model's context window could not have been given more
        // output room.
        let window_bound = self.config.context_window_tokens.is_some_and(|window| {
            shape.prompt_tokens + shape.max_tokens + CONTEXT_WINDOW_SLACK_TOKENS >= window
        });
        // An answer cut short at a `max_tokens` sized on an estimate that proved low ended
        // early, its items not all served: it shows a throughput the level does not have. One
        // cut off at the most its items may take (the job's cap per item, or the context
        // window) ran its whole budget, as long as any request of that size can: a model that
        // rambles to the cap on most answers still has its levels measured.
        let ran_the_budget = completed.completion_tokens >= shape.max_tokens
            && (window_bound || self.tokens.at_the_cap(items_sent, shape.max_tokens));
        let cut_early = completed.truncated && !ran_the_budget;
        // A retry of fewer items, the run's small first request, an answer cut short early or
        // a request sent behind an earlier level's says nothing of the level's throughput,
        // but the server's queue it still shows.
        let measures = !small_retry && sent.clean && !sent.first_answer && !cut_early;
        let record = if measures {
            DelayLimit::on_completed
        } else {
            DelayLimit::on_completed_unmeasured
        };
        record(
            &mut self.delay,
            now,
            sent.generation,
            sent.level,
            f64::from(items_sent),
            latency,
            completed.server_time,
        );
        self.counts.requests_completed += 1;
        self.counts.server_timed += u64::from(completed.server_time.is_some());
        // Once, at the first answer of a provider that announces no request limit (a server
        // that may queue): how its pace will be found.
        if self.counts.requests_completed == 1 && self.pacer.is_probing() {
            if completed.server_time.is_some() {
                tracing::info!(
                    "the server says how long it worked on each request: a queue behind our requests shows in its answers"
                );
            } else if self.reads_first_chunks() {
                tracing::info!(
                    "the server does not say how long it worked on a request, but its streamed answers show when a slot took each up: requests waiting for one are seen from their first chunks"
                );
            } else {
                tracing::info!(
                    "the server does not say how long it worked on a request: the requests in flight it serves best are found from throughput alone, over rounds of answers"
                );
            }
        }
        self.counts.items_valid += u64::from(completed.items_valid);
        self.counts.items_missing += u64::from(completed.items_missing);
        self.counts.items_rejected += u64::from(completed.items_rejected);
        self.counts.truncated_requests += u64::from(completed.truncated);
        self.consecutive_pauses = 0;
        self.remember_timeout(false);
        self.latency.record(latency, items_sent);
        // The unloaded pace: answers sent alone, of the run's size.
        if let Some(service) = completed
            .server_time
            .filter(|service| measures && sent.level == 1 && *service <= latency)
        {
            let (seconds, items) = self.served;
            self.served = (
                seconds * SERVED_DECAY + service.as_secs_f64(),
                items * SERVED_DECAY + f64::from(items_sent),
            );
        }
        let at = self
            .unsettled
            .partition_point(|(sent_at, _, _)| *sent_at <= sent.sent_at);
        self.unsettled
            .insert(at, (sent.sent_at, latency, items_sent));
        let returned = completed.items_valid + completed.items_rejected;
        // Sent with what the estimate gives now (or more), or on an estimate since raised.
        let current = shape.max_tokens >= self.max_tokens(items_sent);
        self.tokens.record_output(
            returned,
            completed.completion_tokens,
            completed.truncated,
            current,
        );
        // Items lost to truncation say `max_tokens` was short, which `tokens` fixes, unless
        // the context window left no more room (`window_bound`): then the request was too large.
        let failed = if completed.truncated && !window_bound {
            completed.items_rejected
        } else {
            items_sent.saturating_sub(completed.items_valid)
        };
        let pacer = &self.pacer;
        let tokens = &self.tokens;
        let full_size = self.batch.current();
        let items_per_second = |items: u32| {
            let costs = crate::rate_pacer::request_costs(
                tokens.prompt_tokens(items),
                f64::from(tokens.max_tokens(items, full_size)),
            );
            pacer.request_rate(costs) * f64::from(items)
        };
        // While the delay limit still searches a queueing server's capacity, requests keep
        // their size: small requests come back sooner, so each level is measured sooner.
        let searching = self.delay.searching()
            && self.queueing_server(self.concurrency_limit_for(self.batch.current()));
        let size_before = self.batch.current();
        let largest = self.largest_size_within_the_timeout();
        self.batch
            .record(now, items_sent, failed, largest, |from, to| {
                if searching {
                    return 0.0;
                }
                let (before, after) = (items_per_second(from), items_per_second(to));
                if before.is_finite() && after.is_finite() && before > 0.0 {
                    after / before - 1.0
                } else {
                    f64::from(to) / f64::from(from) - 1.0
                }
            });
        if self.batch.current() != size_before {
            self.delay.on_size_change();
        }
    }

    fn on_rate_limited(&mut self, now: Duration, sent_at: Duration, info: &RateLimitInfo) {
        self.counts.rate_limited += 1;
        self.recent_rejections.push_back(sent_at);
        // One cut per congestion event: 429s for requests sent before the last cut are the
        // same event seen late.
        let new_event = self.last_rate_cut_at.is_none_or(|cut| sent_at >= cut);
        if new_event {
            let admitted = self.admitted_request_rate(now);
            self.pacer.on_congestion(now, admitted);
            self.last_rate_cut_at = Some(now);
            self.sends_at_last_cut = self.counts.requests_sent;
            self.rejections_at_last_cut = self.counts.rate_limited;
            self.counts.rate_cuts += 1;
        }
        let wait = info
            .retry_after
            .or_else(|| exhausted_reset(info))
            .unwrap_or_else(|| {
                let doublings = self.consecutive_pauses.min(5);
                (BACKOFF_START * 2u32.pow(doublings)).min(BACKOFF_MAX)
            });
        if new_event {
            self.consecutive_pauses += 1;
        }
        self.pause(now, wait);
    }

    fn on_overload(&mut self, now: Duration, sent_at: Duration, why: &str) {
        let in_flight = self.in_flight.len() + 1;
        if self.concurrency.on_overload(now, sent_at, in_flight) {
            self.counts.concurrency_cuts += 1;
            tracing::info!(
                cause = why,
                cap = self.concurrency.overload_cap(),
                "concurrency cut"
            );
        }
    }

    /// Sends nothing before `now + wait + jitter`; never shortens a pause already set.
    fn pause(&mut self, now: Duration, wait: Duration) {
        let jitter_bound = wait.mul_f64(JITTER_SHARE) + JITTER_FIXED;
        let jitter = jitter_bound.mul_f64(self.rng.f64());
        let until = now + wait + jitter;
        if until > self.pause_until {
            tracing::debug!(wait_s = (until - now).as_secs_f64(), "pausing after 429");
            self.pause_until = until;
        }
    }

    fn remember_timeout(&mut self, timed_out: bool) {
        if self.recent_timeouts.len() == TIMEOUT_MEMORY {
            self.recent_timeouts.pop_front();
        }
        self.recent_timeouts.push_back(timed_out);
    }
}

/// The reset of a dimension the provider says is exhausted, if any.
fn exhausted_reset(info: &RateLimitInfo) -> Option<Duration> {
    [
        info.requests,
        info.tokens,
        info.input_tokens,
        info.output_tokens,
    ]
    .iter()
    .filter(|window| window.remaining == Some(0))
    .filter_map(|window| window.reset)
    .max()
}
