//! Upstream authentication: how the gateway proves who it is to a backend.
//!
//! Each backend has one [`Credential`]: a static key (`api-key` for Azure, `Authorization:
//! Bearer` for OpenAI-compatible servers), nothing, or an Entra ID token kept fresh by a
//! [`token::TokenCache`] — from a client secret, a certificate ([`assertion`]), a managed
//! identity or a workload-identity token file ([`source`]). Backends with the same
//! credential and scope share one cache. Header values are marked sensitive so they never
//! appear in debug output; the client's own credentials are removed by the proxy before
//! this is applied.

pub mod assertion;
pub mod source;
pub mod token;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::config::{BackendKind, ResolvedAuth, SourceSpec, TokenSpec, Validated};
use crate::metrics::Metrics;
use source::{ClientCredentials, ClientProof, ManagedEndpoint, ManagedIdentity, Source};
use token::TokenCache;

/// A backend credential, ready to apply to an upstream request.
#[derive(Clone)]
pub enum Credential {
    /// A static key sent in the given header.
    Static {
        header: HeaderName,
        value: HeaderValue,
    },
    /// A bearer token from an identity provider.
    Token {
        cache: Arc<TokenCache>,
        kind: &'static str,
        /// The client id or managed identity the gateway authenticates as.
        identity: Arc<str>,
    },
    /// No credential.
    None,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Static { header, .. } => write!(f, "Static({header}: [redacted])"),
            Self::Token { kind, identity, .. } => write!(f, "Token({kind} as {identity})"),
            Self::None => f.write_str("None"),
        }
    }
}

/// A credential that cannot be turned into a header value.
#[derive(Debug, thiserror::Error)]
#[error("the credential contains characters not allowed in an HTTP header")]
pub struct InvalidCredential;

/// The credential has no valid token now.
#[derive(Debug, Clone, Copy)]
pub struct NotReady;

impl Credential {
    /// A static-key credential for a backend of `kind`.
    pub fn api_key(key: &str, kind: BackendKind) -> Result<Self, InvalidCredential> {
        let (header, text) = match kind {
            BackendKind::Azure => (HeaderName::from_static("api-key"), key.to_owned()),
            BackendKind::Openai => (http::header::AUTHORIZATION, format!("Bearer {key}")),
        };
        let mut value = HeaderValue::from_str(&text).map_err(|_| InvalidCredential)?;
        value.set_sensitive(true);
        Ok(Self::Static { header, value })
    }

    /// The kind of credential, for audit lines and readiness (never the secret).
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Static { .. } => "api_key",
            Self::Token { kind, .. } => kind,
            Self::None => "none",
        }
    }

    /// Who the gateway is to the backend (client id, managed identity), when it is
    /// someone.
    pub fn identity(&self) -> Option<&Arc<str>> {
        match self {
            Self::Token { identity, .. } => Some(identity),
            _ => None,
        }
    }

    /// Whether the credential can be used now, and if not, why.
    pub fn readiness(&self) -> Result<(), String> {
        match self {
            Self::Token { cache, .. } => cache.readiness(),
            _ => Ok(()),
        }
    }

    /// A backend rejected the token this credential sent as `sent` (401): renew it now
    /// and wait for the new one at most `wait`. Whether a different token is ready
    /// (never, for a static key or no credential: there is nothing to renew).
    pub async fn renew_rejected(&self, sent: &HeaderValue, wait: Duration) -> bool {
        match self {
            Self::Token { cache, .. } => cache.renew_rejected(sent, wait).await,
            _ => false,
        }
    }

    /// A token credential whose first token is still being fetched (the gateway has just
    /// started): wait for it at most `wait` (see [`TokenCache::first_token`]). Whether
    /// the credential is usable afterwards; `false` at once for any other.
    pub async fn first_token(&self, wait: Duration) -> bool {
        match self {
            Self::Token { cache, .. } => cache.first_token(wait).await,
            _ => false,
        }
    }

    /// The header to add to an upstream request (`None`: send no credential), or
    /// [`NotReady`] when there is no valid token.
    pub fn header(&self) -> Result<Option<(HeaderName, HeaderValue)>, NotReady> {
        match self {
            Self::Static { header, value } => Ok(Some((header.clone(), value.clone()))),
            Self::Token { cache, .. } => cache
                .header()
                .map(|v| Some((http::header::AUTHORIZATION, v)))
                .ok_or(NotReady),
            Self::None => Ok(None),
        }
    }
}

