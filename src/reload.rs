//! Live configuration: reload the configuration file into a running gateway.
//!
//! Three triggers reload it: `SIGHUP` ([`on_hangup`], wired by `portcullis serve`), a change
//! in the file's directory ([`Reloader::watch`]: writes, renames, and the `..data` symlink
//! swap Kubernetes does for a mounted ConfigMap or Secret; debounced), and the admin
//! endpoint `POST /admin/reload` (what `portcullis reload` calls). Each one runs
//! [`Reloader::reload`]: read the file (with `_file` secrets read again), validate, build a
//! new [`Snapshot`], swap it in atomically. An invalid file never replaces the running
//! configuration: its problems are logged with their key paths and lines and returned,
//! and `portcullis_config_reloads_total{outcome="rejected"}` counts it. Reloads run one at a
//! time.
//!
//! What a reload keeps, so that it costs clients nothing:
//! - requests and streams already running keep the snapshot they started with (they hold
//!   an `Arc` of it);
//! - backend token caches and their refreshers, for every credential whose
//!   [`crate::config::TokenSpec::cache_key`] is unchanged: no new token request
//!   ([`BackendCredentials::start_from`]); refreshers of removed credentials stop;
//! - issuers' key caches (JWKS) when fetched from the same place on the same schedule, and
//!   the verified-token cache, whose entries re-resolve their client under the new
//!   bindings and are verified again when their issuer's settings changed
//!   ([`Identifier::build_from`]);
//! - upstream connection pools of backends whose connection settings are unchanged
//!   ([`crate::routing::BackendTable::build_from`]);
//! - the API-key table, the limit counters, each client's count of requests in flight, and
//!   every metric.
//!
//! New and changed `[[clients]]`, `[[backends]]`, `[[issuers]]`, `[limits]` estimates,
//! per-client limits, `[prices]`, `[auth]`, `server.max_body_bytes`, `server.body_timeout`,
//! `server.trusted_proxies`, `admin.token` and `[[admin.tokens]]` take effect for the next request.
//!
//! Some keys are read once at start ([`START_ONLY`]): the listeners, the worker threads,
//! the drain timings, the body-memory budget, the audit output, the store, the limit
//! counters' backend and `[telemetry]`. A reload that changes one of them applies everything else, keeps the
//! running value, logs a warning naming the key, lists it in `restart_required`, and sets
//! `portcullis_config_restart_required` to 1 until the process is restarted.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::config::admin::AdminToken;
use crate::config::{self, Problem, Validated};
use crate::gateway::{Gateway, Snapshot};
use crate::identify::{Identifier, KeyCheck};
use crate::upstream_auth::BackendCredentials;

/// The keys a reload cannot change: a change to one is reported as needing a restart.
pub const START_ONLY: &[&str] = &[
    "server.listen",
    "server.workers",
    "server.header_timeout",
    "server.drain_timeout",
    "server.shutdown_delay",
    "server.max_buffered_body_bytes",
    "server.buffer_wait",
    "admin.listen",
    "server.tls",
    "admin.tls",
    "audit.path",
    "store.url",
    "store.key_hmac_secret",
    "store.refresh_interval",
    "store.last_used_flush",
    "store.record_usage",
    "store.usage_flush",
    "store.usage_queue",
    "limits.backend",
    "limits.redis_url",
    "limits.redis_prefix",
    "limits.redis_timeout",
    "limits.on_redis_error",
    "telemetry",
];

/// How long the file's directory must stay quiet before a change is reloaded: editors and
/// Kubernetes make several changes for one update.
pub const DEBOUNCE: Duration = Duration::from_millis(250);

/// How long a reload waits for the first keys of a new issuer and the first token of a new
/// backend credential before swapping.
const NEW_ISSUER_KEYS: Duration = Duration::from_secs(5);

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `SIGHUP`.
    Signal,
    /// A change in the configuration file's directory.
    File,
    /// `POST /admin/reload` (`portcullis reload`).
    Admin,
    /// A direct call (embedding, tests).
    Call,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "signal",
            Self::File => "file",
            Self::Admin => "admin",
            Self::Call => "call",
        }
    }
}

