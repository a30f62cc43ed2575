//! The first streamed chunk of each answer as a reading of the server's queue. A request that
//! a server's slot takes streams its first chunk once its prompt is prefilled; one waiting in
//! the server's queue streams nothing until a slot frees. Of our requests in flight, those
//! whose first chunk came are running; those without one for clearly longer than a prefill
//! takes are waiting: the gauges' reading (`ServerQueue`), from our own requests alone
//! (`Controller::first_chunk_reading`, followed by the gauges' rules).
//!
//! The rules, each checked on the simulated servers (see the README):
//! - **Trust.** The signal is on while the last `TRUST_ANSWERS` answers (at least one) each
//!   streamed its first chunk clearly before its end: the part of the answer after it is at
//!   least `STREAMED_TAIL_SHARE` of the quickest of their latencies. A proxy that buffers the
//!   whole answer delivers its "first chunk" with the end, and a server that ignores `stream`
//!   none: either turns the signal off. (The tail is measured against the quickest latency,
//!   not the answer's own: a request that waited long in the queue has a first chunk late in
//!   its latency on a server that streams all right.)
//! - **Waiting.** A request is waiting once its age without a first chunk exceeds
//!   `WAITING_MARGIN` × the reference time to first chunk: the `REFERENCE_QUANTILE` quantile
//!   of the last `FIRST_CHUNKS_KEPT` first chunks received (in flight or answered), each
//!   scaled up to the request's prompt when its own prompt was smaller. Recent first chunks
//!   carry the present load (a continuous-batching server prefills slower the more it
//!   runs); a low quantile leaves out the ones that waited; the margin covers a doubling's
//!   slower prefill on top of the noise. A first chunk that came past that threshold waited
//!   in the queue and is not taken in, unless no answer of ours ended between its request's
//!   send and it: with only our requests on the server a queued request gets a slot only when
//!   one of ours ends, so that one waited for none (it was prefilled behind the others of a
//!   burst, one after another as llama.cpp and Ollama do on a CPU, or in a cold slot). For the
//!   same reason a request past the threshold is waiting only if one of ours ended since its
//!   send (an end that freed a slot: of a request whose first chunk came, or that was
//!   answered), or no first chunk of ours came within the threshold
//!   (`FirstChunks::may_be_queued`):
//!   while first chunks keep coming and no slot of ours was freed, the server is still taking
//!   requests in one after another, not queueing them. And a request sent before one of ours
//!   that already streamed (by more than the reference) is not waiting: a queue is served in
//!   order, so it is hung or lost, not queued.
//! - **Streamed.** Only requests sent asking for a streamed answer (`RequestShape::streamed`)
//!   are read as running or waiting: one sent unstreamed never has a first chunk. A reading
//!   is followed only when every request of ours in flight was sent streamed: one sent
//!   unstreamed holds a slot or waits for one unseen, so the slots the others show would be
//!   too few. When the caller stops streaming
//!   (`Controller::streaming_stopped`) the trust is dropped until answers stream again.
//! - **Handovers.** An answer's end frees a slot that a request without a first chunk takes
//!   and prefills: until a first chunk comes (or the threshold passes) it counts running.

use std::collections::VecDeque;
use std::time::Duration;

/// Answers the trust rule looks at.
const TRUST_ANSWERS: usize = 3;
/// An answer streamed when its part after the first chunk is at least this share of the
/// quickest latency of the answers the trust rule looks at.
const STREAMED_TAIL_SHARE: f64 = 0.2;
/// First chunks the reference time to first chunk is taken from.
const FIRST_CHUNKS_KEPT: usize = 16;
/// The quantile of their times to first chunk taken as the reference.
const REFERENCE_QUANTILE: f64 = 0.25;
/// A request is waiting past this many reference times to first chunk.
const WAITING_MARGIN: f64 = 3.0;
/// Open handovers kept at most (more than answers end within a prefill).
const EVENTS_KEPT: usize = 256;
/// Late first chunks in a row (past the threshold, after an end of ours) that become the
/// reference: the server prefills that slowly now (a cache gone cold, a GPU shared), for as
/// long as a queue of ours would have been found and followed many times over.
const LATE_IN_A_ROW_TO_TAKE: usize = FIRST_CHUNKS_KEPT;
/// How often the requests in flight are read as a queue (as the runner reads gauges).
pub(crate) const READING_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default)]
pub(crate) struct FirstChunks {
    /// Recent first chunks: time to first chunk and the request's prompt tokens.
    recent: VecDeque<(Duration, u32)>,
    /// The last answers: latency, and the part of it after the first chunk (`None`: none came).
    answers: VecDeque<(Duration, Option<Duration>)>,
    /// When the requests in flight were last read as a queue.
    pub last_reading: Option<Duration>,
    /// When answers ended whose slot no first chunk has come from since (the oldest first).
    handovers: VecDeque<Duration>,
    /// When the last request of ours ended (however it ended).
    last_end: Option<Duration>,
    /// When the last first chunk of ours came (taken into the reference or not).
    last_first_chunk: Option<Duration>,
    /// The first chunks left out of the reference since the last one taken in.
    late_in_a_row: Vec<(Duration, u32)>,
}

