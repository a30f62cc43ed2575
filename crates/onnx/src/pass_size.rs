//! The size of a forward pass, measured per model, machine and thread count.
//!
//! Under tract the time per token of a pass depends on its size: small passes keep their
//! activations in cache, while grouping short rows saves per-pass overhead. Which size is
//! fastest differs between models and machines, so at load the processor times a few
//! candidate sizes ([`PASS_TOKEN_CANDIDATES`], those within `max_batch_tokens`) on synthetic
//! rows of [`PROBE_ROW_LENGTH`] tokens, all threads at once, and keeps the fastest per token.
//! The timings are kept in a small file under the user's cache folder ([`cache_file`]), by
//! model file (path, size, modification time) and thread count, so later runs skip the probe.
//! Pure apart from [`read_cached`] and [`store`], which read and write that file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// The pass sizes (padded tokens) the probe times, smallest first.
pub const PASS_TOKEN_CANDIDATES: [usize; 4] = [64, 128, 256, 512];

/// The probe's rows: this many tokens each (or `max_length` when shorter), so the candidates
/// are passes of 1, 2, 4 and 8 rows.
pub const PROBE_ROW_LENGTH: usize = 64;

/// Tokens each thread computes per candidate (at least one pass): bounds the probe's cost
/// to a few passes per size.
pub const PROBE_TOKENS_PER_THREAD: usize = 1024;

/// The probe stops trying larger sizes once its timed passes have taken this long (plan
/// compilation and warm-up passes are not counted).
pub const PROBE_BUDGET_SECONDS: f64 = 2.0;

/// Entries the cache file keeps (the most recent).
const MAX_ENTRIES: usize = 64;

/// What the timings of one model are kept under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeKey {
    pub model: String,
    pub size: u64,
    pub modified_ns: u128,
    pub threads: usize,
    pub row_length: usize,
    /// Whether products with constant weights run in bf16 (see [`crate::bf16_matmul`]):
    /// they change the time of every size.
    pub bf16: bool,
}

impl ProbeKey {
    /// The key of the model file at `path` run on `threads` threads (`bf16`: with bf16
    /// products); `None` if the file's size or modification time cannot be read.
    pub fn of(path: &Path, threads: usize, row_length: usize, bf16: bool) -> Option<Self> {
        let metadata = std::fs::metadata(path).ok()?;
        let modified_ns = metadata
            .modified()
            .ok()?
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_nanos();
        let model = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Some(ProbeKey {
            model: model.display().to_string(),
            size: metadata.len(),
            modified_ns,
            threads,
            row_length,
            bf16,
        })
    }

    fn matches(&self, entry: &serde_json::Value) -> bool {
        entry["model"].as_str() == Some(&self.model)
            && entry["size"].as_u64() == Some(self.size)
            && entry["modified_ns"].as_str() == Some(&self.modified_ns.to_string())
            && entry["threads"].as_u64() == Some(self.threads as u64)
            && entry["row_length"].as_u64() == Some(self.row_length as u64)
            // Entries written before bf16 products existed were timed in f32.
            && entry["bf16"].as_bool().unwrap_or(false) == self.bf16
    }
}

/// Seconds per padded token of each pass size timed, by pass size.
pub type Timings = BTreeMap<usize, f64>;

/// The candidates within `max_batch_tokens`; empty when the bound is below the smallest
/// (the pass size is then the bound itself).
pub fn candidates_within(max_batch_tokens: usize) -> Vec<usize> {
    PASS_TOKEN_CANDIDATES
        .into_iter()
        .filter(|size| *size <= max_batch_tokens)
        .collect()
}

/// The fastest per token of `candidates` in `timings`; `None` if one of them was not timed.
pub fn fastest(timings: &Timings, candidates: &[usize]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for size in candidates {
        let seconds = *timings.get(size)?;
        if best.is_none_or(|(_, best_seconds)| seconds < best_seconds) {
            best = Some((*size, seconds));
        }
    }
    best.map(|(size, _)| size)
}

