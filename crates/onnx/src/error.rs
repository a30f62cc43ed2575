//! Errors of loading a model job ([`LoadError`]: the job cannot start, fix the file or key)
//! and of running it ([`RunError`]: this call failed, its rows stay pending or fail).

use std::path::PathBuf;
use thiserror::Error;

/// Why a model job could not be loaded. Each message names the file or key and the fix.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "model file {path} does not exist: fix [model] path, or fetch the example model with \
         scripts/fetch-models.sh"
    )]
    ModelFileMissing { path: PathBuf },

    #[error(
        "model file {path} could not be loaded as ONNX by tract: {message}. Check that it is an \
         ONNX model (opset 9 or later) and not a Git LFS pointer or a truncated download"
    )]
    ModelUnreadable { path: PathBuf, message: String },

    #[error(
        "model file {path} has inputs {found:?}; expected `input_ids` and optionally \
         `attention_mask` and `token_type_ids` (i64 or i32, [batch, sequence]). Export the \
         model with those input names"
    )]
    UnsupportedInputs { path: PathBuf, found: Vec<String> },

    #[error("model file {path}: {message}")]
    UnsupportedOutput { path: PathBuf, message: String },

    #[error(
        "model file {path} gives {classes} scores per row but [model] labels has {labels} \
         entries: list one label per model output, in the model's order"
    )]
    LabelCountMismatch {
        path: PathBuf,
        classes: usize,
        labels: usize,
    },

    #[error(
        "model file {path} failed a test run on one row of max_length = {max_length} tokens: \
         {message}. If the model accepts fewer positions, lower [model] max_length"
    )]
    TestRunFailed {
        path: PathBuf,
        max_length: usize,
        message: String,
    },

    #[error(
        "tokenizer file {path} does not exist: fix [model] tokenizer (a Hugging Face \
         tokenizer.json), or fetch the example tokenizer with scripts/fetch-models.sh"
    )]
    TokenizerFileMissing { path: PathBuf },

    #[error("tokenizer file {path} could not be read as a Hugging Face tokenizer.json: {message}")]
    TokenizerUnreadable { path: PathBuf, message: String },

    #[error("[model] {key}: {message}")]
    InvalidSetting { key: &'static str, message: String },
}

/// Why one `process` call failed. No output of the call is returned.
#[derive(Debug, Error)]
pub enum RunError {
    #[error("tokenizing row {index} failed: {message}")]
    Tokenize { index: usize, message: String },

    #[error("the model failed on a batch of {rows} rows × {padded_length} tokens: {message}")]
    Model {
        rows: usize,
        padded_length: usize,
        message: String,
    },

    #[error(
        "the model returned output of shape {shape:?} for a batch of {rows} rows × {padded_length} tokens"
    )]
    OutputShape {
        shape: Vec<usize>,
        rows: usize,
        padded_length: usize,
    },

    #[error("the model gave non-finite values (NaN or infinity) for row {index}")]
    NonFiniteOutput { index: usize },

    #[error("a model thread panicked: {message}")]
    WorkerPanicked { message: String },
}
