//! `failures`: the failed and rejected items of a run with why, what was tried and the answer
//! the model gave, for people (one block per item) or scripts (one JSON object, or JSON lines).

use std::io::Write;

use serde::Serialize;

use super::print_json;
use super::status::chosen_run;
use crate::time::{readable, rfc3339_ms};
use crate::exit::{Exit, usage};
use crate::job::Job;
use crate::store::{FailureRow, RunRecord};

/// How many items the text shows without `--limit`.
const TEXT_LIMIT: u64 = 20;
/// How much of an answer the text shows (characters); JSON carries it whole.
const ANSWER_CHARS: usize = 300;

/// How to print the items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    /// One JSON object: the run, the counts and every item.
    Json,
    /// One JSON line per item.
    JsonLines,
}

#[derive(Debug, Serialize)]
struct FailuresJson {
    job: String,
    run_id: i64,
    run_status: String,
    failed: u64,
    rejected: u64,
    /// Items listed here (fewer than `failed + rejected` under `--limit` or `--state`).
    shown: u64,
    items: Vec<ItemJson>,
}

#[derive(Debug, Serialize)]
struct ItemJson {
    run_id: i64,
    item_id: String,
    state: String,
    reason: Option<String>,
    error: Option<String>,
    attempts: u32,
    /// The model the item was last sent to (the call's own when an answer was stored).
    model: Option<String>,
    updated_at: String,
    /// The last answer stored for the item: `null` when none came back for it (malformed
    /// answers, errors and timeouts keep no per-item answer).
    answer: Option<AnswerJson>,
}

#[derive(Debug, Serialize)]
struct AnswerJson {
    /// written | skipped | rejected | invalid
    status: String,
    /// What the model returned for the item: its text (a job with `target.columns`: the JSON
    /// object of its output keys).
    raw: Option<String>,
    /// Post-processing changes or reasons, as stored (JSON).
    detail: Option<serde_json::Value>,
    call_id: i64,
    at: String,
}

fn item_json(job: &Job, run_id: i64, row: FailureRow) -> ItemJson {
    let tier_model = job.chat().and_then(|c| c.tiers().nth(row.tier as usize).map(str::to_owned));
    let model = row.answer.as_ref().and_then(|a| a.model.clone()).or(tier_model);
    ItemJson {
        run_id,
        item_id: row.item_id,
        state: row.state,
        reason: row.reason,
        error: row.error,
        attempts: row.attempts,
        model,
        updated_at: rfc3339_ms(row.updated_at),
        answer: row.answer.map(|a| AnswerJson {
            status: a.status,
            raw: a.raw.map(|raw| answer_text(&raw)),
            detail: a.detail.map(|d| serde_json::from_str(&d).unwrap_or(serde_json::Value::String(d))),
            call_id: a.call_id,
            at: rfc3339_ms(a.created_at),
        }),
    }
}

pub async fn failures(job: &Job, run: Option<i64>, state: Option<&str>, limit: Option<u64>, format: Format) -> anyhow::Result<Exit> {
    if let Some(state) = state
        && !matches!(state, "failed" | "rejected")
    {
        return Err(usage(format!("--state {state}: use failed or rejected")));
    }
    if limit == Some(0) {
        return Err(usage("--limit must be at least 1"));
    }
    let (store, record) = chosen_run(job, run, false).await?;
    let counts = store.item_counts(record.id).await?;
    let limit = limit.or((format == Format::Text).then_some(TEXT_LIMIT));
    let rows = store.failures(record.id, state, limit).await?;
    let items: Vec<ItemJson> = rows.into_iter().map(|row| item_json(job, record.id, row)).collect();
    match format {
        Format::Json => print_json(&FailuresJson {
            job: job.name.clone(),
            run_id: record.id,
            run_status: record.status.as_str().into(),
            failed: counts.failed,
            rejected: counts.rejected,
            shown: items.len() as u64,
            items,
        })?,
        Format::JsonLines => {
            crate::exit::json_line::disarm();
            let mut out = std::io::stdout().lock();
            for item in &items {
                match writeln!(out, "{}", serde_json::to_string(item)?) {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => break,
                    other => other?,
                }
            }
        }
        Format::Text => {
            let total = match state {
                Some("failed") => counts.failed,
                Some(_) => counts.rejected,
                None => counts.failed + counts.rejected,
            };
            println!("{}", human(job, &record, counts.failed, counts.rejected, total, &items));
        }
    }
    Ok(Exit::Finished)
}

fn human(job: &Job, run: &RunRecord, failed: u64, rejected: u64, total: u64, items: &[ItemJson]) -> String {
    let mut out = format!(
        "job {} — run {} ({}): {failed} failed, {rejected} rejected\n",
        job.name,
        run.id,
        run.status.as_str()
    );
    for item in items {
        out.push('\n');
        out.push_str(&format!(
            "item {} — {}{}, {} attempt{}{}\n",
            item.item_id,
            item.state,
            item.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
            item.attempts,
            if item.attempts == 1 { "" } else { "s" },
            item.model.as_deref().map(|m| format!(", model {m}")).unwrap_or_default(),
        ));
        if let Some(error) = &item.error {
            out.push_str(&format!("  error: {}\n", one_line(error, ANSWER_CHARS)));
        }
        match item.answer.as_ref() {
            Some(answer) => {
                let raw = answer.raw.as_deref().unwrap_or("");
                out.push_str(&format!(
                    "  answer ({}, call {}, {}, {} chars):\n",
                    answer.status,
                    answer.call_id,
                    readable(&answer.at),
                    raw.chars().count()
                ));
                for line in truncate(raw, ANSWER_CHARS).lines() {
                    out.push_str(&format!("    {line}\n"));
                }
            }
            None => out.push_str("  answer: none stored for this item\n"),
        }
        out.push_str(&format!("  last change: {}\n", readable(&item.updated_at)));
    }
    if (items.len() as u64) < total {
        out.push_str(&format!(
            "\n… {} more not shown (--limit N shows more, --json lists them all)\n",
            total - items.len() as u64
        ));
    }
    out.trim_end().to_owned()
}

/// The model's answer for the item: the text itself for a single-text target (stored as
/// `{"": text}`), else the stored JSON of its output keys.
fn answer_text(raw: &str) -> String {
    match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw) {
        Ok(map) if map.len() == 1 => match map.get("") {
            Some(serde_json::Value::String(text)) => text.clone(),
            _ => raw.to_owned(),
        },
        _ => raw.to_owned(),
    }
}

/// At most `max` characters, with "…" when cut.
fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// The text on one line, at most `max` characters.
fn one_line(text: &str, max: usize) -> String {
    truncate(&text.split_whitespace().collect::<Vec<_>>().join(" "), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_text_answer_is_shown_as_its_text() {
        assert_eq!(answer_text(r#"{"":"Uitleg"}"#), "Uitleg");
        assert_eq!(answer_text(r#"{"a":"x","b":"y"}"#), r#"{"a":"x","b":"y"}"#);
        assert_eq!(answer_text("not json"), "not json");
    }

    #[test]
    fn answers_are_cut_on_character_boundaries() {
        assert_eq!(truncate("héllo", 2), "hé…");
        assert_eq!(truncate("héllo", 5), "héllo");
        assert_eq!(one_line("a\n  b\tc", 10), "a b c");
    }
}
