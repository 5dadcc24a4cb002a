//! Prometheus metrics served on the admin listener at `/metrics`.
//!
//! Label sets are small and bounded: operation names, status codes and configured backend
//! names — never a request path, client-supplied string or credential.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of `portcullis_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: &'static str,
    pub status: u16,
    /// Shared with the backend: cloning a label costs a reference count, not a copy.
    pub backend: Arc<String>,
}

/// Labels of `portcullis_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub operation: &'static str,
    pub backend: Arc<String>,
}

/// Labels of `portcullis_upstream_attempts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub backend: Arc<String>,
    /// `response`, `connect_error`, `timeout`, `rate_limited`, `error`,
    /// `credential_unavailable` (skipped: no valid backend token).
    pub outcome: &'static str,
}

/// Labels of `portcullis_auth_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    /// `jwt`, `api_key`, `anonymous` or `none` (nothing usable presented).
    pub method: &'static str,
    /// `allow` or the refusal's error code.
    pub outcome: &'static str,
}

/// Labels of the per-issuer key metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    pub issuer: String,
}

/// Labels of `portcullis_jwks_refresh_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwksRefreshLabels {
    pub issuer: String,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

/// Labels of the backend-token metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabels {
    /// `kind:identity`, e.g. `entra_certificate:<client id>`, `managed_identity:system`.
    pub credential: String,
}

/// Labels of `portcullis_backend_token_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialOutcomeLabels {
    pub credential: String,
    /// `ok`, `retryable_error` (429, 5xx, network) or `error` (refused).
    pub outcome: &'static str,
}

/// Labels of `portcullis_client_certificate_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertFailureLabels {
    /// `expired`, `not_yet_valid`, `unknown_issuer`, `revoked`, `bad_usage`, `crl_expired`,
    /// `malformed`, `missing` or `unbound`.
    pub reason: &'static str,
}

/// Labels of `portcullis_tls_certificate_expiry_days`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `client` or `admin`.
    pub listener: &'static str,
}

/// Labels of `portcullis_usage_records_dropped_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UsageDropLabels {
    /// `queue_full` (the writer fell behind, or had stopped) or `store_error` (the store
    /// refused the batch after retries).
    pub reason: &'static str,
}

/// Labels of `portcullis_config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `applied` or `rejected`.
    pub outcome: &'static str,
}

/// Configuration reloads ([`crate::reload`]).
#[derive(Clone)]
pub struct ReloadMetrics {
    /// `portcullis_config_reloads_total{outcome}`.
    pub reloads: Family<ReloadLabels, Counter>,
    /// `portcullis_config_restart_required`: 1 while the file asks for a change to a
    /// start-time-only key that the running process does not have.
    pub restart_required: Gauge,
}

impl ReloadMetrics {
    fn register(registry: &mut Registry) -> Self {
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by outcome (applied, or rejected: the running configuration was kept)",
            reloads.clone(),
        );
        // Both series exist from the start (0), so a rate or an alert has a baseline.
        for outcome in ["applied", "rejected"] {
            let _ = reloads.get_or_create(&ReloadLabels { outcome });
        }
        let restart_required = Gauge::default();
        registry.register(
            "config_restart_required",
            "1 when the last applied configuration changes keys that only take effect after a restart",
            restart_required.clone(),
        );
        Self {
            reloads,
            restart_required,
        }
    }

    /// Count one reload with `outcome`.
    pub fn count(&self, outcome: &'static str) {
        self.reloads.get_or_create(&ReloadLabels { outcome }).inc();
    }
}

