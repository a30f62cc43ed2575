//! `backfill trial`: the same packed prompts, drawn from a seeded sample of the pending rows,
//! sent to one or more models under the job's limits and budget, every answer judged by the
//! job's own validation and post-processing — and nothing written to the target column.
//!
//! A trial is a run of its own in the ledger, under the job's name with [`TRIAL_SUFFIX`]: its
//! calls are reserved against the job's cap and settled like a run's (so `status` and `report`
//! of the job never mistake it for an unfinished run, and the dry run calibrates from it), and
//! the run holds no items, so no write can reach the user's table.

pub mod html;
mod sample;
mod view;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use backfill_controller::parse_rate_limit_headers;
use serde::Serialize;
use tokio::task::JoinSet;

pub use sample::sample_pending;

use crate::exit::{Exit, usage};
use crate::job::{ChatModel, Job};
use crate::ledger::{Bounds, CostSource, answered_cost};
use crate::pipeline::pack::{Packed, Packer};
use crate::store::Item;
use crate::pricing::{ModelPrice, Picos, Tier, Usage};
use crate::provider::{CallError, ChatClient, ChatRequest, Completion, request_body, response_format};
use crate::pipeline::postprocess::OutputCheck;
use crate::runner::context::check_output;
use crate::store::{BatchWrite, CallSettle, Created, NewCall, NewRun, RunStatus, Store, Tables, Worker, now_ms};
use crate::tokens::TokenCounter;
use crate::pipeline::answers::{OutputShape, validate};

pub use crate::job::{TRIAL_SUFFIX, trial_job};

/// How many times a rate-limited trial request goes out again after the provider's wait.
const RESENDS: u32 = 3;

/// What `backfill trial` was asked.
#[derive(Debug, Clone)]
pub struct TrialOptions {
    /// The models to compare (empty: the job's `model.name`).
    pub models: Vec<String>,
    pub sample: usize,
    pub seed: u64,
    /// Try models without a price (their cost counts as zero).
    pub allow_unpriced: bool,
}

/// The trial's result (`--json`: this object).
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub job: String,
    /// The trial's run in the ledger (recorded under `<job>:trial`).
    pub run_id: i64,
    pub seed: u64,
    pub pending_items: u64,
    pub sampled_items: usize,
    pub requests_per_model: usize,
    pub items_per_request: u32,
    /// Per model, best first (by the share of valid answers, then cost per item, then latency).
    pub models: Vec<ModelReport>,
    /// Every sampled row with each model's answer, in the order of `models`.
    pub rows: Vec<SampledRow>,
    /// Why the trial stopped before every model answered (the budget cap).
    pub stopped: Option<String>,
    pub budget_usd: Option<f64>,
    pub spent_usd: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub model: String,
    pub rank: usize,
    pub items: u64,
    pub valid: u64,
    /// No usable JSON for the item: the answer did not parse, or its entry was not text.
    pub malformed: u64,
    pub missing: u64,
    /// Refused by the job's post-processing rules.
    pub rejected: u64,
    pub rejected_by_rule: BTreeMap<String, u64>,
    /// Items of requests that failed (HTTP errors, timeouts, the budget).
    pub failed: u64,
    /// Accepted answers that post-processing changed.
    pub edited: u64,
    pub edits_by_rule: BTreeMap<String, u64>,
    pub requests: u64,
    pub latency_p50_s: Option<f64>,
    pub latency_p95_s: Option<f64>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub input_tokens_per_item: f64,
    pub output_tokens_per_item: f64,
    pub cost_usd: f64,
    pub cost_per_item_usd: f64,
    /// Where the price came from.
    pub prices: String,
    pub projected: Projection,
}

