//! Identify: who is calling, from the credential the request carries.
//!
//! A request presents at most one credential: `Authorization: Bearer <token>` (what OpenAI
//! SDKs send) or `api-key: <token>` (what Azure SDKs send). A value with the `pcl_` prefix
//! is an API key this gateway issued ([`api_key`]); anything else in a bearer header is a
//! JWT from a configured issuer ([`jwt`], keys from [`jwks`]). A verified JWT is remembered
//! (keyed by its SHA-256) until it expires, so a token is checked once, not per request.
//! The identity then resolves to exactly one `[[clients]]` entry; no match is a refusal.
//! Requests with no credential are refused unless a client is explicitly `anonymous`.

pub mod api_key;
pub mod certificate;
pub mod jwks;
pub mod jwt;

use std::sync::Arc;

use http::header::{HeaderMap, HeaderName, AUTHORIZATION};
use serde_json::{Map, Value};

use crate::authorize::ClientPolicy;
use crate::config::{ClaimMatch, Validated};
use crate::error::GatewayError;
use crate::metrics::Metrics;

use jwt::{Issuer, IssuerSpec, Issuers, JwtError};

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Jwt,
    ApiKey,
    Anonymous,
    Certificate,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jwt => "jwt",
            Self::ApiKey => "api_key",
            Self::Anonymous => "anonymous",
            Self::Certificate => "certificate",
        }
    }
}

/// Who exactly presented a valid credential, for the audit line (never the credential).
#[derive(Debug, Default)]
pub struct Principal {
    /// `oid` when the token has one (Entra's stable object id), else `sub`.
    pub subject: Option<String>,
    /// `azp`, `appid` or `client_id`.
    pub application: Option<String>,
    /// `tid`.
    pub tenant: Option<String>,
    /// Public id of the API key used.
    pub key_id: Option<Arc<str>>,
    /// Configured name of the issuer that signed the token.
    pub issuer: Option<Arc<str>>,
}

/// An identified caller: the client it is, and who exactly.
#[derive(Debug)]
pub struct Caller {
    pub client: Arc<ClientPolicy>,
    pub method: AuthMethod,
    pub principal: Arc<Principal>,
    /// Scopes (`scp`, `scope`) and roles (`roles`) the token grants.
    pub grants: Vec<String>,
}

/// What the identifier needs from the API key table: a synchronous, I/O-free check.
pub trait KeyCheck: Send + Sync {
    /// `Ok((key id, client id))`, or a short client-safe reason.
    fn check(&self, presented: &str) -> Result<(Arc<str>, Arc<str>), String>;
}

/// A refusal, with the method that was attempted (for metrics and audit) and, when the
/// credential itself was valid, who presented it.
pub struct Refusal {
    pub method: &'static str,
    pub error: GatewayError,
    pub principal: Option<Arc<Principal>>,
}

/// A verified token as remembered in the cache.
///
/// The cache outlives a configuration reload when `auth.token_cache_size` is unchanged,
/// and what an entry remembers is split by what a reload may change:
/// - the verification (signature, `iss`, `aud`, times, required claims) holds for the
///   issuer settings it was made under, named by `issuer_print`; a snapshot whose issuer
///   of that name has other settings (or none) verifies the token again;
/// - the client it resolved to (`caller`) holds only for the snapshot of `generation`;
///   any other snapshot resolves the client again from `claims` against its own bindings
///   (a new, changed or removed `[[clients]]` entry takes effect at once).
struct CachedToken {
    caller: Arc<Caller>,
    /// [`Identifier::generation`] of the snapshot that resolved `caller`.
    generation: u64,
    /// Index of the issuer in that snapshot.
    issuer: usize,
    /// Fingerprint of the issuer settings the token was verified under.
    issuer_print: [u8; 32],
    claims: Arc<Map<String, Value>>,
    kid: Option<String>,
    key: Option<[u8; 32]>,
    exp: u64,
}

