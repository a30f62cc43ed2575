//! Items per request: a throughput-versus-quality choice.
//!
//! Every rate model of a provider gives more items per second with more items per request
//! (requests/min times items; prompt overhead amortised under tokens/min; a fixed part of the
//! latency shared), so the size grows step by step while a step still raises the modelled
//! items/s by at least `MINIMUM_GAIN` — and while quality holds. Quality is the share of items
//! that came back missing, truncated or rejected, counted per size; when it rises clearly above
//! the best size seen (the quality knee), the size steps back below the knee, and the knee is
//! approached again by halving the distance, then re-tested after `KNEE_MEMORY`.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::StartMinMax;

/// Items and requests to observe at a size before judging it (growing, or finding the knee;
/// the knee test below needs more evidence the fewer items it has).
const ITEMS_TO_JUDGE: f64 = 60.0;
const REQUESTS_TO_JUDGE: u32 = 3;
/// A size is past the knee when its failure share exceeds that of the smaller sizes by
/// `KNEE_EXCESS` and that many failures would happen at the smaller sizes' share with a
/// probability below `KNEE_SIGNIFICANCE` (small, as the test is repeated after every answer).
const KNEE_EXCESS: f64 = 0.03;
const KNEE_SIGNIFICANCE: f64 = 1e-4;
/// Failure share assumed for the test when the smaller sizes had fewer failures.
const FAILURE_SHARE_FLOOR: f64 = 0.005;
/// Without smaller sizes to compare with, a failure share above this is past the knee.
const ABSOLUTE_FAILURE_LIMIT: f64 = 0.10;
/// Growth step as a share of the current size, before and after a knee was found.
const GROWTH_SHARE: f64 = 1.0;
const GROWTH_SHARE_NEAR_KNEE: f64 = 0.25;
/// Grow only if the modelled items/s rises by at least this share.
pub const MINIMUM_GAIN: f64 = 0.01;
/// How long a found knee is trusted before sizes at it are tried again.
const KNEE_MEMORY: Duration = Duration::from_secs(600);
/// Timed-out requests of the current size in a row that halve it.
const TIMEOUTS_TO_SHRINK: u32 = 2;
/// Per-size counts are halved past this many items, so they follow drift.
const STATS_HORIZON: f64 = 2000.0;

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct SizeQuality {
    items: f64,
    failed: f64,
}