/// A callback run before each rendering (for values computed at scrape time).
type RenderHook = Box<dyn Fn() + Send + Sync>;

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// Every metric the gateway exports.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    pub upstream_attempts: Family<AttemptLabels, Counter>,
    /// Response bodies that ended with an error after their head was sent, by backend and
    /// outcome (`upstream_error`, `idle_timeout`).
    pub relay_errors: Family<AttemptLabels, Counter>,
    pub streams_in_flight: Gauge,
    /// Request-body bytes held now (set from the budget when metrics are rendered).
    pub buffered_body_bytes: Gauge,
    pub audit_dropped: Counter,
    /// Usage records committed to the store.
    pub usage_written: Counter,
    /// Usage records lost, by reason ([`UsageDropLabels`]).
    pub usage_dropped: Family<UsageDropLabels, Counter>,
    pub auth: Family<AuthLabels, Counter>,
    jwks_keys: Family<IssuerLabels, Gauge>,
    jwks_refreshes: Family<JwksRefreshLabels, Counter>,
    backend_tokens: Family<CredentialOutcomeLabels, Counter>,
    token_expiry: Family<CredentialLabels, Gauge<f64, AtomicU64>>,
    /// Client certificates refused, by reason.
    pub client_cert_failures: Family<CertFailureLabels, Counter>,
    tls_expiry: Family<ListenerLabels, Gauge<f64, AtomicU64>>,
    before_render: Mutex<Vec<RenderHook>>,
    /// Admission limits and token accounting.
    pub accounting: AccountingMetrics,
    /// Retries, spill-overs, cool-downs, circuits and probes.
    pub routing: RoutingMetrics,
    /// Configuration reloads.
    pub reloads: ReloadMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register all metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by operation, status and backend",
            requests.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time until the response head was sent, by operation and backend",
            latency.clone(),
        );
        let upstream_attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "upstream_attempts",
            "Requests sent to backends, by backend and outcome",
            upstream_attempts.clone(),
        );
        let relay_errors = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "relay_errors",
            "Responses whose body failed after the head was sent (the client got a cut answer), by backend and outcome",
            relay_errors.clone(),
        );
        let streams_in_flight = Gauge::default();
        registry.register(
            "streams_in_flight",
            "Response bodies currently being relayed to clients",
            streams_in_flight.clone(),
        );
        let buffered_body_bytes = Gauge::default();
        registry.register(
            "buffered_body_bytes",
            "Request-body bytes held in memory now, out of server.max_buffered_body_bytes",
            buffered_body_bytes.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_dropped",
            "Audit records dropped because the writer fell behind",
            audit_dropped.clone(),
        );
        let usage_written = Counter::default();
        registry.register(
            "usage_records_written",
            "Usage records committed to the store",
            usage_written.clone(),
        );
        let usage_dropped = Family::<UsageDropLabels, Counter>::default();
        registry.register(
            "usage_records_dropped",
            "Usage records lost, by reason (queue_full: the writer fell behind; store_error: the store refused the batch after retries)",
            usage_dropped.clone(),
        );
        let auth = Family::<AuthLabels, Counter>::default();
        registry.register(
            "auth",
            "Authentication and authorization decisions, by method and outcome",
            auth.clone(),
        );
        let jwks_keys = Family::<IssuerLabels, Gauge>::default();
        registry.register(
            "jwks_keys",
            "Signing keys currently cached, by issuer",
            jwks_keys.clone(),
        );
        let jwks_refreshes = Family::<JwksRefreshLabels, Counter>::default();
        registry.register(
            "jwks_refresh",
            "Fetches of issuers' signing keys, by issuer and outcome",
            jwks_refreshes.clone(),
        );
        let backend_tokens = Family::<CredentialOutcomeLabels, Counter>::default();
        registry.register(
            "backend_token_requests",
            "Token requests the gateway made for its backend credentials, by credential and outcome",
            backend_tokens.clone(),
        );
        let token_expiry = Family::<CredentialLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "backend_token_expiry_seconds",
            "Seconds until the current backend token expires (0: none held), by credential",
            token_expiry.clone(),
        );
        let client_cert_failures = Family::<CertFailureLabels, Counter>::default();
        registry.register(
            "client_certificate_failures",
            "Client certificates refused (in the TLS handshake, or forwarded by a proxy), by reason",
            client_cert_failures.clone(),
        );
        let tls_expiry = Family::<ListenerLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "tls_certificate_expiry_days",
            "Days until the certificate a listener serves expires, by listener",
            tls_expiry.clone(),
        );
        let accounting = AccountingMetrics::register(&mut registry);
        let routing = RoutingMetrics::register(&mut registry);
        let reloads = ReloadMetrics::register(&mut registry);
        Self {
            accounting,
            routing,
            reloads,
            backend_tokens,
            token_expiry,
            client_cert_failures,
            tls_expiry,
            before_render: Mutex::new(Vec::new()),
            auth,
            jwks_keys,
            jwks_refreshes,
            registry,
            requests,
            latency,
            upstream_attempts,
            relay_errors,
            streams_in_flight,
            buffered_body_bytes,
            audit_dropped,
            usage_written,
            usage_dropped,
        }
    }

    /// The request-path series of the backend labelled `backend`; see [`BackendSeries`].
    pub fn backend_series(&self, backend: Arc<String>) -> BackendSeries {
        BackendSeries {
            backend,
            requests: self.requests.clone(),
            latency: self.latency.clone(),
            attempts: self.upstream_attempts.clone(),
            routing: self.routing.clone(),
            ok: Default::default(),
            latency_by_op: Default::default(),
            answered: OnceLock::new(),
        }
    }

    /// Days until the certificate `listener` serves expires.
    pub fn tls_expiry(&self, listener: &'static str) -> Gauge<f64, AtomicU64> {
        self.tls_expiry
            .get_or_create(&ListenerLabels { listener })
            .clone()
    }

    /// Gauge of keys cached for `issuer` (a configured issuer name).
    pub fn jwks_keys(&self, issuer: &str) -> Gauge {
        self.jwks_keys
            .get_or_create(&IssuerLabels {
                issuer: issuer.to_owned(),
            })
            .clone()
    }

    /// Counter of key-set fetches for `issuer` with `outcome`.
    pub fn jwks_refresh(&self, issuer: &str, outcome: &'static str) -> Counter {
        self.jwks_refreshes
            .get_or_create(&JwksRefreshLabels {
                issuer: issuer.to_owned(),
                outcome,
            })
            .clone()
    }

    /// Counter of backend token requests for `credential` with `outcome`.
    pub fn backend_token(&self, credential: &str, outcome: &'static str) -> Counter {
        self.backend_tokens
            .get_or_create(&CredentialOutcomeLabels {
                credential: credential.to_owned(),
                outcome,
            })
            .clone()
    }

    /// Gauge of seconds until `credential`'s token expires.
    pub fn token_expiry(&self, credential: &str) -> Gauge<f64, AtomicU64> {
        self.token_expiry
            .get_or_create(&CredentialLabels {
                credential: credential.to_owned(),
            })
            .clone()
    }

    /// Run `hook` before every rendering (it updates values computed at scrape time).
    pub fn before_render(&self, hook: RenderHook) {
        self.before_render
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(hook);
    }

    /// Render in the Prometheus text format.
    pub fn render(&self) -> String {
        for hook in self
            .before_render
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            hook();
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Operation names with a slot of their own in [`BackendSeries`] (others use the families).
const OPERATIONS: [&str; crate::route::Operation::ALL.len()] = {
    let mut names = [""; crate::route::Operation::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = crate::route::Operation::ALL[i].as_str();
        i += 1;
    }
    names
};

fn operation_slot(operation: &str) -> Option<usize> {
    OPERATIONS.iter().position(|o| *o == operation)
}

/// One backend's request-path series, each looked up in its family on first use and then
/// kept. A family lookup hashes the labels (SipHash) and takes the family's lock, four times
/// per request, with the lock's cache line shared by every worker; the common case — a
/// backend answering 200 — now costs an atomic add. Other statuses and outcomes go through
/// the families: the series exported are the same either way.
pub struct BackendSeries {
    backend: Arc<String>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    attempts: Family<AttemptLabels, Counter>,
    routing: RoutingMetrics,
    /// `requests{operation, status="200", backend}` per operation.
    ok: [OnceLock<Counter>; OPERATIONS.len()],
    latency_by_op: [OnceLock<Histogram>; OPERATIONS.len()],
    /// `upstream_attempts{backend, outcome="response"}`.
    answered: OnceLock<Counter>,
}

impl BackendSeries {
    /// Count a request this backend answered with `status`, its response head ready after
    /// `seconds`.
    pub fn answered(&self, operation: &'static str, status: u16, seconds: f64) {
        let requests = || RequestLabels {
            operation,
            status,
            backend: self.backend.clone(),
        };
        let latency = || LatencyLabels {
            operation,
            backend: self.backend.clone(),
        };
        match operation_slot(operation) {
            Some(i) => {
                if status == 200 {
                    self.ok[i]
                        .get_or_init(|| self.requests.get_or_create(&requests()).clone())
                        .inc();
                } else {
                    self.requests.get_or_create(&requests()).inc();
                }
                self.latency_by_op[i]
                    .get_or_init(|| self.latency.get_or_create(&latency()).clone())
                    .observe(seconds);
            }
            None => {
                self.requests.get_or_create(&requests()).inc();
                self.latency.get_or_create(&latency()).observe(seconds);
            }
        }
    }

    /// Count an attempt on this backend that ended with `outcome`.
    /// A request sent elsewhere after this backend's failed attempt.
    pub fn retried(&self, reason: &'static str) {
        self.routing
            .retries
            .get_or_create(&BackendReasonLabels {
                backend: self.backend.clone(),
                reason,
            })
            .inc();
    }

    /// This backend was passed over without an attempt.
    pub fn skipped(&self, reason: &'static str) {
        self.routing
            .skipped
            .get_or_create(&BackendReasonLabels {
                backend: self.backend.clone(),
                reason,
            })
            .inc();
    }

    fn one(&self, f: &Family<BackendLabels, Counter>) {
        f.get_or_create(&BackendLabels {
            backend: self.backend.clone(),
        })
        .inc();
    }

    /// This backend answered although a backend of an earlier priority serves the pool.
    pub fn spilled_over(&self) {
        self.one(&self.routing.spillovers);
    }

    /// A 429 from this backend started a cool-down.
    pub fn cooled(&self) {
        self.one(&self.routing.cooldowns);
    }

    /// This backend's circuit opened.
    pub fn tripped(&self) {
        self.one(&self.routing.circuit_trips);
    }

    /// An active probe of this backend ended with `outcome` (`pass`, `fail`).
    pub fn probe(&self, outcome: &'static str) {
        self.routing
            .probes
            .get_or_create(&AttemptLabels {
                backend: self.backend.clone(),
                outcome,
            })
            .inc();
    }

    pub fn attempt(&self, outcome: &'static str) {
        let labels = || AttemptLabels {
            backend: self.backend.clone(),
            outcome,
        };
        if outcome == "response" {
            self.answered
                .get_or_init(|| self.attempts.get_or_create(&labels()).clone())
                .inc();
        } else {
            self.attempts.get_or_create(&labels()).inc();
        }
    }
}

impl std::fmt::Debug for BackendSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendSeries")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_series_feed_the_same_exported_series_as_the_families() {
        let m = Metrics::new();
        let b = m.backend_series(Arc::new("ptu".to_owned()));
        b.answered("chat", 200, 0.01);
        b.answered("chat", 200, 0.01);
        b.answered("chat", 429, 0.01);
        b.answered("unknown", 200, 0.01);
        b.attempt("response");
        b.attempt("response");
        b.attempt("rate_limited");
        // A second handle set (a reloaded configuration) adds to the same series.
        m.backend_series(Arc::new("ptu".to_owned()))
            .answered("chat", 200, 0.01);
        let text = m.render();
        for line in [
            r#"portcullis_requests_total{operation="chat",status="200",backend="ptu"} 3"#,
            r#"portcullis_requests_total{operation="chat",status="429",backend="ptu"} 1"#,
            r#"portcullis_requests_total{operation="unknown",status="200",backend="ptu"} 1"#,
            r#"portcullis_request_duration_seconds_count{operation="chat",backend="ptu"} 4"#,
            r#"portcullis_upstream_attempts_total{backend="ptu",outcome="response"} 2"#,
            r#"portcullis_upstream_attempts_total{backend="ptu",outcome="rate_limited"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(
            !text.contains(r#"operation="embeddings""#),
            "no series before first use"
        );
    }
}