/// The credentials of all backends and the tasks that keep their tokens fresh.
pub struct BackendCredentials {
    /// Index-aligned with `config.backends`.
    pub credentials: Vec<Credential>,
    /// One cache and refresher per distinct token credential, by [`TokenSpec::cache_key`].
    /// Shared with the credentials built from it by [`BackendCredentials::start_from`], so
    /// a configuration reload keeps the token (and asks the IdP for nothing) when a
    /// credential is unchanged.
    caches: HashMap<String, Arc<Refreshing>>,
}

/// A token cache and the task that keeps it filled; the task stops when the last
/// configuration using the credential is dropped (or at [`BackendCredentials::stop`]).
struct Refreshing {
    cache: Arc<TokenCache>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Refreshing {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend's credential could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("backends[{0}].auth: {1}")]
    Invalid(usize, InvalidCredential),
    #[error("cannot create the HTTP client for token requests: {0}")]
    Http(String),
}

impl BackendCredentials {
    /// Build every backend's credential and start one refresher per distinct token
    /// credential, on the current runtime.
    pub fn start(v: &Validated, metrics: &Arc<Metrics>) -> Result<Self, SetupError> {
        Self::start_from(v, metrics, None)
    }

    /// [`BackendCredentials::start`], reusing the token caches (and their refreshers) of
    /// `previous` for every credential whose [`TokenSpec::cache_key`] is unchanged: no new
    /// token request for them. Refreshers of credentials `v` no longer uses stop once
    /// `previous` is dropped (requests still holding its snapshot keep the last token).
    pub fn start_from(
        v: &Validated,
        metrics: &Arc<Metrics>,
        previous: Option<&BackendCredentials>,
    ) -> Result<Self, SetupError> {
        let mut caches: HashMap<String, Arc<Refreshing>> = HashMap::new();
        // [direct, through the environment's proxy], created when first needed.
        let mut clients: [Option<reqwest::Client>; 2] = [None, None];
        let mut credentials = Vec::with_capacity(v.backend_auth.len());
        // Names of the caches kept from `previous`: a new cache must not take one.
        let kept_names: Vec<&str> = v
            .backend_auth
            .iter()
            .filter_map(|a| match a {
                ResolvedAuth::Token(spec) => previous?.caches.get(&spec.cache_key()),
                _ => None,
            })
            .map(|r| r.cache.name())
            .collect();
        for (i, (auth, b)) in v.backend_auth.iter().zip(&v.config.backends).enumerate() {
            let c = match auth {
                ResolvedAuth::None => Credential::None,
                ResolvedAuth::ApiKey(key) => Credential::api_key(key.expose(), b.kind)
                    .map_err(|e| SetupError::Invalid(i, e))?,
                ResolvedAuth::Token(spec) => {
                    let key = spec.cache_key();
                    let kept = previous.and_then(|p| p.caches.get(&key));
                    let cache = match (caches.get(&key), kept) {
                        (Some(r), _) => r.cache.clone(),
                        (None, Some(r)) => {
                            caches.insert(key, r.clone());
                            r.cache.clone()
                        }
                        (None, None) => {
                            let direct = spec.must_not_be_proxied();
                            let client = match &mut clients[usize::from(!direct)] {
                                Some(c) => c,
                                slot => slot.insert(token_http_client(direct)?),
                            };
                            // Unique per cache: the same app with two scopes gets two names.
                            let mut name = format!("{}:{}", spec.kind, spec.identity);
                            // (A cache being replaced, e.g. after a secret rotation, may
                            // keep its name: the metric series carries on.)
                            if caches.values().any(|r| r.cache.name() == name)
                                || kept_names.contains(&name.as_str())
                            {
                                name = format!("{name}:{}", spec.scope);
                            }
                            let cache = TokenCache::new(name, metrics.clone());
                            let task = token::spawn_refresher(
                                cache.clone(),
                                source_for(spec, client.clone()),
                            );
                            caches.insert(
                                key,
                                Arc::new(Refreshing {
                                    cache: cache.clone(),
                                    task,
                                }),
                            );
                            cache
                        }
                    };
                    Credential::Token {
                        cache,
                        kind: spec.kind,
                        identity: spec.identity.as_str().into(),
                    }
                }
            };
            credentials.push(c);
        }
        Ok(Self {
            credentials,
            caches,
        })
    }

