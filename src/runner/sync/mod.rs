//! The synchronous engine: the dispatcher (`dispatch.rs`) asks the controller what to send,
//! claims and packs a request, reserves its cost and spawns a call task (`call.rs`) that sends
//! it, validates and post-processes the answer and concludes it into one write. Before it
//! dispatches, calls a crash left answered in the response cache are settled from it.

mod breaker;
mod budget;
mod call;
pub(crate) mod cut_prompts;
pub(crate) use call::error_outcome;
mod dispatch;
#[cfg(test)]
mod dispatch_tests;
mod resends;
mod shared_rate;
mod streams;

use std::sync::Arc;
use std::time::Duration;

use backfill_controller::{Controller, ControllerConfig, ControllerState, ControllerStatus, StartMinMax};
use tokio_util::sync::CancellationToken;

pub use call::{Answer, Call, Request, SentAs, conclude};
use dispatch::Dispatcher;

use super::context::RunContext;
use super::progress::Progress;
use super::session::{Engine, Figures, Session, Stop};
use super::summary::ControllerSummary;
use crate::exit::usage;
use crate::job::ChatModel;
use crate::store::RunRecord;

/// Synchronous calls paced by the adaptive controller.
pub struct SyncEngine {
    dispatcher: Dispatcher,
}

impl SyncEngine {
    pub fn new(ctx: Arc<RunContext>, controller: Controller, session: &Session) -> SyncEngine {
        SyncEngine { dispatcher: Dispatcher::new(ctx, controller, session.writer(), session.written.clone(), session.progress.clone()) }
    }

    /// Calls lost in a crash whose answer had reached the cache are settled from it: their
    /// items get the answer they were billed for, and nothing is paid twice.
    pub async fn replay_lost_calls(&mut self) -> anyhow::Result<()> {
        let ctx = self.dispatcher.ctx.clone();
        if !ctx.cache.enabled {
            return Ok(());
        }
        for lost in ctx.store.lost_calls(ctx.run_id).await? {
            let Some(claimed) = ctx.store.claim_ids(&ctx.tables, ctx.run_id, &ctx.worker, &lost.item_ids, ctx.lease).await? else {
                continue;
            };
            let Some(body) = ctx.store.cache_get(&lost.request_hash).await? else {
                let leases: Vec<_> = claimed.into_iter().map(|c| c.lease).collect();
                ctx.store.release(ctx.run_id, &leases).await?;
                continue;
            };
            tracing::info!(call = lost.call_id, items = claimed.len(), "settling a call lost in a crash from its cached answer");
            let request = Request::from_ledger(claimed, lost.model, lost.request_hash, ctx.price_column);
            let call = Call { call_id: lost.call_id, ticket: None, estimate: lost.estimated, answer: Answer::Replayed(body), request };
            let concluded = call::execute(ctx.clone(), call).await;
            self.dispatcher.finish(Ok(concluded)).await?;
        }
        Ok(())
    }

    /// Dispatches until the queue drains or something stops the run.
    pub async fn dispatch(&mut self, shutdown: &CancellationToken) -> anyhow::Result<Stop> {
        self.dispatcher.run(shutdown).await
    }
}

impl Engine for SyncEngine {
    type Tally = ControllerStatus;

    async fn work(&mut self, _session: &Session, shutdown: &CancellationToken) -> anyhow::Result<Stop> {
        self.replay_lost_calls().await?;
        self.dispatch(shutdown).await
    }

    fn end(self) -> ControllerStatus {
        self.dispatcher.controller.status()
    }

    fn figures(status: ControllerStatus, progress: &Progress) -> Figures {
        let counts = status.counts;
        let controller = ControllerSummary {
            requests: progress.requests.load(std::sync::atomic::Ordering::Relaxed),
            requests_per_second_limit: Some(status.requests_per_second).filter(|rate| rate.is_finite()),
            max_in_flight: counts.max_in_flight,
            concurrency_limit: status.concurrency_limit,
            items_per_request: if counts.requests_sent == 0 { 0.0 } else { counts.items_sent as f64 / counts.requests_sent as f64 },
            items_per_request_limit: status.items_per_request,
            rate_limited: counts.rate_limited,
            timeouts: counts.timed_out.saturating_sub(counts.hedged_requests),
            hedged_requests: counts.hedged_requests,
            hedged_items: counts.hedged_items,
            server_timed_answers: counts.server_timed,
            first_chunk_answers: counts.first_chunk_answers,
            server_slots: status.server_slots,
            ..ControllerSummary::default()
        };
        Figures { controller, compute: None }
    }
}

