//! SQL identifiers from the job file: validated once, then always quoted.
//!
//! Table and column names cannot be bound as parameters, so they are the one place where job
//! text reaches SQL. Only plain identifiers (`[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes) are
//! accepted, optionally qualified by a schema (`schema.table`), and they are always emitted in
//! double quotes, which both SQLite and PostgreSQL read as identifiers.

use std::fmt;

/// A validated, possibly schema-qualified, SQL identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ident {
    parts: Vec<String>,
}

/// Why a name is not a usable identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{name}` is not a plain SQL identifier: {why}")]
pub struct IdentError {
    pub name: String,
    pub why: &'static str,
}

impl Ident {
    /// A single identifier (a column).
    pub fn column(name: &str) -> Result<Self, IdentError> {
        check_part(name)?;
        Ok(Self { parts: vec![name.to_owned()] })
    }

    /// A table, optionally `schema.table`.
    pub fn table(name: &str) -> Result<Self, IdentError> {
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() > 2 {
            return Err(IdentError { name: name.into(), why: "use `table` or `schema.table`" });
        }
        for part in &parts {
            check_part(part).map_err(|e| IdentError { name: name.into(), why: e.why })?;
        }
        Ok(Self { parts: parts.into_iter().map(str::to_owned).collect() })
    }

    /// The unquoted last part (the table or column name itself).
    pub fn name(&self) -> &str {
        self.parts.last().map(String::as_str).unwrap_or("")
    }

    /// The schema, when qualified.
    pub fn schema(&self) -> Option<&str> {
        (self.parts.len() == 2).then(|| self.parts[0].as_str())
    }

    /// The identifier as written in the job (unquoted, dotted).
    pub fn raw(&self) -> String {
        self.parts.join(".")
    }
}

fn check_part(name: &str) -> Result<(), IdentError> {
    let error = |why| Err(IdentError { name: name.to_owned(), why });
    if name.is_empty() {
        return error("it is empty");
    }
    if name.len() > 63 {
        return error("it is longer than 63 bytes");
    }
    let mut chars = name.chars();
    let first = chars.next().unwrap_or('0');
    if !(first.is_ascii_alphabetic() || first == '_') {
        return error("it must start with a letter or `_`");
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return error("only ASCII letters, digits and `_` are allowed");
    }
    Ok(())
}

/// The quoted form, ready to splice into SQL: `"schema"."table"`.
impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "\"{part}\"")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_plain_and_qualified_names() {
        assert_eq!(Ident::table("motions").unwrap().to_string(), "\"motions\"");
        assert_eq!(Ident::table("public.motions").unwrap().to_string(), "\"public\".\"motions\"");
        assert_eq!(Ident::column("Summary_2").unwrap().to_string(), "\"Summary_2\"");
    }

    #[test]
    fn rejects_anything_that_could_break_out_of_quotes() {
        for bad in ["", "a b", "x\"; DROP TABLE t; --", "1col", "a-b", "é", "a.b.c", "t."] {
            assert!(Ident::table(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Ident::column("a.b").is_err());
        assert!(Ident::column(&"x".repeat(64)).is_err());
    }
}
