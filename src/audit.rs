//! Audit: one JSON line per request, written off the request path.
//!
//! The request task hands an [`AuditRecord`] to a bounded channel; a writer thread drains it
//! every few milliseconds, then serialises and writes the batch (stdout or an append-only
//! file). If the writer falls behind, records are dropped and counted
//! (`portcullis_audit_dropped_total`) rather than slowing requests; an admin API request's
//! record waits for room instead (see [`AuditSink::emit_admin`]), so a flood cannot hide a key
//! change or a reload. A record names the request, route, backend and outcome — never a
//! credential, header value or prompt text.
//!
//! The writer formats lines with `LineWriter`, a fixed-schema serialiser whose output is
//! byte-identical to `serde_json` on the derived `Serialize` impl (the tests compare the two) for
//! about 40% of its instructions: strings without characters to escape are copied whole after a
//! word-at-a-time scan, and the timestamp's date and time of day are formatted once per second.

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
use crate::telemetry::AuditTraceId;
use crate::tls::ClientCert;

/// What happened to one request.
///
/// The writer thread does not use the `Serialize` impl: `LineWriter` writes the same JSON by
/// hand, so a field added, moved or renamed here must change there too. The derive stays as
/// the schema's reference, which the tests compare `LineWriter` with byte for byte.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// Time the request arrived (written as RFC 3339 by the writer thread).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    #[serde(serialize_with = "header_str")]
    pub request_id: HeaderValue,
    /// The W3C trace id: the gateway's trace when the request was traced, else the one of
    /// the client's valid `traceparent`; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "trace_hex")]
    pub trace_id: Option<AuditTraceId>,
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
    /// The verified client certificate that came with the request: its subject, SANs and
    /// SHA-256 thumbprint (never the certificate).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "certificate"
    )]
    pub client_certificate: Option<Arc<ClientCert>>,
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
    /// Every attempt, in order, when there was more than one (one attempt is `backend`
    /// and `latency_ms`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tried: Vec<Tried>,
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
    /// Tokens and cost, once the account stage has settled the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<AuditUsage>,
}

/// One attempt of a request at a backend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tried {
    #[serde(serialize_with = "arc_str")]
    pub backend: Arc<String>,
    /// `response` (relayed), `rate_limited`, `connect_error`, `status_5xx`, `timeout`,
    /// `unauthorized`, `error`.
    pub outcome: &'static str,
    /// Milliseconds from sending to the outcome.
    pub ms: f64,
}

fn arc_str<S: serde::Serializer>(v: &Arc<String>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v)
}

/// The usage fields of an audit line.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AuditUsage {
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    pub reasoning_tokens: u64,
    /// The gateway's estimate (prompt + output reservation); `null` when nothing needed one.
    pub estimated_tokens: Option<u64>,
    /// `reported` (the backend's `usage`), `counted` (the streamed text, counted by the
    /// gateway: the backend cut the stream) or `none`.
    pub source: &'static str,
    pub cost_usd: f64,
}

/// One admin API request: who (the admin token's name, never the token), what, and the
/// answer. Written as a line with `"kind": "admin"`, in the same output as requests.
#[derive(Debug, Clone, Serialize)]
pub struct AdminAuditRecord {
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub kind: &'static str,
    pub request_id: String,
    pub method: String,
    /// Path without the query string.
    pub path: String,
    /// The TCP peer.
    pub peer: String,
    /// The admin token's `name`; `null` when none (or no valid one) was presented.
    pub admin_token: Option<String>,
    /// The scope the endpoint needs (`null` for open endpoints).
    pub scope: Option<&'static str>,
    /// `allowed`, or `refused` (401/403).
    pub decision: &'static str,
    pub status: u16,
    /// What a change did: the key id and client of a created, rotated or revoked key,
    /// the reload's outcome (never a key or a token).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

/// What the writer thread receives. A request's record travels unboxed (one per request,
/// no allocation for it); the rare admin record is boxed.
#[allow(clippy::large_enum_variant)]
enum Entry {
    Request(AuditRecord),
    Admin(Box<AdminAuditRecord>),
}

/// Handle used by request tasks to emit records. Cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Entry>,
    metrics: Arc<Metrics>,
    activity: Arc<crate::activity::Activity>,
}