/// The whole pending set at what the trial measured.
#[derive(Debug, Clone, Serialize)]
pub struct Projection {
    pub pending_items: u64,
    pub requests: u64,
    /// pending items × tokens per item measured.
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub sync_cost_usd: f64,
    /// At the provider's batch-API prices, when the price table has them.
    pub batch_cost_usd: Option<f64>,
    /// Least duration under the requests/tokens per minute the job sets or the provider
    /// announced; `None` when neither.
    pub duration_by_limits_s: Option<f64>,
    /// Which limit: `limits.requests_per_minute`, `announced tokens per minute`, ….
    pub limited_by: Option<String>,
    /// Duration at the pace the trial measured (its own concurrency: a run's controller goes
    /// faster where the provider allows).
    pub duration_measured_s: Option<f64>,
    pub measured_items_per_second: Option<f64>,
}

/// One sampled row and every model's answer.
#[derive(Debug, Clone, Serialize)]
pub struct SampledRow {
    pub id: String,
    /// `(column, value)` as the prompt shows them.
    pub input: Vec<(String, String)>,
    pub answers: Vec<ItemAnswer>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct ItemAnswer {
    pub model: String,
    /// valid | rejected | malformed | missing | failed
    pub status: String,
    /// What the model returned for the item.
    pub raw: Option<String>,
    /// What a run would write (after post-processing); also kept for rejected answers' audit.
    #[serde(rename = "final")]
    pub final_text: Option<String>,
    /// Why it is not valid.
    pub reason: Option<String>,
    /// Post-processing changes (`{"rule": …, …}`) and foreign words.
    pub edits: Vec<serde_json::Value>,
    pub foreign_words: Vec<serde_json::Value>,
}

/// One packed request of the sample: the items (indices into the sample) and the prompt.
struct Request {
    items: Vec<usize>,
    packed: Packed,
}

/// A request's answer as it came back.
struct Returned {
    request: usize,
    call_id: i64,
    estimate: Picos,
    body_len: usize,
    latency: Duration,
    outcome: Result<(Completion, Vec<(String, String)>), CallError>,
}

pub async fn trial(job: &Job, options: &TrialOptions) -> anyhow::Result<(Trial, Exit)> {
    let chat = job.chat().ok_or_else(|| usage("`trial` compares chat models; a local-model job has no models to compare"))?;
    // What a run checks before touching anything, the trial checks too.
    let api_key = chat.api_key()?;
    let check: Option<std::sync::Arc<dyn OutputCheck>> = match crate::pipeline::postprocess::build(job)? {
        Some(p) => Some(p),
        None => None,
    };
    if options.sample == 0 {
        return Err(usage("--sample must be at least 1"));
    }
    let models = if options.models.is_empty() { vec![chat.name.clone()] } else { options.models.clone() };
    let mut prices = Vec::with_capacity(models.len());
    for model in &models {
        match job.prices.get(model) {
            Some(price) => prices.push(*price),
            None if options.allow_unpriced => prices.push(ModelPrice::FREE),
            None => {
                return Err(usage(format!(
                    "model `{model}` has no price: add `[pricing.{model}]` or a `prices = [...]` file that lists it, or pass \
                     --allow-unpriced to try it uncosted"
                )));
            }
        }
    }

    let store = crate::store::open(&job.database).await?;
    store.migrate().await?;
    let tables = Tables::from_job(job);
    store.check(&tables).await?;
    let (pending, sample) = sample_pending(store.as_ref(), &tables, options.sample, options.seed).await?;
    let counter = TokenCounter::new(&chat.encoding)?;
    let packer = Packer::new(&chat.template, chat.system.clone(), counter, chat.context_window, chat.max_tokens);
    let items_per_request = job.limits.items_per_request.start.max(1);
    let requests = pack(&packer, &sample, items_per_request as usize, f64::from(chat.max_output_tokens_per_item));
    let shape = if job.target.is_object() {
        OutputShape::Object(job.target.outputs.iter().filter_map(|(k, _)| k.clone()).collect())
    } else {
        OutputShape::Text
    };

    let run_id = trial_run(store.as_ref(), job, &tables).await?;
    let client = ChatClient::new(&chat.base_url, api_key, chat.request_timeout, chat.max_response_bytes)?;
    let cap = job.budget_usd.map(Picos::from_usd);
    let worker = Worker::current();
    let mut answers: Vec<Vec<ItemAnswer>> = vec![Vec::new(); sample.len()];
    let mut reports = Vec::new();
    let mut stopped = None;
    for (model, price) in models.iter().zip(&prices) {
        let context = ModelTrial {
            job,
            chat,
            store: store.as_ref(),
            client: &client,
            worker: &worker,
            run_id,
            cap,
            model,
            price,
            shape: &shape,
            check: check.as_deref(),
            sample: &sample,
        };
        let (report, model_answers, stop) = context.run(&requests, stopped.is_some()).await?;
        for (row, answer) in answers.iter_mut().zip(model_answers) {
            row.push(answer);
        }
        let measured_pace = report.items_answered as f64 / report.wall.as_secs_f64().max(1e-3);
        reports.push(report.finish(job, price, pending, items_per_request, (report.items_answered > 0).then_some(measured_pace)));
        stopped = stopped.or(stop);
    }
    let spend = store.spend(run_id).await?;
    store.set_status(run_id, RunStatus::Finished, stopped.as_deref()).await?;
    rank(&mut reports, &mut answers);
    let rows = sample
        .iter()
        .zip(answers)
        .map(|(item, answers)| SampledRow { id: item.id.clone(), input: shown_fields(item), answers })
        .collect();
    // A provider that answered no request of any model: the table says why, the exit says so.
    let answered = reports.iter().any(|r| r.latency_p50_s.is_some());
    let exit = match (&stopped, answered) {
        (Some(_), _) => Exit::Budget,
        (None, false) if !requests.is_empty() => {
            tracing::error!("no request of the trial was answered: see each row's reason (`--html`, `--json`)");
            Exit::Error
        }
        (None, _) => Exit::Finished,
    };
    Ok((
        Trial {
            job: job.name.clone(),
            run_id,
            seed: options.seed,
            pending_items: pending,
            sampled_items: sample.len(),
            requests_per_model: requests.len(),
            items_per_request,
            models: reports,
            rows,
            stopped,
            budget_usd: job.budget_usd,
            spent_usd: spend.spent.usd(),
        },
        exit,
    ))
}

/// The trial's run: a run of `<job>:trial` that holds no items (so nothing can be written to
/// the target), with the job's cap; an unfinished one left by an interrupted trial is reused.
async fn trial_run(store: &dyn Store, job: &Job, tables: &Tables) -> anyhow::Result<i64> {
    let new = NewRun {
        job: trial_job(&job.name),
        target: format!("{} (trial: nothing written)", tables.table.raw()),
        limit: Some(0),
        max_usd: job.budget_usd,
        mode: Some("sync".into()),
        skip_if_empty: false,
    };
    match store.create_run(&new, tables).await? {
        Created::New(run) | Created::Existing(run) => {
            store.set_budget(run.id, job.budget_usd).await?;
            Ok(run.id)
        }
        Created::NothingPending => unreachable!("a trial run is created even when it holds no item"),
    }
}

/// The sample packed as a run packs it: requests of `per_request` items, fewer when the
/// context window or the output cap says so.
fn pack(packer: &Packer, sample: &[Item], per_request: usize, output_per_item: f64) -> Vec<Request> {
    let mut requests = Vec::new();
    let mut at = 0;
    while at < sample.len() {
        let end = (at + per_request).min(sample.len());
        let packed = packer.pack(&sample[at..end], output_per_item);
        requests.push(Request { items: (at..at + packed.items).collect(), packed: packed.clone() });
        at += packed.items;
    }
    requests
}

/// An item's columns as text, for people.
fn shown_fields(item: &Item) -> Vec<(String, String)> {
    item.fields
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())))
        .collect()
}

