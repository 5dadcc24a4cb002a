//! The gateway service: one request through the pipeline.
//!
//! ```text
//! parse route → identify → authorize (operation; deployment when the path names it)
//!   → admit (concurrency) → read body (bounded) → authorize (deployment named by the body)
//!   → admit (estimate; reserve every limit) → route → forward (upstream auth applied per
//!   backend) → relay response → account (usage, reconcile, record) → audit
//! ```
//! Each step is one call into the module named after it; a traced request (see
//! [`crate::telemetry`]) also carries its [`RequestTrace`], whose root span ends where the
//! audit record is finished. The state
//! a request uses is one immutable [`Snapshot`], loaded once per request from an
//! `ArcSwap`, so a new configuration never changes a request already running.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body as HttpBody;
use http_body_util::BodyExt;

use crate::account::{self, Accounting, Meter};
use crate::admit::{self, Demand, Limiter};
use crate::audit::{AuditRecord, AuditSink};
use crate::authorize;
use crate::buffer::{self, BodyBudget, BodyLimits};
use crate::config::Validated;
use crate::error::{json_response, Body, BoxError, GatewayError};
use crate::identify::{Caller, Identifier};
use crate::metrics::{LatencyLabels, Metrics, RequestLabels};
use crate::proxy::{self, body::Finish, body::Relay, Outgoing, REQUEST_ID};
use crate::route::{self, Route};
use crate::routing::health::HealthRegistry;
use crate::routing::{Backend, BackendTable, BuildError};
use crate::telemetry::{self, RequestTrace, Telemetry};
use crate::tokens::Estimate;
use crate::upstream_auth::Credential;

/// Everything a request needs from the configuration, immutable once built.
pub struct Snapshot {
    pub backends: BackendTable,
    pub identity: Identifier,
    pub body_limits: BodyLimits,
    /// `[limits]`: how requests are estimated before they are admitted.
    estimate: crate::tokens::EstimateOptions,
    /// `[limits] estimate = "always"`: every request is estimated, needed or not.
    estimate_always: bool,
    /// Whether any request can need a token estimate (see [`Snapshot::estimates_tokens`]).
    estimates_tokens: bool,
    /// `[prices]`.
    prices: crate::pricing::PriceTable,
    /// `server.trusted_proxies`: peers whose forwarding headers are kept and extended.
    trusted_proxies: Vec<ipnet::IpNet>,
    /// `auth.resource`: this gateway's URL as clients know it (RFC 9728).
    resource: Option<String>,
    scopes_supported: Vec<String>,
    /// `[[clients]]` as written, for the admin API.
    pub client_configs: Arc<Vec<crate::config::ClientConfig>>,
    /// Sidecar mode: every path goes to the one backend unchanged, as the anonymous client.
    passthrough: bool,
}

impl Snapshot {
    /// Build from a validated configuration and its identifier.
    /// `credentials` is index-aligned with `config.backends`; `metrics` must be the registry
    /// of the [`Gateway`] that will serve this snapshot (backends count into it directly).
    /// `health` is the gateway's [`HealthRegistry`]: backends kept from an earlier snapshot
    /// keep their cool-downs, circuits and counts. On a reload, `previous` is the snapshot
    /// being replaced: backends with unchanged connection settings keep its upstream
    /// connection pools.
    pub fn build(
        v: &Validated,
        identity: Identifier,
        credentials: &[Credential],
        metrics: &Metrics,
        health: &HealthRegistry,
        previous: Option<&Snapshot>,
    ) -> Result<Self, BuildError> {
        let backends = BackendTable::build_from(
            v,
            credentials,
            metrics,
            health,
            previous.map(|p| &p.backends),
        )?;
        crate::routing::probe::spawn_all(&backends);
        let estimate_always =
            v.config.limits.estimate == crate::config::limits::EstimateWhen::Always;
        let estimates_tokens = estimate_always
            || backends.weighs_any_tokens()
            || identity.clients().any(|c| c.limits.counts_tokens());
        Ok(Self {
            backends,
            identity,
            body_limits: BodyLimits {
                max_bytes: v.config.server.max_body_bytes,
                timeout: v.config.server.body_timeout.0,
            },
            estimate: crate::tokens::EstimateOptions {
                default_max_tokens: v.config.limits.default_max_tokens,
                reserve_output: match v.config.limits.reserve_output {
                    crate::config::limits::ReserveOutput::MaxTokens => {
                        crate::tokens::ReserveOutput::MaxTokens
                    }
                    crate::config::limits::ReserveOutput::None => {
                        crate::tokens::ReserveOutput::None
                    }
                },
                default_image_tokens: v.config.limits.default_image_tokens,
            },
            estimate_always,
            estimates_tokens,
            prices: crate::pricing::PriceTable::new(&v.config.prices),
            trusted_proxies: v.trusted_proxies.clone(),
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
            client_configs: Arc::new(v.config.clients.clone()),
            passthrough: v.config.passthrough,
        })
    }

