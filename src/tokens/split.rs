//! Splitting text into the pieces tiktoken encodes one by one, with the encoding's own regex.
//!
//! o200k_base's regex has one lookaround, `\s+(?!\S)` (a run of whitespace gives its last
//! character to the next piece when one follows). Without it the regex crate matches the same
//! pieces with a fast automaton, so o200k_base splits that way and gives the character back by
//! hand; the other encodings use fancy-regex, as tiktoken-rs does. Tests compare the counts
//! with tiktoken's on real and adversarial text.

/// The split patterns tiktoken-rs builds these encodings with.
const CL100K_PATTERN: &str = "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}++|\\p{N}{1,3}+| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*+|\\s++$|\\s*[\\r\\n]|\\s+(?!\\S)|\\s";
const R50K_PATTERN: &str = "'(?:[sdmt]|ll|ve|re)| ?\\p{L}++| ?\\p{N}++| ?[^\\s\\p{L}\\p{N}]++|\\s++$|\\s+(?!\\S)|\\s";

/// `tiktoken_rs::O200K_BASE_PAT_STR` without its `\s+(?!\S)` alternative.
const O200K_WITHOUT_LOOKAHEAD: &str = concat!(
    r#"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"#,
    "|",
    r#"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"#,
    "|",
    r#"\p{N}{1,3}"#,
    "|",
    r#" ?[^\s\p{L}\p{N}]+[\r\n/]*"#,
    "|",
    r#"\s*[\r\n]+"#,
    "|",
    r#"\s+"#
);

pub(super) enum Splitter {
    /// o200k_base on the regex crate, with the lookahead done by hand.
    Fast(regex::Regex),
    Fancy(fancy_regex::Regex),
}

impl Splitter {
    pub(super) fn new(encoding: &str) -> Option<Splitter> {
        Some(match encoding {
            // Anchored: each search starts where the last piece ended, so the automaton only
            // runs forwards (an unanchored search also scans back for the start).
            "o200k_base" => Splitter::Fast(regex::Regex::new(&format!(r"\A(?:{O200K_WITHOUT_LOOKAHEAD})")).ok()?),
            "cl100k_base" => Splitter::Fancy(fancy_regex::Regex::new(CL100K_PATTERN).ok()?),
            _ => Splitter::Fancy(fancy_regex::Regex::new(R50K_PATTERN).ok()?),
        })
    }

    /// Calls `piece` with every piece of `text` in order; false when the regex gave up
    /// (fancy-regex's backtracking limit) and the pieces are incomplete.
    pub(super) fn for_each(&self, text: &str, mut piece: impl FnMut(&str)) -> bool {
        match self {
            Splitter::Fancy(regex) => {
                for found in regex.find_iter(text) {
                    match found {
                        Ok(found) => piece(found.as_str()),
                        Err(_) => return false,
                    }
                }
                true
            }
            Splitter::Fast(regex) => {
                let mut at = 0;
                while at < text.len() {
                    // Every character is a letter, a digit, whitespace or something else, and
                    // each of those starts an alternative, so a piece starts at `at`. No
                    // alternative looks behind, so searching the rest alone changes nothing.
                    let Some(found) = regex.find(&text[at..]) else { return false };
                    if found.end() == 0 {
                        return false;
                    }
                    let mut end = at + found.end();
                    let run = &text[at..end];
                    // `\s+(?!\S)`: a whitespace run (not one ending in a newline, which
                    // `\s*[\r\n]+` takes first) of two or more characters followed by more text
                    // leaves its last character to the next piece.
                    if end < text.len()
                        && !run.ends_with(['\r', '\n'])
                        && run.chars().all(char::is_whitespace)
                        && let Some((last, _)) = run.char_indices().last().filter(|(i, _)| *i > 0)
                    {
                        end = at + last;
                    }
                    piece(&text[at..end]);
                    at = end;
                }
                true
            }
        }
    }
}