/// Everything one model's part of the trial uses.
struct ModelTrial<'a> {
    job: &'a Job,
    chat: &'a ChatModel,
    store: &'a dyn Store,
    client: &'a ChatClient,
    worker: &'a Worker,
    run_id: i64,
    cap: Option<Picos>,
    model: &'a str,
    price: &'a ModelPrice,
    shape: &'a OutputShape,
    check: Option<&'a dyn OutputCheck>,
    sample: &'a [Item],
}

/// Counts of one model while its answers come in.
#[derive(Debug, Default)]
struct Tally {
    model: String,
    prices: String,
    items: u64,
    items_answered: u64,
    valid: u64,
    malformed: u64,
    missing: u64,
    rejected: u64,
    rejected_by_rule: BTreeMap<String, u64>,
    failed: u64,
    edited: u64,
    edits_by_rule: BTreeMap<String, u64>,
    requests: u64,
    latencies: Vec<f64>,
    input_tokens: u64,
    output_tokens: u64,
    cost: Picos,
    /// Requests and tokens per minute the provider announced in its headers.
    announced: [Option<u64>; 2],
    wall: Duration,
}

impl ModelTrial<'_> {
    /// Sends every request (at most `limits.concurrency.start` at once, paced by
    /// `limits.requests_per_minute`), judges each answer, settles each call.
    async fn run(&self, requests: &[Request], budget_spent: bool) -> anyhow::Result<(Tally, Vec<ItemAnswer>, Option<String>)> {
        let mut tally = Tally {
            model: self.model.to_owned(),
            prices: self.job.prices.origin(self.model).map(|o| o.describe()).unwrap_or_else(|| "no price (--allow-unpriced)".into()),
            items: self.sample.len() as u64,
            ..Tally::default()
        };
        let mut answers: Vec<ItemAnswer> =
            vec![ItemAnswer { model: self.model.to_owned(), status: "failed".into(), ..ItemAnswer::default() }; self.sample.len()];
        let started = Instant::now();
        let in_flight = self.job.limits.concurrency.start.max(1) as usize;
        let spacing = self.job.limits.requests_per_minute.map(|rpm| Duration::from_secs_f64(60.0 / rpm.max(1e-3)));
        let mut tasks: JoinSet<Returned> = JoinSet::new();
        let mut stopped = budget_spent.then(|| "the budget cap was reached by an earlier model".to_owned());
        let mut next = 0;
        let mut last_sent: Option<Instant> = None;
        loop {
            while stopped.is_none() && next < requests.len() && tasks.len() < in_flight {
                if let (Some(spacing), Some(last)) = (spacing, last_sent) {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(last + spacing)).await;
                }
                match self.send(&mut tasks, next, &requests[next]).await? {
                    true => {
                        last_sent = Some(Instant::now());
                        next += 1;
                    }
                    false => {
                        stopped = Some(format!(
                            "the budget cap (${}) would be passed by the next request of `{}`: the trial stopped",
                            self.job.budget_usd.map(crate::pricing::format_usd_cap).unwrap_or_default(),
                            self.model
                        ))
                    }
                }
            }
            let Some(returned) = tasks.join_next().await else { break };
            let returned = returned?;
            self.conclude(&requests[returned.request], returned, &mut tally, &mut answers).await?;
        }
        for answer in answers.iter_mut().filter(|a| a.status == "failed" && a.reason.is_none()) {
            answer.reason = Some(stopped.clone().unwrap_or_else(|| "not sent".into()));
        }
        tally.failed = answers.iter().filter(|a| a.status == "failed").count() as u64;
        tally.wall = started.elapsed();
        Ok((tally, answers, stopped))
    }

    /// Reserves the request's cost and spawns it; `false` when the cap refuses it.
    async fn send(&self, tasks: &mut JoinSet<Returned>, index: usize, request: &Request) -> anyhow::Result<bool> {
        let ids: Vec<String> = request.items.iter().map(|&i| self.sample[i].id.clone()).collect();
        let format = response_format(self.chat.structured_output, &ids, self.shape);
        let packed = &request.packed;
        let body = ChatRequest::new(self.model, packed.system.as_deref(), packed.user.clone(), self.chat.temperature, packed.max_tokens, format)
            .with_max_tokens_field(self.chat.max_tokens_field);
        let (body, hash) = request_body(&body);
        // As a run reserves: a tenth more input than counted, the whole max_tokens of output.
        let estimate = self.price.estimate(packed.prompt_tokens * 11 / 10, u64::from(packed.max_tokens), Tier::Sync);
        let call = NewCall {
            run_id: self.run_id,
            worker: self.worker.id.clone(),
            model: self.model.to_owned(),
            price_tier: Tier::Sync,
            request_hash: Some(hash),
            item_ids: ids,
            concurrency: self.job.limits.concurrency.start,
            estimated: estimate,
            started_at: now_ms(),
        };
        let Some(call_id) = self.store.reserve_call(&call, self.cap).await? else {
            return Ok(false);
        };
        let client = self.client.clone();
        let (timeout, cap) = (self.chat.request_timeout, self.job.limits.max_retry_after);
        tasks.spawn(async move {
            let started = Instant::now();
            let mut resends = 0;
            let outcome = loop {
                match client.send(&body, timeout).await {
                    Ok(answer) => break Ok((answer.completion, answer.headers)),
                    Err(CallError::RateLimited(limit)) if resends < RESENDS && limit.retry_after.is_none_or(|w| w <= cap) => {
                        resends += 1;
                        tokio::time::sleep(limit.retry_after.unwrap_or(Duration::from_secs(1))).await;
                    }
                    Err(error) => break Err(error),
                }
            };
            Returned { request: index, call_id, estimate, body_len: body.len(), latency: started.elapsed(), outcome }
        });
        Ok(true)
    }

    /// Judges one answer as a run would (validation, post-processing), records it in the
    /// ledger, and counts it.
    async fn conclude(&self, request: &Request, returned: Returned, tally: &mut Tally, answers: &mut [ItemAnswer]) -> anyhow::Result<()> {
        let mut settle = CallSettle { latency_ms: Some(returned.latency.as_millis() as i64), ..CallSettle::default() };
        tally.requests += 1;
        let ids: Vec<String> = request.items.iter().map(|&i| self.sample[i].id.clone()).collect();
        match returned.outcome {
            Err(error) => {
                settle.http_status = error.http_status();
                settle.outcome = crate::runner::error_outcome(&error).as_str().into();
                settle.error = Some(error.to_string());
                settle.cost_source = CostSource::None.as_str().into();
                settle.lost = matches!(error, CallError::Timeout { .. } | CallError::TooLarge { .. });
                for &i in &request.items {
                    answers[i].reason = Some(error.to_string());
                }
            }
            Ok((completion, headers)) => {
                let info = parse_rate_limit_headers(headers.iter().map(|(a, b)| (a.as_str(), b.as_str())));
                tally.announced[0] = info.requests.limit.or(tally.announced[0]);
                tally.announced[1] = info.tokens.limit.or(tally.announced[1]);
                tally.latencies.push(returned.latency.as_secs_f64());
                settle.http_status = Some(200);
                let bounds = Bounds::of_request(returned.body_len, u64::from(request.packed.max_tokens), u64::from(self.chat.context_window));
                let costed = answered_cost(
                    self.price,
                    Tier::Sync,
                    completion.usage.as_ref(),
                    completion.reported_cost_usd,
                    completion.usage_problem.as_deref(),
                    returned.estimate,
                    &bounds,
                );
                settle.usage = costed.usage;
                settle.cost = costed.cost;
                settle.cost_source = costed.source.as_str().into();
                settle.usage_flag = costed.flag;
                tally.input_tokens += costed.usage.prompt_tokens;
                tally.output_tokens += costed.usage.completion_tokens;
                tally.items_answered += ids.len() as u64;
                self.judge(&completion, &ids, request, &mut settle, tally, answers);
            }
        }
        tally.cost += settle.cost;
        let write = BatchWrite { run_id: self.run_id, call_id: returned.call_id, settle, items: Vec::new() };
        self.store.write_batch(&Tables::from_job(self.job), &write).await?;
        Ok(())
    }

    /// Validation and post-processing of one answer, exactly as a run applies them.
    fn judge(&self, completion: &Completion, ids: &[String], request: &Request, settle: &mut CallSettle, tally: &mut Tally, answers: &mut [ItemAnswer]) {
        let validated = if completion.no_choices {
            Err(crate::pipeline::answers::Malformed("the answer has no `choices` (its usage is billed)".into()))
        } else {
            validate(&completion.content, ids, self.shape, completion.may_end_mid_entry())
        };
        let validated = match validated {
            Err(malformed) => {
                settle.outcome = "malformed".into();
                settle.error = Some(malformed.to_string());
                settle.content = Some(completion.content.clone());
                settle.items_invalid = ids.len() as u32;
                for &i in &request.items {
                    let answer = &mut answers[i];
                    answer.status = "malformed".into();
                    answer.reason = Some(malformed.to_string());
                    tally.malformed += 1;
                }
                return;
            }
            Ok(validated) => validated,
        };
        settle.outcome = if completion.truncated() { "truncated" } else { "ok" }.into();
        settle.repair = validated.repair.clone();
        settle.foreign_keys = validated.foreign_keys as u32;
        for (index, output) in &validated.outputs {
            let answer = &mut answers[request.items[*index]];
            answer.raw = Some(shown_output(output.iter().map(|(k, v)| (k.as_str(), v.as_str()))));
            match check_output(self.check, output) {
                Ok((values, changes)) => {
                    settle.items_ok += 1;
                    tally.valid += 1;
                    answer.status = "valid".into();
                    answer.final_text = Some(shown_output(values.iter().map(|(k, v)| (k.as_str(), v.as_str()))));
                    let audit: Option<serde_json::Value> = changes.and_then(|c| serde_json::from_str(&c).ok());
                    for per_key in audit.as_ref().and_then(|a| a.as_object()).into_iter().flat_map(|a| a.values()) {
                        let edits = per_key["changes"].as_array().cloned().unwrap_or_default();
                        for edit in &edits {
                            *tally.edits_by_rule.entry(edit["rule"].as_str().unwrap_or("other").to_owned()).or_default() += 1;
                        }
                        answer.edits.extend(edits);
                        answer.foreign_words.extend(per_key["foreign_words"].as_array().cloned().unwrap_or_default());
                    }
                    if !answer.edits.is_empty() {
                        tally.edited += 1;
                    }
                }
                Err((reason, detail)) => {
                    settle.items_rejected += 1;
                    tally.rejected += 1;
                    for code in reason.split(',') {
                        *tally.rejected_by_rule.entry(code.to_owned()).or_default() += 1;
                    }
                    answer.status = "rejected".into();
                    answer.reason = Some(detail);
                }
            }
        }
        for (index, why) in &validated.invalid {
            settle.items_invalid += 1;
            tally.malformed += 1;
            let answer = &mut answers[request.items[*index]];
            answer.status = "malformed".into();
            answer.reason = Some(why.clone());
        }
        for index in &validated.missing {
            settle.items_missing += 1;
            tally.missing += 1;
            let answer = &mut answers[request.items[*index]];
            answer.status = "missing".into();
            answer.reason = Some("the answer has no entry for this id".into());
        }
    }
}