    /// Whether requests under this configuration may be estimated: `[limits] estimate =
    /// "always"`, a client with a token limit, quota or budget, or headroom routing over a
    /// pool of two or more. When not, the tokenizer's tables need not be loaded.
    pub fn estimates_tokens(&self) -> bool {
        self.estimates_tokens
    }

    /// Whether something reads this request's estimate before it is answered: `[limits]
    /// estimate = "always"`, a token limit, quota or budget of its client, or headroom
    /// routing over `deployment`'s pool of two or more.
    fn needs_estimate(&self, caller: &Caller, deployment: Option<&str>) -> bool {
        self.estimate_always
            || caller.client.limits.counts_tokens()
            || self.backends.weighs_tokens(deployment)
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
    /// Request-body bytes all requests may hold at once (`server.max_buffered_body_bytes`).
    pub budget: BodyBudget,
    /// Limit counters (kept across configuration swaps).
    limiter: Arc<Limiter>,
    accounting: Arc<Accounting>,
    /// Backend health (cool-downs, circuits, in-flight counts), kept across swaps.
    health: Arc<HealthRegistry>,
    /// The client listener's TLS state (certificates, client verifier), when configured.
    tls: Option<Arc<crate::tls::server::ServerTls>>,
    /// The trace exporter (`[telemetry]`), when traces are exported.
    telemetry: Option<Telemetry>,
}

impl Gateway {
    pub fn new(
        snapshot: Snapshot,
        metrics: Arc<Metrics>,
        audit: AuditSink,
        budget: BodyBudget,
        limiter: Arc<Limiter>,
        accounting: Arc<Accounting>,
        health: Arc<HealthRegistry>,
    ) -> Self {
        let gauge = metrics.buffered_body_bytes.clone();
        let seen = budget.clone();
        metrics.before_render(Box::new(move || {
            gauge.set(i64::try_from(seen.held()).unwrap_or(i64::MAX));
        }));
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            audit,
            draining: AtomicBool::new(false),
            budget,
            limiter,
            accounting,
            health,
            tls: None,
            telemetry: None,
        }
    }

