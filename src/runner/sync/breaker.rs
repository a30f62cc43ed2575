//! The dispatcher's breakers, pure: from the verdicts and bills of finished calls, whether the
//! run must stop because no call will ever succeed (the provider cannot be reached, or refuses
//! every request, before any call succeeded) or because the provider's bills cannot be trusted
//! (impossible usage or cost on several answers in a row). A provider that cannot be reached is
//! an outage ridden out for `limits.outage_window_s` before the run stops.

use std::time::Duration;

use super::call::Verdict;

/// Failures seen before any call succeeded that mean no call ever will.
pub const BREAKER_THRESHOLD: u32 = 5;
/// Answers in a row whose usage or cost cannot be true: the provider's bills cannot be
/// trusted, and the run stops.
pub const DISTRUST_THRESHOLD: u32 = 3;

/// What a finished call says to the breakers.
pub struct Finished<'a> {
    pub verdict: &'a Verdict,
    /// Why its usage or cost could not be true, if so.
    pub usage_flag: Option<&'a str>,
    /// Answered (HTTP 200) and paid for, not taken from the cache: a bill that can be trusted
    /// or not.
    pub billed_answer: bool,
}

#[derive(Debug, Default)]
pub struct Breaker {
    successes: u64,
    /// When the latest request the provider answered (not from the cache) was sent, on the
    /// caller's clock.
    last_answer: Option<Duration>,
    unreachable_in_a_row: u32,
    refused_in_a_row: u32,
    distrusted_in_a_row: u32,
    /// How long the provider may stay unreachable before the run stops.
    outage_window: Duration,
    /// When the current run of unreachable calls began (on the caller's clock).
    outage_since: Option<Duration>,
    /// What the log should say now about an outage, once (taken by [`Breaker::take_notice`]).
    notice: Option<String>,
}

impl Breaker {
    pub fn new(outage_window: Duration) -> Breaker {
        Breaker { outage_window, ..Breaker::default() }
    }

    /// The provider answered a request sent to it at `sent` (not one from the cache or a
    /// replay); answers come out of order, so the latest send is kept.
    pub fn answered(&mut self, sent: Duration) {
        self.last_answer = self.last_answer.max(Some(sent));
    }

    /// Whether the provider answered a request sent after `at`: it takes new requests.
    pub fn answered_since(&self, at: Duration) -> bool {
        self.last_answer.is_some_and(|sent| sent > at)
    }

    /// A line for the log about an outage that began or ended, once.
    pub fn take_notice(&mut self) -> Option<String> {
        self.notice.take()
    }

    /// Counts one finished call at `now`; the message that stops the run when a breaker trips
    /// (`endpoint` names the provider in it).
    pub fn observe(&mut self, now: Duration, call: &Finished, endpoint: impl FnOnce() -> String) -> Option<String> {
        let mut fatal = None;
        if !matches!(call.verdict, Verdict::Unreachable(_) | Verdict::Unavailable(_)) {
            // Any answer, even a refusal, ends an outage.
            if let Some(since) = self.outage_since.take()
                && self.unreachable_in_a_row >= BREAKER_THRESHOLD
            {
                self.notice = Some(format!(
                    "the provider answers again after an outage of {:.0} s; the waiting items go out again",
                    now.saturating_sub(since).as_secs_f64()
                ));
            }
            self.unreachable_in_a_row = 0;
        }
        match call.verdict {
            Verdict::Succeeded => {
                self.successes += 1;
                self.unreachable_in_a_row = 0;
                self.refused_in_a_row = 0;
            }
            Verdict::Unreachable(why) | Verdict::Unavailable(why) => {
                self.unreachable_in_a_row += 1;
                let since = *self.outage_since.get_or_insert(now);
                let lasted = now.saturating_sub(since);
                // A 503 is an answer: the server is there but takes no requests.
                let unavailable = matches!(call.verdict, Verdict::Unavailable(_));
                if self.unreachable_in_a_row >= BREAKER_THRESHOLD && lasted >= self.outage_window {
                    fatal = Some(format!(
                        "{} {} ({why}) for {:.0} s (limits.outage_window_s = {:.0}); {}, then run again with --resume",
                        if unavailable { "no request taken by the provider at" } else { "cannot reach the provider at" },
                        endpoint(),
                        lasted.as_secs_f64(),
                        self.outage_window.as_secs_f64(),
                        if unavailable {
                            "check that the server has loaded its model and is not overloaded by other clients"
                        } else {
                            "check model.base_url (or OPENAI_BASE_URL) and that the server is running"
                        }
                    ));
                } else if self.unreachable_in_a_row == BREAKER_THRESHOLD {
                    self.notice = Some(format!(
                        "{} {} ({why}): riding out the outage for up to {:.0} s \
                         (limits.outage_window_s); the items wait, their attempts untouched",
                        if unavailable { "no request taken by the provider at" } else { "cannot reach the provider at" },
                        endpoint(),
                        self.outage_window.as_secs_f64()
                    ));
                }
            }
            Verdict::Refused(why) => {
                self.refused_in_a_row += 1;
                if self.successes == 0 && self.refused_in_a_row >= BREAKER_THRESHOLD {
                    let about_the_cap = why.contains("max_tokens") || why.contains("max_completion_tokens");
                    fatal = Some(format!(
                        "the provider refuses the requests: {why}; check model.name and \
                         model.structured_output (not every server supports every mode){}, then run again with --resume",
                        if about_the_cap { ", and model.max_tokens (the model's own cap on an answer's tokens)" } else { "" }
                    ));
                }
            }
            Verdict::Fatal(why) => fatal = Some(why.clone()),
            Verdict::Failed => {}
        }
        if let Some(flag) = call.usage_flag {
            self.distrusted_in_a_row += 1;
            if self.distrusted_in_a_row >= DISTRUST_THRESHOLD && fatal.is_none() {
                fatal = Some(format!(
                    "the provider reported impossible usage or cost on {} answers in a row (last: {flag}); \
                     its bills cannot be trusted, so the run stops (those calls are costed at their \
                     reservations, see `status`); check that model.base_url points at the provider you \
                     mean and, if it reports usage.cost, that the job's prices are not far below its own",
                    self.distrusted_in_a_row
                ));
            }
        } else if call.billed_answer {
            self.distrusted_in_a_row = 0;
        }
        fatal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(verdict: &Verdict) -> Finished<'_> {
        Finished { verdict, usage_flag: None, billed_answer: matches!(verdict, Verdict::Succeeded) }
    }