/// An output for people: the text itself, or `key: text` lines for several outputs.
fn shown_output<'a>(values: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let values: Vec<_> = values.collect();
    match values.as_slice() {
        [(_, text)] => (*text).to_owned(),
        many => many.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("\n"),
    }
}

impl Tally {
    /// The model's report, with the whole pending set projected from what was measured.
    fn finish(&self, job: &Job, price: &ModelPrice, pending: u64, items_per_request: u32, items_per_second: Option<f64>) -> ModelReport {
        let mut latencies = self.latencies.clone();
        latencies.sort_by(f64::total_cmp);
        let per_item = |n: u64| if self.items_answered > 0 { n as f64 / self.items_answered as f64 } else { 0.0 };
        let (input_per_item, output_per_item) = (per_item(self.input_tokens), per_item(self.output_tokens));
        let usage = Usage {
            prompt_tokens: (input_per_item * pending as f64).round() as u64,
            completion_tokens: (output_per_item * pending as f64).round() as u64,
            cached_tokens: 0,
        };
        let requests = pending.div_ceil(u64::from(items_per_request.max(1)));
        let rpm = job.limits.requests_per_minute.map(|r| (r, "limits.requests_per_minute"));
        let rpm = rpm.or(self.announced[0].map(|r| (r as f64, "the requests per minute the provider announced")));
        let tpm = job.limits.tokens_per_minute.map(|t| (t, "limits.tokens_per_minute"));
        let tpm = tpm.or(self.announced[1].map(|t| (t as f64, "the tokens per minute the provider announced")));
        let by_requests = rpm.map(|(rpm, why)| (requests as f64 / rpm * 60.0, why));
        let by_tokens = tpm.map(|(tpm, why)| ((usage.prompt_tokens + usage.completion_tokens) as f64 / tpm * 60.0, why));
        let by_limits = match (by_requests, by_tokens) {
            (Some(r), Some(t)) => Some(if t.0 > r.0 { t } else { r }),
            (r, t) => r.or(t),
        };
        ModelReport {
            model: self.model.clone(),
            rank: 0,
            items: self.items,
            valid: self.valid,
            malformed: self.malformed,
            missing: self.missing,
            rejected: self.rejected,
            rejected_by_rule: self.rejected_by_rule.clone(),
            failed: self.failed,
            edited: self.edited,
            edits_by_rule: self.edits_by_rule.clone(),
            requests: self.requests,
            latency_p50_s: percentile(&latencies, 0.50),
            latency_p95_s: percentile(&latencies, 0.95),
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            input_tokens_per_item: input_per_item,
            output_tokens_per_item: output_per_item,
            cost_usd: self.cost.usd(),
            cost_per_item_usd: if self.items > 0 { self.cost.usd() / self.items as f64 } else { 0.0 },
            prices: self.prices.clone(),
            projected: Projection {
                pending_items: pending,
                requests,
                input_tokens: usage.prompt_tokens,
                output_tokens: usage.completion_tokens,
                sync_cost_usd: price.cost(&usage, Tier::Sync).usd(),
                batch_cost_usd: price.batch_known.then(|| price.cost(&usage, Tier::Batch).usd()),
                duration_by_limits_s: by_limits.map(|(s, _)| s),
                limited_by: by_limits.map(|(_, why)| why.to_owned()),
                duration_measured_s: items_per_second.filter(|r| *r > 0.0).map(|r| pending as f64 / r),
                measured_items_per_second: items_per_second,
            },
        }
    }
}

