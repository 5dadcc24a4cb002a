//! Routing: which backend serves a request.
//!
//! The [`BackendTable`] is built once per configuration snapshot. For a deployment it
//! yields candidate backends in priority order (lower first, e.g. PTU before
//! pay-as-you-go), shuffled by weight within one priority. The proxy tries them in that
//! order and moves on only when a backend could not have processed the request
//! (connection failure) or refused it for capacity (429).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};

use crate::config::{BackendKind, Validated};
use crate::metrics::{BackendSeries, Metrics};
use crate::proxy::pool::{self, Pool};
use crate::upstream_auth::Credential;

/// One backend, ready to receive requests.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    /// The name as a shared metric/audit label.
    pub label: Arc<String>,
    pub kind: BackendKind,
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix from the configured URL, without a trailing slash (often empty).
    pub base_path: String,
    /// `api-version` used when the client sends none (Azure backends).
    pub api_version: String,
    pub priority: u32,
    pub weight: u32,
    /// Public name → this backend's deployment/model name.
    pub deployments: HashMap<String, String>,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub credential: Credential,
    /// Upstream connections, one slot per worker, so a worker only uses connections it owns.
    /// Shared with the next configuration's backend when its connection settings are the
    /// same ([`BackendTable::build_from`]), so a reload keeps warm connections.
    pub pool: Arc<Pool>,
    /// What the pool was built from (scheme, authority, `http2`, CA file and its content,
    /// connect timeout, workers): equal keys may share one pool.
    pool_key: PoolKey,
    /// This backend's request and attempt counters and latency histograms.
    pub series: BackendSeries,
    /// Response headers dropped by default that this backend may pass to clients.
    pub pass_response_headers: Vec<http::HeaderName>,
}

/// Default Azure data-plane API version when neither client nor config names one.
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";

/// Problems building the table from a validated config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("backends[{0}]: {1}")]
    Client(usize, pool::SetupError),
    #[error("backends[{0}].url: {1}")]
    Url(usize, String),
}

/// The settings an upstream connection pool is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PoolKey {
    scheme: Scheme,
    authority: Authority,
    http2: bool,
    /// The CA file and the SHA-256 of its content (a replaced file is a new pool).
    ca: Option<(std::path::PathBuf, [u8; 32])>,
    connect_timeout: Duration,
    workers: usize,
}

/// All backends of a snapshot, indexed by public deployment name.
#[derive(Debug)]
pub struct BackendTable {
    backends: Vec<Arc<Backend>>,
    /// Public name → backend indices sorted by priority.
    by_deployment: HashMap<String, Vec<usize>>,
    /// All backends sorted by priority, for operations that name no deployment.
    default_order: Vec<usize>,
    public_names: Vec<String>,
}

impl BackendTable {
    /// Build the table, creating one upstream connection pool per backend.
    /// `credentials` is index-aligned with `config.backends`.
    pub fn build(
        v: &Validated,
        credentials: &[Credential],
        metrics: &Metrics,
    ) -> Result<Self, BuildError> {
        Self::build_from(v, credentials, metrics, None)
    }

