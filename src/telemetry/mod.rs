//! Telemetry: OpenTelemetry traces of requests, exported over OTLP/HTTP (protobuf).
//!
//! A leaf the pipeline calls. Per request, [`Telemetry::request`] reads the client's W3C
//! `traceparent` (a malformed one is ignored) and decides, parent-based, whether the
//! request is traced: a client's sampled flag decides for its own request, else the
//! configured ratio does (OpenTelemetry's `TraceIdRatioBased`, on the trace id's low 63
//! bits). A traced request carries a [`RequestTrace`]: the root span (kind `SERVER`, named
//! and attributed after the OpenTelemetry GenAI semantic conventions when the request ends,
//! from its audit record), `identify` and `admit` children, and one `CLIENT` span per
//! upstream attempt ([`Attempt`]), whose id the attempt's `traceparent` names to the
//! backend. An untraced request — telemetry off, or not sampled — carries nothing (`None`)
//! and its `traceparent` and `tracestate` pass to the backend as the client sent them.
//!
//! What it costs: each span is encoded to OTLP protobuf once, when it ends, into its
//! request's buffer ([`otlp`]; the buffer is the worker thread's, reused request after
//! request); the finished request appends it to the batch being gathered in one push
//! ([`export`]), and a thread of its own sends batches. No span object, no per-attribute
//! allocation, no allocation per request at all once a thread has its buffers, no channel
//! send per span, no intermediate copy for an exporter to encode again. `bench/callgrind.sh TELEMETRY=1` measures it.
//!
//! What is exported is what the audit line says and no more: ids, names, numbers, the
//! client id and subject. Never a prompt, a completion, a credential, or a header value.

mod export;
mod otlp;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, Method};

use crate::audit::AuditRecord;
use crate::config::telemetry::TelemetrySettings;
use crate::config::BackendKind;
use crate::routing::Backend;
use otlp::{Kind, Span};

/// The W3C Trace Context request header.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("telemetry exporter: {0}")]
pub struct TelemetryError(String);

/// The exporter and the sampling decision every request's trace comes from (cheap to
/// clone: a shared handle). Dropping the last clone stops the exporter after one last
/// export.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    exporter: export::Exporter,
    /// Requests without a parent are traced when their trace id's low 63 bits are below
    /// this; `u64::MAX`: all of them.
    bound: u64,
}

/// A trace id as the audit line writes it: 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditTraceId(pub [u8; 16]);

impl AuditTraceId {
    /// The 32 hex digits.
    pub fn hex(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        hex_into(&self.0, &mut out);
        out
    }
}

/// Every byte's two lowercase hex digits: one lookup per byte.
static HEX: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
        i += 1;
    }
    t
};

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX[usize::from(*b)]);
    }
}

/// A client's valid `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traceparent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// The request's one valid `traceparent` (W3C Trace Context level 1): version `00` of
/// exactly 55 characters, or a later version at least as long (its extra fields ignored);
/// lowercase hex, trace and parent ids not all zeros, version not `ff`. A header that is
/// absent, repeated or malformed gives `None`.
pub fn client_traceparent(headers: &HeaderMap) -> Option<Traceparent> {
    sent_traceparent(headers).1
}

/// Whether the request has a `traceparent` at all, and its one valid one.
fn sent_traceparent(headers: &HeaderMap) -> (bool, Option<Traceparent>) {
    let mut all = headers.get_all(&TRACEPARENT).iter();
    let Some(v) = all.next() else {
        return (false, None);
    };
    if all.next().is_some() {
        return (true, None);
    }
    (true, parse_traceparent(v.as_bytes()))
}

fn parse_traceparent(b: &[u8]) -> Option<Traceparent> {
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let version = hex_byte(b[0], b[1])?;
    match version {
        0xff => return None,
        0 if b.len() != 55 => return None,
        _ if b.len() > 55 && b[55] != b'-' => return None,
        _ => {}
    }
    let mut trace_id = [0u8; 16];
    for (i, t) in trace_id.iter_mut().enumerate() {
        *t = hex_byte(b[3 + 2 * i], b[4 + 2 * i])?;
    }
    let mut span_id = [0u8; 8];
    for (i, s) in span_id.iter_mut().enumerate() {
        *s = hex_byte(b[36 + 2 * i], b[37 + 2 * i])?;
    }
    let flags = hex_byte(b[53], b[54])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Traceparent {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

fn hex_byte(hi: u8, lo: u8) -> Option<u8> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(nibble(hi)? << 4 | nibble(lo)?)
}

/// The `traceparent` value an attempt sends: `00-{trace}-{span}-01`, naming its sampled
/// span. Visible ASCII; an HTTP/1.1 backend gets it written straight into the request head
/// (no `HeaderValue` built, checked and inserted per attempt), an HTTP/2 one as a header.
pub type TraceparentValue = [u8; 55];

fn traceparent_value(trace_id: &[u8; 16], span_id: &[u8; 8]) -> TraceparentValue {
    let mut buf = [0u8; 55];
    buf[..3].copy_from_slice(b"00-");
    hex_into(trace_id, &mut buf[3..35]);
    buf[35] = b'-';
    hex_into(span_id, &mut buf[36..52]);
    buf[52..].copy_from_slice(b"-01");
    buf
}

/// A span id: random, never all zeros.
fn span_id() -> [u8; 8] {
    fastrand::u64(1..).to_ne_bytes()
}

/// Nanoseconds since the Unix epoch (0 for a clock set before it).
fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| {
        d.as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()))
    })
}

