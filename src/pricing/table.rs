//! The price table: prices by model name, read from price files (`prices = [...]` in the job,
//! `[models."NAME"]` tables) and the job's own `[pricing."NAME"]` tables, which win.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ModelPrice;
use crate::exit::usage;
use crate::job::file::PriceFile;

/// Where a model's price came from, for people reading an estimate or a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriceOrigin {
    /// A price file, with its `source` (the pricing page) and `date` when it has them.
    File { path: PathBuf, source: Option<String>, date: Option<String> },
    /// The job's own `[pricing."NAME"]` table.
    Job,
    /// No price anywhere; run with `--allow-unpriced`, counted as free.
    Unpriced,
}

impl PriceOrigin {
    /// One line: "prices/openai.toml (2026-11-05, https://…)".
    pub fn describe(&self) -> String {
        match self {
            PriceOrigin::File { path, source, date } => {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                match (date, source) {
                    (Some(d), Some(s)) => format!("{name} (dated {d}, {s})"),
                    (Some(d), None) => format!("{name} (dated {d})"),
                    (None, Some(s)) => format!("{name} ({s}, undated)"),
                    (None, None) => format!("{name} (undated)"),
                }
            }
            PriceOrigin::Job => "the job's [pricing] table".into(),
            PriceOrigin::Unpriced => "no price (--allow-unpriced: counted as free)".into(),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    price: ModelPrice,
    encoding: Option<String>,
    origin: PriceOrigin,
}

/// The prices a job can use, by model name.
#[derive(Debug, Clone, Default)]
pub struct PriceTable {
    models: BTreeMap<String, Entry>,
}

/// A price file: `source`, `date`, and `[models."NAME"]` tables with the keys of a job's
/// `[pricing."NAME"]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFileDoc {
    source: Option<String>,
    date: Option<String>,
    #[serde(default)]
    models: BTreeMap<String, PriceFile>,
}

impl PriceTable {
    /// Prices from price files (in order, later files override earlier ones) and then the job's
    /// own `[pricing.*]` tables.
    pub fn load(files: &[&Path], inline: &BTreeMap<String, PriceFile>) -> anyhow::Result<Self> {
        let mut table = PriceTable::default();
        for path in files {
            let text = std::fs::read_to_string(path)
                .map_err(|e| usage(format!("prices: cannot read price file {}: {e}", path.display())))?;
            let doc: PriceFileDoc = toml::from_str(&text)
                .map_err(|e| usage(format!("prices: price file {} is not valid: {e}", path.display())))?;
            let origin = PriceOrigin::File { path: path.to_path_buf(), source: doc.source, date: doc.date };
            for (name, price) in &doc.models {
                check_price(&format!("{}: models.\"{name}\"", path.display()), price)?;
                table.put(name, price, origin.clone());
            }
        }
        for (name, price) in inline {
            check_price(&format!("pricing.\"{name}\""), price)?;
            table.put(name, price, PriceOrigin::Job);
        }
        Ok(table)
    }

    fn put(&mut self, name: &str, price: &PriceFile, origin: PriceOrigin) {
        let entry = Entry { price: ModelPrice::from_file(price), encoding: price.encoding.clone(), origin };
        self.models.insert(name.to_owned(), entry);
    }

    pub fn get(&self, model: &str) -> Option<&ModelPrice> {
        self.models.get(model).map(|e| &e.price)
    }

    /// The tiktoken encoding the model's price entry names, if any.
    pub fn encoding(&self, model: &str) -> Option<&str> {
        self.models.get(model).and_then(|e| e.encoding.as_deref())
    }

    pub fn origin(&self, model: &str) -> Option<&PriceOrigin> {
        self.models.get(model).map(|e| &e.origin)
    }

    /// The priced model closest to `model` when it is a likely misspelling of it (at most two
    /// edits, and fewer than a third of the name).
    pub fn closest(&self, model: &str) -> Option<&str> {
        self.models
            .keys()
            .map(|name| (strsim::damerau_levenshtein(model, name), name))
            .filter(|(distance, name)| *distance <= 2 && *distance * 3 < name.chars().count().max(3))
            .min()
            .map(|(_, name)| name.as_str())
    }

    /// Prices a model that has none as free (`--allow-unpriced`).
    pub fn insert_unpriced(&mut self, model: &str) {
        let entry = Entry { price: ModelPrice::FREE, encoding: None, origin: PriceOrigin::Unpriced };
        self.models.insert(model.to_owned(), entry);
    }
}

fn check_price(key: &str, price: &PriceFile) -> anyhow::Result<()> {
    let all = [Some(price.input), Some(price.output), price.cached_input, price.batch_input, price.batch_output];
    if all.into_iter().flatten().any(|p| !p.is_finite() || p < 0.0) {
        return Err(usage(format!("{key}: prices must be finite and not negative (USD per million tokens)")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every price file shipped in prices/ loads, names its pricing page and date, and prices
    /// batch calls below sync ones.
    #[test]
    fn a_name_one_edit_from_a_priced_model_is_suggested() {
        let mut inline = BTreeMap::new();
        let price = |input: f64| PriceFile {
            input,
            output: input,
            cached_input: None,
            batch_input: None,
            batch_output: None,
            encoding: None,
        };
        inline.insert("gpt-4o-mini".to_owned(), price(0.15));
        inline.insert("gpt-4o".to_owned(), price(2.5));
        let table = PriceTable::load(&[], &inline).unwrap();
        assert_eq!(table.closest("gpt-4o-mnii"), Some("gpt-4o-mini"));
        assert_eq!(table.closest("gpt-4p"), Some("gpt-4o"));
        assert_eq!(table.closest("claude-3-haiku"), None);
    }

    #[test]
    fn shipped_price_files_load_with_source_and_date() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("prices");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.retain(|p| p.extension().is_some_and(|e| e == "toml"));
        assert!(files.len() >= 3, "{files:?}");
        for path in &files {
            let table = PriceTable::load(&[path.as_path()], &BTreeMap::new()).unwrap();
            assert!(!table.models.is_empty(), "{} has no models", path.display());
            for (name, entry) in &table.models {
                let PriceOrigin::File { source: Some(source), date: Some(date), .. } = &entry.origin else {
                    panic!("{} lacks `source` or `date`", path.display());
                };
                assert!(source.starts_with("https://") && date.starts_with("20"), "{}: {source} {date}", path.display());
                let p = entry.price;
                assert!(p.input > 0 && p.output >= p.input, "{name}: {p:?}");
                assert!(p.cached_input <= p.input, "{name}: cached input above input");
                if p.batch_known {
                    assert!(p.batch_input < p.input && p.batch_output < p.output, "{name}: batch not cheaper");
                }
            }
        }
    }

    #[test]
    fn the_job_table_overrides_price_files_and_origins_say_so() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("prices/openai.toml");
        let inline = BTreeMap::from([(
            "gpt-4o-mini".to_string(),
            PriceFile { input: 1.0, output: 2.0, cached_input: None, batch_input: None, batch_output: None, encoding: Some("cl100k_base".into()) },
        )]);
        let table = PriceTable::load(&[dir.as_path()], &inline).unwrap();
        assert_eq!(table.get("gpt-4o-mini").unwrap().input, 1_000_000);
        assert_eq!(table.origin("gpt-4o-mini"), Some(&PriceOrigin::Job));
        assert_eq!(table.encoding("gpt-4o-mini"), Some("cl100k_base"));
        assert!(matches!(table.origin("gpt-4.1-mini"), Some(PriceOrigin::File { .. })));
    }
}
