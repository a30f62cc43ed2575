//! What the dry run learns from the ledger: the latest trial or run of the same job and model
//! measured output tokens per item, items per request and items per second, and the provider
//! may have announced its limits to that run's controller.

use serde::Serialize;

use crate::store::Measured;

/// What the latest trial or run of the job measured for the model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Calibration {
    /// "trial" or "run".
    pub source: String,
    pub run_id: i64,
    /// Output tokens per answered item, JSON structure included.
    pub output_tokens_per_item: f64,
    pub items_per_request: f64,
    /// Items written per second over that run's answered calls (at that run's concurrency).
    pub items_per_second: Option<f64>,
    /// Requests and tokens per minute the provider announced to that run's controller.
    pub announced_requests_per_minute: Option<f64>,
    pub announced_tokens_per_minute: Option<f64>,
}

impl Calibration {
    /// `None` when the run answered nothing measurable.
    pub fn from_measured(measured: &Measured) -> Option<Calibration> {
        if measured.items_answered == 0 || measured.calls == 0 || measured.completion_tokens == 0 {
            return None;
        }
        let span_s = (measured.last_ended_at - measured.first_started_at) as f64 / 1000.0;
        let announced = measured
            .controller_state
            .as_deref()
            .and_then(|state| serde_json::from_str::<serde_json::Value>(state).ok())
            .map(|state| {
                let at = |i: usize| state["announced_per_minute"][i].as_f64().filter(|v| *v > 0.0);
                (at(0), at(1))
            })
            .unwrap_or((None, None));
        Some(Calibration {
            source: if measured.job.ends_with(crate::job::TRIAL_SUFFIX) { "trial" } else { "run" }.into(),
            run_id: measured.run_id,
            output_tokens_per_item: measured.completion_tokens as f64 / measured.items_answered as f64,
            items_per_request: measured.items as f64 / measured.calls as f64,
            items_per_second: (span_s > 0.0 && measured.items_ok > 0).then(|| measured.items_ok as f64 / span_s),
            announced_requests_per_minute: announced.0,
            announced_tokens_per_minute: announced.1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(job: &str) -> Measured {
        Measured {
            run_id: 4,
            job: job.into(),
            calls: 10,
            items: 95,
            items_answered: 90,
            items_ok: 80,
            completion_tokens: 9_000,
            first_started_at: 1_000,
            last_ended_at: 21_000,
            controller_state: Some(r#"{"announced_per_minute":[600.0,null,null,null]}"#.into()),
        }
    }

    #[test]
    fn a_trial_or_a_run_gives_tokens_items_per_request_pace_and_announced_limits() {
        let c = Calibration::from_measured(&measured("motions:trial")).unwrap();
        assert_eq!(c.source, "trial");
        assert_eq!(c.output_tokens_per_item, 100.0);
        assert_eq!(c.items_per_request, 9.5);
        assert_eq!(c.items_per_second, Some(4.0));
        assert_eq!((c.announced_requests_per_minute, c.announced_tokens_per_minute), (Some(600.0), None));
        assert_eq!(Calibration::from_measured(&measured("motions")).unwrap().source, "run");
        assert_eq!(Calibration::from_measured(&Measured { items_answered: 0, ..measured("m") }), None);
    }
}
