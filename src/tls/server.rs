//! A listener's TLS: the rustls server configuration (TLS 1.2 and 1.3, ALPN `h2` and
//! `http/1.1`), its certificate and client verifier, both replaced when their files change.
//!
//! The served certificate is picked per handshake by a resolver holding the current
//! [`CertifiedKey`] in an [`ArcSwap`]: a new one serves new handshakes, and connections
//! already open keep the session they have. The files' directories are watched (not the
//! files: editors and Kubernetes' `..data` symlink swap replace them); a change reloads
//! after [`crate::reload::DEBOUNCE`] of quiet, and a file that does not load keeps what is
//! in use, with an error naming the path. SIGHUP / `POST /admin/reload` reload them too.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use prometheus_client::metrics::gauge::Gauge;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::verify::ClientVerifier;
use crate::config::tls::TlsSettings;
use crate::metrics::Metrics;

/// TLS sessions remembered for resumption, per listener.
const SESSIONS: usize = 8192;

/// The current certificate, for every handshake.
#[derive(Debug)]
struct Resolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// One listener's TLS state; see the module docs.
pub struct ServerTls {
    settings: TlsSettings,
    resolver: Option<Arc<Resolver>>,
    /// Set when client certificates are verified (in the handshake or from a header).
    verifier: Option<Arc<ClientVerifier>>,
    config: Option<Arc<rustls::ServerConfig>>,
    /// Days until the served certificate expires.
    expiry: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// A digest of the verifier's files as last loaded: unchanged files do not bump its
    /// generation (which would make every connection verify its certificate again).
    verifier_files: Mutex<Vec<u8>>,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("listener", &self.settings.listener)
            .field("terminates", &self.config.is_some())
            .field("verifier", &self.verifier)
            .finish()
    }
}

fn files_digest(s: &TlsSettings) -> Vec<u8> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for p in s.client_ca.iter().chain(&s.crls) {
        ctx.update(p.as_os_str().as_encoded_bytes());
        ctx.update(&std::fs::read(p).unwrap_or_default());
    }
    ctx.finish().as_ref().to_vec()
}

impl ServerTls {
    /// Load everything `settings` names (already validated once).
    pub fn start(settings: TlsSettings, metrics: &Metrics) -> Result<Arc<Self>, String> {
        let verifier = match settings.verifies_clients() {
            true => Some(ClientVerifier::new(
                &settings,
                metrics.client_cert_failures.clone(),
            )?),
            false => None,
        };
        let expiry = metrics.tls_expiry(settings.listener);
        let (resolver, config) = match &settings.identity {
            Some((cert, key)) => {
                let ck = super::material::certified_key(cert, key).map_err(|e| e.message)?;
                if let Some(s) = super::material::seconds_left(&ck.cert) {
                    expiry.set(s / 86_400.0);
                }
                let resolver = Arc::new(Resolver(ArcSwap::new(ck)));
                let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
                let builder = rustls::ServerConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                    .map_err(|e| format!("TLS versions: {e}"))?;
                let builder = match (&verifier, settings.client_auth) {
                    (Some(v), a) if a != crate::config::tls::ClientAuth::Off => {
                        builder.with_client_cert_verifier(v.clone())
                    }
                    _ => builder.with_no_client_auth(),
                };
                let mut config = builder.with_cert_resolver(resolver.clone());
                config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                // Resumption (stateful: session ids and TLS 1.3 tickets naming an entry here)
                // spares returning clients a full handshake. It cannot let a revoked or
                // expired client certificate back in: see `verify::ClientVerifier::recheck`.
                config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSIONS);
                (Some(resolver), Some(Arc::new(config)))
            }
            None => (None, None),
        };
        Ok(Arc::new(Self {
            verifier_files: Mutex::new(files_digest(&settings)),
            settings,
            resolver,
            verifier,
            config,
            expiry,
            watcher: Mutex::new(None),
        }))
    }

    /// The acceptor for new connections; `None` when TLS ends before the gateway.
    pub fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.config.clone().map(tokio_rustls::TlsAcceptor::from)
    }

    /// The client certificate verifier, when this listener checks client certificates.
    pub fn verifier(&self) -> Option<&Arc<ClientVerifier>> {
        self.verifier.as_ref()
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }

    /// Read the files again; what fails to load is logged with its path and keeps serving
    /// what was loaded before.
    pub fn reload(&self) {
        if let (Some(r), Some((cert, key))) = (&self.resolver, &self.settings.identity) {
            match super::material::certified_key(cert, key) {
                Ok(ck) => {
                    let changed = r.0.load().cert != ck.cert;
                    if let Some(s) = super::material::seconds_left(&ck.cert) {
                        self.expiry.set(s / 86_400.0);
                    }
                    r.0.store(ck);
                    if changed {
                        tracing::info!(listener = self.settings.listener, cert = %cert.display(), "serving a new TLS certificate");
                    }
                }
                Err(e) => tracing::error!(
                    listener = self.settings.listener,
                    error = %e.message,
                    "TLS certificate not reloaded; the one loaded before stays in use"
                ),
            }
        }
        if let Some(v) = &self.verifier {
            let digest = files_digest(&self.settings);
            let mut last = self
                .verifier_files
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if *last != digest {
                match v.reload(&self.settings) {
                    Ok(()) => {
                        *last = digest;
                        tracing::info!(
                            listener = self.settings.listener,
                            "client CA bundle and CRLs reloaded"
                        );
                    }
                    Err(e) => tracing::error!(
                        listener = self.settings.listener,
                        error = %e,
                        "client CA bundle / CRLs not reloaded; the ones loaded before stay in use"
                    ),
                }
            }
        }
    }

    /// Every file this listener reads.
    fn files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some((c, k)) = &self.settings.identity {
            files.push(c.clone());
            files.push(k.clone());
        }
        files.extend(self.settings.client_ca.iter().cloned());
        files.extend(self.settings.crls.iter().cloned());
        files
    }

    /// Reload when a file changes (see the module docs), until this state is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<(), notify::Error> {
        use notify::Watcher as _;
        let files = self.files();
        let names: Vec<OsString> = files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_owned()))
            .collect();
        let mut dirs: Vec<PathBuf> = files
            .iter()
            .map(|f| match f.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if let Ok(e) = event {
                    let names: Vec<&std::ffi::OsStr> =
                        names.iter().map(|n| n.as_os_str()).collect();
                    if crate::reload::touches(&e, &names) {
                        let _ = tx.try_send(());
                    }
                }
            })?;
        for d in &dirs {
            watcher.watch(d, notify::RecursiveMode::NonRecursive)?;
        }
        *self.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
        let me = Arc::downgrade(self);
        let listener = self.settings.listener;
        std::thread::Builder::new()
            .name(format!("portcullis-tls-watch-{listener}"))
            .spawn(move || {
                while rx.recv().is_ok() {
                    // Quiet for DEBOUNCE before reading.
                    while rx.recv_timeout(crate::reload::DEBOUNCE).is_ok() {}
                    let Some(tls) = me.upgrade() else { return };
                    tls.reload();
                }
            })
            .map_err(notify::Error::io)?;
        tracing::info!(listener, dirs = ?dirs, "watching the TLS files for changes");
        Ok(())
    }
}