/// Labels of `portcullis_limit_refusals_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// A configured client id.
    pub client: Arc<str>,
    /// `requests`, `tokens`, `quota`, `budget`, `too_large` or `unavailable`.
    pub limit: &'static str,
}

/// Labels of `portcullis_tokens_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub client: Arc<str>,
    /// A deployment a backend serves (only those reach accounting).
    pub deployment: String,
    /// `prompt`, `cached`, `completion` or `reasoning`.
    pub kind: &'static str,
}

/// Labels of `portcullis_cost_usd_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    pub client: Arc<str>,
    pub deployment: String,
}

/// Metrics of the admit and account stages.
#[derive(Clone)]
pub struct AccountingMetrics {
    pub refusals: Family<RefusalLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost: Family<CostLabels, Counter<f64, AtomicU64>>,
    /// Estimated minus reported tokens, per request with reported usage.
    pub estimate_error: Histogram,
    /// Calls to the shared limit store (Redis) that failed.
    pub backend_errors: Counter,
    /// 1 while limits are counted locally because Redis is unreachable (`fail_open`).
    pub fail_open: Gauge,
    /// The `tokens` and `cost` series of client × deployment pairs already seen, so that
    /// counting a request's usage hashes two names once instead of building, hashing and
    /// looking up five label sets. A sharded cache: entries it evicts are only looked up
    /// in the families again (the series themselves live there).
    usage_series: Arc<quick_cache::sync::Cache<SeriesKey, Arc<UsageSeries>>>,
}

