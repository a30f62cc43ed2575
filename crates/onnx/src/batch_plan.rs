//! The batch planner: which rows go into which forward pass.
//!
//! A forward pass costs roughly rows × padded length (every row is padded to the longest in
//! its batch), so batches are cut by a budget of *padded* tokens, and rows are sorted by
//! length within a window first so that rows of similar length share a batch and little is
//! spent on padding. Batches have power-of-two row counts and bucketed lengths, so a job
//! meets few distinct shapes (the runner compiles one plan per shape). Pure: token lengths
//! in, row indices out.

/// How batches are cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPolicy {
    /// The largest rows × padded length of one batch. A row longer than this alone still
    /// gets a batch of its own.
    pub max_batch_tokens: usize,
    /// Rows sorted together by length: consecutive groups of this many rows (at least 1).
    pub sort_window: usize,
    /// Padded lengths are rounded up to a multiple of this (1: no rounding), so that a job
    /// meets few distinct lengths (each gets its own compiled plan).
    pub length_bucket: usize,
    /// Rounding never pads beyond this (the job's `max_length`); 0: no cap.
    pub max_length: usize,
}

/// One forward pass: the rows it holds and the length they are padded to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Indices into the planned token lengths, longest first.
    pub indices: Vec<usize>,
    /// The sequence length of the batch's tensors.
    pub padded_length: usize,
}

impl Batch {
    /// Rows × padded length: what the forward pass computes over.
    pub fn padded_tokens(&self) -> usize {
        self.indices.len() * self.padded_length
    }
}

/// Totals of a plan, for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanSummary {
    pub batches: usize,
    pub rows: usize,
    /// Sum of the rows' own lengths.
    pub real_tokens: usize,
    /// Sum of rows × padded length over all batches.
    pub padded_tokens: usize,
}

impl PlanSummary {
    /// Share of computed tokens that are real (1.0: no padding at all).
    pub fn fill_ratio(&self) -> f64 {
        if self.padded_tokens == 0 {
            1.0
        } else {
            self.real_tokens as f64 / self.padded_tokens as f64
        }
    }
}

/// Cut rows of the given token lengths into batches under `policy`.
///
/// Every index of `token_lengths` appears in exactly one batch. Rows are only sorted within
/// their window, so batches never mix rows of different windows. A batch the budget would
/// fill with a row count that is not a power of two is cut into power-of-two parts, largest
/// (and longest rows) first, each padded only to its own longest row. A length of 0 counts
/// as 1 (an empty row still occupies one position).
pub fn plan_batches(token_lengths: &[usize], policy: &BatchPolicy) -> Vec<Batch> {
    let window = policy.sort_window.max(1);
    let mut batches = Vec::new();
    let mut window_start = 0;
    while window_start < token_lengths.len() {
        let window_end = (window_start + window).min(token_lengths.len());
        let mut order: Vec<usize> = (window_start..window_end).collect();
        // Longest first: a batch's first row fixes its padded length.
        order.sort_by(|a, b| token_lengths[*b].cmp(&token_lengths[*a]).then(a.cmp(b)));
        let mut current: Option<Batch> = None;
        for index in order {
            let padded_length = bucketed_length(token_lengths[index], policy);
            match current.as_mut() {
                Some(batch)
                    if (batch.indices.len() + 1) * batch.padded_length.max(padded_length)
                        <= policy.max_batch_tokens =>
                {
                    batch.padded_length = batch.padded_length.max(padded_length);
                    batch.indices.push(index);
                }
                _ => {
                    batches.extend(
                        current
                            .take()
                            .map(|batch| split_into_powers_of_two(batch, token_lengths, policy))
                            .into_iter()
                            .flatten(),
                    );
                    current = Some(Batch {
                        indices: vec![index],
                        padded_length,
                    });
                }
            }
        }
        batches.extend(
            current
                .map(|batch| split_into_powers_of_two(batch, token_lengths, policy))
                .into_iter()
                .flatten(),
        );
        window_start = window_end;
    }
    batches
}

/// `batch` (longest rows first) as consecutive parts of power-of-two sizes, largest first.
fn split_into_powers_of_two(
    batch: Batch,
    token_lengths: &[usize],
    policy: &BatchPolicy,
) -> Vec<Batch> {
    let mut parts = Vec::new();
    let mut rest: &[usize] = &batch.indices;
    while !rest.is_empty() {
        let size = 1 << rest.len().ilog2();
        let (part, after) = rest.split_at(size);
        let padded_length = bucketed_length(token_lengths[part[0]], policy);
        parts.push(Batch {
            indices: part.to_vec(),
            padded_length,
        });
        rest = after;
    }
    parts
}

/// Totals of `batches` planned over `token_lengths`.
pub fn summarise_plan(token_lengths: &[usize], batches: &[Batch]) -> PlanSummary {
    PlanSummary {
        batches: batches.len(),
        rows: batches.iter().map(|batch| batch.indices.len()).sum(),
        real_tokens: batches
            .iter()
            .flat_map(|batch| &batch.indices)
            .map(|i| token_lengths[*i])
            .sum(),
        padded_tokens: batches.iter().map(Batch::padded_tokens).sum(),
    }
}

/// `length` rounded up to the policy's bucket, capped at its `max_length` but never below
/// `length` itself (nor below 1). With a bucket above 1, the step grows with the length
/// beyond 8 buckets (an eighth of the power of two below it), so a long `max_length` still
/// gives at most 8 distinct lengths per doubling, for at most 12.5 % more padding.
pub fn bucketed_length(length: usize, policy: &BatchPolicy) -> usize {
    let length = length.max(1);
    let bucket = policy.length_bucket.max(1);
    let step = if bucket == 1 {
        1
    } else {
        bucket.max((1usize << length.ilog2()) / 8)
    };
    let rounded = length.div_ceil(step) * step;
    if policy.max_length == 0 {
        rounded
    } else {
        rounded.min(policy.max_length).max(length)
    }
}

/// Split the batches with the most rows in halves until there are at least `threads` batches
/// (or every batch holds one row), so that every thread has a pass to run. Halves keep
/// power-of-two row counts and are padded only to their own longest row; the result is
/// ordered most padded tokens first.
pub fn spread_over_threads(
    mut batches: Vec<Batch>,
    threads: usize,
    token_lengths: &[usize],
    policy: &BatchPolicy,
) -> Vec<Batch> {
    while batches.len() < threads {
        let Some(widest) = (0..batches.len())
            .filter(|index| batches[*index].indices.len() > 1)
            .max_by_key(|index| (batches[*index].padded_tokens(), std::cmp::Reverse(*index)))
        else {
            break;
        };
        let batch = batches.remove(widest);
        let half = batch.indices.len().div_ceil(2);
        let (first, second) = batch.indices.split_at(half);
        for part in [first, second] {
            // Rows are longest first within a batch, so the first row fixes the length.
            let padded_length = bucketed_length(token_lengths[part[0]], policy);
            batches.push(Batch {
                indices: part.to_vec(),
                padded_length,
            });
        }
    }
    batches.sort_by_key(|batch| std::cmp::Reverse(batch.padded_tokens()));
    batches
}
