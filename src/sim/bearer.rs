//! Entra ID bearer tokens at the simulated backend: what Azure OpenAI does when a resource
//! is reached with `Authorization: Bearer <JWT>` instead of a key.
//!
//! The token is verified for real against the keys at a JWKS URL (fetched with `reqwest`,
//! cached, fetched again when a token names an unknown `kid`, at most once per second: a
//! request arriving sooner waits for the slot). Checks: the signature; `alg` one of RS256,
//! PS256, ES256, ES384 and fitting the key (family, curve, the JWK's `alg` if it pins one);
//! `exp` present and strictly in the future, with no leeway, so a gateway that forwards an
//! expired token is caught; `nbf` when present; `aud` equal to the configured audience (a
//! string, or an array containing it); `iss` when one is configured. A token without `kid`
//! is tried against every key that fits its `alg`.
//!
//! Verified claims are recorded ([`super::SimHandle::bearer_tokens`]); refusals are counted.
//! The token itself is never logged.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::HeaderMap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::Value;

/// How the simulator checks bearer tokens (see the module docs).
#[derive(Debug, Clone)]
pub struct BearerCheck {
    /// Where the signing keys are published.
    pub jwks_uri: String,
    /// The `aud` every token must carry (Azure OpenAI: `https://cognitiveservices.azure.com`).
    pub audience: String,
    /// The `iss` every token must carry; `None` accepts any issuer.
    pub issuer: Option<String>,
}

/// A bearer token the simulator accepted.
#[derive(Debug, Clone)]
pub struct SeenToken {
    pub received_at: SystemTime,
    /// The verified claims.
    pub claims: Value,
}

/// Azure's 401 message when a bearer token is refused.
pub(super) const UNAUTHORIZED: &str = "Unauthorized. Access token is missing, invalid, audience is incorrect (https://cognitiveservices.azure.com), or have expired.";

/// The algorithms Entra ID (and the test IdP) sign access tokens with.
const ALGS: [Algorithm; 4] = [
    Algorithm::RS256,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
];

/// The least time between two fetches of the key set.
const REFETCH_INTERVAL: Duration = Duration::from_secs(1);

/// One verification key.
struct Key {
    kid: Option<String>,
    /// The `alg` the JWK pins, if any.
    alg: Option<Algorithm>,
    family: AlgorithmFamily,
    curve: Option<EllipticCurve>,
    key: DecodingKey,
}

impl Key {
    fn fits(&self, alg: Algorithm) -> bool {
        if alg.family() != self.family || self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        match (&self.curve, alg) {
            (Some(EllipticCurve::P256), Algorithm::ES256) => true,
            (Some(EllipticCurve::P384), Algorithm::ES384) => true,
            (Some(_), _) => false,
            (None, _) => true,
        }
    }
}

/// The keys from the last successful fetch (`loaded` is false until one succeeds).
#[derive(Default)]
struct Keys {
    loaded: bool,
    keys: Vec<Key>,
}

impl Keys {
    /// Whether these keys can answer for `kid` without another fetch.
    fn covers(&self, kid: Option<&str>) -> bool {
        self.loaded && kid.is_none_or(|k| self.keys.iter().any(|x| x.kid.as_deref() == Some(k)))
    }
}

/// Verifies bearer tokens and remembers the ones it accepted.
pub(super) struct Verifier {
    check: BearerCheck,
    http: reqwest::Client,
    keys: ArcSwap<Keys>,
    /// When the key set was last fetched; held while fetching so fetches never overlap.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    seen: Mutex<Vec<SeenToken>>,
}