impl FirstChunks {
    /// A request sent at `sent_at` streamed its first chunk at `now`; its prompt had
    /// `prompt_tokens`. One that came later than `waiting_after` after a request of ours ended
    /// since the send may have waited in the queue for the slot that end freed: it tells
    /// nothing of the prefill (were it kept, a queue's waits would soon be the reference, and
    /// no request would be found waiting any more). One that no end preceded waited for no
    /// slot (with only ours on the server, a queued request gets one only when one of ours
    /// ends): however late, it is the prefill's time at the present load, and is taken in.
    ///
    /// But `LATE_IN_A_ROW_TO_TAKE` late ones in a row, none taken in between, replace the
    /// reference: a queue of ours is found and followed within a few of them, and the requests
    /// then sent find a slot at once, so so many in a row say that the server prefills that
    /// slowly now (a prefix cache gone cold, a GPU shared with another job). Without this the
    /// reference would stay at the old prefill, and every request still prefilling would read
    /// as waiting for the rest of the run.
    pub fn record_first_chunk(&mut self, sent_at: Duration, now: Duration, prompt_tokens: u32) {
        self.handovers.pop_front();
        self.last_first_chunk = Some(self.last_first_chunk.map_or(now, |at| at.max(now)));
        // A first chunk can only follow its send; one that does not says nothing of a prefill.
        if now <= sent_at {
            return;
        }
        let after = now - sent_at;
        let sample = (after, prompt_tokens.max(1));
        let slot_freed_since = self.last_end.is_some_and(|end| end > sent_at);
        if slot_freed_since
            && self
                .waiting_after(prompt_tokens)
                .is_some_and(|waiting_after| after > waiting_after)
        {
            self.late_in_a_row.push(sample);
            if self.late_in_a_row.len() >= LATE_IN_A_ROW_TO_TAKE {
                tracing::debug!(
                    late = self.late_in_a_row.len(),
                    "first chunks come late in a row: the server prefills slower now, taken as the reference"
                );
                self.recent = std::mem::take(&mut self.late_in_a_row).into();
            }
            return;
        }
        self.late_in_a_row.clear();
        if self.recent.len() == FIRST_CHUNKS_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(sample);
    }

    /// An answer completed at `now` after `latency`, its first chunk `first_chunk` after its
    /// send.
    pub fn record_answer(
        &mut self,
        now: Duration,
        latency: Duration,
        first_chunk: Option<Duration>,
    ) {
        if self.handovers.len() == EVENTS_KEPT {
            self.handovers.pop_front();
        }
        self.handovers.push_back(now);
        if self.answers.len() == TRUST_ANSWERS {
            self.answers.pop_front();
        }
        self.answers
            .push_back((latency, first_chunk.map(|at| latency.saturating_sub(at))));
    }

    /// A request of ours that held a slot (its first chunk came, or it was answered) ended at
    /// `now`: the slot is free. (One refused at once, or given up on while still queued, held
    /// none.)
    pub fn record_end(&mut self, now: Duration) {
        self.last_end = Some(self.last_end.map_or(now, |end| end.max(now)));
    }

    /// The caller stopped asking for streamed answers: the first chunks are not trusted until
    /// answers stream theirs clearly before their end again.
    pub fn streaming_stopped(&mut self) {
        self.answers.clear();
    }

    /// Whether the first chunks are a real signal: the last answers all streamed theirs
    /// clearly before their end.
    pub fn trusted(&self) -> bool {
        let Some(quickest) = self.answers.iter().map(|(latency, _)| *latency).min() else {
            return false;
        };
        let least_tail = quickest.mul_f64(STREAMED_TAIL_SHARE);
        self.answers
            .iter()
            .all(|(_, tail)| tail.is_some_and(|tail| tail >= least_tail && !tail.is_zero()))
    }

