//! The typed TOML surface (`portcullis.toml`), one struct per table.
//!
//! Names and meanings follow `shared/design/portcullis.example.toml`. Every struct refuses
//! unknown keys; defaults are those documented in the README.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::limits::{DeploymentLimits, LimitSet, LimitsConfig, Prices};
use super::routing::{HealthProbe, RetryOn, RoutingConfig};
use super::tls::{CertificateBinding, TlsConfig};
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
    pub store: StoreConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    #[serde(default)]
    pub clients: Vec<ClientConfig>,
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Deployment glob → price per 1M tokens, for budgets and usage costs.
    #[serde(default)]
    pub prices: Prices,
    /// Retries, cool-downs, the circuit breaker and headroom-aware ordering.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// OpenTelemetry traces (`[telemetry]`); off without an `otlp_endpoint`.
    #[serde(default)]
    pub telemetry: super::telemetry::TelemetryConfig,
    /// Sidecar mode (`portcullis sidecar` without a file, see `crate::sidecar`): every path
    /// and method goes to the one backend unchanged, no client is authenticated, and a
    /// backend needs no `deployments`. Never read from a file: TOML cannot set it.
    #[serde(skip)]
    pub passthrough: bool,
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
    /// Request-body bytes the whole gateway holds in memory at once (bodies are buffered
    /// for routing and failover). Default: an eighth of the memory available to the
    /// process (cgroup limit or physical memory), between 64 MiB and 1 GiB, and at least
    /// `max_body_bytes`.
    #[serde(default)]
    pub max_buffered_body_bytes: Option<u64>,
    /// How long a request waits for room under `max_buffered_body_bytes` before it gets
    /// 503 `overloaded`.
    #[serde(default = "default_buffer_wait")]
    pub buffer_wait: Dur,
    /// TCP peers (addresses or CIDR ranges) whose `X-Forwarded-For`, `X-Forwarded-Proto`
    /// and `Forwarded` headers are kept and extended; from anyone else they are replaced
    /// by what the gateway sees.
    #[serde(default)]
    pub trusted_proxies: Vec<Text>,
    /// TLS and mutual TLS on the client listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
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
            max_buffered_body_bytes: None,
            buffer_wait: default_buffer_wait(),
            trusted_proxies: Vec::new(),
            tls: None,
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
fn default_buffer_wait() -> Dur {
    Dur(Duration::from_secs(5))
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
    /// TLS on the admin listener.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Scoped admin credentials (`[[admin.tokens]]`).
    #[serde(default)]
    pub tokens: Vec<super::admin::AdminTokenConfig>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
            token_file: None,
            tls: None,
            tokens: Vec::new(),
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
    /// Response headers that are dropped by default (cookies, credentials, HSTS, ...; see
    /// the README) but that this backend's answers may pass to clients.
    #[serde(default)]
    pub pass_response_headers: Vec<Text>,
    /// Failures retried on the next backend besides 429 and connect errors.
    #[serde(default = "super::routing::default_retry_on")]
    pub retry_on: Vec<RetryOn>,
    /// Requests this backend may have in flight at once (from this replica).
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// An active health probe.
    #[serde(default)]
    pub health: Option<HealthProbe>,
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
    /// From the request's arrival to the answer's last byte (none: a stream may last as
    /// long as it keeps flowing).
    #[serde(default)]
    pub total: Option<Dur>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: default_connect(),
            first_byte: default_first_byte(),
            idle: default_idle(),
            total: None,
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
    /// Entra ID client credentials, proven with a certificate (signed client assertion).
    EntraCertificate {
        #[serde(default)]
        tenant_id: Option<Text>,
        client_id: Text,
        /// PEM holding the certificate (chain first) and, unless `key_file` is given, its
        /// private key (RSA or EC; PKCS#8, PKCS#1 or SEC1).
        certificate_file: Text,
        #[serde(default)]
        key_file: Option<Text>,
        /// `PS256` (default for RSA) or `RS256`; EC keys sign with ES256/ES384 by curve.
        #[serde(default)]
        algorithm: Option<Text>,
        /// Send the chain in `x5c` (subject name / issuer authentication).
        #[serde(default)]
        send_x5c: bool,
        #[serde(default)]
        authority: Option<Text>,
        #[serde(default)]
        token_url: Option<Text>,
        #[serde(default)]
        scope: Option<Text>,
    },
    /// Entra ID client credentials, proven with a client secret.
    EntraSecret {
        #[serde(default)]
        tenant_id: Option<Text>,
        client_id: Text,
        #[serde(default)]
        client_secret: Option<Secret>,
        #[serde(default)]
        client_secret_file: Option<Text>,
        /// `client_secret_post` (default, as Entra expects) or `client_secret_basic`.
        #[serde(default)]
        token_endpoint_auth_method: Option<Text>,
        #[serde(default)]
        authority: Option<Text>,
        #[serde(default)]
        token_url: Option<Text>,
        #[serde(default)]
        scope: Option<Text>,
    },
    /// The Azure managed identity of the host: IMDS, or App Service / Container Apps when
    /// `IDENTITY_ENDPOINT` and `IDENTITY_HEADER` are set.
    ManagedIdentity {
        /// A user-assigned identity by client id (at most one of the three).
        #[serde(default)]
        client_id: Option<Text>,
        #[serde(default)]
        object_id: Option<Text>,
        #[serde(default)]
        mi_res_id: Option<Text>,
        /// IMDS token endpoint override (Azure Arc proxies, tests).
        #[serde(default)]
        endpoint: Option<Text>,
        #[serde(default)]
        scope: Option<Text>,
    },
    /// AKS workload identity: a federated token file exchanged for an Entra token. Each
    /// value defaults to the variable the AKS webhook sets (`AZURE_CLIENT_ID`,
    /// `AZURE_TENANT_ID`, `AZURE_AUTHORITY_HOST`, `AZURE_FEDERATED_TOKEN_FILE`).
    WorkloadIdentity {
        #[serde(default)]
        tenant_id: Option<Text>,
        #[serde(default)]
        client_id: Option<Text>,
        #[serde(default)]
        token_file: Option<Text>,
        #[serde(default)]
        authority: Option<Text>,
        #[serde(default)]
        token_url: Option<Text>,
        #[serde(default)]
        scope: Option<Text>,
    },
    /// No credential (a local model server, a test backend).
    #[default]
    None,
}

