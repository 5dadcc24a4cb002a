//! Admission and accounting end to end: rate and token limits under concurrency, refunds,
//! per-subject and per-deployment limits, budgets priced from `[prices]`, exact streamed
//! usage, Redis shared by two gateway processes and Redis outages, and the `openai` SDK's
//! view of a 429.
//!
//! Redis comes from `PORTCULLIS_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); the
//! outage test starts its own `redis-server`. Two tests wait out a real one-minute window
//! (they check that `retry-after` is the time at which the request fits).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

fn redis_url() -> String {
    std::env::var("PORTCULLIS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A Redis key prefix no other test run uses.
fn prefix(test: &str) -> String {
    format!("pcltest-{test}-{}-{}", std::process::id(), uuid_ish())
}

fn uuid_ish() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// An anonymous client with `limits` (TOML lines), allowed everything.
fn client(limits: &str) -> String {
    format!("[[clients]]\nid = \"app\"\nanonymous = true\ndeployments = [\"*\"]\noperations = [\"*\"]\n{limits}\n")
}

fn azure_backend(sim: &portcullis::sim::SimHandle) -> String {
    backend(
        "sim",
        &sim.url(),
        "azure",
        "deployments = { \"gpt-4o\" = \"gpt-4o\", \"gpt-4o-mini\" = \"gpt-4o-mini\" }",
    )
}

fn ask(max_tokens: u64) -> Value {
    json!({
        "model": "gpt-4o",
        "max_tokens": max_tokens,
        "messages": [{ "role": "user", "content": "Hello there" }]
    })
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
    at: Instant,
}

async fn post(url: &str, body: &Value, headers: &[(&str, &str)]) -> Answer {
    let mut req = http().post(format!("{url}/v1/chat/completions"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.json(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        headers,
        body,
        at: Instant::now(),
    }
}

fn header(a: &Answer, name: &str) -> String {
    a.headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn total_tokens(a: &Answer) -> u64 {
    a.body["usage"]["total_tokens"].as_u64().unwrap()
}

#[tokio::test]
async fn a_token_limit_holds_under_200_concurrent_requests_and_retry_after_is_when_it_fits() {
    let sim = sim().await;
    let gw = Gateway::start_with(
        "",
        &client("tokens_per_minute = 3000"),
        &azure_backend(&sim),
    )
    .await;
    let body = ask(30);
    let answers = futures_join(200, |_| post(&gw.url, &body, &[])).await;

    let ok: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status != 200).collect();
    assert!(ok.len() >= 50, "{} admitted", ok.len());
    assert!(refused.len() >= 50, "{} refused", refused.len());
    // What the admitted requests really used never exceeds the limit.
    let used: u64 = ok.iter().map(|a| total_tokens(a)).sum();
    assert!(used <= 3000, "{used} tokens admitted in one minute");
    for a in &ok {
        assert_eq!(header(a, "x-ratelimit-limit-tokens"), "3000");
        let left: u64 = header(a, "x-ratelimit-remaining-tokens").parse().unwrap();
        assert!(left < 3000);
    }
    let mut latest_fit = Instant::now();
    for a in &refused {
        assert_eq!(a.status, 429, "{}", a.body);
        assert_eq!(
            a.body["error"]["code"], "token_limit_exceeded",
            "{}",
            a.body
        );
        assert_eq!(a.body["error"]["type"], "tokens");
        let ms: u64 = header(a, "retry-after-ms").parse().unwrap();
        let secs: u64 = header(a, "retry-after").parse().unwrap();
        assert!(ms > 0 && ms <= 61_000, "{ms}");
        assert_eq!(secs, ms.div_ceil(1000));
        latest_fit = latest_fit.max(a.at + Duration::from_millis(ms));
    }
    // Sent when the last refusal said it would fit, the same request is admitted.
    tokio::time::sleep_until(latest_fit.into()).await;
    let again = post(&gw.url, &body, &[]).await;
    assert_eq!(again.status, 200, "{}", again.body);
}

/// Run `n` futures made by `f` at once and collect their outputs.
async fn futures_join<F, Fut>(n: usize, f: F) -> Vec<Answer>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Answer>,
{
    futures_util::future::join_all((0..n).map(f)).await
}

#[tokio::test]
async fn a_refund_of_the_unused_output_reservation_lets_the_next_request_fit() {
    let sim = sim().await;
    let gw = Gateway::start_with(
        "",
        &client("tokens_per_minute = 1000"),
        &azure_backend(&sim),
    )
    .await;
    // Each request reserves its prompt plus 900 answer tokens, and uses ~30.
    let first = post(&gw.url, &ask(900), &[]).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let left: u64 = header(&first, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(left < 100, "{left} left after reserving 900+");
    let used = total_tokens(&first);
    // Two reservations of 900+ cannot both fit: the second does because the first was
    // reconciled with what it used.
    let second = post(&gw.url, &ask(900), &[]).await;
    assert_eq!(second.status, 200, "{}", second.body);
    let left2: u64 = header(&second, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(left2 + used <= left + 1000 - 900, "{left2}");
    // The audit line says what was reserved and what was used.
    let line = gw.audit_for(&header(&first, "x-request-id")).await;
    let u = &line["usage"];
    assert_eq!(u["source"], "reported", "{line}");
    assert_eq!(
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap(),
        used
    );
    assert!(u["estimated_tokens"].as_u64().unwrap() >= 900);
    // Asking for more than the limit itself can never fit: 400, not an endless 429.
    let huge = post(&gw.url, &ask(5000), &[]).await;
    assert_eq!(huge.status, 400);
    assert_eq!(huge.body["error"]["code"], "request_too_large_for_limit");
}

#[tokio::test]
async fn per_subject_and_per_deployment_limits_apply_inside_one_client() {
    let sim = sim().await;
    let identity = r#"
[[clients]]
id = "shared-app"
deployments = ["*"]
operations = ["*"]
requests_per_minute = 100
limits = [{ deployments = ["gpt-4o-mini*"], requests_per_minute = 1 }]
per_subject = { requests_per_minute = 2 }
"#;
    let gw = Gateway::start_with("", identity, &azure_backend(&sim)).await;
    let alice = gw.issue_key("shared-app").await;
    let bob = gw.issue_key("shared-app").await;
    let as_ = |k: &str| format!("Bearer {k}");
    let (a, b) = (as_(&alice), as_(&bob));
    for _ in 0..2 {
        let r = post(&gw.url, &ask(10), &[("authorization", &a)]).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // Alice used her two; the third is refused and names her (her key id), Bob is not
    // affected.
    let r = post(&gw.url, &ask(10), &[("authorization", &a)]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.body["error"]["code"], "rate_limit_exceeded");
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("subject '") && msg.contains("shared-app"),
        "{msg}"
    );
    let r = post(&gw.url, &ask(10), &[("authorization", &b)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The subject's limit is the tightest: the headers show it.
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "2");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "1");
    // gpt-4o-mini has its own one request per minute for the whole client.
    let mini = json!({ "model": "gpt-4o-mini", "max_tokens": 5, "messages": [{ "role": "user", "content": "hi" }] });
    let r = post(&gw.url, &mini, &[("authorization", &b)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = post(&gw.url, &mini, &[("authorization", &a)]).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gpt-4o-mini*"));
}

#[tokio::test]
async fn a_budget_is_priced_refused_with_403_and_recorded_with_its_cost() {
    let sim = sim().await;
    let identity = format!(
        "{}\n[prices.\"gpt-4o\"]\ninput = 10.0\noutput = 20.0\n",
        client("budget = { usd = 0.002, period = \"day\" }")
    );
    let gw = Gateway::start_with("", &identity, &azure_backend(&sim)).await;
    let mut spent = 0.0;
    let mut admitted = Vec::new();
    let refusal = loop {
        let r = post(&gw.url, &ask(20), &[]).await;
        if r.status != 200 {
            break r;
        }
        let u = &r.body["usage"];
        spent += u["prompt_tokens"].as_f64().unwrap() * 10.0 / 1e6
            + u["completion_tokens"].as_f64().unwrap() * 20.0 / 1e6;
        admitted.push(header(&r, "x-request-id"));
        assert!(admitted.len() < 100, "the budget never ran out");
    };
    assert!(spent <= 0.002 + 1e-12, "spent {spent}");
    assert!(admitted.len() >= 2, "{}", admitted.len());
    assert_eq!(refusal.status, 403, "{}", refusal.body);
    assert_eq!(refusal.body["error"]["code"], "budget_exceeded");
    assert_eq!(refusal.body["error"]["type"], "insufficient_quota");
    let msg = refusal.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("T00:00:00Z"), "names the reset: {msg}");
    let after: u64 = header(&refusal, "retry-after").parse().unwrap();
    assert!(after > 0 && after <= 86_400);
    // The audit line and the store carry the cost.
    let line = gw.audit_for(&admitted[0]).await;
    let cost = line["usage"]["cost_usd"].as_f64().unwrap();
    assert!(cost > 0.0 && cost < 0.002, "{line}");
    let dir = gw.audit_path.parent().unwrap().to_path_buf();
    let store =
        portcullis::store::open_store(&format!("sqlite://{}", dir.join("keys.db").display()), &dir)
            .await
            .unwrap();
    let q = portcullis::store::UsageQuery {
        client: Some("app".into()),
        deployment: None,
        since_ms: 0,
        until_ms: i64::MAX,
        by: portcullis::store::GroupBy::Client,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let rows = store.usage_report(&q).await.unwrap();
        if let Some(r) = rows
            .into_iter()
            .find(|r| r.requests >= admitted.len() as i64)
        {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "usage records never reached the store"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        (row.cost_usd - spent).abs() < 1e-9,
        "{} vs {spent}",
        row.cost_usd
    );
}

/// The SSE `data:` payloads of a stream body.
fn events(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn streamed_usage_is_exact_and_the_client_sees_the_stream_it_asked_for() {
    let sim = sim_with(Duration::from_millis(30)).await;
    let gw = Gateway::start_with("", &client(""), &azure_backend(&sim)).await;
    let direct_url = format!(
        "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        sim.url()
    );
    let direct = |body: Value| {
        let url = direct_url.clone();
        async move {
            http()
                .post(url)
                .header("api-key", BACKEND_KEY)
                .header("x-sim-seed", "7")
                .json(&body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let via_gateway = |body: Value| {
        let url = format!("{}/v1/chat/completions", gw.url);
        async move {
            let r = http()
                .post(url)
                .header("x-sim-seed", "7")
                .json(&body)
                .send()
                .await
                .unwrap();
            let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
            (id, r.text().await.unwrap())
        }
    };
    let base = json!({ "model": "gpt-4o", "stream": true, "messages": [{ "role": "user", "content": "Hello there" }] });
    let with = |opts: Value| {
        let mut b = base.clone();
        b["stream_options"] = opts;
        b
    };
    let expected_usage = {
        let text = direct(with(json!({ "include_usage": true }))).await;
        let last = events(&text).pop().unwrap();
        assert_eq!(last["choices"], json!([]));
        last["usage"].clone()
    };
    assert!(expected_usage["completion_tokens"].as_u64().unwrap() > 0);

    // Not asked (absent, or false): byte for byte what the backend sends without usage,
    // and the gateway still records the exact usage.
    for body in [base.clone(), with(json!({ "include_usage": false }))] {
        let plain = direct(body.clone()).await;
        assert!(!plain.contains("\"usage\""));
        let (id, got) = via_gateway(body).await;
        assert_eq!(got, plain, "the client's stream changed");
        // Azure's first chunk (content filter results, no choices) passed untouched.
        assert!(events(&got)[0]["prompt_filter_results"].is_array(), "{got}");
        let line = gw.audit_for(&id).await;
        let u = &line["usage"];
        assert_eq!(u["source"], "reported", "{line}");
        assert_eq!(u["prompt_tokens"], expected_usage["prompt_tokens"]);
        assert_eq!(u["completion_tokens"], expected_usage["completion_tokens"]);
    }
    // The backend was asked for usage on the client's behalf.
    let sent = sim.captured();
    let last: Value = serde_json::from_slice(&sent.last().unwrap().body).unwrap();
    assert_eq!(last["stream_options"]["include_usage"], true);

    // Asked: the usage chunk reaches the client, again byte for byte.
    let asked = with(json!({ "include_usage": true }));
    let (_, got) = via_gateway(asked.clone()).await;
    assert_eq!(got, direct(asked).await);

    // Cut by the backend after 3 chunks of text: charged the prompt and the text streamed.
    let r = http()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("x-sim-behavior", "cut-stream:3")
        .json(&base)
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut text = String::new();
    let mut r = r;
    while let Ok(Some(chunk)) = r.chunk().await {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let streamed: String = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert!(!streamed.is_empty());
    let line = gw.audit_for(&id).await;
    let u = &line["usage"];
    assert_eq!(u["source"], "counted", "{line}");
    assert_eq!(
        u["completion_tokens"].as_u64().unwrap(),
        portcullis::tokens::count(portcullis::tokens::Encoding::O200k, &streamed)
    );
    assert_eq!(u["prompt_tokens"], expected_usage["prompt_tokens"]);
}

#[tokio::test]
async fn the_usage_tap_relays_events_as_they_come() {
    let sim = sim_with(Duration::from_millis(150)).await;
    let gw = Gateway::start_with("", &client(""), &azure_backend(&sim)).await;
    let started = Instant::now();
    let mut r = http()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stamps = Vec::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        if String::from_utf8_lossy(&chunk).contains("\"content\"") {
            stamps.push(started.elapsed());
        }
    }
    // 12 words, 150 ms apart: the first text arrived long before the last was sent.
    assert!(stamps.len() >= 10, "{stamps:?}");
    assert!(
        *stamps.last().unwrap() - stamps[0] >= Duration::from_millis(1000),
        "{stamps:?}"
    );
}

/// A `portcullis serve` child process and its address.
struct Served {
    child: Child,
    url: String,
}

impl Served {
    /// SIGTERM, and wait for the graceful exit (which flushes the usage records).
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status}");
                return;
            }
            assert!(Instant::now() < deadline, "serve did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(config: &std::path::Path) -> Served {
    // Owned by `Served` at once, whose drop kills and reaps it whatever happens next.
    let mut served = Served {
        child: Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
        url: String::new(),
    };
    let stderr = served.child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("serve printed no listening line");
        if let Some(after) = line.split("addr=").nth(1) {
            if line.contains("portcullis is listening") {
                let addr = after.split_whitespace().next().unwrap();
                served.url = format!("http://{addr}");
                return served;
            }
        }
    }
}

#[tokio::test]
async fn two_gateway_processes_sharing_redis_never_admit_more_than_a_limit_or_budget() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[audit]\npath = \"audit.log\"\n[store]\nurl = \"sqlite://usage.db\"\n[limits]\nbackend = \"redis\"\nredis_url = \"{}\"\nredis_prefix = \"{}\"\n{}\nlimits = [{{ deployments = [\"gpt-4o-mini\"], budget = {{ usd = 0.001, period = \"month\" }} }}]\n[prices.\"gpt-4o-mini\"]\ninput = 10.0\noutput = 10.0\n{}",
        redis_url(),
        prefix("two"),
        client("tokens_per_minute = 2000"),
        azure_backend(&sim)
    );
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, config).unwrap();
    let (a, b) = (serve(&path), serve(&path));
    let urls = [a.url.clone(), b.url.clone()];

    // Tokens per minute: 100 concurrent requests, alternating between the two replicas.
    let body = ask(25);
    let answers = futures_join(100, |i| post(&urls[i % 2], &body, &[])).await;
    let ok: Vec<_> = answers
        .iter()
        .enumerate()
        .filter(|(_, a)| a.status == 200)
        .collect();
    let admitted_full = ok.len() as u64;
    let used: u64 = ok.iter().map(|(_, a)| total_tokens(a)).sum();
    assert!(
        used <= 2000,
        "{used} tokens admitted by two replicas against 2000"
    );
    assert!(ok.iter().any(|(i, _)| i % 2 == 0) && ok.iter().any(|(i, _)| i % 2 == 1));
    assert!(answers.iter().any(|a| a.status == 429));

    // A budget on one deployment, spent through both replicas.
    let mini = json!({ "model": "gpt-4o-mini", "max_tokens": 10, "messages": [{ "role": "user", "content": "hi" }] });
    let answers = futures_join(60, |i| post(&urls[i % 2], &mini, &[])).await;
    let spent: f64 = answers
        .iter()
        .filter(|a| a.status == 200)
        .map(|a| a.body["usage"]["total_tokens"].as_f64().unwrap() * 10.0 / 1e6)
        .sum();
    assert!(spent <= 0.001 + 1e-12, "spent {spent}");
    let admitted_mini = answers.iter().filter(|a| a.status == 200).count() as u64;
    let refusals: Vec<_> = answers.iter().filter(|a| a.status != 200).collect();
    assert!(!refusals.is_empty());
    for r in refusals {
        assert_eq!(r.status, 403, "{}", r.body);
        assert_eq!(r.body["error"]["code"], "budget_exceeded");
    }
    // A graceful stop flushes every queued usage record: `portcullis usage` then reports
    // what both replicas served, at once.
    a.stop();
    b.stop();
    {
        let out = Command::new(BIN)
            .args([
                "usage",
                "--by",
                "deployment",
                "--format",
                "json",
                "--config",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
        let n = |d: &str| {
            rows.as_array()
                .unwrap()
                .iter()
                .find(|r| r["deployment"] == d)
                .and_then(|r| r["requests"].as_u64())
                .unwrap_or(0)
        };
        // One record per request a backend answered (refusals are audited, not recorded).
        assert_eq!(n("gpt-4o"), admitted_full, "{rows}");
        assert_eq!(n("gpt-4o-mini"), admitted_mini, "{rows}");
    }
}

/// A `redis-server` of the test's own on `port`.
fn redis_server(port: u16) -> Child {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (Debian package redis-server; scripts/test.sh installs it)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn stop(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

#[tokio::test]
async fn when_redis_goes_away_fail_closed_refuses_fail_open_serves_and_both_recover() {
    let sim = sim().await;
    let port = dead_port();
    let mut redis = redis_server(port);
    let limits = |policy: &str| {
        format!(
            "[limits]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{port}\"\nredis_prefix = \"{}\"\non_redis_error = \"{policy}\"\n{}",
            prefix(policy),
            client("requests_per_minute = 1000")
        )
    };
    let closed = Gateway::start_with("", &limits("fail_closed"), &azure_backend(&sim)).await;
    let open = Gateway::start_with("", &limits("fail_open"), &azure_backend(&sim)).await;
    for gw in [&closed, &open] {
        assert_eq!(post(&gw.url, &ask(5), &[]).await.status, 200);
    }
    stop(redis);
    let r = post(&closed.url, &ask(5), &[]).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "limits_unavailable");
    assert_eq!(header(&r, "retry-after"), "1");
    let r = post(&open.url, &ask(5), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(open
        .metrics()
        .await
        .contains("portcullis_limits_fail_open 1"));
    assert!(closed
        .metrics()
        .await
        .lines()
        .any(|l| l.starts_with("portcullis_limits_backend_errors_total ") && !l.ends_with(" 0")));

    // Redis back on the same port: both return to it on their own.
    redis = redis_server(port);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let a = post(&closed.url, &ask(5), &[]).await.status;
        let b = post(&open.url, &ask(5), &[]).await.status;
        let back = open
            .metrics()
            .await
            .contains("portcullis_limits_fail_open 0");
        if a == 200 && b == 200 && back {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {a} {b} {back}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(redis);
}

#[tokio::test]
async fn the_openai_sdk_sees_a_rate_limit_error_and_succeeds_after_retry_after() {
    let sim = sim().await;
    let identity = "[[clients]]\nid = \"sdk\"\ndeployments = [\"*\"]\noperations = [\"*\"]\nrequests_per_minute = 1\n";
    let gw = Gateway::start_with("", identity, &azure_backend(&sim)).await;
    let key = gw.issue_key("sdk").await;
    let python = std::env::var("PORTCULLIS_PYTHON")
        .unwrap_or_else(|_| format!("{}/.venv/bin/python", env!("CARGO_MANIFEST_DIR")));
    let script = format!("{}/tests/sdk/limits_check.py", env!("CARGO_MANIFEST_DIR"));
    let run = tokio::process::Command::new(python)
        .arg(script)
        .env("GATEWAY_URL", &gw.url)
        .env("GATEWAY_KEY", &key)
        .env("NO_PROXY", "127.0.0.1")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(150), run)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("limits-sdk: all checks passed"), "{stdout}");
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_is_still_charged_the_reported_usage() {
    let sim = sim_with(Duration::from_millis(60)).await;
    let gw = Gateway::start_with(
        "",
        &client("tokens_per_minute = 100000"),
        &azure_backend(&sim),
    )
    .await;
    let mut r = http()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    // The first event, then the client goes away.
    r.chunk().await.unwrap().unwrap();
    drop(r);
    // The gateway read on to the backend's usage chunk (which the client never asked for).
    let line = gw.audit_for(&id).await;
    assert_eq!(line["outcome"], "client_disconnected", "{line}");
    let u = &line["usage"];
    assert_eq!(u["source"], "reported", "{line}");
    let direct = sim.captured();
    assert_eq!(direct.len(), 1);
    assert!(u["completion_tokens"].as_u64().unwrap() > 0, "{line}");
}

#[tokio::test]
async fn responses_api_usage_is_read_from_its_answer_and_its_event_stream() {
    let sim = sim().await;
    let b = backend(
        "sim",
        &sim.url(),
        "openai",
        "deployments = { \"gpt-4o\" = \"gpt-4o\" }",
    );
    let gw = Gateway::start_with("", &client("tokens_per_minute = 100000"), &b).await;
    for stream in [false, true] {
        let r = http()
            .post(format!("{}/v1/responses", gw.url))
            .json(&json!({ "model": "gpt-4o", "input": "Hello there", "max_output_tokens": 50, "stream": stream }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        let text = r.text().await.unwrap();
        let reported = if stream {
            assert!(!text.contains("[DONE]"));
            let done = text
                .split("\n\n")
                .find(|e| e.starts_with("event: response.completed"))
                .expect("a response.completed event");
            let data: Value = serde_json::from_str(done.split("data: ").nth(1).unwrap()).unwrap();
            data["response"]["usage"].clone()
        } else {
            serde_json::from_str::<Value>(&text).unwrap()["usage"].clone()
        };
        let line = gw.audit_for(&id).await;
        let u = &line["usage"];
        assert_eq!(u["source"], "reported", "{line}");
        assert_eq!(u["prompt_tokens"], reported["input_tokens"], "{line}");
        assert_eq!(u["completion_tokens"], reported["output_tokens"], "{line}");
        // Reserved: the prompt estimate (the Responses API wraps input in a message whose
        // overhead is not documented exactly) plus max_output_tokens.
        let est = u["estimated_tokens"].as_i64().unwrap();
        let input = reported["input_tokens"].as_i64().unwrap();
        assert!((est - (input + 50)).abs() <= 4, "{line}");
    }
}

/// The `usage` of an answer's audit line.
async fn usage_of(gw: &Gateway, a: &Answer) -> Value {
    gw.audit_for(&header(a, "x-request-id")).await["usage"].clone()
}

/// `[limits] estimate`: by default a request is estimated only when something reads the
/// estimate before the answer (a token limit, quota or budget of its client); its audit line
/// then says `estimated_tokens: null`. A success that reports no usage is still charged its
/// estimate, made from the request after the answer. `estimate = "always"` estimates all.
#[tokio::test]
async fn requests_are_estimated_when_something_reads_the_estimate() {
    let sim = sim().await;
    let body = ask(30);
    let opts = portcullis::tokens::EstimateOptions {
        default_max_tokens: 4096,
        reserve_output: portcullis::tokens::ReserveOutput::MaxTokens,
        default_image_tokens: 765,
    };
    let expected = portcullis::tokens::estimate(
        portcullis::route::Operation::Chat,
        "gpt-4o",
        &serde_json::to_vec(&body).unwrap(),
        Some("application/json"),
        &opts,
    );
    assert_eq!(expected.output, 30);

    // No limit, or a request limit only: nothing reads an estimate.
    for limits in ["", "requests_per_minute = 1000"] {
        let gw = Gateway::start_with("", &client(limits), &azure_backend(&sim)).await;
        let a = post(&gw.url, &body, &[]).await;
        assert_eq!(a.status, 200);
        let u = usage_of(&gw, &a).await;
        assert_eq!(u["source"], "reported", "{u}");
        assert_eq!(u["estimated_tokens"], Value::Null, "{limits}: {u}");
        assert_eq!(u["prompt_tokens"], a.body["usage"]["prompt_tokens"]);
        // A success without usage (the simulator echoes the request: no `usage` object):
        // charged the estimate all the same, made from the body it kept.
        let a = post(&gw.url, &body, &[("x-sim-behavior", "echo")]).await;
        assert_eq!(a.status, 200);
        assert!(a.body["usage"].is_null());
        let u = usage_of(&gw, &a).await;
        assert_eq!(u["source"], "none", "{u}");
        assert_eq!(u["prompt_tokens"], expected.prompt, "{u}");
        assert_eq!(u["completion_tokens"], expected.output, "{u}");
        assert_eq!(u["estimated_tokens"], expected.total(), "{u}");
    }

    // A token limit reads it; so does `estimate = "always"` without one.
    for (extra, limits) in [
        ("", "tokens_per_minute = 1000000"),
        ("[limits]\nestimate = \"always\"", ""),
    ] {
        let gw = Gateway::start_with(extra, &client(limits), &azure_backend(&sim)).await;
        let a = post(&gw.url, &body, &[]).await;
        assert_eq!(a.status, 200);
        let u = usage_of(&gw, &a).await;
        assert_eq!(u["source"], "reported", "{u}");
        assert_eq!(
            u["estimated_tokens"],
            expected.total(),
            "{extra} {limits}: {u}"
        );
    }
}
