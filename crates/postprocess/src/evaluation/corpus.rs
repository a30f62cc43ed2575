//! Loading the real data the evaluation mixes: labelled sentences and words in 23 languages
//! (`langid/`), Dutch outputs of an earlier LLM pipeline and motion texts (`motions/`), and the
//! OpenTaal word list (`wordlists/`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why the evaluation data could not be read.
#[derive(Debug, Error)]
pub enum EvaluationError {
    #[error(
        "cannot read evaluation data {path}: {source} (expected shared/data beside the repository)"
    )]
    Unreadable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {problem}")]
    BadLine {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("post-processor for the {scenario} scenario could not be built: {source}")]
    Build {
        scenario: &'static str,
        #[source]
        source: crate::BuildError,
    },
    #[error("cannot write scratch file {path}: {source}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The real texts and words the scenarios draw from.
#[derive(Debug, Default)]
pub struct Corpus {
    /// `langid/sentences.tsv`, by language code.
    pub sentences: BTreeMap<String, Vec<String>>,
    /// `langid/word_pairs.tsv` rows of English.
    pub english_word_pairs: Vec<String>,
    /// Real Dutch LLM outputs: the summaries and implications in
    /// `motions/tk_moties_gpt3_summaries.jsonl`.
    pub dutch_llm_outputs: Vec<String>,
    /// Non-blank lines of the motion texts in `motions/tk_moties_fulltext.jsonl`.
    pub motion_lines: Vec<String>,
    /// Motion titles (455 of them hold metadata fragments).
    pub motion_titles: Vec<String>,
    /// Every word (lowercased) seen in the Dutch texts above and in `langid` Dutch rows.
    pub dutch_text_vocabulary: HashSet<String>,
    /// Every OpenTaal entry, lowercased: the reference of "is also a Dutch word".
    pub opentaal_words: HashSet<String>,
}

impl Corpus {
    /// Reads everything under `data_dir` (the `shared/data` directory).
    pub fn load(data_dir: &Path) -> Result<Corpus, EvaluationError> {
        let mut corpus = Corpus::default();
        for (lang, text) in read_tsv(&data_dir.join("langid/sentences.tsv"))? {
            corpus.sentences.entry(lang).or_default().push(text);
        }
        let mut dutch_rows = Vec::new();
        for file in ["langid/single_words.tsv", "langid/word_pairs.tsv"] {
            for (lang, text) in read_tsv(&data_dir.join(file))? {
                if lang == "nl" {
                    dutch_rows.push(text);
                } else if lang == "en" && file.ends_with("word_pairs.tsv") {
                    corpus.english_word_pairs.push(text);
                }
            }
        }
        let summaries = data_dir.join("motions/tk_moties_gpt3_summaries.jsonl");
        for record in read_jsonl(&summaries)? {
            for field in ["gpt3_summary", "gpt3_implication"] {
                if let Some(text) = record.get(field).and_then(|value| value.as_str())
                    && !text.trim().is_empty()
                {
                    corpus.dutch_llm_outputs.push(text.trim().to_string());
                }
            }
        }
        let motions = data_dir.join("motions/tk_moties_fulltext.jsonl");
        for record in read_jsonl(&motions)? {
            if let Some(title) = record.get("title").and_then(|value| value.as_str()) {
                corpus.motion_titles.push(title.to_string());
            }
            if let Some(text) = record.get("text").and_then(|value| value.as_str()) {
                corpus.motion_lines.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|line| !line.is_empty())
                        .map(str::to_string),
                );
            }
        }
        let dutch_sentences = corpus.sentences.get("nl").cloned().unwrap_or_default();
        let dutch_texts = dutch_sentences
            .iter()
            .chain(&dutch_rows)
            .chain(&corpus.dutch_llm_outputs)
            .chain(&corpus.motion_lines)
            .chain(&corpus.motion_titles);
        for text in dutch_texts {
            for word in letter_words(text) {
                corpus.dutch_text_vocabulary.insert(word.to_lowercase());
            }
        }
        let opentaal = data_dir.join("wordlists/nl_opentaal_wdutch_2.20.19.txt");
        let contents = read_to_string(&opentaal)?;
        corpus.opentaal_words = contents
            .lines()
            .map(|line| line.trim().to_lowercase())
            .collect();
        Ok(corpus)
    }

    /// The clean Dutch texts mixed with defects: `langid` Dutch sentences and the LLM outputs.
    pub fn clean_dutch_texts(&self) -> Vec<&str> {
        let sentences = self
            .sentences
            .get("nl")
            .map(Vec::as_slice)
            .unwrap_or_default();
        sentences
            .iter()
            .chain(&self.dutch_llm_outputs)
            .map(String::as_str)
            .collect()
    }
}

/// Maximal runs of letters in `text`.
pub(crate) fn letter_words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|character: char| !character.is_alphabetic())
        .filter(|word| !word.is_empty())
}

fn read_to_string(path: &Path) -> Result<String, EvaluationError> {
    std::fs::read_to_string(path).map_err(|source| EvaluationError::Unreadable {
        path: path.to_path_buf(),
        source,
    })
}

/// Rows `(first column, second column)` of a TSV file with a header line.
fn read_tsv(path: &Path) -> Result<Vec<(String, String)>, EvaluationError> {
    let contents = read_to_string(path)?;
    let mut rows = Vec::new();
    for (index, line) in contents.lines().enumerate().skip(1) {
        let mut columns = line.split('\t');
        match (columns.next(), columns.next()) {
            (Some(lang), Some(text)) => rows.push((lang.to_string(), text.to_string())),
            _ => {
                return Err(EvaluationError::BadLine {
                    path: path.to_path_buf(),
                    line: index + 1,
                    problem: "expected two tab-separated columns".into(),
                });
            }
        }
    }
    Ok(rows)
}

fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>, EvaluationError> {
    let contents = read_to_string(path)?;
    let mut records = Vec::new();
    for (index, line) in contents.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line).map_err(|error| EvaluationError::BadLine {
            path: path.to_path_buf(),
            line: index + 1,
            problem: error.to_string(),
        })?;
        records.push(record);
    }
    Ok(records)
}