fn now_ns() -> u64 {
    unix_ns(SystemTime::now())
}

/// Span buffers kept per worker thread, for requests in flight at once there.
const KEPT_BUFFERS: usize = 64;

thread_local! {
    /// Emptied span buffers of requests this thread finished, for the next ones.
    static BUFFERS: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Telemetry {
    /// Build the exporter and start its thread.
    pub fn start(s: &TelemetrySettings) -> Result<Self, TelemetryError> {
        let envelope = otlp::Envelope::new(
            &[
                ("service.name", &s.service_name),
                ("service.version", env!("CARGO_PKG_VERSION")),
                ("telemetry.sdk.name", "portcullis"),
                ("telemetry.sdk.language", "rust"),
            ],
            "portcullis",
            env!("CARGO_PKG_VERSION"),
        );
        let exporter = export::Exporter::start(s, envelope)?;
        let bound = if s.sampling_ratio >= 1.0 {
            u64::MAX
        } else {
            // Below 2^63 (ratio < 1), 0 for a ratio of 0: nothing without a parent.
            (s.sampling_ratio.max(0.0) * (1u64 << 63) as f64) as u64
        };
        tracing::info!(endpoint = %s.endpoint, sampling_ratio = s.sampling_ratio, "exporting traces over OTLP/HTTP");
        Ok(Self {
            inner: Arc::new(Inner { exporter, bound }),
        })
    }

    /// The trace of a request that arrived at `start`, when it is sampled (see the module
    /// docs).
    pub fn request(&self, headers: &HeaderMap, start: SystemTime) -> Option<Box<RequestTrace>> {
        let (sent, valid) = sent_traceparent(headers);
        let (trace_id, parent, remote_parent) = match valid {
            Some(tp) if !tp.sampled => return None,
            Some(tp) => (tp.trace_id, tp.span_id, true),
            None => {
                let id = fastrand::u128(1..).to_be_bytes();
                let low = u64::from_be_bytes(id[8..].try_into().unwrap_or_default()) >> 1;
                if self.inner.bound != u64::MAX && low >= self.inner.bound {
                    return None;
                }
                (id, [0; 8], false)
            }
        };
        Some(Box::new(RequestTrace {
            queue: self.inner.exporter.queue.clone(),
            trace_id,
            root: span_id(),
            parent,
            remote_parent,
            replaces_clients: sent,
            start_ns: unix_ns(start),
            spans: BUFFERS
                .with_borrow_mut(Vec::pop)
                .unwrap_or_else(|| Vec::with_capacity(2048)),
            count: 0,
            server: None,
            attempts: 0,
        }))
    }

    /// Export every span still queued and stop the exporter (at shutdown).
    pub async fn shutdown(&self) {
        self.inner.exporter.shutdown().await;
    }
}

/// `gen_ai.provider.name` of a backend.
fn provider(b: &Backend) -> &'static str {
    match b.kind {
        BackendKind::Azure => "azure.ai.openai",
        BackendKind::Openai => "openai",
    }
}

/// A traced request: its ids and its spans, encoded as they end.
pub struct RequestTrace {
    queue: Arc<export::Queue>,
    trace_id: [u8; 16],
    /// The root span's id.
    root: [u8; 8],
    /// The client's span (all zeros: none).
    parent: [u8; 8],
    remote_parent: bool,
    /// The client sent a `traceparent` (valid or not): attempts send theirs instead.
    replaces_clients: bool,
    start_ns: u64,
    /// Every ended span, as OTLP `ScopeSpans.spans` entries.
    spans: Vec<u8>,
    count: usize,
    /// The backend that answered (or was tried last).
    server: Option<Arc<Backend>>,
    attempts: u32,
}

impl RequestTrace {
    /// The trace id, for the audit line.
    pub fn trace_id(&self) -> AuditTraceId {
        AuditTraceId(self.trace_id)
    }

