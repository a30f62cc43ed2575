//! How an embedding is stored in a target column: a JSON array of floats (`format = "json"`)
//! or raw float32 little-endian bytes for a BLOB / bytea (`format = "f32le"`).

use thiserror::Error;

/// A stored embedding that cannot be read back.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EmbeddingDecodeError {
    #[error("an f32le embedding needs a multiple of 4 bytes, got {0}")]
    BadByteLength(usize),
}

/// `[0.1,-0.25,...]`: each float in Rust's shortest form that reads back to the same f32.
/// Non-finite values (never produced by the processor) become `null`.
pub fn embedding_to_json(embedding: &[f32]) -> String {
    let mut json = String::with_capacity(embedding.len() * 12 + 2);
    json.push('[');
    for (position, value) in embedding.iter().enumerate() {
        if position > 0 {
            json.push(',');
        }
        if value.is_finite() {
            json.push_str(&value.to_string());
        } else {
            json.push_str("null");
        }
    }
    json.push(']');
    json
}

/// Four little-endian bytes per float, in order.
pub fn embedding_to_f32le(embedding: &[f32]) -> Vec<u8> {
    embedding
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect()
}

/// The inverse of [`embedding_to_f32le`].
pub fn embedding_from_f32le(bytes: &[u8]) -> Result<Vec<f32>, EmbeddingDecodeError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(EmbeddingDecodeError::BadByteLength(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|chunk| f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_exactly() {
        let embedding = vec![0.1f32, -0.25, 1.0e-8, 3.4028235e38, 0.0, -0.0, 0.123_456_79];
        let json = embedding_to_json(&embedding);
        let parsed: Vec<f32> = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed, embedding);
        assert!(json.starts_with("[0.1,-0.25,"), "{json}");
    }

    #[test]
    fn json_of_an_empty_embedding_is_an_empty_array() {
        assert_eq!(embedding_to_json(&[]), "[]");
    }

    #[test]
    fn json_writes_non_finite_values_as_null() {
        assert_eq!(
            embedding_to_json(&[1.0, f32::NAN, f32::INFINITY]),
            "[1,null,null]"
        );
    }

    #[test]
    fn f32le_is_four_little_endian_bytes_per_value() {
        assert_eq!(
            embedding_to_f32le(&[1.0, -2.0]),
            vec![0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]
        );
        let embedding = vec![0.5f32, -0.0, 7.25e-5];
        assert_eq!(
            embedding_from_f32le(&embedding_to_f32le(&embedding)).unwrap(),
            embedding
        );
    }

    #[test]
    fn f32le_rejects_a_truncated_blob() {
        assert_eq!(
            embedding_from_f32le(&[0, 0, 0]),
            Err(EmbeddingDecodeError::BadByteLength(3))
        );
    }
}
