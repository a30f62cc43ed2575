//! Data-driven evaluation of every rule on real data (`shared/data`): real Dutch outputs and
//! sentences mixed with real lines in other scripts, real English words, typos made from the
//! texts' own words and real metadata fragments; precision and recall per rule.
//!
//! Run it with `cargo run --release --example evaluate`; `tests/real_data.rs` asserts the
//! targets on the same figures. The mixes are seeded, so every run measures the same texts.
//! This module reads files and is not used by [`crate::Postprocessor::process`].

mod bench_mix;
mod corpus;
mod language_eval;
mod random;
mod report;
mod script_eval;
mod strip_eval;
mod typo_eval;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

pub use bench_mix::{BenchmarkSet, benchmark_set};
pub use corpus::{Corpus, EvaluationError};
pub use language_eval::LanguageScore;
pub use script_eval::{FOREIGN_SCRIPT_LANGUAGES, ScriptScore};
pub use strip_eval::{DESIGN_PATTERN, METADATA_PATTERNS, StripScore};
pub use typo_eval::TypoScore;

use crate::{PostprocessConfig, Postprocessor};

/// Figures of every scenario; `Display` prints them as a report.
#[derive(Debug, Clone)]
pub struct Report {
    pub script: ScriptScore,
    pub language: LanguageScore,
    pub typos: TypoScore,
    pub strip: StripScore,
}

/// Loads the data under `data_dir` and measures every rule, with the lexicons in
/// `lexicon_dir`.
pub fn run(data_dir: &Path, lexicon_dir: &Path) -> Result<Report, EvaluationError> {
    let corpus = Corpus::load(data_dir)?;
    run_on(&corpus, lexicon_dir)
}

/// Measures every rule on an already loaded corpus.
pub fn run_on(corpus: &Corpus, lexicon_dir: &Path) -> Result<Report, EvaluationError> {
    let report = Report {
        script: script_eval::evaluate(corpus, lexicon_dir)?,
        language: language_eval::evaluate(corpus, lexicon_dir)?,
        typos: typo_eval::evaluate(corpus, lexicon_dir)?,
        strip: strip_eval::evaluate(corpus, lexicon_dir)?,
    };
    Ok(report)
}

/// `part / whole`, or 0 when `whole` is 0.
pub(crate) fn share(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Builds a post-processor for one scenario.
pub(crate) fn build(
    scenario: &'static str,
    config: &PostprocessConfig,
    lexicon_dir: &Path,
) -> Result<Postprocessor, EvaluationError> {
    Postprocessor::from_config_with_lexicon_dir(config, Path::new("."), Some(lexicon_dir))
        .map_err(|source| EvaluationError::Build { scenario, source })
}

/// A file in its own scratch directory, removed (with the directory) on drop.
pub(crate) struct ScratchFile(PathBuf);

impl ScratchFile {
    /// Writes `contents` to a new scratch file called `name`.
    pub(crate) fn write(name: &str, contents: &str) -> Result<ScratchFile, EvaluationError> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let directory = std::env::temp_dir().join(format!(
            "backfill-postprocess-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let path = directory.join(name);
        std::fs::create_dir_all(&directory)
            .and_then(|()| std::fs::write(&path, contents))
            .map_err(|source| EvaluationError::Scratch {
                path: path.clone(),
                source,
            })?;
        Ok(ScratchFile(path))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        if let Some(directory) = self.0.parent() {
            let _ = std::fs::remove_dir_all(directory);
        }
    }
}
