//! The upstream connection pool: one per backend, split per worker.
//!
//! HTTP/1.1 goes through the gateway's own upstream codec ([`super::h1`]), in the
//! request's task; HTTP/2 through hyper's `client::conn` handles. Neither uses hyper-util's
//! generic pooled client (which boxes a large request future and takes a shared pool lock
//! per request). Each worker has its own slot, guarded by a mutex only that worker ever touches, so
//! taking and returning a connection is uncontended and a connection is always driven by
//! the runtime of the worker that uses it.
//!
//! - **HTTP/1.1** (default): idle keep-alive connections are kept in a last-in-first-out
//!   list (at most [`MAX_IDLE`] per worker, expired after [`IDLE_TIMEOUT`]). A connection
//!   carries one request at a time and belongs to the response body ([`ResponseBody`]):
//!   it goes back to the list only once the body has been read exactly to its end. A body
//!   dropped earlier (client went away, body error, idle timeout) closes the connection,
//!   which cancels the backend's work. An idle connection is checked before reuse: one
//!   the backend closed, or that has unexpected bytes waiting, is discarded.
//! - **HTTP/2** (`http2 = true`): one multiplexed connection per worker, shared by all its
//!   requests and replaced when it closes. Over `http://` this is h2c with prior knowledge.
//! - **Connecting**: TCP with TCP_NODELAY and keep-alive probes, bounded by the backend's
//!   connect timeout; TLS via rustls with the webpki roots plus an optional extra CA bundle,
//!   SNI from the URL host and ALPN `http/1.1` or `h2`.
//!
//! Errors keep apart what failover needs: [`PoolError::is_connect`] is true only when the
//! request cannot have reached the backend (no connection could be set up, or the request
//! could not be written on a fresh connection). A request that cannot be written on a
//! reused idle connection (the backend had closed it) is retried once on a fresh
//! connection; nothing that may have reached the backend whole is ever resent. So a close
//! still in flight when an idle connection is taken (the backend's keep-alive timeout
//! racing the request) ends as a 502, not a retry: keep [`IDLE_TIMEOUT`] below the
//! backends' own keep-alive timeout.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::Either;
use http::header::HeaderValue;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri};
use http_body::{Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::BoxError;
use crate::proxy::h1;

/// The request body type sent upstream (request bodies are already buffered).
pub type UpstreamBody = Bytes;

/// A request for a backend: what [`Pool::send`] sends.
pub struct Outbound {
    pub method: Method,
    pub target: OriginForm,
    pub headers: http::HeaderMap,
    /// The attempt's `traceparent` when the request is traced, sent in addition to
    /// `headers` (which then hold none).
    pub traceparent: Option<crate::telemetry::TraceparentValue>,
    pub body: UpstreamBody,
}

/// An origin-form request target (`/path?query`, RFC 9112 §3.2.1) that is safe to write on a
/// request line: it starts with `/` and holds no space, control byte, DEL or `#`. Checking
/// this costs a scan of the bytes; building an `http::Uri` re-parses the whole target, which
/// an HTTP/1.1 backend never needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginForm(String);

/// A target [`OriginForm::new`] refused.
#[derive(Debug, thiserror::Error)]
#[error("not an origin-form request target")]
pub struct InvalidTarget;

impl OriginForm {
    pub fn new(target: String) -> Result<Self, InvalidTarget> {
        let ok =
            target.starts_with('/') && target.bytes().all(|b| b > b' ' && b != 0x7f && b != b'#');
        if ok {
            Ok(Self(target))
        } else {
            Err(InvalidTarget)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<Request<UpstreamBody>> for Outbound {
    /// The request's method, headers, body and its URI's path and query (tests, tools).
    fn from(req: Request<UpstreamBody>) -> Self {
        let (parts, body) = req.into_parts();
        // `http` parsed it: no space, control byte or fragment.
        let target = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
        Self {
            method: parts.method,
            target: OriginForm(target.to_owned()),
            headers: parts.headers,
            traceparent: None,
            body,
        }
    }
}

type H1 = h1::Conn;
type H2 = http2::SendRequest<Full<Bytes>>;

/// Idle connections older than this are closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1.1 connections kept per worker and backend; more are closed on return.
pub const MAX_IDLE: usize = 256;
/// How often a worker's idle connections are swept while it has any.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// TCP keep-alive probe delay on upstream connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// How to build a backend's pool.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    pub connect_timeout: Duration,
    pub http2: bool,
    pub extra_ca_file: Option<PathBuf>,
    /// Number of worker slots (one per worker thread).
    pub workers: usize,
}

/// Failure to set up a pool.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("ca_file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("url: {0}")]
    Url(String),
}

/// Why no connection could be set up. The request was not sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TCP connect to {addr}")]
    Tcp {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake")]
    Tls(#[source] std::io::Error),
    #[error("HTTP/2 handshake")]
    Handshake(#[source] hyper::Error),
    #[error("new connection closed before the request was sent")]
    Unsent(#[source] BoxError),
}

/// A failed upstream request.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The request never reached the backend: safe to try another one.
    #[error("cannot connect")]
    Connect(#[source] ConnectError),
    /// The request may have reached the backend: never resend it.
    #[error("request failed")]
    Request(#[source] BoxError),
}

impl PoolError {
    /// Whether the request cannot have reached the backend (so failover is safe).
    pub fn is_connect(&self) -> bool {
        matches!(self, PoolError::Connect(_))
    }
}

/// Where and how to connect; fixed for the pool's life.
struct Target {
    scheme: Scheme,
    authority: Authority,
    /// Host for TCP connect (IPv6 brackets removed).
    host: String,
    port: u16,
    /// `Host` header for HTTP/1.1 (port omitted when it is the scheme's default).
    host_header: HeaderValue,
    /// `Some` for `https://`.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    connect_timeout: Duration,
    http2: bool,
    h2: http2::Builder<TokioExecutor>,
}

/// An idle HTTP/1.1 connection and when it went idle.
struct Idle<C> {
    conn: C,
    since: Instant,
}

/// What the idle list needs to know about a connection.
trait Liveness {
    fn is_closed(&mut self) -> bool;
}

impl Liveness for H1 {
    fn is_closed(&mut self) -> bool {
        !self.is_open()
    }
}

/// Idle connections, most recently used last; the oldest is first to expire or be evicted.
struct IdleList<C> {
    items: VecDeque<Idle<C>>,
}

impl<C: Liveness> IdleList<C> {
    fn new() -> Self {
        Self {
            items: VecDeque::new(),
        }
    }

    /// The most recently returned connection that is still open and not expired.
    fn pop(&mut self, now: Instant) -> Option<C> {
        while let Some(mut idle) = self.items.pop_back() {
            if now.saturating_duration_since(idle.since) >= IDLE_TIMEOUT {
                // Last in, first out: everything older has expired too.
                self.items.clear();
                return None;
            }
            if !idle.conn.is_closed() {
                return Some(idle.conn);
            }
        }
        None
    }

    /// Keep `conn` (whose last response just ended cleanly) for reuse, evicting the
    /// oldest beyond `cap`. Its liveness is checked when it is taken again.
    fn push(&mut self, conn: C, now: Instant, cap: usize) {
        if cap == 0 {
            return;
        }
        while self.items.len() >= cap {
            self.items.pop_front();
        }
        self.items.push_back(Idle { conn, since: now });
    }

    /// Drop closed and expired connections.
    fn sweep(&mut self, now: Instant) {
        self.items.retain_mut(|i| {
            now.saturating_duration_since(i.since) < IDLE_TIMEOUT && !i.conn.is_closed()
        });
    }

    fn len(&self) -> usize {
        self.items.len()
    }
}

/// One worker's connections to one backend.
struct Slot {
    idle: IdleList<H1>,
    /// The shared HTTP/2 connection and when a request last took it.
    h2: Option<(H2, Instant)>,
    /// Whether a sweeper task is running for this slot.
    sweeping: bool,
}

impl Slot {
    fn sweep(&mut self, now: Instant) {
        self.idle.sweep(now);
        if let Some((tx, used)) = &self.h2 {
            if tx.is_closed() || now.saturating_duration_since(*used) >= IDLE_TIMEOUT {
                self.h2 = None;
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.idle.len() == 0 && self.h2.is_none()
    }
}

struct Inner {
    target: Target,
    slots: Box<[Mutex<Slot>]>,
}

impl Inner {
    fn slot(&self, worker: usize) -> MutexGuard<'_, Slot> {
        // Nothing panics while a slot is locked; a poisoned slot is still consistent.
        self.slots[worker]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Return an HTTP/1.1 connection whose last response was read to its end.
    fn put_idle(self: &Arc<Self>, worker: usize, conn: H1) {
        let mut slot = self.slot(worker);
        slot.idle.push(conn, Instant::now(), MAX_IDLE);
        self.ensure_sweeper(worker, &mut slot);
    }

    /// Start the slot's sweeper if it has connections to watch and none is running.
    fn ensure_sweeper(self: &Arc<Self>, worker: usize, slot: &mut Slot) {
        if slot.sweeping || slot.is_empty() {
            return;
        }
        // Outside a runtime (only while a runtime shuts down) nothing is swept; the
        // connections expire on the next checkout instead.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            slot.sweeping = true;
            rt.spawn(sweep(Arc::downgrade(self), worker));
        }
    }
}

/// Close expired idle connections of one slot until it has none.
async fn sweep(inner: Weak<Inner>, worker: usize) {
    loop {
        tokio::time::sleep(SWEEP_INTERVAL).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let mut slot = inner.slot(worker);
        slot.sweep(Instant::now());
        if slot.is_empty() {
            slot.sweeping = false;
            return;
        }
    }
}

/// A backend's connection pool; see the module docs.
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    /// The host connections go to (an IPv6 address without its brackets).
    pub fn host(&self) -> &str {
        &self.inner.target.host
    }

    /// The port connections go to (the scheme's default when the URL names none).
    pub fn port(&self) -> u16 {
        self.inner.target.port
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("scheme", &self.inner.target.scheme)
            .field("authority", &self.inner.target.authority)
            .field("http2", &self.inner.target.http2)
            .field("workers", &self.inner.slots.len())
            .finish()
    }
}

/// Where an HTTP/1.1 connection goes back to when its response body ends cleanly.
pub struct Home {
    inner: Arc<Inner>,
    worker: usize,
}

impl Home {
    /// The connection's last response ended cleanly: it may carry another request.
    pub(crate) fn put(self, conn: H1) {
        self.inner.put_idle(self.worker, conn);
    }
}

/// A backend's response body. An HTTP/1.1 body owns its connection (see the module docs).
pub enum ResponseBody {
    H1(h1::Body),
    H2(Incoming),
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResponseBody::H1(_) => "ResponseBody::H1",
            ResponseBody::H2(_) => "ResponseBody::H2",
        })
    }
}

impl ResponseBody {
    /// The first frame when it has already been read with the head (HTTP/1.1), or the error
    /// that the bytes read so far make certain; `None` otherwise (nothing is read here).
    pub fn take_buffered(&mut self) -> Option<Result<Frame<Bytes>, BoxError>> {
        match self {
            ResponseBody::H1(b) => b.take_buffered().map(|r| r.map_err(Into::into)),
            ResponseBody::H2(_) => None,
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::H1(b) => b.poll_frame(cx).map_err(Into::into),
            ResponseBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::H1(b) => b.is_end_stream(),
            ResponseBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::H1(b) => b.size_hint(),
            ResponseBody::H2(b) => b.size_hint(),
        }
    }
}

impl Pool {
    /// Build an (empty) pool for the backend at `scheme://authority`.
    pub fn new(
        scheme: &Scheme,
        authority: &Authority,
        opts: &PoolOptions,
    ) -> Result<Self, SetupError> {
        let https = *scheme == Scheme::HTTPS;
        if !https && *scheme != Scheme::HTTP {
            return Err(SetupError::Url(format!("unsupported scheme {scheme}")));
        }
        let raw_host = authority.host();
        let host = raw_host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(raw_host)
            .to_owned();
        let default_port = if https { 443 } else { 80 };
        let port = authority.port_u16().unwrap_or(default_port);
        let host_header = if port == default_port {
            HeaderValue::from_str(raw_host)
        } else {
            HeaderValue::from_str(&format!("{raw_host}:{port}"))
        }
        .map_err(|e| SetupError::Url(e.to_string()))?;
        let tls = if https {
            let config = tls_config(opts)?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| SetupError::Url(format!("host {host}: {e}")))?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new());
        let target = Target {
            scheme: scheme.clone(),
            authority: authority.clone(),
            host,
            port,
            host_header,
            tls,
            connect_timeout: opts.connect_timeout,
            http2: opts.http2,
            h2,
        };
        let slots = (0..opts.workers.max(1))
            .map(|_| {
                Mutex::new(Slot {
                    idle: IdleList::new(),
                    h2: None,
                    sweeping: false,
                })
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner { target, slots }),
        })
    }

    /// Send `req` on the calling worker's connections.
    ///
    /// Not an `async fn`: the returned future is exactly the HTTP/1.1 or HTTP/2 one, so it
    /// stays small (it is moved into the request's future on every request).
    pub fn send(
        &self,
        req: impl Into<Outbound>,
    ) -> impl Future<Output = Result<Response<ResponseBody>, PoolError>> + Send + '_ {
        let req = req.into();
        let worker = crate::worker::index() % self.inner.slots.len();
        if self.inner.target.http2 {
            Either::Right(self.send_h2(worker, req))
        } else {
            Either::Left(self.send_h1(worker, req))
        }
    }

    // Not an `async fn`: the body's block owns the encoded request once (an `async fn`
    // would keep the argument and its moved copy side by side in the future).
    fn send_h1(
        &self,
        worker: usize,
        req: Outbound,
    ) -> impl Future<Output = Result<Response<ResponseBody>, PoolError>> + Send + '_ {
        let wire = h1::encode_request(
            &req.method,
            req.target.as_str(),
            &self.inner.target.host_header,
            &req.headers,
            req.traceparent.as_ref(),
            req.body,
        );
        let head_request = req.method == Method::HEAD;
        async move {
            let mut use_idle = true;
            loop {
                let idle = if use_idle {
                    self.checkout_h1(worker)
                } else {
                    None
                };
                let reused = idle.is_some();
                let mut conn = match idle {
                    Some(c) => c,
                    // Connecting is the cold path and its future is large (TLS state): boxed,
                    // so the per-request future that is moved around stays small.
                    None => Box::pin(self.connect_h1()).await?,
                };
                let written = match conn.write_request(&wire).await {
                    Ok(w) => w,
                    Err(e) if reused => {
                        // The backend had closed this idle connection. Once, on a fresh
                        // connection (not another idle one that may be as stale).
                        tracing::debug!(error = %e, "idle upstream connection was closed; retrying on a new one");
                        use_idle = false;
                        continue;
                    }
                    Err(e) => return Err(PoolError::Connect(ConnectError::Unsent(e.into()))),
                };
                let (head, framing, reuse) = conn
                    .read_head(head_request)
                    .await
                    .map_err(|e| PoolError::Request(e.into()))?;
                let home = Home {
                    inner: self.inner.clone(),
                    worker,
                };
                let reuse = reuse && written == h1::Written::All;
                let body = h1::Body::new(conn, framing, reuse, home);
                return Ok(head.map(|()| ResponseBody::H1(body)));
            }
        }
    }

    /// The calling worker's most recent idle connection that is still open.
    fn checkout_h1(&self, worker: usize) -> Option<H1> {
        self.inner.slot(worker).idle.pop(Instant::now())
    }

    // Not an `async fn`, for the same reason as `send_h1`.
    #[allow(clippy::manual_async_fn)]
    fn send_h2(
        &self,
        worker: usize,
        req: Outbound,
    ) -> impl Future<Output = Result<Response<ResponseBody>, PoolError>> + Send + '_ {
        let built = absolute_uri(&self.inner.target, &req.target).map(|uri| {
            let mut r = Request::new(Full::new(req.body));
            *r.method_mut() = req.method;
            *r.uri_mut() = uri;
            *r.headers_mut() = req.headers;
            if let Some(v) = req
                .traceparent
                .and_then(|v| HeaderValue::from_bytes(&v).ok())
            {
                r.headers_mut()
                    .insert(crate::telemetry::TRACEPARENT.clone(), v);
            }
            r
        });
        async move {
            let mut req = built.map_err(|e| PoolError::Request(e.into()))?;
            let mut use_shared = true;
            loop {
                let shared = if use_shared {
                    self.checkout_h2(worker)
                } else {
                    None
                };
                let reused = shared.is_some();
                let mut tx = match shared {
                    Some(tx) => tx,
                    None => {
                        let tx = Box::pin(self.connect_h2()).await?;
                        self.keep_h2(worker, &tx);
                        tx
                    }
                };
                match tx.try_send_request(req).await {
                    Ok(resp) => return Ok(resp.map(ResponseBody::H2)),
                    Err(mut e) => match (e.take_message(), reused) {
                        (Some(unsent), true) => {
                            tracing::debug!(error = %e.error(), "HTTP/2 upstream connection was closed; retrying on a new one");
                            req = unsent;
                            use_shared = false;
                        }
                        (Some(_), false) => {
                            return Err(PoolError::Connect(ConnectError::Unsent(
                                e.into_error().into(),
                            )))
                        }
                        (None, _) => return Err(PoolError::Request(e.into_error().into())),
                    },
                }
            }
        }
    }

    /// The calling worker's HTTP/2 connection, if it has an open one.
    fn checkout_h2(&self, worker: usize) -> Option<H2> {
        let mut slot = self.inner.slot(worker);
        match &mut slot.h2 {
            Some((tx, used)) if !tx.is_closed() => {
                *used = Instant::now();
                Some(tx.clone())
            }
            _ => {
                slot.h2 = None;
                None
            }
        }
    }

    /// Share a new HTTP/2 connection with the worker's next requests. Concurrent first
    /// requests may each connect; the first one kept wins and the others' connections
    /// close when their streams end.
    fn keep_h2(&self, worker: usize, tx: &H2) {
        let mut slot = self.inner.slot(worker);
        if !matches!(&slot.h2, Some((cur, _)) if !cur.is_closed()) {
            slot.h2 = Some((tx.clone(), Instant::now()));
            self.inner.ensure_sweeper(worker, &mut slot);
        }
    }

    /// Idle HTTP/1.1 connections of a worker (for tests).
    #[cfg(test)]
    pub(crate) fn idle_count(&self, worker: usize) -> usize {
        self.inner.slot(worker).idle.len()
    }

    async fn connect_h1(&self) -> Result<H1, PoolError> {
        let t = &self.inner.target;
        let tcp = self.tcp().await?;
        let io = match &t.tls {
            None => h1::Io::Tcp(tcp),
            Some((tls, name)) => h1::Io::Tls(Box::new(self.tls(tls, name, tcp).await?)),
        };
        tracing::debug!(authority = %t.authority, "new upstream HTTP/1.1 connection");
        Ok(h1::Conn::new(io))
    }

    async fn connect_h2(&self) -> Result<H2, PoolError> {
        let t = &self.inner.target;
        let tcp = self.tcp().await?;
        let tx = match &t.tls {
            None => spawn_h2(&t.h2, TokioIo::new(tcp)).await,
            Some((tls, name)) => {
                let stream = self.tls(tls, name, tcp).await?;
                spawn_h2(&t.h2, TokioIo::new(stream)).await
            }
        }
        .map_err(|e| PoolError::Connect(ConnectError::Handshake(e)))?;
        tracing::debug!(authority = %t.authority, "new upstream HTTP/2 connection");
        Ok(tx)
    }

    /// TCP connection with TCP_NODELAY and keep-alive, within the connect timeout.
    async fn tcp(&self) -> Result<TcpStream, PoolError> {
        let t = &self.inner.target;
        let connect = TcpStream::connect((t.host.as_str(), t.port));
        let stream = match tokio::time::timeout(t.connect_timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(PoolError::Connect(ConnectError::Tcp {
                    addr: t.authority.to_string(),
                    source,
                }))
            }
            Err(_) => return Err(PoolError::Connect(ConnectError::Timeout(t.connect_timeout))),
        };
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        Ok(stream)
    }

    /// TLS over `tcp`, bounded by the connect timeout too.
    async fn tls(
        &self,
        tls: &TlsConnector,
        name: &ServerName<'static>,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, PoolError> {
        let t = &self.inner.target;
        match tokio::time::timeout(t.connect_timeout, tls.connect(name.clone(), tcp)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(PoolError::Connect(ConnectError::Tls(e))),
            Err(_) => Err(PoolError::Connect(ConnectError::Timeout(t.connect_timeout))),
        }
    }
}

