//! `run --resume`: what the controller keeps of a run and how it starts from it.

use std::time::Duration;

use crate::config::{ConfigError, ControllerConfig};
use crate::controller::Controller;
use crate::status::{ControllerState, DelayState, STATE_VERSION};

impl Controller {
    /// A controller that continues from a snapshot of an earlier run, with the job's
    /// (possibly edited) configuration. A snapshot of another format version is ignored
    /// (logged): what it held is only a head start.
    pub fn restore(
        config: ControllerConfig,
        state: ControllerState,
        now: Duration,
    ) -> Result<Self, ConfigError> {
        let mut controller = Self::new(config, now)?;
        if state.version != STATE_VERSION {
            tracing::warn!(
                found = state.version,
                expected = STATE_VERSION,
                "controller state of another version ignored; starting fresh"
            );
            return Ok(controller);
        }
        controller.batch = state.batch;
        controller
            .batch
            .set_range(controller.config.items_per_request);
        let announced = state
            .announced_per_minute
            .map(|limit| limit.map(|per_minute| per_minute / 60.0));
        controller
            .pacer
            .restore(announced, state.probed_requests_per_second, now);
        if let Some(cap) = state.overload_cap {
            controller.concurrency.set_overload_cap(cap);
        }
        if let Some(p90) = state.latency_p90_seconds {
            controller
                .latency
                .seed(Duration::from_secs_f64(p90), controller.batch.current());
        }
        controller.tokens = state.tokens;
        controller.tokens.set_limits(
            controller.config.context_window_tokens,
            controller.config.initial_output_tokens_per_item,
        );
        controller.counts = state.counts;
        // A server that now says other slots than it said when the level was found (or says
        // them for the first time) was restarted or replaced: the run starts as a fresh one
        // does, at the slots it says.
        let announced = controller.config.announced_slots();
        let same_server = |delay: &DelayState| announced.is_none() || delay.slots == announced;
        if let Some(delay) = state
            .delay
            .filter(|delay| controller.delay_limit_applies() && same_server(delay))
        {
            // Never above the slots the server says (a level its gauges had let past them
            // starts at them); below them is what the run measured (a server on too few cores
            // gains nothing from its last slots).
            let settled = announced.map_or(delay.settled, |slots| delay.settled.min(slots));
            // Below the job's start, on a server that does not say its slots, the server had
            // fewer slots than the job expected; it may have more again: doubling finds that
            // in one round.
            let bracketed = delay.bracketed
                && (announced.is_some() || settled >= controller.config.concurrency.start);
            controller.delay.resume_at(settled, bracketed);
            if bracketed {
                tracing::info!(
                    "the run had found the requests in flight this server serves best: it goes \
                     on with {} at a time",
                    controller.delay.limit()
                );
            } else {
                tracing::info!(
                    "the run had reached {} requests in flight on this server and was still \
                     climbing: it goes on from there",
                    controller.delay.limit()
                );
            }
        }
        Ok(controller)
    }

    /// What to keep for `run --resume`.
    pub fn snapshot(&self) -> ControllerState {
        ControllerState {
            version: STATE_VERSION,
            announced_per_minute: self
                .pacer
                .announced()
                .map(|rate| rate.map(|per_second| per_second * 60.0)),
            probed_requests_per_second: self.pacer.is_probing().then(|| self.pacer.probed_rate()),
            overload_cap: (self.concurrency.overload_cap()
                < f64::from(self.config.concurrency.max))
            .then(|| self.concurrency.overload_cap()),
            latency_p90_seconds: self
                .latency
                .model()
                .map(|model| model.p90(self.batch.current())),
            batch: self.batch.clone(),
            tokens: self.tokens.clone(),
            counts: self.counts,
            delay: self.delay_limit_applies().then(|| DelayState {
                settled: self.delay.settled(),
                bracketed: self.delay.bracketed(),
                slots: self.config.announced_slots(),
            }),
        }
    }
}