/// `[store]`: where gateway-issued API keys and usage records live.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://file.db` (created on first start), `sqlite::memory:`, or `postgres://...`.
    #[serde(default = "default_store_url")]
    pub url: Text,
    /// Key for the HMAC-SHA256 under which API keys are stored; API keys are disabled
    /// without it.
    #[serde(default)]
    pub key_hmac_secret: Option<Secret>,
    #[serde(default)]
    pub key_hmac_secret_file: Option<Text>,
    /// How often a running gateway looks for created, revoked or rotated keys.
    #[serde(default = "default_store_refresh")]
    pub refresh_interval: Dur,
    /// How often `last_used` times are written back (batched, off the request path).
    #[serde(default = "default_last_used_flush")]
    pub last_used_flush: Dur,
    /// Write one usage record per request (tokens, cost, client, subject, deployment).
    #[serde(default = "default_true")]
    pub record_usage: bool,
    /// How often queued usage records are written (batched, off the request path).
    #[serde(default = "default_usage_flush")]
    pub usage_flush: Dur,
    /// Usage records queued at most; past it they are dropped and counted.
    #[serde(default = "default_usage_queue")]
    pub usage_queue: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: default_store_url(),
            key_hmac_secret: None,
            key_hmac_secret_file: None,
            refresh_interval: default_store_refresh(),
            last_used_flush: default_last_used_flush(),
            record_usage: true,
            usage_flush: default_usage_flush(),
            usage_queue: default_usage_queue(),
        }
    }
}

fn default_store_url() -> Text {
    Text::from("sqlite://portcullis.db")
}
fn default_store_refresh() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_true() -> bool {
    true
}
fn default_usage_flush() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_usage_queue() -> usize {
    10_000
}
fn default_last_used_flush() -> Dur {
    Dur(Duration::from_secs(30))
}

/// `[auth]`: how the gateway presents itself to callers (RFC 9728) and token limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// This gateway's URL as clients reach it (the RFC 9728 `resource`). When unset, it
    /// is derived from the request's `Host` header.
    #[serde(default)]
    pub resource: Option<Text>,
    /// `scopes_supported` in the protected resource metadata.
    #[serde(default)]
    pub scopes_supported: Vec<Text>,
    /// Tokens longer than this are refused unread.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// Verified tokens remembered until they expire (entries).
    #[serde(default = "default_token_cache")]
    pub token_cache_size: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            resource: None,
            scopes_supported: Vec::new(),
            max_token_bytes: default_max_token_bytes(),
            token_cache_size: default_token_cache(),
        }
    }
}

