//! [`StoreError`], and keeping passwords out of it.
//!
//! A PostgreSQL URL may carry a password (`postgres://user:pw@host/db`, or
//! `?password=pw`). Errors show the URL with those values replaced by `***`
//! ([`redact_url`]), and every message that came from the driver is scrubbed of the
//! password, raw and percent-decoded ([`Scrubber`]), before it is stored in an error.

use std::fmt;

/// Why a store operation failed. Never contains a secret.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// `store.url` cannot be used.
    #[error("store.url '{url}': {reason}")]
    Url { url: String, reason: String },
    /// The database could not be reached or opened at start.
    #[error("cannot open the store at {url}: {detail}")]
    Open { url: String, detail: String },
    /// The built-in migrations could not be applied.
    #[error("cannot apply the store's migrations at {url}: {detail}")]
    Migrate { url: String, detail: String },
    /// The database went away (connection refused or lost, pool timed out or closed).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The database refused a statement.
    #[error("store query failed: {0}")]
    Query(String),
    /// A key with this id already exists (ids are random; the caller draws another).
    #[error("an API key with this id already exists")]
    DuplicateId,
    /// No key has this id.
    #[error("no API key has the id '{0}'")]
    UnknownKey(String),
    /// A caller's argument is unusable (bad client id, name or duration).
    #[error("{0}")]
    Invalid(String),
    /// A row the store cannot make sense of.
    #[error("unexpected data in the store: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the failure is the database being unreachable (worth retrying later).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Open { .. })
    }
}

/// Removes known secrets from driver messages.
#[derive(Clone, Default)]
pub(crate) struct Scrubber {
    secrets: Vec<String>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Scrubber([redacted])")
    }
}

impl Scrubber {
    /// A scrubber for the passwords in `url`.
    pub(crate) fn for_url(url: &str) -> Self {
        let mut secrets = Vec::new();
        for s in url_secrets(url) {
            let decoded = percent_decode(&s);
            if !decoded.is_empty() && decoded != s {
                secrets.push(decoded);
            }
            if !s.is_empty() {
                secrets.push(s);
            }
        }
        // Longest first, so a secret containing another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Scrubber { secrets }
    }

    /// `message` with every secret replaced by `***`.
    pub(crate) fn scrub(&self, message: impl fmt::Display) -> String {
        let mut s = message.to_string();
        for secret in &self.secrets {
            if s.contains(secret.as_str()) {
                s = s.replace(secret.as_str(), "***");
            }
        }
        s
    }

    /// A driver error as a [`StoreError`]: unreachable database, duplicate id, or a
    /// refused statement.
    pub(crate) fn error(&self, e: sqlx::Error) -> StoreError {
        match &e {
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::DuplicateId,
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(self.scrub(&e)),
            _ => StoreError::Query(self.scrub(&e)),
        }
    }
}

/// `url` with its password (user-info or `password=` query parameter) replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    for s in url_secrets(url) {
        if !s.is_empty() {
            out = out.replace(&s, "***");
        }
    }
    out
}

/// Secret values written in a URL: the user-info password and the values of query
/// parameters whose name mentions a password.
fn url_secrets(url: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Some((_, rest)) = url.split_once("://") else {
        return found;
    };
    // The user-info ends at the last `@`: a password may itself hold `/`, `?` or `#` when
    // someone forgot to percent-encode it. (An `@` only in the query over-redacts, which is
    // the safe side.)
    if let Some((userinfo, _)) = rest.rsplit_once('@') {
        if let Some((_, password)) = userinfo.split_once(':') {
            found.push(password.to_owned());
        }
    }
    if let Some((_, query)) = rest.split_once('?') {
        let query = query.split('#').next().unwrap_or("");
        for pair in query.split('&') {
            if let Some((k, v)) = pair.split_once('=') {
                if k.to_ascii_lowercase().contains("pass") {
                    found.push(v.to_owned());
                }
            }
        }
    }
    found
}

/// `%XX` sequences decoded (lossy); anything malformed is kept as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(b) = hex {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_userinfo_and_query_passwords() {
        assert_eq!(
            redact_url("postgres://app:s3cr%40t@db:5432/keys?sslmode=require"),
            "postgres://app:***@db:5432/keys?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://db/keys?user=app&password=hunter2"),
            "postgres://db/keys?user=app&password=***"
        );
        assert_eq!(
            redact_url("postgres://app@db/keys"),
            "postgres://app@db/keys"
        );
        assert_eq!(redact_url("sqlite://x.db"), "sqlite://x.db");
        // Unencoded `#`, `/` and `?` in a password are still inside the user-info.
        for (url, secret) in [
            ("postgres://app:pa#ss@db/keys", "pa#ss"),
            ("postgres://app:p/ss@db/keys", "p/ss"),
            ("postgress://app:hunter2@db/keys", "hunter2"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{shown}");
            assert!(shown.contains("app:***@db"), "{shown}");
        }
    }

    #[test]
    fn scrubs_raw_and_decoded_passwords() {
        let s = Scrubber::for_url("postgres://app:s3cr%40t@db/keys");
        assert_eq!(
            s.scrub("auth failed for s3cr@t and s3cr%40t"),
            "auth failed for *** and ***"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%41%zz"), "A%zz");
    }
}
