//! Validation: mapping a model's answer back to the items of its batch.
//!
//! The answer must be a JSON object keyed by item id. Code fences, leading prose, an array of
//! `{"id": …}` objects and a single wrapping key are tolerated. Keys that are not ids of this
//! batch are discarded and counted — an output is only ever attached to the id it was returned
//! under. A truncated answer keeps its complete entries.
//!
//! A nearly-right answer is repaired when the repair is unambiguous, and the repair is
//! reported: raw control characters (a literal newline) inside strings are escaped, commas
//! before a closing `}` or `]` are dropped, and when the first `{` belongs to prose every later
//! candidate object is tried. An id given twice with different values is invalid (which one
//! is meant cannot be known).

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

/// What each item's output must look like.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputShape {
    /// One string per item.
    Text,
    /// An object per item with these string fields.
    Object(Vec<String>),
}

/// One item's accepted output: the text for each output key (`""` for [`OutputShape::Text`]).
pub type ItemOutput = BTreeMap<String, String>;

/// The batch's answer, split per item (indices into the batch).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Validated {
    pub outputs: Vec<(usize, ItemOutput)>,
    /// Items the answer did not contain.
    pub missing: Vec<usize>,
    /// Items whose entry was present but unusable, with the reason.
    pub invalid: Vec<(usize, String)>,
    /// Keys that were not ids of this batch (discarded).
    pub foreign_keys: usize,
    /// How the answer was repaired before it parsed, when it was.
    pub repair: Option<String>,
}

/// The answer held no JSON object at all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed answer: {0}")]
pub struct Malformed(pub String);

/// Why a truncated answer with no complete entry is malformed, and what to change.
pub const CUT_BEFORE_FIRST_ENTRY: &str = "cut off at max_tokens before the first complete entry (max_tokens allows model.max_output_tokens_per_item per item: raise it if answers need more)";

/// Validates `content` against the batch `ids`. With `truncated` (finish_reason = "length"),
/// complete leading entries of a cut-off object are kept.
pub fn validate(
    content: &str,
    ids: &[String],
    shape: &OutputShape,
    truncated: bool,
) -> Result<Validated, Malformed> {
    let found_json = extract_object(content, truncated, ids, shape)?;
    let entries = unwrap_entries(found_json.value, ids, shape);

    let index: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (id.as_str(), i)).collect();
    let mut found: Vec<Option<Value>> = vec![None; ids.len()];
    let mut twice: Vec<bool> = vec![false; ids.len()];
    let mut foreign_keys = 0;
    for (key, value) in entries {
        match index.get(key.trim()) {
            Some(&i) => {
                if found[i].as_ref().is_some_and(|earlier| *earlier != value) {
                    twice[i] = true;
                }
                found[i] = Some(value);
            }
            None => foreign_keys += 1,
        }
    }
    // serde_json keeps the last of duplicate keys: look for them in the text itself.
    for key in &found_json.duplicate_keys {
        if let Some(&i) = index.get(key.trim()) {
            twice[i] = true;
        }
    }
    let repair = (!found_json.repairs.is_empty()).then(|| found_json.repairs.join(", "));
    let mut result = Validated { foreign_keys, repair, ..Validated::default() };
    for (i, value) in found.into_iter().enumerate() {
        match value {
            None => result.missing.push(i),
            Some(_) if twice[i] => result.invalid.push((i, "the answer gives this id more than once, with different values".into())),
            Some(value) => match item_output(value, shape) {
                Ok(output) => result.outputs.push((i, output)),
                Err(reason) => result.invalid.push((i, reason)),
            },
        }
    }
    Ok(result)
}

/// The answer's JSON value, how it was repaired, and the keys its top-level object repeats.
struct FoundJson {
    value: Value,
    repairs: Vec<&'static str>,
    duplicate_keys: Vec<String>,
}

/// At most this many `{`/`[` positions are tried as the start of the answer's object.
const MAX_CANDIDATES: usize = 64;

