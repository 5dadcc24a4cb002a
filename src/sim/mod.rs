//! A simulated Azure OpenAI / OpenAI-compatible backend, for `portcullis demo` and tests.
//!
//! Faithful where a gateway can tell the difference: Azure data-plane paths with a
//! required `api-version`, Azure v1 and OpenAI paths, `api-key` or bearer credentials with
//! Azure's 401 body (or Entra ID access tokens verified for real against a JWKS, see
//! [`bearer`]), SSE framed exactly as Azure sends it (`data: {...}\n\n`, a
//! `prompt_filter_results` chunk first on Azure paths, `data: [DONE]\n\n`), `x-ratelimit-*`
//! and `apim-request-id` headers, and Azure's 429 body with `retry-after` / `retry-after-ms`.
//!
//! Usage is counted as OpenAI counts it, deterministically: prompt tokens with the o200k
//! tokenizer (chat: 3 per message, plus the tokens of each of its strings, 1 more for a
//! `name`, plus 3 for the reply), completion tokens as the tokens of the generated answer.
//! Models (or deployments) whose name starts with `o` reason: they report 16
//! `reasoning_tokens`, counted in the completion tokens. Every usage carries
//! `prompt_tokens_details.cached_tokens` (0, or `min(N, prompt)` with the request header
//! `x-sim-cached-tokens: N`) and `completion_tokens_details.reasoning_tokens`. A stream
//! with `stream_options.include_usage: true` carries `"usage":null` in every chunk (the
//! Azure `prompt_filter_results` chunk too) and a last chunk with `"choices":[]` and the
//! usage before `[DONE]`; without it, no `usage` member at all.
//!
//! The Responses API (`POST /openai/v1/responses`, `/openai/responses?api-version=…`,
//! `/v1/responses`) answers a `response` object (an `output_text` message, `usage` with
//! `input_tokens`/`output_tokens` and their details); with `"stream": true`, its event
//! stream (`event: <type>\ndata: <json>\n\n`: `response.created`, `response.in_progress`,
//! the output item and content part events, `response.output_text.delta` per word,
//! `response.completed` with `response.usage`; no `[DONE]`).
//!
//! Answers are deterministic but for `id`s and `created` times; with the request header
//! `x-sim-seed: <n>` those derive from `n` too, so two requests with the same seed get
//! byte-identical answers (streams included).
//!
//! Tests program it through [`SimHandle::set_behavior`] (every request),
//! [`SimHandle::set_deployment_behavior`] (one deployment or model),
//! [`SimHandle::set_burst`] (the next N requests) and [`SimHandle::set_remaining`] (the
//! `x-ratelimit-remaining-*` it reports), or per request with the
//! `x-sim-behavior` header (`429`, `429:<ms>` and the other wait forms `429-ms:<ms>`,
//! `429-xms:<ms>`, `429-seconds:<ms>`, `429-date:<ms>`, `429-none`, `429-nonsense` (see
//! [`RetryForm`]), `401`, `500`, `503`, `hang`, `reset:<chunks>` (reset
//! after that many frames of a stream), `cut-stream:<n>` (reset after the first `n` frames
//! that carry generated text, so the client has real text from a stream that never ends),
//! `latency:<ms>`, `echo`, `leaky-headers`, `reflect-headers`); every request it receives
//! is recorded for assertions.

pub mod bearer;
pub mod issuer;
mod responses;
#[cfg(test)]
pub(crate) mod tests;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::error::{full, Body};
use crate::listener::{self, ServeOptions};

pub use bearer::{BearerCheck, SeenToken};

