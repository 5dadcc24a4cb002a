//! The admin console in a real browser: a gateway with scoped admin tokens, API-key clients
//! and usage in its store, driven by `tests/browser/console.mjs` in Debian's Chromium
//! (playwright-core). The script signs in, reads the overview's chart, creates a key in the
//! UI, uses it, revokes it and sees it refused, visits every page and checks a read-only
//! token gets no key buttons; its screenshots land in `target/console-screenshots/`.
//!
//! Skipped, with a message, when `node` or Chromium is missing — unless
//! `PORTCULLIS_REQUIRE_BROWSER` is set (`scripts/test.sh` sets it), then it fails.
//! `PORTCULLIS_TEST_NODE` and `PORTCULLIS_CHROMIUM` override the binaries.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use portcullis::sim::{Behavior, RetryForm};
use portcullis::store::UsageRecord;

const ADMIN_TOKEN: &str = "console-test-admin-token-read-keys-0123456789";
const READ_TOKEN: &str = "console-test-admin-token-read-only-0123456789";

/// How long the whole browser run may take (a cold Chromium on a loaded machine included).
const SCRIPT_DEADLINE: Duration = Duration::from_secs(240);

/// `[[admin.tokens]]`, two API-key clients with limits, and prices, so every page has
/// something to show.
fn identity() -> String {
    format!(
        r#"
[[admin.tokens]]
name = "console-test"
token = "{ADMIN_TOKEN}"
scopes = ["read", "keys"]

[[admin.tokens]]
name = "viewer"
token = "{READ_TOKEN}"
scopes = ["read"]

[[clients]]
id = "team-a"
deployments = ["*"]
operations = ["*"]
requests_per_minute = 600
tokens_per_minute = 200000
max_concurrent_requests = 32
per_subject = {{ requests_per_minute = 60 }}

[[clients]]
id = "team-b"
deployments = ["gpt-4o"]
operations = ["chat"]
budget = {{ usd = 5.0, period = "month" }}

[prices."gpt-4o"]
input = 2.5
output = 10.0
"#
    )
}

const MINUTE_MS: i64 = 60_000;

/// A day of earlier usage in 30-minute buckets, the last one ending 61 minutes before `now_ms`, so the overview's chart has
/// a history to draw (the screenshots in `docs/` show it). The last hour holds only what the
/// test sends through the gateway.
fn history(now_ms: i64) -> Vec<UsageRecord> {
    let mut out = Vec::new();
    for bucket in 0..46i64 {
        let start = now_ms - 24 * 60 * MINUTE_MS + bucket * 30 * MINUTE_MS;
        // A working day's shape: quiet at night, busy in the afternoon.
        let phase = (bucket as f64 / 46.0 * std::f64::consts::TAU).sin();
        let a = (4.0 + 3.5 * (1.0 + phase)).round() as i64;
        let b = (1.0 + 1.5 * (1.0 - phase)).round() as i64;
        for (client, n) in [("team-a", a), ("team-b", b)] {
            for i in 0..n {
                let embeddings = client == "team-a" && i % 4 == 3;
                let prompt = 300 + (bucket * 37 + i * 91) % 900;
                let completion = if embeddings {
                    0
                } else {
                    80 + (bucket * 53 + i * 29) % 320
                };
                let refused = client == "team-b" && bucket % 9 == 4 && i == 0;
                out.push(UsageRecord {
                    time_ms: start + i * 97_000 % (29 * MINUTE_MS),
                    request_id: format!("history-{bucket}-{client}-{i}"),
                    client: client.to_owned(),
                    subject: None,
                    key_id: None,
                    operation: if embeddings { "embeddings" } else { "chat" }.to_owned(),
                    deployment: Some(
                        if embeddings {
                            "text-embedding-3-small"
                        } else {
                            "gpt-4o"
                        }
                        .to_owned(),
                    ),
                    backend: Some("ptu".to_owned()),
                    prompt_tokens: if refused { 0 } else { prompt },
                    cached_tokens: 0,
                    completion_tokens: if refused { 0 } else { completion },
                    reasoning_tokens: 0,
                    estimated_tokens: None,
                    usage_source: if refused { "none" } else { "reported" }.to_owned(),
                    cost_usd: if refused || embeddings {
                        0.0
                    } else {
                        (prompt as f64 * 2.5 + completion as f64 * 10.0) / 1e6
                    },
                    status: if refused { 429 } else { 200 },
                    stream: false,
                });
            }
        }
    }
    out
}

/// The browser and node to run, or why the test cannot run here.
fn browser() -> Result<(String, String), String> {
    let node = std::env::var("PORTCULLIS_TEST_NODE").unwrap_or_else(|_| "node".to_owned());
    let chromium =
        std::env::var("PORTCULLIS_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    let node_runs = std::process::Command::new(&node)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !node_runs {
        return Err(format!("`{node}` does not run (set PORTCULLIS_TEST_NODE)"));
    }
    if !Path::new(&chromium).is_file() {
        return Err(format!(
            "no Chromium at {chromium} (apt-get install chromium, or set PORTCULLIS_CHROMIUM)"
        ));
    }
    Ok((node, chromium))
}

/// `target/console-screenshots`, under `CARGO_TARGET_DIR` when it is set.
fn screenshot_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { manifest.join(t) })
        .unwrap_or_else(|| manifest.join("target"));
    target.join("console-screenshots")
}

