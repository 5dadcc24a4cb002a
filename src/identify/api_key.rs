//! Gateway-issued API keys: `pcl_<id>_<secret>`.
//!
//! - `<id>`: 8 characters of lowercase base32 (40 random bits), public: it names the key in
//!   `keys list`, logs and audit lines.
//! - `<secret>`: 52 characters of lowercase base32 (32 random bytes from aws-lc-rs).
//!
//! The store keeps only HMAC-SHA256(key = `store.key_hmac_secret`, message = the whole
//! key); a database dump alone cannot produce or check a key.
//!
//! [`ApiKeys`] is the request-path half: every key is held in memory in an `arc-swap`
//! snapshot, so [`ApiKeys::verify`] does no I/O and takes no lock; background tasks poll the
//! store's revision to pick up created, revoked and rotated keys, and write `last_used`
//! times back in batches. [`KeyAdmin`] is the management half used by `portcullis keys`
//! (and the demo): create, list, revoke, rotate.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use aws_lc_rs::{hmac, rand};
use tokio::task::AbortHandle;

use crate::config::identity::valid_id;
use crate::config::Secret;
use crate::store::{KeyRecord, KeyStore, StoreError};

/// Every gateway-issued key starts with this.
pub const PREFIX: &str = "pcl_";
/// Length of a key id.
pub const ID_LEN: usize = 8;
const ID_BYTES: usize = 5;
const SECRET_BYTES: usize = 32;
/// base32 characters for [`SECRET_BYTES`] (256 bits / 5, rounded up).
const SECRET_LEN: usize = 52;
/// Length of a whole key.
pub const KEY_LEN: usize = PREFIX.len() + ID_LEN + 1 + SECRET_LEN;
/// Longest accepted expiry or grace period (keeps every time printable).
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// Attempts at drawing an unused id before giving up.
const ID_ATTEMPTS: usize = 5;
/// A store call from a background task that takes longer than this is abandoned.
const STORE_CALL_TIMEOUT: Duration = Duration::from_secs(30);

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// Whether `s` claims to be a gateway-issued key (starts with [`PREFIX`]).
pub fn looks_like_key(s: &str) -> bool {
    s.starts_with(PREFIX)
}

/// Whether `s` has the form of a key id (8 lowercase base32 characters).
pub fn valid_key_id(s: &str) -> bool {
    s.len() == ID_LEN && s.bytes().all(|b| BASE32.contains(&b))
}

/// The id of a well-formed key, `None` for anything else.
fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(PREFIX)?;
    if rest.len() != ID_LEN + 1 + SECRET_LEN {
        return None;
    }
    let id = rest.get(..ID_LEN)?;
    let secret = rest.get(ID_LEN + 1..)?;
    let valid = valid_key_id(id)
        && rest.as_bytes().get(ID_LEN) == Some(&b'_')
        && secret.bytes().all(|b| BASE32.contains(&b));
    valid.then_some(id)
}

/// RFC 4648 base32, lowercase, no padding.
fn base32(bytes: &[u8]) -> String {
    let mut out = String::with_capacity((bytes.len() * 8).div_ceil(5));
    let mut buffer: u16 = 0;
    let mut bits = 0u32;
    for &b in bytes {
        buffer = (buffer << 8) | u16::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(BASE32[usize::from((buffer >> bits) & 31)]));
        }
        buffer &= (1 << bits) - 1;
    }
    if bits > 0 {
        out.push(char::from(BASE32[usize::from((buffer << (5 - bits)) & 31)]));
    }
    out
}

fn random<const N: usize>() -> Result<[u8; N], StoreError> {
    let mut buf = [0u8; N];
    rand::fill(&mut buf)
        .map_err(|_| StoreError::Invalid("the system random number generator failed".into()))?;
    Ok(buf)
}

/// Now, in unix seconds (the wall clock: expiry is a wall-clock time).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn mac_key(secret: &Secret) -> hmac::Key {
    hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes())
}

/// Who a valid key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyIdentity {
    /// The key's public id.
    pub key_id: Arc<str>,
    /// The `[[clients]]` id.
    pub client: Arc<str>,
}

