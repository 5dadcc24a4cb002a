//! TLS and mutual TLS (issue 16), end to end against a real gateway with `[server.tls]`.
//!
//! Client certificates from a test PKI ([`common::pki`]) are checked with three real TLS
//! clients: a rustls client (tokio-rustls under hyper, which also shows the handshake kind,
//! the negotiated protocol and the server's certificate), `curl --cert/--key`, and the
//! official `openai` Python SDK over HTTP/2 (tests/sdk/tls_check.py). Covered: every
//! certificate outcome (bound, unbound, expired, not yet valid, unknown CA, self-signed,
//! wrong EKU, revoked, none) in `optional` and `required` modes; binding by each matcher;
//! a certificate together with an API key or a JWT; CRLs replaced on disk reaching new
//! handshakes, resumed sessions (TLS 1.3 and 1.2) and open keep-alive connections; a
//! certificate expiring during a session; an expired CRL; the server certificate rotated
//! on disk (by rename, by a Kubernetes-style symlink swap, and a broken file that keeps the
//! old one, on the real binary); forwarded certificates (`xfcc`, its last element,
//! `pem-urlencoded`, base64 DER) honoured only from trusted peers; an early refusal's
//! HTTP/2 framing; garbage and stalled handshakes; the metrics; `[admin.tls]`;
//! configuration errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::pki::{self, Leaf, Names, Pki, BATCH};
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::sim::SimHandle;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, HandshakeKind, SupportedProtocolVersion};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// How long a change on disk (CRL, server certificate) may take to be in force. The
/// contract says about 2 s; the rest is slack for a loaded two-core machine.
const RELOAD: Duration = Duration::from_secs(5);

const H1: &[&[u8]] = &[b"http/1.1"];
const H2: &[&[u8]] = &[b"h2"];
const TLS13: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];
const TLS12: &[&SupportedProtocolVersion] = &[&rustls::version::TLS12];

/// The client bound by [`pki::BATCH`]'s DNS name.
const BATCH_CLIENT: &str = "[[clients]]\nid = \"batch\"\ncertificates = [{ san_dns = \"batch.internal\" }]\ndeployments = [\"*\"]\noperations = [\"*\"]\n";

fn quoted(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

/// `[server.tls]` serving `pki.server`, verifying clients against the root-only bundle and
/// both CRLs; `extra` lines go into the table.
fn server_tls(pki: &Pki, client_auth: &str, extra: &str) -> String {
    let [root_crl, crl] = pki.crl_files();
    format!(
        "[server.tls]\ncert_file = {}\nkey_file = {}\nclient_auth = \"{client_auth}\"\nclient_ca_file = {}\ncrl_files = [{}, {}]\n{extra}\n",
        quoted(&pki.server.cert_file),
        quoted(&pki.server.key_file),
        quoted(&pki.clients_ca()),
        quoted(&root_crl),
        quoted(&crl),
    )
}

fn gpt4o(sim: &SimHandle) -> String {
    backend(
        "sim",
        &sim.url(),
        "azure",
        "deployments = { \"gpt-4o\" = \"gpt-4o\" }",
    )
}

/// A TLS gateway in front of a simulator, with its PKI.
struct Env {
    pki: Pki,
    sim: SimHandle,
    gw: Gateway,
}

impl Env {
    /// `server_extra` holds `[server]` keys; `tls` the whole `[server.tls]` table (and
    /// anything after it, such as `[admin.tls]`).
    async fn start(pki: Pki, server_extra: &str, tls: &str, identity: &str) -> Env {
        let sim = sim().await;
        let gw =
            Gateway::start_with(&format!("{server_extra}\n{tls}"), identity, &gpt4o(&sim)).await;
        Env { pki, sim, gw }
    }

    /// `client_auth` mode, the `batch` client and the anonymous one.
    async fn standard(client_auth: &str) -> Env {
        let pki = Pki::new();
        let tls = server_tls(&pki, client_auth, "");
        Env::start(pki, "", &tls, &[BATCH_CLIENT, ANYONE].concat()).await
    }

    fn https(&self) -> String {
        format!("https://127.0.0.1:{}", self.gw.running.addr.port())
    }

    fn client(&self, leaf: Option<&Leaf>) -> Arc<ClientConfig> {
        rustls_client(&self.pki, leaf, TLS13, H1)
    }

    /// One chat request on a new connection presenting `leaf`.
    async fn attempt(&self, leaf: Option<&Leaf>) -> Attempt {
        attempt(self.gw.running.addr, &self.client(leaf), &[]).await
    }

    async fn failures(&self, reason: &str) -> f64 {
        failures(&self.gw.metrics().await, reason)
    }

    /// Wait until the failure counter for `reason` is above `before`.
    async fn failure_counted(&self, reason: &str, before: f64) {
        eventually(
            &format!("{reason} failure counted"),
            Duration::from_secs(5),
            || async { (self.failures(reason).await > before).then_some(()) },
        )
        .await;
    }
}

/// Poll `f` until it returns `Some`, failing the test after `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sum of the samples of `name` whose labels include `label` (`key="value"`).
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn failures(metrics: &str, reason: &str) -> f64 {
    metric(
        metrics,
        "portcullis_client_certificate_failures_total",
        &format!("reason=\"{reason}\""),
    )
}

fn expiry_days(metrics: &str, listener: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| {
            l.starts_with("portcullis_tls_certificate_expiry_days{")
                && l.contains(&format!("listener=\"{listener}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

// ---------------------------------------------------------------------------------------
// The rustls client.

/// A rustls client trusting the server CA, presenting `leaf` (with its intermediate), and
/// keeping sessions for resumption in a store shared by every connection made with it.
fn rustls_client(
    pki: &Pki,
    leaf: Option<&Leaf>,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(pki.server_ca_der()))
        .unwrap();
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match leaf {
        Some(l) => {
            let chain = rustls_pemfile::certs(&mut l.chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = rustls_pemfile::private_key(&mut l.key_pem.as_bytes())
                .unwrap()
                .unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = rustls::client::Resumption::store(Arc::new(
        rustls::client::ClientSessionMemoryCache::new(32),
    ));
    Arc::new(config)
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// An open TLS connection to the gateway, with what its handshake negotiated.
struct Conn {
    sender: Sender,
    kind: Option<HandshakeKind>,
    /// SHA-256 of the certificate the gateway presented.
    peer_sha256: Option<String>,
    alpn: Option<Vec<u8>>,
    version: Option<rustls::ProtocolVersion>,
    /// The connection driver: ends (with the error, if any) when the connection does.
    driver: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

/// A response from the gateway.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    code: String,
    message: String,
    request_id: String,
}

/// One new connection and one request: the handshake's kind and the response, or why
/// there was none (`Err`: the handshake or the connection failed).
#[derive(Debug)]
struct Attempt {
    kind: Option<HandshakeKind>,
    outcome: Result<Reply, String>,
}

impl Attempt {
    #[track_caller]
    fn reply(&self, status: u16, what: &str) -> &Reply {
        match &self.outcome {
            Ok(r) if r.status == status => r,
            other => panic!("{what}: expected HTTP {status}, got {other:?}"),
        }
    }

    /// The handshake failed with a TLS alert from the gateway.
    #[track_caller]
    fn refused(&self, what: &str) {
        match &self.outcome {
            Ok(r) => panic!(
                "{what}: expected the handshake to fail, got HTTP {} {}",
                r.status, r.code
            ),
            Err(e) => assert!(
                e.contains("alert"),
                "{what}: failed without a TLS alert: {e}"
            ),
        }
    }
}

/// The error and its causes on one line (for an `io::Error`, the TLS error it carries).
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        parts.push(c.to_string());
        cur = c.source();
    }
    parts.join(": ")
}

async fn open(addr: SocketAddr, config: &Arc<ClientConfig>) -> Result<Conn, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let name = ServerName::try_from("localhost").unwrap();
    let tls = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| "no handshake in 10 s".to_owned())?
        .map_err(|e| format!("handshake: {}", describe(&e)))?;
    let (_, c) = tls.get_ref();
    let kind = c.handshake_kind();
    let peer_sha256 = c
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|d| pki::sha256_hex(d));
    let alpn = c.alpn_protocol().map(<[u8]>::to_vec);
    let version = c.protocol_version();
    let io = TokioIo::new(tls);
    let (sender, driver) = if alpn.as_deref() == Some(b"h2") {
        let (s, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| format!("h2 handshake: {}", describe(&e)))?;
        let driver = tokio::spawn(async move { conn.await.map_err(|e| describe(&e)) });
        (Sender::H2(s), driver)
    } else {
        let (s, conn) = http1::handshake(io)
            .await
            .map_err(|e| format!("h1 handshake: {}", describe(&e)))?;
        let driver = tokio::spawn(async move { conn.await.map_err(|e| describe(&e)) });
        (Sender::H1(s), driver)
    };
    Ok(Conn {
        sender,
        kind,
        peer_sha256,
        alpn,
        version,
        driver: Some(driver),
    })
}

impl Conn {
    /// POST the standard chat request with extra headers.
    async fn chat(&mut self, headers: &[(&str, &str)]) -> Result<Reply, String> {
        let rid = format!("tls-{}", uuid::Uuid::new_v4());
        let body = serde_json::to_vec(&chat_body(false)).unwrap();
        let mut b = http::Request::builder()
            .method("POST")
            .header("content-type", "application/json")
            .header("x-request-id", &rid);
        b = match self.sender {
            Sender::H1(_) => b.uri("/v1/chat/completions").header("host", "localhost"),
            Sender::H2(_) => b.uri("https://localhost/v1/chat/completions"),
        };
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(Bytes::from(body))).unwrap();
        let exchange = async {
            let resp = match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await?;
                    s.send_request(req).await?
                }
                Sender::H2(s) => {
                    s.ready().await?;
                    s.send_request(req).await?
                }
            };
            let status = resp.status().as_u16();
            let echoed = resp
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, echoed, body))
        };
        let (status, echoed, body) =
            match tokio::time::timeout(Duration::from_secs(10), exchange).await {
                Err(_) => return Err("no response in 10 s".into()),
                Ok(Err(e)) => {
                    let mut why = describe(&e);
                    // The TLS alert, if any, is what the connection driver saw.
                    if let Some(driver) = self.driver.take_if(|d| d.is_finished()) {
                        if let Ok(Err(d)) = driver.await {
                            why = format!("{why}; connection: {d}");
                        }
                    }
                    return Err(why);
                }
                Ok(Ok(r)) => r,
            };
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok(Reply {
            status,
            code: v["error"]["code"].as_str().unwrap_or_default().to_owned(),
            message: v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            request_id: echoed.unwrap_or(rid),
        })
    }
}

