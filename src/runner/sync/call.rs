//! One call: send it (or take its answer from the response cache), then conclude it into the
//! batch write, the controller's observation, and the progress deltas. Runs inside the call's
//! own task, so validation and post-processing of many answers proceed in parallel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backfill_controller::{CompletedRequest, Observation, Outcome, RateLimitInfo, Ticket, parse_rate_limit_headers};

use crate::runner::context::RunContext;
use super::streams::StreamCall;
use super::cut_prompts::Prompt;
use crate::runner::policy::{Setback, jitter};
use tokio_util::sync::CancellationToken;

use crate::ledger::{Bounds, CallOutcome, CostSource, OutputStatus, answered_cost};
use crate::pricing::{Picos, Tier};
use crate::provider::{CallError, Completion, Delivery, parse_completion};
use crate::store::{BatchWrite, CallSettle, Claimed, ItemChange, ItemUpdate, OutputRecord, OutputValue, now_ms};
use crate::pipeline::answers::{Malformed, Validated, validate};

/// One request, from packing to its conclusion: the items it carries (leased to this worker
/// while it is out), what it asks and how it is billed. It goes whole from the packer to the
/// call task and, after a 429, back to the dispatcher to go out again unchanged.
/// How long the items of a call that could not reach the provider wait before they go out
/// again (with jitter): an outage is polled, not hammered.
pub const OUTAGE_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug)]
pub struct Request {
    pub claimed: Vec<Claimed>,
    /// Where its items are on the fallback chain (0 = `model.name`, k = `model.fallback[k-1]`).
    pub fallback: u32,
    pub model: String,
    /// The body as sent; empty for a request known only by its ledger row (a call lost in a
    /// crash, a request of a provider batch).
    pub body: Vec<u8>,
    pub hash: String,
    /// Prompt tokens as counted here, and the answer's `max_tokens` (0 when not known).
    pub prompt_tokens: u64,
    pub max_tokens: u32,
    /// The controller bounds it: `request_timeout_s`, plus time for our own requests ahead.
    pub timeout: Duration,
    /// The price column it is billed at (the batch API's is lower).
    pub price_column: Tier,
    /// How many times it has gone out again after a 429.
    pub resends: u32,
    /// How it last went out, which says how it goes out again.
    pub sent_as: SentAs,
}

/// How a request last went out, which says how it goes out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SentAs {
    /// Not sent yet: it goes out as the run sends now.
    #[default]
    NotSent,
    /// Asking for a whole answer: it goes out again so.
    Whole,
    /// Asking for a streamed answer: a 429 resend goes out streamed too, its body unchanged.
    Streamed,
    /// Streamed, and failed on the stream before the server had shown that it streams: it
    /// goes out again unstreamed, and that is not a retry of its items.
    StreamFailed,
    /// Unstreamed after it failed streamed (also when a 429 sends it out once more): an answer
    /// says the server cannot stream, a failure that the request failed on its own.
    UnstreamedAgain,
}

impl Request {
    /// A request known only by its ledger row: its items (as held now), model and hash.
    pub fn from_ledger(claimed: Vec<Claimed>, model: String, hash: String, price_column: Tier) -> Request {
        let fallback = claimed.first().map(|c| c.tier).unwrap_or(0);
        Request {
            claimed,
            fallback,
            model,
            body: Vec::new(),
            hash,
            prompt_tokens: 0,
            max_tokens: 0,
            timeout: Duration::ZERO,
            price_column,
            resends: 0,
            sent_as: SentAs::NotSent,
        }
    }
}

/// Where a call's answer comes from.
#[derive(Debug)]
pub enum Answer {
    /// The provider, now; `cut` is cancelled when the controller cuts the call at the end of
    /// the queue. With `stream`, the answer is asked for as a stream, and the moment its first
    /// chunk arrives goes to `stream.first_chunks` with the call's ticket.
    Provider { cut: CancellationToken, stream: Option<StreamCall> },
    /// The response cache: the same request was answered before, and nothing is billed.
    Cached(String),
    /// The response cache, for a call lost in a crash: it was billed.
    Replayed(String),
    /// A provider batch's result line, collected by the batch engine.
    Batch,
}

/// Where a streamed call says when its answer's first chunk arrived.
pub type FirstChunks = tokio::sync::mpsc::UnboundedSender<(Ticket, Instant)>;

/// What a streamed call showed of the stream itself, for the dispatcher's choice to go on
/// streaming (`model.stream = "auto"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamNote {
    /// The answer came streamed, with its token counts.
    Counted,
    /// The answer came streamed without its token counts (`usage`).
    Uncounted,
    /// The streamed request failed before the server had shown that it streams and before any
    /// text came (a refusal of `stream_options`, an error, a stream that could not be read): it
    /// goes out again unstreamed, whose outcome tells whose failure it was.
    Failed(String),
    /// A request that had failed streamed was answered unstreamed: the server cannot stream it.
    AnsweredUnstreamed,
}

