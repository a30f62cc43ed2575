//! Whole-word replacement dictionaries: the typo dictionary (`wrong<TAB>right`) and the
//! foreign-word replacement list (`foreign<TAB>replacement`).
//!
//! Matching works on simple words (see [`crate::words`]), so an entry only ever replaces whole
//! words. An entry may span several words (`laag inkomen`); between them any run of spaces
//! matches one space. A lowercase entry matches any capitalisation and the replacement takes
//! the capitalisation of the match; an entry with capitals matches only that spelling.

use foldhash::HashMap;

use crate::words::{Casing, capitalise_first, casing, push_lowercase, simple_word_spans};

/// One `wrong -> right` entry, split into words for matching.
#[derive(Debug, Clone)]
struct Entry {
    /// The words of `wrong`, lowercased unless `case_sensitive`.
    words: Vec<String>,
    /// The text between consecutive words of `wrong` (one fewer than `words`).
    separators: Vec<String>,
    right: String,
    case_sensitive: bool,
}

/// A dictionary of whole-word replacements.
#[derive(Debug, Clone, Default)]
pub struct WordMap {
    /// Entries keyed by their first word, lowercased; longest entries first.
    by_first_word: HashMap<String, Vec<Entry>>,
    entries: usize,
}

/// A line of a dictionary file that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DictionaryLineError {
    /// 1-based line number.
    pub line: usize,
    pub problem: String,
}

impl WordMap {
    /// Parses `wrong<TAB>right` lines. Blank lines and lines starting with `#` are skipped.
    pub fn parse(contents: &str) -> Result<WordMap, DictionaryLineError> {
        let mut map = WordMap::default();
        let mut seen: HashMap<String, (String, usize)> = HashMap::default();
        for (index, raw_line) in contents.lines().enumerate() {
            let line_number = index + 1;
            let line = raw_line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let problem = |problem: String| DictionaryLineError {
                line: line_number,
                problem,
            };
            let Some((wrong, right)) = line.split_once('\t') else {
                return Err(problem(format!(
                    "expected `wrong<TAB>right`, found no tab in {line:?}"
                )));
            };
            let (wrong, right) = (wrong.trim(), right.trim());
            if wrong.is_empty() || right.is_empty() {
                return Err(problem(
                    "both sides of the tab must be non-empty".to_string(),
                ));
            }
            if right.contains('\t') {
                return Err(problem(format!("more than one tab in {line:?}")));
            }
            if let Some((earlier_right, earlier_line)) = seen.get(wrong) {
                if earlier_right != right {
                    return Err(problem(format!(
                        "{wrong:?} already maps to {earlier_right:?} on line {earlier_line}"
                    )));
                }
                continue;
            }
            seen.insert(wrong.to_string(), (right.to_string(), line_number));
            let entry = Entry::new(wrong, right).ok_or_else(|| {
                problem(format!(
                    "{wrong:?} must start and end with a letter or digit"
                ))
            })?;
            let mut key = String::new();
            push_lowercase(&entry.words[0], &mut key);
            map.by_first_word.entry(key).or_default().push(entry);
            map.entries += 1;
        }
        for entries in map.by_first_word.values_mut() {
            entries.sort_by_key(|entry| std::cmp::Reverse(entry.words.len()));
        }
        Ok(map)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries
    }

    /// True when the dictionary has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Replaces every match in `text`, left to right without re-scanning replacements.
    /// Returns the new text when anything changed, and pushes `(from, to)` per replacement.
    pub fn apply(&self, text: &str, replaced: &mut Vec<(String, String)>) -> Option<String> {
        if self.is_empty() {
            return None;
        }
        let spans = simple_word_spans(text);
        let mut output: Option<String> = None;
        let mut copied_up_to = 0usize;
        let mut key = String::new();
        let mut index = 0usize;
        while index < spans.len() {
            let (start, end) = spans[index];
            key.clear();
            push_lowercase(&text[start..end], &mut key);
            let matched = self.by_first_word.get(key.as_str()).and_then(|entries| {
                entries.iter().find_map(|entry| {
                    entry
                        .match_length(text, &spans[index..])
                        .map(|length| (entry, length))
                })
            });
            let Some((entry, length)) = matched else {
                index += 1;
                continue;
            };
            let match_end = spans[index + length - 1].1;
            let original = &text[start..match_end];
            let replacement = entry.replacement_for(original);
            let buffer = output.get_or_insert_with(|| String::with_capacity(text.len() + 16));
            buffer.push_str(&text[copied_up_to..start]);
            buffer.push_str(&replacement);
            replaced.push((original.to_string(), replacement));
            copied_up_to = match_end;
            index += length;
        }
        output.map(|mut buffer| {
            buffer.push_str(&text[copied_up_to..]);
            buffer
        })
    }
}