/// Finds the answer's JSON value: inside a code fence if there is one, from the first `{` or
/// `[`; failing that, repaired (control characters, trailing commas) and from each later `{`
/// or `[` in turn, preferring a value that holds an id of the batch.
fn extract_object(content: &str, truncated: bool, ids: &[String], shape: &OutputShape) -> Result<FoundJson, Malformed> {
    let body = strip_fence(content);
    let starts: Vec<usize> = body.match_indices(['{', '[']).map(|(at, _)| at).take(MAX_CANDIDATES).collect();
    let Some(&first) = starts.first() else {
        return Err(Malformed(format!("no JSON object in the answer ({})", excerpt(content))));
    };
    let json = &body[first..];
    let strict_error = match first_value(json) {
        Ok(value) => return Ok(found(value, json, Vec::new())),
        Err(e) if e.is_eof() && truncated => match parse_complete_prefix(json) {
            Some(value) => return Ok(found(value, json, Vec::new())),
            None => Malformed(format!("{CUT_BEFORE_FIRST_ENTRY}: {e}")),
        },
        Err(e) => Malformed(format!("{e} ({})", excerpt(content))),
    };
    let mut fallback = None;
    for (n, &start) in starts.iter().enumerate() {
        let raw = &body[start..];
        let (clean, escaped, commas) = sanitize(raw);
        let mut repairs = Vec::new();
        if n > 0 {
            repairs.push("object found after prose with braces");
        }
        if escaped {
            repairs.push("raw control characters escaped");
        }
        if commas {
            repairs.push("trailing commas dropped");
        }
        let parsed = match first_value(&clean) {
            Ok(value) => Some(value),
            Err(e) if e.is_eof() && truncated => parse_complete_prefix(&clean),
            Err(_) => None,
        };
        let Some(value) = parsed else { continue };
        if repairs.is_empty() {
            // Parsed as it stands (a later candidate would have been marked): nothing repaired.
            continue;
        }
        let holds_an_id = unwrap_entries(value.clone(), ids, shape).iter().any(|(key, _)| ids.iter().any(|id| id == key.trim()));
        if holds_an_id {
            return Ok(found(value, &clean, repairs));
        }
        fallback.get_or_insert((value, clean, repairs));
    }
    match fallback {
        Some((value, text, repairs)) => Ok(found(value, &text, repairs)),
        None => Err(strict_error),
    }
}

fn found(value: Value, text: &str, repairs: Vec<&'static str>) -> FoundJson {
    FoundJson { value, repairs, duplicate_keys: duplicate_top_level_keys(text) }
}

/// The first JSON value of `text` (anything after it is ignored).
fn first_value(text: &str) -> Result<Value, serde_json::Error> {
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
    stream.next().unwrap_or_else(|| Err(serde::de::Error::custom("empty answer")))
}

/// Escapes raw control characters inside strings and drops commas before `}` or `]`; says
/// whether it did either. Outside strings nothing else changes.
fn sanitize(json: &str) -> (String, bool, bool) {
    let mut out = String::with_capacity(json.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    let (mut controls, mut commas) = (false, false);
    for (at, c) in json.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                (false, c) if c < ' ' => {
                    controls = true;
                    match c {
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        '\t' => out.push_str("\\t"),
                        c => out.push_str(&format!("\\u{:04x}", c as u32)),
                    }
                    continue;
                }
                _ => {}
            }
            out.push(c);
            continue;
        }
        match c {
            '"' => in_string = true,
            ',' if json[at + 1..].trim_start().starts_with(['}', ']']) => {
                commas = true;
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    (out, controls, commas)
}

/// Keys the first JSON object of `text` holds more than once (serde_json keeps only the last).
fn duplicate_top_level_keys(text: &str) -> Vec<String> {
    struct Keys(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Keys {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = Keys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("any JSON value")
                }
                fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                    let mut seen = std::collections::HashSet::new();
                    let mut twice = Vec::new();
                    while let Some(key) = map.next_key::<String>()? {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        if !seen.insert(key.clone()) {
                            twice.push(key);
                        }
                    }
                    Ok(Keys(twice))
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Keys, A::Error> {
                    while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                    Ok(Keys(Vec::new()))
                }
            }
            deserializer.deserialize_any(Visit)
        }
    }
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Keys>();
    match stream.next() {
        Some(Ok(Keys(twice))) => twice,
        _ => Vec::new(),
    }
}

fn strip_fence(content: &str) -> &str {
    let Some(open) = content.find("```") else { return content };
    let after = &content[open + 3..];
    let body_start = after.find('\n').map(|n| n + 1).unwrap_or(0);
    let body = &after[body_start..];
    match body.find("```") {
        Some(close) => &body[..close],
        None => body,
    }
}

/// For a top-level object cut off mid-way, parses the members that were complete.
fn parse_complete_prefix(json: &str) -> Option<Value> {
    if !json.starts_with('{') {
        return None;
    }
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut last_complete = None;
    for (at, c) in json.char_indices() {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => last_complete = Some(at),
            _ => {}
        }
    }
    let cut = last_complete?;
    serde_json::from_str(&format!("{}}}", &json[..cut])).ok()
}