/// A request reserved in the ledger, on its way to an answer.
#[derive(Debug)]
pub struct Call {
    pub call_id: i64,
    /// `None` when the controller was not told (answers from the cache, batch results).
    pub ticket: Option<Ticket>,
    /// The estimate reserved for it.
    pub estimate: Picos,
    pub answer: Answer,
    pub request: Request,
}

/// How many times a rate-limited request goes out again unchanged before its items return to
/// the queue to be packed anew.
pub const MAX_RESENDS: u32 = 3;

/// Why an answer is not used when the server reported far fewer prompt tokens than the
/// prompt holds (`CutPrompts`, per model): it cut the prompt to fit its context and answered
/// what was left — the end of the items without the instructions before them (such an answer
/// may even hold an entry for every item, made up) — or may have. The call is malformed: its
/// items go out again, in halves after a second such answer. A cut is told once per model at
/// warn level.
fn cut_prompt(ctx: &RunContext, model: &str, counted: u64, usage: Option<&crate::pricing::Usage>) -> Option<String> {
    let usage = usage?;
    // A server that counts its cached tokens apart from the prompt's has still read them.
    let reported = usage.prompt_tokens.max(usage.prompt_tokens.saturating_add(usage.cached_tokens).min(counted));
    let (judged, tell) = {
        let mut models = ctx.cut_prompts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Every answer passes here: the model's name is copied once, not per answer.
        if !models.contains_key(model) {
            models.insert(model.to_owned(), Default::default());
        }
        let judge = models.get_mut(model).expect("inserted above");
        let judged = judge.judge(counted, reported);
        let tell = matches!(judged, Prompt::Cut { .. }) && judge.tell();
        (judged, tell)
    };
    match judged {
        Prompt::Whole => None,
        Prompt::Short => Some(format!(
            "the server counted {reported} prompt tokens for a prompt of about {counted}: it may have cut the prompt \
             to fit its context, so the answer is not used until its next answers tell"
        )),
        Prompt::Cut { ceiling } => {
            let why = format!(
                "the server counted {reported} prompt tokens for a prompt of about {counted}: it cuts prompts at \
                 {ceiling} tokens to fit its context, so the answer was made without the instructions and is not used"
            );
            if tell {
                tracing::warn!(
                    "{why} ({model}); the items go out again in smaller requests. Set model.context_window to the server's \
                     context (Ollama: OLLAMA_CONTEXT_LENGTH, or the model's num_ctx), or raise the server's context"
                );
            }
            Some(why)
        }
    }
}

/// What a finished call says about the provider, for the dispatcher's breakers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Answered, and the answer was usable.
    Succeeded,
    /// The provider could not be reached at all (for the circuit breaker).
    Unreachable(String),
    /// The provider answered that it takes no request now (503): an outage as `Unreachable` is.
    Unavailable(String),
    /// The request itself was refused (4xx) — repeated, it means a bad job setting.
    Refused(String),
    /// Nothing more can succeed: stop the run with this message.
    Fatal(String),
    /// Any other failure: the items' own retries deal with it.
    Failed,
}

/// What the dispatcher does with a finished call.
#[derive(Debug)]
pub struct Concluded {
    pub ticket: Option<Ticket>,
    pub observation: Observation,
    pub write: BatchWrite,
    pub verdict: Verdict,
    /// Where the call's cost came from (also in `write.settle`, as the ledger spells it).
    pub cost_source: CostSource,
    /// The estimate reserved for the call.
    pub estimate: Picos,
    /// Not every item got an output: an identical request must not be served from the cache.
    pub drop_cache: Option<String>,
    /// Rate-limited (a 429 says nothing about the request): the same request goes out again,
    /// unchanged, after this wait — its items still leased, its identical body keeping the
    /// provider's prompt cache and the response cache working.
    pub resend: Option<(Duration, Request)>,
    /// For a call whose answer was asked for as a stream: what came of it.
    pub stream: Option<StreamNote>,
    /// A 503's items wait with their attempts untouched while the provider answers no request
    /// (a model loading, an outage); an item refused so again when the provider answered
    /// others since its last refusal was refused on its own and takes its change from these
    /// instead, using an attempt — so a request that always gets a 503 while others succeed
    /// ends failed instead of going out without end.
    pub lone_unavailable: Option<Vec<ItemUpdate>>,
}

