//! The client certificate of one connection (or one request, when a trusted proxy
//! forwards it): the chain, what it says about its holder, and when it was last verified.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use super::identity::{not_after, CertIdentity};
use super::verify::Checked;

/// A verified client certificate; carried in the request's extensions for TLS connections.
#[derive(Debug)]
pub struct ClientCert {
    pub checked: Checked,
    pub identity: CertIdentity,
}

impl ClientCert {
    /// The certificate a completed handshake verified, if the client sent one, under the
    /// verifier `generation` read before the handshake began. A resumed session's
    /// certificate was verified when the session began: it is marked for a new check on
    /// first use ([`ClientVerifier::recheck`](super::verify::ClientVerifier::recheck)).
    pub fn of(conn: &rustls::ServerConnection, generation: u64) -> Option<Arc<Self>> {
        let chain = conn.peer_certificates()?;
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        Self::new(chain.to_vec(), if resumed { 0 } else { generation })
    }

    /// A chain verified (or not yet, with `generation` 0) under `generation`. `None` when
    /// the leaf does not parse (a certificate rustls accepted always does).
    pub fn new(chain: Vec<CertificateDer<'static>>, generation: u64) -> Option<Arc<Self>> {
        let leaf = chain.first()?;
        let identity = CertIdentity::from_der(leaf.as_ref()).ok()?;
        let not_after = not_after(leaf.as_ref()).unwrap_or(i64::MIN);
        Some(Arc::new(Self {
            checked: Checked {
                chain,
                generation: AtomicU64::new(generation),
                not_after: AtomicI64::new(not_after),
            },
            identity,
        }))
    }
}
