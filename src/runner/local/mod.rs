//! The local-model engine (`[model] kind = "onnx"`): under the same harness as the chat
//! engines (`session.rs`: find or create, `--resume`, attach, lease, heartbeat, one writer
//! transaction per claim, progress, signals, summary), with the model computing on this machine
//! instead of a provider answering.
//!
//! One loop: claim a batch of items, render each row through `model.input` and tokenise it,
//! run the model on the batch in `spawn_blocking` (the processor uses `model.threads` threads
//! itself, so one batch computes at a time), and hand the outputs to the writer, which writes
//! them while the next batch computes. While a batch computes, the next one is claimed,
//! rendered and tokenised, so the model never waits for the database or the tokenizer; on a
//! shutdown that next batch goes back to the queue untouched. The ledger records every batch as a call that costs nothing: its
//! duration, items and tokens, so `status` and `report` show time instead of money.

mod outputs;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use backfill_onnx::{OnnxProcessor, Output, RunError, Tokenized};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::lifecycle::Attached;
use super::policy::{RetryPolicy, Setback};
use super::progress::Progress;
use super::session::{Engine, Figures, Session, Stop};
use super::summary::ControllerSummary;
use crate::job::OnnxModel;
use crate::ledger::{CallOutcome, CostSource};
use crate::pricing::{Picos, Tier, Usage};
use crate::store::{BatchWrite, CallSettle, Claimed, ItemUpdate, NewCall, now_ms};

pub use outputs::OutputLayout;

/// The longest the loop waits before looking at the queue again when other workers hold the
/// remaining items.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// The local-model engine: the loop's state, what it needs from the job, and what it counted.
pub struct LocalEngine {
    attached: Arc<Attached>,
    processor: Arc<OnnxProcessor>,
    layout: OutputLayout,
    template: String,
    model_name: String,
    claim_items: usize,
    grace: Duration,
    policy: RetryPolicy,
    progress: Arc<Progress>,
    /// Into the writer task. Bounded: when the database falls behind, the model waits instead
    /// of piling up outputs; the writer commits one claim while the next computes.
    writer: mpsc::Sender<BatchWrite>,
    /// Batches computed in this invocation, and the time the model spent on them.
    claims: u64,
    compute: Duration,
}

/// What the local engine counted, for the summary.
pub struct LocalTally {
    claims: u64,
    compute: Duration,
    claim_items: usize,
}

impl LocalEngine {
    /// The engine for a loaded model (`crate::local_model::load`, before the run is attached,
    /// so a bad model stops the run before it touches the database).
    pub fn new(processor: Arc<OnnxProcessor>, model: &OnnxModel, session: &Session) -> LocalEngine {
        let attached = session.attached.clone();
        let job = &attached.job;
        LocalEngine {
            processor,
            layout: OutputLayout { keys: attached.tables.outputs.iter().map(|(key, _)| key.clone()).collect(), format: job.target.format },
            template: model.input.clone(),
            model_name: crate::local_model::ledger_name(model),
            claim_items: job.limits.items_per_request.start.max(1) as usize,
            grace: job.limits.grace,
            policy: RetryPolicy { max_attempts: job.limits.max_attempts, tiers: 1, base_backoff: Duration::ZERO, max_backoff: Duration::ZERO },
            progress: session.progress.clone(),
            writer: session.writer(),
            claims: 0,
            compute: Duration::ZERO,
            attached,
        }
    }
}

impl Engine for LocalEngine {
    type Tally = LocalTally;

    async fn work(&mut self, _session: &Session, shutdown: &CancellationToken) -> anyhow::Result<Stop> {
        self.run(shutdown).await
    }

    fn end(self) -> LocalTally {
        LocalTally { claims: self.claims, compute: self.compute, claim_items: self.claim_items }
    }

    fn figures(tally: LocalTally, progress: &Progress) -> Figures {
        let LocalTally { claims, compute, claim_items } = tally;
        let controller = ControllerSummary {
            items_per_request: if claims == 0 { 0.0 } else { progress.finished_here.load(Ordering::Relaxed) as f64 / claims as f64 },
            items_per_request_limit: claim_items as u32,
            max_in_flight: u64::from(claims > 0),
            concurrency_limit: 1,
            requests: claims,
            ..ControllerSummary::default()
        };
        Figures { controller, compute: Some(compute) }
    }
}

/// What the model made of one batch.
struct Computed {
    /// One result per item, in claim order.
    results: Vec<Result<Output, String>>,
    tokens: u64,
    elapsed: Duration,
    /// Why the batch as a whole failed (its items were then run one by one).
    whole_error: Option<String>,
}