    /// Trace requests with this exporter (`[telemetry]`; `None`: no traces).
    pub fn with_telemetry(mut self, telemetry: Option<Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// The audit sink (the admin API writes its own lines to it).
    pub fn audit(&self) -> &AuditSink {
        &self.audit
    }

    /// The limit counters (the admin API reads what each client has left).
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    /// The client listener's TLS, whose client certificates (or, with `forwarded_cert`,
    /// a trusted proxy's header) identify callers.
    pub fn with_tls(mut self, tls: Option<Arc<crate::tls::server::ServerTls>>) -> Self {
        self.tls = tls;
        self
    }

    /// The backend health registry a new snapshot must be built with.
    pub fn health(&self) -> &Arc<HealthRegistry> {
        &self.health
    }

    /// The configuration snapshot requests use now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
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

    /// Readiness: ready when every backend is usable; degraded (still serving) when some
    /// backend is not but every deployment keeps one that is; not ready when draining or
    /// some deployment has no usable backend. With the reasons, in full (the admin
    /// listener's view; the client listener shows [`Readiness::public`]).
    pub fn readiness(&self) -> Readiness {
        let mut down = Vec::new();
        if self.draining.load(Ordering::SeqCst) {
            down.push(SHUTTING_DOWN.to_owned());
        }
        let snap = self.snapshot.load();
        let now = crate::routing::health::now_ms();
        let mut degraded = Vec::new();
        let mut usable = Vec::with_capacity(snap.backends.backends().len());
        for b in snap.backends.backends() {
            let ok = match b.usable(now) {
                Ok(()) => true,
                Err(why) if b.credential.readiness().is_err() => {
                    let who = b
                        .credential
                        .identity()
                        .map_or(String::new(), |i| format!(" as {i}"));
                    let cred = b.credential.readiness().err().unwrap_or(why);
                    degraded.push(format!(
                        "backend '{}': {} credential{who} not ready: {cred}",
                        b.name,
                        b.credential.describe()
                    ));
                    false
                }
                Err(why) => {
                    degraded.push(format!("backend '{}': {why}", b.name));
                    false
                }
            };
            usable.push((Arc::as_ptr(b), ok));
        }
        for (deployment, members) in snap.backends.pools() {
            let any = members.iter().any(|m| {
                usable
                    .iter()
                    .any(|(p, ok)| *ok && std::ptr::eq(*p, Arc::as_ptr(m)))
            });
            if !any {
                down.push(format!("deployment '{deployment}' has no usable backend"));
            }
        }
        // Sidecar mode names no deployments: its one backend is every deployment.
        if snap.passthrough && !usable.iter().any(|(_, ok)| *ok) {
            down.push("deployment '*' has no usable backend".to_owned());
        }
        if !down.is_empty() {
            down.extend(degraded);
            Readiness::NotReady(down)
        } else if !degraded.is_empty() {
            Readiness::Degraded(degraded)
        } else {
            Readiness::Ready
        }
    }

    /// Every backend's state for the admin API: pool position, credential, circuit,
    /// probe, in-flight requests, last error, and per deployment its cool-down and the
    /// rate-limit room it last reported.
    pub fn backends_view(&self) -> serde_json::Value {
        let snap = self.snapshot.load();
        let now = crate::routing::health::now_ms();
        let list: Vec<serde_json::Value> = snap
            .backends
            .backends()
            .iter()
            .map(|b| {
                let deployments: serde_json::Map<String, serde_json::Value> = b
                    .deployment_health
                    .iter()
                    .map(|(public, d)| {
                        (
                            public.clone(),
                            serde_json::to_value(d.view(now)).unwrap_or_default(),
                        )
                    })
                    .collect();
                let cred = b.credential.readiness();
                serde_json::json!({
                    "name": b.name,
                    // Never a user or password the URL might carry.
                    "url": format!(
                        "{}://{}{}",
                        b.scheme,
                        b.authority.as_str().rsplit('@').next().unwrap_or_default(),
                        b.base_path
                    ),
                    "priority": b.priority,
                    "weight": b.weight,
                    "max_concurrent": b.max_concurrent,
                    "usable": b.usable(now).is_ok(),
                    "unusable_because": b.usable(now).err(),
                    "credential": {
                        "kind": b.credential.describe(),
                        "identity": b.credential.identity().map(|i| i.to_string()),
                        "ready": cred.is_ok(),
                        "problem": cred.err(),
                    },
                    "health": b.health.view(now, b.probe.is_some()),
                    "deployments": deployments,
                })
            })
            .collect();
        serde_json::json!({ "object": "list", "data": list })
    }

    /// Handle one client request from `peer`.
    pub async fn handle<B>(
        self: Arc<Self>,
        req: Request<B>,
        peer: std::net::SocketAddr,
    ) -> Response<Body>
    where
        B: HttpBody<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/health") => return health(),
            (&Method::GET, "/ready") => return ready(self.readiness().public()),
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
        let mut rec = AuditRecord::new(
            request_id.clone(),
            req.method().clone(),
            req.uri().path().to_owned(),
        );
        // Telemetry off: one branch, nothing built. The audit line still names the trace the
        // client's `traceparent` is part of.
        let trace = match &self.telemetry {
            Some(t) => t.request(req.headers(), rec.time),
            None => None,
        };
        rec.trace_id = match &trace {
            Some(t) => Some(t.trace_id()),
            None => telemetry::client_traceparent(req.headers())
                .map(|tp| telemetry::AuditTraceId(tp.trace_id)),
        };
        let mut guard = Unanswered {
            record: Record { rec, trace },
            gateway: &self,
            started,
            armed: true,
        };
        let snap = self.snapshot.load_full();
        let result = self
            .pipeline(req, peer, &snap, &mut guard.record, &request_id, started)
            .await;
        guard.armed = false;
        let mut resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                let mut rec = std::mem::take(&mut guard.record.rec);
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
                if let Some(t) = guard.record.trace.take() {
                    t.finish(&rec, None);
                }
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
        peer: std::net::SocketAddr,
        snap: &Snapshot,
        record: &mut Record,
        request_id: &HeaderValue,
        started: Instant,
    ) -> Result<Response<Body>, GatewayError>
    where
        B: HttpBody<Data = Bytes> + Send,
        B::Error: Into<BoxError>,
    {
        let Record { rec, trace } = record;
        let (mut parts, body) = req.into_parts();
        // Parsed first so refusals are audited with their operation; a bad route is only
        // reported to callers who proved who they are.
        let route = if snap.passthrough {
            route::passthrough(&parts.method, parts.uri.path(), parts.uri.query())
        } else {
            route::parse(&parts.method, parts.uri.path(), parts.uri.query())
        };
        if let Ok(r) = &route {
            rec.operation = r.operation.as_str();
        }
        let cert =
            crate::identify::certificate::from_request(&mut parts, peer.ip(), self.tls.as_deref())
                .inspect_err(|_| rec.auth_method = "certificate")?;
        rec.client_certificate = cert.clone();
        let since = trace.is_some().then(SystemTime::now);
        let anonymous = snap
            .passthrough
            .then(|| snap.identity.anonymous())
            .flatten();
        let identified = match anonymous {
            Some(caller) => Ok(caller),
            None => snap
                .identity
                .identify(&parts.headers, cert.as_ref())
                .await
                .map_err(|r| {
                    rec.auth_method = r.method;
                    rec.identity = r.principal;
                    r.error
                }),
        };
        if let (Some(t), Some(since)) = (trace.as_deref_mut(), since) {
            t.stage(
                "identify",
                since,
                identified.as_ref().err().map(|e| e.code()),
            );
        }
        let caller = identified?;
        rec.note_caller(&caller);
        let route = route?;
        route.check_method(&parts.method)?;
        authorize::operation(&caller, route.operation)?;
        if route.is_model_listing() {
            rec.decision = Some("allow");
            return self.models(&parts.method, &route, &caller, snap, record, started);
        }
        // A deployment the path names is checked before a byte of the body is read.
        if let Some(d) = &route.deployment {
            authorize::deployment(&caller, d)?;
        }
        let admission = admit::admit(&caller)?;
        let body = buffer::read(&parts.headers, body, snap.body_limits, &self.budget).await?;
        rec.bytes_in = body.bytes.len() as u64;
        // Kept apart: the headers themselves move into the upstream request.
        let mut content_types = parts.headers.get_all(header::CONTENT_TYPE).iter();
        let content_type_value = content_types.next().cloned();
        if content_types.next().is_some() {
            return Err(GatewayError::InvalidRequest(
                "the request has more than one Content-Type header".into(),
            ));
        }
        let content_type = content_type_value.as_ref().and_then(|v| v.to_str().ok());
        let deployment = match &route.deployment {
            Some(d) => Some(d.clone()),
            // Sidecar mode reads the body's model only to name it in audit lines and
            // metrics: a body that is not what the gateway can read goes through as it is.
            None if snap.passthrough => proxy::rewrite::body_model(&body.bytes, content_type)
                .ok()
                .flatten()
                .filter(|d| route::valid_name(d)),
            None => proxy::rewrite::body_model(&body.bytes, content_type)?,
        };
        if let Some(d) = &deployment {
            if !route::valid_name(d) {
                return Err(GatewayError::UnknownDeployment(crate::shown::shown(d)));
            }
        } else if route.must_name_model(&parts.method) {
            return Err(GatewayError::InvalidRequest(
                "you must provide a model parameter".into(),
            ));
        }
        if let (None, Some(d)) = (&route.deployment, &deployment) {
            authorize::deployment(&caller, d)?;
        }
        rec.decision = Some("allow");
        rec.deployment = deployment.clone();
        if let Some(d) = deployment.as_ref().filter(|_| !snap.passthrough) {
            if !snap.backends.serves(d) {
                return Err(GatewayError::UnknownDeployment(d.clone()));
            }
        }

        // Admit: what will this cost, and does it fit every limit?
        let since = trace.is_some().then(SystemTime::now);
        let ticket = self
            .limiter
            .admit(
                &caller,
                admit::Ask {
                    method: &parts.method,
                    operation: route.operation,
                    deployment: deployment.as_deref(),
                    body: &body.bytes,
                    content_type,
                },
                snap.needs_estimate(&caller, deployment.as_deref()),
                &snap.estimate,
                &snap.prices,
            )
            .await;
        if let (Some(t), Some(since)) = (trace.as_deref_mut(), since) {
            t.stage("admit", since, ticket.as_ref().err().map(|e| e.code()));
        }
        let admit::Ticket {
            estimate,
            price,
            reservation,
        } = ticket?;
        let model = deployment.as_deref().unwrap_or_default();
        // Exact streamed usage: ask the backend for it when the client did not (the meter
        // removes it again from what the client receives).
        let injected = match route.operation {
            _ if snap.passthrough => None,
            route::Operation::Chat | route::Operation::Completions => {
                account::tap::inject_include_usage(&body.bytes)
            }
            _ => None,
        };
        let injected_usage = injected.is_some();

        let origin = proxy::Origin {
            peer: peer.ip(),
            trusted: snap
                .trusted_proxies
                .iter()
                .any(|n| n.contains(&peer.ip().to_canonical())),
        };
        let tokens = estimate.map_or(0, Estimate::total);
        // Route: the pool's order for this request (priority, weights, reported headroom).
        let pool = deployment.as_deref().filter(|_| !snap.passthrough);
        let candidates = snap.backends.candidates(pool, tokens).unwrap_or_default();
        let out = Outgoing {
            route: &route,
            deployment: deployment.as_deref(),
            method: &parts.method,
            headers: proxy::upstream_headers(parts.headers, request_id, origin),
            body: injected.unwrap_or_else(|| body.bytes.clone()),
            content_type,
            tokens,
            trace: trace.as_deref_mut(),
        };
        let forwarded = proxy::forward(out, candidates, &snap.backends.policy).await;
        // The body (and its room in the budget) is needed until a backend has answered;
        // when it was not estimated, until the answer has shown whether its usage must be
        // estimated after all (see `account::Deferred`).
        let estimate = match estimate {
            Some(e) => {
                drop(body);
                account::Estimated::Admitted(e)
            }
            None if parts.method == http::Method::POST => {
                account::Estimated::Deferred(account::Deferred {
                    body,
                    form: crate::tokens::is_form(content_type),
                    options: snap.estimate,
                })
            }
            None => {
                drop(body);
                account::Estimated::Unknown
            }
        };
        let answer = match forwarded {
            Ok(a) => a,
            Err(failed) => {
                rec.note_backend(failed.backend.as_deref(), failed.attempts);
                rec.tried = failed.tried;
                // No backend ran it: nothing is owed.
                if let Some(r) = reservation {
                    r.settle(Demand::default());
                }
                return Err(failed.error);
            }
        };
        rec.note_backend(Some(&answer.backend), answer.attempts);
        rec.tried = answer.tried;
        if let Some(t) = trace.as_deref_mut() {
            t.answered_by(&answer.backend);
        }
        let (mut head, mut upstream_body) = answer.response.into_parts();
        // A body the bytes read with the head already show to be broken (a chunk size that
        // is not hex, say) is refused now, while the client can still get a clean 502.
        let first = match upstream_body.take_buffered() {
            Some(Ok(frame)) => Some(frame),
            Some(Err(e)) => {
                answer.backend.series.attempt("invalid_response");
                tracing::warn!(backend = %answer.backend.name, error = %proxy::error_chain(e.as_ref()), "backend answered with a malformed body");
                if let Some(r) = reservation {
                    r.settle(Demand::default());
                }
                return Err(GatewayError::BackendInvalidResponse(format!(
                    "backend '{}' sent a malformed response body",
                    answer.backend.name
                )));
            }
            None => None,
        };
        rec.status = head.status.as_u16();
        if let Some(r) = &reservation {
            r.headers(&mut head.headers);
        }
        let response_type = head
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        rec.stream = response_type.is_some_and(|ct| ct.starts_with("text/event-stream"));
        let p = &caller.principal;
        let meter = Meter::new(
            account::Plan {
                accounting: self.accounting.clone(),
                operation: route.operation,
                encoding: crate::tokens::encoding_for(model),
                deployment,
                estimate,
                reservation,
                price,
                injected_usage,
                want_model: trace.is_some(),
                client: caller.client.id.clone(),
                subject: p.subject.clone(),
                key_id: p.key_id.clone(),
            },
            rec.status,
            response_type,
        );
        if meter.rewrites() {
            // Removing the usage chunk changes the length.
            head.headers.remove(header::CONTENT_LENGTH);
        }
        rec.latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.count(rec, Some(&answer.backend));
        let finish = Finish {
            record: std::mem::take(rec),
            started,
            audit: self.audit.clone(),
            metrics: self.metrics.clone(),
            admission,
            meter: Some(meter),
            lease: Some(answer.lease),
            trace: trace.take(),
        };
        let total = answer.backend.total_timeout.map(|t| started + t);
        let relay = Relay::new(upstream_body, answer.backend.idle_timeout, finish, first)
            .with_deadline(total);
        Ok(Response::from_parts(head, relay.boxed_unsync()))
    }

