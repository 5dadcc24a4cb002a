//! The span queue and the exporter thread that empties it over OTLP/HTTP.
//!
//! A leaf of [`crate::telemetry`]. A traced request hands over its spans, already encoded
//! ([`super::otlp`]), in one [`Queue::push`]: a mutex held while they are appended to the
//! batch being gathered, and no wake-up — the exporter sleeps `batch_delay` between exports,
//! and is woken early only when 512 spans are waiting. A full queue (`max_queue` spans) drops
//! the request's spans, never slows the request, and says so in the log once until an export
//! works again.
//!
//! The exporter runs on a thread of its own with a current-thread tokio runtime, so no
//! worker's runtime ever runs an export: each batch — everything gathered since the last, at
//! most `max_queue` spans — is one `POST` of an
//! `ExportTraceServiceRequest` (`application/x-protobuf`) with the configured headers,
//! through a rustls `reqwest` client. A batch the collector refuses, or that cannot be sent
//! within `timeout`, is dropped (OTLP's partial-success answers are not read); failures and
//! the recovery after them are logged once each, never a header value. Stopping
//! ([`Exporter::shutdown`], or dropping the last handle) exports what is queued, then ends
//! the thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use super::otlp::Envelope;
use super::TelemetryError;
use crate::config::telemetry::TelemetrySettings;

/// Spans waiting that wake the exporter before `batch_delay` is up.
const WAKE_SPANS: usize = 512;

/// The batch being gathered: room for the envelope ([`Envelope::headroom`]), then
/// `ScopeSpans.spans` entries, one after the other.
struct Pending {
    bytes: Vec<u8>,
    spans: usize,
}

impl Pending {
    /// An empty batch with room for `capacity` bytes of spans (the last batch's size, so a
    /// steady load never grows the buffer while a worker holds the lock).
    fn new(headroom: usize, capacity: usize) -> Self {
        let mut bytes = Vec::with_capacity(headroom + capacity);
        bytes.resize(headroom, 0);
        Self { bytes, spans: 0 }
    }
}

/// What the request path and the exporter thread share.
pub(super) struct Queue {
    pending: Mutex<Pending>,
    max_spans: usize,
    wake: Notify,
    stop: AtomicBool,
    /// The queue was found full since the last successful export (logged once).
    overflowed: AtomicBool,
    dropped: AtomicU64,
}

impl Queue {
    /// Queue a request's encoded spans for export (dropped when the queue is full).
    pub fn push(&self, bytes: &[u8], spans: usize) {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if p.spans + spans > self.max_spans {
            drop(p);
            self.dropped.fetch_add(spans as u64, Ordering::Relaxed);
            if !self.overflowed.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max_queue = self.max_spans,
                    "trace queue full: spans are dropped until the exporter catches up (logged once)"
                );
            }
            return;
        }
        let before = p.spans;
        p.spans += spans;
        p.bytes.extend_from_slice(bytes);
        let wake = before < WAKE_SPANS && p.spans >= WAKE_SPANS;
        drop(p);
        if wake {
            self.wake.notify_one();
        }
    }

    /// The batch gathered so far; `next` gathers the next one.
    fn take(&self, next: Pending) -> Pending {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *p, next)
    }
}

