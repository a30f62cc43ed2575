//! Cost attribution for one call: the provider's own figure when it sends one, else usage ×
//! the job's price, else (no usage at all) the reservation's estimate.

use crate::pricing::{ModelPrice, Picos, Tier, Usage};

/// Where a call's cost came from, as recorded in the ledger's `cost_source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostSource {
    /// usage × the job's price table.
    PriceTable,
    /// The provider's reported `usage.cost`.
    Provider,
    /// No usage came back: the estimate reserved before sending.
    Estimate,
    /// Answered from the response cache: nothing was billed.
    Cache,
    /// No answer, nothing billed (rate limited, connection refused).
    None,
}

impl CostSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CostSource::PriceTable => "price_table",
            CostSource::Provider => "provider",
            CostSource::Estimate => "estimate",
            CostSource::Cache => "cache",
            CostSource::None => "none",
        }
    }
}

/// How a call ended, as recorded in the ledger's `outcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// Answered and validated.
    Ok,
    /// Answered from the response cache.
    Cached,
    /// Answered, cut short by `max_tokens`; its complete entries were kept.
    Truncated,
    /// Answered with nothing that maps back to the items.
    Malformed,
    /// The provider's errors, by class (`provider::CallError`, mapped by the runner).
    RateLimited,
    Transient,
    Timeout,
    RejectedRequest,
    Fatal,
    Redirected,
    TooLarge,
    BadOutput,
    /// Stopped before it ended: its items went back to the queue untouched.
    Interrupted,
    /// A local model failed on some of the items.
    ModelError,
    /// A request of a provider batch that the provider could not run.
    BatchError,
    /// A request of a provider batch that never ran (expired, cancelled).
    NotRun,
    /// A request of a provider batch discarded before the provider had it.
    NotSent,
}

impl CallOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CallOutcome::Ok => "ok",
            CallOutcome::Cached => "cached",
            CallOutcome::Truncated => "truncated",
            CallOutcome::Malformed => "malformed",
            CallOutcome::RateLimited => "rate_limited",
            CallOutcome::Transient => "transient",
            CallOutcome::Timeout => "timeout",
            CallOutcome::RejectedRequest => "rejected_request",
            CallOutcome::Fatal => "fatal",
            CallOutcome::Redirected => "redirected",
            CallOutcome::TooLarge => "too_large",
            CallOutcome::BadOutput => "bad_output",
            CallOutcome::Interrupted => "interrupted",
            CallOutcome::ModelError => "model_error",
            CallOutcome::BatchError => "batch_error",
            CallOutcome::NotRun => "not_run",
            CallOutcome::NotSent => "not_sent",
        }
    }
}

/// What became of one item's output, as recorded in `backfill_outputs.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStatus {
    /// Written to the target column.
    Written,
    /// Refused by post-processing.
    Rejected,
    /// Not a valid value for the target.
    Invalid,
}

impl OutputStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStatus::Written => "written",
            OutputStatus::Rejected => "rejected",
            OutputStatus::Invalid => "invalid",
        }
    }
}

/// What the request could have used, for judging the provider's figures: a token is at least
/// one byte of the request, so a prompt cannot count more tokens than the request body has
/// bytes (plus the chat framing and a provider's own system prompt), and an answer cannot be much longer than its `max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The most prompt tokens the request could hold (`None`: unknown, e.g. batch results).
    pub prompt_tokens: Option<u64>,
    /// The most completion tokens the request allowed (`None`: unknown).
    pub completion_tokens: Option<u64>,
    /// The model's context window: prompt and completion together cannot exceed twice it.
    pub context_window: u64,
}

impl Bounds {
    /// Bounds of a request `body_bytes` long that asked for at most `max_tokens` (0: unknown).
    pub fn of_request(body_bytes: usize, max_tokens: u64, context_window: u64) -> Self {
        Bounds {
            // The slack covers chat framing and a system prompt some providers add themselves.
            prompt_tokens: (body_bytes > 0).then_some(body_bytes as u64 + 1024),
            completion_tokens: (max_tokens > 0).then_some(max_tokens.saturating_mul(2).saturating_add(256)),
            context_window,
        }
    }
}

/// A provider-reported cost above this many times the reservation (plus [`COST_SLACK`]) is
/// not believed.
pub const COST_FACTOR: i64 = 4;
/// One cent: the absolute slack on top of [`COST_FACTOR`] × the reservation.
pub const COST_SLACK: Picos = Picos(10_000_000_000);

