//! The evaluation report as text: one block per rule, figures beside their targets.

use std::fmt;

use super::strip_eval::DESIGN_PATTERN;
use super::{METADATA_PATTERNS, Report, share};

fn percent(value: f64) -> String {
    format!("{:.2}%", value * 100.0)
}

fn fraction(part: usize, whole: usize) -> String {
    format!("{part}/{whole} ({})", percent(share(part, whole)))
}

impl fmt::Display for Report {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let script = &self.script;
        writeln!(
            out,
            "== script = \"Latin\": whole lines in 12 other scripts mixed into Dutch outputs =="
        )?;
        writeln!(
            out,
            "  lines dropped             {}   target >= 99.5%",
            fraction(script.dropped, script.injected)
        )?;
        writeln!(
            out,
            "  dropped or fully cut      {}",
            fraction(script.handled, script.injected)
        )?;
        let languages: Vec<String> = script
            .by_language
            .iter()
            .map(|(code, injected, dropped, _)| format!("{code} {dropped}/{injected}"))
            .collect();
        writeln!(out, "  by language: {}", languages.join(", "))?;
        let (lines, touched, dropped) = script.clean_totals();
        writeln!(
            out,
            "  clean Dutch lines touched {}   target <= 0.1%",
            fraction(touched, lines)
        )?;
        writeln!(
            out,
            "  clean Dutch lines dropped {}",
            fraction(dropped, lines)
        )?;
        for (source, lines, touched, dropped) in &script.clean_by_source {
            writeln!(
                out,
                "    {source}: {} touched, {dropped} dropped",
                fraction(*touched, *lines)
            )?;
        }
        writeln!(
            out,
            "    clean lines around the injected ones (resampled from outputs and sentences) {}",
            fraction(script.mixed_clean_touched, script.mixed_clean_lines)
        )?;
        for example in &script.corpus_touched_examples {
            writeln!(out, "    touched: {example:?}")?;
        }
        writeln!(
            out,
            "  Latin-script sentences of 10 other languages touched {}",
            fraction(script.latin_other_touched, script.latin_other_lines)
        )?;
        writeln!(
            out,
            "  zh/ar/ru fragments inside Dutch lines cut exactly {}",
            fraction(script.fragments_cut_exactly, script.fragments_injected)
        )?;
        for failure in &script.fragment_failures {
            writeln!(out, "    not exact: {failure}")?;
        }

        let language = &self.language;
        writeln!(
            out,
            "\n== language = \"nl\": English words from real English sentences injected into Dutch outputs =="
        )?;
        writeln!(
            out,
            "  texts {} ({} clean); injected words: {} not Dutch, {} also listed as Dutch by OpenTaal",
            language.texts,
            language.clean_texts,
            language.injected_unambiguous,
            language.injected_ambiguous
        )?;
        let found = language.found_unambiguous + language.found_ambiguous;
        writeln!(
            out,
            "  precision                 {}   target >= 95%",
            fraction(found, found + language.false_positives)
        )?;
        writeln!(
            out,
            "  recall (not Dutch words)  {}   target >= 90%",
            fraction(language.found_unambiguous, language.injected_unambiguous)
        )?;
        writeln!(
            out,
            "  found among words also listed as Dutch {}",
            fraction(language.found_ambiguous, language.injected_ambiguous)
        )?;
        writeln!(
            out,
            "  recall over all injected English words {}",
            fraction(
                found,
                language.injected_unambiguous + language.injected_ambiguous
            )
        )?;
        writeln!(
            out,
            "  false positives {} = {:.2} per 1000 words of the Dutch texts; clean texts with a word flagged {}",
            language.false_positives,
            1000.0 * share(language.false_positives, language.base_tokens),
            fraction(language.clean_texts_flagged, language.clean_texts)
        )?;
        for (limit, clean, injected) in &language.rejection_by_limit {
            writeln!(
                out,
                "  max_foreign_words = {limit}: rejects {} of clean texts, {} of texts with injected words",
                percent(*clean),
                percent(*injected)
            )?;
        }
        writeln!(
            out,
            "  motion texts (real parliamentary Dutch): {} words flagged in {} ({:.2} per 1000)",
            language.motion_flagged,
            language.motion_tokens,
            1000.0 * share(language.motion_flagged, language.motion_tokens)
        )?;
        let mut words: Vec<(&String, &usize)> = language.false_positive_words.iter().collect();
        words.sort_by(|left, right| right.1.cmp(left.1).then(left.0.cmp(right.0)));
        let top: Vec<String> = words
            .iter()
            .take(20)
            .map(|(word, count)| format!("{word} {count}"))
            .collect();
        writeln!(out, "  false-positive words: {}", top.join(", "))?;
        writeln!(
            out,
            "  missed (sample): {}",
            language.missed_examples.join(" ")
        )?;

        let typos = &self.typos;
        writeln!(
            out,
            "\n== typos: {} generated entries (run-together words, swapped and dropped letters) ==",
            typos.entries
        )?;
        writeln!(
            out,
            "  repaired to the exact original {}   target 100%",
            fraction(typos.repaired_exactly, typos.injected)
        )?;
        writeln!(
            out,
            "  clean texts changed {}   target 0",
            fraction(typos.clean_changed, typos.clean_texts)
        )?;
        for failure in &typos.failures {
            writeln!(out, "    failed: {failure}")?;
        }

        let strip = &self.strip;
        writeln!(
            out,
            "\n== strip: metadata fragments ({} from motion titles, {} like \"(45-102)\") ==",
            strip.real_fragments, strip.synthetic_fragments
        )?;
        writeln!(out, "  patterns: {}", METADATA_PATTERNS.join("  "))?;
        writeln!(
            out,
            "  removed exactly           {}",
            fraction(strip.removed_exactly, strip.injected)
        )?;
        writeln!(out, "    missed: {}", strip.missed.join(" "))?;
        writeln!(
            out,
            "  clean texts stripped      {}",
            fraction(strip.clean_stripped, strip.clean_texts)
        )?;
        writeln!(
            out,
            "  the bare pattern {DESIGN_PATTERN} alone would strip {} clean texts",
            fraction(strip.clean_stripped_by_design_pattern, strip.clean_texts)
        )?;
        for example in &strip.clean_stripped_examples {
            writeln!(out, "    stripped from a clean text: {example:?}")?;
        }
        writeln!(out, "\n== normalize ==")?;
        writeln!(
            out,
            "  clean texts changed       {}",
            fraction(strip.clean_normalized, strip.clean_texts)
        )?;
        let actions: Vec<String> = strip
            .normalize_actions
            .iter()
            .map(|(name, count)| format!("{name} {count}"))
            .collect();
        writeln!(out, "  actions (texts): {}", actions.join(", "))
    }
}
