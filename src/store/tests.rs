//! Store unit tests on in-memory SQLite (the PostgreSQL backend runs the same SQL and is
//! exercised in `tests/keys.rs`).

use std::path::Path;
use std::sync::Arc;

use super::*;

fn record(id: &str, client: &str, created_at: i64, expires_at: Option<i64>) -> KeyRecord {
    KeyRecord {
        id: id.into(),
        client: client.into(),
        name: None,
        hmac: [7; 32],
        created_at,
        expires_at,
        revoked_at: None,
        last_used_at: None,
    }
}

async fn memory() -> Arc<dyn KeyStore> {
    open("sqlite::memory:", Path::new(".")).await.unwrap()
}

#[tokio::test]
async fn every_mutation_bumps_the_revision_and_last_used_does_not() {
    let s = memory().await;
    assert_eq!(s.backend(), "sqlite");
    let r0 = s.revision().await.unwrap();
    s.insert(&record("aaaaaaaa", "a", 100, None)).await.unwrap();
    let r1 = s.revision().await.unwrap();
    assert!(r1 > r0);
    s.rotate(&record("bbbbbbbb", "a", 200, None), 200, 300)
        .await
        .unwrap();
    let r2 = s.revision().await.unwrap();
    assert!(r2 > r1);
    assert!(s.revoke("aaaaaaaa", 250).await.unwrap().is_some());
    let r3 = s.revision().await.unwrap();
    assert!(r3 > r2);
    s.record_last_used(&[(Arc::from("bbbbbbbb"), 260)])
        .await
        .unwrap();
    assert_eq!(s.revision().await.unwrap(), r3);
    // Revoking nothing changes nothing.
    assert!(s.revoke("zzzzzzzz", 270).await.unwrap().is_none());
    assert_eq!(s.revision().await.unwrap(), r3);
    let set = s.load().await.unwrap();
    assert_eq!(set.revision, r3);
    assert_eq!(set.keys.len(), 2);
}

#[tokio::test]
async fn duplicate_ids_are_refused_and_change_nothing() {
    let s = memory().await;
    s.insert(&record("aaaaaaaa", "a", 100, None)).await.unwrap();
    let r = s.revision().await.unwrap();
    let e = s
        .insert(&record("aaaaaaaa", "b", 101, None))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::DuplicateId), "{e:?}");
    assert_eq!(s.revision().await.unwrap(), r);
    assert_eq!(s.list(None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn revoke_keeps_the_first_time() {
    let s = memory().await;
    s.insert(&record("aaaaaaaa", "a", 100, None)).await.unwrap();
    let first = s.revoke("aaaaaaaa", 150).await.unwrap().unwrap();
    assert_eq!(first.revoked_at, Some(150));
    let again = s.revoke("aaaaaaaa", 160).await.unwrap().unwrap();
    assert_eq!(again.revoked_at, Some(150));
    assert_eq!(again.status(170), KeyStatus::Revoked);
}

#[tokio::test]
async fn rotate_shortens_only_the_clients_other_active_keys() {
    let s = memory().await;
    s.insert(&record("old00000", "a", 100, None)).await.unwrap();
    s.insert(&record("soon0000", "a", 101, Some(1_100)))
        .await
        .unwrap();
    s.insert(&record("late0000", "a", 102, Some(9_000)))
        .await
        .unwrap();
    s.insert(&record("gone0000", "a", 103, Some(900)))
        .await
        .unwrap();
    s.insert(&record("revk0000", "a", 104, None)).await.unwrap();
    s.revoke("revk0000", 105).await.unwrap();
    s.insert(&record("other000", "b", 106, None)).await.unwrap();

    let rolled = s
        .rotate(&record("new00000", "a", 1_000, None), 1_000, 1_200)
        .await
        .unwrap();
    let ids: Vec<&str> = rolled.iter().map(|k| k.id.as_str()).collect();
    assert_eq!(ids, ["old00000", "soon0000", "late0000"]);

    let all = s.list(None).await.unwrap();
    let exp = |id: &str| all.iter().find(|k| k.id == id).unwrap().expires_at;
    assert_eq!(exp("old00000"), Some(1_200));
    assert_eq!(exp("soon0000"), Some(1_100), "an earlier expiry is kept");
    assert_eq!(exp("late0000"), Some(1_200));
    assert_eq!(exp("gone0000"), Some(900), "already expired: untouched");
    assert_eq!(exp("revk0000"), None, "revoked: untouched");
    assert_eq!(exp("other000"), None, "another client: untouched");
    assert_eq!(exp("new00000"), None, "the new key: untouched");
    assert_eq!(s.list(Some("b")).await.unwrap().len(), 1);
}

#[tokio::test]
async fn last_used_only_moves_forward() {
    let s = memory().await;
    s.insert(&record("aaaaaaaa", "a", 100, None)).await.unwrap();
    let id: Arc<str> = Arc::from("aaaaaaaa");
    s.record_last_used(&[(id.clone(), 500)]).await.unwrap();
    s.record_last_used(&[(id.clone(), 400)]).await.unwrap();
    assert_eq!(s.list(None).await.unwrap()[0].last_used_at, Some(500));
    // Unknown ids are ignored.
    s.record_last_used(&[(Arc::from("zzzzzzzz"), 600)])
        .await
        .unwrap();
}

#[tokio::test]
async fn memory_databases_are_separate() {
    let a = memory().await;
    let b = memory().await;
    a.insert(&record("aaaaaaaa", "a", 100, None)).await.unwrap();
    assert_eq!(a.list(None).await.unwrap().len(), 1);
    assert!(b.list(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_closed_store_is_unavailable() {
    let s = memory().await;
    s.close().await;
    let e = s.revision().await.unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
}

#[tokio::test]
async fn postgres_errors_never_show_the_password() {
    // Nothing listens on port 1; the error must still not echo the password.
    let e = match open(
        "postgres://app:hunter2-very-secret@127.0.0.1:1/keys?connect_timeout=2",
        Path::new("."),
    )
    .await
    {
        Err(e) => e,
        Ok(_) => panic!("opened a database on port 1"),
    };
    for text in [e.to_string(), format!("{e:?}")] {
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("app:***@127.0.0.1:1"), "{text}");
        assert!(text.contains("refused"), "the cause is shown: {text}");
    }
    let e = match open(
        "postgres://app:hunter2@127.0.0.1:1/keys?bogus=1",
        Path::new("."),
    )
    .await
    {
        Err(e) => e,
        Ok(_) => panic!("opened a database with a bogus option"),
    };
    assert!(!format!("{e} {e:?}").contains("hunter2"), "{e:?}");
}

#[tokio::test]
async fn unknown_schemes_are_refused() {
    let e = match open("mysql://root:pw@localhost/x", Path::new(".")).await {
        Err(e) => e,
        Ok(_) => panic!("opened mysql"),
    };
    assert!(matches!(e, StoreError::Url { .. }));
    assert!(!e.to_string().contains(":pw@"), "{e}");
}
