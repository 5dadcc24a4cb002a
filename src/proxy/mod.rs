//! Forward: send the request to a backend and hand back its response head.
//!
//! Client headers are cleaned (hop-by-hop headers and every client credential removed),
//! the backend's credential is added, and candidates are tried in routing order, each
//! checked against its health just before the attempt (see [`forward`]). A request moves
//! to the next candidate only before any byte of an answer reached the client: after a
//! connection failure, a 429, a rejected credential, or a 5xx / first-byte timeout the
//! backend's `retry_on` names. The response body is relayed by [`body::Relay`] without
//! buffering.

pub mod body;
pub mod h1;
pub mod multipart;
pub mod pool;
pub mod rewrite;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response};

use std::time::Duration;

use tokio::time::Instant;

use crate::audit::Tried;
use crate::config::routing::RetryOn;
use crate::error::GatewayError;
use crate::route::Route;
use crate::routing::health::{self, CoolSource, Gate, Lease};
use crate::routing::{signals, Backend, Policy};
use crate::upstream_auth::Credential;

/// Whether a header describes the connection rather than the message (RFC 9110 §7.6.1).
/// Matched on the (lower-case) name: comparing strings costs less than building and
/// comparing `HeaderName` values, and this runs for every header of every message.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Client headers that carry the client's credentials, or choose which account the
/// gateway's credential bills (`OpenAI-Organization`, `OpenAI-Project`): never sent upstream.
fn is_client_credential(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization"
            | "api-key"
            | "cookie"
            | "ocp-apim-subscription-key"
            | "x-api-key"
            | "x-goog-api-key"
            | "openai-organization"
            | "openai-project"
    )
}

/// Client headers that ask a server or framework to treat the request as another URL or
/// method (IIS/ASP.NET `X-Original-URL`, Symfony/Zend `X-Rewrite-URL`, the method
/// overrides of Rails, Express, Spring and Google APIs): the gateway checked this method
/// and path, so no backend may run another. Never sent upstream.
fn is_override(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "x-original-url"
            | "x-rewrite-url"
            | "x-original-uri"
            | "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
            | "x-original-method"
    )
}

/// Headers that say where a request came from. From the client they are claims: dropped,
/// and set again from what the gateway saw (kept and extended only from a trusted proxy).
fn is_forwarding(name: &HeaderName) -> bool {
    let n = name.as_str();
    n.starts_with("x-forwarded-")
        || matches!(
            n,
            "forwarded" | "x-real-ip" | "true-client-ip" | "x-client-ip" | "x-cluster-client-ip"
        )
}

/// Response headers a backend's answer never passes to clients unless its
/// `pass_response_headers` names them: cookies (Azure's `ARRAffinity` would land on the
/// gateway's origin), credentials and auth challenges (they are the gateway's business with
/// the backend, not the client's), the backend account's identity (`OpenAI-Organization`,
/// `OpenAI-Project`), and policies a browser would apply to the gateway's whole origin
/// (`Strict-Transport-Security`, `Alt-Svc`, key pins, `Clear-Site-Data`).
pub const DROPPED_RESPONSE_HEADERS: [&str; 16] = [
    "set-cookie",
    "set-cookie2",
    "cookie",
    "authorization",
    "api-key",
    "x-api-key",
    "ocp-apim-subscription-key",
    "x-goog-api-key",
    "www-authenticate",
    "openai-organization",
    "openai-project",
    "strict-transport-security",
    "alt-svc",
    "public-key-pins",
    "public-key-pins-report-only",
    "clear-site-data",
];

fn is_dropped_response(name: &HeaderName) -> bool {
    DROPPED_RESPONSE_HEADERS.contains(&name.as_str())
}

/// What the gateway knows of where a request came from, for the forwarding headers.
#[derive(Debug, Clone, Copy)]
pub struct Origin {
    /// The TCP peer.
    pub peer: std::net::IpAddr,
    /// Whether the peer is one of `server.trusted_proxies`.
    pub trusted: bool,
}

/// The request id header, taken from the client or generated.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers named as hop-by-hop by the `Connection` header(s) (rare: parsed only when present).
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // `keep-alive` (what most servers send) names a header removed anyway: not parsed.
        .filter(|n| !n.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect()
}

