//! The settings of a local-model job: the onnx keys of the job file's `[model]` table, as a
//! plain struct the main crate fills from its parsed TOML.

use std::path::PathBuf;

/// The pass size used when the probe could time none of its sizes (see
/// [`crate::pass_size`]): the fastest measured on all-MiniLM-L6-v2 on a 2-core machine.
pub const FASTEST_PASS_TOKENS: usize = 256;

/// What the model's output becomes for each row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// A sentence embedding: token states pooled (see [`Pooling`]) and L2-normalised.
    /// A model whose output is already `[batch, hidden]` is only normalised.
    Embedding,
    /// One label per row: the highest-scoring of `labels`, with its probability.
    Classification,
}

/// How token states `[batch, seq, hidden]` become one vector per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the tokens the attention mask marks as real (padding excluded).
    Mean,
    /// The first token's state (BERT's `[CLS]`).
    Cls,
}

/// What a classification model's scores are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClassScores {
    /// Raw logits: softmax turns them into probabilities.
    Logits,
    /// Already probabilities (e.g. a model ending in Softmax): used as they are.
    Probabilities,
}

/// The `[model]` keys of a job with `kind = "onnx"`.
///
/// Paths are used as given; the main crate resolves them against the job file's folder.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxConfig {
    /// `path`: the `.onnx` model file.
    pub model_path: PathBuf,
    /// `tokenizer`: a Hugging Face `tokenizer.json`.
    pub tokenizer_path: PathBuf,
    /// `output`: `"embedding"` or `"classification"`.
    pub output: OutputKind,
    /// `labels`: class names in the order of the model's output scores (classification only).
    pub labels: Vec<String>,
    /// `pooling`: `"mean"` (default) or `"cls"` (embedding only).
    pub pooling: Pooling,
    /// `scores`: `"logits"` (default) or `"probabilities"` (classification only).
    pub class_scores: ClassScores,
    /// `max_length`: tokens per row, special tokens included; longer inputs are truncated.
    pub max_length: usize,
    /// `max_batch_tokens`: a bound on memory: no forward pass holds more than this many
    /// padded tokens (rows × padded length; a row longer than the bound still runs alone).
    /// Within it the processor runs passes of the size that is fastest under tract for this
    /// model, machine and thread count (probed at load and cached, see [`crate::pass_size`]),
    /// or `pass_tokens`, so raising the bound never slows a run.
    pub max_batch_tokens: usize,
    /// The padded tokens of one forward pass, within `max_batch_tokens`; `None`: the fastest
    /// of [`crate::pass_size::PASS_TOKEN_CANDIDATES`], probed at load or read from the cache.
    /// Not a job-file key: for tests and benchmarks.
    pub pass_tokens: Option<usize>,
    /// Where the probed pass sizes are kept; `None`: [`crate::pass_size::cache_file`] (the
    /// user's cache folder, from the environment). Not a job-file key: tests point it at a
    /// temporary folder.
    pub pass_cache: Option<PathBuf>,
    /// `length_bucket`: padded lengths are rounded up to a multiple of this many tokens; each
    /// distinct padded length compiles its own plan (about a second, once).
    pub length_bucket: usize,
    /// `sort_window`: rows sorted by length together before batching (more cuts padding,
    /// fewer keeps batches closer to input order). Within one `process` call.
    pub sort_window: usize,
    /// `threads`: batches run in parallel on this many threads.
    pub threads: usize,
    /// Products of activations with constant weight matrices (the linear layers) in bf16 with
    /// f32 sums, where the CPU has AVX512-BF16 (twice the multiply-adds per instruction of
    /// f32; see [`crate::bf16_matmul`] for the precision). Default `true`; `false` keeps
    /// every product in f32 under tract. The job file's `model.precision` (`"auto"` or `"f32"`).
    pub bf16_products: bool,
}

impl OnnxConfig {
    /// An embedding job over `model_path` and `tokenizer_path` with the documented defaults:
    /// mean pooling, `max_length = 256`, `max_batch_tokens = 256`, `length_bucket = 32`,
    /// `sort_window = 1024`,
    /// `threads` = the number of cores.
    pub fn embedding(model_path: impl Into<PathBuf>, tokenizer_path: impl Into<PathBuf>) -> Self {
        OnnxConfig {
            model_path: model_path.into(),
            tokenizer_path: tokenizer_path.into(),
            output: OutputKind::Embedding,
            labels: Vec::new(),
            pooling: Pooling::Mean,
            class_scores: ClassScores::Logits,
            max_length: 256,
            max_batch_tokens: 256,
            pass_tokens: None,
            pass_cache: None,
            length_bucket: 32,
            sort_window: 1024,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            bf16_products: true,
        }
    }

    /// A classification job with `labels` and the same defaults as [`OnnxConfig::embedding`].
    pub fn classification(
        model_path: impl Into<PathBuf>,
        tokenizer_path: impl Into<PathBuf>,
        labels: Vec<String>,
    ) -> Self {
        OnnxConfig {
            output: OutputKind::Classification,
            labels,
            ..OnnxConfig::embedding(model_path, tokenizer_path)
        }
    }
}

impl OutputKind {
    /// Parse the job file's `output` value.
    pub fn from_key(value: &str) -> Option<Self> {
        match value {
            "embedding" => Some(OutputKind::Embedding),
            "classification" => Some(OutputKind::Classification),
            _ => None,
        }
    }
}

impl Pooling {
    /// Parse the job file's `pooling` value.
    pub fn from_key(value: &str) -> Option<Self> {
        match value {
            "mean" => Some(Pooling::Mean),
            "cls" => Some(Pooling::Cls),
            _ => None,
        }
    }
}

impl ClassScores {
    /// Parse the job file's `scores` value.
    pub fn from_key(value: &str) -> Option<Self> {
        match value {
            "logits" => Some(ClassScores::Logits),
            "probabilities" => Some(ClassScores::Probabilities),
            _ => None,
        }
    }
}
