//! The `[postprocess]` table of a job file, exactly as the operator writes it.
//!
//! Every key is optional; an empty table (or no table) leaves outputs untouched except for the
//! invisible-character and whitespace clean-up (`normalize`). Paths are resolved relative to
//! the job file's directory when the [`crate::Postprocessor`] is built.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

/// `[postprocess]`: the rules applied to every output before it is written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostprocessConfig {
    /// Expected writing system(s) of the output, as Unicode script names: `"Latin"`, or a list
    /// such as `["Latin", "Greek"]`. Lines whose letters are mostly in other scripts are dropped;
    /// shorter runs of other scripts inside a kept line are cut out. Digits, punctuation and
    /// symbols count for no script. Unset: no script rule.
    pub script: Option<ScriptSetting>,

    /// Share of a line's letters (0.0-1.0) outside the expected script above which the whole
    /// line is dropped. Default 0.5.
    #[serde(default = "default_max_foreign_script_share")]
    pub max_foreign_script_share: f64,

    /// Cut runs of other scripts out of the lines that are kept (a Chinese word inside a Dutch
    /// sentence). Set false to keep them, e.g. when outputs quote names in their own script.
    /// Default true.
    #[serde(default = "default_true")]
    pub cut_script_fragments: bool,

    /// Language code of the expected language (`"nl"`); its lexicon (`<lexicon_dir>/nl.txt` or
    /// `nl.txt.gz`) lists the words that count as that language, loanwords included. Unset: no
    /// language check.
    pub language: Option<String>,

    /// Languages whose words are looked for, each with a lexicon `<lexicon_dir>/<code>.txt[.gz]`.
    /// A word counts as foreign when it is in one of these lexicons and not in the expected
    /// language's lexicon nor in `allow_words`. Default `["en"]` (empty when `language = "en"`).
    pub foreign_languages: Option<Vec<String>>,

    /// Outputs with more foreign words than this (every occurrence counts) are rejected with
    /// reason `foreign_words`. Foreign words at or below the limit are kept and reported.
    /// Default 2.
    #[serde(default = "default_max_foreign_words")]
    pub max_foreign_words: usize,

    /// Directory holding the lexicons, relative to the job file. Default: the directory the
    /// program passes in (`Postprocessor::from_config_with_lexicon_dir`), else the environment
    /// variable `BACKFILL_LEXICON_DIR`, else the `lexicons/` directory of the source tree the
    /// program was built from. Only read when `language` is set.
    pub lexicon_dir: Option<PathBuf>,

    /// Per-language lexicon files overriding `lexicon_dir`, e.g. `{ nl = "words/nl.txt" }`.
    /// One word per line, `#` starts a comment line, case ignored; `.gz` files are read too.
    #[serde(default)]
    pub lexicons: BTreeMap<String, PathBuf>,

    /// File of extra words (one a line) that count as the expected language: names, domain
    /// terms, loanwords the lexicon lacks.
    pub allow_words: Option<PathBuf>,

    /// File of `foreign<TAB>replacement` lines applied before foreign words are counted
    /// (`filthy<TAB>smerig`). Whole words, case preserved like `typos`.
    pub replacements: Option<PathBuf>,

    /// Typo dictionary: a file of `wrong<TAB>right` lines (`lageinkomen<TAB>laag inkomen`).
    /// Whole words only. A lowercase `wrong` matches any case and the replacement takes the
    /// case of the match (`Lageinkomen` becomes `Laag inkomen`, `LAGEINKOMEN` becomes
    /// `LAAG INKOMEN`); a `wrong` with capitals matches exactly that spelling. Blank lines and
    /// lines starting with `#` are skipped.
    pub typos: Option<PathBuf>,

    /// Regular expressions (Rust `regex` syntax) whose matches are removed, e.g.
    /// `['\(\d+-\d+\)']` for metadata such as "(45-102)" leaking from titles. The spaces left
    /// behind are tidied by `normalize`.
    #[serde(default)]
    pub strip: Vec<String>,

    /// Tidy the text: remove zero-width characters, turn no-break spaces and tabs into spaces,
    /// collapse runs of spaces and blank lines, trim lines, remove spaces before `,.;:!?)` and
    /// after `(`, collapse doubled `,,` `;;` and remove empty brackets. Default true.
    #[serde(default = "default_true")]
    pub normalize: bool,

    /// Outputs shorter than this many characters (after every rule) are rejected `too_short`.
    pub min_chars: Option<usize>,

    /// Outputs longer than this many characters (after every rule) are rejected `too_long`.
    pub max_chars: Option<usize>,
}