/// A backend's response headers as they may reach the client: no hop-by-hop headers, none
/// of [`DROPPED_RESPONSE_HEADERS`] unless `pass` names it, and no header whose value holds
/// `secret` — the credential the gateway sent this backend (a backend that reflects request
/// headers would otherwise hand it to every client, under any name). Returns how many
/// headers were dropped for holding the secret.
pub fn clean_response_headers(
    headers: &mut HeaderMap,
    pass: &[HeaderName],
    secret: Option<&[u8]>,
) -> usize {
    let secret = secret.filter(|s| !s.is_empty());
    // Built only when some value is long enough to hold the secret (never, for a JWT).
    let mut finder: Option<memchr::memmem::Finder<'_>> = None;
    let mut leaks = 0;
    remove_where(headers, |name, value| {
        let leaked = secret.is_some_and(|s| {
            value.len() >= s.len()
                && finder
                    .get_or_insert_with(|| memchr::memmem::Finder::new(s))
                    .find(value.as_bytes())
                    .is_some()
        });
        leaks += usize::from(leaked);
        leaked || (is_dropped_response(name) && !pass.contains(name))
    });
    leaks
}

/// The part of a credential header's value that is secret: the token of `Bearer <token>`,
/// or the whole value (an `api-key`).
fn secret_of(value: &HeaderValue) -> &[u8] {
    let v = value.as_bytes();
    match v.get(..7) {
        Some(p) if p.eq_ignore_ascii_case(b"bearer ") => &v[7..],
        _ => v,
    }
}

/// The client's headers as they may go upstream: no hop-by-hop headers, no client
/// credentials, no URL or method overrides, no `Host` (set from the backend URL), no stale
/// `Content-Length`, no `Expect` (the gateway answered it and holds the whole body), the
/// forwarding headers from what the gateway saw (see [`Origin`]), and the request id the
/// gateway settled on.
pub fn upstream_headers(
    mut client: HeaderMap,
    request_id: &HeaderValue,
    origin: Origin,
) -> HeaderMap {
    // Claims a trusted proxy made, kept to be extended below.
    let (mut xff, mut forwarded, mut proto) = (None, None, None);
    if origin.trusted {
        xff = joined(&client, "x-forwarded-for");
        forwarded = joined(&client, "forwarded");
        proto = client
            .get("x-forwarded-proto")
            .filter(|v| matches!(v.as_bytes(), b"http" | b"https"))
            .cloned();
    }
    remove_where(&mut client, |n, _| {
        is_client_credential(n)
            || is_override(n)
            || is_forwarding(n)
            || n == header::HOST
            || n == header::CONTENT_LENGTH
            || n == header::EXPECT
    });
    let proto = proto.unwrap_or(HeaderValue::from_static("http"));
    let proto_str = if proto.as_bytes() == b"https" {
        "https"
    } else {
        "http"
    };
    // Formatted by hand: `Display` for an address costs more than the rest of this function.
    let mut ip = String::with_capacity(48);
    let v6 = push_ip(&mut ip, origin.peer.to_canonical());
    let mut xff = xff.map(|x| x + ", ").unwrap_or_default();
    xff.push_str(&ip);
    let mut fwd = forwarded.map(|f| f + ", ").unwrap_or_default();
    fwd.reserve(ip.len() + 20);
    fwd.push_str(if v6 { "for=\"[" } else { "for=" });
    fwd.push_str(&ip);
    fwd.push_str(if v6 { "]\";proto=" } else { ";proto=" });
    fwd.push_str(proto_str);
    for (name, value) in [("x-forwarded-for", xff), ("forwarded", fwd)] {
        if let Ok(v) = HeaderValue::try_from(value) {
            client.insert(HeaderName::from_static(name), v);
        }
    }
    client.insert(HeaderName::from_static("x-forwarded-proto"), proto);
    client.insert(REQUEST_ID.clone(), request_id.clone());
    client
}

/// Append `ip` as text; whether it is IPv6 (quoted and bracketed in `Forwarded`).
fn push_ip(out: &mut String, ip: std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(a) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(digits.format(octet));
            }
            false
        }
        std::net::IpAddr::V6(a) => {
            use std::fmt::Write;
            let _ = write!(out, "{a}");
            true
        }
    }
}