/// Why a presented key was refused. `Display` is a short description safe to send to the
/// client; it never contains the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyRejection {
    /// Not of the form `pcl_<id>_<secret>`.
    #[error("the API key is malformed")]
    Malformed,
    /// No key has this id, or the secret part is wrong.
    #[error("the API key is not valid")]
    Unknown,
    /// Past its expiry (also after a rotation's grace period).
    #[error("the API key has expired")]
    Expired,
    /// Revoked with `portcullis keys revoke`.
    #[error("the API key has been revoked")]
    Revoked,
}

impl KeyRejection {
    /// A stable one-word reason, for audit lines and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyRejection::Malformed => "malformed",
            KeyRejection::Unknown => "unknown",
            KeyRejection::Expired => "expired",
            KeyRejection::Revoked => "revoked",
        }
    }
}

/// One key as the request path sees it.
struct Entry {
    identity: KeyIdentity,
    hmac: [u8; 32],
    expires_at: Option<i64>,
    revoked: bool,
    /// Last use not yet written to the store (unix seconds; 0 = none). Shared with the
    /// same key's entry in the next snapshot, so a reload loses nothing.
    used: Arc<AtomicI64>,
}

/// The keys loaded at one revision.
struct Loaded {
    revision: i64,
    keys: HashMap<Arc<str>, Entry>,
}

/// The API keys a running gateway accepts: an in-memory snapshot of the store, refreshed in
/// the background.
pub struct ApiKeys {
    store: Arc<dyn KeyStore>,
    mac: hmac::Key,
    loaded: ArcSwap<Loaded>,
    /// One reload at a time (poll and [`ApiKeys::reload`] may race).
    reloading: tokio::sync::Mutex<()>,
    tasks: std::sync::Mutex<Vec<AbortHandle>>,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let loaded = self.loaded.load();
        f.debug_struct("ApiKeys")
            .field("backend", &self.store.backend())
            .field("revision", &loaded.revision)
            .field("keys", &loaded.keys.len())
            .finish_non_exhaustive()
    }
}

impl ApiKeys {
    /// Loads every key into memory, then spawns (on the current tokio runtime) a task that
    /// polls the revision every `refresh` and reloads when it changed, and a task that
    /// writes `last_used` every `flush`. Both end when the returned `ApiKeys` is dropped;
    /// both log store errors and carry on, and the keys loaded last keep working meanwhile.
    /// Call [`ApiKeys::flush`] at shutdown: uses since the last flush are otherwise lost.
    pub async fn start(
        store: Arc<dyn KeyStore>,
        hmac_secret: &Secret,
        refresh: Duration,
        flush: Duration,
    ) -> Result<Arc<Self>, StoreError> {
        let keys = Arc::new(ApiKeys {
            store,
            mac: mac_key(hmac_secret),
            loaded: ArcSwap::from_pointee(Loaded {
                revision: i64::MIN,
                keys: HashMap::new(),
            }),
            reloading: tokio::sync::Mutex::new(()),
            tasks: std::sync::Mutex::new(Vec::new()),
        });
        keys.reload().await?;
        let refresher = tokio::spawn(every(Arc::downgrade(&keys), refresh, "refresh", |k| {
            Box::pin(async move { k.refresh().await })
        }));
        let flusher = tokio::spawn(every(
            Arc::downgrade(&keys),
            flush,
            "last_used flush",
            |k| Box::pin(async move { k.flush().await }),
        ));
        if let Ok(mut tasks) = keys.tasks.lock() {
            tasks.push(refresher.abort_handle());
            tasks.push(flusher.abort_handle());
        }
        Ok(keys)
    }

    /// Request path: sync, no I/O, no lock. Parses the key, looks it up by id, checks its
    /// HMAC in constant time, then refuses it if revoked or expired (against the wall clock
    /// now). On success, records the use in memory; [`ApiKeys::flush`] writes it.
    ///
    /// An unknown id and a wrong secret both give [`KeyRejection::Unknown`]; revocation and
    /// expiry are only told to a caller that holds the real key.
    pub fn verify(&self, presented: &str) -> Result<KeyIdentity, KeyRejection> {
        let id = key_id(presented).ok_or(KeyRejection::Malformed)?;
        let loaded = self.loaded.load();
        let entry = loaded.keys.get(id).ok_or(KeyRejection::Unknown)?;
        hmac::verify(&self.mac, presented.as_bytes(), &entry.hmac)
            .map_err(|_| KeyRejection::Unknown)?;
        if entry.revoked {
            return Err(KeyRejection::Revoked);
        }
        let now = unix_now();
        if entry.expires_at.is_some_and(|e| e <= now) {
            return Err(KeyRejection::Expired);
        }
        // At most one write per key per second on this shared cache line.
        if entry.used.load(Ordering::Relaxed) < now {
            entry.used.fetch_max(now, Ordering::Relaxed);
        }
        Ok(entry.identity.clone())
    }

