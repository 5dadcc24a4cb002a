//! An issuer's signing keys (JWKS), cached for lock-free lookup on the request path.
//!
//! A background task per issuer fetches the key set from the configured `jwks_uri` (or the
//! one named by the issuer's discovery document), honours `Cache-Control: max-age` within
//! bounds, retries with backoff when the IdP is down and keeps the last good keys meanwhile.
//! A token naming an unknown `kid` may ask for one early refresh, but only through a budget
//! (one per issuer per 30 s, and a global cap per minute) and a bounded negative cache, so
//! unknown-kid tokens cannot make the gateway hammer the IdP. Keys are only ever fetched
//! from configured URLs — never from a URL a token names (`jku`, `x5u`) and never taken from
//! the token itself (`jwk`, `x5c`).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use tokio::sync::{watch, Notify};

use crate::metrics::Metrics;

/// One verification key from the key set.
pub struct VerifyKey {
    pub kid: Option<String>,
    pub family: AlgorithmFamily,
    /// The `alg` the JWK pins, if any: the token's `alg` must then be exactly this.
    pub alg: Option<Algorithm>,
    /// For EC keys: the curve, which fixes the algorithm (P-256 → ES256, P-384 → ES384).
    pub curve: Option<EllipticCurve>,
    pub key: DecodingKey,
    /// SHA-256 of the JWK as published: a token verified earlier is trusted only while a
    /// key with the same material is still published (not merely the same `kid`).
    pub fingerprint: [u8; 32],
}

impl VerifyKey {
    /// Whether this key may verify a token signed with `alg`.
    pub fn fits(&self, alg: Algorithm) -> bool {
        if alg.family() != self.family || self.alg.is_some_and(|a| a != alg) {
            return false;
        }
        match (&self.curve, alg) {
            (Some(EllipticCurve::P256), Algorithm::ES256) => true,
            (Some(EllipticCurve::P384), Algorithm::ES384) => true,
            (Some(EllipticCurve::Ed25519), Algorithm::EdDSA) => true,
            (Some(_), _) => false,
            (None, _) => true,
        }
    }
}

/// The keys known at one moment.
#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, Arc<VerifyKey>>,
    all: Vec<Arc<VerifyKey>>,
}

impl KeySet {
    /// Parse a JWKS document, skipping (and reporting) keys that cannot verify signatures:
    /// encryption keys, symmetric keys (a shared secret has no business in a public
    /// document) and malformed entries.
    pub fn parse(doc: &[u8]) -> Result<(Self, Vec<String>), String> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        let doc: Doc =
            serde_json::from_slice(doc).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut set = KeySet::default();
        let mut skipped = Vec::new();
        for (i, raw) in doc.keys.into_iter().enumerate() {
            match parse_key(raw) {
                Ok(k) => {
                    let k = Arc::new(k);
                    if let Some(kid) = &k.kid {
                        set.by_kid.insert(kid.clone(), k.clone());
                    }
                    set.all.push(k);
                }
                Err(why) => skipped.push(format!("key {i}: {why}")),
            }
        }
        Ok((set, skipped))
    }

    /// The key a token names.
    pub fn get(&self, kid: &str) -> Option<&Arc<VerifyKey>> {
        self.by_kid.get(kid)
    }

    /// Whether a key with this fingerprint (and `kid`, when given) is published.
    pub fn publishes(&self, kid: Option<&str>, fingerprint: &[u8; 32]) -> bool {
        match kid {
            Some(k) => self
                .by_kid
                .get(k)
                .is_some_and(|v| &v.fingerprint == fingerprint),
            None => self.all.iter().any(|v| &v.fingerprint == fingerprint),
        }
    }

    /// Keys that may verify `alg`, for tokens without a `kid`.
    pub fn fitting(&self, alg: Algorithm) -> impl Iterator<Item = &Arc<VerifyKey>> {
        self.all.iter().filter(move |k| k.fits(alg))
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

fn parse_key(raw: serde_json::Value) -> Result<VerifyKey, String> {
    let fingerprint = crate::digest::sha256(raw.to_string().as_bytes());
    let jwk: Jwk = serde_json::from_value(raw).map_err(|e| format!("unreadable: {e}"))?;
    if let Some(u) = &jwk.common.public_key_use {
        if *u != PublicKeyUse::Signature {
            return Err("not a signature key (use != sig)".into());
        }
    }
    let (family, curve) = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => (AlgorithmFamily::Rsa, None),
        AlgorithmParameters::EllipticCurve(p) => (AlgorithmFamily::Ec, Some(p.curve.clone())),
        AlgorithmParameters::OctetKeyPair(p) => (AlgorithmFamily::Ed, Some(p.curve.clone())),
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric keys are never taken from a JWKS".into())
        }
        _ => return Err("unsupported key type".into()),
    };
    let alg = match jwk.common.key_algorithm {
        Some(a) => Some(
            Algorithm::from_str(&a.to_string())
                .map_err(|_| format!("algorithm {a} cannot sign JWTs"))?,
        ),
        None => None,
    };
    if alg.is_some_and(|a| a.family() != family) {
        return Err("its alg does not match its key type".into());
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("invalid key material: {e}"))?;
    Ok(VerifyKey {
        kid: jwk.common.key_id.clone(),
        family,
        alg,
        curve,
        key,
        fingerprint,
    })
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// A configured `jwks_uri`.
    Uri(String),
    /// The `jwks_uri` of `{issuer}/.well-known/openid-configuration`.
    Discovery { issuer: String },
}

