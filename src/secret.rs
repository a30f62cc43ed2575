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
    /// query parameter (PostgreSQL URLs accept both). See [`redact_url`].
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

/// A URL with its credentials hidden, found by parsing it (never by slicing): the password of
/// the user info and any `password`, `key`, `token` or `secret` query parameter become `***`.
/// A URL that does not parse, or whose path still holds an `@` (a password with a `/` in it
/// ends the authority early), is shown as its scheme only.
pub fn redact_url(text: &str) -> String {
    let hidden = |scheme: &str| format!("{scheme}://(hidden: the URL does not parse)");
    let Ok(mut url) = url::Url::parse(text) else {
        let scheme = text.split("://").next().filter(|s| !s.is_empty() && s.len() < 20 && !s.contains(['@', '/', ':'])).unwrap_or("url");
        return hidden(scheme);
    };
    if url.path().contains('@') || url.fragment().is_some_and(|f| f.contains('@')) {
        return hidden(url.scheme());
    }
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    if let Some(query) = url.query().map(str::to_owned) {
        let secretish = |key: &str| {
            let key = url::form_urlencoded::parse(key.as_bytes()).next().map(|(k, _)| k.to_ascii_lowercase()).unwrap_or_default();
            ["password", "passwd", "key", "token", "secret"].iter().any(|s| key.contains(s))
        };
        let params: Vec<String> = query
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _)) if secretish(key) => format!("{key}=***"),
                _ => param.to_owned(),
            })
            .collect();
        url.set_query(Some(&params.join("&")));
    }
    url.to_string()
}

/// A URL reduced to what identifies a service and can be stored or shown: scheme, host, port
/// and path, without user info, query or fragment. A URL that does not parse becomes a digest
/// of itself (still one value per URL, never its text).
pub fn public_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut url) if !url.path().contains('@') => {
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string().trim_end_matches('/').to_owned()
        }
        _ => {
            use sha2::Digest;
            format!("url-sha256:{}", hex::encode(&sha2::Sha256::digest(text.as_bytes())[..12]))
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
    fn passwords_with_url_characters_never_show() {
        for (url, secret) in [
            ("postgres://app:pa/ss@db:5432/prod", "ss"),
            ("postgres://app:12/s3cret@db/prod", "s3cret"),
            ("postgres://app:p%3Fw%40rd@db/prod", "p%3Fw%40rd"),
            ("postgres://app:p?w@db/prod", "w@db"),
            ("postgres://app:p#w@db/prod", "w@db"),
            ("https://user:s3cret@api.example/v1?api_key=k3y", "k3y"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} → {shown}");
        }
        assert_eq!(redact_url("https://user:s3cret@api.example/v1"), "https://user:***@api.example/v1");
        assert_eq!(public_url("https://user:s3cret@api.example:8443/v1/?key=k"), "https://api.example:8443/v1");
        assert!(public_url("postgres://app:pa/ss@db/prod").starts_with("url-sha256:"));
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