/// All values of a header joined by ", " (a list header may come in several fields), when
/// every one is visible ASCII.
fn joined(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let v = v.to_str().ok()?.trim();
        if v.is_empty() {
            continue;
        }
        match &mut out {
            Some(o) => {
                o.push_str(", ");
                o.push_str(v);
            }
            None => out = Some(v.to_owned()),
        }
    }
    out
}

/// Remove every hop-by-hop header, any header the `Connection` header names, and every
/// field `also` selects (by name and value: one value selected removes all of that name).
/// One pass over the fields finds the few to remove (typically `Host` and `Content-Length`
/// on requests, `Connection: keep-alive` on responses); only they are looked up again. This
/// runs twice per request: cheaper than rebuilding the map.
pub(crate) fn remove_where(
    headers: &mut HeaderMap,
    mut also: impl FnMut(&HeaderName, &HeaderValue) -> bool,
) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    let mut has_connection = false;
    for (name, value) in headers.iter() {
        // `also` sees every value, even of a name already doomed (it may count them).
        let selected = also(name, value);
        if (is_hop_by_hop(name) || selected) && doomed.last() != Some(name) {
            has_connection |= name == header::CONNECTION;
            doomed.push(name.clone());
        }
    }
    if has_connection {
        doomed.extend(connection_named(headers));
    }
    for name in doomed {
        headers.remove(name);
    }
}

/// One request to forward.
pub struct Outgoing<'a> {
    pub route: &'a Route,
    /// The public deployment name the request resolved to.
    pub deployment: Option<&'a str>,
    pub method: &'a Method,
    /// Headers already cleaned by [`upstream_headers`].
    pub headers: HeaderMap,
    pub body: Bytes,
    pub content_type: Option<&'a str>,
    /// Admission's token estimate, for headroom-aware routing.
    pub tokens: u64,
    /// The request's trace, when it is traced: each attempt gets a span, named in the
    /// attempt's `traceparent`.
    pub trace: Option<&'a mut crate::telemetry::RequestTrace>,
}

/// A backend's answer and who gave it.
pub struct Answer {
    /// The body holds an HTTP/1.1 connection until it has been read; see [`pool`].
    pub response: Response<pool::ResponseBody>,
    pub backend: Arc<Backend>,
    pub attempts: u32,
    /// Every attempt, when there was more than one.
    pub tried: Vec<Tried>,
    /// The request's slot on the backend: held until the answer has been relayed.
    pub lease: Lease,
}

/// A failed forward, with the last backend tried (for audit and metrics).
pub struct Failed {
    pub error: GatewayError,
    pub backend: Option<Arc<Backend>>,
    pub attempts: u32,
    pub tried: Vec<Tried>,
}

/// Why candidates were passed over without an attempt, for the refusal when none was tried.
#[derive(Default)]
struct Skips {
    /// Shortest cool-down left (ms).
    cooling: Option<u64>,
    /// Shortest open-circuit time left (ms; 0 while a half-open probe is out).
    open: Option<u64>,
    unhealthy: bool,
    full: Vec<Arc<Backend>>,
}

fn shortest(slot: &mut Option<u64>, ms: u64) {
    *slot = Some(slot.map_or(ms, |m| m.min(ms)));
}

/// The attempts made so far: how many, and their log once there is more than one.
struct Log<'a> {
    attempts: u32,
    first: Option<Tried>,
    tried: Vec<Tried>,
    /// The request's trace, when it is traced, and the span of the attempt under way.
    trace: Option<&'a mut crate::telemetry::RequestTrace>,
    /// Boxed: an untraced request's future stays as small as without telemetry.
    attempt: Option<Box<crate::telemetry::Attempt>>,
    /// The status of the attempt's answer (0: none yet).
    status: u16,
}

