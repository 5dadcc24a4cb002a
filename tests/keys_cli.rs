//! `portcullis keys` through the real binary, on an SQLite file and on PostgreSQL; the
//! keys it prints are checked by the library a gateway uses.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::pg::TestDb;
use portcullis::config::Secret;
use portcullis::identify::api_key::{unix_now, ApiKeys, KeyRejection, KEY_LEN};
use portcullis::store;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const HMAC_SECRET: &str = "cli-test-hmac-secret-0123456789abcdef";
const NEVER: Duration = Duration::from_secs(3600);

/// A config file in its own directory; `extra_store` goes into `[store]`.
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn new(store_url: &str, with_secret: bool) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("portcullis.toml");
        let secret = if with_secret {
            format!("key_hmac_secret = \"{HMAC_SECRET}\"\n")
        } else {
            String::new()
        };
        std::fs::write(
            &config,
            format!(
                r#"[store]
url = "{store_url}"
{secret}
[[clients]]
id = "team-a"
deployments = ["*"]
operations = ["*"]

[[clients]]
id = "team-b"
deployments = ["gpt-4o"]
operations = ["chat"]

[[backends]]
name = "b"
url = "http://127.0.0.1:9"
deployments = {{ "gpt-4o" = "gpt-4o" }}
"#
            ),
        )
        .unwrap();
        Setup { dir, config }
    }

    /// Run `portcullis keys <args> --config <file>` from a directory other than the config's.
    fn keys(&self, args: &[&str]) -> Output {
        let elsewhere = tempfile::tempdir().unwrap();
        Command::new(BIN)
            .arg("keys")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .current_dir(elsewhere.path())
            .output()
            .unwrap()
    }

    /// Run and require success; returns (stdout, stderr).
    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.keys(args);
        let (stdout, stderr) = texts(&out);
        assert!(
            out.status.success(),
            "keys {args:?} failed:\n{stdout}\n{stderr}"
        );
        (stdout, stderr)
    }

    /// Run and require exit code 1 with nothing on stdout; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.keys(args);
        let (stdout, stderr) = texts(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "keys {args:?}:\n{stdout}\n{stderr}"
        );
        assert_eq!(stdout, "");
        stderr
    }

    fn list_json(&self, extra: &[&str]) -> Vec<serde_json::Value> {
        let mut args = vec!["list", "--json"];
        args.extend_from_slice(extra);
        let (stdout, _) = self.ok(&args);
        serde_json::from_str::<serde_json::Value>(&stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8(out.stdout.clone()).unwrap(),
        String::from_utf8(out.stderr.clone()).unwrap(),
    )
}

/// The key printed by `create`/`rotate`: the whole of stdout, one line.
fn printed_key(stdout: &str) -> String {
    let key = stdout.strip_suffix('\n').expect("one line");
    assert!(!key.contains('\n'), "more than the key on stdout: {stdout}");
    assert!(key.starts_with("pcl_") && key.len() == KEY_LEN, "{key}");
    key.to_owned()
}

fn is_rfc3339_utc(v: &serde_json::Value) -> bool {
    let s = v.as_str().unwrap_or("");
    s.len() == 20 && s.ends_with('Z') && s.as_bytes()[10] == b'T'
}

/// A gateway's view of the same store.
async fn gateway(url: &str, base: &Path) -> std::sync::Arc<ApiKeys> {
    let store = store::open(url, base).await.unwrap();
    ApiKeys::start(store, &Secret::new(HMAC_SECRET.into()), NEVER, NEVER)
        .await
        .unwrap()
}