    /// Write pending `last_used` times now (called at shutdown, and by the flush task).
    /// On failure they stay pending for the next flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let loaded = self.loaded.load_full();
        let used: Vec<(Arc<str>, i64)> = loaded
            .keys
            .iter()
            .filter_map(|(id, e)| {
                let t = e.used.swap(0, Ordering::Relaxed);
                (t > 0).then(|| (id.clone(), t))
            })
            .collect();
        if used.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.store.record_last_used(&used).await {
            for (id, t) in &used {
                if let Some(entry) = loaded.keys.get(id) {
                    entry.used.fetch_max(*t, Ordering::Relaxed);
                }
            }
            return Err(e);
        }
        Ok(())
    }

    /// Reload every key from the store now (tests, admin).
    pub async fn reload(&self) -> Result<(), StoreError> {
        let _one = self.reloading.lock().await;
        let set = self.store.load().await?;
        let old = self.loaded.load_full();
        let keys = set
            .keys
            .into_iter()
            .map(|k| {
                let used = old
                    .keys
                    .get(k.id.as_str())
                    .map(|e| e.used.clone())
                    .unwrap_or_default();
                let id: Arc<str> = Arc::from(k.id);
                let entry = Entry {
                    identity: KeyIdentity {
                        key_id: id.clone(),
                        client: Arc::from(k.client),
                    },
                    hmac: k.hmac,
                    expires_at: k.expires_at,
                    revoked: k.revoked_at.is_some(),
                    used,
                };
                (id, entry)
            })
            .collect();
        self.loaded.store(Arc::new(Loaded {
            revision: set.revision,
            keys,
        }));
        Ok(())
    }

    /// Reload if the store's revision moved since the last load.
    async fn refresh(&self) -> Result<(), StoreError> {
        let revision = self.store.revision().await?;
        if revision != self.loaded.load().revision {
            self.reload().await?;
            tracing::debug!(revision, "api keys reloaded");
        }
        Ok(())
    }

    /// Number of keys loaded (any state).
    pub fn len(&self) -> usize {
        self.loaded.load().keys.len()
    }

    /// Whether no key is loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The request path's view: [`ApiKeys::verify`] as the identifier's [`KeyCheck`](super::KeyCheck).
impl super::KeyCheck for ApiKeys {
    fn check(&self, presented: &str) -> Result<(Arc<str>, Arc<str>), String> {
        self.verify(presented)
            .map(|k| (k.key_id, k.client))
            .map_err(|r| r.to_string())
    }
}

impl Drop for ApiKeys {
    fn drop(&mut self) {
        if let Ok(tasks) = self.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
    }
}

/// Run `work` every `period` while the `ApiKeys` lives. Errors are logged (the first of a
/// series at `warn`, then at `debug` until the store answers again), never fatal.
async fn every(
    keys: Weak<ApiKeys>,
    period: Duration,
    what: &'static str,
    work: impl Fn(Arc<ApiKeys>) -> crate::store::BoxFuture<'static, Result<(), StoreError>>,
) {
    let mut failing = false;
    loop {
        tokio::time::sleep(period).await;
        let Some(k) = keys.upgrade() else { break };
        let outcome = tokio::time::timeout(STORE_CALL_TIMEOUT, work(k)).await;
        match outcome {
            Ok(Ok(())) => {
                if failing {
                    tracing::info!(task = what, "api keys: the store answers again");
                    failing = false;
                }
            }
            Ok(Err(e)) if !failing => {
                tracing::warn!(task = what, error = %e, "api keys: store call failed; the keys loaded last keep working");
                failing = true;
            }
            Ok(Err(e)) => tracing::debug!(task = what, error = %e, "api keys: store call failed"),
            Err(_) => {
                tracing::warn!(task = what, "api keys: store call timed out");
                failing = true;
            }
        }
    }
}

