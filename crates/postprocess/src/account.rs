//! A readable account of what each rule did to one text, for `backfill check JOB < text`.

use std::fmt::Write as _;

use crate::outcome::{Change, Outcome};
use crate::postprocessor::Postprocessor;

impl Postprocessor {
    /// Processes `text` and describes, rule by rule, what changed and why the output is
    /// accepted or rejected, followed by the final text.
    pub fn explain(&self, text: &str) -> String {
        let outcome = self.process(text);
        self.render_account(text, &outcome)
    }

    /// The account of an [`Outcome`] produced from `input` by this post-processor.
    pub fn render_account(&self, input: &str, outcome: &Outcome) -> String {
        let mut out = String::new();
        let lines = if input.is_empty() {
            0
        } else {
            input.split('\n').count()
        };
        let _ = writeln!(
            out,
            "input: {} characters, {} line(s)",
            input.chars().count(),
            lines
        );

        let mut rules: Vec<(&str, String)> = Vec::new();
        if self.normalize {
            rules.push(("normalize", "normalize".to_string()));
        }
        if let Some((names, _)) = &self.script {
            rules.push(("script", format!("script ({})", names.join(", "))));
        }
        if !self.strip.is_empty() {
            rules.push(("strip", "strip".to_string()));
        }
        if !self.typos.is_empty() {
            rules.push(("typos", format!("typos ({} entries)", self.typos.len())));
        }
        if !self.replacements.is_empty() {
            rules.push((
                "replacements",
                format!("replacements ({} entries)", self.replacements.len()),
            ));
        }
        for (key, label) in &rules {
            let made: Vec<&Change> = outcome
                .changes
                .iter()
                .filter(|change| change.rule_key() == *key)
                .collect();
            if made.is_empty() {
                let _ = writeln!(out, "{label}: no change");
                continue;
            }
            for change in made {
                let _ = writeln!(out, "{label}: {}", describe(change));
            }
        }

        if let Some(rule) = &self.language {
            let found = &outcome.foreign_words;
            let words: Vec<String> = found
                .iter()
                .map(|word| format!("{:?} [{}]", word.word, word.language))
                .collect();
            let _ = writeln!(
                out,
                "language ({}, looking for {}): {} foreign word(s), max_foreign_words {}{}{}",
                rule.language,
                rule.foreign_languages.join(", "),
                found.len(),
                rule.max_foreign_words,
                if words.is_empty() { "" } else { ": " },
                words.join(", ")
            );
        }
        let bounds = match (self.min_chars, self.max_chars) {
            (None, None) => String::from("no limits"),
            (min, max) => format!(
                "min_chars {}, max_chars {}",
                min.map_or("-".to_string(), |value| value.to_string()),
                max.map_or("-".to_string(), |value| value.to_string())
            ),
        };
        let _ = writeln!(
            out,
            "length: {} characters ({bounds})",
            outcome.text.chars().count()
        );
        if outcome.is_accepted() {
            let _ = writeln!(out, "verdict: accepted");
        } else {
            let _ = writeln!(out, "verdict: rejected");
            for rejection in &outcome.rejections {
                let _ = writeln!(out, "  {}: {}", rejection.reason.code(), rejection.detail);
            }
        }
        let _ = writeln!(out, "--- text ---");
        out.push_str(&outcome.text);
        if !outcome.text.ends_with('\n') {
            out.push('\n');
        }
        out
    }
}

fn describe(change: &Change) -> String {
    match change {
        Change::ScriptDroppedLine {
            line,
            script,
            removed,
        } => {
            format!("dropped line {line} written in {script}: {removed:?}")
        }
        Change::ScriptRemovedFragment {
            line,
            script,
            removed,
        } => {
            format!("removed {removed:?} ({script}) from line {line}")
        }
        Change::Strip { pattern, removed } => format!("removed {removed:?} (pattern {pattern})"),
        Change::Typo { from, to } | Change::Replacement { from, to } => {
            format!("{from:?} -> {to:?}")
        }
        Change::Normalize { action, count } => {
            let name = serde_json::to_value(action)
                .ok()
                .and_then(|value| value.as_str().map(str::to_string))
                .unwrap_or_default();
            format!("{name} x{count}")
        }
    }
}
