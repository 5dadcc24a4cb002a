//! The gateway service: one request through the pipeline.
//!
//! ```text
//! parse route → read body (bounded) → resolve deployment → route (candidates)
//!   → forward (upstream auth applied per backend) → relay response → audit
//! ```
//! Identity, authorization and admission slot in before routing as they land. The state
//! a request uses is one immutable [`Snapshot`], loaded once per request from an
//! `ArcSwap`, so a new configuration never changes a request already running.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body as HttpBody;
use http_body_util::{BodyExt, Limited};

use crate::audit::{AuditRecord, AuditSink};
use crate::authorize;
use crate::config::Validated;
use crate::error::{json_response, Body, BoxError, GatewayError};
use crate::identify::{Caller, Identifier};
use crate::metrics::{LatencyLabels, Metrics, RequestLabels};
use crate::proxy::{self, body::Finish, body::Relay, Outgoing, REQUEST_ID};
use crate::route::{self, Route};
use crate::routing::{Backend, BackendTable, BuildError};
use crate::upstream_auth::Credential;

/// Everything a request needs from the configuration, immutable once built.
pub struct Snapshot {
    pub backends: BackendTable,
    pub identity: Identifier,
    pub max_body_bytes: u64,
    pub body_timeout: std::time::Duration,
    /// `auth.resource`: this gateway's URL as clients know it (RFC 9728).
    resource: Option<String>,
    scopes_supported: Vec<String>,
}

impl Snapshot {
    /// Build from a validated configuration and its identifier.
    /// `credentials` is index-aligned with `config.backends`; `metrics` must be the registry
    /// of the [`Gateway`] that will serve this snapshot (backends count into it directly).
    pub fn build(
        v: &Validated,
        identity: Identifier,
        credentials: &[Credential],
        metrics: &Metrics,
    ) -> Result<Self, BuildError> {
        Ok(Self {
            backends: BackendTable::build(v, credentials, metrics)?,
            identity,
            max_body_bytes: v.config.server.max_body_bytes,
            body_timeout: v.config.server.body_timeout.0,
            resource: v
                .config
                .auth
                .resource
                .as_ref()
                .map(|r| r.as_str().trim_end_matches('/').to_owned()),
            scopes_supported: v
                .config
                .auth
                .scopes_supported
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect(),
        })
    }

    /// This gateway's resource URL: `auth.resource`, else from the request's `Host`.
    fn resource(&self, host: Option<&HeaderValue>) -> String {
        if let Some(r) = &self.resource {
            return r.clone();
        }
        let host = host
            .and_then(|h| h.to_str().ok())
            .filter(|h| {
                !h.is_empty()
                    && h.len() <= 255
                    && h.bytes().all(|c| {
                        c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b':' | b'[' | b']')
                    })
            })
            .unwrap_or("localhost");
        format!("http://{host}")
    }

    /// The RFC 9728 Protected Resource Metadata document.
    fn resource_metadata(&self, host: Option<&HeaderValue>) -> Bytes {
        let servers: Vec<String> = self
            .identity
            .issuers()
            .iter()
            .flat_map(|i| i.advertised())
            .collect();
        let doc = serde_json::json!({
            "resource": self.resource(host),
            "authorization_servers": servers,
            "scopes_supported": self.scopes_supported,
            "bearer_methods_supported": ["header"],
            "resource_name": "Portcullis",
        });
        Bytes::from(doc.to_string())
    }
}

/// Path of the RFC 9728 document.
pub const RESOURCE_METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

fn model_object(name: &str) -> serde_json::Value {
    serde_json::json!({ "id": name, "object": "model", "created": 0, "owned_by": "portcullis" })
}

/// Metric label for requests no backend handled.
static NO_BACKEND: std::sync::LazyLock<Arc<String>> =
    std::sync::LazyLock::new(|| Arc::new(String::new()));

/// The gateway: configuration snapshot, metrics, audit.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    pub metrics: Arc<Metrics>,
    audit: AuditSink,
    draining: AtomicBool,
}