/// Requests of a client in the store's report for the last hour, read through the API.
async fn usage_requests(gw: &Gateway) -> serde_json::Value {
    let resp = http()
        .get(format!("{}/admin/usage?by=client&since=1h", gw.admin_url))
        .bearer_auth(READ_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "GET /admin/usage");
    resp.json().await.unwrap()
}

fn requests_of(report: &serde_json::Value, client: &str) -> i64 {
    report["data"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["key"] == client)
        .and_then(|r| r["requests"].as_i64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser() {
    let (node, chromium) = match browser() {
        Ok(found) => found,
        Err(why) if std::env::var_os("PORTCULLIS_REQUIRE_BROWSER").is_none() => {
            eprintln!("SKIPPED the_console_works_in_a_real_browser: {why}");
            return;
        }
        Err(why) => panic!("PORTCULLIS_REQUIRE_BROWSER is set, but {why}"),
    };
    let browser_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run scripts/test.sh, or `npm ci --prefix tests/browser`"
    );

    // `ptu` first, `paygo` after it; a 429 below cools `ptu`'s gpt-4o for the backends page.
    let (ptu, paygo) = (sim().await, sim().await);
    let b = [
        backend(
            "ptu",
            &ptu.url(),
            "azure",
            "priority = 0\napi_version = \"2024-06-01\"\ndeployments = { \"gpt-4o\" = \"gpt-4o-ptu\", \"text-embedding-3-small\" = \"emb\" }",
        ),
        backend(
            "paygo",
            &paygo.url(),
            "azure",
            "priority = 1\ndeployments = { \"gpt-4o\" = \"gpt-4o\" }",
        ),
    ]
    .concat();
    let gw = Gateway::start_with("", &identity(), &b).await;

    // The gateway's store (the harness keeps it beside the audit file): a day of history.
    let dir = gw.audit_path.parent().unwrap();
    let store =
        portcullis::store::open_store(&format!("sqlite://{}", dir.join("keys.db").display()), dir)
            .await
            .unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for batch in history(now_ms).chunks(100) {
        store.insert_usage(batch).await.unwrap();
    }

    let team_a = gw.issue_key("team-a").await;
    let team_b = gw.issue_key("team-b").await;

    // Usage for the chart and the tables: two clients, two deployments.
    for _ in 0..6 {
        let r = gw.chat(false, &[("api-key", &team_a)]).await;
        assert_eq!(r.status(), 200, "team-a chat");
    }
    for _ in 0..2 {
        let r = http()
            .post(format!("{}/v1/embeddings", gw.url))
            .header("api-key", &team_a)
            .json(&serde_json::json!({ "model": "text-embedding-3-small", "input": "hello" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "team-a embeddings");
    }
    // One 429 asking for two minutes: `ptu` cools, the request is answered by `paygo`.
    ptu.set_burst(
        1,
        Behavior::RateLimited {
            retry_after_ms: 120_000,
            form: RetryForm::Ms,
        },
    );
    for _ in 0..3 {
        let r = gw.chat(true, &[("api-key", &team_b)]).await;
        assert_eq!(r.status(), 200, "team-b chat");
        r.bytes().await.unwrap();
    }
    // Refusals for the refusals chart: a wrong key, an operation team-b may not call.
    let wrong = gw
        .chat(false, &[("api-key", "pcl_aaaaaaaa_notakeynotakeynotakey")])
        .await;
    assert_eq!(wrong.status(), 401);
    let denied = http()
        .post(format!("{}/v1/embeddings", gw.url))
        .header("api-key", &team_b)
        .json(&serde_json::json!({ "model": "text-embedding-3-small", "input": "hello" }))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 403);

    // The usage writer flushes in batches: wait until the store has every request.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let report = usage_requests(&gw).await;
        let (a, b) = (
            requests_of(&report, "team-a"),
            requests_of(&report, "team-b"),
        );
        if a >= 8 && b >= 3 {
            assert_eq!(
                (a, b),
                (8, 3),
                "the last hour holds what the test sent: {report}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage not in the store after 15 s: {report}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let shots = screenshot_dir();
    std::fs::create_dir_all(&shots).unwrap();
    let mut script = tokio::process::Command::new(&node);
    script
        .arg(browser_dir.join("console.mjs"))
        .current_dir(&browser_dir)
        .env("PORTCULLIS_ADMIN_URL", &gw.admin_url)
        .env("PORTCULLIS_GATEWAY_URL", &gw.url)
        .env("PORTCULLIS_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("PORTCULLIS_READ_TOKEN", READ_TOKEN)
        .env("PORTCULLIS_CLIENT", "team-a")
        .env("PORTCULLIS_DEPLOYMENT", "gpt-4o")
        .env("PORTCULLIS_BACKEND", "ptu")
        .env("PORTCULLIS_SCREENSHOTS", &shots)
        .env("PORTCULLIS_CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(SCRIPT_DEADLINE, script.output())
        .await
        .unwrap_or_else(|_| panic!("console.mjs ran longer than {SCRIPT_DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("cannot run `{node}`: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "console.mjs failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for page in ["overview", "clients", "keys", "backends"] {
        let shot = shots.join(format!("{page}.png"));
        let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "{} is missing or empty", shot.display());
    }
}
