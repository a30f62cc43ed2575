//! Preparing and submitting a provider batch: claim and pack requests exactly as the
//! synchronous path does, reserve each in the ledger under the batch's owner, hand the items
//! over to the batch, keep the request lines, upload, create — recording each step first.

use std::time::Instant;

use crate::pricing::Tier;
use crate::provider::batch::{Found, Wanted};
use crate::store::{BatchPhase, BatchRecord, Claimed, ItemChange, ItemUpdate, NewCall, now_ms};
use crate::store::failpoint::crash;

use super::BatchRunner;

/// What the custom ids of a batch start with: `bf-` and 16 hex digits of a hash of the
/// batch's tag, so the requests themselves prove whose batch it is (Anthropic shows nothing
/// else of a batch's origin).
pub(super) fn custom_id_prefix(tag: &str) -> String {
    use sha2::{Digest, Sha256};
    format!("bf-{}-", &hex::encode(Sha256::digest(tag.as_bytes()))[..16])
}

/// The custom id of a request: the batch's prefix and its ledger row.
pub(super) fn custom_id(prefix: &str, call_id: i64) -> String {
    format!("{prefix}{call_id}")
}

/// Custom ids of batches made before they carried their batch's prefix.
const LEGACY_PREFIX: &str = "backfill-call-";

/// The call id in a custom id of this batch (`prefix`, or the older `backfill-call-N`).
pub(super) fn call_id_of(prefix: &str, custom_id: &str) -> Option<i64> {
    custom_id.strip_prefix(prefix).or_else(|| custom_id.strip_prefix(LEGACY_PREFIX))?.parse().ok()
}

/// A custom id at least as long as any real one, to size lines before their call exists.
const LONGEST_CUSTOM_ID: &str = "bf-0123456789abcdef-9223372036854775807";

