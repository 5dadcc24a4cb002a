//! The real `portcullis` binary: `check`, `demo` (and the curl it prints), `serve`
//! draining a running stream on SIGTERM, and `serve` getting backend tokens without
//! logging a secret.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// Lines of a child's pipe, readable with a deadline.
fn lines(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Read lines until one satisfies `pred`, failing after `timeout`.
fn read_until(
    rx: &mpsc::Receiver<String>,
    timeout: Duration,
    pred: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = std::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
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

/// The address in `serve`'s "portcullis is listening addr=..." log line.
fn listening_addr(line: &str) -> String {
    let after = line.split("addr=").nth(1).expect("a listening line");
    after.split_whitespace().next().unwrap().to_owned()
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `portcullis check`, with one extra environment variable or none; the check test's
/// variable is removed otherwise so the outcome never depends on the caller's environment.
fn check(config: &std::path::Path, var: Option<(&str, &str)>) -> std::process::Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["check", "--config"]).arg(config);
    match var {
        Some((k, v)) => cmd.env(k, v),
        None => cmd.env_remove("PORTCULLIS_CLI_TEST_KEY"),
    };
    cmd.output().unwrap()
}

#[test]
fn check_reports_every_problem_with_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlisten = \"127.0.0.1:8080\"\nmax_body_bytes = 0\n\n[[backends]]\nname = \"a\"\nurl = \"not a url\"\ndeployments = { \"gpt-4o\" = \"gpt-4o\" }\n[backends.auth]\ntype = \"api_key\"\nkey_file = \"missing.key\"\n",
    )
    .unwrap();
    let out = check(&bad, None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("3 problems"), "{err}");
    assert!(err.contains("server.max_body_bytes (line 3)"), "{err}");
    assert!(err.contains("backends[0].url (line 7)"), "{err}");
    assert!(err.contains("backends[0].auth.key_file (line 11)"), "{err}");

    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        "[server]\nlisten = \"127.0.0.1:8080\"\nheader_timout = \"5s\"\n",
    )
    .unwrap();
    let out = check(&typo, None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("server.header_timout (line 3)") && err.contains("unknown field"),
        "{err}"
    );

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[backends]]\nname = \"a\"\nurl = \"https://x.openai.azure.com\"\ndeployments = { \"gpt-4o\" = \"gpt-4o\" }\n[backends.auth]\ntype = \"api_key\"\nkey = \"${PORTCULLIS_CLI_TEST_KEY}\"\n").unwrap();
    let out = check(&good, Some(("PORTCULLIS_CLI_TEST_KEY", "k-123")));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("k-123"));
    // The same file without the variable names the variable.
    let out = check(&good, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("PORTCULLIS_CLI_TEST_KEY is not set"));
}