/// Client × deployment pairs whose series handles [`AccountingMetrics`] keeps.
const USAGE_SERIES_CAPACITY: usize = 4096;

/// A client × deployment pair (hashed like [`SeriesRef`]).
#[derive(Hash, PartialEq, Eq)]
struct SeriesKey(Arc<str>, Box<str>);

/// A [`SeriesKey`] looked up by reference.
#[derive(Hash)]
struct SeriesRef<'a>(&'a str, &'a str);

impl quick_cache::Equivalent<SeriesKey> for SeriesRef<'_> {
    fn equivalent(&self, key: &SeriesKey) -> bool {
        *key.0 == *self.0 && *key.1 == *self.1
    }
}

/// One client × deployment's series, each created in its family on first use (as
/// `get_or_create` would: a series appears once it has been counted).
#[derive(Default)]
struct UsageSeries {
    /// `prompt`, `cached`, `completion`, `reasoning`.
    tokens: OnceLock<[Counter; 4]>,
    cost: OnceLock<Counter<f64, AtomicU64>>,
}

/// A request's usage, as counted in `portcullis_tokens_total`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenCounts {
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
    pub reasoning: u64,
}

impl AccountingMetrics {
    /// Count a request's tokens (when any) and cost (when positive) for `client` on
    /// `deployment`.
    pub fn count_usage(&self, client: &Arc<str>, deployment: &str, t: TokenCounts, usd: f64) {
        let has_tokens = t.prompt > 0 || t.completion > 0;
        if !has_tokens && usd <= 0.0 {
            return;
        }
        let series = match self.usage_series.get(&SeriesRef(client, deployment)) {
            Some(s) => s,
            None => {
                let s = Arc::new(UsageSeries::default());
                self.usage_series
                    .insert(SeriesKey(client.clone(), deployment.into()), s.clone());
                s
            }
        };
        if has_tokens {
            let tokens = series.tokens.get_or_init(|| {
                ["prompt", "cached", "completion", "reasoning"].map(|kind| {
                    self.tokens
                        .get_or_create(&TokenLabels {
                            client: client.clone(),
                            deployment: deployment.to_owned(),
                            kind,
                        })
                        .clone()
                })
            });
            for (c, n) in tokens
                .iter()
                .zip([t.prompt, t.cached, t.completion, t.reasoning])
            {
                c.inc_by(n);
            }
        }
        if usd > 0.0 {
            series
                .cost
                .get_or_init(|| {
                    self.cost
                        .get_or_create(&CostLabels {
                            client: client.clone(),
                            deployment: deployment.to_owned(),
                        })
                        .clone()
                })
                .inc_by(usd);
        }
    }

    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            usage_series: Arc::new(quick_cache::sync::Cache::new(USAGE_SERIES_CAPACITY)),
            refusals: Family::default(),
            tokens: Family::default(),
            cost: Family::default(),
            estimate_error: Histogram::new([
                -10000.0, -1000.0, -100.0, -10.0, -1.0, 0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0,
                100000.0,
            ]),
            backend_errors: Counter::default(),
            fail_open: Gauge::default(),
        };
        registry.register(
            "limit_refusals",
            "Requests refused by an admission limit, by client and limit kind",
            m.refusals.clone(),
        );
        registry.register(
            "tokens",
            "Tokens used, by client, deployment and kind (prompt includes cached, completion includes reasoning)",
            m.tokens.clone(),
        );
        registry.register(
            "cost_usd",
            "Cost of the tokens used, in USD, by client and deployment (from [prices])",
            m.cost.clone(),
        );
        registry.register(
            "token_estimate_error",
            "Tokens estimated before forwarding minus tokens the backend reported, per estimated request",
            m.estimate_error.clone(),
        );
        registry.register(
            "limits_backend_errors",
            "Calls to the shared limit counters (Redis) that failed",
            m.backend_errors.clone(),
        );
        registry.register(
            "limits_fail_open",
            "1 while limits are counted in this replica only because Redis is unreachable",
            m.fail_open.clone(),
        );
        m
    }
}

