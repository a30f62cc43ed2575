//! Prints precision and recall of every post-processing rule on real data.
//!
//! ```text
//! cargo run --release --example evaluate [DATA_DIR] [LEXICON_DIR]
//! ```
//!
//! DATA_DIR defaults to `shared/data` beside the repository, LEXICON_DIR to the shipped
//! `lexicons/`.

use std::path::{Path, PathBuf};
use std::time::Instant;

fn main() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut arguments = std::env::args().skip(1);
    let data_dir = arguments
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../../shared/data"));
    let lexicon_dir = arguments
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(backfill_postprocess::default_lexicon_dir);
    let started = Instant::now();
    match backfill_postprocess::evaluation::run(&data_dir, &lexicon_dir) {
        Ok(report) => {
            print!("{report}");
            eprintln!("evaluated in {:.1} s", started.elapsed().as_secs_f64());
        }
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    }
}
