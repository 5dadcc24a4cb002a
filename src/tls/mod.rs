//! TLS on the gateway's listeners and client certificates as identities (issue 16).
//!
//! - [`material`]: reading certificate chains, keys, CA bundles and CRLs from files.
//! - [`server`]: a listener's rustls configuration, reloaded when its files change.
//! - [`verify`]: client certificate verification against the current CA bundle and CRLs,
//!   including certificates of resumed sessions and long-lived connections.
//! - [`peer`]: a connection's (or a forwarded) verified certificate.
//! - [`identity`]: what a certificate says about its holder (SANs, CN, thumbprint).
//! - [`forwarded`]: a certificate forwarded by a TLS-terminating proxy in a header.
//!
//! A leaf module: the listener and the identify stage use it; it knows neither.

pub mod forwarded;
pub mod identity;
pub mod material;
pub mod peer;
pub mod server;
pub mod verify;

pub use peer::ClientCert;
