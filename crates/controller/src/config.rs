//! Controller configuration, built by the caller from the job's `[limits]` and `[model]`
//! tables, and the tuning constants that are not part of the job file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A `{start, min, max}` range from the job file (`items_per_request`, `concurrency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartMinMax {
    pub start: u32,
    pub min: u32,
    pub max: u32,
}

impl StartMinMax {
    pub fn new(start: u32, min: u32, max: u32) -> Self {
        Self { start, min, max }
    }

    /// Clamps `value` into `[min, max]`.
    pub fn clamp(&self, value: u32) -> u32 {
        value.clamp(self.min, self.max)
    }
}

/// Everything the controller needs to know about the job before the first request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControllerConfig {
    /// `[limits] requests_per_minute`: a hard cap, never exceeded; also the starting rate.
    pub requests_per_minute: Option<f64>,
    /// `[limits] tokens_per_minute`: a hard cap on prompt + `max_tokens` reserved per minute.
    pub tokens_per_minute: Option<f64>,
    /// `[limits] items_per_request`.
    pub items_per_request: StartMinMax,
    /// `[limits] concurrency`: in-flight requests.
    pub concurrency: StartMinMax,
    /// `[model] max_output_tokens_per_item`: the most an item's answer may take. It is the
    /// output estimate until outputs are seen, and `max_tokens` never exceeds it per item.
    pub initial_output_tokens_per_item: u32,
    /// The model's context window in tokens, when known; `max_tokens` never exceeds what is
    /// left of it after the prompt.
    pub context_window_tokens: Option<u32>,
    /// `[model] request_timeout_s`: the longest a request may take; the controller proposes
    /// shorter timeouts once it has seen enough latencies.
    pub request_timeout: Duration,
    /// Seed of the controller's own random source (retry jitter).
    pub seed: u64,
    /// The requests the server says it works on at once (llama.cpp's `GET /props`,
    /// `total_slots`), when it says so: the run starts at that many requests in flight,
    /// within `concurrency`'s min and max, instead of at `concurrency.start`. What it then
    /// serves best is still measured.
    #[serde(default)]
    pub server_slots: Option<u32>,
}

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("limits.{key}: need 1 <= min <= start <= max, got start={start} min={min} max={max}")]
    BadRange {
        key: &'static str,
        start: u32,
        min: u32,
        max: u32,
    },
    #[error("limits.{key} must be a positive number, got {value}")]
    NotPositive { key: &'static str, value: f64 },
    #[error("model.max_output_tokens_per_item must be at least 1")]
    ZeroOutputEstimate,
    #[error("model.request_timeout_s must be at least one second")]
    TimeoutTooShort,
}

impl ControllerConfig {
    /// A configuration with the job file's defaults: no hard rate caps, 10 items per request
    /// (1..=40), concurrency 4 (1..=64), 200 output tokens per item, 120 s timeout.
    pub fn with_defaults() -> Self {
        Self {
            requests_per_minute: None,
            tokens_per_minute: None,
            items_per_request: StartMinMax::new(10, 1, 40),
            concurrency: StartMinMax::new(4, 1, 64),
            initial_output_tokens_per_item: 200,
            context_window_tokens: None,
            request_timeout: Duration::from_secs(120),
            seed: 0x5eed,
            server_slots: None,
        }
    }

    /// The requests in flight the run starts at: the server's announced slots within
    /// `concurrency`'s min and max, or `concurrency.start`.
    pub fn starting_concurrency(&self) -> StartMinMax {
        match self.announced_slots() {
            Some(slots) => StartMinMax {
                start: self.concurrency.clamp(slots),
                ..self.concurrency
            },
            None => self.concurrency,
        }
    }

    /// `server_slots`, when it names at least one.
    pub fn announced_slots(&self) -> Option<u32> {
        self.server_slots.filter(|slots| *slots > 0)
    }

    /// Checks the ranges and numbers; the error names the job-file key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, range) in [
            ("items_per_request", self.items_per_request),
            ("concurrency", self.concurrency),
        ] {
            if range.min == 0 || range.min > range.start || range.start > range.max {
                return Err(ConfigError::BadRange {
                    key,
                    start: range.start,
                    min: range.min,
                    max: range.max,
                });
            }
        }
        for (key, value) in [
            ("requests_per_minute", self.requests_per_minute),
            ("tokens_per_minute", self.tokens_per_minute),
        ] {
            if let Some(value) = value
                && !(value.is_finite() && value > 0.0)
            {
                return Err(ConfigError::NotPositive { key, value });
            }
        }
        if self.initial_output_tokens_per_item == 0 {
            return Err(ConfigError::ZeroOutputEstimate);
        }
        if self.request_timeout < Duration::from_secs(1) {
            return Err(ConfigError::TimeoutTooShort);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(ControllerConfig::with_defaults().validate(), Ok(()));
    }

    #[test]
    fn inverted_range_names_the_key() {
        let mut config = ControllerConfig::with_defaults();
        config.concurrency = StartMinMax::new(8, 10, 64);
        let error = config.validate().unwrap_err();
        assert!(error.to_string().contains("limits.concurrency"), "{error}");
    }

    #[test]
    fn zero_rate_is_refused() {
        let mut config = ControllerConfig::with_defaults();
        config.tokens_per_minute = Some(0.0);
        assert!(matches!(
            config.validate(),
            Err(ConfigError::NotPositive {
                key: "tokens_per_minute",
                ..
            })
        ));
    }
}
