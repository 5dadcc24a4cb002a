//! Backend pools that remember: several simulated backends with programmed faults behind one
//! gateway, and what the simulators' request logs, the client, the audit line, `/ready`,
//! `/admin/backends` and the metrics show.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{backend, error_code, http, sim, Gateway};
use portcullis::sim::{Behavior, RetryForm, SimHandle};
use serde_json::Value;

/// An Azure backend serving gpt-4o under the same name.
fn be(name: &str, url: &str, priority: u32, extra: &str) -> String {
    backend(
        name,
        url,
        "azure",
        &format!("priority = {priority}\ndeployments = {{ \"gpt-4o\" = \"gpt-4o\" }}\n{extra}"),
    )
}

/// PTU at priority 0 and pay-as-you-go at priority 1, each with its own extras.
fn pair(ptu: &SimHandle, paygo: &SimHandle, ptu_extra: &str) -> String {
    [
        be("ptu", &ptu.url(), 0, ptu_extra),
        be("paygo", &paygo.url(), 1, ""),
    ]
    .concat()
}

/// Chat requests the simulator received.
fn chats(s: &SimHandle) -> usize {
    s.captured()
        .iter()
        .filter(|c| c.path.ends_with("/chat/completions"))
        .count()
}

async fn post(gw: &Gateway, rid: &str) -> reqwest::Response {
    gw.chat(false, &[("x-request-id", rid)]).await
}

