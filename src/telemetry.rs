//! Telemetry: OpenTelemetry traces of requests, exported over OTLP/HTTP (protobuf).
//!
//! A leaf the pipeline calls. [`Telemetry::start`] builds the exporter (`opentelemetry-otlp`
//! on the gateway's rustls `reqwest` client) behind the SDK's batch span processor, whose task
//! runs on a tokio runtime of its own thread (`runtime::TokioCurrentThread`: no worker's
//! runtime ever runs an export, and the SDK's blocking shutdown cannot deadlock one): a
//! finished span is one `try_send` into its bounded queue (full: the span is dropped, never
//! the request slowed), and exports happen in batches off the request path. [`Telemetry::shutdown`] exports what is queued when the
//! gateway stops.
//!
//! Per request, [`Telemetry::request`] reads the client's W3C `traceparent` (a malformed
//! one is ignored) and decides, parent-based, whether the request is traced. A traced
//! request carries a [`RequestTrace`]: the root span (kind `SERVER`, named and attributed
//! after the OpenTelemetry GenAI semantic conventions when the request ends, from its audit
//! record), `identify` and `admit` children, and one `CLIENT` span per upstream attempt
//! ([`Attempt`]), whose id the attempt's `traceparent` names to the backend. An untraced
//! request — telemetry off, or not sampled — carries nothing (`None`) and its `traceparent`
//! and `tracestate` pass to the backend as the client sent them.
//!
//! What is exported is what the audit line says and no more: ids, names, numbers, the
//! client id and subject. Never a prompt, a completion, a credential, or a header value.

use std::borrow::Cow;
use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{
    span_processor_with_async_runtime::BatchSpanProcessor, BatchConfigBuilder, Sampler, SdkTracer,
    SdkTracerProvider, Span,
};

use crate::audit::AuditRecord;
use crate::config::telemetry::TelemetrySettings;
use crate::config::BackendKind;
use crate::routing::Backend;

/// The W3C Trace Context request header.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("telemetry exporter: {0}")]
pub struct TelemetryError(String);

