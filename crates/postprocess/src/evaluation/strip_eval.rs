//! The strip and normalisation rules measured on real data: the metadata fragments found in
//! real motion titles ("(t.v.v. 21501-20-1981)", "(36421)") and fragments shaped like the
//! issue's "(45-102)" are written into real Dutch outputs with the patterns a job would
//! configure; the output must equal the clean text put through the same rules, and clean texts
//! must not be stripped.

use std::path::Path;

use regex::Regex;

use super::corpus::{Corpus, EvaluationError};
use super::random::SeededRandom;
use super::{build, share};
use crate::{Change, PostprocessConfig};

/// The patterns the evaluation configures, as a job for the motion backfill would.
/// The second pattern is the issue's `\(\d+-\d+\)` narrowed to first numbers of 1-3 digits,
/// so year ranges such as "(1704-1759)" stay.
pub const METADATA_PATTERNS: [&str; 4] = [
    r"\s*\(t\.v\.v\.[^()]*\)",
    r"\s*\(\d{1,3}-\d{1,4}\)",
    r"\s*\((?:Kamerstuk )?\d{2} ?\d{3}(?:-[0-9A-Z]+)*(?:, nr\. \d+)?\)",
    r"\s*\(R\d{4}\)",
];

/// The bare "(digits-digits)" pattern a first design of the strip rule used, measured on its own
/// against clean texts.
pub const DESIGN_PATTERN: &str = r"\(\d+-\d+\)";

/// Results of the strip and normalisation scenarios.
#[derive(Debug, Clone, Default)]
pub struct StripScore {
    pub real_fragments: usize,
    pub synthetic_fragments: usize,
    pub injected: usize,
    pub removed_exactly: usize,
    pub missed: Vec<String>,
    pub clean_texts: usize,
    pub clean_stripped: usize,
    pub clean_stripped_examples: Vec<String>,
    /// Clean texts that [`DESIGN_PATTERN`] alone would strip.
    pub clean_stripped_by_design_pattern: usize,
    /// Clean texts the normalisation rule changed, and the actions it took (action, texts).
    pub clean_normalized: usize,
    pub normalize_actions: Vec<(String, usize)>,
}

impl StripScore {
    pub fn removed_share(&self) -> f64 {
        share(self.removed_exactly, self.injected)
    }
}

pub fn evaluate(corpus: &Corpus, lexicon_dir: &Path) -> Result<StripScore, EvaluationError> {
    let strip_config = PostprocessConfig {
        strip: METADATA_PATTERNS
            .iter()
            .map(|pattern| pattern.to_string())
            .collect(),
        ..PostprocessConfig::default()
    };
    let strip = build("strip", &strip_config, lexicon_dir)?;
    let normalize_only = build("normalize", &PostprocessConfig::default(), lexicon_dir)?;
    let design_pattern = Regex::new(DESIGN_PATTERN).expect("valid pattern");
    let texts = corpus.clean_dutch_texts();
    let mut random = SeededRandom::new(0x57_819);
    let mut score = StripScore::default();

    let fragment_pattern = Regex::new(r"\([^()]*\d[^()]*\)").expect("valid pattern");
    let mut fragments: Vec<String> = corpus
        .motion_titles
        .iter()
        .flat_map(|title| {
            fragment_pattern
                .find_iter(title)
                .map(|found| found.as_str().to_string())
        })
        .collect();
    score.real_fragments = fragments.len();
    for _ in 0..200 {
        fragments.push(format!(
            "({}-{})",
            1 + random.below(99),
            1 + random.below(999)
        ));
        score.synthetic_fragments += 1;
    }

    for fragment in &fragments {
        let base = *random.pick(&texts);
        let slots: Vec<usize> = base
            .char_indices()
            .filter(|&(at, character)| {
                !character.is_alphanumeric()
                    && base[..at]
                        .chars()
                        .next_back()
                        .is_some_and(char::is_alphabetic)
            })
            .map(|(at, _)| at)
            .collect();
        if slots.is_empty() {
            continue;
        }
        let at = *random.pick(&slots);
        let mixed = format!("{} {}{}", &base[..at], fragment, &base[at..]);
        score.injected += 1;
        if strip.process(&mixed).text == strip.process(base).text {
            score.removed_exactly += 1;
        } else if score.missed.len() < 12 {
            score.missed.push(fragment.clone());
        }
    }

    let mut actions: Vec<(String, usize)> = Vec::new();
    for text in &texts {
        score.clean_texts += 1;
        score.clean_stripped_by_design_pattern += usize::from(design_pattern.is_match(text));
        let outcome = strip.process(text);
        if outcome
            .changes
            .iter()
            .any(|change| matches!(change, Change::Strip { .. }))
        {
            score.clean_stripped += 1;
            if score.clean_stripped_examples.len() < 8 {
                let removed: Vec<String> = outcome
                    .changes
                    .iter()
                    .filter_map(|change| match change {
                        Change::Strip { removed, .. } => Some(removed.trim().to_string()),
                        _ => None,
                    })
                    .collect();
                score.clean_stripped_examples.push(removed.join(" "));
            }
        }
        let normalized = normalize_only.process(text);
        if !normalized.changes.is_empty() {
            score.clean_normalized += 1;
        }
        for change in &normalized.changes {
            if let Change::Normalize { action, .. } = change {
                let name = format!("{action:?}");
                match actions.iter_mut().find(|(known, _)| *known == name) {
                    Some((_, count)) => *count += 1,
                    None => actions.push((name, 1)),
                }
            }
        }
    }
    score.normalize_actions = actions;
    Ok(score)
}