/// Labels of the per-backend routing metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: Arc<String>,
}

/// Labels of routing counters with a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendReasonLabels {
    pub backend: Arc<String>,
    /// Retries: the failed attempt's outcome (`rate_limited`, `connect_error`, `status_5xx`,
    /// `timeout`, `unauthorized`). Skips: `cooling`, `circuit_open`, `unhealthy`, `full`,
    /// `credential_unavailable`.
    pub reason: &'static str,
}

/// Labels of `portcullis_backend_cooling_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendDeploymentLabels {
    pub backend: String,
    /// The backend's own deployment name (configured, so bounded).
    pub deployment: String,
}

/// Metrics of the route stage: retries, spill-overs, cool-downs, circuits, probes.
#[derive(Clone)]
pub struct RoutingMetrics {
    pub retries: Family<BackendReasonLabels, Counter>,
    pub skipped: Family<BackendReasonLabels, Counter>,
    /// Answers from a backend of a later priority than the pool's first.
    pub spillovers: Family<BackendLabels, Counter>,
    pub cooldowns: Family<BackendLabels, Counter>,
    pub circuit_trips: Family<BackendLabels, Counter>,
    pub probes: Family<AttemptLabels, Counter>,
    /// Set when metrics are rendered.
    pub circuit_state: Family<BackendLabels, Gauge>,
    pub in_flight: Family<BackendLabels, Gauge>,
    pub cooling: Family<BackendDeploymentLabels, Gauge<f64, AtomicU64>>,
}