    /// [`BackendTable::build`] for a configuration reload: a backend whose connection
    /// settings (scheme, authority, `http2`, CA file and content, connect timeout) equal
    /// those of a backend in `previous` shares that backend's pool, idle connections
    /// included; the other pools are new, and the old ones close when the last request
    /// of the previous snapshot is done with them.
    pub fn build_from(
        v: &Validated,
        credentials: &[Credential],
        metrics: &Metrics,
        previous: Option<&BackendTable>,
    ) -> Result<Self, BuildError> {
        let mut backends = Vec::with_capacity(v.config.backends.len());
        for ((i, b), credential) in v.config.backends.iter().enumerate().zip(credentials) {
            let uri: http::Uri = b
                .url
                .as_str()
                .parse()
                .map_err(|e: http::uri::InvalidUri| BuildError::Url(i, e.to_string()))?;
            let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTPS);
            let authority = uri
                .authority()
                .cloned()
                .ok_or_else(|| BuildError::Url(i, "missing host".into()))?;
            let base_path = uri.path().trim_end_matches('/').to_owned();
            let ca = b.ca_file.as_ref().map(|f| v.base_dir.join(f.as_str()));
            let opts = pool::PoolOptions {
                connect_timeout: b.timeouts.connect.0,
                http2: b.http2,
                extra_ca_file: ca,
                workers: crate::worker::count(v.config.server.workers),
            };
            let pool_key = PoolKey {
                scheme: scheme.clone(),
                authority: authority.clone(),
                http2: opts.http2,
                ca: match &opts.extra_ca_file {
                    Some(p) => {
                        let pem = std::fs::read(p).map_err(|e| {
                            BuildError::Client(
                                i,
                                pool::SetupError::CaFile {
                                    path: p.display().to_string(),
                                    reason: e.to_string(),
                                },
                            )
                        })?;
                        Some((p.clone(), crate::digest::sha256(&pem)))
                    }
                    None => None,
                },
                connect_timeout: opts.connect_timeout,
                workers: opts.workers,
            };
            let kept = previous.and_then(|t| {
                t.backends
                    .iter()
                    .find(|b| b.pool_key == pool_key)
                    .map(|b| b.pool.clone())
            });
            let pool = match kept {
                Some(p) => p,
                None => Arc::new(
                    Pool::new(&scheme, &authority, &opts).map_err(|e| BuildError::Client(i, e))?,
                ),
            };
            let label = Arc::new(b.name.to_string());
            backends.push(Arc::new(Backend {
                name: b.name.to_string(),
                series: metrics.backend_series(label.clone()),
                label,
                kind: b.kind,
                scheme,
                authority,
                base_path,
                api_version: b
                    .api_version
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_else(|| DEFAULT_AZURE_API_VERSION.to_owned()),
                priority: b.priority,
                weight: b.weight,
                deployments: b
                    .deployments
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect(),
                first_byte_timeout: b.timeouts.first_byte.0,
                idle_timeout: b.timeouts.idle.0,
                credential: credential.clone(),
                pool,
                pool_key,
                pass_response_headers: b
                    .pass_response_headers
                    .iter()
                    .filter_map(|h| http::HeaderName::from_bytes(h.as_str().as_bytes()).ok())
                    .collect(),
            }));
        }
        Ok(Self::from_backends(backends))
    }

    fn from_backends(backends: Vec<Arc<Backend>>) -> Self {
        let mut default_order: Vec<usize> = (0..backends.len()).collect();
        default_order.sort_by_key(|&i| backends[i].priority);
        let mut by_deployment: HashMap<String, Vec<usize>> = HashMap::new();
        for &i in &default_order {
            for name in backends[i].deployments.keys() {
                by_deployment.entry(name.clone()).or_default().push(i);
            }
        }
        let mut public_names: Vec<String> = by_deployment.keys().cloned().collect();
        public_names.sort();
        Self {
            backends,
            by_deployment,
            default_order,
            public_names,
        }
    }

    /// Public deployment names, sorted (what `GET /v1/models` lists).
    pub fn public_names(&self) -> &[String] {
        &self.public_names
    }

    /// Whether any backend serves this public name.
    pub fn serves(&self, deployment: &str) -> bool {
        self.by_deployment.contains_key(deployment)
    }

    /// All backends, in configuration order.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// Candidate backends in the order to try them: by priority, weighted-random within
    /// one priority. Returns `None` when no backend serves the deployment.
    ///
    /// With no deployment (files, batches, stored responses) the order is fixed — priority,
    /// then configuration order — because the ids those calls create and use exist only on
    /// the backend that made them.
    pub fn candidates(&self, deployment: Option<&str>) -> Option<Vec<Arc<Backend>>> {
        let Some(d) = deployment else {
            return Some(
                self.default_order
                    .iter()
                    .map(|&i| self.backends[i].clone())
                    .collect(),
            );
        };
        let order = self.by_deployment.get(d)?;
        let mut out: Vec<Arc<Backend>> = order.iter().map(|&i| self.backends[i].clone()).collect();
        let mut start = 0;
        while start < out.len() {
            let prio = out[start].priority;
            let end = out[start..]
                .iter()
                .position(|b| b.priority != prio)
                .map_or(out.len(), |n| start + n);
            weighted_shuffle(&mut out[start..end]);
            start = end;
        }
        Some(out)
    }
}

