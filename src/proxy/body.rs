//! The response body relayed from a backend to the client.
//!
//! [`Relay`] passes frames through as they arrive — no buffering, no re-chunking, so
//! Server-Sent Events reach the client event by event. It counts bytes, enforces the
//! backend's idle timeout between frames, and when the body ends or is dropped (the client
//! went away) it finishes the request's audit record (and its trace's root span, see
//! [`crate::telemetry`]) exactly once. The upstream body owns
//! its HTTP/1.1 connection: read to its end, it goes back to the pool; dropped earlier, it
//! is closed, which cancels the backend's work (see [`crate::proxy::pool`]).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use crate::account::Meter;
use crate::audit::{AuditRecord, AuditSink};
use crate::error::BoxError;
use crate::metrics::Metrics;
use crate::proxy::pool::ResponseBody;
use std::sync::Arc;

/// The upstream went silent for longer than the backend's idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("backend sent nothing for {0:?}")]
pub struct IdleTimeout(pub Duration);

/// The answer did not end within the backend's `timeouts.total`.
#[derive(Debug, thiserror::Error)]
#[error("the backend's answer did not end within its total timeout")]
pub struct TotalTimeout;

/// Completes a request's audit record (and its accounting) when its body ends.
pub struct Finish {
    pub record: AuditRecord,
    pub started: Instant,
    pub audit: AuditSink,
    pub metrics: Arc<Metrics>,
    /// The request's hold on its client's limits, released when the body ends.
    pub admission: crate::admit::Admission,
    /// Reads the answer's usage and settles the request (see [`crate::account`]).
    pub meter: Option<Meter>,
    /// The request's slot on its backend (`max_concurrent`, in-flight count), released
    /// when the body ends.
    pub lease: Option<crate::routing::health::Lease>,
    /// The request's trace, when it is traced: its root span ends with the record.
    pub trace: Option<Box<crate::telemetry::RequestTrace>>,
}

impl Finish {
    fn done(mut self, bytes_out: u64, outcome: &'static str) {
        self.metrics.streams_in_flight.dec();
        if matches!(outcome, "upstream_error" | "idle_timeout" | "total_timeout") {
            if let Some(backend) = &self.record.backend {
                self.metrics
                    .relay_errors
                    .get_or_create(&crate::metrics::AttemptLabels {
                        backend: backend.clone(),
                        outcome,
                    })
                    .inc();
            }
        }
        self.record.bytes_out = bytes_out;
        self.record.outcome = outcome;
        self.record.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let trace = self.trace.take();
        let mut model = None;
        if let Some(mut m) = self.meter.take() {
            if trace.is_some() {
                model = m.take_response_model();
            }
            m.settle(&mut self.record);
        }
        if let Some(t) = trace {
            t.finish(&self.record, model.as_deref());
        }
        self.audit.emit(self.record);
    }
}

pin_project! {
    /// A response body relayed from upstream; see the module docs.
    pub struct Relay {
        // `None` only once a drop has handed it to the drain task.
        inner: Option<ResponseBody>,
        // Armed only when upstream first makes the client wait: most small bodies never do.
        idle: Option<Pin<Box<Sleep>>>,
        idle_timeout: Duration,
        last_frame: Instant,
        bytes: u64,
        finish: Option<Finish>,
        // An upstream error held back for one poll, so the frames before it are flushed.
        failed: Option<BoxError>,
        // The first frame, when the pipeline found it already read with the head.
        first: Option<Frame<Bytes>>,
        // `timeouts.total`: the answer must have ended by then.
        total: Option<Instant>,
    }

    impl PinnedDrop for Relay {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // A body of known length may be dropped right after its last byte (or never
            // polled at all when it is empty): that is still a clean end.
            let ended = this.first.is_none() && this.inner.as_ref().is_none_or(|b| b.is_end_stream());
            let Some(mut f) = this.finish.take() else {
                return;
            };
            if ended {
                f.done(*this.bytes, "complete");
                return;
            }
            let awaits = f.meter.as_ref().is_some_and(Meter::awaits_usage);
            let runtime = tokio::runtime::Handle::try_current();
            match (awaits, this.inner.take(), runtime) {
                (true, Some(body), Ok(rt)) => {
                    // The client went away: read on for the usage, so the charge is exact.
                    f.admission = Default::default();
                    let (bytes, idle) = (*this.bytes, *this.idle_timeout);
                    let first = this.first.take();
                    rt.spawn(drain(body, first, f, bytes, idle));
                }
                _ => f.done(*this.bytes, "client_disconnected"),
            }
        }
    }
}

