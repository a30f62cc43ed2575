//! The batch planner's rules: every row once, budgets, sorting within windows, power-of-two
//! row counts, length buckets.

use backfill_onnx::batch_plan::{
    Batch, BatchPolicy, PlanSummary, bucketed_length, plan_batches, spread_over_threads,
    summarise_plan,
};

fn policy(max_batch_tokens: usize, sort_window: usize) -> BatchPolicy {
    BatchPolicy {
        max_batch_tokens,
        sort_window,
        length_bucket: 1,
        max_length: 0,
    }
}

/// Deterministic pseudo-random lengths in 1..=max.
fn lengths(count: usize, max: usize, seed: u64) -> Vec<usize> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
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
        let longest = batch
            .indices
            .iter()
            .map(|i| token_lengths[*i])
            .max()
            .unwrap();
        assert_eq!(batch.padded_length, longest);
        assert!(batch.padded_tokens() <= 1000, "{batch:?}");
    }
}

#[test]
fn a_row_longer_than_the_budget_gets_a_batch_of_its_own() {
    let batches = plan_batches(&[10, 500, 10], &policy(100, 10));
    assert_eq!(
        batches[0],
        Batch {
            indices: vec![1],
            padded_length: 500
        }
    );
    assert_eq!(
        batches[1],
        Batch {
            indices: vec![0, 2],
            padded_length: 10
        }
    );
}

