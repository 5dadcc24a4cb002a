//! Upstream authentication: how the gateway proves who it is to a backend.
//!
//! Each backend has one [`Credential`]. It turns into the header the backend expects
//! (`api-key` for Azure, `Authorization: Bearer` for OpenAI-compatible servers). Header
//! values are marked sensitive so they never appear in debug output. The client's own
//! credentials are removed by the proxy before this is applied.

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::config::{BackendAuthConfig, BackendKind, Secret};

/// A backend credential, ready to apply to an upstream request.
#[derive(Clone)]
pub enum Credential {
    /// A static key sent in the given header.
    Static {
        header: HeaderName,
        value: HeaderValue,
    },
    /// No credential.
    None,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Static { header, .. } => write!(f, "Static({header}: [redacted])"),
            Self::None => f.write_str("None"),
        }
    }
}

/// A credential that cannot be turned into a header value.
#[derive(Debug, thiserror::Error)]
#[error("the credential contains characters not allowed in an HTTP header")]
pub struct InvalidCredential;

impl Credential {
    /// Build the credential for a backend from its resolved config.
    pub fn new(
        auth: &BackendAuthConfig,
        kind: BackendKind,
        secret: Option<&Secret>,
    ) -> Result<Self, InvalidCredential> {
        match (auth, secret) {
            (BackendAuthConfig::ApiKey { .. }, Some(key)) => {
                let (header, text) = match kind {
                    BackendKind::Azure => {
                        (HeaderName::from_static("api-key"), key.expose().to_owned())
                    }
                    BackendKind::Openai => (
                        http::header::AUTHORIZATION,
                        format!("Bearer {}", key.expose()),
                    ),
                };
                let mut value = HeaderValue::from_str(&text).map_err(|_| InvalidCredential)?;
                value.set_sensitive(true);
                Ok(Self::Static { header, value })
            }
            _ => Ok(Self::None),
        }
    }

    /// The kind of credential, for audit lines and readiness (never the secret).
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Static { .. } => "api_key",
            Self::None => "none",
        }
    }

    /// Whether the credential can be used now. Static credentials always can.
    pub fn is_ready(&self) -> bool {
        true
    }

    /// Add the credential to an upstream request's headers.
    pub fn apply(&self, headers: &mut HeaderMap) {
        if let Self::Static { header, value } = self {
            headers.insert(header.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_key() -> BackendAuthConfig {
        BackendAuthConfig::ApiKey {
            key: None,
            key_file: None,
        }
    }

    #[test]
    fn azure_uses_api_key_header_and_openai_bearer() {
        let key = Secret::new("k1".into());
        let mut h = HeaderMap::new();
        Credential::new(&api_key(), BackendKind::Azure, Some(&key))
            .unwrap()
            .apply(&mut h);
        assert_eq!(h["api-key"], "k1");
        let mut h = HeaderMap::new();
        let c = Credential::new(&api_key(), BackendKind::Openai, Some(&key)).unwrap();
        c.apply(&mut h);
        assert_eq!(h["authorization"], "Bearer k1");
        assert!(!format!("{c:?}").contains("k1"));
    }

    #[test]
    fn refuses_header_injection() {
        let key = Secret::new("k1\r\nx-evil: 1".into());
        assert!(Credential::new(&api_key(), BackendKind::Azure, Some(&key)).is_err());
    }
}
