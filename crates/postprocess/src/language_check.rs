//! Finding words of other languages in an output, with lexicons.
//!
//! A word is foreign when a foreign language's lexicon holds it and the expected language's
//! lexicon (plus the job's `allow_words`) does not: a loanword the expected lexicon lists, such
//! as "online" in Dutch, passes. Words the check cannot judge fairly are skipped: words with
//! digits, single letters, capitalised words inside a sentence (names), all-capital words
//! (acronyms), word parts cut off by a hyphen (`vervoer- en beheerplan`), and words inside web
//! or e-mail addresses. A hyphenated word is foreign only when it is not in the expected
//! lexicon as a whole, none of its parts is, and a part is in a foreign lexicon (`e-wallet`,
//! but not `peer-to-peerlevering`).

use crate::lexicon::Lexicon;
use crate::outcome::ForeignWord;
use crate::words::{Casing, casing, compound_word_spans, push_lowercase};

/// The lexicons of one check: the expected language and the languages looked for.
#[derive(Debug, Clone)]
pub struct LanguageCheck {
    expected: Lexicon,
    foreign: Vec<(String, Lexicon)>,
}

impl LanguageCheck {
    /// A check against `expected`, looking for the words of each `(code, lexicon)` in `foreign`.
    pub fn new(expected: Lexicon, foreign: Vec<(String, Lexicon)>) -> LanguageCheck {
        LanguageCheck { expected, foreign }
    }

    /// The foreign words of `text`, in order.
    pub fn find_foreign_words(&self, text: &str) -> Vec<ForeignWord> {
        let mut found = Vec::new();
        if self.foreign.is_empty() {
            return found;
        }
        let mut lowered = String::new();
        for (start, end) in compound_word_spans(text) {
            let word = &text[start..end];
            if !self.is_judgeable(text, start, end, word) {
                continue;
            }
            lowered.clear();
            push_lowercase(word, &mut lowered);
            if let Some(language) = self.foreign_language_of(&lowered)
                && !is_inside_address(text, start, end)
            {
                found.push(ForeignWord {
                    word: word.to_string(),
                    language: language.to_string(),
                    offset: start,
                });
            }
        }
        found
    }

    /// The code of the foreign language `word` (lowercase) belongs to, if any.
    pub fn foreign_language_of(&self, word: &str) -> Option<&str> {
        if self.is_expected(word) {
            return None;
        }
        for (code, lexicon) in &self.foreign {
            if contains_with_possessive(lexicon, word) {
                return Some(code);
            }
        }
        if word.contains('-') {
            let parts: Vec<&str> = word
                .split('-')
                .filter(|part| part.chars().count() >= 2)
                .collect();
            if parts.iter().any(|part| self.is_expected(part)) {
                return None;
            }
            for part in parts {
                for (code, lexicon) in &self.foreign {
                    if contains_with_possessive(lexicon, part) {
                        return Some(code);
                    }
                }
            }
        }
        None
    }

    fn is_expected(&self, word: &str) -> bool {
        contains_with_possessive(&self.expected, word)
    }

    /// Whether the word at `start..end` is one the check should judge (see module docs).
    fn is_judgeable(&self, text: &str, start: usize, end: usize, word: &str) -> bool {
        if word.chars().any(|character| character.is_numeric()) {
            return false;
        }
        let mut letters = word.chars().filter(|character| character.is_alphabetic());
        if letters.next().is_none() || letters.next().is_none() {
            return false;
        }
        if text[..start].ends_with('-') || text[end..].starts_with('-') {
            return false;
        }
        match casing(word) {
            Casing::Lower => true,
            Casing::Title => starts_sentence(text, start),
            Casing::Upper | Casing::Mixed => false,
        }
    }
}

/// True when the word at `start..end` is part of a web or e-mail address: the run of
/// non-space characters around it holds `://`, `www.` or `@`.
fn is_inside_address(text: &str, start: usize, end: usize) -> bool {
    let chunk_start = text[..start]
        .rfind(char::is_whitespace)
        .map_or(0, |at| at + 1);
    let chunk_end = text[end..]
        .find(char::is_whitespace)
        .map_or(text.len(), |at| end + at);
    let chunk = &text[chunk_start..chunk_end];
    chunk.contains("://") || chunk.contains("www.") || chunk.contains('@')
}

/// True when `lexicon` holds `word`, or `word` is `base's` and it holds `base`.
#[inline]
fn contains_with_possessive(lexicon: &Lexicon, word: &str) -> bool {
    lexicon.contains(word)
        || word
            .strip_suffix("'s")
            .is_some_and(|base| !base.is_empty() && lexicon.contains(base))
}

/// True when the word starting at byte `start` opens a sentence or a line: only whitespace,
/// opening quotes, brackets or bullets stand between it and the text's start, a line break, or
/// a sentence-ending mark.
fn starts_sentence(text: &str, start: usize) -> bool {
    for character in text[..start].chars().rev() {
        match character {
            '\n' | '.' | '!' | '?' | ':' | '\u{2026}' => return true,
            '"' | '\'' | '(' | '[' | '{' | '*' | '-' | '\u{2013}' | '\u{2014}' | '\u{2022}'
            | '\u{201C}' | '\u{201D}' | '\u{2018}' | '\u{2019}' | '\u{00AB}' | '\u{00BB}' => {}
            other if other.is_whitespace() => {}
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check() -> LanguageCheck {
        let dutch = Lexicon::parse(
            "de\nhet\nis\neen\nonline\nteam\nmotie\nvraagt\nregering\nauto's\nen\nvan\nlow\nover\n",
        );
        let english =
            Lexicon::parse("filthy\nthe\nonline\nteam\nincome\nis\nrich\ngovernment\nmark\nasks\n");
        LanguageCheck::new(dutch, vec![("en".to_string(), english)])
    }

    fn found(text: &str) -> Vec<String> {
        check()
            .find_foreign_words(text)
            .into_iter()
            .map(|word| word.word)
            .collect()
    }

    #[test]
    fn words_only_in_the_foreign_lexicon_are_found() {
        assert_eq!(found("De motie is filthy en rich."), vec!["filthy", "rich"]);
    }

    #[test]
    fn loanwords_in_the_expected_lexicon_pass() {
        assert!(found("Het team is online.").is_empty());
    }

    #[test]
    fn names_acronyms_digits_and_cut_off_parts_are_skipped() {
        assert!(
            found("De motie van Mark en THE Government, the2 en rich- en armoedebeleid.")
                .is_empty()
        );
    }

    #[test]
    fn sentence_start_capitals_are_judged() {
        assert_eq!(
            found("Filthy. Het is \"The\" motie.\n- Rich"),
            vec!["Filthy", "Rich"]
        );
        let words = check().find_foreign_words("Ja. The motie");
        assert_eq!(words[0].offset, 4);
        assert_eq!(words[0].language, "en");
    }

    #[test]
    fn hyphenated_words_are_foreign_only_without_an_expected_part() {
        assert_eq!(
            found("een filthy-rich regering, een motie-filthy, low-income en een online-team"),
            vec!["filthy-rich"]
        );
    }

    #[test]
    fn words_in_web_and_mail_addresses_are_skipped() {
        assert_eq!(
            found(
                "Zie https://example.org/the-filthy-page en www.filthy.nl of filthy@rich.com, filthy."
            ),
            vec!["filthy"]
        );
    }

    #[test]
    fn possessives_are_judged_by_their_base() {
        assert_eq!(
            found("the government's motie en de auto's"),
            vec!["the", "government's"]
        );
    }
}