#[test]
fn batches_fill_the_budget_greedily_longest_first() {
    // Budget 60, longest first: [30, 30] = 60; [20, 20, 10] = 3 × 20 = 60, cut into
    // [20, 20] and [10]; then [5].
    let batches = plan_batches(&[20, 30, 5, 20, 30, 10], &policy(60, 100));
    let indices: Vec<Vec<usize>> = batches.iter().map(|b| b.indices.clone()).collect();
    assert_eq!(indices, vec![vec![1, 4], vec![0, 3], vec![5], vec![2]]);
    assert_eq!(
        batches.iter().map(|b| b.padded_length).collect::<Vec<_>>(),
        vec![30, 20, 10, 5]
    );
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
    let sorted = summarise_plan(
        &token_lengths,
        &plan_batches(&token_lengths, &policy(4096, 500)),
    );
    let unsorted_padded = padded_tokens_in_input_order(&token_lengths, 4096);
    assert!(
        sorted.padded_tokens * 3 < unsorted_padded * 2,
        "{sorted:?} vs {unsorted_padded}"
    );
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
fn row_counts_are_powers_of_two() {
    let token_lengths = lengths(3000, 200, 21);
    let batches = plan_batches(&token_lengths, &policy(3000, 700));
    assert!(
        batches
            .iter()
            .all(|batch| batch.indices.len().is_power_of_two())
    );
    let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    seen.sort();
    assert_eq!(seen, (0..3000).collect::<Vec<_>>());
}

#[test]
fn a_seven_row_batch_becomes_four_two_and_one() {
    let batches = plan_batches(&[10, 9, 8, 7, 6, 5, 4], &policy(70, 10));
    let sizes: Vec<usize> = batches.iter().map(|b| b.indices.len()).collect();
    assert_eq!(sizes, vec![4, 2, 1]);
    assert_eq!(
        batches.iter().map(|b| b.padded_length).collect::<Vec<_>>(),
        vec![10, 6, 4]
    );
}

#[test]
fn a_window_of_one_keeps_input_order() {
    let batches = plan_batches(&[3, 9, 4, 8], &policy(100, 1));
    let flat: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(flat, vec![0, 1, 2, 3]);
}

#[test]
fn padded_lengths_round_up_to_the_bucket() {
    let rounded = BatchPolicy {
        max_batch_tokens: 64,
        sort_window: 10,
        length_bucket: 8,
        max_length: 0,
    };
    let batches = plan_batches(&[9, 3, 17], &rounded);
    assert_eq!(
        batches[0],
        Batch {
            indices: vec![2, 0],
            padded_length: 24
        }
    );
    assert_eq!(
        batches[1],
        Batch {
            indices: vec![1],
            padded_length: 8
        }
    );
}

#[test]
fn rounding_stops_at_max_length_but_never_cuts_a_row() {
    let policy = BatchPolicy {
        max_batch_tokens: 1000,
        sort_window: 10,
        length_bucket: 16,
        max_length: 20,
    };
    assert_eq!(bucketed_length(17, &policy), 20);
    assert_eq!(bucketed_length(5, &policy), 16);
    assert_eq!(bucketed_length(0, &policy), 16);
    assert_eq!(bucketed_length(30, &policy), 30);
}

#[test]
fn bucketing_limits_the_distinct_padded_lengths() {
    let token_lengths = lengths(1000, 256, 9);
    let policy = BatchPolicy {
        max_batch_tokens: 4096,
        sort_window: 1000,
        length_bucket: 32,
        max_length: 256,
    };
    let mut distinct: Vec<usize> = plan_batches(&token_lengths, &policy)
        .iter()
        .map(|b| b.padded_length)
        .collect();
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
    let summary = summarise_plan(
        &token_lengths,
        &plan_batches(&token_lengths, &policy(100, 10)),
    );
    assert_eq!(
        summary,
        PlanSummary {
            batches: 1,
            rows: 2,
            real_tokens: 6,
            padded_tokens: 8
        }
    );
    assert_eq!(summary.fill_ratio(), 0.75);
}

#[test]
fn passes_are_split_until_every_thread_has_one() {
    let token_lengths = [8, 8, 8, 8, 8, 8, 8, 8];
    let policy = policy(64, 100);
    let batches = plan_batches(&token_lengths, &policy);
    assert_eq!(batches.len(), 1);
    let spread = spread_over_threads(batches, 2, &token_lengths, &policy);
    assert_eq!(
        spread.iter().map(|b| b.indices.len()).collect::<Vec<_>>(),
        [4, 4]
    );
    let spread = spread_over_threads(spread, 3, &token_lengths, &policy);
    assert_eq!(spread.len(), 3);
    let mut rows: Vec<usize> = spread.iter().flat_map(|b| b.indices.clone()).collect();
    rows.sort();
    assert_eq!(rows, (0..8).collect::<Vec<_>>());
    assert!(spread.iter().all(|b| b.indices.len().is_power_of_two()));
    // One row cannot be split: fewer passes than threads.
    let alone = spread_over_threads(plan_batches(&[5], &policy), 4, &[5], &policy);
    assert_eq!(alone.len(), 1);
}

#[test]
fn split_halves_are_padded_to_their_own_longest_row() {
    let token_lengths = [30, 30, 4, 4];
    let policy = policy(120, 10);
    let spread = spread_over_threads(
        plan_batches(&token_lengths, &policy),
        2,
        &token_lengths,
        &policy,
    );
    assert_eq!(
        spread
            .iter()
            .map(|b| (b.indices.len(), b.padded_length))
            .collect::<Vec<_>>(),
        [(2, 30), (2, 4)]
    );
}

#[test]
fn long_max_lengths_still_give_few_distinct_padded_lengths() {
    let policy = BatchPolicy {
        max_batch_tokens: 1 << 20,
        sort_window: 1,
        length_bucket: 32,
        max_length: 8192,
    };
    let mut distinct: Vec<usize> = (1..=8192)
        .map(|length| bucketed_length(length, &policy))
        .collect();
    assert!(
        (1..=8192).all(|length| {
            let padded = bucketed_length(length, &policy);
            padded >= length && padded - length < 32.max(length / 8)
        }),
        "never below the row, less than a bucket or 12.5 % of padding"
    );
    distinct.dedup();
    // 32..256 in steps of 32, then 8 per doubling up to 8192.
    assert!(distinct.len() <= 8 + 8 * 5, "{} lengths", distinct.len());
}