/// A new key for a client.
#[derive(Debug)]
pub struct Rotation {
    /// The new key's record.
    pub record: KeyRecord,
    /// The new key (shown once).
    pub key: Secret,
    /// The client's other keys, with their shortened expiry.
    pub rolled: Vec<KeyRecord>,
}

/// Issues and manages keys (the `portcullis keys` commands, the demo). Not on the request
/// path; a running [`ApiKeys`] sees the changes at its next poll.
pub struct KeyAdmin {
    store: Arc<dyn KeyStore>,
    mac: hmac::Key,
}

impl fmt::Debug for KeyAdmin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyAdmin")
            .field("backend", &self.store.backend())
            .finish_non_exhaustive()
    }
}

impl KeyAdmin {
    pub fn new(store: Arc<dyn KeyStore>, hmac_secret: &Secret) -> Self {
        KeyAdmin {
            store,
            mac: mac_key(hmac_secret),
        }
    }

    /// The store keys are written to.
    pub fn store(&self) -> &Arc<dyn KeyStore> {
        &self.store
    }

    /// Issue a key for `client` (not checked against `[[clients]]` here: the caller does),
    /// expiring `expires` from now (`None`: never). Returns its record and the key, which
    /// exists nowhere else: show it once.
    pub async fn create(
        &self,
        client: &str,
        name: Option<&str>,
        expires: Option<Duration>,
    ) -> Result<(KeyRecord, Secret), StoreError> {
        self.issue(client, name, expires, None)
            .await
            .map(|r| (r.record, r.key))
    }

    /// Keys of `client` (or all), oldest first.
    pub async fn list(&self, client: Option<&str>) -> Result<Vec<KeyRecord>, StoreError> {
        self.store.list(client).await
    }

    /// Revoke the key with this id; [`StoreError::UnknownKey`] if there is none. Revoking a
    /// revoked key keeps its first revocation time.
    pub async fn revoke(&self, id: &str) -> Result<KeyRecord, StoreError> {
        if !valid_key_id(id) {
            return Err(StoreError::Invalid(if looks_like_key(id) {
                "give the key's id (the 8 characters after pcl_), not the key itself".into()
            } else {
                format!("a key id is {ID_LEN} characters of a-z and 2-7")
            }));
        }
        self.store
            .revoke(id, unix_now())
            .await?
            .ok_or_else(|| StoreError::UnknownKey(id.to_owned()))
    }

    /// Issue a new key for `client` and let its other active keys expire `grace` from now
    /// at the latest, so the client can switch without downtime.
    pub async fn rotate(
        &self,
        client: &str,
        grace: Duration,
        expires: Option<Duration>,
        name: Option<&str>,
    ) -> Result<Rotation, StoreError> {
        self.issue(client, name, expires, Some(grace)).await
    }

    async fn issue(
        &self,
        client: &str,
        name: Option<&str>,
        expires: Option<Duration>,
        grace: Option<Duration>,
    ) -> Result<Rotation, StoreError> {
        if !valid_id(client) {
            return Err(StoreError::Invalid(
                "a client id is 1-64 letters, digits, '-', '_' or '.'".into(),
            ));
        }
        if let Some(n) = name {
            let ok = !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b' '));
            if !ok {
                return Err(StoreError::Invalid(
                    "a key name is 1-64 letters, digits, spaces, '-', '_' or '.'".into(),
                ));
            }
        }
        let now = unix_now();
        let expires_at = match expires {
            None => None,
            Some(d) if d.is_zero() => {
                return Err(StoreError::Invalid("the expiry must be after now".into()))
            }
            Some(d) => Some(now + seconds(d, "the expiry")?),
        };
        let grace_until = match grace {
            None => None,
            Some(g) => Some(now + seconds(g, "the grace period")?),
        };
        for _ in 0..ID_ATTEMPTS {
            let id = base32(&random::<ID_BYTES>()?);
            let key = Secret::new(format!(
                "{PREFIX}{id}_{}",
                base32(&random::<SECRET_BYTES>()?)
            ));
            let mut hmac = [0u8; 32];
            hmac.copy_from_slice(hmac::sign(&self.mac, key.expose().as_bytes()).as_ref());
            let record = KeyRecord {
                id,
                client: client.to_owned(),
                name: name.map(str::to_owned),
                hmac,
                created_at: now,
                expires_at,
                revoked_at: None,
                last_used_at: None,
            };
            let result = match grace_until {
                None => self.store.insert(&record).await.map(|()| Vec::new()),
                Some(until) => self.store.rotate(&record, now, until).await,
            };
            match result {
                Ok(rolled) => {
                    return Ok(Rotation {
                        record,
                        key,
                        rolled,
                    })
                }
                Err(StoreError::DuplicateId) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::DuplicateId)
    }
}