/// One problem with a configuration, as the admin endpoint reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReportedProblem {
    /// Key path such as `backends[1].auth.key`; empty for a syntax error.
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl From<&Problem> for ReportedProblem {
    fn from(p: &Problem) -> Self {
        Self {
            key: p.path.clone(),
            line: p.line,
            message: p.message.clone(),
        }
    }
}

/// What changed in a reload that was applied (by configured name).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Changes {
    pub backends_added: Vec<String>,
    pub backends_removed: Vec<String>,
    pub clients_added: Vec<String>,
    pub clients_removed: Vec<String>,
    pub issuers_added: Vec<String>,
    pub issuers_removed: Vec<String>,
}

/// The result of one reload: the admin endpoint's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// `applied` or `rejected`.
    pub outcome: &'static str,
    pub trigger: &'static str,
    /// The file read (empty when there is none).
    pub origin: String,
    /// Why the configuration was rejected (empty when applied).
    pub errors: Vec<ReportedProblem>,
    /// Start-time-only keys whose configured value differs from the running one; the rest
    /// of the configuration was applied.
    pub restart_required: Vec<String>,
    pub changes: Changes,
}

impl Outcome {
    pub fn applied(&self) -> bool {
        self.outcome == "applied"
    }

    fn rejected(trigger: Trigger, origin: String, errors: Vec<ReportedProblem>) -> Self {
        Self {
            outcome: "rejected",
            trigger: trigger.as_str(),
            origin,
            errors,
            restart_required: Vec::new(),
            changes: Changes::default(),
        }
    }
}

/// The state a reload replaces, behind one lock (reloads run one at a time).
struct State {
    /// What the process started with: start-time-only keys are compared against it.
    started: Validated,
    /// The configuration applied last.
    current: Validated,
    /// The backend credentials of the current snapshot.
    credentials: BackendCredentials,
    /// Set at shutdown: token refreshers are stopped, nothing more is reloaded.
    stopped: bool,
}

/// Reloads the configuration of one running gateway.
pub struct Reloader {
    /// The configuration file, when the gateway was started from one.
    source: Option<PathBuf>,
    gateway: Arc<Gateway>,
    api_keys: Option<Arc<dyn KeyCheck>>,
    /// The admin credentials, read by the admin listener for every request.
    admin_tokens: Arc<ArcSwap<Vec<AdminToken>>>,
    state: tokio::sync::Mutex<State>,
    /// The listeners' TLS states: their files are read again on every reload too.
    tls: Vec<Arc<crate::tls::server::ServerTls>>,
}

impl Reloader {
    /// The reloader of a gateway started from `v` (read from `source`, if from a file).
    pub(crate) fn new(
        source: Option<PathBuf>,
        v: &Validated,
        gateway: Arc<Gateway>,
        api_keys: Option<Arc<dyn KeyCheck>>,
        credentials: BackendCredentials,
    ) -> Self {
        Self {
            source,
            gateway,
            api_keys,
            admin_tokens: Arc::new(ArcSwap::from_pointee(v.admin_tokens.clone())),
            state: tokio::sync::Mutex::new(State {
                started: v.clone(),
                current: v.clone(),
                credentials,
                stopped: false,
            }),
            tls: Vec::new(),
        }
    }

    /// Read these listeners' TLS files again on every reload (they are also watched).
    pub(crate) fn with_tls(mut self, tls: Vec<Arc<crate::tls::server::ServerTls>>) -> Self {
        self.tls = tls;
        self
    }

    /// The configuration file reloads read, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The current admin credentials (changed by reloads).
    pub fn admin_tokens(&self) -> Arc<ArcSwap<Vec<AdminToken>>> {
        self.admin_tokens.clone()
    }