impl Entry {
    fn new(wrong: &str, right: &str) -> Option<Entry> {
        let spans = simple_word_spans(wrong);
        let (&(first_start, _), &(_, last_end)) = (spans.first()?, spans.last()?);
        if first_start != 0 || last_end != wrong.len() {
            return None;
        }
        let case_sensitive = wrong.chars().any(char::is_uppercase);
        let words = spans
            .iter()
            .map(|&(start, end)| {
                let mut word = String::new();
                if case_sensitive {
                    word.push_str(&wrong[start..end]);
                } else {
                    push_lowercase(&wrong[start..end], &mut word);
                }
                word
            })
            .collect();
        let separators = spans
            .windows(2)
            .map(|pair| canonical_separator(&wrong[pair[0].1..pair[1].0]))
            .collect();
        Some(Entry {
            words,
            separators,
            right: right.to_string(),
            case_sensitive,
        })
    }

    /// How many of the words starting at `spans[0]` this entry matches, if it matches.
    fn match_length(&self, text: &str, spans: &[(usize, usize)]) -> Option<usize> {
        if spans.len() < self.words.len() {
            return None;
        }
        let mut lowered = String::new();
        for (position, word) in self.words.iter().enumerate() {
            let (start, end) = spans[position];
            let found = &text[start..end];
            let equal = if self.case_sensitive {
                found == word
            } else {
                lowered.clear();
                push_lowercase(found, &mut lowered);
                lowered == *word
            };
            if !equal {
                return None;
            }
            if position > 0 {
                let gap = &text[spans[position - 1].1..start];
                if canonical_separator(gap) != self.separators[position - 1] {
                    return None;
                }
            }
        }
        Some(self.words.len())
    }

    /// The replacement, capitalised like `original` when the entry is case-insensitive.
    fn replacement_for(&self, original: &str) -> String {
        if self.case_sensitive {
            return self.right.clone();
        }
        match casing(original) {
            Casing::Lower | Casing::Mixed => self.right.clone(),
            Casing::Title => capitalise_first(&self.right),
            Casing::Upper => self.right.to_uppercase(),
        }
    }
}

/// A separator with whitespace runs written as one space and `’` as `'`.
fn canonical_separator(separator: &str) -> String {
    let mut canonical = String::with_capacity(separator.len());
    let mut in_space = false;
    for character in separator.chars() {
        if character.is_whitespace() {
            if !in_space {
                canonical.push(' ');
            }
            in_space = true;
        } else {
            canonical.push(if character == '\u{2019}' {
                '\''
            } else {
                character
            });
            in_space = false;
        }
    }
    canonical
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(map: &WordMap, text: &str) -> (String, Vec<(String, String)>) {
        let mut replaced = Vec::new();
        let output = map
            .apply(text, &mut replaced)
            .unwrap_or_else(|| text.to_string());
        (output, replaced)
    }

    #[test]
    fn replaces_whole_words_and_keeps_case() {
        let map =
            WordMap::parse("lageinkomen\tlaag inkomen\nformuliernoten\tformulieren\n").unwrap();
        let (text, replaced) = apply(
            &map,
            "Lageinkomen en lageinkomens; LAGEINKOMEN. De formuliernoten-stapel en formuliernoten.",
        );
        assert_eq!(
            text,
            "Laag inkomen en lageinkomens; LAAG INKOMEN. De formulieren-stapel en formulieren."
        );
        assert_eq!(replaced.len(), 4);
        assert_eq!(
            replaced[0],
            ("Lageinkomen".to_string(), "Laag inkomen".to_string())
        );
    }

    #[test]
    fn multi_word_entries_match_any_spacing_and_prefer_longest() {
        let map = WordMap::parse("de tweede kamer\tde Tweede Kamer\nde\tDE-FOUT\n").unwrap();
        let (text, _) = apply(&map, "In de  tweede kamer zit de rest.");
        assert_eq!(text, "In de Tweede Kamer zit DE-FOUT rest.");
    }

    #[test]
    fn entries_with_capitals_match_exactly() {
        let map = WordMap::parse("Tweede kamer\tTweede Kamer\n").unwrap();
        let (text, replaced) = apply(&map, "De Tweede kamer en de tweede kamer.");
        assert_eq!(text, "De Tweede Kamer en de tweede kamer.");
        assert_eq!(replaced.len(), 1);
    }

    #[test]
    fn apostrophes_in_entries_match_typographic_ones() {
        let map = WordMap::parse("zo'n\tzo een\n").unwrap();
        let (text, _) = apply(&map, "Zo’n motie");
        assert_eq!(text, "Zo een motie");
    }

    #[test]
    fn no_match_returns_none() {
        let map = WordMap::parse("# comment\n\nfilthy\tsmerig\n").unwrap();
        assert_eq!(map.len(), 1);
        let mut replaced = Vec::new();
        assert_eq!(map.apply("Een schone tekst.", &mut replaced), None);
        assert!(replaced.is_empty());
    }

    #[test]
    fn bad_lines_name_the_line() {
        let error = WordMap::parse("goed\tgoed\nzonder tab\n").unwrap_err();
        assert_eq!(error.line, 2);
        let error = WordMap::parse("a\tb\na\tc\n").unwrap_err();
        assert!(error.problem.contains("line 1"), "{}", error.problem);
        let error = WordMap::parse("(x)\ty\n").unwrap_err();
        assert!(
            error.problem.contains("letter or digit"),
            "{}",
            error.problem
        );
        assert!(WordMap::parse("x\t\n").is_err());
    }
}
