//! The holes found by attacking the gateway (issue 13), each as a regression test that
//! failed before its fix: path parameters and dot segments, backend response headers,
//! unbounded body buffering, multipart and JSON `model` variants, override and forwarding
//! headers, methods, and malformed backend answers.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use portcullis::sim::{get, SimHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One client `app` (API keys) allowed only deployment `rec` and the chat operation, in
/// front of a simulator that serves `rec` and `secret`.
async fn restricted(extra_client: &str, server: &str) -> (SimHandle, Gateway, String) {
    let s = sim().await;
    let b = backend(
        "sim",
        &s.url(),
        "azure",
        "deployments = { \"rec\" = \"rec\", \"secret\" = \"secret\" }",
    );
    let clients = format!(
        "[[clients]]\nid = \"app\"\ndeployments = [\"rec\"]\noperations = [\"chat\"]\n{extra_client}\n"
    );
    let g = Gateway::start_with(server, &clients, &b).await;
    let key = g.issue_key("app").await;
    (s, g, key)
}

fn chat(model: &str) -> serde_json::Value {
    serde_json::json!({ "model": model, "messages": [{ "role": "user", "content": "hi" }] })
}

#[tokio::test]
async fn path_parameters_and_dot_segments_never_reach_the_backend() {
    let (sim, gw, key) = restricted("", "").await;
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let ok = http()
        .post(format!(
            "{}/openai/deployments/rec/chat/completions?api-version=2024-10-21",
            gw.url
        ))
        .header("api-key", &key)
        .json(&chat("rec"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200, "the granted call works");
    let before = get(&sim.counters().requests);
    for path in [
        "/openai/deployments/rec/chat/..;/..;/..;/secret/chat/completions",
        "/openai/deployments/rec/chat/.;/..;/embeddings",
        "/openai/deployments/rec/chat;x=1/completions",
        "/openai/deployments/rec/audio/..;/chat/completions",
        "/v1/chat/..;/embeddings",
        "/v1/chat/.hidden/completions",
    ] {
        for client in [http(), h2.clone()] {
            let resp = client
                .post(format!("{}{path}?api-version=2024-10-21", gw.url))
                .header("api-key", &key)
                .json(&chat("rec"))
                .send()
                .await
                .unwrap();
            let version = resp.version();
            assert_eq!(
                error_code(resp).await,
                (400, "invalid_request".to_owned()),
                "{path} over {version:?}"
            );
        }
    }
    assert_eq!(
        get(&sim.counters().requests),
        before,
        "nothing reached the backend"
    );
}

#[tokio::test]
async fn backend_cookies_credentials_and_reflected_secrets_never_reach_clients() {
    let (sim, gw) = azure_pair("", "").await;
    let resp = gw.chat(false, &[("x-sim-behavior", "leaky-headers")]).await;
    assert_eq!(resp.status(), 200);
    for (name, _) in portcullis::sim::LEAKY_HEADERS {
        assert!(
            resp.headers().get(*name).is_none(),
            "{name} relayed: {:?}",
            resp.headers()
        );
    }
    assert!(resp.headers().get("x-ratelimit-remaining-tokens").is_some());
    assert!(resp.headers().get("apim-request-id").is_some());

    // A backend that reflects every request header hands back the gateway's key under
    // any name: each such header is dropped, the others kept.
    let resp = gw
        .chat(
            false,
            &[("x-sim-behavior", "reflect-headers"), ("x-custom", "kept")],
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.last().unwrap().headers["api-key"], BACKEND_KEY);
    for (name, value) in resp.headers() {
        assert!(
            !value
                .as_bytes()
                .windows(BACKEND_KEY.len())
                .any(|w| w == BACKEND_KEY.as_bytes()),
            "{name} carries the backend key"
        );
    }
    assert!(resp.headers().get("x-reflect-api-key").is_none());
    assert_eq!(resp.headers()["x-reflect-x-custom"], "kept");
    let _ = resp.bytes().await;

    // Streams are cleaned the same way.
    let resp = gw
        .chat(true, &[("x-sim-behavior", "reflect-headers")])
        .await;
    assert!(resp.headers().get("x-reflect-api-key").is_none());
}

#[tokio::test]
async fn a_backend_may_be_allowed_to_pass_cookies() {
    let (_sim, gw) = azure_pair("", "pass_response_headers = [\"set-cookie\"]").await;
    let resp = gw.chat(false, &[("x-sim-behavior", "leaky-headers")]).await;
    assert_eq!(resp.headers().get_all("set-cookie").iter().count(), 2);
    assert!(resp.headers().get("api-key").is_none());
    assert!(resp.headers().get("strict-transport-security").is_none());
}

/// Open a connection and send a request head (and `body_part` of its body), nothing more.
async fn upload_head(
    gw: &Gateway,
    path: &str,
    headers: &str,
    len: usize,
    body_part: &[u8],
) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(gw.running.addr)
        .await
        .unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n{headers}\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body_part).await.unwrap();
    s
}