/// Fingerprint of everything that decides whether a token of `issuer` verifies: its
/// settings, where its keys come from, its HMAC secret and `auth.max_token_bytes`.
fn issuer_print(
    i: &crate::config::IssuerConfig,
    secret: Option<&crate::config::Secret>,
    max_token_bytes: usize,
) -> [u8; 32] {
    let text = format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{max_token_bytes}|{:x?}",
        i.name,
        i.issuer,
        i.jwks_uri,
        i.audiences,
        i.algorithms,
        i.leeway,
        i.required_claims,
        i.allowed_tenants,
        i.refresh_interval,
        secret.map(|s| crate::digest::sha256(s.expose().as_bytes())),
    );
    crate::digest::sha256(text.as_bytes())
}

/// What an issuer's key cache is fetched from and how: equal keys may share one cache.
fn jwks_key(i: &crate::config::IssuerConfig) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}",
        i.name, i.issuer, i.jwks_uri, i.refresh_interval
    )
}

/// Source of [`Identifier::generation`]: one number per identifier built.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The verified-token cache.
type VerifiedCache = quick_cache::sync::Cache<[u8; 32], Arc<CachedToken>>;

/// A JWT binding compiled from `clients[].jwt`.
struct Binding {
    issuer: usize,
    claims: Vec<(String, Vec<String>)>,
    client: Arc<ClientPolicy>,
}

/// Header Azure SDKs send their key in.
pub static API_KEY: HeaderName = HeaderName::from_static("api-key");

/// Everything needed to turn request headers into a [`Caller`].
pub struct Identifier {
    issuers: Issuers,
    bindings: Vec<Binding>,
    clients: std::collections::HashMap<String, Arc<ClientPolicy>>,
    anonymous: Option<Arc<Caller>>,
    api_keys: Option<Arc<dyn KeyCheck>>,
    verified: Option<Arc<VerifiedCache>>,
    /// Distinguishes this identifier's cached client resolutions from those of the
    /// identifiers before and after a reload, which share the verified-token cache.
    generation: u64,
    /// [`issuer_print`] per issuer, index-aligned with `issuers.list`.
    issuer_prints: Vec<[u8; 32]>,
    /// [`jwks_key`] per issuer whose keys are fetched, index-aligned with `issuers.list`.
    jwks_keys: Vec<Option<String>>,
    /// Early key refreshes allowed across all issuers (kept across reloads).
    budget: Arc<jwks::RefreshBudget>,
    metrics: Arc<Metrics>,
    /// `auth{method, outcome="allow"}` per method, looked up once (the request-path case;
    /// refusals go through the family).
    allowed: [std::sync::OnceLock<prometheus_client::metrics::counter::Counter>; 4],
    /// `[[clients]].certificates`.
    certs: certificate::CertBindings,
}

impl Identifier {
    /// Build from configuration; starts a key refresher per issuer on the current runtime.
    pub fn build(
        v: &Validated,
        api_keys: Option<Arc<dyn KeyCheck>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self::build_from(v, api_keys, metrics, None)
    }