async fn attempt(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    headers: &[(&str, &str)],
) -> Attempt {
    match open(addr, config).await {
        Err(e) => Attempt {
            kind: None,
            outcome: Err(e),
        },
        Ok(mut c) => {
            let outcome = c.chat(headers).await;
            Attempt {
                kind: c.kind,
                outcome,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// curl and the Python SDK.

struct Curl {
    exit: i32,
    /// curl's own message (`-sS`: errors only).
    stderr: String,
    status: u16,
    http_version: String,
    body: String,
}

async fn curl(url: &str, ca: &Path, leaf: Option<&Leaf>, headers: &[(&str, &str)]) -> Curl {
    curl_as("--http2", url, ca, leaf, headers).await
}

/// [`curl`] with `--http2` or `--http1.1`.
async fn curl_as(
    protocol: &str,
    url: &str,
    ca: &Path,
    leaf: Option<&Leaf>,
    headers: &[(&str, &str)],
) -> Curl {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args([
        "-sS",
        protocol,
        "--noproxy",
        "*",
        "--max-time",
        "20",
        "-o",
        "-",
    ])
    .args(["-w", "\n%{http_code} %{http_version}"])
    .arg("--cacert")
    .arg(ca)
    .args(["-H", "content-type: application/json"]);
    if let Some(l) = leaf {
        cmd.arg("--cert")
            .arg(&l.chain_file)
            .arg("--key")
            .arg(&l.key_file);
    }
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    cmd.arg("-d")
        .arg(chat_body(false).to_string())
        .arg(format!("{url}/v1/chat/completions"));
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, tail) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let mut tail = tail.split(' ');
    Curl {
        exit: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        status: tail.next().unwrap_or("0").parse().unwrap_or(0),
        http_version: tail.next().unwrap_or("").to_owned(),
        body: body.to_owned(),
    }
}

/// Run tests/sdk/tls_check.py over `cases`; each case's outcome by name.
async fn python_sdk(
    url: &str,
    ca: &Path,
    cases: Value,
) -> std::collections::HashMap<String, Value> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/tls_check.py");
    let run = tokio::process::Command::new(python("the openai SDK and h2"))
        .arg(&script)
        .env("GATEWAY_URL", url)
        .env("GATEWAY_CA", ca)
        .env("CASES", cases.to_string())
        .env("NO_PROXY", "127.0.0.1")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tls_check.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["name"].as_str().unwrap().to_owned(), v)
        })
        .collect()
}

