//! OpenTelemetry traces end to end: the gateway in front of the simulated Azure backend
//! exports to a real OTLP/HTTP receiver (`tests/otlp/receiver.py`, which decodes each
//! `ExportTraceServiceRequest` with the OpenTelemetry project's `opentelemetry-proto`
//! package), and the tests read the spans it decoded: names, kinds, GenAI attributes,
//! parent/child links, the `traceparent` the backend received, the audit line's trace id,
//! failover, refusals, sampling, and that nothing secret is exported.
//!
//! The receiver runs on the project's venv Python (`scripts/test.sh` creates `.venv` with
//! `opentelemetry-proto`); set `PORTCULLIS_PYTHON` to use another interpreter that has it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use portcullis::sim::{Behavior, RetryForm};
use serde_json::Value;

/// The OTLP/HTTP receiver, killed when dropped.
struct Receiver {
    child: Child,
    port: u16,
    spans: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    fn start() -> Receiver {
        let dir = tempfile::tempdir().unwrap();
        let spans = dir.path().join("spans.jsonl");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/otlp/receiver.py");
        let mut child = Command::new(python("opentelemetry-proto"))
            .arg(&script)
            .arg(&spans)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("receiver did not start: {line:?}"))
            .parse()
            .unwrap();
        Receiver {
            child,
            port,
            spans,
            _dir: dir,
        }
    }

    /// `[telemetry]` exporting here, quickly.
    fn section(&self, extra: &str) -> String {
        format!(
            "\n[telemetry]\notlp_endpoint = \"http://127.0.0.1:{}\"\nbatch_delay = \"50ms\"\nservice_name = \"portcullis-test\"\n{extra}\n[telemetry.headers]\nx-collector-key = \"collector-secret-42\"\n",
            self.port
        )
    }

    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.spans)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// What was exported, as bytes on the wire (every export request's body).
    fn raw(&self) -> Vec<u8> {
        let text =
            std::fs::read_to_string(self.spans.with_extension("jsonl.raw")).unwrap_or_default();
        let mut out = Vec::new();
        for line in text.lines() {
            let b = line.as_bytes();
            for pair in b.chunks(2) {
                out.push(u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap());
            }
        }
        out
    }

    /// Wait until the trace `trace_id` has `n` spans.
    async fn trace(&self, trace_id: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans: Vec<Value> = self
                .spans()
                .into_iter()
                .filter(|s| s["trace_id"] == trace_id)
                .collect();
            if spans.len() >= n {
                assert_eq!(spans.len(), n, "spans of {trace_id}: {spans:#?}");
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "trace {trace_id} has {} of {n} spans: {spans:#?}",
                spans.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn named<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    let found: Vec<&Value> = spans.iter().filter(|s| s["name"] == name).collect();
    assert_eq!(found.len(), 1, "one span named {name}: {spans:#?}");
    found[0]
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn traceparent(trace: &str, span: &str, flags: &str) -> String {
    format!("00-{trace}-{span}-{flags}")
}

const IDENTITY: &str =
    "[[clients]]\nid = \"team-a\"\ndeployments = [\"*\"]\noperations = [\"*\"]\n";

async fn azure_sim(token_latency: Duration) -> (portcullis::sim::SimHandle, String) {
    let s = sim_with(token_latency).await;
    let b = backend(
        "sim",
        &s.url(),
        "azure",
        "api_version = \"2024-06-01\"\ndeployments = { \"gpt-4o\" = \"gpt-4o-ptu\" }\n",
    );
    (s, b)
}

fn sim_port(url: &str) -> i64 {
    url.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

#[tokio::test]
async fn requests_are_traced_with_genai_spans_linked_to_the_client_and_the_backend() {
    let rx = Receiver::start();
    let (s, b) = azure_sim(Duration::from_millis(30)).await;
    let g = Gateway::start_with(&rx.section(""), IDENTITY, &b).await;
    let key = g.issue_key("team-a").await;
    let auth = format!("Bearer {key}");

    // Non-streaming, with the client's sampled traceparent and a tracestate.
    let tp = traceparent(CLIENT_TRACE, CLIENT_SPAN, "01");
    let resp = g
        .chat(
            false,
            &[
                ("authorization", &auth),
                ("traceparent", &tp),
                ("tracestate", "vendor=opaque,other=1"),
                ("x-request-id", "otel-plain"),
            ],
        )
        .await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    let seen = s.last().unwrap();
    let spans = rx.trace(CLIENT_TRACE, 4).await;
    let root = named(&spans, "chat gpt-4o");
    assert_eq!(root["kind"], "SPAN_KIND_SERVER");
    assert_eq!(root["parent_span_id"], CLIENT_SPAN, "the client's child");
    assert_eq!(root["status"], "STATUS_CODE_UNSET");
    let root_id = root["span_id"].as_str().unwrap();
    for (name, kind) in [
        ("identify", "SPAN_KIND_INTERNAL"),
        ("admit", "SPAN_KIND_INTERNAL"),
        ("POST sim", "SPAN_KIND_CLIENT"),
    ] {
        let child = named(&spans, name);
        assert_eq!(child["kind"], kind, "{name}");
        assert_eq!(
            child["parent_span_id"], root_id,
            "{name} is the request's child"
        );
        assert_eq!(child["trace_id"], CLIENT_TRACE);
        assert_eq!(child["resource"]["service.name"], "portcullis-test");
    }
    let port = sim_port(&s.url());
    let expect = [
        ("gen_ai.operation.name", Value::from("chat")),
        ("gen_ai.provider.name", "azure.ai.openai".into()),
        ("gen_ai.request.model", "gpt-4o".into()),
        ("gen_ai.response.model", answer["model"].clone()),
        (
            "gen_ai.usage.input_tokens",
            answer["usage"]["prompt_tokens"].clone(),
        ),
        (
            "gen_ai.usage.output_tokens",
            answer["usage"]["completion_tokens"].clone(),
        ),
        ("server.address", "127.0.0.1".into()),
        ("server.port", port.into()),
        ("http.request.method", "POST".into()),
        ("http.response.status_code", 200.into()),
        ("portcullis.client", "team-a".into()),
        ("portcullis.auth_method", "api_key".into()),
        ("portcullis.decision", "allow".into()),
        ("portcullis.backend", "sim".into()),
        ("portcullis.attempts", 1.into()),
        ("portcullis.request_id", "otel-plain".into()),
        ("portcullis.stream", false.into()),
    ];
    for (k, v) in &expect {
        assert_eq!(attr(root, k), v, "{k}: {root:#}");
    }
    assert!(answer["model"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert!(attr(root, "error.type").is_null());
    // Times are Unix nanoseconds of this run, and every child lies within the request.
    let ns = |s: &Value, k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k}: {s:#}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let (start, end) = (ns(root, "start_ns"), ns(root, "end_ns"));
    assert!(start <= end && end <= now && now - start < 600_000_000_000);
    for s in spans.iter().filter(|s| s["span_id"] != root["span_id"]) {
        assert!(
            start <= ns(s, "start_ns")
                && ns(s, "start_ns") <= ns(s, "end_ns")
                && ns(s, "end_ns") <= end,
            "{s:#} outside the request {start}..{end}"
        );
    }
    // The backend saw a traceparent naming the attempt span, and the client's tracestate.
    let attempt = named(&spans, "POST sim");
    assert_eq!(attr(attempt, "http.response.status_code"), 200);
    assert_eq!(attr(attempt, "server.port"), port);
    assert_eq!(attr(attempt, "portcullis.attempt.outcome"), "response");
    assert_eq!(
        seen.headers["traceparent"],
        traceparent(CLIENT_TRACE, attempt["span_id"].as_str().unwrap(), "01")
    );
    assert_eq!(seen.headers["tracestate"], "vendor=opaque,other=1");
    // The audit line names the trace.
    assert_eq!(g.audit_for("otel-plain").await["trace_id"], CLIENT_TRACE);
    // The export carried the configured header.
    assert_eq!(root["headers"]["x-collector-key"], "collector-secret-42");

    // Streaming, with a client trace of its own: the root span lasts until the stream ends
    // and has the usage the backend reported at its end.
    let stream_trace = "0af7651916cd43dd8448eb211c80319c";
    let tp = traceparent(stream_trace, "b7ad6b7169203331", "01");
    let resp = g
        .chat(
            true,
            &[
                ("authorization", &auth),
                ("traceparent", &tp),
                ("x-request-id", "otel-stream"),
            ],
        )
        .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let mut streamed_model = None;
    let mut content = String::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if let Ok(chunk) = serde_json::from_str::<Value>(line) {
            if let Some(m) = chunk["model"].as_str().filter(|m| !m.is_empty()) {
                streamed_model.get_or_insert(m.to_owned());
            }
            if let Some(c) = chunk["choices"][0]["delta"]["content"].as_str() {
                content.push_str(c);
            }
        }
    }
    assert!(content.len() > 3, "{text}");
    let audit = g.audit_for("otel-stream").await;
    assert_eq!(audit["trace_id"], stream_trace);
    assert_eq!(audit["usage"]["source"], "reported");
    let spans = rx.trace(stream_trace, 4).await;
    let root = named(&spans, "chat gpt-4o");
    assert_eq!(root["parent_span_id"], "b7ad6b7169203331");
    assert_eq!(attr(root, "portcullis.stream"), true);
    assert_eq!(
        attr(root, "gen_ai.response.model").as_str(),
        streamed_model.as_deref()
    );
    assert_eq!(
        attr(root, "gen_ai.usage.input_tokens"),
        &audit["usage"]["prompt_tokens"]
    );
    assert_eq!(
        attr(root, "gen_ai.usage.output_tokens"),
        &audit["usage"]["completion_tokens"]
    );
    assert!(audit["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    let attempt = named(&spans, "POST sim");
    let end = |s: &Value| s["end_ns"].as_u64().unwrap();
    // The attempt ends with the answer's head; the request with the stream's last event,
    // several token latencies later.
    assert!(
        end(root) >= end(attempt) + 60_000_000,
        "root {} attempt {}",
        end(root),
        end(attempt)
    );

    // Refused: a bad key gets a span too, in error, with the gateway's code.
    let refused_trace = "11111111111111111111111111111111";
    let tp = traceparent(refused_trace, "2222222222222222", "01");
    let resp = g
        .chat(
            false,
            &[
                (
                    "authorization",
                    "Bearer pcl_aaaaaaaa_notarealkeynotarealkeynotarealkey",
                ),
                ("traceparent", &tp),
            ],
        )
        .await;
    let (status, code) = error_code(resp).await;
    assert_eq!(status, 401);
    let spans = rx.trace(refused_trace, 2).await;
    let root = named(&spans, "chat");
    assert_eq!(root["status"], "STATUS_CODE_ERROR");
    assert_eq!(attr(root, "error.type"), code.as_str());
    assert_eq!(attr(root, "http.response.status_code"), 401);
    let identify = named(&spans, "identify");
    assert_eq!(identify["status"], "STATUS_CODE_ERROR");
    assert_eq!(attr(identify, "error.type"), code.as_str());

    // A malformed traceparent is ignored: a trace of the gateway's own, never an error.
    let resp = g
        .chat(
            false,
            &[
                ("authorization", &auth),
                ("traceparent", "00-not-a-trace-01"),
                ("x-request-id", "otel-own"),
            ],
        )
        .await;
    assert_eq!(resp.status(), 200);
    let own = g.audit_for("otel-own").await["trace_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(own.len(), 32);
    let spans = rx.trace(&own, 4).await;
    assert_eq!(named(&spans, "chat gpt-4o")["parent_span_id"], "");
    let upstream = s.last().unwrap().headers["traceparent"].clone();
    assert!(upstream
        .to_str()
        .unwrap()
        .starts_with(&format!("00-{own}-")));

    // Nothing secret in what was exported: no prompt, no completion, no key, no backend key.
    let raw = rx.raw();
    let has = |needle: &str| raw.windows(needle.len()).any(|w| w == needle.as_bytes());
    for secret in [
        "Hello there",
        key.as_str(),
        &key[key.len() - 20..],
        BACKEND_KEY,
        "collector-secret-42",
        "notarealkey",
        content.as_str(),
        answer["choices"][0]["message"]["content"].as_str().unwrap(),
    ] {
        assert!(!has(secret), "{secret:?} was exported");
    }
}

#[tokio::test]
async fn a_429_failover_has_one_span_per_attempt() {
    let rx = Receiver::start();
    let ptu = sim().await;
    let paygo = sim().await;
    ptu.set_behavior(Behavior::RateLimited {
        retry_after_ms: 30_000,
        form: RetryForm::Azure,
    });
    let g = Gateway::start(
        &rx.section(""),
        &ptu_then_paygo("ptu", &ptu.url(), &paygo.url()),
    )
    .await;
    let trace = "33333333333333333333333333333333";
    let tp = traceparent(trace, "4444444444444444", "01");
    let resp = g.chat(false, &[("traceparent", &tp)]).await;
    assert_eq!(resp.status(), 200);
    let spans = rx.trace(trace, 5).await;
    let root = named(&spans, "chat gpt-4o");
    assert_eq!(attr(root, "portcullis.attempts"), 2);
    assert_eq!(attr(root, "portcullis.backend"), "paygo");
    assert_eq!(attr(root, "server.port"), sim_port(&paygo.url()));
    assert_eq!(attr(root, "portcullis.auth_method"), "anonymous");
    let first = named(&spans, "POST ptu");
    let second = named(&spans, "POST paygo");
    for s in [first, second] {
        assert_eq!(s["kind"], "SPAN_KIND_CLIENT");
        assert_eq!(s["parent_span_id"], root["span_id"]);
    }
    assert_eq!(attr(first, "http.response.status_code"), 429);
    assert_eq!(attr(first, "portcullis.attempt.outcome"), "rate_limited");
    assert_eq!(attr(first, "error.type"), "429");
    assert_eq!(first["status"], "STATUS_CODE_ERROR");
    assert_eq!(attr(first, "portcullis.attempt"), 1);
    assert_eq!(attr(second, "portcullis.attempt"), 2);
    assert_eq!(attr(second, "http.response.status_code"), 200);
    // Each backend was told its own attempt's span.
    let sent = |s: &portcullis::sim::SimHandle| s.last().unwrap().headers["traceparent"].clone();
    assert_eq!(
        sent(&ptu),
        traceparent(trace, first["span_id"].as_str().unwrap(), "01")
    );
    assert_eq!(
        sent(&paygo),
        traceparent(trace, second["span_id"].as_str().unwrap(), "01")
    );
}

#[tokio::test]
async fn sampling_ratio_zero_exports_nothing_and_changes_nothing() {
    let rx = Receiver::start();
    let (s, b) = azure_sim(Duration::ZERO).await;
    let g = Gateway::start(&rx.section("sampling_ratio = 0.0"), &b).await;
    // An unsampled client parent, and no parent at all: neither is traced.
    let quiet = "55555555555555555555555555555555";
    let tp = traceparent(quiet, "6666666666666666", "00");
    let resp = g
        .chat(
            false,
            &[("traceparent", &tp), ("x-request-id", "unsampled")],
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        s.last().unwrap().headers["traceparent"],
        tp.as_str(),
        "passed on as sent"
    );
    assert_eq!(g.audit_for("unsampled").await["trace_id"], quiet);
    let resp = g.chat(true, &[("x-request-id", "no-parent")]).await;
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    assert!(s.last().unwrap().headers.get("traceparent").is_none());
    assert!(g.audit_for("no-parent").await.get("trace_id").is_none());
    // A sampled client parent is honoured even at ratio 0: once its spans are in, every
    // earlier request's would be too.
    let marker = "77777777777777777777777777777777";
    let tp = traceparent(marker, "8888888888888888", "01");
    assert_eq!(g.chat(false, &[("traceparent", &tp)]).await.status(), 200);
    rx.trace(marker, 4).await;
    let others: Vec<Value> = rx
        .spans()
        .into_iter()
        .filter(|s| s["trace_id"] != marker)
        .collect();
    assert!(others.is_empty(), "{others:#?}");
}

#[tokio::test]
async fn telemetry_off_passes_the_client_trace_context_unchanged() {
    let (s, b) = azure_sim(Duration::ZERO).await;
    let g = Gateway::start("", &b).await;
    let tp = traceparent(CLIENT_TRACE, CLIENT_SPAN, "01");
    let resp = g
        .chat(
            true,
            &[
                ("traceparent", &tp),
                ("tracestate", "vendor=opaque"),
                ("x-request-id", "off"),
            ],
        )
        .await;
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    let seen = s.last().unwrap();
    assert_eq!(seen.headers["traceparent"], tp.as_str());
    assert_eq!(seen.headers["tracestate"], "vendor=opaque");
    assert_eq!(g.audit_for("off").await["trace_id"], CLIENT_TRACE);
    // A malformed one passes too (it is the client's business), and names no trace.
    let resp = g
        .chat(
            false,
            &[("traceparent", "garbage"), ("x-request-id", "off-bad")],
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(s.last().unwrap().headers["traceparent"], "garbage");
    assert!(g.audit_for("off-bad").await.get("trace_id").is_none());
}
