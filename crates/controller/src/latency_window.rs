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
/// Latencies above a ratio that its mean residual is taken over, at least.
const HEDGE_LONGER_SAMPLES: usize = 5;

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
    /// The least latency ratio, at p90 or above, past which the requests that took longer
    /// took on average at least another median latency: a request that old is better sent
    /// again than waited for. Without such a ratio (a light tail, as a
    /// log-normal's of ordinary spread, where a late request is nearly done), the largest
    /// ratio seen: older than any answer in the window.
    pub ratio_hedge: f64,
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

/// `ratio_hedge` of ascending `ratios`, searched from index `from`: the least ratio whose
/// mean residual (the mean excess of the larger ratios over it) reaches `typical`, the
/// median ratio, or the largest ratio when none does.
fn hedge_ratio(ratios: &[f64], from: usize, typical: f64) -> f64 {
    let largest = ratios.last().copied().unwrap_or(1.0);
    let mut hedge = largest;
    let mut above = 0.0;
    for (count, ratio) in ratios[from.min(ratios.len())..].iter().rev().enumerate() {
        // The mean excess of the `count` larger ratios over this one, once there are enough
        // of them: one straggler alone does not make a tail.
        if count >= HEDGE_LONGER_SAMPLES && above / count as f64 - ratio >= typical {
            hedge = *ratio;
        }
        above += ratio;
    }
    hedge
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
        let index = |share: f64| ((ratios.len() - 1) as f64 * share).round() as usize;
        let at = |share: f64| ratios[index(share)];
        self.model = Some(LatencyModel {
            fixed,
            per_item,
            ratio_p50: at(0.5),
            ratio_p90: at(0.9),
            ratio_p99: at(0.99),
            ratio_hedge: hedge_ratio(&ratios, index(0.9), at(0.5)),
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

    /// A window of `count` latencies of one size, log-normal around 1 s with spread `sigma`.
    fn log_normal(sigma: f64, count: usize, seed: u64) -> LatencyWindow {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut window = LatencyWindow::default();
        for _ in 0..count {
            let z = crate::simulation::normal(&mut rng);
            window.record(Duration::from_secs_f64((sigma * z).exp()), 10);
        }
        window
    }

    #[test]
    fn a_light_tail_is_hedged_only_past_every_latency_seen() {
        // At a log-normal spread of 0.3 a request past p90 is nearly done (about a quarter of
        // a median latency to go): sending its items again would only cost the work twice.
        for seed in 0..20 {
            let window = log_normal(0.3, WINDOW, seed);
            let model = window.model().unwrap();
            let largest = window
                .samples
                .iter()
                .map(|(latency, _)| latency / model.expected(10))
                .fold(0.0, f64::max);
            assert!(
                (model.ratio_hedge - largest).abs() < 1e-9,
                "seed {seed}: {} against the largest {largest}",
                model.ratio_hedge
            );
        }
    }

    #[test]
    fn a_heavy_tail_is_hedged_from_its_p90() {
        // One request in ten takes 8 s where the others take 1 s: one older than the fast ones
        // is a slow one, seven seconds from its answer.
        let mut window = LatencyWindow::default();
        for index in 0..WINDOW {
            let seconds = if index % 10 == 0 { 8.0 } else { 1.0 };
            window.record(Duration::from_secs_f64(seconds), 10);
        }
        let model = window.model().unwrap();
        assert!((model.ratio_hedge * model.expected(10) - 1.0).abs() < 1e-9);
        // A log-normal spread of 0.8: the requests past p90 take on average more than a
        // median latency longer, and the hedge comes well before the largest seen.
        for seed in 0..20 {
            let model = log_normal(0.8, WINDOW, seed).model().unwrap();
            assert!(
                model.ratio_hedge >= model.ratio_p90 && model.ratio_hedge < model.ratio_p99,
                "seed {seed}: {} (p90 {}, p99 {})",
                model.ratio_hedge,
                model.ratio_p90,
                model.ratio_p99
            );
        }
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