#[tokio::test]
async fn key_lifecycle_on_sqlite() {
    let s = Setup::new("sqlite://keys.db", true);

    let (stdout, stderr) = s.ok(&[
        "create",
        "--client",
        "team-a",
        "--expires",
        "90d",
        "--name",
        "ci",
    ]);
    let key = printed_key(&stdout);
    let id = &key[4..12];
    for part in [id, "team-a", "ci", "only time the key is shown"] {
        assert!(stderr.contains(part), "{part} missing from: {stderr}");
    }
    assert!(!stderr.contains(&key));
    assert!(
        s.dir.path().join("keys.db").exists(),
        "relative to the config file"
    );

    let list = s.list_json(&[]);
    assert_eq!(list.len(), 1);
    let k = &list[0];
    assert_eq!(k["id"], id);
    assert_eq!(k["client"], "team-a");
    assert_eq!(k["name"], "ci");
    assert!(is_rfc3339_utc(&k["created"]) && is_rfc3339_utc(&k["expires"]));
    assert!(k["last_used"].is_null() && k["revoked"].is_null());

    // The key the CLI printed is the one a gateway accepts, and expires in 90 days.
    let keys = gateway("sqlite://keys.db", s.dir.path()).await;
    let who = keys.verify(&key).unwrap();
    assert_eq!((&*who.client, &*who.key_id), ("team-a", id));
    let store = store::open("sqlite://keys.db", s.dir.path()).await.unwrap();
    let rec = store.list(None).await.unwrap().remove(0);
    assert_eq!(rec.expires_at, Some(rec.created_at + 90 * 86_400));
    keys.flush().await.unwrap();

    // Rotate: a new key, and the old one now ends within the grace period.
    let (stdout, stderr) = s.ok(&["rotate", "--client", "team-a", "--grace", "1h"]);
    let new_key = printed_key(&stdout);
    assert_ne!(new_key, key);
    assert!(stderr.contains(id), "mentions the older key: {stderr}");
    let after_rotate = unix_now();
    let old = store
        .list(None)
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.id == id)
        .unwrap();
    let grace_end = old.expires_at.unwrap();
    assert!((after_rotate + 3600 - 5..=after_rotate + 3600).contains(&grace_end));
    keys.reload().await.unwrap();
    assert!(keys.verify(&key).is_ok() && keys.verify(&new_key).is_ok());

    // Neither listing ever shows a key (nor the stored HMAC).
    let (table, _) = s.ok(&["list"]);
    let (json, _) = s.ok(&["list", "--json"]);
    for out in [&table, &json] {
        assert!(!out.contains(&key) && !out.contains(&new_key), "{out}");
        assert!(!out.contains(&key[13..]) && !out.contains(&new_key[13..]));
        assert!(!out.to_lowercase().contains("hmac"));
    }
    assert!(table.starts_with("ID"), "{table}");
    for col in ["CLIENT", "NAME", "CREATED", "EXPIRES", "LAST USED"] {
        assert!(table.lines().next().unwrap().contains(col), "{table}");
    }
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains(id) && table.contains(&new_key[4..12]));
    let listed = s.list_json(&[]);
    assert!(listed
        .iter()
        .any(|k| k["id"] == id && !k["last_used"].is_null()));
    assert_eq!(s.list_json(&["--client", "team-b"]).len(), 0);
    assert_eq!(s.list_json(&["--client", "team-a"]).len(), 2);

    // Revoke: the gateway refuses the key at its next load.
    let (stdout, stderr) = s.ok(&["revoke", id]);
    assert_eq!(stdout, "");
    assert!(
        stderr.contains("revoked") && stderr.contains(id),
        "{stderr}"
    );
    keys.reload().await.unwrap();
    assert_eq!(keys.verify(&key), Err(KeyRejection::Revoked));
    assert!(keys.verify(&new_key).is_ok());
    let revoked = s
        .list_json(&[])
        .into_iter()
        .find(|k| k["id"] == id)
        .unwrap();
    assert!(is_rfc3339_utc(&revoked["revoked"]));

    let err = s.fails(&["revoke", "abcdefgh"]);
    assert!(err.contains("no API key has the id 'abcdefgh'"), "{err}");
    let err = s.fails(&["revoke", &new_key]);
    assert!(!err.contains(&new_key), "the key is never echoed: {err}");
}

#[tokio::test]
async fn key_lifecycle_on_postgres() {
    let db = TestDb::create().await;
    let s = Setup::new(&db.url, true);

    let (stdout, _) = s.ok(&["create", "--client", "team-b", "--name", "batch"]);
    let key = printed_key(&stdout);
    let id = &key[4..12];
    let list = s.list_json(&[]);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["client"], "team-b");
    assert!(list[0]["expires"].is_null());
    let keys = gateway(&db.url, s.dir.path()).await;
    assert_eq!(&*keys.verify(&key).unwrap().client, "team-b");

    let (stdout, _) = s.ok(&["rotate", "--client", "team-b", "--expires", "30d"]);
    let new_key = printed_key(&stdout);
    let (table, _) = s.ok(&["list"]);
    assert!(!table.contains(&key) && !table.contains(&new_key));

    s.ok(&["revoke", id]);
    let list = s.list_json(&[]);
    let revoked = list.iter().find(|k| k["id"] == id).unwrap();
    assert!(is_rfc3339_utc(&revoked["revoked"]));
    keys.reload().await.unwrap();
    assert_eq!(keys.verify(&key), Err(KeyRejection::Revoked));
    assert!(keys.verify(&new_key).is_ok());
    assert!(s.fails(&["revoke", "zzzzzzzz"]).contains("no API key"));
}

#[test]
fn unknown_clients_are_refused() {
    let s = Setup::new("sqlite://keys.db", true);
    for args in [
        &["create", "--client", "team-c"][..],
        &["rotate", "--client", "team-c"][..],
    ] {
        let err = s.fails(args);
        assert!(
            err.contains("no [[clients]] entry has the id 'team-c'"),
            "{err}"
        );
    }
    assert!(
        !s.dir.path().join("keys.db").exists(),
        "refused before opening the store"
    );
}

#[test]
fn every_keys_command_needs_the_hmac_secret() {
    let s = Setup::new("sqlite://keys.db", false);
    for args in [
        &["create", "--client", "team-a"][..],
        &["list"][..],
        &["revoke", "abcdefgh"][..],
        &["rotate", "--client", "team-a"][..],
    ] {
        let err = s.fails(args);
        assert!(err.contains("store.key_hmac_secret"), "{args:?}: {err}");
    }
}

#[test]
fn an_invalid_config_is_refused_with_its_problems() {
    let s = Setup::new("sqlite://keys.db", true);
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(
        &s.config,
        text.replace("[store]", "[store]\nrefresh = \"1s\""),
    )
    .unwrap();
    let err = s.fails(&["list"]);
    assert!(
        err.contains("invalid configuration") && err.contains("store.refresh"),
        "{err}"
    );
}

#[test]
fn an_unreachable_store_is_an_error_without_the_password() {
    let s = Setup::new("postgres://app:hunter2-secret@127.0.0.1:1/keys", true);
    let err = s.fails(&["list"]);
    assert!(err.contains("cannot open the store"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
}