    /// [`Identifier::build`] for a configuration reload, keeping what `previous` learnt
    /// where it still holds: the key cache (and its refresher) of an issuer fetched from the
    /// same place on the same schedule, the verified-token cache (see `CachedToken` for
    /// why its entries stay correct), the early-refresh budget and each client's count of
    /// requests in flight.
    pub fn build_from(
        v: &Validated,
        api_keys: Option<Arc<dyn KeyCheck>>,
        metrics: Arc<Metrics>,
        previous: Option<&Identifier>,
    ) -> Self {
        let c = &v.config;
        let budget = previous.map_or_else(Arc::default, |p| p.budget.clone());
        let mut issuer_prints = Vec::with_capacity(c.issuers.len());
        let mut jwks_keys = Vec::with_capacity(c.issuers.len());
        let list = c
            .issuers
            .iter()
            .zip(&v.issuer_secrets)
            .map(|(i, secret)| {
                issuer_prints.push(issuer_print(i, secret.as_ref(), c.auth.max_token_bytes));
                let source = match &i.jwks_uri {
                    Some(u) => jwks::KeySource::Uri(u.as_str().to_owned()),
                    None => jwks::KeySource::Discovery {
                        issuer: i.issuer.as_str().to_owned(),
                    },
                };
                let asymmetric = i
                    .algorithms
                    .iter()
                    .any(|a| !crate::config::identity::HMAC_ALGS.contains(&a.as_str()));
                let key = asymmetric.then(|| jwks_key(i));
                let kept = previous.and_then(|p| {
                    let at = p.jwks_keys.iter().position(|k| k.is_some() && *k == key)?;
                    Some(p.issuers.list.get(at)?.keys.clone())
                });
                jwks_keys.push(key);
                let keys = match kept {
                    Some(keys) => keys,
                    None if asymmetric => jwks::Jwks::start(
                        i.name.as_str(),
                        source,
                        i.refresh_interval.0,
                        budget.clone(),
                        metrics.clone(),
                    ),
                    None => jwks::Jwks::none(i.name.as_str()),
                };
                let strings = |v: &[crate::config::Text]| -> Vec<String> {
                    v.iter().map(|t| t.as_str().to_owned()).collect()
                };
                Issuer::new(
                    IssuerSpec {
                        name: i.name.as_str().to_owned(),
                        issuer: i.issuer.as_str().to_owned(),
                        allowed_tenants: strings(&i.allowed_tenants),
                        algorithms: strings(&i.algorithms),
                        audiences: strings(&i.audiences),
                        leeway: i.leeway.0,
                        required_claims: strings(&i.required_claims),
                        hmac_secret: secret.as_ref().map(|s| s.expose().as_bytes().to_vec()),
                    },
                    keys,
                )
            })
            .collect::<Vec<_>>();
        let mut clients = std::collections::HashMap::new();
        let mut bindings = Vec::new();
        let mut anonymous = None;
        let mut certs = Vec::new();
        for (i, cc) in c.clients.iter().enumerate() {
            let before = previous.and_then(|p| p.clients.get(cc.id.as_str()));
            let policy = Arc::new(ClientPolicy::new_from(cc, before.map(|p| &**p)));
            clients.insert(cc.id.as_str().to_owned(), policy.clone());
            for m in v.cert_bindings.get(i).into_iter().flatten() {
                certs.push((m.clone(), policy.clone()));
            }
            if cc.anonymous {
                anonymous = Some(Arc::new(Caller {
                    client: policy.clone(),
                    method: AuthMethod::Anonymous,
                    principal: Arc::new(Principal::default()),
                    grants: Vec::new(),
                }));
            }
            for b in &cc.jwt {
                let Some(issuer) = list.iter().position(|i| &*i.name == b.issuer.as_str()) else {
                    continue;
                };
                let claims = b
                    .claims
                    .iter()
                    .map(|(k, m)| {
                        let values = match m {
                            ClaimMatch::One(v) => vec![v.as_str().to_owned()],
                            ClaimMatch::All(v) => v.iter().map(|x| x.as_str().to_owned()).collect(),
                        };
                        (k.clone(), values)
                    })
                    .collect();
                bindings.push(Binding {
                    issuer,
                    claims,
                    client: policy.clone(),
                });
            }
        }
        let size = c.auth.token_cache_size;
        let verified = match previous.and_then(|p| p.verified.as_ref()) {
            Some(cache) if cache.capacity() == size as u64 => Some(cache.clone()),
            _ => (size > 0).then(|| Arc::new(quick_cache::sync::Cache::new(size))),
        };
        Self {
            issuers: Issuers::new(list, c.auth.max_token_bytes),
            bindings,
            clients,
            anonymous,
            api_keys,
            verified,
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            issuer_prints,
            jwks_keys,
            budget,
            metrics,
            allowed: Default::default(),
            certs: certificate::CertBindings::new(certs),
        }
    }

    /// Every configured client's policy (in no particular order).
    pub fn clients(&self) -> impl Iterator<Item = &Arc<ClientPolicy>> {
        self.clients.values()
    }

    /// The configured issuers (for RFC 9728 metadata and readiness).
    pub fn issuers(&self) -> &[Issuer] {
        &self.issuers.list
    }

    /// Wait (bounded) until every issuer's first key fetch has been attempted.
    pub async fn wait_keys(&self, deadline: std::time::Duration) {
        for i in &self.issuers.list {
            i.keys.wait_first_attempt(deadline).await;
        }
    }

    /// Identify the caller from the request headers and the verified client certificate
    /// that came with the request, if any. With a certificate, the client it is bound to
    /// is the caller; a header credential as well must name the same client (its
    /// principal is then the caller's: a user inside the client's application).
    /// The anonymous client, whatever the request carries: sidecar mode, where the
    /// application's own credential (a placeholder key, say) is not checked but removed.
    pub fn anonymous(&self) -> Option<Arc<Caller>> {
        self.anonymous.clone()
    }