/// The `(key, value)` entries of the answer, tolerating an array of `{"id": …}` objects and a
/// single wrapping key such as `{"items": {…}}`.
fn unwrap_entries(value: Value, ids: &[String], shape: &OutputShape) -> Vec<(String, Value)> {
    match value {
        Value::Object(map) => {
            let any_id = map.keys().any(|k| ids.iter().any(|id| id == k.trim()));
            if !any_id && map.len() == 1 {
                let (key, inner) = map.into_iter().next().expect("one entry");
                return match inner {
                    inner @ (Value::Object(_) | Value::Array(_)) => unwrap_entries(inner, ids, shape),
                    other => vec![(key, other)],
                };
            }
            map.into_iter().collect()
        }
        Value::Array(elements) => elements
            .into_iter()
            .filter_map(|element| match element {
                Value::Object(mut obj) => {
                    let id = match obj.remove("id")? {
                        Value::String(s) => s,
                        Value::Number(n) => n.to_string(),
                        _ => return None,
                    };
                    Some((id, array_element_value(obj, shape)))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// An array element without its id: the one remaining field for text, else the object.
fn array_element_value(mut obj: Map<String, Value>, shape: &OutputShape) -> Value {
    match shape {
        OutputShape::Text if obj.len() == 1 => obj.into_iter().next().expect("one").1,
        OutputShape::Text => obj.remove("output").unwrap_or(Value::Object(obj)),
        OutputShape::Object(_) => Value::Object(obj),
    }
}

fn item_output(value: Value, shape: &OutputShape) -> Result<ItemOutput, String> {
    match shape {
        OutputShape::Text => {
            let text = match value {
                Value::String(s) => s,
                Value::Object(obj) if obj.len() == 1 => match obj.into_iter().next() {
                    Some((_, Value::String(s))) => s,
                    _ => return Err("expected a string".into()),
                },
                other => return Err(format!("expected a string, got {}", kind(&other))),
            };
            if text.trim().is_empty() {
                return Err("empty output".into());
            }
            Ok(BTreeMap::from([(String::new(), text)]))
        }
        OutputShape::Object(keys) => {
            let Value::Object(mut obj) = value else {
                return Err(format!("expected an object with {}", keys.join(", ")));
            };
            let mut out = BTreeMap::new();
            for key in keys {
                let text = match obj.remove(key) {
                    Some(Value::String(s)) if !s.trim().is_empty() => s,
                    Some(Value::Number(n)) => n.to_string(),
                    Some(Value::Bool(b)) => b.to_string(),
                    Some(Value::String(_)) => return Err(format!("`{key}` is empty")),
                    Some(other) => return Err(format!("`{key}` is {}, expected a string", kind(&other))),
                    None => return Err(format!("`{key}` is missing")),
                };
                out.insert(key.clone(), text);
            }
            Ok(out)
        }
    }
}

/// What a JSON value is, for messages ("a string", "an array").
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn excerpt(text: &str) -> String {
    let mut cut: String = text.chars().take(80).collect();
    if cut.len() < text.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn text(v: &Validated, i: usize) -> &str {
        &v.outputs.iter().find(|(at, _)| *at == i).unwrap().1[""]
    }

    #[test]
    fn maps_outputs_to_their_own_ids() {
        let v = validate(r#"{"b": "two", "a": "one"}"#, &ids(&["a", "b"]), &OutputShape::Text, false).unwrap();
        assert_eq!(text(&v, 0), "one");
        assert_eq!(text(&v, 1), "two");
        assert!(v.missing.is_empty() && v.invalid.is_empty() && v.foreign_keys == 0);
    }

    #[test]
    fn tolerates_fences_and_prose() {
        let answer = "Sure! Here you go:\n```json\n{\"1\": \"een\"}\n```\nAnything else?";
        let v = validate(answer, &ids(&["1"]), &OutputShape::Text, false).unwrap();
        assert_eq!(text(&v, 0), "een");
    }

    #[test]
    fn discards_and_counts_foreign_keys_and_reports_missing() {
        let v = validate(r#"{"1": "x", "99": "stolen", "3": "y"}"#, &ids(&["1", "2", "3"]), &OutputShape::Text, false).unwrap();
        assert_eq!(v.foreign_keys, 1);
        assert_eq!(v.missing, vec![1]);
        assert_eq!(v.outputs.len(), 2);
    }

    #[test]
    fn truncated_answer_keeps_complete_entries() {
        let answer = r#"{"1": "complete, with \"quotes\" and {braces}", "2": "also done", "3": "cut off he"#;
        let v = validate(answer, &ids(&["1", "2", "3"]), &OutputShape::Text, true).unwrap();
        assert_eq!(text(&v, 0), "complete, with \"quotes\" and {braces}");
        assert_eq!(text(&v, 1), "also done");
        assert_eq!(v.missing, vec![2]);
        // Without the truncation flag the same text is malformed.
        assert!(validate(answer, &ids(&["1", "2", "3"]), &OutputShape::Text, false).is_err());
    }

    #[test]
    fn an_answer_cut_off_before_its_first_entry_names_the_setting_to_raise() {
        let error = validate(r#"{"1": "cut off befo"#, &ids(&["1", "2"]), &OutputShape::Text, true).unwrap_err();
        assert!(error.0.contains("max_output_tokens_per_item"), "{}", error.0);
    }

    #[test]
    fn malformed_answers_are_errors() {
        for bad in ["", "no json here", "{\"1\": ", "{'1': 'single quotes'}"] {
            assert!(validate(bad, &ids(&["1"]), &OutputShape::Text, false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn raw_newlines_inside_strings_are_repaired_and_reported() {
        let answer = "{\"1\": \"eerste regel\ntweede regel\", \"2\": \"tab\there\"}";
        let v = validate(answer, &ids(&["1", "2"]), &OutputShape::Text, false).unwrap();
        assert_eq!(text(&v, 0), "eerste regel\ntweede regel");
        assert_eq!(text(&v, 1), "tab\there");
        assert_eq!(v.repair.as_deref(), Some("raw control characters escaped"));
    }

    #[test]
    fn trailing_commas_are_dropped_and_reported() {
        let v = validate("{\"1\": \"a, b,\", \"2\": [\"x\",],}", &ids(&["1", "2"]), &OutputShape::Text, false).unwrap();
        assert_eq!(text(&v, 0), "a, b,");
        assert_eq!(v.repair.as_deref(), Some("trailing commas dropped"));
    }

    #[test]
    fn an_object_after_braces_in_prose_is_found() {
        let answer = "I read {each} motion. Result: {\"1\": \"een\", \"2\": \"twee\"} done {x}";
        let v = validate(answer, &ids(&["1", "2"]), &OutputShape::Text, false).unwrap();
        assert_eq!((text(&v, 0), text(&v, 1)), ("een", "twee"));
        assert!(v.repair.unwrap().contains("after prose"));
        // A clean answer reports no repair.
        assert_eq!(validate("{\"1\": \"x\"}", &ids(&["1"]), &OutputShape::Text, false).unwrap().repair, None);
    }

    #[test]
    fn an_id_given_twice_is_invalid_not_guessed() {
        let v = validate(r#"{"1": "first", "2": "b", "1": "second"}"#, &ids(&["1", "2"]), &OutputShape::Text, false).unwrap();
        assert_eq!(v.invalid.len(), 1);
        assert_eq!(v.invalid[0].0, 0);
        assert_eq!(text(&v, 1), "b");
    }

    #[test]
    fn accepts_an_array_of_id_objects_and_a_wrapping_key() {
        let v = validate(r#"[{"id": 1, "summary": "a"}, {"id": "2", "summary": "b"}]"#, &ids(&["1", "2"]), &OutputShape::Text, false).unwrap();
        assert_eq!((text(&v, 0), text(&v, 1)), ("a", "b"));
        let v = validate(r#"{"results": {"1": "a"}}"#, &ids(&["1"]), &OutputShape::Text, false).unwrap();
        assert_eq!(text(&v, 0), "a");
    }

    #[test]
    fn wrong_value_types_are_invalid_not_written() {
        let v = validate(r#"{"1": 5, "2": "  ", "3": ["x"]}"#, &ids(&["1", "2", "3"]), &OutputShape::Text, false).unwrap();
        assert_eq!(v.invalid.len(), 3);
        assert!(v.outputs.is_empty());
    }

    #[test]
    fn object_outputs_need_every_key() {
        let shape = OutputShape::Object(vec!["summary".into(), "topic".into()]);
        let v = validate(r#"{"1": {"summary": "s", "topic": "t"}, "2": {"summary": "s"}}"#, &ids(&["1", "2"]), &shape, false).unwrap();
        assert_eq!(v.outputs[0].1["topic"], "t");
        assert_eq!(v.invalid, vec![(1, "`topic` is missing".to_string())]);
    }
}