/// The controller for a chat job: the job's limits, or the state the run saved for `--resume`;
/// a fresh run starts at the requests in flight `earlier` (the state the job's last run on
/// this server and model saved, `earlier_state`) had settled on.
pub fn controller_for(ctx: &RunContext, run: &RunRecord, earlier: Option<ControllerState>) -> anyhow::Result<Controller> {
    let (limits, chat) = (&ctx.limits, &ctx.chat);
    let config = ControllerConfig {
        requests_per_minute: limits.requests_per_minute,
        tokens_per_minute: limits.tokens_per_minute,
        items_per_request: StartMinMax::new(limits.items_per_request.start, limits.items_per_request.min, limits.items_per_request.max),
        concurrency: StartMinMax::new(limits.concurrency.start, limits.concurrency.min, limits.concurrency.max),
        initial_output_tokens_per_item: chat.max_output_tokens_per_item,
        context_window_tokens: Some(chat.context_window),
        request_timeout: chat.request_timeout.max(Duration::from_secs(1)),
        seed: fastrand::u64(..),
        server_slots: ctx.server.map(|server| server.slots),
    };
    let shared = ctx.store.shares_runs();
    let restored = run
        .controller_state
        .as_deref()
        .and_then(|s| match serde_json::from_str::<ControllerState>(s) {
            Ok(state) => Some(state),
            Err(e) => {
                // Only a head start is lost: the run goes on as a fresh one would.
                tracing::warn!("the run's saved controller state could not be read ({e}): the controller starts afresh");
                None
            }
        })
        .map(|mut state| {
            // On a store several workers share a run on, the saved level of requests in flight
            // is one worker's share of the server (whichever saved last): a worker joining the
            // others would add a whole share to theirs. It starts as a fresh run does. So does
            // a run whose job now names another server or model than the level was found on
            // (a state saved before they were named keeps its level).
            let elsewhere = state.server.as_ref().is_some_and(|server| *server != server_name(chat))
                || state.model.as_ref().is_some_and(|model| *model != chat.name);
            if shared || elsewhere {
                state.delay = None;
            }
            Controller::restore(config.clone(), state, Duration::ZERO)
        });
    let controller = match restored {
        Some(Ok(controller)) => {
            tracing::info!("controller resumed from the run's saved state");
            controller
        }
        _ => {
            let mut controller = Controller::new(config, Duration::ZERO).map_err(|e| usage(e.to_string()))?;
            if let Some(earlier) = earlier.filter(|earlier| !shared && same_server(earlier, chat)) {
                controller.start_where_found(&earlier);
            }
            controller
        }
    };
    Ok(controller)
}

/// Earlier runs of the job whose saved states `earlier_state` looks through for one measured on
/// this server and model.
const EARLIER_STATES: u64 = 10;

/// The state the job's latest earlier run against this server and model saved (within the
/// last `EARLIER_STATES` runs that saved one), when this run has none of its own and one
/// worker runs it: where on the server that run settled is where this one starts
/// (`controller_for`). A store that cannot say gives none: only a head start is lost.
pub async fn earlier_state(ctx: &RunContext, run: &RunRecord) -> Option<ControllerState> {
    if run.controller_state.is_some() || ctx.store.shares_runs() {
        return None;
    }
    let states = match ctx.store.earlier_controller_states(&run.job, run.id, EARLIER_STATES).await {
        Ok(states) => states,
        Err(e) => {
            tracing::debug!("the job's earlier runs could not be read ({e:#}): the controller starts at the job's limits");
            return None;
        }
    };
    states
        .iter()
        .filter_map(|state| serde_json::from_str::<ControllerState>(state).ok())
        .find(|state| same_server(state, &ctx.chat))
}

/// Whether `state` names this job's server (its base URL without credentials, query or
/// fragment, `secret::public_url`) and model.
fn same_server(state: &ControllerState, chat: &ChatModel) -> bool {
    state.server.as_deref() == Some(server_name(chat).as_str()) && state.model.as_deref() == Some(chat.name.as_str())
}

/// The server a controller state names: the base URL as `secret::public_url` gives it, with no
/// credential in it.
pub fn server_name(chat: &ChatModel) -> String {
    crate::secret::public_url(&chat.base_url)
}