    /// Read the configuration file again and apply it (see the module docs).
    pub async fn reload(&self, trigger: Trigger) -> Outcome {
        let Some(path) = self.source.clone() else {
            let out = Outcome::rejected(
                trigger,
                String::new(),
                vec![ReportedProblem {
                    key: String::new(),
                    line: None,
                    message: "this gateway was not started from a configuration file".into(),
                }],
            );
            self.gateway.metrics.reloads.count("rejected");
            return out;
        };
        let origin = path.display().to_string();
        // Reading the file and its `_file` secrets is blocking I/O: not on this runtime.
        let loaded = tokio::task::spawn_blocking(move || config::load_file(&path)).await;
        match loaded {
            Ok(Ok(v)) => self.apply(v, trigger).await,
            Ok(Err(errors)) => {
                for p in &errors.problems {
                    tracing::error!(
                        origin = %errors.origin,
                        key = %p.path,
                        trigger = trigger.as_str(),
                        "configuration reload rejected, the running configuration is kept: {p}"
                    );
                }
                self.gateway.metrics.reloads.count("rejected");
                Outcome::rejected(
                    trigger,
                    errors.origin.clone(),
                    errors.problems.iter().map(ReportedProblem::from).collect(),
                )
            }
            Err(e) => self.reject(trigger, origin, format!("the reload task failed: {e}")),
        }
    }

    /// Apply a validated configuration (what [`Reloader::reload`] does once the file is
    /// read).
    pub async fn apply(&self, mut v: Validated, trigger: Trigger) -> Outcome {
        let origin = self
            .source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let mut state = self.state.lock().await;
        if state.stopped {
            return self.reject(trigger, origin, "the gateway is shutting down".into());
        }
        let restart_required = start_only_changes(&state.started, &v);
        // The body budget is not rebuilt: a body larger than it could never be read.
        let budget = state.started.max_buffered_body_bytes;
        if v.config.server.max_body_bytes > budget {
            return self.reject_at(
                trigger,
                origin,
                "server.max_body_bytes",
                format!(
                    "must be at most the running server.max_buffered_body_bytes ({budget}), which changes only with a restart"
                ),
            );
        }
        // Worker threads are not restarted: per-worker connection slots follow the running
        // count.
        v.config.server.workers = state.started.config.server.workers;
        let metrics = &self.gateway.metrics;
        let credentials =
            match BackendCredentials::start_from(&v, metrics, Some(&state.credentials)) {
                Ok(c) => c,
                Err(e) => return self.reject(trigger, origin, e.to_string()),
            };
        let previous = self.gateway.snapshot();
        let identity = Identifier::build_from(
            &v,
            self.api_keys.clone(),
            metrics.clone(),
            Some(&previous.identity),
        );
        let snapshot = match Snapshot::build(
            &v,
            identity,
            &credentials.credentials,
            metrics,
            self.gateway.health(),
            Some(&previous),
        ) {
            Ok(s) => s,
            Err(e) => return self.reject(trigger, origin, e.to_string()),
        };
        drop(previous);
        // A new issuer's first keys, so its tokens verify from the first request (kept
        // issuers are loaded already and do not wait), and a new backend credential's
        // first token exchange, so the backend is usable from the first request. Bounded:
        // an IdP that does not answer delays the reload, it does not stop it (the backend
        // is then skipped until its token comes, as at start).
        let deadline = tokio::time::Instant::now() + NEW_ISSUER_KEYS;
        snapshot.identity.wait_keys(NEW_ISSUER_KEYS).await;
        let fresh = credentials.started_since(&state.credentials);
        while fresh.iter().any(|c| !c.attempted()) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A configuration that now estimates requests: the tokenizer tables before the
        // swap, so that no request waits for them (nothing when they are loaded already).
        if snapshot.estimates_tokens() {
            let _ = tokio::task::spawn_blocking(crate::tokens::warm_up).await;
        }
        let changes = changes(&state.current, &v);
        self.gateway.swap(snapshot);
        for tls in &self.tls {
            let tls = tls.clone();
            // File reads and parsing, off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || tls.reload()).await;
        }
        self.admin_tokens.store(Arc::new(v.admin_tokens.clone()));
        // The replaced credentials go: refreshers no configuration uses any more stop.
        state.credentials = credentials;
        state.current = v;
        metrics.reloads.count("applied");
        metrics
            .reloads
            .restart_required
            .set(i64::from(!restart_required.is_empty()));
        for key in &restart_required {
            tracing::warn!(
                key = %key,
                "configuration key changed but only takes effect after a restart; the running value is kept"
            );
        }
        tracing::info!(
            origin = %origin,
            trigger = trigger.as_str(),
            backends_added = ?changes.backends_added,
            backends_removed = ?changes.backends_removed,
            clients_added = ?changes.clients_added,
            clients_removed = ?changes.clients_removed,
            restart_required = ?restart_required,
            "configuration reloaded"
        );
        Outcome {
            outcome: "applied",
            trigger: trigger.as_str(),
            origin,
            errors: Vec::new(),
            restart_required,
            changes,
        }
    }