/// The cost of an answered call, and why the provider's figures were not trusted, if so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Costed {
    pub cost: Picos,
    pub source: CostSource,
    /// The usage to record: the provider's, or zero when it was impossible.
    pub usage: Usage,
    /// Why the provider's usage or cost was impossible: the call is costed at its reservation.
    pub flag: Option<String>,
}

/// The cost of an answered call: the provider's own figure when it sends one, else usage ×
/// the job's price, else (no usage at all) the reservation's estimate. A figure that is
/// impossible — `problem` found while parsing (negative or fractional counts, a cost that is
/// no amount), more tokens than the request could hold, a cost far above the reservation — is
/// never trusted: the call costs its reservation and carries the reason.
pub fn answered_cost(
    price: &ModelPrice,
    tier: Tier,
    usage: Option<&Usage>,
    reported_usd: Option<f64>,
    problem: Option<&str>,
    estimate: Picos,
    bounds: &Bounds,
) -> Costed {
    let distrust = |why: String| Costed { cost: estimate, source: CostSource::Estimate, usage: Usage::default(), flag: Some(why) };
    if let Some(problem) = problem {
        return distrust(problem.to_owned());
    }
    let ceiling = estimate.saturating_mul(COST_FACTOR) + COST_SLACK;
    if let Some(usage) = usage {
        if let Some(most) = bounds.prompt_tokens
            && usage.prompt_tokens > most
        {
            return distrust(format!(
                "usage.prompt_tokens = {} is more than the request could hold (at most {most})",
                usage.prompt_tokens
            ));
        }
        if let Some(most) = bounds.completion_tokens
            && usage.completion_tokens > most
        {
            return distrust(format!(
                "usage.completion_tokens = {} is far beyond the request's max_tokens (at most {most})",
                usage.completion_tokens
            ));
        }
        let total = usage.prompt_tokens.saturating_add(usage.completion_tokens);
        if total > bounds.context_window.saturating_mul(2) {
            return distrust(format!(
                "usage reports {total} tokens, more than twice the context window ({})",
                bounds.context_window
            ));
        }
    }
    if let Some(usd) = reported_usd {
        return match Picos::checked_from_usd(usd) {
            None => distrust(format!("usage.cost = {} is not an amount of money", shown(usd))),
            Some(cost) if cost > ceiling => distrust(format!(
                "usage.cost = {} USD is far above the call's reservation ({estimate})",
                shown(usd)
            )),
            Some(cost) => Costed { cost, source: CostSource::Provider, usage: usage.copied().unwrap_or_default(), flag: None },
        };
    }
    match usage {
        Some(usage) => {
            let cost = price.cost(usage, tier);
            if cost > ceiling {
                return distrust(format!(
                    "the usage ({} prompt, {} completion tokens) would cost {cost}, far above the call's reservation ({estimate})",
                    usage.prompt_tokens, usage.completion_tokens
                ));
            }
            Costed { cost, source: CostSource::PriceTable, usage: *usage, flag: None }
        }
        None => Costed { cost: estimate, source: CostSource::Estimate, usage: Usage::default(), flag: None },
    }
}