/// The `q` quantile of sorted values (nearest rank).
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Orders the models best first by the job's own rules — the share of answers a run would
/// write, then cost per item, then median latency — and the answers of every row with them.
fn rank(reports: &mut Vec<ModelReport>, answers: &mut [Vec<ItemAnswer>]) {
    let mut order: Vec<usize> = (0..reports.len()).collect();
    let share = |r: &ModelReport| if r.items > 0 { r.valid as f64 / r.items as f64 } else { 0.0 };
    order.sort_by(|&a, &b| {
        let (a, b) = (&reports[a], &reports[b]);
        share(b)
            .total_cmp(&share(a))
            .then(a.cost_per_item_usd.total_cmp(&b.cost_per_item_usd))
            .then(a.latency_p50_s.unwrap_or(f64::MAX).total_cmp(&b.latency_p50_s.unwrap_or(f64::MAX)))
    });
    let mut ranked: Vec<ModelReport> = order.iter().map(|&i| reports[i].clone()).collect();
    for (rank, report) in ranked.iter_mut().enumerate() {
        report.rank = rank + 1;
    }
    *reports = ranked;
    for row in answers.iter_mut() {
        let reordered: Vec<ItemAnswer> = order.iter().map(|&i| row[i].clone()).collect();
        *row = reordered;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let values: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&values, 0.5), Some(10.0));
        assert_eq!(percentile(&values, 0.95), Some(19.0));
        assert_eq!(percentile(&[3.0], 0.95), Some(3.0));
        assert_eq!(percentile(&[], 0.5), None);
    }
}
