//! One batch's input tensors, flattened row-major `[rows, padded_length]`: token ids padded
//! with the tokenizer's pad id, an attention mask of 1 for real tokens and 0 for padding,
//! and token type ids padded with 0. Pure.

use crate::tokenize::TokenizedText;

/// The model inputs of one batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaddedBatch {
    pub rows: usize,
    pub padded_length: usize,
    pub token_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub token_type_ids: Vec<i64>,
}

impl PaddedBatch {
    /// Pad `texts` to `padded_length` (at least the longest of them, and at least 1).
    ///
    /// A text with no tokens at all (possible only with a tokenizer that adds no special
    /// tokens) becomes one pad token marked real, so every row has a defined output.
    pub fn new(texts: &[&TokenizedText], padded_length: usize, pad_token_id: i64) -> Self {
        let longest = texts.iter().map(|text| text.len()).max().unwrap_or(0);
        let padded_length = padded_length.max(longest).max(1);
        let size = texts.len() * padded_length;
        let mut batch = PaddedBatch {
            rows: texts.len(),
            padded_length,
            token_ids: Vec::with_capacity(size),
            attention_mask: Vec::with_capacity(size),
            token_type_ids: Vec::with_capacity(size),
        };
        for text in texts {
            let real = text.len().max(1);
            if text.is_empty() {
                batch.token_ids.push(pad_token_id);
                batch.token_type_ids.push(0);
            } else {
                batch.token_ids.extend_from_slice(&text.token_ids);
                batch.token_type_ids.extend_from_slice(&text.token_type_ids);
            }
            batch
                .token_ids
                .extend(std::iter::repeat_n(pad_token_id, padded_length - real));
            batch
                .token_type_ids
                .extend(std::iter::repeat_n(0, padded_length - real));
            batch.attention_mask.extend(std::iter::repeat_n(1, real));
            batch
                .attention_mask
                .extend(std::iter::repeat_n(0, padded_length - real));
        }
        batch
    }

    /// The attention mask of row `row`.
    pub fn mask_of_row(&self, row: usize) -> &[i64] {
        &self.attention_mask[row * self.padded_length..(row + 1) * self.padded_length]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(ids: &[i64]) -> TokenizedText {
        TokenizedText {
            token_ids: ids.to_vec(),
            token_type_ids: vec![0; ids.len()],
        }
    }

    #[test]
    fn rows_are_padded_to_the_batch_length_with_a_zero_mask() {
        let (long, short) = (text(&[101, 7, 8, 102]), text(&[101, 102]));
        let batch = PaddedBatch::new(&[&long, &short], 4, 0);
        assert_eq!((batch.rows, batch.padded_length), (2, 4));
        assert_eq!(batch.token_ids, vec![101, 7, 8, 102, 101, 102, 0, 0]);
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 1, 1, 0, 0]);
        assert_eq!(batch.token_type_ids, vec![0; 8]);
        assert_eq!(batch.mask_of_row(1), &[1, 1, 0, 0]);
    }

    #[test]
    fn padded_length_never_cuts_a_row() {
        let long = text(&[1, 2, 3]);
        assert_eq!(PaddedBatch::new(&[&long], 2, 0).padded_length, 3);
    }

    #[test]
    fn the_pad_id_fills_padding_and_type_ids_are_kept() {
        let row = TokenizedText {
            token_ids: vec![5, 6],
            token_type_ids: vec![0, 1],
        };
        let batch = PaddedBatch::new(&[&row], 3, 9);
        assert_eq!(batch.token_ids, vec![5, 6, 9]);
        assert_eq!(batch.token_type_ids, vec![0, 1, 0]);
    }

    #[test]
    fn an_empty_row_becomes_one_real_pad_token() {
        let (empty, other) = (text(&[]), text(&[4, 4]));
        let batch = PaddedBatch::new(&[&empty, &other], 2, 3);
        assert_eq!(batch.token_ids, vec![3, 3, 4, 4]);
        assert_eq!(batch.attention_mask, vec![1, 0, 1, 1]);
    }
}