/// The exporter and the tracer every request's spans come from (cheap to clone: both are
/// shared handles).
#[derive(Clone)]
pub struct Telemetry {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

/// A trace id as the audit line writes it: 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditTraceId(pub [u8; 16]);

impl AuditTraceId {
    /// The 32 hex digits.
    pub fn hex(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        out
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

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
    let mut all = headers.get_all(&TRACEPARENT).iter();
    let v = all.next()?;
    if all.next().is_some() {
        return None;
    }
    parse_traceparent(v.as_bytes())
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

/// `00-{trace}-{span}-01`: the `traceparent` naming a sampled span.
fn traceparent_value(trace_id: TraceId, span_id: SpanId) -> Option<HeaderValue> {
    let mut buf = [0u8; 55];
    buf[..3].copy_from_slice(b"00-");
    buf[3..35].copy_from_slice(&AuditTraceId(trace_id.to_bytes()).hex());
    buf[35] = b'-';
    for (i, b) in span_id.to_bytes().iter().enumerate() {
        buf[36 + 2 * i] = HEX[usize::from(b >> 4)];
        buf[37 + 2 * i] = HEX[usize::from(b & 0xf)];
    }
    buf[52..].copy_from_slice(b"-01");
    HeaderValue::from_bytes(&buf).ok()
}

impl Telemetry {
    /// Build the exporter and start its batch task (on a thread of its own).
    pub fn start(s: &TelemetrySettings) -> Result<Self, TelemetryError> {
        let client = reqwest::Client::builder()
            .timeout(s.timeout)
            .no_proxy()
            .build()
            .map_err(|e| TelemetryError(format!("HTTP client: {e}")))?;
        let headers = s
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.expose().to_owned()))
            .collect();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(s.endpoint.clone())
            .with_timeout(s.timeout)
            .with_headers(headers)
            .build()
            // The error names the setting, never a header value.
            .map_err(|e| TelemetryError(e.to_string()))?;
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(s.max_queue)
            .with_max_export_batch_size(s.max_queue.min(512))
            .with_scheduled_delay(s.batch_delay)
            .with_max_export_timeout(s.timeout)
            .build();
        let exporter = Logged {
            inner: exporter,
            failing: std::sync::atomic::AtomicBool::new(false),
        };
        let processor =
            BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::TokioCurrentThread)
                .with_batch_config(batch)
                .build();
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", s.service_name.clone()),
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            ])
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                s.sampling_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("portcullis");
        tracing::info!(endpoint = %s.endpoint, sampling_ratio = s.sampling_ratio, "exporting traces over OTLP/HTTP");
        Ok(Self { provider, tracer })
    }

    /// The trace of a request arriving now, when it is sampled (see the module docs).
    pub fn request(&self, headers: &HeaderMap) -> Option<Box<RequestTrace>> {
        let parent = match client_traceparent(headers) {
            Some(tp) => Context::new().with_remote_span_context(SpanContext::new(
                TraceId::from_bytes(tp.trace_id),
                SpanId::from_bytes(tp.span_id),
                if tp.sampled {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        let root = self
            .tracer
            .span_builder("request")
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        if !root.span_context().is_sampled() {
            return None;
        }
        let sc = root.span_context().clone();
        Some(Box::new(RequestTrace {
            tracer: self.tracer.clone(),
            parent: Context::new().with_remote_span_context(sc.clone()),
            context: sc,
            root,
            server: None,
            attempts: 0,
        }))
    }

    /// Export every span still queued and stop the batch task (at shutdown).
    pub async fn shutdown(&self) {
        let provider = self.provider.clone();
        // The SDK waits for its batch task synchronously: off the runtime's threads.
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not export the last traces"),
            Err(e) => tracing::warn!(error = %e, "could not export the last traces"),
        }
    }
}

/// The OTLP exporter, logging when exports start to fail and when they work again (once
/// each, not per batch: a collector that is down must not flood the log). The SDK's own
/// diagnostics are compiled out (`internal-logs` off).
#[derive(Debug)]
struct Logged {
    inner: opentelemetry_otlp::SpanExporter,
    failing: std::sync::atomic::AtomicBool,
}

impl opentelemetry_sdk::trace::SpanExporter for Logged {
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        use std::sync::atomic::Ordering;
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match &result {
            Ok(()) if self.failing.swap(false, Ordering::Relaxed) => {
                tracing::info!("trace export works again");
            }
            // The error names the endpoint's answer or the connection's failure, never a
            // header value.
            Err(e) if !self.failing.swap(true, Ordering::Relaxed) => {
                tracing::warn!(error = %e, spans, "trace export failed; the spans are dropped (logged once until exports work again)");
            }
            _ => {}
        }
        result
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// Where a backend is: host and port of its URL (never its user or password).
#[derive(Debug, Clone)]
struct Server {
    address: String,
    port: i64,
    provider: &'static str,
}

fn server_of(b: &Backend) -> Server {
    let port = b
        .authority
        .port_u16()
        .unwrap_or(if b.scheme == http::uri::Scheme::HTTP {
            80
        } else {
            443
        });
    Server {
        address: b.authority.host().to_owned(),
        port: i64::from(port),
        provider: match b.kind {
            BackendKind::Azure => "azure.ai.openai",
            BackendKind::Openai => "openai",
        },
    }
}

/// A traced request: its root span and what its children need.
pub struct RequestTrace {
    tracer: SdkTracer,
    root: Span,
    context: SpanContext,
    /// The root span as the parent of its children.
    parent: Context,
    /// The backend that answered (or was tried last).
    server: Option<Server>,
    attempts: u32,
}

impl RequestTrace {
    /// The trace id, for the audit line.
    pub fn trace_id(&self) -> AuditTraceId {
        AuditTraceId(self.context.trace_id().to_bytes())
    }

    /// A child span of a stage (`identify`, `admit`) that ran from `start` until now;
    /// `error` is the gateway's error code when the stage refused the request.
    pub fn stage(&self, name: &'static str, start: SystemTime, error: Option<&'static str>) {
        let mut span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .start_with_context(&self.tracer, &self.parent);
        if let Some(code) = error {
            span.set_attribute(KeyValue::new("error.type", code));
            span.set_status(Status::error(code));
        }
        span.end();
    }

    /// Start the span of an attempt at `backend`, and name it in the attempt's
    /// `traceparent` (the client's `tracestate` is already among `headers`).
    pub fn attempt(
        &mut self,
        backend: &Backend,
        method: &http::Method,
        headers: &mut HeaderMap,
    ) -> Attempt {
        self.attempts += 1;
        let server = server_of(backend);
        let attributes = vec![
            KeyValue::new("http.request.method", method.as_str().to_owned()),
            KeyValue::new("server.address", server.address.clone()),
            KeyValue::new("server.port", server.port),
            KeyValue::new("portcullis.backend", backend.name.clone()),
            KeyValue::new("portcullis.attempt", i64::from(self.attempts)),
            KeyValue::new("gen_ai.provider.name", server.provider),
        ];
        let span = self
            .tracer
            .span_builder(format!("{} {}", method.as_str(), backend.name))
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &self.parent);
        let sc = span.span_context();
        if let Some(v) = traceparent_value(sc.trace_id(), sc.span_id()) {
            headers.insert(TRACEPARENT.clone(), v);
        }
        self.server = Some(server);
        Attempt { span }
    }

    /// The backend whose answer is relayed, or that was tried last.
    pub fn answered_by(&mut self, backend: &Backend) {
        self.server = Some(server_of(backend));
    }

    /// End the root span when the request ends: named and attributed from its audit record
    /// (`rec`) and the model the backend's answer named.
    pub fn finish(mut self, rec: &AuditRecord, response_model: Option<&str>) {
        let operation = gen_ai_operation(rec.operation);
        let name: Cow<'static, str> = match (&rec.deployment, rec.operation) {
            (_, "unknown") => rec.method.as_str().to_owned().into(),
            (Some(model), _) => format!("{operation} {model}").into(),
            (None, _) => Cow::Borrowed(operation),
        };
        self.root.update_name(name);
        let mut a = Vec::with_capacity(24);
        a.push(KeyValue::new("gen_ai.operation.name", operation));
        if let Some(d) = &rec.deployment {
            a.push(KeyValue::new("gen_ai.request.model", d.clone()));
        }
        if let Some(m) = response_model.filter(|m| !m.is_empty()) {
            a.push(KeyValue::new("gen_ai.response.model", m.to_owned()));
        }
        if let Some(u) = &rec.usage {
            a.push(KeyValue::new(
                "gen_ai.usage.input_tokens",
                int(u.prompt_tokens),
            ));
            a.push(KeyValue::new(
                "gen_ai.usage.output_tokens",
                int(u.completion_tokens),
            ));
        }
        if let Some(s) = self.server.take() {
            a.push(KeyValue::new("gen_ai.provider.name", s.provider));
            a.push(KeyValue::new("server.address", s.address));
            a.push(KeyValue::new("server.port", s.port));
        }
        a.push(KeyValue::new(
            "http.request.method",
            rec.method.as_str().to_owned(),
        ));
        a.push(KeyValue::new("url.path", rec.path.clone()));
        a.push(KeyValue::new(
            "http.response.status_code",
            i64::from(rec.status),
        ));
        if let Some(c) = &rec.client {
            a.push(KeyValue::new(
                "portcullis.client",
                Value::String(c.to_string().into()),
            ));
        }
        a.push(KeyValue::new("portcullis.auth_method", rec.auth_method));
        if let Some(s) = rec.identity.as_ref().and_then(|p| p.subject.clone()) {
            a.push(KeyValue::new("portcullis.subject", s));
        }
        if let Some(d) = rec.decision {
            a.push(KeyValue::new("portcullis.decision", d));
        }
        if let Some(b) = &rec.backend {
            a.push(KeyValue::new("portcullis.backend", b.as_str().to_owned()));
        }
        a.push(KeyValue::new(
            "portcullis.attempts",
            i64::from(rec.attempts),
        ));
        a.push(KeyValue::new(
            "portcullis.request_id",
            rec.request_id.to_str().unwrap_or_default().to_owned(),
        ));
        a.push(KeyValue::new("portcullis.stream", rec.stream));
        a.push(KeyValue::new("portcullis.outcome", rec.outcome));
        // A refusal's code; else a failed answer's status, or how the relay ended.
        let error: Option<Cow<'static, str>> = match (rec.error_code, rec.status, rec.outcome) {
            (Some(code), _, _) => Some(code.into()),
            (None, s, _) if s >= 400 => Some(rec.status.to_string().into()),
            (None, _, "complete") => None,
            (None, _, outcome) => Some(outcome.into()),
        };
        if let Some(e) = error {
            self.root.set_status(Status::error(e.clone()));
            a.push(KeyValue::new("error.type", e));
        }
        self.root.set_attributes(a);
        self.root.end();
    }
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

/// One upstream attempt's span (kind `CLIENT`).
pub struct Attempt {
    span: Span,
}

impl Attempt {
    /// End it: `outcome` is the attempt's (`response`, `rate_limited` — a 429, the backend
    /// cooled down and the next tried —, `connect_error`, `status_5xx`, `timeout`,
    /// `unauthorized`, `error`, `invalid_response`); `status` its answer's, 0 for none.
    pub fn end(mut self, outcome: &'static str, status: u16) {
        if status != 0 {
            self.span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        self.span
            .set_attribute(KeyValue::new("portcullis.attempt.outcome", outcome));
        if outcome != "response" || status >= 500 {
            let e: Cow<'static, str> = if status >= 400 {
                status.to_string().into()
            } else {
                outcome.into()
            };
            self.span.set_status(Status::error(e.clone()));
            self.span.set_attribute(KeyValue::new("error.type", e));
        }
        self.span.end();
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
        h.append(&TRACEPARENT, HeaderValue::from_static(ok));
        assert!(client_traceparent(&h).is_some());
        h.append(&TRACEPARENT, HeaderValue::from_static(ok));
        assert!(
            client_traceparent(&h).is_none(),
            "two traceparents: neither"
        );
    }

    #[test]
    fn traceparent_written_names_the_span() {
        let v = traceparent_value(
            TraceId::from_bytes([0xab; 16]),
            SpanId::from_bytes([1, 2, 3, 4, 5, 6, 7, 8]),
        )
        .unwrap();
        assert_eq!(v, "00-abababababababababababababababab-0102030405060708-01");
        assert!(parse_traceparent(v.as_bytes()).is_some());
    }
}