    #[test]
    fn an_unreachable_provider_trips_after_the_window_and_any_answer_ends_the_streak() {
        let mut breaker = Breaker::new(Duration::ZERO);
        let down = Verdict::Unreachable("connection refused".into());
        for _ in 1..BREAKER_THRESHOLD {
            assert_eq!(breaker.observe(Duration::ZERO, &finished(&down), || "http://x/v1".to_string()), None);
        }
        let stop = breaker.observe(Duration::ZERO, &finished(&down), || "http://x/v1".to_string()).expect("trips");
        assert!(stop.contains("cannot reach the provider at http://x/v1"), "{stop}");

        let mut breaker = Breaker::new(Duration::ZERO);
        breaker.observe(Duration::ZERO, &finished(&Verdict::Succeeded), || "e".to_string());
        for _ in 0..3 * BREAKER_THRESHOLD {
            assert_eq!(breaker.observe(Duration::ZERO, &finished(&down), || "e".to_string()), None);
            assert_eq!(breaker.observe(Duration::ZERO, &finished(&Verdict::Refused("400".into())), || "e".to_string()), None);
        }
    }

    #[test]
    fn an_outage_is_ridden_out_for_its_window_and_its_end_is_told() {
        let mut breaker = Breaker::new(Duration::from_secs(60));
        let down = Verdict::Unreachable("connection refused".into());
        let at = |s: u64| Duration::from_secs(s);
        for s in 0..BREAKER_THRESHOLD as u64 {
            assert_eq!(breaker.observe(at(s * 10), &finished(&down), || "http://x/v1".to_string()), None);
        }
        assert!(breaker.take_notice().is_some_and(|n| n.contains("riding out the outage for up to 60 s")));
        assert_eq!(breaker.observe(at(59), &finished(&down), || "e".to_string()), None);
        // Back before the window ran out: the run goes on, and the log says so.
        assert_eq!(breaker.observe(at(61), &finished(&Verdict::Succeeded), || "e".to_string()), None);
        assert!(breaker.take_notice().is_some_and(|n| n.contains("answers again after an outage of 61 s")));
        // A second outage that outlasts the window stops the run, naming it.
        for s in 100..100 + BREAKER_THRESHOLD as u64 {
            assert_eq!(breaker.observe(at(s), &finished(&down), || "e".to_string()), None);
        }
        let stop = breaker.observe(at(161), &finished(&down), || "http://x/v1".to_string()).expect("trips");
        assert!(stop.contains("cannot reach the provider at http://x/v1") && stop.contains("for 61 s"), "{stop}");
    }

    #[test]
    fn distrusted_bills_trip_when_in_a_row_and_a_trusted_one_resets_the_count() {
        let mut breaker = Breaker::new(Duration::ZERO);
        let ok = Verdict::Succeeded;
        let flagged = Finished { verdict: &ok, usage_flag: Some("usage beyond the request"), billed_answer: true };
        for _ in 1..DISTRUST_THRESHOLD {
            assert_eq!(breaker.observe(Duration::ZERO, &flagged, || "e".to_string()), None);
        }
        assert_eq!(breaker.observe(Duration::ZERO, &finished(&ok), || "e".to_string()), None);
        for _ in 1..DISTRUST_THRESHOLD {
            assert_eq!(breaker.observe(Duration::ZERO, &flagged, || "e".to_string()), None);
        }
        // A cached answer is no bill: it does not reset the count.
        assert_eq!(breaker.observe(Duration::ZERO, &Finished { verdict: &ok, usage_flag: None, billed_answer: false }, || "e".to_string()), None);
        let stop = breaker.observe(Duration::ZERO, &flagged, || "e".to_string()).expect("trips");
        assert!(stop.contains("3 answers in a row"), "{stop}");
    }

    #[test]
    fn the_latest_send_the_provider_answered_is_kept_though_answers_come_out_of_order() {
        let mut breaker = Breaker::new(Duration::ZERO);
        let at = |s: u64| Duration::from_secs(s);
        assert!(!breaker.answered_since(at(0)));
        breaker.answered(at(10));
        // An older request answered later: the server has taken none newer.
        breaker.answered(at(5));
        assert!(breaker.answered_since(at(7)) && !breaker.answered_since(at(10)));
    }

    #[test]
    fn a_fatal_verdict_stops_at_once() {
        let mut breaker = Breaker::new(Duration::ZERO);
        assert_eq!(breaker.observe(Duration::ZERO, &finished(&Verdict::Fatal("401".into())), || "e".to_string()), Some("401".into()));
    }
}
