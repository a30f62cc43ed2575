//! The local-model processor: texts in, one [`Output`] per text out. Tokenises, plans
//! forward passes of the fastest size within the `max_batch_tokens` bound, splits them until
//! every thread has one, and runs them on `threads` threads, each with its own model state,
//! longest passes first so the threads finish together.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::Instant;

use crate::batch_plan::{
    Batch, BatchPolicy, PlanSummary, plan_batches, spread_over_threads, summarise_plan,
};
use crate::config::{FASTEST_PASS_TOKENS, OnnxConfig, OutputKind};
use crate::error::{LoadError, RunError};
use crate::model::{CLASSIFICATION_OUTPUT_NAMES, EMBEDDING_OUTPUT_NAMES, OnnxModel};
use crate::output::{Output, OutputSettings, outputs_of_batch};
use crate::padded_batch::PaddedBatch;
use crate::pass_size::{self, ProbeKey, Timings};
use crate::tokenize::{TextTokenizer, TokenizedText};

/// A loaded model job. `Send + Sync`: share it (e.g. in an `Arc`) and call [`process`]
/// from any thread, such as `tokio::task::spawn_blocking`.
///
/// [`process`]: OnnxProcessor::process
#[derive(Debug)]
pub struct OnnxProcessor {
    tokenizer: TextTokenizer,
    model: OnnxModel,
    settings: OutputSettings,
    policy: BatchPolicy,
    threads: usize,
    output_width: usize,
}

impl OnnxProcessor {
    /// Check the settings, load the tokenizer and the model, and run the model once on one
    /// row of `max_length` tokens to check its inputs, outputs and labels.
    pub fn load(config: &OnnxConfig) -> Result<Self, LoadError> {
        check_settings(config)?;
        let tokenizer = TextTokenizer::load(&config.tokenizer_path, config.max_length)?;
        let preferred_outputs = match config.output {
            OutputKind::Embedding => EMBEDDING_OUTPUT_NAMES,
            OutputKind::Classification => CLASSIFICATION_OUTPUT_NAMES,
        };
        let model = OnnxModel::load(&config.model_path, preferred_outputs, config.bf16_products)?;
        let mut processor = OnnxProcessor {
            tokenizer,
            model,
            settings: OutputSettings {
                kind: config.output.clone(),
                pooling: config.pooling,
                class_scores: config.class_scores,
                labels: config.labels.clone(),
            },
            policy: BatchPolicy {
                max_batch_tokens: config.max_batch_tokens,
                sort_window: config.sort_window,
                length_bucket: config.length_bucket,
                max_length: config.max_length,
            },
            threads: config.threads,
            output_width: 0,
        };
        processor.output_width = processor.test_run(config.max_length)?;
        processor.policy.max_batch_tokens = match config.pass_tokens {
            Some(forced) => forced.min(config.max_batch_tokens),
            None => processor.choose_pass_tokens(config),
        };
        Ok(processor)
    }

