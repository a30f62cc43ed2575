//! Preparing and submitting a provider batch: claim and pack requests exactly as the
//! synchronous path does, reserve each in the ledger under the batch's owner, hand the items
//! over to the batch, keep the request lines, upload, create — recording each step first.

use crate::pricing::Tier;
use crate::provider::{ChatRequest, request_body, response_format};
use crate::store::{BatchPhase, BatchRecord, Claimed, ItemChange, ItemUpdate, NewCall, now_ms};
use crate::store::failpoint::crash;

use super::BatchRunner;

/// The custom id of a request: its ledger row.
pub(super) fn custom_id(call_id: i64) -> String {
    format!("backfill-call-{call_id}")
}

/// The call id in a custom id, when it is one of ours.
pub(super) fn call_id_of(custom_id: &str) -> Option<i64> {
    custom_id.strip_prefix("backfill-call-")?.parse().ok()
}

/// A custom id at least as long as any real one, to size lines before their call exists.
const LONGEST_CUSTOM_ID: &str = "backfill-call-9223372036854775807";

impl BatchRunner {
    /// Prepares and submits one provider batch from the ready items. `false` when there was
    /// nothing to submit (or the budget allows no more).
    pub(super) async fn submit(&mut self) -> anyhow::Result<bool> {
        let ctx = self.ctx.clone();
        let per_request = ctx.chat_items_per_request();
        let first = ctx.store.claim(&ctx.tables, ctx.run_id, &ctx.worker, per_request, ctx.lease).await?;
        if first.items.is_empty() {
            return Ok(false);
        }
        let limits = self.api.limits();
        let mut batch = ctx.store.create_batch(ctx.run_id, self.api.dialect().as_str()).await?;
        let owner = batch.owner();
        let mut jsonl: Vec<u8> = Vec::new();
        let mut leases = Vec::new();
        let mut requests = 0u64;
        let mut next = Some(first.items);
        while requests < limits.max_requests as u64 {
            let mut claimed = match next.take() {
                Some(items) => items,
                None => ctx.store.claim(&ctx.tables, ctx.run_id, &ctx.worker, per_request, ctx.lease).await?.items,
            };
            if claimed.is_empty() {
                break;
            }
            let tier = claimed[0].tier;
            let model = ctx.model(tier).to_owned();
            let rows: Vec<_> = claimed.iter().map(|c| c.item.clone()).collect();
            let packed = ctx.packer.pack(&rows, f64::from(ctx.chat.max_output_tokens_per_item));
            if packed.items < claimed.len() {
                let rest: Vec<_> = claimed.split_off(packed.items).into_iter().map(|c| c.lease).collect();
                ctx.store.release(ctx.run_id, &rest).await?;
            }
            let ids: Vec<String> = claimed.iter().map(|c| c.item.id.clone()).collect();
            let format = response_format(ctx.chat.structured_output, &ids, &ctx.shape);
            let request = ChatRequest::new(&model, packed.system.as_deref(), packed.user, ctx.chat.temperature, packed.max_tokens, format);
            let size = self.api.line(LONGEST_CUSTOM_ID, &request).len() + 1;
            if requests > 0 && jsonl.len() + size > limits.max_bytes {
                // Full: these items wait for the next batch.
                ctx.store.release(ctx.run_id, &claimed.into_iter().map(|c| c.lease).collect::<Vec<_>>()).await?;
                break;
            }
            let (_, hash) = request_body(&request);
            let estimate = ctx.price(tier, &model).estimate(packed.prompt_tokens * 11 / 10, u64::from(packed.max_tokens), Tier::Batch);
            let call = NewCall {
                run_id: ctx.run_id,
                worker: owner.clone(),
                model,
                price_tier: Tier::Batch,
                request_hash: Some(hash),
                item_ids: ids,
                concurrency: 0,
                estimated: estimate,
                started_at: now_ms(),
            };
            let Some(call_id) = ctx.store.reserve_call(&call, ctx.cap).await? else {
                ctx.store.release(ctx.run_id, &claimed.into_iter().map(|c| c.lease).collect::<Vec<_>>()).await?;
                tracing::info!("the budget cap allows no more requests: no more batches are prepared");
                self.budget_reached = true;
                break;
            };
            self.progress.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            jsonl.extend_from_slice(self.api.line(&custom_id(call_id), &request).as_bytes());
            jsonl.push(b'\n');
            leases.extend(claimed.into_iter().map(|c: Claimed| c.lease));
            requests += 1;
        }
        if requests == 0 {
            batch.phase = BatchPhase::Discarded;
            batch.error = Some("nothing fitted the budget".into());
            ctx.store.update_batch(&batch).await?;
            return Ok(false);
        }
        ctx.store.hold(ctx.run_id, &leases, &owner).await?;
        ctx.store.set_batch_input(batch.id, Some(&jsonl)).await?;
        batch.requests = requests;
        batch.bytes = jsonl.len() as u64;
        ctx.store.update_batch(&batch).await?;
        tracing::info!(batch = batch.id, requests, items = leases.len(), bytes = jsonl.len(), "batch prepared");
        crash("batch_before_upload");

        let file_id = match self.api.upload(&jsonl).await {
            Ok(id) => id,
            Err(e) => {
                // Nothing reached the provider as a batch: the items go back to the queue.
                self.discard(batch, &format!("the upload failed: {e}")).await?;
                return Err(e.into());
            }
        };
        crash("batch_after_upload");
        batch.input_file_id = file_id;
        batch.phase = BatchPhase::Uploaded;
        ctx.store.update_batch(&batch).await?;
        self.create(batch).await?;
        Ok(!self.budget_reached)
    }