/// Bounds on how often the IdP is asked for keys.
const MIN_FORCED_INTERVAL: Duration = Duration::from_secs(30);
const GLOBAL_FORCED_PER_MINUTE: u32 = 10;
const MIN_MAX_AGE: Duration = Duration::from_secs(60);
const MAX_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
const MAX_DOC_BYTES: usize = 1024 * 1024;
const NEGATIVE_TTL: Duration = Duration::from_secs(60);
const NEGATIVE_CAPACITY: usize = 1024;
const MAX_KID_LEN: usize = 256;

/// Early (unknown-kid) refreshes allowed per minute across all issuers of one gateway.
#[derive(Default)]
pub struct RefreshBudget(Mutex<(Option<Instant>, u32)>);

impl RefreshBudget {
    fn take(&self) -> bool {
        let Ok(mut g) = self.0.lock() else {
            return false;
        };
        let now = Instant::now();
        match g.0 {
            Some(start) if now.duration_since(start) < Duration::from_secs(60) => {
                if g.1 >= GLOBAL_FORCED_PER_MINUTE {
                    return false;
                }
                g.1 += 1;
            }
            _ => *g = (Some(now), 1),
        }
        true
    }
}

/// The cached key set of one issuer plus its refresh machinery.
pub struct Jwks {
    issuer: Arc<str>,
    current: ArcSwap<KeySet>,
    /// Wakes the background task for an early refresh.
    wake: Arc<Notify>,
    /// Bumped after every fetch attempt, so waiters learn it finished.
    generation: watch::Sender<u64>,
    forced_inflight: AtomicBool,
    last_forced: Mutex<Option<Instant>>,
    negative: quick_cache::sync::Cache<String, Instant>,
    loaded: AtomicBool,
    budget: Arc<RefreshBudget>,
}

/// Outcome of looking a key up.
pub enum Lookup {
    Found(Arc<VerifyKey>),
    /// No such key, even after any refresh the budget allowed.
    Unknown,
    /// The keys were never loaded (IdP unreachable since start).
    Unavailable,
}

impl Jwks {
    /// Create the cache and start its refresh task on the current tokio runtime.
    pub fn start(
        issuer: &str,
        source: KeySource,
        refresh_interval: Duration,
        budget: Arc<RefreshBudget>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let jwks = Arc::new(Self::new(issuer, budget, false));
        let fetcher = Fetcher::new(source, metrics, issuer);
        tokio::spawn(refresh_loop(
            Arc::downgrade(&jwks),
            jwks.wake.clone(),
            fetcher,
            refresh_interval,
        ));
        jwks
    }

    /// A key set that is never fetched: for issuers whose tokens are all HMAC-signed.
    pub fn none(issuer: &str) -> Arc<Self> {
        Arc::new(Self::new(issuer, Arc::default(), true))
    }

    /// Empty keys; `loaded` marks a set that needs no first fetch.
    fn new(issuer: &str, budget: Arc<RefreshBudget>, loaded: bool) -> Self {
        let (generation, _) = watch::channel(u64::from(loaded));
        Self {
            issuer: Arc::from(issuer),
            current: ArcSwap::from_pointee(KeySet::default()),
            wake: Arc::new(Notify::new()),
            generation,
            forced_inflight: AtomicBool::new(false),
            last_forced: Mutex::new(None),
            negative: quick_cache::sync::Cache::new(NEGATIVE_CAPACITY),
            loaded: AtomicBool::new(loaded),
            budget,
        }
    }