/// Whole seconds of `d`, refused above [`MAX_DURATION`].
fn seconds(d: Duration, what: &str) -> Result<i64, StoreError> {
    if d > MAX_DURATION {
        return Err(StoreError::Invalid(format!(
            "{what} must be at most 100 years"
        )));
    }
    // Round up: "1s" never means "now".
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i64::try_from(secs).map_err(|_| StoreError::Invalid(format!("{what} is too long")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_as_the_identifiers_key_check() {
        let store = crate::store::open("sqlite::memory:", std::path::Path::new("."))
            .await
            .unwrap();
        let secret = Secret::new("unit-test-hmac-secret-0123456789abcdef".into());
        let (rec, key) = KeyAdmin::new(store.clone(), &secret)
            .create("team-a", None, None)
            .await
            .unwrap();
        let keys = ApiKeys::start(store, &secret, NEVER, NEVER).await.unwrap();
        let check: Arc<dyn super::super::KeyCheck> = keys;
        let (id, client) = check.check(key.expose()).unwrap();
        assert_eq!((&*id, &*client), (rec.id.as_str(), "team-a"));
        assert_eq!(
            check.check("pcl_nope").unwrap_err(),
            "the API key is malformed"
        );
    }

    const NEVER: Duration = Duration::from_secs(3600);

    #[test]
    fn shared_across_worker_threads() {
        fn is<T: Send + Sync>() {}
        is::<ApiKeys>();
        is::<KeyAdmin>();
        is::<KeyIdentity>();
    }

    #[test]
    fn base32_matches_rfc4648() {
        // RFC 4648 section 10 vectors, lowercase and unpadded.
        for (input, want) in [
            ("", ""),
            ("f", "my"),
            ("fo", "mzxq"),
            ("foo", "mzxw6"),
            ("foob", "mzxw6yq"),
            ("fooba", "mzxw6ytb"),
            ("foobar", "mzxw6ytboi"),
        ] {
            assert_eq!(base32(input.as_bytes()), want);
        }
        assert_eq!(base32(&[0u8; ID_BYTES]).len(), ID_LEN);
        assert_eq!(base32(&[0xffu8; SECRET_BYTES]).len(), SECRET_LEN);
    }

    #[test]
    fn key_ids_are_parsed_only_from_well_formed_keys() {
        let good = format!("pcl_abcdefgh_{}", "a".repeat(SECRET_LEN));
        assert_eq!(good.len(), KEY_LEN);
        assert_eq!(key_id(&good), Some("abcdefgh"));
        assert!(looks_like_key(&good));
        for bad in [
            String::new(),
            "pcl_".into(),
            "pcl_demo".into(),
            good.to_uppercase(),
            good.replacen("pcl_", "pck_", 1),
            good.replacen("abcdefgh_", "abcdefgh-", 1),
            good.replacen("abcdefgh", "abcdefg1", 1),
            format!("{good}a"),
            good[..KEY_LEN - 1].to_owned(),
            format!("pcl_abcdefgh_{}é", "a".repeat(SECRET_LEN - 2)),
        ] {
            assert_eq!(key_id(&bad), None, "{bad}");
        }
        assert!(valid_key_id("a2b3c4d5"));
        assert!(!valid_key_id("a2b3c4d8"));
        assert!(!valid_key_id("a2b3c4d"));
    }

    #[test]
    fn rejections_never_echo_and_have_stable_reasons() {
        assert_eq!(
            KeyRejection::Revoked.to_string(),
            "the API key has been revoked"
        );
        assert_eq!(KeyRejection::Expired.as_str(), "expired");
    }

    #[test]
    fn durations_round_up_and_are_bounded() {
        assert_eq!(seconds(Duration::from_millis(1), "x").unwrap(), 1);
        assert_eq!(
            seconds(Duration::from_secs(90 * 86400), "x").unwrap(),
            7_776_000
        );
        assert!(seconds(Duration::from_secs(u64::MAX), "x").is_err());
    }
}
