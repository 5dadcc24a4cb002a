//! Gateway-issued API keys against real stores: every scenario runs on an SQLite file, on
//! in-memory SQLite and on a fresh PostgreSQL database, through the same `KeyStore` trait a
//! gateway uses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::TestDb;
use common::wait_until;
use portcullis::config::Secret;
use portcullis::identify::api_key::{
    looks_like_key, unix_now, ApiKeys, KeyAdmin, KeyRejection, KEY_LEN, PREFIX,
};
use portcullis::store::{self, BoxFuture, KeyRecord, KeySet, KeyStatus, KeyStore, StoreError};

const HMAC_SECRET: &str = "test-key-hmac-secret-0123456789abcdef";
/// Poll or flush interval for the tests that watch a running gateway.
const FAST: Duration = Duration::from_millis(50);
/// An interval that never elapses within a test.
const NEVER: Duration = Duration::from_secs(3600);
/// How long a change may take to show (generous: CI machines are slow).
const DEADLINE: Duration = Duration::from_secs(10);
const DAY: Duration = Duration::from_secs(86_400);

fn secret() -> Secret {
    Secret::new(HMAC_SECRET.into())
}

enum Guard {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Pg(TestDb),
    Nothing,
}

/// One store, an admin on it, and what keeps its database alive.
struct Fixture {
    store: Arc<dyn KeyStore>,
    admin: KeyAdmin,
    url: String,
    base: PathBuf,
    guard: Guard,
}

impl Fixture {
    async fn with(url: String, base: PathBuf, guard: Guard) -> Fixture {
        let store = store::open(&url, &base).await.unwrap();
        Fixture {
            admin: KeyAdmin::new(store.clone(), &secret()),
            store,
            url,
            base,
            guard,
        }
    }

    async fn sqlite_file() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        Fixture::with("sqlite://keys.db".into(), base, Guard::Dir(dir)).await
    }

    async fn sqlite_memory() -> Fixture {
        Fixture::with("sqlite::memory:".into(), ".".into(), Guard::Nothing).await
    }

    async fn postgres() -> Fixture {
        let db = TestDb::create().await;
        Fixture::with(db.url.clone(), ".".into(), Guard::Pg(db)).await
    }

    /// A second, independent connection to the same database: another gateway replica.
    async fn replica(&self) -> Arc<dyn KeyStore> {
        assert!(
            !self.url.contains(":memory:"),
            "an in-memory database has one user"
        );
        store::open(&self.url, &self.base).await.unwrap()
    }

    /// A running gateway's view of the keys.
    async fn gateway(&self, refresh: Duration, flush: Duration) -> Arc<ApiKeys> {
        ApiKeys::start(self.store.clone(), &secret(), refresh, flush)
            .await
            .unwrap()
    }

    async fn record(&self, id: &str) -> KeyRecord {
        self.admin
            .list(None)
            .await
            .unwrap()
            .into_iter()
            .find(|k| k.id == id)
            .unwrap()
    }
}

/// Wait until an async condition holds, failing after `timeout`.
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs each scenario on the three stores.
macro_rules! on_every_store {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::*;
            #[tokio::test]
            async fn sqlite_file() {
                super::$scenario(&Fixture::sqlite_file().await).await
            }
            #[tokio::test]
            async fn sqlite_memory() {
                super::$scenario(&Fixture::sqlite_memory().await).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$scenario(&Fixture::postgres().await).await
            }
        }
    )*};
}

on_every_store!(
    created_key_verifies_as_its_client,
    tampered_keys_never_verify,
    running_gateway_sees_new_and_revoked_keys,
    expired_key_is_refused_without_a_poll,
    rotation_keeps_old_keys_until_the_grace_ends,
    last_used_is_written_by_flush_not_by_verify,
    management_refuses_bad_arguments,
);