/// The leaves that must fail the handshake, with the failure reason each is counted under.
fn unverifiable(pki: &Pki) -> [(&Leaf, &'static str); 6] {
    [
        (&pki.expired, "expired"),
        (&pki.not_yet_valid, "not_yet_valid"),
        (&pki.other_ca_leaf, "unknown_issuer"),
        (&pki.self_signed, "unknown_issuer"),
        (&pki.wrong_eku, "bad_usage"),
        (&pki.revoked, "revoked"),
    ]
}

/// The audit line of a request presenting `leaf` names it as [`pki::BATCH`]'s certificate.
#[track_caller]
fn assert_batch_certificate(line: &Value, leaf: &Leaf) {
    let c = &line["client_certificate"];
    assert_eq!(c["sha256"], leaf.sha256(), "{line}");
    assert!(
        c["subject"].as_str().unwrap_or_default().contains("batch"),
        "{line}"
    );
    let san: Vec<&str> = c["san"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in [
        "DNS:batch.internal",
        "URI:spiffe://corp/batch",
        "email:batch@corp.example",
    ] {
        assert!(san.contains(&want), "{want} missing from {san:?}");
    }
    let text = line.to_string();
    assert!(
        !text.contains("BEGIN CERTIFICATE") && !text.contains(&leaf.pem[30..90]),
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------
// Certificate outcomes, with each client.

#[tokio::test]
async fn each_certificate_outcome_with_a_rustls_client() {
    let env = Env::standard("optional").await;
    let p = &env.pki;

    let a = env.attempt(Some(&p.valid)).await;
    let r = a.reply(200, "valid bound certificate");
    let line = env.gw.audit_for(&r.request_id).await;
    assert_eq!(line["client"], "batch");
    assert_eq!(line["auth_method"], "certificate");
    assert_eq!(line["decision"], "allow");
    assert_batch_certificate(&line, &p.valid);

    let before = env.failures("unbound").await;
    let a = env.attempt(Some(&p.unbound)).await;
    let r = a.reply(403, "valid certificate no client binds");
    assert_eq!(r.code, "client_not_allowed");
    let line = env.gw.audit_for(&r.request_id).await;
    assert_eq!(line["decision"], "deny");
    assert!(line.get("client").is_none(), "{line}");
    assert_eq!(line["client_certificate"]["sha256"], p.unbound.sha256());
    env.failure_counted("unbound", before).await;

    for (leaf, reason) in unverifiable(p) {
        let before = env.failures(reason).await;
        env.attempt(Some(leaf)).await.refused(&leaf.name);
        env.failure_counted(reason, before).await;
    }

    // No certificate: the request authenticates as before (here, the anonymous client).
    let r = env.attempt(None).await;
    let r = r.reply(200, "no certificate, optional");
    let line = env.gw.audit_for(&r.request_id).await;
    assert_eq!(line["client"], "anyone");
    assert_eq!(line["auth_method"], "anonymous");
    assert!(line.get("client_certificate").is_none(), "{line}");
    // Only the two allowed requests reached the backend.
    assert_eq!(env.sim.captured().len(), 2);

    let req = Env::standard("required").await;
    let before = req.failures("missing").await;
    req.attempt(None).await.refused("no certificate, required");
    req.failure_counted("missing", before).await;
    req.attempt(Some(&req.pki.valid))
        .await
        .reply(200, "valid, required");
    for (leaf, _) in unverifiable(&req.pki) {
        req.attempt(Some(leaf)).await.refused(&leaf.name);
    }
    assert_eq!(req.sim.captured().len(), 1);
}

#[tokio::test]
async fn each_certificate_outcome_with_curl() {
    let env = Env::standard("optional").await;
    let p = &env.pki;
    let ca = p.server_ca();
    let url = env.https();

    let c = curl(&url, &ca, Some(&p.valid), &[]).await;
    assert_eq!((c.exit, c.status), (0, 200), "{} {}", c.stderr, c.body);
    assert_eq!(c.http_version, "2", "curl --http2 negotiates h2 by ALPN");
    // Over HTTP/1.1: curl 7.88 sometimes drops an h2 response followed by RST_STREAM
    // NO_ERROR (exit 92); the next test checks the h2 framing itself.
    let c = curl_as("--http1.1", &url, &ca, Some(&p.unbound), &[]).await;
    assert_eq!(c.status, 403, "exit {}: {} {}", c.exit, c.stderr, c.body);
    let v: Value = serde_json::from_str(&c.body).unwrap();
    assert_eq!(v["error"]["code"], "client_not_allowed");
    for (leaf, _) in unverifiable(p) {
        let c = curl(&url, &ca, Some(leaf), &[]).await;
        assert!(
            c.exit != 0 && c.status == 0,
            "{}: curl exit {} HTTP {} {}",
            leaf.name,
            c.exit,
            c.status,
            c.body
        );
    }
    let c = curl(&url, &ca, None, &[]).await;
    assert_eq!(
        (c.exit, c.status),
        (0, 200),
        "no certificate, optional: {}",
        c.body
    );

    let req = Env::standard("required").await;
    let c = curl(&req.https(), &req.pki.server_ca(), None, &[]).await;
    assert!(
        c.exit != 0 && c.status == 0,
        "no certificate, required: exit {} HTTP {}",
        c.exit,
        c.status
    );
    let c = curl(
        &req.https(),
        &req.pki.server_ca(),
        Some(&req.pki.valid),
        &[],
    )
    .await;
    assert_eq!((c.exit, c.status), (0, 200), "{} {}", c.stderr, c.body);
}

/// A refusal answered before the request body is read reaches an HTTP/2 client whole
/// (RFC 9113 8.1): the response ends its stream before any RST_STREAM, and a reset after it
/// says NO_ERROR. Watched frame by frame with the `h2` library, with and without the body
/// sent, many times (whether the body has arrived when the gateway answers is a race).
/// curl 7.88 drops such a response now and then (exit 92), which is why the curl matrix
/// checks the refusal over HTTP/1.1.
#[tokio::test]
async fn a_certificate_refusal_over_http2_is_a_complete_response() {
    let env = Env::standard("optional").await;
    let p = &env.pki;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/h2_early_refusal.py");
    let run = tokio::process::Command::new(python("the openai SDK and h2"))
        .arg(&script)
        .env("GATEWAY_PORT", env.gw.running.addr.port().to_string())
        .env("GATEWAY_CA", p.server_ca())
        .env("CLIENT_CERT", &p.unbound.chain_file)
        .env("CLIENT_KEY", &p.unbound.key_file)
        .env("ATTEMPTS", "60")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "h2_early_refusal.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 60);
    for line in stdout.lines() {
        let seen: Vec<String> = serde_json::from_str(line).unwrap();
        let seen: Vec<&str> = seen.iter().map(String::as_str).collect();
        assert!(
            seen == ["status:403", "data", "end"]
                || seen == ["status:403", "data", "end", "reset:0"],
            "{seen:?}"
        );
    }
}

#[tokio::test]
async fn each_certificate_outcome_with_the_openai_sdk_over_http2() {
    let env = Env::standard("optional").await;
    let p = &env.pki;
    let case = |name: &str, leaf: Option<&Leaf>| match leaf {
        Some(l) => json!({ "name": name, "cert": l.chain_file, "key": l.key_file, "stream": true }),
        None => json!({ "name": name, "stream": true }),
    };
    let mut cases = vec![
        case("valid", Some(&p.valid)),
        case("unbound", Some(&p.unbound)),
        case("none", None),
    ];
    cases.extend(unverifiable(p).iter().map(|(l, _)| case(&l.name, Some(*l))));
    let got = python_sdk(&env.https(), &p.server_ca(), Value::Array(cases)).await;

    let valid = &got["valid"];
    assert_eq!(valid["outcome"], "200", "{valid}");
    // Two responses (the answer and the stream), both over HTTP/2.
    assert_eq!(
        valid["http_versions"],
        json!(["HTTP/2", "HTTP/2"]),
        "the SDK spoke HTTP/2: {valid}"
    );
    assert_eq!(
        got["unbound"]["outcome"], "403:client_not_allowed",
        "{}",
        got["unbound"]
    );
    assert_eq!(got["none"]["outcome"], "200", "{}", got["none"]);
    for (leaf, _) in unverifiable(p) {
        assert_eq!(
            got[&leaf.name]["outcome"], "connection_error",
            "{}",
            got[&leaf.name]
        );
    }
    // The SDK's requests are attributed by certificate.
    wait_until(
        "audit lines of the SDK's requests",
        Duration::from_secs(5),
        || {
            env.gw
                .audit()
                .iter()
                .filter(|l| l["client"] == "batch" && l["auth_method"] == "certificate")
                .count()
                == 2
        },
    )
    .await;

    let req = Env::standard("required").await;
    let cases = json!([
        { "name": "none" },
        { "name": "valid", "cert": req.pki.valid.chain_file, "key": req.pki.valid.key_file },
    ]);
    let got = python_sdk(&req.https(), &req.pki.server_ca(), cases).await;
    assert_eq!(
        got["none"]["outcome"], "connection_error",
        "{}",
        got["none"]
    );
    assert_eq!(got["valid"]["outcome"], "200", "{}", got["valid"]);
}

#[tokio::test]
async fn tls_1_2_and_1_3_with_http_1_1_and_h2_by_alpn() {
    let env = Env::standard("optional").await;
    let addr = env.gw.running.addr;
    for (versions, alpn, want_version, want_alpn) in [
        (
            TLS13,
            H1,
            rustls::ProtocolVersion::TLSv1_3,
            b"http/1.1".as_slice(),
        ),
        (
            TLS13,
            H2,
            rustls::ProtocolVersion::TLSv1_3,
            b"h2".as_slice(),
        ),
        (
            TLS12,
            H1,
            rustls::ProtocolVersion::TLSv1_2,
            b"http/1.1".as_slice(),
        ),
        (
            TLS12,
            H2,
            rustls::ProtocolVersion::TLSv1_2,
            b"h2".as_slice(),
        ),
    ] {
        let what = format!("{want_version:?} {}", String::from_utf8_lossy(want_alpn));
        let config = rustls_client(&env.pki, Some(&env.pki.valid), versions, alpn);
        let mut c = open(addr, &config)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(c.version, Some(want_version), "{what}");
        assert_eq!(c.alpn.as_deref(), Some(want_alpn), "{what}");
        assert_eq!(
            c.peer_sha256.as_deref(),
            Some(env.pki.server.sha256().as_str())
        );
        let r = c.chat(&[]).await.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.status, 200, "{what}: {r:?}");
        let line = env.gw.audit_for(&r.request_id).await;
        assert_eq!(line["client"], "batch", "{what}");
        // A second request on the same connection.
        assert_eq!(c.chat(&[]).await.unwrap().status, 200, "{what}");
    }
    // A client without a certificate, on TLS 1.2, is the anonymous client.
    let config = rustls_client(&env.pki, None, TLS12, H1);
    attempt(addr, &config, &[])
        .await
        .reply(200, "TLS 1.2 without a certificate");
}

#[tokio::test]
async fn intermediates_come_from_the_client_or_the_bundle() {
    let pki = Pki::new();
    let leaf_alone = Leaf {
        chain_pem: pki.valid.pem.clone(),
        ..pki.valid.clone()
    };
    // Root-only bundle: the client must send the intermediate.
    let tls = server_tls(&pki, "required", "");
    let env = Env::start(pki, "", &tls, BATCH_CLIENT).await;
    env.attempt(Some(&env.pki.valid))
        .await
        .reply(200, "leaf and intermediate");
    let before = env.failures("unknown_issuer").await;
    env.attempt(Some(&leaf_alone))
        .await
        .refused("leaf alone, root-only bundle");
    env.failure_counted("unknown_issuer", before).await;

    // With the intermediate in the bundle, the leaf alone verifies.
    let pki = Pki::new();
    let leaf_alone = Leaf {
        chain_pem: pki.valid.pem.clone(),
        ..pki.valid.clone()
    };
    let tls = server_tls(&pki, "required", "")
        .replace(&quoted(&pki.clients_ca()), &quoted(&pki.clients_bundle()));
    let env = Env::start(pki, "", &tls, BATCH_CLIENT).await;
    env.attempt(Some(&leaf_alone))
        .await
        .reply(200, "leaf alone, bundle with the intermediate");
    env.attempt(Some(&env.pki.valid))
        .await
        .reply(200, "leaf and intermediate, bundle");
}

// ---------------------------------------------------------------------------------------
// Bindings.

#[tokio::test]
async fn each_binding_kind_identifies_its_client() {
    let pki = Pki::new();
    let dns = pki.client(
        "by-dns",
        &Names {
            cn: "dns-cn",
            dns: &["dns.internal"],
            ..Names::default()
        },
    );
    let uri = pki.client(
        "by-uri",
        &Names {
            cn: "uri-cn",
            uri: &["spiffe://corp/by-uri"],
            ..Names::default()
        },
    );
    let email = pki.client(
        "by-email",
        &Names {
            cn: "email-cn",
            email: &["mailer@corp.example"],
            ..Names::default()
        },
    );
    let cn = pki.client(
        "by-cn",
        &Names {
            cn: "cn-client",
            dns: &["cn-unbound.internal"],
            ..Names::default()
        },
    );
    let pinned = pki.client(
        "pinned",
        &Names {
            cn: "pinned-cn",
            dns: &["pinned.internal"],
            ..Names::default()
        },
    );
    // Thumbprints may be written with colons, in any case.
    let pin = pinned
        .sha256()
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    // Pinning a certificate does not make it trusted: it must still verify.
    let self_signed_pin = pki.self_signed.sha256();
    let client = |id: &str, matcher: String| {
        format!("[[clients]]\nid = \"{id}\"\ncertificates = [{{ {matcher} }}]\ndeployments = [\"*\"]\noperations = [\"*\"]\n")
    };
    let identity = [
        client("by-dns", "san_dns = \"dns.internal\"".into()),
        client("by-uri", "san_uri = \"spiffe://corp/by-uri\"".into()),
        client("by-email", "san_email = \"mailer@corp.example\"".into()),
        client("by-cn", "subject_cn = \"cn-client\"".into()),
        client("pinned", format!("sha256 = \"{pin}\"")),
        client(
            "pinned-self-signed",
            format!("sha256 = \"{self_signed_pin}\""),
        ),
    ]
    .concat();
    let tls = server_tls(&pki, "required", "");
    let env = Env::start(pki, "", &tls, &identity).await;
    for (leaf, id, san) in [
        (&dns, "by-dns", Some("DNS:dns.internal")),
        (&uri, "by-uri", Some("URI:spiffe://corp/by-uri")),
        (&email, "by-email", Some("email:mailer@corp.example")),
        (&cn, "by-cn", None),
        (&pinned, "pinned", Some("DNS:pinned.internal")),
    ] {
        let a = env.attempt(Some(leaf)).await;
        let r = a.reply(200, id);
        let line = env.gw.audit_for(&r.request_id).await;
        assert_eq!(line["client"], id, "{line}");
        assert_eq!(line["auth_method"], "certificate", "{line}");
        assert_eq!(
            line["client_certificate"]["sha256"],
            leaf.sha256(),
            "{line}"
        );
        if let Some(san) = san {
            assert!(
                line["client_certificate"]["san"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s == san),
                "{san} not in {line}"
            );
        }
    }
    assert!(env.gw.audit().iter().any(|l| l["client"] == "by-cn"
        && l["client_certificate"]["subject"]
            .as_str()
            .unwrap_or_default()
            .contains("cn-client")));
    env.attempt(Some(&env.pki.self_signed))
        .await
        .refused("pinned but self-signed");
    // The batch certificate matches none of these bindings.
    let r = env.attempt(Some(&env.pki.valid)).await;
    assert_eq!(r.reply(403, "unbound").code, "client_not_allowed");
}

#[tokio::test]
async fn a_certificate_and_an_api_key_or_jwt_must_name_the_same_client() {
    let issuer = portcullis::sim::issuer::DemoIssuer::start().await.unwrap();
    let identity = format!(
        r#"
[[issuers]]
name = "corp"
issuer = "{}"
audiences = ["api://tls"]
[[clients]]
id = "batch"
certificates = [{{ san_dns = "batch.internal" }}]
jwt = [{{ issuer = "corp", claims = {{ azp = "batch-app" }} }}]
deployments = ["*"]
operations = ["*"]
[[clients]]
id = "other"
jwt = [{{ issuer = "corp", claims = {{ azp = "other-app" }} }}]
deployments = ["*"]
operations = ["*"]
"#,
        issuer.issuer()
    );
    let pki = Pki::new();
    let tls = server_tls(&pki, "optional", "");
    let env = Env::start(pki, "", &tls, &identity).await;
    let addr = env.gw.running.addr;
    let with_cert = env.client(Some(&env.pki.valid));
    let without = env.client(None);
    let batch_key = env.gw.issue_key("batch").await;
    let other_key = env.gw.issue_key("other").await;
    let jwt = |azp: &str, sub: &str| {
        issuer
            .sign(
                "api://tls",
                Duration::from_secs(600),
                json!({ "azp": azp, "sub": sub }),
            )
            .unwrap()
    };
    let batch_jwt = format!("Bearer {}", jwt("batch-app", "batch-user"));
    let other_jwt = format!("Bearer {}", jwt("other-app", "other-user"));

    // They agree: the header credential is the principal, the certificate is audited too.
    let a = attempt(addr, &with_cert, &[("api-key", batch_key.as_str())]).await;
    let r = a.reply(200, "certificate and the same client's key");
    let line = env.gw.audit_for(&r.request_id).await;
    assert_eq!(line["client"], "batch");
    assert_eq!(line["auth_method"], "api_key");
    assert_eq!(line["client_certificate"]["sha256"], env.pki.valid.sha256());
    let a = attempt(addr, &with_cert, &[("authorization", batch_jwt.as_str())]).await;
    let r = a.reply(200, "certificate and the same client's token");
    let line = env.gw.audit_for(&r.request_id).await;
    assert_eq!(line["client"], "batch");
    assert_eq!(line["auth_method"], "jwt");
    assert_eq!(line["identity"]["subject"], "batch-user");
    assert_eq!(line["client_certificate"]["sha256"], env.pki.valid.sha256());

    // They disagree: refused, whichever credential is the header.
    for (what, header) in [
        ("api-key", other_key.as_str()),
        ("authorization", other_jwt.as_str()),
    ] {
        let a = attempt(addr, &with_cert, &[(what, header)]).await;
        let r = a.reply(403, &format!("certificate and another client's {what}"));
        assert_eq!(r.code, "identity_mismatch", "{r:?}");
        let line = env.gw.audit_for(&r.request_id).await;
        assert_eq!(line["decision"], "deny");
    }
    // The other client's credentials work on their own.
    attempt(addr, &without, &[("api-key", other_key.as_str())])
        .await
        .reply(200, "other's key alone");
    attempt(addr, &without, &[("authorization", other_jwt.as_str())])
        .await
        .reply(200, "other's token alone");
    assert_eq!(env.sim.captured().len(), 4);
}

// ---------------------------------------------------------------------------------------
// Revocation while running.

/// Wait until a full handshake with `leaf` fails.
async fn until_refused(env: &Env, leaf: &Leaf) {
    eventually(
        &format!("{} refused after the CRL change", leaf.name),
        RELOAD,
        || async {
            let a = env.attempt(Some(leaf)).await;
            match &a.outcome {
                Err(_) => Some(()),
                // A handshake verified just before the new CRL was read: its first request
                // is checked again and refused. Not yet the handshake failure waited for.
                Ok(r) if r.status == 401 && r.code == "invalid_client_certificate" => None,
                Ok(r) => {
                    assert_eq!(r.status, 200, "before the reload: {r:?}");
                    None
                }
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_crl_replaced_on_disk_refuses_new_handshakes() {
    let env = Env::standard("optional").await;
    let other = env.pki.client("other-batch", &BATCH);
    env.attempt(Some(&env.pki.valid))
        .await
        .reply(200, "before revocation");
    let before = env.failures("revoked").await;
    env.pki.write_crl(&[&env.pki.valid]);
    until_refused(&env, &env.pki.valid).await;
    env.failure_counted("revoked", before).await;
    // Only that certificate: another one for the same names still works.
    env.attempt(Some(&other))
        .await
        .reply(200, "a certificate the CRL does not list");
    // curl, on a fresh connection, is refused too.
    let c = curl(
        &env.https(),
        &env.pki.server_ca(),
        Some(&env.pki.valid),
        &[],
    )
    .await;
    assert!(
        c.exit != 0 && c.status == 0,
        "curl after revocation: exit {} HTTP {}",
        c.exit,
        c.status
    );
}

#[tokio::test]
async fn a_crl_replaced_on_disk_reaches_resumed_sessions() {
    for (versions, label) in [(TLS13, "TLS 1.3"), (TLS12, "TLS 1.2")] {
        let env = Env::standard("optional").await;
        let addr = env.gw.running.addr;
        let valid = &env.pki.valid;
        // One client, one session store: its second connection resumes the first's session.
        let config = rustls_client(&env.pki, Some(valid), versions, H1);
        let first = attempt(addr, &config, &[]).await;
        first.reply(200, label);
        assert_eq!(first.kind, Some(HandshakeKind::Full), "{label}");
        let second = attempt(addr, &config, &[]).await;
        assert_eq!(
            second.kind,
            Some(HandshakeKind::Resumed),
            "{label}: the gateway resumes sessions"
        );
        let r = second.reply(200, &format!("{label}, resumed before revocation"));
        let line = env.gw.audit_for(&r.request_id).await;
        assert_eq!(
            line["client"], "batch",
            "{label}: a resumed session keeps its certificate"
        );
        assert_eq!(
            line["client_certificate"]["sha256"],
            valid.sha256(),
            "{label}"
        );

        env.pki.write_crl(&[valid]);
        // In force once a new full handshake (a client without the session) is refused.
        until_refused(&env, valid).await;
        let third = attempt(addr, &config, &[]).await;
        assert_eq!(
            third.kind,
            Some(HandshakeKind::Resumed),
            "{label}: {third:?}"
        );
        if let Ok(r) = &third.outcome {
            assert_eq!(
                (r.status, r.code.as_str()),
                (401, "invalid_client_certificate"),
                "{label}: {r:?}"
            );
            assert!(
                r.message.to_lowercase().contains("revoked"),
                "{label}: {r:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_crl_replaced_on_disk_reaches_open_keep_alive_connections() {
    let env = Env::standard("optional").await;
    let addr = env.gw.running.addr;
    let valid = &env.pki.valid;
    let mut h1 = open(addr, &rustls_client(&env.pki, Some(valid), TLS13, H1))
        .await
        .unwrap();
    let mut h2 = open(addr, &rustls_client(&env.pki, Some(valid), TLS12, H2))
        .await
        .unwrap();
    assert_eq!(h2.alpn.as_deref(), Some(b"h2".as_slice()));
    for c in [&mut h1, &mut h2] {
        assert_eq!(c.chat(&[]).await.unwrap().status, 200);
    }
    env.pki.write_crl(&[valid]);
    until_refused(&env, valid).await;
    let forwarded = env.sim.captured().len();
    for (c, label) in [(&mut h1, "http/1.1"), (&mut h2, "h2")] {
        let r = c
            .chat(&[])
            .await
            .unwrap_or_else(|e| panic!("{label}: no answer: {e}"));
        assert_eq!(
            (r.status, r.code.as_str()),
            (401, "invalid_client_certificate"),
            "{label}: {r:?}"
        );
        assert!(
            r.message.to_lowercase().contains("revoked"),
            "{label}: {r:?}"
        );
    }
    assert_eq!(
        env.sim.captured().len(),
        forwarded,
        "a refused request reached the backend"
    );
}

/// rustls does not verify a certificate again on resumption, nor on later requests of a
/// keep-alive connection: one that expires after its handshake must still stop working.
#[tokio::test]
async fn a_certificate_that_expires_during_a_session_is_refused_on_resumption_and_keep_alive() {
    let pki = Pki::new();
    let tls = server_tls(&pki, "optional", "");
    let env = Env::start(pki, "", &tls, &[BATCH_CLIENT, ANYONE].concat()).await;
    let addr = env.gw.running.addr;
    // Issued once the gateway runs (it trusts the CA, not the leaf), so that its few
    // seconds of validity are all for the two requests below, even on a loaded machine.
    let not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(5);
    let short = env.pki.client_until("short-lived", &BATCH, not_after);
    let config = rustls_client(&env.pki, Some(&short), TLS13, H1);
    let mut kept = open(addr, &config).await.unwrap();
    assert_eq!(kept.chat(&[]).await.unwrap().status, 200);
    let resumed = attempt(addr, &config, &[]).await;
    assert_eq!(resumed.kind, Some(HandshakeKind::Resumed));
    resumed.reply(200, "resumed while the certificate is valid");

    // Wait for the clock to pass notAfter (whole seconds in the certificate), not a guess.
    let expired_at =
        std::time::UNIX_EPOCH + Duration::from_secs(not_after.unix_timestamp() as u64 + 1);
    while std::time::SystemTime::now() < expired_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = kept
        .chat(&[])
        .await
        .expect("the keep-alive connection answers");
    assert_eq!(
        (r.status, r.code.as_str()),
        (401, "invalid_client_certificate"),
        "{r:?}"
    );
    assert!(r.message.contains("expired"), "{r:?}");
    let resumed = attempt(addr, &config, &[]).await;
    assert_eq!(resumed.kind, Some(HandshakeKind::Resumed), "{resumed:?}");
    if let Ok(r) = &resumed.outcome {
        assert_eq!(
            (r.status, r.code.as_str()),
            (401, "invalid_client_certificate"),
            "{r:?}"
        );
        assert!(r.message.contains("expired"), "{r:?}");
    }
    env.attempt(Some(&short))
        .await
        .refused("a full handshake after notAfter");
}

#[tokio::test]
async fn an_expired_crl_is_denied_by_default_and_allowed_when_configured() {
    for (setting, allowed) in [
        ("", false),
        ("crl_expired = \"deny\"", false),
        ("crl_expired = \"allow\"", true),
    ] {
        let pki = Pki::new();
        pki.write_expired_crl();
        let tls = server_tls(&pki, "optional", setting);
        let env = Env::start(pki, "", &tls, &[BATCH_CLIENT, ANYONE].concat()).await;
        let before = env.failures("crl_expired").await;
        let a = env.attempt(Some(&env.pki.valid)).await;
        if allowed {
            a.reply(200, setting);
            // Still a CRL: what it lists stays revoked.
            env.attempt(Some(&env.pki.revoked))
                .await
                .refused("revoked, expired CRL allowed");
        } else {
            match &a.outcome {
                Err(_) => {}
                Ok(r) => assert_eq!(
                    (r.status, r.code.as_str()),
                    (401, "invalid_client_certificate"),
                    "{setting:?}: {r:?}"
                ),
            }
            env.failure_counted("crl_expired", before).await;
            // A client without a certificate does not depend on the CRL.
            env.attempt(None).await.reply(200, "no certificate");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Server certificate rotation.

/// `portcullis serve` as a process, with its stderr kept.
struct Serve {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    fn start(config: &Path) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["serve", "--config"])
            .arg(config)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("portcullis is listening") {
                    let _ = tx.send(line.clone());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                panic!(
                    "the gateway did not start:\n{}",
                    log.lock().unwrap().join("\n")
                )
            });
        let field = |key: &str| -> SocketAddr {
            let rest = line.split(key).nth(1).unwrap();
            rest.trim_start_matches("Some(")
                .split(|c: char| c == ')' || c.is_whitespace())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        Serve {
            addr: field(" addr="),
            admin: field(" admin="),
            child,
            log,
        }
    }

    fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    async fn metrics(&self) -> String {
        http()
            .get(format!("http://{}/metrics", self.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// Wait until a new connection gets the certificate `sha256`.
async fn until_served(addr: SocketAddr, config: &Arc<ClientConfig>, sha256: &str) {
    eventually(
        "new connections get the new certificate",
        RELOAD,
        || async {
            let c = open(addr, config).await.ok()?;
            (c.peer_sha256.as_deref() == Some(sha256)).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_rotated_server_certificate_reaches_new_connections_and_spares_open_ones() {
    let pki = Pki::new();
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("server.pem");
    let key = dir.path().join("server.key");
    std::fs::copy(&pki.server.cert_file, &cert).unwrap();
    std::fs::copy(&pki.server.key_file, &key).unwrap();
    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 2\n[server.tls]\ncert_file = {}\nkey_file = {}\n[admin]\nlisten = \"127.0.0.1:0\"\n[audit]\npath = {}\n[store]\nurl = \"sqlite::memory:\"\n{ANYONE}\n{}",
            quoted(&cert),
            quoted(&key),
            quoted(&dir.path().join("audit.log")),
            gpt4o(&sim),
        ),
    )
    .unwrap();
    let gw = Serve::start(&config);
    let client = rustls_client(&pki, None, TLS13, H1);
    let mut old = open(gw.addr, &client).await.unwrap();
    assert_eq!(
        old.peer_sha256.as_deref(),
        Some(pki.server.sha256().as_str())
    );
    assert_eq!(old.chat(&[]).await.unwrap().status, 200);
    let days =
        expiry_days(&gw.metrics().await, "client").expect("expiry gauge for the client listener");
    assert!((29.0..=30.0).contains(&days), "{days}");

    // The RSA certificate replaces the ECDSA one.
    pki::replace(&key, pki.server2.key_pem.as_bytes());
    pki::replace(&cert, pki.server2.pem.as_bytes());
    until_served(gw.addr, &client, &pki.server2.sha256()).await;
    let r = old
        .chat(&[])
        .await
        .expect("the connection opened before the rotation still works");
    assert_eq!(r.status, 200);
    let mut new = open(gw.addr, &client).await.unwrap();
    assert_eq!(new.chat(&[]).await.unwrap().status, 200);
    eventually(
        "the expiry gauge follows the served certificate",
        RELOAD,
        || async {
            let days = expiry_days(&gw.metrics().await, "client")?;
            (59.0..=60.0).contains(&days).then_some(())
        },
    )
    .await;

    // A broken file keeps the certificate in use, and says which file.
    pki::replace(
        &cert,
        b"-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n",
    );
    let path = cert.display().to_string();
    eventually(
        "the broken certificate file is logged with its path",
        RELOAD,
        || async { gw.logged(&path).then_some(()) },
    )
    .await;
    let mut after = open(gw.addr, &client)
        .await
        .expect("still serving after a broken file");
    assert_eq!(
        after.peer_sha256.as_deref(),
        Some(pki.server2.sha256().as_str())
    );
    assert_eq!(after.chat(&[]).await.unwrap().status, 200);
    assert_eq!(old.chat(&[]).await.unwrap().status, 200);
}

#[tokio::test]
async fn a_server_certificate_swapped_by_a_kubernetes_symlink_is_served() {
    // secret/tls.crt -> ..data/tls.crt, ..data -> ..v1 (what a mounted Secret looks like).
    let pki = Pki::new();
    let secret = tempfile::tempdir().unwrap();
    let s = secret.path();
    let version = |name: &str, leaf: &Leaf| {
        std::fs::create_dir(s.join(name)).unwrap();
        std::fs::write(s.join(name).join("tls.crt"), &leaf.pem).unwrap();
        std::fs::write(s.join(name).join("tls.key"), &leaf.key_pem).unwrap();
    };
    version("..v1", &pki.server);
    std::os::unix::fs::symlink("..v1", s.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", s.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", s.join("tls.key")).unwrap();
    let tls = format!(
        "[server.tls]\ncert_file = {}\nkey_file = {}\n",
        quoted(&s.join("tls.crt")),
        quoted(&s.join("tls.key"))
    );
    let env = Env::start(pki, "", &tls, ANYONE).await;
    let addr = env.gw.running.addr;
    let client = rustls_client(&env.pki, None, TLS13, H2);
    let mut old = open(addr, &client).await.unwrap();
    assert_eq!(
        old.peer_sha256.as_deref(),
        Some(env.pki.server.sha256().as_str())
    );
    assert_eq!(old.chat(&[]).await.unwrap().status, 200);

    version("..v2", &env.pki.server2);
    std::os::unix::fs::symlink("..v2", s.join("..data_tmp")).unwrap();
    std::fs::rename(s.join("..data_tmp"), s.join("..data")).unwrap();
    std::fs::remove_dir_all(s.join("..v1")).unwrap();
    until_served(addr, &client, &env.pki.server2.sha256()).await;
    assert_eq!(
        old.chat(&[]).await.unwrap().status,
        200,
        "the h2 connection opened before"
    );
}

// ---------------------------------------------------------------------------------------
// Forwarded certificates.

/// Percent-encode everything but unreserved characters (as Envoy and nginx do).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// An Envoy `x-forwarded-client-cert` element for `leaf`.
fn xfcc(leaf: &Leaf) -> String {
    format!(
        "By=spiffe://corp/gateway;Hash={};Cert=\"{}\";Subject=\"CN=batch,O=Portcullis Tests\";URI=spiffe://corp/batch;DNS=batch.internal",
        leaf.sha256(),
        url_encode(&leaf.pem)
    )
}

/// `[server.tls]` with only a client CA (the bundle: a forwarded certificate comes alone),
/// the CRLs and `forwarded_cert`: the listener stays plain HTTP.
fn forwarded_tls(pki: &Pki, header: &str, format: &str) -> String {
    let [root_crl, crl] = pki.crl_files();
    format!(
        "[server.tls]\nclient_ca_file = {}\ncrl_files = [{}, {}]\nforwarded_cert = {{ header = \"{header}\", format = \"{format}\", trusted_proxies = [\"127.0.0.1/32\"] }}\n",
        quoted(&pki.clients_bundle()),
        quoted(&root_crl),
        quoted(&crl)
    )
}

/// A plain-HTTP client whose connections come from `ip`.
fn http_from(ip: [u8; 4]) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .local_address(IpAddr::from(ip))
        .build()
        .unwrap()
}

async fn forwarded(
    gw: &Gateway,
    from: [u8; 4],
    header: &str,
    value: &str,
) -> (u16, String, String, String) {
    let rid = format!("fwd-{}", uuid::Uuid::new_v4());
    let resp = http_from(from)
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("x-request-id", &rid)
        .header(header, value)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    let code = v["error"]["code"].as_str().unwrap_or_default().to_owned();
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, code, message, rid)
}

#[tokio::test]
async fn a_forwarded_certificate_counts_only_from_a_trusted_proxy() {
    let pki = Pki::new();
    let tls = forwarded_tls(&pki, "x-forwarded-client-cert", "xfcc");
    let env = Env::start(pki, "", &tls, &[BATCH_CLIENT, ANYONE].concat()).await;
    assert!(env.gw.url.starts_with("http://"));
    let header = "x-forwarded-client-cert";
    let value = xfcc(&env.pki.valid);

    let (status, _, _, rid) = forwarded(&env.gw, [127, 0, 0, 1], header, &value).await;
    assert_eq!(status, 200);
    let line = env.gw.audit_for(&rid).await;
    assert_eq!(line["client"], "batch");
    assert_eq!(line["auth_method"], "certificate");
    assert_batch_certificate(&line, &env.pki.valid);
    let upstream = env.sim.last().unwrap();
    assert!(
        upstream.headers.get(header).is_none(),
        "the header reached the backend"
    );

    // From a peer not in trusted_proxies the header is nobody's word: ignored, and removed.
    let (status, _, _, rid) = forwarded(&env.gw, [127, 0, 0, 2], header, &value).await;
    assert_eq!(status, 200);
    let line = env.gw.audit_for(&rid).await;
    assert_eq!(line["client"], "anyone", "{line}");
    assert_eq!(line["auth_method"], "anonymous");
    assert!(line.get("client_certificate").is_none(), "{line}");
    let upstream = env.sim.last().unwrap();
    assert!(
        upstream.headers.get(header).is_none(),
        "an untrusted peer's header reached the backend"
    );
    assert_eq!(env.sim.captured().len(), 2);

    // Without an anonymous client, the untrusted peer has no identity at all.
    let pki = Pki::new();
    let tls = forwarded_tls(&pki, header, "xfcc");
    let env = Env::start(pki, "", &tls, BATCH_CLIENT).await;
    let value = xfcc(&env.pki.valid);
    let (status, _, _, _) = forwarded(&env.gw, [127, 0, 0, 2], header, &value).await;
    assert_eq!(status, 401);
    let (status, _, _, _) = forwarded(&env.gw, [127, 0, 0, 1], header, &value).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_forwarded_certificate_is_validated_by_the_gateway() {
    let pki = Pki::new();
    let tls = forwarded_tls(&pki, "x-forwarded-client-cert", "xfcc");
    let env = Env::start(pki, "", &tls, &[BATCH_CLIENT, ANYONE].concat()).await;
    let header = "x-forwarded-client-cert";
    let p = &env.pki;
    for (leaf, reason) in unverifiable(p) {
        let before = env.failures(reason).await;
        let (status, code, message, _) =
            forwarded(&env.gw, [127, 0, 0, 1], header, &xfcc(leaf)).await;
        assert_eq!(
            (status, code.as_str()),
            (401, "invalid_client_certificate"),
            "{}: {message}",
            leaf.name
        );
        assert!(
            !message.is_empty(),
            "{}: the reason is in the message",
            leaf.name
        );
        match reason {
            "expired" => assert!(message.to_lowercase().contains("expired"), "{message}"),
            "revoked" => assert!(message.to_lowercase().contains("revoked"), "{message}"),
            _ => {}
        }
        env.failure_counted(reason, before).await;
    }
    let before = env.failures("malformed").await;
    for garbage in [
        "Hash=00;Cert=\"not%20a%20certificate\"",
        "%%%",
        "Cert=\"-----BEGIN CERTIFICATE-----%0AAAAA%0A-----END CERTIFICATE-----\"",
    ] {
        let (status, code, _, _) = forwarded(&env.gw, [127, 0, 0, 1], header, garbage).await;
        assert_eq!(
            (status, code.as_str()),
            (401, "invalid_client_certificate"),
            "{garbage}"
        );
    }
    env.failure_counted("malformed", before).await;
    let (status, code, _, _) = forwarded(&env.gw, [127, 0, 0, 1], header, &xfcc(&p.unbound)).await;
    assert_eq!((status, code.as_str()), (403, "client_not_allowed"));
    assert_eq!(env.sim.captured().len(), 0);
    // A CRL change reaches forwarded certificates too.
    assert_eq!(
        forwarded(&env.gw, [127, 0, 0, 1], header, &xfcc(&p.valid))
            .await
            .0,
        200
    );
    p.write_crl(&[&p.valid]);
    eventually(
        "a forwarded certificate refused after the CRL change",
        RELOAD,
        || async {
            let (status, code, _, _) =
                forwarded(&env.gw, [127, 0, 0, 1], header, &xfcc(&p.valid)).await;
            (status == 401 && code == "invalid_client_certificate").then_some(())
        },
    )
    .await;
}

/// XFCC carries one element per proxy hop, and a client can put its own in front: the
/// element the trusted proxy added (the last) is the one read.
#[tokio::test]
async fn the_last_xfcc_element_is_the_trusted_proxys() {
    let pki = Pki::new();
    let tls = forwarded_tls(&pki, "x-forwarded-client-cert", "xfcc");
    let env = Env::start(pki, "", &tls, &[BATCH_CLIENT, ANYONE].concat()).await;
    let header = "x-forwarded-client-cert";
    let p = &env.pki;
    let forged_then_real = format!("{},{}", xfcc(&p.unbound), xfcc(&p.valid));
    let (status, _, _, rid) = forwarded(&env.gw, [127, 0, 0, 1], header, &forged_then_real).await;
    assert_eq!(status, 200);
    assert_eq!(
        env.gw.audit_for(&rid).await["client_certificate"]["sha256"],
        p.valid.sha256()
    );
    let real_then_other = format!("{},{}", xfcc(&p.valid), xfcc(&p.unbound));
    let (status, code, _, _) = forwarded(&env.gw, [127, 0, 0, 1], header, &real_then_other).await;
    assert_eq!((status, code.as_str()), (403, "client_not_allowed"));
}

#[tokio::test]
async fn pem_urlencoded_and_base64_der_forwarded_certificates() {
    use base64::Engine;
    let pki = Pki::new();
    let header = "x-ssl-client-cert";
    let tls = forwarded_tls(&pki, header, "pem-urlencoded");
    let env = Env::start(pki, "", &tls, &[BATCH_CLIENT, ANYONE].concat()).await;
    let nginx = url_encode(&env.pki.valid.pem);
    let azure = base64::engine::general_purpose::STANDARD.encode(&env.pki.valid.der);
    for (what, value) in [("url-encoded PEM", &nginx), ("base64 DER", &azure)] {
        let (status, code, message, rid) = forwarded(&env.gw, [127, 0, 0, 1], header, value).await;
        assert_eq!(status, 200, "{what}: {code} {message}");
        let line = env.gw.audit_for(&rid).await;
        assert_eq!(line["client"], "batch", "{what}");
        assert_eq!(
            line["client_certificate"]["sha256"],
            env.pki.valid.sha256(),
            "{what}"
        );
        assert!(
            env.sim.last().unwrap().headers.get(header).is_none(),
            "{what}"
        );

        let (status, _, _, rid) = forwarded(&env.gw, [127, 0, 0, 2], header, value).await;
        assert_eq!(status, 200, "{what} from an untrusted peer");
        assert_eq!(env.gw.audit_for(&rid).await["client"], "anyone", "{what}");
        assert!(
            env.sim.last().unwrap().headers.get(header).is_none(),
            "{what}"
        );
    }
    let (status, code, _, _) = forwarded(
        &env.gw,
        [127, 0, 0, 1],
        header,
        &url_encode(&env.pki.expired.pem),
    )
    .await;
    assert_eq!((status, code.as_str()), (401, "invalid_client_certificate"));
}

// ---------------------------------------------------------------------------------------
// Garbage and stalled handshakes.

#[tokio::test]
async fn garbage_instead_of_a_client_hello_closes_the_connection_promptly() {
    let pki = Pki::new();
    let tls = server_tls(&pki, "optional", "");
    let env = Env::start(
        pki,
        "header_timeout = \"10s\"",
        &tls,
        &[BATCH_CLIENT, ANYONE].concat(),
    )
    .await;
    let mut hello_garbage = b"\x16\x03\x01\x00\x40".to_vec();
    hello_garbage.extend(std::iter::repeat_n(0xA5u8, 0x40));
    for bytes in [
        b"this is not a ClientHello\r\n\r\n".as_slice(),
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        &hello_garbage,
        &[0u8; 4096],
    ] {
        let (back, took) = env
            .gw
            .raw(bytes)
            .await
            .expect("the connection was left open");
        assert!(took < Duration::from_secs(2), "closed after {took:?}");
        assert!(!back.starts_with(b"HTTP/"), "answered in plain HTTP");
    }
    env.attempt(Some(&env.pki.valid))
        .await
        .reply(200, "after the garbage");
}

#[tokio::test]
async fn silent_and_stalled_handshakes_end_at_header_timeout_without_blocking_others() {
    let pki = Pki::new();
    let tls = server_tls(&pki, "optional", "");
    let env = Env::start(
        pki,
        "header_timeout = \"1s\"",
        &tls,
        &[BATCH_CLIENT, ANYONE].concat(),
    )
    .await;
    let addr = env.gw.running.addr;
    // 100 connections that say nothing, 100 that send the start of a ClientHello record
    // and stall: each must be closed by the header timeout, not before.
    let mut waits = Vec::new();
    for i in 0..200 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let opened = Instant::now();
        if i % 2 == 1 {
            s.write_all(b"\x16\x03\x01\x02\x00\x01\x00").await.unwrap();
        }
        waits.push(tokio::spawn(async move {
            read_until_closed(&mut s, opened).await
        }));
    }
    // Meanwhile a real client is served at once.
    let started = Instant::now();
    env.attempt(Some(&env.pki.valid))
        .await
        .reply(200, "during the flood");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    for w in waits {
        let (_, took) = w
            .await
            .unwrap()
            .expect("a stalled connection was not closed within 5 s");
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "closed after {took:?} with header_timeout = 1s"
        );
    }
    // A completed handshake with no request after it is closed by the same timeout.
    let mut c = open(addr, &env.client(None)).await.unwrap();
    let opened = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), c.driver.take().unwrap())
        .await
        .expect("an idle TLS connection stayed open")
        .unwrap()
        .ok();
    assert!(
        opened.elapsed() >= Duration::from_millis(900),
        "{:?}",
        opened.elapsed()
    );
    env.attempt(Some(&env.pki.valid))
        .await
        .reply(200, "after the flood");
}

// ---------------------------------------------------------------------------------------
// Metrics and the admin listener.

#[tokio::test]
async fn expiry_gauges_and_an_admin_listener_with_its_own_certificate() {
    let pki = Pki::new();
    let tls = format!(
        "{}[admin.tls]\ncert_file = {}\nkey_file = {}\n",
        server_tls(&pki, "optional", ""),
        quoted(&pki.server2.cert_file),
        quoted(&pki.server2.key_file)
    );
    let env = Env::start(pki, "", &tls, &[BATCH_CLIENT, ANYONE].concat()).await;
    let admin = env.gw.running.admin_addr.unwrap();
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(
            &std::fs::read(env.pki.server_ca()).unwrap(),
        )
        .unwrap()])
        .build()
        .unwrap();
    let resp = client
        .get(format!("https://localhost:{}/metrics", admin.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let metrics = resp.text().await.unwrap();
    let client_days = expiry_days(&metrics, "client").expect("client listener gauge");
    let admin_days = expiry_days(&metrics, "admin").expect("admin listener gauge");
    assert!((29.0..=30.0).contains(&client_days), "{client_days}");
    assert!((59.0..=60.0).contains(&admin_days), "{admin_days}");
    // The admin listener speaks TLS only.
    assert!(http()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true));
    // And serves its own certificate.
    let c = open(admin, &rustls_client(&env.pki, None, TLS13, H1))
        .await
        .unwrap();
    assert_eq!(
        c.peer_sha256.as_deref(),
        Some(env.pki.server2.sha256().as_str())
    );
}

// ---------------------------------------------------------------------------------------
// Configuration errors.

#[test]
fn tls_configuration_errors_name_the_key() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not PEM at all").unwrap();
    let sec1 = dir.path().join("server.sec1.key");
    std::fs::write(&sec1, pki::sec1_key_pem(&pki.server)).unwrap();
    let load = |server_tls: &str, clients: &str| {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{server_tls}\n[store]\nurl = \"sqlite::memory:\"\n{clients}\n[[backends]]\nname = \"sim\"\nurl = \"http://127.0.0.1:9\"\ndeployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n"
        );
        portcullis::config::load_str(&text, "test", dir.path())
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let cert = quoted(&pki.server.cert_file);
    let key = quoted(&pki.server.key_file);
    let bind = |id: &str, matcher: &str| {
        format!("[[clients]]\nid = \"{id}\"\ncertificates = [{{ {matcher} }}]\ndeployments = [\"*\"]\noperations = [\"*\"]\n")
    };
    let mtls = server_tls(&pki, "optional", "");
    let sha = pki.valid.sha256();
    let sha_colons = sha
        .to_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");

    // What is accepted, so that the refusals below are about the key they name.
    load(
        &format!("[server.tls]\ncert_file = {cert}\nkey_file = {key}\n"),
        ANYONE,
    )
    .unwrap();
    load(
        &format!(
            "[server.tls]\ncert_file = {cert}\nkey_file = {}\n",
            quoted(&sec1)
        ),
        ANYONE,
    )
    .expect("a SEC1 key");
    load(
        &format!(
            "[server.tls]\ncert_file = {}\nkey_file = {}\n",
            quoted(&pki.server2.cert_file),
            quoted(&pki.server2.key_file)
        ),
        ANYONE,
    )
    .expect("an RSA certificate");
    load(
        &mtls,
        &[
            bind("a", &format!("sha256 = \"{sha_colons}\"")),
            bind("b", "san_dns = \"b.internal\""),
        ]
        .concat(),
    )
    .unwrap();

    let cases: Vec<(&str, String, String, &[&str])> = vec![
        ("cert without key", format!("[server.tls]\ncert_file = {cert}\n"), ANYONE.into(), &["server.tls", "key_file"][..]),
        ("key without cert", format!("[server.tls]\nkey_file = {key}\n"), ANYONE.into(), &["server.tls", "cert_file"][..]),
        (
            "key of another certificate",
            format!("[server.tls]\ncert_file = {cert}\nkey_file = {}\n", quoted(&pki.server2.key_file)),
            ANYONE.into(),
            &["server.tls."][..],
        ),
        (
            "unreadable cert file",
            format!("[server.tls]\ncert_file = {}\nkey_file = {key}\n", quoted(&dir.path().join("missing.pem"))),
            ANYONE.into(),
            &["server.tls.cert_file"][..],
        ),
        (
            "invalid PEM",
            format!("[server.tls]\ncert_file = {}\nkey_file = {key}\n", quoted(&garbage)),
            ANYONE.into(),
            &["server.tls.cert_file"][..],
        ),
        (
            "client_auth without client_ca_file",
            format!("[server.tls]\ncert_file = {cert}\nkey_file = {key}\nclient_auth = \"required\"\n"),
            ANYONE.into(),
            &["client_ca_file"][..],
        ),
        (
            "two clients pinning one certificate",
            mtls.clone(),
            [bind("a", &format!("sha256 = \"{sha}\"")), bind("b", &format!("sha256 = \"{sha}\""))].concat(),
            &["certificates"][..],
        ),
        (
            "two clients pinning one certificate, spelled differently",
            mtls.clone(),
            [bind("a", &format!("sha256 = \"{sha}\"")), bind("b", &format!("sha256 = \"{sha_colons}\""))].concat(),
            &["certificates"][..],
        ),
        (
            "two clients binding one DNS name",
            mtls.clone(),
            [bind("a", "san_dns = \"batch.internal\""), bind("b", "san_dns = \"batch.internal\"")].concat(),
            &["certificates"][..],
        ),
        ("bad sha256", mtls.clone(), bind("a", "sha256 = \"not-hex\""), &["sha256"][..]),
        ("short sha256", mtls.clone(), bind("a", "sha256 = \"abcd\""), &["sha256"][..]),
        (
            "admin cert without key",
            format!("[server.tls]\ncert_file = {cert}\nkey_file = {key}\n[admin.tls]\ncert_file = {cert}\n"),
            ANYONE.into(),
            &["admin.tls", "key_file"][..],
        ),
        (
            "client_auth optional without client_ca_file",
            format!("[server.tls]\ncert_file = {cert}\nkey_file = {key}\nclient_auth = \"optional\"\n"),
            ANYONE.into(),
            &["client_ca_file"][..],
        ),
        (
            "forwarded_cert on the admin listener",
            format!(
                "[server.tls]\ncert_file = {cert}\nkey_file = {key}\n[admin.tls]\ncert_file = {cert}\nkey_file = {key}\nforwarded_cert = {{ header = \"x-forwarded-client-cert\", format = \"xfcc\", trusted_proxies = [\"127.0.0.1/32\"] }}\n"
            ),
            ANYONE.into(),
            &["admin.tls", "forwarded_cert"][..],
        ),
        (
            "forwarded_cert without client_ca_file",
            "[server.tls]\nforwarded_cert = { header = \"x-forwarded-client-cert\", format = \"xfcc\", trusted_proxies = [\"127.0.0.1/32\"] }\n".into(),
            ANYONE.into(),
            &["client_ca_file"][..],
        ),
        (
            "unknown client_auth",
            format!("[server.tls]\ncert_file = {cert}\nkey_file = {key}\nclient_auth = \"sometimes\"\n"),
            ANYONE.into(),
            &["client_auth"][..],
        ),
    ];
    for (what, tls, clients, names) in cases {
        let err = load(&tls, &clients).expect_err(what);
        for n in names {
            assert!(
                err.contains(n),
                "{what}: the error does not name {n}:\n{err}"
            );
        }
        assert!(
            !err.contains("BEGIN"),
            "{what}: key material in the error:\n{err}"
        );
    }
}
