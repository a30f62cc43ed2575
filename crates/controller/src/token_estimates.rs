//! What a request of `b` items costs in tokens: the prompt (a fixed overhead plus a share
//! per item, fitted from the shapes actually sent) and the output (`max_tokens`, sized from
//! the observed output tokens per item with a margin that grows after truncations).

use serde::{Deserialize, Serialize};

/// Weight of one new output sample in the running mean and variance.
const OUTPUT_SMOOTHING: f64 = 0.05;
/// Samples before the observed output replaces the configured estimate.
const OUTPUT_SAMPLES_TRUSTED: u32 = 3;
/// Margin in standard deviations of a request's total output. A truncated answer keeps its
/// complete items (only the last one or two go back to the queue), while every reserved
/// token counts against tokens/min, so the margin is kept small: each truncation raises it,
/// each clean answer lowers it, which settles near 5% truncated answers.
const BASE_MARGIN_SIGMAS: f64 = 1.0;
const MAX_MARGIN_SIGMAS: f64 = 8.0;
const MARGIN_SIGMAS_PER_TRUNCATION: f64 = 0.5;
const MARGIN_RELAXATION_PER_REQUEST: f64 = 0.025;
/// Requests this many times smaller than the run's get a wider margin (`margin_sigmas_for`).
const SMALL_REQUEST_RATIO: f64 = 8.0;
/// Extra share of the expected output and a fixed allowance (JSON keys and braces).
const MARGIN_SHARE: f64 = 0.0;
const MARGIN_TOKENS: f64 = ENCLOSING_OBJECT_TOKENS as f64;
/// Output tokens allowed for the object that encloses the items' answers, on top of the
/// items' own: part of every `max_tokens` the controller decides, and what a packer adds to
/// the items' share when it packs fewer items than offered.
pub const ENCLOSING_OBJECT_TOKENS: u32 = 16;
/// Forgetting factor of the prompt-token fit, per request sent.
const PROMPT_FORGETTING: f64 = 0.99;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEstimates {
    output_mean_per_item: f64,
    output_variance_per_item: f64,
    output_samples: u32,
    margin_sigmas: f64,
    /// Items and output tokens of the first answers, whose pooled mean replaces the guess.
    #[serde(default)]
    initial_items: f64,
    #[serde(default)]
    initial_tokens: f64,
    /// Weighted sums for the prompt fit `prompt = overhead + per_item * items`.
    prompt_weight: f64,
    prompt_sum_items: f64,
    prompt_sum_tokens: f64,
    prompt_sum_items_squared: f64,
    prompt_sum_items_tokens: f64,
    context_window_tokens: Option<u32>,
    /// `[model] max_output_tokens_per_item`: the most an item's answer may take, so
    /// `max_tokens` never exceeds it per item (plus the fixed allowance), however long the
    /// answers seen (a model that rambles to `max_tokens` would otherwise raise it to the
    /// context window).
    #[serde(default)]
    output_cap_per_item: Option<u32>,
}

impl TokenEstimates {
    pub fn new(initial_output_tokens_per_item: u32, context_window_tokens: Option<u32>) -> Self {
        let mean = f64::from(initial_output_tokens_per_item);
        Self {
            output_mean_per_item: mean,
            output_variance_per_item: (0.5 * mean).powi(2),
            output_samples: 0,
            margin_sigmas: 2.0 * BASE_MARGIN_SIGMAS,
            initial_items: 0.0,
            initial_tokens: 0.0,
            prompt_weight: 0.0,
            prompt_sum_items: 0.0,
            prompt_sum_tokens: 0.0,
            prompt_sum_items_squared: 0.0,
            prompt_sum_items_tokens: 0.0,
            context_window_tokens,
            output_cap_per_item: Some(initial_output_tokens_per_item),
        }
    }

    /// Re-applies the model's context window and the output cap per item after a restore.
    pub fn set_limits(&mut self, context_window_tokens: Option<u32>, output_cap_per_item: u32) {
        self.context_window_tokens = context_window_tokens;
        self.output_cap_per_item = Some(output_cap_per_item);
    }

    pub fn output_tokens_per_item(&self) -> f64 {
        self.output_mean_per_item
    }

