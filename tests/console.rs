//! The admin API against a running gateway: every endpoint × a token without and with its
//! scope, keys created, rotated and revoked through the API and used (or refused) by the
//! gateway at once, usage figures equal to what the test sent, what remains of a limit,
//! the audit line of every admin request (the token's name, never the token), and
//! `portcullis keys` on a machine that has none of the backends' secrets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{chat_body, http, sim, Gateway};
use serde_json::{json, Value};

const READER: &str = "reader-token-0123456789abcdef";
const KEYER: &str = "keyer-token-0123456789abcdef";
const OPS: &str = "ops-token-0123456789abcdef";
const WRONG: &str = "wrong-token-0123456789abcdef";

fn identity() -> String {
    format!(
        r#"[[admin.tokens]]
name = "reader"
token = "{READER}"
scopes = ["read"]
[[admin.tokens]]
name = "keyer"
token = "{KEYER}"
scopes = ["keys"]
[[admin.tokens]]
name = "ops"
token = "{OPS}"
scopes = ["read", "keys", "config"]
[[clients]]
id = "app"
deployments = ["*"]
operations = ["*"]
requests_per_minute = 10
[[clients]]
id = "other"
deployments = ["*"]
operations = ["*"]
"#
    )
}

async fn start() -> (portcullis::sim::SimHandle, Gateway) {
    let s = sim().await;
    let b = common::backend(
        "sim",
        &s.url(),
        "azure",
        "api_version = \"2024-06-01\"\ndeployments = { \"gpt-4o\" = \"gpt-4o-ptu\" }\n",
    );
    let g = Gateway::start_with("", &identity(), &b).await;
    (s, g)
}

