//! Behaviour tests of the controller as a whole, driven by hand in explicit time.

use std::time::Duration;

use crate::config::ControllerConfig;
use crate::controller::Controller;
use crate::protocol::{
    CompletedRequest, Decision, Observation, Outcome, PipelineLoad, RequestShape, ServerQueue,
    Ticket,
};
use crate::rate_limit_headers::{RateLimitInfo, parse_rate_limit_headers};
use crate::status::{ControllerState, DelayState};

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn load(in_flight: usize) -> PipelineLoad {
    PipelineLoad {
        in_flight,
        queued_items: 10_000,
    }
}

fn controller() -> Controller {
    Controller::new(ControllerConfig::with_defaults(), Duration::ZERO).unwrap()
}

/// Polls at `now` and, if told to send, sends (asking for a streamed answer); returns the
/// ticket.
fn try_send(controller: &mut Controller, now: Duration) -> Option<Ticket> {
    try_send_as(controller, now, true)
}

/// `try_send`, the request sent `streamed` or not.
fn try_send_as(controller: &mut Controller, now: Duration, streamed: bool) -> Option<Ticket> {
    let in_flight = controller.in_flight.len();
    match controller.poll(now, load(in_flight)) {
        Decision::Send {
            items, max_tokens, ..
        } => {
            let shape = RequestShape {
                items,
                prompt_tokens: 1000,
                max_tokens,
                retried_items: 0,
                streamed,
            };
            Some(controller.on_sent(now, shape))
        }
        Decision::Wait { .. } => None,
    }
}

/// Polls every `step` seconds from `now` until told to send; sends, and returns the ticket.
fn next_send(controller: &mut Controller, now: &mut Duration, step: f64) -> Ticket {
    loop {
        *now += seconds(step);
        if let Some(ticket) = try_send(controller, *now) {
            return ticket;
        }
    }
}

fn completed(items: u32) -> Outcome {
    Outcome::Completed(CompletedRequest {
        items_valid: items,
        prompt_tokens: 1000,
        completion_tokens: 70 * items,
        ..CompletedRequest::default()
    })
}

fn finish(
    controller: &mut Controller,
    now: Duration,
    ticket: Ticket,
    outcome: Outcome,
    headers: RateLimitInfo,
) {
    let sent_at = controller.in_flight[&ticket].sent_at;
    controller.on_outcome(
        now,
        ticket,
        Observation::new(now - sent_at, outcome, headers),
    );
}

#[test]
fn one_rate_cut_per_congestion_event() {
    let mut controller = controller();
    let tickets: Vec<Ticket> = (0..100)
        .filter_map(|step| try_send(&mut controller, seconds(f64::from(step) * 0.01)))
        .collect();
    assert_eq!(
        tickets.len(),
        5,
        "the small first request and concurrency.start requests go out first"
    );
    let retry = parse_rate_limit_headers([("retry-after", "2")]);
    for ticket in tickets {
        finish(
            &mut controller,
            seconds(1.05),
            ticket,
            Outcome::RateLimited,
            retry,
        );
    }
    assert_eq!(controller.counts().rate_limited, 5);
    assert_eq!(
        controller.counts().rate_cuts,
        1,
        "five 429s of one burst are one event"
    );
    // A request sent after the cut that also meets a 429 is a new event.
    let mut now = seconds(1.05);
    let ticket = next_send(&mut controller, &mut now, 0.1);
    finish(
        &mut controller,
        now + seconds(0.05),
        ticket,
        Outcome::RateLimited,
        retry,
    );
    assert_eq!(controller.counts().rate_cuts, 2);
}

#[test]
fn never_sends_before_retry_after() {
    let mut controller = controller();
    let ticket = try_send(&mut controller, seconds(1.0)).unwrap();
    let retry = parse_rate_limit_headers([("retry-after", "7")]);
    finish(
        &mut controller,
        seconds(1.1),
        ticket,
        Outcome::RateLimited,
        retry,
    );
    let mut now = seconds(1.1);
    while now < seconds(8.1) {
        match controller.poll(now, load(0)) {
            Decision::Wait { until: Some(until) } => assert!(until >= seconds(8.1), "{until:?}"),
            other => panic!("sent during the Retry-After pause at {now:?}: {other:?}"),
        }
        now += seconds(0.25);
    }
    let mut now = seconds(8.1);
    loop {
        if try_send(&mut controller, now).is_some() {
            // The pause ends at 8.1 s plus at most 10% + 0.1 s of jitter.
            assert!(now <= seconds(8.1 + 0.8 + 0.01), "{now:?}");
            break;
        }
        now += seconds(0.01);
    }
}

#[test]
fn paces_below_an_announced_request_limit() {
    let mut controller = controller();
    let announced = parse_rate_limit_headers([("x-ratelimit-limit-requests", "120")]);
    let first = try_send(&mut controller, Duration::ZERO).unwrap();
    finish(
        &mut controller,
        seconds(0.5),
        first,
        completed(10),
        announced,
    );
    // Answers come back instantly from here on; only pacing holds requests back.
    let mut sent = 0;
    let mut now = seconds(0.5);
    while now < seconds(60.5) {
        if let Some(ticket) = try_send(&mut controller, now) {
            sent += 1;
            finish(&mut controller, now, ticket, completed(10), announced);
        } else {
            now += seconds(0.01);
        }
    }
    // 120/min paced at 98%: about 118 in a minute, plus our half-second burst.
    assert!((110..=120).contains(&sent), "sent {sent}");
}

#[test]
fn follows_an_announced_limit_that_halves() {
    let mut controller = controller();
    let before = parse_rate_limit_headers([("x-ratelimit-limit-requests", "600")]);
    let ticket = try_send(&mut controller, Duration::ZERO).unwrap();
    finish(&mut controller, seconds(1.0), ticket, completed(10), before);
    let fast = controller.status().requests_per_second;
    let after = parse_rate_limit_headers([("x-ratelimit-limit-requests", "300")]);
    let ticket = try_send(&mut controller, seconds(1.0)).unwrap();
    finish(&mut controller, seconds(2.0), ticket, completed(10), after);
    let slow = controller.status().requests_per_second;
    assert!(
        (fast - 9.8).abs() < 1e-9 && (slow - 4.9).abs() < 1e-9,
        "{fast} then {slow}"
    );
}

#[test]
fn a_lone_timeout_does_not_cut_concurrency_but_a_cluster_does() {
    let mut controller = controller();
    let mut now = Duration::ZERO;
    let mut send_and_finish = |controller: &mut Controller, outcome: Outcome| loop {
        now += seconds(0.5);
        if let Some(ticket) = try_send(controller, now) {
            finish(
                controller,
                now + seconds(2.0),
                ticket,
                outcome,
                RateLimitInfo::default(),
            );
            break;
        }
    };
    for _ in 0..30 {
        send_and_finish(&mut controller, completed(10));
    }
    send_and_finish(&mut controller, Outcome::TimedOut);
    assert_eq!(controller.counts().concurrency_cuts, 0);
    for _ in 0..10 {
        send_and_finish(&mut controller, Outcome::TimedOut);
    }
    assert_eq!(
        controller.counts().concurrency_cuts,
        1,
        "a burst of timeouts is one overload event"
    );
}

