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
    /// A config for a real gateway in front of the simulator at `sim_url`, polling the
    /// store every 100 ms and writing last-used times every 200 ms.
    fn serving(store_url: &str, sim_url: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("portcullis.toml");
        std::fs::write(
            &config,
            format!(
                r#"[server]
listen = "127.0.0.1:0"
[admin]
listen = ""
[audit]
path = "audit.log"
[store]
url = "{store_url}"
key_hmac_secret = "{HMAC_SECRET}"
refresh_interval = "100ms"
last_used_flush = "200ms"

[[clients]]
id = "team-b"
deployments = ["gpt-4o"]
operations = ["chat"]

[[backends]]
name = "sim"
url = "{sim_url}"
deployments = {{ "gpt-4o" = "gpt-4o", "text-embedding-3-small" = "emb" }}
[backends.auth]
type = "api_key"
key = "{}"
"#,
                common::BACKEND_KEY
            ),
        )
        .unwrap();
        Setup { dir, config }
    }

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

/// Status and error code of a chat call with `key` in the `api-key` header.
async fn call(url: &str, key: &str, model: &str) -> (u16, String) {
    let path = if model.starts_with("text-embedding") {
        "embeddings"
    } else {
        "chat/completions"
    };
    let resp = common::http()
        .post(format!("{url}/openai/deployments/{model}/{path}?api-version=2024-10-21"))
        .header("api-key", key)
        .json(&serde_json::json!({ "messages": [{ "role": "user", "content": "hi" }], "input": "hi" }))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.unwrap();
    (status, v["error"]["code"].as_str().unwrap_or("").to_owned())
}

/// The whole key lifecycle through the CLI against a running gateway on `store_url`.
async fn lifecycle_through_a_running_gateway(store_url: &str) {
    let sim = common::sim().await;
    let s = Setup::serving(store_url, &sim.url());
    let (stdout, _) = s.ok(&["create", "--client", "team-b", "--name", "first"]);
    let old = printed_key(&stdout);
    let v = portcullis::config::load_file(&s.config).unwrap();
    let running = portcullis::app::start(&v).await.unwrap();
    let url = format!("http://{}", running.addr);

    // Issued before start: accepted, for what its client may call only.
    assert_eq!(call(&url, &old, "gpt-4o").await, (200, String::new()));
    assert_eq!(
        call(&url, &old, "text-embedding-3-small").await,
        (403, "client_not_allowed".into())
    );
    // Issued while running: accepted within the poll interval.
    let (stdout, _) = s.ok(&["rotate", "--client", "team-b", "--grace", "1h"]);
    let new = printed_key(&stdout);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while call(&url, &new, "gpt-4o").await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "new key never accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        call(&url, &old, "gpt-4o").await.0,
        200,
        "old key works during the grace"
    );

    // Revoked while running: refused as soon as the gateway polls.
    s.ok(&["revoke", &old[4..12]]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while call(&url, &old, "gpt-4o").await != (401, "invalid_token".to_owned()) {
        assert!(
            std::time::Instant::now() < deadline,
            "revoked key still accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(call(&url, &new, "gpt-4o").await.0, 200);

    // Expiring: accepted until its expiry, refused right after (no poll needed).
    let (stdout, _) = s.ok(&["create", "--client", "team-b", "--expires", "3s"]);
    let short = printed_key(&stdout);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while call(&url, &short, "gpt-4o").await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "short key never accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while call(&url, &short, "gpt-4o").await != (401, "invalid_token".to_owned()) {
        assert!(
            std::time::Instant::now() < deadline,
            "expired key still accepted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Uses reach `keys list` (batched by the gateway), never the keys themselves.
    let new_id = &new[4..12];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = s.list_json(&[]);
        let k = list.iter().find(|k| k["id"] == new_id).unwrap();
        if is_rfc3339_utc(&k["last_used"]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "last_used never written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    running.shutdown();
    running.wait().await;
    let audit = std::fs::read_to_string(s.dir.path().join("audit.log")).unwrap();
    for key in [&old, &new, &short] {
        assert!(!audit.contains(key.as_str()));
    }
    assert!(audit.contains(&format!("\"key_id\":\"{new_id}\"")));
    assert!(sim
        .captured()
        .iter()
        .all(|r| r.headers["api-key"] == common::BACKEND_KEY));
}

// Multi-threaded: the `keys` commands run as blocking child processes from the test body,
// while the in-process gateway's store tasks (key refresh, the `last_used` flush) must keep
// running. On a one-thread runtime a flush caught between its UPDATE and its COMMIT would hold
// the row lock while `keys revoke` waited for it, and neither would ever finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_through_a_running_gateway_on_sqlite() {
    lifecycle_through_a_running_gateway("sqlite://keys.db").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_through_a_running_gateway_on_postgres() {
    let db = TestDb::create().await;
    lifecycle_through_a_running_gateway(&db.url).await;
}