    /// The fastest pass size within `max_batch_tokens`: from the timings cached for this
    /// model file and thread count, else from a probe (whose timings are then cached).
    fn choose_pass_tokens(&self, config: &OnnxConfig) -> usize {
        let candidates = pass_size::candidates_within(config.max_batch_tokens);
        if candidates.len() < 2 {
            // Below the smallest candidate the bound is the pass size; at a single candidate
            // there is nothing to compare.
            return candidates.first().copied().unwrap_or(config.max_batch_tokens);
        }
        let row_length = pass_size::PROBE_ROW_LENGTH.min(config.max_length);
        let bf16 = self.model.bf16_products() > 0;
        let key = ProbeKey::of(&config.model_path, self.threads, row_length, bf16);
        let file = config.pass_cache.clone().or_else(pass_size::cache_file);
        let mut timings = match (&file, &key) {
            (Some(file), Some(key)) => pass_size::read_cached(file, key),
            _ => Timings::new(),
        };
        if let Some(size) = pass_size::fastest(&timings, &candidates) {
            tracing::info!(pass_tokens = size, ?timings, file = ?file, "onnx pass size from the cache");
            return size;
        }
        let missing: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|size| !timings.contains_key(size))
            .collect();
        let started = Instant::now();
        timings.extend(self.probe(&missing, row_length));
        let chosen = pass_size::fastest(&timings, &candidates)
            .or_else(|| {
                // Over budget before every size was timed: the fastest of those timed.
                let timed: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|size| timings.contains_key(size))
                    .collect();
                pass_size::fastest(&timings, &timed)
            })
            .unwrap_or(FASTEST_PASS_TOKENS.min(config.max_batch_tokens));
        let microseconds_per_token: Vec<(usize, f64)> = timings
            .iter()
            .map(|(size, seconds)| (*size, (seconds * 1e7).round() / 10.0))
            .collect();
        tracing::info!(
            pass_tokens = chosen,
            ?microseconds_per_token,
            row_length,
            threads = self.threads,
            probe_seconds = started.elapsed().as_secs_f64(),
            "onnx pass size probed"
        );
        if let (Some(file), Some(key)) = (&file, &key)
            && let Err(error) = pass_size::store(file, key, &timings)
        {
            tracing::warn!(%error, file = %file.display(), "could not keep the onnx pass size");
        }
        chosen
    }

    /// Seconds per padded token of passes of each of `sizes` (smallest first), on synthetic
    /// rows of `row_length` tokens, all threads running passes at once. Only steady compute is
    /// timed: the plans are compiled first (spread over the threads) and each thread runs one
    /// untimed pass per size before its timed ones. Stops trying larger sizes once the timed
    /// passes have taken [`pass_size::PROBE_BUDGET_SECONDS`].
    fn probe(&self, sizes: &[usize], row_length: usize) -> Timings {
        let row = TokenizedText {
            token_ids: vec![self.tokenizer.pad_token_id(); row_length],
            token_type_ids: vec![0; row_length],
        };
        let batches: Vec<(usize, PaddedBatch)> = sizes
            .iter()
            .map(|size| {
                let rows = (size / row_length).max(1);
                let padded = PaddedBatch::new(&vec![&row; rows], row_length, self.tokenizer.pad_token_id());
                (*size, padded)
            })
            .collect();
        self.compile_plans(batches.iter().map(|(_, padded)| (padded.rows, padded.padded_length)));
        let mut timings = Timings::new();
        let mut timed_seconds = 0.0;
        for (size, padded) in &batches {
            if timed_seconds > pass_size::PROBE_BUDGET_SECONDS {
                break;
            }
            let passes = (pass_size::PROBE_TOKENS_PER_THREAD / padded.rows / row_length).max(1);
            let barrier = Barrier::new(self.threads);
            let run = || -> Result<(Instant, Instant), RunError> {
                let mut state = self.model.new_state();
                // Warms the state's buffers and the caches: not timed.
                self.model.run(&mut state, padded)?;
                barrier.wait();
                let begun = Instant::now();
                for _ in 0..passes {
                    self.model.run(&mut state, padded)?;
                }
                Ok((begun, Instant::now()))
            };
            let spans: Result<Vec<_>, RunError> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..self.threads).map(|_| scope.spawn(run)).collect();
                handles
                    .into_iter()
                    .map(|handle| handle.join().map_err(panic_error)?)
                    .collect()
            });
            let Ok(spans) = spans else {
                tracing::warn!(pass_tokens = size, "the onnx pass-size probe failed on this size");
                continue;
            };
            let (Some(begun), Some(ended)) = (
                spans.iter().map(|span| span.0).min(),
                spans.iter().map(|span| span.1).max(),
            ) else {
                continue;
            };
            let seconds = (ended - begun).as_secs_f64();
            timed_seconds += seconds;
            let tokens = (self.threads * passes * padded.rows * padded.padded_length) as f64;
            timings.insert(*size, seconds / tokens);
        }
        timings
    }

    /// Compile the plans of `shapes` (rows, padded length), up to `threads` at once.
    fn compile_plans(&self, shapes: impl Iterator<Item = (usize, usize)>) {
        let shapes: Vec<(usize, usize)> = shapes.collect();
        let next = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..self.threads.min(shapes.len()) {
                scope.spawn(|| {
                    while let Some((rows, length)) = shapes.get(next.fetch_add(1, Ordering::Relaxed)) {
                        // A shape that fails to compile fails again, with its error, when run.
                        let _ = self.model.compile(*rows, *length);
                    }
                });
            }
        });
    }

    /// Embedding dimension, or the number of classes.
    pub fn output_width(&self) -> usize {
        self.output_width
    }

    /// The padded tokens of one forward pass: the fastest size within `max_batch_tokens`.
    pub fn pass_tokens(&self) -> usize {
        self.policy.max_batch_tokens
    }

    /// How many products with constant weights run in bf16 (see [`crate::bf16_matmul`]).
    pub fn bf16_products(&self) -> usize {
        self.model.bf16_products()
    }

    /// How many per-length plans have been compiled so far (see [`crate::plan_cache`]).
    pub fn compiled_plans(&self) -> usize {
        self.model.compiled_plans()
    }

    /// One output per text, in order. Fails as a whole if any batch fails.
    pub fn process(&self, texts: &[String]) -> Result<Vec<Output>, RunError> {
        self.process_tokenized(&self.tokenize(texts)?)
    }

    /// Tokenise `texts` (on `threads` threads) for [`process_tokenized`]: a caller can
    /// prepare the next texts while the model computes the current ones.
    ///
    /// [`process_tokenized`]: OnnxProcessor::process_tokenized
    pub fn tokenize(&self, texts: &[String]) -> Result<Tokenized, RunError> {
        Ok(Tokenized(self.tokenize_all(texts)?))
    }

    /// One output per tokenised text, in order; the same as [`process`] on the texts.
    ///
    /// [`process`]: OnnxProcessor::process
    pub fn process_tokenized(&self, tokenized: &Tokenized) -> Result<Vec<Output>, RunError> {
        let tokenized = &tokenized.0;
        let lengths: Vec<usize> = tokenized.iter().map(TokenizedText::len).collect();
        let batches = self.plan(&lengths);
        tracing::debug!(summary = ?summarise_plan(&lengths, &batches), threads = self.threads, "onnx batch plan");
        self.run_batches(tokenized, &batches)
    }

    /// The forward passes for rows of `lengths`: cut at the pass size, then split until
    /// every thread has one, longest-processing first so no thread is left with a big pass
    /// at the end.
    fn plan(&self, lengths: &[usize]) -> Vec<Batch> {
        spread_over_threads(
            plan_batches(lengths, &self.policy),
            self.threads,
            lengths,
            &self.policy,
        )
    }

    /// Token counts of `texts` after truncation (special tokens included): for dry runs and
    /// reports.
    pub fn token_counts(&self, texts: &[String]) -> Result<Vec<usize>, RunError> {
        Ok(self
            .tokenize_all(texts)?
            .iter()
            .map(TokenizedText::len)
            .collect())
    }

    /// The forward passes `process` would run for `texts`, longest first.
    pub fn plan_passes(&self, texts: &[String]) -> Result<Vec<Batch>, RunError> {
        Ok(self.plan(&self.token_counts(texts)?))
    }

    /// The batches `process` would run for `texts`, summarised.
    pub fn plan_summary(&self, texts: &[String]) -> Result<PlanSummary, RunError> {
        let lengths = self.token_counts(texts)?;
        Ok(summarise_plan(&lengths, &self.plan(&lengths)))
    }

    fn tokenize_all(&self, texts: &[String]) -> Result<Vec<TokenizedText>, RunError> {
        let chunk_size = texts.len().div_ceil(self.threads).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = texts
                .chunks(chunk_size)
                .enumerate()
                .map(|(chunk_index, chunk)| {
                    scope.spawn(move || {
                        chunk
                            .iter()
                            .enumerate()
                            .map(|(offset, text)| {
                                self.tokenizer
                                    .tokenize(chunk_index * chunk_size + offset, text)
                            })
                            .collect::<Result<Vec<_>, _>>()
                    })
                })
                .collect();
            let mut tokenized = Vec::with_capacity(texts.len());
            for handle in handles {
                tokenized.extend(handle.join().map_err(panic_error)??);
            }
            Ok(tokenized)
        })
    }

    fn run_batches(
        &self,
        tokenized: &[TokenizedText],
        batches: &[Batch],
    ) -> Result<Vec<Output>, RunError> {
        // Each batch's outputs land at their rows' indices; a Mutex because writes are rare
        // (once per batch) next to the forward pass that produced them.
        let slots: Mutex<Vec<Option<Output>>> = Mutex::new(vec![None; tokenized.len()]);
        let next_batch = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let worker = || -> Result<(), RunError> {
            let mut state = self.model.new_state();
            loop {
                let batch_index = next_batch.fetch_add(1, Ordering::Relaxed);
                if batch_index >= batches.len() || failed.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let batch = &batches[batch_index];
                let result = self.run_one_batch(&mut state, tokenized, batch);
                let outputs = result.inspect_err(|_| failed.store(true, Ordering::Relaxed))?;
                let mut slots = slots
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                for (index, output) in batch.indices.iter().zip(outputs) {
                    slots[*index] = Some(output);
                }
            }
        };
        let thread_count = self.threads.min(batches.len()).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..thread_count).map(|_| scope.spawn(worker)).collect();
            // Join every thread before reporting, so the first error is a batch's own error.
            let results: Vec<_> = handles.into_iter().map(|handle| handle.join()).collect();
            for result in results {
                result.map_err(panic_error)??;
            }
            Ok::<(), RunError>(())
        })?;
        let slots = slots
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        slots
            .into_iter()
            .enumerate()
            .map(|(index, slot)| {
                slot.ok_or_else(|| RunError::WorkerPanicked {
                    message: format!("row {index} got no output"),
                })
            })
            .collect()
    }

    fn run_one_batch(
        &self,
        state: &mut crate::model::ModelState,
        tokenized: &[TokenizedText],
        batch: &Batch,
    ) -> Result<Vec<Output>, RunError> {
        let rows: Vec<&TokenizedText> = batch
            .indices
            .iter()
            .map(|index| &tokenized[*index])
            .collect();
        let padded = PaddedBatch::new(&rows, batch.padded_length, self.tokenizer.pad_token_id());
        let output = self.model.run(state, &padded)?;
        outputs_of_batch(
            output.shape(),
            output.values(),
            &padded,
            &batch.indices,
            &self.settings,
        )
    }

    /// Run one row of `max_length` pad tokens; the width of its output.
    fn test_run(&self, max_length: usize) -> Result<usize, LoadError> {
        let path = self.model.path().to_path_buf();
        let failed = |message: String| LoadError::TestRunFailed {
            path: path.clone(),
            max_length,
            message,
        };
        let row = TokenizedText {
            token_ids: vec![self.tokenizer.pad_token_id(); max_length],
            token_type_ids: vec![0; max_length],
        };
        let padded = PaddedBatch::new(&[&row], max_length, self.tokenizer.pad_token_id());
        let mut state = self.model.new_state();
        let output = self
            .model
            .run(&mut state, &padded)
            .map_err(|error| failed(error.to_string()))?;
        let shape = output.shape().to_vec();
        let kind = &self.settings.kind;
        match (kind, shape.as_slice()) {
            (OutputKind::Embedding, [1, hidden] | [1, _, hidden]) if *hidden > 0 => {}
            (OutputKind::Classification, [1, classes])
                if *classes != self.settings.labels.len() =>
            {
                let (classes, labels) = (*classes, self.settings.labels.len());
                return Err(LoadError::LabelCountMismatch {
                    path,
                    classes,
                    labels,
                });
            }
            (OutputKind::Classification, [1, _]) => {}
            _ => {
                let (name, wanted) = match kind {
                    OutputKind::Embedding => {
                        ("embedding", "[rows, sequence, hidden] or [rows, hidden]")
                    }
                    OutputKind::Classification => ("classification", "[rows, classes]"),
                };
                let message = format!(
                    "its output has shape {shape:?} for one row of {max_length} tokens; \
                     output = \"{name}\" needs {wanted}"
                );
                return Err(LoadError::UnsupportedOutput { path, message });
            }
        }
        outputs_of_batch(&shape, output.values(), &padded, &[0], &self.settings)
            .map_err(|error| failed(error.to_string()))?;
        Ok(*shape.last().unwrap_or(&0))
    }
}