#[test]
fn end_of_queue_cuts_only_old_requests_and_only_when_nothing_waits() {
    let mut controller = controller();
    let mut now = Duration::ZERO;
    // 200 requests of 10 items to a server that never refused: a hedge budget of 1 % is 20
    // items, two requests.
    now = one_at_a_time(&mut controller, now, 200);
    let old = try_send(&mut controller, now).unwrap();
    let young = try_send(&mut controller, now + seconds(9.0)).unwrap();
    let idle = PipelineLoad {
        in_flight: 2,
        queued_items: 0,
    };
    let busy = PipelineLoad {
        in_flight: 2,
        queued_items: 5,
    };
    assert!(
        controller
            .requests_to_cut(now + seconds(10.0), busy)
            .is_empty()
    );
    assert_eq!(
        controller.requests_to_cut(now + seconds(10.0), idle),
        vec![old]
    );
    // Reported back as a timeout, the cut is not mistaken for overload.
    finish(
        &mut controller,
        now + seconds(10.0),
        old,
        Outcome::TimedOut,
        RateLimitInfo::default(),
    );
    assert!(controller.in_flight.contains_key(&young));
    assert_eq!(controller.counts().timed_out, 1);
    match controller.poll(
        now + seconds(10.0),
        PipelineLoad {
            in_flight: 1,
            queued_items: 0,
        },
    ) {
        Decision::Wait { until: Some(until) } => assert!(until > now + seconds(10.0)),
        other => panic!("expected a wake-up for the next cut, got {other:?}"),
    }
}

#[test]
fn end_of_queue_cuts_stay_within_the_hedge_budget() {
    let mut controller = controller();
    let mut now = Duration::ZERO;
    now = one_at_a_time(&mut controller, now, 100);
    let first = try_send(&mut controller, now).unwrap();
    let second = try_send(&mut controller, now).unwrap();
    let idle = PipelineLoad {
        in_flight: 2,
        queued_items: 0,
    };
    // Both are overdue; the budget (10 of 1,020 items sent, 1 % on a server that never
    // refused) allows one of them.
    let cut = controller.requests_to_cut(now + seconds(30.0), idle);
    assert_eq!(cut.len(), 1, "{cut:?}");
    assert!(cut == vec![first] || cut == vec![second]);
    assert_eq!(controller.counts().hedged_items, 10);
    assert!(
        controller
            .requests_to_cut(now + seconds(60.0), idle)
            .is_empty()
    );
    // No wake-up for a cut the budget does not allow.
    let load = PipelineLoad {
        in_flight: 2,
        queued_items: 0,
    };
    assert_eq!(
        controller.poll(now + seconds(60.0), load),
        Decision::Wait { until: None }
    );
}

#[test]
fn on_a_paced_api_a_hung_request_is_cut_past_the_hedge_budget() {
    let mut controller = controller();
    let announced = parse_rate_limit_headers([
        ("x-ratelimit-limit-requests", "600"),
        ("x-ratelimit-limit-tokens", "2000000"),
    ]);
    // 100 requests, 10 s each, on a provider that announces its limits.
    let mut now = answered_one_at_a_time(&mut controller, Duration::ZERO, 100, 10.0, announced);
    let mut tickets = Vec::new();
    while tickets.len() < 3 {
        now += seconds(0.01);
        tickets.extend(try_send(&mut controller, now));
    }
    let sizes: u64 = tickets
        .iter()
        .map(|ticket| u64::from(controller.in_flight[ticket].shape.items))
        .sum();
    let idle = PipelineLoad {
        in_flight: 3,
        queued_items: 0,
    };
    // Past its size's p90 a request is a hedge: the budget (2 % of the items sent) takes
    // fewer than all three.
    assert!(
        controller
            .requests_to_cut(now + seconds(9.0), idle)
            .is_empty()
    );
    let hedges = controller.requests_to_cut(now + seconds(11.0), idle);
    assert!(!hedges.is_empty() && hedges.len() < 3, "{hedges:?}");
    assert!(controller.counts().hedged_items < sizes);
    // The rest wait, but not for their timeout: once far past any latency seen, a request is
    // taken as hung and cut whatever the budget has left.
    let timeout = controller.timeout_for(controller.batch.current());
    let mut cut = hedges.len();
    let mut at = now + seconds(11.0);
    while cut < 3 {
        let Decision::Wait { until: Some(wake) } = controller.poll(at, idle) else {
            panic!("no wake-up for the hung requests");
        };
        assert!(wake > at && wake < now + timeout, "{wake:?} {timeout:?}");
        at = wake;
        cut += controller.requests_to_cut(at, idle).len();
    }
}

#[test]
fn snapshot_survives_json_and_restores_what_was_learned() {
    let mut controller = controller();
    let announced = parse_rate_limit_headers([
        ("x-ratelimit-limit-requests", "600"),
        ("x-ratelimit-limit-tokens", "200000"),
    ]);
    let mut now = Duration::ZERO;
    for _ in 0..60 {
        let ticket = next_send(&mut controller, &mut now, 0.05);
        let items = controller.in_flight[&ticket].shape.items;
        finish(
            &mut controller,
            now + seconds(1.0),
            ticket,
            completed(items),
            announced,
        );
    }
    let before = controller.status();
    assert!(
        before.items_per_request > 10,
        "batch size grew: {}",
        before.items_per_request
    );
    let json = serde_json::to_string(&controller.snapshot()).unwrap();
    let state = serde_json::from_str(&json).unwrap();
    let restored =
        Controller::restore(ControllerConfig::with_defaults(), state, Duration::ZERO).unwrap();
    let after = restored.status();
    assert_eq!(after.items_per_request, before.items_per_request);
    assert_eq!(after.max_tokens, before.max_tokens);
    assert_eq!(after.tokens_per_second, before.tokens_per_second);
    assert!((after.requests_per_second - before.requests_per_second).abs() < 1e-9);
    assert_eq!(after.counts, before.counts);
    let (p90_before, p90_after) = (
        before.latency_p90_seconds.unwrap(),
        after.latency_p90_seconds.unwrap(),
    );
    assert!(
        (p90_before - p90_after).abs() < 1e-9,
        "{p90_before} vs {p90_after}"
    );
    assert_eq!(after.concurrency_limit, before.concurrency_limit);
}

/// Requests sent within the first second after a restore from `state`, polling every 10 ms
/// with nothing answered.
fn sent_in_the_first_second(config: ControllerConfig, state: ControllerState) -> usize {
    let mut controller = Controller::restore(config, state, Duration::ZERO).unwrap();
    (0..100)
        .filter_map(|step| try_send(&mut controller, seconds(f64::from(step) * 0.01)))
        .count()
}

#[test]
fn a_resumed_run_starts_at_the_requests_in_flight_it_had_found() {
    let mut state = controller().snapshot();
    assert_eq!(
        state.delay,
        Some(DelayState {
            settled: 4,
            bracketed: false,
            slots: None,
        }),
        "the start level, still doubling"
    );
    // Halfway through a run that had found 12, sending 20 requests a second.
    state.delay = Some(DelayState {
        settled: 12,
        bracketed: true,
        slots: None,
    });
    state.probed_requests_per_second = Some(20.0);
    state.latency_p90_seconds = Some(2.0);
    let json = serde_json::to_string(&state).unwrap();
    let restored: ControllerState = serde_json::from_str(&json).unwrap();
    // The twelve and the small first request beside them.
    assert_eq!(
        sent_in_the_first_second(ControllerConfig::with_defaults(), restored.clone()),
        13
    );
    // A server that now says slots it did not say when the level was found starts at them,
    // as a fresh run does (a server that says them gets no small first request).
    let config = ControllerConfig {
        server_slots: Some(6),
        ..ControllerConfig::with_defaults()
    };
    assert_eq!(sent_in_the_first_second(config, restored.clone()), 6);
    // A level found between two measured ones is probed by steps; one below the job's start
    // of 4 (a server with fewer slots than the job expected, which may have them back)
    // doubles, but not one below the slots a server says: that is what the run measured. A
    // server that says other slots than it did then starts at them, doubling.
    for (settled, then, now, limit, searching) in [
        (12, None, None, 12, false),
        (2, None, None, 2, true),
        (6, Some(8), Some(8), 6, false),
        (3, Some(8), Some(8), 3, false),
        (12, Some(8), Some(8), 8, false),
        (4, Some(4), Some(16), 16, true),
        (12, Some(16), None, 12, false),
    ] {
        let mut state = restored.clone();
        state.delay = Some(DelayState {
            settled,
            bracketed: true,
            slots: then,
        });
        let config = ControllerConfig {
            server_slots: now,
            ..ControllerConfig::with_defaults()
        };
        let resumed = Controller::restore(config, state, Duration::ZERO).unwrap();
        assert_eq!(
            (resumed.delay.limit(), resumed.delay.searching()),
            (limit, searching),
            "{settled} found with slots {then:?}, slots {now:?} now"
        );
    }
    // A state saved before the level was kept starts at the job's start.
    let mut older: serde_json::Value = serde_json::from_str(&json).unwrap();
    older.as_object_mut().unwrap().remove("delay");
    let older: ControllerState = serde_json::from_value(older).unwrap();
    assert_eq!(older.delay, None);
    assert_eq!(
        sent_in_the_first_second(ControllerConfig::with_defaults(), older),
        5
    );
}

