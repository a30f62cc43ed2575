//! Secrets that must never reach output, logs or the database.

use std::fmt;

/// An API key. It has no `Display`, and its `Debug` prints a placeholder, so it cannot be
/// formatted into a message or a log line by accident.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The key itself, for the one place that needs it: the `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// A database URL whose `Display` and `Debug` hide the password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_postgres(&self) -> bool {
        self.0.starts_with("postgres://") || self.0.starts_with("postgresql://")
    }

    pub fn is_sqlite(&self) -> bool {
        self.0.starts_with("sqlite:")
    }

    /// The URL with any password replaced by `***`: in the user info, and in a `password=`
    /// query parameter (PostgreSQL URLs accept both).
    pub fn redacted(&self) -> String {
        let redacted = self.redacted_userinfo();
        match redacted.split_once('?') {
            Some((base, query)) => {
                let params: Vec<String> = query
                    .split('&')
                    .map(|param| match param.split_once('=') {
                        Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                        _ => param.to_owned(),
                    })
                    .collect();
                format!("{base}?{}", params.join("&"))
            }
            None => redacted,
        }
    }

    fn redacted_userinfo(&self) -> String {
        let Some(scheme_end) = self.0.find("://") else { return self.0.clone() };
        let rest = &self.0[scheme_end + 3..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                let user = userinfo.split(':').next().unwrap_or("");
                let has_password = userinfo.contains(':');
                format!(
                    "{}://{}{}{}",
                    &self.0[..scheme_end],
                    user,
                    if has_password { ":***" } else { "" },
                    &rest[at..]
                )
            }
            None => self.0.clone(),
        }
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_hides_password() {
        let url = DatabaseUrl::new("postgres://app:s3cret@db.example:5432/prod?sslmode=require");
        assert_eq!(url.to_string(), "postgres://app:***@db.example:5432/prod?sslmode=require");
        assert!(!format!("{url:?}").contains("s3cret"));
    }

    #[test]
    fn database_url_hides_a_password_query_parameter() {
        let url = DatabaseUrl::new("postgres://app@db/prod?sslmode=require&password=s3cret&options=-c%20x%3D1");
        assert_eq!(url.to_string(), "postgres://app@db/prod?sslmode=require&password=***&options=-c%20x%3D1");
    }

    #[test]
    fn database_url_without_password_is_unchanged() {
        assert_eq!(DatabaseUrl::new("sqlite://data/m.db").to_string(), "sqlite://data/m.db");
        assert_eq!(DatabaseUrl::new("postgres://u@h/d").to_string(), "postgres://u@h/d");
    }

    #[test]
    fn api_key_debug_is_redacted() {
        assert_eq!(format!("{:?}", ApiKey::new("sk-live-123".into())), "ApiKey(<redacted>)");
    }
}