    /// A child span of a stage (`identify`, `admit`) that ran from `start` until now;
    /// `error` is the gateway's error code when the stage refused the request.
    pub fn stage(&mut self, name: &'static str, start: SystemTime, error: Option<&'static str>) {
        let span = Span {
            trace_id: &self.trace_id,
            span_id: span_id(),
            parent: self.root,
            remote_parent: false,
            name: &[name],
            kind: Kind::Internal,
            start_ns: unix_ns(start),
            end_ns: now_ns(),
            error,
        };
        let spans = &mut self.spans;
        otlp::span(spans, &span, |a| {
            if let Some(code) = error {
                a.str("error.type", code);
            }
        });
        self.count += 1;
    }

    /// Start the span of an attempt at `backend`; the attempt sends the `traceparent`
    /// returned, naming it, in place of any the client sent among `headers` (which are
    /// removed; the client's `tracestate` stays).
    pub fn attempt(
        &mut self,
        backend: &Arc<Backend>,
        method: &Method,
        headers: &mut HeaderMap,
    ) -> (Box<Attempt>, TraceparentValue) {
        self.attempts += 1;
        let id = span_id();
        if self.replaces_clients {
            headers.remove(&TRACEPARENT);
        }
        self.server = Some(backend.clone());
        let attempt = Box::new(Attempt {
            span_id: id,
            start_ns: now_ns(),
            method: known_method(method),
            number: self.attempts,
        });
        (attempt, traceparent_value(&self.trace_id, &id))
    }

    /// The backend whose answer is relayed, or that was tried last.
    pub fn answered_by(&mut self, backend: &Arc<Backend>) {
        self.server = Some(backend.clone());
    }

    /// End the root span when the request ends — named and attributed from its audit
    /// record (`rec`) and the model the backend's answer named — and queue the request's
    /// spans for export.
    pub fn finish(mut self, rec: &AuditRecord, response_model: Option<&str>) {
        let operation = gen_ai_operation(rec.operation);
        let name: &[&str] = match (&rec.deployment, rec.operation) {
            (_, "unknown") => &[rec.method.as_str()],
            (Some(model), _) => &[operation, " ", model],
            (None, _) => &[operation],
        };
        let status = three_digits(rec.status);
        // A refusal's code; else a failed answer's status, or how the relay ended.
        let error: Option<&str> = match (rec.error_code, rec.status, rec.outcome) {
            (Some(code), _, _) => Some(code),
            (None, s, _) if s >= 400 => Some(status.as_str()),
            (None, _, "complete") => None,
            (None, _, outcome) => Some(outcome),
        };
        let server = self.server.take();
        let span = Span {
            trace_id: &self.trace_id,
            span_id: self.root,
            parent: self.parent,
            remote_parent: self.remote_parent,
            name,
            kind: Kind::Server,
            start_ns: self.start_ns,
            end_ns: now_ns(),
            error,
        };
        let spans = &mut self.spans;
        otlp::span(spans, &span, |a| {
            a.str("gen_ai.operation.name", operation);
            if let Some(d) = &rec.deployment {
                a.str("gen_ai.request.model", d);
            }
            if let Some(m) = response_model.filter(|m| !m.is_empty()) {
                a.str("gen_ai.response.model", m);
            }
            if let Some(u) = &rec.usage {
                a.int("gen_ai.usage.input_tokens", int(u.prompt_tokens));
                a.int("gen_ai.usage.output_tokens", int(u.completion_tokens));
            }
            if let Some(b) = &server {
                a.str("gen_ai.provider.name", provider(b));
                a.str("server.address", b.pool.host());
                a.int("server.port", i64::from(b.pool.port()));
            }
            a.str("http.request.method", known_method(&rec.method));
            a.str("url.path", &rec.path);
            a.int("http.response.status_code", i64::from(rec.status));
            if let Some(c) = &rec.client {
                a.str("portcullis.client", c);
            }
            a.str("portcullis.auth_method", rec.auth_method);
            if let Some(s) = rec.identity.as_ref().and_then(|p| p.subject.as_deref()) {
                a.str("portcullis.subject", s);
            }
            if let Some(d) = rec.decision {
                a.str("portcullis.decision", d);
            }
            if let Some(b) = &rec.backend {
                a.str("portcullis.backend", b);
            }
            a.int("portcullis.attempts", i64::from(rec.attempts));
            // A request id is visible ASCII (ours, or a client's checked one).
            a.ascii("portcullis.request_id", rec.request_id.as_bytes());
            a.bool("portcullis.stream", rec.stream);
            // How the relay ended, when it did not complete (the audit line's `outcome`).
            if rec.outcome != "complete" {
                a.str("portcullis.outcome", rec.outcome);
            }
            if let Some(e) = error {
                a.str("error.type", e);
            }
        });
        self.count += 1;
        self.queue.push(&self.spans, self.count);
        let mut spans = std::mem::take(&mut self.spans);
        spans.clear();
        BUFFERS.with_borrow_mut(|b| {
            // One that grew for an unusually long request is let go.
            if b.len() < KEPT_BUFFERS && spans.capacity() <= 16 * 1024 {
                b.push(spans);
            }
        });
    }
}

