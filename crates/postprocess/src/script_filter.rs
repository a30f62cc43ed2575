//! The script rule: drop lines written mostly in an unexpected script, and cut shorter runs of
//! other scripts out of the lines that stay.
//!
//! Only letters vote. Digits, punctuation, symbols and combining marks belong to the Unicode
//! scripts `Common` or `Inherited` and count for nothing, so "2023 — 45%" is neutral. A line is
//! dropped when more than `max_foreign_share` of its letters are in other scripts; otherwise
//! each run of other-script letters (with the neutral characters between them, and the marks
//! and punctuation of those scripts such as `。` or `،` around them) is removed. A lone Greek
//! letter (`β-caroteen`) and a lone letter inside a word (a Cyrillic look-alike `А` in
//! `Аmsterdam`) stay.

use unicode_script::{Script, UnicodeScript};

use crate::outcome::Change;
use crate::script_fragments::{Vote, cut_fragments};

/// The compiled script rule.
#[derive(Debug, Clone)]
pub struct ScriptFilter {
    expected: Vec<Script>,
    max_foreign_share: f64,
    cut_fragments: bool,
    latin_expected: bool,
}

impl ScriptFilter {
    /// A rule keeping letters of `expected`, dropping lines above `max_foreign_share`, and
    /// cutting shorter runs out of kept lines when `cut_fragments`.
    pub fn new(expected: Vec<Script>, max_foreign_share: f64, cut_fragments: bool) -> ScriptFilter {
        let latin_expected = expected.contains(&Script::Latin);
        ScriptFilter {
            expected,
            max_foreign_share,
            cut_fragments,
            latin_expected,
        }
    }

    /// Looks a script up by its Unicode name (`"Latin"`, `"Han"`) or ISO 15924 code (`"Latn"`),
    /// ignoring case.
    pub fn script_named(name: &str) -> Option<Script> {
        let trimmed = name.trim();
        let mut titled = String::new();
        for (index, character) in trimmed.chars().enumerate() {
            if index == 0 {
                titled.extend(character.to_uppercase());
            } else {
                titled.extend(character.to_lowercase());
            }
        }
        Script::from_full_name(trimmed)
            .or_else(|| Script::from_full_name(&titled))
            .or_else(|| Script::from_short_name(trimmed))
            .or_else(|| Script::from_short_name(&titled))
            .filter(|script| {
                !matches!(script, Script::Common | Script::Inherited | Script::Unknown)
            })
    }

    #[inline]
    fn vote(&self, character: char) -> Vote {
        if character.is_ascii() {
            return if !character.is_ascii_alphabetic() {
                Vote::Neutral
            } else if self.latin_expected {
                Vote::Expected
            } else {
                Vote::Foreign(Script::Latin)
            };
        }
        if !character.is_alphabetic() {
            return Vote::Neutral;
        }
        match character.script() {
            Script::Common | Script::Inherited | Script::Unknown => Vote::Neutral,
            script if self.expected.contains(&script) => Vote::Expected,
            script => Vote::Foreign(script),
        }
    }

    /// Applies the rule; returns the new text when anything changed.
    pub fn apply(&self, text: &str, changes: &mut Vec<Change>) -> Option<String> {
        if text.is_ascii() && self.latin_expected {
            return None;
        }
        let verdicts: Vec<LineVerdict> =
            text.split('\n').map(|line| self.judge_line(line)).collect();
        if verdicts
            .iter()
            .all(|verdict| matches!(verdict, LineVerdict::Clean))
        {
            return None;
        }
        let mut output = String::with_capacity(text.len());
        let mut kept_lines = 0usize;
        for ((index, line), verdict) in text.split('\n').enumerate().zip(verdicts) {
            let line_number = index + 1;
            match verdict {
                LineVerdict::Clean => push_line(&mut output, line, &mut kept_lines),
                LineVerdict::Drop(script) => changes.push(Change::ScriptDroppedLine {
                    line: line_number,
                    script: script.full_name().to_string(),
                    removed: line.to_string(),
                }),
                LineVerdict::CutFragments => {
                    let cut = self.cut_fragments(line, line_number, changes);
                    push_line(&mut output, &cut, &mut kept_lines);
                }
            }
        }
        Some(output)
    }

    fn judge_line(&self, line: &str) -> LineVerdict {
        let mut expected_letters = 0usize;
        let mut foreign_letters = 0usize;
        let mut foreign_counts: Vec<(Script, usize)> = Vec::new();
        for character in line.chars() {
            match self.vote(character) {
                Vote::Expected => expected_letters += 1,
                Vote::Foreign(script) => {
                    foreign_letters += 1;
                    match foreign_counts
                        .iter_mut()
                        .find(|(known, _)| *known == script)
                    {
                        Some((_, count)) => *count += 1,
                        None => foreign_counts.push((script, 1)),
                    }
                }
                Vote::Neutral => {}
            }
        }
        if foreign_letters == 0 {
            return LineVerdict::Clean;
        }
        let share = foreign_letters as f64 / (foreign_letters + expected_letters) as f64;
        if share > self.max_foreign_share {
            let dominant = foreign_counts
                .iter()
                .max_by_key(|(_, count)| *count)
                .map(|(s, _)| *s);
            LineVerdict::Drop(dominant.unwrap_or(Script::Unknown))
        } else if self.cut_fragments {
            LineVerdict::CutFragments
        } else {
            LineVerdict::Clean
        }
    }