/// Read one response head from `s` (status and headers), waiting at most 5 s.
async fn response_head(s: &mut tokio::net::TcpStream) -> String {
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline.into(), s.read(&mut chunk))
            .await
            .expect("no response within 5 s")
            .unwrap();
        assert!(n > 0, "closed without a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn a_deployment_the_client_may_not_call_is_refused_before_its_body_is_read() {
    let (sim, gw, key) = restricted("", "").await;
    // 10 MB announced, not one byte sent: the 403 comes anyway.
    let mut s = upload_head(
        &gw,
        "/openai/deployments/secret/chat/completions?api-version=2024-10-21",
        &format!("api-key: {key}\r\n"),
        10_000_000,
        b"",
    )
    .await;
    let head = response_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(get(&sim.counters().requests), 0);
}

#[tokio::test]
async fn the_gateway_wide_body_budget_makes_requests_wait_then_refuses_them() {
    let (_sim, gw) = azure_pair(
        "max_body_bytes = 1000000\nmax_buffered_body_bytes = 1500000\nbuffer_wait = \"300ms\"",
        "",
    )
    .await;
    let path = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";
    // One upload holds 1 MB of the 1.5 MB budget, with half its body sent.
    let mut holder = upload_head(&gw, path, "", 1_000_000, &[b' '; 500_000]).await;
    wait_metric(&gw, "portcullis_buffered_body_bytes 1000000").await;
    // A second of 600 kB does not fit: it waits `buffer_wait`, then 503 with retry-after.
    let started = Instant::now();
    let resp = http()
        .post(format!("{}{path}", gw.url))
        .header("content-type", "application/json")
        .body(vec![b' '; 600_000])
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(resp.headers()["retry-after-ms"], "300");
    assert_eq!(error_code(resp).await, (503, "overloaded".to_owned()));
    // A small one still fits beside the holder.
    let resp = gw.chat(false, &[]).await;
    assert_eq!(resp.status(), 200);
    // When the holder finishes its body, its room comes back.
    let mut rest = vec![b' '; 500_000 - 2];
    rest.splice(0..0, *b"{}");
    holder.write_all(&rest).await.unwrap();
    let head = response_head(&mut holder).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    wait_metric(&gw, "portcullis_buffered_body_bytes 0").await;
    let resp = http()
        .post(format!("{}{path}", gw.url))
        .header("content-type", "application/json")
        .body(format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
            "x".repeat(600_000)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// Wait (at most 5 s) until the metrics hold `line`.
async fn wait_metric(gw: &Gateway, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = gw.metrics().await;
        if m.lines().any(|l| l == line) {
            return;
        }
        assert!(Instant::now() < deadline, "never saw {line}:\n{m}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_client_over_its_concurrency_limit_gets_429_and_streams_count() {
    let s = sim_with(Duration::from_millis(100)).await;
    let b = backend(
        "sim",
        &s.url(),
        "azure",
        "deployments = { \"gpt-4o\" = \"gpt-4o\" }",
    );
    let clients = "[[clients]]\nid = \"app\"\ndeployments = [\"*\"]\noperations = [\"*\"]\nmax_concurrent_requests = 2\n[[clients]]\nid = \"other\"\ndeployments = [\"*\"]\noperations = [\"*\"]\n";
    let gw = Gateway::start_with("", clients, &b).await;
    let key = gw.issue_key("app").await;
    let other = gw.issue_key("other").await;
    let auth = format!("Bearer {key}");
    // Two open streams (12 words at 100 ms each) hold both slots...
    let a = gw.chat(true, &[("authorization", &auth)]).await;
    let b2 = gw.chat(true, &[("authorization", &auth)]).await;
    assert_eq!((a.status().as_u16(), b2.status().as_u16()), (200, 200));
    let third = gw.chat(false, &[("authorization", &auth)]).await;
    assert_eq!(third.headers()["retry-after"], "1");
    assert_eq!(
        error_code(third).await,
        (429, "too_many_concurrent_requests".to_owned())
    );
    // ...another client is not affected...
    let o = gw
        .chat(false, &[("authorization", &format!("Bearer {other}"))])
        .await;
    assert_eq!(o.status(), 200);
    // ...and once a stream has ended, its slot is free again.
    let _ = a.bytes().await.unwrap();
    let mut fourth = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while fourth.is_none() {
        let r = gw.chat(false, &[("authorization", &auth)]).await;
        if r.status() == 200 {
            fourth = Some(r);
        } else {
            assert!(Instant::now() < deadline, "slot never came back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    drop(b2);
}

#[tokio::test]
async fn responses_create_must_name_a_model_in_lower_case() {
    let (sim, open) = azure_pair("", "").await;
    for body in [
        serde_json::json!({ "Model": "gpt-4o", "input": "x" }),
        serde_json::json!({ "MODEL": "gpt-4o", "model": "text-embedding-3-small", "input": "x" }),
        serde_json::json!({ "model": null, "input": "x" }),
        serde_json::json!({ "model": 4, "input": "x" }),
        serde_json::json!({ "input": "x" }),
    ] {
        let resp = http()
            .post(format!("{}/v1/responses", open.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(resp).await,
            (400, "invalid_request".to_owned()),
            "{body}"
        );
    }
    let resp = http()
        .post(format!("{}/v1/chat/completions", open.url))
        .json(&serde_json::json!({ "Model": "gpt-4o", "messages": [] }))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await.0, 400);
    let ok = http()
        .post(format!("{}/v1/responses", open.url))
        .json(&serde_json::json!({ "model": "gpt-4o", "input": "x" }))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    // Calls on a stored response name no model, and need none.
    let get = http()
        .get(format!("{}/v1/responses/resp_123", open.url))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
    assert_eq!(sim.last().unwrap().path, "/openai/responses/resp_123");
}

#[tokio::test]
async fn multipart_forms_that_could_be_read_two_ways_are_refused() {
    let (sim, gw) = azure_pair("", "").await;
    let send = |ct: &'static str, form: String| {
        let url = format!("{}/v1/audio/transcriptions", gw.url);
        async move {
            http()
                .post(url)
                .header("content-type", ct)
                .body(form)
                .send()
                .await
                .unwrap()
        }
    };
    let first = "--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o\r\n";
    for second in [
        "Content-Disposition: form-data; name = \"model\"",
        "Content-Disposition: form-data; name*=utf-8''model",
        "Content-Disposition : form-data; name=\"model\"",
        "Content-Disposition: form-data; name=\"f\"\r\nContent-Type: a/b\r\nContent-Type: c/d",
    ] {
        let form = format!("{first}--B\r\n{second}\r\n\r\nwhisper\r\n--B--\r\n");
        let resp = send("multipart/form-data; boundary=B", form).await;
        assert_eq!(
            error_code(resp).await,
            (400, "invalid_request".to_owned()),
            "{second}"
        );
    }
    let form = format!("{first}--B--\r\n");
    let resp = send("multipart/form-data; boundary=B; boundary=C", form.clone()).await;
    assert_eq!(error_code(resp).await.0, 400);
    // Two Content-Type headers on the request itself.
    let resp = http()
        .post(format!("{}/v1/audio/transcriptions", gw.url))
        .header("content-type", "multipart/form-data; boundary=B")
        .header("content-type", "application/json")
        .body(form.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await.0, 400);
    assert_eq!(get(&sim.counters().requests), 0);
    let resp = send("multipart/form-data; boundary=B", form).await;
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn override_and_forwarding_headers_come_from_the_gateway_not_the_client() {
    let (sim, gw) = azure_pair("", "").await;
    let spoofed = [
        (
            "x-original-url",
            "/openai/deployments/secret/chat/completions",
        ),
        (
            "x-rewrite-url",
            "/openai/deployments/secret/chat/completions",
        ),
        ("x-http-method-override", "DELETE"),
        ("x-method-override", "DELETE"),
        ("x-forwarded-for", "203.0.113.9"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
        ("x-real-ip", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
    ];
    assert_eq!(gw.chat(false, &spoofed).await.status(), 200);
    let h = sim.last().unwrap().headers;
    for name in [
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-method-override",
        "x-forwarded-host",
        "x-real-ip",
    ] {
        assert!(h.get(name).is_none(), "{name} forwarded");
    }
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http");

    // Behind a trusted proxy (here: loopback), its chain is kept and extended.
    let (sim, gw) = azure_pair("trusted_proxies = [\"127.0.0.0/8\"]", "").await;
    assert_eq!(gw.chat(false, &spoofed).await.status(), 200);
    let h = sim.last().unwrap().headers;
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["forwarded"], "for=203.0.113.9, for=127.0.0.1;proto=https");
    assert!(h.get("x-original-url").is_none());
}

#[tokio::test]
async fn only_the_methods_an_operation_uses_are_forwarded() {
    let (sim, gw) = azure_pair("", "").await;
    for (method, path, allow) in [
        ("FOO", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("GET", "/openai/deployments/gpt-4o/embeddings", "POST"),
        ("PATCH", "/v1/files/file-1", "GET, POST, DELETE"),
        ("DELETE", "/v1/batches/b1", "GET, POST"),
        ("POST", "/v1/models", "GET"),
    ] {
        let resp = http()
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}{path}", gw.url),
            )
            .json(&serde_json::json!({ "model": "gpt-4o" }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["allow"], allow, "{method} {path}");
        assert_eq!(
            error_code(resp).await,
            (405, "method_not_allowed".to_owned()),
            "{method} {path}"
        );
    }
    assert_eq!(get(&sim.counters().requests), 0);
    let resp = http()
        .delete(format!("{}/v1/files/file-1", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// A backend that answers every request with `answer`, then closes.
async fn raw_backend(answer: &'static [u8]) -> String {
    raw_backend_parts(vec![answer]).await
}

/// A backend that answers every request with `parts`, 100 ms apart, then closes.
async fn raw_backend_parts(parts: Vec<&'static [u8]>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let parts = parts.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                // The head, then as much body as its content-length says.
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    let _ = s.write_all(p).await;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn malformed_backend_answers_are_502_and_recorded_as_upstream_errors() {
    let weird = raw_backend(b"HTTP/1.1 999 Weird\r\ncontent-length: 0\r\n\r\n").await;
    let broken = raw_backend(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nZZZ\r\n{}\r\n0\r\n\r\n",
    )
    .await;
    let late = raw_backend_parts(vec![
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n8\r\ndata: 1\n\r\n",
        b"ZZZ\r\n",
    ])
    .await;
    let b = [
        backend("weird", &weird, "azure", "deployments = { \"w\" = \"w\" }"),
        backend(
            "broken",
            &broken,
            "azure",
            "deployments = { \"b\" = \"b\" }",
        ),
        backend("late", &late, "azure", "deployments = { \"l\" = \"l\" }"),
    ]
    .concat();
    let gw = Gateway::start("", &b).await;
    let send = |model: &'static str, id: &'static str| {
        let url = format!("{}/v1/chat/completions", gw.url);
        async move {
            http()
                .post(url)
                .header("x-request-id", id)
                .json(&chat(model))
                .send()
                .await
                .unwrap()
        }
    };
    let resp = send("w", "weird-1").await;
    assert_eq!(
        error_code(resp).await,
        (502, "backend_invalid_response".to_owned())
    );
    let line = gw.audit_for("weird-1").await;
    assert_eq!(line["status"], 502);
    assert_eq!(line["error_code"], "backend_invalid_response");

    // A chunk size that is not hex: the client gets a clean 502, not an empty reply, and
    // the audit line and metrics say what happened.
    let resp = send("b", "broken-1").await;
    assert_eq!(
        error_code(resp).await,
        (502, "backend_invalid_response".to_owned())
    );
    let line = gw.audit_for("broken-1").await;
    assert_eq!(line["status"], 502, "{line}");
    assert_eq!(line["outcome"], "refused", "{line}");
    assert_eq!(line["backend"], "broken", "{line}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            "portcullis_requests_total{operation=\"chat\",status=\"502\",backend=\"broken\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "portcullis_upstream_attempts_total{backend=\"broken\",outcome=\"invalid_response\"} 1"
        ),
        "{metrics}"
    );

    // Broken after the head and a first event were relayed: the client sees the event, then
    // the cut; the audit line and the metrics record the upstream error.
    let resp = send("l", "late-1").await;
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    use futures_util::StreamExt;
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(&first[..], b"data: 1\n");
    assert!(
        stream.next().await.unwrap().is_err(),
        "the cut reaches the client"
    );
    let line = gw.audit_for("late-1").await;
    assert_eq!(line["outcome"], "upstream_error", "{line}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            "portcullis_relay_errors_total{backend=\"late\",outcome=\"upstream_error\"} 1"
        ),
        "{metrics}"
    );
}
