//! `[server.tls]`, `[admin.tls]` and `[[clients]].certificates`: their types and validation.
//!
//! Validation reads every file named (certificate chain, key, client CA bundle, CRLs) and
//! reports what is wrong with it under the key that names it; the listener reads them again
//! at start and whenever they change ([`crate::tls`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::values::Text;
use super::{problem, Config, Problem};
use crate::tls::forwarded::ForwardedFormat;

/// `[server.tls]` / `[admin.tls]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    #[serde(default)]
    pub cert_file: Option<Text>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<Text>,
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// PEM certificates client certificates must chain to.
    #[serde(default)]
    pub client_ca_file: Option<Text>,
    /// PEM or DER certificate revocation lists, reloaded when they change.
    #[serde(default)]
    pub crl_files: Vec<Text>,
    #[serde(default)]
    pub crl_expired: CrlExpired,
    /// The client certificate from a TLS-terminating proxy's header.
    #[serde(default)]
    pub forwarded_cert: Option<ForwardedCertConfig>,
}

/// `client_auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// No client certificate is asked for.
    #[default]
    Off,
    /// Asked for; a connection without one may still authenticate otherwise.
    Optional,
    /// The handshake fails without a valid client certificate.
    Required,
}

/// `crl_expired`: a CRL past its `nextUpdate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CrlExpired {
    /// Certificates it covers are refused until a fresh CRL is in place.
    #[default]
    Deny,
    /// The CRL is used as it is.
    Allow,
}

/// `forwarded_cert = { header, format, trusted_proxies }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardedCertConfig {
    pub header: Text,
    pub format: ForwardedFormat,
    /// TCP peers (addresses or CIDR ranges) whose header is read; from others it is removed.
    pub trusted_proxies: Vec<Text>,
}

/// One entry of `[[clients]].certificates`: exactly one of the keys.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CertificateBinding {
    #[serde(default)]
    pub san_dns: Option<Text>,
    #[serde(default)]
    pub san_uri: Option<Text>,
    #[serde(default)]
    pub san_email: Option<Text>,
    #[serde(default)]
    pub subject_cn: Option<Text>,
    /// SHA-256 thumbprint of the DER certificate (pinning); hex, `:` separators allowed.
    #[serde(default)]
    pub sha256: Option<Text>,
}

/// What a binding matches, normalised (DNS names and emails lowercased, thumbprints as
/// lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CertMatcher {
    SanDns(String),
    SanUri(String),
    SanEmail(String),
    SubjectCn(String),
    Sha256(String),
}

impl CertMatcher {
    /// The key as written in the configuration.
    pub fn key(&self) -> &'static str {
        match self {
            Self::SanDns(_) => "san_dns",
            Self::SanUri(_) => "san_uri",
            Self::SanEmail(_) => "san_email",
            Self::SubjectCn(_) => "subject_cn",
            Self::Sha256(_) => "sha256",
        }
    }
}

/// A validated TLS section: absolute paths and parsed options.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Which section, for messages and metrics: `client` or `admin`.
    pub listener: &'static str,
    /// Certificate chain and key; `None` when TLS is terminated before the gateway (only
    /// `forwarded_cert` is used).
    pub identity: Option<(PathBuf, PathBuf)>,
    pub client_auth: ClientAuth,
    pub client_ca: Option<PathBuf>,
    pub crls: Vec<PathBuf>,
    pub crl_expired: CrlExpired,
    pub forwarded: Option<ForwardedCert>,
}

impl TlsSettings {
    /// Whether client certificates are checked at all (in the handshake or from a header).
    pub fn verifies_clients(&self) -> bool {
        self.client_ca.is_some()
    }
}

/// A validated `forwarded_cert`.
#[derive(Debug, Clone)]
pub struct ForwardedCert {
    pub header: http::HeaderName,
    pub format: ForwardedFormat,
    pub trusted: Vec<ipnet::IpNet>,
}

