//! What a client certificate says about its holder: subject, common names, SAN DNS names,
//! URIs and emails, and the SHA-256 thumbprint of the DER certificate. Read with
//! `x509-parser` from a certificate rustls (or the forwarded-certificate check) has
//! verified; never the certificate itself in messages.

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The identity fields of a client certificate (never the certificate itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// The subject as RFC 4514-style text (`CN=batch, O=Corp`), as x509-parser writes it.
    pub subject: String,
    /// The subject's common names (usually one).
    pub common_names: Vec<String>,
    /// SAN dNSName entries, lowercased.
    pub dns: Vec<String>,
    /// SAN uniformResourceIdentifier entries, as written.
    pub uris: Vec<String>,
    /// SAN rfc822Name entries, lowercased.
    pub emails: Vec<String>,
    /// SHA-256 of the DER certificate, lowercase hex without separators.
    pub sha256: String,
}

/// A certificate that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum CertParseError {
    #[error("not a DER X.509 certificate")]
    NotACertificate,
    #[error("{0} bytes after the certificate")]
    Trailing(usize),
    #[error("its subject alternative names cannot be read")]
    BadSan,
}

/// Lowercase hex of the SHA-256 of `der`.
pub fn sha256_hex(der: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl CertIdentity {
    /// Parse a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, CertParseError> {
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|_| CertParseError::NotACertificate)?;
        if !rest.is_empty() {
            return Err(CertParseError::Trailing(rest.len()));
        }
        let subject = cert.subject();
        let common_names = subject
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
            .collect();
        let (mut dns, mut uris, mut emails) = (Vec::new(), Vec::new(), Vec::new());
        if let Some(san) = cert
            .subject_alternative_name()
            .map_err(|_| CertParseError::BadSan)?
        {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) => dns.push(d.to_ascii_lowercase()),
                    GeneralName::URI(u) => uris.push((*u).to_owned()),
                    GeneralName::RFC822Name(e) => emails.push(e.to_ascii_lowercase()),
                    _ => {}
                }
            }
        }
        Ok(Self {
            subject: subject.to_string(),
            common_names,
            dns,
            uris,
            emails,
            sha256: sha256_hex(der),
        })
    }

    /// SAN entries as the audit line writes them: `DNS:x`, `URI:y`, `email:z`.
    pub fn san(&self) -> Vec<String> {
        let dns = self.dns.iter().map(|d| format!("DNS:{d}"));
        let uris = self.uris.iter().map(|u| format!("URI:{u}"));
        let emails = self.emails.iter().map(|e| format!("email:{e}"));
        dns.chain(uris).chain(emails).collect()
    }
}

/// The certificate's `notAfter` (unix seconds), if it parses.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// A configured thumbprint as lowercase hex: hex digits with optional `:` or space
/// separators, any case, 32 bytes.
pub fn normalize_sha256(text: &str) -> Result<String, String> {
    let hex: String = text
        .chars()
        .filter(|c| !matches!(c, ':' | ' '))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "'{}' is not a SHA-256 thumbprint (64 hex digits, ':' separators allowed)",
            text.escape_default()
        ));
    }
    Ok(hex)
}