/// After a client disconnect: read the rest of the answer (bounded by
/// [`crate::account::DRAIN_BYTES`], [`crate::account::DRAIN_TIME`] and the idle timeout)
/// until its usage is seen, then finish the request.
async fn drain(
    mut body: ResponseBody,
    first: Option<Frame<Bytes>>,
    mut finish: Finish,
    bytes_out: u64,
    idle: Duration,
) {
    use http_body_util::BodyExt;
    let deadline = tokio::time::Instant::now() + crate::account::DRAIN_TIME;
    let mut read = 0u64;
    let mut next = first;
    while let Some(meter) = finish.meter.as_mut() {
        if !meter.awaits_usage() || read > crate::account::DRAIN_BYTES {
            break;
        }
        let frame = match next.take() {
            Some(f) => f,
            None => {
                let wait =
                    idle.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                match tokio::time::timeout(wait, body.frame()).await {
                    Ok(Some(Ok(f))) => f,
                    _ => break,
                }
            }
        };
        if let Ok(data) = frame.into_data() {
            read += data.len() as u64;
            meter.feed(data);
        }
    }
    finish.done(bytes_out, "client_disconnected");
}

impl Relay {
    /// Wrap an upstream body. `finish` is completed when the body ends; `first` is a frame
    /// already taken from `inner` (see [`ResponseBody::take_buffered`]), relayed first.
    pub fn new(
        inner: ResponseBody,
        idle_timeout: Duration,
        finish: Finish,
        first: Option<Frame<Bytes>>,
    ) -> Self {
        finish.metrics.streams_in_flight.inc();
        let now = Instant::now();
        Self {
            inner: Some(inner),
            idle: None,
            idle_timeout,
            last_frame: now,
            bytes: 0,
            finish: Some(finish),
            failed: None,
            first,
            total: None,
        }
    }

    /// End the relay with an error if the answer has not ended by `deadline`
    /// (`timeouts.total`).
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.total = deadline;
        self
    }
}

/// `a` then `b`, copying only when both have bytes.
fn join(a: Bytes, b: Bytes) -> Bytes {
    if a.is_empty() {
        return b;
    }
    if b.is_empty() {
        return a;
    }
    let mut v = Vec::with_capacity(a.len() + b.len());
    v.extend_from_slice(&a);
    v.extend_from_slice(&b);
    Bytes::from(v)
}

