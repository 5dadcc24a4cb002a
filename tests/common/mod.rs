//! Test harness: a simulated backend and a real gateway on loopback, wired by real TOML, and
//! a real OpenID provider ([`idp`]) with a managed-identity endpoint in front of it ([`msi`]).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod idp;
pub mod msi;
pub mod pg;
pub mod pki;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use portcullis::app::{self, Running};
use portcullis::config;
use portcullis::sim::{SimHandle, SimOptions};

/// The key every test backend requires.
pub const BACKEND_KEY: &str = "backend-secret-key-0123456789";

/// HMAC secret of the test stores.
pub const STORE_SECRET: &str = "test-store-hmac-secret-0123456789abcdef";

/// One anonymous client allowed every deployment and operation.
pub const ANYONE: &str =
    "[[clients]]\nid = \"anyone\"\nanonymous = true\ndeployments = [\"*\"]\noperations = [\"*\"]\n";

/// A simulated backend that requires access tokens from `idp` for Azure OpenAI's audience
/// (`https://cognitiveservices.azure.com`, what the default scope asks for).
pub async fn bearer_sim(idp: &idp::Idp) -> SimHandle {
    SimHandle::start(SimOptions {
        bearer: Some(portcullis::sim::BearerCheck {
            jwks_uri: idp.jwks_uri(),
            audience: "https://cognitiveservices.azure.com".to_owned(),
            issuer: Some(idp.issuer()),
        }),
        ..SimOptions::default()
    })
    .await
    .unwrap()
}

/// The Python the SDK tests run: `PORTCULLIS_PYTHON`, or the venv `scripts/test.sh`
/// creates. `needs` says what it must have, for the message when there is none.
pub fn python(needs: &str) -> PathBuf {
    if let Ok(p) = std::env::var("PORTCULLIS_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with {needs}: run scripts/test.sh (it creates .venv) or set PORTCULLIS_PYTHON"
    );
    venv
}

/// Wait until `cond` holds, failing the test after `timeout`.
pub async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A port nothing listens on (bound then released).
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A backend entry for a config.
pub fn backend(name: &str, url: &str, kind: &str, extra: &str) -> String {
    format!(
        "[[backends]]\nname = \"{name}\"\nurl = \"{url}\"\ntype = \"{kind}\"\n{extra}\n[backends.auth]\ntype = \"api_key\"\nkey = \"{BACKEND_KEY}\"\n"
    )
}

pub struct Gateway {
    pub running: Running,
    pub url: String,
    pub admin_url: String,
    pub audit_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Start a gateway from `[server]` extras and backend sections, with one anonymous
    /// client allowed everything (for tests about proxying, not identity).
    pub async fn start(server_extra: &str, backends: &str) -> Gateway {
        Self::start_with(server_extra, ANYONE, backends).await
    }

    /// Start a gateway with explicit identity sections (`[auth]`, `[[issuers]]`,
    /// `[[clients]]`). A `[store]` in a temporary directory is always configured.
    pub async fn start_with(server_extra: &str, identity: &str, backends: &str) -> Gateway {
        Self::start_env(server_extra, identity, backends, &[]).await
    }

