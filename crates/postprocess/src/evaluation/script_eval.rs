//! The script rule measured on real sentences: lines in 12 non-Latin languages mixed into
//! Dutch outputs must go; clean Dutch lines, and Latin-script lines of other languages, must
//! stay untouched; short foreign-script fragments inside Dutch lines must be cut out exactly.

use std::collections::BTreeSet;
use std::path::Path;

use super::corpus::{Corpus, EvaluationError};
use super::random::SeededRandom;
use super::{build, share};
use crate::{Change, PostprocessConfig, ScriptSetting};

/// The non-Latin languages whose sentences are injected as whole lines.
pub const FOREIGN_SCRIPT_LANGUAGES: [&str; 12] = [
    "ar", "zh", "ru", "fa", "he", "ja", "ko", "uk", "bg", "el", "hi", "th",
];
/// Latin-script languages whose sentences must pass untouched.
const LATIN_LANGUAGES: [&str; 10] = ["en", "de", "fr", "es", "it", "pt", "pl", "tr", "sv", "da"];

/// Results of the script scenario.
#[derive(Debug, Clone, Default)]
pub struct ScriptScore {
    /// Per language: (code, lines injected, lines dropped, lines dropped or fully cut).
    pub by_language: Vec<(String, usize, usize, usize)>,
    pub injected: usize,
    pub dropped: usize,
    pub handled: usize,
    /// Clean Dutch lines in the mixes, and how many the rule touched.
    pub mixed_clean_lines: usize,
    pub mixed_clean_touched: usize,
    /// Every distinct clean Dutch line of the corpus on its own, per source:
    /// (source, lines, lines touched, lines dropped).
    pub clean_by_source: Vec<(&'static str, usize, usize, usize)>,
    pub corpus_touched_examples: Vec<String>,
    /// Sentences of Latin-script languages other than Dutch.
    pub latin_other_lines: usize,
    pub latin_other_touched: usize,
    /// Short foreign-script fragments inserted inside Dutch lines.
    pub fragments_injected: usize,
    pub fragments_cut_exactly: usize,
    pub fragment_failures: Vec<String>,
}

impl ScriptScore {
    pub fn dropped_share(&self) -> f64 {
        share(self.dropped, self.injected)
    }

    /// Distinct clean Dutch lines of every source: (lines, touched, dropped).
    pub fn clean_totals(&self) -> (usize, usize, usize) {
        self.clean_by_source
            .iter()
            .fold((0, 0, 0), |(lines, touched, dropped), source| {
                (lines + source.1, touched + source.2, dropped + source.3)
            })
    }