impl SizeQuality {
    fn share(&self) -> f64 {
        if self.items > 0.0 {
            self.failed / self.items
        } else {
            0.0
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchSizer {
    range: StartMinMax,
    current: u32,
    /// The smallest size found past the quality knee.
    knee: Option<u32>,
    #[serde(skip)]
    knee_found_at: Duration,
    quality: BTreeMap<u32, SizeQuality>,
    items_since_change: f64,
    requests_since_change: u32,
    /// Requests of the current size that timed out since one of that size was answered.
    #[serde(default)]
    timeouts_in_a_row: u32,
    /// The smallest of those requests.
    #[serde(default)]
    least_timed_out: u32,
    /// The smallest size whose requests outlasted the timeout; not grown to again before
    /// `KNEE_MEMORY` has passed.
    #[serde(default)]
    too_slow: Option<u32>,
    #[serde(skip)]
    too_slow_at: Duration,
}

impl BatchSizer {
    pub fn new(range: StartMinMax) -> Self {
        Self {
            range,
            current: range.start,
            knee: None,
            knee_found_at: Duration::ZERO,
            quality: BTreeMap::new(),
            items_since_change: 0.0,
            requests_since_change: 0,
            timeouts_in_a_row: 0,
            least_timed_out: 0,
            too_slow: None,
            too_slow_at: Duration::ZERO,
        }
    }

    pub fn current(&self) -> u32 {
        self.current
    }

    pub fn knee(&self) -> Option<u32> {
        self.knee
    }

    /// Re-applies the job's range after a restore (the job file may have changed).
    pub fn set_range(&mut self, range: StartMinMax) {
        self.range = range;
        self.current = range.clamp(self.current);
    }

    /// The next size to try, at most `largest`, if growing is allowed at all. A step that
    /// `largest` shortens is taken only while it still adds `GROWTH_SHARE_NEAR_KNEE` of the
    /// size: a bound that creeps up as requests grow (their fixed part shared by more items)
    /// does not draw them up one item at a time, each step measured afresh.
    pub fn candidate(&self, largest: u32) -> Option<u32> {
        let share = if self.knee.is_some() {
            GROWTH_SHARE_NEAR_KNEE
        } else {
            GROWTH_SHARE
        };
        let step = ((f64::from(self.current) * share) as u32).max(1);
        let mut next = (self.current + step).min(self.range.max);
        let largest = match self.too_slow {
            Some(too_slow) => largest.min(too_slow.saturating_sub(1)),
            None => largest,
        };
        if largest < next {
            let least_step = ((f64::from(self.current) * GROWTH_SHARE_NEAR_KNEE) as u32).max(1);
            if largest < self.current.saturating_add(least_step) {
                return None;
            }
            next = largest;
        }
        if let Some(knee) = self.knee {
            next = next.min(self.current + (knee.saturating_sub(self.current) / 2).max(1));
            if next >= knee {
                return None;
            }
        }
        (next > self.current).then_some(next)
    }

    /// Records one answered request of `items` items of which `failed` came back missing,
    /// truncated or rejected. Requests grow to at most `largest` items, and only by a
    /// modelled items/s gain `gain(from, to)` of at least `MINIMUM_GAIN`.
    pub fn record(
        &mut self,
        now: Duration,
        items: u32,
        failed: u32,
        largest: u32,
        gain: impl Fn(u32, u32) -> f64,
    ) {
        if self.knee.is_some() && now.saturating_sub(self.knee_found_at) >= KNEE_MEMORY {
            tracing::debug!(
                knee = self.knee,
                "quality knee forgotten; sizes near it may be tried again"
            );
            self.knee = None;
        }
        if self.too_slow.is_some() && now.saturating_sub(self.too_slow_at) >= KNEE_MEMORY {
            self.too_slow = None;
        }
        if items >= self.current {
            self.timeouts_in_a_row = 0;
        }
        let stats = self.quality.entry(items).or_default();
        stats.items += f64::from(items);
        stats.failed += f64::from(failed);
        if stats.items > STATS_HORIZON {
            stats.items /= 2.0;
            stats.failed /= 2.0;
        }
        if items != self.current {
            return;
        }
        self.items_since_change += f64::from(items);
        self.requests_since_change += 1;
        if self.items_since_change < ITEMS_TO_JUDGE
            || self.requests_since_change < REQUESTS_TO_JUDGE
        {
            return;
        }
        let reference = self.reference_share();
        if self.past_knee(reference) {
            let from = self.current;
            self.knee = Some(from);
            self.knee_found_at = now;
            let tolerated = reference.unwrap_or(0.0) + KNEE_EXCESS;
            let good_below = self
                .quality
                .range(..from)
                .rev()
                .find(|(_, q)| q.items >= ITEMS_TO_JUDGE && q.share() <= tolerated)
                .map(|(size, _)| *size);
            let back = good_below.unwrap_or_else(|| {
                from - ((f64::from(from) * GROWTH_SHARE_NEAR_KNEE) as u32).max(1)
            });
            self.change_to(
                self.range.clamp(back),
                "quality knee: failures rose with size",
            );
            return;
        }
        let share = self
            .quality
            .get(&self.current)
            .map_or(0.0, SizeQuality::share);
        let clean = share <= reference.unwrap_or(0.0) + KNEE_EXCESS / 2.0;
        if clean
            && let Some(next) = self.candidate(largest)
            && gain(self.current, next) >= MINIMUM_GAIN
        {
            self.change_to(next, "more items per request raise items/s");
        }
    }

    /// The pooled failure share of all sizes smaller than the current one.
    fn reference_share(&self) -> Option<f64> {
        let (items, failed) = self
            .quality
            .range(..self.current)
            .fold((0.0, 0.0), |(items, failed), (_, q)| {
                (items + q.items, failed + q.failed)
            });
        (items >= ITEMS_TO_JUDGE).then(|| failed / items)
    }

    fn past_knee(&self, reference: Option<f64>) -> bool {
        let Some(current) = self.quality.get(&self.current) else {
            return false;
        };
        let share = current.share();
        match reference {
            None => share > ABSOLUTE_FAILURE_LIMIT,
            Some(reference) => {
                let expected = current.items * reference.max(FAILURE_SHARE_FLOOR);
                share - reference > KNEE_EXCESS
                    && poisson_tail(expected, current.failed) < KNEE_SIGNIFICANCE
            }
        }
    }

    /// A request of `items` items timed out (not one cut at the end of the queue). Two of
    /// the current size in a row (or of more than half of it: the items of a request that
    /// failed go out again together, a few fewer when some were answered), with none of that
    /// size answered between them, say the server takes longer than the timeout over a
    /// request that large: the size halves, and does not grow back to it before
    /// `KNEE_MEMORY` has passed. (A hung request now and then is one timeout among answers.)
    /// Returns whether the size changed.
    pub fn on_timeout(&mut self, now: Duration, items: u32) -> bool {
        if !self.counts_as_current(items) {
            return false;
        }
        self.least_timed_out = if self.timeouts_in_a_row == 0 {
            items
        } else {
            self.least_timed_out.min(items)
        };
        self.timeouts_in_a_row += 1;
        if self.timeouts_in_a_row < TIMEOUTS_TO_SHRINK {
            return false;
        }
        let from = self.current;
        let to = self.range.clamp(from / 2);
        let timed_out = self.least_timed_out;
        self.too_slow = Some(
            self.too_slow
                .map_or(timed_out, |too_slow| too_slow.min(timed_out)),
        );
        self.too_slow_at = now;
        self.change_to(to, "requests of this size outlast the timeout");
        to != from
    }

    /// Whether a request of `items` tells of the current size's time: at most it and more
    /// than half of it.
    fn counts_as_current(&self, items: u32) -> bool {
        items <= self.current && items.saturating_mul(2) > self.current
    }

    fn change_to(&mut self, size: u32, why: &str) {
        if size != self.current {
            tracing::info!(from = self.current, to = size, knee = self.knee, "{why}");
        }
        self.current = size;
        self.items_since_change = 0.0;
        self.requests_since_change = 0;
        self.timeouts_in_a_row = 0;
    }
}

/// P(X >= observed) for X ~ Poisson(expected): how surprising `observed` failures are.
fn poisson_tail(expected: f64, observed: f64) -> f64 {
    let below = observed.ceil() as u32;
    let mut term = (-expected).exp();
    let mut cumulative = 0.0;
    for count in 0..below {
        cumulative += term;
        term *= expected / f64::from(count + 1);
    }
    (1.0 - cumulative).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn always(_: u32, _: u32) -> f64 {
        1.0
    }

    fn run(sizer: &mut BatchSizer, failure_share: impl Fn(u32) -> f64, requests: usize) {
        for index in 0..requests {
            let items = sizer.current();
            let failed = (f64::from(items) * failure_share(items)).round() as u32;
            sizer.record(
                Duration::from_secs(index as u64),
                items,
                failed,
                u32::MAX,
                always,
            );
        }
    }

    #[test]
    fn grows_to_the_maximum_while_quality_holds() {
        let mut sizer = BatchSizer::new(StartMinMax::new(10, 1, 40));
        run(&mut sizer, |_| 0.0, 200);
        assert_eq!(sizer.current(), 40);
    }

    #[test]
    fn settles_just_below_the_quality_knee() {
        let mut sizer = BatchSizer::new(StartMinMax::new(10, 1, 40));
        run(&mut sizer, |items| if items > 24 { 0.2 } else { 0.0 }, 400);
        assert_eq!(sizer.knee(), Some(25));
        assert_eq!(sizer.current(), 24);
    }

    #[test]
    fn a_few_early_failures_are_not_a_knee() {
        let mut sizer = BatchSizer::new(StartMinMax::new(10, 1, 40));
        run(&mut sizer, |_| 0.0, 20);
        let grown = sizer.current();
        assert!(grown > 10);
        // Three failures in the first 60 items at the new size: unlucky, not a knee.
        for index in 0..3 {
            sizer.record(Duration::from_secs(100 + index), grown, 1, u32::MAX, always);
        }
        assert_eq!(sizer.knee(), None);
    }

    #[test]
    fn poisson_tail_matches_hand_figures() {
        assert!((poisson_tail(1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((poisson_tail(1.0, 1.0) - (1.0 - (-1.0f64).exp())).abs() < 1e-12);
        assert!(poisson_tail(0.3, 3.0) > 1e-4 && poisson_tail(0.3, 5.0) < 1e-4);
    }

    #[test]
    fn grows_to_a_bound_only_by_a_step_worth_taking() {
        let mut sizer = BatchSizer::new(StartMinMax::new(20, 1, 40));
        // The bound shortens the doubling: 20 → 30.
        assert_eq!(sizer.candidate(30), Some(30));
        // A bound a few items above the size is no step (a quarter of it at least).
        assert_eq!(sizer.candidate(24), None);
        assert_eq!(sizer.candidate(25), Some(25));
        // Below the size: no growth, and no shrinking either.
        assert_eq!(sizer.candidate(10), None);
        for index in 0..20 {
            sizer.record(Duration::from_secs(index), 20, 0, 22, always);
        }
        assert_eq!(sizer.current(), 20);
        for index in 20..40 {
            sizer.record(Duration::from_secs(index), 20, 0, 40, always);
        }
        assert_eq!(sizer.current(), 40);
    }

    #[test]
    fn a_failed_requests_items_sent_again_a_few_fewer_count_as_the_size() {
        // A request of 10 timed out and its items go out again together, one fewer for an
        // item answered in between: two such timeouts in a row halve the size too.
        let mut sizer = BatchSizer::new(StartMinMax::new(10, 1, 40));
        assert!(!sizer.on_timeout(Duration::from_secs(1), 9));
        assert!(sizer.on_timeout(Duration::from_secs(2), 9));
        assert_eq!(sizer.current(), 5);
        // Half the size or less, or more than it, is another size; so is an answer of fewer
        // items than the size, which says nothing of whether the size fits.
        let mut sizer = BatchSizer::new(StartMinMax::new(10, 1, 40));
        for items in [5, 11, 5, 2] {
            assert!(!sizer.on_timeout(Duration::from_secs(1), items));
        }
        assert_eq!(sizer.current(), 10);
        assert!(!sizer.on_timeout(Duration::from_secs(2), 8));
        sizer.record(Duration::from_secs(3), 6, 0, u32::MAX, always);
        assert!(sizer.on_timeout(Duration::from_secs(4), 10));
        assert_eq!(sizer.current(), 5);
        // Sizes from the least that timed out up are not grown to again for a while.
        for index in 0..80 {
            let items = sizer.current();
            sizer.record(Duration::from_secs(10 + index), items, 0, u32::MAX, always);
        }
        assert_eq!(sizer.current(), 7);
    }

    #[test]
    fn two_timeouts_in_a_row_halve_the_size_and_keep_it_from_growing_back() {
        let mut sizer = BatchSizer::new(StartMinMax::new(10, 1, 40));
        // A timeout, an answer of that size, a timeout: a hung request now and then.
        assert!(!sizer.on_timeout(Duration::from_secs(1), 10));
        sizer.record(Duration::from_secs(2), 10, 0, u32::MAX, always);
        assert!(!sizer.on_timeout(Duration::from_secs(3), 10));
        assert_eq!(sizer.current(), 10);
        // Two in a row: halved. A timeout of a request of the old size counts no more.
        assert!(sizer.on_timeout(Duration::from_secs(4), 10));
        assert_eq!(sizer.current(), 5);
        assert!(!sizer.on_timeout(Duration::from_secs(5), 10));
        assert_eq!(sizer.current(), 5);
        // Answers that would grow it stop below the size that timed out, until it is forgotten.
        let answer_40_from = |sizer: &mut BatchSizer, from: Duration| {
            for index in 0..40 {
                let items = sizer.current();
                sizer.record(
                    from + Duration::from_secs(index),
                    items,
                    0,
                    u32::MAX,
                    always,
                );
            }
        };
        answer_40_from(&mut sizer, Duration::from_secs(10));
        assert_eq!(sizer.current(), 9);
        answer_40_from(&mut sizer, Duration::from_secs(10) + KNEE_MEMORY);
        assert_eq!(sizer.current(), 40);
    }

    #[test]
    fn does_not_grow_without_gain() {
        let mut sizer = BatchSizer::new(StartMinMax::new(10, 1, 40));
        for index in 0..100 {
            sizer.record(Duration::from_secs(index), 10, 0, u32::MAX, |_, _| 0.001);
        }
        assert_eq!(sizer.current(), 10);
    }
}