    /// Learns from one sent request's prompt size.
    pub fn record_prompt(&mut self, items: u32, prompt_tokens: u32) {
        let (x, y) = (f64::from(items), f64::from(prompt_tokens));
        self.prompt_weight = self.prompt_weight * PROMPT_FORGETTING + 1.0;
        self.prompt_sum_items = self.prompt_sum_items * PROMPT_FORGETTING + x;
        self.prompt_sum_tokens = self.prompt_sum_tokens * PROMPT_FORGETTING + y;
        self.prompt_sum_items_squared = self.prompt_sum_items_squared * PROMPT_FORGETTING + x * x;
        self.prompt_sum_items_tokens = self.prompt_sum_items_tokens * PROMPT_FORGETTING + x * y;
    }

    /// Learns from one completed answer: `returned_items` items came back in
    /// `completion_tokens` tokens; `truncated` when it hit `max_tokens`. A truncated answer
    /// raises the margin only when its `max_tokens` was what the estimate gives now
    /// (`current`): the requests sent on an estimate since raised are the same shortfall
    /// seen late, and a round of them all truncated would otherwise drive the margin to its
    /// most, where it would stay for hundreds of requests.
    pub fn record_output(
        &mut self,
        returned_items: u32,
        completion_tokens: u32,
        truncated: bool,
        current: bool,
    ) {
        if truncated && !current {
            tracing::trace!("truncated answer sent on an estimate since raised: margin kept");
        } else if truncated {
            self.margin_sigmas =
                (self.margin_sigmas + MARGIN_SIGMAS_PER_TRUNCATION).min(MAX_MARGIN_SIGMAS);
            tracing::debug!(
                margin_sigmas = self.margin_sigmas,
                "truncated answer: output margin raised"
            );
        } else {
            self.margin_sigmas =
                (self.margin_sigmas - MARGIN_RELAXATION_PER_REQUEST).max(BASE_MARGIN_SIGMAS);
        }
        // No tokens for items that came back: the provider did not count them (no `usage`, an
        // answer sent along with a refusal), which says nothing of how long answers are.
        if returned_items == 0 || completion_tokens == 0 {
            return;
        }
        let items = f64::from(returned_items);
        let per_item = f64::from(completion_tokens) / items;
        if self.output_samples < OUTPUT_SAMPLES_TRUSTED && !truncated {
            // Replace the configured guess quickly with what the model really writes, each
            // answer weighted by its items (a one-item answer says little about the mean).
            self.initial_items += items;
            self.initial_tokens += f64::from(completion_tokens);
            let mean = self.initial_tokens / self.initial_items;
            if self.output_samples == 0 {
                self.output_variance_per_item = (0.3 * per_item).powi(2);
            }
            self.output_mean_per_item = mean;
            self.output_samples += 1;
            return;
        }
        // A truncated answer says the output ran longer than planned: it may only raise the mean.
        if truncated && per_item < self.output_mean_per_item {
            return;
        }
        let deviation = per_item - self.output_mean_per_item;
        self.output_mean_per_item += OUTPUT_SMOOTHING * deviation;
        // The mean of b items varies with variance/b: scale back to one item.
        self.output_variance_per_item +=
            OUTPUT_SMOOTHING * (items * deviation * deviation - self.output_variance_per_item);
        self.output_samples = self.output_samples.saturating_add(1);
    }

    /// Expected prompt tokens of a request of `items` items.
    pub fn prompt_tokens(&self, items: u32) -> f64 {
        let (overhead, per_item) = self.prompt_fit();
        overhead + per_item * f64::from(items)
    }

    /// `(overhead, per_item)` of the prompt fit; zeros before any request was sent.
    pub fn prompt_fit(&self) -> (f64, f64) {
        if self.prompt_weight <= 0.0 || self.prompt_sum_items <= 0.0 {
            return (0.0, 0.0);
        }
        let w = self.prompt_weight;
        let mean_x = self.prompt_sum_items / w;
        let mean_y = self.prompt_sum_tokens / w;
        let variance_x = self.prompt_sum_items_squared / w - mean_x * mean_x;
        if variance_x > 0.25 {
            let slope = (self.prompt_sum_items_tokens / w - mean_x * mean_y) / variance_x;
            let intercept = mean_y - slope * mean_x;
            if slope > 0.0 && intercept >= 0.0 {
                return (intercept, slope);
            }
        }
        (0.0, mean_y / mean_x)
    }