pub async fn execute(ctx: Arc<RunContext>, call: Call) -> Concluded {
    let started = Instant::now();
    let request = &call.request;
    let fall_back = matches!(&call.answer, Answer::Provider { stream: Some(StreamCall { fall_back: true, .. }), .. });
    let streamed = matches!(&call.answer, Answer::Provider { stream: Some(_), .. });
    let first_came = std::sync::atomic::AtomicBool::new(false);
    let mut note = None;
    let outcome = match &call.answer {
        Answer::Cached(body) | Answer::Replayed(body) => parse_completion(body)
            .map(|completion| (completion, Vec::new()))
            .map_err(|reason| CallError::BadOutput { reason, status: 200, body: body.clone() }),
        Answer::Batch => unreachable!("a provider batch's results are concluded by the batch engine"),
        Answer::Provider { cut, stream } => match tokio::select! {
            sent = send(&ctx, request, call.ticket, stream.as_ref().map(|s| &s.first_chunks), &first_came) => sent,
            _ = cut.cancelled() => Err(CallError::Timeout { after: started.elapsed() }),
        } {
            Ok(answer) => {
                if ctx.cache.enabled
                    && let Err(e) = ctx.store.cache_put(&request.hash, &request.model, &answer.body, ctx.cache.ttl).await {
                        tracing::warn!("could not store the answer in the response cache: {e:#}");
                    }
                if matches!(answer.delivery, Delivery::Streamed { .. }) {
                    note = Some(if answer.completion.usage.is_some() { StreamNote::Counted } else { StreamNote::Uncounted });
                } else if request.sent_as == SentAs::UnstreamedAgain {
                    note = Some(StreamNote::AnsweredUnstreamed);
                }
                Ok((answer.completion, answer.headers))
            }
            Err(error) => Err(error),
        },
    };
    let latency = started.elapsed();
    let first_came = first_came.load(std::sync::atomic::Ordering::Relaxed);
    if fall_back
        && let Err(failure) = &outcome
        && refuses_streams(failure, first_came)
    {
        return failed_stream(&ctx, call, failure, latency);
    }
    // A stream cut short or gone wrong after its first chunk (an error event naming any status
    // included): the server worked on it and may bill it.
    let cut_short = streamed && first_came && matches!(&outcome, Err(error) if !matches!(error, CallError::Timeout { .. }));
    let mut concluded = conclude(&ctx, call, outcome, latency);
    concluded.stream = note;
    if cut_short {
        concluded.write.settle.lost = true;
    }
    concluded
}

/// Whether a streamed request's failure may say that the server cannot stream: it failed
/// before any generated text came, as a server fails a field or a stream it cannot take — a
/// refusal of the request (HTTP 400, 413, 415, 422: `stream_options` unknown), a 500 or 501
/// (some servers answer every body they cannot take so), a stream that could not be read or
/// broke off. Such a request goes out again unstreamed, and that answer decides: a request can
/// fail so on its own (too long a prompt, a crash). Not a 429, a timeout, an overloaded or
/// unreachable server (502–504, no connection), an answer too long, a refusal of every call,
/// nor anything after the first chunk came: those are handled as for an unstreamed request.
fn refuses_streams(failure: &CallError, first_came: bool) -> bool {
    if first_came {
        return false;
    }
    match failure {
        CallError::Rejected { .. } | CallError::BadOutput { .. } => true,
        CallError::Transient { status: Some(status), .. } => matches!(status, 500 | 501),
        CallError::Transient { status: None, message, .. } => !message.starts_with("cannot connect"),
        CallError::RateLimited(_)
        | CallError::Timeout { .. }
        | CallError::Fatal { .. }
        | CallError::Redirected { .. }
        | CallError::TooLarge { .. } => false,
    }
}

/// A streamed request that failed before the server had shown that it streams
/// (`refuses_streams`): settled with its failure and sent again unstreamed at once, its items
/// still leased and their attempts untouched; that answer tells the dispatcher whether the
/// server can stream. Billed nothing; possibly billed when the connection broke off, as an
/// unstreamed request's would be.
fn failed_stream(ctx: &RunContext, call: Call, refusal: &CallError, latency: Duration) -> Concluded {
    let Call { call_id, ticket, estimate, mut request, .. } = call;
    request.sent_as = SentAs::StreamFailed;
    let settle = CallSettle {
        latency_ms: Some(latency.as_millis() as i64),
        http_status: refusal.http_status(),
        error: Some(refusal.to_string()),
        lost: matches!(refusal, CallError::Transient { status: None, .. }),
        content: match refusal {
            CallError::BadOutput { body, .. } => Some(body.chars().take(4000).collect()),
            _ => None,
        },
        ..CallSettle::default()
    };
    Concluded {
        ticket,
        observation: Observation::new(latency, Outcome::OtherError, Default::default()),
        write: BatchWrite { run_id: ctx.run_id, call_id, settle: seal(settle, error_outcome(refusal), CostSource::None), items: Vec::new() },
        verdict: Verdict::Failed,
        cost_source: CostSource::None,
        estimate,
        drop_cache: None,
        resend: Some((Duration::ZERO, request)),
        stream: Some(StreamNote::Failed(refusal.to_string())),
        lone_unavailable: None,
    }
}