impl Log<'_> {
    fn push(&mut self, backend: &Backend, outcome: &'static str, since: Instant) {
        if let (Some(a), Some(t)) = (self.attempt.take(), self.trace.as_deref_mut()) {
            a.end(t, backend, outcome, self.status);
        }
        let t = Tried {
            backend: backend.label.clone(),
            outcome,
            ms: since.elapsed().as_secs_f64() * 1000.0,
        };
        match self.first.take() {
            None if self.tried.is_empty() => self.first = Some(t),
            Some(first) => {
                self.tried.push(first);
                self.tried.push(t);
            }
            None => self.tried.push(t),
        }
    }

    fn take(&mut self) -> Vec<Tried> {
        std::mem::take(&mut self.tried)
    }

    /// The forward ends with `error`, `backend` tried last.
    fn failed(&mut self, error: GatewayError, backend: &Arc<Backend>) -> Failed {
        Failed {
            error,
            backend: Some(backend.clone()),
            attempts: self.attempts,
            tried: self.take(),
        }
    }

    /// `backend`'s answer (its log is filled in when the answer is the one relayed).
    fn answer(
        &self,
        response: Response<pool::ResponseBody>,
        backend: &Arc<Backend>,
        lease: Lease,
    ) -> Answer {
        Answer {
            response,
            backend: backend.clone(),
            attempts: self.attempts,
            tried: Vec::new(),
            lease,
        }
    }
}