async fn view_of(gw: &Gateway) -> Value {
    http()
        .get(format!("{}/admin/backends", gw.admin_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn entry<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
        .unwrap_or_else(|| panic!("no backend {name} in {view}"))
}

async fn ready(url: &str) -> (u16, Value) {
    let r = http().get(format!("{url}/ready")).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn ptu_serves_alone_spills_for_exactly_the_asked_wait_then_takes_traffic_back() {
    let (ptu, paygo) = (sim().await, sim().await);
    let gw = Gateway::start("", &pair(&ptu, &paygo, "")).await;
    for i in 0..5 {
        assert_eq!(post(&gw, &format!("healthy-{i}")).await.status(), 200);
    }
    assert_eq!((chats(&ptu), chats(&paygo)), (5, 0), "pay-as-you-go idles");

    // One 429 asking for 1.5 s (retry-after-ms only).
    ptu.set_burst(
        1,
        Behavior::RateLimited {
            retry_after_ms: 1500,
            form: RetryForm::Ms,
        },
    );
    let resp = post(&gw, "spill").await;
    assert_eq!(resp.status(), 200);
    let a = gw.audit_for("spill").await;
    assert_eq!(a["backend"], "paygo");
    assert_eq!(a["attempts"], 2);
    assert_eq!(a["tried"][0]["backend"], "ptu");
    assert_eq!(a["tried"][0]["outcome"], "rate_limited");
    assert_eq!(a["tried"][1]["outcome"], "response");
    let throttled_at = ptu.last().unwrap().at;
    let view = view_of(&gw).await;
    let d = &entry(&view, "ptu")["deployments"]["gpt-4o"];
    assert_eq!(d["cooling_because"], "retry-after-ms", "{view}");
    assert!(d["cooling_ms"].as_u64().unwrap() <= 1500, "{view}");

    // Steady traffic: pay-as-you-go serves until the cool-down ends, then PTU again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut i = 0;
    let back_at = loop {
        assert!(Instant::now() < deadline, "PTU never took traffic back");
        let before = chats(&ptu);
        assert_eq!(post(&gw, &format!("during-{i}")).await.status(), 200);
        i += 1;
        if chats(&ptu) > before {
            break ptu.last().unwrap().at;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let away = back_at.duration_since(throttled_at);
    assert!(
        away >= Duration::from_millis(1500),
        "PTU was tried again after {away:?}, before its retry-after-ms"
    );
    assert!(
        away < Duration::from_millis(2500),
        "PTU came back only after {away:?}"
    );
    assert!(chats(&paygo) >= 2, "pay-as-you-go served meanwhile");
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"portcullis_backend_cooldowns_total{backend="ptu"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"portcullis_upstream_spillovers_total{backend="paygo"}"#),
        "{m}"
    );
    assert!(
        m.contains(r#"portcullis_upstream_retries_total{backend="ptu",reason="rate_limited"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn when_every_backend_is_cooling_the_client_gets_429_at_once_with_the_shortest_wait() {
    let (ptu, paygo) = (sim().await, sim().await);
    // Two more forms: an HTTP date (whole seconds) and x-ms-retry-after-ms.
    ptu.set_behavior(Behavior::RateLimited {
        retry_after_ms: 6000,
        form: RetryForm::Date,
    });
    paygo.set_behavior(Behavior::RateLimited {
        retry_after_ms: 2500,
        form: RetryForm::XMs,
    });
    let gw = Gateway::start("", &pair(&ptu, &paygo, "")).await;
    let first = post(&gw, "both-429").await;
    assert_eq!(first.status(), 429, "the last backend's 429 is relayed");
    let (p, q) = (chats(&ptu), chats(&paygo));
    assert_eq!((p, q), (1, 1));

    let asked = Instant::now();
    let resp = post(&gw, "busy").await;
    assert!(asked.elapsed() < Duration::from_secs(1), "answered at once");
    assert_eq!(resp.status(), 429);
    let ms: u64 = resp.headers()["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1000..=2500).contains(&ms),
        "the shortest wait is pay-as-you-go's ~2.5 s, not PTU's 6 s: {ms}"
    );
    assert_eq!(
        resp.headers()["retry-after"].to_str().unwrap(),
        ms.div_ceil(1000).to_string(),
        "whole seconds, rounded up"
    );
    assert_eq!(error_code(resp).await, (429, "backends_busy".into()));
    assert_eq!(
        (chats(&ptu), chats(&paygo)),
        (p, q),
        "nothing was sent upstream"
    );
    let view = view_of(&gw).await;
    assert_eq!(
        entry(&view, "ptu")["deployments"]["gpt-4o"]["cooling_because"],
        "retry-after (date)"
    );
    assert_eq!(
        entry(&view, "paygo")["deployments"]["gpt-4o"]["cooling_because"],
        "x-ms-retry-after-ms"
    );
    // Cooling is not broken: the replica stays ready.
    assert_eq!(ready(&gw.url).await.0, 200);
}

#[tokio::test]
async fn a_429_without_a_usable_wait_cools_for_the_default_and_cools_only_that_deployment() {
    let s = sim().await;
    let other = sim().await;
    let backends = [
        backend(
            "ptu",
            &s.url(),
            "azure",
            "priority = 0\ndeployments = { \"gpt-4o\" = \"gpt-4o\", \"mini\" = \"gpt-4o-mini\" }",
        ),
        be("paygo", &other.url(), 1, ""),
    ]
    .concat();
    let gw = Gateway::start("[routing]\ndefault_cooldown = \"700ms\"", &backends).await;
    // The Responses API's nonsense: -1/0 rate-limit headers and no retry-after.
    s.set_deployment_behavior(
        "gpt-4o",
        Behavior::RateLimited {
            retry_after_ms: 0,
            form: RetryForm::Nonsense,
        },
    );
    assert_eq!(post(&gw, "nonsense").await.status(), 200);
    let view = view_of(&gw).await;
    let d = &entry(&view, "ptu")["deployments"];
    assert_eq!(d["gpt-4o"]["cooling_because"], "routing.default_cooldown");
    assert!(d["gpt-4o"]["cooling_ms"].as_u64().unwrap() <= 700);
    assert!(d["mini"]["cooling_ms"].is_null(), "{view}");
    // The other deployment on the same resource still goes to PTU.
    let resp = http()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(
            &serde_json::json!({"model": "mini", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(s.last().unwrap().deployment.as_deref(), Some("gpt-4o-mini"));
}

#[tokio::test]
async fn headroom_sends_a_request_elsewhere_before_it_collects_a_429() {
    for headroom in [true, false] {
        let (ptu, paygo) = (sim().await, sim().await);
        // PTU reports 50 tokens left in its window; a chat request reserves far more
        // (its prompt plus the default max_tokens).
        ptu.set_remaining(Some(50), Some(100));
        let gw = Gateway::start(
            &format!("[routing]\nheadroom = {headroom}"),
            &pair(&ptu, &paygo, ""),
        )
        .await;
        assert_eq!(post(&gw, "learn").await.status(), 200);
        assert_eq!(chats(&ptu), 1, "the first request finds nothing reported");
        let view = view_of(&gw).await;
        assert_eq!(
            entry(&view, "ptu")["deployments"]["gpt-4o"]["remaining_tokens"]
                .as_i64()
                .unwrap(),
            50
        );
        assert_eq!(post(&gw, "big").await.status(), 200);
        let served_by = gw.audit_for("big").await["backend"].clone();
        if headroom {
            assert_eq!(served_by, "paygo", "moved before any 429");
            assert_eq!(chats(&ptu), 1);
            assert_eq!(gw.audit_for("big").await["attempts"], 1);
        } else {
            assert_eq!(served_by, "ptu", "routing.headroom = false keeps the order");
        }
    }
}

#[tokio::test]
async fn a_5xx_burst_opens_the_circuit_and_one_probe_request_closes_it() {
    let (ptu, paygo) = (sim().await, sim().await);
    let gw = Gateway::start(
        "[routing.breaker]\nconsecutive_failures = 3\nopen_for = \"1s\"",
        &pair(&ptu, &paygo, ""),
    )
    .await;
    ptu.set_burst(3, Behavior::ServerError(503));
    for i in 0..3 {
        let rid = format!("burst-{i}");
        assert_eq!(post(&gw, &rid).await.status(), 200, "503 is retried");
        assert_eq!(
            gw.audit_for(&rid).await["tried"][0]["outcome"],
            "status_5xx"
        );
    }
    assert_eq!(chats(&ptu), 3);
    let view = view_of(&gw).await;
    let h = &entry(&view, "ptu")["health"];
    assert_eq!(h["circuit"], "open", "{view}");
    assert!(h["last_error"].as_str().unwrap().contains("503"), "{view}");
    // Open: PTU is not tried at all.
    assert_eq!(post(&gw, "open").await.status(), 200);
    assert_eq!(chats(&ptu), 3);
    assert_eq!(gw.audit_for("open").await["attempts"], 1);
    let (status, body) = ready(&gw.admin_url).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("degraded")));
    assert!(
        body.to_string().contains("backend 'ptu': circuit open"),
        "{body}"
    );
    // After open_for, one request probes PTU (healthy again) and closes the circuit.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut i = 0;
    while chats(&ptu) == 3 {
        assert!(Instant::now() < deadline, "no probe after open_for");
        assert_eq!(post(&gw, &format!("wait-{i}")).await.status(), 200);
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        entry(&view_of(&gw).await, "ptu")["health"]["circuit"],
        "closed"
    );
    let before = chats(&paygo);
    assert_eq!(post(&gw, "closed").await.status(), 200);
    assert_eq!(chats(&paygo), before, "PTU serves again");
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"portcullis_backend_circuit_trips_total{backend="ptu"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"portcullis_backend_circuit_state{backend="ptu"} 0"#),
        "{m}"
    );
}

#[tokio::test]
async fn every_circuit_open_means_503_and_not_ready() {
    let only = sim().await;
    let gw = Gateway::start(
        "[routing.breaker]\nconsecutive_failures = 2\nopen_for = \"30s\"",
        &be("only", &only.url(), 0, ""),
    )
    .await;
    only.set_behavior(Behavior::ServerError(502));
    for i in 0..2 {
        assert_eq!(post(&gw, &format!("f-{i}")).await.status(), 502);
    }
    let resp = post(&gw, "none-left").await;
    assert_eq!(error_code(resp).await, (503, "no_usable_backend".into()));
    assert_eq!(chats(&only), 2, "nothing sent while open");
    let (status, body) = ready(&gw.admin_url).await;
    assert_eq!(status, 503);
    assert!(
        body.to_string()
            .contains("deployment 'gpt-4o' has no usable backend"),
        "{body}"
    );
    let (status, public) = ready(&gw.url).await;
    assert_eq!(status, 503);
    assert!(!public.to_string().contains("only"), "{public}");
}

#[tokio::test]
async fn a_first_byte_timeout_is_retried_elsewhere_and_retry_on_decides() {
    let (ptu, paygo) = (sim().await, sim().await);
    ptu.set_behavior(Behavior::Hang);
    let slow = "timeouts = { connect = \"100ms\", first_byte = \"300ms\" }";
    let gw = Gateway::start("", &pair(&ptu, &paygo, slow)).await;
    assert_eq!(post(&gw, "hung").await.status(), 200);
    let a = gw.audit_for("hung").await;
    assert_eq!(a["tried"][0]["outcome"], "timeout");
    assert!(a["tried"][0]["ms"].as_f64().unwrap() >= 300.0);
    assert_eq!(a["backend"], "paygo");

    // Without first_byte_timeout in retry_on the client gets the 504.
    let gw = Gateway::start(
        "",
        &pair(&ptu, &paygo, &format!("{slow}\nretry_on = [\"503\"]")),
    )
    .await;
    let before = chats(&paygo);
    let resp = post(&gw, "hung-504").await;
    assert_eq!(error_code(resp).await, (504, "backend_timeout".into()));
    assert_eq!(chats(&paygo), before);
    // Nor is a 500 retried by default: it may come after the model ran.
    ptu.set_behavior(Behavior::ServerError(500));
    let gw = Gateway::start("", &pair(&ptu, &paygo, "")).await;
    assert_eq!(post(&gw, "500").await.status(), 500);
    assert_eq!(chats(&paygo), before);
}

#[tokio::test]
async fn a_stream_reset_midway_is_not_retried() {
    let (ptu, paygo) = (sim().await, sim().await);
    ptu.set_behavior(Behavior::ResetMidStream { after_chunks: 2 });
    let gw = Gateway::start("", &pair(&ptu, &paygo, "")).await;
    let resp = gw.chat(true, &[("x-request-id", "cut")]).await;
    assert_eq!(resp.status(), 200, "the head was relayed");
    let mut body = resp.bytes_stream();
    let mut got = Vec::new();
    let mut failed = false;
    use futures_util::StreamExt;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => got.extend_from_slice(&c),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the client sees the stream end with an error");
    assert!(String::from_utf8_lossy(&got).contains("data: "));
    assert!(!String::from_utf8_lossy(&got).contains("[DONE]"));
    assert_eq!(chats(&paygo), 0, "never resent");
    assert_eq!(gw.audit_for("cut").await["attempts"], 1);
}

#[tokio::test]
async fn weights_split_traffic_within_a_priority() {
    let (a, b, c) = (sim().await, sim().await, sim().await);
    let backends = [
        be("a", &a.url(), 0, "weight = 3"),
        be("b", &b.url(), 0, "weight = 1"),
        be("c", &c.url(), 1, ""),
    ]
    .concat();
    let gw = Gateway::start("", &backends).await;
    for i in 0..80 {
        assert_eq!(post(&gw, &format!("w-{i}")).await.status(), 200);
    }
    // Smooth weighted round robin per worker: exact per worker, so within one round (4)
    // per worker of 60/20 over all.
    let (na, nb) = (chats(&a), chats(&b));
    assert_eq!(na + nb, 80);
    assert!((56..=64).contains(&na), "weight 3 of 4: {na} of 80");
    assert_eq!(chats(&c), 0, "the lower priority gets nothing");
}

#[tokio::test]
async fn a_retried_body_is_byte_identical() {
    let (ptu, paygo) = (sim().await, sim().await);
    ptu.set_behavior(Behavior::RateLimited {
        retry_after_ms: 5000,
        form: RetryForm::Azure,
    });
    let gw = Gateway::start("", &pair(&ptu, &paygo, "")).await;
    // Odd spacing, escapes and member order survive the replay untouched.
    let body = "{ \"messages\" : [ {\"content\":\"h\\u00e9llo \\ud83d\\ude00\",  \"role\":\"user\"} ],\n\t\"model\":\"gpt-4o\", \"temperature\": 0.70 }";
    let resp = http()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (first, second) = (ptu.last().unwrap(), paygo.last().unwrap());
    assert_eq!(first.body, second.body);
    assert_eq!(&first.body[..], body.as_bytes());
    assert_eq!(first.path, second.path);
    assert_eq!(first.query, second.query);
}

#[tokio::test]
async fn max_concurrent_sends_the_excess_on_or_makes_it_wait_a_bounded_time() {
    let (ptu, paygo) = (
        common::sim_with(Duration::from_millis(100)).await,
        sim().await,
    );
    let gw = Gateway::start("", &pair(&ptu, &paygo, "max_concurrent = 1")).await;
    // One stream holds PTU's only slot…
    let held = gw.chat(true, &[]).await;
    assert_eq!(held.status(), 200);
    assert_eq!(entry(&view_of(&gw).await, "ptu")["health"]["in_flight"], 1);
    // …so the next request goes to pay-as-you-go.
    assert_eq!(post(&gw, "excess").await.status(), 200);
    assert_eq!(gw.audit_for("excess").await["backend"], "paygo");
    drop(held.bytes().await);
    let deadline = Instant::now() + Duration::from_secs(5);
    while entry(&view_of(&gw).await, "ptu")["health"]["in_flight"] != 0 {
        assert!(Instant::now() < deadline, "the slot was never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(post(&gw, "after").await.status(), 200);
    assert_eq!(gw.audit_for("after").await["backend"], "ptu");

    // A single backend at its limit: without queue_wait the excess is refused at once…
    let solo = common::sim_with(Duration::from_millis(100)).await;
    let gw = Gateway::start("", &be("solo", &solo.url(), 0, "max_concurrent = 1")).await;
    let held = gw.chat(true, &[]).await;
    let resp = post(&gw, "refused").await;
    assert_eq!(error_code(resp).await, (503, "no_usable_backend".into()));
    drop(held);
    // …and with it, the excess waits for the slot.
    let gw = Gateway::start(
        "[routing]\nqueue_wait = \"10s\"",
        &be("solo", &solo.url(), 0, "max_concurrent = 1"),
    )
    .await;
    let held = gw.chat(true, &[]).await;
    let waiting = tokio::spawn({
        let url = gw.url.clone();
        async move {
            http()
                .post(format!("{url}/v1/chat/completions"))
                .json(&common::chat_body(false))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "it waits while the slot is held");
    let _ = held.bytes().await;
    assert_eq!(waiting.await.unwrap(), 200);
}

#[tokio::test]
async fn health_probes_take_a_backend_out_of_rotation_and_put_it_back() {
    let (ptu, paygo) = (sim().await, sim().await);
    let probe = "health = { interval = \"150ms\", timeout = \"100ms\", unhealthy_after = 2 }";
    let gw = Gateway::start("", &pair(&ptu, &paygo, probe)).await;
    let probes = |s: &SimHandle| {
        s.captured()
            .iter()
            .filter(|c| c.path == "/openai/models")
            .count()
    };
    common::wait_until("probes", Duration::from_secs(5), || probes(&ptu) >= 2).await;
    assert!(ptu.captured()[0]
        .query
        .as_deref()
        .unwrap()
        .contains("api-version="));
    ptu.set_behavior(Behavior::ServerError(500));
    let deadline = Instant::now() + Duration::from_secs(5);
    while entry(&view_of(&gw).await, "ptu")["health"]["probe_healthy"] != false {
        assert!(Instant::now() < deadline, "the probe never failed it");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = chats(&ptu);
    assert_eq!(post(&gw, "out").await.status(), 200);
    assert_eq!(gw.audit_for("out").await["backend"], "paygo");
    assert_eq!(chats(&ptu), before, "out of rotation: not tried");
    ptu.set_behavior(Behavior::Normal);
    let deadline = Instant::now() + Duration::from_secs(5);
    while entry(&view_of(&gw).await, "ptu")["health"]["probe_healthy"] != true {
        assert!(Instant::now() < deadline, "the probe never passed again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(post(&gw, "back").await.status(), 200);
    assert_eq!(gw.audit_for("back").await["backend"], "ptu");
    let m = gw.metrics().await;
    assert!(
        m.contains(r#"portcullis_backend_probes_total{backend="ptu",outcome="fail"}"#),
        "{m}"
    );
}

#[tokio::test]
async fn attempts_stop_at_max_attempts() {
    let (a, b, c) = (sim().await, sim().await, sim().await);
    for s in [&a, &b, &c] {
        s.set_behavior(Behavior::ServerError(503));
    }
    let backends = [
        be("a", &a.url(), 0, ""),
        be("b", &b.url(), 1, ""),
        be("c", &c.url(), 2, ""),
    ]
    .concat();
    let gw = Gateway::start("[routing]\nmax_attempts = 2", &backends).await;
    let resp = post(&gw, "two").await;
    assert_eq!(resp.status(), 503, "the last answer is relayed");
    let a_ = gw.audit_for("two").await;
    assert_eq!(a_["attempts"], 2);
    assert_eq!(a_["tried"].as_array().unwrap().len(), 2);
    assert_eq!((chats(&a), chats(&b), chats(&c)), (1, 1, 0));
}

#[tokio::test]
async fn admin_backends_needs_the_admin_token() {
    let s = sim().await;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"admin-secret-0123456789\"\n[audit]\npath = \"-\"\n{}\n{}",
        common::ANYONE,
        be("only", &s.url(), 0, "")
    );
    let v = portcullis::config::load_str(&text, "t", dir.path()).unwrap();
    let running = portcullis::app::start(&v).await.unwrap();
    let url = format!("http://{}/admin/backends", running.admin_addr.unwrap());
    let r = http().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http().get(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http()
        .get(&url)
        .bearer_auth("admin-secret-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let only = entry(&v, "only");
    assert_eq!(only["credential"]["kind"], "api_key");
    assert!(
        !v.to_string().contains(common::BACKEND_KEY),
        "no secret shown"
    );
    assert_eq!(only["health"]["circuit"], "closed");
}

#[tokio::test]
async fn timeouts_total_ends_an_answer_that_runs_too_long() {
    // 12 words at 150 ms each: about 1.8 s of stream, against a total of 1 s.
    let slow = common::sim_with(Duration::from_millis(150)).await;
    let gw = Gateway::start(
        "",
        &be(
            "slow",
            &slow.url(),
            0,
            "timeouts = { connect = \"200ms\", first_byte = \"500ms\", idle = \"5s\", total = \"1s\" }",
        ),
    )
    .await;
    let started = Instant::now();
    let resp = gw.chat(true, &[("x-request-id", "long")]).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut failed = false;
    use futures_util::StreamExt;
    while let Some(chunk) = body.next().await {
        if chunk.is_err() {
            failed = true;
            break;
        }
    }
    let took = started.elapsed();
    assert!(failed, "the stream ends with an error, not a clean end");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1700),
        "cut at the total timeout: {took:?}"
    );
    assert_eq!(gw.audit_for("long").await["outcome"], "total_timeout");
}