/// Sends a request to the provider: as a stream when `first_chunks` is given (the moment its
/// first chunk arrives goes there with `ticket`), else whole.
async fn send(
    ctx: &RunContext,
    request: &Request,
    ticket: Option<Ticket>,
    first_chunks: Option<&FirstChunks>,
    first_came: &std::sync::atomic::AtomicBool,
) -> Result<crate::provider::Answer, CallError> {
    let Some(first_chunks) = first_chunks else {
        return ctx.client.send(&request.body, request.timeout).await;
    };
    let (first, arrived) = tokio::sync::oneshot::channel();
    let forward = async {
        if let Ok(at) = arrived.await {
            first_came.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(ticket) = ticket {
                let _ = first_chunks.send((ticket, at));
            }
        }
    };
    let (sent, ()) = tokio::join!(ctx.client.send_streamed(&request.body, request.timeout, first), forward);
    sent
}

/// Turns a call's outcome into its batch write, the controller's observation and what the
/// dispatcher must know (breaker, fatal errors, cache).
pub fn conclude(
    ctx: &RunContext,
    call: Call,
    outcome: Result<(Completion, Vec<(String, String)>), CallError>,
    latency: Duration,
) -> Concluded {
    let now = now_ms();
    let Call { call_id, ticket, estimate, answer, request } = call;
    let from_cache = matches!(answer, Answer::Cached(_) | Answer::Replayed(_));
    let request_len = request.claimed.len();
    let mut settle = CallSettle {
        latency_ms: Some(latency.as_millis() as i64),
        ..CallSettle::default()
    };
    let mut result = Concluded {
        ticket,
        observation: Observation::new(latency, Outcome::OtherError, Default::default()),
        write: BatchWrite { run_id: ctx.run_id, call_id, settle: CallSettle::default(), items: Vec::new() },
        verdict: Verdict::Failed,
        cost_source: CostSource::None,
        drop_cache: None,
        estimate,
        resend: None,
        stream: None,
        lone_unavailable: None,
    };
    // Recorded in the settlement, as the ledger spells them, once the call is concluded.
    let call_outcome: CallOutcome;
    let cost_source: CostSource;
    let setback_all = |setback: &Setback| -> Vec<ItemUpdate> {
        request.claimed
            .iter()
            .map(|c| ItemUpdate {
                lease: c.lease.clone(),
                change: ctx.policy.next(setback, c.attempts, c.tier, request_len, now, fastrand::f64()),
                output: None,
            })
            .collect()
    };

    match outcome {
        Ok((completion, headers)) => {
            result.observation.rate_limits = parse_rate_limit_headers(headers.iter().map(|(a, b)| (a.as_str(), b.as_str())));
            settle.http_status = Some(200);
            // An answer from the cache was not served now: its timings say nothing of the queue.
            let server_time = if from_cache { None } else { completion.server_time };
            let price = ctx.price(request.fallback);
            if matches!(answer, Answer::Cached(_)) {
                settle.usage = completion.usage.unwrap_or_default();
                settle.cost = Picos::ZERO;
                cost_source = CostSource::Cache;
            } else {
                let bounds = Bounds::of_request(request.body.len(), u64::from(request.max_tokens), u64::from(ctx.chat.context_window));
                let costed = answered_cost(
                    &price,
                    request.price_column,
                    completion.usage.as_ref(),
                    completion.reported_cost_usd,
                    completion.usage_problem.as_deref(),
                    estimate,
                    &bounds,
                );
                if let Some(flag) = &costed.flag {
                    tracing::warn!("the provider's usage cannot be true ({flag}): the call is costed at its reservation");
                }
                settle.usage = costed.usage;
                settle.cost = costed.cost;
                cost_source = costed.source;
                settle.usage_flag = costed.flag;
            }
            let ids: Vec<String> = request.claimed.iter().map(|c| c.item.id.clone()).collect();
            let validated = if completion.no_choices {
                Err(Malformed("the answer has no `choices` (its usage is billed)".into()))
            } else if let Some(cut) = (!from_cache).then(|| cut_prompt(ctx, &request.model, request.prompt_tokens, completion.usage.as_ref())).flatten() {
                Err(Malformed(cut))
            } else {
                validate(&completion.content, &ids, &ctx.shape, completion.may_end_mid_entry()).map_err(|malformed| {
                    // A refused answer is not one cut at max_tokens: the advice for that is not its.
                    if completion.finish_reason.as_deref() == Some(crate::provider::JSON_REFUSED) {
                        Malformed(format!("the server refused the answer as JSON it could not parse (json_validate_failed): {malformed}").replace(
                            crate::pipeline::answers::CUT_BEFORE_FIRST_ENTRY,
                            "no complete entry",
                        ))
                    } else {
                        malformed
                    }
                })
            };
            match validated {
                Err(malformed) => {
                    call_outcome = CallOutcome::Malformed;
                    settle.error = Some(malformed.to_string());
                    settle.content = Some(completion.content.clone());
                    settle.items_invalid = request_len as u32;
                    result.write.items = setback_all(&Setback::Malformed(malformed.to_string()));
                    result.observation.outcome = Outcome::Completed(CompletedRequest {
                        items_missing: request_len as u32,
                        truncated: completion.truncated(),
                        prompt_tokens: settle.usage.prompt_tokens.min(u64::from(u32::MAX)) as u32,
                        completion_tokens: settle.usage.completion_tokens.min(u64::from(u32::MAX)) as u32,
                        server_time,
                        ..CompletedRequest::default()
                    });
                }
                Ok(validated) => {
                    settle.repair = validated.repair.clone();
                    let completed = apply_outputs(ctx, &request.claimed, &validated, now, &mut result.write.items, &mut settle);
                    if validated.foreign_keys > 0 {
                        settle.content = Some(completion.content.clone());
                    }
                    call_outcome = match (&answer, completion.truncated()) {
                        (Answer::Cached(_), _) => CallOutcome::Cached,
                        (_, true) => CallOutcome::Truncated,
                        _ => CallOutcome::Ok,
                    };
                    result.verdict = Verdict::Succeeded;
                    result.observation.outcome = Outcome::Completed(CompletedRequest {
                        truncated: completion.truncated(),
                        prompt_tokens: settle.usage.prompt_tokens.min(u64::from(u32::MAX)) as u32,
                        completion_tokens: settle.usage.completion_tokens.min(u64::from(u32::MAX)) as u32,
                        server_time,
                        ..completed
                    });
                }
            }
        }
        Err(error) => {
            settle.http_status = error.http_status();
            call_outcome = error_outcome(&error);
            settle.error = Some(error.to_string());
            cost_source = CostSource::None;
            let asked = match &error {
                CallError::RateLimited(limit) => too_long_wait(&limit.headers, true, ctx.limits.max_retry_after),
                CallError::Transient { status: Some(_), headers, .. } => too_long_wait(headers, false, ctx.limits.max_retry_after),
                _ => None,
            };
            if let Some(why) = asked {
                // Waiting that long is a stall, not a pause: stop the run, the items go back to
                // the queue untouched, and nothing this long is learned or shared.
                result.verdict = Verdict::Fatal(why);
                result.observation.outcome =
                    if matches!(error, CallError::RateLimited(_)) { Outcome::RateLimited } else { Outcome::OtherError };
                result.write.items = setback_all(&Setback::Released);
                result.write.settle = seal(settle, call_outcome, cost_source);
                result.cost_source = cost_source;
                return result;
            }
            let (setback, observed) = match &error {
                CallError::RateLimited(limit) => {
                    result.observation.rate_limits = parse_rate_limit_headers(limit.headers.iter().map(|(a, b)| (a.as_str(), b.as_str())));
                    if matches!(answer, Answer::Provider { .. }) && request.resends < MAX_RESENDS {
                        // Retry-After plus up to a tenth of it again, so resends do not land together.
                        let wait = limit.retry_after.unwrap_or(Duration::from_secs(1));
                        let after = wait.saturating_add(jitter(wait, 0.1 * fastrand::f64()));
                        result.observation.outcome = Outcome::RateLimited;
                        result.write.settle = seal(settle, call_outcome, cost_source);
                        result.cost_source = cost_source;
                        result.resend = Some((after, request));
                        return result;
                    }
                    (Setback::RateLimited { retry_after: limit.retry_after }, Outcome::RateLimited)
                }
                CallError::Timeout { .. } => {
                    // The provider may have done (and billed) the work: possibly billed.
                    settle.lost = true;
                    (Setback::Timeout(error.to_string()), Outcome::TimedOut)
                }
                CallError::Transient { status: Some(status), headers, .. } => {
                    result.observation.rate_limits = parse_rate_limit_headers(headers.iter().map(|(a, b)| (a.as_str(), b.as_str())));
                    if *status == 503 {
                        // The server cannot take requests now (a model loading, its queue full,
                        // a proxy with no healthy server behind it): not the items' fault. They
                        // wait (its Retry-After, if it said one) and go out again with their
                        // attempts untouched; the controller slows down, and the outage breaker
                        // decides how long that may last.
                        result.verdict = Verdict::Unavailable(error.to_string());
                        result.lone_unavailable = Some(setback_all(&Setback::Transient(error.to_string())));
                        let wait = crate::provider::parse_retry_after(headers).unwrap_or(OUTAGE_RETRY);
                        (Setback::Unavailable { message: error.to_string(), wait }, Outcome::ServerError { status: 503 })
                    } else {
                        (Setback::Transient(error.to_string()), Outcome::ServerError { status: *status })
                    }
                }
                CallError::Transient { status: None, message, .. } => {
                    if message.starts_with("cannot connect") {
                        // Nothing reached the provider: an outage, not the items' fault. They
                        // wait and go out again; the breaker decides how long that may last.
                        result.verdict = Verdict::Unreachable(error.to_string());
                        (Setback::Unreachable { message: error.to_string(), wait: OUTAGE_RETRY }, Outcome::OtherError)
                    } else {
                        settle.lost = true;
                        (Setback::Transient(error.to_string()), Outcome::OtherError)
                    }
                }
                CallError::Rejected { message, .. } if message.ends_with(crate::provider::FLAGGED_BY_MODERATION) => {
                    // One request's input, not the job's: its items go out again in halves, and
                    // a flagged item sent alone ends rejected for it.
                    let setback = if request_len == 1 {
                        Setback::Rejected { reason: "moderation".into(), detail: error.to_string() }
                    } else {
                        Setback::Malformed(error.to_string())
                    };
                    (setback, Outcome::OtherError)
                }
                CallError::Rejected { .. } => {
                    result.verdict = Verdict::Refused(error.to_string());
                    (Setback::Malformed(error.to_string()), Outcome::OtherError)
                }
                CallError::Fatal { .. } | CallError::Redirected { .. } => {
                    result.verdict = Verdict::Fatal(error.to_string());
                    (Setback::Released, Outcome::OtherError)
                }
                CallError::TooLarge { .. } => {
                    // Answered and probably billed, but never kept: possibly billed.
                    settle.lost = true;
                    (Setback::Malformed(error.to_string()), Outcome::OtherError)
                }
                CallError::BadOutput { body, .. } => {
                    settle.content = Some(body.chars().take(4000).collect());
                    (Setback::Malformed(error.to_string()), Outcome::OtherError)
                }
            };
            result.observation.outcome = observed;
            result.write.items = setback_all(&setback);
        }
    }
    let all_done = result.write.items.iter().all(|u| matches!(u.change, ItemChange::Done { .. }));
    if !all_done && (from_cache || settle.http_status == Some(200)) {
        result.drop_cache = Some(request.hash.clone());
    }
    result.write.settle = seal(settle, call_outcome, cost_source);
    result.cost_source = cost_source;
    result
}

