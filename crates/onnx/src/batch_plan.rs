//! The batch planner: which rows go into which forward pass.
//!
//! A forward pass costs roughly rows × padded length (every row is padded to the longest in
//! its batch), so batches are cut by a budget of *padded* tokens, and rows are sorted by
//! length within a window first so that rows of similar length share a batch and little is
//! spent on padding. Pure: token lengths in, row indices out.

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
        if self.padded_tokens == 0 { 1.0 } else { self.real_tokens as f64 / self.padded_tokens as f64 }
    }
}

/// Cut rows of the given token lengths into batches under `policy`.
///
/// Every index of `token_lengths` appears in exactly one batch. Rows are only sorted within
/// their window, so batches never mix rows of different windows. A length of 0 counts as 1
/// (an empty row still occupies one position).
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
                    batches.extend(current.take());
                    current = Some(Batch { indices: vec![index], padded_length });
                }
            }
        }
        batches.extend(current);
        window_start = window_end;
    }
    batches
}

/// Totals of `batches` planned over `token_lengths`.
pub fn summarise_plan(token_lengths: &[usize], batches: &[Batch]) -> PlanSummary {
    PlanSummary {
        batches: batches.len(),
        rows: batches.iter().map(|batch| batch.indices.len()).sum(),
        real_tokens: batches.iter().flat_map(|batch| &batch.indices).map(|i| token_lengths[*i]).sum(),
        padded_tokens: batches.iter().map(Batch::padded_tokens).sum(),
    }
}

