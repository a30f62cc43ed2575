//! Counting prompt tokens with a real tokenizer (tiktoken encodings, embedded in the binary).
//!
//! Chat requests add a few tokens per message for roles and separators; [`TokenCounter::chat`]
//! counts them the way OpenAI's cookbook does, so estimates match the provider's `prompt_tokens`
//! closely for OpenAI models and approximately for others.

use tiktoken_rs::CoreBPE;

/// The encoding used when neither the job nor the model's price entry names one.
pub const DEFAULT_ENCODING: &str = "o200k_base";

/// The encodings a job can name in `model.encoding`.
pub const ENCODINGS: &[&str] = &["o200k_base", "cl100k_base", "p50k_base", "r50k_base"];

/// Tokens added per chat message (role, separators) and per reply (the assistant's priming).
const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_PER_REPLY: u64 = 3;

/// Counts tokens with one tiktoken encoding.
#[derive(Clone, Copy)]
pub struct TokenCounter {
    bpe: &'static CoreBPE,
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenCounter")
    }
}

impl TokenCounter {
    /// The counter for an encoding named in [`ENCODINGS`].
    pub fn new(encoding: &str) -> anyhow::Result<Self> {
        let bpe = match encoding {
            "o200k_base" => tiktoken_rs::o200k_base_singleton(),
            "cl100k_base" => tiktoken_rs::cl100k_base_singleton(),
            "p50k_base" => tiktoken_rs::p50k_base_singleton(),
            "r50k_base" => tiktoken_rs::r50k_base_singleton(),
            other => anyhow::bail!("unknown token encoding {other:?}"),
        };
        Ok(Self { bpe })
    }

    /// Tokens in a piece of text.
    pub fn count(&self, text: &str) -> u64 {
        self.bpe.encode_ordinary(text).len() as u64
    }

    /// Tokens of a chat request with an optional system message and one user message.
    pub fn chat(&self, system: Option<&str>, user: &str) -> u64 {
        let messages = 1 + u64::from(system.is_some());
        messages * TOKENS_PER_MESSAGE
            + TOKENS_PER_REPLY
            + system.map(|s| self.count(s)).unwrap_or(0)
            + self.count(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_known_strings() {
        let counter = TokenCounter::new("cl100k_base").unwrap();
        // "hello world" is two tokens in cl100k_base.
        assert_eq!(counter.count("hello world"), 2);
        assert_eq!(counter.chat(None, "hello world"), 2 + 3 + 3);
        assert_eq!(counter.chat(Some("hello world"), "hello world"), 4 + 6 + 3);
    }

    #[test]
    fn dutch_text_costs_more_tokens_than_characters_over_five() {
        let counter = TokenCounter::new("o200k_base").unwrap();
        let text = "De Kamer, gehoord de beraadslaging, verzoekt de regering om het minimumloon te verhogen.";
        let n = counter.count(text);
        assert!(n > 10 && n < text.len() as u64, "{n}");
    }

    #[test]
    fn unknown_encoding_is_an_error() {
        assert!(TokenCounter::new("gpt2-xl").is_err());
    }
}