    fn models(
        &self,
        method: &Method,
        route: &Route,
        caller: &Caller,
        snap: &Snapshot,
        record: &mut Record,
        started: Instant,
    ) -> Result<Response<Body>, GatewayError> {
        let Record { rec, trace } = record;
        if method != Method::GET {
            return Err(GatewayError::MethodNotAllowed {
                method: crate::shown::shown(method.as_str()),
                allow: &[Method::GET],
            });
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
            Some(id) => return Err(GatewayError::UnknownDeployment(crate::shown::shown(id))),
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
        if let Some(t) = trace.take() {
            t.finish(rec, None);
        }
        self.audit.emit(std::mem::take(rec));
        Ok(json_response(StatusCode::OK, body))
    }
}

/// A request's audit record and, when it is traced, its trace: finished together.
struct Record {
    rec: AuditRecord,
    trace: Option<Box<RequestTrace>>,
}

/// Owns a request's audit record until the pipeline hands it on. If the request is
/// dropped before a response head exists — the client went away while the backend was
/// still thinking, or the drain timeout ended it — the record is still written and
/// counted, as status 499 (client closed request).
struct Unanswered<'a> {
    record: Record,
    gateway: &'a Gateway,
    started: Instant,
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut rec = std::mem::take(&mut self.record.rec);
        rec.status = 499;
        rec.outcome = "client_disconnected";
        let elapsed = self.started.elapsed().as_secs_f64() * 1000.0;
        rec.latency_ms = elapsed;
        rec.duration_ms = elapsed;
        self.gateway.count(&rec, None);
        if let Some(t) = self.record.trace.take() {
            t.finish(&rec, None);
        }
        self.gateway.audit.emit(rec);
    }
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