/// An HTTP status as its three digits (`error.type` of a failed answer).
struct ThreeDigits([u8; 3]);

impl ThreeDigits {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("error")
    }
}

fn three_digits(status: u16) -> ThreeDigits {
    let s = status.min(999);
    ThreeDigits([
        b'0' + (s / 100) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
    ])
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `gen_ai.operation.name` for the gateway's operation: the convention's well-known values
/// where one fits (the Responses API generates a chat turn), else the operation's own name.
fn gen_ai_operation(op: &'static str) -> &'static str {
    match op {
        "chat" | "responses" => "chat",
        "completions" => "text_completion",
        other => other,
    }
}

/// One upstream attempt's span (kind `CLIENT`), under way.
pub struct Attempt {
    span_id: [u8; 8],
    start_ns: u64,
    /// `http.request.method` (see [`known_method`]).
    method: &'static str,
    number: u32,
}

/// `http.request.method` as the HTTP conventions write it: a method of RFC 9110 or
/// RFC 5789 as it is, any other `_OTHER`.
fn known_method(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

impl Attempt {
    /// End it: `outcome` is the attempt's (`response`, `rate_limited` — a 429, the backend
    /// cooled down and the next tried —, `connect_error`, `status_5xx`, `timeout`,
    /// `unauthorized`, `error`, `invalid_response`); `status` its answer's, 0 for none.
    pub fn end(self, trace: &mut RequestTrace, b: &Backend, outcome: &'static str, status: u16) {
        let digits = three_digits(status);
        let error = (outcome != "response" || status >= 500).then(|| {
            if status >= 400 {
                digits.as_str()
            } else {
                outcome
            }
        });
        // The conventions' name for a method they do not know.
        let method = match self.method {
            "_OTHER" => "HTTP",
            m => m,
        };
        let span = Span {
            trace_id: &trace.trace_id,
            span_id: self.span_id,
            parent: trace.root,
            remote_parent: false,
            name: &[method, " ", &b.name],
            kind: Kind::Client,
            start_ns: self.start_ns,
            end_ns: now_ns(),
            error,
        };
        let spans = &mut trace.spans;
        otlp::span(spans, &span, |a| {
            a.str("http.request.method", self.method);
            a.str("server.address", b.pool.host());
            a.int("server.port", i64::from(b.pool.port()));
            a.str("portcullis.backend", &b.name);
            a.int("portcullis.attempt", i64::from(self.number));
            if status != 0 {
                a.int("http.response.status_code", i64::from(status));
            }
            a.str("portcullis.attempt.outcome", outcome);
            if let Some(e) = error {
                a.str("error.type", e);
            }
        });
        trace.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parsing_follows_w3c() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = parse_traceparent(ok.as_bytes()).unwrap();
        assert!(tp.sampled);
        assert_eq!(
            AuditTraceId(tp.trace_id).hex(),
            *b"4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(tp.span_id, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        assert!(!parse_traceparent(unsampled.as_bytes()).unwrap().sampled);
        // A later version may add fields after a dash.
        assert!(parse_traceparent(format!("01{}-what", &ok[2..]).as_bytes()).is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        let mut h = HeaderMap::new();
        h.append(&TRACEPARENT, http::HeaderValue::from_static(ok));
        assert!(client_traceparent(&h).is_some());
        h.append(&TRACEPARENT, http::HeaderValue::from_static(ok));
        assert!(
            client_traceparent(&h).is_none(),
            "two traceparents: neither"
        );
    }

    #[test]
    fn methods_are_named_as_the_conventions_ask() {
        assert_eq!(known_method(&Method::POST), "POST");
        assert_eq!(known_method(&Method::PATCH), "PATCH");
        let custom = Method::from_bytes(b"PROPFIND").unwrap();
        assert_eq!(known_method(&custom), "_OTHER");
    }

    #[test]
    fn traceparent_written_names_the_span() {
        let v = traceparent_value(&[0xab; 16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            &v[..],
            b"00-abababababababababababababababab-0102030405060708-01"
        );
        assert!(parse_traceparent(&v).is_some());
    }
}