/// A claimed batch ready to compute: its items, their texts and the texts tokenised.
struct Prepared {
    claimed: Vec<Claimed>,
    texts: Vec<String>,
    tokenized: Result<Tokenized, RunError>,
}

/// What a claim found.
enum Next {
    Batch(Prepared),
    /// Nothing ready now: look again after this long.
    Wait(Duration),
    Drained,
}

impl LocalEngine {
    async fn run(&mut self, shutdown: &CancellationToken) -> anyhow::Result<Stop> {
        let mut next: Option<Prepared> = None;
        loop {
            if let Some(why) = self.progress.writer_failure() {
                self.release_prepared(next.take()).await?;
                return Ok(Stop::Failed(why));
            }
            if shutdown.is_cancelled() {
                self.release_prepared(next.take()).await?;
                return Ok(Stop::Interrupted);
            }
            let prepared = match next.take() {
                Some(prepared) => prepared,
                None => match self.claim_next().await? {
                    Next::Batch(prepared) => prepared,
                    Next::Drained => return Ok(Stop::Drained),
                    Next::Wait(wait) => {
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = shutdown.cancelled() => return Ok(Stop::Interrupted),
                        }
                        continue;
                    }
                },
            };
            let (computed, prefetched) = self.compute_claim(prepared, shutdown).await?;
            next = prefetched;
            if !computed {
                self.release_prepared(next.take()).await?;
                return Ok(Stop::Interrupted);
            }
        }
    }

    /// Claims the next batch, renders and tokenises it (off the async threads).
    async fn claim_next(&self) -> anyhow::Result<Next> {
        let a = &self.attached;
        let claim = a.store.claim(&a.tables, a.run.id, &a.worker, self.claim_items, a.lease).await?;
        if claim.vanished > 0 {
            self.progress.failed.fetch_add(claim.vanished, Ordering::Relaxed);
        }
        if claim.items.is_empty() {
            if claim.leased == 0 && claim.next_ready_at.is_none() {
                return Ok(Next::Drained);
            }
            // Items are with the writer, another worker, or in backoff: look again soon.
            let wait = claim.next_ready_at.map_or(IDLE_POLL, |at| Duration::from_millis((at - now_ms()).clamp(1, 200) as u64));
            return Ok(Next::Wait(wait));
        }
        let texts: Vec<String> = claim.items.iter().map(|c| crate::local_model::render(&self.template, &c.item)).collect();
        let processor = self.processor.clone();
        let (texts, tokenized) = tokio::task::spawn_blocking(move || {
            let tokenized = processor.tokenize(&texts);
            (texts, tokenized)
        })
        .await
        .map_err(|e| anyhow::anyhow!("the tokenizer's thread failed: {e}"))?;
        Ok(Next::Batch(Prepared { claimed: claim.items, texts, tokenized }))
    }

    /// Returns a batch claimed ahead to the queue untouched (no attempt counted), recorded
    /// as an interrupted call.
    async fn release_prepared(&self, prepared: Option<Prepared>) -> anyhow::Result<()> {
        let Some(prepared) = prepared else { return Ok(()) };
        let call_id = self.reserve(&prepared.claimed).await?;
        self.release(&prepared.claimed, call_id).await
    }

    async fn reserve(&self, claimed: &[Claimed]) -> anyhow::Result<i64> {
        let a = &self.attached;
        let call = NewCall {
            run_id: a.run.id,
            worker: a.worker.id.clone(),
            model: self.model_name.clone(),
            price_tier: Tier::Sync,
            request_hash: None,
            item_ids: claimed.iter().map(|c| c.item.id.clone()).collect(),
            concurrency: 1,
            estimated: Picos::ZERO,
            started_at: now_ms(),
        };
        a.store.reserve_call(&call, None).await?.ok_or_else(|| anyhow::anyhow!("the ledger refused a call that costs nothing"))
    }

    async fn release(&self, claimed: &[Claimed], call_id: i64) -> anyhow::Result<()> {
        let now = now_ms();
        let items = claimed
            .iter()
            .map(|c| ItemUpdate { lease: c.lease.clone(), change: self.policy.next(&Setback::Released, c.attempts, c.tier, claimed.len(), now, 0.0), output: None })
            .collect();
        let settle = CallSettle {
            outcome: CallOutcome::Interrupted.as_str().into(),
            cost_source: CostSource::None.as_str().into(),
            ..CallSettle::default()
        };
        self.send(BatchWrite { run_id: self.attached.run.id, call_id, settle, items }).await
    }

    /// Computes one prepared batch and queues its write, claiming and preparing the next
    /// batch meanwhile (not once a shutdown has begun). False when a shutdown outlasted the
    /// grace period: the batch's items went back to the queue.
    async fn compute_claim(&mut self, prepared: Prepared, shutdown: &CancellationToken) -> anyhow::Result<(bool, Option<Prepared>)> {
        let a = self.attached.clone();
        let call_id = self.reserve(&prepared.claimed).await?;
        self.progress.requests.fetch_add(1, Ordering::Relaxed);
        let Prepared { claimed, texts, tokenized } = prepared;
        let processor = self.processor.clone();
        let mut task = tokio::task::spawn_blocking(move || compute(&processor, &texts, tokenized));
        let mut prefetched: Option<Prepared> = None;
        let joined = {
            // Claim ahead only while the batch computes and no shutdown has begun.
            let prefetch = async {
                if shutdown.is_cancelled() {
                    return Ok(None);
                }
                match self.claim_next().await? {
                    Next::Batch(next) => Ok(Some(next)),
                    Next::Wait(_) | Next::Drained => Ok::<_, anyhow::Error>(None),
                }
            };
            tokio::pin!(prefetch);
            let mut prefetch_done = false;
            loop {
                tokio::select! {
                    joined = &mut task => {
                        // A claim under way holds its items' leases: finish it (it is quick)
                        // rather than drop it and strand them.
                        if !prefetch_done {
                            prefetched = (&mut prefetch).await?;
                        }
                        break joined;
                    }
                    next = &mut prefetch, if !prefetch_done => {
                        prefetch_done = true;
                        prefetched = next?;
                    }
                    _ = shutdown.cancelled() => {
                        // A claim under way is finished first (it is quick), then released.
                        if !prefetch_done {
                            prefetched = (&mut prefetch).await?;
                        }
                        tokio::select! {
                            joined = &mut task => break joined,
                            _ = tokio::time::sleep(self.grace) => {
                                tracing::warn!("the batch in progress did not finish within the grace period: its items go back to the queue");
                                self.release(&claimed, call_id).await?;
                                return Ok((false, prefetched));
                            }
                        }
                    }
                }
            }
        };
        let computed = joined.map_err(|e| anyhow::anyhow!("the model's thread failed: {e}"))?;
        self.claims += 1;
        self.compute += computed.elapsed;
        let mut settle = CallSettle {
            latency_ms: Some(computed.elapsed.as_millis() as i64),
            usage: Usage { prompt_tokens: computed.tokens, completion_tokens: 0, cached_tokens: 0 },
            cost: Picos::ZERO,
            cost_source: CostSource::None.as_str().into(),
            error: computed.whole_error.clone(),
            ..CallSettle::default()
        };
        let mut items = Vec::with_capacity(claimed.len());
        for (c, result) in claimed.iter().zip(&computed.results) {
            match result {
                Ok(output) => {
                    settle.items_ok += 1;
                    items.push(self.layout.done(c, output));
                }
                Err(why) => {
                    settle.items_invalid += 1;
                    tracing::warn!(item = %c.item.id, "the model failed on this item: {why}");
                    items.push(outputs::model_failed(c, why));
                }
            }
        }
        settle.outcome = if settle.items_invalid == 0 { CallOutcome::Ok } else { CallOutcome::ModelError }.as_str().into();
        self.send(BatchWrite { run_id: a.run.id, call_id, settle, items }).await?;
        Ok((true, prefetched))
    }

    async fn send(&self, batch: BatchWrite) -> anyhow::Result<()> {
        self.writer.send(batch).await.map_err(|_| anyhow::anyhow!("the writer stopped"))
    }
}

/// Runs the model on a tokenised batch; when the batch fails as a whole, on each text alone,
/// so one bad row fails by itself and the others still get their output.
fn compute(processor: &OnnxProcessor, texts: &[String], tokenized: Result<Tokenized, RunError>) -> Computed {
    let started = Instant::now();
    let tokens = tokenized.as_ref().map(|t| t.token_counts().iter().sum::<usize>() as u64).unwrap_or(0);
    let (results, whole_error) = match tokenized.and_then(|tokenized| processor.process_tokenized(&tokenized)) {
        Ok(outputs) => (outputs.into_iter().map(Ok).collect(), None),
        Err(e) if texts.len() == 1 => (vec![Err(e.to_string())], Some(e.to_string())),
        Err(e) => {
            let one_by_one = texts
                .iter()
                .map(|text| {
                    processor
                        .process(std::slice::from_ref(text))
                        .map_err(|e| e.to_string())
                        .and_then(|mut out| out.pop().ok_or_else(|| "the model returned no output".to_string()))
                })
                .collect();
            (one_by_one, Some(e.to_string()))
        }
    };
    Computed { results, tokens, elapsed: started.elapsed(), whole_error }
}
