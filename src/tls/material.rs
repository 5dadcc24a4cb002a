//! Reading TLS material from PEM (or DER) files: the served certificate chain and its key,
//! the client CA bundle, and CRLs. Every error names the file and what is wrong, never the
//! key's bytes.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

/// A problem with the certificate or the key, and which of the two keys it is about.
#[derive(Debug)]
pub struct MaterialError {
    /// `cert_file` or `key_file`.
    pub key: &'static str,
    pub message: String,
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Every certificate in a PEM file.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{}: no certificate (expected PEM CERTIFICATE blocks)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The chain in `cert` and the private key in `key`, checked to belong together.
pub fn certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, MaterialError> {
    let cert_err = |message| MaterialError {
        key: "cert_file",
        message,
    };
    let key_err = |message| MaterialError {
        key: "key_file",
        message,
    };
    let chain = certificates(cert).map_err(cert_err)?;
    let bytes = read(key).map_err(key_err)?;
    let der: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| key_err(format!("{}: not valid PEM: {e}", key.display())))?
        .ok_or_else(|| {
            key_err(format!(
                "{}: no private key (expected a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)",
                key.display()
            ))
        })?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let ck = CertifiedKey::from_der(chain, der, &provider).map_err(|e| {
        key_err(match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "{}: the key does not belong to the certificate in {}",
                key.display(),
                cert.display()
            ),
            other => format!("{}: unusable key: {other}", key.display()),
        })
    })?;
    Ok(Arc::new(ck))
}

/// The trust anchors of a PEM bundle (roots, and any intermediates it holds).
pub fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    for (i, c) in certificates(path)?.into_iter().enumerate() {
        store.add(c).map_err(|e| {
            format!(
                "{}: certificate {} is not a usable CA certificate: {e}",
                path.display(),
                i + 1
            )
        })?;
    }
    Ok(store)
}

/// The CRLs of every file (each PEM with "BEGIN X509 CRL" blocks, or one DER CRL).
pub fn crls(
    paths: &[impl AsRef<Path>],
) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let mut all = Vec::new();
    for p in paths {
        let path = p.as_ref();
        let bytes = read(path)?;
        let found: Vec<_> =
            if bytes.starts_with(b"-----") || bytes.iter().take(64).all(|b| b.is_ascii()) {
                rustls_pemfile::crls(&mut bytes.as_slice())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("{}: not valid PEM: {e}", path.display()))?
            } else {
                vec![CertificateRevocationListDer::from(bytes)]
            };
        if found.is_empty() {
            return Err(format!(
                "{}: no CRL (expected PEM X509 CRL blocks or one DER CRL)",
                path.display()
            ));
        }
        for crl in &found {
            webpki::OwnedCertRevocationList::from_der(crl.as_ref())
                .map_err(|e| format!("{}: not a valid CRL: {e:?}", path.display()))?;
        }
        all.extend(found);
    }
    Ok(all)
}

/// Seconds from now until the leaf of `chain` expires (negative once it has).
pub fn seconds_left(chain: &[CertificateDer<'_>]) -> Option<f64> {
    let leaf = chain.first()?;
    let not_after = crate::tls::identity::not_after(leaf.as_ref())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    Some((not_after - now) as f64)
}
