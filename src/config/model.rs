//! The typed TOML surface (`portcullis.toml`), one struct per table.
//!
//! Names and meanings follow `shared/design/portcullis.example.toml`. Every struct refuses
//! unknown keys; defaults are those documented in the README.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::values::{Dur, Secret, Text};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
}

/// `[server]`: the client-facing listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: Text,
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    #[serde(default = "default_header_timeout")]
    pub header_timeout: Dur,
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: Dur,
    /// On SIGTERM, time between reporting not-ready and closing the listeners.
    #[serde(default = "default_shutdown_delay")]
    pub shutdown_delay: Dur,
    /// Time a client has to send its whole request body once its headers are in.
    #[serde(default = "default_body_timeout")]
    pub body_timeout: Dur,
    /// Worker threads, each with its own listener and upstream pools; 0 = one per core.
    #[serde(default)]
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: default_max_body(),
            header_timeout: default_header_timeout(),
            drain_timeout: default_drain_timeout(),
            body_timeout: default_body_timeout(),
            shutdown_delay: default_shutdown_delay(),
            workers: 0,
        }
    }
}

fn default_listen() -> Text {
    Text::from("0.0.0.0:8080")
}
fn default_max_body() -> u64 {
    16 * 1024 * 1024
}
fn default_header_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_shutdown_delay() -> Dur {
    Dur(Duration::ZERO)
}
fn default_body_timeout() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_drain_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}

/// `[admin]`: metrics, health and readiness, off the request path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin listener address; `""` disables the admin listener.
    #[serde(default = "default_admin_listen")]
    pub listen: Text,
    /// Bearer token required for `/metrics` and the admin API when set.
    #[serde(default)]
    pub token: Option<Secret>,
    #[serde(default)]
    pub token_file: Option<Text>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
            token_file: None,
        }
    }
}

fn default_admin_listen() -> Text {
    Text::from("127.0.0.1:9090")
}

/// `[audit]`: where the JSON audit lines go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `"-"` for standard output, otherwise a file appended to.
    #[serde(default = "default_audit_path")]
    pub path: Text,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: default_audit_path(),
        }
    }
}

fn default_audit_path() -> Text {
    Text::from("-")
}

/// Which wire dialect a backend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Azure OpenAI: `/openai/deployments/{name}/...?api-version=`, `api-key` header.
    #[default]
    Azure,
    /// Any OpenAI-compatible server: `/v1/...`, `model` in the body, bearer token.
    Openai,
}

/// One `[[backends]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub name: Text,
    pub url: Text,
    #[serde(rename = "type", default)]
    pub kind: BackendKind,
    /// Used when the client's request carries no `api-version`.
    #[serde(default)]
    pub api_version: Option<Text>,
    #[serde(default)]
    pub priority: u32,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Public deployment/model name → this backend's deployment/model name.
    #[serde(default)]
    pub deployments: BTreeMap<String, Text>,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Speak HTTP/2 to this backend (prior knowledge over cleartext, ALPN over TLS).
    #[serde(default)]
    pub http2: bool,
    /// Extra PEM CA bundle trusted for this backend, besides the webpki roots.
    #[serde(default)]
    pub ca_file: Option<Text>,
    #[serde(default)]
    pub auth: BackendAuthConfig,
}

fn default_weight() -> u32 {
    1
}

/// `timeouts = { connect, first_byte, idle }` of a backend.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default = "default_connect")]
    pub connect: Dur,
    #[serde(default = "default_first_byte")]
    pub first_byte: Dur,
    #[serde(default = "default_idle")]
    pub idle: Dur,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: default_connect(),
            first_byte: default_first_byte(),
            idle: default_idle(),
        }
    }
}

fn default_connect() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_first_byte() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_idle() -> Dur {
    Dur(Duration::from_secs(30))
}

/// `[backends.auth]`: how the gateway authenticates to the backend.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum BackendAuthConfig {
    /// A static key: `api-key` header for Azure, bearer token for OpenAI-compatible backends.
    ApiKey {
        #[serde(default)]
        key: Option<Secret>,
        #[serde(default)]
        key_file: Option<Text>,
    },
    /// No credential (a local model server, a test backend).
    #[default]
    None,
}
