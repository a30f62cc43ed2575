//! The strip rule: remove every match of the job's regular expressions, such as metadata
//! fragments ("(45-102)", "(t.v.v. 21501-20-1981)") leaking from titles into outputs.

use regex::Regex;

use crate::outcome::Change;

/// Compiled `strip` patterns, applied in the order written.
#[derive(Debug, Clone, Default)]
pub struct StripRule {
    patterns: Vec<(String, Regex)>,
}

impl StripRule {
    /// Compiles the patterns; on failure returns the pattern and the regex error message.
    pub fn compile(patterns: &[String]) -> Result<StripRule, (String, String)> {
        let mut compiled = Vec::with_capacity(patterns.len());
        for pattern in patterns {
            let regex =
                Regex::new(pattern).map_err(|error| (pattern.clone(), error.to_string()))?;
            compiled.push((pattern.clone(), regex));
        }
        Ok(StripRule { patterns: compiled })
    }

    /// True when there are no patterns.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Removes every non-empty match of every pattern; returns the new text when anything
    /// matched.
    pub fn apply(&self, text: &str, changes: &mut Vec<Change>) -> Option<String> {
        let mut current: Option<String> = None;
        for (pattern, regex) in &self.patterns {
            let source = current.as_deref().unwrap_or(text);
            let mut stripped: Option<String> = None;
            let mut copied_up_to = 0usize;
            for found in regex.find_iter(source) {
                if found.is_empty() {
                    continue;
                }
                let buffer = stripped.get_or_insert_with(|| String::with_capacity(source.len()));
                buffer.push_str(&source[copied_up_to..found.start()]);
                copied_up_to = found.end();
                changes.push(Change::Strip {
                    pattern: pattern.clone(),
                    removed: found.as_str().to_string(),
                });
            }
            if let Some(mut buffer) = stripped {
                buffer.push_str(&source[copied_up_to..]);
                current = Some(buffer);
            }
        }
        current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_every_match_and_records_it() {
        let rule = StripRule::compile(&[
            r"\(\d+-\d+\)".to_string(),
            r"\(t\.v\.v\.[^)]*\)".to_string(),
        ])
        .unwrap();
        let mut changes = Vec::new();
        let output = rule
            .apply(
                "Motie (45-102) over zorg (t.v.v. 21501-20-1981) en (12-3).",
                &mut changes,
            )
            .unwrap();
        assert_eq!(output, "Motie  over zorg  en .");
        assert_eq!(changes.len(), 3);
        assert_eq!(
            changes[0],
            Change::Strip {
                pattern: r"\(\d+-\d+\)".into(),
                removed: "(45-102)".into()
            }
        );
    }

    #[test]
    fn no_match_and_empty_matches_change_nothing() {
        let rule = StripRule::compile(&["x*".to_string()]).unwrap();
        let mut changes = Vec::new();
        assert_eq!(rule.apply("geen treffers", &mut changes), None);
        assert!(changes.is_empty());
    }

    #[test]
    fn bad_pattern_is_reported() {
        let (pattern, message) = StripRule::compile(&["(unclosed".to_string()]).unwrap_err();
        assert_eq!(pattern, "(unclosed");
        assert!(message.contains("unclosed"), "{message}");
    }
}