/// The ledger's outcome for a call that failed.
pub(crate) fn error_outcome(error: &CallError) -> CallOutcome {
    match error {
        CallError::RateLimited(_) => CallOutcome::RateLimited,
        CallError::Transient { .. } => CallOutcome::Transient,
        CallError::Timeout { .. } => CallOutcome::Timeout,
        CallError::Rejected { .. } => CallOutcome::RejectedRequest,
        CallError::Fatal { .. } => CallOutcome::Fatal,
        CallError::Redirected { .. } => CallOutcome::Redirected,
        CallError::TooLarge { .. } => CallOutcome::TooLarge,
        CallError::BadOutput { .. } => CallOutcome::BadOutput,
    }
}

/// The settlement with its outcome and cost source as the ledger spells them.
fn seal(settle: CallSettle, outcome: CallOutcome, cost_source: CostSource) -> CallSettle {
    CallSettle { outcome: outcome.as_str().into(), cost_source: cost_source.as_str().into(), ..settle }
}

/// The wait a 429 (`rate_limited`) or a 5xx asks for — `retry-after-ms`/`retry-after`, or for
/// a 429 the reset of an exhausted limit — when it is longer than `cap`: the message that stops
/// the run, naming the header and its value.
pub fn too_long_wait(headers: &[(String, String)], rate_limited: bool, cap: Duration) -> Option<String> {
    let pairs = || headers.iter().map(|(a, b)| (a.as_str(), b.as_str()));
    let info = parse_rate_limit_headers(pairs());
    let unnamed = || if rate_limited { exhausted_unnamed_reset(headers, std::time::SystemTime::now()) } else { None };
    let wait = info
        .retry_after
        .or_else(|| if rate_limited { exhausted_reset(&info) } else { None })
        .or_else(|| unnamed().map(|(wait, _)| wait))?;
    if wait <= cap {
        return None;
    }
    // The header that asks for it: the one that, parsed alone (with the answer's date, which
    // absolute resets are read against), asks for this wait.
    let date = headers.iter().find(|(name, _)| name.eq_ignore_ascii_case("date")).map(|(_, value)| value.as_str());
    let named = headers
        .iter()
        .find(|(name, value)| {
            let alone = parse_rate_limit_headers([(name.as_str(), value.as_str())].into_iter().chain(date.map(|d| ("date", d))));
            let windows = [alone.requests, alone.tokens, alone.input_tokens, alone.output_tokens];
            alone.retry_after == Some(wait) || windows.iter().any(|w| w.reset == Some(wait))
        })
        .map(|(name, value)| format!("`{name}: {value}`"))
        .or_else(|| unnamed().map(|(_, header)| header))
        .unwrap_or_else(|| "its rate-limit headers".into());
    let shown = if wait >= backfill_controller::LONGEST_WAIT {
        "more than 100 years".to_owned()
    } else {
        humantime::format_duration(Duration::from_secs(wait.as_secs())).to_string()
    };
    Some(format!(
        "the provider asks to wait {shown} before the next request ({named}), longer than \
         limits.max_retry_after_s = {}s; the items go back to the queue: run again with --resume \
         later, or raise limits.max_retry_after_s",
        cap.as_secs_f64()
    ))
}