    pub async fn identify(
        &self,
        headers: &HeaderMap,
        cert: Option<&Arc<crate::tls::ClientCert>>,
    ) -> Result<Arc<Caller>, Refusal> {
        let result = match cert {
            None => self.identify_inner(headers).await,
            Some(c) => self.with_certificate(headers, c).await,
        };
        let count = |method, outcome| {
            self.metrics
                .auth
                .get_or_create(&crate::metrics::AuthLabels { method, outcome })
                .clone()
        };
        match &result {
            Ok(c) => match self.allowed.get(c.method as usize) {
                Some(slot) => slot.get_or_init(|| count(c.method.as_str(), "allow")).inc(),
                None => count(c.method.as_str(), "allow").inc(),
            },
            Err(r) => count(r.method, r.error.code()).inc(),
        };
        result
    }

    async fn identify_inner(&self, headers: &HeaderMap) -> Result<Arc<Caller>, Refusal> {
        let token =
            match credential(headers) {
                Ok(Some(t)) => t,
                Ok(None) => return self.anonymous.clone().ok_or(Refusal {
                    principal: None,
                    method: "none",
                    error: unauthenticated(
                        "missing_credentials",
                        None,
                        "no credentials: send `Authorization: Bearer <token>` or `api-key: <key>`",
                    ),
                }),
                Err(why) => {
                    return Err(Refusal {
                        principal: None,
                        method: "none",
                        error: unauthenticated("invalid_token", Some("invalid_request"), why),
                    })
                }
            };
        if api_key::looks_like_key(token) {
            return self.api_key(token);
        }
        if token.matches('.').count() != 2 {
            return Err(Refusal {
                principal: None,
                method: "none",
                error: unauthenticated(
                    "invalid_token",
                    Some("invalid_token"),
                    "the credential is neither an API key issued by this gateway nor a JWT",
                ),
            });
        }
        self.jwt(token).await
    }

    async fn with_certificate(
        &self,
        headers: &HeaderMap,
        cert: &crate::tls::ClientCert,
    ) -> Result<Arc<Caller>, Refusal> {
        let by_cert = self.certs.client(cert).map_err(|error| {
            self.metrics
                .client_cert_failures
                .get_or_create(&crate::metrics::CertFailureLabels { reason: "unbound" })
                .inc();
            Refusal {
                principal: None,
                method: "certificate",
                error,
            }
        })?;
        match credential(headers) {
            Ok(None) => Ok(Arc::new(Caller {
                client: by_cert,
                method: AuthMethod::Certificate,
                principal: Arc::new(Principal {
                    subject: Some(cert.identity.subject.clone()),
                    ..Principal::default()
                }),
                grants: Vec::new(),
            })),
            _ => {
                let caller = self.identify_inner(headers).await?;
                if caller.client.id != by_cert.id {
                    return Err(Refusal {
                        principal: Some(caller.principal.clone()),
                        method: caller.method.as_str(),
                        error: GatewayError::IdentityMismatch(format!(
                            "the client certificate identifies client '{}' but the {} credential identifies '{}': send credentials of one client",
                            by_cert.id,
                            caller.method.as_str(),
                            caller.client.id
                        )),
                    });
                }
                Ok(caller)
            }
        }
    }

    fn api_key(&self, token: &str) -> Result<Arc<Caller>, Refusal> {
        let refuse = |why: &str| Refusal {
            principal: None,
            method: "api_key",
            error: unauthenticated("invalid_token", Some("invalid_token"), why),
        };
        let Some(keys) = &self.api_keys else {
            return Err(refuse("API keys are not enabled on this gateway"));
        };
        let (key_id, client) = keys.check(token).map_err(|why| refuse(&why))?;
        let Some(policy) = self.clients.get(&*client) else {
            return Err(Refusal {
                principal: Some(Arc::new(Principal {
                    key_id: Some(key_id),
                    ..Principal::default()
                })),
                method: "api_key",
                error: GatewayError::ClientNotAllowed(format!(
                    "the API key's client '{client}' is not configured on this gateway"
                )),
            });
        };
        Ok(Arc::new(Caller {
            client: policy.clone(),
            method: AuthMethod::ApiKey,
            principal: Arc::new(Principal {
                key_id: Some(key_id),
                ..Principal::default()
            }),
            grants: Vec::new(),
        }))
    }