impl Verifier {
    pub(super) fn new(check: BearerCheck) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            check,
            http,
            keys: ArcSwap::from_pointee(Keys::default()),
            last_fetch: tokio::sync::Mutex::new(None),
            seen: Mutex::new(Vec::new()),
        })
    }

    /// Check the request's bearer token; on success record its claims. The error says why
    /// (for the log; it never contains the token).
    pub(super) async fn check(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        let token = bearer(headers).ok_or("no bearer token")?;
        let claims = self.verify(token).await?;
        if let Ok(mut g) = self.seen.lock() {
            g.push(SeenToken {
                received_at: SystemTime::now(),
                claims,
            });
        }
        Ok(())
    }

    /// The tokens accepted so far.
    pub(super) fn seen(&self) -> Vec<SeenToken> {
        self.seen.lock().map(|g| g.clone()).unwrap_or_default()
    }

    async fn verify(&self, token: &str) -> Result<Value, &'static str> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed token")?;
        let alg = header.alg;
        if !ALGS.contains(&alg) {
            return Err("alg not allowed");
        }
        let kid = header.kid.as_deref();
        let keys = self.keys_for(kid).await;
        let mut result = Err("no key fits the token");
        for k in keys.keys.iter().filter(|k| k.fits(alg)) {
            if kid.is_some() && k.kid.as_deref() != kid {
                continue;
            }
            result = self.decode(token, &k.key, alg);
            if !matches!(result, Err("bad signature")) {
                break;
            }
        }
        let claims = result?;
        // jsonwebtoken accepts exp == now; Azure's token must still be valid when it arrives.
        let exp = claims.get("exp").and_then(Value::as_f64).ok_or("no exp")?;
        if exp <= jsonwebtoken::get_current_timestamp() as f64 {
            return Err("expired");
        }
        Ok(claims)
    }

    fn decode(
        &self,
        token: &str,
        key: &DecodingKey,
        alg: Algorithm,
    ) -> Result<Value, &'static str> {
        let mut v = Validation::new(alg);
        v.leeway = 0;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_audience(&[&self.check.audience]);
        match &self.check.issuer {
            Some(iss) => {
                v.set_issuer(&[iss]);
                v.set_required_spec_claims(&["exp", "aud", "iss"]);
            }
            None => v.set_required_spec_claims(&["exp", "aud"]),
        }
        use jsonwebtoken::errors::ErrorKind as K;
        jsonwebtoken::decode::<Value>(token, key, &v)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                K::InvalidSignature => "bad signature",
                K::ExpiredSignature => "expired",
                K::ImmatureSignature => "not yet valid (nbf)",
                K::InvalidAudience => "wrong audience",
                K::InvalidIssuer => "wrong issuer",
                K::MissingRequiredClaim(_) => "missing claim",
                K::InvalidAlgorithm => "alg does not fit the key",
                _ => "invalid token",
            })
    }

    /// The cached keys, fetched first when none were ever loaded or `kid` is unknown.
    async fn keys_for(&self, kid: Option<&str>) -> Arc<Keys> {
        let current = self.keys.load_full();
        if current.covers(kid) {
            return current;
        }
        let mut last = self.last_fetch.lock().await;
        // Another request may have fetched while this one waited.
        let current = self.keys.load_full();
        if current.covers(kid) {
            return current;
        }
        if let Some(at) = *last {
            tokio::time::sleep((at + REFETCH_INTERVAL).saturating_duration_since(Instant::now()))
                .await;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                let keys = Arc::new(keys);
                self.keys.store(keys.clone());
                keys
            }
            Err(e) => {
                tracing::warn!(jwks_uri = %self.check.jwks_uri, error = %e, "sim: cannot fetch the JWKS");
                self.keys.load_full()
            }
        }
    }

    async fn fetch(&self) -> Result<Keys, String> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<Value>,
        }
        let resp = self
            .http
            .get(&self.check.jwks_uri)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let doc: Doc = resp.json().await.map_err(|e| e.to_string())?;
        Ok(Keys {
            loaded: true,
            keys: doc.keys.into_iter().filter_map(parse_key).collect(),
        })
    }
}

/// A JWK that can verify signatures, or `None` (encryption, symmetric or malformed keys).
fn parse_key(raw: Value) -> Option<Key> {
    let jwk: Jwk = serde_json::from_value(raw).ok()?;
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|u| *u != PublicKeyUse::Signature)
    {
        return None;
    }
    let (family, curve) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (AlgorithmFamily::Rsa, None),
        AlgorithmParameters::EllipticCurve(p) => (AlgorithmFamily::Ec, Some(p.curve.clone())),
        _ => return None,
    };
    let alg = match jwk.common.key_algorithm {
        Some(a) => Some(Algorithm::from_str(&a.to_string()).ok()?),
        None => None,
    };
    Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        family,
        curve,
        key: DecodingKey::from_jwk(&jwk).ok()?,
    })
}

/// The token of `Authorization: Bearer <token>` (scheme case-insensitive).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}
