//! Splitting text into words, and the small character tests the rules share.
//!
//! Two granularities: *simple words* are maximal runs of letters, digits and combining marks
//! (the `\b…\b` units the typo dictionary matches); *compound words* join simple words with a
//! single inner hyphen or apostrophe (`e-mail`, `auto's`), the units the language check judges.

/// True for characters that are part of a simple word.
#[inline]
pub(crate) fn is_word_char(character: char) -> bool {
    if character.is_ascii() {
        character.is_ascii_alphanumeric()
    } else {
        character.is_alphanumeric() || is_combining_mark(character)
    }
}

/// Combining diacritical marks (U+0300-U+036F and the supplement/extended blocks).
#[inline]
fn is_combining_mark(character: char) -> bool {
    matches!(character, '\u{0300}'..='\u{036F}' | '\u{1AB0}'..='\u{1AFF}' | '\u{1DC0}'..='\u{1DFF}' | '\u{20D0}'..='\u{20FF}')
}

/// True for the characters that may join two simple words into one compound word.
#[inline]
pub(crate) fn is_joiner(character: char) -> bool {
    matches!(character, '-' | '\'' | '\u{2019}')
}

/// Byte ranges `(start, end)` of the simple words in `text`.
pub(crate) fn simple_word_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start: Option<usize> = None;
    for (index, character) in text.char_indices() {
        if is_word_char(character) {
            if start.is_none() {
                start = Some(index);
            }
        } else if let Some(word_start) = start.take() {
            spans.push((word_start, index));
        }
    }
    if let Some(word_start) = start {
        spans.push((word_start, text.len()));
    }
    spans
}

/// Byte ranges of the compound words in `text`: simple words joined by one hyphen or
/// apostrophe with word characters on both sides.
pub(crate) fn compound_word_spans(text: &str) -> Vec<(usize, usize)> {
    let simple = simple_word_spans(text);
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(simple.len());
    for (start, end) in simple {
        if let Some(last) = spans.last_mut() {
            let gap = &text[last.1..start];
            let mut gap_chars = gap.chars();
            if let (Some(only), None) = (gap_chars.next(), gap_chars.next())
                && is_joiner(only)
            {
                last.1 = end;
                continue;
            }
        }
        spans.push((start, end));
    }
    spans
}

/// Appends the lowercase form of `word` to `buffer`, with the typographic apostrophe `’`
/// written as `'`.
#[inline]
pub(crate) fn push_lowercase(word: &str, buffer: &mut String) {
    if word.is_ascii() {
        buffer.extend(word.bytes().map(|byte| byte.to_ascii_lowercase() as char));
        return;
    }
    for character in word.chars() {
        if character == '\u{2019}' {
            buffer.push('\'');
        } else {
            buffer.extend(character.to_lowercase());
        }
    }
}

/// How a word is capitalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Casing {
    /// No capitals (or no letters).
    Lower,
    /// First letter capital, the rest lowercase.
    Title,
    /// Two or more letters, all capitals.
    Upper,
    /// Anything else (`iPhone`, `McDonald`).
    Mixed,
}

/// The capitalisation pattern of `word`, judged on its letters.
pub(crate) fn casing(word: &str) -> Casing {
    let mut letters = 0usize;
    let mut upper = 0usize;
    let mut first_upper = false;
    let mut later_upper = false;
    for character in word.chars().filter(|character| character.is_alphabetic()) {
        let is_upper = character.is_uppercase();
        if is_upper {
            upper += 1;
            if letters == 0 {
                first_upper = true;
            } else {
                later_upper = true;
            }
        }
        letters += 1;
    }
    match (upper, letters) {
        (0, _) => Casing::Lower,
        (1, _) if first_upper => Casing::Title,
        (up, all) if up == all && all >= 2 => Casing::Upper,
        _ if first_upper && !later_upper => Casing::Title,
        _ => Casing::Mixed,
    }
}

/// `text` with its first letter in upper case.
pub(crate) fn capitalise_first(text: &str) -> String {
    let mut characters = text.chars();
    match characters.next() {
        Some(first) => first.to_uppercase().chain(characters).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words<'a>(text: &'a str, spans: &[(usize, usize)]) -> Vec<&'a str> {
        spans
            .iter()
            .map(|&(start, end)| &text[start..end])
            .collect()
    }

    #[test]
    fn simple_words_split_on_everything_but_letters_and_digits() {
        let text = "De auto's van e-mail (45-102), café\u{301}!";
        assert_eq!(
            words(text, &simple_word_spans(text)),
            vec![
                "De",
                "auto",
                "s",
                "van",
                "e",
                "mail",
                "45",
                "102",
                "café\u{301}"
            ]
        );
    }

    #[test]
    fn compound_words_join_on_single_inner_hyphen_or_apostrophe() {
        let text = "auto’s, e-mail, vervoer- en beheerplan, 'quote' a--b";
        assert_eq!(
            words(text, &compound_word_spans(text)),
            vec![
                "auto’s",
                "e-mail",
                "vervoer",
                "en",
                "beheerplan",
                "quote",
                "a",
                "b"
            ]
        );
    }

    #[test]
    fn lowercase_maps_typographic_apostrophe() {
        let mut buffer = String::new();
        push_lowercase("Auto’S", &mut buffer);
        assert_eq!(buffer, "auto's");
    }

    #[test]
    fn casing_patterns() {
        assert_eq!(casing("lageinkomen"), Casing::Lower);
        assert_eq!(casing("Lageinkomen"), Casing::Title);
        assert_eq!(casing("LAGEINKOMEN"), Casing::Upper);
        assert_eq!(casing("iPhone"), Casing::Mixed);
        assert_eq!(casing("X"), Casing::Title);
        assert_eq!(casing("Éénmalig"), Casing::Title);
        assert_eq!(capitalise_first("één keer"), "Één keer");
    }
}