/// Try `candidates` in order until one answers, within `policy`'s attempts and budget.
///
/// Before each attempt the candidate's health is read: a deployment cooling after a 429,
/// an open circuit, a failing probe or a backend at `max_concurrent` is passed over. A 429
/// starts the backend's cool-down for exactly the time it asks; a 401 renews the gateway's
/// token once and retries the same backend; connect errors, and the statuses and first-byte
/// timeouts of the backend's `retry_on`, go on to the next candidate. Nothing is retried
/// once a response may have been processed in ways the client could see (any other error
/// after the request was sent), and never after the answer starts to reach the client.
/// When no candidate could be tried at all, the client is told why at once (429
/// `backends_busy` when they are cooling, with the shortest wait), without an upstream
/// request.
pub async fn forward(
    mut out: Outgoing<'_>,
    candidates: Vec<Arc<Backend>>,
    policy: &Policy,
) -> Result<Answer, Failed> {
    let started = Instant::now();
    let lead_priority = candidates.first().map(|b| b.priority);
    let total = candidates.len();
    let mut log = Log {
        attempts: 0,
        first: None,
        tried: Vec::new(),
        trace: out.trace.take(),
        attempt: None,
        status: 0,
    };
    let mut last_error: Option<GatewayError> = None;
    let mut last_backend: Option<Arc<Backend>> = None;
    // The last retriable answer (429, a 5xx of `retry_on`), relayed if nothing better comes.
    let mut fallback: Option<Answer> = None;
    // The failed attempt a next one retries (for the retry metric).
    let mut retrying: Option<(Arc<Backend>, &'static str)> = None;
    let mut skips = Skips::default();
    let mut waited_first_token = false;
    let queue_until = started + policy.queue_wait;
    'rounds: loop {
        for (i, backend) in candidates.iter().enumerate() {
            if log.attempts >= policy.max_attempts
                || (log.attempts > 0 && started.elapsed() >= policy.retry_budget)
            {
                break 'rounds;
            }
            let dep = backend.deployment(out.deployment);
            let now = health::now_ms();
            let cooling = dep.cooling(now);
            if cooling > 0 {
                shortest(&mut skips.cooling, cooling);
                backend.series.skipped("cooling");
                continue;
            }
            if backend.probe.is_some() && !backend.health.probe_healthy() {
                skips.unhealthy = true;
                backend.series.skipped("unhealthy");
                continue;
            }
            let gate = backend.health.gate(now);
            if let Gate::Blocked(left) = gate {
                shortest(&mut skips.open, left);
                backend.series.skipped("circuit_open");
                continue;
            }
            let _claim = ProbeClaim {
                health: &backend.health,
                gate,
            };
            let Some(lease) = backend.health.try_enter(backend.max_concurrent) else {
                backend.health.neutral(gate);
                backend.series.skipped("full");
                skips.full.push(backend.clone());
                continue;
            };
            let is_last = i + 1 == total;
            // A token credential may need the headers again for its one retry after a 401.
            let keep_headers = !is_last || matches!(backend.credential, Credential::Token { .. });
            let mut renewed = false;
            loop {
                // Read once: the token applied is the one checked (it may expire meanwhile).
                let Ok(credential) = backend.credential.header() else {
                    // Just after a start, the first token may be moments away: the last
                    // candidate waits for it once, within the retry budget (boxed: the
                    // cold path keeps the request's future small).
                    if is_last && !waited_first_token {
                        waited_first_token = true;
                        let wait = policy
                            .retry_budget
                            .saturating_sub(started.elapsed())
                            .min(FIRST_TOKEN_WAIT);
                        if Box::pin(backend.credential.first_token(wait)).await {
                            continue;
                        }
                    }
                    backend.health.neutral(gate);
                    record(backend, "credential_unavailable");
                    backend.series.skipped("credential_unavailable");
                    last_error = Some(GatewayError::BackendAuthUnavailable(format!(
                        "the gateway holds no valid credential for backend '{}'",
                        backend.name
                    )));
                    last_backend = Some(backend.clone());
                    break;
                };
                let up = match rewrite::rewrite(
                    out.route,
                    out.deployment,
                    backend,
                    &out.body,
                    out.content_type,
                ) {
                    Ok(u) => u,
                    Err(error) => {
                        backend.health.neutral(gate);
                        return Err(log.failed(error, backend));
                    }
                };
                let mut headers = if keep_headers {
                    out.headers.clone()
                } else {
                    std::mem::take(&mut out.headers)
                };
                if !up.body.is_empty() || out.method == Method::POST || out.method == Method::PUT {
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(up.body.len()));
                }
                // Kept (a reference count) to find it reflected in the answer's headers.
                let sent_credential = credential.as_ref().map(|(_, v)| v.clone());
                if let Some((name, value)) = credential {
                    headers.insert(name, value);
                }
                log.status = 0;
                let traceparent = log.trace.as_deref_mut().map(|t| {
                    let (attempt, traceparent) = t.attempt(backend, out.method, &mut headers);
                    log.attempt = Some(attempt);
                    traceparent
                });
                let req = pool::Outbound {
                    method: out.method.clone(),
                    target: up.target,
                    headers,
                    traceparent,
                    body: up.body,
                };
                if let Some((from, why)) = retrying.take() {
                    from.series.retried(why);
                }
                log.attempts += 1;
                if policy.headroom {
                    dep.spend(out.tokens);
                }
                let sent_at = Instant::now();
                let sent =
                    tokio::time::timeout(backend.first_byte_timeout, backend.pool.send(req)).await;
                let now = health::now_ms();
                let cfg = &policy.breaker;
                let trip = |opened: bool| {
                    if opened {
                        backend.series.tripped();
                    }
                };
                match sent {
                    Ok(Ok(mut resp)) => {
                        let status = resp.status().as_u16();
                        log.status = status;
                        if status > 599 {
                            record(backend, "invalid_response");
                            trip(
                                backend
                                    .health
                                    .failed(now, gate, cfg, "status outside 100-599"),
                            );
                            log.push(backend, "invalid_response", sent_at);
                            tracing::warn!(backend = %backend.name, status, "backend answered with a status outside 100-599");
                            let error = GatewayError::BackendInvalidResponse(format!(
                                "backend '{}' answered with status {status}, outside 100-599",
                                backend.name
                            ));
                            return Err(log.failed(error, backend));
                        }
                        let leaks = clean_response_headers(
                            resp.headers_mut(),
                            &backend.pass_response_headers,
                            sent_credential.as_ref().map(secret_of),
                        );
                        if leaks > 0 {
                            tracing::warn!(backend = %backend.name, headers = leaks, "backend answer reflected the gateway's credential; those headers were dropped");
                        }
                        if status != 429 {
                            // A 429's own counts (0 left) say what its cool-down says, and
                            // must not keep the backend at the back once the cool-down ends.
                            let room = signals::room(resp.headers());
                            let believed = room.reset.unwrap_or(policy.headroom_ttl);
                            dep.report(now, room.tokens, room.requests, now + millis(believed));
                        }
                        if status == 429 && policy.transparent {
                            backend.health.neutral(gate);
                            record(backend, "rate_limited");
                            log.push(backend, "rate_limited", sent_at);
                            let mut answer = log.answer(resp, backend, lease);
                            answer.tried = log.take();
                            return Ok(answer);
                        }
                        if status == 429 {
                            let (wait, source) =
                                signals::retry_after(resp.headers(), std::time::SystemTime::now())
                                    .unwrap_or((policy.default_cooldown, CoolSource::Default));
                            let wait = wait.min(policy.max_cooldown);
                            dep.cool(now, wait, source);
                            backend.series.cooled();
                            backend.health.neutral(gate);
                            record(backend, "rate_limited");
                            log.push(backend, "rate_limited", sent_at);
                            tracing::info!(backend = %backend.name, deployment = out.deployment.unwrap_or_default(), cooldown_ms = millis(wait), from = source.as_str(), "backend answered 429; cooling it down");
                            retrying = Some((backend.clone(), "rate_limited"));
                            fallback = Some(log.answer(resp, backend, lease));
                            break;
                        }
                        if status == 401 {
                            record(backend, "unauthorized");
                            log.push(backend, "unauthorized", sent_at);
                            if let (false, Some(sent)) = (renewed, &sent_credential) {
                                let wait = policy
                                    .retry_budget
                                    .saturating_sub(started.elapsed())
                                    .min(RENEWAL_WAIT);
                                if backend.credential.renew_rejected(sent, wait).await {
                                    renewed = true;
                                    tracing::warn!(backend = %backend.name, "backend rejected the gateway's token; retrying once with a new one");
                                    continue;
                                }
                            }
                            trip(backend.health.unauthorized(now, gate, cfg));
                            tracing::warn!(backend = %backend.name, credential = backend.credential.describe(), "backend rejected the gateway's credential (401)");
                            last_error = Some(GatewayError::BackendAuthUnavailable(format!(
                                "backend '{}' rejected the gateway's credential",
                                backend.name
                            )));
                            last_backend = Some(backend.clone());
                            retrying = Some((backend.clone(), "unauthorized"));
                            break;
                        }
                        if status >= 500 {
                            trip(backend.health.failed(
                                now,
                                gate,
                                cfg,
                                &format!("answered {status}"),
                            ));
                            if RetryOn::status(&backend.retry_on, status) {
                                record(backend, "status_5xx");
                                log.push(backend, "status_5xx", sent_at);
                                tracing::warn!(backend = %backend.name, status, "backend answered with a server error; trying the next one");
                                retrying = Some((backend.clone(), "status_5xx"));
                                fallback = Some(log.answer(resp, backend, lease));
                                break;
                            }
                        } else {
                            backend.health.succeeded(now, gate, cfg);
                        }
                        record(backend, "response");
                        log.push(backend, "response", sent_at);
                        if lead_priority.is_some_and(|p| backend.priority > p) {
                            backend.series.spilled_over();
                        }
                        let mut answer = log.answer(resp, backend, lease);
                        answer.tried = log.take();
                        return Ok(answer);
                    }
                    Ok(Err(e)) if e.is_connect() => {
                        record(backend, "connect_error");
                        log.push(backend, "connect_error", sent_at);
                        trip(backend.health.failed(now, gate, cfg, "cannot connect"));
                        tracing::warn!(backend = %backend.name, error = %error_chain(&e), "cannot connect to backend");
                        last_error = Some(GatewayError::BackendUnavailable(format!(
                            "cannot connect to backend '{}'",
                            backend.name
                        )));
                        last_backend = Some(backend.clone());
                        retrying = Some((backend.clone(), "connect_error"));
                        break;
                    }
                    Ok(Err(e)) => {
                        record(backend, "error");
                        log.push(backend, "error", sent_at);
                        trip(backend.health.failed(
                            now,
                            gate,
                            cfg,
                            "closed the connection before answering",
                        ));
                        tracing::warn!(backend = %backend.name, error = %error_chain(&e), "backend request failed");
                        // The backend may have processed it: never resend.
                        let error = GatewayError::BackendUnavailable(format!(
                            "backend '{}' closed the connection before answering",
                            backend.name
                        ));
                        return Err(log.failed(error, backend));
                    }
                    Err(_) => {
                        record(backend, "timeout");
                        log.push(backend, "timeout", sent_at);
                        trip(backend.health.failed(
                            now,
                            gate,
                            cfg,
                            "no answer within timeouts.first_byte",
                        ));
                        let error = GatewayError::BackendTimeout(
                            humantime::format_duration(backend.first_byte_timeout).to_string(),
                        );
                        if !backend.retry_on.contains(&RetryOn::FirstByteTimeout) {
                            return Err(log.failed(error, backend));
                        }
                        tracing::warn!(backend = %backend.name, "backend did not answer in time; trying the next one");
                        last_error = Some(error);
                        last_backend = Some(backend.clone());
                        retrying = Some((backend.clone(), "timeout"));
                        break;
                    }
                }
            }
        }
        // Every candidate was tried or passed over. Only a request that made no attempt and
        // found backends at their concurrency limit waits, a bounded time, for a slot.
        if log.attempts == 0 && !skips.full.is_empty() && Instant::now() < queue_until {
            let waits = skips
                .full
                .iter()
                .map(|b| Box::pin(b.health.wait_release(b.max_concurrent, queue_until)));
            futures_util::future::select_all(waits).await;
            skips = Skips::default();
            continue;
        }
        break;
    }
    if let Some(mut answer) = fallback {
        answer.attempts = log.attempts;
        answer.tried = log.take();
        return Ok(answer);
    }
    // After attempts, what went wrong with them; with none, why every candidate was
    // passed over (or that no credential was ready).
    let error = if log.attempts > 0 {
        last_error.or_else(|| skipped_error(&skips, out.deployment))
    } else {
        skipped_error(&skips, out.deployment).or(last_error)
    }
    .unwrap_or_else(|| GatewayError::BackendUnavailable("no backend available".into()));
    Err(Failed {
        error,
        backend: last_backend,
        attempts: log.attempts,
        tried: log.take(),
    })
}