/// The readiness reason while draining.
const SHUTTING_DOWN: &str = "shutting down";

/// What `/ready` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Serving, with some backend unusable (named in the reasons).
    Degraded(Vec<String>),
    /// Draining, or some deployment has no usable backend.
    NotReady(Vec<String>),
}

impl Readiness {
    /// The same verdict with reasons that name no backend, credential, client id, tenant
    /// or IdP answer (the client listener's `/ready`; the details are on the admin
    /// listener's): that the gateway is shutting down, that some deployment has no usable
    /// backend, that some credential is not ready or some backend is not usable.
    pub fn public(self) -> Self {
        let hide = |reasons: Vec<String>| {
            let mut out: Vec<String> = Vec::new();
            for r in reasons {
                let r = if r == SHUTTING_DOWN {
                    r
                } else if r.starts_with("deployment '") {
                    "a deployment has no usable backend (details on the admin listener's /ready)"
                        .to_owned()
                } else if r.contains(" credential") && r.contains("not ready") {
                    "a backend credential is not ready (details on the admin listener's /ready)"
                        .to_owned()
                } else {
                    "a backend is not usable (details on the admin listener's /ready)".to_owned()
                };
                if !out.contains(&r) {
                    out.push(r);
                }
            }
            out
        };
        match self {
            Self::Ready => Self::Ready,
            Self::Degraded(r) => Self::Degraded(hide(r)),
            Self::NotReady(r) => Self::NotReady(hide(r)),
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready)
    }

    /// The reasons (empty when ready).
    pub fn reasons(&self) -> &[String] {
        match self {
            Self::Ready => &[],
            Self::Degraded(r) | Self::NotReady(r) => r,
        }
    }
}

/// `/ready`: 200 `ready` or `degraded` (with reasons), 503 `not_ready`.
pub fn ready(state: Readiness) -> Response<Body> {
    let (status, name, reasons) = match state {
        Readiness::Ready => {
            return json_response(StatusCode::OK, Bytes::from_static(br#"{"status":"ready"}"#))
        }
        Readiness::Degraded(r) => (StatusCode::OK, "degraded", r),
        Readiness::NotReady(r) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready", r),
    };
    json_response(
        status,
        Bytes::from(serde_json::json!({ "status": name, "reasons": reasons }).to_string()),
    )
}