/// A used-up limit of no named kind (OpenRouter's daily limit of free models: `x-ratelimit-remaining: 0`
/// and `x-ratelimit-reset` as a Unix time, in milliseconds or seconds): how long until it
/// resets, as seen `now`, and the header that says so. Its window is not said, so it paces
/// nothing; it only tells a wait too long to sit out.
fn exhausted_unnamed_reset(headers: &[(String, String)], now: std::time::SystemTime) -> Option<(Duration, String)> {
    let get = |name: &str| headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim());
    if get("x-ratelimit-remaining")?.parse::<f64>().ok()? > 0.0 {
        return None;
    }
    let value = get("x-ratelimit-reset")?;
    let reset = value.parse::<f64>().ok().filter(|r| r.is_finite() && *r > 1e9)?;
    let seconds = if reset > 1e12 { reset / 1000.0 } else { reset };
    let since_epoch = now.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs_f64();
    let wait = backfill_controller::seconds_to_duration((seconds - since_epoch).max(0.0))?;
    Some((wait, format!("`x-ratelimit-reset: {value}`")))
}

/// The reset of a limit the provider says is used up, if any.
fn exhausted_reset(info: &RateLimitInfo) -> Option<Duration> {
    [info.requests, info.tokens, info.input_tokens, info.output_tokens]
        .iter()
        .filter(|window| window.remaining == Some(0))
        .filter_map(|window| window.reset)
        .max()
}