/// How the simulator answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Behavior {
    /// Answer normally.
    #[default]
    Normal,
    /// Answer 429 with Azure's body, the wait written in the given form.
    RateLimited {
        retry_after_ms: u64,
        form: RetryForm,
    },
    /// Answer with this 5xx status.
    ServerError(u16),
    /// Start a stream, send this many chunks, then reset the connection.
    ResetMidStream { after_chunks: usize },
    /// Start a stream, send its chunks up to and including the `after_text_chunks`-th one
    /// that carries generated text, then reset the connection.
    CutStream { after_text_chunks: usize },
    /// Never answer.
    Hang,
    /// Refuse the request's credential as Azure does (401), whatever it is.
    Unauthorized,
    /// Answer 200 with the request body, byte for byte, and its content type.
    Echo,
    /// Answer normally, adding the headers a gateway must not relay: Azure's `ARRAffinity`
    /// cookies, credentials, auth challenges, HSTS, `Alt-Svc`, the account's organisation.
    LeakyHeaders,
    /// Answer normally, adding every request header back as `x-reflect-<name>` (a debug
    /// endpoint, a misconfigured proxy).
    ReflectHeaders,
}

/// How a 429 names its wait (each form seen from Azure OpenAI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryForm {
    /// `retry-after` (seconds, rounded up) and `retry-after-ms`: most Azure 429s.
    #[default]
    Azure,
    /// `retry-after-ms` only.
    Ms,
    /// `x-ms-retry-after-ms` only.
    XMs,
    /// `retry-after` in whole seconds only.
    Seconds,
    /// `retry-after` as an HTTP date.
    Date,
    /// No wait at all.
    None,
    /// The Responses API's: `-1`/`0` rate-limit headers and no `retry-after`.
    Nonsense,
}

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// The key it requires (as `api-key` or `Authorization: Bearer`); `None` accepts all.
    /// Ignored when `bearer` is set.
    pub api_key: Option<String>,
    /// Require an Entra ID access token (`Authorization: Bearer <JWT>`) verified as
    /// described in [`bearer`]; a key alone is then refused.
    pub bearer: Option<BearerCheck>,
    /// Delay before each streamed chunk.
    pub token_latency: Duration,
    /// Words in each generated answer (capped by the request's `max_tokens`).
    pub answer_words: usize,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            bearer: None,
            token_latency: Duration::ZERO,
            answer_words: 12,
        }
    }
}

/// A request the simulator received.
#[derive(Debug, Clone)]
pub struct Captured {
    pub method: http::Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it arrived.
    pub at: std::time::Instant,
    /// The deployment (path) or model (body) it names, if any.
    pub deployment: Option<String>,
}

/// Counters a test can wait on.
#[derive(Debug, Default)]
pub struct SimCounters {
    /// TCP connections accepted (a pooling client opens few).
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    pub streams_started: AtomicU64,
    pub streams_completed: AtomicU64,
    /// Streams whose reader went away before the end (the gateway cancelled upstream).
    pub streams_cancelled: AtomicU64,
    /// Chunks written into streams.
    pub chunks_sent: AtomicU64,
    /// Requests refused for want of a valid bearer token (only with [`SimOptions::bearer`]).
    pub bearer_rejected: AtomicU64,
}

struct SimState {
    opts: SimOptions,
    bearer: Option<bearer::Verifier>,
    behavior: Mutex<Behavior>,
    /// Per deployment (or model) name: overrides `behavior`.
    per_deployment: Mutex<std::collections::HashMap<String, Behavior>>,
    /// The next `n` requests get this behaviour, then `behavior` again.
    burst: Mutex<Option<(u64, Behavior)>>,
    /// Values of `x-ratelimit-remaining-tokens` / `-requests` on normal answers.
    remaining: Mutex<(Option<i64>, Option<i64>)>,
    captured: Mutex<Vec<Captured>>,
    counters: SimCounters,
    seq: AtomicU64,
}

