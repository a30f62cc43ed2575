//! Normalisation: tidy characters before the other rules run, and spacing and punctuation
//! after them (stripping and cutting leave stray spaces and empty brackets behind).
//!
//! Characters: `\r\n` and lone `\r` become `\n`; zero-width spaces, word joiners, byte-order
//! marks and soft hyphens are removed; no-break and other special spaces and tabs become plain
//! spaces. Layout, per line: brackets with nothing inside are removed, runs of spaces collapse,
//! lines are trimmed, spaces before `,.;:!?)]` (when the mark ends a word) and after `([` are
//! removed, `,,` and `;;` collapse and `,.` becomes `.`; blank lines at both ends are removed
//! and runs of blank lines collapse to one. Ellipses (`...`, `…`) keep their spacing.

use crate::outcome::{Change, NormalizeAction};

/// Counts of each normalisation action, turned into [`Change`]s at the end.
#[derive(Debug, Default)]
struct Counts(Vec<(NormalizeAction, usize)>);

impl Counts {
    fn add(&mut self, action: NormalizeAction) {
        match self.0.iter_mut().find(|(known, _)| *known == action) {
            Some((_, count)) => *count += 1,
            None => self.0.push((action, 1)),
        }
    }

    fn record(self, changes: &mut Vec<Change>) {
        for (action, count) in self.0 {
            changes.push(Change::Normalize { action, count });
        }
    }
}

/// Line endings, invisible characters and special spaces. Returns the new text if changed.
pub fn normalize_characters(text: &str, changes: &mut Vec<Change>) -> Option<String> {
    let needs_work = text
        .bytes()
        .any(|byte| byte == b'\r' || byte == b'\t' || byte >= 0x80);
    if !needs_work {
        return None;
    }
    let mut counts = Counts::default();
    let mut output = String::with_capacity(text.len());
    let mut characters = text.chars().peekable();
    while let Some(character) = characters.next() {
        match character {
            '\r' => {
                if characters.peek() != Some(&'\n') {
                    output.push('\n');
                }
                counts.add(NormalizeAction::LineEndings);
            }
            '\u{2028}' | '\u{2029}' => {
                output.push('\n');
                counts.add(NormalizeAction::LineEndings);
            }
            '\u{200B}' | '\u{2060}' | '\u{FEFF}' | '\u{00AD}' => {
                counts.add(NormalizeAction::RemovedInvisible);
            }
            '\t'
            | '\u{0B}'
            | '\u{0C}'
            | '\u{00A0}'
            | '\u{2000}'..='\u{200A}'
            | '\u{202F}'
            | '\u{205F}'
            | '\u{3000}' => {
                output.push(' ');
                counts.add(NormalizeAction::PlainSpaces);
            }
            other => output.push(other),
        }
    }
    if counts.0.is_empty() {
        return None;
    }
    counts.record(changes);
    Some(output)
}

/// Spacing, punctuation and blank lines. Returns the new text if changed.
pub fn normalize_layout(text: &str, changes: &mut Vec<Change>) -> Option<String> {
    if is_tidy(text) {
        return None;
    }
    let mut counts = Counts::default();
    let mut lines: Vec<String> = text
        .split('\n')
        .map(|line| tidy_line(line, &mut counts))
        .collect();
    let mut kept: Vec<String> = Vec::with_capacity(lines.len());
    for line in lines.drain(..) {
        let blank = line.is_empty();
        let previous_blank = kept.last().is_none_or(|last| last.is_empty());
        if blank && previous_blank {
            counts.add(NormalizeAction::BlankLines);
            continue;
        }
        kept.push(line);
    }
    while kept.last().is_some_and(|last| last.is_empty()) {
        kept.pop();
        counts.add(NormalizeAction::BlankLines);
    }
    if counts.0.is_empty() {
        return None;
    }
    counts.record(changes);
    Some(kept.join("\n"))
}

/// A quick byte scan: true when no line has anything [`tidy_line`] would change and there
/// are no blank lines to collapse or trim. May answer false for tidy text (then the full pass
/// decides), never true for untidy text.
fn is_tidy(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes
        .first()
        .is_some_and(|&byte| byte == b' ' || byte == b'\n')
        || bytes
            .last()
            .is_some_and(|&byte| byte == b' ' || byte == b'\n')
    {
        return false;
    }
    bytes.windows(2).all(|pair| {
        !matches!(
            pair,
            [
                b' ',
                b' ' | b',' | b'.' | b';' | b':' | b'!' | b'?' | b')' | b']' | b'\n'
            ] | [b'\n', b' ' | b'\n']
                | [b'(' | b'[', b' ' | b')' | b']']
                | [b',', b',' | b'.']
                | [b';', b';']
        )
    })
}

fn is_closing_mark(character: char) -> bool {
    matches!(character, ',' | '.' | ';' | ':' | '!' | '?' | ')' | ']')
}