/// A fresh controller started where an earlier run found its server (`delay`): polled every
/// 10 ms for three seconds, its small first request answered after one second (and nothing
/// else), it returns the requests in flight before that answer and at the end.
fn fresh_run_from(config: ControllerConfig, delay: DelayState) -> (usize, Controller, usize) {
    let mut controller = Controller::new(config, Duration::ZERO).unwrap();
    let mut earlier = controller.snapshot();
    earlier.delay = Some(delay);
    controller.start_where_found(&earlier);
    let mut before = 0;
    for step in 0..300 {
        let now = seconds(f64::from(step) * 0.01);
        if step == 100 {
            before = controller.in_flight.len();
            let first = controller
                .in_flight
                .iter()
                .find(|(_, request)| request.first_answer)
                .map(|(ticket, _)| *ticket);
            if let Some(first) = first {
                finish(
                    &mut controller,
                    now,
                    first,
                    completed(1),
                    RateLimitInfo::default(),
                );
            }
        }
        try_send(&mut controller, now);
    }
    let after = controller.in_flight.len();
    (before, controller, after)
}

#[test]
fn a_fresh_run_starts_where_the_jobs_last_run_found_the_server_and_measures_it_afresh() {
    let found = |settled, slots| DelayState {
        settled,
        bracketed: true,
        slots,
    };
    // The twelve the last run had settled on and the small first request beside them; the
    // level is a start, not a measurement: slow start goes on from it.
    let (sent, fresh, after) = fresh_run_from(ControllerConfig::with_defaults(), found(12, None));
    assert_eq!((sent, after), (5, 12));
    assert_eq!((fresh.delay.limit(), fresh.delay.searching()), (12, true));
    // Below the job's start of 4, as found; never above the job's maximum.
    let (sent, _, _) = fresh_run_from(ControllerConfig::with_defaults(), found(2, None));
    assert_eq!(sent, 3);
    let config = ControllerConfig {
        concurrency: crate::config::StartMinMax::new(4, 1, 8),
        ..ControllerConfig::with_defaults()
    };
    assert_eq!(fresh_run_from(config, found(12, None)).1.delay.limit(), 8);
    // A server that says slots it did not say then, or other ones, starts at them; one that
    // says the same caps the level at them, and takes one below them.
    for (settled, then, now, limit) in [
        (3, None, 6, 6),
        (3, Some(16), 6, 6),
        (12, Some(8), 8, 8),
        (3, Some(8), 8, 3),
    ] {
        let config = ControllerConfig {
            server_slots: Some(now),
            ..ControllerConfig::with_defaults()
        };
        let (sent, fresh, _) = fresh_run_from(config, found(settled, then));
        assert_eq!(
            (sent, fresh.delay.limit()),
            (limit as usize, limit),
            "{settled} found with slots {then:?}, {now} now"
        );
    }
    // A state of another format version, or with no level (a provider that announced its
    // rate limits), changes nothing.
    let mut controller = controller();
    let mut earlier = controller.snapshot();
    earlier.delay = Some(found(12, None));
    earlier.version += 1;
    controller.start_where_found(&earlier);
    earlier.version -= 1;
    earlier.delay = None;
    controller.start_where_found(&earlier);
    assert_eq!(controller.delay.limit(), 4);
}

/// Sends one request and answers it, a second later, with headers announcing 600 requests and
/// 200,000 tokens a minute.
fn announce_limits(controller: &mut Controller) {
    let announced = parse_rate_limit_headers([
        ("x-ratelimit-limit-requests", "600"),
        ("x-ratelimit-limit-tokens", "200000"),
    ]);
    let mut now = Duration::ZERO;
    let ticket = next_send(controller, &mut now, 0.05);
    finish(
        controller,
        now + seconds(1.0),
        ticket,
        completed(1),
        announced,
    );
}

#[test]
fn a_provider_that_announced_its_limits_keeps_no_level_of_requests_in_flight() {
    let mut controller = controller();
    announce_limits(&mut controller);
    assert_eq!(controller.snapshot().delay, None);
}

#[test]
fn a_request_sent_into_an_empty_pipeline_is_timed_for_the_level_it_fills() {
    // As a request sent again after a 429 is: before the server's parallelism is known, the
    // three others of the start's level; once the provider announced its limits, none.
    let mut controller = controller();
    assert_eq!(controller.timeout_with_queue(5, 0), seconds(480.0));
    announce_limits(&mut controller);
    assert_eq!(controller.timeout_with_queue(5, 0), seconds(120.0));
}

#[test]
fn the_requests_of_a_burst_are_timed_for_the_requests_beside_them() {
    // The start's four and the small first request (which takes no place of the four) go
    // out together, before the server's parallelism is known: each may wait behind, or be
    // slowed by, the other three of the level, so each gets four times the job's 120 s, the
    // first ones sent as much as the last.
    let mut controller = controller();
    let mut timeouts = Vec::new();
    for step in 0..100 {
        let now = seconds(f64::from(step) * 0.01);
        let in_flight = controller.in_flight.len();
        if let Decision::Send {
            items,
            max_tokens,
            timeout,
        } = controller.poll(now, load(in_flight))
        {
            timeouts.push(timeout.as_secs());
            controller.on_sent(
                now,
                RequestShape {
                    items,
                    prompt_tokens: 1000,
                    max_tokens,
                    retried_items: 0,
                    streamed: false,
                },
            );
        }
    }
    assert_eq!(timeouts, [480, 480, 480, 480, 480]);
}

#[test]
fn waits_when_concurrency_is_full() {
    let mut controller = controller();
    let mut now = Duration::ZERO;
    // The start's 4 and the small first request beside them.
    while controller.in_flight.len() < 5 {
        try_send(&mut controller, now);
        now += seconds(0.01);
    }
    assert_eq!(
        controller.poll(now, load(5)),
        Decision::Wait { until: None }
    );
}

#[test]
fn a_snapshot_of_another_version_is_ignored() {
    let mut state = controller().snapshot();
    state.version += 1;
    state.counts.requests_sent = 99;
    let restored =
        Controller::restore(ControllerConfig::with_defaults(), state, Duration::ZERO).unwrap();
    assert_eq!(restored.counts().requests_sent, 0);
}

/// Sends and completes `requests` requests of 10 items one after another, 2 s each, from
/// `now`; returns the time after the last.
fn one_at_a_time(controller: &mut Controller, now: Duration, requests: usize) -> Duration {
    answered_one_at_a_time(controller, now, requests, 2.0, RateLimitInfo::default())
}