/// A provider's figure as it would read it: `1e308`, not 309 digits.
fn shown(usd: f64) -> String {
    if usd != 0.0 && !(1e-6..1e6).contains(&usd.abs()) { format!("{usd:e}") } else { format!("{usd}") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::file::PriceFile;

    fn price() -> ModelPrice {
        ModelPrice::from_file(&PriceFile { input: 1.0, output: 2.0, cached_input: None, batch_input: None, batch_output: None, encoding: None })
    }

    const OPEN: Bounds = Bounds { prompt_tokens: None, completion_tokens: None, context_window: 128_000 };

    #[test]
    fn provider_cost_wins_then_usage_then_estimate() {
        let price = price();
        let usage = Usage { prompt_tokens: 100, completion_tokens: 10, cached_tokens: 0 };
        let reserved = Picos::from_usd(1.0);
        let c = answered_cost(&price, Tier::Sync, Some(&usage), Some(0.5), None, reserved, &OPEN);
        assert_eq!((c.cost, c.source, c.flag), (Picos::from_usd(0.5), CostSource::Provider, None));
        let c = answered_cost(&price, Tier::Sync, Some(&usage), None, None, reserved, &OPEN);
        assert_eq!((c.cost, c.source, c.flag), (Picos(120_000_000), CostSource::PriceTable, None));
        let c = answered_cost(&price, Tier::Sync, None, None, None, Picos(7), &OPEN);
        assert_eq!((c.cost, c.source, c.flag), (Picos(7), CostSource::Estimate, None));
    }

    #[test]
    fn impossible_figures_cost_the_reservation_and_are_flagged() {
        let price = price();
        let reserved = Picos(2_000_000_000);
        let bounds = Bounds::of_request(1000, 100, 128_000);
        let huge = Usage { prompt_tokens: 100, completion_tokens: 15_372_286_728_092, cached_tokens: 0 };
        let too_long_prompt = Usage { prompt_tokens: 5000, completion_tokens: 10, cached_tokens: 0 };
        for (usage, reported, problem) in [
            (Some(huge), None, None),
            (Some(too_long_prompt), None, None),
            (None, Some(1e308), None),
            (None, Some(-0.01), None),
            (None, Some(f64::INFINITY), None),
            (None, Some(5.0), None),
            (None, None, Some("usage.completion_tokens = -5 is not a token count")),
        ] {
            let c = answered_cost(&price, Tier::Sync, usage.as_ref(), reported, problem, reserved, &bounds);
            assert_eq!((c.cost, c.source), (reserved, CostSource::Estimate), "{usage:?} {reported:?}");
            assert!(c.flag.is_some(), "{usage:?} {reported:?}");
            assert_eq!(c.usage, Usage::default());
        }
        // Without request bounds (batch results), a cost far above the reservation is still caught.
        let c = answered_cost(&price, Tier::Sync, Some(&huge), None, None, reserved, &OPEN);
        assert_eq!(c.cost, reserved);
        assert!(c.flag.unwrap().contains("context window"));
    }

    mod properties {
        use proptest::prelude::*;
        use serde_json::{Value, json};

        use super::*;
        use crate::provider::parse_completion;

        /// Any JSON a provider might put where a count or a cost goes.
        fn figure() -> impl Strategy<Value = Value> {
            prop_oneof![
                any::<u64>().prop_map(|n| json!(n)),
                any::<i64>().prop_map(|n| json!(n)),
                any::<f64>().prop_filter("JSON has no NaN or infinity", |f| f.is_finite()).prop_map(|f| json!(f)),
                (0u64..100_000).prop_map(|n| json!(n)),
                "[0-9a-z.-]{0,8}".prop_map(|s| json!(s)),
                Just(Value::Null),
                Just(json!([1, 2])),
            ]
        }

        proptest! {
            #[test]
            fn any_usage_object_costs_between_zero_and_the_bounded_overrun(
                prompt in figure(),
                completion in figure(),
                cached in figure(),
                cost in proptest::option::of(figure()),
                input in 0.0f64..1000.0,
                output in 0.0f64..1000.0,
                estimate in 0i64..1_000_000_000_000_000,
                body_bytes in 0usize..1_000_000,
                max_tokens in 0u64..100_000,
            ) {
                let mut usage = json!({ "prompt_tokens": prompt, "completion_tokens": completion,
                                        "prompt_tokens_details": { "cached_tokens": cached } });
                if let Some(cost) = cost {
                    usage["cost"] = cost;
                }
                let body = json!({ "choices": [{ "message": { "content": "{}" } }], "usage": usage }).to_string();
                let completion = parse_completion(&body).expect("an object with choices parses");
                let price = ModelPrice::from_file(&PriceFile { input, output, cached_input: None, batch_input: None, batch_output: None, encoding: None });
                let estimate = Picos(estimate);
                for tier in [Tier::Sync, Tier::Batch] {
                    let costed = answered_cost(
                        &price,
                        tier,
                        completion.usage.as_ref(),
                        completion.reported_cost_usd,
                        completion.usage_problem.as_deref(),
                        estimate,
                        &Bounds::of_request(body_bytes, max_tokens, 128_000),
                    );
                    prop_assert!(costed.cost >= Picos::ZERO, "negative cost {:?}", costed);
                    prop_assert!(costed.cost <= estimate.saturating_mul(COST_FACTOR) + COST_SLACK, "unbounded cost {:?}", costed);
                    if costed.flag.is_some() {
                        prop_assert_eq!(costed.cost, estimate);
                    }
                }
            }

            #[test]
            fn price_times_any_usage_never_wraps(prompt: u64, completion: u64, cached: u64, input in 0.0f64..1e6, output in 0.0f64..1e6) {
                let price = ModelPrice::from_file(&PriceFile { input, output, cached_input: None, batch_input: None, batch_output: None, encoding: None });
                let usage = Usage { prompt_tokens: prompt, completion_tokens: completion, cached_tokens: cached };
                prop_assert!(price.cost(&usage, Tier::Sync) >= Picos::ZERO);
                prop_assert!(price.cost(&usage, Tier::Batch) >= Picos::ZERO);
            }
        }
    }
}