impl HttpBody for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        loop {
            let polled = match this.first.take() {
                Some(frame) => Poll::Ready(Some(Ok(frame))),
                None => Pin::new(&mut *inner).poll_frame(cx),
            };
            match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    let end = inner.is_end_stream();
                    let frame = match frame.into_data() {
                        Ok(mut data) => {
                            if let Some(m) = this.finish.as_mut().and_then(|f| f.meter.as_mut()) {
                                data = m.feed(data);
                                if end {
                                    data = join(data, m.flush());
                                }
                            }
                            if data.is_empty() && !end {
                                // All of it was a usage chunk the client did not ask for.
                                continue;
                            }
                            *this.bytes += data.len() as u64;
                            Frame::data(data)
                        }
                        Err(frame) => frame,
                    };
                    // Cheap per-frame bookkeeping; the timer is only re-armed when it fires.
                    *this.last_frame = Instant::now();
                    if end {
                        if let Some(f) = this.finish.take() {
                            f.done(*this.bytes, "complete");
                        }
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(f) = this.finish.take() {
                        f.done(*this.bytes, "upstream_error");
                    }
                    if *this.bytes > 0 {
                        // The server aborts the response on an error, dropping whatever it has
                        // not written yet: when the upstream fails right after some frames, the
                        // client would lose those (and even the head). One `Pending` first gives
                        // the server a flush (HTTP/1.1: the dispatcher flushes between polls);
                        // the error follows on the next poll. Best effort: what does not fit in
                        // the socket's buffer by then is still lost, and an HTTP/2 stream's reset
                        // may overtake DATA frames still queued.
                        *this.failed = Some(e);
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    if let Some(mut f) = this.finish.take() {
                        let rest = f.meter.as_mut().map(Meter::flush).unwrap_or_default();
                        *this.bytes += rest.len() as u64;
                        f.done(*this.bytes, "complete");
                        if !rest.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(rest))));
                        }
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => break,
            }
        }
        let total = *this.total;
        let due = |last: Instant| {
            let idle = last + *this.idle_timeout;
            total.map_or(idle, |t| t.min(idle))
        };
        let deadline = due(*this.last_frame);
        let idle = this
            .idle
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        loop {
            if idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if total.is_some_and(|t| now >= t) {
                if let Some(f) = this.finish.take() {
                    f.done(*this.bytes, "total_timeout");
                }
                return Poll::Ready(Some(Err(Box::new(TotalTimeout))));
            }
            let deadline = due(*this.last_frame);
            if now < deadline {
                idle.as_mut().reset(deadline.into());
                continue;
            }
            if let Some(f) = this.finish.take() {
                f.done(*this.bytes, "idle_timeout");
            }
            return Poll::Ready(Some(Err(Box::new(IdleTimeout(*this.idle_timeout)))));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self
            .finish
            .as_ref()
            .and_then(|f| f.meter.as_ref())
            .is_some_and(Meter::rewrites)
        {
            return SizeHint::default();
        }
        let inner = self
            .inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_default();
        let Some(held) = self.first.as_ref().and_then(Frame::data_ref) else {
            return inner;
        };
        // The frame taken ahead is part of the body still to come.
        let n = held.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + n);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + n);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use http::{HeaderValue, Method};
    use http_body_util::BodyExt;

    use super::*;
    use crate::proxy::pool::tests::{chat, pool_for};
    use crate::sim::{SimHandle, SimOptions};

    fn finish(dir: &tempfile::TempDir) -> Finish {
        let metrics = Arc::new(Metrics::new());
        let path = dir.path().join("audit.log");
        let (audit, _writer) = AuditSink::start(&path.to_string_lossy(), metrics.clone()).unwrap();
        Finish {
            admission: Default::default(),
            meter: None,
            lease: None,
            trace: None,
            record: AuditRecord::new(HeaderValue::from_static("t"), Method::POST, "/".into()),
            started: Instant::now(),
            audit,
            metrics,
        }
    }

    #[tokio::test]
    async fn relay_returns_the_connection_only_after_a_clean_end() {
        let dir = tempfile::tempdir().unwrap();
        let sim = SimHandle::start(SimOptions {
            token_latency: Duration::from_millis(20),
            ..SimOptions::default()
        })
        .await
        .unwrap();
        let pool = pool_for(&sim.url(), false);
        let idle = Duration::from_secs(5);

        // Read to the end (streamed and not): the connection goes back.
        for stream in [true, false] {
            let resp = pool.send(chat(&sim.url(), stream, None)).await.unwrap();
            let relay = Relay::new(resp.into_body(), idle, finish(&dir), None);
            relay.collect().await.unwrap();
            assert_eq!(pool.idle_count(0), 1, "stream = {stream}");
        }

        // Dropped after the first event (the client went away): it does not.
        let resp = pool.send(chat(&sim.url(), true, None)).await.unwrap();
        assert_eq!(pool.idle_count(0), 0, "the idle one is in use");
        let mut relay = Relay::new(resp.into_body(), idle, finish(&dir), None);
        relay.frame().await.unwrap().unwrap();
        drop(relay);
        assert_eq!(pool.idle_count(0), 0);

        // A body that failed midway: not either.
        let resp = pool
            .send(chat(&sim.url(), true, Some("reset:2")))
            .await
            .unwrap();
        let relay = Relay::new(resp.into_body(), idle, finish(&dir), None);
        assert!(relay.collect().await.is_err());
        assert_eq!(pool.idle_count(0), 0);
    }
}
