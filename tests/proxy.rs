//! End-to-end behaviour of the proxy: a real gateway between a real HTTP client and the
//! simulated backend, over loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use portcullis::sim::{get, Behavior};

#[tokio::test]
async fn bodies_are_byte_identical_both_ways() {
    let (sim, gw) = azure_pair("", "").await;
    // Odd spacing, key order, unicode escapes and raw UTF-8: nothing may be normalised.
    let body = "{ \"messages\" :[{\"role\":\"user\",\"content\":\"caf\\u00e9 — ünïcødé\"}],\n\t\"temperature\":0.70 , \"z\":1,\"a\":2}";
    let resp = http()
        .post(format!(
            "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            gw.url
        ))
        .header("content-type", "application/json")
        .header("x-sim-behavior", "echo")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.bytes().await.unwrap(),
        body.as_bytes(),
        "response body changed"
    );
    assert_eq!(
        sim.last().unwrap().body,
        body.as_bytes(),
        "request body changed"
    );

    // And a binary multipart upload (audio) through the OpenAI-style route.
    let mut form = b"--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o\r\n--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\n".to_vec();
    form.extend((0..=255u8).cycle().take(4096));
    form.extend_from_slice(b"\r\n--B--\r\n");
    let resp = http()
        .post(format!("{}/v1/audio/transcriptions", gw.url))
        .header("content-type", "multipart/form-data; boundary=B")
        .header("x-sim-behavior", "echo")
        .body(form.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap(), form);
    let last = sim.last().unwrap();
    assert_eq!(
        last.path,
        "/openai/deployments/gpt-4o-ptu/audio/transcriptions"
    );
    assert_eq!(last.body, form);
}

#[tokio::test]
async fn client_credentials_never_reach_the_backend() {
    let (sim, gw) = azure_pair("", "").await;
    let key = gw.issue_key("anyone").await;
    let bearer = format!("Bearer {key}");
    let resp = gw
        .chat(
            false,
            &[
                ("authorization", &bearer),
                ("api-key", &key),
                ("cookie", "session=s3cr3t"),
                ("x-request-id", "req-123"),
                ("x-custom", "kept"),
            ],
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-123");
    let h = sim.last().unwrap().headers;
    assert_eq!(h["api-key"], BACKEND_KEY, "backend credential added");
    assert!(h.get("authorization").is_none(), "client bearer forwarded");
    assert!(h.get("cookie").is_none(), "client cookie forwarded");
    assert_eq!(h["x-request-id"], "req-123");
    assert_eq!(h["x-custom"], "kept");
    let line = gw.audit_for("req-123").await;
    assert_eq!(line["auth_method"], "api_key");
    assert_eq!(line["client"], "anyone");
    let audit = std::fs::read_to_string(&gw.audit_path).unwrap();
    for secret in [key.as_str(), "s3cr3t", BACKEND_KEY, "Hello there"] {
        assert!(!audit.contains(secret), "audit leaks {secret}");
    }
}

#[tokio::test]
async fn request_id_is_generated_when_absent_or_unsafe() {
    let (sim, gw) = azure_pair("", "").await;
    for given in [None, Some("bad id\twith spaces")] {
        let mut req = http().post(format!("{}/v1/embeddings", gw.url));
        if let Some(g) = given {
            req = req.header("x-request-id", g);
        }
        let resp = req
            .json(&serde_json::json!({"model":"text-embedding-3-small","input":"x"}))
            .send()
            .await
            .unwrap();
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(id.len(), 36, "uuid expected, got {id}");
        assert_eq!(sim.last().unwrap().headers["x-request-id"], id.as_str());
    }
}

#[tokio::test]
async fn upstream_rate_limit_headers_pass_back() {
    let (_sim, gw) = azure_pair("", "").await;
    let resp = gw.chat(false, &[]).await;
    for h in [
        "x-ratelimit-remaining-requests",
        "x-ratelimit-remaining-tokens",
        "apim-request-id",
    ] {
        assert!(resp.headers().contains_key(h), "missing {h}");
    }
    // A 429 passes through unchanged (status, retry-after, Azure's body) with one backend.
    let resp = gw.chat(false, &[("x-sim-behavior", "429:2500")]).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "3");
    assert_eq!(resp.headers()["retry-after-ms"], "2500");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "429", "upstream body replaced: {v}");
}