/// Sends `requests` requests one after another, each answered whole after `latency` seconds
/// with `info` in its headers; returns the time after the last answer.
fn answered_one_at_a_time(
    controller: &mut Controller,
    mut now: Duration,
    requests: usize,
    latency: f64,
    info: RateLimitInfo,
) -> Duration {
    for _ in 0..requests {
        let ticket = next_send(controller, &mut now, 0.1);
        let items = controller.in_flight[&ticket].shape.items;
        finish(
            controller,
            now + seconds(latency),
            ticket,
            completed(items),
            info,
        );
        now += seconds(latency);
    }
    now
}

#[test]
fn requests_shrink_toward_the_end_of_the_queue_on_an_announced_rate() {
    let mut controller = controller();
    controller.batch =
        crate::batch_sizer::BatchSizer::new(crate::config::StartMinMax::new(40, 1, 40));
    let announced = parse_rate_limit_headers([
        ("x-ratelimit-limit-requests", "3000"),
        ("x-ratelimit-limit-tokens", "600000"),
    ]);
    // Latency 0.8 s + 0.16 s per item, spread ±20%, over sizes 5..=40.
    let mut now = Duration::ZERO;
    for step in 0..120u32 {
        let items = 5 + (step * 7) % 36;
        let shape = RequestShape {
            items,
            prompt_tokens: 400 + 150 * items,
            max_tokens: 80 * items,
            retried_items: 0,
            streamed: false,
        };
        let ticket = controller.on_sent(now, shape);
        let noise = 0.8 + 0.4 * f64::from(step % 5) / 4.0;
        let latency = seconds((0.8 + 0.16 * f64::from(items)) * noise);
        now += latency;
        finish(&mut controller, now, ticket, completed(items), announced);
    }
    let size = controller.batch.current();
    assert_eq!(size, 40);
    let limit = controller.concurrency_limit_for(size);
    let sizes: Vec<u32> = [100_000, 2_000, 1_000, 500, 200, 50, 10, 1]
        .into_iter()
        .map(|queued_items| {
            controller.items_to_send(
                PipelineLoad {
                    in_flight: 0,
                    queued_items,
                },
                limit,
            )
        })
        .collect();
    assert_eq!(sizes[0], 40, "{sizes:?}");
    assert!(sizes.windows(2).all(|pair| pair[0] >= pair[1]), "{sizes:?}");
    assert!(sizes[4] < 40 && sizes[7] <= 5, "{sizes:?}");
}

#[test]
fn the_first_answer_comes_from_a_small_request_beside_the_start() {
    let mut controller = controller();
    let mut sizes = Vec::new();
    let mut tickets = Vec::new();
    for step in 0..100 {
        if let Some(ticket) = try_send(&mut controller, seconds(f64::from(step) * 0.01)) {
            sizes.push(controller.in_flight[&ticket].shape.items);
            tickets.push(ticket);
        }
    }
    // The job's smallest size first, then concurrency.start requests of the start size: the
    // small one takes no slot of the start's.
    assert_eq!(sizes, [1, 10, 10, 10, 10]);
    // Its answer brings the announced limits within a short latency, while the start's
    // requests are still out: pacing follows them at once and the announced burst goes out.
    let announced = parse_rate_limit_headers([
        ("x-ratelimit-limit-requests", "600"),
        ("x-ratelimit-remaining-requests", "590"),
    ]);
    finish(
        &mut controller,
        seconds(1.0),
        tickets[0],
        completed(1),
        announced,
    );
    assert!(
        (controller.status().requests_per_second - 9.8).abs() < 1e-9,
        "{}",
        controller.status().requests_per_second
    );
    let mut more = 0;
    for step in 0..10 {
        let now = seconds(1.0 + f64::from(step) * 0.001);
        more += usize::from(try_send(&mut controller, now).is_some());
    }
    assert!(
        more >= 5,
        "only {more} more requests after the first answer"
    );
    assert!(
        tickets[1..]
            .iter()
            .all(|ticket| controller.in_flight.contains_key(ticket))
    );
}

#[test]
fn no_small_first_request_when_the_job_allows_no_smaller_one_or_no_more_in_flight() {
    let mut smallest_is_start = ControllerConfig::with_defaults();
    smallest_is_start.items_per_request = crate::config::StartMinMax::new(10, 10, 40);
    let mut start_is_the_cap = ControllerConfig::with_defaults();
    start_is_the_cap.concurrency = crate::config::StartMinMax::new(4, 1, 4);
    let mut start_is_small = ControllerConfig::with_defaults();
    start_is_small.items_per_request = crate::config::StartMinMax::new(3, 1, 40);
    for config in [smallest_is_start, start_is_the_cap, start_is_small] {
        no_small_first_request(config);
    }
}

fn no_small_first_request(config: ControllerConfig) {
    let mut controller = Controller::new(config, Duration::ZERO).unwrap();
    let tickets: Vec<Ticket> = (0..50)
        .filter_map(|step| try_send(&mut controller, seconds(f64::from(step) * 0.01)))
        .collect();
    let sizes: Vec<u32> = tickets
        .iter()
        .map(|ticket| controller.in_flight[ticket].shape.items)
        .collect();
    assert_eq!(sizes.len(), 4, "{sizes:?}");
    assert!(sizes.iter().all(|size| *size == sizes[0]), "{sizes:?}");
}

#[test]
fn answers_cut_short_at_max_tokens_do_not_measure_a_level() {
    // A server that queues (no headers, no 429): the delay limit judges the start level on
    // its answers. Answers truncated at a `max_tokens` below the job's cap end early with
    // their items not served, so they would show a throughput the level does not have: they
    // are not counted.
    let truncated = Outcome::Completed(CompletedRequest {
        items_valid: 2,
        items_missing: 8,
        truncated: true,
        prompt_tokens: 1000,
        completion_tokens: 140,
        ..CompletedRequest::default()
    });
    // A model that rambles: every answer runs to the most its 10 items may take (the default
    // 200 tokens an item, plus the enclosing object's allowance) and is cut off there before
    // its first complete item. Each ran its whole budget, so the level is still measured (a
    // run of such answers would otherwise stay at its start level to the end).
    let at_the_cap = Outcome::Completed(CompletedRequest {
        items_missing: 10,
        truncated: true,
        prompt_tokens: 1000,
        completion_tokens: 10 * 200 + crate::ENCLOSING_OBJECT_TOKENS,
        ..CompletedRequest::default()
    });
    for (outcome, judged) in [
        (truncated, false),
        (completed(10), true),
        (at_the_cap, true),
    ] {
        let mut controller = controller();
        let generation = controller.delay.generation();
        // Every answer 2 s after its request; the dispatcher polls every 50 ms.
        let mut sent: Vec<(Duration, Ticket)> = Vec::new();
        for step in 0..2400 {
            let now = seconds(f64::from(step) * 0.05);
            let (done, waiting): (Vec<_>, Vec<_>) = sent
                .into_iter()
                .partition(|(at, _)| now.saturating_sub(*at) >= seconds(2.0));
            sent = waiting;
            for (_, ticket) in done {
                finish(
                    &mut controller,
                    now,
                    ticket,
                    outcome,
                    RateLimitInfo::default(),
                );
            }
            while let Some(ticket) = try_send(&mut controller, now) {
                sent.push((now, ticket));
            }
        }
        assert_eq!(
            controller.delay.generation() != generation,
            judged,
            "{outcome:?}"
        );
    }
}

