//! The upstream connection pool: one per backend, split per worker.
//!
//! Built directly on hyper's `client::conn` handles, without hyper-util's generic pooled
//! client (which boxes a large request future and takes a shared pool lock per request).
//! Each worker has its own slot, guarded by a mutex only that worker ever touches, so
//! taking and returning a connection is uncontended and a connection is always driven by
//! the runtime of the worker that uses it.
//!
//! - **HTTP/1.1** (default): idle keep-alive connections are kept in a last-in-first-out
//!   list (at most [`MAX_IDLE`] per worker, expired after [`IDLE_TIMEOUT`]). A connection
//!   carries one request at a time; it goes back to the list through its [`Lease`] only
//!   once the response body has been read to its end. A lease dropped earlier (client went
//!   away, body error, idle timeout) drops the connection, and hyper closes it.
//! - **HTTP/2** (`http2 = true`): one multiplexed connection per worker, shared by all its
//!   requests and replaced when it closes. Over `http://` this is h2c with prior knowledge.
//! - **Connecting**: TCP with TCP_NODELAY and keep-alive probes, bounded by the backend's
//!   connect timeout; TLS via rustls with the webpki roots plus an optional extra CA bundle,
//!   SNI from the URL host and ALPN `http/1.1` or `h2`.
//!
//! Errors keep apart what failover needs: [`PoolError::is_connect`] is true only when the
//! request cannot have reached the backend (no connection could be set up, or the request
//! came back unsent from a fresh connection). A request sent on a reused idle connection
//! that the backend had already closed, and that hyper hands back unsent, is retried once
//! on a fresh connection; nothing that may have been sent is ever resent.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::Either;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The request body type sent upstream (request bodies are already buffered).
pub type UpstreamBody = Full<Bytes>;

