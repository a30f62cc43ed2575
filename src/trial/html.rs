//! `trial --html FILE`: one self-contained page — inline CSS, no script, nothing fetched — with
//! the summary table and every sampled row's input beside each model's answer, the words
//! post-processing put in and the foreign words it counted marked. On a narrow screen the
//! answers stack under the input.

use std::fmt::Write;

use serde_json::Value;

use super::{ItemAnswer, ModelReport, SampledRow, Trial};

const STYLE: &str = "\
body{font:16px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;padding:12px;max-width:1200px;color:#1b1b1b;background:#fff}\
h1{font-size:1.3em;margin:.2em 0}h2{font-size:1.05em;margin:0 0 .4em}h3{font-size:.95em;margin:0 0 .3em}\
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:.85em;white-space:nowrap}\
th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:right}th:nth-child(2),td:nth-child(2){text-align:left}\
tr.best td{font-weight:600}\
section.row{border:1px solid #ccc;border-radius:8px;padding:10px;margin:14px 0}\
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(260px,1fr));gap:10px}\
.input,.answer{padding:8px;border-radius:6px;background:#f6f6f6;overflow-wrap:anywhere;white-space:pre-wrap}\
.answer.valid{border-left:5px solid #2e7d32}.answer.rejected{border-left:5px solid #c62828}\
.answer.malformed,.answer.missing,.answer.failed{border-left:5px solid #ef6c00}\
.status{font-weight:400;font-size:.85em;color:#555}.field{color:#555;font-size:.85em}\
mark{background:#fff176}mark.foreign{background:#ffcdd2}del{background:#ffe0e0;color:#8b0000}\
ul.edits{margin:.4em 0 0;padding-left:1.2em;font-size:.85em;white-space:normal}.reason{color:#8b0000;font-size:.9em}\
@media (prefers-color-scheme:dark){body{background:#121212;color:#e6e6e6}.input,.answer{background:#1e1e1e}\
th,td{border-color:#333}mark{background:#8d7b00;color:#fff}mark.foreign{background:#7f2a2a}del{background:#5a1e1e;color:#ffd7d7}\
.status,.field{color:#aaa}.reason{color:#ff9a9a}}";

/// The page.
pub fn page(trial: &Trial) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>Trial of {job}</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n<h1>Trial of {job}</h1>\n\
         <p>{sampled} sampled rows of {pending} pending (seed {seed}), the same prompts sent to every model; nothing was \
         written to the target column. Spent ${spent:.4}{cap}.{stopped}</p>\n",
        job = escape(&trial.job),
        sampled = trial.sampled_items,
        pending = trial.pending_items,
        seed = trial.seed,
        spent = trial.spent_usd,
        cap = trial.budget_usd.map(|c| format!(" of a {} cap", crate::pricing::format_usd_cap(c))).unwrap_or_default(),
        stopped = trial.stopped.as_deref().map(|s| format!(" <strong>{}</strong>", escape(s))).unwrap_or_default(),
    );
    summary(&mut out, &trial.models);
    for row in &trial.rows {
        sampled_row(&mut out, row);
    }
    out.push_str("</body>\n</html>\n");
    out
}

fn summary(out: &mut String, models: &[ModelReport]) {
    out.push_str(
        "<div class=\"scroll\"><table class=\"summary\">\n<tr><th>#</th><th>model</th><th>valid</th><th>malformed</th>\
         <th>missing</th><th>rejected</th><th>failed</th><th>edited</th><th>p50</th><th>p95</th><th>in/item</th>\
         <th>out/item</th><th>$/item</th><th>whole set sync</th><th>batch</th><th>duration</th></tr>\n",
    );
    for model in models {
        let seconds = |s: Option<f64>| s.map(|s| format!("{s:.2}s")).unwrap_or_else(|| "–".into());
        let p = &model.projected;
        let duration = match (p.duration_by_limits_s, p.duration_measured_s) {
            (Some(s), _) => format!("≥ {} (limits)", crate::dry_run::humanize(s)),
            (None, Some(s)) => format!("{} (trial pace)", crate::dry_run::humanize(s)),
            _ => "–".into(),
        };
        let _ = writeln!(
            out,
            "<tr{best}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td title=\"{}\">{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>${:.6}</td><td>${:.4}</td><td>{}</td><td>{}</td></tr>",
            model.rank,
            escape(&model.model),
            model.valid,
            model.malformed,
            model.missing,
            escape(&model.rejected_by_rule.iter().map(|(r, n)| format!("{r}: {n}")).collect::<Vec<_>>().join(", ")),
            model.rejected,
            model.failed,
            model.edited,
            seconds(model.latency_p50_s),
            seconds(model.latency_p95_s),
            model.input_tokens_per_item,
            model.output_tokens_per_item,
            model.cost_per_item_usd,
            p.sync_cost_usd,
            p.batch_cost_usd.map(|b| format!("${b:.4}")).unwrap_or_else(|| "–".into()),
            escape(&duration),
            best = if model.rank == 1 { " class=\"best\"" } else { "" },
        );
    }
    out.push_str("</table></div>\n");
}

