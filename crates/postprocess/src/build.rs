//! Turning a `[postprocess]` table into a [`Postprocessor`]: reading the dictionary and lexicon
//! files, compiling patterns, and checking values. This is the only part that does I/O.
//!
//! Lexicons are found per language: `[postprocess.lexicons] <code> = "file"` if given, else
//! `<dir>/<code>.txt` or `<dir>/<code>.txt.gz` in the first of: `lexicon_dir` (relative to the
//! job file), the directory the program passes to
//! [`Postprocessor::from_config_with_lexicon_dir`], the environment variable
//! `BACKFILL_LEXICON_DIR`, and [`default_lexicon_dir`].

use std::path::{Path, PathBuf};

use crate::config::PostprocessConfig;
use crate::error::BuildError;
use crate::language_check::LanguageCheck;
use crate::lexicon::{Lexicon, read_maybe_gzipped};
use crate::postprocessor::{LanguageRule, Postprocessor};
use crate::script_filter::ScriptFilter;
use crate::strip::StripRule;
use crate::word_map::WordMap;

/// The environment variable naming the lexicon directory.
pub const LEXICON_DIR_ENV: &str = "BACKFILL_LEXICON_DIR";

/// The `lexicons/` directory of the source tree this crate was built from.
pub fn default_lexicon_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("..")
        .join("lexicons")
}

impl Postprocessor {
    /// Builds the rules of `config`; relative paths are resolved against `base_dir` (the job
    /// file's directory). Lexicons come from `lexicon_dir`, `BACKFILL_LEXICON_DIR` or
    /// [`default_lexicon_dir`].
    pub fn from_config(
        config: &PostprocessConfig,
        base_dir: &Path,
    ) -> Result<Postprocessor, BuildError> {
        Postprocessor::from_config_with_lexicon_dir(config, base_dir, None)
    }

    /// Like [`Postprocessor::from_config`], with the directory the program ships its lexicons
    /// in (used unless the job sets `lexicon_dir`).
    pub fn from_config_with_lexicon_dir(
        config: &PostprocessConfig,
        base_dir: &Path,
        lexicon_dir: Option<&Path>,
    ) -> Result<Postprocessor, BuildError> {
        check_values(config)?;
        let script = match &config.script {
            None => None,
            Some(setting) => {
                let names: Vec<String> = setting
                    .names()
                    .iter()
                    .map(|name| name.to_string())
                    .collect();
                let mut scripts = Vec::with_capacity(names.len());
                for name in &names {
                    let script = ScriptFilter::script_named(name)
                        .ok_or_else(|| BuildError::UnknownScript { name: name.clone() })?;
                    scripts.push(script);
                }
                Some((
                    names,
                    ScriptFilter::new(
                        scripts,
                        config.max_foreign_script_share,
                        config.cut_script_fragments,
                    ),
                ))
            }
        };
        let strip = StripRule::compile(&config.strip)
            .map_err(|(pattern, message)| BuildError::BadStripPattern { pattern, message })?;
        let typos = load_word_map("typos", config.typos.as_deref(), base_dir)?;
        let replacements = load_word_map("replacements", config.replacements.as_deref(), base_dir)?;
        let language = match &config.language {
            None => None,
            Some(language) => Some(build_language_rule(
                language,
                config,
                base_dir,
                lexicon_dir,
            )?),
        };
        Ok(Postprocessor {
            normalize: config.normalize,
            script,
            strip,
            typos,
            replacements,
            language,
            min_chars: config.min_chars,
            max_chars: config.max_chars,
        })
    }
}

