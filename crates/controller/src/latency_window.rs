//! Recent latencies of successful requests and their quantiles (p50, p90, p99), recomputed
//! when a sample arrives so that polling stays cheap.

use std::collections::VecDeque;
use std::time::Duration;

/// How many recent latencies the quantiles are taken over.
const WINDOW: usize = 200;

#[derive(Debug, Clone, Default)]
pub struct LatencyWindow {
    samples: VecDeque<f64>,
    quantiles: Option<LatencyQuantiles>,
}

/// Quantiles of the recent window, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyQuantiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
}

impl LatencyWindow {
    pub fn record(&mut self, latency: Duration) {
        if self.samples.len() == WINDOW {
            self.samples.pop_front();
        }
        self.samples.push_back(latency.as_secs_f64());
        let mut sorted: Vec<f64> = self.samples.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let at = |share: f64| sorted[((sorted.len() - 1) as f64 * share).round() as usize];
        self.quantiles = Some(LatencyQuantiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
        });
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn quantiles(&self) -> Option<LatencyQuantiles> {
        self.quantiles
    }

    /// Seeds the window with one typical latency (after a restore).
    pub fn seed(&mut self, typical: Duration) {
        if self.samples.is_empty() {
            self.record(typical);
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
            window.record(Duration::from_millis(millis * 10));
        }
        let quantiles = window.quantiles().unwrap();
        assert!((quantiles.p50 - 0.5).abs() < 0.011);
        assert!((quantiles.p90 - 0.9).abs() < 0.011);
        assert!((quantiles.p99 - 0.99).abs() < 0.011);
    }

    #[test]
    fn old_samples_fall_out() {
        let mut window = LatencyWindow::default();
        for _ in 0..WINDOW {
            window.record(Duration::from_secs(10));
        }
        for _ in 0..WINDOW {
            window.record(Duration::from_secs(1));
        }
        assert_eq!(window.quantiles().unwrap().p99, 1.0);
        assert_eq!(window.len(), WINDOW);
    }
}
