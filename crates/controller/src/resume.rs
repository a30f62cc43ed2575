//! `run --resume`: what the controller keeps of a run and how it starts from it.

use std::time::Duration;

use crate::config::{ConfigError, ControllerConfig};
use crate::controller::Controller;
use crate::status::{ControllerState, DelayState, STATE_VERSION};

/// Whose level a controller takes: its own run's (`run --resume`) or an earlier run's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Found {
    ThisRun,
    EarlierRun,
}

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
        if let Some(delay) = state.delay {
            controller.take_level(delay, Found::ThisRun);
        }
        Ok(controller)
    }

    /// A fresh run on a server that an earlier run of the same job measured: it starts at the
    /// requests in flight that run had settled on (`earlier.delay`, from its saved state)
    /// instead of at `concurrency.start`, by the rules `restore` applies to a resumed run (a
    /// state of another format version is ignored; the level within the job's range, never
    /// above the slots the server says, not at all where it says other slots than it said
    /// then), but as a start, not as a level found: slow start goes on from it, doubling while
    /// the server delivers more and going below it by Vegas's estimate when it queues (the
    /// server may have changed since). A state with no level (the provider announced rate
    /// limits) changes nothing. Which earlier run, on which server, is the caller's choice.
    pub fn start_where_found(&mut self, earlier: &ControllerState) {
        if earlier.version != STATE_VERSION {
            tracing::debug!(
                found = earlier.version,
                "an earlier run's controller state of another version ignored"
            );
            return;
        }
        if let Some(delay) = earlier.delay {
            self.take_level(delay, Found::EarlierRun);
        }
    }

    fn take_level(&mut self, delay: DelayState, found: Found) {
        // A server that now says other slots than it said when the level was found (or says
        // them for the first time) was restarted or replaced: the run starts as a fresh one
        // does, at the slots it says.
        let announced = self.config.announced_slots();
        if !self.delay_limit_applies() || (announced.is_some() && delay.slots != announced) {
            return;
        }
        // Never above the slots the server says (a level its gauges had let past them starts
        // at them); below them is what the run measured (a server on too few cores gains
        // nothing from its last slots).
        let settled = announced.map_or(delay.settled, |slots| delay.settled.min(slots));
        // Below the job's start, on a server that does not say its slots, the server had
        // fewer slots than the job expected; it may have more again: doubling finds that in
        // one round. An earlier run's level is where this one starts, not what it measured.
        let bracketed = found == Found::ThisRun
            && delay.bracketed
            && (announced.is_some() || settled >= self.config.concurrency.start);
        self.delay.resume_at(settled, bracketed);
        let level = self.delay.limit();
        match (found, bracketed) {
            (Found::ThisRun, true) => tracing::info!(
                "the run had found the requests in flight this server serves best: it goes \
                 on with {level} at a time"
            ),
            (Found::ThisRun, false) => tracing::info!(
                "the run had reached {level} requests in flight on this server and was still \
                 climbing: it goes on from there"
            ),
            (Found::EarlierRun, _) => tracing::info!(
                "the job's last run on this server settled on {} requests in flight: this run \
                 starts from {level} and measures the server afresh",
                delay.settled
            ),
        }
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
            server: None,
            model: None,
        }
    }
}
