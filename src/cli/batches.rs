//! `batches`: a run's provider batches (batch mode) with their phase, the provider's status and
//! counts; `--cancel` asks the provider to cancel the unfinished ones and records the outcome.

use serde::Serialize;

use super::print_json;
use super::status::{BatchJson, batch_json, batch_line, chosen_run};
use crate::time::format_ms;
use crate::exit::{Exit, usage};
use crate::job::Job;
use crate::provider::batch::BatchApi;
use crate::store::{BatchNote, BatchPhase, BatchRecord, Store, now_ms};

#[derive(Debug, Serialize)]
struct BatchesJson {
    job: String,
    run_id: i64,
    run_status: String,
    batches: Vec<BatchJson>,
    /// With `--cancel`: what was done for each unfinished batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    cancel: Option<Vec<CancelJson>>,
}

#[derive(Debug, Serialize)]
struct CancelJson {
    id: i64,
    provider_batch_id: Option<String>,
    /// `cancel_requested` (the provider took the request), `cancel_failed` (it refused or could
    /// not be reached; `error` says why) or `not_at_provider` (not created at the provider
    /// yet, or its id is not known: nothing to cancel there).
    outcome: &'static str,
    /// The provider's status after the request, when it could be read.
    provider_status: Option<String>,
    error: Option<String>,
}

pub async fn batches(job: &Job, run: Option<i64>, cancel: bool, json: bool) -> anyhow::Result<Exit> {
    let (store, record) = chosen_run(job, run, cancel).await?;
    let mut outcomes = None;
    let mut exit = Exit::Finished;
    if cancel {
        let Some(chat) = job.chat() else {
            return Err(usage(format!("job `{}` runs a local model: it has no provider batches to cancel", job.name)));
        };
        let api = crate::provider::batch::client(chat.batch.dialect, &chat.base_url, chat.api_key()?, chat.batch.limits)?;
        let mut done = Vec::new();
        for batch in store.batches(record.id).await?.into_iter().filter(|b| b.phase.is_open() && b.phase != BatchPhase::Ended) {
            let outcome = cancel_one(store.as_ref(), api.as_ref(), &batch).await?;
            if outcome.outcome == "cancel_failed" {
                exit = Exit::Error;
            }
            eprintln!("{}", cancel_line(&outcome));
            done.push(outcome);
        }
        if done.is_empty() {
            eprintln!("run {} of job `{}` has no unfinished batch at the provider: nothing to cancel", record.id, job.name);
        } else if done.iter().any(|o| o.outcome == "cancel_requested") {
            eprintln!(
                "the provider ends a cancelled batch with what it finished; `backfill run {} --resume` collects that \
                 and sends the rest again in new batches, `backfill abandon {}` gives the run up",
                job.path.display(),
                job.path.display()
            );
        }
        outcomes = Some(done);
    }
    let list: Vec<BatchJson> = store.batches(record.id).await?.iter().map(batch_json).collect();
    if json {
        print_json(&BatchesJson {
            job: job.name.clone(),
            run_id: record.id,
            run_status: record.status.as_str().into(),
            batches: list,
            cancel: outcomes,
        })?;
    } else if list.is_empty() {
        println!("job {} — run {} ({}): no provider batches (the run is not in batch mode)", job.name, record.id, record.status.as_str());
    } else {
        println!("job {} — run {} ({}): {} provider batch{}", job.name, record.id, record.status.as_str(), list.len(), if list.len() == 1 { "" } else { "es" });
        for b in &list {
            println!("  {}", batch_line(b));
        }
    }
    Ok(exit)
}

/// Asks the provider to cancel one unfinished batch and records what happened on it.
async fn cancel_one(store: &dyn Store, api: &dyn BatchApi, batch: &BatchRecord) -> anyhow::Result<CancelJson> {
    let mut outcome = CancelJson {
        id: batch.id,
        provider_batch_id: batch.provider_batch_id.clone(),
        outcome: "not_at_provider",
        provider_status: batch.provider_status.clone(),
        error: None,
    };
    let (BatchPhase::Submitted, Some(provider_id)) = (batch.phase, batch.provider_batch_id.as_deref()) else {
        return Ok(outcome);
    };
    let asked = format!("cancel asked with `backfill batches --cancel` at {}", format_ms(now_ms()));
    let note = match api.cancel(provider_id).await {
        Ok(()) => {
            outcome.outcome = "cancel_requested";
            match api.status(provider_id).await {
                Ok(status) => {
                    outcome.provider_status = Some(status.status.clone());
                    BatchNote {
                        provider_status: Some(status.status),
                        completed: Some(status.completed),
                        failed: Some(status.failed),
                        note: asked,
                    }
                }
                Err(e) => {
                    outcome.error = Some(format!("cancel asked, but its status could not be read: {e}"));
                    BatchNote { note: asked, ..BatchNote::default() }
                }
            }
        }
        Err(e) => {
            outcome.outcome = "cancel_failed";
            outcome.error = Some(e.to_string());
            BatchNote { note: format!("{asked}; the provider did not take it: {e}"), ..BatchNote::default() }
        }
    };
    if !store.note_batch(batch.id, &note).await? {
        outcome.error.get_or_insert_with(|| "the batch moved on meanwhile; its record was left as the run wrote it".into());
    }
    Ok(outcome)
}

fn cancel_line(o: &CancelJson) -> String {
    let id = o.provider_batch_id.as_deref().unwrap_or("not created");
    match o.outcome {
        "cancel_requested" => format!(
            "batch {} ({id}): cancel requested{}{}",
            o.id,
            o.provider_status.as_deref().map(|s| format!(", the provider says {s}")).unwrap_or_default(),
            o.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
        ),
        "cancel_failed" => format!("batch {} ({id}): the provider did not cancel it: {}", o.id, o.error.as_deref().unwrap_or_default()),
        _ => format!("batch {} ({id}): not created at the provider yet, or its id is not known: nothing to cancel there", o.id),
    }
}