    /// How many token caches these credentials use (one per distinct credential and scope).
    pub fn token_caches(&self) -> usize {
        self.caches.len()
    }

    /// The token caches these credentials started that `previous` did not have.
    pub fn started_since(&self, previous: &BackendCredentials) -> Vec<Arc<TokenCache>> {
        self.caches
            .iter()
            .filter(|(k, _)| !previous.caches.contains_key(*k))
            .map(|(_, r)| r.cache.clone())
            .collect()
    }

    /// Stop refreshing tokens (shutdown), including those shared with other credentials.
    pub fn stop(&self) {
        for r in self.caches.values() {
            r.task.abort();
        }
    }
}

/// The client token requests go through: no redirects (a redirected POST would carry the
/// secret elsewhere), bounded connect and total time. `direct` ignores `HTTPS_PROXY` and
/// friends: managed-identity and loopback endpoints are plain HTTP on this host, and a proxy
/// would see the identity header, the secret and the token (or answer with its own
/// identity).
fn token_http_client(direct: bool) -> Result<reqwest::Client, SetupError> {
    let builder = reqwest::Client::builder();
    let builder = if direct { builder.no_proxy() } else { builder };
    builder
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(token::EXCHANGE_TIMEOUT)
        .user_agent(concat!("portcullis/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| SetupError::Http(e.to_string()))
}

fn source_for(spec: &TokenSpec, http: reqwest::Client) -> Source {
    let cc = |token_url: &str, client_id: &str, proof| -> Source {
        Arc::new(ClientCredentials {
            http: http.clone(),
            token_url: token_url.to_owned(),
            client_id: client_id.to_owned(),
            scope: spec.scope.clone(),
            proof,
        })
    };
    let mi = |endpoint, selector: &Option<(&'static str, String)>| -> Source {
        Arc::new(ManagedIdentity {
            http: http.clone(),
            endpoint,
            resource: spec
                .scope
                .strip_suffix("/.default")
                .unwrap_or(&spec.scope)
                .to_owned(),
            selector: selector.clone(),
        })
    };
    match &spec.source {
        SourceSpec::ClientSecret {
            token_url,
            client_id,
            secret,
            basic,
        } => cc(
            token_url,
            client_id,
            ClientProof::Secret {
                secret: secret.clone(),
                basic: *basic,
            },
        ),
        SourceSpec::Certificate {
            token_url,
            client_id,
            certificate_file,
            key_file,
            rsa,
            send_x5c,
        } => cc(
            token_url,
            client_id,
            ClientProof::Certificate {
                file: assertion::CertificateFile::new(
                    certificate_file.clone(),
                    key_file.clone(),
                    *rsa,
                ),
                send_x5c: *send_x5c,
            },
        ),
        SourceSpec::Federated {
            token_url,
            client_id,
            token_file,
        } => cc(
            token_url,
            client_id,
            ClientProof::FederatedFile(token_file.clone()),
        ),
        SourceSpec::Imds { endpoint, selector } => mi(
            ManagedEndpoint::Imds {
                url: endpoint.clone(),
            },
            selector,
        ),
        SourceSpec::AppService {
            endpoint,
            header,
            selector,
        } => mi(
            ManagedEndpoint::AppService {
                url: endpoint.clone(),
                header: header.clone(),
            },
            selector,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_uses_api_key_header_and_openai_bearer() {
        let azure = Credential::api_key("k1", BackendKind::Azure).unwrap();
        let (name, value) = azure.header().unwrap().unwrap();
        assert_eq!((name.as_str(), value.to_str().unwrap()), ("api-key", "k1"));
        let c = Credential::api_key("k1", BackendKind::Openai).unwrap();
        let (name, value) = c.header().unwrap().unwrap();
        assert_eq!(
            (name.as_str(), value.to_str().unwrap()),
            ("authorization", "Bearer k1")
        );
        assert!(!format!("{c:?}").contains("k1"));
    }

    #[test]
    fn refuses_header_injection() {
        assert!(Credential::api_key("k1\r\nx-evil: 1", BackendKind::Azure).is_err());
    }
}
