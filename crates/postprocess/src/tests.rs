//! Tests of the whole pipeline built from configuration, with small lexicons on disk.

use std::path::{Path, PathBuf};

use crate::{BuildError, Change, PostprocessConfig, Postprocessor, RejectReason};

/// A scratch directory with a job's files, removed on drop.
struct JobDir(PathBuf);

impl JobDir {
    fn new(name: &str) -> JobDir {
        let path = std::env::temp_dir().join(format!("pp-{name}-{}", std::process::id()));
        std::fs::create_dir_all(path.join("lexicons")).unwrap();
        std::fs::write(
            path.join("lexicons/nl.txt"),
            "de\nhet\nis\neen\nonline\nteam\nmotie\nvraagt\nregering\nom\nen\nvoor\nmensen\nmet\nlaag\ninkomen\nsmerig\n",
        )
        .unwrap();
        std::fs::write(
            path.join("lexicons/en.txt"),
            "the\nfilthy\nonline\nteam\nwith\nlow\nincome\nasks\ngovernment\nmotion\nis\n",
        )
        .unwrap();
        std::fs::write(path.join("typos.tsv"), "lageinkomen\tlaag inkomen\n").unwrap();
        std::fs::write(path.join("replacements.tsv"), "filthy\tsmerig\n").unwrap();
        JobDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn build(&self, table: &str) -> Result<Postprocessor, BuildError> {
        let config: PostprocessConfig = toml::from_str(table).unwrap();
        Postprocessor::from_config(&config, self.path())
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const FULL_TABLE: &str = r#"
    script = "Latin"
    language = "nl"
    lexicon_dir = "lexicons"
    max_foreign_words = 1
    typos = "typos.tsv"
    replacements = "replacements.tsv"
    strip = ['\(\d+-\d+\)']
    min_chars = 20
    max_chars = 200
"#;

#[test]
fn every_rule_repairs_its_defect_and_the_output_is_accepted() {
    let job = JobDir::new("repairs");
    let postprocessor = job.build(FULL_TABLE).unwrap();
    let input = "De motie (45-102) vraagt  om een filthy regering\u{00A0}voor mensen met lageinkomen .\n\
                 و في نفس الوقت أقول بأن الشيخ\n这是一个句子。";
    let outcome = postprocessor.process(input);
    assert_eq!(
        outcome.text,
        "De motie vraagt om een smerig regering voor mensen met laag inkomen."
    );
    assert!(outcome.is_accepted(), "{:?}", outcome.rejections);
    let rules: Vec<&str> = outcome.changes.iter().map(Change::rule_key).collect();
    for rule in ["normalize", "script", "strip", "typos", "replacements"] {
        assert!(
            rules.contains(&rule),
            "no change recorded for {rule}: {rules:?}"
        );
    }
    assert!(outcome.foreign_words.is_empty());
}

#[test]
fn too_many_foreign_words_reject_with_the_words_named() {
    let job = JobDir::new("foreign");
    let postprocessor = job.build(FULL_TABLE).unwrap();
    let outcome = postprocessor.process("The motion asks the government om een online team.");
    assert_eq!(outcome.reason_codes(), vec!["foreign_words"]);
    let words: Vec<&str> = outcome
        .foreign_words
        .iter()
        .map(|word| word.word.as_str())
        .collect();
    assert_eq!(words, vec!["The", "motion", "asks", "the", "government"]);
    assert!(
        outcome.rejections[0]
            .detail
            .contains("max_foreign_words is 1")
    );
    assert_eq!(
        outcome.text,
        "The motion asks the government om een online team."
    );
}

#[test]
fn length_and_empty_rejections() {
    let job = JobDir::new("length");
    let postprocessor = job.build(FULL_TABLE).unwrap();
    assert_eq!(
        postprocessor.process("Te kort.").reason_codes(),
        vec!["too_short"]
    );
    let long = "De motie vraagt om actie. ".repeat(10);
    assert_eq!(
        postprocessor.process(&long).reason_codes(),
        vec!["too_long"]
    );
    let outcome = postprocessor.process("这是一个句子。\nЭто предложение.");
    assert_eq!(outcome.rejections[0].reason, RejectReason::Empty);
    assert!(
        outcome.rejections[0].detail.contains("Han, Cyrillic"),
        "{}",
        outcome.rejections[0].detail
    );
    assert_eq!(
        postprocessor.process(" \n ").rejections[0].detail,
        "the output is blank"
    );
}

#[test]
fn empty_table_only_normalises() {
    let job = JobDir::new("empty");
    let postprocessor = job.build("").unwrap();
    let outcome = postprocessor.process("  Filthy 这是 (45-102)  tekst ");
    assert_eq!(outcome.text, "Filthy 这是 (45-102) tekst");
    assert!(outcome.is_accepted());
}

#[test]
fn build_errors_name_the_key() {
    let job = JobDir::new("errors");
    let message = |table: &str| job.build(table).unwrap_err().to_string();
    assert!(message("script = \"Latn-ish\"").contains("script"));
    assert!(message("strip = ['(']").contains("strip"));
    assert!(message("typos = \"missing.tsv\"").contains("typos"));
    assert!(message("min_chars = 5\nmax_chars = 4").contains("min_chars"));
    assert!(message("max_foreign_script_share = 1.5").contains("max_foreign_script_share"));
    assert!(message("allow_words = \"x.txt\"").contains("set language"));
    let missing = message("language = \"nl\"\nlexicon_dir = \"nowhere\"");
    assert!(
        missing.contains("lexicon_dir") && missing.contains("nl.txt"),
        "{missing}"
    );
    assert!(
        message("language = \"nl\"\nforeign_languages = [\"nl\"]").contains("foreign_languages")
    );
    std::fs::write(job.path().join("bad.tsv"), "ok\tok\nbroken line\n").unwrap();
    let bad = message("typos = \"bad.tsv\"");
    assert!(bad.contains("line 2") && bad.contains("typos"), "{bad}");
}

#[test]
fn explain_lists_each_rule() {
    let job = JobDir::new("explain");
    let postprocessor = job.build(FULL_TABLE).unwrap();
    let account = postprocessor.explain("De motie (45-102) vraagt om lageinkomen.\n这是一个句子。");
    for expected in [
        "script (Latin): dropped line 2 written in Han",
        "strip: removed \"(45-102)\"",
        "typos (1 entries): \"lageinkomen\" -> \"laag inkomen\"",
        "replacements (1 entries): no change",
        "language (nl, looking for en): 0 foreign word(s)",
        "verdict: accepted",
        "--- text ---\nDe motie vraagt om laag inkomen.\n",
    ] {
        assert!(
            account.contains(expected),
            "missing {expected:?} in:\n{account}"
        );
    }
}

#[test]
fn postprocessor_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Postprocessor>();
}

#[test]
fn outcome_serialises_to_json() {
    let job = JobDir::new("json");
    let postprocessor = job.build(FULL_TABLE).unwrap();
    let outcome = postprocessor.process("Kort (1-2).");
    let json = serde_json::to_string(&outcome).unwrap();
    assert!(json.contains("\"rule\":\"strip\""), "{json}");
    assert!(json.contains("\"reason\":\"too_short\""), "{json}");
}