    fn reject(&self, trigger: Trigger, origin: String, message: String) -> Outcome {
        self.reject_at(trigger, origin, "", message)
    }

    fn reject_at(&self, trigger: Trigger, origin: String, key: &str, message: String) -> Outcome {
        let problem = Problem {
            path: key.to_owned(),
            line: None,
            message,
        };
        tracing::error!(
            origin = %origin,
            key,
            trigger = trigger.as_str(),
            "configuration reload rejected, the running configuration is kept: {problem}"
        );
        self.gateway.metrics.reloads.count("rejected");
        Outcome::rejected(trigger, origin, vec![ReportedProblem::from(&problem)])
    }

    /// Stop token refreshers (shutdown); later reloads are refused.
    pub async fn stop(&self) {
        let mut state = self.state.lock().await;
        state.stopped = true;
        state.credentials.stop();
    }

    /// Reload whenever the configuration file's directory changes (debounced by
    /// [`DEBOUNCE`]). The directory is watched, not the file: an editor's rename over the
    /// file and the Kubernetes `..data` symlink swap both replace the file's inode. Events
    /// for other files in the directory are ignored, except the `..`-prefixed entries of a
    /// Kubernetes volume. The task ends when the reloader is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<tokio::task::JoinHandle<()>, WatchError> {
        use notify::Watcher as _;
        let path = self.source.clone().ok_or(WatchError::NoFile)?;
        let name = path.file_name().ok_or(WatchError::NoFile)?.to_owned();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // One pending change is enough: a reload reads the file as it is then.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(e) = event {
                    if relevant(&e, &name) {
                        let _ = tx.try_send(());
                    }
                }
            })?;
        watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
        tracing::info!(dir = %dir.display(), "watching the configuration directory for changes");
        let me: Weak<Self> = Arc::downgrade(self);
        Ok(tokio::spawn(async move {
            let _watcher = watcher;
            while rx.recv().await.is_some() {
                // Quiet for DEBOUNCE before reading.
                loop {
                    match tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                let Some(reloader) = me.upgrade() else { return };
                reloader.reload(Trigger::File).await;
            }
        }))
    }
}

/// The file watcher could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("the gateway was not started from a configuration file")]
    NoFile,
    #[error("cannot watch the configuration directory: {0}")]
    Notify(#[from] notify::Error),
}

/// Whether `e` may have changed the configuration file `name`: any change (not a read) to
/// it, or to a `..` entry of a Kubernetes volume (`..data`, `..2026_01_01_...`).
fn relevant(e: &notify::Event, name: &std::ffi::OsStr) -> bool {
    touches(e, &[name])
}

/// Whether `e` may have changed one of the files `names` (of a watched directory): see
/// [`relevant`]. Also used for the TLS files ([`crate::tls::server`]).
pub(crate) fn touches(e: &notify::Event, names: &[&std::ffi::OsStr]) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match e.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
        EventKind::Access(_) => return false,
        _ => {}
    }
    e.paths.iter().any(|p| {
        p.file_name()
            .is_some_and(|n| names.contains(&n) || n.as_encoded_bytes().starts_with(b".."))
    })
}

/// Reload on every `SIGHUP` (the process is not stopped by it). `signal` is registered by
/// the caller as early as possible, so a `SIGHUP` during start-up does not end the process.
#[cfg(unix)]
pub fn on_hangup(
    mut signal: tokio::signal::unix::Signal,
    reloader: &Arc<Reloader>,
) -> tokio::task::JoinHandle<()> {
    let me = Arc::downgrade(reloader);
    tokio::spawn(async move {
        while signal.recv().await.is_some() {
            let Some(reloader) = me.upgrade() else { return };
            tracing::info!("SIGHUP received; reloading the configuration");
            reloader.reload(Trigger::Signal).await;
        }
    })
}