/// One script name or a list of them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ScriptSetting {
    One(String),
    Many(Vec<String>),
}

impl ScriptSetting {
    /// The script names as written.
    pub fn names(&self) -> Vec<&str> {
        match self {
            ScriptSetting::One(name) => vec![name.as_str()],
            ScriptSetting::Many(names) => names.iter().map(String::as_str).collect(),
        }
    }
}

fn default_max_foreign_script_share() -> f64 {
    0.5
}

fn default_max_foreign_words() -> usize {
    2
}

fn default_true() -> bool {
    true
}

impl Default for PostprocessConfig {
    fn default() -> Self {
        PostprocessConfig {
            script: None,
            max_foreign_script_share: default_max_foreign_script_share(),
            cut_script_fragments: true,
            language: None,
            foreign_languages: None,
            max_foreign_words: default_max_foreign_words(),
            lexicon_dir: None,
            lexicons: BTreeMap::new(),
            allow_words: None,
            replacements: None,
            typos: None,
            strip: Vec::new(),
            normalize: true,
            min_chars: None,
            max_chars: None,
        }
    }
}

impl PostprocessConfig {
    /// The foreign languages to look for: the configured list, or `["en"]` unless the expected
    /// language is English itself.
    pub fn effective_foreign_languages(&self) -> Vec<String> {
        match &self.foreign_languages {
            Some(list) => list.clone(),
            None => match self.language.as_deref() {
                Some("en") | None => Vec::new(),
                Some(_) => vec!["en".to_string()],
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn design_example_table_parses() {
        let text = r#"
            script = "Latin"
            language = "nl"
            max_foreign_words = 10
            typos = "prompts/typos_nl.tsv"
            strip = ['\(\d+-\d+\)']
            min_chars = 20
            max_chars = 1200
        "#;
        let config: PostprocessConfig = toml::from_str(text).unwrap();
        assert_eq!(config.script, Some(ScriptSetting::One("Latin".into())));
        assert_eq!(config.max_foreign_words, 10);
        assert_eq!(config.strip, vec![r"\(\d+-\d+\)".to_string()]);
        assert_eq!(config.effective_foreign_languages(), vec!["en".to_string()]);
        assert!(config.normalize);
    }

    #[test]
    fn unknown_key_is_refused() {
        let error = toml::from_str::<PostprocessConfig>("scrpt = \"Latin\"").unwrap_err();
        assert!(error.to_string().contains("scrpt"), "{error}");
    }

    #[test]
    fn empty_table_gives_defaults() {
        let config: PostprocessConfig = toml::from_str("").unwrap();
        assert_eq!(config, PostprocessConfig::default());
        assert!(config.effective_foreign_languages().is_empty());
    }

    #[test]
    fn script_list_and_lexicon_table_parse() {
        let text = r#"
            script = ["Latin", "Greek"]
            language = "en"
            foreign_languages = ["nl"]
            lexicons = { nl = "words/nl.txt" }
        "#;
        let config: PostprocessConfig = toml::from_str(text).unwrap();
        assert_eq!(
            config.script.as_ref().unwrap().names(),
            vec!["Latin", "Greek"]
        );
        assert_eq!(config.effective_foreign_languages(), vec!["nl".to_string()]);
        assert_eq!(config.lexicons["nl"], PathBuf::from("words/nl.txt"));
    }
}
