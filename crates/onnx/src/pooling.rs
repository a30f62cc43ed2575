//! Turning model outputs into per-row results: pooling token states into one vector,
//! L2 normalisation, softmax and the best class. Pure arithmetic on slices.

/// Mean of the token states whose attention mask is non-zero.
///
/// `token_states` is one row's `[seq, hidden]` states, row-major; `attention_mask` has `seq`
/// entries. A row with no real token gives zeros.
pub fn mean_pool(token_states: &[f32], attention_mask: &[i64], hidden: usize) -> Vec<f32> {
    let mut sum = vec![0.0f32; hidden];
    let mut real_tokens = 0usize;
    for (state, mask) in token_states.chunks_exact(hidden).zip(attention_mask) {
        if *mask != 0 {
            real_tokens += 1;
            for (total, value) in sum.iter_mut().zip(state) {
                *total += value;
            }
        }
    }
    if real_tokens > 0 {
        let scale = 1.0 / real_tokens as f32;
        sum.iter_mut().for_each(|value| *value *= scale);
    }
    sum
}

/// The first token's state (`[CLS]` for BERT-style models).
pub fn first_token(token_states: &[f32], hidden: usize) -> Vec<f32> {
    token_states[..hidden].to_vec()
}

/// Scale `vector` to unit Euclidean length; a zero vector stays zero.
pub fn l2_normalise(vector: &mut [f32]) {
    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    // The same floor as sentence-transformers' normalisation.
    let scale = 1.0 / norm.max(1e-12);
    vector.iter_mut().for_each(|v| *v *= scale);
}

/// Probabilities from logits, computed stably (the largest logit is subtracted first).
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let largest = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exponentials: Vec<f32> = logits.iter().map(|v| (v - largest).exp()).collect();
    let total: f32 = exponentials.iter().sum();
    exponentials.into_iter().map(|v| v / total).collect()
}

/// Index and value of the largest score; the first one on a tie. `None` when empty.
pub fn best_score(scores: &[f32]) -> Option<(usize, f32)> {
    scores
        .iter()
        .copied()
        .enumerate()
        .fold(None, |best, (index, score)| match best {
            Some((_, best_score)) if best_score >= score => best,
            _ => Some((index, score)),
        })
}

/// Cosine similarity of two vectors of equal length (0 when either is zero).
pub fn cosine_similarity(left: &[f32], right: &[f32]) -> f32 {
    let dot: f64 = left
        .iter()
        .zip(right)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    let left_norm: f64 = left.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    let right_norm: f64 = right
        .iter()
        .map(|b| (*b as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    if left_norm == 0.0 || right_norm == 0.0 {
        0.0
    } else {
        (dot / (left_norm * right_norm)) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_pool_ignores_masked_tokens() {
        let states = [1.0, 2.0, 3.0, 4.0, 100.0, 100.0];
        assert_eq!(mean_pool(&states, &[1, 1, 0], 2), vec![2.0, 3.0]);
    }

    #[test]
    fn mean_pool_of_a_fully_masked_row_is_zero() {
        assert_eq!(mean_pool(&[5.0, 6.0], &[0], 2), vec![0.0, 0.0]);
    }

    #[test]
    fn first_token_takes_the_first_state() {
        assert_eq!(first_token(&[1.0, 2.0, 3.0, 4.0], 2), vec![1.0, 2.0]);
    }

    #[test]
    fn l2_normalise_gives_unit_length() {
        let mut vector = vec![3.0, 4.0];
        l2_normalise(&mut vector);
        assert_eq!(vector, vec![0.6, 0.8]);
        let mut zero = vec![0.0, 0.0];
        l2_normalise(&mut zero);
        assert_eq!(zero, vec![0.0, 0.0]);
    }

    #[test]
    fn softmax_sums_to_one_and_survives_large_logits() {
        let probabilities = softmax(&[1000.0, 1000.0, 0.0]);
        assert!((probabilities[0] - 0.5).abs() < 1e-6);
        assert!((probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(probabilities[2] < 1e-6);
    }

    #[test]
    fn best_score_picks_the_first_maximum() {
        assert_eq!(best_score(&[0.1, 0.7, 0.7, 0.2]), Some((1, 0.7)));
        assert_eq!(best_score(&[]), None);
    }

    #[test]
    fn cosine_similarity_of_parallel_and_orthogonal_vectors() {
        assert!((cosine_similarity(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-6);
        assert_eq!(cosine_similarity(&[1.0, 0.0], &[0.0, 3.0]), 0.0);
        assert_eq!(cosine_similarity(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }
}