async fn created_key_verifies_as_its_client(f: &Fixture) {
    let (rec, key) = f
        .admin
        .create("team-a", Some("ci"), Some(90 * DAY))
        .await
        .unwrap();
    let key = key.expose();
    assert!(looks_like_key(key));
    assert_eq!(key.len(), KEY_LEN);
    assert!(key.starts_with(&format!("{PREFIX}{}_", rec.id)), "{key}");
    let now = unix_now();
    assert!((now - 2..=now).contains(&rec.created_at));
    assert_eq!(rec.expires_at, Some(rec.created_at + 90 * 86_400));
    assert_eq!(rec.name.as_deref(), Some("ci"));

    let keys = f.gateway(NEVER, NEVER).await;
    let who = keys.verify(key).unwrap();
    assert_eq!(&*who.client, "team-a");
    assert_eq!(&*who.key_id, rec.id);

    // What is stored is the record, and the record holds no key material.
    let stored = f.admin.list(None).await.unwrap();
    assert_eq!(stored, vec![rec.clone()]);
    let secret_part = &key[PREFIX.len() + 9..];
    assert!(!format!("{stored:?}").contains(secret_part));
    assert_ne!(&rec.hmac[..], secret_part.as_bytes().get(..32).unwrap());

    // Another key of the same client is told apart by id.
    let (rec2, key2) = f.admin.create("team-a", None, None).await.unwrap();
    keys.reload().await.unwrap();
    assert_eq!(&*keys.verify(key2.expose()).unwrap().key_id, rec2.id);
    assert_eq!(rec2.expires_at, None);
    assert_eq!(keys.len(), 2);

    // A gateway with another HMAC secret accepts none of them.
    let other = ApiKeys::start(
        f.store.clone(),
        &Secret::new("another-hmac-secret-0123456789abcdef".into()),
        NEVER,
        NEVER,
    )
    .await
    .unwrap();
    assert_eq!(other.verify(key), Err(KeyRejection::Unknown));
}

async fn tampered_keys_never_verify(f: &Fixture) {
    let (rec, key) = f.admin.create("team-a", None, None).await.unwrap();
    let key = key.expose().to_owned();
    let keys = f.gateway(NEVER, NEVER).await;
    assert!(keys.verify(&key).is_ok());

    // The right id with a wrong secret part.
    let wrong = format!("{PREFIX}{}_{}", rec.id, "a".repeat(52));
    assert_eq!(keys.verify(&wrong), Err(KeyRejection::Unknown));
    // An id nobody has.
    let unknown_id = format!("{PREFIX}zzzzzzzz{}", &key[PREFIX.len() + 8..]);
    assert_eq!(keys.verify(&unknown_id), Err(KeyRejection::Unknown));
    // Every one-character change, anywhere in the key.
    for i in 0..key.len() {
        for c in ['a', 'q', '7', 'Z', '_', '-'] {
            let mut t = key.clone().into_bytes();
            if t[i] == c as u8 {
                continue;
            }
            t[i] = c as u8;
            let t = String::from_utf8(t).unwrap();
            assert!(keys.verify(&t).is_err(), "tampered key verified: {t}");
        }
    }
    // Truncated, extended, wrapped, and not keys at all.
    for bad in [
        key[..key.len() - 1].to_owned(),
        format!("{key}a"),
        format!(" {key}"),
        format!("Bearer {key}"),
        key.to_uppercase(),
        String::new(),
        "pcl_demo".into(),
        "sk-proj-0123456789".into(),
    ] {
        let r = keys.verify(&bad);
        assert!(
            matches!(r, Err(KeyRejection::Malformed | KeyRejection::Unknown)),
            "{bad}: {r:?}"
        );
    }
    assert_eq!(keys.verify("pcl_demo"), Err(KeyRejection::Malformed));
    // The key itself still works, and no refusal's message contains it.
    assert!(keys.verify(&key).is_ok());
    for r in [
        KeyRejection::Malformed,
        KeyRejection::Unknown,
        KeyRejection::Expired,
        KeyRejection::Revoked,
    ] {
        assert!(!r.to_string().contains("pcl_"));
    }
}

async fn running_gateway_sees_new_and_revoked_keys(f: &Fixture) {
    let keys = f.gateway(FAST, NEVER).await;
    assert!(keys.is_empty());
    let (rec, key) = f.admin.create("team-a", None, None).await.unwrap();
    let key = key.expose();
    wait_until("the new key is accepted", DEADLINE, || {
        keys.verify(key).is_ok()
    })
    .await;

    let revoked = f.admin.revoke(&rec.id).await.unwrap();
    assert!(revoked.revoked_at.is_some());
    assert_eq!(revoked.status(unix_now()), KeyStatus::Revoked);
    let started = Instant::now();
    wait_until("the revoked key is refused", DEADLINE, || {
        keys.verify(key) == Err(KeyRejection::Revoked)
    })
    .await;
    // Seen at the next poll (50 ms), not eventually; the bound leaves room for slow CI.
    assert!(
        started.elapsed() < FAST * 40,
        "took {:?}",
        started.elapsed()
    );
    // Revoking again keeps the first time.
    let again = f.admin.revoke(&rec.id).await.unwrap();
    assert_eq!(again.revoked_at, revoked.revoked_at);
}