fn sampled_row(out: &mut String, row: &SampledRow) {
    let _ = write!(out, "<section class=\"row\" id=\"row-{id}\">\n<h2>Row {id}</h2>\n<div class=\"grid\">\n<div class=\"input\">", id = escape(&row.id));
    for (i, (column, value)) in row.input.iter().enumerate() {
        let _ = write!(out, "{}<span class=\"field\">{}</span>\n{}", if i > 0 { "\n" } else { "" }, escape(column), escape(value));
    }
    out.push_str("</div>\n");
    for answer in &row.answers {
        model_answer(out, &row.id, answer);
    }
    out.push_str("</div>\n</section>\n");
}

fn model_answer(out: &mut String, id: &str, answer: &ItemAnswer) {
    let _ = write!(
        out,
        "<article class=\"answer {status}\" data-item=\"{id}\" data-model=\"{model}\"><h3>{model} <span class=\"status\">{status}</span></h3>",
        status = escape(&answer.status),
        id = escape(id),
        model = escape(&answer.model),
    );
    // Marked: what post-processing put in (typos and replacements fixed) and the foreign
    // words it counted.
    let mut marks: Vec<(String, &str)> = Vec::new();
    for edit in &answer.edits {
        if let Some(to) = edit.get("to").and_then(Value::as_str).filter(|t| !t.is_empty()) {
            marks.push((to.to_owned(), "edit"));
        }
    }
    for word in &answer.foreign_words {
        if let Some(w) = word.get("word").and_then(Value::as_str).filter(|w| !w.is_empty()) {
            marks.push((w.to_owned(), "foreign"));
        }
    }
    match (&answer.final_text, &answer.raw) {
        (Some(text), _) => out.push_str(&highlight(text, &marks)),
        (None, Some(raw)) => out.push_str(&escape(raw)),
        (None, None) => {}
    }
    if let Some(reason) = &answer.reason {
        let _ = write!(out, "\n<span class=\"reason\">{}</span>", escape(reason));
    }
    if !answer.edits.is_empty() {
        out.push_str("<ul class=\"edits\">");
        for edit in &answer.edits {
            let _ = write!(out, "<li>{}</li>", describe(edit));
        }
        out.push_str("</ul>");
    }
    out.push_str("</article>\n");
}

/// One post-processing change for people, as HTML.
fn describe(edit: &Value) -> String {
    let text = |key: &str| edit.get(key).and_then(Value::as_str).map(escape).unwrap_or_default();
    let rule = text("rule");
    match rule.as_str() {
        "typo" | "replacement" => format!("{rule}: <del>{}</del> → <mark>{}</mark>", text("from"), text("to")),
        "script_dropped_line" | "script_removed_fragment" => format!("{rule} ({}): <del>{}</del>", text("script"), text("removed")),
        "strip" => format!("strip: <del>{}</del>", text("removed")),
        _ => {
            let detail: Vec<String> = edit
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.as_str() != "rule")
                .map(|(k, v)| format!("{k} {}", v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())))
                .collect();
            format!("{rule}: {}", escape(&detail.join(", ")))
        }
    }
}

/// `text` escaped, with every occurrence of each mark's text wrapped in `<mark>` (the first
/// mark wins where two overlap).
fn highlight(text: &str, marks: &[(String, &str)]) -> String {
    let mut spans: Vec<(usize, usize, &str)> = Vec::new();
    for (needle, class) in marks {
        for (start, _) in text.match_indices(needle.as_str()) {
            let end = start + needle.len();
            if spans.iter().all(|&(s, e, _)| end <= s || start >= e) {
                spans.push((start, end, class));
            }
        }
    }
    spans.sort_unstable();
    let mut out = String::with_capacity(text.len() + 16 * spans.len());
    let mut at = 0;
    for (start, end, class) in spans {
        out.push_str(&escape(&text[at..start]));
        let class = if class == "foreign" { " class=\"foreign\"" } else { "" };
        let _ = write!(out, "<mark{class}>{}</mark>", escape(&text[start..end]));
        at = end;
    }
    out.push_str(&escape(&text[at..]));
    out
}

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_wrap_the_words_and_everything_else_is_escaped() {
        let marked = highlight("a <b> fix & word", &[("fix".into(), "edit"), ("word".into(), "foreign")]);
        assert_eq!(marked, "a &lt;b&gt; <mark>fix</mark> &amp; <mark class=\"foreign\">word</mark>");
        assert_eq!(highlight("abc", &[("abc".into(), "edit"), ("b".into(), "foreign")]), "<mark>abc</mark>");
    }
}