fn default_max_token_bytes() -> usize {
    16 * 1024
}
fn default_token_cache() -> usize {
    10_000
}

/// One `[[issuers]]` entry: an OIDC provider whose JWTs identify callers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Name clients' `jwt` bindings refer to.
    pub name: Text,
    /// Exact `iss` value. May contain `{tenantid}` (Entra multi-tenant) together with
    /// `allowed_tenants`.
    pub issuer: Text,
    /// Where the signing keys are; default: `jwks_uri` from
    /// `{issuer}/.well-known/openid-configuration`.
    #[serde(default)]
    pub jwks_uri: Option<Text>,
    /// `aud` must be one of these.
    pub audiences: Vec<Text>,
    /// Accepted `alg` values; never `none`; HS* only with `hmac_secret`.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Text>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    #[serde(default = "default_leeway")]
    pub leeway: Dur,
    /// Claims every token must carry.
    #[serde(default)]
    pub required_claims: Vec<Text>,
    /// Tenants accepted when `issuer` contains `{tenantid}` (the token's `tid`).
    #[serde(default)]
    pub allowed_tenants: Vec<Text>,
    /// Shared secret for HS256/384/512 tokens.
    #[serde(default)]
    pub hmac_secret: Option<Secret>,
    #[serde(default)]
    pub hmac_secret_file: Option<Text>,
    /// Background refresh of the key set when the IdP sends no `Cache-Control: max-age`.
    #[serde(default = "default_jwks_refresh")]
    pub refresh_interval: Dur,
}

fn default_algorithms() -> Vec<Text> {
    ["RS256", "PS256", "ES256"]
        .into_iter()
        .map(Text::from)
        .collect()
}
fn default_leeway() -> Dur {
    Dur(Duration::from_secs(60))
}
fn default_jwks_refresh() -> Dur {
    Dur(Duration::from_secs(3600))
}

/// A claim value in a `jwt` binding: one string, or several that must all be present.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ClaimMatch {
    One(Text),
    All(Vec<Text>),
}

/// `{ issuer = "entra", claims = { azp = "..." } }`: tokens that are this client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtBinding {
    /// An `[[issuers]]` name.
    pub issuer: Text,
    /// Claims the token must carry; array claims (`roles`, `groups`) and the
    /// space-separated `scp`/`scope` match by containment.
    #[serde(default)]
    pub claims: BTreeMap<String, ClaimMatch>,
}

/// One `[[clients]]` entry: who a caller is and what it may call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub id: Text,
    /// JWT identities that are this client (any one matches).
    #[serde(default)]
    pub jwt: Vec<JwtBinding>,
    /// Client certificates that are this client (any one matches).
    #[serde(default)]
    pub certificates: Vec<CertificateBinding>,
    /// Requests with no credential at all are this client. Explicit opt-out of
    /// authentication, for trusted networks only; at most one client.
    #[serde(default)]
    pub anonymous: bool,
    /// Deployments it may call (globs: `*`, `?`); deny by default.
    #[serde(default)]
    pub deployments: Vec<Text>,
    /// Operations it may call (`chat`, `embeddings`, ... or `*`).
    #[serde(default)]
    pub operations: Vec<Text>,
    /// Deployment glob → scopes or roles the caller's token must carry (in `scp`,
    /// `scope` or `roles`) to call it.
    #[serde(default)]
    pub deployment_scopes: BTreeMap<String, Vec<Text>>,
    /// Requests of this client in flight at once, open streams included; more get 429
    /// `too_many_concurrent_requests`. Unlimited when absent.
    #[serde(default)]
    pub max_concurrent_requests: Option<u32>,
    /// Requests admitted in any 60-second interval.
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// Tokens (prompt + answer, reserved before forwarding) in any 60-second interval.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub token_quota: Option<super::limits::TokenQuota>,
    #[serde(default)]
    pub budget: Option<super::limits::Budget>,
    /// Limits for the deployments each entry's globs match (all matching entries apply).
    #[serde(default)]
    pub limits: Vec<DeploymentLimits>,
    /// Limits for each user inside this client (JWT `oid`/`sub`, or the API key id).
    #[serde(default)]
    pub per_subject: Option<LimitSet>,
}

impl ClientConfig {
    /// The limits written on the client itself.
    pub fn limit_set(&self) -> LimitSet {
        LimitSet {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            token_quota: self.token_quota,
            budget: self.budget,
        }
    }
}