async fn expired_key_is_refused_without_a_poll(f: &Fixture) {
    let (rec, key) = f
        .admin
        .create("team-a", None, Some(Duration::from_secs(1)))
        .await
        .unwrap();
    let key = key.expose();
    assert_eq!(rec.expires_at, Some(rec.created_at + 1));
    // This gateway never polls: expiry is checked against the clock on every verify.
    let keys = f.gateway(NEVER, NEVER).await;
    let first = keys.verify(key);
    assert!(
        matches!(first, Ok(_) | Err(KeyRejection::Expired)),
        "{first:?}"
    );
    wait_until("the key expires", DEADLINE, || {
        keys.verify(key) == Err(KeyRejection::Expired)
    })
    .await;
    assert_eq!(
        f.record(&rec.id).await.status(unix_now()),
        KeyStatus::Expired
    );
}

async fn rotation_keeps_old_keys_until_the_grace_ends(f: &Fixture) {
    let (old, old_key) = f
        .admin
        .create("team-a", Some("v1"), Some(90 * DAY))
        .await
        .unwrap();
    let (other, other_key) = f.admin.create("team-b", None, None).await.unwrap();
    let keys = f.gateway(FAST, NEVER).await;

    let before = unix_now();
    let rot = f
        .admin
        .rotate(
            "team-a",
            Duration::from_secs(3600),
            Some(30 * DAY),
            Some("v2"),
        )
        .await
        .unwrap();
    let after = unix_now();
    assert_eq!(rot.record.client, "team-a");
    assert_eq!(rot.record.name.as_deref(), Some("v2"));
    assert_eq!(
        rot.record.expires_at,
        Some(rot.record.created_at + 30 * 86_400)
    );
    assert_eq!(rot.rolled.len(), 1);
    assert_eq!(rot.rolled[0].id, old.id);
    let grace_end = rot.rolled[0].expires_at.unwrap();
    assert!((before + 3600..=after + 3600).contains(&grace_end));
    assert_eq!(f.record(&old.id).await.expires_at, Some(grace_end));
    assert_eq!(
        f.record(&other.id).await.expires_at,
        None,
        "team-b untouched"
    );

    // Both keys work during the grace period.
    wait_until("the rotated key is accepted", DEADLINE, || {
        keys.verify(rot.key.expose()).is_ok()
    })
    .await;
    assert_eq!(&*keys.verify(old_key.expose()).unwrap().client, "team-a");
    assert!(keys.verify(other_key.expose()).is_ok());

    // A rotation with no grace ends every older key of the client at once.
    let rot2 = f
        .admin
        .rotate("team-a", Duration::ZERO, None, None)
        .await
        .unwrap();
    assert_eq!(rot2.rolled.len(), 2);
    wait_until("older keys expire", DEADLINE, || {
        keys.verify(old_key.expose()) == Err(KeyRejection::Expired)
            && keys.verify(rot.key.expose()) == Err(KeyRejection::Expired)
    })
    .await;
    assert!(keys.verify(rot2.key.expose()).is_ok());
    assert!(keys.verify(other_key.expose()).is_ok());
}

async fn last_used_is_written_by_flush_not_by_verify(f: &Fixture) {
    let (rec, key) = f.admin.create("team-a", None, None).await.unwrap();
    let keys = f.gateway(NEVER, NEVER).await;
    let before = unix_now();
    for _ in 0..100 {
        keys.verify(key.expose()).unwrap();
    }
    assert_eq!(f.record(&rec.id).await.last_used_at, None, "verify wrote");
    let revision = f.store.revision().await.unwrap();

    keys.flush().await.unwrap();
    let used = f.record(&rec.id).await.last_used_at.unwrap();
    assert!((before..=unix_now()).contains(&used));
    assert_eq!(
        f.store.revision().await.unwrap(),
        revision,
        "last_used does not make gateways reload"
    );
    // Nothing pending: a second flush writes nothing.
    keys.flush().await.unwrap();

    // The background task flushes on its own.
    let (rec2, key2) = f.admin.create("team-a", None, None).await.unwrap();
    let flushing = f.gateway(NEVER, FAST).await;
    flushing.verify(key2.expose()).unwrap();
    eventually("the flush task writes last_used", DEADLINE, || async {
        f.record(&rec2.id).await.last_used_at.is_some()
    })
    .await;
}

