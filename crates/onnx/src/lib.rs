//! The local-model processor of `backfill` (`[model] kind = "onnx"`): runs an ONNX model
//! with tract over text rows and returns a sentence embedding or a classification per row.
//!
//! The main crate renders each row's `input` template, calls [`OnnxProcessor::process`] on a
//! slice of texts (from `spawn_blocking`), and stores the [`Output`]s; it owns the queue,
//! store, progress and ledger. Inside: texts are tokenised with a Hugging Face
//! `tokenizer.json` and truncated at `max_length` ([`tokenize`]), cut into batches by a
//! budget of padded tokens after sorting by length ([`batch_plan`]), padded
//! ([`padded_batch`]), run on `threads` threads ([`processor`], [`model`]), and pooled or
//! classified ([`output`], [`pooling`]). [`embedding_format`] encodes embeddings for storage.

pub mod batch_plan;
pub mod bf16_matmul;
pub mod config;
pub mod const_fold;
pub mod embedding_format;
pub mod error;
pub mod model;
pub mod nan_guard;
pub mod output;
pub mod padded_batch;
pub mod pass_size;
pub mod plan_cache;
pub mod pooling;
pub mod processor;
pub mod tokenize;

pub use batch_plan::{
    Batch, BatchPolicy, PlanSummary, plan_batches, spread_over_threads, summarise_plan,
};
pub use config::{ClassScores, FASTEST_PASS_TOKENS, OnnxConfig, OutputKind, Pooling};
pub use embedding_format::{
    EmbeddingDecodeError, embedding_from_f32le, embedding_to_f32le, embedding_to_json,
};
pub use error::{LoadError, RunError};
pub use output::Output;
pub use processor::{OnnxProcessor, Tokenized};

#[cfg(test)]
mod thread_safety {
    #[test]
    fn the_processor_can_be_shared_across_threads() {
        fn shared<T: Send + Sync + 'static>() {}
        shared::<super::OnnxProcessor>();
    }
}