/// HTTP/2 handshake on `io`, with the connection driven by a task on this runtime.
async fn spawn_h2<T>(builder: &http2::Builder<TokioExecutor>, io: T) -> hyper::Result<H2>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (tx, conn) = builder.handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    });
    Ok(tx)
}

/// `/path?q` → `scheme://authority/path?q`: HTTP/2 requests carry the target's scheme and
/// authority as pseudo-headers.
fn absolute_uri(target: &Target, origin: &OriginForm) -> Result<Uri, http::Error> {
    Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query(origin.as_str())
        .build()
}

/// rustls client config: webpki roots plus the backend's extra CA bundle; ALPN by protocol.
fn tls_config(opts: &PoolOptions) -> Result<rustls::ClientConfig, SetupError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &opts.extra_ca_file {
        let ca_err = |reason: String| SetupError::CaFile {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| ca_err(e.to_string()))?;
            roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![if opts.http2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    Ok(config)
}

/// Keep the compiler honest about what crosses threads: `Backend` is shared via `Arc`.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Pool>();
    fn send<T: Send>() {}
    send::<ResponseBody>();
};

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::cell::Cell;
    use std::rc::Rc;

    use http_body_util::BodyExt;

    use super::*;
    use crate::sim::{get, SimHandle, SimOptions};

    /// A stand-in connection whose closed flag a test flips.
    #[derive(Clone)]
    struct Fake(u32, Rc<Cell<bool>>);

    impl Fake {
        fn new(id: u32) -> Self {
            Self(id, Rc::new(Cell::new(false)))
        }
    }

    impl Liveness for Fake {
        fn is_closed(&mut self) -> bool {
            self.1.get()
        }
    }

    fn ids(l: &mut IdleList<Fake>, now: Instant) -> Vec<u32> {
        std::iter::from_fn(|| l.pop(now)).map(|c| c.0).collect()
    }

    #[test]
    fn idle_list_is_lifo_and_skips_closed() {
        let t0 = Instant::now();
        let mut l = IdleList::new();
        let (a, b, c) = (Fake::new(1), Fake::new(2), Fake::new(3));
        for f in [&a, &b, &c] {
            l.push(f.clone(), t0, 8);
        }
        b.1.set(true);
        assert_eq!(
            ids(&mut l, t0),
            [3, 1],
            "most recent first; closed one dropped"
        );
        let closed = Fake::new(4);
        l.push(closed.clone(), t0, 8);
        closed.1.set(true);
        assert!(
            l.pop(t0).is_none(),
            "one closed while idle is never handed out"
        );
    }

    #[test]
    fn idle_list_expires_and_caps() {
        let t0 = Instant::now();
        let mut l = IdleList::new();
        l.push(Fake::new(1), t0, 8);
        l.push(Fake::new(2), t0 + Duration::from_secs(60), 8);
        let later = t0 + IDLE_TIMEOUT + Duration::from_secs(1);
        l.sweep(later);
        assert_eq!(ids(&mut l, later), [2], "the older one expired");

        l.push(Fake::new(1), t0, 8);
        l.push(Fake::new(2), t0 + Duration::from_secs(60), 8);
        assert!(l.pop(t0 + Duration::from_secs(200)).is_none());
        assert_eq!(
            l.len(),
            0,
            "popping an expired one clears the older ones too"
        );

        for i in 0..5 {
            l.push(Fake::new(i), t0, 3);
        }
        assert_eq!(
            ids(&mut l, t0),
            [4, 3, 2],
            "the oldest are evicted beyond the cap"
        );
    }

    #[test]
    fn absolute_uri_adds_the_targets_scheme_and_authority() {
        let pool = pool_for("https://x.example:8443", true);
        let origin = OriginForm::new("/openai/x?api-version=1&a=b".into()).unwrap();
        let u = absolute_uri(&pool.inner.target, &origin).unwrap();
        assert_eq!(u, "https://x.example:8443/openai/x?api-version=1&a=b");
    }

    #[test]
    fn origin_form_targets_cannot_break_the_request_line() {
        for ok in [
            "/",
            "/openai/deployments/d/chat/completions?api-version=2024-10-21&x=%20",
            "/v1/files/é",
        ] {
            assert_eq!(OriginForm::new(ok.into()).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "openai/x",
            "*",
            "http://a/b",
            "/a b",
            "/a\r\nHost: evil",
            "/a\nb",
            "/a\tb",
            "/a\0",
            "/a\x7f",
            "/a#frag",
        ] {
            assert!(OriginForm::new(bad.into()).is_err(), "{bad:?} accepted");
        }
    }

    pub(crate) fn pool_for(url: &str, http2: bool) -> Pool {
        let uri: Uri = url.parse().unwrap();
        let opts = PoolOptions {
            connect_timeout: Duration::from_secs(2),
            http2,
            extra_ca_file: None,
            workers: 1,
        };
        Pool::new(uri.scheme().unwrap(), uri.authority().unwrap(), &opts).unwrap()
    }

    pub(crate) fn chat(base: &str, stream: bool, behavior: Option<&str>) -> Request<UpstreamBody> {
        let body =
            format!(r#"{{"messages":[{{"role":"user","content":"hi"}}],"stream":{stream}}}"#);
        let mut b = Request::post(format!(
            "{base}/openai/deployments/d/chat/completions?api-version=2024-10-21"
        ))
        .header("content-type", "application/json");
        if let Some(x) = behavior {
            b = b.header("x-sim-behavior", x);
        }
        b.body(Bytes::from(body)).unwrap()
    }

    /// Read a whole response body (which gives its connection back).
    async fn finish(resp: Response<ResponseBody>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn keep_alive_connections_are_reused() {
        let sim = SimHandle::start(SimOptions::default()).await.unwrap();
        let pool = pool_for(&sim.url(), false);
        for i in 0..10 {
            let resp = pool.send(chat(&sim.url(), i % 2 == 0, None)).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert!(!finish(resp).await.is_empty());
        }
        assert_eq!(get(&sim.counters().requests), 10);
        assert_eq!(
            get(&sim.counters().connections),
            1,
            "one connection for all"
        );
        assert_eq!(pool.inner.slot(0).idle.len(), 1);
    }

    #[tokio::test]
    async fn a_connection_whose_body_was_abandoned_is_not_reused() {
        let sim = SimHandle::start(SimOptions {
            token_latency: Duration::from_millis(30),
            ..SimOptions::default()
        })
        .await
        .unwrap();
        let pool = pool_for(&sim.url(), false);
        let resp = pool.send(chat(&sim.url(), true, None)).await.unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        assert_eq!(pool.inner.slot(0).idle.len(), 0);
        let resp = pool.send(chat(&sim.url(), false, None)).await.unwrap();
        assert_eq!(resp.status(), 200);
        finish(resp).await;
        assert_eq!(get(&sim.counters().connections), 2);
        // And the clean one is reused.
        let resp = pool.send(chat(&sim.url(), false, None)).await.unwrap();
        finish(resp).await;
        assert_eq!(get(&sim.counters().connections), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_backend_closed_is_replaced() {
        let sim = SimHandle::start(SimOptions::default()).await.unwrap();
        let addr = sim.addr;
        let url = sim.url();
        let pool = pool_for(&url, false);
        let resp = pool.send(chat(&url, false, None)).await.unwrap();
        finish(resp).await;
        assert_eq!(pool.inner.slot(0).idle.len(), 1);
        sim.stop().await;
        let sim = SimHandle::start_on(addr, SimOptions::default())
            .await
            .unwrap();
        let resp = pool.send(chat(&url, false, None)).await.unwrap();
        assert_eq!(resp.status(), 200);
        finish(resp).await;
        assert_eq!(get(&sim.counters().connections), 1);
    }

    #[tokio::test]
    async fn errors_tell_connect_failures_from_failed_requests() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}");
        let err = pool_for(&url, false)
            .send(chat(&url, false, None))
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err:?}");
        let err = pool_for(&url, true)
            .send(chat(&url, false, None))
            .await
            .unwrap_err();
        assert!(err.is_connect(), "{err:?}");

        // The backend resets the stream mid-body: the body fails, the connection is dropped.
        let sim = SimHandle::start(SimOptions::default()).await.unwrap();
        let pool = pool_for(&sim.url(), false);
        let resp = pool
            .send(chat(&sim.url(), true, Some("reset:2")))
            .await
            .unwrap();
        assert!(resp.into_body().collect().await.is_err());
        assert_eq!(pool.inner.slot(0).idle.len(), 0);
    }

    /// A scripted HTTP/1.1 backend: the request path picks the answer. Counts connections.
    async fn scripted_backend() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let conns = Arc::new(AtomicUsize::new(0));
        let count = conns.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        // One request: head, then its Content-Length body.
                        let (head_end, len) = loop {
                            let text = String::from_utf8_lossy(&buf).to_string();
                            if let Some(i) = text.find("\r\n\r\n") {
                                let len = text[..i]
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length: "))
                                    .map_or(0, |v| v.parse::<usize>().unwrap());
                                if buf.len() >= i + 4 + len || text.starts_with("POST /early ") {
                                    break (i + 4, len.min(buf.len() - i - 4));
                                }
                            }
                            let mut chunk = [0u8; 4096];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        let line = String::from_utf8_lossy(&buf[..head_end]).to_string();
                        if line.starts_with("POST /early ") {
                            // Answer at once, read nothing more, keep the connection open.
                            let _ = s
                                .write_all(
                                    b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n",
                                )
                                .await;
                            std::future::pending::<()>().await;
                        }
                        buf.drain(..head_end + len);
                        let path = line.split(' ').nth(1).unwrap_or("").to_owned();
                        // Head and body exactly fill the gateway's first 16 KiB read; bytes follow.
                        let full = {
                            let n =
                                16384 - "HTTP/1.1 200 OK\r\ncontent-length: 16342\r\n\r\n".len();
                            let mut v = format!("HTTP/1.1 200 OK\r\ncontent-length: {n}\r\n\r\n")
                                .into_bytes();
                            v.resize(16384, b'f');
                            v.extend_from_slice(b"JUNK");
                            v
                        };
                        if path == "/hangup" {
                            return;
                        }
                        let (answer, close): (&[u8], bool) = match path.as_str() {
                            "/full-read-then-junk" => (&full, false),
                            "/closes-after" => (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na", true),
                            "/connection-close" => {
                                (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nb", false)
                            }
                            "/until-close" => (b"HTTP/1.1 200 OK\r\n\r\nread me to the end", true),
                            "/stray-bytes" => (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\ncJUNK", false),
                            "/smuggle" => (
                                b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n1\r\nd\r\n0\r\n\r\n",
                                false,
                            ),
                            _ => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false),
                        };
                        if s.write_all(answer).await.is_err() || close {
                            return;
                        }
                    }
                });
            }
        });
        (url, conns)
    }

    fn get_path(base: &str, path: &str) -> Request<UpstreamBody> {
        Request::get(format!("{base}{path}"))
            .body(Bytes::new())
            .unwrap()
    }

    #[tokio::test]
    async fn http1_connections_are_reused_only_when_their_answer_allows_it() {
        use std::sync::atomic::Ordering;
        let (url, conns) = scripted_backend().await;
        let pool = pool_for(&url, false);
        let send = |path: &'static str| {
            let pool = &pool;
            let url = url.clone();
            async move { finish(pool.send(get_path(&url, path)).await.unwrap()).await }
        };
        assert_eq!(send("/ok").await, "ok");
        assert_eq!(send("/ok").await, "ok");
        assert_eq!(conns.load(Ordering::SeqCst), 1, "keep-alive reuse");

        // `Connection: close`, a body delimited by the close, stray bytes after the body,
        // both framings at once: each answer is read right, and its connection not reused.
        for (path, body) in [
            ("/connection-close", "b"),
            ("/until-close", "read me to the end"),
            ("/stray-bytes", "c"),
            ("/smuggle", "d"),
        ] {
            let before = conns.load(Ordering::SeqCst);
            assert_eq!(send(path).await, body, "{path}");
            assert_eq!(pool.idle_count(0), 0, "{path}: not kept");
            assert_eq!(send("/ok").await, "ok");
            assert_eq!(
                conns.load(Ordering::SeqCst),
                before + 1,
                "{path}: a new one"
            );
        }

        // The backend closes a kept connection while it is idle (no `Connection: close`):
        // the pool sees the close and the next request goes out on a fresh connection.
        assert_eq!(send("/closes-after").await, "a");
        assert_eq!(pool.idle_count(0), 1, "nothing said it would close");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let idle = pool.inner.slot(0).idle.pop(Instant::now());
            let Some(conn) = idle else { break };
            pool.inner.put_idle(0, conn);
            assert!(Instant::now() < deadline, "the close was never seen");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before = conns.load(Ordering::SeqCst);
        assert_eq!(send("/ok").await, "ok");
        assert_eq!(conns.load(Ordering::SeqCst), before + 1);

        // Bytes that follow a body the first read took whole (so they are still in the
        // socket, not the buffer): seen when the connection is next taken, and it is not.
        assert_eq!(send("/full-read-then-junk").await.len(), 16342);
        let before = conns.load(Ordering::SeqCst);
        assert_eq!(send("/ok").await, "ok");
        assert_eq!(conns.load(Ordering::SeqCst), before + 1);
    }

    #[tokio::test]
    async fn an_answer_before_the_whole_body_was_taken_is_relayed() {
        let (url, conns) = scripted_backend().await;
        let pool = pool_for(&url, false);
        // Far more than the socket buffers hold: the backend answers 413 and stops reading.
        let big = Request::post(format!("{url}/early"))
            .body(Bytes::from(vec![b'x'; 32 << 20]))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), pool.send(big))
            .await
            .expect("the early answer is read, not waited past")
            .unwrap();
        assert_eq!(resp.status(), 413);
        assert!(finish(resp).await.is_empty());
        assert_eq!(pool.idle_count(0), 0, "its request was cut: not reused");
        assert_eq!(send_ok(&pool, &url).await, "ok");
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    async fn send_ok(pool: &Pool, url: &str) -> Bytes {
        finish(pool.send(get_path(url, "/ok")).await.unwrap()).await
    }

    #[tokio::test]
    async fn a_backend_that_hangs_up_before_answering_is_not_a_connect_failure() {
        let (url, _) = scripted_backend().await;
        let pool = pool_for(&url, false);
        // It had the whole request: it may have acted on it, so it must not be resent.
        let err = pool.send(get_path(&url, "/hangup")).await.unwrap_err();
        assert!(!err.is_connect(), "{err:?}");
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection() {
        let sim = SimHandle::start(SimOptions::default()).await.unwrap();
        let pool = pool_for(&sim.url(), true);
        let sends = (0..8).map(|i| pool.send(chat(&sim.url(), i % 2 == 0, None)));
        for r in futures_util::future::join_all(sends).await {
            let resp = r.unwrap();
            assert_eq!(resp.version(), http::Version::HTTP_2);
            finish(resp).await;
        }
        let resp = pool.send(chat(&sim.url(), false, None)).await.unwrap();
        finish(resp).await;
        assert!(
            get(&sim.counters().connections) <= 8,
            "concurrent first requests may each connect"
        );
        let before = get(&sim.counters().connections);
        for _ in 0..5 {
            let resp = pool.send(chat(&sim.url(), false, None)).await.unwrap();
            finish(resp).await;
        }
        assert_eq!(
            get(&sim.counters().connections),
            before,
            "then one is shared"
        );
    }

    #[tokio::test]
    async fn a_traced_attempts_traceparent_reaches_http1_and_http2_backends_once() {
        let sim = SimHandle::start(SimOptions::default()).await.unwrap();
        let tp = *b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        for http2 in [false, true] {
            let pool = pool_for(&sim.url(), http2);
            let mut req = Outbound::from(chat(&sim.url(), false, None));
            req.traceparent = Some(tp);
            finish(pool.send(req).await.unwrap()).await;
            let seen = sim.last().unwrap().headers;
            let all: Vec<_> = seen.get_all("traceparent").iter().collect();
            assert_eq!(all, [&tp[..]], "http2: {http2}");
        }
    }

    #[test]
    fn the_per_request_future_stays_small() {
        let pool = pool_for("http://127.0.0.1:1", false);
        let f = pool.send(Request::new(UpstreamBody::default()));
        // It is moved into every request's future; connecting (large, TLS) is boxed.
        assert!(
            std::mem::size_of_val(&f) <= 1024,
            "{}",
            std::mem::size_of_val(&f)
        );
    }
}
