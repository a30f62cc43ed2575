//! Behaviour of the processor on the tiny models of tests/fixtures (built by
//! scripts/onnx/build_tiny_models.py, with onnxruntime's outputs saved beside them).

use std::path::PathBuf;
use std::sync::Arc;

use backfill_onnx::pooling::cosine_similarity;
use backfill_onnx::{LoadError, OnnxConfig, OnnxProcessor, Output, RunError};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("tiny_expected.json")).unwrap()).unwrap()
}

fn embedder_config() -> OnnxConfig {
    let mut config = OnnxConfig::embedding(
        fixture("tiny_embedder.onnx"),
        fixture("tiny_tokenizer.json"),
    );
    config.max_length = expected()["max_length"].as_u64().unwrap() as usize;
    config.max_batch_tokens = 64;
    config.length_bucket = 4;
    config.threads = 2;
    config.pass_cache = Some(pass_cache_folder().join("onnx-pass.json"));
    // The comparisons with onnxruntime below are to 1e-5: every product in f32. The bf16
    // products have their own test.
    config.bf16_products = false;
    config
}

/// This test process's folder for the probed pass sizes (never the user's cache).
fn pass_cache_folder() -> PathBuf {
    std::env::temp_dir().join(format!("backfill-onnx-tests-{}", std::process::id()))
}

fn classifier_config() -> OnnxConfig {
    let labels = expected()["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    OnnxConfig {
        labels,
        ..OnnxConfig::classification(
            fixture("tiny_classifier.onnx"),
            fixture("tiny_tokenizer.json"),
            vec![],
        )
    }
    .with_shape_of(&embedder_config())
}

trait WithShape {
    fn with_shape_of(self, other: &OnnxConfig) -> Self;
}

impl WithShape for OnnxConfig {
    fn with_shape_of(mut self, other: &OnnxConfig) -> Self {
        self.max_length = other.max_length;
        self.max_batch_tokens = other.max_batch_tokens;
        self.length_bucket = other.length_bucket;
        self.threads = other.threads;
        self.bf16_products = other.bf16_products;
        self
    }
}

fn fixture_texts() -> Vec<String> {
    expected()["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["text"].as_str().unwrap().to_string())
        .collect()
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn embeddings(outputs: &[Output]) -> Vec<Vec<f32>> {
    outputs
        .iter()
        .map(|output| output.as_embedding().expect("an embedding").to_vec())
        .collect()
}

fn assert_close(left: &[f32], right: &[f32], tolerance: f32, what: &str) {
    assert_eq!(left.len(), right.len(), "{what}: lengths differ");
    for (position, (a, b)) in left.iter().zip(right).enumerate() {
        assert!(
            (a - b).abs() <= tolerance,
            "{what}: value {position}: {a} vs {b}"
        );
    }
}

#[test]
fn embeddings_match_onnxruntime_on_the_fixture_texts() {
    let processor = OnnxProcessor::load(&embedder_config()).unwrap();
    assert_eq!(processor.output_width(), 8);
    let texts = fixture_texts();
    let outputs = embeddings(&processor.process(&texts).unwrap());
    let counts = processor.token_counts(&texts).unwrap();
    for (index, row) in expected()["rows"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            counts[index],
            row["token_ids"].as_array().unwrap().len(),
            "tokens of row {index}"
        );
        assert_close(
            &outputs[index],
            &floats(&row["embedding"]),
            1e-5,
            &format!("row {index}"),
        );
        let norm: f32 = outputs[index].iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "row {index} has norm {norm}");
    }
}

#[test]
fn classifications_match_onnxruntime_on_the_fixture_texts() {
    let processor = OnnxProcessor::load(&classifier_config()).unwrap();
    assert_eq!(processor.output_width(), 3);
    let labels: Vec<String> = classifier_config().labels;
    let outputs = processor.process(&fixture_texts()).unwrap();
    for (index, row) in expected()["rows"].as_array().unwrap().iter().enumerate() {
        let probabilities = floats(&row["probabilities"]);
        let best = (0..probabilities.len())
            .max_by(|a, b| probabilities[*a].total_cmp(&probabilities[*b]))
            .unwrap();
        let Output::Classification { label, probability } = &outputs[index] else {
            panic!("row {index}: {:?}", outputs[index])
        };
        assert_eq!(label, &labels[best], "row {index}");
        assert!(
            (probability - probabilities[best]).abs() < 1e-5,
            "row {index}: {probability} vs {}",
            probabilities[best]
        );
    }
}