/// The cache file: `$BACKFILL_CACHE/onnx-pass.json`, else under `$XDG_CACHE_HOME/backfill`,
/// else `~/.cache/backfill`; `None` without any of them.
pub fn cache_file() -> Option<PathBuf> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
    let folder = non_empty("BACKFILL_CACHE")
        .map(PathBuf::from)
        .or_else(|| non_empty("XDG_CACHE_HOME").map(|dir| PathBuf::from(dir).join("backfill")))
        .or_else(|| non_empty("HOME").map(|home| PathBuf::from(home).join(".cache/backfill")))?;
    Some(folder.join("onnx-pass.json"))
}

fn read_entries(file: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|value| value["entries"].as_array().cloned())
        .unwrap_or_default()
}

/// The timings kept for `key` in `file` (empty if none, or if the file is unreadable).
pub fn read_cached(file: &Path, key: &ProbeKey) -> Timings {
    read_entries(file)
        .iter()
        .find(|entry| key.matches(entry))
        .and_then(|entry| entry["seconds_per_token"].as_object().cloned())
        .map(|timings| {
            timings
                .iter()
                .filter_map(|(size, seconds)| Some((size.parse().ok()?, seconds.as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Keep `timings` for `key` in `file` (replacing its previous entry), written atomically.
pub fn store(file: &Path, key: &ProbeKey, timings: &Timings) -> std::io::Result<()> {
    let mut entries: Vec<serde_json::Value> = read_entries(file)
        .into_iter()
        .filter(|entry| !key.matches(entry))
        .collect();
    let seconds: serde_json::Map<String, serde_json::Value> = timings
        .iter()
        .map(|(size, seconds)| (size.to_string(), serde_json::json!(seconds)))
        .collect();
    entries.push(serde_json::json!({
        "model": key.model,
        "size": key.size,
        "modified_ns": key.modified_ns.to_string(),
        "threads": key.threads,
        "row_length": key.row_length,
        "bf16": key.bf16,
        "seconds_per_token": seconds,
    }));
    let excess = entries.len().saturating_sub(MAX_ENTRIES);
    entries.drain(..excess);
    if let Some(folder) = file.parent() {
        std::fs::create_dir_all(folder)?;
    }
    let text = serde_json::to_string_pretty(&serde_json::json!({ "entries": entries }))?;
    let temporary = file.with_extension(format!("json.{}.tmp", std::process::id()));
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_candidates_stay_within_the_bound() {
        assert_eq!(candidates_within(8192), vec![64, 128, 256, 512]);
        assert_eq!(candidates_within(256), vec![64, 128, 256]);
        assert_eq!(candidates_within(63), Vec::<usize>::new());
    }

    #[test]
    fn the_fastest_is_chosen_among_the_candidates_and_needs_them_all() {
        let timings: Timings = [(64, 3.0), (128, 2.0), (256, 2.5), (512, 1.0)].into();
        assert_eq!(fastest(&timings, &[64, 128, 256, 512]), Some(512));
        assert_eq!(fastest(&timings, &[64, 128, 256]), Some(128));
        let partial: Timings = [(64, 3.0)].into();
        assert_eq!(fastest(&partial, &[64, 128]), None);
    }

    #[test]
    fn timings_survive_the_cache_file_per_key() {
        let folder = std::env::temp_dir().join(format!("backfill-pass-{}", std::process::id()));
        let file = folder.join("onnx-pass.json");
        let key = ProbeKey {
            model: "/models/a.onnx".into(),
            size: 10,
            modified_ns: 1_700_000_000_123_456_789,
            threads: 2,
            row_length: 64,
            bf16: false,
        };
        let other = ProbeKey {
            threads: 4,
            ..key.clone()
        };
        assert!(read_cached(&file, &key).is_empty());
        let timings: Timings = [(64, 2e-4), (128, 1.5e-4)].into();
        store(&file, &key, &timings).unwrap();
        store(&file, &other, &[(64, 1e-4)].into()).unwrap();
        assert_eq!(read_cached(&file, &key), timings);
        assert_eq!(read_cached(&file, &other), [(64, 1e-4)].into());
        // A changed model file (another size) is probed afresh, and so are bf16 products.
        assert!(read_cached(&file, &ProbeKey { size: 11, ..key.clone() }).is_empty());
        assert!(read_cached(&file, &ProbeKey { bf16: true, ..key.clone() }).is_empty());
        std::fs::remove_dir_all(&folder).unwrap();
    }
}
