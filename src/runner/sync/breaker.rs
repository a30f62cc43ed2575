//! The dispatcher's breakers, pure: from the verdicts and bills of finished calls, whether the
//! run must stop because no call will ever succeed (the provider cannot be reached, or refuses
//! every request, before any call succeeded) or because the provider's bills cannot be trusted
//! (impossible usage or cost on several answers in a row).

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
    unreachable_in_a_row: u32,
    refused_in_a_row: u32,
    distrusted_in_a_row: u32,
}

impl Breaker {
    /// Counts one finished call; the message that stops the run when a breaker trips
    /// (`endpoint` names the provider in it).
    pub fn observe(&mut self, call: &Finished, endpoint: impl FnOnce() -> String) -> Option<String> {
        let mut fatal = None;
        match call.verdict {
            Verdict::Succeeded => {
                self.successes += 1;
                self.unreachable_in_a_row = 0;
                self.refused_in_a_row = 0;
            }
            Verdict::Unreachable(why) => {
                self.unreachable_in_a_row += 1;
                if self.successes == 0 && self.unreachable_in_a_row >= BREAKER_THRESHOLD {
                    fatal = Some(format!(
                        "cannot reach the provider at {} ({why}); check model.base_url (or OPENAI_BASE_URL) \
                         and that the server is running, then run again with --resume",
                        endpoint()
                    ));
                }
            }
            Verdict::Refused(why) => {
                self.refused_in_a_row += 1;
                if self.successes == 0 && self.refused_in_a_row >= BREAKER_THRESHOLD {
                    fatal = Some(format!(
                        "the provider refuses the requests: {why}; check model.name and \
                         model.structured_output (not every server supports every mode), then run again with --resume"
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
    fn an_unreachable_provider_trips_only_before_any_success() {
        let mut breaker = Breaker::default();
        let down = Verdict::Unreachable("connection refused".into());
        for _ in 1..BREAKER_THRESHOLD {
            assert_eq!(breaker.observe(&finished(&down), || "http://x/v1".to_string()), None);
        }
        let stop = breaker.observe(&finished(&down), || "http://x/v1".to_string()).expect("trips");
        assert!(stop.contains("cannot reach the provider at http://x/v1"), "{stop}");

        let mut breaker = Breaker::default();
        breaker.observe(&finished(&Verdict::Succeeded), || "e".to_string());
        for _ in 0..3 * BREAKER_THRESHOLD {
            assert_eq!(breaker.observe(&finished(&down), || "e".to_string()), None);
            assert_eq!(breaker.observe(&finished(&Verdict::Refused("400".into())), || "e".to_string()), None);
        }
    }

    #[test]
    fn distrusted_bills_trip_when_in_a_row_and_a_trusted_one_resets_the_count() {
        let mut breaker = Breaker::default();
        let ok = Verdict::Succeeded;
        let flagged = Finished { verdict: &ok, usage_flag: Some("usage beyond the request"), billed_answer: true };
        for _ in 1..DISTRUST_THRESHOLD {
            assert_eq!(breaker.observe(&flagged, || "e".to_string()), None);
        }
        assert_eq!(breaker.observe(&finished(&ok), || "e".to_string()), None);
        for _ in 1..DISTRUST_THRESHOLD {
            assert_eq!(breaker.observe(&flagged, || "e".to_string()), None);
        }
        // A cached answer is no bill: it does not reset the count.
        assert_eq!(breaker.observe(&Finished { verdict: &ok, usage_flag: None, billed_answer: false }, || "e".to_string()), None);
        let stop = breaker.observe(&flagged, || "e".to_string()).expect("trips");
        assert!(stop.contains("3 answers in a row"), "{stop}");
    }

    #[test]
    fn a_fatal_verdict_stops_at_once() {
        let mut breaker = Breaker::default();
        assert_eq!(breaker.observe(&finished(&Verdict::Fatal("401".into())), || "e".to_string()), Some("401".into()));
    }
}
