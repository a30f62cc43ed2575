//! The dry run for people: a few lines on stdout.

use super::Estimate;

impl Estimate {
    pub fn human(&self) -> String {
        let mut out = format!(
            "dry run of {} on {}: nothing sent, nothing written\n  pending items: {}\n  requests: {} ({} items per \
             request, {})\n  input tokens: {} (rendered prompts)\n  output tokens: {} ({:.1} per item, {})\n",
            self.job,
            self.model,
            self.pending_items,
            self.requests,
            self.items_per_request,
            if self.calibrated {
                "as the latest trial or run sent them"
            } else {
                "the controller's start; it may grow, which saves input tokens"
            },
            self.input_tokens,
            self.output_tokens,
            self.output_tokens_per_item,
            if self.calibrated { "measured on the latest trial or run" } else { "model.expected_output_tokens_per_item + JSON" },
        );
        match (&self.cost_range_usd, self.batch_cost_usd) {
            (Some([low, high]), batch) => out.push_str(&format!(
                "  estimated cost: not measured yet: between ${low:.4} and ${high:.4}{} (answers from empty to \
                 model.max_output_tokens_per_item); ${:.4} sync{} if they take model.expected_output_tokens_per_item. \
                 `backfill trial JOB` measures them on a sample\n",
                if self.mode == "batch" { " at batch prices" } else { "" },
                self.sync_cost_usd,
                batch.map(|b| format!(" | ${b:.4} batch API")).unwrap_or_default(),
            )),
            (None, Some(batch)) => out.push_str(&format!(
                "  estimated cost: ${:.4} sync | ${:.4} batch API{}\n",
                self.sync_cost_usd,
                batch,
                if self.mode == "batch" { " (the job uses batch)" } else { "" }
            )),
            (None, None) => out.push_str(&format!("  estimated cost: ${:.4}\n", self.estimated_cost_usd)),
        }
        if let Some(c) = &self.calibration {
            out.push_str(&format!(
                "  calibrated on {} {}: {:.1} output tokens per item, {:.1} items per request{}\n",
                c.source,
                c.run_id,
                c.output_tokens_per_item,
                c.items_per_request,
                c.items_per_second.map(|r| format!(", {r:.2} items/s")).unwrap_or_default(),
            ));
        }
        out.push_str(&format!("  prices: {}\n", self.prices));
        if let Some(cap) = self.budget_usd {
            let cap_text = crate::pricing::format_usd_cap(cap);
            if self.over_budget {
                out.push_str(&format!(
                    "  warning: the estimate ${:.4} is over the budget cap {cap_text}: the run will stop at the cap (exit 3); \
                     raise --max-usd or [budget] max_usd, or --limit the run\n",
                    self.estimated_cost_usd
                ));
            } else if self.may_pass_budget {
                out.push_str(&format!(
                    "  warning: the budget cap {cap_text} is inside the range: the run may stop at the cap (exit 3)\n"
                ));
            } else {
                out.push_str(&format!("  budget cap: {cap_text} (the estimate is within it)\n"));
            }
        }
        let mut duration = Vec::new();
        if let (Some(s), Some(by)) = (self.estimated_seconds, &self.limited_by) {
            duration.push(if by.starts_with("announced") {
                format!("at least {} by the {} the provider announced", humanize(s), by.trim_start_matches("announced_").replace('_', " "))
            } else {
                format!("at least {} by limits.{by}", humanize(s))
            });
        }
        if let (Some(s), Some(c)) = (self.measured_seconds, &self.calibration) {
            duration.push(format!("about {} at the pace {} {} measured", humanize(s), c.source, c.run_id));
        }
        if duration.is_empty() {
            duration.push(
                "unknown (no limits.requests_per_minute or tokens_per_minute in the job, and no earlier run or trial \
                 measured a pace)"
                    .into(),
            );
        }
        out.push_str(&format!("  duration: {}", duration.join("; ")));
        out
    }
}

pub fn humanize(seconds: f64) -> String {
    if seconds < 90.0 {
        format!("{seconds:.0}s")
    } else if seconds < 5400.0 {
        format!("{:.0} min", seconds / 60.0)
    } else {
        format!("{:.1} h", seconds / 3600.0)
    }
}