#[tokio::test]
async fn sse_reaches_the_client_chunk_by_chunk() {
    let sim = sim_with(Duration::from_millis(80)).await;
    let b = backend(
        "sim",
        &sim.url(),
        "azure",
        "deployments = { \"gpt-4o\" = \"gpt-4o\" }",
    );
    let gw = Gateway::start("", &b).await;
    let resp = gw.chat(true, &[]).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert!(resp.headers().get("content-encoding").is_none());
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "), "{first:?}");
    // When the first event reaches the client the backend is still far from done.
    let sent = get(&sim.counters().chunks_sent);
    assert!(
        sent < 5,
        "first chunk arrived only after {sent} chunks were sent"
    );
    assert_eq!(get(&sim.counters().streams_completed), 0);
    let mut all = first.to_vec();
    let mut reads = 1;
    while let Some(c) = stream.next().await {
        all.extend_from_slice(&c.unwrap());
        reads += 1;
    }
    assert!(reads >= 10, "stream arrived in only {reads} reads");
    let text = String::from_utf8(all).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .all(|e| e.starts_with("data: ")));
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_stream() {
    let sim = sim_with(Duration::from_millis(100)).await;
    let b = backend(
        "sim",
        &sim.url(),
        "azure",
        "deployments = { \"gpt-4o\" = \"gpt-4o\" }",
    );
    let gw = Gateway::start("", &b).await;
    let resp = gw.chat(true, &[("x-request-id", "disconnect-1")]).await;
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    wait_until(
        "backend sees the stream cancelled",
        Duration::from_secs(5),
        || get(&sim.counters().streams_cancelled) == 1,
    )
    .await;
    assert_eq!(get(&sim.counters().streams_completed), 0);
    let a = gw.audit_for("disconnect-1").await;
    assert_eq!(a["outcome"], "client_disconnected");
    assert_eq!(a["stream"], true);
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let (sim, gw) = azure_pair("max_body_bytes = 1000", "").await;
    let big = format!("{{\"model\":\"gpt-4o\",\"pad\":\"{}\"}}", "x".repeat(2000));
    let resp = http()
        .post(format!("{}/v1/chat/completions", gw.url))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (413, "payload_too_large".into()));
    // Without Content-Length (chunked), the limit holds while reading.
    let chunks = futures_util::stream::iter(
        big.into_bytes()
            .chunks(100)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let resp = http()
        .post(format!("{}/v1/chat/completions", gw.url))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (413, "payload_too_large".into()));
    assert_eq!(
        get(&sim.counters().requests),
        0,
        "oversized request reached the backend"
    );
}

#[tokio::test]
async fn unknown_paths_and_deployments_get_404() {
    let (sim, gw) = azure_pair("", "").await;
    let resp = http()
        .get(format!("{}/admin/secrets", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (404, "not_found".into()));
    let resp = http()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&serde_json::json!({"model":"gpt-5-secret","messages":[]}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (404, "unknown_deployment".into()));
    let resp = http()
        .post(format!(
            "{}/openai/deployments/nope/chat/completions?api-version=2024-10-21",
            gw.url
        ))
        .json(&chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (404, "unknown_deployment".into()));
    let resp = http()
        .post(format!("{}/v1/chat/completions", gw.url))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (400, "invalid_request".into()));
    let resp = http()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&serde_json::json!({"messages":[]}))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (400, "invalid_request".into()));
    assert_eq!(get(&sim.counters().requests), 0);
}

