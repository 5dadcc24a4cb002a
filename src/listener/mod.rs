//! Listener: the accept loop shared by the gateway, the admin endpoint and the simulator.
//!
//! HTTP/1.1 and h2c on one port (told apart by peeking at the first bytes, see `sniff`;
//! hyper-util `auto` when they do not tell yet), TCP_NODELAY on every accepted
//! socket, a header timeout against slow clients and idle connections (`watchdog`: one timer
//! per connection rather than one per request; an idle HTTP/1.1 connection is closed, an idle
//! HTTP/2 connection gets GOAWAY), and graceful shutdown: when the shutdown future resolves
//! the listener closes, idle connections close, and in-flight requests (including long
//! streams) get up to `drain_timeout` to finish.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::Body;

mod watchdog;
use watchdog::{poll_outside_budget, Activity, Answering, Counted, Watchdog, Watched};

/// Listener settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Time a client has to send a complete request head, after connecting or after its
    /// previous answer ended (enforced by the `watchdog` module).
    pub header_timeout: Duration,
    /// Time in-flight requests get after shutdown begins.
    pub drain_timeout: Duration,
    /// TLS (and client certificates) on this listener: every connection's handshake must
    /// complete within `header_timeout`.
    pub tls: Option<Arc<crate::tls::server::ServerTls>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// Serve `service` on `listener` until `shutdown` resolves, then drain. The service is
/// given each request and the address of the peer that sent it.
pub async fn serve<S, F>(
    listener: TcpListener,
    service: S,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) where
    S: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_with(listener, service, opts, shutdown, || {}).await;
}

