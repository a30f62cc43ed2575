//! The trial for people: one table, a line per model, best first.

use super::{ModelReport, Trial};
use crate::dry_run::humanize;

impl Trial {
    pub fn human(&self) -> String {
        let mut out = format!(
            "trial of {} on {} sampled rows of {} pending (seed {}), {} request(s) of up to {} items per model; nothing written \
             to the target (ledger: run {} of {}{})\n",
            self.job,
            self.sampled_items,
            self.pending_items,
            self.seed,
            self.requests_per_model,
            self.items_per_request,
            self.run_id,
            self.job,
            super::TRIAL_SUFFIX,
        );
        let header = [
            "#", "model", "valid", "malformed", "missing", "rejected", "failed", "edited", "p50", "p95", "in/item", "out/item",
            "$/item", "whole set (sync)", "batch", "duration",
        ];
        let lines: Vec<Vec<String>> = self.models.iter().map(row).collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for line in &lines {
            for (w, cell) in widths.iter_mut().zip(line) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let format = |cells: &mut dyn Iterator<Item = String>| {
            let mut line = String::from(" ");
            for (cell, width) in cells.zip(&widths) {
                line.push_str(&format!(" {cell:<width$}"));
            }
            line.trim_end().to_owned() + "\n"
        };
        out.push_str(&format(&mut header.iter().map(|h| h.to_string())));
        for line in lines {
            out.push_str(&format(&mut line.into_iter()));
        }
        for model in &self.models {
            let rules: Vec<String> = model.rejected_by_rule.iter().map(|(rule, n)| format!("{rule} {n}")).collect();
            let edits: Vec<String> = model.edits_by_rule.iter().map(|(rule, n)| format!("{rule} {n}")).collect();
            if !rules.is_empty() || !edits.is_empty() {
                out.push_str(&format!(
                    "  {}: rejected by rule: {}; edits by rule: {}\n",
                    model.model,
                    if rules.is_empty() { "none".into() } else { rules.join(", ") },
                    if edits.is_empty() { "none".into() } else { edits.join(", ") },
                ));
            }
        }
        if let Some(best) = self.models.first() {
            out.push_str(&format!(
                "  best by the job's rules: {} ({} of {} answers valid); the whole set at its prices: {}\n",
                best.model,
                best.valid,
                best.items,
                cost_pair(best)
            ));
        }
        out.push_str(&format!("  spent on this trial: ${:.4}", self.spent_usd));
        if let Some(cap) = self.budget_usd {
            out.push_str(&format!(" (cap {})", crate::pricing::format_usd_cap(cap)));
        }
        if let Some(stopped) = &self.stopped {
            out.push_str(&format!("\n  stopped: {stopped}"));
        }
        out
    }
}

fn row(model: &ModelReport) -> Vec<String> {
    let seconds = |s: Option<f64>| s.map(|s| format!("{s:.2}s")).unwrap_or_else(|| "-".into());
    let projected = &model.projected;
    let duration = match (projected.duration_by_limits_s, projected.duration_measured_s) {
        (Some(limits), _) => format!("≥{} by limits", humanize(limits)),
        (None, Some(measured)) => format!("{} at the trial's pace", humanize(measured)),
        (None, None) => "-".into(),
    };
    vec![
        model.rank.to_string(),
        model.model.clone(),
        model.valid.to_string(),
        model.malformed.to_string(),
        model.missing.to_string(),
        model.rejected.to_string(),
        model.failed.to_string(),
        model.edited.to_string(),
        seconds(model.latency_p50_s),
        seconds(model.latency_p95_s),
        format!("{:.0}", model.input_tokens_per_item),
        format!("{:.0}", model.output_tokens_per_item),
        format!("${:.6}", model.cost_per_item_usd),
        format!("${:.4}", projected.sync_cost_usd),
        projected.batch_cost_usd.map(|b| format!("${b:.4}")).unwrap_or_else(|| "-".into()),
        duration,
    ]
}

fn cost_pair(model: &ModelReport) -> String {
    match model.projected.batch_cost_usd {
        Some(batch) => format!("${:.4} sync | ${batch:.4} batch API", model.projected.sync_cost_usd),
        None => format!("${:.4}", model.projected.sync_cost_usd),
    }
}