impl Gateway {
    pub fn new(snapshot: Snapshot, metrics: Arc<Metrics>, audit: AuditSink) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            audit,
            draining: AtomicBool::new(false),
        }
    }

    /// Replace the configuration; requests already running keep the old one.
    pub fn swap(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    /// Wait (bounded) until every issuer's first key fetch was attempted.
    pub async fn wait_issuer_keys(&self, deadline: std::time::Duration) {
        let snap = self.snapshot.load_full();
        snap.identity.wait_keys(deadline).await;
    }

    /// Stop reporting ready (shutdown has begun).
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Readiness: `Ok` when every backend credential is ready and not draining; otherwise
    /// the reasons.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        if self.draining.load(Ordering::SeqCst) {
            reasons.push(SHUTTING_DOWN.to_owned());
        }
        let snap = self.snapshot.load();
        for b in snap.backends.backends() {
            if let Err(why) = b.credential.readiness() {
                let who = b
                    .credential
                    .identity()
                    .map_or(String::new(), |i| format!(" as {i}"));
                reasons.push(format!(
                    "backend '{}': {} credential{who} not ready: {why}",
                    b.name,
                    b.credential.describe()
                ));
            }
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }

    /// Handle one client request.
    pub async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Response<Body>
    where
        B: HttpBody<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/health") => return health(),
            (&Method::GET, "/ready") => return ready(self.readiness().map_err(public_reasons)),
            (&Method::GET, RESOURCE_METADATA_PATH) => {
                let body = self.snapshot.load().resource_metadata(host(&req));
                let mut resp = json_response(StatusCode::OK, body);
                // Without `auth.resource` the document depends on the Host header.
                resp.headers_mut()
                    .insert(header::VARY, HeaderValue::from_static("host"));
                return resp;
            }
            _ => {}
        }
        let host = host(&req).cloned();
        let started = Instant::now();
        let request_id = request_id(req.headers());
        let mut guard = Unanswered {
            rec: AuditRecord::new(
                request_id.clone(),
                req.method().clone(),
                req.uri().path().to_owned(),
            ),
            gateway: &self,
            started,
            armed: true,
        };
        let snap = self.snapshot.load_full();
        let result = self
            .pipeline(req, &snap, &mut guard.rec, &request_id, started)
            .await;
        guard.armed = false;
        let mut resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                let mut rec = std::mem::take(&mut guard.rec);
                rec.status = e.status().as_u16();
                rec.error_code = Some(e.code());
                rec.outcome = "refused";
                if e.is_access_denial() {
                    rec.decision = Some("deny");
                    rec.reason = Some(e.to_string());
                }
                let elapsed = started.elapsed().as_secs_f64() * 1000.0;
                rec.latency_ms = elapsed;
                rec.duration_ms = elapsed;
                // Only authentication challenges name the RFC 9728 document.
                let metadata = e
                    .challenges()
                    .then(|| format!("{}{RESOURCE_METADATA_PATH}", snap.resource(host.as_ref())));
                let resp = e.into_response(metadata.as_deref());
                self.count(&rec, None);
                self.audit.emit(rec);
                resp
            }
        };
        resp.headers_mut().insert(REQUEST_ID.clone(), request_id);
        resp
    }

    /// Count a request in the metrics; `answered_by` when a backend's answer is relayed.
    /// The latency observed is the record's `latency_ms`, which every caller sets first.
    fn count(&self, rec: &AuditRecord, answered_by: Option<&Backend>) {
        let seconds = rec.latency_ms / 1000.0;
        if let Some(b) = answered_by {
            b.series.answered(rec.operation, rec.status, seconds);
            return;
        }
        let backend = rec.backend.clone().unwrap_or_else(|| NO_BACKEND.clone());
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                operation: rec.operation,
                status: rec.status,
                backend: backend.clone(),
            })
            .inc();
        self.metrics
            .latency
            .get_or_create(&LatencyLabels {
                operation: rec.operation,
                backend,
            })
            .observe(seconds);
    }

    async fn pipeline<B>(
        &self,
        req: Request<B>,
        snap: &Snapshot,
        rec: &mut AuditRecord,
        request_id: &HeaderValue,
        started: Instant,
    ) -> Result<Response<Body>, GatewayError>
    where
        B: HttpBody<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        // Parsed first so refusals are audited with their operation; a bad route is only
        // reported to callers who proved who they are.
        let route = route::parse(&parts.method, parts.uri.path(), parts.uri.query());
        if let Ok(r) = &route {
            rec.operation = r.operation.as_str();
        }
        let caller = snap.identity.identify(&parts.headers).await.map_err(|r| {
            rec.auth_method = r.method;
            rec.identity = r.principal;
            r.error
        })?;
        rec.note_caller(&caller);
        let route = route?;
        authorize::operation(&caller, route.operation)?;
        if route.is_model_listing() {
            rec.decision = Some("allow");
            return self.models(&parts.method, &route, &caller, snap, rec, started);
        }

        let body = tokio::time::timeout(
            snap.body_timeout,
            read_body(&parts.headers, body, snap.max_body_bytes),
        )
        .await
        .map_err(|_| {
            GatewayError::RequestTimeout(humantime::format_duration(snap.body_timeout).to_string())
        })??;
        rec.bytes_in = body.len() as u64;
        // Kept apart: the headers themselves move into the upstream request.
        let content_type_value = parts.headers.get(header::CONTENT_TYPE).cloned();
        let content_type = content_type_value.as_ref().and_then(|v| v.to_str().ok());
        let deployment = match &route.deployment {
            Some(d) => Some(d.clone()),
            None => proxy::rewrite::body_model(&body, content_type)?,
        };
        if let Some(d) = &deployment {
            if !route::valid_name(d) {
                return Err(GatewayError::UnknownDeployment(shown(d)));
            }
        } else if route.operation.needs_deployment() {
            return Err(GatewayError::InvalidRequest(
                "you must provide a model parameter".into(),
            ));
        }
        if let Some(d) = &deployment {
            authorize::deployment(&caller, d)?;
        }
        rec.decision = Some("allow");
        rec.deployment = deployment.clone();
        let candidates = snap
            .backends
            .candidates(deployment.as_deref())
            .ok_or_else(|| {
                GatewayError::UnknownDeployment(deployment.clone().unwrap_or_default())
            })?;

        let out = Outgoing {
            route: &route,
            deployment: deployment.as_deref(),
            method: &parts.method,
            headers: proxy::upstream_headers(parts.headers, request_id),
            body,
            content_type,
        };
        let answer = match proxy::forward(out, candidates).await {
            Ok(a) => a,
            Err(failed) => {
                rec.note_backend(failed.backend.as_deref(), failed.attempts);
                return Err(failed.error);
            }
        };
        rec.note_backend(Some(&answer.backend), answer.attempts);
        let (mut head, upstream_body) = answer.response.into_parts();
        proxy::strip_hop_by_hop(&mut head.headers);
        rec.status = head.status.as_u16();
        rec.stream = head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/event-stream"));
        rec.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.count(rec, Some(&answer.backend));
        let finish = Finish {
            record: std::mem::take(rec),
            started,
            audit: self.audit.clone(),
            metrics: self.metrics.clone(),
        };
        let relay = Relay::new(upstream_body, answer.backend.idle_timeout, finish);
        Ok(Response::from_parts(head, relay.boxed_unsync()))
    }

    fn models(
        &self,
        method: &Method,
        route: &Route,
        caller: &Caller,
        snap: &Snapshot,
        rec: &mut AuditRecord,
        started: Instant,
    ) -> Result<Response<Body>, GatewayError> {
        if method != Method::GET {
            return Err(GatewayError::MethodNotAllowed(method.to_string()));
        }
        let body = match route.rest.strip_prefix("models/") {
            None if route.rest == "models" => {
                let data: Vec<_> = snap
                    .backends
                    .public_names()
                    .iter()
                    .filter(|n| authorize::visible(caller, n))
                    .map(|n| model_object(n))
                    .collect();
                Bytes::from(serde_json::json!({ "object": "list", "data": data }).to_string())
            }
            Some(id) if authorize::visible(caller, id) && snap.backends.serves(id) => {
                Bytes::from(model_object(id).to_string())
            }
            Some(id) => return Err(GatewayError::UnknownDeployment(shown(id))),
            None => {
                return Err(GatewayError::NotFound {
                    method: method.to_string(),
                    path: rec.path.clone(),
                })
            }
        };
        rec.status = 200;
        rec.outcome = "complete";
        rec.bytes_out = body.len() as u64;
        rec.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        rec.duration_ms = rec.latency_ms;
        self.count(rec, None);
        self.audit.emit(std::mem::take(rec));
        Ok(json_response(StatusCode::OK, body))
    }
}

