//! This worker's side of the provider account's shared rate (see `store::rate`): before each
//! claim the dispatcher takes one request and its estimated tokens from the account's bucket in
//! the database, and waits when it is empty; what the estimate got wrong is corrected on the
//! next take; limits announced by responses and 429s are published for every worker.
//!
//! Only for stores that share runs (PostgreSQL). With SQLite one process owns the run and its
//! controller's own pacer is the whole story, so this costs nothing there.

use std::time::Duration;

use backfill_controller::{Outcome, RateLimitInfo};

use crate::job::{ChatModel, Limits};
use crate::store::rate::account_key;
use crate::store::{RateCaps, RateCost, RateReport, RateTake, Store};

pub struct SharedRate {
    enabled: bool,
    account: String,
    caps: RateCaps,
    /// Prompt tokens per item of the last packed request, for the next take's estimate.
    prompt_tokens_per_item: f64,
    /// Tokens charged for the last grant (the estimate, then the packed request's cost), until
    /// the request is sent or refunded.
    granted_tokens: Option<f64>,
    /// What earlier takes got wrong, applied with the next one.
    correction: RateCost,
    /// Limits last published, so an unchanged header is not written again.
    published: (Option<u64>, Option<u64>),
}

impl SharedRate {
    pub fn new(store: &dyn Store, chat: &ChatModel, limits: &Limits) -> Self {
        SharedRate {
            enabled: store.shares_runs(),
            account: account_key(&chat.base_url, &chat.api_key_env, &chat.name),
            caps: RateCaps { requests_per_minute: limits.requests_per_minute, tokens_per_minute: limits.tokens_per_minute },
            prompt_tokens_per_item: 0.0,
            granted_tokens: None,
            correction: RateCost::default(),
            published: (None, None),
        }
    }

    /// Takes a request of `items` items and up to `max_tokens` output tokens from the shared
    /// bucket: `None` when granted, else how long to wait before asking again.
    pub async fn take(&mut self, store: &dyn Store, items: u32, max_tokens: u32) -> anyhow::Result<Option<Duration>> {
        if !self.enabled {
            return Ok(None);
        }
        let tokens = self.prompt_tokens_per_item * f64::from(items) + f64::from(max_tokens);
        let take = RateTake {
            account: self.account.clone(),
            cost: RateCost { requests: 1.0, tokens },
            correction: self.correction,
            caps: self.caps,
        };
        let wait = store.take_rate(&take).await?;
        self.correction = RateCost::default();
        if wait.is_zero() {
            self.granted_tokens = Some(tokens);
            Ok(None)
        } else {
            Ok(Some(wait))
        }
    }

    /// The granted request was packed: it costs `tokens` (prompt + max_tokens) for `items`.
    pub fn packed(&mut self, items: usize, prompt_tokens: u64, tokens: u64) {
        if let Some(estimate) = self.granted_tokens.replace(tokens as f64) {
            self.correction.tokens += tokens as f64 - estimate;
        }
        if items > 0 {
            self.prompt_tokens_per_item = prompt_tokens as f64 / items as f64;
        }
    }

    /// The granted request went out: nothing more to correct for it.
    pub fn sent(&mut self) {
        self.granted_tokens = None;
    }

    /// The granted request was not sent to the provider (nothing to claim, the budget cap, an
    /// answer from the cache): refund it.
    pub fn unused(&mut self) {
        if let Some(estimate) = self.granted_tokens.take() {
            self.correction.requests -= 1.0;
            self.correction.tokens -= estimate;
        }
    }

    /// Publishes what a response said: new announced limits, or a 429 and its pause.
    pub async fn learn(&mut self, store: &dyn Store, outcome: &Outcome, info: &RateLimitInfo) {
        if !self.enabled {
            return;
        }
        let rate_limited = matches!(outcome, Outcome::RateLimited);
        let announced = (info.requests.limit, info.tokens.limit);
        let new_limits = (announced.0.is_some() && announced.0 != self.published.0)
            || (announced.1.is_some() && announced.1 != self.published.1);
        if !rate_limited && !new_limits {
            return;
        }
        let report = RateReport {
            announced_requests_per_minute: announced.0.map(|l| l as f64),
            announced_tokens_per_minute: announced.1.map(|l| l as f64),
            rate_limited,
            retry_after: info.retry_after,
        };
        match store.report_rate(&self.account, &self.caps, &report).await {
            Ok(()) => {
                self.published = (announced.0.or(self.published.0), announced.1.or(self.published.1));
            }
            Err(e) => tracing::warn!("could not share what the provider said about its limits: {e:#}"),
        }
    }
}
