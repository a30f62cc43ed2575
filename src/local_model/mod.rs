//! The job's local model (`[model] kind = "onnx"`) as the runner and the dry run use it: the
//! processor's settings from the job, loading it (a bad file is a usage error, exit 2), and
//! rendering each row through the `input` template.
//!
//! The model itself — tokenising, batching, running, pooling — lives in `backfill-onnx`.

mod render;

use std::sync::Arc;

pub use render::render;

use backfill_onnx::{OnnxConfig, OnnxProcessor};

use crate::exit::usage;
use crate::job::{OnnxModel, OnnxOutput};

/// The processor's settings: the job's keys over the crate's defaults.
pub fn config(model: &OnnxModel) -> OnnxConfig {
    let mut config = match &model.output {
        OnnxOutput::Embedding => OnnxConfig::embedding(&model.path, &model.tokenizer),
        OnnxOutput::Classification { labels } => OnnxConfig::classification(&model.path, &model.tokenizer, labels.clone()),
    };
    config.pooling = model.pooling;
    config.max_length = model.max_length as usize;
    config.max_batch_tokens = model.max_batch_tokens as usize;
    config.threads = model.threads as usize;
    config.bf16_products = model.bf16_products;
    config
}

/// Loads the model once (off the async threads: it reads, folds and test-runs the model). A
/// missing or unreadable model or tokenizer is the job file's fault: a usage error naming the
/// file and the fix.
pub async fn load(model: &OnnxModel) -> anyhow::Result<Arc<OnnxProcessor>> {
    let config = config(model);
    let started = std::time::Instant::now();
    let processor = tokio::task::spawn_blocking(move || OnnxProcessor::load(&config))
        .await?
        .map_err(|e| usage(e.to_string()))?;
    tracing::info!(
        width = processor.output_width(),
        seconds = started.elapsed().as_secs_f64(),
        "loaded local model {}",
        model.path.display()
    );
    Ok(Arc::new(processor))
}

/// The name calls of this model are recorded under in the ledger: the model file's folder and
/// name (`minilm-l6-v2-int8/model.onnx`), as model files are often all called `model.onnx`.
pub fn ledger_name(model: &OnnxModel) -> String {
    let file = model.path.file_name().map(|n| n.to_string_lossy().into_owned());
    let folder = model.path.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
    match (folder, file) {
        (Some(folder), Some(file)) => format!("{folder}/{file}"),
        (None, Some(file)) => file,
        _ => model.path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(bf16_products: bool) -> OnnxModel {
        OnnxModel {
            path: "model.onnx".into(),
            tokenizer: "tokenizer.json".into(),
            input: "{{title}}".into(),
            output: OnnxOutput::Embedding,
            pooling: backfill_onnx::Pooling::Mean,
            max_length: 128,
            max_batch_tokens: 4096,
            threads: 2,
            bf16_products,
        }
    }

    #[test]
    fn the_jobs_precision_reaches_the_processor() {
        assert!(config(&model(true)).bf16_products);
        assert!(!config(&model(false)).bf16_products);
        let config = config(&model(false));
        assert_eq!((config.max_length, config.max_batch_tokens, config.threads), (128, 4096, 2));
    }
}
