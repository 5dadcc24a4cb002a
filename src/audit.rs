//! Audit: one JSON line per request, written off the request path.
//!
//! The request task hands an [`AuditRecord`] to a bounded channel; a writer thread drains
//! it every few milliseconds, then serialises and writes the batch (stdout or an append-only file). If the writer falls behind,
//! records are dropped and counted (`portcullis_audit_dropped_total`) rather than slowing
//! requests. A record names the request, route, backend and outcome — never a credential,
//! header value or prompt text.

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::time::SystemTime;

use http::{HeaderValue, Method};
use serde::{Serialize, Serializer};
use tokio::sync::mpsc;

use crate::identify::{Caller, Principal};
use crate::metrics::Metrics;

/// What happened to one request.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// Time the request arrived (written as RFC 3339 by the writer thread).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    #[serde(serialize_with = "header_str")]
    pub request_id: HeaderValue,
    #[serde(serialize_with = "method_str")]
    pub method: Method,
    /// Path without the query string.
    pub path: String,
    pub operation: &'static str,
    /// The `[[clients]]` id the caller was identified as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<Arc<str>>,
    /// `jwt`, `api_key`, `anonymous`, or `none` when no usable credential was presented.
    pub auth_method: &'static str,
    /// Who exactly: subject, application, tenant, key id, issuer (never the credential).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "identity")]
    pub identity: Option<Arc<Principal>>,
    /// `allow` or `deny` once an access decision was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<&'static str>,
    /// Why access was denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<Arc<String>>,
    /// How the gateway authenticated to the backend (`api_key`, `none`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_auth: Option<&'static str>,
    /// Who the gateway was to the backend: the Entra client id or managed identity its
    /// token was issued to (never the token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_identity: Option<Arc<str>>,
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
/// How often the writer drains the queue. Senders never wake the writer, so emitting a
/// record costs a queue push and nothing else; lines reach the output within this delay.
const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// The writer thread; `join` waits until every sink is dropped and the queue is flushed.
pub struct AuditWriter(std::thread::JoinHandle<()>);

impl AuditWriter {
    /// Wait (off the async runtime) for the writer to flush and end.
    pub async fn join(self) {
        let _ = tokio::task::spawn_blocking(move || self.0.join()).await;
    }
}

impl AuditSink {
    /// Start the writer for `path` (`-` = stdout, otherwise a file appended to).
    pub fn start(path: &str, metrics: Arc<Metrics>) -> std::io::Result<(Self, AuditWriter)> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let out: Box<dyn Write + Send> = if path == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(PathBuf::from(path))?,
            )
        };
        let thread = std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn(move || write_loop(rx, out))?;
        Ok((Self { tx, metrics }, AuditWriter(thread)))
    }

    /// Queue a record; never waits.
    pub fn emit(&self, record: AuditRecord) {
        if self.tx.try_send(record).is_err() {
            self.metrics.audit_dropped.inc();
        }
    }
}

fn write_loop(mut rx: mpsc::Receiver<AuditRecord>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    // Each line is serialised into this buffer, then written in one call: serde_json's many
    // small writes cost far less into a `Vec` than through `BufWriter<Box<dyn Write>>`.
    let mut line = Vec::with_capacity(1024);
    loop {
        let mut wrote = false;
        let closed = loop {
            match rx.try_recv() {
                Ok(rec) => {
                    wrote = true;
                    line.clear();
                    if serde_json::to_writer(&mut line, &rec).is_ok() {
                        line.push(b'\n');
                        let _ = out.write_all(&line);
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break false,
                Err(mpsc::error::TryRecvError::Disconnected) => break true,
            }
        };
        if wrote {
            if let Err(e) = out.flush() {
                tracing::error!(error = %e, "audit write failed");
            }
        }
        if closed {
            return;
        }
        std::thread::sleep(DRAIN_EVERY);
    }
}

impl AuditRecord {
    /// A record for a request arriving now; the pipeline fills in the rest.
    pub fn new(request_id: HeaderValue, method: Method, path: String) -> Self {
        Self {
            time: SystemTime::now(),
            request_id,
            method,
            path,
            operation: "unknown",
            client: None,
            auth_method: "none",
            identity: None,
            decision: None,
            reason: None,
            deployment: None,
            backend: None,
            backend_auth: None,
            backend_identity: None,
            status: 0,
            attempts: 0,
            latency_ms: 0.0,
            duration_ms: 0.0,
            bytes_in: 0,
            bytes_out: 0,
            stream: false,
            outcome: "complete",
            error_code: None,
        }
    }
}

impl AuditRecord {
    /// Record who the caller is.
    pub fn note_caller(&mut self, caller: &Arc<Caller>) {
        self.client = Some(caller.client.id.clone());
        self.auth_method = caller.method.as_str();
        self.identity = Some(caller.principal.clone());
    }

    /// Record which backend answered (or was tried last) and how many were tried.
    pub fn note_backend(&mut self, backend: Option<&crate::routing::Backend>, attempts: u32) {
        self.attempts = attempts;
        self.backend = backend.map(|b| b.label.clone());
        self.backend_auth = backend.map(|b| b.credential.describe());
        self.backend_identity = backend.and_then(|b| b.credential.identity().cloned());
    }
}

impl Default for AuditRecord {
    /// An empty record (allocates nothing); used to move a record out of a `&mut`.
    fn default() -> Self {
        let mut r = Self::new(HeaderValue::from_static(""), Method::GET, String::new());
        r.time = SystemTime::UNIX_EPOCH;
        r
    }
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let text = time::OffsetDateTime::from(*t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    s.serialize_str(&text)
}

fn identity<S: Serializer>(c: &Option<Arc<Principal>>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(None)?;
    if let Some(c) = c {
        let fields: [(&str, Option<&str>); 5] = [
            ("subject", c.subject.as_deref()),
            ("application", c.application.as_deref()),
            ("tenant", c.tenant.as_deref()),
            ("key_id", c.key_id.as_deref()),
            ("issuer", c.issuer.as_deref()),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                m.serialize_entry(k, v)?;
            }
        }
    }
    m.end()
}

fn header_str<S: Serializer>(v: &HeaderValue, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.to_str().unwrap_or_default())
}

fn method_str<S: Serializer>(m: &Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}