impl RoutingMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            retries: Family::default(),
            skipped: Family::default(),
            spillovers: Family::default(),
            cooldowns: Family::default(),
            circuit_trips: Family::default(),
            probes: Family::default(),
            circuit_state: Family::default(),
            in_flight: Family::default(),
            cooling: Family::default(),
        };
        registry.register(
            "upstream_retries",
            "Requests sent to another backend after a failed attempt, by the failed backend and why",
            m.retries.clone(),
        );
        registry.register(
            "upstream_skipped",
            "Candidate backends passed over without an attempt, by backend and why",
            m.skipped.clone(),
        );
        registry.register(
            "upstream_spillovers",
            "Answers from a backend of a later priority than its pool's first (PTU to pay-as-you-go), by answering backend",
            m.spillovers.clone(),
        );
        registry.register(
            "backend_cooldowns",
            "Cool-downs started by a backend's 429, by backend",
            m.cooldowns.clone(),
        );
        registry.register(
            "backend_circuit_trips",
            "Times a backend's circuit opened, by backend",
            m.circuit_trips.clone(),
        );
        registry.register(
            "backend_probes",
            "Active health probes, by backend and outcome (pass, fail)",
            m.probes.clone(),
        );
        registry.register(
            "backend_circuit_state",
            "Circuit state per backend: 0 closed, 1 open, 2 half-open",
            m.circuit_state.clone(),
        );
        registry.register(
            "backend_in_flight",
            "Requests in flight per backend (until their answer is relayed)",
            m.in_flight.clone(),
        );
        registry.register(
            "backend_cooling_seconds",
            "Seconds left of a backend deployment's 429 cool-down (0: not cooling)",
            m.cooling.clone(),
        );
        m
    }
}
