//! Concurrency from delay: how many requests in flight a server that queues (llama.cpp, vLLM,
//! Ollama, TGI, a queueing proxy) turns into more items per second, found by hill climbing on
//! the delivered throughput.
//!
//! Such a server never refuses: requests beyond its slots wait in its queue, so latency grows
//! with concurrency and no 429 ever says "too much". Latency alone does not tell queueing from
//! a server that slows each request a little for every request it batches with it (continuous
//! batching), but their throughput does: by Little's law a level of `L` requests in flight with
//! mean latency `R` per request of `n` items delivers `X = L · n / R` items per second. Queueing
//! leaves `X` flat as `L` grows (each added request only waits); batching raises it.
//!
//! The limit therefore measures `X` at one level for at least one round of requests sent at that
//! level, then tries another level and keeps it only if the throughput gained per added request
//! is at least `GAIN_TO_KEEP` of what one request delivered before (the marginal gain; 1 is a
//! server with free slots, 0 is pure queueing) and beyond `KEEP_ERRORS` standard errors of the
//! two measurements. Decisions are made on evidence, not on one round: a probe whose gain is
//! within the noise of the threshold is measured longer, or the settled level is measured again
//! and the probe judged once more against it; noise is taken at least as wide as the spread of
//! all requests measured so far and widened for small samples (Student's t). It starts by
//! doubling (slow start), each doubling judged after one round of requests at the new level,
//! for as long as each doubling is kept; it climbs by steps after that, each kept step in a
//! row doubling the next, and after a failed step holds the level for a while, then probes
//! again alternately above and below it, so a server that gains or loses slots is followed
//! (jumping to Vegas's estimate of what it now serves) and the baseline is measured afresh (as
//! Envoy's adaptive concurrency filter re-measures its minimum latency). Until a probe has
//! failed the level is not yet bracketed (`searching`): the controller keeps requests at their
//! first size meanwhile, so each round is short and the search quick.
//!
//! Only requests sent while this limit was what held the dispatcher back are measured: when the
//! provider's rate or the job's caps bind first, the level is not ours to learn. A change of
//! request size starts the level's measurement afresh, so no measurement mixes two sizes.
//!
//! A server that says how long it worked on each request (llama.cpp's `timings`, the
//! `time_info` or `usage` times of some hosted APIs) also shows its queue directly: a request's
//! latency less that service time, less the network's share (the least seen), is the time it
//! waited for a slot. Counted over the requests sent at the current limit (from the first one
//! the level itself put in flight: after a raise, every request the raise added), whatever
//! their size, from their fourth answer on: when by Little's law at least `QUEUED_REQUESTS`
//! of them (and a share of the level, for the noise) were queued on average, the level is
//! past the server's slots, whatever the throughput's noise says. The limit drops at once to
//! the requests the server served at a time (the level less those queued) and holds there,
//! and slow start ends. A start level that shows no queue is not probed below either, and a
//! probe above that shows none is kept on any gain beyond the noise (`SERVED_AT_ONCE_ERRORS`):
//! the server served its requests at once, and what more of them cost is its batching. During
//! slow start such a probe is kept from its fourth answer unless its throughput clearly fell.

use std::collections::VecDeque;
use std::time::Duration;

use crate::config::StartMinMax;

/// A step is kept when each added request delivers at least this share of what one request
/// delivered at the lower level (and a lower level is kept when the higher did not).
const GAIN_TO_KEEP: f64 = 0.2;
/// A probe above that the server says it served without a queue (its reported service
/// times) is kept when its throughput rose by this many standard errors: it served every
/// request at once, so what more of them cost is its batching's slowdown, not a wait.
const SERVED_AT_ONCE_ERRORS: f64 = 1.0;
/// Slow start multiplies the level by this while each step is kept.
const SLOW_START_FACTOR: u32 = 2;
/// Requests measured at one level, at least, and per request in flight.
const MIN_SAMPLES: u32 = 4;
const SAMPLES_PER_LEVEL: u32 = 2;
/// A measurement whose verdict is within the noise goes on to at most this many times the
/// requests it needed at least.
const EXTEND_SAMPLES: u32 = 2;
/// Steps after slow start: a quarter of the level (at least one request), large enough that
/// the change in throughput stands out of the noise.
const STEP_DIVISOR: u32 = 4;
/// A higher level's latency per item must exceed the lower's by this factor to count as risen.
const LATENCY_RISE: f64 = 1.05;
/// A difference counts when it exceeds this many standard errors of the measurements.
const NOISE_ERRORS: f64 = 2.0;
/// Latency per item this far over the baseline shows requests waiting or slowing each other.
const QUEUE_INFLATION: f64 = 1.25;
/// One answer at the start level taking this many times the first answer's time per item
/// shows the queue before the level's measurement is complete (a server with one slot makes
/// it the level; continuous batching at the start level, 1.2-1.5).
const EARLY_QUEUE_INFLATION: f64 = 2.5;
/// The settled level's latency per item moving by this factor (beyond the noise) between two
/// measurements shows that the server changed.
const SERVER_CHANGE: f64 = 1.25;
/// A level above is kept only when its gain exceeds this many standard errors: one wrongly
/// kept queues requests for as long as it is held, one wrongly refused is probed again.
const KEEP_ERRORS: f64 = 3.0;
/// Degrees of freedom pooled before the pooled spread is trusted as a floor.
const POOLED_DEGREES: f64 = 8.0;
/// Latency per item this far over a lower level's says half the requests in flight or more
/// are queued (Vegas's estimate): doubling the level would only queue more.
const QUEUED_HALF: f64 = 2.0;
/// Measurements the baseline (the lowest latency per item) is taken over.
const BASELINE_WINDOW: Duration = Duration::from_secs(600);
const BASELINE_MEASUREMENTS: usize = 64;
/// Requests waiting in the server's queue on average (from its reported service times) that
/// show a level past its slots: at least this many, plus `QUEUED_SHARE` of the level (the
/// network's jitter adds a little apparent wait per request, which adds up at high levels).
const QUEUED_REQUESTS: f64 = 0.5;
const QUEUED_SHARE: f64 = 0.05;
/// How long a level is held after a failed probe, in mean latencies, within bounds; each
/// further failed probe doubles it (up to `HOLD_MAX`), a kept one resets it.
const HOLD_LATENCIES: f64 = 20.0;
const HOLD_MIN: Duration = Duration::from_secs(10);
const HOLD_MAX: Duration = Duration::from_secs(300);
/// A settled level that nothing below was measured against, and whose latency did not show
/// its requests waiting, is probed below after this many failed probes above in a row (its
/// hold doubled once): a server with as many slots as the start would pay for that probe
/// early, one with fewer is still found within a few holds.
const FAILED_PROBES_BEFORE_BELOW: u32 = 2;

/// A step after slow start from `level`: a quarter of it, at least one.
fn step(level: u32) -> u32 {
    (level / STEP_DIVISOR).max(1)
}

/// How much wider than the normal's a Student-t interval is at `degrees` of freedom, for
/// `NOISE_ERRORS` standard errors (Cornish–Fisher expansion): a standard deviation taken
/// over four requests is itself so uncertain that two of them are no 95 % bound.
fn small_sample_factor(degrees: f64) -> f64 {
    let z = NOISE_ERRORS;
    let df = degrees.max(1.0);
    let t = z
        + (z.powi(3) + z) / (4.0 * df)
        + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * df * df);
    t / z
}

/// The standard error of a measurement's throughput (items over latency: the latency's
/// relative error), widened for the few requests it was taken over.
fn widened_error(measured: Measured) -> f64 {
    measured.items_per_second
        * measured.relative_error
        * small_sample_factor(f64::from(measured.samples) - 1.0)
}

/// Two measurements of one level taken as one: throughput and latency weighted by the
/// requests each was taken over, the error of the pooled mean from both errors.
fn pooled(a: Measured, b: Measured) -> Measured {
    let (wa, wb) = (f64::from(a.samples), f64::from(b.samples));
    let total = (wa + wb).max(1.0);
    let mix = |x: f64, y: f64| (x * wa + y * wb) / total;
    let precision = |error: f64| 1.0 / error.max(1e-12).powi(2);
    Measured {
        level: a.level,
        items_per_second: mix(a.items_per_second, b.items_per_second),
        mean_latency_s: mix(a.mean_latency_s, b.mean_latency_s),
        seconds_per_item: mix(a.seconds_per_item, b.seconds_per_item),
        relative_error: (precision(a.relative_error) + precision(b.relative_error))
            .recip()
            .sqrt(),
        samples: a.samples + b.samples,
    }
}

/// Two levels' measurements set side by side.
#[derive(Debug, Clone, Copy)]
struct Verdict {
    /// Throughput gained per added request over what one request delivered at the lower level.
    gain: f64,
    /// The standard error of that gain, from the two measurements' noise.
    gain_error: f64,
    /// Whether the higher level's latency per item rose beyond the noise.
    latency_rose: bool,
}