    /// The current key set (lock-free).
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.current.load()
    }

    /// Whether a key set has been loaded at least once.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Wait until the first fetch attempt finished (or `deadline` passed).
    pub async fn wait_first_attempt(&self, deadline: Duration) {
        let mut rx = self.generation.subscribe();
        let _ = tokio::time::timeout(deadline, rx.wait_for(|g| *g > 0)).await;
    }

    /// Find the key named `kid` for a token signed with `alg`; may trigger one budgeted
    /// early refresh.
    pub async fn key(&self, kid: &str, alg: Algorithm) -> Lookup {
        if let Some(found) = self.published(kid, alg) {
            return found;
        }
        if kid.len() > MAX_KID_LEN {
            return Lookup::Unknown;
        }
        if !self.is_loaded() {
            self.first_load().await;
            if let Some(found) = self.published(kid, alg) {
                return found;
            }
            if !self.is_loaded() {
                return Lookup::Unavailable;
            }
        }
        if self
            .negative
            .get(kid)
            .is_some_and(|until| until > Instant::now())
        {
            return Lookup::Unknown;
        }
        let joined = self.forced_inflight.load(Ordering::Acquire);
        if joined || self.take_budget() {
            // Only the request that took the budget wakes the refresher; the others wait
            // for the same fetch.
            self.refresh_and_wait(!joined).await;
            if let Some(found) = self.published(kid, alg) {
                return found;
            }
        }
        self.negative
            .insert(kid.to_owned(), Instant::now() + NEGATIVE_TTL);
        Lookup::Unknown
    }

    /// The published key named `kid`, if any: found when it may verify `alg`.
    fn published(&self, kid: &str, alg: Algorithm) -> Option<Lookup> {
        self.snapshot().get(kid).map(|k| {
            if k.fits(alg) {
                Lookup::Found(k.clone())
            } else {
                Lookup::Unknown
            }
        })
    }

    /// Wait (bounded) while the first fetch is still under way, rather than failing the
    /// request or spending the early-refresh budget a later rotation may need. Returns at
    /// once when keys are loaded.
    pub async fn first_load(&self) {
        if !self.is_loaded() {
            self.wait_first_attempt(Duration::from_secs(10)).await;
        }
    }

    fn take_budget(&self) -> bool {
        let Ok(mut last) = self.last_forced.lock() else {
            return false;
        };
        if last.is_some_and(|t| t.elapsed() < MIN_FORCED_INTERVAL) {
            return false;
        }
        if !self.budget.take() {
            return false;
        }
        *last = Some(Instant::now());
        self.forced_inflight.store(true, Ordering::Release);
        true
    }

    async fn refresh_and_wait(&self, wake: bool) {
        let mut rx = self.generation.subscribe();
        let seen = *rx.borrow_and_update();
        if wake {
            self.wake.notify_one();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|g| *g != seen)).await;
    }

    fn install(&self, set: KeySet) {
        self.current.store(Arc::new(set));
        self.negative.clear();
        self.loaded.store(true, Ordering::Release);
    }

    fn attempt_done(&self) {
        self.forced_inflight.store(false, Ordering::Release);
        self.generation.send_modify(|g| *g += 1);
    }
}

async fn refresh_loop(
    jwks: Weak<Jwks>,
    wake: Arc<Notify>,
    mut fetcher: Fetcher,
    refresh_interval: Duration,
) {
    let mut failures: u32 = 0;
    loop {
        let result = fetcher.fetch().await;
        let Some(j) = jwks.upgrade() else { return };
        let next = match result {
            Ok((set, max_age)) => {
                failures = 0;
                fetcher.metrics.jwks_keys(&j.issuer).set(set.len() as i64);
                j.install(set);
                max_age
                    .map(|a| a.clamp(MIN_MAX_AGE, MAX_MAX_AGE))
                    .unwrap_or(refresh_interval)
            }
            Err(why) => {
                failures = failures.saturating_add(1);
                tracing::warn!(
                    issuer = %j.issuer,
                    error = %why,
                    keeping = j.snapshot().len(),
                    "cannot refresh the issuer's signing keys; keeping the last good ones"
                );
                backoff(failures)
            }
        };
        j.attempt_done();
        drop(j);
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = wake.notified() => {}
        }
    }
}

/// 2 s, 4 s, ... up to 5 min, with jitter.
fn backoff(failures: u32) -> Duration {
    let base = 2u64.saturating_pow(failures.min(8)).min(300);
    Duration::from_millis(base * 1000 + fastrand::u64(0..1000))
}

/// Fetches key documents over HTTPS (or loopback HTTP) from configured URLs only.
struct Fetcher {
    source: KeySource,
    /// `jwks_uri` learned from discovery.
    discovered: Option<String>,
    http: Option<reqwest::Client>,
    metrics: Arc<Metrics>,
    issuer: String,
}

