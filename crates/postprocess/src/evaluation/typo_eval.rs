//! The typo dictionary measured on real Dutch outputs: typos made from the texts' own words
//! (two words run together like "lageinkomen", two letters swapped, a letter dropped) are
//! written into the texts and must be repaired to the exact original, capitalisation included;
//! texts without typos must come through unchanged.

use std::collections::HashSet;
use std::path::Path;

use super::corpus::{Corpus, EvaluationError};
use super::random::SeededRandom;
use super::{ScratchFile, build, share};
use crate::PostprocessConfig;

/// Results of the typo scenario.
#[derive(Debug, Clone, Default)]
pub struct TypoScore {
    pub entries: usize,
    pub injected: usize,
    pub repaired_exactly: usize,
    pub clean_texts: usize,
    pub clean_changed: usize,
    pub failures: Vec<String>,
}

impl TypoScore {
    pub fn exact_share(&self) -> f64 {
        share(self.repaired_exactly, self.injected)
    }
}

/// One generated typo: where it goes and what it replaces.
pub(crate) struct Typo {
    pub(crate) text_index: usize,
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) wrong: String,
    pub(crate) right: String,
}

pub fn evaluate(corpus: &Corpus, _lexicon_dir: &Path) -> Result<TypoScore, EvaluationError> {
    let texts = corpus.clean_dutch_texts();
    let mut random = SeededRandom::new(0x7E_9051);
    let typos = generate_typos(&texts, corpus, &mut random);
    let dictionary = dictionary_text(&typos);
    let file = ScratchFile::write("typos.tsv", &dictionary)?;
    let config = PostprocessConfig {
        typos: Some(file.path().to_path_buf()),
        normalize: false,
        ..PostprocessConfig::default()
    };
    let processor = build("typos", &config, Path::new("."))?;
    let mut score = TypoScore {
        entries: typos.len(),
        ..TypoScore::default()
    };

    for typo in &typos {
        let original = texts[typo.text_index];
        let mut mixed = format!(
            "{}{}{}",
            &original[..typo.start],
            typo.wrong,
            &original[typo.end..]
        );
        let mut expected = original.to_string();
        if random.chance(0.1) {
            mixed = mixed.to_uppercase();
            expected = expected.to_uppercase();
        }
        score.injected += 1;
        let outcome = processor.process(&mixed);
        if outcome.text == expected {
            score.repaired_exactly += 1;
        } else if score.failures.len() < 10 {
            score
                .failures
                .push(format!("{:?} -> {:?}", typo.wrong, typo.right));
        }
    }
    for text in &texts {
        score.clean_texts += 1;
        score.clean_changed += usize::from(processor.process(text).text != *text);
    }
    Ok(score)
}

/// The typos as a `wrong<TAB>right` dictionary, lowercase.
pub(crate) fn dictionary_text(typos: &[Typo]) -> String {
    let mut dictionary = String::from("# generated typo dictionary\n");
    for typo in typos {
        dictionary.push_str(&format!(
            "{}\t{}\n",
            typo.wrong.to_lowercase(),
            typo.right.to_lowercase()
        ));
    }
    dictionary
}

/// Up to 300 typos of each kind, made from words of the texts; a typo is kept only when its
/// wrong form is neither an OpenTaal word nor a word of any corpus text.
pub(crate) fn generate_typos(
    texts: &[&str],
    corpus: &Corpus,
    random: &mut SeededRandom,
) -> Vec<Typo> {
    let mut typos = Vec::new();
    let mut used: HashSet<String> = HashSet::new();
    for kind in 0..3 {
        let mut made = 0;
        let mut attempts = 0;
        while made < 300 && attempts < 20_000 {
            attempts += 1;
            let text_index = random.below(texts.len());
            let text = texts[text_index];
            let words: Vec<(usize, usize)> = word_spans(text);
            if words.len() < 2 {
                continue;
            }
            let pick = random.below(words.len() - 1);
            let (start, end) = words[pick];
            let word = &text[start..end];
            let candidate = match kind {
                0 => {
                    let (next_start, next_end) = words[pick + 1];
                    let next = &text[next_start..next_end];
                    let lower = |w: &str| w.chars().all(char::is_lowercase);
                    let first_ok = lower(word)
                        || lower(&word[word.chars().next().map_or(0, char::len_utf8)..]);
                    if &text[end..next_start] != " "
                        || !first_ok
                        || !lower(next)
                        || word.len() < 3
                        || next.len() < 3
                    {
                        continue;
                    }
                    Some((
                        start,
                        next_end,
                        format!("{word}{next}"),
                        format!("{word} {next}"),
                    ))
                }
                _ => {
                    let characters: Vec<char> = word.chars().collect();
                    if characters.len() < 6 || !characters.iter().all(|c| c.is_lowercase()) {
                        continue;
                    }
                    let at = 1 + random.below(characters.len() - 3);
                    let mut changed = characters.clone();
                    if kind == 1 {
                        changed.swap(at, at + 1);
                    } else {
                        changed.remove(at);
                    }
                    Some((start, end, changed.into_iter().collect(), word.to_string()))
                }
            };
            let Some((start, end, wrong, right)) = candidate else {
                continue;
            };
            let stands_alone = !text[..start]
                .chars()
                .next_back()
                .is_some_and(char::is_alphanumeric)
                && !text[end..]
                    .chars()
                    .next()
                    .is_some_and(char::is_alphanumeric);
            if !stands_alone {
                continue;
            }
            let key = wrong.to_lowercase();
            let known =
                corpus.opentaal_words.contains(&key) || corpus.dutch_text_vocabulary.contains(&key);
            if wrong == right || known || !used.insert(key) {
                continue;
            }
            typos.push(Typo {
                text_index,
                start,
                end,
                wrong,
                right,
            });
            made += 1;
        }
    }
    typos
}

/// Byte ranges of the runs of letters in `text`.
fn word_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    for (at, character) in text.char_indices() {
        match (character.is_alphabetic(), start) {
            (true, None) => start = Some(at),
            (false, Some(begun)) => {
                spans.push((begun, at));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(begun) = start {
        spans.push((begun, text.len()));
    }
    spans
}