/// Gives back a half-open probe when the attempt that claimed it is dropped before a
/// verdict (the client hung up while the probe was in flight).
struct ProbeClaim<'a> {
    health: &'a health::BackendHealth,
    gate: Gate,
}

impl Drop for ProbeClaim<'_> {
    fn drop(&mut self) {
        self.health.abandon(self.gate);
    }
}

/// How long a request waits for a renewed token after a backend's 401, at most.
const RENEWAL_WAIT: Duration = Duration::from_secs(5);

/// How long a request arriving just after a start waits for a backend's first token, at
/// most (an Entra or managed-identity exchange takes well under a second, a cold IMDS a few).
const FIRST_TOKEN_WAIT: Duration = Duration::from_secs(5);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The refusal when no candidate could be tried: busy (429) when any is only cooling,
/// else unusable (503), with the shortest wait known.
fn skipped_error(skips: &Skips, deployment: Option<&str>) -> Option<GatewayError> {
    let soonest = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    };
    if let Some(cooling) = skips.cooling {
        let wait = soonest(Some(cooling), skips.open.filter(|&o| o > 0)).unwrap_or(cooling);
        return Some(GatewayError::BackendsBusy {
            deployment: crate::shown::shown(deployment.unwrap_or("this request")),
            retry_after: Duration::from_millis(wait),
        });
    }
    let reason = if skips.open.is_some() {
        "their circuits are open after repeated failures"
    } else if skips.unhealthy {
        "they fail their health probes"
    } else if !skips.full.is_empty() {
        "every one is at its max_concurrent"
    } else {
        return None;
    };
    let wait = skips.open.filter(|&o| o > 0).unwrap_or(1000);
    Some(GatewayError::NoUsableBackend {
        reason: reason.into(),
        retry_after: Duration::from_millis(wait),
    })
}

