//! Wiring: from a validated configuration to running listeners, and back down.
//!
//! [`start`] binds the client and admin listeners, starts the audit writer and returns a
//! [`Running`] handle; [`Running::shutdown`] begins a graceful drain and
//! [`Running::wait`] returns once connections are drained and audit lines flushed.
//! [`start_with`] also names the configuration file, so that [`Running::reloader`] (and
//! `POST /admin/reload`) can reload it, and can watch its directory for changes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::audit::{AuditSink, AuditWriter};
use crate::config::Validated;
use crate::gateway::{Gateway, Snapshot};
use crate::identify::api_key::{ApiKeys, KeyAdmin};
use crate::identify::Identifier;
use crate::listener::{self, ServeOptions};
use crate::metrics::Metrics;
use crate::reload::Reloader;
use crate::upstream_auth::BackendCredentials;
use crate::usage_log::{UsageCounters, UsageWriter, UsageWriterOptions};
use crate::worker;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open audit output {path}: {source}")]
    Audit {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Build(#[from] crate::routing::BuildError),
    #[error(transparent)]
    Credentials(#[from] crate::upstream_auth::SetupError),
    #[error("cannot open the key store (store.url): {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("limits.redis_url: {0}")]
    Redis(#[from] crate::admit::redis::RedisLimitError),
    #[error("telemetry.otlp_endpoint: {0}")]
    Telemetry(#[from] crate::telemetry::TelemetryError),
    #[error("{listener} listener TLS: {message}")]
    Tls {
        listener: &'static str,
        message: String,
    },
}

/// A listener's TLS state, watching its files, when its section asks for TLS.
fn tls_state(
    settings: &Option<crate::config::tls::TlsSettings>,
    metrics: &Metrics,
) -> Result<Option<Arc<crate::tls::server::ServerTls>>, StartError> {
    let Some(s) = settings else {
        return Ok(None);
    };
    let tls = crate::tls::server::ServerTls::start(s.clone(), metrics).map_err(|message| {
        StartError::Tls {
            listener: s.listener,
            message,
        }
    })?;
    if let Err(e) = tls.watch() {
        tracing::warn!(listener = s.listener, error = %e, "TLS files are not watched; changes need a restart");
    }
    Ok(Some(tls))
}

/// The limit counters `[limits]` asks for.
async fn limiter(v: &Validated, metrics: &Metrics) -> Result<crate::admit::Limiter, StartError> {
    use crate::config::limits::LimitsBackend;
    let l = &v.config.limits;
    let m = metrics.accounting.clone();
    let url = match (l.backend, &l.redis_url) {
        (LimitsBackend::Redis, Some(url)) => url,
        _ => return Ok(crate::admit::Limiter::memory(m)),
    };
    let mut rc = crate::admit::redis::RedisLimiterConfig::new(url.expose());
    rc.namespace = l.redis_prefix.as_str().to_owned();
    rc.response_timeout = l.redis_timeout.0;
    rc.connect_timeout = l.redis_timeout.0;
    let redis = crate::admit::redis::RedisLimiter::new(&rc)?;
    // Connect now, on this long-lived runtime; a gateway still starts while Redis is down
    // (`on_redis_error` then applies until it answers).
    match redis.ping().await {
        Ok(()) => tracing::info!("limit counters in Redis, shared by every replica"),
        Err(e) => {
            tracing::warn!(error = %e, "Redis does not answer yet; on_redis_error applies until it does")
        }
    }
    Ok(crate::admit::Limiter::shared(redis, l.on_redis_error, m))
}

/// A running gateway.
pub struct Running {
    /// Client-facing address actually bound.
    pub addr: SocketAddr,
    /// Admin address actually bound, if enabled.
    pub admin_addr: Option<SocketAddr>,
    pub gateway: Arc<Gateway>,
    stop: watch::Sender<bool>,
    /// Stops the admin listener, after the workers have drained.
    admin_stop: watch::Sender<bool>,
    /// Time between reporting not-ready and closing the listeners.
    shutdown_delay: Duration,
    /// Worker threads serving the client listener.
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Tasks on the caller's runtime (the admin listener).
    tasks: Vec<JoinHandle<()>>,
    audit_writer: AuditWriter,
    /// The trace exporter, flushed last.
    telemetry: Option<crate::telemetry::Telemetry>,
    /// The API-key table and its store, when `store.key_hmac_secret` is set.
    keys: Option<Keys>,
    /// Writes usage records to the store (`store.record_usage`).
    usage: Option<Arc<UsageWriter>>,
    /// Reloads the configuration; holds the backend credentials, whose token refreshers
    /// stop at shutdown.
    reloader: Arc<Reloader>,
    /// The task reloading on changes to the configuration file, when watched.
    watcher: Option<JoinHandle<()>>,
}

/// How [`start_with`] starts a gateway.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The file the configuration was read from: reloads read it again.
    pub config_file: Option<PathBuf>,
    /// Reload when the file's directory changes (see [`Reloader::watch`]).
    pub watch: bool,
}

/// API keys of a running gateway: what requests check, and the store to manage them.
pub struct Keys {
    pub admin: KeyAdmin,
    pub api_keys: Arc<ApiKeys>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Start the gateway described by `v` (not reloadable from a file).
pub async fn start(v: &Validated) -> Result<Running, StartError> {
    start_with(v, StartOptions::default()).await
}

/// Start the gateway described by `v`, read from `opts.config_file`.
pub async fn start_with(v: &Validated, opts: StartOptions) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    let audit_path = match v.config.audit.path.as_str() {
        "-" => "-".to_owned(),
        p => v.base_dir.join(p).display().to_string(),
    };
    let (audit, audit_writer) =
        AuditSink::start(&audit_path, metrics.clone()).map_err(|source| StartError::Audit {
            path: audit_path.clone(),
            source,
        })?;
    let st = &v.config.store;
    let store = if v.key_hmac_secret.is_some() || st.record_usage {
        Some(crate::store::open_store(st.url.as_str(), &v.base_dir).await?)
    } else {
        None
    };
    let keys = match (&v.key_hmac_secret, &store) {
        (Some(secret), Some(store)) => {
            let store: Arc<dyn crate::store::KeyStore> = store.clone();
            let api_keys = ApiKeys::start(
                store.clone(),
                secret,
                st.refresh_interval.0,
                st.last_used_flush.0,
            )
            .await?;
            Some(Keys {
                admin: KeyAdmin::new(store, secret),
                api_keys,
            })
        }
        _ => None,
    };
    let usage_store = store.clone().filter(|_| st.record_usage);
    let usage = match &store {
        Some(store) if st.record_usage => Some(Arc::new(UsageWriter::start(
            store.clone(),
            UsageWriterOptions {
                capacity: st.usage_queue,
                flush_interval: st.usage_flush.0,
                ..UsageWriterOptions::default()
            },
            Some(UsageCounters::from_metrics(&metrics)),
            &tokio::runtime::Handle::current(),
        ))),
        _ => None,
    };
    if !v.config.issuers.is_empty() && v.config.auth.resource.is_none() {
        tracing::warn!(
            "auth.resource is not set: the RFC 9728 document and WWW-Authenticate challenges \
             name http://<Host header>; set it to the URL clients use (https behind TLS)"
        );
    }
    let key_check = keys
        .as_ref()
        .map(|k| k.api_keys.clone() as Arc<dyn crate::identify::KeyCheck>);
    let identity = Identifier::build(v, key_check.clone(), metrics.clone());
    let credentials = BackendCredentials::start(v, &metrics)?;
    let health = crate::routing::health::HealthRegistry::new(&metrics);
    let snapshot = Snapshot::build(
        v,
        identity,
        &credentials.credentials,
        &metrics,
        &health,
        None,
    )?;
    let budget =
        crate::buffer::BodyBudget::new(v.max_buffered_body_bytes, v.config.server.buffer_wait.0);
    // The tokenizer tables, loaded before the first request rather than by it, when this
    // configuration estimates requests (otherwise only if an answer ever needs counting).
    if snapshot.estimates_tokens() {
        let _ = tokio::task::spawn_blocking(crate::tokens::warm_up).await;
    }
    let limiter = Arc::new(limiter(v, &metrics).await?);
    let accounting = Arc::new(crate::account::Accounting {
        writer: usage.clone(),
        metrics: metrics.accounting.clone(),
    });
    let telemetry = match &v.telemetry {
        Some(t) => Some(crate::telemetry::Telemetry::start(t)?),
        None => None,
    };
    let server_tls = tls_state(&v.server_tls, &metrics)?;
    let admin_tls = tls_state(&v.admin_tls, &metrics)?;
    let gateway = Arc::new(
        Gateway::new(
            snapshot, metrics, audit, budget, limiter, accounting, health,
        )
        .with_tls(server_tls.clone())
        .with_telemetry(telemetry.clone()),
    );
    let reloader = Arc::new(
        Reloader::new(
            opts.config_file.clone(),
            v,
            gateway.clone(),
            key_check,
            credentials,
        )
        .with_tls(server_tls.iter().chain(&admin_tls).cloned().collect()),
    );

    let bind_err = |source| StartError::Bind {
        addr: v.listen,
        source,
    };
    let workers = worker::count(v.config.server.workers);
    let listeners = worker::bind_shared(v.listen, workers).map_err(bind_err)?;
    let addr = listeners[0].local_addr().map_err(bind_err)?;
    let admin_listener = match v.admin_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

    let (stop, stopped) = watch::channel(false);
    let (admin_stop, admin_stopped) = watch::channel(false);
    let watch = opts.watch;
    let opts = ServeOptions {
        header_timeout: v.config.server.header_timeout.0,
        drain_timeout: v.config.server.drain_timeout.0,
        tls: server_tls,
    };
    let mut threads = Vec::with_capacity(workers);
    for (i, l) in listeners.into_iter().enumerate() {
        let gw = gateway.clone();
        let stopped = stopped.clone();
        let opts = opts.clone();
        let thread = worker::spawn(i, move || async move {
            match TcpListener::from_std(l) {
                Ok(l) => {
                    let svc = move |req: Request<Incoming>, peer| gw.clone().handle(req, peer);
                    listener::serve(l, svc, opts, wait_for(stopped)).await;
                }
                Err(e) => tracing::error!(worker = i, error = %e, "cannot register listener"),
            }
        })
        .map_err(bind_err)?;
        threads.push(thread);
    }
    let mut tasks = Vec::new();
    if let Some(l) = admin_listener {
        let stores = crate::admin::Stores {
            keys: match (&keys, &v.key_hmac_secret) {
                (Some(k), Some(secret)) => Some((
                    KeyAdmin::new(k.admin.store().clone(), secret),
                    k.api_keys.clone(),
                )),
                _ => None,
            },
            usage: usage_store,
        };
        let admin = Admin::new(gateway.clone(), reloader.clone(), stores);
        tasks.push(tokio::spawn(listener::serve(
            l,
            move |req: Request<Incoming>, peer| {
                let admin = admin.clone();
                async move { admin.handle(req, peer).await }
            },
            ServeOptions {
                drain_timeout: Duration::from_secs(1),
                tls: admin_tls,
                ..opts.clone()
            },
            wait_for(admin_stopped),
        )));
    }
    let watcher = if watch {
        match reloader.watch() {
            Ok(task) => Some(task),
            Err(e) => {
                tracing::warn!(error = %e, "configuration changes are not watched; reload with SIGHUP or POST /admin/reload");
                None
            }
        }
    } else {
        None
    };
    tracing::info!(%addr, admin = ?admin_addr, workers, backends = v.config.backends.len(), max_buffered_body_bytes = v.max_buffered_body_bytes, "portcullis is listening");
    Ok(Running {
        addr,
        admin_addr,
        gateway,
        stop,
        admin_stop,
        shutdown_delay: v.config.server.shutdown_delay.0,
        threads,
        tasks,
        audit_writer,
        keys,
        usage,
        reloader,
        watcher,
        telemetry,
    })
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

impl Running {
    /// Begin graceful shutdown: report not ready at once, keep serving for
    /// `server.shutdown_delay` (so load balancers see the 503 and stop sending), then stop
    /// accepting and drain. Call from within the runtime.
    pub fn shutdown(&self) {
        self.gateway.begin_drain();
        if self.shutdown_delay.is_zero() {
            let _ = self.stop.send(true);
            return;
        }
        let stop = self.stop.clone();
        let delay = self.shutdown_delay;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = stop.send(true);
        });
    }

    /// The API keys, when enabled: issue keys into the running gateway's store (the demo,
    /// tests) and reload them at once.
    pub fn keys(&self) -> Option<&Keys> {
        self.keys.as_ref()
    }

    /// What reloads this gateway's configuration.
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// Wait until listeners are drained, key uses and the audit log are flushed.
    pub async fn wait(self) {
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        // The admin listener (readiness, metrics) outlives the drain.
        let _ = self.admin_stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Some(k) = &self.keys {
            if let Err(e) = k.api_keys.flush().await {
                tracing::warn!(error = %e, "could not record the API keys' last use at shutdown");
            }
        }
        if let Some(u) = &self.usage {
            u.flush_and_stop().await;
        }
        if let Some(w) = self.watcher {
            w.abort();
            let _ = w.await;
        }
        self.reloader.stop().await;
        drop(self.reloader);
        drop(self.gateway);
        // Every request has ended: export the spans still queued.
        if let Some(t) = &self.telemetry {
            t.shutdown().await;
        }
        // The writer ends once the last sink (held by finished requests) is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.audit_writer.join()).await;
    }
}
