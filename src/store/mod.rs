//! The store: where gateway-issued API keys and usage records live, behind two object-safe
//! traits ([`KeyStore`], [`UsageStore`]) that every backend implements (together: [`Store`]).
//!
//! [`open`] picks the backend from `store.url`: an SQLite file (created on first start), an
//! in-memory SQLite database (`sqlite::memory:`), or PostgreSQL. Both backends run the same
//! SQL and carry their migrations inside the binary; [`open`] applies them.
//!
//! Nothing here is on the request path: the gateway loads every key into memory
//! ([`crate::identify::api_key::ApiKeys`]) and polls [`KeyStore::revision`], a counter that
//! every create, revoke and rotate bumps in its own transaction, to learn of changes.
//! `last_used` times are written in batches by [`KeyStore::record_last_used`], which does not
//! bump the revision (a running gateway has no use for them).
//!
//! Usage records ([`usage`]) are written in batches by [`crate::usage_log::UsageWriter`]
//! and read back summed by `portcullis usage`.
//!
//! [`StoreError`] never carries a secret: URLs are shown with their password replaced by
//! `***`, and messages from the database driver are scrubbed of it.

pub mod error;
mod postgres;
mod sql;
mod sqlite;
pub mod usage;

use std::fmt;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

pub use error::StoreError;
pub use usage::{GroupBy, UsageQuery, UsageRecord, UsageRow, UsageStore};

/// The future every [`KeyStore`] method returns (boxed, so the trait is object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One API key as stored: never the key itself, only its HMAC.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// The short public id (the `<id>` of `pcl_<id>_<secret>`).
    pub id: String,
    /// The `[[clients]]` id the key belongs to.
    pub client: String,
    /// An optional label (`--name ci`).
    pub name: Option<String>,
    /// HMAC-SHA256 of the whole key under `store.key_hmac_secret`.
    pub hmac: [u8; 32],
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds; `None` = never expires.
    pub expires_at: Option<i64>,
    /// Unix seconds; `None` = not revoked.
    pub revoked_at: Option<i64>,
    /// Unix seconds, as last written back by a gateway (batched, so up to
    /// `store.last_used_flush` late).
    pub last_used_at: Option<i64>,
}

/// What a key is at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
}

impl KeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Expired => "expired",
            KeyStatus::Revoked => "revoked",
        }
    }
}

impl KeyRecord {
    /// Revoked wins over expired; a key expires at the second `expires_at`.
    pub fn status(&self, now: i64) -> KeyStatus {
        if self.revoked_at.is_some() {
            KeyStatus::Revoked
        } else if self.expires_at.is_some_and(|e| e <= now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

impl KeyRecord {
    /// The admin API's (and `keys list --json`'s) view: never the key or its HMAC.
    pub fn view(&self, now: i64) -> serde_json::Value {
        let t = |s: i64| rfc3339_ms(s.saturating_mul(1000));
        serde_json::json!({
            "id": self.id,
            "client": self.client,
            "name": self.name,
            "created": t(self.created_at),
            "expires": self.expires_at.map(t),
            "last_used": self.last_used_at.map(t),
            "revoked": self.revoked_at.map(t),
            "status": self.status(now).as_str(),
        })
    }
}

/// Unix milliseconds as RFC 3339 UTC; empty outside what RFC 3339 can write.
pub fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRecord")
            .field("id", &self.id)
            .field("client", &self.client)
            .field("name", &self.name)
            .field("hmac", &"[32 bytes]")
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("revoked_at", &self.revoked_at)
            .field("last_used_at", &self.last_used_at)
            .finish()
    }
}

/// Every key and the revision they were read at.
#[derive(Debug, Clone)]
pub struct KeySet {
    /// Read *before* the keys: a change made in between shows up as a newer revision at
    /// the next poll, so no change is ever missed.
    pub revision: i64,
    pub keys: Vec<KeyRecord>,
}

/// The API-key store. Every mutation (`insert`, `revoke`, `rotate`) bumps the revision in
/// the same transaction.
pub trait KeyStore: Send + Sync {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// The revision counter; cheap (one row).
    fn revision(&self) -> BoxFuture<'_, Result<i64, StoreError>>;

    /// Every key, with the revision read before them.
    fn load(&self) -> BoxFuture<'_, Result<KeySet, StoreError>>;

    /// Keys (of one client, or all), oldest first.
    fn list<'a>(
        &'a self,
        client: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<KeyRecord>, StoreError>>;

    /// Add a key. [`StoreError::DuplicateId`] when the id is taken.
    fn insert<'a>(&'a self, key: &'a KeyRecord) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Mark a key revoked at `now` (a key already revoked keeps its first time). Returns the
    /// key as it is afterwards, `None` when no key has this id.
    fn revoke<'a>(
        &'a self,
        id: &'a str,
        now: i64,
    ) -> BoxFuture<'a, Result<Option<KeyRecord>, StoreError>>;

    /// In one transaction: add `new`, and set `expires_at = min(expires_at, grace_until)` on
    /// every other key of `new.client` that is active at `now`. Returns those keys as they
    /// are afterwards.
    fn rotate<'a>(
        &'a self,
        new: &'a KeyRecord,
        now: i64,
        grace_until: i64,
    ) -> BoxFuture<'a, Result<Vec<KeyRecord>, StoreError>>;

    /// Write `last_used_at` for these keys (only ever moving it forward), in one
    /// transaction. Does not bump the revision.
    fn record_last_used<'a>(
        &'a self,
        used: &'a [(Arc<str>, i64)],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Close the connections (waits for queries in flight).
    fn close(&self) -> BoxFuture<'_, ()>;
}

/// Both sides of a store: API keys and usage records. An `Arc<dyn Store>` converts to
/// `Arc<dyn KeyStore>` and `Arc<dyn UsageStore>` (trait upcasting), sharing one pool.
pub trait Store: KeyStore + UsageStore {}

impl<T: KeyStore + UsageStore + ?Sized> Store for T {}

/// [`open_store`], for API keys only.
pub async fn open(url: &str, base_dir: &Path) -> Result<Arc<dyn KeyStore>, StoreError> {
    Ok(open_store(url, base_dir).await?)
}

/// Open the store named by `store.url` and apply its migrations.
///
/// - `sqlite://file.db` or `sqlite:file.db`: relative paths are resolved against `base_dir`
///   (the configuration file's directory); `sqlite:///abs/path.db` is absolute. The file is
///   created on first start.
/// - `sqlite::memory:`: a fresh database in memory, held by a single connection so every
///   user of the returned store sees the same data; gone when the store is dropped. Each
///   call opens a different database.
/// - `postgres://...` or `postgresql://...`: any libpq-style URL; TLS through rustls.
pub async fn open_store(url: &str, base_dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::open(url, base_dir).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::open(url).await?))
    } else {
        Err(StoreError::Url {
            url: error::redact_url(url),
            reason: "expected sqlite://FILE, sqlite::memory: or postgres://...".into(),
        })
    }
}

/// The database file `url` names (resolved like [`open_store`] does), or `None` when it is
/// not an SQLite file (PostgreSQL, `sqlite::memory:`).
pub fn sqlite_file(url: &str, base_dir: &Path) -> Result<Option<std::path::PathBuf>, StoreError> {
    if url.starts_with("sqlite:") {
        sqlite::file(url, base_dir)
    } else {
        Ok(None)
    }
}

#[cfg(test)]
mod tests;
