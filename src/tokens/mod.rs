//! Counting prompt tokens with a real tokenizer (tiktoken encodings, embedded in the binary).
//!
//! Chat requests add a few tokens per message for roles and separators; [`TokenCounter::chat`]
//! counts them the way OpenAI's cookbook does, so estimates match the provider's `prompt_tokens`
//! closely for OpenAI models and approximately for others.
//!
//! tiktoken splits a text with its encoding's regex and encodes every piece on its own, so a
//! text's count is the sum of its pieces' counts. [`TokenCounter::count`] splits with the same
//! regex and remembers each distinct piece's count (per thread, bounded): real text repeats its
//! words, and a dry run over 30,000 rows then spends its time in the regex, not in BPE merges.
//! The split itself is in [`split`].

mod split;

use std::cell::RefCell;

use rustc_hash::FxHashMap;
use split::Splitter;
use tiktoken_rs::CoreBPE;

/// The encoding used when neither the job nor the model's price entry names one.
pub const DEFAULT_ENCODING: &str = "o200k_base";

/// The encodings a job can name in `model.encoding`.
pub const ENCODINGS: &[&str] = &["o200k_base", "cl100k_base", "p50k_base", "r50k_base"];

/// Tokens added per chat message (role, separators) and per reply (the assistant's priming).
const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_PER_REPLY: u64 = 3;

/// Pieces whose counts one thread remembers per encoding; past this, new pieces are counted
/// without being remembered.
const PIECES_REMEMBERED: usize = 1 << 18;


/// Counts tokens with one tiktoken encoding.
#[derive(Clone, Copy)]
pub struct TokenCounter {
    bpe: &'static CoreBPE,
    /// Index into [`ENCODINGS`].
    encoding: usize,
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenCounter({})", ENCODINGS[self.encoding])
    }
}

/// One thread's splitters and remembered piece counts, per encoding. A thread-local
/// `RefCell`: counting never crosses threads and never re-enters itself.
#[derive(Default)]
struct Pieces {
    splitters: [Option<Splitter>; 4],
    counts: [FxHashMap<Box<str>, u32>; 4],
}

// Per thread, so the dry run's threads and the call tasks count without a lock between them.
thread_local! {
    static PIECES: RefCell<Pieces> = RefCell::new(Pieces::default());
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
        let encoding = ENCODINGS.iter().position(|e| *e == encoding).expect("listed above");
        Ok(Self { bpe, encoding })
    }

    /// Tokens in a piece of text (as tiktoken's `encode_ordinary` counts them).
    pub fn count(&self, text: &str) -> u64 {
        PIECES.with(|pieces| {
            let mut pieces = pieces.borrow_mut();
            let Pieces { splitters, counts } = &mut *pieces;
            let splitter = match &splitters[self.encoding] {
                Some(splitter) => splitter,
                None => match Splitter::new(ENCODINGS[self.encoding]) {
                    Some(splitter) => splitters[self.encoding].insert(splitter),
                    None => return self.bpe.encode_ordinary(text).len() as u64,
                },
            };
            let counts = &mut counts[self.encoding];
            let mut total = 0u64;
            let complete = splitter.for_each(text, |piece| {
                total += u64::from(match counts.get(piece) {
                    Some(n) => *n,
                    None => {
                        let n = self.bpe.encode_ordinary(piece).len() as u32;
                        if counts.len() < PIECES_REMEMBERED {
                            counts.insert(piece.into(), n);
                        }
                        n
                    }
                });
            });
            if complete { total } else { self.bpe.encode_ordinary(text).len() as u64 }
        })
    }

    /// Tokens of a chat request with an optional system message and one user message.
    pub fn chat(&self, system: Option<&str>, user: &str) -> u64 {
        self.chat_counted(system.map(|s| self.count(s)), user)
    }

    /// [`TokenCounter::chat`] with the system message's tokens counted already.
    pub fn chat_counted(&self, system_tokens: Option<u64>, user: &str) -> u64 {
        let messages = 1 + u64::from(system_tokens.is_some());
        messages * TOKENS_PER_MESSAGE + TOKENS_PER_REPLY + system_tokens.unwrap_or(0) + self.count(user)
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

    /// Counting piece by piece is exactly tiktoken's count, for every encoding, on real motions
    /// and on text with runs of spaces, newlines and digits.
    #[test]
    fn piece_counts_equal_tiktoken_counts() {
        let sample = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/motions_sample.jsonl")).unwrap();
        let odd = [
            "  a  b\n\n\n  c\t\td 12345678 x's  'll   \r\n  {\"id\":\"7\"},\n{\"id\":\"8\"}\n]   ",
            "   word  5  .  \t\tX  \u{a0}\u{a0}y \u{3000}\u{3000}z  \n  q \r\n\r\n  r",
            "it'S THEY'LL don't 'RE '  ' x''y  ''  's",
            "Ça été ÉTÉ naïve coöperatie e\u{301}e\u{301} 日本語のテキスト 한국어  мир  ١٢٣٤٥ ½⅔ ⅫⅪ",
            "a\n\n b \n\tc/\n/d //\n\n\n", "\u{200b}\u{200b}x \u{2028}\u{2029} y", "   ", "\t\n", "", " ", "\n",
        ];
        for encoding in ENCODINGS {
            let counter = TokenCounter::new(encoding).unwrap();
            for text in sample.lines().take(120).chain(odd) {
                let direct = counter.bpe.encode_ordinary(text).len() as u64;
                assert_eq!(counter.count(text), direct, "{encoding}: {text:?}");
                // Again, now from remembered pieces.
                assert_eq!(counter.count(text), direct, "{encoding}, remembered: {text:?}");
            }
        }
    }

    /// Random short strings over whitespace of several kinds, letters with marks, apostrophes,
    /// digits and punctuation: where the split's hand-made lookahead could go wrong.
    #[test]
    fn piece_counts_equal_tiktoken_counts_on_random_strings() {
        let alphabet: Vec<char> = " \t\n\r\u{a0}\u{3000}aZé's1234.,/{}\"日\u{301}-".chars().collect();
        let mut rng = fastrand::Rng::with_seed(7);
        for encoding in ENCODINGS {
            let counter = TokenCounter::new(encoding).unwrap();
            for _ in 0..3_000 {
                let text: String = (0..rng.usize(0..20)).map(|_| alphabet[rng.usize(0..alphabet.len())]).collect();
                assert_eq!(counter.count(&text), counter.bpe.encode_ordinary(&text).len() as u64, "{encoding}: {text:?}");
            }
        }
    }

    #[test]
    fn unknown_encoding_is_an_error() {
        assert!(TokenCounter::new("gpt2-xl").is_err());
    }
}
