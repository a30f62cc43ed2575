//! Collecting an ended batch: every result line goes through the same validation,
//! post-processing, writer and ledger as a synchronous answer, one transaction per request,
//! billed at the batch price. Requests without a result (expired, cancelled) and failed ones
//! put their items back in the queue. Collecting again after a crash skips what is settled.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use super::BatchRunner;
use super::submit::{call_id_of, custom_id_prefix};
use crate::ledger::{CallOutcome, CostSource};
use crate::store::Item;
use crate::pricing::{Picos, Tier};
use crate::provider::batch::RequestResult;
use crate::provider::{CallError, parse_completion};
use crate::runner::sync::{Answer, Call, Request, conclude};
use crate::runner::policy::Setback;
use crate::store::failpoint::crash;
use crate::store::{BatchPhase, BatchRecord, BatchWrite, CallSettle, Claimed, HeldItem, ItemUpdate, OwnedCall, now_ms};

impl BatchRunner {
    pub(super) async fn collect(&mut self, mut batch: BatchRecord) -> anyhow::Result<()> {
        let owner = batch.owner();
        let open: Vec<OwnedCall> = self
            .ctx
            .store
            .calls_of(self.ctx.run_id, &owner)
            .await?
            .into_iter()
            .filter(|c| c.open && !self.written.contains(&c.call_id))
            .collect();
        if !open.is_empty() {
            let provider_id = batch.provider_batch_id.clone().unwrap_or_default();
            let status = crate::provider::batch::BatchStatus {
                status: batch.provider_status.clone().unwrap_or_default(),
                ended: true,
                output_file_id: batch.output_file_id.clone(),
                error_file_id: batch.error_file_id.clone(),
                results_url: batch.results_url.clone(),
                ..Default::default()
            };
            let lines = self.api.results(&provider_id, &status).await?;
            crash("batch_during_download");
            let prefix = custom_id_prefix(&self.tag(&batch));
            let results: HashMap<i64, RequestResult> =
                lines.into_iter().filter_map(|l| Some((call_id_of(&prefix, &l.custom_id)?, l.result))).collect();
            let held: HashMap<String, HeldItem> =
                self.ctx.store.held(self.ctx.run_id, &owner).await?.into_iter().map(|h| (h.lease.item_id.clone(), h)).collect();
            let latency = match (batch.submitted_at, batch.ended_at) {
                (Some(a), Some(b)) => Duration::from_millis((b - a).max(0) as u64),
                _ => Duration::ZERO,
            };
            let not_run = match batch.provider_status.as_deref() {
                Some("failed") => format!("the batch failed at the provider: {}", batch.error.clone().unwrap_or_default()),
                Some(status) => format!("not run: the batch ended {status}"),
                None => "not run".to_string(),
            };
            for call in open {
                let write = self.result_write(&call, results.get(&call.call_id), &held, latency, &not_run);
                if crate::runner::writer::write_one(self.ctx.store.as_ref(), &self.ctx.tables, &write, &self.progress).await.is_none() {
                    anyhow::bail!("{}", self.progress.writer_failure().unwrap_or_default());
                }
                self.written.insert(call.call_id);
                crash("batch_during_writes");
            }
        }
        batch.phase = BatchPhase::Collected;
        self.ctx.store.update_batch(&batch).await?;
        tracing::info!(batch = batch.id, provider = ?batch.provider_batch_id, "batch collected");
        Ok(())
    }

    /// The write for one request of the batch.
    fn result_write(
        &self,
        call: &OwnedCall,
        result: Option<&RequestResult>,
        held: &HashMap<String, HeldItem>,
        latency: Duration,
        not_run: &str,
    ) -> BatchWrite {
        let ctx = &self.ctx;
        let claimed: Vec<Claimed> = call
            .item_ids
            .iter()
            .filter_map(|id| held.get(id))
            .map(|h| Claimed {
                lease: h.lease.clone(),
                attempts: h.attempts,
                tier: h.tier,
                item: Item { id: h.lease.item_id.clone(), fields: Vec::new() },
            })
            .collect();
        match result {
            Some(RequestResult::Answered { body }) => {
                let request = Request::from_ledger(claimed, call.model.clone(), call.request_hash.clone().unwrap_or_default(), Tier::Batch);
                let answered = Call { call_id: call.call_id, ticket: None, estimate: call.estimated, answer: Answer::Batch, request };
                let outcome = parse_completion(body)
                    .map(|completion| (completion, Vec::new()))
                    .map_err(|reason| CallError::BadOutput { reason, status: 200, body: body.clone() });
                conclude(ctx, answered, outcome, latency).write
            }
            Some(RequestResult::Failed { status, message }) => {
                // A request the provider could not run: not billed. A client error is retried
                // (then split) like a malformed answer; anything else like a server error.
                let setback = match status {
                    Some(400..=499) if *status != Some(429) => Setback::Malformed(message.clone()),
                    _ => Setback::Transient(message.clone()),
                };
                self.setback_write(call, &claimed, &setback, CallOutcome::BatchError, *status, message)
            }
            Some(RequestResult::NotRun { why }) => self.setback_write(call, &claimed, &Setback::Released, CallOutcome::NotRun, None, why),
            None => self.setback_write(call, &claimed, &Setback::Released, CallOutcome::NotRun, None, not_run),
        }
    }

    fn setback_write(&self, call: &OwnedCall, claimed: &[Claimed], setback: &Setback, outcome: CallOutcome, status: Option<u16>, why: &str) -> BatchWrite {
        let now = now_ms();
        let items = claimed
            .iter()
            .map(|c| ItemUpdate {
                lease: c.lease.clone(),
                change: self.ctx.policy.next(setback, c.attempts, c.tier, claimed.len(), now, fastrand::f64()),
                output: None,
            })
            .collect();
        BatchWrite {
            run_id: self.ctx.run_id,
            call_id: call.call_id,
            settle: CallSettle {
                http_status: status,
                outcome: outcome.as_str().into(),
                cost: Picos::ZERO,
                cost_source: CostSource::None.as_str().into(),
                error: Some(format!("{why} (call {})", call.call_id)),
                content: Some(json!({ "batch_result": outcome.as_str(), "detail": why }).to_string()),
                ..CallSettle::default()
            },
            items,
        }
    }
}