    async fn jwt(&self, token: &str) -> Result<Arc<Caller>, Refusal> {
        let digest = self
            .verified
            .as_ref()
            .map(|_| crate::digest::sha256(token.as_bytes()));
        if let (Some(cache), Some(d)) = (&self.verified, &digest) {
            if let Some(hit) = cache.get(d) {
                let now = jsonwebtoken::get_current_timestamp();
                // This snapshot's issuer with the settings the token was verified under.
                let at = if hit.generation == self.generation {
                    Some(hit.issuer)
                } else {
                    self.issuer_prints
                        .iter()
                        .position(|p| *p == hit.issuer_print)
                };
                if let Some(at) = at {
                    let issuer = &self.issuers.list[at];
                    if hit.exp.saturating_add(issuer.leeway()) >= now
                        && issuer.still_trusts(hit.kid.as_deref(), hit.key.as_ref())
                    {
                        if hit.generation == self.generation {
                            return Ok(hit.caller.clone());
                        }
                        return self.resolve_again(cache, *d, &hit, at);
                    }
                }
                cache.remove(d);
            }
        }
        let verified = self.issuers.verify(token).await.map_err(|e| Refusal {
            method: "jwt",
            error: jwt_refusal(&e),
            principal: None,
        })?;
        let issuer = &self.issuers.list[verified.issuer];
        let principal = Arc::new(principal_from_claims(&verified.claims, issuer.name.clone()));
        let client = self
            .client_for(verified.issuer, &verified.claims, issuer)
            .map_err(|mut r| {
                r.principal = Some(principal.clone());
                r
            })?;
        let caller = Arc::new(Caller {
            client,
            method: AuthMethod::Jwt,
            principal,
            grants: grants(&verified.claims),
        });
        if let (Some(cache), Some(d)) = (&self.verified, digest) {
            cache.insert(
                d,
                Arc::new(CachedToken {
                    caller: caller.clone(),
                    generation: self.generation,
                    issuer: verified.issuer,
                    issuer_print: self.issuer_prints[verified.issuer],
                    claims: Arc::new(verified.claims),
                    kid: verified.kid,
                    key: verified.key,
                    exp: verified.exp,
                }),
            );
        }
        Ok(caller)
    }

    /// A token verified under another snapshot with the same issuer settings: resolve its
    /// client against this snapshot's bindings, and remember that for this snapshot.
    fn resolve_again(
        &self,
        cache: &VerifiedCache,
        digest: [u8; 32],
        hit: &CachedToken,
        issuer_index: usize,
    ) -> Result<Arc<Caller>, Refusal> {
        let issuer = &self.issuers.list[issuer_index];
        let client = self
            .client_for(issuer_index, &hit.claims, issuer)
            .map_err(|mut r| {
                r.principal = Some(hit.caller.principal.clone());
                r
            })?;
        let caller = Arc::new(Caller {
            client,
            method: AuthMethod::Jwt,
            principal: hit.caller.principal.clone(),
            grants: hit.caller.grants.clone(),
        });
        cache.insert(
            digest,
            Arc::new(CachedToken {
                caller: caller.clone(),
                generation: self.generation,
                issuer: issuer_index,
                issuer_print: hit.issuer_print,
                claims: hit.claims.clone(),
                kid: hit.kid.clone(),
                key: hit.key,
                exp: hit.exp,
            }),
        );
        Ok(caller)
    }

    fn client_for(
        &self,
        issuer_index: usize,
        claims: &Map<String, Value>,
        issuer: &Issuer,
    ) -> Result<Arc<ClientPolicy>, Refusal> {
        let mut found: Option<&Arc<ClientPolicy>> = None;
        for b in self.bindings.iter().filter(|b| b.issuer == issuer_index) {
            if !b.claims.iter().all(|(k, vals)| claim_has(claims, k, vals)) {
                continue;
            }
            match found {
                Some(f) if f.id != b.client.id => {
                    tracing::warn!(
                        issuer = %issuer.name,
                        first = %f.id,
                        second = %b.client.id,
                        "a token matches two clients; refusing it (make the bindings' claims distinguish them)"
                    );
                    return Err(Refusal {
                        principal: None,
                        method: "jwt",
                        error: GatewayError::ClientNotAllowed(
                            "the token matches more than one client".into(),
                        ),
                    });
                }
                _ => found = Some(&b.client),
            }
        }
        found.cloned().ok_or_else(|| Refusal {
            principal: None,
            method: "jwt",
            error: GatewayError::ClientNotAllowed(
                "the token is valid but no client of this gateway is bound to its identity".into(),
            ),
        })
    }
}