impl Verdict {
    /// `small_step`: the levels differ by a step after slow start, not a doubling.
    fn of(low: Measured, high: Measured, small_step: bool) -> Self {
        let per_request_low = low.items_per_second / f64::from(low.level.max(1));
        let added = f64::from(high.level.saturating_sub(low.level).max(1));
        let scale = per_request_low * added;
        let gain = (high.items_per_second - low.items_per_second) / scale;
        // Throughput is items over latency: its relative error is the latency's, widened for
        // the few requests it was taken over.
        let gain_error = widened_error(high).hypot(widened_error(low)) / scale;
        // Latency that did not rise with concurrency is no sign of a queue, whatever the
        // noise in the throughput says (a hosted API answers as fast at any concurrency).
        let noise = NOISE_ERRORS * low.relative_error.hypot(high.relative_error);
        let ratio = high.seconds_per_item / low.seconds_per_item.max(1e-12);
        // Latency per item that grew at least halfway (geometrically) to in proportion with
        // the level is a queue's signature, noise or not: a server that queues serves the
        // added requests after the others.
        let halfway = (f64::from(high.level) / f64::from(low.level.max(1))).sqrt();
        let latency_rose = ratio > LATENCY_RISE + noise || (small_step && ratio >= halfway);
        Self {
            gain,
            gain_error,
            latency_rose,
        }
    }
}

/// One level's measured throughput.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub level: u32,
    /// Items per second by Little's law.
    pub items_per_second: f64,
    /// Mean latency of the measured requests.
    pub mean_latency_s: f64,
    /// Their latency per item.
    pub seconds_per_item: f64,
    /// The standard error of that mean over the mean: how far noise alone moves it.
    pub relative_error: f64,
    /// Requests it was taken over.
    pub samples: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Accumulator {
    samples: u32,
    in_flight: f64,
    items: f64,
    latency_s: f64,
    /// Sums of each request's latency per item and its square (for the noise).
    per_item: f64,
    per_item_squared: f64,
}

impl Accumulator {
    /// The level's figures over the requests so far, by Little's law, with this noise.
    fn measured(&self, level: u32, relative_error: f64) -> Measured {
        let samples = f64::from(self.samples);
        Measured {
            level,
            items_per_second: self.in_flight / samples * self.items / self.latency_s,
            mean_latency_s: self.latency_s / samples,
            seconds_per_item: self.latency_s / self.items,
            relative_error,
            samples: self.samples,
        }
    }
}

/// Every answer to a request sent at the current limit with at least `watch_floor` in flight
/// (whatever its size: the share of its time a request waits does not depend on it), for the
/// queue the server's reported service times show.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct QueueWatch {
    answers: u32,
    /// Of those, the answers that carried the server's service time.
    timed: u32,
    items: f64,
    latency_s: f64,
    service_s: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Up,
    Down,
}

/// The delay-based concurrency limit (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct DelayLimit {
    range: StartMinMax,
    /// The requests the server said it works on at once: up to that many in flight, none of
    /// ours waits in its queue, and latency over the first answer's is the server's own
    /// batching.
    server_slots: Option<u32>,
    /// The slots the server said before the run, which its gauges never take below.
    announced_slots: Option<u32>,
    /// The level believed best so far.
    settled: u32,
    /// The level being tried, when not `settled`.
    probe: Option<u32>,
    /// The latest measurement at `settled`.
    reference: Option<Measured>,
    slow_start: bool,
    next_direction: Direction,
    hold_until: Duration,
    /// Bumped at every change of the limit: samples carry the generation they were sent in.
    generation: u64,
    accumulator: Accumulator,
    queue_watch: QueueWatch,
    /// The generation the limit last changed in, and the requests in flight (itself included)
    /// a request sent since must have seen to count for the queue watch: the limit, or after
    /// a raise one more than the limit before (the requests the raise adds go out at once, and
    /// each one of them finds the server as full as the lower level left it, or fuller).
    watch_since: u64,
    watch_floor: u32,
    probes: u64,
    /// Failed probes in a row (the hold doubles with each).
    failed_probes: u32,
    /// Steps up kept in a row after slow start: each doubles the next.
    climb: u32,
    /// An unclear probe's measurement, judged again once the settled level is measured anew.
    pending: Option<Measured>,
    /// Squared relative spread of one request's latency per item, summed over measurements
    /// weighted by their degrees of freedom, and those degrees.
    dispersion: (f64, f64),
    /// Whether the probe under way is a jump to what a changed server serves.
    jumped: bool,
    /// The limit before the latest change, and whether that change raised it.
    previous_limit: u32,
    raised: bool,
    /// Whether a probe has failed yet: the best level lies between two measured ones.
    bracketed: bool,
    /// The measurement the settled level was last judged on (when it was settled or held).
    judged: Option<Measured>,
    /// Latency per item of the first request answered that was sent with no other of ours in
    /// flight: the server's unloaded pace, before any level is measured.
    first_alone: Option<f64>,
    /// Recent measurements' latency per item, for the baseline.
    baseline: VecDeque<(Duration, f64)>,
    /// The lowest level measured yet (`u32::MAX` before any).
    lowest_measured: u32,
    /// The least latency over the server's reported service time of any request: the
    /// network's and the HTTP layer's share, which no queue adds to.
    least_overhead: Option<f64>,
}

impl DelayLimit {
    pub fn new(range: StartMinMax) -> Self {
        Self {
            range,
            server_slots: None,
            announced_slots: None,
            settled: range.start,
            probe: None,
            reference: None,
            slow_start: true,
            // Slow start doubles from the start level; a server with fewer slots than the
            // start is found going down once a doubling gains nothing.
            next_direction: Direction::Up,
            hold_until: Duration::ZERO,
            generation: 0,
            accumulator: Accumulator::default(),
            queue_watch: QueueWatch::default(),
            watch_since: 0,
            watch_floor: range.start,
            probes: 0,
            failed_probes: 0,
            climb: 0,
            pending: None,
            dispersion: (0.0, 0.0),
            jumped: false,
            previous_limit: range.start,
            raised: false,
            bracketed: false,
            judged: None,
            first_alone: None,
            baseline: VecDeque::new(),
            lowest_measured: u32::MAX,
            least_overhead: None,
        }
    }

    /// A limit for a server that said it works on `slots` requests at once.
    pub fn with_server_slots(mut self, slots: Option<u32>) -> Self {
        self.server_slots = slots;
        self.announced_slots = slots;
        self
    }

    /// Whether the server said it serves `level` requests at once.
    fn within_server_slots(&self, level: u32) -> bool {
        self.server_slots.is_some_and(|slots| level <= slots)
    }

    /// The requests the server works on at once, as it said before the run or as its gauges
    /// showed when requests waited.
    pub fn server_slots(&self) -> Option<u32> {
        self.server_slots
    }

    /// The server's gauges show requests waiting for a slot while it works on `slots`: that
    /// is what it serves at once, and `share` of them our requests' share. A limit above the
    /// share drops to it at once and holds there (a probe above ends as a failed one, its
    /// hold doubling with each); slow start is over.
    pub fn on_server_full(&mut self, now: Duration, slots: u32, share: u32) {
        self.server_slots = Some(slots.max(self.announced_slots.unwrap_or(0)));
        let target = self.range.clamp(share.min(slots));
        if self.limit() <= target {
            return;
        }
        let probing_above = self.probe.is_some_and(|probe| probe > self.settled);
        tracing::debug!(
            level = self.limit(),
            to = target,
            "requests wait for a slot (the server's gauges, or our first chunks): limit to its slots"
        );
        let latency_s = self
            .reference
            .or(self.judged)
            .map_or(0.0, |measured| measured.mean_latency_s);
        self.slow_start = false;
        self.climb = 0;
        self.pending = None;
        self.jumped = false;
        if target != self.settled {
            self.settled = target;
            // Nothing is measured at the new level yet.
            self.reference = None;
        }
        self.next_direction = Direction::Up;
        self.back_to_settled(now, None, probing_above);
        // Held even before anything was measured (the gauges saw the queue, not a round).
        let backoff = self.hold_backoff();
        self.hold_until = now
            + Duration::from_secs_f64(latency_s * HOLD_LATENCIES * backoff)
                .clamp(HOLD_MIN.mul_f64(backoff).min(HOLD_MAX), HOLD_MAX);
    }

    /// The server's gauges show nothing waiting and `running` requests in its slots, every
    /// one of this level's among them: the level is within its slots. While slow start
    /// searches, the next doubling is tried at once instead of after a round measured at
    /// this level: the server took every request in, so what more of them cost is its
    /// batching, not a wait. (A server seen full before that now runs more than it did then
    /// has gained slots: the bound is dropped, to what it said before the run if it did.)
    pub fn on_server_took_all(&mut self, running: u32) {
        if self.server_slots.is_some_and(|slots| running > slots) {
            self.server_slots = self.announced_slots;
        }
        let level = self.limit();
        if !self.slow_start || self.bracketed || level >= self.range.max {
            return;
        }
        let mut target = self.range.clamp(level.saturating_mul(SLOW_START_FACTOR));
        if let Some(slots) = self.server_slots {
            if level >= slots {
                return;
            }
            target = target.min(slots);
        }
        tracing::debug!(
            from = level,
            to = target,
            running,
            "every request is served at once (the server's gauges, or our first chunks): slow start doubles"
        );
        self.settled = level;
        self.probe = Some(target);
        self.reference = None;
        self.pending = None;
        self.jumped = false;
        self.next_direction = Direction::Up;
        self.probes += 1;
        self.bump();
    }

    /// Continues from the level an earlier part of the run found (`run --resume`): it becomes
    /// the start level, within the job's (possibly edited) range. A level found `bracketed`
    /// (a probe had failed) is not doubled again: it is measured, then probed by steps, above
    /// first, as after slow start. One found while still doubling doubles on from there.
    /// Whatever the server has become since, the probes follow it as they follow a server
    /// that changes during a run. Only on a limit nothing has been measured with yet.
    pub fn resume_at(&mut self, settled: u32, bracketed: bool) {
        debug_assert!(self.probes == 0 && self.probe.is_none() && self.reference.is_none());
        let level = self.range.clamp(settled);
        self.settled = level;
        self.watch_floor = level;
        self.previous_limit = level;
        self.bracketed = bracketed;
        self.slow_start = !bracketed;
        self.next_direction = Direction::Up;
        self.bump();
    }