/// The largest request sent over 60 answered one at a time by a server that reports its
/// service time, 0.2 s + 0.45 s per item, under a job timeout of `timeout_s`.
fn largest_size_sent(timeout_s: u64) -> u32 {
    let mut config = ControllerConfig::with_defaults();
    config.concurrency = crate::config::StartMinMax::new(1, 1, 1);
    config.request_timeout = Duration::from_secs(timeout_s);
    let mut controller = Controller::new(config, Duration::ZERO).unwrap();
    let mut now = Duration::ZERO;
    let mut largest = 0;
    for _ in 0..60 {
        let ticket = next_send(&mut controller, &mut now, 0.1);
        let items = controller.in_flight[&ticket].shape.items;
        largest = largest.max(items);
        let latency = seconds(0.2 + 0.45 * f64::from(items));
        let outcome = Outcome::Completed(CompletedRequest {
            items_valid: items,
            prompt_tokens: 1000,
            completion_tokens: 70 * items,
            server_time: Some(latency),
            ..CompletedRequest::default()
        });
        now += latency;
        finish(
            &mut controller,
            now,
            ticket,
            outcome,
            RateLimitInfo::default(),
        );
    }
    largest
}

#[test]
fn requests_grow_only_to_half_the_timeout_at_the_servers_pace() {
    // Requests of 40 items take 18.2 s here: under a 60 s timeout they grow to the job's
    // largest size; under 20 s one now and then would outlast it, so they stop at 20 items
    // (9.2 s), the next doubling being past half the timeout and a step of one or two items
    // too small to be worth measuring afresh.
    assert_eq!(largest_size_sent(60), 40);
    assert_eq!(largest_size_sent(20), 20);
}

/// `ticket` timed out at `now`.
fn time_out(controller: &mut Controller, now: Duration, ticket: Ticket) {
    finish(
        controller,
        now,
        ticket,
        Outcome::TimedOut,
        RateLimitInfo::default(),
    );
}

/// A controller of one request at a time of up to 10 items, under a job timeout of
/// `timeout_s`, after 30 requests answered in 1 s each; and the time then.
fn after_30_answers_of_1_s(timeout_s: u64) -> (Controller, Duration) {
    let mut config = ControllerConfig::with_defaults();
    config.concurrency = crate::config::StartMinMax::new(1, 1, 1);
    config.items_per_request = crate::config::StartMinMax::new(10, 1, 10);
    config.request_timeout = Duration::from_secs(timeout_s);
    let mut controller = Controller::new(config, Duration::ZERO).unwrap();
    let now = answered_one_at_a_time(
        &mut controller,
        Duration::ZERO,
        30,
        1.0,
        RateLimitInfo::default(),
    );
    (controller, now)
}

/// The size after 30 requests answered in 1 s each, one at a time, then two timing out in a
/// row, under a job timeout of `timeout_s`.
fn size_after_two_timeouts(timeout_s: u64) -> u32 {
    let (mut controller, mut now) = after_30_answers_of_1_s(timeout_s);
    for _ in 0..2 {
        now += seconds(0.1);
        let ticket = try_send(&mut controller, now).expect("a send");
        now += Duration::from_secs(timeout_s);
        time_out(&mut controller, now, ticket);
    }
    controller.batch.current()
}

#[test]
fn only_timeouts_at_the_jobs_timeout_halve_the_size() {
    // Answers take 1 s: the controller's own timeout is its 5 s floor. Under a 120 s job
    // timeout two requests cut at 5 s were far slower than the rest (hung), not too large;
    // under a 5 s job timeout they outlasted the job's timeout.
    assert_eq!(size_after_two_timeouts(120), 10);
    assert_eq!(size_after_two_timeouts(5), 5);
}

#[test]
fn a_size_every_request_of_which_outlasts_a_shortened_timeout_is_found_too_large() {
    // Answers took 1 s, so the controller's own timeout is its 5 s floor, under a 120 s job
    // timeout. Then the server turns slow: every request outlasts 5 s. The first one cut there
    // may have hung; the next ones get the job's timeout until an answer comes, and two of
    // them cut at it halve the size (before, every request was cut at 5 s, without end).
    let (mut controller, mut now) = after_30_answers_of_1_s(120);
    let mut timeouts = Vec::new();
    for _ in 0..3 {
        now += seconds(0.1);
        let Decision::Send { items, timeout, .. } = controller.poll(now, load(0)) else {
            panic!("no send");
        };
        let ticket = controller.on_sent(
            now,
            RequestShape {
                items,
                prompt_tokens: 1000,
                max_tokens: 700,
                retried_items: 0,
                streamed: false,
            },
        );
        timeouts.push(timeout.as_secs());
        now += timeout;
        time_out(&mut controller, now, ticket);
    }
    assert_eq!(timeouts, [5, 120, 120]);
    assert_eq!(controller.batch.current(), 5);
    // An answer brings the shortened timeout back.
    now += seconds(0.1);
    let ticket = try_send(&mut controller, now).expect("a send");
    now += seconds(1.0);
    finish(
        &mut controller,
        now,
        ticket,
        completed(5),
        RateLimitInfo::default(),
    );
    assert_eq!(controller.timeout_for(5).as_secs(), 5);
}

#[test]
fn a_server_that_announces_its_slots_is_started_at_them() {
    // No small first request: the start's requests are already one per slot of the server.
    for (slots, expected) in [(16, 16), (2, 2), (100, 64)] {
        let mut config = ControllerConfig::with_defaults();
        config.server_slots = Some(slots);
        let mut controller = Controller::new(config, Duration::ZERO).unwrap();
        assert_eq!(
            sizes_sent_at_once(&mut controller),
            vec![10; expected],
            "{slots} slots"
        );
        assert_eq!(controller.status().server_slots, Some(slots));
    }
    // Slots it does not have say nothing: the job's start and the small first request.
    let mut config = ControllerConfig::with_defaults();
    config.server_slots = Some(0);
    let mut controller = Controller::new(config, Duration::ZERO).unwrap();
    assert_eq!(sizes_sent_at_once(&mut controller), [1, 10, 10, 10, 10]);
}

/// The sizes of the requests sent over 2 s with none answered.
fn sizes_sent_at_once(controller: &mut Controller) -> Vec<u32> {
    let tickets: Vec<Ticket> = (0..200)
        .filter_map(|step| try_send(controller, seconds(f64::from(step) * 0.01)))
        .collect();
    tickets
        .iter()
        .map(|ticket| controller.in_flight[ticket].shape.items)
        .collect()
}

/// The server's gauges read at `now`.
fn gauges(controller: &mut Controller, now: Duration, running: u32, waiting: u32) {
    controller.on_server_queue(now, ServerQueue { running, waiting });
}

#[test]
fn a_level_the_servers_gauges_show_served_whole_doubles_at_once_until_requests_wait() {
    let mut controller = controller();
    assert_eq!(sizes_sent_at_once(&mut controller).len(), 5);
    let mut now = seconds(2.0);
    // The start's four (and the small first request) running, none waiting: the next
    // doubling at once, before any answer.
    gauges(&mut controller, now, 5, 0);
    assert_eq!(controller.delay.limit(), 8);
    // Requests waiting, all five of them ours: one reading is not enough, two in a row are;
    // the most the server ran at them is its slots.
    now += seconds(1.0);
    gauges(&mut controller, now, 3, 2);
    assert_eq!(controller.delay.limit(), 8);
    now += seconds(1.0);
    gauges(&mut controller, now, 2, 3);
    assert_eq!(controller.delay.limit(), 3, "five of ours on three slots");
    assert_eq!(controller.status().server_slots, Some(3));
    assert_eq!(try_send(&mut controller, now), None);
    // Slow start is over: a server that takes them all in is no reason to double again.
    now += seconds(1.0);
    gauges(&mut controller, now, 5, 0);
    assert_eq!(controller.delay.limit(), 3);
}