    /// `line` without its runs of foreign letters (see [`crate::script_fragments`]).
    fn cut_fragments(&self, line: &str, line_number: usize, changes: &mut Vec<Change>) -> String {
        let characters: Vec<(usize, char, Vote)> = line
            .char_indices()
            .map(|(at, character)| (at, character, self.vote(character)))
            .collect();
        cut_fragments(line, &characters, line_number, changes)
    }
}

#[derive(Debug, Clone, Copy)]
enum LineVerdict {
    Clean,
    Drop(Script),
    CutFragments,
}

fn push_line(buffer: &mut String, line: &str, kept_lines: &mut usize) {
    if *kept_lines > 0 {
        buffer.push('\n');
    }
    buffer.push_str(line);
    *kept_lines += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latin() -> ScriptFilter {
        ScriptFilter::new(vec![Script::Latin], 0.5, true)
    }

    fn run(text: &str) -> (String, Vec<Change>) {
        let mut changes = Vec::new();
        let output = latin()
            .apply(text, &mut changes)
            .unwrap_or_else(|| text.to_string());
        (output, changes)
    }

    #[test]
    fn drops_lines_mostly_in_other_scripts() {
        let (text, changes) = run(
            "De motie vraagt om actie.\nو في نفس الوقت أقول\n这是一个句子。\nЭто предложение.\nSlot.",
        );
        assert_eq!(text, "De motie vraagt om actie.\nSlot.");
        let scripts: Vec<&str> = changes
            .iter()
            .map(|change| match change {
                Change::ScriptDroppedLine { script, .. } => script.as_str(),
                _ => "other",
            })
            .collect();
        assert_eq!(scripts, vec!["Arabic", "Han", "Cyrillic"]);
    }

    #[test]
    fn cuts_fragments_out_of_mostly_latin_lines() {
        let (text, changes) = run("De regering重要的 beleid, zie 「注意」 hier (2023 年).");
        assert_eq!(text, "De regering beleid, zie  hier (2023 ).");
        assert_eq!(changes.len(), 3);
        assert!(
            matches!(&changes[1], Change::ScriptRemovedFragment { removed, .. } if removed == "「注意」")
        );
    }

    #[test]
    fn fragments_take_their_scripts_marks_and_punctuation_along() {
        let (text, _) = run("Als de motie wordt ثالثاً ـ aangenomen, «zeker» 好的。Klaar.");
        assert_eq!(text, "Als de motie wordt  aangenomen, «zeker» Klaar.");
    }

    #[test]
    fn fragments_stay_when_cutting_is_off() {
        let filter = ScriptFilter::new(vec![Script::Latin], 0.5, false);
        let mut changes = Vec::new();
        let output = filter
            .apply("Gideon (גדעון) is een naam.\nגדעון גדעון", &mut changes)
            .unwrap();
        assert_eq!(output, "Gideon (גדעון) is een naam.");
        assert_eq!(changes.len(), 1);
    }

    #[test]
    fn lone_letters_of_alphabetic_scripts_stay() {
        let text = "Een supplement met β-glucanen en Δ-waarden, en Аmsterdam.";
        let (output, changes) = run(text);
        assert_eq!(output, text);
        assert!(changes.is_empty());
        let (output, _) = run("Een supplement met да glucanen en و 好 meer.");
        assert_eq!(output, "Een supplement met  glucanen en  meer.");
    }

    #[test]
    fn digits_punctuation_and_accents_are_neutral_or_latin() {
        let text = "Één café in Zürich: 45% — “goed” (2023-2024) © ½ €3,50 naïef.\n\n---";
        let (output, changes) = run(text);
        assert_eq!(output, text);
        assert!(changes.is_empty());
    }

    #[test]
    fn lines_without_letters_and_blank_lines_stay() {
        let (text, _) = run("12:30\n\n中文中文\n- 45");
        assert_eq!(text, "12:30\n\n- 45");
    }

    #[test]
    fn script_names_resolve_loosely() {
        assert_eq!(ScriptFilter::script_named("latin"), Some(Script::Latin));
        assert_eq!(ScriptFilter::script_named("Latn"), Some(Script::Latin));
        assert_eq!(
            ScriptFilter::script_named("Cyrillic"),
            Some(Script::Cyrillic)
        );
        assert_eq!(ScriptFilter::script_named("Klingon"), None);
        assert_eq!(ScriptFilter::script_named("Common"), None);
    }

    #[test]
    fn expected_script_other_than_latin() {
        let filter = ScriptFilter::new(vec![Script::Cyrillic], 0.5, true);
        let mut changes = Vec::new();
        let output = filter
            .apply("Это предложение.\nThis is English.", &mut changes)
            .unwrap();
        assert_eq!(output, "Это предложение.");
    }
}
