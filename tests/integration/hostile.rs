//! A hostile provider through the real binary: every misbehaviour a buggy proxy, a self-hosted
//! server or a compromised endpoint can show — absurd waits, impossible bills, redirects to
//! other hosts, oversized and dribbling bodies, nearly-right answers. Each case asserts that
//! nothing panics, the documented exit code, that every row holds its own answer or is still
//! pending, that the ledger is sane and `status`/`report` read it, and that a message names the
//! cause.

use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::hostile::{Body, Hostile, Reply as Hr, Seen, completion, good, shown, streamed};
use crate::support::*;

/// Three items per request, one request at a time: the script sees requests in call order.
const ONE_AT_A_TIME: &str = "items_per_request = { start = 3, min = 1, max = 3 }\nconcurrency = { start = 1, min = 1, max = 1 }";

/// One at a time, with attempts to spare for a string of bad answers.
const PATIENT: &str = "items_per_request = { start = 3, min = 1, max = 3 }\nconcurrency = { start = 1, min = 1, max = 1 }\nmax_attempts = 6";

/// Enough requests for a provider to misbehave three times in a row.
fn many() -> Case {
    Case {
        rows: 30,
        ..Case::default()
    }
}

/// What a case runs: rows, the job's extra `[model]` and `[limits]` lines, extra flags.
struct Case {
    rows: usize,
    model: &'static str,
    limits: &'static str,
    args: Vec<&'static str>,
}

impl Default for Case {
    fn default() -> Self {
        Case {
            rows: 6,
            model: "",
            limits: ONE_AT_A_TIME,
            args: Vec::new(),
        }
    }
}

struct Ran {
    fx: Fixture,
    provider: Hostile,
    output: Output,
    summary: Value,
}

async fn run_case(case: Case, script: impl Fn(&Seen) -> Hr + Send + Sync + 'static) -> Ran {
    run_case_with_props(case, None, script).await
}

/// `run_case` against a server that answers `props` at `GET …/props`.
async fn run_case_with_props(case: Case, props: Option<Hr>, script: impl Fn(&Seen) -> Hr + Send + Sync + 'static) -> Ran {
    run_case_with_server(case, props, None, script).await
}

/// `run_case` against a server that answers `props` at `GET …/props` and `metrics` at
/// `GET …/metrics`.
async fn run_case_with_server(case: Case, props: Option<Hr>, metrics: Option<Hr>, script: impl Fn(&Seen) -> Hr + Send + Sync + 'static) -> Ran {
    run_case_showing(case, shown(props, metrics), script).await
}

/// `run_case` against a server that answers these `GET`s beside its API itself. The server
/// stands for a hosted API: its answers are asked for whole unless the case's `[model]` lines
/// set `stream`.
async fn run_case_showing(case: Case, shown: Vec<(&'static str, Hr)>, script: impl Fn(&Seen) -> Hr + Send + Sync + 'static) -> Ran {
    let provider = Hostile::start_showing(shown, script).await;
    let fx = Fixture::new(case.rows).await;
    let model = if case.model.contains("stream") { case.model.to_owned() } else { format!("stream = \"never\"\n{}", case.model) };
    fx.write_job(&provider.base_url(), &model, case.limits, "");
    let (output, summary) = run_json(&fx, &case.args).await;
    Ran {
        fx,
        provider,
        output,
        summary,
    }
}

impl Ran {
    fn stderr(&self) -> String {
        stderr(&self.output)
    }

    /// No panic, the exit code, the cause named, rows right or pending, a sane ledger that
    /// `status` and `report` read.
    async fn verdict(&self, exit: i32, cause: &str) {
        let err = self.stderr();
        assert!(!err.contains("panicked"), "a panic: {err}");
        assert_eq!(
            self.output.status.code(),
            Some(exit),
            "exit code; stderr: {err}"
        );
        let all = format!("{err}\n{}", stdout(&self.output));
        assert!(
            all.contains(cause),
            "no message names the cause {cause:?}: {all}"
        );
        for (id, title, body, summary) in self.fx.rows().await {
            if let Some(summary) = summary {
                assert_eq!(
                    summary,
                    expected_output(&id.to_string(), &title, &body),
                    "row {id} holds another answer"
                );
            }
        }
        let pool = self.fx.pool().await;
        let (bad, total): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE cost_picos < 0 OR estimated_picos < 0 OR prompt_tokens < 0 OR completion_tokens < 0 \
             OR (state = 'settled' AND cost_picos > 4 * estimated_picos + 10000000000)), COUNT(*) FROM backfill_calls",
        )
        .fetch_one(&pool)
        .await
        .expect("the ledger reads");
        let (spent, reserved): (i64, i64) = sqlx::query_as(
            "SELECT spent_picos, reserved_picos FROM backfill_runs ORDER BY id DESC LIMIT 1",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        assert_eq!(bad, 0, "{bad} of {total} ledger rows are not sane");
        assert!(
            spent >= 0 && reserved == 0,
            "spent {spent}, reserved {reserved} after the run"
        );
        let job = self.fx.job.to_str().unwrap();
        for command in [["status", job, "--json"], ["report", job, "--json"]] {
            let out = backfill_async(self.fx.dir.path(), &command, &[]).await;
            assert_eq!(
                out.status.code(),
                Some(0),
                "`{}` fails on this ledger: {}",
                command[0],
                stderr(&out)
            );
        }
    }

    async fn done(&self) -> usize {
        self.fx
            .rows()
            .await
            .iter()
            .filter(|r| r.3.is_some())
            .count()
    }

    /// Ledger rows: `(outcome, cost_source, usage_flag, repair, cost, estimate)`.
    async fn calls(
        &self,
    ) -> Vec<(
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        i64,
        i64,
    )> {
        let pool = self.fx.pool().await;
        let rows = sqlx::query_as(
            "SELECT outcome, cost_source, usage_flag, repair, cost_picos, estimated_picos FROM backfill_calls ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        rows
    }
}

/// The first `bad` requests get `reply`, the rest a good answer.
fn first(
    bad: usize,
    reply: impl Fn(&Seen) -> Hr + Send + Sync + 'static,
) -> impl Fn(&Seen) -> Hr + Send + Sync + 'static {
    move |seen| {
        if seen.n < bad {
            reply(seen)
        } else {
            good(seen)
        }
    }
}