async fn management_refuses_bad_arguments(f: &Fixture) {
    let (rec, key) = f.admin.create("team-a", None, None).await.unwrap();
    let e = f.admin.revoke("abcdefgh").await.unwrap_err();
    assert!(matches!(e, StoreError::UnknownKey(_)), "{e:?}");
    // Passing the key instead of its id: refused, and the key is not echoed.
    let e = f.admin.revoke(key.expose()).await.unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    assert!(!e.to_string().contains(key.expose()));
    for e in [
        f.admin.create("", None, None).await.unwrap_err(),
        f.admin.create("team a", None, None).await.unwrap_err(),
        f.admin.create("team-a", Some(""), None).await.unwrap_err(),
        f.admin
            .create("team-a", Some("a\nb"), None)
            .await
            .unwrap_err(),
        f.admin
            .create("team-a", None, Some(Duration::ZERO))
            .await
            .unwrap_err(),
        f.admin
            .create("team-a", None, Some(Duration::from_secs(u64::MAX)))
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
    }
    // Nothing was written by the refused calls.
    assert_eq!(f.admin.list(None).await.unwrap(), vec![rec]);
    assert_eq!(f.admin.list(Some("team-b")).await.unwrap(), vec![]);
}

// Replicas: two gateways on one database (not possible with an in-memory database).

async fn two_gateways_see_one_revocation(f: &Fixture) {
    let (rec, key) = f.admin.create("team-a", None, None).await.unwrap();
    let key = key.expose();
    let a = f.gateway(FAST, FAST).await;
    let b = ApiKeys::start(f.replica().await, &secret(), FAST, FAST)
        .await
        .unwrap();
    assert!(a.verify(key).is_ok() && b.verify(key).is_ok());

    // A key created through one replica's store reaches the other.
    let (_, key2) = KeyAdmin::new(f.replica().await, &secret())
        .create("team-b", None, None)
        .await
        .unwrap();
    wait_until("both replicas accept the new key", DEADLINE, || {
        a.verify(key2.expose()).is_ok() && b.verify(key2.expose()).is_ok()
    })
    .await;

    f.admin.revoke(&rec.id).await.unwrap();
    wait_until("both replicas refuse the revoked key", DEADLINE, || {
        a.verify(key) == Err(KeyRejection::Revoked) && b.verify(key) == Err(KeyRejection::Revoked)
    })
    .await;
    // Both flush their last_used into the shared row.
    eventually("last_used written", DEADLINE, || async {
        f.record(&rec.id).await.last_used_at.is_some()
    })
    .await;
}

#[tokio::test]
async fn two_gateways_see_one_revocation_on_postgres() {
    two_gateways_see_one_revocation(&Fixture::postgres().await).await;
}

#[tokio::test]
async fn two_gateways_see_one_revocation_on_an_sqlite_file() {
    two_gateways_see_one_revocation(&Fixture::sqlite_file().await).await;
}

/// PostgreSQL refuses connections for a while: the loaded keys keep working, the uses seen
/// meanwhile are written afterwards, and the poll picks up changes once it is back.
#[tokio::test]
async fn keys_keep_working_while_the_store_is_down() {
    let f = Fixture::postgres().await;
    let Guard::Pg(db) = &f.guard else {
        unreachable!()
    };
    let (rec, key) = f.admin.create("team-a", None, None).await.unwrap();
    let key = key.expose();
    let keys = f.gateway(FAST, FAST).await;

    db.admin_sql(&format!(
        "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS false",
        db.name
    ))
    .await;
    db.admin_sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
        db.name
    ))
    .await;
    assert!(keys.reload().await.is_err(), "the store is down");
    assert!(keys.verify(key).is_ok(), "loaded keys keep working");
    assert!(keys.flush().await.is_err());

    db.admin_sql(&format!(
        "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
        db.name
    ))
    .await;
    eventually(
        "the pending use is written after the outage",
        DEADLINE,
        || async {
            f.admin
                .list(None)
                .await
                .is_ok_and(|l| l[0].last_used_at.is_some())
        },
    )
    .await;
    f.admin.revoke(&rec.id).await.unwrap();
    wait_until("the poll resumed and saw the revocation", DEADLINE, || {
        keys.verify(key) == Err(KeyRejection::Revoked)
    })
    .await;
}