/// Writes each returned output through post-processing into item updates; returns the
/// per-item counts for the controller.
fn apply_outputs(
    ctx: &RunContext,
    claimed: &[Claimed],
    validated: &Validated,
    now: i64,
    updates: &mut Vec<ItemUpdate>,
    settle: &mut CallSettle,
) -> CompletedRequest {
    let request_len = claimed.len();
    let mut counts = CompletedRequest::default();
    let next = |c: &Claimed, setback: &Setback| ctx.policy.next(setback, c.attempts, c.tier, request_len, now, fastrand::f64());

    for (index, output) in &validated.outputs {
        let claimed = &claimed[*index];
        let raw = serde_json::to_string(output).expect("outputs serialise");
        match ctx.check_output(output) {
            Ok((values, changes)) => {
                counts.items_valid += 1;
                settle.items_ok += 1;
                let final_json = serde_json::to_string(&values.iter().cloned().collect::<std::collections::BTreeMap<_, _>>())
                    .expect("outputs serialise");
                updates.push(ItemUpdate {
                    lease: claimed.lease.clone(),
                    change: ItemChange::Done { values: values.into_iter().map(|(k, v)| (k, OutputValue::Text(v))).collect() },
                    output: Some(OutputRecord { status: OutputStatus::Written.as_str().into(), raw: Some(raw), final_json: Some(final_json), detail: changes }),
                });
            }
            Err((reason, detail)) => {
                counts.items_rejected += 1;
                settle.items_rejected += 1;
                let setback = Setback::Rejected { reason: reason.clone(), detail: detail.clone() };
                updates.push(ItemUpdate {
                    lease: claimed.lease.clone(),
                    change: next(claimed, &setback),
                    output: Some(OutputRecord {
                        status: OutputStatus::Rejected.as_str().into(),
                        raw: Some(raw),
                        final_json: None,
                        detail: Some(serde_json::json!({ "reason": reason, "detail": detail }).to_string()),
                    }),
                });
            }
        }
    }
    for (index, why) in &validated.invalid {
        let claimed = &claimed[*index];
        counts.items_missing += 1;
        settle.items_invalid += 1;
        updates.push(ItemUpdate {
            lease: claimed.lease.clone(),
            change: next(claimed, &Setback::Invalid(why.clone())),
            output: Some(OutputRecord { status: OutputStatus::Invalid.as_str().into(), raw: None, final_json: None, detail: Some(why.clone()) }),
        });
    }
    for index in &validated.missing {
        let claimed = &claimed[*index];
        counts.items_missing += 1;
        settle.items_missing += 1;
        updates.push(ItemUpdate { lease: claimed.lease.clone(), change: next(claimed, &Setback::Missing), output: None });
    }
    settle.foreign_keys = validated.foreign_keys as u32;
    counts
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_used_up_limit_of_no_named_kind_tells_its_reset_in_unix_time() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_765_000_000);
        let headers = |remaining: &str, reset: &str| vec![
            ("x-ratelimit-limit".to_string(), "50".to_string()),
            ("x-ratelimit-remaining".to_string(), remaining.to_string()),
            ("x-ratelimit-reset".to_string(), reset.to_string()),
        ];
        // OpenRouter's daily limit of free models, its reset in milliseconds, ten hours off.
        let (wait, named) = exhausted_unnamed_reset(&headers("0", "1765036000000"), now).expect("a reset");
        assert_eq!((wait, named.as_str()), (Duration::from_secs(36_000), "`x-ratelimit-reset: 1765036000000`"));
        assert_eq!(exhausted_unnamed_reset(&headers("0", "1765000060"), now).map(|(w, _)| w), Some(Duration::from_secs(60)));
        // Not used up, a reset in the past, a reset that is no Unix time: nothing to wait for.
        assert_eq!(exhausted_unnamed_reset(&headers("3", "1765036000000"), now), None);
        assert_eq!(exhausted_unnamed_reset(&headers("0", "1764999000000"), now).map(|(w, _)| w), Some(Duration::ZERO));
        assert_eq!(exhausted_unnamed_reset(&headers("0", "20"), now), None);
        let stop = too_long_wait(&headers("0", &format!("{}", (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 36_000) * 1000)), true, Duration::from_secs(3600));
        assert!(stop.as_deref().is_some_and(|s| s.contains("x-ratelimit-reset") && s.contains("limits.max_retry_after_s")), "{stop:?}");
    }

    #[test]
    fn only_a_refusal_before_any_text_says_that_a_server_cannot_stream() {
        let transient = |status: Option<u16>, message: &str| CallError::Transient { status, message: message.into(), headers: Vec::new() };
        let bad_output = CallError::BadOutput { reason: "not JSON".into(), status: 200, body: String::new() };
        for (failure, refuses) in [
            (CallError::Rejected { status: 422, message: "stream_options".into() }, true),
            (transient(Some(500), "Internal Server Error"), true),
            (transient(Some(501), "not implemented"), true),
            (bad_output.clone(), true),
            (transient(None, "error reading the body"), true),
            (transient(Some(503), "Loading model"), false),
            (transient(Some(502), "bad gateway"), false),
            (transient(None, "cannot connect: refused"), false),
            (CallError::Timeout { after: Duration::from_secs(9) }, false),
            (CallError::TooLarge { limit: 10, status: 200 }, false),
            (CallError::Fatal { status: 401, message: "key".into() }, false),
        ] {
            assert_eq!(refuses_streams(&failure, false), refuses, "{failure}");
        }
        // After the first chunk came, the server was streaming: the failure is the request's.
        assert!(!refuses_streams(&bad_output, true));
        assert!(!refuses_streams(&transient(Some(500), "x"), true));
    }

    const NAMES: &[&str] = &[
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-reset-requests",
        "x-ratelimit-reset-tokens",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-limit-requests",
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-remaining",
        "date",
    ];

    /// Values a header may carry: numbers of any size, durations in units, dates, garbage.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<f64>().prop_map(|f| f.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| format!("{n}ms")),
            "[0-9]{1,30}(\\.[0-9]{0,5})?(h|m|s|ms|us|ns|µs|d|)".prop_map(String::from),
            "([0-9]{1,25}[hms]){1,4}".prop_map(String::from),
            "[0-9]{1,6}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|\\+[0-9]{2}:[0-9]{2})".prop_map(String::from),
            Just("Thu, 01 Jan 1970 00:00:00 GMT".to_string()),
            Just("Fri, 31 Dec 9999 23:59:59 GMT".to_string()),
            "\\PC{0,20}".prop_map(String::from),
            Just("1e308".to_string()),
            Just("-1e308".to_string()),
            Just("NaN".to_string()),
            Just("inf".to_string()),
        ]
    }

    fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec((proptest::sample::select(NAMES).prop_map(String::from), value()), 0..6)
    }

    proptest! {
        #[test]
        fn no_rate_limit_header_panics_or_names_an_endless_wait(headers in headers(), cap_s in 1u64..2_592_000, share in 0.0f64..1.0) {
            let info = parse_rate_limit_headers(headers.iter().map(|(a, b)| (a.as_str(), b.as_str())));
            let longest = backfill_controller::LONGEST_WAIT;
            let windows = [info.requests, info.tokens, info.input_tokens, info.output_tokens];
            for wait in info.retry_after.into_iter().chain(windows.iter().filter_map(|w| w.reset)) {
                prop_assert!(wait <= longest);
                // What the runner does with a wait: jitter, add, deadline in ms.
                let after = wait.saturating_add(jitter(wait, share));
                let _ = 0i64.saturating_add(i64::try_from(after.as_millis()).unwrap_or(i64::MAX));
                let _ = std::time::Instant::now() + after;
            }
            let cap = Duration::from_secs(cap_s);
            for rate_limited in [true, false] {
                let stop = too_long_wait(&headers, rate_limited, cap);
                let asked = info.retry_after.or_else(|| if rate_limited { exhausted_reset(&info) } else { None });
                prop_assert_eq!(stop.is_some(), asked.is_some_and(|w| w > cap), "{:?}", stop);
            }
            let retry_after = crate::provider::parse_retry_after(&headers);
            prop_assert!(retry_after.is_none_or(|w| w <= longest));
        }
    }
}
