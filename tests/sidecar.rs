//! `portcullis sidecar`: the real binary, configured by environment variables alone, in
//! front of the simulated Azure OpenAI backend in bearer mode. Backend tokens come from the
//! test OpenID provider (a certificate credential) or the managed-identity endpoint in
//! front of it; the applications are the official `openai` SDK and the LiteLLM SDK.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::idp::Idp;
use common::msi::Msi;
use common::*;
use portcullis::sim::{Behavior, RetryForm, SimHandle};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PLACEHOLDER: &str = "placeholder-key-the-sidecar-removes";
const API_VERSION: &str = "2024-10-21";

/// The binary, with only `env` (and PATH) in its environment: nothing from the test
/// runner's own (an `AZURE_*` there would change which credential is chosen).
fn sidecar_command(env: &[(&str, String)], args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"));
    cmd.arg("sidecar")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PORTCULLIS_LOG", "info")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A running sidecar process on `127.0.0.1:port`.
struct Sidecar {
    url: String,
    port: u16,
    child: tokio::process::Child,
}

impl Sidecar {
    /// Start it on a free port (given as PORT) and wait until `/health` answers.
    async fn start(env: &[(&str, String)], args: &[&str]) -> Sidecar {
        let port = dead_port();
        let mut env = env.to_vec();
        env.push(("PORT", port.to_string()));
        Sidecar::spawn(&env, args, port).await
    }

    /// Start it with exactly `env` and `args`, and wait (with a deadline) until
    /// `127.0.0.1:port/health` answers 200.
    async fn spawn(env: &[(&str, String)], args: &[&str], port: u16) -> Sidecar {
        let mut child = sidecar_command(env, args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the sidecar exited before it was healthy: {status}");
            }
            if let Ok(r) = http().get(format!("{url}/health")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the sidecar never became healthy"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Sidecar { url, port, child }
    }

    /// Wait (with a deadline) until `/ready` answers 200: the first backend token is in.
    /// Until then a request waits for that token (at most 5 s).
    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http().get(format!("{}/ready", self.url)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the sidecar never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        #[cfg(unix)]
        if let Some(pid) = self.child.id() {
            // SIGTERM: the drain path a container stop takes.
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the sidecar stops within 30 s of SIGTERM")
            .unwrap();
        assert!(status.success(), "{status}");
    }
}

/// A certificate client of the IdP, written as the PEM (certificate + key) sidecars mount.
async fn certificate_client(idp: &Idp, dir: &Path, client: &str) -> PathBuf {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["portcullis-sidecar".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    idp.add_cert_client(
        client,
        &[cert.pem().as_str()],
        json!({ "assertion_max_age": 600 }),
    )
    .await;
    let file = dir.join(format!("{client}.pem"));
    std::fs::write(&file, format!("{}{}", cert.pem(), key.serialize_pem())).unwrap();
    file
}

/// Every captured request carried a bearer token from the IdP for `client` and none of the
/// application's own credentials.
fn assert_gateway_credential_only(sim: &SimHandle, client_claim: (&str, &str)) {
    let captured = sim.captured();
    assert!(!captured.is_empty());
    for c in &captured {
        assert!(
            c.headers.get("api-key").is_none(),
            "{} {}",
            c.method,
            c.path
        );
        let auth = c.headers["authorization"].to_str().unwrap();
        assert!(auth.starts_with("Bearer ey"), "{auth}");
        for (name, value) in &c.headers {
            assert!(
                !value
                    .as_bytes()
                    .windows(PLACEHOLDER.len())
                    .any(|w| w == PLACEHOLDER.as_bytes()),
                "the application's key reached the backend in {name}"
            );
        }
    }
    let tokens = sim.bearer_tokens();
    assert!(!tokens.is_empty());
    for t in tokens {
        assert_eq!(t.claims[client_claim.0], client_claim.1, "{}", t.claims);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_and_litellm_sdks_reach_azure_through_the_sidecar_with_a_certificate_token() {
    let idp = Idp::start().await;
    let sim = bearer_sim(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let pem = certificate_client(&idp, dir.path(), "sidecar-app").await;
    let sidecar = Sidecar::start(
        &[
            ("API_BASE_URL", sim.url()),
            ("AZURE_CLIENT_ID", "sidecar-app".into()),
            ("AZURE_TENANT_ID", "contoso".into()),
            ("AZURE_CERTIFICATE_PATH", pem.display().to_string()),
            ("PORTCULLIS_TOKEN_URL", idp.token_endpoint()),
        ],
        &[],
    )
    .await;
    sidecar.wait_ready().await;

    // The container's HEALTHCHECK: the same binary, the same PORT variable.
    let health = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("healthcheck")
        .env("PORT", sidecar.port.to_string())
        .status()
        .await
        .unwrap();
    assert!(health.success());

    let run = tokio::process::Command::new(python("the openai and litellm SDKs"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sidecar/clients.py"))
        .env("SIDECAR_URL", &sidecar.url)
        .env("DEPLOYMENT", "gpt-4o")
        .env("API_VERSION", API_VERSION)
        .env("NO_PROXY", "127.0.0.1")
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the SDK clients finish within 3 minutes")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "SDK clients failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{stdout}");
    for l in &lines {
        if l.get("embedding_len").is_some() {
            assert!(l["embedding_len"].as_u64().unwrap() > 0, "{l}");
            continue;
        }
        let text = l["text"].as_str().unwrap();
        assert!(text.split_whitespace().count() >= 3, "{l}");
        if l["stream"] == false {
            assert!(l["total_tokens"].as_u64().unwrap() > 0, "{l}");
        }
    }
    for sdk in ["openai", "litellm"] {
        assert!(lines.iter().any(|l| l["sdk"] == sdk && l["stream"] == true));
    }

    // Each call went to the Azure path the SDK wrote, query untouched, with the IdP's token
    // for the sidecar's certificate client and without the placeholder key.
    let captured = sim.captured();
    assert_eq!(captured.len(), 5);
    for c in &captured {
        assert!(
            c.path == "/openai/deployments/gpt-4o/chat/completions"
                || c.path == "/openai/deployments/gpt-4o/embeddings",
            "{}",
            c.path
        );
        assert_eq!(
            c.query.as_deref(),
            Some(format!("api-version={API_VERSION}").as_str())
        );
    }
    assert_gateway_credential_only(&sim, ("client_id", "sidecar-app"));
    // One token served every request: it was fetched ahead, not per call.
    let grants = idp
        .token_requests()
        .await
        .into_iter()
        .filter(|r| r["client_id"] == "sidecar-app")
        .count();
    assert_eq!(grants, 1);
    sidecar.stop().await;
}

#[tokio::test]
async fn a_request_sent_before_the_first_token_waits_for_it() {
    // A pod's application may call the sidecar the moment it answers /health, before the
    // IdP has answered the first token request: that call waits for the token, not a 503.
    let idp = Idp::start().await;
    idp.set_token_delay(4000).await;
    let sim = bearer_sim(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let pem = certificate_client(&idp, dir.path(), "early-app").await;
    let sidecar = Sidecar::start(
        &[
            ("API_BASE_URL", sim.url()),
            ("AZURE_CLIENT_ID", "early-app".into()),
            ("AZURE_TENANT_ID", "contoso".into()),
            ("AZURE_CERTIFICATE_PATH", pem.display().to_string()),
            ("PORTCULLIS_TOKEN_URL", idp.token_endpoint()),
        ],
        &[],
    )
    .await;
    let ready = http()
        .get(format!("{}/ready", sidecar.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503, "the first token is still on its way");
    let resp = http()
        .post(format!(
            "{}/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}",
            sidecar.url
        ))
        .header("api-key", PLACEHOLDER)
        .json(&serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    assert_eq!(status, 200, "{}", resp.text().await.unwrap());
    assert_gateway_credential_only(&sim, ("client_id", "early-app"));
    sidecar.stop().await;
}

/// A raw HTTP/1.1 request (paths reqwest would normalise), answered status and body.
async fn raw(port: u16, request: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_and_method_passes_through_unchanged_with_a_managed_identity_token() {
    let idp = Idp::start().await;
    let msi = Msi::start(&idp, &[]).await;
    let sim = bearer_sim(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let sidecar = Sidecar::start(
        &[
            ("API_BASE_URL", format!("{}/", sim.url())),
            ("IDENTITY_ENDPOINT", msi.app_service_url()),
            ("IDENTITY_HEADER", msi.identity_header()),
            ("PORTCULLIS_AUDIT", audit.display().to_string()),
        ],
        &[],
    )
    .await;
    sidecar.wait_ready().await;
    let client = http();

    // A method and path the gateway knows nothing of, with the application's credentials.
    let resp = client
        .put(format!(
            "{}/openai/some/new/api?x=1&api-version=2099-01-01&api-key=leaked",
            sidecar.url
        ))
        .header("api-key", PLACEHOLDER)
        .header("authorization", format!("Bearer {PLACEHOLDER}"))
        .header("x-custom", "kept")
        .header("content-type", "application/octet-stream")
        .body(&b"\x00raw bytes\xff"[..])
        .send()
        .await
        .unwrap();
    let c = sim.last().unwrap();
    assert_eq!(c.method, http::Method::PUT);
    assert_eq!(c.path, "/openai/some/new/api");
    assert_eq!(c.query.as_deref(), Some("x=1&api-version=2099-01-01"));
    assert_eq!(&c.body[..], b"\x00raw bytes\xff");
    assert_eq!(c.headers["x-custom"], "kept");
    // The simulator's own answer to a path it does not serve, relayed as it is.
    let direct = client
        .put(format!(
            "{}/openai/some/new/api?x=1&api-version=2099-01-01",
            sim.url()
        ))
        .header("authorization", c.headers["authorization"].clone())
        .header("content-type", "application/octet-stream")
        .body(&b"\x00raw bytes\xff"[..])
        .send()
        .await
        .unwrap();
    let (status, answer) = (resp.status(), resp.text().await.unwrap());
    assert_eq!(status, direct.status(), "{answer}");
    assert!(status.is_client_error());
    assert_eq!(answer, direct.text().await.unwrap());
    sim.clear_captured();

    // A JSON body goes byte for byte, even one the gateway would rewrite in `serve` mode
    // (a stream without include_usage), and the stream comes back as the backend sent it.
    let body = "{ \"model\" : \"gpt-4o\",  \"stream\": true,\n \"messages\": [{\"role\":\"user\",\"content\":\"hi\"}] }";
    let resp = client
        .post(format!("{}/openai/v1/chat/completions", sidecar.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(
        !text.contains("\"usage\":{"),
        "no usage chunk was asked for"
    );
    assert_eq!(sim.last().unwrap().body, body.as_bytes());

    // Paths that could climb out of the backend's URL never leave the sidecar.
    let before = sim.captured().len();
    for path in [
        "/openai/deployments/x/../../admin",
        "/openai/%2e%2e/admin",
        "/openai/a%2fb",
        "/openai/a\\b",
    ] {
        let (status, _) = raw(
            sidecar.port,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 404, "{path}");
    }
    assert_eq!(sim.captured().len(), before);

    // A deployment's 429 reaches the application as Azure sent it, and holds nothing else
    // back: the next call to another deployment goes through at once, and the busy one is
    // asked again rather than refused from memory.
    sim.set_deployment_behavior(
        "busy",
        Behavior::RateLimited {
            retry_after_ms: 30_000,
            form: RetryForm::Azure,
        },
    );
    let chat = |d: &str| {
        client
            .post(format!(
                "{}/openai/deployments/{d}/chat/completions?api-version={API_VERSION}",
                sidecar.url
            ))
            .json(&chat_body(false))
            .send()
    };
    let busy = chat("busy").await.unwrap();
    assert_eq!(busy.status(), 429);
    assert_eq!(busy.headers()["retry-after"], "30");
    assert_eq!(busy.headers()["retry-after-ms"], "30000");
    let body: Value = busy.json().await.unwrap();
    assert_eq!(body["error"]["code"], "429", "Azure's own body: {body}");
    assert_eq!(chat("free").await.unwrap().status(), 200);
    assert_eq!(chat("busy").await.unwrap().status(), 429);
    let to_busy = sim
        .captured()
        .iter()
        .filter(|c| c.deployment.as_deref() == Some("busy"))
        .count();
    assert_eq!(to_busy, 2);

    assert_gateway_credential_only(&sim, ("appid", &msi.system_identity().client_id));

    // The audit log names what was called, never a credential.
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= 9 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(lines.len(), 9, "{lines:?}");
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains(PLACEHOLDER));
    assert!(!text.contains("leaked"));
    // A stream with no usage chunk (none was asked for, none was added) is charged what it
    // streamed, counted, not the reservation.
    let streamed = lines
        .iter()
        .find(|l| l["stream"] == true)
        .expect("the stream is audited");
    assert_eq!(streamed["usage"]["source"], "counted", "{streamed}");
    let completion = streamed["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..100).contains(&completion), "{streamed}");
    let free = lines
        .iter()
        .find(|l| l["deployment"] == "free")
        .expect("the call to free is audited");
    assert_eq!(free["operation"], "chat");
    assert_eq!(free["client"], "sidecar");
    assert_eq!(free["status"], 200);
    assert_eq!(free["backend_auth"], "managed_identity");
    sidecar.stop().await;
}

#[tokio::test]
async fn a_bad_environment_is_one_message_naming_each_variable() {
    let out = sidecar_command(
        &[
            ("HOST", "0.0.0.0".into()),
            ("PORT", "80800".into()),
            ("AZURE_CERTIFICATE_PATH", "/nonexistent/gw.pem".into()),
            ("AZURE_CLIENT_SECRET", "do-not-print-me".into()),
        ],
        &[],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("invalid sidecar environment ("),
        "{stderr}"
    );
    for var in [
        "API_BASE_URL:",
        "HOST:",
        "PORT:",
        "AZURE_CLIENT_SECRET:",
        "AZURE_CLIENT_ID:",
        "AZURE_TENANT_ID:",
    ] {
        assert!(stderr.contains(var), "{var} missing:\n{stderr}");
    }
    assert!(stderr.contains("PORTCULLIS_SIDECAR_ALLOW_NON_LOOPBACK=true"));
    assert!(!stderr.contains("do-not-print-me"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_address_needs_the_explicit_opt_in() {
    let sim = sim().await;
    let port = dead_port();
    let env = [
        ("API_BASE_URL", sim.url()),
        ("HOST", "0.0.0.0".to_owned()),
        ("PORT", port.to_string()),
        // A managed identity whose endpoint is down: the listener starts regardless.
        (
            "IDENTITY_ENDPOINT",
            format!("http://127.0.0.1:{}/msi/token", dead_port()),
        ),
        ("IDENTITY_HEADER", "h".to_owned()),
    ];
    let refused = sidecar_command(&env, &[]).output().await.unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("HOST: 0.0.0.0 is not a loopback address"),
        "{stderr}"
    );

    for (extra_env, args) in [
        (
            Some(("PORTCULLIS_SIDECAR_ALLOW_NON_LOOPBACK", "true")),
            vec![],
        ),
        (None, vec!["--allow-non-loopback"]),
    ] {
        let mut env = env.to_vec();
        env.retain(|(k, _)| *k != "PORT");
        if let Some((k, v)) = extra_env {
            env.push((k, v.to_owned()));
        }
        let sidecar = Sidecar::start(&env, &args).await;
        let health: Value = http()
            .get(format!("{}/health", sidecar.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(health, json!({ "status": "ok" }));
        // Alive, but not ready: the managed identity has given it no token.
        let ready = http()
            .get(format!("{}/ready", sidecar.url))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 503);
        assert_eq!(ready.json::<Value>().await.unwrap()["status"], "not_ready");
        sidecar.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_config_file_clients_must_authenticate() {
    let sim = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let port = dead_port();
    let file = dir.path().join("portcullis.toml");
    let issuer = portcullis::sim::issuer::DemoIssuer::start().await.unwrap();
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[admin]\nlisten = \"\"\n[store]\nrecord_usage = false\n\
             [[issuers]]\nname = \"corp\"\nissuer = \"{}\"\naudiences = [\"api://app\"]\n\
             [[clients]]\nid = \"app\"\njwt = [{{ issuer = \"corp\" }}]\ndeployments = [\"*\"]\noperations = [\"*\"]\n{}",
            issuer.issuer(),
            backend("sim", &sim.url(), "azure", "deployments = { \"gpt-4o\" = \"gpt-4o\" }")
        ),
    )
    .unwrap();
    let gateway = Sidecar::spawn(&[], &["--config", file.to_str().unwrap()], port).await;
    let url = gateway.url.clone();
    let chat = |key: Option<&str>| {
        let mut req = http()
            .post(format!(
                "{url}/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}"
            ))
            .json(&chat_body(false));
        if let Some(k) = key {
            req = req.header("api-key", k);
        }
        req.send()
    };
    let (status, code) = error_code(chat(None).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (401, "missing_credentials"));
    let (status, _) = error_code(chat(Some(PLACEHOLDER)).await.unwrap()).await;
    assert_eq!(status, 401);
    let jwt = issuer
        .sign("api://app", Duration::from_secs(300), json!({ "sub": "u" }))
        .unwrap();
    let ok = http()
        .post(format!(
            "{url}/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}"
        ))
        .bearer_auth(jwt)
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(sim.captured().len(), 1);
    gateway.stop().await;
}
