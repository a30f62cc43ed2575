//! One call: send it (or take its answer from the response cache), then conclude it into the
//! batch write, the controller's observation, and the progress deltas. Runs inside the call's
//! own task, so validation and post-processing of many answers proceed in parallel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backfill_controller::{CompletedRequest, Observation, Outcome, RateLimitInfo, Ticket, parse_rate_limit_headers};

use super::context::RunContext;
use super::policy::Setback;
use crate::ledger::{Bounds, CostSource, answered_cost};
use crate::pricing::{Picos, Tier};
use crate::provider::{CallError, Completion, parse_completion};
use crate::store::{BatchWrite, CallSettle, Claimed, ItemChange, ItemUpdate, OutputRecord, OutputValue, now_ms};
use crate::validate::{Malformed, Validated, validate};

/// A call ready to go: its items, body and ledger row.
#[derive(Debug)]
pub struct PreparedCall {
    pub call_id: i64,
    /// `None` when the controller was not told (answers from the cache).
    pub ticket: Option<Ticket>,
    pub claimed: Vec<Claimed>,
    pub tier: u32,
    pub model: String,
    pub body: Vec<u8>,
    pub hash: String,
    pub estimate: Picos,
    /// The cached answer, when the same request was answered before.
    pub cached: Option<String>,
    /// Settling a call lost in a crash from its cached answer: it was billed.
    pub replay: bool,
    pub timeout: Duration,
    /// Cancelled when the controller cuts the call at the end of the queue.
    pub cut: tokio_util::sync::CancellationToken,
    /// The price column the call is billed at (the batch API's is lower).
    pub billing: Tier,
    /// Set for calls that go out again unchanged after a 429 (`None`: cache replays and
    /// batch results).
    pub resendable: Option<Resendable>,
}

/// How many times a rate-limited request goes out again unchanged before its items return to
/// the queue to be packed anew.
pub const MAX_RESENDS: u32 = 3;

/// The shape of a request that may go out again unchanged.
#[derive(Debug, Clone, Copy)]
pub struct Resendable {
    pub prompt_tokens: u64,
    pub max_tokens: u32,
    /// How many times it has gone out again already.
    pub resends: u32,
}

/// A rate-limited request to send again, unchanged (same items, still leased to this worker;
/// same body), once the provider's Retry-After has passed: a 429 says nothing about the
/// request, and the identical body keeps the provider's prompt cache and the response cache
/// working.
#[derive(Debug)]
pub struct Resend {
    pub after: Duration,
    pub claimed: Vec<Claimed>,
    pub tier: u32,
    pub model: String,
    pub body: Vec<u8>,
    pub hash: String,
    pub billing: Tier,
    pub timeout: Duration,
    pub shape: Resendable,
}

/// What the dispatcher does with a finished call.
#[derive(Debug)]
pub struct Concluded {
    pub ticket: Option<Ticket>,
    pub observation: Observation,
    pub write: BatchWrite,
    /// The provider refuses every call: stop the run with this message.
    pub fatal: Option<String>,
    /// The provider could not be reached at all (for the circuit breaker).
    pub unreachable: Option<String>,
    /// The request itself was refused (4xx) — repeated, it means a bad job setting.
    pub refused: Option<String>,
    pub succeeded: bool,
    /// The estimate reserved for the call.
    pub estimate: Picos,
    /// Not every item got an output: an identical request must not be served from the cache.
    pub drop_cache: Option<String>,
    /// Rate-limited: the same request goes out again after this wait; its items stay leased.
    pub resend: Option<Resend>,
}

pub async fn execute(ctx: Arc<RunContext>, call: PreparedCall) -> Concluded {
    let started = Instant::now();
    let outcome = match &call.cached {
        Some(body) => parse_completion(body)
            .map(|completion| (completion, Vec::new()))
            .map_err(|reason| CallError::BadOutput { reason, status: 200, body: body.clone() }),
        None => match tokio::select! {
            sent = ctx.client.send(&call.body, call.timeout) => sent,
            _ = call.cut.cancelled() => Err(CallError::Timeout { after: started.elapsed() }),
        } {
            Ok(answer) => {
                if ctx.cache.enabled
                    && let Err(e) = ctx.store.cache_put(&call.hash, &call.model, &answer.body, ctx.cache.ttl).await {
                        tracing::warn!("could not store the answer in the response cache: {e:#}");
                    }
                Ok((answer.completion, answer.headers))
            }
            Err(error) => Err(error),
        },
    };
    let latency = started.elapsed();
    conclude(&ctx, call, outcome, latency)
}

