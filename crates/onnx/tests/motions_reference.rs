//! all-MiniLM-L6-v2 int8 under backfill-onnx against the same model under onnxruntime, on 200
//! real motions: every embedding must have cosine ≥ 0.999 with the reference.
//!
//! Needs the fetched model and the Python venv: `eval "$(scripts/fetch-models.sh)"` and
//! `eval "$(scripts/onnx/setup-venv.sh)"` (they export BACKFILL_MODELS_DIR and BACKFILL_PY).
//! Without them the test is skipped with a message, except under CI=true where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use backfill_onnx::pooling::cosine_similarity;
use backfill_onnx::{OnnxConfig, OnnxProcessor};
use serde_json::Value;

const MOTIONS: usize = 200;
const MAX_LENGTH: usize = 256;

fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// The prerequisite, or why it is missing (then: skipped, or failed under CI=true).
fn prerequisite(found: Option<PathBuf>, what: &str, fix: &str) -> Option<PathBuf> {
    if let Some(path) = found.filter(|path| path.exists()) {
        return Some(path);
    }
    let message = format!("{what} not found: {fix}");
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        panic!("{message} (CI=true: this test must run)");
    }
    eprintln!("SKIPPED motions_reference: {message}");
    None
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

fn models_dir() -> Option<PathBuf> {
    env_path("BACKFILL_MODELS_DIR")
}

fn motions_file() -> PathBuf {
    env_path("BACKFILL_MOTIONS").unwrap_or_else(|| {
        repository_root().join("../shared/data/motions/tk_moties_fulltext.jsonl")
    })
}

fn motion_texts(path: &Path, count: usize) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .take(count)
        .map(|line| {
            let motion: Value = serde_json::from_str(line).unwrap();
            format!(
                "{}\n{}",
                motion["title"].as_str().unwrap(),
                motion["text"].as_str().unwrap()
            )
        })
        .collect()
}

/// onnxruntime's embeddings and token counts for `texts`.
fn reference(
    python: &Path,
    model: &Path,
    tokenizer: &Path,
    texts: &[String],
) -> Vec<(usize, Vec<f32>)> {
    let scratch =
        std::env::temp_dir().join(format!("backfill-onnx-reference-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let input = scratch.join("texts.jsonl");
    let output = scratch.join("reference.jsonl");
    let lines: Vec<String> = texts
        .iter()
        .map(|text| serde_json::json!({ "text": text }).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let status = Command::new(python)
        .arg(repository_root().join("scripts/onnx/reference_embeddings.py"))
        .args(["embed", "--threads", "2", "--max-length", &MAX_LENGTH.to_string()])
        .arg("--model")
        .arg(model)
        .arg("--tokenizer")
        .arg(tokenizer)
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .status()
        .expect("the reference script runs");
    assert!(status.success(), "reference_embeddings.py failed: {status}");
    let rows = std::fs::read_to_string(&output).unwrap();
    std::fs::remove_dir_all(&scratch).ok();
    rows.lines()
        .map(|line| {
            let row: Value = serde_json::from_str(line).unwrap();
            let embedding = row["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            (row["tokens"].as_u64().unwrap() as usize, embedding)
        })
        .collect()
}

#[test]
fn embeddings_match_onnxruntime_on_200_motions() {
    let fetch = "run `eval \"$(scripts/fetch-models.sh)\"` to fetch it and set BACKFILL_MODELS_DIR";
    let Some(models) = prerequisite(
        models_dir(),
        "BACKFILL_MODELS_DIR (the fetched models)",
        fetch,
    ) else {
        return;
    };
    let model = models.join("minilm-l6-v2-int8/model.onnx");
    let tokenizer = models.join("minilm-l6-v2-int8/tokenizer.json");
    let Some(model) = prerequisite(Some(model), "the all-MiniLM-L6-v2 int8 model", fetch) else {
        return;
    };
    let venv =
        "run `eval \"$(scripts/onnx/setup-venv.sh)\"` to create the venv and set BACKFILL_PY";
    let Some(python) = prerequisite(
        env_path("BACKFILL_PY"),
        "BACKFILL_PY (Python with onnxruntime)",
        venv,
    ) else {
        return;
    };
    let data =
        "set BACKFILL_MOTIONS to tk_moties_fulltext.jsonl, or keep shared/ beside the repository";
    let Some(motions) = prerequisite(Some(motions_file()), "the motions file", data) else {
        return;
    };

    let texts = motion_texts(&motions, MOTIONS);
    assert_eq!(texts.len(), MOTIONS);
    let expected = reference(&python, &model, &tokenizer, &texts);
    assert_eq!(expected.len(), MOTIONS);

    let mut config = OnnxConfig::embedding(&model, &tokenizer);
    config.max_length = MAX_LENGTH;
    config.threads = 2;
    // The probed pass size goes to a folder of this test's own, not the user's cache.
    let pass_cache = std::env::temp_dir().join(format!("backfill-onnx-reference-{}", std::process::id()));
    config.pass_cache = Some(pass_cache.join("onnx-pass.json"));
    let processor = OnnxProcessor::load(&config).unwrap();
    let _ = std::fs::remove_dir_all(&pass_cache);
    assert_eq!(processor.output_width(), 384);
    let counts = processor.token_counts(&texts).unwrap();
    let outputs = processor.process(&texts).unwrap();

    let mut lowest = (f32::MAX, 0);
    for (index, ((tokens, reference), output)) in expected.iter().zip(&outputs).enumerate() {
        assert_eq!(
            counts[index], *tokens,
            "motion {index}: token counts differ from the Python tokenizer"
        );
        let similarity = cosine_similarity(output.as_embedding().unwrap(), reference);
        if similarity < lowest.0 {
            lowest = (similarity, index);
        }
        assert!(
            similarity >= 0.999,
            "motion {index}: cosine {similarity} < 0.999"
        );
    }
    let truncated = counts.iter().filter(|count| **count == MAX_LENGTH).count();
    eprintln!(
        "motions_reference: {MOTIONS} motions ({truncated} truncated at {MAX_LENGTH} tokens), lowest cosine {:.6} (motion {})",
        lowest.0, lowest.1
    );
}
