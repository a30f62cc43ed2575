//! The post-processing pipeline: the rules of one job, compiled, applied to each output.
//!
//! Order: character normalisation, script, strip, typos, replacements, layout normalisation,
//! then the checks that may reject (empty, foreign words, length). [`Postprocessor::process`]
//! does no I/O and allocates only when a rule changes something.

use std::borrow::Cow;

use crate::language_check::LanguageCheck;
use crate::normalize::{normalize_characters, normalize_layout};
use crate::outcome::{Change, ForeignWord, Outcome, RejectReason, Rejection};
use crate::script_filter::ScriptFilter;
use crate::strip::StripRule;
use crate::word_map::WordMap;

/// The compiled `[postprocess]` rules of one job. Build it once with
/// [`Postprocessor::from_config`]; it is `Send + Sync` and [`Postprocessor::process`] is pure.
pub struct Postprocessor {
    pub(crate) normalize: bool,
    pub(crate) script: Option<(Vec<String>, ScriptFilter)>,
    pub(crate) strip: StripRule,
    pub(crate) typos: WordMap,
    pub(crate) replacements: WordMap,
    pub(crate) language: Option<LanguageRule>,
    pub(crate) min_chars: Option<usize>,
    pub(crate) max_chars: Option<usize>,
}

/// The language check with its limit.
pub(crate) struct LanguageRule {
    pub(crate) language: String,
    pub(crate) foreign_languages: Vec<String>,
    pub(crate) check: LanguageCheck,
    pub(crate) max_foreign_words: usize,
}

impl std::fmt::Debug for Postprocessor {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Postprocessor")
            .field("normalize", &self.normalize)
            .field("script", &self.script.as_ref().map(|(names, _)| names))
            .field("strip", &self.strip)
            .field("typos", &self.typos.len())
            .field("replacements", &self.replacements.len())
            .field(
                "language",
                &self.language.as_ref().map(|rule| &rule.language),
            )
            .field("min_chars", &self.min_chars)
            .field("max_chars", &self.max_chars)
            .finish()
    }
}

impl Postprocessor {
    /// Runs every rule on one output.
    pub fn process(&self, text: &str) -> Outcome {
        let mut changes: Vec<Change> = Vec::new();
        let mut current: Cow<str> = Cow::Borrowed(text);
        if self.normalize
            && let Some(next) = normalize_characters(&current, &mut changes)
        {
            current = Cow::Owned(next);
        }
        if let Some((_, filter)) = &self.script
            && let Some(next) = filter.apply(&current, &mut changes)
        {
            current = Cow::Owned(next);
        }
        if let Some(next) = self.strip.apply(&current, &mut changes) {
            current = Cow::Owned(next);
        }
        let mut replaced = Vec::new();
        if let Some(next) = self.typos.apply(&current, &mut replaced) {
            current = Cow::Owned(next);
        }
        changes.extend(
            replaced
                .drain(..)
                .map(|(from, to)| Change::Typo { from, to }),
        );
        if let Some(next) = self.replacements.apply(&current, &mut replaced) {
            current = Cow::Owned(next);
        }
        changes.extend(
            replaced
                .drain(..)
                .map(|(from, to)| Change::Replacement { from, to }),
        );
        if self.normalize
            && let Some(next) = normalize_layout(&current, &mut changes)
        {
            current = Cow::Owned(next);
        }
        let foreign_words = match &self.language {
            Some(rule) => rule.check.find_foreign_words(&current),
            None => Vec::new(),
        };
        let rejections = self.rejections(text, &current, &changes, &foreign_words);
        Outcome {
            text: current.into_owned(),
            changes,
            foreign_words,
            rejections,
        }
    }

    fn rejections(
        &self,
        input: &str,
        text: &str,
        changes: &[Change],
        foreign_words: &[ForeignWord],
    ) -> Vec<Rejection> {
        let mut rejections = Vec::new();
        if text.trim().is_empty() {
            rejections.push(Rejection {
                reason: RejectReason::Empty,
                detail: empty_detail(input, changes),
            });
            return rejections;
        }
        if let Some(rule) = &self.language
            && foreign_words.len() > rule.max_foreign_words
        {
            let mut listed: Vec<&str> = Vec::new();
            for found in foreign_words {
                if !listed.contains(&found.word.as_str()) && listed.len() < 10 {
                    listed.push(&found.word);
                }
            }
            rejections.push(Rejection {
                reason: RejectReason::ForeignWords,
                detail: format!(
                    "{} words not in the {} lexicon ({}), max_foreign_words is {}",
                    foreign_words.len(),
                    rule.language,
                    listed.join(", "),
                    rule.max_foreign_words
                ),
            });
        }
        let length = text.chars().count();
        if let Some(min_chars) = self.min_chars
            && length < min_chars
        {
            rejections.push(Rejection {
                reason: RejectReason::TooShort,
                detail: format!("{length} characters, min_chars is {min_chars}"),
            });
        }
        if let Some(max_chars) = self.max_chars
            && length > max_chars
        {
            rejections.push(Rejection {
                reason: RejectReason::TooLong,
                detail: format!("{length} characters, max_chars is {max_chars}"),
            });
        }
        rejections
    }
}

/// Why nothing is left: a blank output, or the rules that removed everything.
fn empty_detail(input: &str, changes: &[Change]) -> String {
    if input.trim().is_empty() {
        return "the output is blank".to_string();
    }
    let mut scripts: Vec<&str> = Vec::new();
    let mut dropped = 0usize;
    for change in changes {
        if let Change::ScriptDroppedLine { script, .. } = change {
            dropped += 1;
            if !scripts.contains(&script.as_str()) {
                scripts.push(script);
            }
        }
    }
    if dropped > 0 {
        format!(
            "nothing is left after the script rule dropped {dropped} line(s) written in {}",
            scripts.join(", ")
        )
    } else {
        "nothing is left after stripping and clean-up".to_string()
    }
}
