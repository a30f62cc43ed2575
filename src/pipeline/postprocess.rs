//! Post-processing of outputs, configured by the job's `[postprocess]` table: the rules live
//! in `backfill-postprocess`; this module adapts them to the runner's [`OutputCheck`].

use std::sync::Arc;

use backfill_postprocess::Postprocessor;

use crate::exit::usage;
use crate::job::Job;

/// Checks (and may rewrite) one output text; `Err((reason, detail))` rejects it.
pub trait OutputCheck: Send + Sync {
    fn check(&self, text: &str) -> Result<(String, Option<serde_json::Value>), (String, String)>;
}

/// The job's post-processor, if it has a `[postprocess]` table. Errors (a missing typo file,
/// a bad regex) are usage errors naming the key.
pub fn build(job: &Job) -> anyhow::Result<Option<Arc<Postprocessor>>> {
    match &job.postprocess {
        None => Ok(None),
        Some(config) => Postprocessor::from_config(config, &job.dir)
            .map(|p| Some(Arc::new(p)))
            .map_err(|e| usage(format!("`postprocess`: {e}"))),
    }
}

impl OutputCheck for Postprocessor {
    fn check(&self, text: &str) -> Result<(String, Option<serde_json::Value>), (String, String)> {
        let outcome = self.process(text);
        if outcome.is_accepted() {
            let audit = (!outcome.changes.is_empty() || !outcome.foreign_words.is_empty())
                .then(|| serde_json::json!({ "changes": outcome.changes, "foreign_words": outcome.foreign_words }));
            Ok((outcome.text, audit))
        } else {
            Err((outcome.reason_codes().join(","), outcome.rejection_summary()))
        }
    }
}