/// Whether claim `name` carries every value in `wanted`: equality for strings, containment
/// for arrays and for the space-separated `scp`/`scope`.
fn claim_has(claims: &Map<String, Value>, name: &str, wanted: &[String]) -> bool {
    let Some(v) = claims.get(name) else {
        return false;
    };
    wanted.iter().all(|w| match v {
        Value::String(s) if name == "scp" || name == "scope" => {
            s.split_ascii_whitespace().any(|x| x == w)
        }
        Value::String(s) => s == w,
        Value::Array(items) => items.iter().any(|i| i.as_str() == Some(w.as_str())),
        Value::Number(n) => n.to_string() == *w,
        Value::Bool(b) => b.to_string() == *w,
        _ => false,
    })
}

fn principal_from_claims(claims: &Map<String, Value>, issuer: Arc<str>) -> Principal {
    let s = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
    Principal {
        subject: s("oid").or_else(|| s("sub")),
        application: s("azp").or_else(|| s("appid")).or_else(|| s("client_id")),
        tenant: s("tid"),
        key_id: None,
        issuer: Some(issuer),
    }
}

/// Scopes (`scp`, `scope`, space-separated) and roles (`roles`) a token grants.
fn grants(claims: &Map<String, Value>) -> Vec<String> {
    let mut grants = Vec::new();
    for k in ["scp", "scope"] {
        if let Some(v) = claims.get(k).and_then(Value::as_str) {
            grants.extend(v.split_ascii_whitespace().map(str::to_owned));
        }
    }
    if let Some(Value::Array(roles)) = claims.get("roles") {
        grants.extend(roles.iter().filter_map(Value::as_str).map(str::to_owned));
    }
    grants
}

/// The one credential a request presents, if any.
fn credential(headers: &HeaderMap) -> Result<Option<&str>, &'static str> {
    let mut auth = headers.get_all(AUTHORIZATION).iter();
    let mut key = headers.get_all(&API_KEY).iter();
    let (a, a2, k, k2) = (auth.next(), auth.next(), key.next(), key.next());
    if a2.is_some() || k2.is_some() {
        return Err("send exactly one credential");
    }
    let bearer = match a {
        None => None,
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| "the Authorization header is not ASCII")?;
            let (scheme, rest) = v
                .split_once(' ')
                .ok_or("use `Authorization: Bearer <token>`")?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(
                    "unsupported authorization scheme; use `Authorization: Bearer <token>`",
                );
            }
            Some(rest.trim())
        }
    };
    let api_key = match k {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| "the api-key header is not ASCII")?
                .trim(),
        ),
    };
    let token = match (bearer, api_key) {
        (Some(b), Some(k)) if b != k => return Err("send exactly one credential"),
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => return Ok(None),
    };
    if token.is_empty() {
        return Err("the credential is empty");
    }
    Ok(Some(token))
}

fn unauthenticated(
    code: &'static str,
    bearer_error: Option<&'static str>,
    message: impl Into<String>,
) -> GatewayError {
    GatewayError::Unauthenticated {
        code,
        bearer_error,
        message: message.into(),
    }
}