fn many_texts() -> Vec<String> {
    let words =
        "de het een en van in op motie kamer regering verzoekt wonen zorg klimaat geld the of xyz"
            .split(' ')
            .collect::<Vec<_>>();
    (0..60)
        .map(|row| {
            (0..(row * 7) % 19)
                .map(|word| words[(row * 3 + word * 5) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn outputs_do_not_depend_on_batching_threads_or_neighbours() {
    let texts = many_texts();
    let batched = OnnxProcessor::load(&embedder_config()).unwrap();
    let together = embeddings(&batched.process(&texts).unwrap());

    let mut one_by_one_config = embedder_config();
    // A budget below any row's length: every row runs in a batch of its own.
    one_by_one_config.max_batch_tokens = 1;
    one_by_one_config.length_bucket = 1;
    one_by_one_config.threads = 1;
    let one_by_one = OnnxProcessor::load(&one_by_one_config).unwrap();
    for (index, text) in texts.iter().enumerate() {
        let alone = embeddings(&one_by_one.process(std::slice::from_ref(text)).unwrap());
        assert_close(
            &together[index],
            &alone[0],
            1e-5,
            &format!("text {index} {text:?}"),
        );
    }
    let summary = batched.plan_summary(&texts).unwrap();
    assert!(
        summary.batches < texts.len(),
        "rows were batched together: {summary:?}"
    );
}

#[test]
fn outputs_come_back_in_input_order() {
    let processor = OnnxProcessor::load(&embedder_config()).unwrap();
    let texts = many_texts();
    let forward = embeddings(&processor.process(&texts).unwrap());
    let reversed_texts: Vec<String> = texts.iter().rev().cloned().collect();
    let reversed = embeddings(&processor.process(&reversed_texts).unwrap());
    for index in 0..texts.len() {
        assert_close(
            &forward[index],
            &reversed[texts.len() - 1 - index],
            1e-5,
            &format!("text {index}"),
        );
    }
    let distinct = forward
        .iter()
        .filter(|e| cosine_similarity(e, &forward[1]) < 0.9999)
        .count();
    assert!(
        distinct > texts.len() / 2,
        "texts should give different embeddings"
    );
}

#[test]
fn long_texts_are_truncated_at_max_length() {
    let mut config = embedder_config();
    config.max_length = 6;
    config.length_bucket = 1;
    let processor = OnnxProcessor::load(&config).unwrap();
    let texts = vec![
        "de het een en van in op motie".to_string(),
        "de het een en".to_string(),
    ];
    assert_eq!(processor.token_counts(&texts).unwrap(), vec![6, 6]);
    let outputs = embeddings(&processor.process(&texts).unwrap());
    assert_close(&outputs[0], &outputs[1], 1e-6, "truncated text");
}

#[test]
fn no_texts_give_no_outputs_and_an_empty_text_gives_one() {
    let processor = OnnxProcessor::load(&embedder_config()).unwrap();
    assert!(processor.process(&[]).unwrap().is_empty());
    let outputs = processor.process(&[String::new()]).unwrap();
    assert_eq!(outputs[0].as_embedding().unwrap().len(), 8);
}

#[test]
fn one_processor_serves_several_threads_at_once() {
    let processor = Arc::new(OnnxProcessor::load(&embedder_config()).unwrap());
    let texts = many_texts();
    let expected = embeddings(&processor.process(&texts).unwrap());
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let (processor, texts) = (processor.clone(), texts.clone());
            std::thread::spawn(move || embeddings(&processor.process(&texts).unwrap()))
        })
        .collect();
    for handle in handles {
        let got = handle.join().unwrap();
        for index in 0..texts.len() {
            assert_close(
                &got[index],
                &expected[index],
                1e-6,
                &format!("text {index}"),
            );
        }
    }
}

fn load_error(config: &OnnxConfig) -> LoadError {
    OnnxProcessor::load(config).expect_err("load should fail")
}

#[test]
fn a_missing_model_file_names_the_path_and_the_fix() {
    let mut config = embedder_config();
    config.model_path = PathBuf::from("/nonexistent/model.onnx");
    let error = load_error(&config);
    assert!(
        matches!(error, LoadError::ModelFileMissing { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("/nonexistent/model.onnx") && message.contains("[model] path"),
        "{message}"
    );
}

#[test]
fn a_missing_tokenizer_names_the_path_and_the_fix() {
    let mut config = embedder_config();
    config.tokenizer_path = PathBuf::from("/nonexistent/tokenizer.json");
    let error = load_error(&config);
    assert!(
        matches!(error, LoadError::TokenizerFileMissing { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("[model] tokenizer"), "{error}");
}

fn scratch_file(name: &str, contents: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("backfill-onnx-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn files_that_are_not_models_or_tokenizers_are_refused_clearly() {
    let mut config = embedder_config();
    config.model_path = scratch_file(
        "not-a-model.onnx",
        b"version https://git-lfs.github.com/spec/v1\n",
    );
    let error = load_error(&config);
    assert!(
        matches!(error, LoadError::ModelUnreadable { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("not-a-model.onnx"), "{error}");

    let mut config = embedder_config();
    config.tokenizer_path = scratch_file("not-a-tokenizer.json", b"{\"hello\": 1}");
    let error = load_error(&config);
    assert!(
        matches!(error, LoadError::TokenizerUnreadable { .. }),
        "{error:?}"
    );
}

#[test]
fn labels_must_match_the_models_classes() {
    let mut config = classifier_config();
    config.labels.pop();
    let error = load_error(&config);
    assert!(
        matches!(
            error,
            LoadError::LabelCountMismatch {
                classes: 3,
                labels: 2,
                ..
            }
        ),
        "{error:?}"
    );
}

#[test]
fn an_embedding_model_cannot_classify() {
    let mut config = embedder_config();
    config.output = backfill_onnx::OutputKind::Classification;
    config.labels = vec!["a".into(), "b".into()];
    let error = load_error(&config);
    assert!(
        matches!(error, LoadError::UnsupportedOutput { .. }),
        "{error:?}"
    );
}

#[test]
fn inconsistent_settings_name_the_key() {
    let mut config = embedder_config();
    config.max_batch_tokens = 0;
    assert!(matches!(
        load_error(&config),
        LoadError::InvalidSetting {
            key: "max_batch_tokens",
            ..
        }
    ));
    let mut config = classifier_config();
    config.labels.clear();
    assert!(matches!(
        load_error(&config),
        LoadError::InvalidSetting { key: "labels", .. }
    ));
    let mut config = embedder_config();
    config.threads = 0;
    assert!(matches!(
        load_error(&config),
        LoadError::InvalidSetting { key: "threads", .. }
    ));
}

#[test]
fn run_errors_are_displayable() {
    let error = RunError::Model {
        rows: 2,
        padded_length: 8,
        message: "boom".into(),
    };
    assert_eq!(
        error.to_string(),
        "the model failed on a batch of 2 rows × 8 tokens: boom"
    );
}

#[test]
fn a_batch_above_the_pass_size_is_split_with_outputs_equal_to_one_pass() {
    // 32 rows: one power-of-two pass when the pass size allows it.
    let texts = many_texts()[..32].to_vec();
    let mut one_pass_config = embedder_config();
    one_pass_config.max_batch_tokens = 1 << 20;
    one_pass_config.pass_tokens = Some(1 << 20);
    one_pass_config.threads = 1;
    let one_pass = OnnxProcessor::load(&one_pass_config).unwrap();
    assert_eq!(one_pass.plan_passes(&texts).unwrap().len(), 1);

    let mut split_config = one_pass_config.clone();
    split_config.pass_tokens = Some(24);
    split_config.threads = 2;
    let split = OnnxProcessor::load(&split_config).unwrap();
    let passes = split.plan_passes(&texts).unwrap();
    assert!(passes.len() > 2, "{} passes", passes.len());
    let longest_row = split
        .token_counts(&texts)
        .unwrap()
        .into_iter()
        .max()
        .unwrap();
    assert!(
        passes
            .iter()
            .all(|pass| pass.padded_tokens() <= 24 || pass.indices.len() == 1),
        "a pass above the pass size holds one row"
    );
    assert!(
        passes
            .iter()
            .all(|pass| pass.padded_length <= longest_row.max(24))
    );

    let together = embeddings(&one_pass.process(&texts).unwrap());
    let in_passes = embeddings(&split.process(&texts).unwrap());
    for (index, (left, right)) in together.iter().zip(&in_passes).enumerate() {
        assert_close(left, right, 1e-6, &format!("text {index}"));
    }
}

#[test]
fn the_memory_bound_is_never_exceeded_and_caps_the_pass_size() {
    let texts = many_texts();
    let longest_row = OnnxProcessor::load(&embedder_config())
        .unwrap()
        .token_counts(&texts)
        .unwrap()
        .into_iter()
        .max()
        .unwrap();
    for bound in [longest_row, 32, 64, 256, 8192] {
        let bound = bound.max(longest_row);
        let mut config = embedder_config();
        config.max_batch_tokens = bound;
        config.pass_tokens = None;
        let processor = OnnxProcessor::load(&config).unwrap();
        let pass = processor.pass_tokens();
        assert!(pass <= bound, "bound {bound}: passes of {pass} tokens");
        let candidates = backfill_onnx::pass_size::candidates_within(bound);
        assert!(
            candidates.contains(&pass) || (candidates.is_empty() && pass == bound),
            "bound {bound}: passes of {pass} tokens, not a probed size"
        );
        for pass in processor.plan_passes(&texts).unwrap() {
            assert!(
                pass.padded_tokens() <= bound,
                "bound {bound}: a pass of {} × {}",
                pass.indices.len(),
                pass.padded_length
            );
        }
        assert_eq!(processor.process(&texts).unwrap().len(), texts.len());
    }
    let _ = std::fs::remove_dir_all(pass_cache_folder());
}

#[test]
fn every_thread_gets_a_pass_when_there_are_rows_enough() {
    let mut config = embedder_config();
    config.max_batch_tokens = 8192;
    config.pass_tokens = Some(8192);
    config.threads = 2;
    let processor = OnnxProcessor::load(&config).unwrap();
    let texts = many_texts();
    assert!(processor.plan_passes(&texts).unwrap().len() >= 2);
    let two = vec!["motie kamer".to_string(), "de regering".to_string()];
    assert_eq!(processor.plan_passes(&two).unwrap().len(), 2);
}

#[test]
fn compiled_plans_stay_bounded_over_many_shapes() {
    let mut config = embedder_config();
    config.length_bucket = 1;
    config.max_batch_tokens = 4096;
    config.pass_tokens = Some(4096);
    config.threads = 1;
    let processor = OnnxProcessor::load(&config).unwrap();
    let words: Vec<&str> = "de het een en van in op motie kamer regering verzoekt wonen zorg"
        .split(' ')
        .collect();
    let mut most = 0;
    let mut shapes = std::collections::HashSet::new();
    for length in 0..config.max_length {
        let text = words
            .iter()
            .cycle()
            .take(length)
            .copied()
            .collect::<Vec<_>>()
            .join(" ");
        for rows in [1, 2, 4] {
            let texts = vec![text.clone(); rows];
            for pass in processor.plan_passes(&texts).unwrap() {
                shapes.insert((pass.indices.len(), pass.padded_length));
            }
            processor.process(&texts).unwrap();
            most = most.max(processor.compiled_plans());
        }
    }
    let cap = backfill_onnx::plan_cache::MAX_PLANS;
    assert!(shapes.len() > cap, "the texts meet {} shapes", shapes.len());
    assert_eq!(most, cap, "the cache filled up to its cap and no further");
}

#[test]
fn bf16_products_stay_within_bf16_rounding_of_onnxruntime() {
    let config = OnnxConfig {
        bf16_products: true,
        ..embedder_config()
    };
    let processor = OnnxProcessor::load(&config).unwrap();
    if !backfill_onnx::bf16_matmul::available() {
        assert_eq!(processor.bf16_products(), 0);
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    // The tiny embedder's one product with a constant matrix (`mix`).
    assert_eq!(processor.bf16_products(), 1);
    let exact = OnnxProcessor::load(&embedder_config()).unwrap();
    assert_eq!(exact.bf16_products(), 0);
    let texts = fixture_texts();
    let outputs = embeddings(&processor.process(&texts).unwrap());
    let f32_outputs = embeddings(&exact.process(&texts).unwrap());
    for (index, row) in expected()["rows"].as_array().unwrap().iter().enumerate() {
        let reference = floats(&row["embedding"]);
        let cosine = cosine_similarity(&outputs[index], &reference);
        assert!(cosine >= 0.9999, "row {index}: cosine {cosine}");
        // Rounded, not exact: the bf16 path is the one that ran.
        assert_ne!(outputs[index], f32_outputs[index], "row {index}");
        assert_close(&outputs[index], &reference, 2e-2, &format!("row {index}"));
    }
}