/// `sslmode=require` connects through rustls (the server on this machine has TLS on).
#[tokio::test]
async fn postgres_over_tls() {
    let db = TestDb::create().await;
    let mut admin = db.admin().await;
    let ssl: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    if ssl != "on" {
        eprintln!("skipped: the PostgreSQL server under test has ssl = {ssl}");
        return;
    }
    let sep = if db.url.contains('?') { '&' } else { '?' };
    let store = store::open(&format!("{}{sep}sslmode=require", db.url), ".".as_ref())
        .await
        .unwrap();
    let (_, key) = KeyAdmin::new(store.clone(), &secret())
        .create("team-a", None, None)
        .await
        .unwrap();
    let keys = ApiKeys::start(store, &secret(), NEVER, NEVER)
        .await
        .unwrap();
    assert!(keys.verify(key.expose()).is_ok());
    let all_tls: Option<bool> = sqlx::query_scalar(
        "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = $1 AND a.application_name = 'portcullis'",
    )
    .bind(&db.name)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(all_tls, Some(true), "the store's connections use TLS");
}

#[tokio::test]
async fn sqlite_file_is_created_beside_the_config_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("etc");
    std::fs::create_dir(&base).unwrap();
    let store = store::open("sqlite://keys.db", &base).await.unwrap();
    assert!(base.join("keys.db").exists());
    let (rec, key) = KeyAdmin::new(store.clone(), &secret())
        .create("team-a", None, None)
        .await
        .unwrap();
    store.close().await;

    // Reopened (migrations already applied): the key is still there and still verifies.
    let store = store::open("sqlite://keys.db", &base).await.unwrap();
    let keys = ApiKeys::start(store, &secret(), NEVER, NEVER)
        .await
        .unwrap();
    assert_eq!(&*keys.verify(key.expose()).unwrap().key_id, rec.id);

    // A missing directory is an error naming the file, not a panic.
    let e = match store::open("sqlite://missing/keys.db", &base).await {
        Err(e) => e,
        Ok(_) => panic!("opened a file in a missing directory"),
    };
    assert!(e.to_string().contains("keys.db"), "{e}");
}

/// A store that counts polls, to see the background tasks stop.
struct Counting {
    inner: Arc<dyn KeyStore>,
    revisions: Arc<AtomicUsize>,
}

impl KeyStore for Counting {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn revision(&self) -> BoxFuture<'_, Result<i64, StoreError>> {
        self.revisions.fetch_add(1, Ordering::SeqCst);
        self.inner.revision()
    }
    fn load(&self) -> BoxFuture<'_, Result<KeySet, StoreError>> {
        self.inner.load()
    }
    fn list<'a>(
        &'a self,
        client: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<KeyRecord>, StoreError>> {
        self.inner.list(client)
    }
    fn insert<'a>(&'a self, key: &'a KeyRecord) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.insert(key)
    }
    fn revoke<'a>(
        &'a self,
        id: &'a str,
        now: i64,
    ) -> BoxFuture<'a, Result<Option<KeyRecord>, StoreError>> {
        self.inner.revoke(id, now)
    }
    fn rotate<'a>(
        &'a self,
        new: &'a KeyRecord,
        now: i64,
        grace_until: i64,
    ) -> BoxFuture<'a, Result<Vec<KeyRecord>, StoreError>> {
        self.inner.rotate(new, now, grace_until)
    }
    fn record_last_used<'a>(
        &'a self,
        used: &'a [(Arc<str>, i64)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.record_last_used(used)
    }
    fn close(&self) -> BoxFuture<'_, ()> {
        self.inner.close()
    }
}

#[tokio::test]
async fn background_tasks_end_when_api_keys_is_dropped() {
    let revisions = Arc::new(AtomicUsize::new(0));
    let store = Arc::new(Counting {
        inner: store::open("sqlite::memory:", ".".as_ref()).await.unwrap(),
        revisions: revisions.clone(),
    });
    let keys = ApiKeys::start(store, &secret(), Duration::from_millis(10), NEVER)
        .await
        .unwrap();
    wait_until("the refresh task polls", DEADLINE, || {
        revisions.load(Ordering::SeqCst) >= 3
    })
    .await;
    drop(keys);
    let at_drop = revisions.load(Ordering::SeqCst);
    // Proving that something stops needs some time without it: 20 poll periods.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(revisions.load(Ordering::SeqCst) <= at_drop + 1);
}