impl BatchRunner {
    /// Prepares and submits one provider batch from the ready items. `false` when there was
    /// nothing to submit (or the budget allows no more).
    pub(super) async fn submit(&mut self) -> anyhow::Result<bool> {
        let ctx = self.ctx.clone();
        let per_request = ctx.items_per_request;
        let first = ctx.store.claim(&ctx.tables, ctx.run_id, &ctx.worker, per_request, ctx.lease).await?;
        if first.items.is_empty() {
            return Ok(false);
        }
        let limits = self.api.limits();
        let mut batch = ctx.store.create_batch(ctx.run_id, self.api.dialect().as_str()).await?;
        let owner = batch.owner();
        let prefix = custom_id_prefix(&self.tag(&batch));
        let mut jsonl: Vec<u8> = Vec::new();
        let mut leases = Vec::new();
        let mut requests = 0u64;
        let mut next = Some(first.items);
        while requests < limits.max_requests as u64 {
            let claimed = match next.take() {
                Some(items) => items,
                None => ctx.store.claim(&ctx.tables, ctx.run_id, &ctx.worker, per_request, ctx.lease).await?.items,
            };
            if claimed.is_empty() {
                break;
            }
            let packed = ctx.pack(claimed, f64::from(ctx.chat.max_output_tokens_per_item), Tier::Batch);
            if !packed.rest.is_empty() {
                ctx.store.release(ctx.run_id, &packed.rest.into_iter().map(|c| c.lease).collect::<Vec<_>>()).await?;
            }
            let (request, chat) = (packed.request, packed.chat);
            let size = self.api.line(LONGEST_CUSTOM_ID, &chat).len() + 1;
            if requests > 0 && jsonl.len() + size > limits.max_bytes {
                // Full: these items wait for the next batch.
                ctx.store.release(ctx.run_id, &request.claimed.into_iter().map(|c| c.lease).collect::<Vec<_>>()).await?;
                break;
            }
            let estimate = ctx.price(request.fallback).estimate(request.prompt_tokens * 11 / 10, u64::from(request.max_tokens), Tier::Batch);
            let call = NewCall {
                run_id: ctx.run_id,
                worker: owner.clone(),
                model: request.model,
                price_tier: Tier::Batch,
                request_hash: Some(request.hash),
                item_ids: request.claimed.iter().map(|c| c.item.id.clone()).collect(),
                concurrency: 0,
                estimated: estimate,
                started_at: now_ms(),
            };
            let claimed = request.claimed;
            let Some(call_id) = ctx.store.reserve_call(&call, ctx.cap).await? else {
                ctx.store.release(ctx.run_id, &claimed.into_iter().map(|c| c.lease).collect::<Vec<_>>()).await?;
                tracing::info!("the budget cap allows no more requests: no more batches are prepared");
                self.budget_reached = true;
                break;
            };
            self.progress.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            jsonl.extend_from_slice(self.api.line(&custom_id(&prefix, call_id), &chat).as_bytes());
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
    /// created it. Adopt it if so, create it if provably not; while a batch that may be it
    /// cannot be proven either way (Anthropic: until it ends), wait and look again later.
    pub(super) async fn find_or_create(&mut self, batch: BatchRecord) -> anyhow::Result<()> {
        if let Some((next, _)) = self.unproven.get(&batch.id)
            && Instant::now() < *next
        {
            return Ok(());
        }
        let tag = self.tag(&batch);
        let prefix = custom_id_prefix(&tag);
        let wanted = Wanted {
            file_id: batch.input_file_id.as_deref(),
            tag: &tag,
            custom_id_prefix: &prefix,
            // The record was last written when the batch went to be created.
            since_ms: batch.updated_at,
            requests: batch.requests,
        };
        match self.api.find(&wanted).await? {
            Found::Ours(provider_id) => {
                self.unproven.remove(&batch.id);
                tracing::info!(batch = batch.id, provider = %provider_id, "found the batch created before the process stopped");
                self.submitted(batch, provider_id).await
            }
            Found::Nothing => {
                self.unproven.remove(&batch.id);
                self.create(batch).await
            }
            Found::Unproven(candidates) => {
                let wait = self.unproven.get(&batch.id).map(|(_, wait)| wait.mul_f64(1.5)).unwrap_or(self.ctx.chat.batch.poll);
                let wait = wait.min(crate::job::BatchSettings::MAX_POLL.max(self.ctx.chat.batch.poll));
                tracing::info!(
                    batch = batch.id,
                    "the provider's batch {} may be the one created before the process stopped; it is proven \
                     (by its requests' custom ids) once it has ended, so nothing is created meanwhile; looking \
                     again in {}s",
                    candidates.join(", "),
                    wait.as_secs()
                );
                self.unproven.insert(batch.id, (Instant::now() + wait, wait));
                Ok(())
            }
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

    /// Identifies the batch: the job, the table, the run and the batch record with its creation
    /// time. OpenAI batches carry it in their metadata; the custom ids of every batch carry a
    /// hash of it ([`custom_id_prefix`]).
    pub(super) fn tag(&self, batch: &BatchRecord) -> String {
        use sha2::{Digest, Sha256};
        let tag = format!("{}:{}:run{}:batch{}:{}", self.run.job, self.ctx.tables.table.raw(), batch.run_id, batch.id, batch.created_at);
        // OpenAI takes metadata values of up to 512 characters.
        if tag.len() > 500 { format!("sha256:{}", hex::encode(Sha256::digest(tag.as_bytes()))) } else { tag }
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
                    outcome: crate::ledger::CallOutcome::NotSent.as_str().into(),
                    cost_source: crate::ledger::CostSource::None.as_str().into(),
                    error: Some(why.to_owned()),
                    ..Default::default()
                },
                items,
            };
            if crate::runner::writer::write_one(self.ctx.store.as_ref(), &self.ctx.tables, &write, &self.progress).await.is_none() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_ids_carry_their_batch_and_fit_the_providers_rules() {
        let prefix = custom_id_prefix("job:items:run1:batch2:1700000000000");
        let longest = custom_id(&prefix, i64::MAX);
        // Anthropic: 1 to 64 characters of letters, digits, `-` and `_`.
        assert!(longest.len() <= 64 && longest.len() <= LONGEST_CUSTOM_ID.len(), "{longest}");
        assert!(longest.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'), "{longest}");
        assert_eq!(call_id_of(&prefix, &custom_id(&prefix, 42)), Some(42));
        assert_eq!(call_id_of(&prefix, "backfill-call-7"), Some(7));
        let other = custom_id_prefix("other-job:items:run1:batch2:1700000000000");
        assert_ne!(prefix, other);
        assert_eq!(call_id_of(&prefix, &custom_id(&other, 42)), None);
    }
}
