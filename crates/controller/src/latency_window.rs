//! Recent latencies of successful requests and their quantiles (p50, p90, p99), recomputed
//! when a sample arrives so that polling stays cheap, with the mean size of those requests
//! (so a timeout for a larger request can be scaled up).

use std::collections::VecDeque;
use std::time::Duration;

/// How many recent latencies the quantiles are taken over.
const WINDOW: usize = 200;

#[derive(Debug, Clone, Default)]
pub struct LatencyWindow {
    samples: VecDeque<(f64, u32)>,
    quantiles: Option<LatencyQuantiles>,
}

/// Quantiles of the recent window, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyQuantiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
    /// Mean items per request of the samples.
    pub mean_items: f64,
    /// Fit of mean latency = `fixed + per_item × items` over the samples (seconds).
    pub fixed: f64,
    pub per_item: f64,
}

impl LatencyQuantiles {
    /// How much longer (or shorter) a request of `items` items takes than the samples'
    /// typical request, by the linear fit.
    pub fn size_factor(&self, items: u32) -> f64 {
        let typical = self.fixed + self.per_item * self.mean_items;
        if typical <= 0.0 {
            return 1.0;
        }
        (self.fixed + self.per_item * f64::from(items)) / typical
    }
}

impl LatencyWindow {
    pub fn record(&mut self, latency: Duration, items: u32) {
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back((latency.as_secs_f64(), items.max(1)));
        let mean_items =
            self.samples.iter().map(|(_, items)| f64::from(*items)).sum::<f64>() / self.samples.len() as f64;
        let (fixed, per_item) = self.fit(mean_items);
        let mut sorted: Vec<f64> = self.samples.iter().map(|(latency, _)| *latency).collect();
        sorted.sort_by(f64::total_cmp);
        let at = |share: f64| sorted[((sorted.len() - 1) as f64 * share).round() as usize];
        self.quantiles = Some(LatencyQuantiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            mean_items,
            fixed,
            per_item,
        });
    }

    /// Least-squares fit of latency on items; proportional when the sizes hardly vary or the
    /// fit is not physical (negative part).
    fn fit(&self, mean_items: f64) -> (f64, f64) {
        let n = self.samples.len() as f64;
        let mean_latency = self.samples.iter().map(|(latency, _)| *latency).sum::<f64>() / n;
        let (mut covariance, mut variance) = (0.0, 0.0);
        for (latency, items) in &self.samples {
            let dx = f64::from(*items) - mean_items;
            covariance += dx * (latency - mean_latency);
            variance += dx * dx;
        }
        if variance / n > 1.0 {
            let per_item = covariance / variance;
            let fixed = mean_latency - per_item * mean_items;
            if per_item >= 0.0 && fixed >= 0.0 {
                return (fixed, per_item);
            }
        }
        (0.0, mean_latency / mean_items)
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn quantiles(&self) -> Option<LatencyQuantiles> {
        self.quantiles
    }

    /// Seeds the window with one typical latency (after a restore).
    pub fn seed(&mut self, typical: Duration, items: u32) {
        if self.samples.is_empty() {
            self.record(typical, items);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_uniform_ramp() {
        let mut window = LatencyWindow::default();
        for millis in 1..=100 {
            window.record(Duration::from_millis(millis * 10), 10);
        }
        let quantiles = window.quantiles().unwrap();
        assert!((quantiles.p50 - 0.5).abs() < 0.011);
        assert!((quantiles.p90 - 0.9).abs() < 0.011);
        assert!((quantiles.p99 - 0.99).abs() < 0.011);
    }

    #[test]
    fn size_factor_follows_the_linear_fit() {
        let mut window = LatencyWindow::default();
        for items in [10, 20, 30, 40] {
            // 1 s fixed + 0.1 s per item.
            window.record(Duration::from_secs_f64(1.0 + 0.1 * f64::from(items)), items);
        }
        let quantiles = window.quantiles().unwrap();
        assert!((quantiles.fixed - 1.0).abs() < 1e-9 && (quantiles.per_item - 0.1).abs() < 1e-9);
        // Mean size 25 takes 3.5 s; 40 items take 5 s.
        assert!((quantiles.size_factor(40) - 5.0 / 3.5).abs() < 1e-9);
    }

    #[test]
    fn old_samples_fall_out() {
        let mut window = LatencyWindow::default();
        for _ in 0..WINDOW {
            window.record(Duration::from_secs(10), 10);
        }
        for _ in 0..WINDOW {
            window.record(Duration::from_secs(1), 10);
        }
        assert_eq!(window.quantiles().unwrap().p99, 1.0);
        assert_eq!(window.len(), WINDOW);
    }
}