    /// The reference time to first chunk for a request of `prompt_tokens`; `None` before any
    /// first chunk.
    pub fn reference(&self, prompt_tokens: u32) -> Option<Duration> {
        let mut scaled: Vec<f64> = self
            .recent
            .iter()
            .map(|(after, prompt)| {
                after.as_secs_f64() * (f64::from(prompt_tokens) / f64::from(*prompt)).max(1.0)
            })
            .collect();
        if scaled.is_empty() {
            return None;
        }
        scaled.sort_by(f64::total_cmp);
        let index = ((scaled.len() - 1) as f64 * REFERENCE_QUANTILE).floor() as usize;
        Some(Duration::from_secs_f64(scaled[index]))
    }

    /// Slots that answers freed within `window` before `now` whose next request may still be
    /// prefilling its prompt: it runs (the gauges count it running), and its first chunk has
    /// not come yet. Every answer's end opens one, every first chunk closes the oldest open
    /// (a chunk of a request that took a slot no answer freed closes one too: the count errs
    /// low while the level climbs), and one open longer than `window` is dropped (an answer
    /// no request followed).
    pub fn handovers(&mut self, now: Duration, window: Duration) -> u32 {
        let since = now.saturating_sub(window);
        while self.handovers.front().is_some_and(|end| *end <= since) {
            self.handovers.pop_front();
        }
        self.handovers.len() as u32
    }

    /// Whether a request sent at `sent_at`, without a first chunk at `now` for longer than
    /// `waiting_after`, can be waiting in the server's queue: one of ours ended since its send
    /// (with only ours on the server, a queued request gets a slot only when one of ours
    /// ends), or no first chunk of ours came within `waiting_after` (the server stopped
    /// taking requests in). Otherwise first chunks keep coming with no slot freed: the server
    /// is still taking requests in, prefilling them one after another, and this one's turn
    /// has not come yet.
    pub fn may_be_queued(&self, sent_at: Duration, now: Duration, waiting_after: Duration) -> bool {
        let slot_freed_since = self.last_end.is_some_and(|end| end > sent_at);
        let taking_in = self
            .last_first_chunk
            .is_some_and(|at| now.saturating_sub(at) <= waiting_after);
        slot_freed_since || !taking_in
    }

    /// When the last request of ours that held a slot ended.
    #[cfg(test)]
    pub(crate) fn last_end(&self) -> Option<Duration> {
        self.last_end
    }

