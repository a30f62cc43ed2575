//! Text to token ids with a Hugging Face `tokenizer.json`: special tokens added, truncated to
//! the job's `max_length`, never padded (the batcher pads each batch to its own length).

use std::path::Path;

use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{LoadError, RunError};

/// One row's tokens, as the model's i64 inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenizedText {
    pub token_ids: Vec<i64>,
    pub token_type_ids: Vec<i64>,
}

impl TokenizedText {
    pub fn len(&self) -> usize {
        self.token_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token_ids.is_empty()
    }
}

/// A loaded tokenizer set to truncate at `max_length`.
#[derive(Debug)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    pad_token_id: i64,
}

impl TextTokenizer {
    /// Read `path` and set truncation to `max_length` tokens (special tokens included); the
    /// file's own truncation and padding settings are replaced.
    pub fn load(path: &Path, max_length: usize) -> Result<Self, LoadError> {
        if !path.is_file() {
            return Err(LoadError::TokenizerFileMissing {
                path: path.to_path_buf(),
            });
        }
        let unreadable = |message: String| LoadError::TokenizerUnreadable {
            path: path.to_path_buf(),
            message,
        };
        let mut tokenizer =
            Tokenizer::from_file(path).map_err(|error| unreadable(error.to_string()))?;
        let pad_token_id = tokenizer
            .get_padding()
            .map(|padding| padding.pad_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .or_else(|| tokenizer.token_to_id("<pad>"))
            .unwrap_or(0);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length,
                ..TruncationParams::default()
            }))
            .map_err(|error| {
                unreadable(format!(
                    "cannot truncate at max_length = {max_length}: {error}"
                ))
            })?;
        Ok(TextTokenizer {
            tokenizer,
            pad_token_id: i64::from(pad_token_id),
        })
    }

    /// The id that fills padded positions (their attention mask is 0).
    pub fn pad_token_id(&self) -> i64 {
        self.pad_token_id
    }

    /// Tokens of `text` (row `index`, for the error message).
    pub fn tokenize(&self, index: usize, text: &str) -> Result<TokenizedText, RunError> {
        let encoding =
            self.tokenizer
                .encode_fast(text, true)
                .map_err(|error| RunError::Tokenize {
                    index,
                    message: error.to_string(),
                })?;
        Ok(TokenizedText {
            token_ids: encoding.get_ids().iter().map(|id| i64::from(*id)).collect(),
            token_type_ids: encoding
                .get_type_ids()
                .iter()
                .map(|id| i64::from(*id))
                .collect(),
        })
    }
}
