//! What post-processing did to one output: the final text, every change each rule made, the
//! foreign words it found and, when the output breaks a rule, why it was rejected.
//!
//! All types serialise to JSON so the runner can keep them beside the raw output for audit.

use serde::Serialize;

/// The result of [`crate::Postprocessor::process`] on one output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// The text after every rule ran. Written to the target when accepted; kept for audit
    /// (beside the raw output) when rejected.
    pub text: String,
    /// Every change, in the order the rules ran.
    pub changes: Vec<Change>,
    /// Words of other languages still in `text` (after replacements), in order of appearance.
    pub foreign_words: Vec<ForeignWord>,
    /// Why the output is rejected; empty when accepted.
    pub rejections: Vec<Rejection>,
}

impl Outcome {
    /// True when no rule rejected the output.
    pub fn is_accepted(&self) -> bool {
        self.rejections.is_empty()
    }

    /// The text to write, or `None` when rejected.
    pub fn accepted_text(&self) -> Option<&str> {
        self.is_accepted().then_some(self.text.as_str())
    }

    /// The rejection reason codes, e.g. `["foreign_words", "too_short"]`.
    pub fn reason_codes(&self) -> Vec<&'static str> {
        self.rejections
            .iter()
            .map(|rejection| rejection.reason.code())
            .collect()
    }

    /// One line naming every rejection: `"too_short: 12 characters, min_chars is 20"`.
    pub fn rejection_summary(&self) -> String {
        let parts: Vec<String> = self
            .rejections
            .iter()
            .map(|rejection| format!("{}: {}", rejection.reason.code(), rejection.detail))
            .collect();
        parts.join("; ")
    }
}

/// One change a rule made to the text.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Change {
    /// The script rule dropped a whole line (1-based line number in the text it saw).
    ScriptDroppedLine {
        line: usize,
        script: String,
        removed: String,
    },
    /// The script rule cut a run of another script out of a kept line.
    ScriptRemovedFragment {
        line: usize,
        script: String,
        removed: String,
    },
    /// A `strip` pattern matched and its match was removed.
    Strip { pattern: String, removed: String },
    /// The typo dictionary replaced a word.
    Typo { from: String, to: String },
    /// The replacement list replaced a foreign word.
    Replacement { from: String, to: String },
    /// Normalisation tidied the text; `count` is how many places it touched.
    Normalize {
        action: NormalizeAction,
        count: usize,
    },
}

impl Change {
    /// The configuration key of the rule that made the change.
    pub fn rule_key(&self) -> &'static str {
        match self {
            Change::ScriptDroppedLine { .. } | Change::ScriptRemovedFragment { .. } => "script",
            Change::Strip { .. } => "strip",
            Change::Typo { .. } => "typos",
            Change::Replacement { .. } => "replacements",
            Change::Normalize { .. } => "normalize",
        }
    }
}

/// The kinds of tidying the normalisation rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormalizeAction {
    /// Zero-width characters and soft hyphens removed.
    RemovedInvisible,
    /// No-break and other special spaces, and tabs, turned into plain spaces.
    PlainSpaces,
    /// `\r\n` and lone `\r` turned into `\n`.
    LineEndings,
    /// Runs of spaces collapsed, and spaces at line ends trimmed.
    CollapsedSpaces,
    /// Spaces before `,.;:!?)]` or after `([` removed.
    SpaceAroundPunctuation,
    /// Doubled `,,` or `;;` collapsed, or a comma before a full stop dropped.
    DoubledPunctuation,
    /// Brackets with nothing inside removed.
    EmptyBrackets,
    /// Blank lines at the ends removed and runs of blank lines collapsed.
    BlankLines,
}

/// A word of another language found in the final text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForeignWord {
    /// The word as written.
    pub word: String,
    /// The language code whose lexicon holds it (`"en"`).
    pub language: String,
    /// Byte offset of the word in [`Outcome::text`].
    pub offset: usize,
}

/// Why an output was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub reason: RejectReason,
    /// For people: what was measured against which limit.
    pub detail: String,
}

/// A short, stable reason code; `status` counts rejections by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Nothing is left (blank output, or every line dropped by the script rule).
    Empty,
    /// Fewer characters than `min_chars`.
    TooShort,
    /// More characters than `max_chars`.
    TooLong,
    /// More foreign words than `max_foreign_words`.
    ForeignWords,
}

impl RejectReason {
    /// The stable code: `empty`, `too_short`, `too_long`, `foreign_words`.
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::Empty => "empty",
            RejectReason::TooShort => "too_short",
            RejectReason::TooLong => "too_long",
            RejectReason::ForeignWords => "foreign_words",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_with_stable_codes() {
        let outcome = Outcome {
            text: "Kort.".into(),
            changes: vec![
                Change::Typo {
                    from: "lageinkomen".into(),
                    to: "laag inkomen".into(),
                },
                Change::Normalize {
                    action: NormalizeAction::CollapsedSpaces,
                    count: 2,
                },
            ],
            foreign_words: vec![],
            rejections: vec![Rejection {
                reason: RejectReason::TooShort,
                detail: "5 characters, min_chars is 20".into(),
            }],
        };
        let json = serde_json::to_value(&outcome).unwrap();
        assert_eq!(json["changes"][0]["rule"], "typo");
        assert_eq!(json["changes"][1]["action"], "collapsed_spaces");
        assert_eq!(json["rejections"][0]["reason"], "too_short");
        assert!(!outcome.is_accepted());
        assert_eq!(outcome.accepted_text(), None);
        assert_eq!(outcome.reason_codes(), vec!["too_short"]);
        assert_eq!(
            outcome.rejection_summary(),
            "too_short: 5 characters, min_chars is 20"
        );
    }
}
