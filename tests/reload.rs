//! Live configuration (issue #15): a real gateway started from a file on disk, reloaded by
//! `POST /admin/reload`, by a change in its directory (a plain write and the Kubernetes
//! `..data` symlink swap) and, in the binary, by `SIGHUP` and `portcullis reload`; with
//! simulated backends streaming slowly, a real OpenID provider counting token requests,
//! and API keys from the gateway's store.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::idp::Idp;
use common::{bearer_sim, dead_port, http, sim, sim_with, BACKEND_KEY, STORE_SECRET};
use futures_util::StreamExt;
use portcullis::app::{self, Running, StartOptions};
use portcullis::config;
use portcullis::sim::SimHandle;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// `[server]`, `[admin]`, `[audit]` and `[store]` (paths relative to the file's directory).
fn head(server: &str, admin: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\ndrain_timeout = \"20s\"\n{server}\n[admin]\nlisten = \"127.0.0.1:0\"\n{admin}\n[audit]\npath = \"audit.log\"\n[store]\nurl = \"sqlite://keys.db\"\nkey_hmac_secret = \"{STORE_SECRET}\"\nrefresh_interval = \"100ms\"\n"
    )
}

/// A client allowed every deployment and operation, identified by its API keys.
fn client(id: &str, extra: &str) -> String {
    format!("[[clients]]\nid = \"{id}\"\ndeployments = [\"*\"]\noperations = [\"*\"]\n{extra}\n")
}

/// An Azure backend with the test key, serving `deployment`.
fn backend(name: &str, url: &str, deployment: &str, extra: &str) -> String {
    common::backend(
        name,
        url,
        "azure",
        &format!("deployments = {{ \"{deployment}\" = \"gpt-4o\" }}\n{extra}"),
    )
}