/// `length` rounded up to the policy's bucket, capped at its `max_length` but never below
/// `length` itself (nor below 1).
pub fn bucketed_length(length: usize, policy: &BatchPolicy) -> usize {
    let length = length.max(1);
    let rounded = length.div_ceil(policy.length_bucket.max(1)) * policy.length_bucket.max(1);
    if policy.max_length == 0 { rounded } else { rounded.min(policy.max_length).max(length) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_batch_tokens: usize, sort_window: usize) -> BatchPolicy {
        BatchPolicy { max_batch_tokens, sort_window, length_bucket: 1, max_length: 0 }
    }

    /// Deterministic pseudo-random lengths in 1..=max.
    fn lengths(count: usize, max: usize, seed: u64) -> Vec<usize> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                1 + (state >> 33) as usize % max
            })
            .collect()
    }

    #[test]
    fn no_rows_give_no_batches() {
        assert!(plan_batches(&[], &policy(100, 10)).is_empty());
    }

    #[test]
    fn every_row_is_planned_exactly_once() {
        let token_lengths = lengths(1000, 256, 7);
        let batches = plan_batches(&token_lengths, &policy(2048, 128));
        let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        seen.sort();
        assert_eq!(seen, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn batches_stay_within_the_padded_token_budget() {
        let token_lengths = lengths(500, 300, 11);
        for batch in plan_batches(&token_lengths, &policy(1000, 500)) {
            let longest = batch.indices.iter().map(|i| token_lengths[*i]).max().unwrap();
            assert_eq!(batch.padded_length, longest);
            assert!(batch.padded_tokens() <= 1000, "{batch:?}");
        }
    }

    #[test]
    fn a_row_longer_than_the_budget_gets_a_batch_of_its_own() {
        let batches = plan_batches(&[10, 500, 10], &policy(100, 10));
        assert_eq!(batches[0], Batch { indices: vec![1], padded_length: 500 });
        assert_eq!(batches[1], Batch { indices: vec![0, 2], padded_length: 10 });
    }

    #[test]
    fn batches_fill_the_budget_greedily_longest_first() {
        // Budget 60, longest first: [30, 30] = 60; [20, 20, 10] = 3 × 20 = 60; [5].
        let batches = plan_batches(&[20, 30, 5, 20, 30, 10], &policy(60, 100));
        let indices: Vec<Vec<usize>> = batches.iter().map(|b| b.indices.clone()).collect();
        assert_eq!(indices, vec![vec![1, 4], vec![0, 3, 5], vec![2]]);
        assert_eq!(batches.iter().map(|b| b.padded_length).collect::<Vec<_>>(), vec![30, 20, 5]);
    }

    /// Padded tokens of the same greedy cut made in input order, without sorting.
    fn padded_tokens_in_input_order(token_lengths: &[usize], max_batch_tokens: usize) -> usize {
        let (mut total, mut rows, mut longest) = (0, 0, 0);
        for length in token_lengths {
            if rows > 0 && (rows + 1) * longest.max(*length) > max_batch_tokens {
                total += rows * longest;
                (rows, longest) = (0, 0);
            }
            rows += 1;
            longest = longest.max(*length);
        }
        total + rows * longest
    }

    #[test]
    fn sorting_within_a_window_cuts_padding() {
        let token_lengths = lengths(2000, 256, 3);
        let sorted = summarise_plan(&token_lengths, &plan_batches(&token_lengths, &policy(4096, 500)));
        let unsorted_padded = padded_tokens_in_input_order(&token_lengths, 4096);
        assert!(sorted.padded_tokens * 3 < unsorted_padded * 2, "{sorted:?} vs {unsorted_padded}");
        assert!(sorted.fill_ratio() > 0.9, "{sorted:?}");
    }

    #[test]
    fn batches_never_mix_windows() {
        let token_lengths = lengths(100, 50, 5);
        for batch in plan_batches(&token_lengths, &policy(400, 30)) {
            let window = batch.indices[0] / 30;
            assert!(batch.indices.iter().all(|i| i / 30 == window), "{batch:?}");
        }
    }

    #[test]
    fn a_window_of_one_keeps_input_order() {
        let batches = plan_batches(&[3, 9, 4, 8], &policy(100, 1));
        let flat: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_eq!(flat, vec![0, 1, 2, 3]);
    }

    #[test]
    fn padded_lengths_round_up_to_the_bucket() {
        let rounded = BatchPolicy { max_batch_tokens: 64, sort_window: 10, length_bucket: 8, max_length: 0 };
        let batches = plan_batches(&[9, 3, 17], &rounded);
        assert_eq!(batches[0], Batch { indices: vec![2, 0], padded_length: 24 });
        assert_eq!(batches[1], Batch { indices: vec![1], padded_length: 8 });
    }

    #[test]
    fn rounding_stops_at_max_length_but_never_cuts_a_row() {
        let policy = BatchPolicy { max_batch_tokens: 1000, sort_window: 10, length_bucket: 16, max_length: 20 };
        assert_eq!(bucketed_length(17, &policy), 20);
        assert_eq!(bucketed_length(5, &policy), 16);
        assert_eq!(bucketed_length(0, &policy), 16);
        assert_eq!(bucketed_length(30, &policy), 30);
    }

    #[test]
    fn bucketing_limits_the_distinct_padded_lengths() {
        let token_lengths = lengths(1000, 256, 9);
        let policy = BatchPolicy { max_batch_tokens: 4096, sort_window: 1000, length_bucket: 32, max_length: 256 };
        let mut distinct: Vec<usize> = plan_batches(&token_lengths, &policy).iter().map(|b| b.padded_length).collect();
        distinct.sort();
        distinct.dedup();
        assert!(distinct.len() <= 8, "{distinct:?}");
        assert!(distinct.iter().all(|length| length % 32 == 0));
    }

    #[test]
    fn empty_rows_count_as_one_token() {
        let batches = plan_batches(&[0, 0, 0], &policy(2, 10));
        assert_eq!(batches.len(), 2);
        assert!(batches.iter().all(|b| b.padded_length == 1));
    }

    #[test]
    fn summary_counts_rows_and_tokens() {
        let token_lengths = [4, 2];
        let summary = summarise_plan(&token_lengths, &plan_batches(&token_lengths, &policy(100, 10)));
        assert_eq!(summary, PlanSummary { batches: 1, rows: 2, real_tokens: 6, padded_tokens: 8 });
        assert_eq!(summary.fill_ratio(), 0.75);
    }
}
