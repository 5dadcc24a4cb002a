//! Audit: one JSON line per request, written off the request path.
//!
//! The request task hands an [`AuditRecord`] to a bounded channel; a background task
//! serialises and writes it (stdout or an append-only file). If the writer falls behind,
//! records are dropped and counted (`portcullis_audit_dropped_total`) rather than slowing
//! requests. A record names the request, route, backend and outcome — never a credential,
//! header value or prompt text.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// What happened to one request.
#[derive(Debug, Clone, Serialize, Default)]
pub struct AuditRecord {
    /// RFC 3339 time the request arrived.
    pub time: String,
    pub request_id: String,
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub operation: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// How the gateway authenticated to the backend (`api_key`, `none`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_auth: Option<&'static str>,
    pub status: u16,
    /// Backends tried (more than one after a failover).
    pub attempts: u32,
    /// Milliseconds until the response head was ready.
    pub latency_ms: f64,
    /// Milliseconds until the response body ended (or was abandoned).
    pub duration_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub stream: bool,
    /// `complete`, `client_disconnected`, `upstream_error`, `idle_timeout`, or `refused`.
    pub outcome: &'static str,
    /// The gateway's error code when the gateway answered with an error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_code: Option<&'static str>,
}

/// Handle used by request tasks to emit records. Cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<AuditRecord>,
    metrics: Arc<Metrics>,
}

/// Capacity of the queue between request tasks and the writer.
const QUEUE: usize = 65_536;

impl AuditSink {
    /// Start the writer for `path` (`-` = stdout). Returns the sink and the writer task,
    /// which ends after every sink is dropped and the queue is flushed.
    pub async fn start(
        path: &str,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Self, tokio::task::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let out: Box<dyn AsyncWrite + Send + Unpin> = if path == "-" {
            Box::new(tokio::io::stdout())
        } else {
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(PathBuf::from(path))
                .await?;
            Box::new(file)
        };
        let task = tokio::spawn(write_loop(rx, out));
        Ok((Self { tx, metrics }, task))
    }

    /// Queue a record; never waits.
    pub fn emit(&self, record: AuditRecord) {
        if self.tx.try_send(record).is_err() {
            self.metrics.audit_dropped.inc();
        }
    }
}

async fn write_loop(mut rx: mpsc::Receiver<AuditRecord>, out: Box<dyn AsyncWrite + Send + Unpin>) {
    let mut out = BufWriter::new(out);
    let mut line = Vec::with_capacity(512);
    while let Some(rec) = rx.recv().await {
        let mut next = Some(rec);
        while let Some(rec) = next {
            line.clear();
            if serde_json::to_writer(&mut line, &rec).is_ok() {
                line.push(b'\n');
                if let Err(e) = out.write_all(&line).await {
                    tracing::error!(error = %e, "audit write failed");
                }
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = out.flush().await {
            tracing::error!(error = %e, "audit flush failed");
        }
    }
    let _ = out.flush().await;
}

/// Current time as RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