    /// The margin for a request of `b` items, in standard deviations of its output. A
    /// truncated answer keeps its complete items and loses about one, whatever its size, so
    /// the share of items lost is the chance of truncation over `b`. A request of at most
    /// `1 / SMALL_REQUEST_RATIO` of the run's size (`full_size`, the batch size: the last requests at the end
    /// of the queue, retries of a few items) gets a margin whose chance of truncation is
    /// smaller in that ratio; under a normal tail that takes `k² + 2 ln(ratio)` squared
    /// standard deviations, so a one-item request beside requests of 40 gets about 3 instead
    /// of 1. There a truncation costs the run another round at its end; for larger requests
    /// the wider reserve cost more pace under tokens/min than it saved (simulator).
    fn margin_sigmas_for(&self, b: f64, full_size: u32) -> f64 {
        let ratio = f64::from(full_size) / b;
        if ratio >= SMALL_REQUEST_RATIO {
            (self.margin_sigmas.powi(2) + 2.0 * ratio.ln()).sqrt()
        } else {
            self.margin_sigmas
        }
    }

    /// Whether `max_tokens` was the most a request of `items` items may take (the job's
    /// output cap per item): an answer cut off there ran the whole budget its items may have,
    /// not short on an estimate that proved low.
    pub fn at_the_cap(&self, items: u32, max_tokens: u32) -> bool {
        f64::from(max_tokens) >= self.most_tokens(items)
    }

    /// The most output a request of `items` items may take: the job's cap per item plus the
    /// enclosing object's allowance (unbounded without a cap).
    fn most_tokens(&self, items: u32) -> f64 {
        self.output_cap_per_item.map_or(f64::INFINITY, |cap| {
            f64::from(items.max(1)) * f64::from(cap) + MARGIN_TOKENS
        })
    }

