//! A run's path over time, derived from its ledger rows: per time bucket the requests sent,
//! their items per request, the controller's concurrency limit and the calls actually in
//! flight, items finished per second, 429s, and the cost so far. Pure: rows in, buckets out.

use serde::Serialize;

use crate::store::CallRow;

/// Bucket widths to choose from, in seconds.
const WIDTHS: &[u64] = &[1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400];

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bucket {
    /// Seconds from the run's first call to the bucket's start.
    pub start_s: f64,
    /// Requests started in the bucket.
    pub requests: u64,
    /// Mean items per request started in the bucket.
    pub items_per_request: Option<f64>,
    /// The controller's concurrency limit: the highest one a request in the bucket was sent under.
    pub concurrency_limit: Option<u32>,
    /// Calls in flight, averaged over the bucket.
    pub in_flight: f64,
    /// Items answered (valid) by calls that ended in the bucket.
    pub items_done: u64,
    pub items_per_second: f64,
    /// Calls answered with 429 that ended in the bucket.
    pub rate_limited: u64,
    /// Settled cost of every call that ended by the bucket's end, in USD.
    pub cumulative_cost_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timeline {
    /// When the run's first call started (Unix milliseconds): bucket `start_s` counts from it.
    #[serde(skip)]
    pub first_call_ms: i64,
    pub bucket_seconds: u64,
    pub buckets: Vec<Bucket>,
}

impl Timeline {
    /// At most `max_buckets` buckets of a round width over the span of `calls`.
    pub fn from_calls(calls: &[CallRow], max_buckets: usize) -> Timeline {
        let Some(first) = calls.iter().map(|c| c.started_at).min() else {
            return Timeline { first_call_ms: 0, bucket_seconds: 1, buckets: Vec::new() };
        };
        let ends: Vec<Option<i64>> = calls.iter().map(|c| c.latency_ms.map(|l| c.started_at + l.max(0))).collect();
        let last = calls.iter().zip(&ends).map(|(c, e)| e.unwrap_or(c.started_at)).max().unwrap_or(first);
        let span_ms = (last - first).max(1);
        let width_s = WIDTHS
            .iter()
            .copied()
            .find(|w| (span_ms / (*w as i64 * 1000) + 1) as usize <= max_buckets.max(1))
            .unwrap_or(*WIDTHS.last().expect("widths"));
        let width_ms = width_s as i64 * 1000;
        let count = (span_ms / width_ms + 1) as usize;
        let mut acc = vec![Acc::default(); count];
        let index = |t: i64| (((t - first) / width_ms) as usize).min(count - 1);
        for (call, end) in calls.iter().zip(&ends) {
            let at = &mut acc[index(call.started_at)];
            at.requests += 1;
            at.items += u64::from(call.items);
            at.limit = at.limit.max(call.concurrency);
            if let Some(end) = *end {
                let at = &mut acc[index(end)];
                at.items_done += u64::from(call.items_ok);
                at.rate_limited += u64::from(call.outcome.as_deref() == Some("rate_limited"));
                at.cost_picos = at.cost_picos.saturating_add(call.cost.0);
            }
            // Time in flight, spread over the buckets the call overlaps.
            let (start, stop) = (call.started_at, end.unwrap_or(last));
            let mut t = start;
            while t < stop {
                let i = index(t);
                let bucket_end = first + (i as i64 + 1) * width_ms;
                let until = stop.min(bucket_end);
                acc[i].busy_ms += until - t;
                if i == count - 1 {
                    break;
                }
                t = until;
            }
        }
        let mut cumulative = 0i64;
        let buckets = acc
            .iter()
            .enumerate()
            .map(|(i, a)| {
                cumulative = cumulative.saturating_add(a.cost_picos);
                Bucket {
                    start_s: (i as i64 * width_s as i64) as f64,
                    requests: a.requests,
                    items_per_request: (a.requests > 0).then(|| a.items as f64 / a.requests as f64),
                    concurrency_limit: a.limit,
                    in_flight: a.busy_ms as f64 / width_ms as f64,
                    items_done: a.items_done,
                    items_per_second: a.items_done as f64 / width_s as f64,
                    rate_limited: a.rate_limited,
                    cumulative_cost_usd: cumulative as f64 / 1e12,
                }
            })
            .collect();
        Timeline { first_call_ms: first, bucket_seconds: width_s, buckets }
    }
}

impl Timeline {
    /// The whole span, in seconds.
    pub fn span_seconds(&self) -> u64 {
        self.buckets.len() as u64 * self.bucket_seconds
    }

    /// Long runs are read by the clock (an overnight run from 01:00), short ones in seconds.
    pub fn reads_by_clock(&self) -> bool {
        self.span_seconds() >= CLOCK_FROM_SECONDS
    }

    /// The UTC clock time `seconds` after the first call: `HH:MM`, or `HH:MM:SS` for buckets
    /// under a minute.
    pub fn clock(&self, seconds: f64) -> String {
        let at = self.first_call_ms + (seconds * 1000.0) as i64;
        let seconds_of_day = at.div_euclid(1000).rem_euclid(86_400);
        let (h, m, s) = (seconds_of_day / 3600, seconds_of_day / 60 % 60, seconds_of_day % 60);
        if self.bucket_seconds < 60 { format!("{h:02}:{m:02}:{s:02}") } else { format!("{h:02}:{m:02}") }
    }
}

/// From this span on, times are shown as clock times.
const CLOCK_FROM_SECONDS: u64 = 15 * 60;

#[derive(Debug, Clone, Default)]
struct Acc {
    requests: u64,
    items: u64,
    limit: Option<u32>,
    busy_ms: i64,
    items_done: u64,
    rate_limited: u64,
    cost_picos: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::Picos;

    fn call(started_s: f64, latency_s: Option<f64>, items: u32, ok: u32, outcome: &str, limit: u32, cost: i64) -> CallRow {
        CallRow {
            started_at: 1_000_000 + (started_s * 1000.0) as i64,
            latency_ms: latency_s.map(|l| (l * 1000.0) as i64),
            items,
            items_ok: ok,
            outcome: Some(outcome.into()),
            concurrency: Some(limit),
            cost: Picos(cost),
            model: "m".into(),
        }
    }

    #[test]
    fn buckets_count_requests_items_429s_and_cost_where_they_happen() {
        let calls = vec![
            call(0.0, Some(2.0), 10, 10, "ok", 4, 100),
            call(0.5, Some(0.1), 10, 0, "rate_limited", 4, 0),
            call(1.5, Some(3.0), 20, 18, "ok", 8, 300),
            call(4.0, Some(0.9), 20, 20, "ok", 8, 200),
        ];
        let t = Timeline::from_calls(&calls, 10);
        assert_eq!(t.bucket_seconds, 1);
        assert_eq!(t.buckets.len(), 5);
        let b = &t.buckets;
        assert_eq!((b[0].requests, b[0].items_per_request, b[0].concurrency_limit), (2, Some(10.0), Some(4)));
        assert_eq!((b[0].rate_limited, b[0].items_done), (1, 0));
        assert_eq!((b[1].requests, b[1].concurrency_limit), (1, Some(8)));
        assert_eq!(b[2].items_done, 10);
        assert_eq!(b[4].items_done, 18 + 20);
        assert!((b[4].cumulative_cost_usd - 600e-12).abs() < 1e-18);
        let costs: Vec<f64> = b.iter().map(|x| x.cumulative_cost_usd).collect();
        assert!(costs.windows(2).all(|w| w[0] <= w[1]), "{costs:?}");
        // 0-1 s: call 1 all of it, call 2 for 0.1 s; 1-2 s: call 1 and half of call 3.
        assert!((b[0].in_flight - 1.1).abs() < 1e-9, "{}", b[0].in_flight);
        assert!((b[1].in_flight - 1.5).abs() < 1e-9, "{}", b[1].in_flight);
    }

    #[test]
    fn long_runs_get_wider_buckets() {
        let calls: Vec<CallRow> = (0..1000).map(|i| call(i as f64 * 7.0, Some(3.0), 10, 10, "ok", 4, 1)).collect();
        let t = Timeline::from_calls(&calls, 100);
        assert!(t.buckets.len() <= 100, "{}", t.buckets.len());
        assert_eq!(t.bucket_seconds, 120);
        assert_eq!(t.buckets.iter().map(|b| b.requests).sum::<u64>(), 1000);
        assert_eq!(t.buckets.iter().map(|b| b.items_done).sum::<u64>(), 10_000);
    }

    #[test]
    fn long_runs_read_by_the_clock() {
        // 1,000,000 ms after the epoch is 00:16:40 UTC.
        let short = Timeline::from_calls(&[call(0.0, Some(1.0), 1, 1, "ok", 1, 1)], 10);
        assert!(!short.reads_by_clock());
        let calls: Vec<CallRow> = (0..100).map(|i| call(i as f64 * 360.0, Some(3.0), 10, 10, "ok", 4, 1)).collect();
        let night = Timeline::from_calls(&calls, 48);
        assert!(night.reads_by_clock());
        assert_eq!(night.clock(0.0), "00:16");
        assert_eq!(night.clock(3600.0), "01:16");
    }

    #[test]
    fn no_calls_no_buckets() {
        assert!(Timeline::from_calls(&[], 10).buckets.is_empty());
    }
}
