//! Derives the shipped lexicons (`lexicons/nl.txt.gz`, `lexicons/en.txt`) from the word lists
//! in `shared/data/wordlists` (see `lexicons/README.md` for sources and licences).
//!
//! ```text
//! cargo run --example derive_lexicons [WORDLIST_DIR] [LEXICON_DIR]
//! ```
//!
//! - `en.txt`: the lowercase entries of SCOWL `wamerican` (proper nouns are capitalised there
//!   and left out), without possessives (`abbot's`; the check strips `'s` itself).
//! - `nl.txt.gz`: the lowercase entries of OpenTaal `wdutch` made of letters, hyphens and
//!   apostrophes, minus the entries that are also English words and that `wordfreq` finds at
//!   least 10^1.75 (about 56) times more often in English text than in Dutch text. OpenTaal
//!   lists English words used in Dutch phrases ("to", "be", "without", "went"); without this
//!   step they would count as Dutch. A word missing from the Dutch top-50k list counts at that
//!   list's lowest frequency.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// How many zipf units (log10 of frequency) more frequent in English than in Dutch a word must
/// be to leave the Dutch lexicon.
const ENGLISH_DOMINANCE_ZIPF: f64 = 1.75;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut arguments = std::env::args().skip(1);
    let wordlists = arguments
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../../shared/data/wordlists"));
    let output = arguments
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../lexicons"));
    std::fs::create_dir_all(&output)?;

    let scowl = read(&wordlists.join("en_scowl_wamerican_2020.12.07.txt"))?;
    let english: BTreeSet<String> = scowl
        .lines()
        .map(str::trim)
        .filter_map(|entry| {
            if let Some(rest) = entry.strip_prefix("I'")
                && !entry.ends_with("'s")
            {
                return Some(format!("i'{rest}"));
            }
            let lowercase = entry.chars().all(|c| c.is_lowercase() || c == '\'');
            (lowercase && !entry.is_empty() && !entry.ends_with("'s")).then(|| entry.to_string())
        })
        .collect();

    let english_zipf = read_zipf(&wordlists.join("en_wordfreq3.1.1_top50k.tsv"))?;
    let dutch_zipf = read_zipf(&wordlists.join("nl_wordfreq3.1.1_top50k.tsv"))?;
    let dutch_floor = dutch_zipf.values().copied().fold(f64::INFINITY, f64::min);

    let opentaal = read(&wordlists.join("nl_opentaal_wdutch_2.20.19.txt"))?;
    let mut dutch: BTreeSet<String> = BTreeSet::new();
    let mut removed: Vec<(String, f64, f64)> = Vec::new();
    let mut seen = HashSet::new();
    for entry in opentaal.lines().map(str::trim) {
        let usable = !entry.is_empty()
            && entry
                .chars()
                .all(|c| (c.is_alphabetic() && !c.is_uppercase()) || c == '-' || c == '\'')
            && entry.chars().next().is_some_and(char::is_alphabetic);
        if !usable || !seen.insert(entry) {
            continue;
        }
        if english.contains(entry)
            && let Some(&in_english) = english_zipf.get(entry)
        {
            let in_dutch = dutch_zipf.get(entry).copied().unwrap_or(dutch_floor);
            if in_english - in_dutch >= ENGLISH_DOMINANCE_ZIPF {
                removed.push((entry.to_string(), in_english, in_dutch));
                continue;
            }
        }
        dutch.insert(entry.to_string());
    }

    let english_header = "# English lexicon for backfill-postprocess: lowercase SCOWL wamerican 2020.12.07 entries\n\
         # without possessives. Derived by `cargo run --example derive_lexicons`; see README.md.\n";
    write_plain(&output.join("en.txt"), english_header, &english)?;
    let dutch_header = format!(
        "# Dutch lexicon for backfill-postprocess: lowercase OpenTaal wdutch 2.20.19 entries minus {} English\n\
         # words at least 10^{ENGLISH_DOMINANCE_ZIPF} times more frequent in English (wordfreq 3.1.1).\n\
         # Derived by `cargo run --example derive_lexicons`; see README.md.\n",
        removed.len()
    );
    write_gzipped(&output.join("nl.txt.gz"), &dutch_header, &dutch)?;

    removed.sort_by(|left, right| (right.1 - right.2).total_cmp(&(left.1 - left.2)));
    let sample: Vec<&str> = removed
        .iter()
        .take(40)
        .map(|(word, _, _)| word.as_str())
        .collect();
    println!("en.txt: {} words", english.len());
    println!(
        "nl.txt.gz: {} words ({} English-dominated entries left out)",
        dutch.len(),
        removed.len()
    );
    println!("left out, most English first: {}", sample.join(" "));
    Ok(())
}

fn read(path: &Path) -> Result<String, Box<dyn std::error::Error>> {
    std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read {}: {error}", path.display()).into())
}

fn read_zipf(path: &Path) -> Result<HashMap<String, f64>, Box<dyn std::error::Error>> {
    let mut table = HashMap::new();
    for line in read(path)?.lines().skip(1) {
        if let Some((word, zipf)) = line.split_once('\t') {
            table.insert(word.to_string(), zipf.trim().parse::<f64>()?);
        }
    }
    Ok(table)
}

fn write_plain(path: &Path, header: &str, words: &BTreeSet<String>) -> std::io::Result<()> {
    let mut text = String::from(header);
    for word in words {
        text.push_str(word);
        text.push('\n');
    }
    std::fs::write(path, text)
}

fn write_gzipped(path: &Path, header: &str, words: &BTreeSet<String>) -> std::io::Result<()> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(header.as_bytes())?;
    for word in words {
        encoder.write_all(word.as_bytes())?;
        encoder.write_all(b"\n")?;
    }
    std::fs::write(path, encoder.finish()?)
}