fn jwt_refusal(e: &JwtError) -> GatewayError {
    unauthenticated(e.code(), Some("invalid_token"), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(v: serde_json::Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn claim_matching_by_equality_and_containment() {
        let c = claims(serde_json::json!({
            "azp": "app-1", "roles": ["A", "B"], "scp": "chat.read chat.write", "ver": 2
        }));
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(claim_has(&c, "azp", &w(&["app-1"])));
        assert!(!claim_has(&c, "azp", &w(&["app"])));
        assert!(claim_has(&c, "roles", &w(&["A"])));
        assert!(claim_has(&c, "roles", &w(&["A", "B"])));
        assert!(!claim_has(&c, "roles", &w(&["C"])));
        assert!(claim_has(&c, "scp", &w(&["chat.write"])));
        assert!(!claim_has(&c, "scp", &w(&["chat"])));
        assert!(claim_has(&c, "ver", &w(&["2"])));
        assert!(!claim_has(&c, "missing", &w(&["x"])));
    }

    /// An identifier (no API keys) for a configuration text.
    fn identifier(text: &str) -> Identifier {
        let v = crate::config::load_str(text, "t", std::path::Path::new(".")).unwrap();
        Identifier::build(&v, None, Arc::new(Metrics::new()))
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        h
    }

    #[tokio::test]
    async fn rs256_and_es256_tokens_from_a_live_issuer_resolve_to_their_client() {
        use crate::sim::issuer::{DemoIssuer, SigningAlg};
        let issuer = DemoIssuer::start().await.unwrap();
        let text = format!(
            r#"
[[issuers]]
name = "demo"
issuer = "{}"
audiences = ["api://x"]
algorithms = ["RS256", "ES256"]
[[clients]]
id = "c1"
jwt = [{{ issuer = "demo", claims = {{ azp = "app-1" }} }}]
deployments = ["*"]
operations = ["chat"]
[[backends]]
name = "b"
url = "http://127.0.0.1:9"
deployments = {{ "m" = "m" }}
"#,
            issuer.issuer()
        );
        let id = identifier(&text);
        for alg in [SigningAlg::Rs256, SigningAlg::Es256] {
            let t = issuer
                .sign_with(
                    alg,
                    "api://x",
                    std::time::Duration::from_secs(60),
                    serde_json::json!({"azp": "app-1", "sub": "u"}),
                )
                .unwrap();
            let h = bearer(&t);
            let caller = id.identify(&h, None).await.ok().unwrap();
            assert_eq!(&*caller.client.id, "c1");
            assert_eq!(caller.principal.subject.as_deref(), Some("u"));
            // Second time from the verified-token cache: the same caller.
            let again = id.identify(&h, None).await.ok().unwrap();
            assert!(Arc::ptr_eq(&caller, &again));
        }
    }

    #[tokio::test]
    async fn a_rebuilt_identifier_keeps_keys_and_verifications_but_never_a_stale_policy() {
        use crate::sim::issuer::{DemoIssuer, SigningAlg};
        let issuer = DemoIssuer::start().await.unwrap();
        let config = |audience: &str, client: &str, refresh: &str| {
            format!(
                r#"
[[issuers]]
name = "demo"
issuer = "{}"
audiences = ["{audience}"]
algorithms = ["ES256"]
refresh_interval = "{refresh}"
{client}
[[backends]]
name = "b"
url = "http://127.0.0.1:9"
deployments = {{ "m" = "m" }}
"#,
                issuer.issuer()
            )
        };
        let c1 = |deployments: &str| {
            format!(
                "[[clients]]\nid = \"c1\"\njwt = [{{ issuer = \"demo\", claims = {{ azp = \"app-1\" }} }}]\ndeployments = [{deployments}]\noperations = [\"chat\"]\nmax_concurrent_requests = 1\n"
            )
        };
        let build = |text: &str, previous: Option<&Identifier>| {
            let v = crate::config::load_str(text, "t", std::path::Path::new(".")).unwrap();
            Identifier::build_from(&v, None, Arc::new(Metrics::new()), previous)
        };
        let a = build(&config("api://x", &c1("\"m\""), "1h"), None);
        let token = issuer
            .sign_with(
                SigningAlg::Es256,
                "api://x",
                std::time::Duration::from_secs(60),
                serde_json::json!({"azp": "app-1", "sub": "u"}),
            )
            .unwrap();
        let h = bearer(&token);
        let first = a.identify(&h, None).await.ok().unwrap();
        assert!(!first.client.allows_deployment("other"));
        let held = crate::admit::admit(&first).ok().unwrap();

        // The client's policy changes: the same verification, the new policy.
        let b = build(&config("api://x", &c1("\"*\""), "1h"), Some(&a));
        assert!(
            Arc::ptr_eq(&a.issuers()[0].keys, &b.issuers()[0].keys),
            "keys kept"
        );
        let second = b.identify(&h, None).await.ok().unwrap();
        assert!(
            Arc::ptr_eq(&first.principal, &second.principal),
            "not verified again"
        );
        assert!(second.client.allows_deployment("other"), "the new policy");
        assert!(
            crate::admit::admit(&second).is_err(),
            "the request admitted under the old policy still counts"
        );
        drop(held);
        assert!(crate::admit::admit(&second).is_ok());
        // The old identifier (requests still running on it) keeps the old policy.
        let old = a.identify(&h, None).await.ok().unwrap();
        assert!(!old.client.allows_deployment("other"));
        // Back on the new one: resolved for it again.
        assert!(b
            .identify(&h, None)
            .await
            .ok()
            .unwrap()
            .client
            .allows_deployment("other"));

        // The client is removed: the cached token no longer names anyone.
        let c = build(&config("api://x", "", "1h"), Some(&b));
        let refused = c.identify(&h, None).await.err().unwrap();
        assert_eq!(refused.error.code(), "client_not_allowed");

        // The issuer's audience changes: the cached verification does not carry over.
        let d = build(&config("api://other", &c1("\"*\""), "1h"), Some(&b));
        let refused = d.identify(&h, None).await.err().unwrap();
        assert_eq!(refused.error.code(), "invalid_token", "{}", refused.error);

        // Keys fetched on another schedule are another cache.
        let e = build(&config("api://x", &c1("\"*\""), "2h"), Some(&b));
        assert!(!Arc::ptr_eq(&b.issuers()[0].keys, &e.issuers()[0].keys));
        let fresh = e.identify(&h, None).await.ok().unwrap();
        assert!(
            !Arc::ptr_eq(&first.principal, &fresh.principal),
            "verified again"
        );
    }

    #[tokio::test]
    async fn hmac_only_issuers_need_no_key_set() {
        let secret = "an-hs256-shared-secret-of-32-bytes-or-more";
        let text = format!(
            r#"
[[issuers]]
name = "hs"
issuer = "https://hs.example"
audiences = ["api://x"]
algorithms = ["HS256"]
hmac_secret = "{secret}"
[[clients]]
id = "c1"
jwt = [{{ issuer = "hs" }}]
deployments = ["*"]
operations = ["chat"]
[[backends]]
name = "b"
url = "http://127.0.0.1:9"
deployments = {{ "m" = "m" }}
"#
        );
        let id = identifier(&text);
        assert!(id.issuers()[0].keys.is_loaded());
        let now = jsonwebtoken::get_current_timestamp();
        let claims =
            serde_json::json!({"iss": "https://hs.example", "aud": "api://x", "exp": now + 60});
        let sign = |key: &str| {
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &claims,
                &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
            )
            .unwrap()
        };
        let ok = id
            .identify(&bearer(&sign(secret)), None)
            .await
            .ok()
            .unwrap();
        assert_eq!(&*ok.client.id, "c1");
        let bad = id
            .identify(
                &bearer(&sign("another-secret-of-the-same-length-123456")),
                None,
            )
            .await
            .err()
            .unwrap();
        assert_eq!(bad.error.code(), "invalid_token");
    }

    #[test]
    fn one_credential_per_request() {
        let h = |pairs: &[(&str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            m
        };
        assert_eq!(credential(&h(&[])), Ok(None));
        assert_eq!(
            credential(&h(&[("authorization", "Bearer abc")])),
            Ok(Some("abc"))
        );
        assert_eq!(
            credential(&h(&[("authorization", "bearer  abc ")])),
            Ok(Some("abc"))
        );
        assert_eq!(credential(&h(&[("api-key", "k")])), Ok(Some("k")));
        assert_eq!(
            credential(&h(&[("api-key", "k"), ("authorization", "Bearer k")])),
            Ok(Some("k"))
        );
        assert!(credential(&h(&[("api-key", "k"), ("authorization", "Bearer j")])).is_err());
        assert!(credential(&h(&[("authorization", "Basic abc")])).is_err());
        assert!(credential(&h(&[("authorization", "Bearer")])).is_err());
        assert!(credential(&h(&[
            ("authorization", "Bearer a"),
            ("authorization", "Bearer a")
        ]))
        .is_err());
        assert!(credential(&h(&[("authorization", "Bearer ")])).is_err());
    }
}