type H1 = http1::SendRequest<UpstreamBody>;
type H2 = http2::SendRequest<UpstreamBody>;

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
    #[error("HTTP handshake")]
    Handshake(#[source] hyper::Error),
    #[error("new connection closed before the request was sent")]
    Unsent(#[source] hyper::Error),
}

/// A failed upstream request.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The request never reached the backend: safe to try another one.
    #[error("cannot connect")]
    Connect(#[source] ConnectError),
    /// The request may have reached the backend: never resend it.
    #[error("request failed")]
    Request(#[source] hyper::Error),
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
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
}

/// An idle HTTP/1.1 connection and when it went idle.
struct Idle<C> {
    conn: C,
    since: Instant,
}

/// What the idle list needs to know about a connection.
trait Liveness {
    fn is_closed(&self) -> bool;
}

impl Liveness for H1 {
    fn is_closed(&self) -> bool {
        http1::SendRequest::is_closed(self)
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
        while let Some(idle) = self.items.pop_back() {
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

    /// Keep `conn` for reuse, evicting the oldest beyond `cap`.
    fn push(&mut self, conn: C, now: Instant, cap: usize) {
        if conn.is_closed() || cap == 0 {
            return;
        }
        while self.items.len() >= cap {
            self.items.pop_front();
        }
        self.items.push_back(Idle { conn, since: now });
    }

    /// Drop closed and expired connections.
    fn sweep(&mut self, now: Instant) {
        self.items.retain(|i| {
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

/// Keeps an HTTP/1.1 connection while its response body is read. Call [`Lease::release`]
/// when the body has been read to its end; dropping the lease otherwise closes the
/// connection. HTTP/2 leases hold nothing (the connection is shared).
#[derive(Default)]
pub struct Lease {
    held: Option<(Arc<Inner>, usize, H1)>,
}

impl Lease {
    /// A lease that holds no connection.
    pub fn none() -> Self {
        Self { held: None }
    }

    /// The response body was read to its end: the connection may carry another request.
    pub fn release(&mut self) {
        if let Some((inner, worker, conn)) = self.held.take() {
            inner.put_idle(worker, conn);
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("held", &self.held.is_some())
            .finish()
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
            h1: http1::Builder::new(),
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

    /// Send `req` (absolute URI on this backend) on the calling worker's connections.
    /// The [`Lease`] must live as long as the response body is read.
    ///
    /// Not an `async fn`: the returned future is exactly the HTTP/1.1 or HTTP/2 one, so it
    /// stays small (it is moved into the request's future on every request).
    pub fn send(
        &self,
        req: Request<UpstreamBody>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Lease), PoolError>> + Send + '_ {
        let worker = crate::worker::index() % self.inner.slots.len();
        if self.inner.target.http2 {
            Either::Right(self.send_h2(worker, req))
        } else {
            Either::Left(self.send_h1(worker, req))
        }
    }

    // Not an `async fn`: the body's block owns `req` once (an `async fn` would keep the
    // argument and its moved copy side by side in the future).
    fn send_h1(
        &self,
        worker: usize,
        mut req: Request<UpstreamBody>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Lease), PoolError>> + Send + '_ {
        req.headers_mut()
            .insert(header::HOST, self.inner.target.host_header.clone());
        origin_form(req.uri_mut());
        async move {
            let mut use_idle = true;
            loop {
                let idle = if use_idle {
                    self.checkout_h1(worker).await
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
                match conn.try_send_request(req).await {
                    Ok(resp) => return Ok((resp, self.lease(worker, conn))),
                    Err(mut e) => match (e.take_message(), reused) {
                        // Never written: the backend had closed this idle connection. Once,
                        // on a fresh connection (not another idle one that may be as stale).
                        (Some(unsent), true) => {
                            tracing::debug!(error = %e.error(), "idle upstream connection was closed; retrying on a new one");
                            req = unsent;
                            use_idle = false;
                        }
                        (Some(_), false) => {
                            return Err(PoolError::Connect(ConnectError::Unsent(e.into_error())))
                        }
                        (None, _) => return Err(PoolError::Request(e.into_error())),
                    },
                }
            }
        }
    }

    /// The calling worker's most recent idle connection that can take a request now.
    async fn checkout_h1(&self, worker: usize) -> Option<H1> {
        loop {
            let mut conn = self.inner.slot(worker).idle.pop(Instant::now())?;
            // Returned connections are normally ready at once; briefly wait otherwise.
            if conn.is_ready() || ready_within(&mut conn, self.inner.target.connect_timeout).await {
                return Some(conn);
            }
        }
    }

    // Not an `async fn`, for the same reason as `send_h1`.
    #[allow(clippy::manual_async_fn)]
    fn send_h2(
        &self,
        worker: usize,
        mut req: Request<UpstreamBody>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Lease), PoolError>> + Send + '_ {
        absolute_form(req.uri_mut(), &self.inner.target);
        async move {
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
                    Ok(resp) => return Ok((resp, Lease::none())),
                    Err(mut e) => match (e.take_message(), reused) {
                        (Some(unsent), true) => {
                            tracing::debug!(error = %e.error(), "HTTP/2 upstream connection was closed; retrying on a new one");
                            req = unsent;
                            use_shared = false;
                        }
                        (Some(_), false) => {
                            return Err(PoolError::Connect(ConnectError::Unsent(e.into_error())))
                        }
                        (None, _) => return Err(PoolError::Request(e.into_error())),
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

    fn lease(&self, worker: usize, conn: H1) -> Lease {
        Lease {
            held: Some((self.inner.clone(), worker, conn)),
        }
    }

    async fn connect_h1(&self) -> Result<H1, PoolError> {
        let t = &self.inner.target;
        let tcp = self.tcp().await?;
        let tx = match &t.tls {
            None => spawn_h1(&t.h1, TokioIo::new(tcp)).await,
            Some((tls, name)) => {
                let stream = self.tls(tls, name, tcp).await?;
                spawn_h1(&t.h1, TokioIo::new(stream)).await
            }
        }
        .map_err(|e| PoolError::Connect(ConnectError::Handshake(e)))?;
        tracing::debug!(authority = %t.authority, "new upstream HTTP/1.1 connection");
        Ok(tx)
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

/// Wait until an idle connection can take a request; false if it closed or took too long.
async fn ready_within(conn: &mut H1, limit: Duration) -> bool {
    matches!(tokio::time::timeout(limit, conn.ready()).await, Ok(Ok(())))
}

/// HTTP/1.1 handshake on `io`, with the connection driven by a task on this runtime.
async fn spawn_h1<T>(builder: &http1::Builder, io: T) -> hyper::Result<H1>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (tx, conn) = builder.handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(tx)
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

/// `scheme://authority/path?q` → `/path?q`, as HTTP/1.1 requests to an origin are sent.
/// Moves the path out rather than copying it.
fn origin_form(uri: &mut Uri) {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return;
    }
    let pq = std::mem::take(uri)
        .into_parts()
        .path_and_query
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *uri = Uri::from(pq);
}

/// `/path?q` → `scheme://authority/path?q`: HTTP/2 requests carry the target's scheme and
/// authority as pseudo-headers.
fn absolute_form(uri: &mut Uri, target: &Target) {
    if uri.scheme().is_some() {
        return;
    }
    let pq = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    match Uri::builder()
        .scheme(target.scheme.clone())
        .authority(target.authority.clone())
        .path_and_query(pq)
        .build()
    {
        Ok(u) => *uri = u,
        // Not expected (all three parts are valid already). The URI is left as it was, and
        // hyper refuses to send an HTTP/2 request without a scheme: an error, never a
        // request to some other path.
        Err(e) => tracing::error!(error = %e, "cannot build an HTTP/2 request URI"),
    }
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
    send::<Lease>();
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
        fn is_closed(&self) -> bool {
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
        closed.1.set(true);
        l.push(closed, t0, 8);
        assert_eq!(l.len(), 0, "a closed connection is never kept");
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
    fn origin_form_keeps_path_and_query() {
        let mut u: Uri = "http://h:1/openai/x?api-version=1&a=b".parse().unwrap();
        origin_form(&mut u);
        assert_eq!(u, "/openai/x?api-version=1&a=b");
        let mut u: Uri = "https://h".parse().unwrap();
        origin_form(&mut u);
        assert_eq!(u, "/");
    }

    #[test]
    fn absolute_form_adds_the_targets_scheme_and_authority() {
        let pool = pool_for("https://x.example:8443", true);
        let mut u = Uri::from_static("/openai/x?api-version=1&a=b");
        absolute_form(&mut u, &pool.inner.target);
        assert_eq!(u, "https://x.example:8443/openai/x?api-version=1&a=b");
        let mut u = Uri::from_static("http://other:1/y");
        absolute_form(&mut u, &pool.inner.target);
        assert_eq!(u, "http://other:1/y", "an absolute URI is left as it is");
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
        b.body(Full::new(Bytes::from(body))).unwrap()
    }

    /// Read a whole response body, then release its connection as `Relay` does.
    async fn finish(resp: Response<Incoming>, mut lease: Lease) -> Bytes {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        lease.release();
        body
    }

    #[tokio::test]
    async fn keep_alive_connections_are_reused() {
        let sim = SimHandle::start(SimOptions::default()).await.unwrap();
        let pool = pool_for(&sim.url(), false);
        for i in 0..10 {
            let (resp, lease) = pool.send(chat(&sim.url(), i % 2 == 0, None)).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert!(!finish(resp, lease).await.is_empty());
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
        let (resp, lease) = pool.send(chat(&sim.url(), true, None)).await.unwrap();
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        drop(lease);
        assert_eq!(pool.inner.slot(0).idle.len(), 0);
        let (resp, lease) = pool.send(chat(&sim.url(), false, None)).await.unwrap();
        assert_eq!(resp.status(), 200);
        finish(resp, lease).await;
        assert_eq!(get(&sim.counters().connections), 2);
        // And the clean one is reused.
        let (resp, lease) = pool.send(chat(&sim.url(), false, None)).await.unwrap();
        finish(resp, lease).await;
        assert_eq!(get(&sim.counters().connections), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_backend_closed_is_replaced() {
        let sim = SimHandle::start(SimOptions::default()).await.unwrap();
        let addr = sim.addr;
        let url = sim.url();
        let pool = pool_for(&url, false);
        let (resp, lease) = pool.send(chat(&url, false, None)).await.unwrap();
        finish(resp, lease).await;
        assert_eq!(pool.inner.slot(0).idle.len(), 1);
        sim.stop().await;
        let sim = SimHandle::start_on(addr, SimOptions::default())
            .await
            .unwrap();
        let (resp, lease) = pool.send(chat(&url, false, None)).await.unwrap();
        assert_eq!(resp.status(), 200);
        finish(resp, lease).await;
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

        // The backend resets the stream mid-body: the body fails, the lease is dropped.
        let sim = SimHandle::start(SimOptions::default()).await.unwrap();
        let pool = pool_for(&sim.url(), false);
        let (resp, lease) = pool
            .send(chat(&sim.url(), true, Some("reset:2")))
            .await
            .unwrap();
        assert!(resp.into_body().collect().await.is_err());
        drop(lease);
        assert_eq!(pool.inner.slot(0).idle.len(), 0);
    }

    #[tokio::test]
    async fn http2_requests_share_one_connection() {
        let sim = SimHandle::start(SimOptions::default()).await.unwrap();
        let pool = pool_for(&sim.url(), true);
        let sends = (0..8).map(|i| pool.send(chat(&sim.url(), i % 2 == 0, None)));
        for r in futures_util::future::join_all(sends).await {
            let (resp, lease) = r.unwrap();
            assert_eq!(resp.version(), http::Version::HTTP_2);
            finish(resp, lease).await;
        }
        let (resp, lease) = pool.send(chat(&sim.url(), false, None)).await.unwrap();
        finish(resp, lease).await;
        assert!(
            get(&sim.counters().connections) <= 8,
            "concurrent first requests may each connect"
        );
        let before = get(&sim.counters().connections);
        for _ in 0..5 {
            let (resp, lease) = pool.send(chat(&sim.url(), false, None)).await.unwrap();
            finish(resp, lease).await;
        }
        assert_eq!(
            get(&sim.counters().connections),
            before,
            "then one is shared"
        );
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
