//! The targets of the post-processing stage, measured on real data (`shared/data` beside the
//! repository, with the shipped lexicons). Fails when the data is missing.

use std::path::PathBuf;

use backfill_postprocess::evaluation;

fn data_dir() -> PathBuf {
    let repository = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let data = repository.join("../shared/data");
    assert!(
        data.join("langid/sentences.tsv").is_file() && data.join("wordlists").is_dir(),
        "real data missing: expected shared/data beside the repository at {}",
        data.display()
    );
    data
}

#[test]
fn every_rule_meets_its_target_on_real_data() {
    let report = evaluation::run(&data_dir(), &backfill_postprocess::default_lexicon_dir())
        .unwrap_or_else(|error| panic!("{error}"));
    println!("{report}");

    let script = &report.script;
    assert!(
        script.injected > 10_000,
        "too few foreign-script lines: {}",
        script.injected
    );
    assert!(
        script.dropped_share() >= 0.995,
        "wrong-script lines dropped {:.4}",
        script.dropped_share()
    );
    let (clean_lines, _, clean_dropped) = script.clean_totals();
    assert!(clean_lines > 40_000, "too few clean lines: {clean_lines}");
    assert!(
        script.clean_touched_share() <= 0.001,
        "clean lines touched {:.5}",
        script.clean_touched_share()
    );
    assert_eq!(clean_dropped, 0, "clean Dutch lines were dropped");
    assert_eq!(
        script.latin_other_touched, 0,
        "Latin-script sentences of other languages were touched"
    );

    let language = &report.language;
    assert!(
        language.injected_unambiguous > 4_000,
        "too few English words: {}",
        language.injected_unambiguous
    );
    assert!(
        language.precision() >= 0.95,
        "English-word precision {:.4}",
        language.precision()
    );
    assert!(
        language.recall() >= 0.90,
        "English-word recall {:.4}",
        language.recall()
    );

    let typos = &report.typos;
    assert!(typos.injected >= 600, "too few typos: {}", typos.injected);
    assert_eq!(
        typos.repaired_exactly, typos.injected,
        "typos not repaired exactly: {:?}",
        typos.failures
    );
    assert_eq!(
        typos.clean_changed, 0,
        "typo dictionary changed clean texts"
    );

    let strip = &report.strip;
    assert!(
        strip.removed_share() >= 0.99,
        "metadata fragments removed {:.4}",
        strip.removed_share()
    );
    assert_eq!(
        strip.clean_stripped, 0,
        "strip patterns changed clean texts"
    );
}