/// Owns a request's audit record until the pipeline hands it on. If the request is
/// dropped before a response head exists — the client went away while the backend was
/// still thinking, or the drain timeout ended it — the record is still written and
/// counted, as status 499 (client closed request).
struct Unanswered<'a> {
    rec: AuditRecord,
    gateway: &'a Gateway,
    started: Instant,
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut rec = std::mem::take(&mut self.rec);
        rec.status = 499;
        rec.outcome = "client_disconnected";
        let elapsed = self.started.elapsed().as_secs_f64() * 1000.0;
        rec.latency_ms = elapsed;
        rec.duration_ms = elapsed;
        self.gateway.count(&rec, None);
        self.gateway.audit.emit(rec);
    }
}

/// Read the whole request body, refusing more than `limit` bytes (413) — early from
/// `Content-Length` when the client sends one.
async fn read_body<B>(headers: &http::HeaderMap, body: B, limit: u64) -> Result<Bytes, GatewayError>
where
    B: HttpBody<Data = Bytes> + Send,
    B::Error: Into<BoxError>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit_usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(GatewayError::PayloadTooLarge { limit })
        }
        Err(e) => Err(GatewayError::InvalidRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// A client-supplied name as it may appear in an error message: escaped, at most 64 chars.
pub(crate) fn shown(name: &str) -> String {
    let mut s: String = name.escape_default().take(64).collect();
    if name.escape_default().count() > 64 {
        s.push('…');
    }
    s
}

/// The client's `x-request-id` when it is a sane token, else a fresh UUID.
fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
        {
            return v.clone();
        }
    }
    // Encoded into a stack buffer: the same text as `to_string`, without the formatter.
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn host<B>(req: &Request<B>) -> Option<&HeaderValue> {
    req.headers().get(header::HOST)
}

