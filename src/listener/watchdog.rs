//! The header timeout, kept per connection: a [`Watchdog`] tells when a connection has sent no
//! complete request head within `header_timeout` of connecting or of its last answer, with one
//! timer per connection. What it watches: requests being answered ([`Answering`], held by the
//! response body until hyper drops it, see [`Watched`]) and writes to the client ([`Counted`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper_util::rt::TokioIo;

use crate::error::{Body, BoxError};

/// What a connection's [`Watchdog`] knows of it: how many requests are being answered, counts
/// of request starts and ends and of writes (progress), and whether it turned out to be
/// HTTP/2.
#[derive(Default)]
pub(super) struct Activity {
    busy: AtomicU32,
    events: AtomicU32,
    writes: AtomicU32,
    pub(super) http2: AtomicBool,
}

/// Held from the moment a request's head has arrived until its response body is done (sent,
/// or dropped when the client went away).
pub(super) struct Answering(Arc<Activity>);

impl Answering {
    pub(super) fn new(activity: &Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::Relaxed);
        activity.events.fetch_add(1, Ordering::Relaxed);
        Self(activity.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.events.fetch_add(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its connection marked busy until it is dropped.
pub(super) struct Watched {
    inner: Body,
    _answering: Answering,
}

impl Watched {
    pub(super) fn new(inner: Body, answering: Answering) -> Self {
        Self {
            inner,
            _answering: answering,
        }
    }
}

impl http_body::Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Ticks per `header_timeout`: a connection is closed after this many quiet ticks in a row.
const QUIET_TICKS: u32 = 4;

/// Tells when a connection has not sent a complete request head within `header_timeout` of
/// being accepted or of its last response ending: a half-sent head (slowloris), an idle
/// keep-alive connection, an HTTP/2 preface with no request, or an HTTP/2 connection with no
/// stream open. A connection with a request in progress (however long its answer streams)
/// never expires. The listener closes an expired HTTP/1.1 connection and sends an expired
/// HTTP/2 connection GOAWAY (hyper then closes it once any stream still open has ended).
///
/// One timer per connection, ticking every quarter of `header_timeout`, instead of the timer
/// per request hyper's own header-read timeout arms. A tick is quiet when no request is being
/// answered and none started or ended since the tick before, and, on HTTP/1.1, nothing was
/// written to the client either (reads never count: a client dribbling a head is not
/// progress). After [`QUIET_TICKS`] quiet ticks the connection has expired: between 1 and
/// 1.25 `header_timeout` after it went quiet, never sooner. On HTTP/2 writes do not count,
/// because hyper's keep-alive pings are writes; a stream still flushing its last frames is
/// safe there because GOAWAY lets it finish. Before a connection's first request writes do
/// not count either (nothing an HTTP/1.1 client is sent then is an answer; an h2c client is
/// sent its handshake and pings), so an h2c preface with no request is dropped when quiet
/// like any connection that sends no request, whatever `header_timeout` is.
pub(super) struct Watchdog {
    activity: Arc<Activity>,
    tick: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    seen: u32,
    quiet: u32,
}

impl Watchdog {
    pub(super) fn new(activity: Arc<Activity>, header_timeout: Duration) -> Self {
        let tick = (header_timeout / QUIET_TICKS).max(Duration::from_millis(1));
        Self {
            activity,
            tick,
            sleep: Box::pin(tokio::time::sleep(tick)),
            armed: false,
            seen: 0,
            quiet: 0,
        }
    }

    /// Whether the connection turned out to be HTTP/2 (known from its first request).
    pub(super) fn is_http2(&self) -> bool {
        self.activity.http2.load(Ordering::Relaxed)
    }

    /// Whether the connection has expired (see above). Called on every wake-up of the
    /// connection's task: between ticks this is a check of the timer's state, no clock read.
    pub(super) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let sleep = &mut self.sleep;
        if !self.armed {
            self.armed = true;
            if poll_outside_budget(sleep.as_mut(), cx).is_pending() {
                return false;
            }
        } else if !sleep.is_elapsed() {
            return false;
        }
        loop {
            // Writes are progress only on HTTP/1.1 once a request has come: before that, what
            // a connection is sent is an h2c handshake or hyper's pings, not an answer's tail.
            let mut events = self.activity.events.load(Ordering::Relaxed);
            if events != 0 && !self.activity.http2.load(Ordering::Relaxed) {
                events = events.wrapping_add(self.activity.writes.load(Ordering::Relaxed));
            }
            if self.activity.busy.load(Ordering::Relaxed) > 0 || events != self.seen {
                self.seen = events;
                self.quiet = 0;
            } else {
                self.quiet += 1;
                if self.quiet >= QUIET_TICKS {
                    return true;
                }
            }
            sleep
                .as_mut()
                .reset(tokio::time::Instant::now() + self.tick);
            // Polled once so the timer holds this task's waker.
            if poll_outside_budget(sleep.as_mut(), cx).is_pending() {
                return false;
            }
        }
    }
}

/// Poll `fut` outside tokio's cooperative budget, for a future that must register this
/// task's waker whenever it is polled (the watchdog's timer, the shutdown wake-up): one
/// polled on a task that used up its budget would otherwise get `Pending` without
/// registering (or, for a timer's first poll, without the timer being created at all), and
/// the wake-up would never come.
pub(super) fn poll_outside_budget<F: Future + ?Sized>(
    fut: Pin<&mut F>,
    cx: &mut Context<'_>,
) -> Poll<F::Output> {
    Pin::new(&mut tokio::task::coop::unconstrained(fut)).poll(cx)
}

/// The client socket as hyper sees it, counting every write as progress for the
/// [`Watchdog`]: hyper drops a response body once it has its last frame, which may still be
/// in hyper's write buffer. A client still reading that tail is not idle; one that reads
/// nothing for a whole `header_timeout` after its answer's last frame is cut off like any
/// other quiet connection.
pub(super) struct Counted<IO> {
    pub(super) io: TokioIo<IO>,
    pub(super) activity: Arc<Activity>,
}

impl<IO> Counted<IO> {
    fn wrote(&self, n: &Poll<std::io::Result<usize>>) {
        if matches!(n, Poll::Ready(Ok(n)) if *n > 0) {
            self.activity.writes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> hyper::rt::Read for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> hyper::rt::Write for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(&n);
        n
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let n = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(&n);
        n
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(400);

    /// Wake the watchdog every half tick, calling `each` before every check, until it has
    /// expired (`Some(when)`, from the start) or `limit` has passed (`None`).
    async fn run(dog: &mut Watchdog, limit: Duration, each: impl Fn()) -> Option<Duration> {
        let start = tokio::time::Instant::now();
        while start.elapsed() < limit {
            each();
            if std::future::poll_fn(|cx| Poll::Ready(dog.expired(cx))).await {
                return Some(start.elapsed());
            }
            tokio::time::sleep(TIMEOUT / QUIET_TICKS / 2).await;
        }
        None
    }

    fn answered_one(activity: &Arc<Activity>) {
        drop(Answering::new(activity));
    }

    #[tokio::test(start_paused = true)]
    async fn writes_keep_only_an_http1_connection_with_answers_open() {
        let write = |a: &Arc<Activity>| {
            a.writes.fetch_add(1, Ordering::Relaxed);
        };
        let in_time = |waited: Option<Duration>| {
            let waited = waited.expect("never expired");
            assert!(waited >= TIMEOUT, "expired early: {waited:?}");
            assert!(waited <= TIMEOUT * 3 / 2, "expired late: {waited:?}");
        };
        // Before any request, being written to (an h2c handshake, keep-alive pings) is not
        // progress: the connection expires as if silent.
        let fresh = Arc::new(Activity::default());
        let mut dog = Watchdog::new(fresh.clone(), TIMEOUT);
        in_time(run(&mut dog, TIMEOUT * 4, || write(&fresh)).await);
        // HTTP/2 after a request: pings are writes, and still not progress.
        let h2 = Arc::new(Activity::default());
        h2.http2.store(true, Ordering::Relaxed);
        answered_one(&h2);
        let mut dog = Watchdog::new(h2.clone(), TIMEOUT);
        in_time(run(&mut dog, TIMEOUT * 4, || write(&h2)).await);
        // HTTP/1.1 after an answer: a client still reading its tail keeps the connection
        // open as long as writes go on, and it expires once they stop.
        let h1 = Arc::new(Activity::default());
        answered_one(&h1);
        let mut dog = Watchdog::new(h1.clone(), TIMEOUT);
        assert_eq!(run(&mut dog, TIMEOUT * 3, || write(&h1)).await, None);
        in_time(run(&mut dog, TIMEOUT * 4, || {}).await);
        // A request being answered keeps any connection open, however long it takes.
        let busy = Arc::new(Activity::default());
        let _answering = Answering::new(&busy);
        let mut dog = Watchdog::new(busy.clone(), TIMEOUT);
        assert_eq!(run(&mut dog, TIMEOUT * 5, || {}).await, None);
    }
}