    /// `max_tokens` for a request of `items` items in a run whose requests hold `full_size`
    /// (the batch size).
    pub fn max_tokens(&self, items: u32, full_size: u32) -> u32 {
        let b = f64::from(items.max(1));
        let expected = b * self.output_mean_per_item;
        let spread =
            self.margin_sigmas_for(b, full_size) * (b * self.output_variance_per_item).sqrt();
        let wanted =
            (expected * (1.0 + MARGIN_SHARE) + spread + MARGIN_TOKENS).min(self.most_tokens(items));
        let room = self
            .context_window_tokens
            .map(|window| f64::from(window) - self.prompt_tokens(items))
            .unwrap_or(f64::INFINITY);
        wanted.min(room).max(MARGIN_TOKENS).ceil() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_fit_separates_overhead_from_per_item_tokens() {
        let mut estimates = TokenEstimates::new(100, None);
        for items in [10, 12, 15, 18, 10, 20] {
            estimates.record_prompt(items, 400 + 150 * items);
        }
        let (overhead, per_item) = estimates.prompt_fit();
        assert!((overhead - 400.0).abs() < 1e-6 && (per_item - 150.0).abs() < 1e-6);
        assert!((estimates.prompt_tokens(30) - 4900.0).abs() < 1e-6);
    }

    #[test]
    fn one_size_only_gives_a_proportional_estimate() {
        let mut estimates = TokenEstimates::new(100, None);
        estimates.record_prompt(10, 2000);
        assert_eq!(estimates.prompt_tokens(20), 4000.0);
    }

    #[test]
    fn max_tokens_follows_observed_output_and_truncation_raises_it() {
        let mut estimates = TokenEstimates::new(200, None);
        let configured = estimates.max_tokens(20, 20);
        assert!(configured >= 4000);
        for tokens in [1400, 1380, 1420, 1410, 1390, 1400] {
            estimates.record_output(20, tokens, false, true);
        }
        let learned = estimates.max_tokens(20, 20);
        assert!((1550..2200).contains(&learned), "{learned}");
        estimates.record_output(20, learned, true, true);
        assert!(estimates.max_tokens(20, 20) > learned);
    }

    #[test]
    fn answers_the_provider_did_not_count_leave_the_estimate_as_it_was() {
        let mut estimates = TokenEstimates::new(200, None);
        let configured = estimates.max_tokens(20, 20);
        for _ in 0..10 {
            estimates.record_output(20, 0, false, true);
        }
        assert_eq!(estimates.max_tokens(20, 20), configured);
    }

    #[test]
    fn max_tokens_never_exceeds_the_most_an_item_may_take() {
        let mut estimates = TokenEstimates::new(60, Some(4096));
        // A model that rambles: every answer runs to max_tokens and is truncated.
        for _ in 0..50 {
            let sent = estimates.max_tokens(2, 2);
            estimates.record_output(2, sent, true, true);
        }
        assert_eq!(estimates.max_tokens(2, 2), 2 * 60 + MARGIN_TOKENS as u32);
        // Answers longer than the cap (a provider ignoring max_tokens) do not raise it either.
        for _ in 0..50 {
            estimates.record_output(2, 1900, false, true);
        }
        assert_eq!(estimates.max_tokens(2, 2), 2 * 60 + MARGIN_TOKENS as u32);
        // Shorter answers bring it below the cap.
        for _ in 0..200 {
            estimates.record_output(2, 40, false, true);
        }
        assert!(
            estimates.max_tokens(2, 2) < 2 * 60,
            "{}",
            estimates.max_tokens(2, 2)
        );
    }

    #[test]
    fn a_round_truncated_on_one_estimate_raises_the_margin_once() {
        let mut estimates = TokenEstimates::new(200, None);
        for tokens in [1400, 1380, 1420, 1410, 1390, 1400] {
            estimates.record_output(20, tokens, false, true);
        }
        let before = estimates.margin_sigmas;
        let sent = estimates.max_tokens(20, 20);
        estimates.record_output(20, sent, true, true);
        let raised = estimates.margin_sigmas;
        assert!(raised > before && estimates.max_tokens(20, 20) > sent);
        // The rest of the round, sent with the old `max_tokens`, comes back truncated too:
        // the margin stays (the mean may still rise with what they show).
        for _ in 0..10 {
            let current = sent >= estimates.max_tokens(20, 20);
            estimates.record_output(20, sent, true, current);
        }
        assert_eq!(estimates.margin_sigmas, raised);
        // A truncation of a request sent on the raised estimate raises it again.
        let now = estimates.max_tokens(20, 20);
        estimates.record_output(20, now, true, true);
        assert!(estimates.margin_sigmas > raised);
        // Without the distinction, the round would have driven it to its most.
        let mut blind = TokenEstimates::new(200, None);
        for tokens in [1400, 1380, 1420, 1410, 1390, 1400] {
            blind.record_output(20, tokens, false, true);
        }
        for _ in 0..20 {
            blind.record_output(20, sent, true, true);
        }
        assert_eq!(blind.margin_sigmas, MAX_MARGIN_SIGMAS);
    }

    #[test]
    fn requests_far_smaller_than_the_runs_get_a_wider_margin() {
        let mut estimates = TokenEstimates::new(200, None);
        for tokens in [1400, 1380, 1420, 1410, 1390, 1400, 1450, 1350] {
            estimates.record_output(20, tokens, false, true);
        }
        let alone = [1, 4, 10, 40].map(|items| estimates.max_tokens(items, items));
        let beside_forty = [1, 4, 10, 40].map(|items| estimates.max_tokens(items, 40));
        // One item and four (a tenth of 40) get more room; ten and forty the same.
        assert!(beside_forty[0] > alone[0] && beside_forty[1] > alone[1]);
        assert_eq!(beside_forty[2..], alone[2..]);
        // One item beside 40: k² + 2 ln 40 squared standard deviations (about 3 for k = 1).
        let mean = estimates.output_tokens_per_item();
        let sd = estimates.output_variance_per_item.sqrt();
        let sigmas = (f64::from(beside_forty[0]) - mean - MARGIN_TOKENS) / sd;
        let expected = (estimates.margin_sigmas.powi(2) + 2.0 * 40f64.ln()).sqrt();
        assert!((sigmas - expected).abs() < 0.05, "{sigmas} vs {expected}");
    }

    #[test]
    fn context_window_bounds_max_tokens() {
        let mut estimates = TokenEstimates::new(200, Some(8000));
        estimates.record_prompt(20, 6000);
        assert_eq!(estimates.max_tokens(20, 20), 2000);
    }
}
