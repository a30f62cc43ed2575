//! The rule this project started from, as a baseline: chunks of 5 parallel requests; after
//! each chunk, one more item per request if the chunk was 20% faster than the average chunk,
//! one fewer if 50% slower, and after two failed chunks in a row two fewer and one more second
//! of delay between chunks. `max_tokens` is items × the configured output per item; the
//! timeout is the job's.

use std::time::Duration;

use crate::config::{ControllerConfig, StartMinMax};
use crate::protocol::{Decision, Observation, Outcome, PipelineLoad, RequestShape, Ticket};
use crate::simulation::DispatchPolicy;

const WORKERS: u32 = 5;
const FASTER: f64 = 0.8;
const SLOWER: f64 = 1.5;
const FAILED_CHUNKS_FOR_BACKOFF: u32 = 2;

#[derive(Debug)]
pub struct FixedRule {
    range: StartMinMax,
    items: u32,
    output_tokens_per_item: u32,
    timeout: Duration,
    chunk_sent: u32,
    chunk_open: u32,
    chunk_failed: bool,
    chunk_started_at: Duration,
    chunk_durations_sum: f64,
    chunks: u32,
    failed_chunks_in_a_row: u32,
    delay: Duration,
    next_chunk_at: Duration,
    next_ticket: u64,
}

impl FixedRule {
    pub fn new(config: &ControllerConfig) -> Self {
        Self {
            range: config.items_per_request,
            items: config.items_per_request.start,
            output_tokens_per_item: config.initial_output_tokens_per_item,
            timeout: config.request_timeout,
            chunk_sent: 0,
            chunk_open: 0,
            chunk_failed: false,
            chunk_started_at: Duration::ZERO,
            chunk_durations_sum: 0.0,
            chunks: 0,
            failed_chunks_in_a_row: 0,
            delay: Duration::ZERO,
            next_chunk_at: Duration::ZERO,
            next_ticket: 0,
        }
    }

    fn close_chunk(&mut self, now: Duration) {
        let duration = now.saturating_sub(self.chunk_started_at).as_secs_f64();
        if self.chunks > 0 {
            let average = self.chunk_durations_sum / f64::from(self.chunks);
            if duration < FASTER * average {
                self.items += 1;
            } else if duration > SLOWER * average {
                self.items = self.items.saturating_sub(1);
            }
        }
        self.chunk_durations_sum += duration;
        self.chunks += 1;
        if self.chunk_failed {
            self.failed_chunks_in_a_row += 1;
            if self.failed_chunks_in_a_row >= FAILED_CHUNKS_FOR_BACKOFF {
                self.items = self.items.saturating_sub(2);
                self.delay += Duration::from_secs(1);
                self.failed_chunks_in_a_row = 0;
            }
        } else {
            self.failed_chunks_in_a_row = 0;
        }
        self.items = self.range.clamp(self.items);
        self.chunk_sent = 0;
        self.chunk_failed = false;
        self.next_chunk_at = now + self.delay;
    }
}

impl DispatchPolicy for FixedRule {
    fn name(&self) -> &str {
        "fixed rule"
    }

    fn poll(&mut self, now: Duration, load: PipelineLoad) -> Decision {
        if self.chunk_sent > 0
            && self.chunk_open == 0
            && (self.chunk_sent == WORKERS || load.queued_items == 0)
        {
            self.close_chunk(now);
        }
        if self.chunk_sent == 0 && now < self.next_chunk_at {
            return Decision::Wait {
                until: Some(self.next_chunk_at),
            };
        }
        if self.chunk_sent < WORKERS && load.queued_items > 0 {
            if self.chunk_sent == 0 {
                self.chunk_started_at = now;
            }
            return Decision::Send {
                items: self.items,
                max_tokens: self.items * self.output_tokens_per_item,
                timeout: self.timeout,
            };
        }
        Decision::Wait { until: None }
    }

    fn on_sent(&mut self, _now: Duration, _shape: RequestShape) -> Ticket {
        self.chunk_sent += 1;
        self.chunk_open += 1;
        self.next_ticket += 1;
        Ticket(self.next_ticket)
    }

    fn on_outcome(&mut self, _now: Duration, _ticket: Ticket, observation: Observation) {
        self.chunk_open = self.chunk_open.saturating_sub(1);
        if !matches!(observation.outcome, Outcome::Completed(_)) {
            self.chunk_failed = true;
        }
    }

    fn items_per_request(&self) -> u32 {
        self.items
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit_headers::RateLimitInfo;

    fn load(in_flight: usize) -> PipelineLoad {
        PipelineLoad {
            in_flight,
            queued_items: 1000,
        }
    }

    fn run_chunk(rule: &mut FixedRule, start: Duration, duration: Duration, outcome: Outcome) {
        let mut tickets = Vec::new();
        while let Decision::Send {
            items, max_tokens, ..
        } = rule.poll(start, load(tickets.len()))
        {
            let shape = RequestShape {
                items,
                prompt_tokens: 100,
                max_tokens,
                retried_items: 0,
                streamed: false,
            };
            tickets.push(rule.on_sent(start, shape));
        }
        assert_eq!(tickets.len(), WORKERS as usize, "a chunk is five requests");
        assert_eq!(rule.poll(start, load(5)), Decision::Wait { until: None });
        for ticket in tickets {
            let observation = Observation::new(duration, outcome, RateLimitInfo::default());
            rule.on_outcome(start + duration, ticket, observation);
        }
    }

    #[test]
    fn two_failed_chunks_shrink_the_batch_and_add_a_second_of_delay() {
        let mut rule = FixedRule::new(&ControllerConfig::with_defaults());
        let second = Duration::from_secs(1);
        run_chunk(&mut rule, Duration::ZERO, 4 * second, Outcome::RateLimited);
        run_chunk(&mut rule, 4 * second, 4 * second, Outcome::RateLimited);
        // Closing the second failed chunk: 10 - 2 items, and a 1 s pause before the next.
        assert_eq!(
            rule.poll(8 * second, load(0)),
            Decision::Wait {
                until: Some(9 * second)
            }
        );
        assert_eq!(rule.items_per_request(), 8);
    }

    #[test]
    fn a_fast_chunk_adds_an_item() {
        let mut rule = FixedRule::new(&ControllerConfig::with_defaults());
        let second = Duration::from_secs(1);
        let completed = Outcome::Completed(Default::default());
        run_chunk(&mut rule, Duration::ZERO, 10 * second, completed);
        run_chunk(&mut rule, 10 * second, 5 * second, completed);
        rule.poll(15 * second, load(0));
        assert_eq!(rule.items_per_request(), 11);
    }
}