/// Order a group so each backend comes first with probability proportional to its weight.
fn weighted_shuffle(group: &mut [Arc<Backend>]) {
    for i in 0..group.len().saturating_sub(1) {
        let total: u64 = group[i..].iter().map(|b| u64::from(b.weight)).sum();
        let mut pick = fastrand::u64(0..total.max(1));
        let mut chosen = i;
        for (j, b) in group[i..].iter().enumerate() {
            let w = u64::from(b.weight);
            if pick < w {
                chosen = i + j;
                break;
            }
            pick -= w;
        }
        group.swap(i, chosen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(toml: &str) -> BackendTable {
        let v = crate::config::load_str(toml, "t", std::path::Path::new(".")).unwrap();
        let creds =
            crate::upstream_auth::BackendCredentials::start(&v, &Default::default()).unwrap();
        BackendTable::build(&v, &creds.credentials, &Metrics::new()).unwrap()
    }

    #[test]
    fn a_rebuilt_table_keeps_the_pools_of_backends_whose_connection_is_unchanged() {
        let build = |toml: &str, previous: Option<&BackendTable>| {
            let v = crate::config::load_str(toml, "t", std::path::Path::new(".")).unwrap();
            let creds =
                crate::upstream_auth::BackendCredentials::start(&v, &Default::default()).unwrap();
            BackendTable::build_from(&v, &creds.credentials, &Metrics::new(), previous).unwrap()
        };
        let old = build(THREE, None);
        // Weights, priorities, deployments and names change; ptu-b moves to another port,
        // paygo gets another connect timeout.
        let changed = THREE
            .replace("weight = 3", "weight = 5")
            .replace("name = \"ptu-a\"", "name = \"ptu-a2\"")
            .replace("127.0.0.1:3", "127.0.0.1:4")
            .replace(
                "priority = 1\n",
                "priority = 1\ntimeouts = { connect = \"7s\", first_byte = \"30s\", idle = \"30s\" }\n",
            );
        let new = build(&changed, Some(&old));
        let (o, n) = (old.backends(), new.backends());
        assert!(
            Arc::ptr_eq(&o[1].pool, &n[1].pool),
            "ptu-a: same URL, renamed"
        );
        assert_eq!(n[1].weight, 5);
        assert!(!Arc::ptr_eq(&o[2].pool, &n[2].pool), "ptu-b: other port");
        assert!(
            !Arc::ptr_eq(&o[0].pool, &n[0].pool),
            "paygo: other connect timeout"
        );
        // Unchanged twice over: still the first pool.
        let again = build(&changed, Some(&new));
        assert!(Arc::ptr_eq(&n[0].pool, &again.backends()[0].pool));
    }

    const THREE: &str = r#"
[[backends]]
name = "paygo"
url = "http://127.0.0.1:1"
priority = 1
deployments = { "gpt-4o" = "gpt-4o", "emb" = "emb" }
[[backends]]
name = "ptu-a"
url = "http://127.0.0.1:2/prefix/"
priority = 0
weight = 3
deployments = { "gpt-4o" = "gpt-4o-ptu" }
[[backends]]
name = "ptu-b"
url = "http://127.0.0.1:3"
priority = 0
weight = 1
deployments = { "gpt-4o" = "gpt-4o-ptu" }
"#;

    fn names(c: &[Arc<Backend>]) -> Vec<&str> {
        c.iter().map(|b| b.name.as_str()).collect()
    }

    #[test]
    fn priority_first_and_weights_within() {
        let t = table(THREE);
        let mut first_a = 0;
        for _ in 0..2000 {
            let c = t.candidates(Some("gpt-4o")).unwrap();
            assert_eq!(c.len(), 3);
            assert_eq!(c[2].name, "paygo", "lower priority always last");
            if c[0].name == "ptu-a" {
                first_a += 1;
            }
        }
        // weight 3:1 → about 75% (bounds generous enough never to flake)
        assert!((1300..1700).contains(&first_a), "{first_a}");
        assert_eq!(names(&t.candidates(Some("emb")).unwrap()), ["paygo"]);
        assert!(t.candidates(Some("nope")).is_none());
        for _ in 0..50 {
            assert_eq!(
                names(&t.candidates(None).unwrap()),
                ["ptu-a", "ptu-b", "paygo"],
                "no deployment: one fixed order"
            );
        }
        assert_eq!(t.public_names(), ["emb", "gpt-4o"]);
        assert_eq!(t.backends()[1].base_path, "/prefix");
    }
}