    /// Share of distinct clean Dutch lines the rule touched (dropped or cut).
    pub fn clean_touched_share(&self) -> f64 {
        let (lines, touched, _) = self.clean_totals();
        share(touched, lines)
    }
}

pub fn evaluate(corpus: &Corpus, lexicon_dir: &Path) -> Result<ScriptScore, EvaluationError> {
    let config = PostprocessConfig {
        script: Some(ScriptSetting::One("Latin".into())),
        normalize: false,
        ..PostprocessConfig::default()
    };
    let processor = build("script", &config, lexicon_dir)?;
    let mut random = SeededRandom::new(0x005C_2197);
    let dutch_lines: Vec<&str> = corpus
        .clean_dutch_texts()
        .into_iter()
        .flat_map(str::lines)
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let mut score = ScriptScore::default();

    for language in FOREIGN_SCRIPT_LANGUAGES {
        let sentences = corpus
            .sentences
            .get(language)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let (mut dropped, mut handled) = (0, 0);
        for sentence in sentences {
            let position = random.below(3);
            let mut lines: Vec<&str> = vec![*random.pick(&dutch_lines), *random.pick(&dutch_lines)];
            lines.insert(position, sentence.trim());
            let outcome = processor.process(&lines.join("\n"));
            let (dropped_lines, cut_lines) = touched_lines(&outcome.changes);
            for line_number in 1..=3 {
                let touched =
                    dropped_lines.contains(&line_number) || cut_lines.contains(&line_number);
                if line_number == position + 1 {
                    dropped += usize::from(dropped_lines.contains(&line_number));
                    handled += usize::from(touched);
                } else {
                    score.mixed_clean_lines += 1;
                    score.mixed_clean_touched += usize::from(touched);
                }
            }
        }
        score.injected += sentences.len();
        score.dropped += dropped;
        score.handled += handled;
        score
            .by_language
            .push((language.to_string(), sentences.len(), dropped, handled));
    }

    let dutch_sentences = corpus
        .sentences
        .get("nl")
        .map(Vec::as_slice)
        .unwrap_or_default();
    let sources: [(&'static str, &[String]); 3] = [
        ("langid Dutch sentences", dutch_sentences),
        ("Dutch LLM outputs", &corpus.dutch_llm_outputs),
        ("motion text lines", &corpus.motion_lines),
    ];
    for (source, texts) in sources {
        let mut seen = std::collections::HashSet::new();
        let (mut lines, mut touched, mut dropped) = (0, 0, 0);
        for line in texts.iter().flat_map(|text| text.lines()).map(str::trim) {
            if line.is_empty() || !seen.insert(line) {
                continue;
            }
            lines += 1;
            let outcome = processor.process(line);
            if !outcome.changes.is_empty() {
                touched += 1;
                dropped += usize::from(touched_lines(&outcome.changes).0.contains(&1));
                if score.corpus_touched_examples.len() < 8 {
                    score
                        .corpus_touched_examples
                        .push(line.chars().take(100).collect());
                }
            }
        }
        score
            .clean_by_source
            .push((source, lines, touched, dropped));
    }
    for language in LATIN_LANGUAGES {
        for sentence in corpus
            .sentences
            .get(language)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            score.latin_other_lines += 1;
            score.latin_other_touched +=
                usize::from(!processor.process(sentence).changes.is_empty());
        }
    }

    for language in ["zh", "ar", "ru"] {
        for sentence in corpus
            .sentences
            .get(language)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let Some(fragment) = leading_fragment(sentence, language) else {
                continue;
            };
            let line = random.pick(&dutch_lines);
            let spaces: Vec<usize> = line.match_indices(' ').map(|(at, _)| at).collect();
            if spaces.is_empty() {
                continue;
            }
            let at = *random.pick(&spaces);
            let mixed = format!("{} {}{}", &line[..at], fragment, &line[at..]);
            score.fragments_injected += 1;
            let outcome = processor.process(&mixed);
            if collapse_spaces(&outcome.text) == collapse_spaces(&processor.process(line).text) {
                score.fragments_cut_exactly += 1;
            } else if score.fragment_failures.len() < 6 {
                score
                    .fragment_failures
                    .push(format!("{mixed:?} -> {:?}", outcome.text));
            }
        }
    }
    Ok(score)
}

/// Line numbers dropped, and line numbers with fragments cut.
fn touched_lines(changes: &[Change]) -> (BTreeSet<usize>, BTreeSet<usize>) {
    let mut dropped = BTreeSet::new();
    let mut cut = BTreeSet::new();
    for change in changes {
        match change {
            Change::ScriptDroppedLine { line, .. } => {
                dropped.insert(*line);
            }
            Change::ScriptRemovedFragment { line, .. } => {
                cut.insert(*line);
            }
            _ => {}
        }
    }
    (dropped, cut)
}

/// A short run of letters from the start of a sentence: 2-4 Han characters for Chinese, the
/// first one or two words otherwise.
fn leading_fragment(sentence: &str, language: &str) -> Option<String> {
    if language == "zh" {
        let han: String = sentence
            .chars()
            .skip_while(|character| !character.is_alphabetic() || character.is_ascii())
            .take_while(|character| character.is_alphabetic() && !character.is_ascii())
            .take(2 + sentence.len() % 3)
            .collect();
        return (han.chars().count() >= 2).then_some(han);
    }
    let words: Vec<&str> = sentence
        .split_whitespace()
        .filter(|word| {
            word.chars()
                .all(|character| character.is_alphabetic() && !character.is_ascii())
        })
        .take(1 + sentence.len() % 2)
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

fn collapse_spaces(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}