/// Texts tokenised by [`OnnxProcessor::tokenize`].
#[derive(Clone, Debug)]
pub struct Tokenized(Vec<TokenizedText>);

impl Tokenized {
    /// Rows.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each row's token count after truncation (special tokens included).
    pub fn token_counts(&self) -> Vec<usize> {
        self.0.iter().map(TokenizedText::len).collect()
    }
}

fn check_settings(config: &OnnxConfig) -> Result<(), LoadError> {
    let invalid =
        |key: &'static str, message: String| Err(LoadError::InvalidSetting { key, message });
    if config.max_length == 0 {
        return invalid("max_length", "must be at least 1 token".into());
    }
    if config.max_batch_tokens == 0 {
        // Below max_length is fine: a row longer than the budget runs in a batch of its own.
        return invalid("max_batch_tokens", "must be at least 1 token".into());
    }
    if config.pass_tokens == Some(0) {
        return invalid("pass_tokens", "must be at least 1 token".into());
    }
    if config.threads == 0 {
        return invalid("threads", "must be at least 1".into());
    }
    if config.length_bucket == 0 {
        return invalid("length_bucket", "must be at least 1 token".into());
    }
    if config.sort_window == 0 {
        return invalid("sort_window", "must be at least 1 row".into());
    }
    if config.output == OutputKind::Classification && config.labels.is_empty() {
        return invalid(
            "labels",
            "output = \"classification\" needs labels = [...], one per model class".into(),
        );
    }
    Ok(())
}

fn panic_error(payload: Box<dyn std::any::Any + Send>) -> RunError {
    let message = payload
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
    RunError::WorkerPanicked { message }
}