/// Capacity of the queue between request tasks and the writer.
const QUEUE: usize = 65_536;
/// How long an admin record waits for room in a full queue.
const ADMIN_WAIT: Duration = Duration::from_secs(5);
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
        let activity = Arc::default();
        Ok((
            Self {
                tx,
                metrics,
                activity,
            },
            AuditWriter(thread),
        ))
    }

    /// Queue a record; never waits. An answer of 400 or more is also counted by reason
    /// in [`Self::activity`].
    pub fn emit(&self, record: AuditRecord) {
        if record.status >= 400 {
            let code = record.error_code.unwrap_or(crate::activity::BACKEND_ERROR);
            self.activity.count(code, record.status);
        }
        if self.tx.try_send(Entry::Request(record)).is_err() {
            self.metrics.audit_dropped.inc();
        }
    }

    /// Queue an admin API request's record. Unlike a request's, it waits for room (at
    /// most [`ADMIN_WAIT`]): a flood of requests filling the queue must not hide a key
    /// change or a reload. Only a writer stalled that long loses it, counted and logged.
    pub async fn emit_admin(&self, record: AdminAuditRecord) {
        match tokio::time::timeout(ADMIN_WAIT, self.tx.reserve()).await {
            Ok(Ok(room)) => room.send(Entry::Admin(Box::new(record))),
            _ => {
                self.metrics.audit_dropped.inc();
                tracing::error!(method = %record.method, path = %record.path, status = record.status, "the audit writer is stalled: an admin request's audit line was not written");
            }
        }
    }

    /// This replica's refusals and errors by reason.
    pub fn activity(&self) -> &Arc<crate::activity::Activity> {
        &self.activity
    }
}

