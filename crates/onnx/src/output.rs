//! From one batch's model output to one [`Output`] per row: pooled and normalised embeddings,
//! or the best label with its probability. Pure.

use crate::config::{ClassScores, OutputKind, Pooling};
use crate::error::RunError;
use crate::padded_batch::PaddedBatch;
use crate::pooling::{best_score, first_token, l2_normalise, mean_pool, softmax};

/// The result for one row.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// A unit-length sentence embedding.
    Embedding(Vec<f32>),
    /// The most probable label and its probability (0..=1).
    Classification { label: String, probability: f32 },
}

impl Output {
    /// The embedding, if this is one.
    pub fn as_embedding(&self) -> Option<&[f32]> {
        match self {
            Output::Embedding(values) => Some(values),
            Output::Classification { .. } => None,
        }
    }
}

/// How outputs are read, from the job's settings.
#[derive(Clone, Debug)]
pub struct OutputSettings {
    pub kind: OutputKind,
    pub pooling: Pooling,
    pub class_scores: ClassScores,
    pub labels: Vec<String>,
}

/// One output per row of `batch`, from the model's f32 output `values` of shape `shape`.
/// `row_indices` are the rows' positions in the caller's input, for error messages.
pub fn outputs_of_batch(
    shape: &[usize],
    values: &[f32],
    batch: &PaddedBatch,
    row_indices: &[usize],
    settings: &OutputSettings,
) -> Result<Vec<Output>, RunError> {
    let bad_shape = || RunError::OutputShape {
        shape: shape.to_vec(),
        rows: batch.rows,
        padded_length: batch.padded_length,
    };
    if shape.first() != Some(&batch.rows) || values.len() != shape.iter().product::<usize>() {
        return Err(bad_shape());
    }
    let rows = batch.rows.max(1);
    let per_row = values.len() / rows;
    let mut outputs = Vec::with_capacity(batch.rows);
    for (row, row_values) in values
        .chunks_exact(per_row.max(1))
        .enumerate()
        .take(batch.rows)
    {
        if row_values.iter().any(|value| !value.is_finite()) {
            return Err(RunError::NonFiniteOutput {
                index: row_indices[row],
            });
        }
        let output = match (&settings.kind, shape) {
            (OutputKind::Embedding, [_, sequence, hidden]) if *sequence == batch.padded_length => {
                let mut pooled = match settings.pooling {
                    Pooling::Mean => mean_pool(row_values, batch.mask_of_row(row), *hidden),
                    Pooling::Cls => first_token(row_values, *hidden),
                };
                l2_normalise(&mut pooled);
                Output::Embedding(pooled)
            }
            (OutputKind::Embedding, [_, _hidden]) => {
                let mut embedding = row_values.to_vec();
                l2_normalise(&mut embedding);
                Output::Embedding(embedding)
            }
            (OutputKind::Classification, [_, classes]) if *classes == settings.labels.len() => {
                let probabilities = match settings.class_scores {
                    ClassScores::Logits => softmax(row_values),
                    ClassScores::Probabilities => row_values.to_vec(),
                };
                let (best, probability) = best_score(&probabilities).ok_or_else(bad_shape)?;
                Output::Classification {
                    label: settings.labels[best].clone(),
                    probability,
                }
            }
            _ => return Err(bad_shape()),
        };
        outputs.push(output);
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::TokenizedText;

    fn settings(kind: OutputKind, pooling: Pooling, labels: &[&str]) -> OutputSettings {
        OutputSettings {
            kind,
            pooling,
            class_scores: ClassScores::Logits,
            labels: labels.iter().map(|label| label.to_string()).collect(),
        }
    }

    fn batch_of_lengths(lengths: &[usize]) -> PaddedBatch {
        let texts: Vec<TokenizedText> = lengths
            .iter()
            .map(|length| TokenizedText {
                token_ids: vec![1; *length],
                token_type_ids: vec![0; *length],
            })
            .collect();
        let refs: Vec<&TokenizedText> = texts.iter().collect();
        PaddedBatch::new(&refs, 0, 0)
    }

    #[test]
    fn token_states_are_mean_pooled_over_real_tokens_and_normalised() {
        let batch = batch_of_lengths(&[2, 1]);
        // [2 rows, 2 tokens, 2 hidden]; row 1's second token is padding and must not count.
        let values = [3.0, 0.0, 3.0, 8.0, 0.0, 2.0, 50.0, 50.0];
        let settings = settings(OutputKind::Embedding, Pooling::Mean, &[]);
        let outputs = outputs_of_batch(&[2, 2, 2], &values, &batch, &[0, 1], &settings).unwrap();
        assert_eq!(
            outputs,
            vec![
                Output::Embedding(vec![0.6, 0.8]),
                Output::Embedding(vec![0.0, 1.0])
            ]
        );
    }

    #[test]
    fn cls_pooling_takes_the_first_token() {
        let batch = batch_of_lengths(&[2]);
        let settings = settings(OutputKind::Embedding, Pooling::Cls, &[]);
        let outputs =
            outputs_of_batch(&[1, 2, 2], &[0.0, 5.0, 9.0, 9.0], &batch, &[0], &settings).unwrap();
        assert_eq!(outputs, vec![Output::Embedding(vec![0.0, 1.0])]);
    }

    #[test]
    fn pooled_model_outputs_are_only_normalised() {
        let batch = batch_of_lengths(&[3]);
        let settings = settings(OutputKind::Embedding, Pooling::Mean, &[]);
        let outputs = outputs_of_batch(&[1, 2], &[0.0, -2.0], &batch, &[0], &settings).unwrap();
        assert_eq!(outputs, vec![Output::Embedding(vec![0.0, -1.0])]);
    }

    #[test]
    fn classification_gives_the_best_label_and_its_probability() {
        let batch = batch_of_lengths(&[1, 1]);
        let settings = settings(OutputKind::Classification, Pooling::Mean, &["neg", "pos"]);
        let values = [0.0, 0.0, 0.0, 2.0];
        let outputs = outputs_of_batch(&[2, 2], &values, &batch, &[0, 1], &settings).unwrap();
        assert_eq!(
            outputs[0],
            Output::Classification {
                label: "neg".into(),
                probability: 0.5
            }
        );
        let Output::Classification { label, probability } = &outputs[1] else {
            panic!()
        };
        assert_eq!(label, "pos");
        assert!((probability - 0.880797).abs() < 1e-5);
    }

    #[test]
    fn probabilities_are_used_as_given() {
        let batch = batch_of_lengths(&[1]);
        let mut settings = settings(OutputKind::Classification, Pooling::Mean, &["a", "b", "c"]);
        settings.class_scores = ClassScores::Probabilities;
        let outputs = outputs_of_batch(&[1, 3], &[0.2, 0.3, 0.5], &batch, &[0], &settings).unwrap();
        assert_eq!(
            outputs,
            vec![Output::Classification {
                label: "c".into(),
                probability: 0.5
            }]
        );
    }

    #[test]
    fn a_label_count_that_does_not_match_the_scores_is_an_error() {
        let batch = batch_of_lengths(&[1]);
        let settings = settings(OutputKind::Classification, Pooling::Mean, &["a", "b"]);
        let error =
            outputs_of_batch(&[1, 3], &[0.2, 0.3, 0.5], &batch, &[0], &settings).unwrap_err();
        assert!(matches!(error, RunError::OutputShape { .. }), "{error}");
    }

    #[test]
    fn a_wrong_row_count_is_an_error() {
        let batch = batch_of_lengths(&[1, 1]);
        let settings = settings(OutputKind::Embedding, Pooling::Mean, &[]);
        assert!(outputs_of_batch(&[1, 2], &[1.0, 0.0], &batch, &[0, 1], &settings).is_err());
    }

    #[test]
    fn non_finite_values_name_the_callers_row() {
        let batch = batch_of_lengths(&[1, 1]);
        let settings = settings(OutputKind::Embedding, Pooling::Mean, &[]);
        let error = outputs_of_batch(
            &[2, 2],
            &[1.0, 0.0, f32::NAN, 0.0],
            &batch,
            &[7, 3],
            &settings,
        )
        .unwrap_err();
        assert!(
            matches!(error, RunError::NonFiniteOutput { index: 3 }),
            "{error}"
        );
    }
}
