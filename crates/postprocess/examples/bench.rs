//! Benchmark: post-processing 10,000 realistic outputs on one core.
//!
//! ```text
//! cargo run --release --example bench [DATA_DIR] [LEXICON_DIR]
//! ```
//!
//! The outputs are real Dutch LLM outputs and sentences, a fifth each with a line in another
//! script, English words, a metadata fragment or a typo (see `evaluation::benchmark_set`). Each
//! configuration is timed over all outputs five times (best run shown), against a baseline
//! measured in the same run: copying each output and counting its characters.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use backfill_postprocess::evaluation::{Corpus, METADATA_PATTERNS, benchmark_set};
use backfill_postprocess::{PostprocessConfig, Postprocessor, ScriptSetting};

const OUTPUTS: usize = 10_000;
const RUNS: usize = 5;

fn best_of<F: FnMut() -> usize>(mut run: F) -> (Duration, usize) {
    let mut best = Duration::MAX;
    let mut checksum = 0;
    for _ in 0..RUNS {
        let started = Instant::now();
        checksum = black_box(run());
        best = best.min(started.elapsed());
    }
    (best, checksum)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut arguments = std::env::args().skip(1);
    let data_dir = arguments
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../../shared/data"));
    let lexicon_dir = arguments
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(backfill_postprocess::default_lexicon_dir);

    let corpus = Corpus::load(&data_dir)?;
    let set = benchmark_set(&corpus, OUTPUTS);
    let scratch =
        std::env::temp_dir().join(format!("backfill-postprocess-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    std::fs::write(scratch.join("typos.tsv"), &set.typo_dictionary)?;
    let bytes: usize = set.outputs.iter().map(String::len).sum();
    println!(
        "{} outputs, {:.0} characters on average, one thread",
        set.outputs.len(),
        bytes as f64 / set.outputs.len() as f64
    );

    let full = PostprocessConfig {
        script: Some(ScriptSetting::One("Latin".into())),
        language: Some("nl".into()),
        typos: Some(PathBuf::from("typos.tsv")),
        strip: METADATA_PATTERNS
            .iter()
            .map(|pattern| pattern.to_string())
            .collect(),
        min_chars: Some(20),
        max_chars: Some(1200),
        ..PostprocessConfig::default()
    };
    let configurations: Vec<(&str, PostprocessConfig)> = vec![
        ("normalize only", PostprocessConfig::default()),
        (
            "script",
            PostprocessConfig {
                script: full.script.clone(),
                ..PostprocessConfig::default()
            },
        ),
        (
            "strip (4 patterns)",
            PostprocessConfig {
                strip: full.strip.clone(),
                ..PostprocessConfig::default()
            },
        ),
        (
            "typos",
            PostprocessConfig {
                typos: full.typos.clone(),
                ..PostprocessConfig::default()
            },
        ),
        (
            "language (nl, en)",
            PostprocessConfig {
                language: full.language.clone(),
                ..PostprocessConfig::default()
            },
        ),
        ("all rules", full.clone()),
    ];

    let (baseline, _) = best_of(|| {
        set.outputs
            .iter()
            .map(|output| output.clone().chars().count())
            .sum()
    });
    println!(
        "{:<22} {:>10} {:>14} {:>10}",
        "configuration", "10k time", "outputs/s", "x baseline"
    );
    println!(
        "{:<22} {:>8.1}ms {:>14.0} {:>10.1}",
        "baseline (copy+count)",
        baseline.as_secs_f64() * 1e3,
        OUTPUTS as f64 / baseline.as_secs_f64(),
        1.0
    );
    for (name, config) in &configurations {
        let built_at = Instant::now();
        let postprocessor =
            Postprocessor::from_config_with_lexicon_dir(config, &scratch, Some(&lexicon_dir))?;
        let build_time = built_at.elapsed();
        let (elapsed, rejected) = best_of(|| {
            set.outputs
                .iter()
                .filter(|output| !postprocessor.process(output).is_accepted())
                .count()
        });
        println!(
            "{:<22} {:>8.1}ms {:>14.0} {:>10.1}   (built in {:.0} ms, {} rejected)",
            name,
            elapsed.as_secs_f64() * 1e3,
            OUTPUTS as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64() / baseline.as_secs_f64(),
            build_time.as_secs_f64() * 1e3,
            rejected
        );
    }
    std::fs::remove_dir_all(&scratch)?;
    Ok(())
}