fn record(backend: &Backend, outcome: &'static str) {
    backend.series.attempt(outcome);
}

/// `error: cause: cause` — for logs. Never contains request data.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_headers_drop_credentials_and_hop_by_hop() {
        let mut c = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer client"),
            ("api-key", "client-key"),
            ("cookie", "a=b"),
            ("ocp-apim-subscription-key", "sub"),
            ("x-api-key", "k"),
            ("openai-organization", "org-other"),
            ("openai-project", "proj-other"),
            ("host", "gateway"),
            ("content-length", "10"),
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "hop"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-request-id", "old"),
            ("accept", "application/json"),
            ("x-ms-useragent", "sdk"),
            (
                "x-original-url",
                "/openai/deployments/secret/chat/completions",
            ),
            ("x-rewrite-url", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
            ("x-real-ip", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
        ] {
            c.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        c.append("accept", HeaderValue::from_static("text/event-stream"));
        let untrusted = Origin {
            peer: "192.0.2.7".parse().unwrap(),
            trusted: false,
        };
        let h = upstream_headers(c.clone(), &HeaderValue::from_static("rid"), untrusted);
        // The order of differently named fields carries no meaning (RFC 9110 §5.3).
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept",
                "forwarded",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-ms-useragent",
                "x-request-id"
            ]
        );
        assert_eq!(
            h["x-forwarded-for"], "192.0.2.7",
            "the client's claim replaced"
        );
        assert_eq!(h["forwarded"], "for=192.0.2.7;proto=http");
        assert_eq!(h["x-forwarded-proto"], "http");
        // From a trusted proxy the chain is kept and extended; IPv6 is quoted in Forwarded.
        let trusted = Origin {
            peer: "2001:db8::1".parse().unwrap(),
            trusted: true,
        };
        let h2 = upstream_headers(c, &HeaderValue::from_static("rid"), trusted);
        assert_eq!(h2["x-forwarded-for"], "1.2.3.4, 2001:db8::1");
        assert_eq!(
            h2["forwarded"],
            "for=1.2.3.4, for=\"[2001:db8::1]\";proto=https"
        );
        assert_eq!(h2["x-forwarded-proto"], "https");
        assert!(h2.get("x-original-url").is_none() && h2.get("x-real-ip").is_none());
        assert_eq!(
            h.get_all("accept").iter().count(),
            2,
            "repeated headers kept"
        );
        assert_eq!(h["x-request-id"], "rid");
    }

    #[test]
    fn hop_by_hop_headers_leave_responses() {
        let mut r = HeaderMap::new();
        r.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        r.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("9"),
        );
        let before = r.clone();
        clean_response_headers(&mut r, &[], None);
        assert_eq!(r, before, "nothing to strip, nothing changed");
        r.insert("connection", HeaderValue::from_static("close, x-hop"));
        r.insert("x-hop", HeaderValue::from_static("1"));
        r.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        clean_response_headers(&mut r, &[], None);
        assert_eq!(r, before);
    }

    #[test]
    fn response_headers_lose_cookies_credentials_and_reflections() {
        let mut r = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/json"),
            ("set-cookie", "ARRAffinity=abc; Path=/"),
            ("set-cookie", "other=1"),
            ("api-key", "leaked"),
            ("authorization", "Bearer x"),
            ("strict-transport-security", "max-age=31536000"),
            (
                "www-authenticate",
                "Bearer authorization_uri=\"https://login.example\"",
            ),
            ("alt-svc", "h3=\"evil.example:443\""),
            ("openai-organization", "org-gateway"),
            ("x-echo-whatever", "key=super-secret-backend-key;"),
            ("x-ratelimit-remaining-tokens", "9"),
            ("connection", "close"),
        ] {
            r.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let leaks =
            clean_response_headers(&mut r, &[], Some(b"super-secret-backend-key".as_slice()));
        assert_eq!(leaks, 1);
        let mut names: Vec<&str> = r.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "x-ratelimit-remaining-tokens"]);
        // A backend allowed to pass cookies passes both of them, never a reflected secret.
        let mut r = HeaderMap::new();
        r.append("set-cookie", HeaderValue::from_static("a=1"));
        r.append(
            "set-cookie",
            HeaderValue::from_static("b=super-secret-backend-key"),
        );
        r.append("set-cookie", HeaderValue::from_static("c=3"));
        let pass = [HeaderName::from_static("set-cookie")];
        clean_response_headers(&mut r, &pass, Some(b"super-secret-backend-key".as_slice()));
        assert!(
            r.get("set-cookie").is_none(),
            "a field holding the secret drops its name"
        );
        let mut r = HeaderMap::new();
        r.append("set-cookie", HeaderValue::from_static("a=1"));
        clean_response_headers(&mut r, &pass, None);
        assert_eq!(r["set-cookie"], "a=1");
        assert_eq!(secret_of(&HeaderValue::from_static("Bearer tok")), b"tok");
        assert_eq!(secret_of(&HeaderValue::from_static("k1")), b"k1");
    }
}
