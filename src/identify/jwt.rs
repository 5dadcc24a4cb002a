//! JWT validation against configured issuers.
//!
//! The checks, in order: size cap; shape (three base64url parts); header (`alg` parsed
//! strictly — `none` in any spelling is refused; `crit` refused; `typ` must be `JWT` or
//! `at+jwt`); the issuer picked by the unverified `iss` (only to choose which rules and keys
//! apply); `alg` in that issuer's allowlist; the key by `kid` from the issuer's cached JWKS
//! (of the algorithm's family and curve: an RSA key never verifies an HS256 token); the
//! signature; then `exp` (required), `nbf` and `iat` with leeway, `iss` exact (or an
//! allowed tenant of a `{tenantid}` issuer, equal to `tid`), `aud` among the audiences and
//! the issuer's required claims. Header fields that name keys (`jku`, `jwk`, `x5u`, `x5c`)
//! are ignored: keys come only from the issuer's configured key set.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::jwks::{Jwks, Lookup};

/// Why a token was refused. The description is safe to show the caller: it names the
/// failed check, never the token or key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("the token is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(&'static str),
    #[error("unsigned tokens (alg none) are not accepted")]
    AlgNone,
    #[error("the token's alg is not accepted for this issuer")]
    AlgNotAllowed,
    #[error("the token carries critical header extensions this gateway does not understand")]
    Critical,
    #[error("the token's typ is not JWT or at+jwt")]
    BadType,
    #[error("the token's issuer is not trusted by this gateway")]
    UnknownIssuer,
    #[error("the token's tenant is not allowed")]
    TenantNotAllowed,
    #[error("the token is signed with a key this issuer does not publish")]
    UnknownKey,
    #[error("the issuer's signing keys are not available yet; retry shortly")]
    KeysUnavailable,
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token was issued in the future (iat)")]
    IssuedInFuture,
    #[error("the token's audience is not accepted by this gateway")]
    WrongAudience,
    #[error("the token lacks the required claim '{0}'")]
    MissingClaim(String),
    #[error("the token's claim '{0}' has the wrong type")]
    BadClaim(&'static str),
}

impl JwtError {
    /// `token_expired` or `invalid_token`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Expired => "token_expired",
            _ => "invalid_token",
        }
    }
}

/// A verified token's claims and what keeps it valid.
pub struct Verified {
    pub claims: Map<String, Value>,
    /// Index of the issuer in [`Issuers`].
    pub issuer: usize,
    pub kid: Option<String>,
    /// Fingerprint of the JWKS key that verified it (`None` for HMAC tokens).
    pub key: Option<[u8; 32]>,
    pub exp: u64,
}

/// How the `iss` claim is matched.
enum IssuerMatch {
    Exact(String),
    /// `prefix{tenantid}suffix`, with the tenants accepted.
    Tenant {
        prefix: String,
        suffix: String,
        tenants: HashSet<String>,
    },
}

impl IssuerMatch {
    fn parse(issuer: &str, tenants: &[String]) -> Self {
        match issuer.split_once("{tenantid}") {
            Some((prefix, suffix)) => Self::Tenant {
                prefix: prefix.to_owned(),
                suffix: suffix.to_owned(),
                tenants: tenants.iter().map(|t| t.to_ascii_lowercase()).collect(),
            },
            None => Self::Exact(issuer.to_owned()),
        }
    }

    /// Whether `iss` is this issuer; for a tenant template, returns the tenant.
    fn matches<'a>(&self, iss: &'a str) -> Option<Option<&'a str>> {
        match self {
            Self::Exact(e) => (e == iss).then_some(None),
            Self::Tenant { prefix, suffix, .. } => iss
                .strip_prefix(prefix.as_str())
                .and_then(|r| r.strip_suffix(suffix.as_str()))
                .filter(|t| !t.is_empty() && !t.contains('/'))
                .map(Some),
        }
    }
}

