//! Errors from building a [`crate::Postprocessor`] out of a `[postprocess]` table.
//!
//! Every message names the job-file key at fault and says how to fix it, because the runner
//! prints it as a usage error (exit code 2).

use std::path::PathBuf;

use thiserror::Error;

/// Why a `[postprocess]` table could not be turned into a post-processor.
#[derive(Debug, Error)]
pub enum BuildError {
    #[error(
        "[postprocess] {key}: cannot read {path}: {source}; fix the path (it is relative to the job file's directory)"
    )]
    UnreadableFile {
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("[postprocess] {key}: {path} line {line}: {problem}")]
    BadDictionaryLine {
        key: String,
        path: PathBuf,
        line: usize,
        problem: String,
    },

    #[error(
        "[postprocess] strip: pattern {pattern:?} is not a valid regular expression: {message}; write it in Rust regex syntax, e.g. '\\(\\d+-\\d+\\)'"
    )]
    BadStripPattern { pattern: String, message: String },

    #[error(
        "[postprocess] script: {name:?} is not a Unicode script name; use a name such as \"Latin\", \"Cyrillic\", \"Greek\", \"Arabic\" or \"Han\""
    )]
    UnknownScript { name: String },

    #[error(
        "[postprocess] {key} = {value}: must be between 0.0 and 1.0 (the share of a line's letters outside the expected script)"
    )]
    ShareOutOfRange { key: String, value: f64 },

    #[error(
        "[postprocess] min_chars = {min_chars} is larger than max_chars = {max_chars}; every output would be rejected"
    )]
    LengthBoundsCrossed { min_chars: usize, max_chars: usize },

    #[error(
        "[postprocess] {key}: no lexicon for language {language:?}; looked for {tried}. Set lexicon_dir (or BACKFILL_LEXICON_DIR) to the directory holding {language}.txt, or name the file under [postprocess.lexicons]"
    )]
    LexiconNotFound {
        key: String,
        language: String,
        tried: String,
    },

    #[error(
        "[postprocess] foreign_languages: {language:?} is also the expected language; remove it from the list"
    )]
    ForeignIsExpected { language: String },

    #[error(
        "[postprocess] {key} is set but language is not; set language = \"nl\" (or the output's language) to enable the language check"
    )]
    NeedsLanguage { key: String },
}
