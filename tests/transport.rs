//! Transport edges: slow clients are cut off by the header timeout, and TLS to a backend is
//! verified against the webpki roots plus the backend's own `ca_file`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn slow_clients_are_cut_off_by_the_header_timeout() {
    let (sim, gw) = azure_pair("header_timeout = \"300ms\"", "").await;
    // Half a request line, then silence.
    let closed = gw
        .raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await;
    let (_, waited) = closed.expect("connection still open after 5 s");
    assert!(
        waited >= Duration::from_millis(250),
        "closed too early: {waited:?}"
    );
    assert_eq!(sim::get(&sim.counters().requests), 0);
    // A normal client on another connection is unaffected.
    let resp = gw.chat(false, &[]).await;
    assert_eq!(resp.status(), 200);
}

/// Send one complete request on `s` and read its whole answer (`Content-Length` framed).
async fn one_exchange(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}"#;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("no answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed before the answer was complete");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .expect("a Content-Length answer")
                .parse()
                .unwrap();
            if buf.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

/// How long after `since` the peer closed `s` (`None`: still open 5 s on).
async fn closed_after(s: &mut tokio::net::TcpStream, since: Instant) -> Option<Duration> {
    read_until_closed(s, since).await.map(|(_, waited)| waited)
}

/// A new connection that has had one answer, and the moment before its request was sent.
async fn after_one_answer(gw: &Gateway) -> (tokio::net::TcpStream, Instant) {
    let mut s = tokio::net::TcpStream::connect(gw.running.addr)
        .await
        .unwrap();
    let sent = Instant::now();
    assert!(one_exchange(&mut s).await.starts_with("HTTP/1.1 200"));
    (s, sent)
}