async fn call(
    g: &Gateway,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("{}{path}", g.admin_url);
    let mut req = http().request(method.parse().unwrap(), url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn chat_with_key(g: &Gateway, key: &str) -> reqwest::Response {
    http()
        .post(format!("{}/v1/chat/completions", g.url))
        .header("api-key", key)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn every_endpoint_needs_its_scope_and_every_admin_request_is_audited_by_name() {
    let (_s, g) = start().await;
    // (method, path, body, the token that has the scope, one that does not)
    let cases: Vec<(&str, &str, Option<Value>, &str, &str)> = vec![
        ("GET", "/admin/clients", None, READER, KEYER),
        ("GET", "/admin/clients/app", None, READER, KEYER),
        ("GET", "/admin/keys", None, READER, KEYER),
        (
            "POST",
            "/admin/keys",
            Some(json!({ "client": "app" })),
            KEYER,
            READER,
        ),
        (
            "POST",
            "/admin/keys/rotate",
            Some(json!({ "client": "other" })),
            KEYER,
            READER,
        ),
        ("DELETE", "/admin/keys/aaaaaaaa", None, KEYER, READER),
        ("GET", "/admin/usage", None, READER, KEYER),
        ("GET", "/admin/usage/series", None, READER, KEYER),
        ("GET", "/admin/usage/chart.svg", None, READER, KEYER),
        ("GET", "/admin/refusals", None, READER, KEYER),
        ("GET", "/admin/refusals/chart.svg", None, READER, KEYER),
        ("GET", "/admin/backends", None, READER, KEYER),
        ("POST", "/admin/reload", None, OPS, READER),
        ("GET", "/metrics", None, READER, KEYER),
    ];
    for (method, path, body, with, without) in &cases {
        let (s, v) = call(&g, method, path, None, body.clone()).await;
        assert_eq!(s, 401, "{method} {path} without a token: {v}");
        assert_eq!(v["error"]["code"], "missing_credentials", "{v}");
        let (s, v) = call(&g, method, path, Some(WRONG), body.clone()).await;
        assert_eq!(s, 401, "{method} {path} with a wrong token");
        assert_eq!(v["error"]["code"], "invalid_admin_token", "{v}");
        let (s, v) = call(&g, method, path, Some(without), body.clone()).await;
        assert_eq!(s, 403, "{method} {path} without the scope: {v}");
        assert_eq!(v["error"]["code"], "insufficient_scope", "{v}");
        let (s, v) = call(&g, method, path, Some(with), body.clone()).await;
        assert!(
            !matches!(s, 401 | 403) && s < 500 || (*path == "/admin/reload" && s == 422),
            "{method} {path} with the scope: {s} {v}"
        );
    }
    // whoami needs any valid token, and says which.
    let (s, v) = call(&g, "GET", "/admin/whoami", Some(KEYER), None).await;
    assert_eq!((s, &v["name"]), (200, &json!("keyer")), "{v}");
    assert_eq!(v["scopes"], json!(["keys"]));
    assert_eq!(call(&g, "GET", "/admin/whoami", None, None).await.0, 401);

    // One audit line per admin request: 14 endpoints × 4, and the two whoami calls.
    let deadline = Instant::now() + Duration::from_secs(5);
    let admin_lines = loop {
        let lines: Vec<Value> = g
            .audit()
            .into_iter()
            .filter(|l| l["kind"] == "admin")
            .collect();
        if lines.len() >= cases.len() * 4 + 2 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(admin_lines.len(), cases.len() * 4 + 2);
    let refused_by_name = |name: &str| {
        admin_lines
            .iter()
            .filter(|l| l["admin_token"] == name && l["decision"] == "refused")
            .count()
    };
    assert_eq!(
        refused_by_name("reader"),
        4,
        "reader lacks keys thrice and config once"
    );
    assert_eq!(refused_by_name("keyer"), cases.len() - 4);
    let anonymous = admin_lines
        .iter()
        .filter(|l| l["admin_token"].is_null())
        .count();
    assert_eq!(
        anonymous,
        cases.len() * 2 + 1,
        "no token and wrong token are unnamed"
    );
    let text = std::fs::read_to_string(&g.audit_path).unwrap();
    for secret in [READER, KEYER, OPS, WRONG] {
        assert!(!text.contains(secret), "a token reached the audit log");
    }
    let create = admin_lines
        .iter()
        .find(|l| l["path"] == "/admin/keys" && l["method"] == "POST" && l["status"] == 201)
        .unwrap();
    assert_eq!(create["detail"]["action"], "create");
    assert_eq!(create["detail"]["client"], "app");
    assert!(create["detail"].get("key").is_none());
}

#[tokio::test]
async fn a_key_created_through_the_api_works_at_once_and_a_revoked_one_stops_at_once() {
    let (_s, g) = start().await;
    let (s, created) = call(
        &g,
        "POST",
        "/admin/keys",
        Some(OPS),
        Some(json!({ "client": "app", "name": "batch job", "expires_in": "30d" })),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["client"], "app");
    assert_eq!(created["status"], "active");
    assert!(created["expires"].is_string());
    // Accepted on the very next request: no waiting for the poll.
    let r = chat_with_key(&g, &key).await;
    assert_eq!(r.status(), 200);

    // Listed, without the key.
    let (_, list) = call(&g, "GET", "/admin/keys?client=app", Some(READER), None).await;
    let text = list.to_string();
    assert!(text.contains(&id) && !text.contains(&key), "{text}");
    assert_eq!(list["data"].as_array().unwrap().len(), 1);

    // Rotation: a new key works at once, the old one until the grace ends.
    let (s, rot) = call(
        &g,
        "POST",
        "/admin/keys/rotate",
        Some(OPS),
        Some(json!({ "client": "app", "grace": "1h" })),
    )
    .await;
    assert_eq!(s, 201, "{rot}");
    let new_key = rot["key"].as_str().unwrap().to_owned();
    assert_eq!(rot["rolled"][0]["id"], id.as_str());
    assert_eq!(chat_with_key(&g, &new_key).await.status(), 200);
    assert_eq!(chat_with_key(&g, &key).await.status(), 200);

    // Revoked: refused by the next request.
    let (s, revoked) = call(&g, "DELETE", &format!("/admin/keys/{id}"), Some(OPS), None).await;
    assert_eq!(s, 200, "{revoked}");
    assert_eq!(revoked["status"], "revoked");
    assert_eq!(chat_with_key(&g, &key).await.status(), 401);
    assert_eq!(chat_with_key(&g, &new_key).await.status(), 200);

    // Neither key ever reached the audit log.
    let audit = std::fs::read_to_string(&g.audit_path).unwrap();
    assert!(!audit.contains(&key) && !audit.contains(&new_key));

    // Mistakes get precise errors.
    let (s, v) = call(
        &g,
        "POST",
        "/admin/keys",
        Some(OPS),
        Some(json!({ "client": "nobody" })),
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("client_not_found"))
    );
    let (s, v) = call(
        &g,
        "POST",
        "/admin/keys",
        Some(OPS),
        Some(json!({ "client": "app", "expires_in": "soon" })),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("expires_in"));
    let (s, _) = call(
        &g,
        "POST",
        "/admin/keys",
        Some(OPS),
        Some(json!({ "client": "app", "admin": true })),
    )
    .await;
    assert_eq!(s, 400);
    let (s, v) = call(&g, "DELETE", "/admin/keys/zzzzzzzz", Some(OPS), None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("key_not_found")),
        "{v}"
    );
    let (s, _) = call(
        &g,
        "DELETE",
        &format!("/admin/keys/{}", urlencode(&new_key)),
        Some(OPS),
        None,
    )
    .await;
    assert_eq!(s, 400, "a key instead of its id is refused");
    let r = http()
        .post(format!("{}/admin/keys", g.admin_url))
        .bearer_auth(OPS)
        .header("content-type", "text/plain")
        .body("client=app")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
}

fn urlencode(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

#[tokio::test]
async fn usage_and_remaining_limits_equal_what_the_test_sent() {
    let (_s, g) = start().await;
    let key = g.issue_key("app").await;
    let mut tokens = 0;
    for _ in 0..3 {
        let r = chat_with_key(&g, &key).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        tokens += v["usage"]["total_tokens"].as_i64().unwrap();
    }
    // What the rate limit has left: 10 per minute, 3 used.
    let (s, client) = call(&g, "GET", "/admin/clients/app", Some(READER), None).await;
    assert_eq!(s, 200, "{client}");
    let rpm = &client["limits"][0];
    assert_eq!(rpm["kind"], "requests_per_minute");
    assert_eq!(
        (rpm["limit"].as_f64(), rpm["remaining"].as_f64()),
        (Some(10.0), Some(7.0)),
        "{client}"
    );
    assert_eq!(client["counters"], "memory");
    // Reading it charged nothing.
    let (_, again) = call(&g, "GET", "/admin/clients/app", Some(READER), None).await;
    assert_eq!(again["limits"][0]["remaining"].as_f64(), Some(7.0));

    // The usage records arrive in batches: wait for them, with a deadline.
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let (s, v) = call(
            &g,
            "GET",
            "/admin/usage?by=client&since=1h",
            Some(READER),
            None,
        )
        .await;
        assert_eq!(s, 200, "{v}");
        if v["data"][0]["requests"] == 3 || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let row = &report["data"][0];
    assert_eq!(row["key"], "app");
    assert_eq!(row["requests"], 3, "{report}");
    assert_eq!(row["total_tokens"].as_i64(), Some(tokens));

    let (s, series) = call(
        &g,
        "GET",
        "/admin/usage/series?since=1h&split=client&metric=tokens&buckets=12",
        Some(READER),
        None,
    )
    .await;
    assert_eq!(s, 200, "{series}");
    assert_eq!(series["buckets"].as_array().unwrap().len(), 12);
    assert_eq!(series["series"][0]["name"], "app");
    assert_eq!(series["series"][0]["total"].as_f64(), Some(tokens as f64));

    let r = http()
        .get(format!(
            "{}/admin/usage/chart.svg?since=1h&split=client",
            g.admin_url
        ))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
    let svg = r.text().await.unwrap();
    assert!(
        svg.starts_with("<svg")
            && svg.contains(">app<")
            && svg.contains("<title>app · ")
            && svg.contains("· 3</title>"),
        "{svg}"
    );

    // A refusal is counted by reason.
    let r = chat_with_key(&g, "pcl_aaaaaaaa_nottherightsecretatallxxxxxxxxxxxx").await;
    assert_eq!(r.status(), 401);
    let (_, refusals) = call(&g, "GET", "/admin/refusals?since=1h", Some(READER), None).await;
    assert_eq!(refusals["total"], 1, "{refusals}");
    assert_eq!(refusals["by_reason"][0]["status"], 401);

    let (s, v) = call(&g, "GET", "/admin/usage?since=tomorrow", Some(READER), None).await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = call(
        &g,
        "GET",
        "/admin/usage/series?buckets=0",
        Some(READER),
        None,
    )
    .await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn the_dashboard_and_the_api_document_are_served_without_a_token_and_hold_no_secret() {
    let (_s, g) = start().await;
    let r = http()
        .get(format!("{}/dashboard/", g.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    let page = r.text().await.unwrap();
    for secret in [
        READER,
        KEYER,
        OPS,
        common::STORE_SECRET,
        common::BACKEND_KEY,
    ] {
        assert!(!page.contains(secret));
    }
    let r = http()
        .get(format!("{}/admin/openapi.json", g.admin_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let (_, backends) = call(&g, "GET", "/admin/backends", Some(READER), None).await;
    assert!(!backends.to_string().contains(common::BACKEND_KEY));
}

#[test]
fn keys_commands_need_only_the_store_and_the_client_ids() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("portcullis.toml");
    // The backend's key and the Azure workload-identity environment are missing here, as
    // on an operator's laptop.
    std::fs::write(
        &config,
        r#"[store]
url = "sqlite://keys.db"
key_hmac_secret = "cli-console-hmac-secret-0123456789abcdef"
[[clients]]
id = "app"
deployments = ["*"]
[[backends]]
name = "ptu"
url = "https://example.openai.azure.com"
type = "azure"
deployments = { "gpt-4o" = "gpt-4o" }
[backends.auth]
type = "api_key"
key = "${PORTCULLIS_TEST_MISSING_BACKEND_KEY}"
[[backends]]
name = "paygo"
url = "https://example2.openai.azure.com"
type = "azure"
deployments = { "gpt-4o" = "gpt-4o" }
[backends.auth]
type = "workload_identity"
"#,
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let run = |args: &[&str]| {
        let mut c = Command::new(bin);
        c.args(args).arg("--config").arg(&config);
        for v in [
            "PORTCULLIS_TEST_MISSING_BACKEND_KEY",
            "AZURE_CLIENT_ID",
            "AZURE_TENANT_ID",
            "AZURE_FEDERATED_TOKEN_FILE",
            "AZURE_AUTHORITY_HOST",
            "IDENTITY_ENDPOINT",
        ] {
            c.env_remove(v);
        }
        c.output().unwrap()
    };
    // The full check still names what serving would need.
    let check = run(&["check"]);
    assert!(!check.status.success());
    let out = run(&["keys", "create", "--client", "app"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = String::from_utf8(out.stdout).unwrap();
    assert!(key.trim().starts_with("pcl_"), "{key}");
    let out = run(&["keys", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["client"], "app");
    let id = list[0]["id"].as_str().unwrap().to_owned();
    let out = run(&["keys", "rotate", "--client", "app"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["keys", "revoke", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["keys", "create", "--client", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nobody"));
    let out = run(&["usage", "--by", "client"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Python interpreter of the test venv (scripts/test.sh installs schemathesis in it).
fn schemathesis() -> std::path::PathBuf {
    let python = std::env::var("PORTCULLIS_PYTHON").map_or_else(
        |_| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"),
        std::path::PathBuf::from,
    );
    let bin = python.with_file_name("schemathesis");
    assert!(
        bin.exists(),
        "no schemathesis at {}: run scripts/test.sh (it installs it in .venv) or set PORTCULLIS_PYTHON",
        bin.display()
    );
    bin
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_undocumented_status_or_schema_mismatch() {
    let (_s, g) = start().await;
    let bin = schemathesis();
    let admin = g.admin_url.clone();
    // schemathesis keeps a cache in its working directory: not in the checkout.
    let work = tempfile::tempdir().unwrap();
    let cwd = work.path().to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .current_dir(cwd)
            .args(["run", &format!("{admin}/admin/openapi.json"), "--url", &admin])
            .args(["-H", &format!("Authorization: Bearer {OPS}")])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance",
            ])
            .args(["--max-examples", "25", "--generation-deterministic", "--no-color"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It reached the API: every operation was tested, with thousands of cases.
    assert!(report.contains("Tested: 17"), "{report}");
    // And the gateway stayed whole.
    let (s, _) = call(&g, "GET", "/admin/whoami", Some(OPS), None).await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn without_admin_tokens_only_what_was_open_before_answers() {
    let s = sim().await;
    let b = common::backend(
        "sim",
        &s.url(),
        "azure",
        "deployments = { \"gpt-4o\" = \"gpt-4o\" }\n",
    );
    let g = Gateway::start_with(
        "",
        "[[clients]]\nid = \"app\"\ndeployments = [\"*\"]\noperations = [\"*\"]\n",
        &b,
    )
    .await;
    assert_eq!(call(&g, "GET", "/admin/backends", None, None).await.0, 200);
    assert_eq!(call(&g, "GET", "/metrics", None, None).await.0, 200);
    for (method, path, body) in [
        ("GET", "/admin/clients", None),
        ("GET", "/admin/usage", None),
        ("GET", "/admin/keys", None),
        ("GET", "/admin/whoami", None),
        ("POST", "/admin/keys", Some(json!({ "client": "app" }))),
    ] {
        let (status, v) = call(&g, method, path, None, body).await;
        assert_eq!(status, 401, "{method} {path}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("[[admin.tokens]]"),
            "{v}"
        );
    }
    // The API's own 404s are audited too, and a key pasted into a path is not written.
    let (status, _) = call(
        &g,
        "GET",
        "/admin/keys/pcl_abcdefgh_secretsecret/x",
        None,
        None,
    )
    .await;
    assert_eq!(status, 404);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines: Vec<Value> = g
            .audit()
            .into_iter()
            .filter(|l| l["kind"] == "admin")
            .collect();
        if lines.iter().any(|l| l["status"] == 404) {
            let text = std::fs::read_to_string(&g.audit_path).unwrap();
            assert!(!text.contains("secretsecret"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no audit line for the 404: {lines:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
