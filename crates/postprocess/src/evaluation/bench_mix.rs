//! A realistic set of outputs for the benchmark: real Dutch outputs, a fifth each with a line
//! in another script, English words, a metadata fragment, or a typo, and a fifth left clean;
//! plus the typo dictionary and strip patterns a job would configure for them.

use super::corpus::Corpus;
use super::language_eval::{english_pool, inject};
use super::random::SeededRandom;
use super::script_eval::FOREIGN_SCRIPT_LANGUAGES;
use super::typo_eval::{dictionary_text, generate_typos};

/// Outputs to process, and the typo dictionary (`wrong<TAB>right` text) they need.
#[derive(Debug, Clone)]
pub struct BenchmarkSet {
    pub outputs: Vec<String>,
    pub typo_dictionary: String,
}

/// `count` outputs mixed from `corpus` (seeded: the same every run).
pub fn benchmark_set(corpus: &Corpus, count: usize) -> BenchmarkSet {
    let mut random = SeededRandom::new(0xBE_4C4);
    let texts = corpus.clean_dutch_texts();
    let typos = generate_typos(&texts, corpus, &mut random);
    let pool = english_pool(corpus);
    let foreign_lines: Vec<&str> = FOREIGN_SCRIPT_LANGUAGES
        .iter()
        .flat_map(|language| {
            corpus
                .sentences
                .get(*language)
                .map(Vec::as_slice)
                .unwrap_or_default()
        })
        .map(String::as_str)
        .collect();
    let fragments: Vec<String> = corpus
        .motion_titles
        .iter()
        .filter_map(|title| {
            let start = title.find('(')?;
            let end = title[start..].find(')')? + start + 1;
            title[start..end]
                .contains(|character: char| character.is_ascii_digit())
                .then(|| title[start..end].to_string())
        })
        .collect();

    let mut outputs = Vec::with_capacity(count);
    for _ in 0..count {
        let base = *random.pick(&texts);
        let output = match random.below(5) {
            0 if !foreign_lines.is_empty() => format!("{base}\n{}", random.pick(&foreign_lines)),
            1 if !pool.is_empty() => {
                let wanted = 1 + random.below(3);
                inject(base, wanted, &pool, &[], &mut random).0
            }
            2 if !fragments.is_empty() => match base.find(". ") {
                Some(at) => format!("{} {}{}", &base[..at], random.pick(&fragments), &base[at..]),
                None => format!("{base} {}", random.pick(&fragments)),
            },
            3 if !typos.is_empty() => {
                let typo = random.pick(&typos);
                let original = texts[typo.text_index];
                format!(
                    "{}{}{}",
                    &original[..typo.start],
                    typo.wrong,
                    &original[typo.end..]
                )
            }
            _ => base.to_string(),
        };
        outputs.push(output);
    }
    BenchmarkSet {
        outputs,
        typo_dictionary: dictionary_text(&typos),
    }
}