/// Turns a call's outcome into its batch write, the controller's observation and what the
/// dispatcher must know (breaker, fatal errors, cache).
pub fn conclude(
    ctx: &RunContext,
    call: PreparedCall,
    outcome: Result<(Completion, Vec<(String, String)>), CallError>,
    latency: Duration,
) -> Concluded {
    let now = now_ms();
    let batch_len = call.claimed.len();
    let mut settle = CallSettle {
        latency_ms: Some(latency.as_millis() as i64),
        ..CallSettle::default()
    };
    let mut result = Concluded {
        ticket: call.ticket,
        observation: Observation::new(latency, Outcome::OtherError, Default::default()),
        write: BatchWrite { run_id: ctx.run_id, call_id: call.call_id, settle: CallSettle::default(), items: Vec::new() },
        fatal: None,
        unreachable: None,
        refused: None,
        succeeded: false,
        drop_cache: None,
        estimate: call.estimate,
        resend: None,
    };
    let setback_all = |setback: &Setback| -> Vec<ItemUpdate> {
        call.claimed
            .iter()
            .map(|c| ItemUpdate {
                lease: c.lease.clone(),
                change: ctx.policy.next(setback, c.attempts, c.tier, batch_len, now, fastrand::f64()),
                output: None,
            })
            .collect()
    };

    match outcome {
        Ok((completion, headers)) => {
            result.observation.rate_limits = parse_rate_limit_headers(headers.iter().map(|(a, b)| (a.as_str(), b.as_str())));
            settle.http_status = Some(200);
            let price = ctx.price(call.tier, &call.model);
            if call.cached.is_some() && !call.replay {
                settle.usage = completion.usage.unwrap_or_default();
                settle.cost = Picos::ZERO;
                settle.cost_source = CostSource::Cache.as_str().into();
            } else {
                let max_tokens = call.resendable.map(|shape| u64::from(shape.max_tokens)).unwrap_or(0);
                let bounds = Bounds::of_request(call.body.len(), max_tokens, u64::from(ctx.chat.context_window));
                let costed = answered_cost(
                    &price,
                    call.billing,
                    completion.usage.as_ref(),
                    completion.reported_cost_usd,
                    completion.usage_problem.as_deref(),
                    call.estimate,
                    &bounds,
                );
                if let Some(flag) = &costed.flag {
                    tracing::warn!("the provider's usage cannot be true ({flag}): the call is costed at its reservation");
                }
                settle.usage = costed.usage;
                settle.cost = costed.cost;
                settle.cost_source = costed.source.as_str().into();
                settle.usage_flag = costed.flag;
            }
            let ids: Vec<String> = call.claimed.iter().map(|c| c.item.id.clone()).collect();
            let validated = if completion.no_choices {
                Err(Malformed("the answer has no `choices` (its usage is billed)".into()))
            } else {
                validate(&completion.content, &ids, &ctx.shape, completion.truncated())
            };
            match validated {
                Err(malformed) => {
                    settle.outcome = "malformed".into();
                    settle.error = Some(malformed.to_string());
                    settle.content = Some(completion.content.clone());
                    settle.items_invalid = batch_len as u32;
                    result.write.items = setback_all(&Setback::Malformed(malformed.to_string()));
                    result.observation.outcome = Outcome::Completed(CompletedRequest {
                        items_missing: batch_len as u32,
                        truncated: completion.truncated(),
                        prompt_tokens: settle.usage.prompt_tokens.min(u64::from(u32::MAX)) as u32,
                        completion_tokens: settle.usage.completion_tokens.min(u64::from(u32::MAX)) as u32,
                        ..CompletedRequest::default()
                    });
                }
                Ok(validated) => {
                    settle.repair = validated.repair.clone();
                    let completed = apply_outputs(ctx, &call, &validated, now, &mut result.write.items, &mut settle);
                    if validated.foreign_keys > 0 {
                        settle.content = Some(completion.content.clone());
                    }
                    settle.outcome = match (call.cached.is_some(), call.replay, completion.truncated()) {
                        (true, false, _) => "cached",
                        (_, _, true) => "truncated",
                        _ => "ok",
                    }
                    .into();
                    result.succeeded = true;
                    result.observation.outcome = Outcome::Completed(CompletedRequest {
                        truncated: completion.truncated(),
                        prompt_tokens: settle.usage.prompt_tokens.min(u64::from(u32::MAX)) as u32,
                        completion_tokens: settle.usage.completion_tokens.min(u64::from(u32::MAX)) as u32,
                        ..completed
                    });
                }
            }
        }
        Err(error) => {
            settle.http_status = error.http_status();
            settle.outcome = error.outcome().into();
            settle.error = Some(error.to_string());
            settle.cost_source = CostSource::None.as_str().into();
            let asked = match &error {
                CallError::RateLimited(limit) => too_long_wait(&limit.headers, true, ctx.limits.max_retry_after),
                CallError::Transient { status: Some(_), headers, .. } => too_long_wait(headers, false, ctx.limits.max_retry_after),
                _ => None,
            };
            if let Some(why) = asked {
                // Waiting that long is a stall, not a pause: stop the run, the items go back to
                // the queue untouched, and nothing this long is learned or shared.
                result.fatal = Some(why);
                result.observation.outcome =
                    if matches!(error, CallError::RateLimited(_)) { Outcome::RateLimited } else { Outcome::OtherError };
                result.write.items = setback_all(&Setback::Released);
                result.write.settle = settle;
                return result;
            }
            let (setback, observed) = match &error {
                CallError::RateLimited(limit) => {
                    result.observation.rate_limits = parse_rate_limit_headers(limit.headers.iter().map(|(a, b)| (a.as_str(), b.as_str())));
                    if let Some(shape) = call.resendable.filter(|s| s.resends < MAX_RESENDS && call.cached.is_none()) {
                        // Retry-After plus up to a tenth of it again, so resends do not land together.
                        let wait = limit.retry_after.unwrap_or(Duration::from_secs(1));
                        let after = wait.saturating_add(jitter(wait, 0.1 * fastrand::f64()));
                        result.observation.outcome = Outcome::RateLimited;
                        result.write.settle = settle;
                        result.resend = Some(Resend {
                            after,
                            claimed: call.claimed,
                            tier: call.tier,
                            model: call.model,
                            body: call.body,
                            hash: call.hash,
                            billing: call.billing,
                            timeout: call.timeout,
                            shape,
                        });
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
                    (Setback::Transient(error.to_string()), Outcome::ServerError { status: *status })
                }
                CallError::Transient { status: None, message, .. } => {
                    if message.starts_with("cannot connect") {
                        result.unreachable = Some(error.to_string());
                    } else {
                        settle.lost = true;
                    }
                    (Setback::Transient(error.to_string()), Outcome::OtherError)
                }
                CallError::Rejected { .. } => {
                    result.refused = Some(error.to_string());
                    (Setback::Malformed(error.to_string()), Outcome::OtherError)
                }
                CallError::Fatal { .. } | CallError::Redirected { .. } => {
                    result.fatal = Some(error.to_string());
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
    if !all_done && (call.cached.is_some() || settle.http_status == Some(200)) {
        result.drop_cache = Some(call.hash.clone());
    }
    result.write.settle = settle;
    result
}

/// `share` of `wait` (share in 0..=1), never overflowing.
pub fn jitter(wait: Duration, share: f64) -> Duration {
    Duration::try_from_secs_f64(wait.as_secs_f64() * share.clamp(0.0, 1.0)).unwrap_or(Duration::ZERO)
}

/// The wait a 429 (`rate_limited`) or a 5xx asks for — `retry-after-ms`/`retry-after`, or for
/// a 429 the reset of an exhausted limit — when it is longer than `cap`: the message that stops
/// the run, naming the header and its value.
pub fn too_long_wait(headers: &[(String, String)], rate_limited: bool, cap: Duration) -> Option<String> {
    let pairs = || headers.iter().map(|(a, b)| (a.as_str(), b.as_str()));
    let info = parse_rate_limit_headers(pairs());
    let wait = info.retry_after.or_else(|| if rate_limited { exhausted_reset(&info) } else { None })?;
    if wait <= cap {
        return None;
    }
    // The header that asks for it: the one that, parsed alone, asks for this wait.
    let named = headers
        .iter()
        .find(|(name, value)| {
            let alone = parse_rate_limit_headers([(name.as_str(), value.as_str())]);
            let windows = [alone.requests, alone.tokens, alone.input_tokens, alone.output_tokens];
            alone.retry_after == Some(wait) || windows.iter().any(|w| w.reset == Some(wait))
        })
        .map(|(name, value)| format!("`{name}: {value}`"))
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
    call: &PreparedCall,
    validated: &Validated,
    now: i64,
    updates: &mut Vec<ItemUpdate>,
    settle: &mut CallSettle,
) -> CompletedRequest {
    let batch_len = call.claimed.len();
    let mut counts = CompletedRequest::default();
    let next = |c: &Claimed, setback: &Setback| ctx.policy.next(setback, c.attempts, c.tier, batch_len, now, fastrand::f64());

    for (index, output) in &validated.outputs {
        let claimed = &call.claimed[*index];
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
                    output: Some(OutputRecord { status: "written".into(), raw: Some(raw), final_json: Some(final_json), detail: changes }),
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
                        status: "rejected".into(),
                        raw: Some(raw),
                        final_json: None,
                        detail: Some(serde_json::json!({ "reason": reason, "detail": detail }).to_string()),
                    }),
                });
            }
        }
    }
    for (index, why) in &validated.invalid {
        let claimed = &call.claimed[*index];
        counts.items_missing += 1;
        settle.items_invalid += 1;
        updates.push(ItemUpdate {
            lease: claimed.lease.clone(),
            change: next(claimed, &Setback::Invalid(why.clone())),
            output: Some(OutputRecord { status: "invalid".into(), raw: None, final_json: None, detail: Some(why.clone()) }),
        });
    }
    for index in &validated.missing {
        let claimed = &call.claimed[*index];
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