#[tokio::test]
async fn keep_alive_connections_get_the_header_timeout_after_every_answer() {
    use tokio::io::AsyncWriteExt;
    let timeout = Duration::from_millis(300);
    let (sim, gw) = azure_pair("header_timeout = \"300ms\"", "").await;
    // Idle after an answer: closed once the header timeout has passed since the answer (so
    // since before the request was sent), not before.
    let (mut idle, sent) = after_one_answer(&gw).await;
    let waited = closed_after(&mut idle, sent)
        .await
        .expect("idle keep-alive connection never closed");
    assert!(waited >= timeout, "closed too early: {waited:?}");
    assert!(waited < Duration::from_secs(3), "closed late: {waited:?}");
    // A second request's head sent in part after a first answer: cut off too.
    let (mut half, sent) = after_one_answer(&gw).await;
    half.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let waited = closed_after(&mut half, sent)
        .await
        .expect("half-sent second head never cut off");
    assert!(waited >= timeout, "closed too early: {waited:?}");
    // Slowloris: a second head dribbled out a byte at a time, each byte well within the
    // timeout of the one before, is cut off all the same.
    let (mut slow, sent) = after_one_answer(&gw).await;
    let head =
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
    let mut cut = None;
    for b in head.iter().cycle().take(200) {
        if slow.write_all(&[*b]).await.is_err() {
            cut = Some(sent.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = match cut {
        Some(w) => w,
        None => closed_after(&mut slow, sent)
            .await
            .expect("dribbling client never cut off"),
    };
    assert!(waited >= timeout, "closed too early: {waited:?}");
    assert!(
        waited < Duration::from_secs(3),
        "dribbling client kept for {waited:?}"
    );
    assert_eq!(
        sim::get(&sim.counters().requests),
        3,
        "only the complete requests reached the backend"
    );
    // A connection that sends requests more often than the timeout stays open well past it.
    let mut busy = tokio::net::TcpStream::connect(gw.running.addr)
        .await
        .unwrap();
    let opened = Instant::now();
    while opened.elapsed() < timeout * 2 {
        assert!(one_exchange(&mut busy).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A streaming chat request answered in three events (with `latency:N`, N ms apart).
fn three_event_stream() -> serde_json::Value {
    let mut body = chat_body(true);
    body["max_tokens"] = 3.into();
    body
}

#[tokio::test]
async fn streams_pausing_longer_than_the_header_timeout_are_not_cut() {
    let (_sim, gw) = azure_pair("header_timeout = \"150ms\"", "").await;
    let started = Instant::now();
    let resp = http()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("x-sim-behavior", "latency:250")
        .json(&three_event_stream())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.expect("stream cut off");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // The backend really paused longer than the header timeout between events.
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
}

/// An h2c connection (prior knowledge) from hyper's client, and the task driving it, which
/// ends with how the connection ended.
async fn h2c_connection(
    gw: &Gateway,
) -> (
    hyper::client::conn::http2::SendRequest<String>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let tcp = tokio::net::TcpStream::connect(gw.running.addr)
        .await
        .unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    (send, tokio::spawn(conn))
}

async fn h2_get(send: &mut hyper::client::conn::http2::SendRequest<String>, url: String) -> u16 {
    send.ready().await.expect("connection no longer usable");
    let req = http::Request::get(url).body(String::new()).unwrap();
    let resp = send.send_request(req).await.expect("request refused");
    resp.status().as_u16()
}

#[tokio::test]
async fn idle_http2_connections_get_goaway_after_the_header_timeout() {
    use http_body_util::BodyExt;
    let timeout = Duration::from_millis(300);
    let (_sim, gw) = azure_pair("header_timeout = \"300ms\"", "").await;
    // Idle after an answer: ended once the header timeout has passed, not before, and with
    // GOAWAY (a clean end for the client), not a dropped socket.
    let (mut send, ended) = h2c_connection(&gw).await;
    let sent = Instant::now();
    assert_eq!(h2_get(&mut send, format!("{}/health", gw.url)).await, 200);
    let how = tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("idle HTTP/2 connection still open 5 s on")
        .unwrap();
    let waited = sent.elapsed();
    assert!(how.is_ok(), "not ended by GOAWAY: {how:?}");
    assert!(waited >= timeout, "ended too early: {waited:?}");
    assert!(waited < Duration::from_secs(3), "ended late: {waited:?}");
    // A stream pausing longer than the timeout between events is not a quiet connection:
    // it is answered in full, and the connection still takes a new request right after.
    let (mut send, ended) = h2c_connection(&gw).await;
    send.ready().await.unwrap();
    let started = Instant::now();
    let req = http::Request::post(format!("{}/v1/chat/completions", gw.url))
        .header("content-type", "application/json")
        .header("x-sim-behavior", "latency:250")
        .body(three_event_stream().to_string())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("stream cut off");
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(started.elapsed() >= timeout * 2, "{:?}", started.elapsed());
    assert_eq!(h2_get(&mut send, format!("{}/health", gw.url)).await, 200);
    drop(send);
    let _ = ended.await;
}

#[tokio::test]
async fn shutdown_closes_idle_connections_at_once_and_lets_streams_finish() {
    // The header timeout is far off, and so are the watchdog's ticks (every quarter of it)
    // that would also wake each connection: what closes the idle connections here is the
    // shutdown's own wake-up.
    let (_sim, gw) = azure_pair("drain_timeout = \"10s\"\nheader_timeout = \"60s\"", "").await;
    let (mut idle, _) = after_one_answer(&gw).await;
    let (mut h2, h2_ended) = h2c_connection(&gw).await;
    assert_eq!(h2_get(&mut h2, format!("{}/health", gw.url)).await, 200);
    let mut stream = gw.chat(true, &[("x-sim-behavior", "latency:100")]).await;
    assert_eq!(stream.status(), 200);
    let mut text = stream.chunk().await.unwrap().unwrap().to_vec();
    let at = Instant::now();
    gw.running.shutdown();
    let waited = closed_after(&mut idle, at)
        .await
        .expect("idle keep-alive connection kept open through the shutdown");
    assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
    let how = tokio::time::timeout(Duration::from_secs(3), h2_ended)
        .await
        .expect("idle HTTP/2 connection kept open through the shutdown")
        .unwrap();
    assert!(
        how.is_ok(),
        "HTTP/2 connection not ended by GOAWAY: {how:?}"
    );
    while let Some(c) = stream.chunk().await.expect("stream cut by the shutdown") {
        text.extend_from_slice(&c);
    }
    assert!(String::from_utf8_lossy(&text).ends_with("data: [DONE]\n\n"));
    tokio::time::timeout(Duration::from_secs(5), gw.running.wait())
        .await
        .expect("drain did not end once the stream had");
}

use portcullis::sim;

/// A throwaway CA and a server certificate for `localhost` signed by it.
struct TestPki {
    ca_pem: String,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> TestPki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "portcullis test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap(),
        )
        .unwrap();
    TestPki {
        ca_pem: ca_cert.pem(),
        server: Arc::new(server),
    }
}

/// Terminate TLS on a loopback port and pass the bytes to `target`.
async fn tls_front(config: Arc<rustls::ServerConfig>, target: std::net::SocketAddr) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn tls_backend_is_verified_against_its_ca_file() {
    let pki = pki();
    let sim = sim().await;
    let port = tls_front(pki.server.clone(), sim.addr).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let url = format!("https://localhost:{port}");

    // Trusted through ca_file: works, over TLS, streaming included.
    let b = backend(
        "tls",
        &url,
        "azure",
        &format!(
            "ca_file = \"{}\"\ndeployments = {{ \"gpt-4o\" = \"gpt-4o\" }}",
            ca.display()
        ),
    );
    let gw = Gateway::start("", &b).await;
    let resp = gw.chat(true, &[]).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().ends_with("data: [DONE]\n\n"));
    assert_eq!(sim.last().unwrap().headers["api-key"], BACKEND_KEY);

    // Without the CA the certificate is not trusted: nothing is sent, 502.
    let before = sim::get(&sim.counters().requests);
    let b = backend(
        "tls",
        &url,
        "azure",
        "deployments = { \"gpt-4o\" = \"gpt-4o\" }",
    );
    let gw = Gateway::start("", &b).await;
    let resp = gw.chat(false, &[]).await;
    assert_eq!(error_code(resp).await, (502, "backend_unavailable".into()));
    assert_eq!(
        sim::get(&sim.counters().requests),
        before,
        "request sent over an untrusted connection"
    );
}

#[test]
fn a_ca_file_without_certificates_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
    let text = backend(
        "tls",
        "https://localhost:1",
        "azure",
        "ca_file = \"ca.pem\"\ndeployments = { \"gpt-4o\" = \"gpt-4o\" }",
    );
    let err = portcullis::config::load_str(&text, "t", dir.path()).unwrap_err();
    assert_eq!(err.problems[0].path, "backends[0].ca_file", "{err}");
}

#[tokio::test]
async fn metrics_need_the_admin_token_when_one_is_set() {
    let s = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"adm-0123456789\"\n[audit]\npath = \"{}\"\n{}",
        dir.path().join("a.log").display(),
        backend("sim", &s.url(), "azure", "deployments = { \"gpt-4o\" = \"gpt-4o\" }")
    );
    let v = portcullis::config::load_str(&text, "t", dir.path()).unwrap();
    let running = portcullis::app::start(&v).await.unwrap();
    let admin = format!("http://{}", running.admin_addr.unwrap());
    let r = http().get(format!("{admin}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let r = http()
        .get(format!("{admin}/metrics"))
        .bearer_auth("adm-0123456788")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http()
        .get(format!("{admin}/metrics"))
        .bearer_auth("adm-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("portcullis_streams_in_flight"));
    // Probes stay open.
    assert_eq!(
        http()
            .get(format!("{admin}/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    running.shutdown();
    running.wait().await;
}

#[tokio::test]
async fn a_trickled_body_is_cut_off_by_the_body_timeout() {
    let (sim, gw) = azure_pair("body_timeout = \"300ms\"", "").await;
    let answer = gw
        .raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
        .await;
    let (buf, _) = answer.expect("no answer within 5 s");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    assert_eq!(sim::get(&sim.counters().requests), 0);
}

#[tokio::test]
async fn connections_that_send_no_request_are_closed() {
    let (_sim, gw) = azure_pair("header_timeout = \"300ms\"", "").await;
    for opening in [&b""[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"] {
        let closed = gw.raw(opening).await;
        let (_, waited) =
            closed.unwrap_or_else(|| panic!("idle connection still open after 5 s ({opening:?})"));
        assert!(waited >= Duration::from_millis(250));
    }
    // A first request that takes longer than the header timeout to answer is not cut.
    let resp = gw.chat(true, &[("x-sim-behavior", "latency:60")]).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn shutdown_reports_not_ready_before_it_stops_serving() {
    let (_sim, gw) = azure_pair("shutdown_delay = \"600ms\"", "").await;
    gw.running.shutdown();
    // At once: not ready, on both listeners...
    for base in [&gw.url, &gw.admin_url] {
        let r = http().get(format!("{base}/ready")).send().await.unwrap();
        assert_eq!(r.status(), 503, "{base}");
        assert!(r.text().await.unwrap().contains("shutting down"));
    }
    // ...yet still serving during the delay.
    let resp = gw.chat(false, &[]).await;
    assert_eq!(resp.status(), 200);
    // Then the client listener closes.
    gw.wait_listener_closed().await;
}