#[tokio::test]
async fn backend_down_is_502_and_hang_is_504() {
    let url = format!("http://127.0.0.1:{}", dead_port());
    let b = backend(
        "down",
        &url,
        "azure",
        "deployments = { \"gpt-4o\" = \"gpt-4o\" }",
    );
    let gw = Gateway::start("", &b).await;
    let resp = gw.chat(false, &[("x-request-id", "down-1")]).await;
    assert_eq!(error_code(resp).await, (502, "backend_unavailable".into()));
    let a = gw.audit_for("down-1").await;
    assert_eq!(a["error_code"], "backend_unavailable");
    assert_eq!(a["backend"], "down");

    let (_sim, gw) = azure_pair(
        "",
        "timeouts = { connect = \"100ms\", first_byte = \"300ms\" }",
    )
    .await;
    let started = std::time::Instant::now();
    let resp = gw.chat(false, &[("x-sim-behavior", "hang")]).await;
    assert_eq!(error_code(resp).await, (504, "backend_timeout".into()));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn failover_on_connect_error_and_spill_over_on_429() {
    let sim = sim().await;
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let backends = ptu_then_paygo("dead-ptu", &dead, &sim.url());
    let gw = Gateway::start("", &backends).await;
    let resp = gw.chat(false, &[("x-request-id", "fo-1")]).await;
    assert_eq!(resp.status(), 200);
    let a = gw.audit_for("fo-1").await;
    assert_eq!(a["backend"], "paygo");
    assert_eq!(a["attempts"], 2);

    // PTU answers 429 → the request spills over to pay-as-you-go.
    let ptu = common::sim().await;
    ptu.set_behavior(Behavior::RateLimited {
        retry_after_ms: 1000,
        form: portcullis::sim::RetryForm::Azure,
    });
    let backends = ptu_then_paygo("ptu", &ptu.url(), &sim.url());
    let gw = Gateway::start("", &backends).await;
    let resp = gw.chat(false, &[("x-request-id", "spill-1")]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(gw.audit_for("spill-1").await["backend"], "paygo");
    assert_eq!(get(&ptu.counters().requests), 1);
}

#[tokio::test]
async fn openai_client_to_azure_backend_and_back() {
    // OpenAI style in, Azure data plane out.
    let (sim, gw) = azure_pair("", "").await;
    let resp = gw.chat(false, &[]).await;
    assert_eq!(resp.status(), 200);
    let last = sim.last().unwrap();
    assert_eq!(last.path, "/openai/deployments/gpt-4o-ptu/chat/completions");
    assert_eq!(last.query.as_deref(), Some("api-version=2024-06-01"));

    // Azure style in, OpenAI-compatible backend out: model injected, no api-version.
    let sim2 = sim_with(Duration::ZERO).await;
    let b = backend(
        "oai",
        &sim2.url(),
        "openai",
        "deployments = { \"gpt-4o\" = \"gpt-4o-2024-08-06\" }",
    );
    let gw2 = Gateway::start("", &b).await;
    let key = gw2.issue_key("anyone").await;
    let resp = http()
        .post(format!(
            "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            gw2.url
        ))
        .header("api-key", &key)
        .json(&serde_json::json!({"messages":[{"role":"user","content":"hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    let last = sim2.last().unwrap();
    assert_eq!(last.path, "/v1/chat/completions");
    assert_eq!(last.query, None);
    assert_eq!(
        last.headers["authorization"],
        format!("Bearer {BACKEND_KEY}").as_str()
    );
    assert!(last.headers.get("api-key").is_none());
    let sent: serde_json::Value = serde_json::from_slice(&last.body).unwrap();
    assert_eq!(sent["model"], "gpt-4o-2024-08-06");
    assert_eq!(sent["messages"][0]["content"], "hi");
}

#[tokio::test]
async fn models_are_listed_by_the_gateway() {
    let (sim, gw) = azure_pair("", "").await;
    for path in ["/v1/models", "/openai/models", "/openai/v1/models"] {
        let v: serde_json::Value = http()
            .get(format!("{}{path}", gw.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let ids: Vec<&str> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["gpt-4o", "text-embedding-3-small"], "{path}");
    }
    let resp = http()
        .get(format!("{}/v1/models/gpt-4o", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = http()
        .get(format!("{}/v1/models/other", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (404, "unknown_deployment".into()));
    assert_eq!(get(&sim.counters().requests), 0);
}

#[tokio::test]
async fn h2c_clients_and_http2_backends() {
    let (_sim, gw) = azure_pair("", "http2 = true").await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = client
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn stream_reset_and_idle_timeout_end_the_client_stream() {
    let (_sim, gw) = azure_pair("", "timeouts = { idle = \"300ms\" }").await;
    let resp = gw
        .chat(
            true,
            &[("x-sim-behavior", "reset:3"), ("x-request-id", "reset-1")],
        )
        .await;
    assert_eq!(resp.status(), 200);
    // The events relayed before the reset reach the client (they are flushed before the
    // response is aborted), and then the stream ends in an error, not as if complete.
    let mut resp = resp;
    let mut got = Vec::new();
    let ended = loop {
        match resp.chunk().await {
            Ok(Some(c)) => got.extend_from_slice(&c),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(ended.is_err(), "a truncated stream must not look complete");
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("data: {"),
        "events before the reset lost: {got:?}"
    );
    assert!(!got.contains("[DONE]"), "{got}");
    assert_eq!(gw.audit_for("reset-1").await["outcome"], "upstream_error");

    let resp = gw
        .chat(
            true,
            &[
                ("x-sim-behavior", "latency:2000"),
                ("x-request-id", "idle-1"),
            ],
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.is_err());
    assert_eq!(gw.audit_for("idle-1").await["outcome"], "idle_timeout");
}

#[tokio::test]
async fn metrics_health_and_readiness() {
    let (_sim, gw) = azure_pair("", "").await;
    gw.chat(false, &[]).await.bytes().await.unwrap();
    for base in [&gw.url, &gw.admin_url] {
        let r = http().get(format!("{base}/health")).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), r#"{"status":"ok"}"#);
        assert_eq!(
            http()
                .get(format!("{base}/ready"))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"portcullis_requests_total{operation="chat",status="200",backend="sim"} 1"#),
        "{m}"
    );
    assert!(m.contains("portcullis_request_duration_seconds_bucket"));
    assert!(m.contains("portcullis_streams_in_flight"));
    assert_eq!(
        http()
            .get(format!("{}/metrics", gw.url))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test]
async fn graceful_shutdown_lets_a_running_stream_finish() {
    let sim = sim_with(Duration::from_millis(60)).await;
    let b = backend(
        "sim",
        &sim.url(),
        "azure",
        "deployments = { \"gpt-4o\" = \"gpt-4o\" }",
    );
    let gw = Gateway::start("drain_timeout = \"10s\"", &b).await;
    let resp = gw.chat(true, &[]).await;
    let mut stream = resp.bytes_stream();
    let mut all = stream.next().await.unwrap().unwrap().to_vec();
    gw.running.shutdown();
    gw.wait_listener_closed().await;
    while let Some(c) = stream.next().await {
        all.extend_from_slice(&c.unwrap());
    }
    assert!(String::from_utf8(all)
        .unwrap()
        .ends_with("data: [DONE]\n\n"));
    tokio::time::timeout(Duration::from_secs(5), gw.running.wait())
        .await
        .unwrap();
}

#[tokio::test]
async fn every_operation_works_in_both_client_styles() {
    let (sim, gw) = azure_pair("", "").await;
    let cases: [(&str, &str, serde_json::Value, &str); 5] = [
        (
            "completions",
            "gpt-4o",
            serde_json::json!({"prompt": "Say hi"}),
            "text_completion",
        ),
        (
            "embeddings",
            "text-embedding-3-small",
            serde_json::json!({"input": "hi"}),
            "list",
        ),
        (
            "responses",
            "gpt-4o",
            serde_json::json!({"input": "hi"}),
            "response",
        ),
        (
            "images/generations",
            "gpt-4o",
            serde_json::json!({"prompt": "a cat"}),
            "",
        ),
        (
            "chat/completions",
            "gpt-4o",
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}),
            "chat.completion",
        ),
    ];
    for (op, model, body, object) in cases {
        // OpenAI style: model in the body.
        let mut v1 = body.clone();
        v1["model"] = model.into();
        let resp = http()
            .post(format!("{}/v1/{op}", gw.url))
            .json(&v1)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "/v1/{op}");
        let got: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(
            got["object"].as_str().unwrap_or(""),
            object,
            "/v1/{op}: {got}"
        );
        if op == "images/generations" {
            assert!(got["data"][0]["b64_json"].is_string(), "{got}");
        }
        let up = sim.last().unwrap();
        if op == "responses" {
            // Not deployment-scoped on Azure: /openai/responses with the mapped model.
            assert_eq!(up.path, "/openai/responses");
            let sent: serde_json::Value = serde_json::from_slice(&up.body).unwrap();
            assert_eq!(sent["model"], "gpt-4o-ptu");
        } else {
            let mapped = if model == "gpt-4o" {
                "gpt-4o-ptu"
            } else {
                "emb"
            };
            assert_eq!(up.path, format!("/openai/deployments/{mapped}/{op}"));
        }
        assert!(up.query.unwrap().contains("api-version=2024-06-01"));

        // Azure style: deployment in the path (responses has no deployment form).
        if op != "responses" {
            let url = format!(
                "{}/openai/deployments/{model}/{op}?api-version=2024-10-21",
                gw.url
            );
            let resp = http().post(url).json(&body).send().await.unwrap();
            assert_eq!(resp.status(), 200, "azure {op}");
            assert_eq!(
                sim.last().unwrap().query.as_deref(),
                Some("api-version=2024-10-21")
            );
        }
    }
    // Operations the gateway does not interpret pass through unchanged.
    let resp = http()
        .get(format!("{}/v1/files?purpose=batch", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let up = sim.last().unwrap();
    assert_eq!(up.path, "/openai/files");
    assert_eq!(
        up.query.as_deref(),
        Some("api-version=2024-06-01&purpose=batch")
    );
}

#[tokio::test]
async fn multipart_model_is_mapped_and_duplicates_refused() {
    let sim = sim().await;
    let b = backend(
        "oai",
        &sim.url(),
        "openai",
        "deployments = { \"whisper\" = \"whisper-large-v3\" }",
    );
    let gw = Gateway::start("", &b).await;
    let form = |models: &[&str]| {
        let mut f = String::new();
        for m in models {
            f.push_str(&format!(
                "--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{m}\r\n"
            ));
        }
        f.push_str("--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--B--\r\n");
        f
    };
    let send = |body: String| {
        http()
            .post(format!("{}/v1/audio/transcriptions", gw.url))
            .header("content-type", "multipart/form-data; boundary=B")
            .body(body)
            .send()
    };
    let resp = send(form(&["whisper"])).await.unwrap();
    assert_eq!(resp.status(), 200);
    let sent = String::from_utf8(sim.last().unwrap().body.to_vec()).unwrap();
    assert_eq!(
        sent,
        form(&["whisper-large-v3"]),
        "model mapped, nothing else changed"
    );

    let before = get(&sim.counters().requests);
    let resp = send(form(&["whisper", "gpt-4o-transcribe"])).await.unwrap();
    assert_eq!(error_code(resp).await, (400, "invalid_request".into()));
    assert_eq!(get(&sim.counters().requests), before);
}

#[tokio::test]
async fn a_request_abandoned_before_the_answer_is_still_audited() {
    let (sim, gw) = azure_pair("", "").await;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = client
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("x-sim-behavior", "hang")
        .header("x-request-id", "gave-up-1")
        .json(&chat_body(false))
        .send()
        .await;
    assert!(err.is_err(), "the client should have timed out");
    assert_eq!(
        get(&sim.counters().requests),
        1,
        "the backend had the request"
    );
    let a = gw.audit_for("gave-up-1").await;
    assert_eq!(a["status"], 499);
    assert_eq!(a["outcome"], "client_disconnected");
    assert_eq!(a["operation"], "chat");
    assert_eq!(a["deployment"], "gpt-4o");
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let (sim, gw) = azure_pair("workers = 1", "").await;
    for i in 0..20 {
        let resp = http()
            .post(format!("{}/v1/chat/completions", gw.url))
            .json(&chat_body(i % 2 == 0))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(!resp.bytes().await.unwrap().is_empty());
    }
    assert_eq!(get(&sim.counters().requests), 20);
    assert_eq!(
        get(&sim.counters().connections),
        1,
        "sequential requests share one keep-alive connection"
    );
}

#[tokio::test]
async fn a_connection_whose_stream_the_client_abandoned_is_not_reused() {
    let sim = sim_with(Duration::from_millis(50)).await;
    let b = backend(
        "sim",
        &sim.url(),
        "azure",
        "deployments = { \"gpt-4o\" = \"gpt-4o\" }",
    );
    let gw = Gateway::start("workers = 1", &b).await;
    let resp = http()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&chat_body(true))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    wait_until(
        "backend sees the stream cancelled",
        Duration::from_secs(5),
        || get(&sim.counters().streams_cancelled) == 1,
    )
    .await;
    for _ in 0..3 {
        let resp = http()
            .post(format!("{}/v1/chat/completions", gw.url))
            .json(&chat_body(false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
    }
    assert_eq!(
        get(&sim.counters().connections),
        2,
        "the abandoned connection was closed; the next one is then reused"
    );
}