    /// How long a request of `prompt_tokens` may go without a first chunk before it is taken
    /// as waiting.
    pub fn waiting_after(&self, prompt_tokens: u32) -> Option<Duration> {
        self.reference(prompt_tokens)
            .map(|reference| reference.mul_f64(WAITING_MARGIN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(seconds: f64) -> Duration {
        Duration::from_secs_f64(seconds)
    }

    #[test]
    fn answers_that_streamed_clearly_before_their_end_turn_the_signal_on() {
        let mut chunks = FirstChunks::default();
        assert!(!chunks.trusted());
        chunks.record_answer(Duration::ZERO, s(3.0), Some(s(0.3)));
        assert!(chunks.trusted(), "one answer is enough to start");
        // A first chunk late in a long latency (it waited in the queue) still streamed.
        chunks.record_answer(Duration::ZERO, s(12.0), Some(s(9.3)));
        assert!(chunks.trusted());
        // One at the end (a buffering proxy), or none: off for the next three answers.
        chunks.record_answer(Duration::ZERO, s(3.0), Some(s(3.0)));
        assert!(!chunks.trusted());
        chunks.record_answer(Duration::ZERO, s(3.0), Some(s(0.3)));
        chunks.record_answer(Duration::ZERO, s(3.0), Some(s(0.3)));
        assert!(!chunks.trusted());
        chunks.record_answer(Duration::ZERO, s(3.0), Some(s(0.3)));
        assert!(chunks.trusted());
        chunks.record_answer(Duration::ZERO, s(3.0), None);
        assert!(!chunks.trusted());
    }

    #[test]
    fn the_reference_is_a_low_quantile_scaled_up_to_larger_prompts() {
        let mut chunks = FirstChunks::default();
        assert_eq!(chunks.reference(1000), None);
        chunks.record_first_chunk(Duration::ZERO, s(0.2), 500);
        // Twice the prompt: twice the prefill; a smaller one is not taken as faster.
        assert_eq!(chunks.reference(1000), Some(s(0.4)));
        assert_eq!(chunks.reference(100), Some(s(0.2)));
        for after in [0.3, 0.35, 0.7, 0.8] {
            chunks.record_first_chunk(Duration::ZERO, s(after), 1000);
        }
        // The quarter quantile of 0.3, 0.35, 0.4 (scaled), 0.7 and 0.8.
        assert_eq!(chunks.reference(1000), Some(s(0.35)));
        // A first chunk past three times that, one of ours having ended since its send, may
        // have waited in a queue for the slot that end freed: not taken in.
        chunks.record_end(s(0.5));
        chunks.record_first_chunk(Duration::ZERO, s(1.2), 1000);
        assert_eq!(chunks.recent.len(), 5);
        assert_eq!(
            chunks.waiting_after(1000),
            Some(s(0.35).mul_f64(WAITING_MARGIN))
        );
    }

    #[test]
    fn first_chunks_late_in_a_row_become_the_reference() {
        // Sixteen first chunks of 0.1 s; then the server prefills ten times slower (its prefix
        // cache gone cold), answers of ours ending all the while: each late one is left out,
        // until as many in a row as the reference holds take its place.
        let mut chunks = FirstChunks::default();
        for k in 0..FIRST_CHUNKS_KEPT {
            let sent = s(k as f64);
            chunks.record_first_chunk(sent, sent + s(0.1), 1000);
        }
        assert_eq!(chunks.reference(1000), Some(s(0.1)));
        for k in 0..FIRST_CHUNKS_KEPT {
            let sent = s(100.0 + k as f64);
            chunks.record_end(sent + s(0.5));
            chunks.record_first_chunk(sent, sent + s(1.0), 1000);
            let expected = if k + 1 < LATE_IN_A_ROW_TO_TAKE {
                0.1
            } else {
                1.0
            };
            assert_eq!(
                chunks.reference(1000),
                Some(s(expected)),
                "after {} late",
                k + 1
            );
        }
        // One taken in between starts the count again.
        let mut chunks = FirstChunks::default();
        chunks.record_first_chunk(Duration::ZERO, s(0.1), 1000);
        for k in 0..2 * FIRST_CHUNKS_KEPT {
            let sent = s(10.0 + k as f64);
            chunks.record_end(sent + s(0.5));
            chunks.record_first_chunk(sent, sent + s(1.0), 1000);
            if k % 8 == 7 {
                chunks.record_first_chunk(sent, sent + s(0.1), 1000);
            }
        }
        assert_eq!(chunks.reference(1000), Some(s(0.1)));
        // A first chunk reported at or before its send is no prefill.
        chunks.record_first_chunk(s(500.0), s(500.0), 1000);
        assert_eq!(chunks.reference(1000), Some(s(0.1)));
    }

    #[test]
    fn a_late_first_chunk_that_no_end_of_ours_preceded_is_taken_into_the_reference() {
        // A burst of eight sent at 10 s to a server that prefills one prompt after another
        // (llama.cpp or Ollama on a CPU): the k-th first chunk comes k prefills of 0.5 s after
        // the send, none of ours having ended since (the last ended at 10 s, as they were
        // sent): none waited for a slot, all are taken in, and the reference moves up.
        let mut chunks = FirstChunks::default();
        chunks.record_first_chunk(s(0.0), s(0.5), 1000);
        chunks.record_end(s(10.0));
        for k in 1..=8 {
            chunks.record_first_chunk(s(10.0), s(10.0 + 0.5 * f64::from(k)), 1000);
        }
        assert_eq!(chunks.recent.len(), 9);
        // The quarter quantile of 0.5, 0.5, 1.0, 1.5, ..., 4.0.
        assert_eq!(chunks.reference(1000), Some(s(1.0)));
        // The same first chunks after an end in between are left out past the threshold.
        let mut chunks = FirstChunks::default();
        chunks.record_first_chunk(s(0.0), s(0.5), 1000);
        chunks.record_end(s(10.2));
        for k in 1..=8 {
            chunks.record_first_chunk(s(10.0), s(10.0 + 0.5 * f64::from(k)), 1000);
        }
        assert_eq!(
            chunks.recent.len(),
            4,
            "0.5, then 0.5, 1.0 and 1.5 (at most 3 × 0.5)"
        );
        assert_eq!(chunks.reference(1000), Some(s(0.5)));
    }

    #[test]
    fn streaming_stopped_drops_the_trust_until_answers_stream_again() {
        let mut chunks = FirstChunks::default();
        for _ in 0..TRUST_ANSWERS {
            chunks.record_answer(Duration::ZERO, s(3.0), Some(s(0.3)));
        }
        assert!(chunks.trusted());
        chunks.streaming_stopped();
        assert!(!chunks.trusted());
        chunks.record_answer(Duration::ZERO, s(3.0), Some(s(0.3)));
        assert!(chunks.trusted());
    }
}
