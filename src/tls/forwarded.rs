//! The client certificate a TLS-terminating proxy forwards in a header (placeholder until
//! the full parser lands).

use rustls::pki_types::CertificateDer;

/// How the header carries the certificate (`forwarded_cert.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedFormat {
    Xfcc,
    PemUrlencoded,
}

/// A header that does not carry a readable certificate.
#[derive(Debug, thiserror::Error)]
#[error("no certificate could be read")]
pub struct ForwardedError;

/// The leaf and any chain certificates (DER) the header carries, leaf first.
pub fn parse(
    _format: ForwardedFormat,
    _value: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ForwardedError> {
    Err(ForwardedError)
}
