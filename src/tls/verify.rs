//! Client certificate verification that follows the files: chain to `client_ca_file`,
//! validity period, the clientAuth extended key usage, and `crl_files`.
//!
//! [`ClientVerifier`] is the rustls [`ClientCertVerifier`] of a listener. It delegates to a
//! `WebPkiClientVerifier` built from the current CA bundle and CRLs, kept in an
//! [`ArcSwap`] and replaced when the files change; each replacement bumps a generation
//! counter. rustls verifies a certificate in a full handshake only: a resumed TLS session
//! carries the certificate verified when the session began, and a keep-alive connection the
//! one verified when it opened. So the listener records, per connection, the generation its
//! certificate was last verified under ([`Checked`]), and the identify stage verifies it
//! again — once — when the generation has moved on, when the session was resumed, or when
//! the certificate has expired since (see [`ClientVerifier::recheck`]). A revocation thus
//! takes effect for the next request of every connection.
//!
//! Revocation status is checked at every level of the chain that a loaded CRL covers; a
//! certificate whose issuer has no CRL in `crl_files` is not revocation-checked (so a bundle
//! of several CAs may come with CRLs for some of them).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::config::tls::{ClientAuth, CrlExpired, TlsSettings};
use crate::metrics::CertFailureLabels;

/// Why a client certificate was refused, as the metric labels it.
pub fn reason(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::Revoked => "revoked",
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_issuer",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "bad_usage"
            }
            CertificateError::ExpiredRevocationList
            | CertificateError::ExpiredRevocationListContext { .. } => "crl_expired",
            _ => "malformed",
        },
        rustls::Error::NoCertificatesPresented => "missing",
        _ => "malformed",
    }
}

/// What a refusal says to the client (401 `invalid_client_certificate`), without the
/// certificate itself.
pub fn describe(e: &rustls::Error) -> &'static str {
    match reason(e) {
        "expired" => "the client certificate has expired",
        "not_yet_valid" => "the client certificate is not valid yet",
        "revoked" => "the client certificate is revoked",
        "unknown_issuer" => "the client certificate was not issued by a trusted CA",
        "bad_usage" => {
            "the client certificate is not for client authentication (extended key usage)"
        }
        "crl_expired" => "the revocation list for the client certificate has expired",
        "missing" => "no client certificate was presented",
        _ => "the client certificate is malformed or unsupported",
    }
}

/// The verifier of one listener; see the module docs.
pub struct ClientVerifier {
    current: ArcSwap<Arc<dyn ClientCertVerifier>>,
    generation: AtomicU64,
    mandatory: bool,
    failures: Family<CertFailureLabels, Counter>,
}

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("generation", &self.generation())
            .field("mandatory", &self.mandatory)
            .finish()
    }
}

/// Build the webpki verifier from the files of `s`.
fn build(s: &TlsSettings) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let Some(ca) = &s.client_ca else {
        return Err("no client_ca_file".into());
    };
    let roots = Arc::new(super::material::roots(ca)?);
    let crls = super::material::crls(&s.crls)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut b = WebPkiClientVerifier::builder_with_provider(roots, provider)
        .with_crls(crls)
        .allow_unknown_revocation_status();
    if s.crl_expired == CrlExpired::Deny {
        b = b.enforce_revocation_expiration();
    }
    if s.client_auth != ClientAuth::Required {
        b = b.allow_unauthenticated();
    }
    b.build()
        .map_err(|e| format!("cannot build the client verifier: {e}"))
}

impl ClientVerifier {
    /// The verifier for `s` (which must have a `client_ca`).
    pub fn new(
        s: &TlsSettings,
        failures: Family<CertFailureLabels, Counter>,
    ) -> Result<Arc<Self>, String> {
        Ok(Arc::new(Self {
            current: ArcSwap::from_pointee(build(s)?),
            generation: AtomicU64::new(1),
            mandatory: s.client_auth == ClientAuth::Required,
            failures,
        }))
    }

    /// Read the CA bundle and CRLs again. On failure the verifier in use stays.
    pub fn reload(&self, s: &TlsSettings) -> Result<(), String> {
        let v = build(s)?;
        self.current.store(Arc::new(v));
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Bumped on every reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Verify a chain (leaf first) with the current files, counting a failure by reason.
    pub fn verify(&self, chain: &[CertificateDer<'_>]) -> Result<(), rustls::Error> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            self.count(&rustls::Error::NoCertificatesPresented);
            return Err(rustls::Error::NoCertificatesPresented);
        };
        self.current
            .load()
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .inspect_err(|e| self.count(e))
    }

    /// Verify `checked`'s certificate again if it was verified under an older generation,
    /// or came from a resumed session, or has expired since; see the module docs.
    pub fn recheck(&self, checked: &Checked) -> Result<(), rustls::Error> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let generation = self.generation();
        if checked.generation.load(Ordering::Acquire) == generation
            && now < checked.not_after.load(Ordering::Relaxed)
        {
            return Ok(());
        }
        self.verify(&checked.chain)?;
        checked.generation.store(generation, Ordering::Release);
        Ok(())
    }

    /// Count a refused certificate.
    pub fn count(&self, e: &rustls::Error) {
        self.count_reason(reason(e));
    }

    /// Count a refused certificate by the metric's reason label.
    pub fn count_reason(&self, reason: &'static str) {
        self.failures
            .get_or_create(&CertFailureLabels { reason })
            .inc();
    }
}

/// A connection's client certificate and when it was last verified.
#[derive(Debug)]
pub struct Checked {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The [`ClientVerifier::generation`] it was verified under; 0 = never (a resumed
    /// session: verified when the session began, on another connection).
    pub generation: AtomicU64,
    /// The leaf's `notAfter` (unix seconds): verified again from then on.
    pub not_after: AtomicI64,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle can change under a running listener, and a borrowed list cannot follow
        // it; clients then offer the certificate they were configured with.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current
            .load()
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                self.count(e);
                tracing::info!(
                    reason = reason(e),
                    "client certificate refused in the TLS handshake"
                );
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.load().supported_verify_schemes()
    }
}