fn write_loop(mut rx: mpsc::Receiver<Entry>, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    // Each line is serialised into this buffer, then written in one call: the line writer's many
    // small appends cost far less into a `Vec` than through `BufWriter<Box<dyn Write>>`.
    let mut line = Vec::with_capacity(1024);
    let mut writer = LineWriter::default();
    loop {
        let mut wrote = false;
        let closed = loop {
            match rx.try_recv() {
                Ok(entry) => {
                    wrote = true;
                    line.clear();
                    let written = match &entry {
                        Entry::Request(rec) => writer.write(rec, &mut line),
                        Entry::Admin(rec) => serde_json::to_writer(&mut line, rec),
                    };
                    if written.is_ok() {
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
            trace_id: None,
            method,
            path,
            operation: "unknown",
            client: None,
            auth_method: "none",
            identity: None,
            client_certificate: None,
            decision: None,
            reason: None,
            deployment: None,
            backend: None,
            backend_auth: None,
            backend_identity: None,
            status: 0,
            attempts: 0,
            tried: Vec::new(),
            latency_ms: 0.0,
            duration_ms: 0.0,
            bytes_in: 0,
            bytes_out: 0,
            stream: false,
            outcome: "complete",
            error_code: None,
            usage: None,
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

/// Formats audit lines: the JSON `serde_json::to_writer` makes of an [`AuditRecord`], byte for
/// byte, without going through serde. It keeps the text of the last second it formatted, so
/// records from the same second (nearly all of them under load) only format their fraction.
struct LineWriter {
    /// Whole seconds since the UNIX epoch that `second_text` shows; `i64::MIN` = none yet.
    second: i64,
    /// `YYYY-MM-DDTHH:MM:SS` for `second`.
    second_text: [u8; 19],
}

impl Default for LineWriter {
    fn default() -> Self {
        Self {
            second: i64::MIN,
            second_text: [b'0'; 19],
        }
    }
}

/// Seconds from the UNIX epoch to 0000-01-01T00:00:00Z and to 10000-01-01T00:00:00Z: RFC 3339
/// (and the `time` crate) only write four-digit years; outside them the time is written as
/// `""`, as the serde helper's `unwrap_or_default` does.
const YEAR_0: i64 = -62_167_219_200;
const YEAR_10000: i64 = 253_402_300_800;

impl LineWriter {
    /// Append the JSON object for `rec` (no newline) to `out`. Fails only if `serde_json`
    /// does while escaping a string, which writing to a `Vec` does not.
    fn write(&mut self, rec: &AuditRecord, out: &mut Vec<u8>) -> serde_json::Result<()> {
        // Every field named, no `..`: a field added to `AuditRecord` does not compile until
        // it is written here too.
        let AuditRecord {
            time,
            request_id,
            trace_id,
            method,
            path,
            operation,
            client,
            auth_method,
            identity,
            client_certificate,
            decision,
            reason,
            deployment,
            backend,
            backend_auth,
            backend_identity,
            status,
            attempts,
            tried,
            latency_ms,
            duration_ms,
            bytes_in,
            bytes_out,
            stream,
            outcome,
            error_code,
            usage,
        } = rec;
        out.extend_from_slice(b"{\"time\":");
        self.time(*time, out);
        out.extend_from_slice(b",\"request_id\":");
        string(out, request_id.to_str().unwrap_or_default())?;
        if let Some(t) = trace_id {
            out.extend_from_slice(b",\"trace_id\":\"");
            out.extend_from_slice(&t.hex());
            out.push(b'"');
        }
        out.extend_from_slice(b",\"method\":");
        string(out, method.as_str())?;
        out.extend_from_slice(b",\"path\":");
        string(out, path)?;
        out.extend_from_slice(b",\"operation\":");
        string(out, operation)?;
        opt_string(out, b",\"client\":", client.as_deref())?;
        out.extend_from_slice(b",\"auth_method\":");
        string(out, auth_method)?;
        if let Some(p) = &identity {
            out.extend_from_slice(b",\"identity\":");
            principal(out, p)?;
        }
        if let Some(c) = &client_certificate {
            let id = &c.identity;
            out.extend_from_slice(b",\"client_certificate\":{\"subject\":");
            string(out, &id.subject)?;
            out.extend_from_slice(b",\"san\":[");
            for (i, s) in id.san().iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(out, s)?;
            }
            out.extend_from_slice(b"],\"sha256\":");
            string(out, &id.sha256)?;
            out.push(b'}');
        }
        opt_string(out, b",\"decision\":", *decision)?;
        opt_string(out, b",\"reason\":", reason.as_deref())?;
        opt_string(out, b",\"deployment\":", deployment.as_deref())?;
        opt_string(
            out,
            b",\"backend\":",
            backend.as_deref().map(String::as_str),
        )?;
        opt_string(out, b",\"backend_auth\":", *backend_auth)?;
        opt_string(out, b",\"backend_identity\":", backend_identity.as_deref())?;
        out.extend_from_slice(b",\"status\":");
        out.extend_from_slice(itoa::Buffer::new().format(*status).as_bytes());
        out.extend_from_slice(b",\"attempts\":");
        out.extend_from_slice(itoa::Buffer::new().format(*attempts).as_bytes());
        if !tried.is_empty() {
            out.extend_from_slice(b",\"tried\":[");
            for (i, t) in tried.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"backend\":");
                string(out, &t.backend)?;
                out.extend_from_slice(b",\"outcome\":");
                string(out, t.outcome)?;
                out.extend_from_slice(b",\"ms\":");
                float(out, t.ms);
                out.push(b'}');
            }
            out.push(b']');
        }
        out.extend_from_slice(b",\"latency_ms\":");
        float(out, *latency_ms);
        out.extend_from_slice(b",\"duration_ms\":");
        float(out, *duration_ms);
        out.extend_from_slice(b",\"bytes_in\":");
        out.extend_from_slice(itoa::Buffer::new().format(*bytes_in).as_bytes());
        out.extend_from_slice(b",\"bytes_out\":");
        out.extend_from_slice(itoa::Buffer::new().format(*bytes_out).as_bytes());
        out.extend_from_slice(if *stream {
            b",\"stream\":true"
        } else {
            b",\"stream\":false"
        });
        out.extend_from_slice(b",\"outcome\":");
        string(out, outcome)?;
        opt_string(out, b",\"error_code\":", *error_code)?;
        if let Some(u) = usage {
            let AuditUsage {
                prompt_tokens,
                cached_tokens,
                completion_tokens,
                reasoning_tokens,
                estimated_tokens,
                source,
                cost_usd,
            } = u;
            for (key, n) in [
                (&b",\"usage\":{\"prompt_tokens\":"[..], prompt_tokens),
                (b",\"cached_tokens\":", cached_tokens),
                (b",\"completion_tokens\":", completion_tokens),
                (b",\"reasoning_tokens\":", reasoning_tokens),
            ] {
                out.extend_from_slice(key);
                out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes());
            }
            out.extend_from_slice(b",\"estimated_tokens\":");
            match estimated_tokens {
                Some(n) => out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
                None => out.extend_from_slice(b"null"),
            }
            out.extend_from_slice(b",\"source\":");
            string(out, source)?;
            out.extend_from_slice(b",\"cost_usd\":");
            float(out, *cost_usd);
            out.push(b'}');
        }
        out.push(b'}');
        Ok(())
    }

    /// The quoted RFC 3339 text the `time` crate writes for `t` in UTC: seconds, then `.` and
    /// the nanoseconds without trailing zeros unless they are zero, then `Z`.
    fn time(&mut self, t: SystemTime, out: &mut Vec<u8>) {
        // Whole seconds rounded down and nanoseconds in 0..1e9, also before 1970.
        let (secs, nanos) = match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => (
                i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                d.subsec_nanos(),
            ),
            Err(e) => {
                let d = e.duration();
                let secs = i64::try_from(d.as_secs()).map_or(i64::MIN, |s| -s);
                match d.subsec_nanos() {
                    0 => (secs, 0),
                    n => (secs.saturating_sub(1), 1_000_000_000 - n),
                }
            }
        };
        if !(YEAR_0..YEAR_10000).contains(&secs) {
            out.extend_from_slice(b"\"\"");
            return;
        }
        if secs != self.second {
            self.second = secs;
            self.second_text = date_time_text(secs);
        }
        out.push(b'"');
        out.extend_from_slice(&self.second_text);
        if nanos != 0 {
            let mut digits = [b'0'; 10];
            digits[0] = b'.';
            let mut n = nanos;
            for d in digits[1..].iter_mut().rev() {
                // `n % 10` is below 10.
                *d = b'0' + (n % 10) as u8;
                n /= 10;
            }
            // Trailing zeros are not written; `nanos != 0`, so a non-zero digit remains.
            let len = digits.iter().rposition(|&d| d != b'0').map_or(0, |i| i + 1);
            out.extend_from_slice(&digits[..len]);
        }
        out.extend_from_slice(b"Z\"");
    }
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC, proleptic Gregorian) for `secs` since the UNIX epoch, which the
/// caller keeps within years 0 to 9999.
fn date_time_text(secs: i64) -> [u8; 19] {
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    // Howard Hinnant's `civil_from_days`: count from 0000-03-01 in 400-year eras, so the leap
    // day falls at the end of each counted year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // year of era, 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year, 0..=365
    let mp = (5 * doy + 2) / 153; // March = 0
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = era * 400 + yoe + i64::from(month <= 2);

    let mut text = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for d in text[at..at + width].iter_mut().rev() {
            // `v` is non-negative here, so `v % 10` is a digit.
            *d = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3_600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    text
}

/// `key` (`,"name":`) and the string, when there is one; none writes nothing, as the derive's
/// `skip_serializing_if = "Option::is_none"` does.
fn opt_string(out: &mut Vec<u8>, key: &[u8], v: Option<&str>) -> serde_json::Result<()> {
    if let Some(v) = v {
        out.extend_from_slice(key);
        string(out, v)?;
    }
    Ok(())
}

/// `s` as a JSON string. Audit strings (ids, paths, labels) rarely hold anything to escape, so
/// they are checked a word at a time and copied whole; the rest go to `serde_json`, so the
/// escaping rules stay its own.
fn string(out: &mut Vec<u8>, s: &str) -> serde_json::Result<()> {
    if needs_escape(s.as_bytes()) {
        return escaped_string(out, s);
    }
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
    Ok(())
}

/// Kept out of line so that `string`'s fast path stays small.
#[cold]
#[inline(never)]
fn escaped_string(out: &mut Vec<u8>, s: &str) -> serde_json::Result<()> {
    serde_json::to_writer(out, s)
}

/// Whether `s` holds a byte `serde_json` escapes: `"`, `\` or a control character below 0x20.
/// Audit strings are short and almost never match, so every word is checked (no early exit)
/// and the verdicts combined with one test at the end.
fn needs_escape(s: &[u8]) -> bool {
    let (words, tail) = s.as_chunks::<8>();
    // Pad the tail with spaces, which need no escaping.
    let mut last = [b' '; 8];
    last[..tail.len()].copy_from_slice(tail);
    let found = words
        .iter()
        .fold(escape_bits(u64::from_le_bytes(last)), |found, w| {
            found | escape_bits(u64::from_le_bytes(*w))
        });
    found != 0
}

/// Non-zero if one of the eight bytes of `w` is below 0x20, `"` or `\`. Each test is the
/// classic "has a byte less than n" / "has a zero byte" trick: subtracting borrows into a
/// byte's high bit only if that byte, or one below it, is less than the subtrahend, so a set
/// high bit (of a byte that had it clear) proves some byte matched, and a match always sets one.
fn escape_bits(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let control = w.wrapping_sub(ONES * 0x20);
    let quote = (w ^ (ONES * u64::from(b'"'))).wrapping_sub(ONES);
    let backslash = (w ^ (ONES * u64::from(b'\\'))).wrapping_sub(ONES);
    // `"` and `\` have their high bit clear, so `!w` has the same high bits as the XORed
    // words the zero-byte tests would mask with.
    (control | quote | backslash) & !w & HIGH
}

/// A finite `f64` as `serde_json` writes it (same formatter); NaN and infinities as `null`.
fn float(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        out.extend_from_slice(zmij::Buffer::new().format_finite(v).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}

/// The `identity` object: the fields present, in the order the serde helper writes them.
/// Every identified caller has one (empty for anonymous callers), so it is on the fast path too.
fn principal(out: &mut Vec<u8>, p: &Principal) -> serde_json::Result<()> {
    // Every field named: a field added to `Principal` does not compile until written here.
    let Principal {
        subject,
        application,
        tenant,
        key_id,
        issuer,
    } = p;
    let fields: [(&[u8], Option<&str>); 5] = [
        (b"\"subject\":", subject.as_deref()),
        (b"\"application\":", application.as_deref()),
        (b"\"tenant\":", tenant.as_deref()),
        (b"\"key_id\":", key_id.as_deref()),
        (b"\"issuer\":", issuer.as_deref()),
    ];
    out.push(b'{');
    let mut first = true;
    for (key, v) in fields {
        if let Some(v) = v {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(key);
            string(out, v)?;
        }
    }
    out.push(b'}');
    Ok(())
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

fn certificate<S: Serializer>(c: &Option<Arc<ClientCert>>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(3))?;
    if let Some(c) = c {
        m.serialize_entry("subject", &c.identity.subject)?;
        m.serialize_entry("san", &c.identity.san())?;
        m.serialize_entry("sha256", &c.identity.sha256)?;
    }
    m.end()
}

fn header_str<S: Serializer>(v: &HeaderValue, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.to_str().unwrap_or_default())
}

fn trace_hex<S: Serializer>(v: &Option<AuditTraceId>, s: S) -> Result<S::Ok, S::Error> {
    let hex = v.map(|t| t.hex()).unwrap_or([b'0'; 32]);
    s.serialize_str(std::str::from_utf8(&hex).unwrap_or_default())
}

fn method_str<S: Serializer>(m: &Method, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(m.as_str())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn admin_record(path: &str) -> AdminAuditRecord {
        AdminAuditRecord {
            time: SystemTime::now(),
            kind: "admin",
            request_id: "r".into(),
            method: "POST".into(),
            path: path.into(),
            peer: "127.0.0.1:1".into(),
            admin_token: None,
            scope: Some("keys"),
            decision: "allowed",
            status: 201,
            detail: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_drops_requests_records_but_an_admin_record_waits_for_room() {
        let (tx, mut rx) = mpsc::channel(1);
        let metrics = Arc::new(Metrics::new());
        let sink = AuditSink {
            tx,
            metrics: metrics.clone(),
            activity: Arc::default(),
        };
        let request = || {
            AuditRecord::new(
                HeaderValue::from_static("q"),
                Method::POST,
                "/openai/deployments/d/chat/completions".into(),
            )
        };
        sink.emit(request());
        sink.emit(request());
        assert_eq!(
            metrics.audit_dropped.get(),
            1,
            "a request's record never waits"
        );
        // The writer takes the queued record a second later: the admin record gets in.
        let admin = tokio::spawn({
            let sink = sink.clone();
            async move { sink.emit_admin(admin_record("/admin/keys")).await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(matches!(rx.recv().await, Some(Entry::Request(_))));
        admin.await.unwrap();
        match rx.recv().await {
            Some(Entry::Admin(a)) => assert_eq!(a.path, "/admin/keys"),
            _ => panic!("the admin record was not queued"),
        }
        assert_eq!(metrics.audit_dropped.get(), 1);
        // A writer stalled past ADMIN_WAIT: lost, and counted.
        sink.emit(request());
        sink.emit_admin(admin_record("/admin/reload")).await;
        assert_eq!(metrics.audit_dropped.get(), 2);
    }

    /// Strings meant to trip the word-at-a-time scan: escapes at the start, at word edges and
    /// in the tail, lengths around multiples of 8, multi-byte UTF-8 (including U+2028, which
    /// serde_json does not escape) and DEL (not escaped either).
    const STRINGS: &[&str] = &[
        "",
        "a",
        "abcdefg",
        "abcdefgh",
        "abcdefghi",
        "/openai/deployments/gpt-4o/chat/completions",
        "0123456789abcdef",
        "0123456789abcdefg",
        "\"",
        "\\",
        "\u{1}",
        "\n",
        "\t",
        "\u{1f}",
        "\u{7f}",
        " !#$%&'()*+,-./[]^_`{|}~",
        "say \"hi\"",
        "abcdefg\"",
        "abcdefgh\"",
        "abcdefghijklmno\\",
        "abcdefghijklmnop\u{1}",
        "C:\\path\\to",
        "line\nbreak\r\n",
        "tab\tinside a long-ish string",
        "\u{8}\u{c}\u{b}\u{0}",
        "é",
        "café au lait, s'il vous plaît",
        "😀",
        "emoji 😀 in the middle of a longer text",
        "\u{2028}\u{2029}",
        "separator\u{2028}inside",
        "ÿ\u{80}\u{ff}\u{100}",
        "a very long string of plain text well past a couple of words, ending oddly",
        "a very long string of plain text with one quote near the end ........ \"",
    ];

    const FLOATS: &[f64] = &[
        0.0,
        -0.0,
        1e-7,
        0.1,
        1.5,
        12.345678,
        123456.789,
        1e15,
        1e16,
        1e21,
        1e300,
        f64::MAX,
        f64::MIN_POSITIVE,
        5e-324,
        -3.25,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];

    fn sample_times() -> Vec<SystemTime> {
        let at = |secs: i64, nanos: u32| {
            let t = if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
            } else {
                SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
            };
            t + Duration::from_nanos(u64::from(nanos))
        };
        let mut times = vec![
            SystemTime::UNIX_EPOCH,
            SystemTime::now(),
            SystemTime::UNIX_EPOCH - Duration::from_nanos(1),
            SystemTime::UNIX_EPOCH - Duration::from_millis(500),
            SystemTime::UNIX_EPOCH - Duration::from_secs(1),
            at(YEAR_0, 0),
            at(YEAR_0, 1),
            at(YEAR_0 - 1, 999_999_999),
            at(YEAR_10000 - 1, 999_999_999),
            at(-2_208_988_800, 0), // 1900-01-01, not a leap year
            at(951_782_400, 0),    // 2000-02-29
            at(4_107_542_400, 0),  // 2100-03-01
            at(1_709_164_799, 0),  // 2024-02-28T23:59:59
            at(1_709_251_199, 0),  // 2024-02-29T23:59:59
            at(1_735_689_599, 0),  // 2024-12-31T23:59:59
            at(1_735_689_600, 0),  // 2025-01-01
        ];
        // The same second with different fractions (the writer's cache), and a fraction of
        // every length from 1 to 9 digits.
        for nanos in [
            1,
            10,
            100,
            123_456_789,
            500_000_000,
            999_999_999,
            100_000_000,
            120_000_000,
            123_000_000,
            123_400_000,
            123_450_000,
            123_456_000,
            123_456_700,
            123_456_780,
        ] {
            times.push(at(1_700_000_000, nanos));
        }
        // Spread over the whole range, at random times of day.
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..2_000 {
            times.push(at(rng.i64(YEAR_0..YEAR_10000), rng.u32(0..1_000_000_000)));
        }
        times
    }

    fn pick<T: Copy>(rng: &mut fastrand::Rng, from: &[T]) -> T {
        from[rng.usize(..from.len())]
    }

    fn maybe<T>(rng: &mut fastrand::Rng, f: impl FnOnce(&mut fastrand::Rng) -> T) -> Option<T> {
        rng.bool().then(|| f(rng))
    }

    fn s(rng: &mut fastrand::Rng) -> &'static str {
        pick(rng, STRINGS)
    }

    fn random_record(rng: &mut fastrand::Rng, time: SystemTime) -> AuditRecord {
        let request_ids = [
            HeaderValue::from_static("3f2c9a4e-5b1d-4c8e-9f0a-1b2c3d4e5f60"),
            HeaderValue::from_static(""),
            HeaderValue::from_static("tab\tin-id"),
            HeaderValue::from_static("quote\"and\\backslash"),
            // Not visible ASCII: `to_str` fails and the id is written as "".
            HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        ];
        let methods = [
            Method::GET,
            Method::POST,
            Method::from_bytes(b"PURGE").unwrap(),
        ];
        let identity = match rng.u8(0..4) {
            0 => None,
            1 => Some(Principal::default()),
            2 => Some(Principal {
                key_id: Some(s(rng).into()),
                ..Principal::default()
            }),
            _ => Some(Principal {
                subject: maybe(rng, |rng| s(rng).to_owned()),
                application: maybe(rng, |rng| s(rng).to_owned()),
                tenant: maybe(rng, |rng| s(rng).to_owned()),
                key_id: maybe(rng, |rng| s(rng).into()),
                issuer: maybe(rng, |rng| s(rng).into()),
            }),
        };
        AuditRecord {
            time,
            request_id: request_ids[rng.usize(..request_ids.len())].clone(),
            trace_id: maybe(rng, |rng| AuditTraceId([rng.u8(..); 16])),
            method: methods[rng.usize(..methods.len())].clone(),
            path: s(rng).to_owned(),
            operation: s(rng),
            client: maybe(rng, |rng| s(rng).into()),
            auth_method: s(rng),
            identity: identity.map(Arc::new),
            client_certificate: None,
            decision: maybe(rng, s),
            reason: maybe(rng, |rng| s(rng).to_owned()),
            deployment: maybe(rng, |rng| s(rng).to_owned()),
            backend: maybe(rng, |rng| Arc::new(s(rng).to_owned())),
            backend_auth: maybe(rng, s),
            backend_identity: maybe(rng, |rng| s(rng).into()),
            status: pick(rng, &[0, 200, 429, u16::MAX]),
            attempts: pick(rng, &[0, 1, 3, u32::MAX]),
            tried: (0..rng.usize(0..3))
                .map(|_| Tried {
                    backend: Arc::new(s(rng).to_owned()),
                    outcome: s(rng),
                    ms: pick(rng, FLOATS),
                })
                .collect(),
            latency_ms: pick(rng, FLOATS),
            duration_ms: pick(rng, FLOATS),
            bytes_in: pick(rng, &[0, 1, 12_345, u64::MAX]),
            bytes_out: pick(rng, &[0, 987_654_321, u64::MAX]),
            stream: rng.bool(),
            outcome: s(rng),
            error_code: maybe(rng, s),
            usage: rng.bool().then(|| AuditUsage {
                prompt_tokens: pick(rng, &[0, 17, u64::MAX]),
                cached_tokens: pick(rng, &[0, 5]),
                completion_tokens: pick(rng, &[0, 1, 4096]),
                reasoning_tokens: pick(rng, &[0, 64]),
                estimated_tokens: maybe(rng, |r| pick(r, &[0, 123_456])),
                source: s(rng),
                cost_usd: pick(rng, FLOATS),
            }),
        }
    }

    fn assert_same(writer: &mut LineWriter, rec: &AuditRecord) {
        let expected = serde_json::to_vec(rec).unwrap();
        let mut got = Vec::new();
        writer.write(rec, &mut got).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected),
            "record: {rec:?}"
        );
        assert_eq!(got, expected);
    }

    #[test]
    fn line_writer_matches_serde_json() {
        let mut writer = LineWriter::default();
        let times = sample_times();
        // Nothing optional, then everything.
        assert_same(&mut writer, &AuditRecord::default());
        let mut full = AuditRecord::new(
            HeaderValue::from_static("req-1"),
            Method::POST,
            "/v1/chat/completions".into(),
        );
        full.client = Some("team-a".into());
        full.identity = Some(Arc::new(Principal {
            subject: Some("00000000-0000-0000-0000-000000000001".into()),
            application: Some("app".into()),
            tenant: Some("tenant".into()),
            key_id: Some("key".into()),
            issuer: Some("entra".into()),
        }));
        full.client_certificate = {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec!["batch.internal".into()]).unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "batch \"job\"");
            params.subject_alt_names.push(rcgen::SanType::URI(
                "spiffe://corp/batch".try_into().unwrap(),
            ));
            let cert = params.self_signed(&key).unwrap();
            crate::tls::ClientCert::new(vec![cert.der().clone()], 1)
        };
        assert!(full.client_certificate.is_some());
        full.decision = Some("allow");
        full.reason = Some("because".into());
        full.deployment = Some("gpt-4o".into());
        full.backend = Some(Arc::new("eastus".into()));
        full.backend_auth = Some("api_key");
        full.backend_identity = Some("mi".into());
        full.error_code = Some("upstream_error");
        full.latency_ms = 12.345;
        full.duration_ms = 1234.5;
        full.usage = Some(AuditUsage {
            prompt_tokens: 12,
            cached_tokens: 3,
            completion_tokens: 40,
            reasoning_tokens: 16,
            estimated_tokens: Some(4108),
            source: "reported",
            cost_usd: 0.000_43,
        });
        assert_same(&mut writer, &full);

        // Every sample time, in order (runs of one second hit the cache) and at random.
        let mut rng = fastrand::Rng::with_seed(42);
        for &t in &times {
            let rec = random_record(&mut rng, t);
            assert_same(&mut writer, &rec);
        }
        for _ in 0..5_000 {
            let t = pick(&mut rng, &times);
            let rec = random_record(&mut rng, t);
            assert_same(&mut writer, &rec);
        }
    }

    #[test]
    fn times_outside_four_digit_years_are_empty() {
        let mut writer = LineWriter::default();
        let mut out = Vec::new();
        for t in [
            SystemTime::UNIX_EPOCH + Duration::from_secs(YEAR_10000.unsigned_abs()),
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 4),
            SystemTime::UNIX_EPOCH - Duration::from_secs(YEAR_0.unsigned_abs() + 1),
        ] {
            out.clear();
            writer.time(t, &mut out);
            assert_eq!(out, b"\"\"");
        }
    }

    #[test]
    fn strings_match_serde_json() {
        // Each character of interest at every position of strings of 0 to 24 bytes.
        let specials = [
            '"', '\\', '\u{0}', '\u{1f}', '\n', ' ', '\u{7f}', 'é', '\u{2028}',
        ];
        for len in 0..=24 {
            for at in 0..=len {
                for c in specials {
                    let mut s = "x".repeat(len);
                    s.insert(at, c);
                    let mut got = Vec::new();
                    string(&mut got, &s).unwrap();
                    assert_eq!(got, serde_json::to_vec(&s).unwrap(), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn word_test_matches_byte_test() {
        let escaped = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
        for filler in [b'a', b' ', b'!', b'#', b']', b'[', 0x7f, 0x80, 0xc3, 0xff] {
            for at in 0..8 {
                for b in 0..=255u8 {
                    let mut w = [filler; 8];
                    w[at] = b;
                    assert_eq!(
                        escape_bits(u64::from_le_bytes(w)) != 0,
                        w.iter().any(|&b| escaped(b)),
                        "{w:?}"
                    );
                }
            }
        }
    }
}