/// `GET /health`: the process is up.
pub fn health() -> Response<Body> {
    json_response(StatusCode::OK, Bytes::from_static(br#"{"status":"ok"}"#))
}

/// What `/ready` on the client listener may say: that the gateway is shutting down, or that
/// some backend credential is not ready — not which, as whom, or the IdP's answer (backend
/// names, client ids, tenants). The admin listener's `/ready` has the details.
fn public_reasons(reasons: Vec<String>) -> Vec<String> {
    const CREDENTIALS: &str =
        "a backend credential is not ready (details on the admin listener's /ready)";
    let mut out: Vec<String> = Vec::new();
    for r in reasons {
        let r = if r == SHUTTING_DOWN {
            r
        } else {
            CREDENTIALS.to_owned()
        };
        if !out.contains(&r) {
            out.push(r);
        }
    }
    out
}

/// The readiness reason while draining.
const SHUTTING_DOWN: &str = "shutting down";

/// `GET /ready`: 200 when ready, 503 with the reasons otherwise.
pub fn ready(state: Result<(), Vec<String>>) -> Response<Body> {
    match state {
        Ok(()) => json_response(StatusCode::OK, Bytes::from_static(br#"{"status":"ready"}"#)),
        Err(reasons) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from(
                serde_json::json!({ "status": "not_ready", "reasons": reasons }).to_string(),
            ),
        ),
    }
}