/// True when `output` ends with a space that follows a word or a closing quote or bracket
/// (so `zichzelf: :` and `rij: ; Seizoen` keep their spaces).
fn follows_word(output: &str) -> bool {
    let mut reversed = output.chars().rev();
    reversed.next();
    reversed.next().is_some_and(|before| {
        before.is_alphanumeric()
            || matches!(
                before,
                ')' | ']' | '"' | '\'' | '\u{201D}' | '\u{2019}' | '\u{00BB}'
            )
    })
}

/// One line with its spacing and punctuation tidied.
fn tidy_line(line: &str, counts: &mut Counts) -> String {
    let characters: Vec<char> = line.chars().collect();
    let mut output = String::with_capacity(line.len());
    let mut index = 0usize;
    while index < characters.len() {
        let character = characters[index];
        let next = characters.get(index + 1).copied();
        if character == '(' || character == '[' {
            let closer = if character == '(' { ')' } else { ']' };
            let mut look = index + 1;
            while characters.get(look) == Some(&' ') {
                look += 1;
            }
            if characters.get(look) == Some(&closer) {
                counts.add(NormalizeAction::EmptyBrackets);
                index = look + 1;
                continue;
            }
        }
        if character == ' ' {
            if output.is_empty() || output.ends_with(' ') {
                counts.add(NormalizeAction::CollapsedSpaces);
            } else if output.ends_with('(') || output.ends_with('[') {
                counts.add(NormalizeAction::SpaceAroundPunctuation);
            } else {
                output.push(' ');
            }
            index += 1;
            continue;
        }
        if is_closing_mark(character) {
            let ends_word = next.is_none_or(|after| !after.is_alphanumeric());
            let ellipsis = character == '.' && next == Some('.');
            if output.ends_with(' ') && ends_word && !ellipsis && follows_word(&output) {
                output.pop();
                counts.add(NormalizeAction::SpaceAroundPunctuation);
            }
            if (character == ',' || character == ';') && output.ends_with(character) {
                counts.add(NormalizeAction::DoubledPunctuation);
                index += 1;
                continue;
            }
            if character == '.' && !ellipsis && output.ends_with(',') {
                output.pop();
                counts.add(NormalizeAction::DoubledPunctuation);
            }
        }
        output.push(character);
        index += 1;
    }
    while output.ends_with(' ') {
        output.pop();
        counts.add(NormalizeAction::CollapsedSpaces);
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(text: &str) -> String {
        normalize_layout(text, &mut Vec::new()).unwrap_or_else(|| text.to_string())
    }

    #[test]
    fn characters_are_made_plain() {
        let mut changes = Vec::new();
        let output =
            normalize_characters("a\u{00A0}b\tc\r\nd\re\u{200B}f\u{00AD}g", &mut changes).unwrap();
        assert_eq!(output, "a b c\nd\nefg");
        assert_eq!(changes.len(), 3);
        assert_eq!(
            normalize_characters("plain ASCII text.\n", &mut changes),
            None
        );
        assert_eq!(normalize_characters("café “zo”", &mut changes), None);
    }

    #[test]
    fn spaces_collapse_and_lines_trim() {
        assert_eq!(layout("  De  motie   vraagt . "), "De motie vraagt.");
    }

    #[test]
    fn leftovers_of_stripping_are_tidied() {
        assert_eq!(layout("Motie  over zorg  en ."), "Motie over zorg en.");
        assert_eq!(
            layout("De motie () , die ( zie ) [ ] werkt ,."),
            "De motie, die (zie) werkt."
        );
        assert_eq!(layout("Ja,, nee;; dus"), "Ja, nee; dus");
        assert_eq!(
            layout("op een rij: ; Seizoen 1 en zichzelf: : Deze"),
            "op een rij: ; Seizoen 1 en zichzelf: : Deze"
        );
    }

    #[test]
    fn ellipses_and_words_starting_with_marks_keep_their_space() {
        assert!(normalize_layout("Dus ... verder, en .NET werkt… ja", &mut Vec::new()).is_none());
    }

    #[test]
    fn blank_lines_collapse_and_ends_are_removed() {
        let mut changes = Vec::new();
        let output = normalize_layout("\n\nEen.\n\n\n\nTwee.\n\n", &mut changes).unwrap();
        assert_eq!(output, "Een.\n\nTwee.");
        assert_eq!(
            changes,
            vec![Change::Normalize {
                action: NormalizeAction::BlankLines,
                count: 6
            }]
        );
    }

    #[test]
    fn quick_scan_never_calls_untidy_text_tidy() {
        for untidy in [
            "a  b", " a", "a ", "a ,", "( a)", "a,,", "a,.", "a;;", "()", "a\n\nb\n", "\na",
            "a \nb", "a\n b",
        ] {
            assert!(!is_tidy(untidy), "{untidy:?}");
            assert!(
                normalize_layout(untidy, &mut Vec::new()).is_some(),
                "{untidy:?}"
            );
        }
        assert!(is_tidy("De motie (zie 36 410) vraagt: nu!\nTweede regel."));
    }

    #[test]
    fn clean_text_is_untouched() {
        let text =
            "De Kamer verzoekt de regering (zie motie 36 410) om actie: nu!\n\nTweede alinea.";
        assert_eq!(normalize_layout(text, &mut Vec::new()), None);
    }
}
