//! Post-processing of model outputs for `backfill`: the `[postprocess]` stage of a job.
//!
//! Models writing in one language now and then slip: a line in Arabic or Chinese script inside
//! Dutch text, an English word ("filthy"), a known typo ("lageinkomen"), a metadata fragment
//! copied from a title ("(45-102)"). A [`Postprocessor`] built from a job's
//! [`PostprocessConfig`] repairs what it can and rejects what it cannot:
//!
//! 1. **normalize** (characters): line endings, invisible characters, special spaces;
//! 2. **script**: drop lines mostly in another script, cut shorter runs out of kept lines;
//! 3. **strip**: remove matches of the job's regular expressions;
//! 4. **typos**: whole-word `wrong<TAB>right` dictionary, case preserved;
//! 5. **replacements**: the same for known foreign words;
//! 6. **normalize** (layout): spaces, punctuation, empty brackets, blank lines;
//! 7. checks: `empty`, `foreign_words` (lexicon-based language check), `too_short`, `too_long`.
//!
//! [`Postprocessor::process`] is pure and fast; its [`Outcome`] holds the final text, every
//! change with the rule that made it, the foreign words found and the rejection reasons, and
//! serialises to JSON for audit. [`Postprocessor::explain`] renders the same as text.
//!
//! ```
//! use backfill_postprocess::{PostprocessConfig, Postprocessor};
//!
//! let config: PostprocessConfig = toml::from_str(r#"
//!     script = "Latin"
//!     strip = ['\(\d+-\d+\)']
//!     min_chars = 10
//! "#).unwrap();
//! let postprocessor = Postprocessor::from_config(&config, std::path::Path::new(".")).unwrap();
//! let outcome = postprocessor.process("De motie (45-102) vraagt om actie.\n这是中文。");
//! assert_eq!(outcome.accepted_text(), Some("De motie vraagt om actie."));
//! ```

mod account;
mod build;
mod config;
mod error;
pub mod evaluation;
mod language_check;
mod lexicon;
mod normalize;
mod outcome;
mod postprocessor;
mod script_filter;
mod script_fragments;
mod strip;
mod word_map;
mod words;

pub use build::{LEXICON_DIR_ENV, default_lexicon_dir};
pub use config::{PostprocessConfig, ScriptSetting};
pub use error::BuildError;
pub use language_check::LanguageCheck;
pub use lexicon::Lexicon;
pub use outcome::{Change, ForeignWord, NormalizeAction, Outcome, RejectReason, Rejection};
pub use postprocessor::Postprocessor;
pub use word_map::{DictionaryLineError, WordMap};

#[cfg(test)]
mod tests;