/// The exporter thread and its queue; stopping it (or dropping it) exports what is queued.
pub(super) struct Exporter {
    pub queue: Arc<Queue>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Exporter {
    pub fn start(s: &TelemetrySettings, envelope: Envelope) -> Result<Self, TelemetryError> {
        let client = reqwest::Client::builder()
            .timeout(s.timeout)
            .no_proxy()
            .build()
            .map_err(|e| TelemetryError(format!("HTTP client: {e}")))?;
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-protobuf"),
        );
        for (name, value) in &s.headers {
            // Checked by `validate`; the error never quotes the value.
            let mut v = http::HeaderValue::from_str(value.expose())
                .map_err(|_| TelemetryError(format!("header {name}: not a valid value")))?;
            v.set_sensitive(true);
            headers.insert(name.clone(), v);
        }
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending::new(envelope.headroom(), 0)),
            max_spans: s.max_queue,
            wake: Notify::new(),
            stop: AtomicBool::new(false),
            overflowed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TelemetryError(format!("exporter runtime: {e}")))?;
        let post = Post {
            client,
            url: s.endpoint.clone(),
            headers,
            failing: false,
        };
        let q = queue.clone();
        let delay = s.batch_delay;
        let thread = std::thread::Builder::new()
            .name("portcullis-traces".into())
            .spawn(move || runtime.block_on(run(q, post, envelope, delay)))
            .map_err(|e| TelemetryError(format!("exporter thread: {e}")))?;
        Ok(Self {
            queue,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Export what is queued and end the thread (waits for the last export, which takes
    /// `timeout` at most).
    pub async fn shutdown(&self) {
        self.stop();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            if tokio::task::spawn_blocking(move || t.join()).await.is_err() {
                tracing::warn!("could not export the last traces");
            }
        }
    }

    fn stop(&self) {
        self.queue.stop.store(true, Ordering::Release);
        self.queue.wake.notify_one();
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn run(queue: Arc<Queue>, mut post: Post, envelope: Envelope, delay: Duration) {
    let room = envelope.headroom();
    let mut last = 0;
    loop {
        if !queue.stop.load(Ordering::Acquire) {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = queue.wake.notified() => {}
            }
        }
        let stopping = queue.stop.load(Ordering::Acquire);
        // The next buffer is allocated here, off the request path.
        let batch = queue.take(Pending::new(room, last));
        last = batch.bytes.len() - room;
        if batch.spans > 0 {
            let spans = batch.spans;
            if post.send(envelope.seal(batch.bytes), spans).await {
                queue.overflowed.store(false, Ordering::Relaxed);
            }
        }
        if stopping {
            let dropped = queue.dropped.load(Ordering::Relaxed);
            if dropped > 0 {
                tracing::info!(dropped, "trace spans dropped since start (queue full)");
            }
            return;
        }
    }
}

/// The collector's endpoint and how to reach it.
struct Post {
    client: reqwest::Client,
    url: String,
    headers: http::HeaderMap,
    /// The last export failed (logged once until one works).
    failing: bool,
}

impl Post {
    /// Send one export; whether the collector took it.
    async fn send(&mut self, body: bytes::Bytes, spans: usize) -> bool {
        let sent = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .body(body)
            .send()
            .await;
        // The error names the endpoint's answer or the connection's failure, never a
        // header value.
        let failure = match sent {
            Ok(r) if r.status().is_success() => {
                // Read to the end, so the connection is kept for the next export.
                let _ = r.bytes().await;
                None
            }
            Ok(r) => Some(format!("the collector answered {}", r.status())),
            Err(e) => Some(crate::proxy::error_chain(&e.without_url())),
        };
        match failure {
            None => {
                if std::mem::take(&mut self.failing) {
                    tracing::info!("trace export works again");
                }
                true
            }
            Some(error) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(%error, spans, url = %self.url, "trace export failed; the spans are dropped (logged once until exports work again)");
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    fn queue(max_spans: usize) -> Queue {
        Queue {
            pending: Mutex::new(Pending::new(4, 0)),
            max_spans,
            wake: Notify::new(),
            stop: AtomicBool::new(false),
            overflowed: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        }
    }

    #[test]
    fn a_full_queue_drops_whole_requests_and_counts_them() {
        let q = queue(10);
        q.push(b"aaaa", 4);
        q.push(b"bbbb", 4);
        q.push(b"cccc", 4); // 12 > 10: dropped, not cut
        q.push(b"dd", 2);
        let p = q.take(Pending::new(4, 0));
        assert_eq!(p.spans, 10);
        assert_eq!(
            &p.bytes[4..],
            b"aaaabbbbdd",
            "room for the envelope, then the spans"
        );
        assert_eq!(q.dropped.load(Ordering::Relaxed), 4);
        assert!(q.overflowed.load(Ordering::Relaxed));
        assert_eq!(q.take(Pending::new(4, 0)).spans, 0, "taken means emptied");
    }

    #[test]
    fn the_exporter_is_woken_once_a_batch_is_waiting_and_not_before() {
        let q = queue(10_000);
        for _ in 0..(WAKE_SPANS / 4 - 1) {
            q.push(b"x", 4);
        }
        assert!(
            q.wake.notified().now_or_never().is_none(),
            "508 spans: no wake-up"
        );
        q.push(b"x", 4);
        assert!(
            q.wake.notified().now_or_never().is_some(),
            "512 spans: woken"
        );
        q.push(b"x", 4);
        assert!(
            q.wake.notified().now_or_never().is_none(),
            "one wake-up per batch, not one per request"
        );
    }
}