/// [`serve`], calling `on_accept` for every accepted connection (the simulator counts them).
pub async fn serve_with<S, F>(
    listener: TcpListener,
    service: S,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
    mut on_accept: impl FnMut(),
) where
    S: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No hyper header-read timer: it costs a timer registration per request. The
    // connection's `Watchdog` enforces `header_timeout` instead, with one timer per connection.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builders = Arc::new(Builders {
        http1: builder.clone().http1_only(),
        http2: builder.clone().http2_only(),
        auto: builder,
    });
    // Shutdown, as each connection's task sees it: the flag, read on every poll (an atomic
    // load), and a watch channel whose change wakes the task and whose sender's `closed()`
    // tells when the last connection has ended (every task holds a receiver).
    let stop_flag = Arc::new(AtomicBool::new(false));
    let (stop, stopping) = watch::channel(());
    // The acceptor, and the verifier connections' certificates are checked by.
    let tls = opts
        .tls
        .as_ref()
        .and_then(|t| t.acceptor().map(|a| Arc::new((a, t.verifier().cloned()))));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        on_accept();
        let _ = stream.set_nodelay(true);
        let svc = service.clone();
        let stop_rx = stopping.clone();
        let stop_flag = stop_flag.clone();
        let builders = builders.clone();
        let header_timeout = opts.header_timeout;
        let acceptor = tls.clone();
        tokio::spawn(async move {
            let mut stop_rx = stop_rx;
            let (io, builder, cert) = match acceptor.as_deref() {
                // The protocol, from the first bytes peeked (not read): see `sniff`. A client
                // that sends nothing within the header timeout, or before shutdown, is closed.
                None => {
                    let sniffed = tokio::select! {
                        s = tokio::time::timeout(header_timeout, sniff(&stream)) => s.ok().flatten(),
                        _ = stop_rx.changed() => None,
                    };
                    let builder = match sniffed {
                        None => return,
                        Some(Sniffed::Http1) => &builders.http1,
                        Some(Sniffed::Http2) => &builders.http2,
                        Some(Sniffed::Unsure) => &builders.auto,
                    };
                    (Stream::Plain(stream), builder, None)
                }
                // The handshake within the header timeout; the protocol from ALPN.
                Some((acceptor, verifier)) => {
                    // Read before the handshake: a CA/CRL reload during it makes the first
                    // request verify the certificate again.
                    let generation = verifier.as_ref().map_or(0, |v| v.generation());
                    let accepted = tokio::select! {
                        s = tokio::time::timeout(header_timeout, acceptor.accept(stream)) => s,
                        _ = stop_rx.changed() => return,
                    };
                    let tls = match accepted {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            // A certificate the verifier refused was counted by it; one
                            // `client_auth = "required"` missed is counted here.
                            let missing = e
                                .get_ref()
                                .and_then(|i| i.downcast_ref::<rustls::Error>())
                                .is_some_and(|r| {
                                    matches!(r, rustls::Error::NoCertificatesPresented)
                                });
                            if let (true, Some(v)) = (missing, verifier) {
                                v.count_reason("missing");
                            }
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(peer = %peer, "TLS handshake not completed within the header timeout");
                            return;
                        }
                    };
                    let conn = tls.get_ref().1;
                    let builder = if conn.alpn_protocol() == Some(b"h2") {
                        &builders.http2
                    } else {
                        &builders.http1
                    };
                    let cert = crate::tls::ClientCert::of(conn, generation);
                    (Stream::Tls(Box::new(tls)), builder, cert)
                }
            };
            let activity = Arc::new(Activity::default());
            let seen = activity.clone();
            let hyper_svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                if req.version() == http::Version::HTTP_2 {
                    seen.http2.store(true, Ordering::Relaxed);
                }
                if let Some(c) = &cert {
                    req.extensions_mut().insert(c.clone());
                }
                let answering = Answering::new(&seen);
                // Boxed on its own: hyper keeps the allocation of the future it is given for
                // the connection's life, and the pipeline's future is large (KiBs) while it is
                // done as soon as the answer's head is ready. This way a connection streaming
                // an answer holds only this small wrapper's, and the pipeline's is freed (then
                // reused by the thread's next request).
                let fut = Box::pin(svc(req, peer));
                async move { Ok::<_, Infallible>(fut.await.map(|body| Watched::new(body, answering))) }
            });
            let mut watchdog = Watchdog::new(activity.clone(), header_timeout);
            let io = Counted {
                io: TokioIo::new(io),
                activity,
            };
            let conn = builder.serve_connection(io, hyper_svc).into_owned();
            drop(builders);
            tokio::pin!(conn);
            // Polled once (outside the coop budget, so it does register), which leaves this
            // task's waker (the same for the task's whole life) with the channel; after that
            // the flag says when it has fired. Polling the channel on every wake-up would cost
            // a lock each time.
            let woken_at_stop = stop_rx.changed();
            tokio::pin!(woken_at_stop);
            let mut registered = false;
            // Set once hyper has been told to wind the connection down (shutdown, or an idle
            // HTTP/2 connection): it then ends by itself when its requests have been answered.
            let mut going_away = false;
            let result = std::future::poll_fn(|cx| loop {
                if !registered {
                    registered = true;
                    let _ = poll_outside_budget(woken_at_stop.as_mut(), cx);
                }
                if !going_away && stop_flag.load(Ordering::Acquire) {
                    going_away = true;
                    conn.as_mut().graceful_shutdown();
                }
                if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                if (going_away && watchdog.is_http2()) || !watchdog.expired(cx) {
                    return Poll::Pending;
                }
                if !watchdog.is_http2() {
                    return Poll::Ready(None);
                }
                // After GOAWAY hyper closes the connection once the client has acknowledged it
                // (or its keep-alive ping times out, for a client that stopped reading).
                tracing::debug!("sending GOAWAY to an idle HTTP/2 connection");
                going_away = true;
                conn.as_mut().graceful_shutdown();
            })
            .await;
            let Some(result) = result else {
                tracing::debug!("closing a connection that sent no complete request in time");
                return;
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    drop(stopping);
    let open = stop.receiver_count();
    stop_flag.store(true, Ordering::Release);
    let _ = stop.send(());
    tokio::select! {
        () = stop.closed() => {
            tracing::info!(connections = open, "all connections drained");
        }
        () = tokio::time::sleep(opts.drain_timeout) => {
            tracing::warn!(timeout = ?opts.drain_timeout, "drain timeout reached; closing remaining connections");
        }
    }
}

/// A client connection, plain or TLS (an enum rather than a trait object: one branch per
/// read or write, no allocation for plain connections).
enum Stream {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connection builders: by protocol, and `auto` (hyper-util's own detection) for when
/// the first bytes do not tell.
struct Builders {
    http1: auto::Builder<TokioExecutor>,
    http2: auto::Builder<TokioExecutor>,
    auto: auto::Builder<TokioExecutor>,
}

/// What a connection's first bytes say it speaks.
enum Sniffed {
    Http1,
    /// The h2c prior-knowledge preface.
    Http2,
    /// A strict prefix of the preface so far.
    Unsure,
}

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Peek at the first bytes of a connection (`None`: closed, or failed, before any).
///
/// Peeked rather than read, so hyper reads the request itself from the start. hyper-util's
/// `auto` detection instead hands hyper the bytes it read first as a read of their own, and
/// hyper's HTTP/1.1 read buffer then grows from 8 to 16 KiB on the connection's second read,
/// for the connection's life: 8 KiB more resident per open stream.
async fn sniff(stream: &tokio::net::TcpStream) -> Option<Sniffed> {
    let mut first = [0u8; H2_PREFACE.len()];
    let n = stream.peek(&mut first).await.ok()?;
    let seen = &first[..n];
    Some(if n == 0 {
        return None;
    } else if !H2_PREFACE.starts_with(seen) {
        Sniffed::Http1
    } else if n == H2_PREFACE.len() {
        Sniffed::Http2
    } else {
        Sniffed::Unsure
    })
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