#[test]
fn a_queue_is_followed_once_and_only_from_readings_in_a_row_of_a_server_that_took_no_more() {
    let full_after = |readings: &[(f64, u32, u32)]| {
        let mut controller = controller();
        assert_eq!(sizes_sent_at_once(&mut controller).len(), 5);
        for (at, running, waiting) in readings {
            gauges(&mut controller, seconds(*at), *running, *waiting);
        }
        controller.status().server_slots
    };
    assert_eq!(full_after(&[(2.0, 3, 2), (3.0, 3, 2)]), Some(3));
    // Readings more than three seconds apart (one failed between) are not in a row.
    assert_eq!(full_after(&[(2.0, 3, 2), (6.0, 3, 2)]), None);
    // The server took more in between: it was not full yet.
    assert_eq!(full_after(&[(2.0, 2, 3), (3.0, 3, 2)]), None);
    // Gauges that count fewer than half of our five requests are another server's.
    assert_eq!(full_after(&[(2.0, 1, 1), (3.0, 1, 1)]), None);

    // Once per queue: the share is not taken again while the queue lasts (other clients
    // keeping it full would otherwise bring the limit down a little at every reading).
    let mut controller = controller();
    assert_eq!(sizes_sent_at_once(&mut controller).len(), 5);
    for at in [2.0, 3.0, 4.0, 5.0, 6.0] {
        gauges(&mut controller, seconds(at), 4, 4);
    }
    assert_eq!(controller.delay.limit(), 3, "5 × 4 ÷ 8, rounded, once");
}

#[test]
fn on_a_server_that_others_fill_too_the_limit_drops_to_our_share_of_its_slots() {
    // Our five (the start's four and the first) among twelve: eight running, four waiting.
    let mut controller = controller();
    assert_eq!(sizes_sent_at_once(&mut controller).len(), 5);
    gauges(&mut controller, seconds(2.0), 8, 4);
    gauges(&mut controller, seconds(3.0), 8, 4);
    assert_eq!(controller.status().server_slots, Some(8));
    assert_eq!(controller.delay.limit(), 3, "5 × 8 ÷ 12, rounded");
}

#[test]
fn gauges_raise_no_level_that_is_not_all_in_flight_and_running() {
    // Two of the start's four in flight: the level is not shown served whole.
    let mut controller = controller();
    let now = seconds(1.0);
    for _ in 0..2 {
        try_send(&mut controller, now).expect("sent");
    }
    gauges(&mut controller, now, 2, 0);
    assert_eq!(controller.delay.limit(), 4);
    // All four (and the first) in flight, but the server runs only three of them.
    while try_send(&mut controller, now).is_some() {}
    gauges(&mut controller, now, 3, 0);
    assert_eq!(controller.delay.limit(), 4);
    // Requests waiting at readings that are not in a row say nothing.
    gauges(&mut controller, now, 3, 2);
    gauges(&mut controller, now, 3, 0);
    gauges(&mut controller, now, 3, 2);
    assert_eq!(controller.delay.limit(), 4);
    assert_eq!(controller.status().server_slots, None);
}

/// Polls every 10 ms from `from` until `to`, sending whenever told to; returns the tickets.
fn send_over(controller: &mut Controller, from: f64, to: f64) -> Vec<Ticket> {
    let mut tickets = Vec::new();
    let mut at = from;
    while at < to {
        tickets.extend(try_send(controller, seconds(at)));
        at += 0.01;
    }
    tickets
}

/// The first chunk of `ticket` comes `after` its send.
fn first_chunk_after(controller: &mut Controller, ticket: Ticket, after: f64) {
    let sent_at = controller.in_flight[&ticket].sent_at;
    controller.on_first_chunk(sent_at + seconds(after), ticket);
}

/// The start's five requests (the small first one, ticket 0, and four of ten items), sent
/// by 0.7 s as the pacer allows; the first `running` of them stream their first chunk 0.3 s
/// after their send; the small one is answered at 1 s, its first chunk clearly before its
/// end: the first chunks are trusted from then on.
fn streamed_start(controller: &mut Controller, running: usize) -> Vec<Ticket> {
    let tickets = send_over(controller, 0.0, 1.0);
    assert_eq!(tickets.len(), 5);
    for ticket in &tickets[..running] {
        first_chunk_after(controller, *ticket, 0.3);
    }
    finish(
        controller,
        seconds(1.0),
        tickets[0],
        completed(1),
        RateLimitInfo::default(),
    );
    tickets
}

#[test]
fn first_chunks_that_show_every_request_running_double_slow_start_at_once() {
    let mut controller = controller();
    let tickets = send_over(&mut controller, 0.0, 1.0);
    for ticket in &tickets {
        first_chunk_after(&mut controller, *ticket, 0.3);
    }
    // Before any answer says the first chunks are real, they say nothing.
    assert_eq!(try_send(&mut controller, seconds(1.0)), None);
    assert_eq!(controller.delay.limit(), 4);
    finish(
        &mut controller,
        seconds(1.0),
        tickets[0],
        completed(1),
        RateLimitInfo::default(),
    );
    // The start's four all running, none waiting: the next doubling at once, as with gauges.
    try_send(&mut controller, seconds(1.0));
    assert_eq!(controller.delay.limit(), 8);
    assert_eq!(controller.status().server_slots, None);
}

#[test]
fn requests_without_a_first_chunk_past_the_threshold_at_two_readings_hold_the_level_at_what_ran() {
    // A server with two slots: the small first request and the start's first run; the first
    // answer's slot goes to the next, whose first chunk comes 0.3 s later; two wait.
    let mut controller = controller();
    let tickets = streamed_start(&mut controller, 2);
    controller.on_first_chunk(seconds(1.3), tickets[2]);
    // Waiting: no first chunk after more than three times the 0.3 s the others took. One
    // reading is not enough; the next, a second later, is.
    for at in [1.0, 2.0] {
        assert_eq!(try_send(&mut controller, seconds(at)), None);
    }
    assert_eq!(controller.delay.limit(), 4);
    assert_eq!(controller.status().server_slots, None);
    assert_eq!(try_send(&mut controller, seconds(3.0)), None);
    assert_eq!(controller.delay.limit(), 2, "what ran of ours: two");
    assert_eq!(controller.status().server_slots, Some(2));
}

#[test]
fn a_request_that_just_took_a_freed_slot_is_running_before_its_first_chunk() {
    // As above, before the next request's first chunk came: the slot the first answer freed
    // is taken (a handover), not lost, while it may still be prefilling...
    let mut controller = controller();
    let tickets = streamed_start(&mut controller, 2);
    let reading = |running, waiting| ServerQueue { running, waiting };
    assert_eq!(controller.first_chunk_reading(seconds(1.2)), reading(2, 0));
    // ... but not once it has been longer than a request takes to be told waiting.
    assert_eq!(controller.first_chunk_reading(seconds(2.2)), reading(1, 3));
    controller.on_first_chunk(seconds(2.3), tickets[2]);
    assert_eq!(controller.first_chunk_reading(seconds(2.4)), reading(2, 2));
}