/// Validate one TLS section (`path` is `server.tls` or `admin.tls`).
pub(super) fn validate_section(
    tls: &TlsConfig,
    path: &str,
    listener: &'static str,
    base_dir: &Path,
    problems: &mut Vec<Problem>,
) -> Option<TlsSettings> {
    let before = problems.len();
    let file = |f: &Text| base_dir.join(f.as_str());
    let identity = match (&tls.cert_file, &tls.key_file) {
        (Some(c), Some(k)) => {
            let (c, k) = (file(c), file(k));
            if let Err(e) = crate::tls::material::certified_key(&c, &k) {
                problem(problems, format!("{path}.{}", e.key), e.message);
            }
            Some((c, k))
        }
        (Some(_), None) => {
            problem(
                problems,
                format!("{path}.key_file"),
                "required with cert_file",
            );
            None
        }
        (None, Some(_)) => {
            problem(
                problems,
                format!("{path}.cert_file"),
                "required with key_file",
            );
            None
        }
        (None, None) => {
            if tls.forwarded_cert.is_none() || listener == "admin" {
                problem(
                    problems,
                    path,
                    "cert_file and key_file are required (only a section with forwarded_cert may leave them out: TLS is then terminated before the gateway)",
                );
            }
            None
        }
    };
    if tls.client_auth != ClientAuth::Off && identity.is_none() && tls.forwarded_cert.is_some() {
        problem(
            problems,
            format!("{path}.client_auth"),
            "asks for certificates in a TLS handshake, but this listener does not terminate TLS (no cert_file): leave it \"off\" and rely on forwarded_cert",
        );
    }
    let wants_ca = tls.client_auth != ClientAuth::Off || tls.forwarded_cert.is_some();
    let client_ca = match (&tls.client_ca_file, wants_ca) {
        (Some(f), _) => {
            let p = file(f);
            if let Err(e) = crate::tls::material::roots(&p) {
                problem(problems, format!("{path}.client_ca_file"), e);
            }
            if !wants_ca {
                problem(
                    problems,
                    format!("{path}.client_ca_file"),
                    "is not used: client_auth is \"off\" and there is no forwarded_cert",
                );
            }
            Some(p)
        }
        (None, true) => {
            problem(
                problems,
                format!("{path}.client_ca_file"),
                "required to verify client certificates (client_auth or forwarded_cert)",
            );
            None
        }
        (None, false) => None,
    };
    let mut crls = Vec::new();
    for (i, f) in tls.crl_files.iter().enumerate() {
        let p = file(f);
        if let Err(e) = crate::tls::material::crls(std::slice::from_ref(&p)) {
            problem(problems, format!("{path}.crl_files[{i}]"), e);
        }
        crls.push(p);
    }
    if !crls.is_empty() && client_ca.is_none() {
        problem(
            problems,
            format!("{path}.crl_files"),
            "is not used without client_ca_file",
        );
    }
    let forwarded = match &tls.forwarded_cert {
        Some(_) if listener == "admin" => {
            problem(
                problems,
                format!("{path}.forwarded_cert"),
                "is only supported on the client listener ([server.tls])",
            );
            None
        }
        Some(f) => {
            let header = match http::HeaderName::from_bytes(f.header.as_str().as_bytes()) {
                Ok(h) => Some(h),
                Err(_) => {
                    problem(
                        problems,
                        format!("{path}.forwarded_cert.header"),
                        format!(
                            "'{}' is not a header name",
                            f.header.as_str().escape_default()
                        ),
                    );
                    None
                }
            };
            let trusted = super::parse_nets(
                &f.trusted_proxies,
                &format!("{path}.forwarded_cert.trusted_proxies"),
                problems,
            );
            if f.trusted_proxies.is_empty() {
                problem(
                    problems,
                    format!("{path}.forwarded_cert.trusted_proxies"),
                    "must name at least one proxy: the header is read only from them",
                );
            }
            header.map(|header| ForwardedCert {
                header,
                format: f.format,
                trusted,
            })
        }
        None => None,
    };
    (problems.len() == before).then_some(TlsSettings {
        listener,
        identity,
        client_auth: tls.client_auth,
        client_ca,
        crls,
        crl_expired: tls.crl_expired,
        forwarded,
    })
}

/// Validate every client's `certificates`: one key per entry, well-formed values, no
/// certificate bound by two clients, and a way to receive certificates at all.
/// Returns the matchers per client, index-aligned with `config.clients`.
pub(super) fn validate_bindings(
    config: &Config,
    verifies_clients: bool,
    problems: &mut Vec<Problem>,
) -> Vec<Vec<CertMatcher>> {
    let mut seen: std::collections::BTreeMap<CertMatcher, usize> = Default::default();
    let mut all = Vec::with_capacity(config.clients.len());
    for (i, c) in config.clients.iter().enumerate() {
        let mut mine = Vec::new();
        for (j, b) in c.certificates.iter().enumerate() {
            let at = format!("clients[{i}].certificates[{j}]");
            let Some(m) = matcher(b, &at, problems) else {
                continue;
            };
            match seen.get(&m) {
                Some(&other) if other != i => problem(
                    problems,
                    format!("{at}.{}", m.key()),
                    format!(
                        "the same certificate is already bound by client '{}': a certificate must identify one client",
                        config.clients[other].id.as_str()
                    ),
                ),
                _ => {
                    seen.insert(m.clone(), i);
                }
            }
            mine.push(m);
        }
        if !c.certificates.is_empty() && !verifies_clients {
            problem(
                problems,
                format!("clients[{i}].certificates"),
                "no listener verifies client certificates: set server.tls.client_auth (with client_ca_file) or server.tls.forwarded_cert",
            );
        }
        all.push(mine);
    }
    all
}

fn matcher(b: &CertificateBinding, at: &str, problems: &mut Vec<Problem>) -> Option<CertMatcher> {
    let given: Vec<(&str, &Text)> = [
        ("san_dns", &b.san_dns),
        ("san_uri", &b.san_uri),
        ("san_email", &b.san_email),
        ("subject_cn", &b.subject_cn),
        ("sha256", &b.sha256),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    .collect();
    let [(key, value)] = given[..] else {
        problem(
            problems,
            at,
            "give exactly one of san_dns, san_uri, san_email, subject_cn, sha256",
        );
        return None;
    };
    let v = value.as_str().trim();
    if v.is_empty() {
        problem(problems, format!("{at}.{key}"), "must not be empty");
        return None;
    }
    Some(match key {
        "san_dns" => CertMatcher::SanDns(v.to_ascii_lowercase()),
        "san_uri" => CertMatcher::SanUri(v.to_owned()),
        "san_email" => CertMatcher::SanEmail(v.to_ascii_lowercase()),
        "subject_cn" => CertMatcher::SubjectCn(v.to_owned()),
        _ => match crate::tls::identity::normalize_sha256(v) {
            Ok(hex) => CertMatcher::Sha256(hex),
            Err(e) => {
                problem(problems, format!("{at}.sha256"), e);
                return None;
            }
        },
    })
}