#[test]
fn demo_prints_lines_that_work_when_pasted() {
    let mut child = Command::new(BIN)
        .args(["demo", "--port", "0", "--token-latency-ms", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = lines(child.stdout.take().unwrap());
    let printed = read_until(&out, Duration::from_secs(20), |l| l.contains("Ctrl-C"));
    let exports: Vec<&String> = printed
        .iter()
        .filter(|l| l.starts_with("export "))
        .collect();
    for var in [
        "OPENAI_BASE_URL",
        "OPENAI_API_KEY",
        "AZURE_OPENAI_ENDPOINT",
        "AZURE_OPENAI_API_KEY",
        "PORTCULLIS_DEMO_JWT",
    ] {
        assert!(
            exports
                .iter()
                .any(|l| l.starts_with(&format!("export {var}="))),
            "{var} missing"
        );
    }
    let curl = printed
        .iter()
        .find(|l| l.starts_with("curl "))
        .expect("a curl line");
    let exports_script = exports
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let run = Command::new("bash")
        .args(["-c", &format!("{exports_script}\n{curl} -sS --max-time 20")])
        .output()
        .unwrap();
    assert!(run.status.success());
    let body = String::from_utf8(run.stdout).unwrap();
    assert!(
        body.contains("\"delta\":{\"content\":\"Portcullis \"}"),
        "{body}"
    );
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    // The exports work for a plain non-streaming call too.
    let script = format!(
        "{exports_script}\ncurl -sS --max-time 20 \"$AZURE_OPENAI_ENDPOINT/openai/deployments/text-embedding-3-small/embeddings?api-version=$OPENAI_API_VERSION\" -H \"api-key: $AZURE_OPENAI_API_KEY\" -H 'content-type: application/json' -d '{{\"input\":\"hi\"}}'"
    );
    let run = Command::new("bash").args(["-c", &script]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(v["data"][0]["object"], "embedding");
    // Without a credential the same call is refused.
    let script = format!(
        "{exports_script}\ncurl -sS --max-time 20 -o /dev/null -w '%{{http_code}}' \"$OPENAI_BASE_URL/embeddings\" -H 'content-type: application/json' -d '{{\"model\":\"text-embedding-3-small\",\"input\":\"hi\"}}'"
    );
    let run = Command::new("bash").args(["-c", &script]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), "401");
    // Audit lines appear on stdout, one per request, without the prompt.
    let audit = read_until(&out, Duration::from_secs(10), |l| {
        l.contains("\"operation\":\"embeddings\"")
    });
    assert!(audit.iter().any(|l| l.contains("\"operation\":\"chat\"")
        && l.contains("\"stream\":true")
        && l.contains("\"client\":\"demo-app\"")
        && l.contains("\"auth_method\":\"jwt\"")));
    assert!(audit
        .iter()
        .any(|l| l.contains("\"operation\":\"embeddings\"")
            && l.contains("\"auth_method\":\"api_key\"")));
    assert!(!audit.iter().any(|l| l.contains("Hello")));
    let secret_of = |var: &str| {
        exports
            .iter()
            .find_map(|l| l.strip_prefix(&format!("export {var}=")))
            .unwrap()
            .to_owned()
    };
    for var in ["OPENAI_API_KEY", "PORTCULLIS_DEMO_JWT"] {
        let secret = secret_of(var);
        assert!(secret.len() > 40, "{var} = {secret}");
        assert!(!audit.iter().any(|l| l.contains(&secret)), "{var} in audit");
    }
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
}

#[tokio::test]
async fn serve_drains_a_stream_on_sigterm() {
    let sim = sim_with(Duration::from_millis(80)).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndrain_timeout = \"10s\"\n[admin]\nlisten = \"\"\n[audit]\npath = \"audit.log\"\n[store]\nurl = \"sqlite://keys.db\"\nkey_hmac_secret = \"{STORE_SECRET}\"\n[[clients]]\nid = \"app\"\ndeployments = [\"gpt-4o\"]\noperations = [\"chat\"]\n{}",
            backend("sim", &sim.url(), "azure", "deployments = { \"gpt-4o\" = \"gpt-4o\" }")
        ),
    )
    .unwrap();
    // A key issued by the CLI before start is accepted by the gateway.
    let created = Command::new(BIN)
        .args(["keys", "create", "--client", "app", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");
    let key = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
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
    let addr = listening_addr(line);
    assert!(!line.contains(BACKEND_KEY));

    let resp = http()
        .post(format!("http://{addr}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut all = stream.next().await.unwrap().unwrap().to_vec();
    sigterm(&child);
    while let Some(c) = stream.next().await {
        all.extend_from_slice(&c.unwrap());
    }
    assert!(String::from_utf8(all)
        .unwrap()
        .ends_with("data: [DONE]\n\n"));
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(15)))
            .await
            .unwrap();
    assert!(status.success());
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    assert_eq!(rec["outcome"], "complete");
    assert_eq!(rec["stream"], true);
}

/// `serve` authenticating to backends as itself — a client secret, the App Service managed
/// identity from the real environment, and a refused secret — logs at debug level without
/// a secret, a token or an assertion appearing anywhere in its output or audit file.
#[tokio::test]
async fn serve_gets_backend_tokens_and_never_logs_secrets_or_tokens() {
    use common::idp::Idp;
    use common::msi::Msi;
    use portcullis::sim::get;
    let idp = Idp::start().await;
    let good_secret = "gw-secret-value-0123456789";
    let wrong_secret = "wrong-secret-value-9876543210";
    idp.add_client(serde_json::json!({
        "client_id": "gw", "client_secret": good_secret,
        "token_endpoint_auth_method": "client_secret_post",
    }))
    .await;
    let msi = Msi::start(&idp, &[]).await;
    let sim = bearer_sim(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("portcullis.toml");
    let section = |name: &str, deployment: &str, auth: String| {
        format!(
            "[[backends]]\nname = \"{name}\"\nurl = \"{}\"\ndeployments = {{ \"{deployment}\" = \"gpt-4o\" }}\n[backends.auth]\n{auth}\n",
            sim.url()
        )
    };
    let secret = |s: &str| {
        format!(
            "type = \"entra_secret\"\ntoken_url = \"{}\"\nclient_id = \"gw\"\nclient_secret = \"{s}\"",
            idp.token_endpoint()
        )
    };
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"\"\n[audit]\npath = \"audit.log\"\n{ANYONE}{}{}{}",
            section("secret", "a", secret(good_secret)),
            section("mi", "b", "type = \"managed_identity\"".into()),
            section("refused", "c", secret(wrong_secret)),
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("PORTCULLIS_LOG", "debug")
        .env("IDENTITY_ENDPOINT", msi.app_service_url())
        .env("IDENTITY_HEADER", msi.identity_header())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let logs = lines(child.stderr.take().unwrap());
    let out = lines(child.stdout.take().unwrap());
    let seen = read_until(&logs, Duration::from_secs(20), |l| {
        l.contains("portcullis is listening")
    });
    let addr = listening_addr(seen.last().unwrap());
    let mut all = seen;
    // Both good credentials acquire a token; the refused one says why.
    all.extend(read_until(&logs, Duration::from_secs(20), |l| {
        l.contains("invalid_client")
    }));
    for deployment in ["a", "b"] {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let resp = http()
                .post(format!("http://{addr}/v1/chat/completions"))
                .json(&serde_json::json!({"model": deployment, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            if resp.status() == 200 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{deployment}: {}",
                resp.status()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let resp = http()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "c", "messages": []}))
        .send()
        .await
        .unwrap();
    let (status, code) = error_code(resp).await;
    assert_eq!((status, code.as_str()), (503, "backend_auth_unavailable"));
    sigterm(&child);
    let status =
        tokio::task::spawn_blocking(move || wait_exit(&mut child, Duration::from_secs(15)))
            .await
            .unwrap();
    assert!(status.success());
    all.extend(logs.try_iter());
    all.extend(out.try_iter());
    let text = all.join("\n");
    assert!(
        text.contains("backend token acquired") && text.contains("entra_secret:gw"),
        "{text}"
    );
    assert!(text.contains("managed_identity:system"), "{text}");
    let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
    for (what, haystack) in [("logs", &text), ("audit", &audit)] {
        for needle in [good_secret, wrong_secret, &msi.identity_header(), "eyJ"] {
            assert!(
                !haystack.contains(needle),
                "{what} contain '{needle}':\n{haystack}"
            );
        }
    }
    assert!(get(&sim.counters().requests) >= 2);
}