/// One configured issuer: its rules and its keys.
pub struct Issuer {
    pub name: Arc<str>,
    matcher: IssuerMatch,
    algorithms: Vec<Algorithm>,
    audiences: Vec<String>,
    leeway: u64,
    required_claims: Vec<String>,
    hmac: Option<DecodingKey>,
    pub keys: Arc<Jwks>,
}

/// Settings of one issuer, taken from the configuration.
pub struct IssuerSpec {
    pub name: String,
    pub issuer: String,
    pub allowed_tenants: Vec<String>,
    pub algorithms: Vec<String>,
    pub audiences: Vec<String>,
    pub leeway: std::time::Duration,
    pub required_claims: Vec<String>,
    pub hmac_secret: Option<Vec<u8>>,
}

impl Issuer {
    pub fn new(spec: IssuerSpec, keys: Arc<Jwks>) -> Self {
        Self {
            name: Arc::from(spec.name.as_str()),
            matcher: IssuerMatch::parse(&spec.issuer, &spec.allowed_tenants),
            algorithms: spec
                .algorithms
                .iter()
                .filter_map(|a| Algorithm::from_str(a).ok())
                .collect(),
            audiences: spec.audiences,
            leeway: spec.leeway.as_secs(),
            required_claims: spec.required_claims,
            hmac: spec.hmac_secret.map(|s| DecodingKey::from_secret(&s)),
            keys,
        }
    }

    /// URLs advertised as authorization servers (RFC 9728).
    pub fn advertised(&self) -> Vec<String> {
        match &self.matcher {
            IssuerMatch::Exact(e) => vec![e.clone()],
            IssuerMatch::Tenant {
                prefix,
                suffix,
                tenants,
            } => {
                let mut v: Vec<_> = tenants
                    .iter()
                    .map(|t| format!("{prefix}{t}{suffix}"))
                    .collect();
                v.sort();
                v
            }
        }
    }

    /// Whether a token verified earlier by the key `key` (named `kid`) may still be
    /// trusted: that very key is still published. HMAC tokens (`None`) depend only on the
    /// configured secret.
    pub fn still_trusts(&self, kid: Option<&str>, key: Option<&[u8; 32]>) -> bool {
        match key {
            Some(fp) => self.keys.snapshot().publishes(kid, fp),
            None => true,
        }
    }

    pub fn leeway(&self) -> u64 {
        self.leeway
    }
}

/// All configured issuers.
pub struct Issuers {
    pub list: Vec<Issuer>,
    max_token_bytes: usize,
}

/// The decoded but unverified parts of a token.
struct Parts {
    alg: Algorithm,
    kid: Option<String>,
    iss: String,
}

fn b64(part: &str) -> Result<Vec<u8>, JwtError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed("a part is not base64url"))
}

fn peek(token: &str) -> Result<Parts, JwtError> {
    let mut it = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(JwtError::Malformed("expected three dot-separated parts"));
    };
    if h.is_empty() || p.is_empty() {
        return Err(JwtError::Malformed("empty header or payload"));
    }
    if s.is_empty() {
        return Err(JwtError::AlgNone);
    }
    let header: Map<String, Value> = serde_json::from_slice(&b64(h)?)
        .map_err(|_| JwtError::Malformed("the header is not a JSON object"))?;
    let alg = match header.get("alg") {
        Some(Value::String(a)) if a.eq_ignore_ascii_case("none") => return Err(JwtError::AlgNone),
        Some(Value::String(a)) => Algorithm::from_str(a).map_err(|_| JwtError::AlgNotAllowed)?,
        _ => return Err(JwtError::Malformed("the header has no alg")),
    };
    if header.contains_key("crit") {
        return Err(JwtError::Critical);
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(t))
            if t.eq_ignore_ascii_case("JWT")
                || t.eq_ignore_ascii_case("at+jwt")
                || t.eq_ignore_ascii_case("application/at+jwt") => {}
        Some(_) => return Err(JwtError::BadType),
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(JwtError::Malformed("kid is not a string")),
    };
    let payload: Map<String, Value> = serde_json::from_slice(&b64(p)?)
        .map_err(|_| JwtError::Malformed("the payload is not a JSON object"))?;
    let iss = match payload.get("iss") {
        Some(Value::String(i)) => i.clone(),
        Some(_) => return Err(JwtError::BadClaim("iss")),
        None => return Err(JwtError::MissingClaim("iss".into())),
    };
    Ok(Parts { alg, kid, iss })
}