fn rate_limited() -> Hr {
    Hr::json(
        429,
        &json!({ "error": { "message": "Rate limit reached", "code": "rate_limit_exceeded" } }),
    )
}

fn with_usage(seen: &Seen, usage: Value) -> Hr {
    let mut body = completion(&seen.good_content());
    body["usage"] = usage;
    Hr::json(200, &body)
}

// ---- waits the provider asks for -------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_1e20_stops_the_run_naming_the_header() {
    let ran = run_case(Case::default(), |_| {
        rate_limited().header("retry-after", "1e20")
    })
    .await;
    ran.verdict(1, "retry-after: 1e20").await;
    assert!(
        ran.stderr().contains("limits.max_retry_after_s"),
        "{}",
        ran.stderr()
    );
    assert_eq!(ran.done().await, 0);
    assert!(
        ran.summary.is_null() || ran.summary["items"]["pending"] == 6,
        "{}",
        ran.summary
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn retry_after_ms_beyond_any_clock_stops_the_run_instead_of_sleeping() {
    let started = std::time::Instant::now();
    let ran = run_case(Case::default(), |_| {
        rate_limited().header("retry-after-ms", "99999999999999999999")
    })
    .await;
    ran.verdict(1, "retry-after-ms: 99999999999999999999").await;
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the run waited"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exhausted_limit_resetting_in_ages_stops_the_run_naming_the_reset_header() {
    let ran = run_case(Case::default(), |_| {
        rate_limited()
            .header("x-ratelimit-remaining-requests", "0")
            .header("x-ratelimit-reset-requests", "99999999999999999999s")
    })
    .await;
    ran.verdict(1, "x-ratelimit-reset-requests: 99999999999999999999s")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_error_asking_for_a_huge_wait_stops_the_run() {
    let ran = run_case(Case::default(), |_| {
        Hr::json(503, &json!({"error": {"message": "busy"}})).header("retry-after", "1e308")
    })
    .await;
    ran.verdict(1, "retry-after: 1e308").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wait_over_the_jobs_own_cap_stops_the_run() {
    let case = Case {
        limits: "items_per_request = { start = 3, min = 1, max = 3 }\nconcurrency = { start = 1, min = 1, max = 1 }\nmax_retry_after_s = 2",
        ..Case::default()
    };
    let ran = run_case(
        case,
        first(1, |_| rate_limited().header("retry-after", "30")),
    )
    .await;
    ran.verdict(1, "limits.max_retry_after_s = 2s").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paid_answer_with_a_crazy_reset_header_is_kept() {
    let ran = run_case(Case::default(), |seen| {
        good(seen)
            .header("x-ratelimit-limit-requests", "60")
            .header("x-ratelimit-remaining-requests", "59")
            .header("x-ratelimit-reset-requests", "99999999999999999999s")
            .header("x-ratelimit-reset-tokens", "1e308")
            .header(
                "anthropic-ratelimit-requests-reset",
                "99999-01-01T00:00:00Z",
            )
    })
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_headers_in_other_units_and_nonsense_are_survived() {
    let ran = run_case(Case::default(), |seen| match seen.n {
        0 => rate_limited().header("retry-after", "20ms"),
        1 => rate_limited()
            .header("retry-after", "-5")
            .header("retry-after-ms", "NaN"),
        2 => rate_limited()
            .header("retry-after", "Thu, 01 Jan 1970 00:00:00 GMT")
            .header("x-ratelimit-reset-tokens", "1h2m3.5s"),
        3 => good(seen)
            .header("x-ratelimit-limit-tokens", "1e400")
            .header("x-ratelimit-remaining-tokens", "-1"),
        _ => good(seen)
            .header("x-ratelimit-reset-requests", "inf")
            .header("retry-after", "soon"),
    })
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
}

/// A server that cannot take requests for a while (a model loading, its queue full: 503) and
/// then answers: once the 503s come in a row (an outage, as when the server cannot be
/// reached), the items wait with their attempts untouched, however many more come — here
/// more than the job's attempts allow — and every row is done.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_unavailable_for_a_while_costs_the_items_no_attempts() {
    let ran = run_case(
        Case::default(),
        first(12, |_| Hr::json(503, &json!({"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}})).header("retry-after", "0.2")),
    )
    .await;
    ran.verdict(0, "riding out the outage").await;
    assert_eq!(ran.done().await, 6);
    let calls = ran.calls().await;
    assert_eq!(calls.iter().filter(|c| c.0.as_deref() == Some("transient")).count(), 12, "{calls:?}");
}

/// A request the server answers 503 every time while it answers the others: that is the
/// request's own failure, not an outage — its items use their attempts while other work goes
/// on and end failed; left alone at the end (the rest done while it waited), it is ridden out
/// as an outage for `outage_window_s` and the run stops naming it. Either way the run ends
/// instead of sending it without end.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_that_always_gets_a_503_among_answers_ends() {
    let case = Case {
        limits: "items_per_request = { start = 3, min = 1, max = 3 }\nconcurrency = { start = 1, min = 1, max = 1 }\nmax_attempts = 2\nmax_failed_share = 0.5\noutage_window_s = 5",
        ..many()
    };
    let ran = run_case(case, |seen: &Seen| {
        if seen.items.iter().any(|(id, _, _)| id == "2") { Hr::json(503, &json!({"error": {"message": "no healthy upstream"}})) } else { good(seen) }
    })
    .await;
    let exit = ran.output.status.code();
    assert!(matches!(exit, Some(0 | 1)), "{exit:?}: {}", ran.stderr());
    ran.verdict(exit.unwrap(), if exit == Some(0) { "finished" } else { "no request taken by the provider" }).await;
    let done = ran.done().await;
    assert!((27..30).contains(&done), "{done} done");
    assert!(ran.provider.seen().len() < 40, "{} requests", ran.provider.seen().len());
}

/// Errors sent inside a 200 — a whole body naming a 503, a stream whose first event is an
/// error naming a 503 (SGLang's full queue) — are the 503s they name (not bad answers), and
/// every row is done; a 402 inside one (no credit left) stops the run, naming the fix.
#[tokio::test(flavor = "multi_thread")]
async fn an_error_sent_inside_a_200_is_taken_for_the_status_it_names() {
    let full = json!({"error": {"object": "error", "message": "The waiting queue is full", "type": "ServiceUnavailableError", "code": 503}});
    let case = Case {
        model: "stream = \"always\"",
        ..Case::default()
    };
    let ran = run_case(case, move |seen: &Seen| match seen.n {
        0 => Hr::json(200, &full),
        1 => Hr::new(200, format!("data: {full}\n\ndata: [DONE]\n\n")).header("content-type", "text/event-stream"),
        _ => good(seen),
    })
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
    let calls = ran.calls().await;
    assert_eq!(calls.iter().filter(|c| c.0.as_deref() == Some("transient")).count(), 2, "{calls:?}");

    let ran = run_case(Case::default(), |_| Hr::json(200, &json!({"error": {"code": 402, "message": "Insufficient credits"}}))).await;
    ran.verdict(1, "add credit").await;
    assert_eq!(ran.done().await, 0);
}

/// A server that cuts a prompt to fit its context and answers what is left (Ollama, silently)
/// reports far fewer prompt tokens than the prompt holds, the same count whatever the prompt:
/// such answers — here every row made up — are not used; the items go out again in smaller
/// requests, which fit.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_to_a_prompt_the_server_cut_is_not_used() {
    let case = Case {
        rows: 24,
        limits: "items_per_request = { start = 12, min = 1, max = 12 }\nconcurrency = { start = 1, min = 1, max = 1 }",
        ..Case::default()
    };
    let ran = run_case(case, |seen: &Seen| {
        let fits = seen.items.len() <= 6;
        let content: serde_json::Map<String, Value> = seen
            .items
            .iter()
            .map(|(id, title, body)| (id.clone(), Value::String(if fits { expected_output(id, title, body) } else { "made up".into() })))
            .collect();
        let mut body = completion(&Value::Object(content).to_string());
        body["usage"] = json!({"prompt_tokens": if fits { 60 * seen.items.len() + 150 } else { 300 }, "completion_tokens": 50, "total_tokens": 350});
        Hr::json(200, &body)
    })
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 24);
    let seen = ran.provider.seen();
    assert!(seen.iter().any(|s| s.items.len() > 6), "the start's requests are larger than what fits");
    let pool = ran.fx.pool().await;
    let (held_back,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM backfill_calls WHERE outcome = 'malformed' AND error LIKE '%to fit its context%'")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert!(held_back >= 1, "no answer was held back as cut");
}

/// Groq refuses an answer its JSON mode could not parse with a 400 that carries the answer
/// (`failed_generation`): the complete entries of that answer are kept as a truncated answer's
/// are, and the refusal never stops the run as a refusal of every request would.
#[tokio::test(flavor = "multi_thread")]
async fn an_answer_refused_by_the_servers_json_check_keeps_its_complete_entries() {
    let case = Case { limits: PATIENT, ..many() };
    let ran = run_case(case, |seen: &Seen| {
        let content = seen.good_content();
        let cut = &content[..content.rfind(',').unwrap_or(content.len())];
        Hr::json(400, &json!({"error": {
            "message": "Failed to generate JSON. Please adjust your prompt. See 'failed_generation' for more details.",
            "type": "invalid_request_error", "code": "json_validate_failed", "failed_generation": cut}}))
    })
    .await;
    ran.verdict(0, "finished").await;
    // Each answer breaks off at its last entry, which goes out again with the one before it
    // (a value at the very end may itself be cut): the first entry of three is kept.
    let seen = ran.provider.seen();
    assert_eq!(seen[0].items.len(), 3);
    let kept = vec![&seen[0].items[0].0];
    assert!(
        seen[1..].iter().all(|s| s.items.iter().all(|(id, _, _)| !kept.contains(&id))),
        "the first answer's complete entries were sent again: {:?} {:?}",
        seen.iter().take(4).map(|s| s.items.iter().map(|i| i.0.clone()).collect::<Vec<_>>()).collect::<Vec<_>>(),
        ran.calls().await.iter().take(4).map(|c| c.0.clone()).collect::<Vec<_>>()
    );
    assert!(ran.done().await >= 27, "{} done", ran.done().await);
}

// ---- bills that cannot be true ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn trillions_of_tokens_are_not_billed_and_a_provider_that_keeps_lying_stops_the_run() {
    let case = Case {
        args: vec!["--max-usd", "0.002"],
        ..many()
    };
    let ran = run_case(case, |seen| {
        with_usage(
            seen,
            json!({ "prompt_tokens": 200, "completion_tokens": 15_372_286_728_092u64 }),
        )
    })
    .await;
    ran.verdict(1, "impossible usage or cost on 3 answers in a row")
        .await;
    let calls = ran.calls().await;
    for (outcome, source, flag, _, cost, estimate) in &calls {
        if outcome.as_deref() == Some("ok") {
            assert_eq!(source.as_deref(), Some("estimate"));
            assert!(
                flag.as_deref().unwrap().contains("15372286728092"),
                "{flag:?}"
            );
            assert_eq!(cost, estimate, "costed at its reservation");
        }
    }
    let spent: f64 = ran.summary["cost_usd"].as_f64().unwrap_or(0.0);
    assert!(
        (0.0..=0.002).contains(&spent),
        "spent ${spent} of a $0.002 cap"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reported_cost_of_1e308_is_not_believed_and_status_still_works() {
    let ran = run_case(many(), |seen| {
        with_usage(
            seen,
            json!({ "prompt_tokens": 200, "completion_tokens": 50, "cost": 1e308 }),
        )
    })
    .await;
    ran.verdict(1, "usage.cost = 1e308").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn negative_fractional_and_text_token_counts_are_flagged() {
    let ran = run_case(many(), |seen| match seen.n % 3 {
        0 => with_usage(
            seen,
            json!({ "prompt_tokens": -200, "completion_tokens": 50 }),
        ),
        1 => with_usage(
            seen,
            json!({ "prompt_tokens": 200, "completion_tokens": 12.5 }),
        ),
        _ => with_usage(
            seen,
            json!({ "prompt_tokens": "200", "completion_tokens": 50 }),
        ),
    })
    .await;
    ran.verdict(1, "is not a token count").await;
    assert!(
        ran.calls()
            .await
            .iter()
            .all(|c| c.0.as_deref() != Some("ok") || c.2.is_some())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_negative_reported_cost_and_more_cached_than_prompt_tokens_are_flagged() {
    let ran = run_case(many(), |seen| match seen.n % 2 {
        0 => with_usage(seen, json!({ "prompt_tokens": 200, "completion_tokens": 50, "cost": -0.5 })),
        _ => with_usage(seen, json!({ "prompt_tokens": 200, "completion_tokens": 50, "prompt_tokens_details": { "cached_tokens": 900 } })),
    })
    .await;
    ran.verdict(1, "impossible usage or cost").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_impossible_bill_among_good_ones_is_counted_not_fatal() {
    let ran = run_case(
        Case::default(),
        first(1, |seen| {
            with_usage(
                seen,
                json!({ "prompt_tokens": 200, "completion_tokens": 1e15 as u64 }),
            )
        }),
    )
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
    assert_eq!(ran.summary["usage_distrusted"], 1, "{}", ran.summary);
    let job = ran.fx.job.to_str().unwrap();
    let status = backfill_async(ran.fx.dir.path(), &["status", job, "--json"], &[]).await;
    let status: Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(status["calls"]["usage_distrusted"], 1, "{status}");
    let flagged: Vec<_> = ran
        .calls()
        .await
        .into_iter()
        .filter(|c| c.2.is_some())
        .collect();
    assert_eq!(flagged.len(), 1);
    assert_eq!(
        flagged[0].4, flagged[0].5,
        "the flagged call costs its reservation"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn no_choices_with_a_usage_is_billed_and_retried() {
    let ran = run_case(
        Case::default(),
        first(1, |_| Hr::json(200, &json!({ "choices": [], "usage": { "prompt_tokens": 200, "completion_tokens": 7 } }))),
    )
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
    let calls = ran.calls().await;
    let empty = &calls[0];
    assert_eq!(empty.0.as_deref(), Some("malformed"));
    assert_eq!(
        empty.4,
        200 * 150_000 + 7 * 600_000,
        "the usage of an answer without choices is billed"
    );
}

// ---- credentials and rows never leave for another host ---------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_to_another_host_is_refused_and_names_it() {
    let elsewhere = Hostile::start(good).await;
    let target = format!("{}/v1/chat/completions", elsewhere.origin);
    let ran = run_case(Case::default(), move |_| {
        Hr::new(307, "").header("location", &target)
    })
    .await;
    ran.verdict(1, &elsewhere.origin).await;
    assert!(ran.stderr().contains("another host"), "{}", ran.stderr());
    assert!(
        elsewhere.seen().is_empty(),
        "the other host received the prompt"
    );
    assert_eq!(ran.done().await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_302_on_the_post_says_so_instead_of_a_misleading_404() {
    let ran = run_case(Case::default(), |seen| {
        if seen.method == "POST" {
            Hr::new(302, "").header("location", "/v2/chat/completions")
        } else {
            Hr::new(404, "{}")
        }
    })
    .await;
    ran.verdict(1, "HTTP 302").await;
    assert!(ran.stderr().contains("as a GET"), "{}", ran.stderr());
    assert!(
        ran.provider.seen().iter().all(|s| s.method == "POST"),
        "the POST was resent as a GET"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_308_to_the_same_host_is_followed() {
    let ran = run_case(Case::default(), |seen| {
        if seen.path.starts_with("/v1/") {
            Hr::new(308, "").header("location", "/moved/chat/completions")
        } else {
            good(seen)
        }
    })
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_in_the_base_url_never_reach_output_or_the_database() {
    let provider = Hostile::start(good).await;
    let fx = Fixture::new(6).await;
    let base = provider
        .base_url()
        .replace("http://", "http://user:pa%2Fss%3Fw0rd@");
    // A query string is refused before anything is sent (the API's paths cannot follow it),
    // and the refusal shows no secret of it.
    fx.write_job(&format!("{base}?api_key=k3y-in-query"), "", "items_per_request = { start = 3, min = 1, max = 3 }", "");
    let (refused, _) = run_json(&fx, &[]).await;
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("has a query string"), "{}", stderr(&refused));
    assert!(provider.seen().is_empty());
    fx.write_job(
        &base,
        "",
        "items_per_request = { start = 3, min = 1, max = 3 }",
        "",
    );
    let (output, _) = run_json(&fx, &[]).await;
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let status = backfill_async(fx.dir.path(), &["status", fx.job.to_str().unwrap()], &[]).await;
    let everything = format!(
        "{}{}{}{}{}{}",
        stderr(&refused),
        stdout(&refused),
        stderr(&output),
        stdout(&output),
        stderr(&status),
        stdout(&status)
    );
    let mut db = std::fs::read(&fx.db).unwrap();
    db.extend(std::fs::read(fx.db.with_extension("db-wal")).unwrap_or_default());
    for secret in ["pa%2Fss%3Fw0rd", "pa/ss?w0rd", "k3y-in-query"] {
        assert!(
            !everything.contains(secret),
            "{secret} in the output: {everything}"
        );
        assert!(
            !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} in the database"
        );
    }
}

// ---- bodies too large, too slow, or not what they say ----------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_answer_is_a_failed_call_and_never_cached() {
    let ran = run_case(
        Case::default(),
        first(2, |seen| {
            let padding = "x".repeat(9 * 1024 * 1024);
            Hr::json(
                200,
                &completion(&format!("{} {padding}", seen.good_content())),
            )
        }),
    )
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
    let calls = ran.calls().await;
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.0.as_deref() == Some("too_large"))
            .count(),
        2,
        "{calls:?}"
    );
    let pool = ran.fx.pool().await;
    let largest: Option<i64> = sqlx::query_scalar("SELECT MAX(LENGTH(body)) FROM backfill_cache")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        largest.unwrap_or(0) < 8 * 1024 * 1024,
        "a {largest:?}-byte body was cached"
    );
    let error: String =
        sqlx::query_scalar("SELECT error FROM backfill_calls WHERE outcome = 'too_large' LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(error.contains("model.max_response_bytes"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_response_limit_is_a_job_key() {
    let case = Case {
        model: "max_response_bytes = 2048",
        ..Case::default()
    };
    let ran = run_case(
        case,
        first(1, |seen| {
            Hr::json(
                200,
                &completion(&format!("{}{}", seen.good_content(), " ".repeat(4096))),
            )
        }),
    )
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.calls().await[0].0.as_deref(), Some("too_large"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endless_body_is_cut_by_the_limit() {
    let ran = run_case(
        Case {
            model: "max_response_bytes = 65536",
            ..Case::default()
        },
        first(1, |_| {
            Hr::new(200, "").with_body(Body::Drip {
                chunk: vec![b' '; 16 * 1024],
                every: Duration::from_millis(1),
                times: 1_000_000,
            })
        }),
    )
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.calls().await[0].0.as_deref(), Some("too_large"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_drip_within_the_timeout_is_an_answer() {
    let ran = run_case(Case::default(), |seen| {
        let body = completion(&seen.good_content()).to_string().into_bytes();
        // The whole body, a tenth at a time, 50 ms apart.
        let parts: Vec<Vec<u8>> = body
            .chunks(body.len().div_ceil(10))
            .map(<[u8]>::to_vec)
            .collect();
        Hr::new(200, "").with_body(Body::Parts {
            parts,
            every: Duration::from_millis(50),
        })
    })
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_drip_past_the_timeout_is_a_timeout_and_retried() {
    let case = Case {
        model: "request_timeout_s = 1",
        ..Case::default()
    };
    let ran = run_case(
        case,
        first(1, |_| {
            Hr::new(200, "").with_body(Body::Drip {
                chunk: b" ".to_vec(),
                every: Duration::from_millis(200),
                times: 50,
            })
        }),
    )
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
    assert_eq!(ran.calls().await[0].0.as_deref(), Some("timeout"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_shorter_than_announced_is_retried() {
    let ran = run_case(
        Case::default(),
        first(1, |seen| {
            let body = completion(&seen.good_content()).to_string().into_bytes();
            Hr::new(200, "").with_body(Body::Short {
                announced: body.len() + 500,
                bytes: body,
            })
        }),
    )
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gzip_body_is_not_inflated_and_is_a_bad_answer() {
    // A "gzip bomb": the client asks for no compression and decodes none, so the bytes are
    // taken as they come (and are not JSON).
    let bomb: Vec<u8> = [0x1f, 0x8b, 0x08, 0x00]
        .iter()
        .copied()
        .chain(std::iter::repeat_n(0u8, 4096))
        .collect();
    let ran = run_case(
        Case::default(),
        first(1, move |_| {
            Hr::new(200, bomb.clone()).header("content-encoding", "gzip")
        }),
    )
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.calls().await[0].0.as_deref(), Some("bad_output"));
    assert!(ran.provider.seen().iter().all(|s| {
        !s.headers
            .iter()
            .any(|(n, v)| n == "accept-encoding" && v.contains("gzip"))
    }));
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_content_types_and_non_completion_bodies() {
    let case = Case {
        limits: PATIENT,
        ..Case::default()
    };
    let ran = run_case(case, |seen| match seen.n {
        // JSON labelled as HTML: the label does not matter.
        0 => good(seen).header("content-type", "text/html"),
        1 => Hr::new(200, "<html><body>502 Bad Gateway</body></html>")
            .header("content-type", "text/html"),
        2 => Hr::new(200, "[1, 2, 3]"),
        3 => Hr::new(200, ""),
        _ => good(seen),
    })
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
    let outcomes: Vec<_> = ran
        .calls()
        .await
        .into_iter()
        .map(|c| c.0.unwrap_or_default())
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "bad_output").count(),
        3,
        "{outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_status_codes_broken_text_and_null_content_are_retried() {
    let case = Case {
        limits: PATIENT,
        ..Case::default()
    };
    let ran = run_case(case, |seen| match seen.n {
        0 => Hr::new(418, "I'm a teapot"),
        1 => Hr::new(299, completion(&seen.good_content()).to_string()),
        2 => Hr::new(200, vec![0xff, 0xfe, b'{', 0x80]),
        3 => Hr::json(
            200,
            &json!({ "choices": [{ "message": { "content": null } }] }),
        ),
        4 => Hr::new(520, ""),
        _ => good(seen),
    })
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
    let outcomes: Vec<_> = ran
        .calls()
        .await
        .into_iter()
        .map(|c| c.0.unwrap_or_default())
        .collect();
    assert_eq!(
        &outcomes[..5],
        [
            "rejected_request",
            "ok",
            "bad_output",
            "malformed",
            "transient"
        ],
        "{outcomes:?}"
    );
}

// ---- answers that are nearly right ------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn raw_newlines_trailing_commas_and_prose_braces_are_repaired_and_counted() {
    let ran = run_case(
        Case {
            rows: 9,
            ..Case::default()
        },
        |seen| {
            let entries: Vec<String> = seen
                .items
                .iter()
                .map(|(id, t, b)| {
                    format!(
                        "\"{id}\": {}",
                        serde_json::to_string(&expected_output(id, t, b)).unwrap()
                    )
                })
                .collect();
            let content = match seen.n % 3 {
                // A raw newline inside a string (what llama.cpp answers often hold).
                0 => format!(
                    "{{{},\n\"note\": \"regel een\nregel twee\"}}",
                    entries.join(",")
                ),
                1 => format!("{{{},}}", entries.join(",")),
                _ => format!("I used {{braces}} in prose. {{{}}}", entries.join(",")),
            };
            Hr::json(200, &completion(&content))
        },
    )
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 9);
    let repaired = ran.summary["answers_repaired"].as_u64().unwrap();
    assert_eq!(
        repaired as usize,
        ran.calls().await.len(),
        "{}",
        ran.summary
    );
    let repairs: Vec<String> = ran.calls().await.into_iter().filter_map(|c| c.3).collect();
    assert!(
        repairs.iter().any(|r| r.contains("control characters")),
        "{repairs:?}"
    );
    assert!(
        repairs.iter().any(|r| r.contains("trailing commas")),
        "{repairs:?}"
    );
    assert!(
        repairs.iter().any(|r| r.contains("after prose")),
        "{repairs:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_id_given_twice_with_different_answers_is_not_guessed() {
    let ran = run_case(
        Case::default(),
        first(1, |seen| {
            let (id, _, _) = &seen.items[0];
            let good_content = seen.good_content();
            let content = format!(
                "{}, \"{id}\": \"the other answer\"}}",
                good_content.trim_end_matches('}')
            );
            Hr::json(200, &completion(&content))
        }),
    )
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn ids_of_the_wrong_type_and_padded_keys() {
    let ran = run_case(Case::default(), |seen| {
        let elements: Vec<Value> = seen
            .items
            .iter()
            .enumerate()
            .map(|(i, (id, t, b))| {
                let id_value = match i % 3 {
                    0 => json!(id.parse::<i64>().unwrap()),
                    1 => json!(format!(" {id} ")),
                    _ => json!(id),
                };
                json!({ "id": id_value, "summary": expected_output(id, t, b) })
            })
            .chain([
                json!({ "id": true, "summary": "no row" }),
                json!({ "id": null, "summary": "no row" }),
            ])
            .collect();
        Hr::json(200, &completion(&Value::Array(elements).to_string()))
    })
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_choices_and_unknown_finish_reasons() {
    let ran = run_case(Case::default(), |seen| {
        let mut body = completion(&seen.good_content());
        let mut choices = vec![json!({ "index": 0, "message": { "content": seen.good_content() }, "finish_reason": "banana" })];
        choices.extend((1..1000).map(|i| json!({ "index": i, "message": { "content": "{\"1\": \"stolen\"}" }, "finish_reason": "stop" })));
        body["choices"] = Value::Array(choices);
        Hr::json(200, &body)
    })
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn answers_for_other_rows_never_land() {
    // Each answer carries the outputs of rows the request did not ask for, under their ids.
    let ran = run_case(Case::default(), |seen| {
        let mut map: serde_json::Map<String, Value> =
            serde_json::from_str(&seen.good_content()).unwrap();
        for other in 1..=6 {
            map.entry(other.to_string())
                .or_insert(json!("an answer for a row this request did not ask for"));
        }
        Hr::json(200, &completion(&Value::Object(map).to_string()))
    })
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_report_read_a_ledger_that_overflowed_before_costs_were_checked() {
    let ran = run_case(Case::default(), good).await;
    ran.verdict(0, "finished").await;
    // What an older version stored for `usage.cost = 1e308`: i64::MAX per call, and a spend
    // that SQLite turned into a REAL when the sum overflowed.
    let pool = ran.fx.pool().await;
    sqlx::query("UPDATE backfill_calls SET cost_picos = 9223372036854775807")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE backfill_runs SET spent_picos = 1.8e19")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let job = ran.fx.job.to_str().unwrap();
    let status = backfill_async(ran.fx.dir.path(), &["status", job, "--json"], &[]).await;
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let status: Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert!(
        status.to_string().contains("9223372"),
        "the saturated spend shows: {status}"
    );
    let report = backfill_async(ran.fx.dir.path(), &["report", job], &[]).await;
    assert_eq!(report.status.code(), Some(0), "{}", stderr(&report));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_new_limits_refuse_nonsense_before_any_request() {
    let provider = Hostile::start(good).await;
    for (model, limits, key) in [
        ("max_response_bytes = 10", "", "model.max_response_bytes"),
        (
            "max_response_bytes = 99999999999999",
            "",
            "model.max_response_bytes",
        ),
        ("", "max_retry_after_s = 0", "limits.max_retry_after_s"),
        ("", "max_retry_after_s = 1e300", "limits.max_retry_after_s"),
        ("", "max_retry_after_s = nan", "limits.max_retry_after_s"),
    ] {
        let fx = Fixture::new(3).await;
        fx.write_job(&provider.base_url(), model, limits, "");
        let (output, _) = run_json(&fx, &[]).await;
        assert_eq!(
            output.status.code(),
            Some(2),
            "{model}{limits}: {}",
            stderr(&output)
        );
        assert!(stderr(&output).contains(key), "{}", stderr(&output));
    }
    assert!(provider.seen().is_empty(), "a request went out");
}

/// A server too slow for the job's requests: one of 10 items takes longer than the job's
/// timeout, one of 5 does not. Two timeouts in a row halve the requests, and the run writes
/// every row instead of failing them all for time after their attempts.
#[tokio::test(flavor = "multi_thread")]
async fn requests_too_large_for_the_timeout_shrink_until_they_fit() {
    let case = Case {
        rows: 20,
        model: "request_timeout_s = 5",
        limits: "items_per_request = { start = 10, min = 1, max = 10 }\nconcurrency = { start = 1, min = 1, max = 1 }",
        ..Case::default()
    };
    let ran = run_case(case, |seen| {
        // 0.7 s per item: 10 items take 7 s, 5 take 3.5 s.
        let body = completion(&seen.good_content()).to_string().into_bytes();
        Hr::new(200, "").with_body(Body::Parts {
            parts: vec![body],
            every: Duration::from_millis(700 * seen.items.len() as u64),
        })
    })
    .await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 20);
    let sizes: Vec<usize> = ran.provider.seen().iter().map(|seen| seen.items.len()).collect();
    assert_eq!(sizes[..2], [10, 10], "{sizes:?}");
    assert!(sizes[2..].iter().all(|size| *size <= 5), "{sizes:?}");
    let timeouts = ran
        .calls()
        .await
        .iter()
        .filter(|call| call.0.as_deref() == Some("timeout"))
        .count();
    assert_eq!(timeouts, 2, "{sizes:?}");
}

/// What a server says of itself before a run (`GET /props`, llama.cpp's slots) that never ends
/// is given up on within seconds, and the run goes on as with a server that says nothing; slots
/// beyond the job's `[limits] concurrency` are held to it.
#[tokio::test(flavor = "multi_thread")]
async fn what_a_server_says_of_itself_is_waited_for_briefly_and_held_to_the_jobs_limits() {
    let endless = Hr::new(200, "").with_body(Body::Drip {
        chunk: b"{\"total_slots\": ".to_vec(),
        every: Duration::from_millis(500),
        times: 60,
    });
    let started = std::time::Instant::now();
    let ran = run_case_with_props(Case::default(), Some(endless), good).await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
    assert!(ran.summary["controller"]["server_slots"].is_null(), "{}", ran.summary);
    assert!(started.elapsed() < Duration::from_secs(25), "the run waited {:?}", started.elapsed());

    let absurd = Hr::json(200, &json!({ "total_slots": 4_000_000_000u64, "default_generation_settings": { "n_ctx": 4_000_000_000u64 } }));
    let ran = run_case_with_props(Case::default(), Some(absurd), good).await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
    assert_eq!(ran.summary["controller"]["server_slots"], 4_000_000_000u64, "{}", ran.summary);
    assert_eq!(ran.summary["controller"]["max_in_flight"], 1, "{}", ran.summary);
    assert!(ran.stderr().contains("works on 4000000000 requests at once (GET /props)"), "{}", ran.stderr());
    assert!(ran.stderr().contains("[limits] concurrency allows 1..1"), "{}", ran.stderr());
}

/// A server's gauges (`GET /metrics`) that never end are given up on within seconds, and the
/// run goes on as with a server that shows none; gauges that show requests waiting at every
/// reading (vLLM's `GET /metrics`, SGLang's `GET /v1/loads`) hold the run at what they show
/// running, whoever's requests those are.
#[tokio::test(flavor = "multi_thread")]
async fn a_servers_gauges_are_read_briefly_and_followed_when_they_show_a_queue() {
    let endless = Hr::new(200, "").with_body(Body::Drip {
        chunk: b"vllm:num_requests_running 1\nvllm:num_requests_waiting 1\n".to_vec(),
        every: Duration::from_millis(500),
        times: 60,
    });
    let started = std::time::Instant::now();
    let ran = run_case_with_server(Case::default(), None, Some(endless), good).await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 6);
    assert!(ran.summary["controller"]["server_slots"].is_null(), "{}", ran.summary);
    assert!(!ran.stderr().contains("GET /metrics"), "{}", ran.stderr());
    assert!(started.elapsed() < Duration::from_secs(25), "the run waited {:?}", started.elapsed());

    // A server full of others' requests: one running, seven waiting, at every reading, as
    // vLLM's `/metrics` and SGLang's `/v1/loads` show it.
    let vllm = Hr::new(200, "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=\"m\"} 1\nvllm:num_requests_waiting{model_name=\"m\"} 7\n");
    let ran = held_by_a_full_server(vec![("/metrics", vllm)], "GET /metrics (vLLM's vllm:num_requests_waiting)").await;
    assert!(ran.provider.asked("/metrics") >= 5, "{}", ran.provider.asked("/metrics"));
    // SGLang's loads are preferred to its `/metrics` (here showing nothing waiting), which is
    // asked only once, before the run.
    let sglang = Hr::json(
        200,
        &json!({ "version": "0.5.9", "loads": [{ "dp_rank": 0, "num_running_reqs": 1, "num_waiting_reqs": 7, "max_running_requests": 2048 }] }),
    );
    let idle = Hr::new(200, "sglang:num_running_reqs{tp_rank=\"0\"} 0\nsglang:num_queue_reqs{tp_rank=\"0\"} 0\n");
    let ran = held_by_a_full_server(vec![("/v1/loads", sglang), ("/metrics", idle)], "GET /v1/loads (SGLang's num_waiting_reqs)").await;
    assert_eq!(ran.provider.asked("/metrics"), 1);
    assert!(ran.provider.asked("/v1/loads") >= 5, "{}", ran.provider.asked("/v1/loads"));
}

/// A run against a server whose gauges (`shown`) say one request running and seven waiting
/// at every reading. Each answer takes a quarter of a second, so the run lasts several
/// readings. The queue is followed once; after the hold the throughput decides.
async fn held_by_a_full_server(shown: Vec<(&'static str, Hr)>, read_at: &str) -> Ran {
    let slow = |seen: &Seen| {
        let mut reply = good(seen);
        if let Body::Bytes(bytes) = reply.body {
            reply.body = Body::Parts { parts: vec![Vec::new(), bytes], every: Duration::from_millis(250) };
        }
        reply
    };
    let case = Case {
        rows: 40,
        limits: "items_per_request = { start = 1, min = 1, max = 1 }\nconcurrency = { start = 4, min = 1, max = 8 }",
        ..Case::default()
    };
    let ran = run_case_showing(case, shown, slow).await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 40);
    assert_eq!(ran.summary["controller"]["server_slots"], 1, "{}", ran.summary);
    // The readings at 0, 1 and 2 s bring the limit to 1 and it holds there for at least 10 s:
    // from 3 s to 10 s after the first call, no call overlaps another (from the ledger).
    let calls: Vec<(i64, i64)> = sqlx::query_as("SELECT started_at, started_at + latency_ms FROM backfill_calls WHERE latency_ms IS NOT NULL ORDER BY started_at")
        .fetch_all(&ran.fx.pool().await)
        .await
        .unwrap();
    let first = calls[0].0;
    let held: Vec<&(i64, i64)> = calls.iter().filter(|(start, _)| *start >= first + 3_000 && *start < first + 10_000).collect();
    assert!(!held.is_empty(), "no call between 3 and 10 s: {calls:?}");
    for (start, _) in &held {
        let in_flight = calls.iter().filter(|(s, e)| s <= start && e > start).count();
        assert_eq!(in_flight, 1, "at {} ms: {calls:?}", start - first);
    }
    assert!(ran.stderr().contains(&format!("shows the requests it runs and those waiting at {read_at}")), "{}", ran.stderr());
    ran
}

/// `many()` against a server at a local address with `model.stream = "auto"`: answers asked
/// for as streams.
fn streaming() -> Case {
    Case { model: "stream = \"auto\"", ..many() }
}

/// Streamed answers are read event by event into what an unstreamed answer holds: the rows and
/// the ledger's token counts are the same.
#[tokio::test]
async fn streamed_answers_are_read_whole_and_billed_on_their_usage() {
    let ran = run_case(streaming(), |seen: &Seen| streamed(&seen.good_content(), true)).await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 30);
    let seen = ran.provider.seen();
    assert!(seen.iter().all(|s| s.stream), "every request asked for a stream");
    let pool = ran.fx.pool().await;
    let counted: Vec<(Option<i64>, Option<i64>)> =
        sqlx::query_as("SELECT prompt_tokens, completion_tokens FROM backfill_calls").fetch_all(&pool).await.unwrap();
    pool.close().await;
    assert_eq!(counted.len(), seen.len());
    assert!(counted.iter().all(|c| *c == (Some(200), Some(50))), "{counted:?}");
    assert!(ran.calls().await.iter().all(|c| c.0.as_deref() == Some("ok")), "{:?}", ran.calls().await);
}

/// A local server that refuses a streamed request (some refuse `stream_options`) gets it again
/// at once, unstreamed, and the run streams no more; nothing is lost and nothing counts against
/// the items.
#[tokio::test]
async fn a_server_refusing_streamed_requests_gets_them_again_unstreamed() {
    let refused = json!({ "error": { "message": "Extra inputs are not permitted: stream_options", "type": "invalid_request_error" } });
    let ran = run_case(streaming(), move |seen: &Seen| if seen.stream { Hr::json(422, &refused) } else { good(seen) }).await;
    ran.verdict(0, "was answered unstreamed: the run's other requests go unstreamed").await;
    assert_eq!(ran.done().await, 30);
    let seen = ran.provider.seen();
    assert_eq!(seen.iter().filter(|s| s.stream).count(), 1, "one streamed request, one at a time");
    assert_eq!(seen[0].items, seen[1].items, "the refused request goes out again as it was");
    assert!(!seen[1].stream);
    let calls = ran.calls().await;
    assert_eq!(calls.iter().filter(|c| c.0.as_deref() == Some("rejected_request")).count(), 1, "{calls:?}");
    assert_eq!(calls.iter().filter(|c| c.0.as_deref() == Some("ok")).count(), calls.len() - 1, "{calls:?}");
    assert_eq!(seen.len(), 11, "ten requests of three rows, and the refused one once more");
}

/// Answers streamed without their token counts: the first is costed at its reservation (as an
/// unstreamed answer without `usage` is), and the run asks for no more streams.
#[tokio::test]
async fn answers_streamed_without_token_counts_end_the_streaming() {
    let ran = run_case(streaming(), |seen: &Seen| if seen.stream { streamed(&seen.good_content(), false) } else { good(seen) }).await;
    ran.verdict(0, "without their token counts").await;
    assert_eq!(ran.done().await, 30);
    let seen = ran.provider.seen();
    assert!(seen[0].stream && seen[1..].iter().all(|s| !s.stream), "{:?}", seen.iter().map(|s| s.stream).collect::<Vec<_>>());
}

/// The first streamed request is refused on its own (its prompt too long for the server), and
/// so is its unstreamed copy: the failure was the request's, not the stream's — its items are
/// sent again in smaller requests as after any refusal, and the run goes on streaming.
#[tokio::test]
async fn a_request_refused_streamed_and_unstreamed_alike_leaves_the_streaming_on() {
    let too_long = json!({ "error": { "message": "the request exceeds the available context size", "type": "invalid_request_error" } });
    let ran = run_case(streaming(), move |seen: &Seen| {
        if seen.n < 2 { Hr::json(400, &too_long) } else { streamed(&seen.good_content(), true) }
    })
    .await;
    ran.verdict(0, "a streamed request failed").await;
    assert_eq!(ran.done().await, 30);
    let seen = ran.provider.seen();
    assert!(seen[0].stream && !seen[1].stream, "{:?}", seen.iter().map(|s| s.stream).collect::<Vec<_>>());
    assert_eq!(seen[0].items, seen[1].items, "the refused request goes out again as it was, unstreamed");
    assert!(seen[2..].iter().all(|s| s.stream), "{:?}", seen.iter().map(|s| s.stream).collect::<Vec<_>>());
    assert!(!ran.stderr().contains("answered unstreamed"), "{}", ran.stderr());
}

/// The first streamed request breaks off after its first chunk (the model crashed mid-answer):
/// the server was streaming, so the failure is the request's, not the server's — its items go
/// out again as after any failed call, the call is possibly billed (text was generated), and
/// the run goes on streaming.
#[tokio::test]
async fn a_stream_that_breaks_off_after_its_first_chunk_is_the_requests_failure_not_the_servers() {
    let broken = Hr::new(
        200,
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"{\\\"r\\\"\"},\"finish_reason\":null}]}\n\n\
         data: {\"error\":{\"message\":\"the model crashed\"}}\n\n",
    )
    .header("content-type", "text/event-stream");
    let ran = run_case(streaming(), move |seen: &Seen| if seen.n == 0 { broken.clone() } else { streamed(&seen.good_content(), true) }).await;
    ran.verdict(0, "finished").await;
    assert_eq!(ran.done().await, 30);
    let seen = ran.provider.seen();
    assert!(seen.iter().all(|s| s.stream), "{:?}", seen.iter().map(|s| s.stream).collect::<Vec<_>>());
    assert_eq!(seen.len(), 11, "ten requests of three rows, and the broken one's items once more");
    let pool = ran.fx.pool().await;
    let states: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT state, outcome FROM backfill_calls ORDER BY id").fetch_all(&pool).await.unwrap();
    pool.close().await;
    assert_eq!(states[0], ("lost".to_owned(), Some("bad_output".to_owned())), "{states:?}");
    assert!(states[1..].iter().all(|s| s.1.as_deref() == Some("ok")), "{states:?}");
}

/// A local server whose streams cannot be read (here: events that are not JSON) before any
/// streamed answer came whole: the request goes out again unstreamed, the run streams no more,
/// and the items lose no attempt.
#[tokio::test]
async fn a_server_whose_streams_cannot_be_read_gets_its_requests_unstreamed() {
    let garbled = Hr::new(200, "data: {\"choices\": [oops\n\ndata: [DONE]\n\n").header("content-type", "text/event-stream");
    let ran = run_case(streaming(), move |seen: &Seen| if seen.stream { garbled.clone() } else { good(seen) }).await;
    ran.verdict(0, "was answered unstreamed: the run's other requests go unstreamed").await;
    assert_eq!(ran.done().await, 30);
    let seen = ran.provider.seen();
    assert_eq!(seen.iter().filter(|s| s.stream).count(), 1);
    assert_eq!(seen.len(), 11);
    assert_eq!(ran.summary["controller"]["retries"], 0, "{}", ran.summary);
}