    /// [`Gateway::start_with`], with the environment variables the config sees for managed
    /// and workload identity (`IDENTITY_ENDPOINT`, `AZURE_CLIENT_ID`, ...) given here
    /// instead of read from the process.
    pub async fn start_env(
        server_extra: &str,
        identity: &str,
        backends: &str,
        env: &[(&str, &str)],
    ) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let audit_path = dir.path().join("audit.log");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{server_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n[audit]\npath = \"{}\"\n[store]\nurl = \"sqlite://{}\"\nkey_hmac_secret = \"{STORE_SECRET}\"\nrefresh_interval = \"100ms\"\n{identity}\n{backends}",
            audit_path.display(),
            dir.path().join("keys.db").display()
        );
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let lookup = move |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let v = config::load_str_with_env(&text, "test", dir.path(), &lookup)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        let running = app::start(&v).await.unwrap();
        Gateway {
            url: format!("http://{}", running.addr),
            admin_url: format!("http://{}", running.admin_addr.unwrap()),
            running,
            audit_path,
            _dir: dir,
        }
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        http()
            .get(format!("{}/metrics", self.admin_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Issue an API key for `client` into this gateway's store; usable at once.
    pub async fn issue_key(&self, client: &str) -> String {
        let keys = self
            .running
            .keys()
            .expect("the test store enables API keys");
        let (_, key) = keys.admin.create(client, Some("test"), None).await.unwrap();
        keys.api_keys.reload().await.unwrap();
        key.expose().to_owned()
    }

    /// POST the standard chat request (see [`chat_body`]) in the OpenAI style, with extra
    /// headers.
    pub async fn chat(&self, stream: bool, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = http().post(format!("{}/v1/chat/completions", self.url));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.json(&chat_body(stream)).send().await.unwrap()
    }

    /// Wait until the client listener refuses new connections.
    pub async fn wait_listener_closed(&self) {
        let addr = self.running.addr;
        wait_until("listener closed", Duration::from_secs(5), || {
            std::net::TcpStream::connect(addr).is_err()
        })
        .await;
    }

    /// Send raw bytes on a new connection and read until the gateway closes it. Returns
    /// what came back and how long after sending the close came; `None` if the
    /// connection was still open after 5 s.
    pub async fn raw(&self, bytes: &[u8]) -> Option<(Vec<u8>, Duration)> {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(self.running.addr)
            .await
            .unwrap();
        s.write_all(bytes).await.unwrap();
        read_until_closed(&mut s, Instant::now()).await
    }

    /// Audit lines written so far, parsed.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Wait for the audit line of a request id.
    pub async fn audit_for(&self, request_id: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(v) = self
                .audit()
                .into_iter()
                .find(|v| v["request_id"] == request_id)
            {
                return v;
            }
            assert!(Instant::now() < deadline, "no audit line for {request_id}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Read `s` until the peer closes it: what came, and how long after `since` the close was;
/// `None` if it was still open 5 s on.
pub async fn read_until_closed(
    s: &mut tokio::net::TcpStream,
    since: Instant,
) -> Option<(Vec<u8>, Duration)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    read.ok().map(|_| (buf, since.elapsed()))
}

/// A simulator requiring [`BACKEND_KEY`].
pub async fn sim() -> SimHandle {
    sim_with(Duration::ZERO).await
}

pub async fn sim_with(token_latency: Duration) -> SimHandle {
    SimHandle::start(SimOptions {
        api_key: Some(BACKEND_KEY.to_owned()),
        token_latency,
        ..SimOptions::default()
    })
    .await
    .unwrap()
}

/// Two Azure backends serving gpt-4o: `ptu` at priority 0, `paygo` at priority 1.
pub fn ptu_then_paygo(ptu_name: &str, ptu_url: &str, paygo_url: &str) -> String {
    [
        backend(
            ptu_name,
            ptu_url,
            "azure",
            "priority = 0\ndeployments = { \"gpt-4o\" = \"gpt-4o\" }",
        ),
        backend(
            "paygo",
            paygo_url,
            "azure",
            "priority = 1\ndeployments = { \"gpt-4o\" = \"gpt-4o\" }",
        ),
    ]
    .concat()
}

/// One simulator behind one Azure backend named `sim` serving gpt-4o (as gpt-4o-ptu)
/// and text-embedding-3-small.
pub async fn azure_pair(server_extra: &str, backend_extra: &str) -> (SimHandle, Gateway) {
    let s = sim().await;
    let b = backend(
        "sim",
        &s.url(),
        "azure",
        &format!("api_version = \"2024-06-01\"\ndeployments = {{ \"gpt-4o\" = \"gpt-4o-ptu\", \"text-embedding-3-small\" = \"emb\" }}\n{backend_extra}"),
    );
    let g = Gateway::start(server_extra, &b).await;
    (s, g)
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

pub fn chat_body(stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": "gpt-4o",
        "stream": stream,
        "messages": [{ "role": "user", "content": "Hello there" }]
    })
}

/// The gateway error `code` of a response body.
pub async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let v: serde_json::Value = resp.json().await.unwrap();
    assert!(v["error"]["message"].is_string(), "not OpenAI-shaped: {v}");
    assert!(v["error"]["type"].is_string(), "not OpenAI-shaped: {v}");
    (
        status,
        v["error"]["code"].as_str().unwrap_or_default().to_owned(),
    )
}