impl Issuers {
    pub fn new(list: Vec<Issuer>, max_token_bytes: usize) -> Self {
        Self {
            list,
            max_token_bytes,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Verify `token` completely (no cache).
    pub async fn verify(&self, token: &str) -> Result<Verified, JwtError> {
        if token.len() > self.max_token_bytes {
            return Err(JwtError::TooLarge(self.max_token_bytes));
        }
        let parts = peek(token)?;
        let (index, issuer, tenant) = self
            .list
            .iter()
            .enumerate()
            .find_map(|(i, iss)| iss.matcher.matches(&parts.iss).map(|t| (i, iss, t)))
            .ok_or(JwtError::UnknownIssuer)?;
        if let (Some(t), IssuerMatch::Tenant { tenants, .. }) = (tenant, &issuer.matcher) {
            if !tenants.contains(&t.to_ascii_lowercase()) {
                return Err(JwtError::TenantNotAllowed);
            }
        }
        if !issuer.algorithms.contains(&parts.alg) {
            return Err(JwtError::AlgNotAllowed);
        }
        let mut fingerprint = None;
        let claims = if parts.alg.family() == AlgorithmFamily::Hmac {
            let key = issuer.hmac.as_ref().ok_or(JwtError::AlgNotAllowed)?;
            check_signature(token, key, parts.alg, issuer)?
        } else {
            match &parts.kid {
                Some(kid) => match issuer.keys.key(kid, parts.alg).await {
                    Lookup::Found(k) => {
                        let claims = check_signature(token, &k.key, parts.alg, issuer)?;
                        fingerprint = Some(k.fingerprint);
                        claims
                    }
                    Lookup::Unknown => return Err(JwtError::UnknownKey),
                    Lookup::Unavailable => return Err(JwtError::KeysUnavailable),
                },
                None => {
                    issuer.keys.first_load().await;
                    let keys = issuer.keys.snapshot();
                    let mut result = Err(if issuer.keys.is_loaded() {
                        JwtError::UnknownKey
                    } else {
                        JwtError::KeysUnavailable
                    });
                    for k in keys.fitting(parts.alg).take(8) {
                        result = check_signature(token, &k.key, parts.alg, issuer);
                        if result.is_ok() {
                            fingerprint = Some(k.fingerprint);
                        }
                        if !matches!(result, Err(JwtError::BadSignature)) {
                            break;
                        }
                    }
                    result?
                }
            }
        };
        // Signature is valid: now the claims the library does not check our way.
        if let Some(t) = tenant {
            if claims.get("tid").and_then(Value::as_str) != Some(t) {
                return Err(JwtError::TenantNotAllowed);
            }
        }
        let now = jsonwebtoken::get_current_timestamp();
        match claims.get("iat") {
            None => {}
            Some(v) => match v.as_f64() {
                Some(iat) if iat > (now + issuer.leeway) as f64 => {
                    return Err(JwtError::IssuedInFuture)
                }
                Some(_) => {}
                None => return Err(JwtError::BadClaim("iat")),
            },
        }
        for c in &issuer.required_claims {
            if claims.get(c).is_none_or(Value::is_null) {
                return Err(JwtError::MissingClaim(c.clone()));
            }
        }
        let exp = claims
            .get("exp")
            .and_then(Value::as_f64)
            .map(|e| e as u64)
            .ok_or(JwtError::BadClaim("exp"))?;
        Ok(Verified {
            claims,
            issuer: index,
            kid: parts.kid,
            key: fingerprint,
            exp,
        })
    }
}

fn check_signature(
    token: &str,
    key: &DecodingKey,
    alg: Algorithm,
    issuer: &Issuer,
) -> Result<Map<String, Value>, JwtError> {
    if key.family() != alg.family() {
        return Err(JwtError::UnknownKey);
    }
    let mut v = Validation::new(alg);
    v.leeway = issuer.leeway;
    v.validate_nbf = true;
    v.validate_exp = true;
    v.set_required_spec_claims(&["exp", "aud"]);
    v.set_audience(&issuer.audiences);
    v.iss = None;
    use jsonwebtoken::errors::ErrorKind as K;
    match jsonwebtoken::decode::<Map<String, Value>>(token, key, &v) {
        Ok(data) => Ok(data.claims),
        Err(e) => Err(match e.kind() {
            K::ExpiredSignature => JwtError::Expired,
            K::ImmatureSignature => JwtError::NotYetValid,
            K::InvalidAudience => JwtError::WrongAudience,
            K::MissingRequiredClaim(c) => JwtError::MissingClaim(c.clone()),
            K::InvalidClaimFormat(c) if c == "exp" => JwtError::BadClaim("exp"),
            K::InvalidClaimFormat(c) if c == "nbf" => JwtError::BadClaim("nbf"),
            K::InvalidAlgorithm => JwtError::AlgNotAllowed,
            K::Base64(_) | K::Json(_) | K::Utf8(_) | K::InvalidToken => {
                JwtError::Malformed("undecodable")
            }
            _ => JwtError::BadSignature,
        }),
    }
}

/// Fuzzing entry point (feature `fuzzing`): the unverified reading of a token's header and
/// claims; never panics, and what it accepts names an issuer and an allowed algorithm
/// family.
#[cfg(feature = "fuzzing")]
pub fn fuzz_peek(token: &str) {
    if let Ok(p) = peek(token) {
        assert_eq!(token.split('.').count(), 3);
        let _ = (p.alg, p.kid, p.iss);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    #[test]
    fn alg_none_in_any_spelling_is_refused_before_anything_else() {
        for alg in ["none", "None", "NONE", "nOnE"] {
            let t = format!(
                "{}.{}.",
                enc(&format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#)),
                enc(r#"{"iss":"x"}"#)
            );
            assert_eq!(peek(&t).err(), Some(JwtError::AlgNone), "{alg}");
            let t = format!("{t}c2ln");
            assert_eq!(peek(&t).err(), Some(JwtError::AlgNone), "{alg}");
        }
    }

    #[test]
    fn header_shape_checks() {
        let p = enc(r#"{"iss":"x"}"#);
        let t = |h: &str| format!("{}.{p}.c2ln", enc(h));
        assert!(matches!(peek("a.b"), Err(JwtError::Malformed(_))));
        assert!(matches!(peek("a.b.c.d"), Err(JwtError::Malformed(_))));
        assert_eq!(
            peek(&t(r#"{"alg":"RS256","crit":["exp"]}"#)).err(),
            Some(JwtError::Critical)
        );
        assert_eq!(
            peek(&t(r#"{"alg":"RS256","typ":"JWE"}"#)).err(),
            Some(JwtError::BadType)
        );
        assert_eq!(
            peek(&t(r#"{"alg":"XS999"}"#)).err(),
            Some(JwtError::AlgNotAllowed)
        );
        let ok = peek(&t(r#"{"alg":"ES256","typ":"at+jwt","kid":"k1"}"#)).unwrap();
        assert_eq!(ok.alg, Algorithm::ES256);
        assert_eq!(ok.kid.as_deref(), Some("k1"));
        assert_eq!(ok.iss, "x");
    }

    #[test]
    fn tenant_template_matching() {
        let m = IssuerMatch::parse(
            "https://login.microsoftonline.com/{tenantid}/v2.0",
            &["AAA".into()],
        );
        assert_eq!(
            m.matches("https://login.microsoftonline.com/aaa/v2.0"),
            Some(Some("aaa"))
        );
        assert_eq!(
            m.matches("https://login.microsoftonline.com/a/b/v2.0"),
            None
        );
        assert_eq!(m.matches("https://login.microsoftonline.com//v2.0"), None);
        assert_eq!(m.matches("https://evil.example/aaa/v2.0"), None);
    }
}