impl Fetcher {
    fn new(source: KeySource, metrics: Arc<Metrics>, issuer: &str) -> Self {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(8))
            .user_agent(concat!("portcullis/", env!("CARGO_PKG_VERSION")))
            .build()
            .ok();
        Self {
            source,
            discovered: None,
            http,
            metrics,
            issuer: issuer.to_owned(),
        }
    }

    async fn fetch(&mut self) -> Result<(KeySet, Option<Duration>), String> {
        let result = self.fetch_inner().await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        self.metrics.jwks_refresh(&self.issuer, outcome).inc();
        if result.is_err() {
            self.discovered = None;
        }
        result
    }

    async fn fetch_inner(&mut self) -> Result<(KeySet, Option<Duration>), String> {
        let uri = match &self.source {
            KeySource::Uri(u) => u.clone(),
            KeySource::Discovery { issuer } => match &self.discovered {
                Some(u) => u.clone(),
                None => {
                    let url = format!(
                        "{}/.well-known/openid-configuration",
                        issuer.trim_end_matches('/')
                    );
                    let (body, _) = self.get(&url).await?;
                    let doc: serde_json::Value = serde_json::from_slice(&body)
                        .map_err(|e| format!("discovery document is not JSON: {e}"))?;
                    if doc["issuer"].as_str() != Some(issuer.as_str()) {
                        return Err(
                            "discovery document names a different issuer (OIDC Discovery §4.3)"
                                .into(),
                        );
                    }
                    let jwks = doc["jwks_uri"]
                        .as_str()
                        .ok_or("discovery document has no jwks_uri")?
                        .to_owned();
                    let mut problems = Vec::new();
                    crate::config::identity::check_url(&jwks, "jwks_uri", &mut problems);
                    if let Some(p) = problems.first() {
                        return Err(format!("discovered {}", p.message));
                    }
                    self.discovered = Some(jwks.clone());
                    jwks
                }
            },
        };
        let (body, max_age) = self.get(&uri).await?;
        let (set, skipped) = KeySet::parse(&body)?;
        for s in skipped {
            tracing::debug!(issuer = %self.issuer, "skipping JWKS {s}");
        }
        if set.is_empty() {
            return Err("the key set holds no usable signing key".into());
        }
        Ok((set, max_age))
    }

    async fn get(&self, url: &str) -> Result<(Vec<u8>, Option<Duration>), String> {
        let http = self.http.as_ref().ok_or("HTTP client unavailable")?;
        let mut resp = http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", crate::proxy::error_chain(&e)))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", resp.status()));
        }
        let max_age = resp
            .headers()
            .get(http::header::CACHE_CONTROL)
            .and_then(|v| v.to_str().ok())
            .and_then(max_age);
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("GET {url}: {}", crate::proxy::error_chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_DOC_BYTES {
                return Err(format!(
                    "GET {url}: document larger than {MAX_DOC_BYTES} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, max_age))
    }
}

/// `max-age=N` from a `Cache-Control` value (`no-store`/`no-cache` → the minimum).
fn max_age(v: &str) -> Option<Duration> {
    let mut age = None;
    for d in v.split(',').map(str::trim) {
        let lower = d.to_ascii_lowercase();
        if lower == "no-store" || lower == "no-cache" {
            return Some(Duration::ZERO);
        }
        if let Some(n) = lower.strip_prefix("max-age=") {
            age = n
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        }
    }
    age
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_wide_budget_allows_ten_early_refreshes_a_minute() {
        let budget = RefreshBudget::default();
        for i in 0..GLOBAL_FORCED_PER_MINUTE {
            assert!(budget.take(), "refresh {i}");
        }
        assert!(!budget.take());
        assert!(!budget.take());
    }

    #[test]
    fn cache_control_max_age() {
        assert_eq!(
            max_age("public, max-age=300"),
            Some(Duration::from_secs(300))
        );
        assert_eq!(max_age("no-store"), Some(Duration::ZERO));
        assert_eq!(max_age("public"), None);
        assert_eq!(max_age("max-age=abc"), None);
    }

    #[test]
    fn jwks_parsing_skips_symmetric_and_encryption_keys() {
        let doc = br#"{"keys":[
            {"kty":"oct","k":"c2VjcmV0","kid":"sym"},
            {"kty":"EC","crv":"P-256","use":"enc","kid":"enc",
             "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty":"EC","crv":"P-256","use":"sig","kid":"ec","alg":"ES256",
             "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
            {"kty":"RSA","kid":"bad","n":"!!","e":"AQAB"}
        ]}"#;
        let (set, skipped) = KeySet::parse(doc).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.get("ec").is_some());
        assert!(set.get("sym").is_none());
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        let ec = set.get("ec").unwrap();
        assert!(ec.fits(Algorithm::ES256));
        assert!(!ec.fits(Algorithm::ES384));
        assert!(!ec.fits(Algorithm::RS256));
        assert!(!ec.fits(Algorithm::HS256));
    }
}