#[test]
fn a_continuous_batching_slowdown_of_first_chunks_is_not_taken_for_waiting() {
    // Every request's prefill slows with the requests beside it: the four sent at the
    // doubling stream theirs 0.75 s after their send, two and a half times the start's
    // 0.3 s. Read before and after, none is waiting, and the next doubling follows at once.
    let mut controller = controller();
    streamed_start(&mut controller, 5);
    let doubled = send_over(&mut controller, 1.0, 2.0);
    assert_eq!(doubled.len(), 4);
    assert_eq!(controller.delay.limit(), 8);
    // The first of them 0.74 s old, none streamed yet: young, not waiting.
    let first = controller.in_flight[&doubled[0]].sent_at;
    assert_eq!(
        controller.first_chunk_reading(first + seconds(0.74)),
        ServerQueue {
            running: 4,
            waiting: 0
        }
    );
    try_send(&mut controller, seconds(2.3));
    for ticket in &doubled {
        first_chunk_after(&mut controller, *ticket, 0.75);
    }
    assert_eq!(controller.status().server_slots, None);
    try_send(&mut controller, seconds(3.0));
    assert_eq!(controller.delay.limit(), 16);
    assert_eq!(controller.status().server_slots, None);
}

#[test]
fn a_request_passed_by_a_later_one_is_hung_not_queued() {
    // A queue is served in order: a request without a first chunk while one sent after it
    // streams is not waiting in it. Of the start's, all stream but the first full request;
    // the one sent when the answers freed room streams too.
    let mut controller = controller();
    let tickets = send_over(&mut controller, 0.0, 1.0);
    for ticket in &tickets {
        if *ticket != tickets[1] {
            first_chunk_after(&mut controller, *ticket, 0.3);
        }
    }
    for (at, ticket, items) in [(1.0, tickets[0], 1), (1.2, tickets[2], 10)] {
        finish(
            &mut controller,
            seconds(at),
            ticket,
            completed(items),
            RateLimitInfo::default(),
        );
    }
    let later = send_over(&mut controller, 1.2, 1.5);
    assert_eq!(later.len(), 1);
    first_chunk_after(&mut controller, later[0], 0.3);
    for at in [2.5, 3.5, 4.5] {
        assert_eq!(try_send(&mut controller, seconds(at)), None);
    }
    assert_eq!(controller.status().server_slots, None);
    assert_eq!(controller.delay.limit(), 4);
}

#[test]
fn first_chunks_at_the_end_of_each_answer_or_none_change_nothing() {
    // Behind a proxy that buffers each answer, the first chunks come with the ends; a server
    // that ignores `stream` sends none. Neither is trusted, and with either the run is the
    // run without them (two of ours answered, a queue behind: the level does not move).
    let run = |chunks_at_the_end: bool| {
        let mut controller = controller();
        let tickets = send_over(&mut controller, 0.0, 1.0);
        let mut sent = Vec::new();
        for (at, ticket) in [(1.0, tickets[0]), (3.0, tickets[1]), (5.0, tickets[2])] {
            if chunks_at_the_end {
                controller.on_first_chunk(seconds(at), ticket);
            }
            let items = controller.in_flight[&ticket].shape.items;
            finish(
                &mut controller,
                seconds(at),
                ticket,
                completed(items),
                RateLimitInfo::default(),
            );
            sent.extend(send_over(&mut controller, at, at + 2.0));
        }
        assert!(!controller.first_chunks.trusted());
        (
            controller.delay.limit(),
            controller.status().server_slots,
            sent,
        )
    };
    let (limit, slots, sent) = run(true);
    assert_eq!((limit, slots), (4, None));
    assert_eq!((limit, slots, sent), run(false));
}

/// The start of a run in its first second (the small first request and the job's start of
/// four), the first `streamed` of them sent streamed: their tickets.
fn send_the_start(controller: &mut Controller, streamed: usize) -> Vec<Ticket> {
    let mut tickets = Vec::new();
    let mut at = 0.0;
    while at < 1.0 {
        tickets.extend(try_send_as(
            controller,
            seconds(at),
            tickets.len() < streamed,
        ));
        at += 0.01;
    }
    assert_eq!(tickets.len(), 5);
    tickets
}

#[test]
fn requests_sent_unstreamed_are_never_read_as_waiting() {
    // The start of the test above, the runner having stopped streaming after the first three
    // requests: the last two, unstreamed, never have a first chunk. The first chunks are
    // trusted still (the answer streamed), but only the streamed requests are read: two
    // running, none waiting, and the level does not move.
    let (mut controller, tickets) = a_start_partly_streamed(3);
    controller.on_first_chunk(seconds(1.3), tickets[2]);
    assert!(controller.reads_first_chunks());
    assert_eq!(
        controller.first_chunk_reading(seconds(2.5)),
        ServerQueue {
            running: 2,
            waiting: 0
        }
    );
    for at in [1.0, 2.0, 3.0, 4.0] {
        assert_eq!(try_send(&mut controller, seconds(at)), None);
    }
    assert_eq!(controller.delay.limit(), 4);
    assert_eq!(controller.status().server_slots, None);
}

/// The start, its first `streamed` requests sent streamed and the rest unstreamed (after a
/// failed stream); the first two stream their first chunk 0.3 s after their send, and the
/// small first one is answered at 1 s: the first chunks are trusted.
fn a_start_partly_streamed(streamed: usize) -> (Controller, Vec<Ticket>) {
    let mut controller = controller();
    let tickets = send_the_start(&mut controller, streamed);
    first_chunk_after(&mut controller, tickets[0], 0.3);
    first_chunk_after(&mut controller, tickets[1], 0.3);
    finish(
        &mut controller,
        seconds(1.0),
        tickets[0],
        completed(1),
        RateLimitInfo::default(),
    );
    assert!(controller.reads_first_chunks());
    (controller, tickets)
}

/// Polls at each of `times`: nothing is sent, and the next reading is never due at once
/// (the dispatcher, told to wait until then, would never sleep); the level stays at 4 and
/// no slots are found.
fn the_level_holds(controller: &mut Controller, times: &[f64]) {
    for &at in times {
        assert_eq!(try_send(controller, seconds(at)), None);
        match controller.poll(seconds(at), load(controller.in_flight.len())) {
            Decision::Wait { until } => assert!(
                until.is_none_or(|until| until > seconds(at)),
                "wait until {until:?} at {at} s"
            ),
            decision => panic!("{decision:?}"),
        }
    }
    assert_eq!(controller.delay.limit(), 4);
    assert_eq!(controller.status().server_slots, None);
}

#[test]
fn a_reading_of_fewer_than_half_of_our_requests_streamed_is_not_followed() {
    // Two slots; of the four requests in flight after the first answer, one streamed and
    // running, one streamed and waiting, two unstreamed (a quarter of ours waiting, a quarter
    // running): the level does not move.
    let (mut controller, _) = a_start_partly_streamed(2);
    the_level_holds(&mut controller, &[2.0, 3.0, 4.0]);
}

#[test]
fn a_reading_with_a_request_sent_unstreamed_in_flight_is_not_followed() {
    // Of the four requests in flight after the first answer, one streamed and running, two
    // streamed and past the threshold, one unstreamed (sent after a failed stream): three of
    // four read as one running and two waiting, but the unstreamed one may hold a slot unseen,
    // so the slots would be too few. Nothing is followed: the level stays.
    let (mut controller, _) = a_start_partly_streamed(4);
    assert_eq!(
        controller.first_chunk_reading(seconds(2.0)),
        ServerQueue {
            running: 1,
            waiting: 2
        }
    );
    the_level_holds(&mut controller, &[2.0, 3.0, 4.0]);
}

