//! Word lists of one language: which words count as that language.
//!
//! A lexicon file has one word a line; blank lines and lines starting with `#` are skipped,
//! entries are lowercased, and entries holding spaces are ignored (the language check judges
//! single words). Files ending in `.gz` are decompressed on load.

use std::io::Read;
use std::path::Path;

use foldhash::HashSet;

/// A set of lowercase words.
#[derive(Debug, Clone, Default)]
pub struct Lexicon {
    words: HashSet<Box<str>>,
}

impl Lexicon {
    /// Builds a lexicon from words (lowercased here).
    pub fn from_words<'a>(words: impl IntoIterator<Item = &'a str>) -> Lexicon {
        let mut lexicon = Lexicon::default();
        lexicon.extend_from_text_lines(words);
        lexicon
    }

    /// Parses the contents of a lexicon file.
    pub fn parse(contents: &str) -> Lexicon {
        Lexicon::from_words(contents.lines())
    }

    /// Reads a lexicon file (`.gz` decompressed).
    pub fn load(path: &Path) -> std::io::Result<Lexicon> {
        Ok(Lexicon::parse(&read_maybe_gzipped(path)?))
    }

    /// Adds every word of `other`.
    pub fn merge(&mut self, other: Lexicon) {
        self.words.extend(other.words);
    }

    /// True when `lowercase_word` (already lowercased, `'` for apostrophes) is in the lexicon.
    #[inline]
    pub fn contains(&self, lowercase_word: &str) -> bool {
        self.words.contains(lowercase_word)
    }

    /// Number of words.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// True when the lexicon has no words.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    fn extend_from_text_lines<'a>(&mut self, lines: impl IntoIterator<Item = &'a str>) {
        for line in lines {
            let word = line.trim();
            if word.is_empty() || word.starts_with('#') || word.contains(char::is_whitespace) {
                continue;
            }
            let mut lowered = String::with_capacity(word.len());
            crate::words::push_lowercase(word, &mut lowered);
            self.words.insert(lowered.into_boxed_str());
        }
    }
}

/// The file's text, gunzipped when its name ends in `.gz`.
pub(crate) fn read_maybe_gzipped(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    if path.extension().is_some_and(|extension| extension == "gz") {
        let mut text = String::new();
        flate2::read::GzDecoder::new(bytes.as_slice()).read_to_string(&mut text)?;
        Ok(text)
    } else {
        String::from_utf8(bytes)
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lowercases_and_skips_comments_and_phrases() {
        let lexicon = Lexicon::parse("# header\nOnline\n\nteam\nlevel playing field\nauto’s\n");
        assert_eq!(lexicon.len(), 3);
        assert!(lexicon.contains("online"));
        assert!(lexicon.contains("auto's"));
        assert!(!lexicon.contains("level"));
    }

    #[test]
    fn loads_plain_and_gzipped_files() {
        use std::io::Write;
        let directory = std::env::temp_dir().join(format!("pp-lexicon-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let plain = directory.join("xx.txt");
        std::fs::write(&plain, "een\ntwee\n").unwrap();
        let gzipped = directory.join("xx.txt.gz");
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(b"drie\nvier\n").unwrap();
        std::fs::write(&gzipped, encoder.finish().unwrap()).unwrap();
        assert!(Lexicon::load(&plain).unwrap().contains("twee"));
        assert!(Lexicon::load(&gzipped).unwrap().contains("vier"));
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
