//! `${VAR}` expansion in job-file strings.
//!
//! `${VAR}` is replaced by the environment variable's value and is an error when unset;
//! `${VAR:-default}` falls back to `default` when `VAR` is unset or empty; `$$` is a literal `$`.
//! A `$` not followed by `{` or `$` is kept as written, so SQL predicates and regexes that use
//! `$` pass through unchanged.

/// Why a string could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("environment variable {0} is not set (the job refers to ${{{0}}}); set it, or write ${{{0}:-default}}")]
    Unset(String),
    #[error("unterminated `${{` (write `$$` for a literal `$`)")]
    Unterminated,
    #[error("`${{{0}}}` is not a valid variable name")]
    BadName(String),
}

/// Expands `text` with variables looked up by `lookup`.
pub fn expand_with(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body_and_tail) = after.strip_prefix('{') {
            let close = body_and_tail.find('}').ok_or(ExpandError::Unterminated)?;
            let body = &body_and_tail[..close];
            let (name, default) = match body.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (body, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ExpandError::BadName(name.to_owned()));
            }
            let value = lookup(name).filter(|v| !(default.is_some() && v.is_empty()));
            match (value, default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => return Err(ExpandError::Unset(name.to_owned())),
            }
            rest = &body_and_tail[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Expands `text` from the process environment.
pub fn expand(text: &str) -> Result<String, ExpandError> {
    expand_with(text, &|name| std::env::var(name).ok())
}

/// Expands every string inside a TOML value, naming the key path in errors. A string that is
/// exactly one `${…}` and expands to a number or `true`/`false` becomes that number or boolean,
/// so numeric keys can come from the environment too (`context_window = "${CTX:-4096}"`).
pub fn expand_toml(value: &mut toml::Value, path: &str) -> Result<(), (String, ExpandError)> {
    match value {
        toml::Value::String(s) => {
            let whole = s.starts_with("${") && s.ends_with('}') && s.matches("${").count() == 1;
            let expanded = expand(s).map_err(|e| (path.to_owned(), e))?;
            *value = match (whole, expanded.parse::<i64>(), expanded.parse::<f64>(), expanded.as_str()) {
                (true, Ok(n), _, _) => toml::Value::Integer(n),
                (true, _, Ok(x), _) if x.is_finite() => toml::Value::Float(x),
                (true, _, _, "true") => toml::Value::Boolean(true),
                (true, _, _, "false") => toml::Value::Boolean(false),
                _ => toml::Value::String(expanded),
            };
        }
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_toml(item, &format!("{path}[{i}]"))?;
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                expand_toml(item, &child)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("db.local".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_set_variables_and_defaults() {
        assert_eq!(expand_with("postgres://${HOST}/x", &env).unwrap(), "postgres://db.local/x");
        assert_eq!(expand_with("${NOPE:-sqlite://a.db}", &env).unwrap(), "sqlite://a.db");
        assert_eq!(expand_with("${EMPTY:-fallback}", &env).unwrap(), "fallback");
        assert_eq!(expand_with("${EMPTY}", &env).unwrap(), "");
    }

    #[test]
    fn leaves_plain_dollars_and_unescapes_double_dollars() {
        assert_eq!(expand_with(r"price ~ '^\d+$' and $$5", &env).unwrap(), r"price ~ '^\d+$' and $5");
    }

    #[test]
    fn a_whole_variable_can_fill_a_numeric_key() {
        let mut value: toml::Value = toml::from_str::<toml::Table>(
            "a = \"${BACKFILL_TEST_NUMBER_UNSET:-4096}\"\nb = \"${BACKFILL_TEST_NUMBER_UNSET:-0.5}\"\nc = \"v${BACKFILL_TEST_NUMBER_UNSET:-1}\"",
        )
        .map(toml::Value::Table)
        .unwrap();
        expand_toml(&mut value, "").unwrap();
        assert_eq!(value["a"], toml::Value::Integer(4096));
        assert_eq!(value["b"], toml::Value::Float(0.5));
        assert_eq!(value["c"], toml::Value::String("v1".into()));
    }

    #[test]
    fn names_the_unset_variable() {
        let err = expand_with("${DATABASE_URL}", &env).unwrap_err();
        assert_eq!(err, ExpandError::Unset("DATABASE_URL".into()));
        assert!(err.to_string().contains("DATABASE_URL"));
        assert_eq!(expand_with("${OPEN", &env).unwrap_err(), ExpandError::Unterminated);
        assert!(matches!(expand_with("${a b}", &env), Err(ExpandError::BadName(_))));
    }
}
