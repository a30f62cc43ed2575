//! Recent latencies of successful requests as a small model: the mean latency as a linear
//! function of the request's size (`fixed + per_item × items`), and quantiles of each
//! latency's ratio to that mean. Requests of different sizes (growing batches, small ones at
//! the end of the queue) then share one distribution, and any size gets its own p50/p90/p99.
//! Recomputed when a sample arrives, so polling stays cheap.

use std::collections::VecDeque;
use std::time::Duration;

/// How many recent latencies the model is fitted on.
const WINDOW: usize = 200;
/// Without a spread of sizes to fit on, this share of the latency is taken as fixed.
const ASSUMED_FIXED_SHARE: f64 = 0.5;

#[derive(Debug, Clone, Default)]
pub struct LatencyWindow {
    samples: VecDeque<(f64, u32)>,
    model: Option<LatencyModel>,
}

/// The fitted latency model, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyModel {
    pub fixed: f64,
    pub per_item: f64,
    /// Quantiles of latency ÷ expected latency.
    pub ratio_p50: f64,
    pub ratio_p90: f64,
    pub ratio_p99: f64,
}

impl LatencyModel {
    /// Mean latency of a request of `items` items.
    pub fn expected(&self, items: u32) -> f64 {
        self.fixed + self.per_item * f64::from(items.max(1))
    }
    pub fn p50(&self, items: u32) -> f64 {
        self.ratio_p50 * self.expected(items)
    }
    pub fn p90(&self, items: u32) -> f64 {
        self.ratio_p90 * self.expected(items)
    }
    pub fn p99(&self, items: u32) -> f64 {
        self.ratio_p99 * self.expected(items)
    }
}

impl LatencyWindow {
    pub fn record(&mut self, latency: Duration, items: u32) {
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples
            .push_back((latency.as_secs_f64(), items.max(1)));
        let (fixed, per_item) = self.fit();
        let mut ratios: Vec<f64> = self
            .samples
            .iter()
            .map(|(latency, items)| latency / (fixed + per_item * f64::from(*items)).max(1e-9))
            .collect();
        ratios.sort_by(f64::total_cmp);
        let at = |share: f64| ratios[((ratios.len() - 1) as f64 * share).round() as usize];
        self.model = Some(LatencyModel {
            fixed,
            per_item,
            ratio_p50: at(0.5),
            ratio_p90: at(0.9),
            ratio_p99: at(0.99),
        });
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn model(&self) -> Option<LatencyModel> {
        self.model
    }

    /// Seeds the window with one typical latency (after a restore).
    pub fn seed(&mut self, typical: Duration, items: u32) {
        if self.samples.is_empty() {
            self.record(typical, items);
        }
    }

    /// Least-squares fit of latency on items; when the sizes hardly vary or the fit is not
    /// physical (a negative part), the mean is split by `ASSUMED_FIXED_SHARE`.
    fn fit(&self) -> (f64, f64) {
        let n = self.samples.len() as f64;
        let mean_items = self
            .samples
            .iter()
            .map(|(_, items)| f64::from(*items))
            .sum::<f64>()
            / n;
        let mean_latency = self
            .samples
            .iter()
            .map(|(latency, _)| *latency)
            .sum::<f64>()
            / n;
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
        let fixed = ASSUMED_FIXED_SHARE * mean_latency;
        (fixed, (mean_latency - fixed) / mean_items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_a_uniform_ramp_at_one_size() {
        let mut window = LatencyWindow::default();
        for millis in 1..=100 {
            window.record(Duration::from_millis(millis * 10), 10);
        }
        let model = window.model().unwrap();
        assert!((model.p50(10) - 0.5).abs() < 0.011);
        assert!((model.p90(10) - 0.9).abs() < 0.011);
        assert!((model.p99(10) - 0.99).abs() < 0.011);
    }

    #[test]
    fn sizes_share_one_distribution_through_the_linear_fit() {
        let mut window = LatencyWindow::default();
        for items in [10, 20, 30, 40] {
            // 1 s fixed + 0.1 s per item.
            window.record(Duration::from_secs_f64(1.0 + 0.1 * f64::from(items)), items);
        }
        let model = window.model().unwrap();
        assert!((model.fixed - 1.0).abs() < 1e-9 && (model.per_item - 0.1).abs() < 1e-9);
        assert!((model.p90(40) - 5.0).abs() < 1e-9 && (model.p90(1) - 1.1).abs() < 1e-9);
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
        assert!((window.model().unwrap().p99(10) - 1.0).abs() < 1e-9);
        assert_eq!(window.len(), WINDOW);
    }
}
