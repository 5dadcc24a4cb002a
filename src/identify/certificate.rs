//! Client certificates as identities: which certificate came with a request, and which
//! client it is.
//!
//! A request's certificate is the one its TLS connection verified ([`ClientCert`] in the
//! request's extensions, verified again here when the CA bundle or CRLs changed since, the
//! session was resumed, or it has expired), or — on a listener with `forwarded_cert` — the
//! one a trusted proxy put in the configured header, verified here exactly as a handshake
//! would. The header is read only when the TCP peer is one of `trusted_proxies`; from
//! anyone else it is ignored (and the pipeline removes it before forwarding, either way).
//!
//! A verified certificate is bound to a client by `[[clients]].certificates`: SAN DNS
//! name, SAN URI, SAN email, subject CN or SHA-256 thumbprint. A certificate no client
//! binds is refused (403 `client_not_allowed`), as is one two clients bind through
//! different keys (ambiguous: deny). With a JWT or API key on the same request, both must
//! name the same client ([`super::Identifier::identify`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderValue;

use crate::authorize::ClientPolicy;
use crate::config::tls::CertMatcher;
use crate::error::GatewayError;
use crate::tls::server::ServerTls;
use crate::tls::ClientCert;

/// The certificate that came with a request on a listener with `tls` (see [`presented`]).
/// Removes the `forwarded_cert` header from the request, whoever sent it: it never reaches
/// a backend.
pub fn from_request(
    parts: &mut http::request::Parts,
    peer: IpAddr,
    tls: Option<&ServerTls>,
) -> Result<Option<Arc<ClientCert>>, GatewayError> {
    let Some(tls) = tls else {
        return Ok(None);
    };
    let forwarded: Vec<HeaderValue> = match &tls.settings().forwarded {
        Some(f) => match parts.headers.entry(&f.header) {
            http::header::Entry::Occupied(e) => e.remove_entry_mult().1.collect(),
            http::header::Entry::Vacant(_) => Vec::new(),
        },
        None => Vec::new(),
    };
    presented(parts.extensions.get(), &forwarded, peer, tls)
}

/// The certificate that came with a request: `Ok(None)` when none did, an error when one
/// did and does not verify (401 `invalid_client_certificate`). `forwarded` holds the values
/// of the `forwarded_cert` header (removed from the request by the caller).
fn presented(
    from_tls: Option<&Arc<ClientCert>>,
    forwarded: &[HeaderValue],
    peer: IpAddr,
    tls: &ServerTls,
) -> Result<Option<Arc<ClientCert>>, GatewayError> {
    let Some(verifier) = tls.verifier() else {
        return Ok(None);
    };
    let invalid =
        |e: &rustls::Error| invalid_certificate(crate::tls::verify::describe(e).to_owned());
    if let Some(c) = from_tls {
        verifier.recheck(&c.checked).map_err(|e| invalid(&e))?;
        return Ok(Some(c.clone()));
    }
    let (Some(f), Some(value)) = (&tls.settings().forwarded, forwarded.first()) else {
        return Ok(None);
    };
    let peer = peer.to_canonical();
    if !f.trusted.iter().any(|n| n.contains(&peer)) {
        tracing::debug!(%peer, header = %f.header, "forwarded client certificate ignored: the peer is not a trusted proxy");
        return Ok(None);
    }
    if forwarded.len() > 1 {
        verifier.count_reason("malformed");
        return Err(invalid_certificate(format!(
            "the {} header is present {} times; a trusted proxy sends it once",
            f.header,
            forwarded.len()
        )));
    }
    let chain = crate::tls::forwarded::parse(f.format, value.as_bytes()).map_err(|e| {
        verifier.count_reason("malformed");
        invalid_certificate(format!(
            "the forwarded client certificate ({}) cannot be read: {e}",
            f.header
        ))
    })?;
    verifier.verify(&chain).map_err(|e| invalid(&e))?;
    ClientCert::new(chain, verifier.generation())
        .map(Some)
        .ok_or_else(|| {
            invalid_certificate("the forwarded client certificate cannot be read".into())
        })
}

/// 401 `invalid_client_certificate`.
fn invalid_certificate(message: String) -> GatewayError {
    GatewayError::Unauthenticated {
        code: "invalid_client_certificate",
        bearer_error: None,
        message,
    }
}

/// `[[clients]].certificates` of one configuration: matcher → client.
#[derive(Debug, Default)]
pub struct CertBindings {
    by: HashMap<CertMatcher, Arc<ClientPolicy>>,
}

impl CertBindings {
    pub fn new(pairs: impl IntoIterator<Item = (CertMatcher, Arc<ClientPolicy>)>) -> Self {
        Self {
            by: pairs.into_iter().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by.is_empty()
    }

    /// The client `cert` is bound to: exactly one, or a refusal (none, or two).
    pub fn client(&self, cert: &ClientCert) -> Result<Arc<ClientPolicy>, GatewayError> {
        let id = &cert.identity;
        let candidates = std::iter::once(CertMatcher::Sha256(id.sha256.clone()))
            .chain(id.dns.iter().map(|d| CertMatcher::SanDns(d.clone())))
            .chain(id.uris.iter().map(|u| CertMatcher::SanUri(u.clone())))
            .chain(id.emails.iter().map(|e| CertMatcher::SanEmail(e.clone())))
            .chain(
                id.common_names
                    .iter()
                    .map(|c| CertMatcher::SubjectCn(c.clone())),
            );
        let mut found: Option<&Arc<ClientPolicy>> = None;
        for m in candidates {
            if let Some(c) = self.by.get(&m) {
                match found {
                    Some(f) if f.id != c.id => {
                        return Err(GatewayError::ClientNotAllowed(format!(
                            "the client certificate is bound by two clients ('{}' and '{}'); it must identify one",
                            f.id, c.id
                        )))
                    }
                    _ => found = Some(c),
                }
            }
        }
        found.cloned().ok_or_else(|| {
            GatewayError::ClientNotAllowed(
                "the client certificate is valid but no client of this gateway is bound to it"
                    .into(),
            )
        })
    }
}