/// Replace a file as editors and config tools do: write aside, rename over.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Fixture {
    running: Running,
    path: PathBuf,
    url: String,
    admin: String,
    admin_token: Option<String>,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// Write `text` to `portcullis.toml` in a new directory and start from it.
    async fn start(text: &str, watch: bool) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, text).unwrap();
        Self::start_at(dir, path, watch).await
    }

    async fn start_at(dir: tempfile::TempDir, path: PathBuf, watch: bool) -> Fixture {
        let v = config::load_file(&path).unwrap_or_else(|e| panic!("{e}"));
        let admin_token = v.admin_token.as_ref().map(|t| t.expose().to_owned());
        let opts = StartOptions {
            config_file: Some(path.clone()),
            watch,
        };
        let running = app::start_with(&v, opts).await.unwrap();
        Fixture {
            url: format!("http://{}", running.addr),
            admin: format!("http://{}", running.admin_addr.unwrap()),
            running,
            path,
            admin_token,
            _dir: dir,
        }
    }

    fn write(&self, text: &str) {
        replace(&self.path, text);
    }

    /// `POST /admin/reload`: status and answer.
    async fn reload(&self) -> (u16, Value) {
        let mut req = http().post(format!("{}/admin/reload", self.admin));
        if let Some(t) = &self.admin_token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    /// Write `text` and reload it; it must apply.
    async fn apply(&self, text: &str) -> Value {
        self.write(text);
        let (status, out) = self.reload().await;
        assert_eq!(status, 200, "{out:#}");
        assert_eq!(out["outcome"], "applied");
        out
    }

    async fn metrics(&self) -> String {
        let mut req = http().get(format!("{}/metrics", self.admin));
        if let Some(t) = &self.admin_token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap().text().await.unwrap()
    }

    /// `portcullis_config_reloads_total{outcome}`.
    async fn reloads(&self, outcome: &str) -> u64 {
        let want = format!("portcullis_config_reloads_total{{outcome=\"{outcome}\"}} ");
        let text = self.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(want.as_str()))
            .map_or(0, |v| v.trim().parse().unwrap())
    }

    /// An API key for `client` (which need not be configured yet).
    async fn key(&self, client: &str) -> String {
        let keys = self.running.keys().unwrap();
        let (_, key) = keys.admin.create(client, None, None).await.unwrap();
        keys.api_keys.reload().await.unwrap();
        key.expose().to_owned()
    }

    /// A chat completion for `deployment` with `key`, and extra headers.
    async fn chat(
        &self,
        key: &str,
        deployment: &str,
        stream: bool,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        chat(&http(), &self.url, key, deployment, stream, headers).await
    }

    /// The deployments `GET /v1/models` lists.
    async fn models(&self, key: &str) -> Vec<String> {
        let v: Value = http()
            .get(format!("{}/v1/models", self.url))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

async fn chat(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    deployment: &str,
    stream: bool,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut req = http
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({
            "model": deployment,
            "stream": stream,
            "messages": [{ "role": "user", "content": "Hello there" }]
        }));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// Read a stream to its end: the text, or why it did not end well.
async fn read_stream(resp: reqwest::Response) -> Result<String, String> {
    if resp.status() != 200 {
        return Err(format!(
            "status {}: {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        ));
    }
    let mut body = Vec::new();
    let mut s = resp.bytes_stream();
    while let Some(chunk) = s.next().await {
        body.extend_from_slice(&chunk.map_err(|e| format!("cut: {e}"))?);
    }
    let text = String::from_utf8(body).map_err(|e| e.to_string())?;
    if !text.ends_with("data: [DONE]\n\n") {
        return Err(format!("no [DONE]: {text}"));
    }
    Ok(text)
}

/// The `error.code` of a refusal.
async fn code(resp: reqwest::Response) -> (u16, String) {
    common::error_code(resp).await
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Token requests the IdP answered for `client`.
async fn token_requests(idp: &Idp, client: &str) -> usize {
    idp.token_requests()
        .await
        .into_iter()
        .filter(|r| r["params"]["client_id"] == client || r["client_id"] == client)
        .count()
}

/// The configuration of round `round` of the load test: backend `a1`'s weight, an extra
/// backend `x<round>` (the one of the round before removed), client `old` only in round 0,
/// `newc` from round 1 on, `capped` allowed one request at a time in round 0 and two
/// after, `rpm` 2 requests a minute in round 0 and 3 after; the Entra backend unchanged, and
/// a second one with its own credential in rounds 5 to 7.
fn load_config(round: usize, plain: &SimHandle, entra: &SimHandle, idp: &Idp) -> String {
    let mut text = head("", "");
    text.push_str(&client(
        "load",
        &format!("requests_per_minute = {}", 1_000_000 + round),
    ));
    if round == 0 {
        text.push_str(&client("old", ""));
    } else {
        text.push_str(&client("newc", ""));
    }
    text.push_str(&client(
        "capped",
        &format!(
            "max_concurrent_requests = {}",
            if round == 0 { 1 } else { 2 }
        ),
    ));
    text.push_str(&client(
        "rpm",
        &format!("requests_per_minute = {}", if round == 0 { 2 } else { 3 }),
    ));
    text.push_str(&backend(
        "a1",
        &plain.url(),
        "m",
        &format!("weight = {}", round + 1),
    ));
    text.push_str(&backend(
        &format!("x{round}"),
        &plain.url(),
        "m",
        &format!("weight = {}", 11 - round),
    ));
    text.push_str(&format!(
        "[[backends]]\nname = \"entra\"\nurl = \"{}\"\ndeployments = {{ \"e\" = \"gpt-4o\" }}\n[backends.auth]\ntype = \"entra_secret\"\ntoken_url = \"{}\"\nclient_id = \"gw-reload\"\nclient_secret = \"reload-secret-0123456789\"\n",
        entra.url(),
        idp.token_endpoint()
    ));
    if (5..=7).contains(&round) {
        text.push_str(&format!(
            "[[backends]]\nname = \"entra2\"\nurl = \"{}\"\ndeployments = {{ \"e2\" = \"gpt-4o\" }}\n[backends.auth]\ntype = \"entra_secret\"\ntoken_url = \"{}\"\nclient_id = \"gw-reload-2\"\nclient_secret = \"reload-secret-2-0123456789\"\n",
            entra.url(),
            idp.token_endpoint()
        ));
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_reloads_under_load_fail_nothing_cut_no_stream_and_ask_the_idp_for_nothing() {
    let idp = Idp::start().await;
    for (id, secret) in [
        ("gw-reload", "reload-secret-0123456789"),
        ("gw-reload-2", "reload-secret-2-0123456789"),
    ] {
        idp.add_client(json!({
            "client_id": id,
            "client_secret": secret,
            "token_endpoint_auth_method": "client_secret_post",
            "access_token_ttl": 3600,
        }))
        .await;
    }
    let plain = sim().await;
    let entra = bearer_sim(&idp).await;
    let f = Fixture::start(&load_config(0, &plain, &entra, &idp), false).await;
    wait_for("the Entra token", Duration::from_secs(15), async || {
        f.running.gateway.readiness().is_ready()
    })
    .await;
    let tokens_before = token_requests(&idp, "gw-reload").await;
    assert_eq!(tokens_before, 1);
    let load = f.key("load").await;
    let old = f.key("old").await;
    let newc = f.key("newc").await;
    let capped = f.key("capped").await;
    let rpm = f.key("rpm").await;

    // Before: `newc` is not configured, `old` is; `capped` may hold one request.
    assert_eq!(
        code(f.chat(&newc, "m", false, &[]).await).await,
        (403, "client_not_allowed".into())
    );
    assert_eq!(f.chat(&old, "m", false, &[]).await.status(), 200);
    for _ in 0..2 {
        assert_eq!(f.chat(&rpm, "m", false, &[]).await.status(), 200);
    }
    assert_eq!(f.chat(&rpm, "m", false, &[]).await.status(), 429);

    // 100 slow streams (about 10 s each), half through each kind of backend, and one
    // held by `capped`.
    let slow = [("x-sim-behavior", "latency:700")];
    let mut streams = Vec::new();
    for i in 0..100 {
        let (url, key) = (f.url.clone(), load.clone());
        let deployment = if i % 2 == 0 { "m" } else { "e" };
        streams.push(tokio::spawn(async move {
            read_stream(chat(&http(), &url, &key, deployment, true, &slow).await).await
        }));
    }
    let capped_stream = {
        let (url, key) = (f.url.clone(), capped.clone());
        tokio::spawn(
            async move { read_stream(chat(&http(), &url, &key, "m", true, &slow).await).await },
        )
    };
    let started = || {
        plain.counters().streams_started.load(Ordering::SeqCst)
            + entra.counters().streams_started.load(Ordering::SeqCst)
    };
    wait_for("101 streams open", Duration::from_secs(20), async || {
        started() >= 101
    })
    .await;
    assert_eq!(
        code(f.chat(&capped, "m", false, &[]).await).await,
        (429, "too_many_concurrent_requests".into())
    );

    // Requests flowing all along.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut flows = Vec::new();
    for i in 0..4 {
        let (url, key) = (f.url.clone(), load.clone());
        let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
        flows.push(tokio::spawn(async move {
            let http = http();
            let deployment = if i % 2 == 0 { "m" } else { "e" };
            while !stop.load(Ordering::SeqCst) {
                let resp = chat(&http, &url, &key, deployment, false, &[]).await;
                sent.fetch_add(1, Ordering::SeqCst);
                if resp.status() != 200 {
                    failed.fetch_add(1, Ordering::SeqCst);
                    eprintln!("failed: {} {}", resp.status(), resp.text().await.unwrap());
                }
            }
        }));
    }

    let reload_started = Instant::now();
    for round in 1..=10 {
        let out = f.apply(&load_config(round, &plain, &entra, &idp)).await;
        let mut added = vec![format!("x{round}")];
        let mut removed = vec![format!("x{}", round - 1)];
        match round {
            5 => added.push("entra2".into()),
            8 => removed.push("entra2".into()),
            _ => {}
        }
        assert_eq!(out["changes"]["backends_added"], json!(added));
        assert_eq!(out["changes"]["backends_removed"], json!(removed));
        assert_eq!(out["restart_required"], json!([]));
        if round == 1 {
            // At once: the new client is served, the removed one refused, the new
            // limits apply and the counters of the old ones were kept.
            assert_eq!(f.chat(&newc, "m", false, &[]).await.status(), 200);
            assert_eq!(
                code(f.chat(&old, "m", false, &[]).await).await,
                (403, "client_not_allowed".into())
            );
            assert_eq!(f.chat(&capped, "m", false, &[]).await.status(), 200);
            assert_eq!(f.chat(&rpm, "m", false, &[]).await.status(), 200);
            assert_eq!(f.chat(&rpm, "m", false, &[]).await.status(), 429);
        }
        if round == 5 {
            // A backend with a new credential is usable from the first request.
            assert_eq!(f.chat(&load, "e2", false, &[]).await.status(), 200);
        }
        if round == 8 {
            assert_eq!(f.chat(&load, "e2", false, &[]).await.status(), 404);
        }
        let models = f.models(&load).await;
        if (5..=7).contains(&round) {
            assert_eq!(models, ["e", "e2", "m"]);
        } else {
            assert_eq!(models, ["e", "m"]);
        }
    }
    let reload_time = reload_started.elapsed();
    // The streams outlived every reload.
    assert!(
        plain.counters().streams_completed.load(Ordering::SeqCst)
            + entra.counters().streams_completed.load(Ordering::SeqCst)
            == 0,
        "the streams should outlast the reloads ({reload_time:?}); make them slower"
    );
    stop.store(true, Ordering::SeqCst);
    for t in flows {
        t.await.unwrap();
    }
    for s in streams {
        let text = s.await.unwrap().unwrap_or_else(|e| panic!("a stream: {e}"));
        assert!(text.contains("\"content\""));
    }
    capped_stream.await.unwrap().unwrap();
    let sent = sent.load(Ordering::SeqCst);
    eprintln!("10 reloads in {reload_time:?}; {sent} requests flowed meanwhile");
    assert!(sent > 20, "requests flowed during the reloads ({sent})");
    assert_eq!(failed.load(Ordering::SeqCst), 0, "of {sent}");
    assert_eq!(
        token_requests(&idp, "gw-reload").await,
        tokens_before,
        "no token request for the unchanged credential"
    );
    assert_eq!(
        token_requests(&idp, "gw-reload-2").await,
        1,
        "the added credential's token was kept over rounds 6 and 7"
    );
    assert_eq!(f.reloads("applied").await, 10);
    assert_eq!(f.reloads("rejected").await, 0);
    // The removed credential's refresher stopped and its token is gone; the kept one's
    // is still held.
    let expiry = async |who: &str| -> f64 {
        let want = format!(
            "portcullis_backend_token_expiry_seconds{{credential=\"entra_secret:{who}\"}} "
        );
        f.metrics()
            .await
            .lines()
            .find_map(|l| {
                l.strip_prefix(want.as_str())
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap()
    };
    wait_for(
        "the removed credential let go",
        Duration::from_secs(5),
        async || expiry("gw-reload-2").await == 0.0,
    )
    .await;
    assert!(expiry("gw-reload").await > 3000.0);
}

/// The audit lines written so far in the fixture's directory.
fn audit(f: &Fixture) -> Vec<Value> {
    std::fs::read_to_string(f.path.parent().unwrap().join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn audit_for(f: &Fixture, rid: &str) -> Value {
    let mut found = None;
    wait_for("the audit line", Duration::from_secs(5), async || {
        found = audit(f).into_iter().find(|v| v["request_id"] == rid);
        found.is_some()
    })
    .await;
    found.unwrap()
}

#[tokio::test]
async fn unchanged_issuers_and_backends_keep_their_keys_verified_tokens_and_connections() {
    let idp = Idp::start().await;
    let secret = "client-secret-0123456789abcdef";
    idp.add_client(json!({
        "client_id": "app-a", "client_secret": secret, "access_token_alg": "RS256",
    }))
    .await;
    let s = sim().await;
    let s2 = sim().await;
    let text = |audience: &str, client: &str, b_url: &str| {
        format!(
            "{}[[issuers]]\nname = \"idp\"\nissuer = \"{}\"\naudiences = [\"{audience}\"]\nalgorithms = [\"RS256\"]\n{client}{}{}",
            head("", ""),
            idp.issuer(),
            backend("b", b_url, "m", ""),
            backend("b2", &s2.url(), "n", "priority = 1"),
        )
    };
    let team = |id: &str, deployments: &str| {
        format!(
            "[[clients]]\nid = \"{id}\"\njwt = [{{ issuer = \"idp\", claims = {{ client_id = \"app-a\" }} }}]\ndeployments = [{deployments}]\noperations = [\"chat\"]\n"
        )
    };
    let f = Fixture::start(
        &text("api://portcullis", &team("team-a", "\"m\""), &s.url()),
        false,
    )
    .await;
    let token = idp.token("app-a", secret, "api://portcullis", None).await;
    // One client connection, so one gateway worker (each has its own upstream pools).
    let client = http();
    let send = async |deployment: &str, rid: &str| {
        chat(
            &client,
            &f.url,
            &token,
            deployment,
            false,
            &[("x-request-id", rid)],
        )
        .await
    };
    assert_eq!(send("m", "r1").await.status(), 200);
    assert_eq!(code(send("n", "r2").await).await.0, 403);
    let stats = idp.stats().await;
    assert_eq!(s.counters().connections.load(Ordering::SeqCst), 1);

    // The client is renamed and may call `n` too; the backends' weights change.
    f.apply(&text(
        "api://portcullis",
        &team("team-z", "\"m\", \"n\""),
        &s.url(),
    ))
    .await;
    assert_eq!(send("m", "r3").await.status(), 200);
    assert_eq!(
        send("n", "r4").await.status(),
        200,
        "the new policy at once"
    );
    assert_eq!(audit_for(&f, "r3").await["client"], "team-z");
    assert_eq!(
        idp.stats().await,
        stats,
        "no key fetch for the unchanged issuer"
    );
    assert_eq!(
        s.counters().connections.load(Ordering::SeqCst),
        1,
        "the unchanged backend's connection was reused"
    );

    // The issuer's audience changes: the cached verification of the token does not carry
    // over (the keys still do).
    f.apply(&text(
        "api://another",
        &team("team-z", "\"m\", \"n\""),
        &s.url(),
    ))
    .await;
    assert_eq!(
        code(send("m", "r5").await).await,
        (401, "invalid_token".into())
    );
    assert_eq!(idp.stats().await["jwks"], stats["jwks"]);

    // The backend moves (same server, another authority): a new pool.
    f.apply(&text(
        "api://portcullis",
        &team("team-z", "\"m\""),
        &s.url().replace("127.0.0.1", "localhost"),
    ))
    .await;
    assert_eq!(send("m", "r6").await.status(), 200);
    assert_eq!(code(send("n", "r7").await).await.0, 403);
    assert_eq!(s.counters().connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_invalid_configuration_is_refused_named_and_counted_and_the_old_one_serves() {
    let s = sim().await;
    let good = format!(
        "{}{}{}",
        head("", "token = \"admin-token-0123456789\""),
        client("app", ""),
        backend("b", &s.url(), "m", "")
    );
    let f = Fixture::start(&good, false).await;
    let key = f.key("app").await;
    assert_eq!(f.reloads("rejected").await, 0);

    // No token, or a wrong one: 401, OpenAI-shaped.
    let resp = http()
        .post(format!("{}/admin/reload", f.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(code(resp).await, (401, "missing_credentials".into()));
    let resp = http()
        .post(format!("{}/admin/reload", f.admin))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Two problems, each with its key and line; a new deployment in the same file is
    // not applied either.
    let bad = format!(
        "{}{}{}{}",
        head("max_body_bytes = 0", "token = \"admin-token-0123456789\""),
        client("app", ""),
        backend("b", &s.url(), "m", ""),
        backend("c", "not a url", "n", "")
    );
    f.write(&bad);
    let (status, out) = f.reload().await;
    assert_eq!(status, 422, "{out:#}");
    assert_eq!(out["outcome"], "rejected");
    let errors = out["errors"].as_array().unwrap();
    let find = |key: &str| {
        errors
            .iter()
            .find(|e| e["key"] == key)
            .unwrap_or_else(|| panic!("{key} in {out:#}"))
    };
    let line_of = |needle: &str| bad.lines().position(|l| l.contains(needle)).unwrap() + 1;
    assert_eq!(
        find("server.max_body_bytes")["line"],
        line_of("max_body_bytes = 0")
    );
    assert_eq!(find("backends[1].url")["line"], line_of("not a url"));
    assert_eq!(f.reloads("rejected").await, 1);
    assert_eq!(f.reloads("applied").await, 0);
    assert_eq!(f.chat(&key, "m", false, &[]).await.status(), 200);
    assert_eq!(f.models(&key).await, ["m"]);

    // A syntax error: its line.
    f.write("[server\nlisten = 1\n");
    let (status, out) = f.reload().await;
    assert_eq!(status, 422);
    assert_eq!(out["errors"][0]["line"], 1, "{out:#}");
    assert_eq!(f.reloads("rejected").await, 2);
    // A missing file.
    std::fs::remove_file(&f.path).unwrap();
    let (status, out) = f.reload().await;
    assert_eq!(status, 422);
    assert!(
        out["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("cannot read file"),
        "{out:#}"
    );
    assert_eq!(f.chat(&key, "m", false, &[]).await.status(), 200);

    // A body limit above the running body budget (which needs a restart to change).
    f.write(&good.replace(
        "[server]\n",
        "[server]\nmax_body_bytes = 4294967296\nmax_buffered_body_bytes = 4294967296\n",
    ));
    let (status, out) = f.reload().await;
    assert_eq!(status, 422, "{out:#}");
    assert_eq!(out["errors"][0]["key"], "server.max_body_bytes", "{out:#}");

    // Fixed: applied.
    f.apply(&good.replace("\"m\" = \"gpt-4o\"", "\"m2\" = \"gpt-4o\""))
        .await;
    assert_eq!(f.models(&key).await, ["m2"]);
    assert_eq!(f.reloads("applied").await, 1);
}

#[tokio::test]
async fn a_listen_change_needs_a_restart_and_the_rest_applies() {
    let s = sim().await;
    let text = |listen: &str, admin: &str, extra_client: &str| {
        format!(
            "{}{}{}{}",
            head("", "")
                .replace(
                    "listen = \"127.0.0.1:0\"\nworkers = 2",
                    &format!("listen = \"{listen}\"\nworkers = 2")
                )
                .replace(
                    "[admin]\nlisten = \"127.0.0.1:0\"",
                    &format!("[admin]\nlisten = \"{admin}\"")
                ),
            client("app", ""),
            extra_client,
            backend("b", &s.url(), "m", "")
        )
    };
    let f = Fixture::start(&text("127.0.0.1:0", "127.0.0.1:0", ""), false).await;
    let new_key = f.key("new").await;
    let other = format!("127.0.0.1:{}", dead_port());
    let out = f
        .apply(&text(&other, "127.0.0.1:0", &client("new", "")))
        .await;
    assert_eq!(out["restart_required"], json!(["server.listen"]));
    assert_eq!(out["changes"]["clients_added"], json!(["new"]));
    // The rest applied: the new client is served, on the old address.
    assert_eq!(f.chat(&new_key, "m", false, &[]).await.status(), 200);
    assert!(std::net::TcpStream::connect(&other).is_err());
    assert!(f
        .metrics()
        .await
        .contains("portcullis_config_restart_required 1"));
    // The workers and the admin listener likewise; and back to the running values: no
    // restart needed.
    let out = f
        .apply(&text("127.0.0.1:0", &other, "").replace("workers = 2", "workers = 3"))
        .await;
    assert_eq!(
        out["restart_required"],
        json!(["server.workers", "admin.listen"])
    );
    let out = f.apply(&text("127.0.0.1:0", "127.0.0.1:0", "")).await;
    assert_eq!(out["restart_required"], json!([]));
    assert!(f
        .metrics()
        .await
        .contains("portcullis_config_restart_required 0"));
}

#[tokio::test]
async fn a_plain_write_and_a_kubernetes_symlink_swap_both_reload() {
    let s = sim().await;
    let text = |deployment: &str| {
        format!(
            "{}{}{}",
            head("", ""),
            client("app", ""),
            backend("b", &s.url(), deployment, "")
        )
    };
    // A ConfigMap volume: the file is a symlink through `..data` to a timestamped
    // directory; an update writes a new directory and swaps `..data` atomically.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("..2026_01_01_00_00_00.1")).unwrap();
    std::fs::write(
        d.join("..2026_01_01_00_00_00.1/portcullis.toml"),
        text("m1"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_01_01_00_00_00.1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/portcullis.toml", d.join("portcullis.toml")).unwrap();
    let path = d.join("portcullis.toml");
    let f = Fixture::start_at(dir, path.clone(), true).await;
    let key = f.key("app").await;
    assert_eq!(f.models(&key).await, ["m1"]);

    let d = path.parent().unwrap();
    std::fs::create_dir(d.join("..2026_01_01_00_01_00.2")).unwrap();
    std::fs::write(
        d.join("..2026_01_01_00_01_00.2/portcullis.toml"),
        text("m2"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..2026_01_01_00_01_00.2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    std::fs::remove_dir_all(d.join("..2026_01_01_00_00_00.1")).unwrap();
    wait_for("the swap reloaded", Duration::from_secs(10), async || {
        f.models(&key).await == ["m2"]
    })
    .await;
    assert!(f.reloads("applied").await >= 1);

    // A plain file (the symlink replaced by a regular file), written in place.
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, text("m3")).unwrap();
    wait_for("the write reloaded", Duration::from_secs(10), async || {
        f.models(&key).await == ["m3"]
    })
    .await;
    // An invalid write is refused and counted; the running configuration stays.
    let rejected = f.reloads("rejected").await;
    std::fs::write(&path, "[[backends]]\nname = 1\n").unwrap();
    wait_for(
        "the bad write refused",
        Duration::from_secs(10),
        async || f.reloads("rejected").await > rejected,
    )
    .await;
    assert_eq!(f.models(&key).await, ["m3"]);
    // Other files in the directory are not the configuration.
    let applied = f.reloads("applied").await;
    std::fs::write(d.join("notes.txt"), "x").unwrap();
    tokio::time::sleep(portcullis::reload::DEBOUNCE * 4).await;
    assert_eq!(f.reloads("applied").await, applied);
    assert_eq!(f.reloads("rejected").await, rejected + 1);
}

#[tokio::test]
async fn shutdown_still_drains_a_stream_opened_before_a_reload() {
    let s = sim_with(Duration::from_millis(100)).await;
    let text = |backend_name: &str| {
        format!(
            "{}{}{}",
            head("shutdown_delay = \"0s\"", ""),
            client("app", ""),
            backend(backend_name, &s.url(), "m", "")
        )
    };
    let f = Fixture::start(&text("first"), false).await;
    let key = f.key("app").await;
    let resp = f.chat(&key, "m", true, &[]).await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut body = stream.next().await.unwrap().unwrap().to_vec();
    // The stream's backend is replaced by another.
    let out = f.apply(&text("second")).await;
    assert_eq!(out["changes"]["backends_removed"], json!(["first"]));
    f.running.shutdown();
    wait_for("listener closed", Duration::from_secs(5), async || {
        std::net::TcpStream::connect(f.running.addr).is_err()
    })
    .await;
    while let Some(c) = stream.next().await {
        body.extend_from_slice(&c.unwrap());
    }
    assert!(String::from_utf8(body)
        .unwrap()
        .ends_with("data: [DONE]\n\n"));
    let Fixture { running, .. } = f;
    tokio::time::timeout(Duration::from_secs(10), running.wait())
        .await
        .expect("the gateway stopped after draining");
}

/// Lines of a child's stderr, readable with a deadline.
fn lines(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn read_until(
    rx: &std::sync::mpsc::Receiver<String>,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let done = pred(&l);
                seen.push(l);
                if done {
                    return seen;
                }
            }
            Err(_) => panic!("timed out; output so far:\n{}", seen.join("\n")),
        }
    }
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn serve_reloads_on_sighup_and_portcullis_reload_reports_the_outcome() {
    let s = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.toml");
    let admin = format!("127.0.0.1:{}", dead_port());
    let text = |listen: &str, deployment: &str| {
        format!(
            "[server]\nlisten = \"{listen}\"\n[admin]\nlisten = \"{admin}\"\ntoken_file = \"admin.token\"\n[audit]\npath = \"audit.log\"\n{}{}",
            common::ANYONE,
            backend("b", &s.url(), deployment, "")
        )
    };
    std::fs::write(dir.path().join("admin.token"), "admin-secret-0123456789\n").unwrap();
    std::fs::write(&cfg, text("127.0.0.1:0", "m1")).unwrap();
    // --no-watch: what reloads below is the signal and the command, not the watcher.
    let mut child = Command::new(BIN)
        .args(["serve", "--no-watch", "--config"])
        .arg(&cfg)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let logs = lines(child.stderr.take().unwrap());
    let seen = read_until(&logs, Duration::from_secs(20), |l| {
        l.contains("portcullis is listening")
    });
    let line = seen.last().unwrap();
    let addr = line
        .split("addr=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let models = async || -> Vec<String> {
        let v: Value = http()
            .get(format!("http://{addr}/v1/models"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(models().await, ["m1"]);

    // SIGHUP reloads (twice: the handler stays) and does not stop the process.
    for deployment in ["m2", "m3"] {
        replace(&cfg, &text("127.0.0.1:0", deployment));
        signal(&child, "-HUP");
        read_until(&logs, Duration::from_secs(10), |l| {
            l.contains("configuration reloaded") && l.contains("trigger=\"signal\"")
        });
        assert_eq!(models().await, [deployment]);
        assert!(child.try_wait().unwrap().is_none());
    }

    // `portcullis reload` with an invalid file: the gateway's problems, exit 1; its log
    // names the key and line too.
    let bad = text("127.0.0.1:0", "m4").replace(&s.url(), "not a url");
    replace(&cfg, &bad);
    let reload = {
        let cfg = cfg.clone();
        move || {
            Command::new(BIN)
                .args(["reload", "--config"])
                .arg(&cfg)
                .output()
                .unwrap()
        }
    };
    let out = tokio::task::spawn_blocking(reload.clone()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = bad.lines().position(|l| l.contains("not a url")).unwrap() + 1;
    assert!(
        stdout.contains("configuration rejected (1 problem)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("backends[0].url (line {line})")),
        "{stdout}"
    );
    let logged = read_until(&logs, Duration::from_secs(10), |l| {
        l.contains("configuration reload rejected")
    });
    let logged = logged.last().unwrap();
    assert!(
        logged.contains("backends[0].url") && logged.contains(&format!("(line {line})")),
        "{logged}"
    );
    assert_eq!(models().await, ["m3"]);

    // A valid file that moves the listener: applied but for the address, which needs a
    // restart; said by the command and logged.
    replace(&cfg, &text(&format!("127.0.0.1:{}", dead_port()), "m5"));
    let out = tokio::task::spawn_blocking(reload.clone()).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("configuration reloaded from"), "{stdout}");
    assert!(
        stdout.contains("restart required for: server.listen"),
        "{stdout}"
    );
    read_until(&logs, Duration::from_secs(10), |l| {
        l.contains("only takes effect after a restart") && l.contains("server.listen")
    });
    assert_eq!(models().await, ["m5"]);

    // A wrong admin token: refused, said so.
    std::fs::write(dir.path().join("admin.token"), "wrong-token-000000000\n").unwrap();
    let out = tokio::task::spawn_blocking(reload.clone()).await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));

    // SIGTERM still stops it.
    signal(&child, "-TERM");
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "serve did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(status.success());
    let _ = BACKEND_KEY;
}

#[tokio::test]
async fn secrets_given_as_files_are_read_again_on_reload() {
    let s = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("admin.token"), "admin-token-one-0123456789\n").unwrap();
    std::fs::write(d.join("backend.key"), "not-the-backend-key\n").unwrap();
    let text = format!(
        "{}{}[[backends]]\nname = \"b\"\nurl = \"{}\"\ndeployments = {{ \"m\" = \"gpt-4o\" }}\n[backends.auth]\ntype = \"api_key\"\nkey_file = \"backend.key\"\n",
        head("", "token_file = \"admin.token\""),
        client("app", ""),
        s.url()
    );
    let path = d.join("portcullis.toml");
    std::fs::write(&path, &text).unwrap();
    let mut f = Fixture::start_at(dir, path, false).await;
    let key = f.key("app").await;
    let refused = f.chat(&key, "m", false, &[]).await;
    // The backend refuses the wrong key: the gateway's credential, not the client's.
    assert_eq!(
        common::error_code(refused).await,
        (503, "backend_auth_unavailable".into())
    );

    // Both files rotate; the reload is authorised by the token in force until then.
    replace(&d_of(&f).join("backend.key"), BACKEND_KEY);
    replace(&d_of(&f).join("admin.token"), "admin-token-two-0123456789");
    f.apply(&text).await;
    assert_eq!(f.chat(&key, "m", false, &[]).await.status(), 200);
    let metrics = |token: &str| {
        http()
            .get(format!("{}/metrics", f.admin))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(
        metrics("admin-token-one-0123456789")
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        metrics("admin-token-two-0123456789")
            .await
            .unwrap()
            .status(),
        200
    );
    f.admin_token = Some("admin-token-two-0123456789".into());
    assert_eq!(f.reloads("applied").await, 1);
}

fn d_of(f: &Fixture) -> PathBuf {
    f.path.parent().unwrap().to_path_buf()
}

#[tokio::test]
async fn cool_downs_and_open_circuits_survive_a_reload() {
    let (ptu, paygo, other) = (sim().await, sim().await, sim().await);
    let text = |paygo_weight: u32| {
        format!(
            "{}{}[routing.breaker]\nconsecutive_failures = 1\nopen_for = \"60s\"\n{}{}{}",
            head("", ""),
            client("app", ""),
            backend("ptu", &ptu.url(), "m", "priority = 0"),
            backend(
                "paygo",
                &paygo.url(),
                "m",
                &format!("priority = 1\nweight = {paygo_weight}")
            ),
            backend("flaky", &other.url(), "n", ""),
        )
    };
    let f = Fixture::start(&text(1), false).await;
    let key = f.key("app").await;
    // PTU asks for a minute's rest; "flaky" fails once and opens its circuit.
    ptu.set_behavior(portcullis::sim::Behavior::RateLimited {
        retry_after_ms: 60_000,
        form: portcullis::sim::RetryForm::Ms,
    });
    other.set_behavior(portcullis::sim::Behavior::ServerError(502));
    assert_eq!(f.chat(&key, "m", false, &[]).await.status(), 200);
    assert_eq!(f.chat(&key, "n", false, &[]).await.status(), 502);
    ptu.set_behavior(portcullis::sim::Behavior::Normal);
    other.set_behavior(portcullis::sim::Behavior::Normal);
    let (p, o) = (ptu.captured().len(), other.captured().len());
    f.apply(&text(2)).await;
    // After the reload PTU is still cooling and flaky's circuit still open.
    assert_eq!(f.chat(&key, "m", false, &[]).await.status(), 200);
    assert_eq!(ptu.captured().len(), p, "still cooling after the reload");
    let resp = f.chat(&key, "n", false, &[]).await;
    assert_eq!(
        common::error_code(resp).await,
        (503, "no_usable_backend".into())
    );
    assert_eq!(other.captured().len(), o, "its circuit is still open");
}
