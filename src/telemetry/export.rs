//! The span queue and the exporter thread that empties it over OTLP/HTTP.
//!
//! A leaf of [`crate::telemetry`]. A traced request hands over its spans, already encoded
//! ([`super::otlp`]), in one [`Queue::push`]: a mutex held for a `Vec` push, and no wake-up —
//! the exporter sleeps `batch_delay` between exports, and is woken early only when a full
//! batch (512 spans) is waiting. A full queue (`max_queue` spans) drops the request's spans,
//! never slows the request, and says so in the log once until an export works again.
//!
//! The exporter runs on a thread of its own with a current-thread tokio runtime, so no
//! worker's runtime ever runs an export: each batch is one `POST` of an
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

/// Spans sent in one export at most.
const BATCH_SPANS: usize = 512;

/// One request's spans, encoded.
pub(super) struct Encoded {
    pub bytes: Vec<u8>,
    pub spans: usize,
}

#[derive(Default)]
struct Pending {
    requests: Vec<Encoded>,
    spans: usize,
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
    /// Queue a request's spans for export (dropped when the queue is full).
    pub fn push(&self, e: Encoded) {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if p.spans + e.spans > self.max_spans {
            drop(p);
            self.dropped.fetch_add(e.spans as u64, Ordering::Relaxed);
            if !self.overflowed.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    max_queue = self.max_spans,
                    "trace queue full: spans are dropped until the exporter catches up (logged once)"
                );
            }
            return;
        }
        let before = p.spans;
        p.spans += e.spans;
        p.requests.push(e);
        let full_batch = before < BATCH_SPANS && p.spans >= BATCH_SPANS;
        drop(p);
        if full_batch {
            self.wake.notify_one();
        }
    }

    fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner))
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
            pending: Mutex::new(Pending::default()),
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
    loop {
        if !queue.stop.load(Ordering::Acquire) {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = queue.wake.notified() => {}
            }
        }
        let stopping = queue.stop.load(Ordering::Acquire);
        let pending = queue.take();
        let mut rest = pending.requests.as_slice();
        while !rest.is_empty() {
            // Whole requests up to a batch's worth of spans (at least one request).
            let mut n = 0;
            let mut spans = 0;
            while n < rest.len() && (n == 0 || spans + rest[n].spans <= BATCH_SPANS) {
                spans += rest[n].spans;
                n += 1;
            }
            let (batch, later) = rest.split_at(n);
            rest = later;
            let body = envelope.request(batch.iter().map(|e| e.bytes.as_slice()));
            if post.send(body, spans).await {
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
    async fn send(&mut self, body: Vec<u8>, spans: usize) -> bool {
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