fn check_values(config: &PostprocessConfig) -> Result<(), BuildError> {
    let share = config.max_foreign_script_share;
    if !(0.0..=1.0).contains(&share) {
        return Err(BuildError::ShareOutOfRange {
            key: "max_foreign_script_share".into(),
            value: share,
        });
    }
    if let (Some(min_chars), Some(max_chars)) = (config.min_chars, config.max_chars)
        && min_chars > max_chars
    {
        return Err(BuildError::LengthBoundsCrossed {
            min_chars,
            max_chars,
        });
    }
    if config.language.is_none() {
        let needs_language = [
            ("foreign_languages", config.foreign_languages.is_some()),
            ("allow_words", config.allow_words.is_some()),
            ("lexicon_dir", config.lexicon_dir.is_some()),
            ("lexicons", !config.lexicons.is_empty()),
        ];
        if let Some((key, _)) = needs_language.iter().find(|(_, set)| *set) {
            return Err(BuildError::NeedsLanguage {
                key: key.to_string(),
            });
        }
    }
    Ok(())
}

fn load_word_map(key: &str, path: Option<&Path>, base_dir: &Path) -> Result<WordMap, BuildError> {
    let Some(path) = path else {
        return Ok(WordMap::default());
    };
    let full_path = base_dir.join(path);
    let contents = read_maybe_gzipped(&full_path).map_err(|source| BuildError::UnreadableFile {
        key: key.to_string(),
        path: full_path.clone(),
        source,
    })?;
    WordMap::parse(&contents).map_err(|error| BuildError::BadDictionaryLine {
        key: key.to_string(),
        path: full_path,
        line: error.line,
        problem: error.problem,
    })
}

fn build_language_rule(
    language: &str,
    config: &PostprocessConfig,
    base_dir: &Path,
    lexicon_dir: Option<&Path>,
) -> Result<LanguageRule, BuildError> {
    let foreign_languages = config.effective_foreign_languages();
    if foreign_languages.iter().any(|foreign| foreign == language) {
        return Err(BuildError::ForeignIsExpected {
            language: language.to_string(),
        });
    }
    let mut expected = load_lexicon("language", language, config, base_dir, lexicon_dir)?;
    if let Some(allow_words) = &config.allow_words {
        let full_path = base_dir.join(allow_words);
        let extra = Lexicon::load(&full_path).map_err(|source| BuildError::UnreadableFile {
            key: "allow_words".into(),
            path: full_path,
            source,
        })?;
        expected.merge(extra);
    }
    let mut foreign = Vec::with_capacity(foreign_languages.len());
    for code in &foreign_languages {
        let lexicon = load_lexicon("foreign_languages", code, config, base_dir, lexicon_dir)?;
        foreign.push((code.clone(), lexicon));
    }
    Ok(LanguageRule {
        language: language.to_string(),
        foreign_languages,
        check: LanguageCheck::new(expected, foreign),
        max_foreign_words: config.max_foreign_words,
    })
}

/// Finds and reads the lexicon of `language` (see module docs for the search order).
fn load_lexicon(
    key: &str,
    language: &str,
    config: &PostprocessConfig,
    base_dir: &Path,
    caller_dir: Option<&Path>,
) -> Result<Lexicon, BuildError> {
    let path = if let Some(file) = config.lexicons.get(language) {
        base_dir.join(file)
    } else {
        let valid_code = !language.is_empty()
            && language.chars().all(|character| {
                character.is_ascii_alphanumeric() || character == '-' || character == '_'
            });
        let directory = config
            .lexicon_dir
            .as_ref()
            .map(|dir| base_dir.join(dir))
            .or_else(|| caller_dir.map(Path::to_path_buf))
            .or_else(|| std::env::var_os(LEXICON_DIR_ENV).map(PathBuf::from))
            .unwrap_or_else(default_lexicon_dir);
        let candidates = [
            directory.join(format!("{language}.txt")),
            directory.join(format!("{language}.txt.gz")),
        ];
        match candidates
            .iter()
            .find(|candidate| valid_code && candidate.is_file())
        {
            Some(found) => found.clone(),
            None => {
                let tried: Vec<String> = candidates
                    .iter()
                    .map(|path| path.display().to_string())
                    .collect();
                return Err(BuildError::LexiconNotFound {
                    key: key.to_string(),
                    language: language.to_string(),
                    tried: tried.join(" and "),
                });
            }
        }
    };
    Lexicon::load(&path).map_err(|source| BuildError::UnreadableFile {
        key: format!("lexicons.{language}"),
        path,
        source,
    })
}
