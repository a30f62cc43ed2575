//! Throughput of backfill-onnx against onnxruntime on the same model, texts and thread count,
//! measured in one run: `scripts/bench-onnx.sh` (it fetches the model, sets up the venv and
//! builds this in release). Prints items/s and ms per item, and the ratio to the better of
//! two onnxruntime configurations.
//!
//! Flags: --items N (1000) --threads N (2) --rounds N (3) --max-batch-tokens N (256)
//!        --length-bucket N (32) --max-length N (256) --pass-tokens N (probed)
//!        --f32 (every product in f32 under tract: no bf16 products)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use backfill_onnx::{OnnxConfig, OnnxProcessor};

struct Settings {
    items: usize,
    threads: usize,
    rounds: usize,
    max_batch_tokens: usize,
    length_bucket: usize,
    max_length: usize,
    /// 0: probed (or read from the cache).
    pass_tokens: usize,
}

fn flag(arguments: &[String], name: &str, default: usize) -> usize {
    arguments
        .iter()
        .position(|argument| argument == name)
        .and_then(|position| arguments.get(position + 1))
        .map(|value| {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{name} needs a number"))
        })
        .unwrap_or(default)
}

fn required_env(name: &str, fix: &str) -> PathBuf {
    std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{name} is not set: {fix}"))
}

fn motion_texts(path: &Path, count: usize) -> Vec<String> {
    let content =
        std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    content
        .lines()
        .take(count)
        .map(|line| {
            let motion: serde_json::Value = serde_json::from_str(line).unwrap();
            format!(
                "{}\n{}",
                motion["title"].as_str().unwrap(),
                motion["text"].as_str().unwrap()
            )
        })
        .collect()
}

/// One round of each onnxruntime configuration: (name, seconds).
fn onnxruntime_round(
    python: &Path,
    model: &Path,
    tokenizer: &Path,
    input: &Path,
    settings: &Settings,
) -> Vec<(String, f64)> {
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/onnx/reference_embeddings.py");
    let output = Command::new(python)
        .arg(script)
        .arg("bench")
        .arg("--model")
        .arg(model)
        .arg("--tokenizer")
        .arg(tokenizer)
        .arg("--input")
        .arg(input)
        .args(["--threads", &settings.threads.to_string()])
        .args(["--max-length", &settings.max_length.to_string()])
        .args(["--max-batch-tokens", &settings.max_batch_tokens.to_string()])
        .args(["--rounds", "1"])
        .output()
        .expect("the onnxruntime benchmark runs");
    assert!(
        output.status.success(),
        "onnxruntime bench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                row["name"].as_str().unwrap().to_string(),
                row["seconds"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn main() {
    let arguments: Vec<String> = std::env::args().collect();
    let settings = Settings {
        items: flag(&arguments, "--items", 1000),
        threads: flag(&arguments, "--threads", 2),
        rounds: flag(&arguments, "--rounds", 3),
        max_batch_tokens: flag(&arguments, "--max-batch-tokens", 256),
        length_bucket: flag(&arguments, "--length-bucket", 32),
        max_length: flag(&arguments, "--max-length", 256),
        pass_tokens: flag(&arguments, "--pass-tokens", 0),
    };
    let models = required_env("BACKFILL_MODELS_DIR", "eval \"$(scripts/fetch-models.sh)\"");
    let python = required_env("BACKFILL_PY", "eval \"$(scripts/onnx/setup-venv.sh)\"");
    let model = models.join("minilm-l6-v2-int8/model.onnx");
    let tokenizer = models.join("minilm-l6-v2-int8/tokenizer.json");
    let motions = std::env::var_os("BACKFILL_MOTIONS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../../shared/data/motions/tk_moties_fulltext.jsonl")
        });
    let texts = motion_texts(&motions, settings.items);
    let input =
        std::env::temp_dir().join(format!("backfill-onnx-bench-{}.jsonl", std::process::id()));
    let lines: Vec<String> = texts
        .iter()
        .map(|text| serde_json::json!({ "text": text }).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();

    let mut config = OnnxConfig::embedding(&model, &tokenizer);
    config.threads = settings.threads;
    config.max_batch_tokens = settings.max_batch_tokens;
    config.length_bucket = settings.length_bucket;
    config.max_length = settings.max_length;
    config.pass_tokens = (settings.pass_tokens > 0).then_some(settings.pass_tokens);
    config.bf16_products = !arguments.iter().any(|argument| argument == "--f32");
    let started = Instant::now();
    let processor = OnnxProcessor::load(&config).expect("the model loads");
    let load_seconds = started.elapsed().as_secs_f64();
    let plan = processor.plan_summary(&texts).unwrap();

    let mut ours: Vec<f64> = Vec::new();
    let mut theirs: Vec<(String, Vec<f64>)> = Vec::new();
    for round in 0..settings.rounds {
        let started = Instant::now();
        let outputs = processor.process(&texts).expect("processing succeeds");
        ours.push(started.elapsed().as_secs_f64());
        assert_eq!(outputs.len(), texts.len());
        for (name, seconds) in onnxruntime_round(&python, &model, &tokenizer, &input, &settings) {
            match theirs.iter_mut().find(|(known, _)| *known == name) {
                Some((_, times)) => times.push(seconds),
                None => theirs.push((name, vec![seconds])),
            }
        }
        eprintln!("round {} of {} done", round + 1, settings.rounds);
    }
    std::fs::remove_file(&input).ok();

    let best = |times: &[f64]| times.iter().copied().fold(f64::INFINITY, f64::min);
    let baseline = theirs
        .iter()
        .map(|(_, times)| best(times))
        .fold(f64::INFINITY, f64::min);
    println!(
        "{} motions, all-MiniLM-L6-v2 int8, max_length {}, threads {}, max_batch_tokens {}, best of {} rounds",
        texts.len(),
        settings.max_length,
        settings.threads,
        settings.max_batch_tokens,
        settings.rounds
    );
    println!(
        "plan: passes of {} tokens, {} batches, {} real tokens, {} padded ({:.1}% real), length bucket {}, {} bf16 products",
        processor.pass_tokens(),
        plan.batches,
        plan.real_tokens,
        plan.padded_tokens,
        plan.fill_ratio() * 100.0,
        settings.length_bucket,
        processor.bf16_products()
    );
    println!(
        "{:<52} {:>9} {:>9} {:>12}",
        "", "items/s", "ms/item", "vs best ORT"
    );
    let row = |name: &str, seconds: f64| {
        let items = texts.len() as f64;
        println!(
            "{:<52} {:>9.1} {:>9.2} {:>11.2}x",
            name,
            items / seconds,
            seconds * 1000.0 / items,
            baseline / seconds
        );
    };
    row("backfill-onnx (tract-onnx 0.23.9)", best(&ours));
    for (name, times) in &theirs {
        row(name, best(times));
    }
    println!(
        "backfill-onnx: load {:.2} s; first call {:.2} s (includes compiling plans for {} batch shapes); \
         rounds {:?} s; peak memory {}",
        load_seconds,
        ours[0],
        processor.compiled_plans(),
        ours.iter()
            .map(|s| (s * 100.0).round() / 100.0)
            .collect::<Vec<_>>(),
        peak_memory()
    );
}

/// The process's peak resident memory, from /proc (Linux).
fn peak_memory() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .map(|line| line[6..].trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
