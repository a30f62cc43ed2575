//! The dry run for people: a few lines on stderr.

use super::Estimate;

impl Estimate {
    pub fn human(&self) -> String {
        let mut out = format!(
            "dry run of {} on {}: nothing sent, nothing written\n  pending items: {}\n  requests: {} ({} items per \
             request, the controller's start; it may grow, which saves input tokens)\n  input tokens: {} (rendered \
             prompts)\n  output tokens: {} ({:.1} per item, {})\n",
            self.job,
            self.model,
            self.pending_items,
            self.requests,
            self.items_per_request,
            self.input_tokens,
            self.output_tokens,
            self.output_tokens_per_item,
            if self.calibrated { "measured on earlier runs" } else { "model.expected_output_tokens_per_item + JSON" },
        );
        match self.batch_cost_usd {
            Some(batch) => out.push_str(&format!(
                "  estimated cost: ${:.4} sync | ${:.4} batch API{}\n",
                self.sync_cost_usd,
                batch,
                if self.mode == "batch" { " (the job uses batch)" } else { "" }
            )),
            None => out.push_str(&format!("  estimated cost: ${:.4}\n", self.estimated_cost_usd)),
        }
        out.push_str(&format!("  prices: {}\n", self.prices));
        let duration = match (self.estimated_seconds, &self.limited_by) {
            (Some(s), Some(by)) => format!("at least {} by limits.{by}", humanize(s)),
            _ => "unknown (no limits.requests_per_minute or tokens_per_minute in the job)".into(),
        };
        out.push_str(&format!("  duration: {duration}"));
        out
    }
}

pub(super) fn humanize(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{seconds:.0}s")
    } else if seconds < 5400.0 {
        format!("{:.0} min", seconds / 60.0)
    } else {
        format!("{:.1} h", seconds / 3600.0)
    }
}