/// Start-time-only keys whose value in `new` differs from the running one (`started`).
fn start_only_changes(started: &Validated, new: &Validated) -> Vec<String> {
    let (a, b) = (&started.config, &new.config);
    let changed = [
        ("server.listen", started.listen != new.listen),
        ("server.workers", a.server.workers != b.server.workers),
        (
            "server.header_timeout",
            a.server.header_timeout != b.server.header_timeout,
        ),
        (
            "server.drain_timeout",
            a.server.drain_timeout != b.server.drain_timeout,
        ),
        (
            "server.shutdown_delay",
            a.server.shutdown_delay != b.server.shutdown_delay,
        ),
        (
            "server.max_buffered_body_bytes",
            started.max_buffered_body_bytes != new.max_buffered_body_bytes,
        ),
        (
            "server.buffer_wait",
            a.server.buffer_wait != b.server.buffer_wait,
        ),
        ("admin.listen", started.admin_listen != new.admin_listen),
        // The sections' keys; the files they name are reloaded when they change.
        ("server.tls", a.server.tls != b.server.tls),
        ("admin.tls", a.admin.tls != b.admin.tls),
        (
            "audit.path",
            started.base_dir.join(a.audit.path.as_str())
                != new.base_dir.join(b.audit.path.as_str()),
        ),
        ("store.url", a.store.url != b.store.url),
        (
            "store.key_hmac_secret",
            started.key_hmac_secret != new.key_hmac_secret,
        ),
        (
            "store.refresh_interval",
            a.store.refresh_interval != b.store.refresh_interval,
        ),
        (
            "store.last_used_flush",
            a.store.last_used_flush != b.store.last_used_flush,
        ),
        (
            "store.record_usage",
            a.store.record_usage != b.store.record_usage,
        ),
        (
            "store.usage_flush",
            a.store.usage_flush != b.store.usage_flush,
        ),
        (
            "store.usage_queue",
            a.store.usage_queue != b.store.usage_queue,
        ),
        ("limits.backend", a.limits.backend != b.limits.backend),
        ("limits.redis_url", a.limits.redis_url != b.limits.redis_url),
        (
            "limits.redis_prefix",
            a.limits.redis_prefix != b.limits.redis_prefix,
        ),
        (
            "limits.redis_timeout",
            a.limits.redis_timeout != b.limits.redis_timeout,
        ),
        (
            "limits.on_redis_error",
            a.limits.on_redis_error != b.limits.on_redis_error,
        ),
        // The whole section: the exporter and its batch task are built once at start.
        ("telemetry", started.telemetry != new.telemetry),
    ];
    debug_assert_eq!(changed.len(), START_ONLY.len());
    changed
        .into_iter()
        .filter(|(_, c)| *c)
        .map(|(k, _)| k.to_owned())
        .collect()
}

/// Names added and removed between two configurations.
fn changes(old: &Validated, new: &Validated) -> Changes {
    fn diff(old: Vec<&str>, new: Vec<&str>) -> (Vec<String>, Vec<String>) {
        let added = new
            .iter()
            .filter(|n| !old.contains(n))
            .map(|n| (*n).to_owned())
            .collect();
        let removed = old
            .iter()
            .filter(|n| !new.contains(n))
            .map(|n| (*n).to_owned())
            .collect();
        (added, removed)
    }
    let (o, n) = (&old.config, &new.config);
    let (backends_added, backends_removed) = diff(
        o.backends.iter().map(|b| b.name.as_str()).collect(),
        n.backends.iter().map(|b| b.name.as_str()).collect(),
    );
    let (clients_added, clients_removed) = diff(
        o.clients.iter().map(|c| c.id.as_str()).collect(),
        n.clients.iter().map(|c| c.id.as_str()).collect(),
    );
    let (issuers_added, issuers_removed) = diff(
        o.issuers.iter().map(|i| i.name.as_str()).collect(),
        n.issuers.iter().map(|i| i.name.as_str()).collect(),
    );
    Changes {
        backends_added,
        backends_removed,
        clients_added,
        clients_removed,
        issuers_added,
        issuers_removed,
    }
}

pub mod client;
#[cfg(test)]
mod tests;