#[test]
fn only_a_request_that_held_a_slot_frees_one_when_it_ends() {
    // Of the start's requests, streamed: one refused at once (no first chunk) held no slot;
    // one that streamed its first chunk and timed out held one, as one answered did.
    let mut controller = controller();
    let tickets = send_the_start(&mut controller, 5);
    controller.on_outcome(
        seconds(0.8),
        tickets[1],
        Observation::new(seconds(0.05), Outcome::OtherError, RateLimitInfo::default()),
    );
    assert_eq!(controller.first_chunks.last_end(), None);
    first_chunk_after(&mut controller, tickets[2], 0.3);
    finish(
        &mut controller,
        seconds(2.0),
        tickets[2],
        Outcome::TimedOut,
        RateLimitInfo::default(),
    );
    assert_eq!(controller.first_chunks.last_end(), Some(seconds(2.0)));
    finish(
        &mut controller,
        seconds(2.5),
        tickets[3],
        completed(10),
        RateLimitInfo::default(),
    );
    assert_eq!(controller.first_chunks.last_end(), Some(seconds(2.5)));
}

#[test]
fn streaming_stopped_stops_reading_first_chunks_until_answers_stream_again() {
    // The start that holds the level at two (`requests_without_a_first_chunk_past_…`), the
    // runner stopping streaming right after the first answer: nothing is read any more.
    let mut controller = controller();
    let tickets = streamed_start(&mut controller, 2);
    assert!(controller.reads_first_chunks());
    controller.streaming_stopped();
    assert!(!controller.reads_first_chunks());
    controller.on_first_chunk(seconds(1.3), tickets[2]);
    for at in [1.0, 2.0, 3.0, 4.0] {
        assert_eq!(try_send(&mut controller, seconds(at)), None);
    }
    assert_eq!(controller.delay.limit(), 4);
    assert_eq!(controller.status().server_slots, None);
    // A streamed answer with its first chunk clearly before its end trusts them again.
    finish(
        &mut controller,
        seconds(4.5),
        tickets[1],
        completed(10),
        RateLimitInfo::default(),
    );
    assert!(controller.reads_first_chunks());
}

/// The start's small request and four, sent together by 1 s to a server that prefills
/// pending prompts one after another (llama.cpp or Ollama on a CPU), stream their first chunks
/// 1 to 5 `prefill`s after their send; the small one is answered at 8.5 s.
fn a_start_prefilled_one_after_another(controller: &mut Controller, prefill: f64) {
    let start = send_over(controller, 0.0, 1.0);
    assert_eq!(start.len(), 5);
    for (k, ticket) in start.iter().enumerate() {
        first_chunk_after(controller, *ticket, prefill * (k + 1) as f64);
    }
    finish(
        controller,
        seconds(8.5),
        start[0],
        completed(1),
        RateLimitInfo::default(),
    );
}

#[test]
fn a_burst_prefilled_one_after_another_is_not_read_as_waiting() {
    // llama.cpp or Ollama on a CPU prefills pending prompts one after another, 1.5 s each:
    // the start's small request and four, sent together, stream their first chunks 1 to 5
    // prefills after their send, none of ours having ended in between: none waited for a
    // slot, and all are taken into the reference, the late ones too (past 3 × 1.5 s they
    // would be left out). Once the first answer trusts the first chunks, the four are read
    // running, none waiting: no hold below four, and slow start doubles.
    let mut controller = controller();
    a_start_prefilled_one_after_another(&mut controller, 1.5);
    // The quarter quantile of 1.5, 3, 4.5, 6 and 7.5 s.
    assert_eq!(controller.first_chunks.reference(1000), Some(seconds(3.0)));
    assert_eq!(
        controller.first_chunk_reading(seconds(8.5)),
        ServerQueue {
            running: 4,
            waiting: 0
        }
    );
    try_send(&mut controller, seconds(8.5));
    assert_eq!(controller.delay.limit(), 8);
    assert_eq!(controller.status().server_slots, None);
}

#[test]
fn a_second_burst_prefilled_one_after_another_with_no_end_between_is_not_held() {
    // The start of the test above; the level doubled to eight, the four sent then stream
    // theirs one to four prefills of 1.5 s after their send, no answer of ours ending in between. Their
    // early first chunks keep the reference at 1.5 s, so the last one goes past 3 × 1.5 s
    // without a first chunk; but first chunks keep coming and no slot of ours was freed
    // since its send: the server is still taking requests in, not queueing them. The level
    // is not held below the burst, and doubles once all eight stream.
    let prefill = 1.5;
    let mut controller = controller();
    a_start_prefilled_one_after_another(&mut controller, prefill);
    let burst = send_over(&mut controller, 8.5, 9.5);
    assert_eq!(burst.len(), 4);
    assert_eq!(controller.delay.limit(), 8);
    let chunks: Vec<(Duration, Ticket)> = burst
        .iter()
        .enumerate()
        .map(|(k, ticket)| {
            let sent_at = controller.in_flight[ticket].sent_at;
            (sent_at + seconds(prefill * (k + 1) as f64), *ticket)
        })
        .collect();
    let mut waiting_read = false;
    let mut at = 9.5;
    while at < 16.5 {
        for (chunk_at, ticket) in &chunks {
            if *chunk_at <= seconds(at) && controller.in_flight[ticket].first_chunk_at.is_none() {
                controller.on_first_chunk(*chunk_at, *ticket);
            }
        }
        let last = controller.in_flight[&burst[3]].sent_at;
        if seconds(at) > last + controller.first_chunks.waiting_after(1000).unwrap() {
            // The last of the burst is past the threshold, no first chunk yet.
            waiting_read |= controller.in_flight[&burst[3]].first_chunk_at.is_none();
            assert_eq!(controller.first_chunk_reading(seconds(at)).waiting, 0);
        }
        try_send(&mut controller, seconds(at));
        assert_eq!(controller.status().server_slots, None, "at {at} s");
        assert!(controller.delay.limit() >= 8, "at {at} s");
        at += 0.5;
    }
    assert!(
        waiting_read,
        "the last of the burst went past the threshold"
    );
    assert_eq!(controller.delay.limit(), 16);
}

#[test]
fn a_queue_behind_busy_slots_is_still_found_when_first_chunks_stop() {
    // Four slots; the start's four run long answers; the level doubles to eight and the four
    // sent then wait in the server's queue: no first chunk comes any more. With no end of
    // ours, the server has stopped taking requests in once none streamed for the threshold;
    // with one, the request that took its slot streams and the rest wait behind. Either way
    // they are waiting at two readings, and the level is held at the four slots.
    for with_an_end in [false, true] {
        let mut controller = controller();
        let start = streamed_start(&mut controller, 5);
        let doubled = send_over(&mut controller, 1.0, 2.0);
        assert_eq!(doubled.len(), 4);
        assert_eq!(controller.delay.limit(), 8);
        if with_an_end {
            finish(
                &mut controller,
                seconds(2.5),
                start[1],
                completed(10),
                RateLimitInfo::default(),
            );
            controller.on_first_chunk(seconds(2.8), doubled[0]);
        }
        let reading = controller.first_chunk_reading(seconds(3.0));
        let expected = if with_an_end { 3 } else { 4 };
        assert_eq!(reading.waiting, expected, "with an end: {with_an_end}");
        for at in [3.0, 4.0, 5.0] {
            try_send(&mut controller, seconds(at));
        }
        assert_eq!(controller.delay.limit(), 4, "with an end: {with_an_end}");
        assert_eq!(controller.status().server_slots, Some(4));
    }
}

#[test]
fn the_servers_gauges_take_precedence_over_first_chunks() {
    // The first chunks that hold the level at two on their own (the test above) are not
    // read once the server has shown its gauges: they count everyone's requests.
    let mut controller = controller();
    let tickets = streamed_start(&mut controller, 2);
    gauges(&mut controller, seconds(1.0), 2, 3);
    controller.on_first_chunk(seconds(1.3), tickets[2]);
    for at in [2.0, 3.0, 4.0] {
        try_send(&mut controller, seconds(at));
    }
    assert_eq!(controller.delay.limit(), 4);
    assert_eq!(controller.status().server_slots, None);
}