    /// Whether a probe has failed yet (the best level lies between two measured ones).
    pub fn bracketed(&self) -> bool {
        self.bracketed
    }

    /// The requests in flight this limit allows now.
    pub fn limit(&self) -> u32 {
        self.probe.unwrap_or(self.settled)
    }

    /// The level believed best (the limit between probes).
    pub fn settled(&self) -> u32 {
        self.settled
    }

    /// Requests the server serves at once, as measured (throughput × unloaded latency per
    /// item, Little's law); `None` before the first measurement.
    pub fn parallelism(&self) -> Option<f64> {
        let reference = self.reference?;
        Some((reference.items_per_second * self.baseline()?).max(1.0))
    }

    /// Whether the limit is still looking for the server's capacity: no probe has failed
    /// yet, so the level has not been bracketed, and the maximum is not reached.
    pub fn searching(&self) -> bool {
        !self.bracketed && self.limit() < self.range.max
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the latest change raised the limit. A request sent at a raised limit with the
    /// limit's count in flight sees the load of that level at once, whatever generation the
    /// others in flight were sent in: the server holds as many requests as it will at that
    /// level. (After a cut, a request sent behind older ones waits for more than its level's
    /// share, so only requests sent behind their own generation measure a lower level.)
    pub fn raised(&self) -> bool {
        self.raised
    }

    /// Probes started so far.
    #[cfg(test)]
    pub fn probes(&self) -> u64 {
        self.probes
    }

    /// One completed request: sent in `generation` with `in_flight` requests in flight
    /// (itself included), `work` in items, ending after `latency`, of which the server says
    /// it worked on it for `service` (when it says).
    /// Only requests sent at the current limit while it held the dispatcher back count.
    pub fn on_completed(
        &mut self,
        now: Duration,
        generation: u64,
        in_flight: u32,
        work: f64,
        latency: Duration,
        service: Option<Duration>,
    ) {
        if work.is_nan() || work <= 0.0 {
            return;
        }
        if in_flight == 1 && self.first_alone.is_none() {
            let per_item = latency.as_secs_f64().max(1e-6) / work;
            // One answer is no baseline (an LLM's output lengths vary): it only sets the
            // first probe; the baseline is taken over measurements.
            self.first_alone = Some(per_item);
        }
        if self.watch_queue(now, generation, in_flight, work, latency, service) {
            return;
        }
        if generation != self.generation || in_flight < self.limit() {
            return;
        }
        let level = self.limit();
        let within_server_slots = self.within_server_slots(level);
        let sample = &mut self.accumulator;
        sample.samples += 1;
        sample.in_flight += f64::from(in_flight);
        sample.items += work;
        sample.latency_s += latency.as_secs_f64().max(1e-6);
        let per_item = latency.as_secs_f64().max(1e-6) / work;
        sample.per_item += per_item;
        sample.per_item_squared += per_item * per_item;
        // Slow start judges after one round: a doubling is either clearly worth it or not.
        let per_level = if self.slow_start {
            1
        } else {
            SAMPLES_PER_LEVEL
        };
        let needed = MIN_SAMPLES.max(per_level * level);
        // A probe is judged from its fourth answer on when its verdict is already clear
        // (the Student-widened noise of a few answers keeps that for plain cases), so a
        // level that plainly queues (or plainly gains) costs a few answers, not a round or
        // two: a round at 32 in flight on a 16-slot server takes twice the latency of one
        // at 16, and only the answers sent with the level's count in flight count, so a
        // round measures few.
        let first_look = if self.probe.is_some() {
            MIN_SAMPLES
        } else {
            needed
        };
        // Before the start level is measured: an answer sent with the start level in flight
        // that took `EARLY_QUEUE_INFLATION` times the first answer's time per item waited
        // behind our others, at a server that serves fewer at once. A whole measurement would
        // queue a round more at that level (on one slot, each of them behind all the rest), so
        // Vegas's estimate is taken from the answers so far. (A server that reports its
        // service time shows its queue from the fourth answer on, `watch_queue`.)
        let starting =
            self.reference.is_none() && self.probe.is_none() && self.probes == 0 && !self.bracketed;
        if starting
            && service.is_none()
            && !within_server_slots
            && sample.samples < first_look
            && self
                .first_alone
                .is_some_and(|alone| per_item >= EARLY_QUEUE_INFLATION * alone)
        {
            let measured = sample.measured(level, 0.0);
            tracing::debug!(
                inflation = per_item / self.first_alone.unwrap_or(per_item),
                "an answer at the start level waited behind the others"
            );
            self.remember(now, measured);
            self.first_probe(measured);
            return;
        }
        if sample.samples < first_look {
            return;
        }
        let samples = f64::from(sample.samples);
        let mean = sample.per_item / samples;
        let variance = (sample.per_item_squared / samples - mean * mean).max(0.0);
        // The spread of one request's latency per item is the workload's (its output
        // lengths), much the same at every level: a few requests' own spread can come out
        // far too small, so it is taken at least as wide as that of all measured so far.
        let own = variance.sqrt() / mean.max(1e-12);
        let (pooled_squares, pooled_degrees) = self.dispersion;
        let spread = if pooled_degrees >= POOLED_DEGREES {
            own.max((pooled_squares / pooled_degrees).sqrt())
        } else {
            own
        };
        let variance = (spread * mean).powi(2);
        let measured = sample.measured(
            level,
            (variance / (samples - 1.0).max(1.0)).sqrt() / mean.max(1e-12),
        );
        // A probe whose verdict lies within the noise of the threshold is measured longer
        // (up to `EXTEND_SAMPLES` × the minimum) instead of decided on one unlucky round.
        let at_most = needed.saturating_mul(EXTEND_SAMPLES);
        if self.sample_count() < at_most && self.undecided(measured) {
            return;
        }
        if self.sample_count() < needed && self.probe.is_some() && !self.clear(measured) {
            return;
        }
        self.dispersion.0 += own * own * (samples - 1.0);
        self.dispersion.1 += samples - 1.0;
        self.remember(now, measured);
        self.decide(now, measured);
    }

    /// A completed request that does not measure the level's throughput — a retry of fewer
    /// items than the current size, or one sent behind requests of an earlier level — still
    /// shows the server's queue when the server reports its service time.
    pub fn on_completed_unmeasured(
        &mut self,
        now: Duration,
        generation: u64,
        in_flight: u32,
        work: f64,
        latency: Duration,
        service: Option<Duration>,
    ) {
        if work.is_nan() || work <= 0.0 {
            return;
        }
        self.watch_queue(now, generation, in_flight, work, latency, service);
    }

    /// Counts an answer for the queue the server's service times show, and caps the limit
    /// when they show it past the slots (then returns true).
    fn watch_queue(
        &mut self,
        now: Duration,
        generation: u64,
        in_flight: u32,
        work: f64,
        latency: Duration,
        service: Option<Duration>,
    ) -> bool {
        // A service time longer than the request took is a clock the server got wrong (or a
        // proxy's): it says nothing of the queue.
        let service = service.filter(|service| *service <= latency);
        if let Some(service) = service {
            let overhead = (latency - service).as_secs_f64();
            self.least_overhead = Some(
                self.least_overhead
                    .map_or(overhead, |least| least.min(overhead)),
            );
        }
        if generation < self.watch_since || in_flight < self.watch_floor {
            return false;
        }
        // A request sent while fewer than the limit were in flight (just after a raise) waited
        // no longer than the level makes a request wait: it can only hide a queue, never show
        // one that is not there.
        let watch = &mut self.queue_watch;
        watch.answers += 1;
        watch.items += work;
        watch.latency_s += latency.as_secs_f64();
        if let Some(service) = service {
            watch.timed += 1;
            watch.service_s += service.as_secs_f64();
        }
        match self.past_the_slots() {
            Some((served, queued, measured)) => {
                self.cap_at_served(now, measured, served, queued);
                true
            }
            None => false,
        }
    }

    fn sample_count(&self) -> u32 {
        self.accumulator.samples
    }

    /// Whether a probe's measurement cannot yet say on which side of the threshold its
    /// gain lies: the gain is within `NOISE_ERRORS` standard errors of `GAIN_TO_KEEP`, and
    /// latency rose (a level whose latency did not rise is kept whatever its throughput).
    fn undecided(&self, measured: Measured) -> bool {
        let (Some(probe), Some(reference)) = (self.probe, self.reference) else {
            return false;
        };
        // Only a probe above is measured longer: below, every extra request costs throughput,
        // and an unclear probe below returns to the settled level anyway.
        if probe <= self.settled {
            return false;
        }
        let verdict = Verdict::of(reference, measured, !self.slow_start);
        // One the server served at once and that delivered more is kept (`decide`): measuring
        // it longer only delays the next doubling.
        if self.kept_as_served_at_once(verdict)
            || self.kept_in_slow_start_as_served_at_once(verdict)
        {
            return false;
        }
        // More requests at the probe only help when its own noise is the larger part; when
        // the settled level's is, that level is measured again instead (see `decide`).
        verdict.latency_rose
            && (verdict.gain - GAIN_TO_KEEP).abs() < NOISE_ERRORS * verdict.gain_error
            && widened_error(measured) >= widened_error(reference)
    }

    /// Whether a probe's verdict is clear before its full measurement: the gain is more than
    /// `NOISE_ERRORS` standard errors from the threshold and latency clearly rose or clearly
    /// did not.
    fn clear(&self, measured: Measured) -> bool {
        let (Some(probe), Some(reference)) = (self.probe, self.reference) else {
            return true;
        };
        let (low, high) = if probe > self.settled {
            (reference, measured)
        } else {
            (measured, reference)
        };
        let verdict = Verdict::of(low, high, !self.slow_start);
        if probe > self.settled && self.kept_in_slow_start_as_served_at_once(verdict) {
            return true;
        }
        verdict.latency_rose
            && (verdict.gain - GAIN_TO_KEEP).abs() >= NOISE_ERRORS * verdict.gain_error
    }

    /// Whether a probe above is kept because the server served its requests at once (its
    /// answers all carried the server's time and `watch_queue` saw no queue) and it delivered
    /// more by `SERVED_AT_ONCE_ERRORS` standard errors.
    fn kept_as_served_at_once(&self, verdict: Verdict) -> bool {
        self.queued().is_some() && verdict.gain >= SERVED_AT_ONCE_ERRORS * verdict.gain_error
    }

    /// Whether a probe above during slow start is kept from its fourth answer because the
    /// server served it at once (`watch_queue` saw no queue in answers that all carried its
    /// time), unless it clearly delivered less. More in flight than the server serves at once
    /// would have queued; below that, what more requests cost is the server's batching, which
    /// four answers' throughput cannot weigh (a gain within their noise ended slow start on
    /// a wrong draw), and the next doubling's answers show a queue as soon as it comes.
    fn kept_in_slow_start_as_served_at_once(&self, verdict: Verdict) -> bool {
        self.slow_start
            && self.queued().is_some()
            && verdict.gain + NOISE_ERRORS * verdict.gain_error >= 0.0
    }

    /// The lowest latency per item measured lately: the server's unloaded pace.
    pub fn baseline(&self) -> Option<f64> {
        self.baseline
            .iter()
            .map(|(_, seconds_per_item)| *seconds_per_item)
            .min_by(f64::total_cmp)
    }

    fn remember(&mut self, now: Duration, measured: Measured) {
        while self
            .baseline
            .front()
            .is_some_and(|(at, _)| now.saturating_sub(*at) > BASELINE_WINDOW)
            || self.baseline.len() >= BASELINE_MEASUREMENTS
        {
            self.baseline.pop_front();
        }
        self.baseline.push_back((now, measured.seconds_per_item));
        self.lowest_measured = self.lowest_measured.min(measured.level);
    }

    /// Whether no level below `level` has been measured: whether it is past the server's
    /// knee is unknown from below. Not for a server that reports its service time: its
    /// answers show the queue at the level itself.
    fn nothing_below(&self, level: u32) -> bool {
        level > self.range.min && self.lowest_measured >= level && self.least_overhead.is_none()
    }

    /// Whether the settled level, nothing below it measured, is probed below now: when its
    /// latency per item was 1.25 × the first request's or more (its requests waited; a server
    /// with as many slots serves them as fast), or there was no first request to compare
    /// with, or `FAILED_PROBES_BEFORE_BELOW` probes above it failed in a row.
    fn looks_below_at_once(&self, settled: Measured) -> bool {
        self.nothing_below(settled.level)
            && (self.failed_probes >= FAILED_PROBES_BEFORE_BELOW
                || self
                    .first_alone
                    .is_none_or(|alone| settled.seconds_per_item >= QUEUE_INFLATION * alone))
    }

    /// Latency per item over the baseline: 1 unloaded, more when requests wait or slow
    /// each other.
    fn inflation(&self, measured: Measured) -> f64 {
        self.baseline().map_or(1.0, |baseline| {
            measured.seconds_per_item / baseline.max(1e-9)
        })
    }

    /// Requests waiting in the server's queue on average at the current limit, from at least
    /// `MIN_SAMPLES` answers that all carried the server's service time: by Little's law the
    /// level times the share of the requests' time spent waiting (latency less service less
    /// the network's share). `None` when the server did not say.
    fn queued(&self) -> Option<f64> {
        let watch = self.queue_watch;
        if watch.answers < MIN_SAMPLES || watch.timed < watch.answers {
            return None;
        }
        let overhead = self.least_overhead.unwrap_or(0.0) * f64::from(watch.answers);
        let waited = (watch.latency_s - watch.service_s - overhead).max(0.0);
        Some(f64::from(self.limit()) * waited / watch.latency_s.max(1e-9))
    }

    /// When the server's own service times show the current limit past its slots (at least
    /// `QUEUED_REQUESTS` queued, and `QUEUED_SHARE` of the level), the requests it served at
    /// a time, those queued, and what was seen at this level; `None` when they show no queue,
    /// or the server did not say, or the limit is 1.
    fn past_the_slots(&self) -> Option<(u32, f64, Measured)> {
        let queued = self.queued()?;
        let level = self.limit();
        let threshold = QUEUED_REQUESTS + QUEUED_SHARE * f64::from(level);
        if level <= 1 || queued < threshold {
            return None;
        }
        let served = (f64::from(level) - queued)
            .round()
            .clamp(1.0, f64::from(level - 1));
        let watch = self.queue_watch;
        let answers = f64::from(watch.answers);
        let measured = Measured {
            level,
            items_per_second: f64::from(level) * watch.items / watch.latency_s.max(1e-9),
            mean_latency_s: watch.latency_s / answers,
            seconds_per_item: watch.latency_s / watch.items.max(1e-9),
            relative_error: 0.0,
            samples: watch.answers,
        };
        Some((served as u32, queued, measured))
    }

    /// A level past the server's slots, seen in its own service times: the limit drops to what
    /// the server served at a time and holds there; slow start is over. A probe above that
    /// found the queue steps back to the settled level as any failed probe does.
    fn cap_at_served(&mut self, now: Duration, measured: Measured, served: u32, queued: f64) {
        let target = self.range.clamp(served);
        tracing::debug!(
            level = measured.level,
            queued,
            to = target,
            "the server queued our requests: limit to what it served at a time"
        );
        self.slow_start = false;
        self.climb = 0;
        self.pending = None;
        self.jumped = false;
        match (self.probe, self.reference) {
            (Some(probe), Some(reference)) if probe > self.settled && target >= self.settled => {
                self.step_back(now, reference, measured);
            }
            _ => {
                if target != self.settled {
                    self.failed_probes = 0;
                }
                self.settled = target;
                // Nothing is measured at the new level yet.
                self.reference = None;
                self.next_direction = Direction::Up;
                self.back_to_settled(now, Some(measured), true);
            }
        }
    }

    fn decide(&mut self, now: Duration, measured: Measured) {
        if self.reference.is_none() && self.probe.is_none() && self.probes == 0 && !self.bracketed {
            self.first_probe(measured);
            return;
        }
        let Some(probe) = self.probe else {
            // The server changed (restarted with fewer or more slots, other clients came or
            // went) when the settled level's latency per item moved clearly since it was last
            // measured: the hold ends, and the probe goes the way the latency points.
            if let Some(previous) = self
                .judged
                .filter(|previous| previous.level == measured.level)
            {
                let noise = NOISE_ERRORS * previous.relative_error.hypot(measured.relative_error);
                let ratio = measured.seconds_per_item / previous.seconds_per_item.max(1e-12);
                if ratio > SERVER_CHANGE + noise || ratio < 1.0 / (SERVER_CHANGE + noise) {
                    tracing::debug!(
                        ratio,
                        "latency per item moved at the settled level: probing now"
                    );
                    self.hold_until = now;
                    self.failed_probes = 0;
                    self.next_direction = if ratio > 1.0 {
                        Direction::Down
                    } else {
                        Direction::Up
                    };
                    self.judged = Some(measured);
                    // A probe measured before the change says nothing of the server now.
                    self.pending = None;
                    // By Vegas's estimate the server now serves `level ÷ ratio` of what it
                    // served at this level: slower, that level is probed at once, not a step
                    // away. Faster, slow start resumes, its first step at most a doubling:
                    // one measurement's ratio can be an answer-length swing, and a level
                    // several times the server's would queue every request behind others.
                    let estimate = f64::from(measured.level) / ratio;
                    let target = if ratio > 1.0 {
                        estimate.round()
                    } else {
                        self.slow_start = true;
                        estimate
                            .ceil()
                            .min(f64::from(measured.level.saturating_mul(SLOW_START_FACTOR)))
                    };
                    self.reference = Some(measured);
                    let target = self.range.clamp(target.max(1.0) as u32);
                    if target != measured.level {
                        self.jumped = true;
                        self.probe = Some(target);
                        self.probes += 1;
                        self.bump();
                        return;
                    }
                }
            }
            if let Some(pending) = self.pending.take() {
                self.judge_pending(now, pending, measured);
                return;
            }
            self.reference = Some(measured);
            if now >= self.hold_until {
                self.start_probe(false);
            } else {
                self.restart_measurement();
            }
            return;
        };
        let Some(reference) = self.reference else {
            self.settle(probe, measured);
            self.start_probe(false);
            return;
        };
        let (low, high) = if probe > self.settled {
            (reference, measured)
        } else {
            (measured, reference)
        };
        let verdict = Verdict::of(low, high, !self.slow_start);
        let Verdict {
            gain,
            gain_error,
            latency_rose,
            ..
        } = verdict;
        let jumped = std::mem::take(&mut self.jumped);
        self.jumped = jumped && probe < self.settled;
        tracing::debug!(
            from = self.settled,
            to = probe,
            gain,
            gain_error,
            latency_rose,
            low_items_per_s = low.items_per_second,
            high_items_per_s = high.items_per_second,
            "concurrency probe measured"
        );
        // The settled level stays unless the probe beats it. A probe above is kept when it
        // gains enough, and more than `KEEP_ERRORS` standard errors (or its latency did not
        // rise and it delivers no less, or the server said it served it without a queue and
        // it delivers more); a probe below is kept when the settled level did not
        // gain enough over it — during slow start only when it clearly did not, unless Vegas
        // says the settled level queues (its latency per item over the first request's, sent
        // alone): one noisy round does not end slow start.
        let higher_pays = (!latency_rose && gain >= 0.0)
            || (probe > self.settled
                && (self.kept_as_served_at_once(verdict)
                    || self.kept_in_slow_start_as_served_at_once(verdict)))
            || (gain >= GAIN_TO_KEEP && (probe < self.settled || gain > KEEP_ERRORS * gain_error))
            || (probe < self.settled
                && self.slow_start
                && !self.queued_alone(reference)
                && gain + NOISE_ERRORS * gain_error >= GAIN_TO_KEEP);
        if probe > self.settled {
            if higher_pays {
                // Each step kept in a row after slow start doubles the next (a cut that the
                // evidence now says was wrong is undone in a few steps, not one at a time).
                if !self.slow_start {
                    self.climb = self.climb.saturating_add(1);
                }
                self.settle(probe, measured);
                self.next_direction = Direction::Up;
                self.start_probe(false);
            } else if gain + NOISE_ERRORS * gain_error > GAIN_TO_KEEP {
                // Not clearly worse: the settled level's figure may be the unlucky one. It is
                // measured again, and this probe's figure judged once more against it.
                tracing::debug!(
                    probe,
                    "concurrency probe unclear: measuring the settled level again"
                );
                self.pending = Some(measured);
                self.probe = None;
                self.hold_until = now;
                self.bump();
            } else {
                self.step_back(now, reference, measured);
            }
        } else if !higher_pays {
            // The lower level delivers as much: keep it and look lower still (after a jump
            // to what a changed server serves, the jump is the estimate: it is held) — unless
            // its requests plainly did not wait: fewer in flight cannot deliver more there,
            // and a probe below would leave a slot idle for a round. It is held, and the next
            // probe goes up.
            self.slow_start = false;
            self.climb = 0;
            self.settle(probe, measured);
            let unqueued = self.served_without_waiting(measured);
            self.next_direction = if unqueued {
                Direction::Up
            } else {
                Direction::Down
            };
            if std::mem::take(&mut self.jumped) || unqueued {
                self.back_to_settled(now, Some(measured), false);
            } else {
                self.start_probe(true);
            }
        } else if self.slow_start && self.queued_half(reference, measured).is_none() {
            // The start level is not above the knee: slow start goes on upward at once,
            // measured against the start level's figures.
            self.next_direction = Direction::Up;
            self.probe = None;
            self.start_probe(false);
        } else if self.slow_start {
            // By Vegas's estimate half the start level's requests or more were queued, and
            // doubling it would queue the rest. The server serves about `level ÷ inflation`
            // at once: slow start ends at the lower level, and that estimate is probed.
            let inflation = self.queued_half(reference, measured).unwrap_or(1.0);
            let served = (f64::from(reference.level) / inflation).round() as u32;
            self.slow_start = false;
            self.settle(probe, measured);
            let target = self.range.clamp(served.min(reference.level - 1));
            self.next_direction = if target < probe {
                Direction::Down
            } else {
                Direction::Up
            };
            if target != probe {
                self.probe = Some(target);
                self.probes += 1;
                self.bump();
            } else {
                self.start_probe(false);
            }
        } else {
            // The level below delivers less: the settled level is not past the knee, so the
            // next probe goes up, after a hold that this probe does not lengthen.
            self.next_direction = Direction::Up;
            self.back_to_settled(now, Some(reference), false);
        }
    }

    /// Whether a measurement's latency per item is clearly above the first request's, sent
    /// alone to an idle server.
    fn queued_alone(&self, measured: Measured) -> bool {
        self.first_alone.is_some_and(|alone| {
            measured.seconds_per_item
                >= (QUEUE_INFLATION
                    + NOISE_ERRORS
                        * measured.relative_error
                        * small_sample_factor(f64::from(measured.samples) - 1.0))
                    * alone
        })
    }

    /// Whether a level's requests plainly did not wait: their latency per item over the first
    /// request's, sent alone, beyond the noise short of halfway (geometrically) to what the
    /// next level below would show as a queue. Were the server's slots that level or fewer,
    /// every request at this level would take `level ÷ below` times its unloaded time or
    /// more.
    fn served_without_waiting(&self, measured: Measured) -> bool {
        let below = measured.level.saturating_sub(step(measured.level)).max(1);
        measured.level > below
            && self.first_alone.is_some_and(|alone| {
                measured.seconds_per_item / alone.max(1e-12)
                    * (1.0 + NOISE_ERRORS * measured.relative_error)
                    < (f64::from(measured.level) / f64::from(below)).sqrt()
            })
    }

    /// The start level's latency per item over the least unloaded figure known (the level
    /// below, or the first request sent alone), when it shows half its requests or more
    /// queued (`QUEUED_HALF`, beyond the noise).
    fn queued_half(&self, reference: Measured, lower: Measured) -> Option<f64> {
        let unloaded = self.first_alone.map_or(lower.seconds_per_item, |alone| {
            alone.min(lower.seconds_per_item)
        });
        let inflation = reference.seconds_per_item / unloaded.max(1e-12);
        (inflation >= QUEUED_HALF + NOISE_ERRORS * reference.relative_error).then_some(inflation)
    }

    /// A probe above the settled level did not pay: back to the settled level, and slow
    /// start is over.
    fn step_back(&mut self, now: Duration, reference: Measured, measured: Measured) {
        self.slow_start = false;
        self.climb = 0;
        self.next_direction = Direction::Down;
        // A settled level that shows a queue itself is probed below at once; so is one that
        // nothing below was measured against (the start level, when its first doubling
        // gained nothing) when `looks_below_at_once` says so.
        let below = self.shows_queue(reference) || self.looks_below_at_once(reference);
        let hold = (!below).then_some(measured);
        self.back_to_settled(now, hold, true);
    }

    /// The settled level measured again after an unclear probe above it: the probe's figure
    /// is judged against this measurement and the one before the probe taken together, and
    /// kept or stepped back from for good.
    fn judge_pending(&mut self, now: Duration, pending: Measured, measured: Measured) {
        // The settled level has now been measured twice: the probe is judged against both
        // measurements together (one unlucky round of either no longer decides).
        let settled = match self.reference {
            Some(earlier) if earlier.level == measured.level => pooled(earlier, measured),
            _ => measured,
        };
        let verdict = Verdict::of(settled, pending, !self.slow_start);
        tracing::debug!(
            gain = verdict.gain,
            gain_error = verdict.gain_error,
            "unclear concurrency probe judged again"
        );
        self.reference = Some(measured);
        if (!verdict.latency_rose && verdict.gain >= 0.0) || verdict.gain >= GAIN_TO_KEEP {
            if !self.slow_start {
                self.climb = self.climb.saturating_add(1);
            }
            self.settle(pending.level, pending);
            self.next_direction = Direction::Up;
            self.start_probe(false);
        } else {
            self.step_back(now, measured, pending);
        }
    }

    fn settle(&mut self, level: u32, measured: Measured) {
        if level != self.settled {
            self.failed_probes = 0;
        }
        self.settled = level;
        self.probe = None;
        self.reference = Some(measured);
        self.judged = Some(measured);
    }

    /// What the hold is multiplied by: doubled by each failed probe in a row (up to 16).
    fn hold_backoff(&self) -> f64 {
        f64::from(1u32 << self.failed_probes.min(5).saturating_sub(1))
    }

    /// Returns to the settled level; holds there for a while when `hold_on` is given (a
    /// measurement whose latency sets the hold), else probes again after one measurement.
    fn back_to_settled(&mut self, now: Duration, hold_on: Option<Measured>, failed: bool) {
        self.probe = None;
        self.bracketed = true;
        self.judged = self.reference;
        if failed {
            self.failed_probes = self.failed_probes.saturating_add(1);
        }
        let backoff = self.hold_backoff();
        self.hold_until = match hold_on {
            Some(measured) => {
                now + Duration::from_secs_f64(measured.mean_latency_s * HOLD_LATENCIES * backoff)
                    .clamp(HOLD_MIN, HOLD_MAX)
            }
            None => now,
        };
        self.bump();
    }

    /// The first measurement, at the start level, set against the first request's unloaded
    /// latency: requests that took `inflation` times longer per item waited behind each other,
    /// so the server serves about `level / inflation` at once, and that level is tried next
    /// (Vegas's estimate of the queue).
    fn first_probe(&mut self, measured: Measured) {
        self.reference = Some(measured);
        if self.queued().is_some() || self.within_server_slots(measured.level) {
            // The server reported its service times and they showed no queue at the start
            // level (`watch_queue` caps a level that shows one), or it said it has as many
            // slots: it has not fewer slots than that, and its latency over the first
            // answer's is its own batching, not a queue. Slow start goes up at once.
            self.next_direction = Direction::Up;
            self.start_probe(false);
            return;
        }
        let inflation = self.first_alone.map_or(f64::NAN, |alone| {
            measured.seconds_per_item / alone.max(1e-12)
        });
        if inflation >= QUEUE_INFLATION + NOISE_ERRORS * measured.relative_error {
            // Rounded, not rounded up: on two slots the start of 4 takes 1.7–1.9 times the
            // first request's time per item, and 3 (rounded up) is a level that still queues,
            // which the throughput alone rarely tells from the start's.
            let served = (f64::from(measured.level) / inflation).round() as u32;
            let target = self
                .range
                .clamp(served.min(measured.level.saturating_sub(1)));
            if target < measured.level {
                self.probe = Some(target);
                self.probes += 1;
                self.next_direction = Direction::Down;
                tracing::debug!(
                    from = measured.level,
                    to = target,
                    inflation,
                    "concurrency probe"
                );
                self.bump();
                return;
            }
        }
        // Otherwise slow start goes on upward. A server with fewer slots than the start that
        // the first request did not show gains nothing from the doubling, whose latency
        // doubles with it, and the level is then probed below. Trying half the start level
        // first instead cost every server with more slots a round at half the start and a
        // measurement as long as the start's (the half level's gain over the start is as
        // noisy as any); half is tried first only when the start level is the most
        // allowed.
        self.next_direction = if self.settled < self.range.max {
            Direction::Up
        } else {
            Direction::Down
        };
        self.start_probe(false);
    }

    /// Whether a measurement's latency per item is clearly above the unloaded pace.
    fn shows_queue(&self, measured: Measured) -> bool {
        self.inflation(measured) >= QUEUE_INFLATION + NOISE_ERRORS * measured.relative_error
    }

    /// Tries another level: `after_a_kept_step_down` continues downward.
    fn start_probe(&mut self, after_a_kept_step_down: bool) {
        let level = self.settled;
        let (up, down) = if self.slow_start {
            (level.saturating_mul(SLOW_START_FACTOR), level / 2)
        } else {
            let step = step(level);
            let up = step
                .saturating_mul(1 << self.climb.saturating_sub(1).min(8))
                .min(level);
            (level.saturating_add(up), level.saturating_sub(step))
        };
        let can_go_up = level < self.range.max;
        // Below the settled level only when its latency shows a queue (or once, at the
        // start): a server that answers as fast at any concurrency is never probed down.
        let queued = self
            .reference
            .is_some_and(|reference| self.shows_queue(reference));
        let can_go_down = level > self.range.min
            && (after_a_kept_step_down
                || queued
                || self
                    .reference
                    .is_some_and(|reference| self.looks_below_at_once(reference))
                || (self.slow_start && self.probes == 0));
        let target = match self.next_direction {
            Direction::Up if can_go_up => Some(up),
            Direction::Down if can_go_down => Some(down),
            Direction::Up if can_go_down && !self.slow_start => Some(down),
            Direction::Down if can_go_up => Some(up),
            _ => None,
        };
        match target.map(|target| self.range.clamp(target)) {
            Some(target) if target != level => {
                self.probe = Some(target);
                self.probes += 1;
                tracing::debug!(from = level, to = target, "concurrency probe");
            }
            _ => self.probe = None,
        }
        self.bump();
    }

    /// Requests changed size: what was measured at the current level mixed two sizes, so
    /// the level is measured again with requests of the new size only.
    pub fn on_size_change(&mut self) {
        self.bump();
    }

    fn restart_measurement(&mut self) {
        self.accumulator = Accumulator::default();
    }

    fn bump(&mut self) {
        self.raised = self.limit() > self.previous_limit;
        self.generation += 1;
        if self.limit() != self.previous_limit {
            self.queue_watch = QueueWatch::default();
            self.watch_since = self.generation;
            self.watch_floor = if self.raised {
                self.previous_limit + 1
            } else {
                self.limit()
            };
        }
        self.previous_limit = self.limit();
        self.restart_measurement();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server with `slots` slots, each request of 10 items taking `service` seconds, slowed
    /// by `slowdown` per other request served at once; more requests wait in its queue.
    fn latency(in_flight: u32, slots: u32, service: f64, slowdown: f64) -> Duration {
        let busy = in_flight.min(slots);
        let served = service * (1.0 + slowdown * f64::from(busy - 1));
        // With `in_flight` requests and `slots` served at once, a request waits for the
        // ones ahead of it: latency grows in proportion past the slots.
        let rounds = f64::from(in_flight) / f64::from(busy);
        Duration::from_secs_f64(served * rounds)
    }

    fn settle_on(slots: u32, slowdown: f64, range: StartMinMax) -> DelayLimit {
        let mut limit = DelayLimit::new(range);
        let mut now = Duration::ZERO;
        for _ in 0..4000 {
            let level = limit.limit();
            let latency = latency(level, slots, 2.0, slowdown);
            now += latency / level;
            limit.on_completed(now, limit.generation(), level, 10.0, latency, None);
        }
        limit
    }

    #[test]
    fn finds_the_slots_of_a_queueing_server() {
        for slots in [1, 2, 4, 8] {
            let limit = settle_on(slots, 0.0, StartMinMax::new(4, 1, 64));
            assert!(
                (slots..=slots + slots / 4 + 1).contains(&limit.settled()),
                "{slots} slots: settled at {}",
                limit.settled()
            );
        }
    }

    #[test]
    fn climbs_while_continuous_batching_still_gains() {
        // 16 slots, 8 % slower per concurrent request: 16 in flight is 1.7 × the throughput
        // of 8, so the limit reaches the slots.
        let limit = settle_on(16, 0.08, StartMinMax::new(4, 1, 64));
        assert!(
            (14..=18).contains(&limit.settled()),
            "settled at {}",
            limit.settled()
        );
    }

    #[test]
    fn a_server_without_queue_is_driven_to_the_maximum() {
        let limit = settle_on(1000, 0.0, StartMinMax::new(4, 1, 64));
        assert_eq!(limit.settled(), 64);
    }

    /// A server like `latency`'s that reports its service time (llama.cpp's `timings`): the
    /// limit at each of `requests` completions, and the limit after them.
    fn run_timed(
        slots: u32,
        slowdown: f64,
        range: StartMinMax,
        requests: usize,
    ) -> (Vec<u32>, DelayLimit) {
        let mut limit = DelayLimit::new(range);
        let mut now = Duration::ZERO;
        let mut levels = Vec::new();
        // The run's first request finds the server idle: no wait but the network's (none
        // here).
        let alone = Duration::from_secs(2);
        limit.on_completed(now, limit.generation(), 1, 10.0, alone, Some(alone));
        for _ in 0..requests {
            let level = limit.limit();
            levels.push(level);
            let latency = latency(level, slots, 2.0, slowdown);
            let busy = level.min(slots);
            let service = Duration::from_secs_f64(2.0 * (1.0 + slowdown * f64::from(busy - 1)));
            now += latency / level;
            limit.on_completed(now, limit.generation(), level, 10.0, latency, Some(service));
        }
        (levels, limit)
    }

    #[test]
    fn a_server_that_reports_its_service_time_is_held_at_its_slots_from_the_first_round() {
        for slots in [1, 2, 3] {
            let (levels, limit) = run_timed(slots, 0.0, StartMinMax::new(4, 1, 64), 4000);
            // The first four answers at 4 in flight show the queue: the next request is
            // sent at the slots.
            assert_eq!(levels[4], slots, "{slots} slots: {:?}", &levels[..12]);
            assert_eq!(limit.settled(), slots, "{slots} slots");
            // Later probes above, one request over the slots, cost four answers each and
            // come ever more seldom (the hold doubles with each failed probe, up to five
            // minutes): under 4 % of the answers.
            let over = levels[4..].iter().filter(|level| **level > slots).count();
            assert!(
                levels[4..].iter().all(|level| *level <= slots + 1),
                "{slots} slots"
            );
            assert!(
                over * 25 < levels.len(),
                "{slots} slots: {over} of 4000 answers over the slots"
            );
        }
    }

    #[test]
    fn answers_that_measure_no_throughput_still_show_the_queue() {
        // Retries of one item, at 4 in flight on two slots: each waited as long as it was
        // served. They say nothing of the level's throughput, but all of its queue.
        let mut limit = DelayLimit::new(StartMinMax::new(4, 1, 64));
        let mut now = Duration::ZERO;
        let alone = Duration::from_secs(2);
        limit.on_completed_unmeasured(now, limit.generation(), 1, 1.0, alone, Some(alone));
        for _ in 0..4 {
            now += Duration::from_secs(1);
            let (latency, service) = (Duration::from_secs(4), Some(Duration::from_secs(2)));
            limit.on_completed_unmeasured(now, limit.generation(), 4, 1.0, latency, service);
        }
        assert_eq!(limit.limit(), 2);
        // Without the server's times they show nothing.
        let mut blind = DelayLimit::new(StartMinMax::new(4, 1, 64));
        for _ in 0..8 {
            let latency = Duration::from_secs(4);
            blind.on_completed_unmeasured(now, blind.generation(), 4, 1.0, latency, None);
        }
        assert_eq!(blind.limit(), 4);
    }

    #[test]
    fn service_times_without_a_queue_send_slow_start_up_at_once() {
        let (levels, limit) = run_timed(8, 0.0, StartMinMax::new(4, 1, 64), 4000);
        assert_eq!(levels[4], 8, "{:?}", &levels[..12]);
        assert_eq!(
            levels.iter().min(),
            Some(&4),
            "never probed below the start"
        );
        assert_eq!(limit.settled(), 8);
    }

    #[test]
    fn a_level_the_server_served_at_once_is_kept_while_it_delivers_more() {
        // 64 slots, each request 10 % slower per other one served with it: 64 in flight
        // deliver 12 % more than 32, each added request about an eighth of what one delivered
        // at 32 (under `GAIN_TO_KEEP`). The service times show no queue at 64: it is kept.
        let range = StartMinMax::new(4, 1, 64);
        let (_, limit) = run_timed(64, 0.10, range, 4000);
        assert_eq!(limit.settled(), 64);
        // Judged on throughput alone, the gain is too small to pay for the latency.
        let blind = settle_on(64, 0.10, range);
        assert!(blind.settled() < 64, "settled at {}", blind.settled());
    }

    #[test]
    fn in_slow_start_a_level_the_server_served_at_once_is_kept_on_its_first_four_answers() {
        // 64 slots, 10 % slower per other request served, and answers 30 % apart in length:
        // four answers' throughput cannot tell a doubling's gain from noise, but the server's
        // times show no queue at any level below its slots. Each doubling is kept on its
        // fourth answer.
        let mut limit = DelayLimit::new(StartMinMax::new(4, 1, 64));
        let mut now = Duration::ZERO;
        let alone = Duration::from_secs(2);
        limit.on_completed(now, limit.generation(), 1, 10.0, alone, Some(alone));
        let mut levels = Vec::new();
        for answer in 0..40 {
            let level = limit.limit();
            levels.push(level);
            let length = if answer % 2 == 0 { 0.7 } else { 1.3 };
            let service = 2.0 * length * (1.0 + 0.10 * f64::from(level - 1));
            let latency = Duration::from_secs_f64(service);
            now += latency / level;
            limit.on_completed(now, limit.generation(), level, 10.0, latency, Some(latency));
        }
        assert_eq!(
            &levels[..17],
            &[4, 4, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 32, 32, 32, 32, 64],
            "{levels:?}"
        );
    }

    #[test]
    fn a_probe_past_the_slots_ends_after_a_few_answers_when_the_server_reports_its_time() {
        // Continuous batching up to 16 slots: slow start doubles to 32, where half the
        // requests wait. Judged on throughput that takes a whole round of 32; the service
        // times show the queue within the first few answers.
        let (levels, limit) = run_timed(16, 0.08, StartMinMax::new(4, 1, 64), 4000);
        let first_at_32 = levels
            .iter()
            .position(|level| *level == 32)
            .expect("probed 32");
        let at_32 = levels[first_at_32..]
            .iter()
            .take_while(|level| **level == 32)
            .count();
        assert!(at_32 <= MIN_SAMPLES as usize, "{at_32} answers at 32");
        assert!(levels.iter().all(|level| *level <= 32));
        assert!(
            (14..=16).contains(&limit.settled()),
            "settled at {}",
            limit.settled()
        );
    }

    /// Feeds `count` requests of 10 items sent at the current limit with this latency.
    fn feed(limit: &mut DelayLimit, now: &mut Duration, count: u32, latency: Duration) {
        for _ in 0..count {
            let level = limit.limit();
            *now += latency / level;
            limit.on_completed(*now, limit.generation(), level, 10.0, latency, None);
        }
    }

    /// A limit in `range` whose first request, sent alone, took 1 s for 10 items, and whose
    /// first `answers` answers at the start level took `at_start` each.
    fn after_the_start(range: StartMinMax, answers: u32, at_start: Duration) -> DelayLimit {
        let mut limit = DelayLimit::new(range);
        let mut now = Duration::from_secs(1);
        first_alone(&mut limit, now, Duration::from_secs(1));
        feed(&mut limit, &mut now, answers, at_start);
        limit
    }

    /// The run's first request, 10 items sent alone, answered at `now` after `took`.
    fn first_alone(limit: &mut DelayLimit, now: Duration, took: Duration) {
        limit.on_completed(now, limit.generation(), 1, 10.0, took, None);
    }

    /// The level of each of `answers` answers from a server with `slots` slots and no
    /// slowdown, with no first request sent alone.
    fn levels_on(slots: u32, range: StartMinMax, answers: usize) -> Vec<u32> {
        let mut limit = DelayLimit::new(range);
        let mut now = Duration::from_secs(1);
        let mut levels = Vec::new();
        for _ in 0..answers {
            let level = limit.limit();
            levels.push(level);
            feed(&mut limit, &mut now, 1, latency(level, slots, 2.0, 0.0));
        }
        levels
    }

    #[test]
    fn the_first_measurement_jumps_to_what_a_queueing_server_serves() {
        let range = StartMinMax::new(4, 1, 64);
        // The first request, sent alone, took 1 s; at 4 in flight each took 4 s: one slot.
        assert_eq!(after_the_start(range, 4, Duration::from_secs(4)).limit(), 1);
        // Two slots: 2 s each at 4 in flight.
        assert_eq!(after_the_start(range, 4, Duration::from_secs(2)).limit(), 2);
        // Two slots and a first answer that came out slow: 4 in flight took 1.8 times its
        // time per item. 4 ÷ 1.8 is 2.2: the probe goes to 2, not to 3, which still queues.
        assert_eq!(
            after_the_start(range, 4, Duration::from_secs_f64(1.8)).limit(),
            2
        );
    }

    #[test]
    fn a_start_at_the_slots_the_server_said_is_not_taken_for_a_queue() {
        // 16 in flight on a server that said it has 16 slots, each answer 2.2 times the first
        // one's time per item: its continuous batching, not a queue. Slow start goes up from
        // 16 instead of jumping to 16 ÷ 2.2 = 7, as it does for a server that said nothing.
        let range = StartMinMax::new(16, 1, 64);
        let at_start = Duration::from_secs_f64(2.2);
        let mut limit = DelayLimit::new(range).with_server_slots(Some(16));
        let mut now = Duration::from_secs(1);
        first_alone(&mut limit, now, Duration::from_secs(1));
        let mut answers = 0;
        while limit.limit() == 16 && answers < 200 {
            feed(&mut limit, &mut now, 1, at_start);
            answers += 1;
        }
        assert_eq!(limit.limit(), 32, "after {answers} answers");
        assert_eq!(after_the_start(range, answers, at_start).limit(), 7);
    }

    #[test]
    fn a_level_below_the_start_whose_requests_did_not_wait_is_not_probed_lower() {
        // Two slots: the first request alone took 1 s, 4 in flight took 2 s each, and at 2 in
        // flight each takes the first request's 1 s. The jump to 2 is kept and held; 1, which
        // would leave a slot idle, is not tried.
        let range = StartMinMax::new(4, 1, 64);
        let mut limit = after_the_start(range, 4, Duration::from_secs(2));
        assert_eq!(limit.limit(), 2);
        let mut now = Duration::from_secs(60);
        for _ in 0..16 {
            let latency = latency(limit.limit(), 2, 1.0, 0.0);
            feed(&mut limit, &mut now, 1, latency);
            assert!(limit.limit() >= 2, "probed below the slots");
        }
        assert_eq!(limit.settled(), 2);
    }

    #[test]
    fn one_answer_that_waited_behind_the_start_ends_its_measurement() {
        // One slot: the first request alone took 1 s, and the first answer at 4 in flight,
        // sent behind three of ours, took 4 s. The start's measurement ends on it.
        let range = StartMinMax::new(4, 1, 64);
        assert_eq!(after_the_start(range, 1, Duration::from_secs(4)).limit(), 1);
        // Continuous batching at the start level (1.4 times): one answer decides nothing.
        let limit = after_the_start(range, 1, Duration::from_secs_f64(1.4));
        assert_eq!(limit.limit(), 4);
        assert_eq!(limit.probes(), 0);
    }

    #[test]
    fn without_a_clear_queue_slow_start_doubles_from_the_start_level() {
        let limit = after_the_start(StartMinMax::new(4, 1, 64), 4, Duration::from_secs(1));
        assert_eq!(limit.limit(), 8);
        assert!(limit.searching());
    }

    #[test]
    fn a_probe_that_plainly_queues_is_judged_on_its_first_four_answers() {
        // Eight slots: the doubling from 8 to 16 doubles every latency and gains nothing.
        let levels = levels_on(8, StartMinMax::new(8, 1, 64), 40);
        let at_16 = levels.iter().filter(|level| **level == 16).count();
        assert_eq!(at_16, 4, "{levels:?}");
    }

    #[test]
    fn a_start_level_at_the_most_allowed_is_probed_at_half() {
        let limit = after_the_start(StartMinMax::new(4, 1, 4), 4, Duration::from_secs(1));
        assert_eq!(limit.limit(), 2);
    }

    /// The levels visited (each once in a row) over `answers` answers from a server with
    /// `slots` slots and no slowdown.
    fn visited_on(limit: &mut DelayLimit, slots: u32, answers: usize) -> Vec<u32> {
        let mut now = Duration::from_secs(1);
        let mut visited: Vec<u32> = Vec::new();
        for _ in 0..answers {
            let level = limit.limit();
            if visited.last() != Some(&level) {
                visited.push(level);
            }
            feed(limit, &mut now, 1, latency(level, slots, 2.0, 0.0));
        }
        visited
    }

    #[test]
    fn a_resumed_level_found_between_two_measured_is_probed_by_steps_not_doubled() {
        // Twelve slots, found before: the run goes on at 12 and tries 15, not 24.
        let mut limit = DelayLimit::new(StartMinMax::new(4, 1, 64));
        limit.resume_at(12, true);
        assert_eq!(limit.limit(), 12);
        assert!(!limit.searching());
        let visited = visited_on(&mut limit, 12, 200);
        assert_eq!(visited[..2], [12, 15], "{visited:?}");
        assert!(visited.iter().all(|level| *level <= 15), "{visited:?}");
    }

    #[test]
    fn a_resumed_level_found_while_doubling_doubles_on() {
        // Found while still doubling: 8 → 16 → 32 on a 32-slot server.
        let mut limit = DelayLimit::new(StartMinMax::new(4, 1, 64));
        limit.resume_at(8, false);
        assert!(limit.searching());
        let visited = visited_on(&mut limit, 32, 200);
        assert_eq!(visited[..3], [8, 16, 32], "{visited:?}");
    }

    #[test]
    fn a_resumed_level_stays_within_the_jobs_range() {
        let mut limit = DelayLimit::new(StartMinMax::new(4, 2, 16));
        limit.resume_at(40, true);
        assert_eq!(limit.limit(), 16);
        limit.resume_at(1, true);
        assert_eq!(limit.limit(), 2);
    }

    #[test]
    fn a_start_at_the_slots_is_probed_below_only_after_two_failed_probes_above() {
        // Four slots, and a first request sent alone as fast as the start level's answers:
        // the doubling to 8 fails, the start is held (no probe below at once), the next probe
        // above fails too, and only then is the level below tried.
        let mut limit = DelayLimit::new(StartMinMax::new(4, 1, 64));
        let mut now = Duration::from_secs(1);
        let alone = latency(1, 4, 2.0, 0.0);
        limit.on_completed(now, limit.generation(), 1, 10.0, alone, None);
        let mut levels = Vec::new();
        for _ in 0..400 {
            let level = limit.limit();
            levels.push(level);
            feed(&mut limit, &mut now, 1, latency(level, 4, 2.0, 0.0));
        }
        let mut visited: Vec<u32> = Vec::new();
        for level in &levels {
            if visited.last() != Some(level) {
                visited.push(*level);
            }
        }
        let below = visited
            .iter()
            .position(|level| *level < 4)
            .expect("a probe below");
        let above = visited[..below].iter().filter(|level| **level > 4).count();
        assert_eq!(above, 2, "{visited:?}");
    }

    #[test]
    fn a_first_doubling_that_gains_nothing_sends_the_probe_below_the_start_at_once() {
        // Two slots, no first request to compare with: 4 → 8 gains nothing, and the start
        // level, nothing below it measured, is probed below without a hold.
        let levels = levels_on(2, StartMinMax::new(4, 1, 64), 40);
        let doubled = levels
            .iter()
            .position(|level| *level == 8)
            .expect("a doubling");
        let below = levels
            .iter()
            .position(|level| *level < 4)
            .expect("a probe below");
        assert!(doubled < below, "{levels:?}");
        // One round at 8, then 4 again for one measurement, then below: no hold of ten
        // latencies at 4 in between.
        assert!(below - doubled <= 8 + 8, "{levels:?}");
    }

    /// A limit settled on a server with `slots` slots and run until it holds its settled
    /// level after a failed probe; and the time then.
    fn settled_and_holding(slots: u32) -> (DelayLimit, Duration) {
        let mut limit = settle_on(slots, 0.0, StartMinMax::new(4, 1, 64));
        let mut now = Duration::from_secs(100_000);
        for _ in 0..1000 {
            if limit.probe.is_none() && limit.hold_until > now + Duration::from_secs(60) {
                break;
            }
            let level = limit.limit();
            feed(&mut limit, &mut now, 1, latency(level, slots, 2.0, 0.0));
        }
        assert!(
            limit.probe.is_none() && limit.hold_until > now + Duration::from_secs(60),
            "no hold reached"
        );
        (limit, now)
    }

    #[test]
    fn gauges_that_show_every_request_served_double_slow_start_up_to_the_slots_they_show() {
        let range = StartMinMax::new(4, 1, 64);
        let mut limit = DelayLimit::new(range);
        let mut levels = vec![limit.limit()];
        for _ in 0..6 {
            let running = limit.limit();
            limit.on_server_took_all(running);
            levels.push(limit.limit());
        }
        assert_eq!(levels, [4, 8, 16, 32, 64, 64, 64]);
        // Full at 24: the limit drops to 24 and holds; slow start is over.
        limit.on_server_full(Duration::from_secs(10), 24, 24);
        assert_eq!((limit.limit(), limit.server_slots()), (24, Some(24)));
        limit.on_server_took_all(24);
        assert_eq!(limit.limit(), 24);
        // Slots known beforehand bound the doubling.
        let mut limit = DelayLimit::new(range);
        limit.on_server_full(Duration::ZERO, 6, 6);
        assert_eq!(limit.limit(), 4, "a level below the slots stays");
        limit.on_server_took_all(4);
        assert_eq!(limit.limit(), 6);
        limit.on_server_took_all(6);
        assert_eq!(limit.limit(), 6);
        // A server running more than it was seen full at has gained slots.
        limit.on_server_took_all(9);
        assert_eq!(limit.server_slots(), None);
    }

    #[test]
    fn a_probe_above_that_the_gauges_show_full_ends_at_once_and_holds() {
        let (mut limit, now) = settled_and_holding(16);
        let settled = limit.limit();
        limit.hold_until = now;
        limit.next_direction = Direction::Up;
        limit.start_probe(false);
        let probe = limit.limit();
        assert!(probe > settled, "probing above {settled}: {probe}");
        limit.on_server_full(now, 32, settled);
        assert_eq!(limit.limit(), settled);
        assert!(
            limit.hold_until >= now + HOLD_MIN,
            "held after the failed probe"
        );
    }

    #[test]
    fn a_server_that_loses_slots_is_probed_below_without_waiting_out_the_hold() {
        let (mut limit, mut now) = settled_and_holding(4);
        let (settled, hold_until) = (limit.settled(), limit.hold_until);
        // The server restarts with 2 slots: latency at the settled level doubles, and the
        // limit goes below it before the hold would have ended.
        let mut lowest = settled;
        while now < hold_until - Duration::from_secs(30) {
            let level = limit.limit();
            feed(&mut limit, &mut now, 1, latency(level, 2, 2.0, 0.0));
            lowest = lowest.min(limit.settled());
        }
        assert_eq!(lowest, 2, "from {settled}, on 2 slots");
    }

    #[test]
    fn a_server_that_turns_faster_is_probed_at_most_double_the_level() {
        let (mut limit, mut now) = settled_and_holding(2);
        let settled = limit.settled();
        // Latency at the settled level falls to a quarter (shorter answers, or a server
        // with many more slots): Vegas's estimate is four times the level, but the first
        // step up is a doubling.
        let mut highest = settled;
        for _ in 0..(4 * settled) {
            let level = limit.limit();
            if limit.probe.is_some() {
                break;
            }
            feed(&mut limit, &mut now, 1, latency(level, 2, 0.5, 0.0));
            highest = highest.max(limit.limit());
        }
        assert_eq!(highest, 2 * settled, "from {settled}");
    }

    #[test]
    fn an_unclear_probe_is_judged_against_both_measurements_of_the_settled_level() {
        let at = |level: u32, items_per_second: f64, seconds_per_item: f64| Measured {
            level,
            items_per_second,
            mean_latency_s: seconds_per_item * 10.0,
            seconds_per_item,
            relative_error: 0.08,
            samples: 8,
        };
        // 8 in flight delivered 16 items/s; 4 in flight 11.3 before the probe and 14.9 when
        // measured again: against both (13.1) each added request still delivers over a fifth
        // of what one did, against the second alone it does not.
        let probe = at(8, 16.0, 0.5);
        let judged = |before: Measured, again: Measured| {
            let mut limit = DelayLimit::new(StartMinMax::new(4, 1, 64));
            limit.slow_start = false;
            limit.reference = Some(before);
            limit.judge_pending(Duration::from_secs(60), probe, again);
            limit.settled()
        };
        assert_eq!(judged(at(4, 11.3, 0.35), at(4, 14.9, 0.27)), 8);
        // Two measurements that agree on 14.9 items/s: the probe does not pay.
        assert_eq!(judged(at(4, 14.9, 0.27), at(4, 14.9, 0.27)), 4);
    }

    #[test]
    fn one_lucky_measurement_of_the_settled_level_does_not_stop_the_climb() {
        // Continuous batching on 64 slots, 5 % slower per request served at once; latencies
        // ±10 % around the server's. The start level's first round comes out 25 % fast, so
        // the first doubling seems to gain too little over it: the start level is measured
        // again, the doubling kept, and the climb goes on.
        let mut limit = DelayLimit::new(StartMinMax::new(8, 1, 64));
        let mut now = Duration::from_secs(1);
        first_alone(&mut limit, now, Duration::from_secs(2));
        let mut reached = 0;
        for sent in 0u32..400 {
            let level = limit.limit();
            let noise = if sent.is_multiple_of(2) { 0.9 } else { 1.1 };
            let lucky = if sent < 8 { 0.75 } else { 1.0 };
            let latency = latency(level, 64, 2.0, 0.05).mul_f64(noise * lucky);
            now += latency / level;
            limit.on_completed(now, limit.generation(), level, 10.0, latency, None);
            reached = reached.max(limit.settled());
        }
        assert!(reached >= 32, "settled at most {reached}");
    }

    #[test]
    fn samples_from_another_level_or_generation_do_not_count() {
        let mut limit = DelayLimit::new(StartMinMax::new(4, 1, 64));
        let generation = limit.generation();
        for _ in 0..100 {
            // Sent below the limit (something else held the dispatcher back)...
            limit.on_completed(
                Duration::ZERO,
                generation,
                3,
                10.0,
                Duration::from_secs(1),
                None,
            );
            // ...or before the limit last changed.
            limit.on_completed(
                Duration::ZERO,
                generation + 1,
                4,
                10.0,
                Duration::from_secs(1),
                None,
            );
        }
        assert_eq!((limit.limit(), limit.probes()), (4, 0));
    }
}