/// A running simulator.
pub struct SimHandle {
    pub addr: SocketAddr,
    state: Arc<SimState>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl SimHandle {
    /// Start on an ephemeral loopback port.
    pub async fn start(opts: SimOptions) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().map_err(std::io::Error::other)?, opts).await
    }

    /// Start on the given address.
    pub async fn start_on(addr: SocketAddr, opts: SimOptions) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let bearer = match &opts.bearer {
            Some(check) => {
                Some(bearer::Verifier::new(check.clone()).map_err(std::io::Error::other)?)
            }
            None => None,
        };
        let state = Arc::new(SimState {
            opts,
            bearer,
            behavior: Mutex::new(Behavior::Normal),
            per_deployment: Mutex::new(std::collections::HashMap::new()),
            burst: Mutex::new(None),
            remaining: Mutex::new((None, None)),
            captured: Mutex::new(Vec::new()),
            counters: SimCounters::default(),
            seq: AtomicU64::new(1),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let st = state.clone();
        let svc = move |req: Request<Incoming>, _peer| handle(st.clone(), req);
        let opts = ServeOptions {
            drain_timeout: Duration::from_millis(100),
            ..ServeOptions::default()
        };
        let counted = state.clone();
        let task = tokio::spawn(listener::serve_with(
            listener,
            svc,
            opts,
            async {
                let _ = stopped.await;
            },
            move || {
                counted.counters.connections.fetch_add(1, Ordering::SeqCst);
            },
        ));
        Ok(Self {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Change how every following request is answered.
    pub fn set_behavior(&self, b: Behavior) {
        if let Ok(mut g) = self.state.behavior.lock() {
            *g = b;
        }
    }

    /// Answer requests for `deployment` (a path's deployment or a body's model) this way;
    /// `Behavior::Normal` clears it.
    pub fn set_deployment_behavior(&self, deployment: &str, b: Behavior) {
        if let Ok(mut g) = self.state.per_deployment.lock() {
            if b == Behavior::Normal {
                g.remove(deployment);
            } else {
                g.insert(deployment.to_owned(), b);
            }
        }
    }

    /// Answer the next `n` requests this way (a burst of 5xx, say), then as before.
    pub fn set_burst(&self, n: u64, b: Behavior) {
        if let Ok(mut g) = self.state.burst.lock() {
            *g = (n > 0).then_some((n, b));
        }
    }

    /// Report these `x-ratelimit-remaining-tokens` / `-requests` on normal answers
    /// (`None`: the defaults).
    pub fn set_remaining(&self, tokens: Option<i64>, requests: Option<i64>) {
        if let Ok(mut g) = self.state.remaining.lock() {
            *g = (tokens, requests);
        }
    }

    /// Forget the requests received so far.
    pub fn clear_captured(&self) {
        if let Ok(mut g) = self.state.captured.lock() {
            g.clear();
        }
    }

    /// Requests received so far.
    pub fn captured(&self) -> Vec<Captured> {
        self.state
            .captured
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()
    }

    /// The most recent request received.
    pub fn last(&self) -> Option<Captured> {
        self.state
            .captured
            .lock()
            .ok()
            .and_then(|g| g.last().cloned())
    }

    /// The bearer tokens accepted so far, oldest first (only with [`SimOptions::bearer`]).
    pub fn bearer_tokens(&self) -> Vec<SeenToken> {
        self.state
            .bearer
            .as_ref()
            .map(bearer::Verifier::seen)
            .unwrap_or_default()
    }

    /// Live counters.
    pub fn counters(&self) -> &SimCounters {
        &self.state.counters
    }

    /// Stop accepting and close connections.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Read a counter (helper for tests).
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::SeqCst)
}

async fn handle(state: Arc<SimState>, req: Request<Incoming>) -> Response<Body> {
    state.counters.requests.fetch_add(1, Ordering::SeqCst);
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return responses::azure_error(StatusCode::BAD_REQUEST, "400", "could not read body")
        }
    };
    let deployment = named_deployment(parts.uri.path(), &body);
    if let Ok(mut g) = state.captured.lock() {
        g.push(Captured {
            method: parts.method.clone(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts.headers.clone(),
            body: body.clone(),
            at: std::time::Instant::now(),
            deployment: deployment.clone(),
        });
    }
    if let Some(verifier) = &state.bearer {
        if let Err(why) = verifier.check(&parts.headers).await {
            state
                .counters
                .bearer_rejected
                .fetch_add(1, Ordering::SeqCst);
            tracing::debug!(reason = why, "sim: bearer token refused");
            return responses::bearer_unauthorized();
        }
    } else if !authorized(&state.opts, &parts.headers) {
        return responses::azure_error(
            StatusCode::UNAUTHORIZED,
            "401",
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.",
        );
    }
    let mut behavior = state.behavior.lock().map(|g| *g).unwrap_or_default();
    if let Some(b) = deployment.as_ref().and_then(|d| {
        state
            .per_deployment
            .lock()
            .ok()
            .and_then(|g| g.get(d).copied())
    }) {
        behavior = b;
    }
    if let Ok(mut g) = state.burst.lock() {
        if let Some((n, b)) = g.as_mut() {
            behavior = *b;
            *n -= 1;
            if *n == 0 {
                *g = None;
            }
        }
    }
    let mut latency = state.opts.token_latency;
    if let Some(h) = parts
        .headers
        .get("x-sim-behavior")
        .and_then(|v| v.to_str().ok())
    {
        match parse_behavior(h) {
            Some(Override::Behavior(b)) => behavior = b,
            Some(Override::Latency(d)) => latency = d,
            None => {
                return responses::azure_error(StatusCode::BAD_REQUEST, "400", "bad x-sim-behavior")
            }
        }
    }
    match behavior {
        Behavior::Normal
        | Behavior::ResetMidStream { .. }
        | Behavior::CutStream { .. }
        | Behavior::LeakyHeaders
        | Behavior::ReflectHeaders => {}
        Behavior::RateLimited {
            retry_after_ms,
            form,
        } => return responses::rate_limited(retry_after_ms, form),
        Behavior::ServerError(code) => return responses::server_error(code),
        Behavior::Hang => {
            std::future::pending::<()>().await;
        }
        Behavior::Unauthorized => {
            return if state.bearer.is_some() {
                responses::bearer_unauthorized()
            } else {
                responses::azure_error(
                    StatusCode::UNAUTHORIZED,
                    "401",
                    "Access denied due to invalid subscription key or wrong API endpoint.",
                )
            };
        }
        Behavior::Echo => {
            let ct = parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream")
                .to_owned();
            return respond(StatusCode::OK, &[("content-type", ct)], full(body));
        }
    }
    let reset = match behavior {
        Behavior::ResetMidStream { after_chunks } => Some(responses::Reset::After(after_chunks)),
        Behavior::CutStream { after_text_chunks } => {
            Some(responses::Reset::AfterText(after_text_chunks))
        }
        _ => None,
    };
    let number = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()))
    };
    let (Some(seed), Some(cached_tokens)) = (
        number("x-sim-seed").map_or(Some(None), |n| n.map(Some)),
        number("x-sim-cached-tokens").unwrap_or(Some(0)),
    ) else {
        return responses::azure_error(
            StatusCode::BAD_REQUEST,
            "400",
            "bad x-sim-seed or x-sim-cached-tokens",
        );
    };
    let ctx = responses::Ctx {
        state: &state,
        latency,
        reset,
        seq: state.seq.fetch_add(1, Ordering::Relaxed),
        seed,
        cached_tokens,
    };
    let mut resp = responses::dispatch(
        ctx,
        &parts.method,
        parts.uri.path(),
        parts.uri.query(),
        &body,
    );
    let h = resp.headers_mut();
    if let Ok((tokens, requests)) = state.remaining.lock().map(|g| *g) {
        for (name, v) in [
            ("x-ratelimit-remaining-tokens", tokens),
            ("x-ratelimit-remaining-requests", requests),
        ] {
            if let Some(v) = v {
                h.insert(name, http::HeaderValue::from(v));
            }
        }
    }
    match behavior {
        Behavior::LeakyHeaders => {
            for (k, v) in LEAKY_HEADERS {
                h.append(*k, http::HeaderValue::from_static(v));
            }
        }
        Behavior::ReflectHeaders => {
            for (k, v) in &parts.headers {
                if let Ok(name) = http::HeaderName::try_from(format!("x-reflect-{k}")) {
                    h.append(name, v.clone());
                }
            }
        }
        _ => {}
    }
    resp
}