    /// Creates the provider batch from the kept request lines.
    pub(super) async fn create(&mut self, mut batch: BatchRecord) -> anyhow::Result<()> {
        let Some(jsonl) = self.ctx.store.batch_input(batch.id).await? else {
            return self.discard(batch, "its request lines were lost before it was created").await;
        };
        batch.phase = BatchPhase::Creating;
        self.ctx.store.update_batch(&batch).await?;
        crash("batch_before_create");
        let provider_id = self.api.create(batch.input_file_id.as_deref(), &jsonl, &self.tag(&batch)).await?;
        crash("batch_after_create");
        self.submitted(batch, provider_id).await
    }

    /// A batch whose creation was under way when the process stopped: the provider may have
    /// created it. Adopt it if so, else create it now.
    pub(super) async fn find_or_create(&mut self, batch: BatchRecord) -> anyhow::Result<()> {
        let since = batch.updated_at;
        match self.api.find(batch.input_file_id.as_deref(), &self.tag(&batch), since, batch.requests).await? {
            Some(provider_id) => {
                tracing::info!(batch = batch.id, provider = %provider_id, "found the batch created before the process stopped");
                self.submitted(batch, provider_id).await
            }
            None => self.create(batch).await,
        }
    }

    async fn submitted(&mut self, mut batch: BatchRecord, provider_id: String) -> anyhow::Result<()> {
        let poll = self.ctx.chat.batch.poll;
        batch.provider_batch_id = Some(provider_id.clone());
        batch.phase = BatchPhase::Submitted;
        batch.submitted_at = Some(now_ms());
        batch.poll_interval_ms = poll.as_millis() as i64;
        batch.next_poll_at = now_ms() + poll.as_millis() as i64;
        self.ctx.store.update_batch(&batch).await?;
        self.ctx.store.set_batch_input(batch.id, None).await?;
        tracing::info!(batch = batch.id, provider = %provider_id, requests = batch.requests, "batch submitted");
        Ok(())
    }

    /// Identifies the batch in the provider's listing (OpenAI metadata).
    fn tag(&self, batch: &BatchRecord) -> String {
        format!("{}:run{}:batch{}:{}", self.ctx.tables.table.raw(), batch.run_id, batch.id, batch.created_at)
    }

    /// Gives up a batch the provider never received: its calls settle at zero (nothing was
    /// sent) and its items go back to the queue, no attempt counted.
    pub(super) async fn discard(&mut self, mut batch: BatchRecord, why: &str) -> anyhow::Result<()> {
        let owner = batch.owner();
        let held = self.ctx.store.held(self.ctx.run_id, &owner).await?;
        for call in self.ctx.store.calls_of(self.ctx.run_id, &owner).await?.into_iter().filter(|c| c.open) {
            let items = held
                .iter()
                .filter(|h| call.item_ids.contains(&h.lease.item_id))
                .map(|h| ItemUpdate {
                    lease: h.lease.clone(),
                    change: ItemChange::Retry {
                        attempts: h.attempts,
                        tier: h.tier,
                        group_limit: None,
                        not_before: 0,
                        error: why.to_owned(),
                        reason: "released".into(),
                    },
                    output: None,
                })
                .collect();
            let write = crate::store::BatchWrite {
                run_id: self.ctx.run_id,
                call_id: call.call_id,
                settle: crate::store::CallSettle {
                    outcome: "not_sent".into(),
                    cost_source: crate::ledger::CostSource::None.as_str().into(),
                    error: Some(why.to_owned()),
                    ..Default::default()
                },
                items,
            };
            if super::super::writer::write_one(self.ctx.store.as_ref(), &self.ctx.tables, &write, &self.progress).await.is_none() {
                anyhow::bail!("{}", self.progress.writer_failure().unwrap_or_default());
            }
        }
        batch.phase = BatchPhase::Discarded;
        batch.error = Some(why.to_owned());
        self.ctx.store.update_batch(&batch).await?;
        self.ctx.store.set_batch_input(batch.id, None).await?;
        tracing::info!(batch = batch.id, "batch discarded: {why}");
        Ok(())
    }
}