/// What [`Behavior::LeakyHeaders`] adds to an answer.
pub const LEAKY_HEADERS: &[(&str, &str)] = &[
    (
        "set-cookie",
        "ARRAffinity=0123abcd; Path=/; HttpOnly; Secure; Domain=contoso.openai.azure.com",
    ),
    (
        "set-cookie",
        "ARRAffinitySameSite=0123abcd; Path=/; HttpOnly; SameSite=None; Secure",
    ),
    ("api-key", "backend-key-echoed"),
    ("authorization", "Bearer backend-token-echoed"),
    ("proxy-authorization", "Basic cHJveHk6c2VjcmV0"),
    (
        "strict-transport-security",
        "max-age=31536000; includeSubDomains",
    ),
    (
        "www-authenticate",
        "Bearer authorization_uri=\"https://login.microsoftonline.com/tenant\"",
    ),
    ("alt-svc", "h3=\":443\"; ma=86400"),
    ("openai-organization", "org-backend-account"),
    ("openai-project", "proj_backend"),
];

enum Override {
    Behavior(Behavior),
    Latency(Duration),
}

fn parse_behavior(h: &str) -> Option<Override> {
    let (kind, arg) = h.split_once(':').unwrap_or((h, ""));
    let num = || arg.parse::<u64>().ok();
    Some(match kind {
        "normal" => Override::Behavior(Behavior::Normal),
        "429" | "429-ms" | "429-xms" | "429-seconds" | "429-date" | "429-none" | "429-nonsense" => {
            Override::Behavior(Behavior::RateLimited {
                retry_after_ms: if arg.is_empty() { 6000 } else { num()? },
                form: match kind {
                    "429-ms" => RetryForm::Ms,
                    "429-xms" => RetryForm::XMs,
                    "429-seconds" => RetryForm::Seconds,
                    "429-date" => RetryForm::Date,
                    "429-none" => RetryForm::None,
                    "429-nonsense" => RetryForm::Nonsense,
                    _ => RetryForm::Azure,
                },
            })
        }
        "500" | "502" | "503" | "504" => {
            Override::Behavior(Behavior::ServerError(kind.parse().ok()?))
        }
        "hang" => Override::Behavior(Behavior::Hang),
        "401" => Override::Behavior(Behavior::Unauthorized),
        "echo" => Override::Behavior(Behavior::Echo),
        "leaky-headers" => Override::Behavior(Behavior::LeakyHeaders),
        "reflect-headers" => Override::Behavior(Behavior::ReflectHeaders),
        "reset" => Override::Behavior(Behavior::ResetMidStream {
            after_chunks: usize::try_from(num()?).ok()?,
        }),
        "cut-stream" => Override::Behavior(Behavior::CutStream {
            after_text_chunks: usize::try_from(num()?).ok()?,
        }),
        "latency" => Override::Latency(Duration::from_millis(num()?)),
        _ => return None,
    })
}

/// The deployment a request names: `/openai/deployments/{name}/...`, else the body's
/// `model`.
fn named_deployment(path: &str, body: &[u8]) -> Option<String> {
    if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        return rest.split('/').next().map(str::to_owned);
    }
    #[derive(serde::Deserialize)]
    struct Model {
        model: Option<String>,
    }
    serde_json::from_slice::<Model>(body).ok()?.model
}

fn authorized(opts: &SimOptions, headers: &HeaderMap) -> bool {
    let Some(key) = &opts.api_key else {
        return true;
    };
    let api_key = headers.get("api-key").map(|v| v.as_bytes());
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::as_bytes);
    api_key == Some(key.as_bytes()) || bearer == Some(key.as_bytes())
}

/// A tiny helper so response builders read well.
fn respond(status: StatusCode, headers: &[(&'static str, String)], body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    for (k, v) in headers {
        if let Ok(v) = http::HeaderValue::from_str(v) {
            r.headers_mut().append(*k, v);
        }
    }
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    respond(
        status,
        &[("content-type", "application/json".into())],
        full(v.to_string()),
    )
}
