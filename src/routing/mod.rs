//! Routing: which backend serves a request, and in which order the others are tried.
//!
//! The [`BackendTable`] is built once per configuration snapshot. All backends that map a
//! public deployment form its pool: priority groups (lower first: PTU before
//! pay-as-you-go), and within a group a smooth weighted round robin (nginx's: over any run
//! of requests each backend leads in proportion to its weight, evenly interleaved), kept
//! per worker so no lock is shared by all requests. With `routing.headroom`, a backend
//! whose last reported rate-limit room cannot hold the request's estimate moves behind the
//! others. Whether a candidate may be tried at all — cooling after a 429, circuit open,
//! failed probes, at `max_concurrent` — is decided by the proxy just before each attempt,
//! from [`health`], so a cool-down that starts during one request applies to its retries.

pub mod health;
pub mod probe;
pub mod signals;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::uri::{Authority, Scheme};

use crate::config::routing::{BreakerConfig, RetryOn};
use crate::config::{BackendKind, Validated};
use crate::metrics::{BackendSeries, Metrics};
use crate::proxy::pool::{self, Pool};
use crate::upstream_auth::Credential;
use health::{BackendHealth, DeploymentHealth, HealthRegistry};

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
    /// Failures retried elsewhere besides 429 and connect errors.
    pub retry_on: Vec<RetryOn>,
    /// Requests in flight at once from this replica (`None`: no limit).
    pub max_concurrent: Option<u32>,
    /// The whole exchange, first byte to last.
    pub total_timeout: Option<Duration>,
    /// Circuit breaker, probe verdict, in-flight count, last error (kept across reloads).
    pub health: Arc<BackendHealth>,
    /// Public deployment name → that deployment's cool-down and reported room here.
    pub deployment_health: HashMap<String, Arc<DeploymentHealth>>,
    /// The same for calls that name no deployment (files, batches).
    pub any_health: Arc<DeploymentHealth>,
    /// The active health probe, when configured.
    pub probe: Option<probe::ProbeSpec>,
}

impl Backend {
    /// The health record of `deployment` (a public name) on this backend.
    pub fn deployment(&self, deployment: Option<&str>) -> &Arc<DeploymentHealth> {
        deployment
            .and_then(|d| self.deployment_health.get(d))
            .unwrap_or(&self.any_health)
    }

    /// Whether requests can go here now as far as health goes (not cooling: a 429 is a
    /// busy backend, not a broken one): the credential is ready, the circuit is not open
    /// and the probe (if any) passes.
    pub fn usable(&self, now: u64) -> Result<(), String> {
        if let Err(why) = self.credential.readiness() {
            return Err(format!(
                "{} credential not ready: {why}",
                self.credential.describe()
            ));
        }
        if !self.health.usable(now) {
            return Err("circuit open".into());
        }
        if self.probe.is_some() && !self.health.probe_healthy() {
            return Err("failing its health probe".into());
        }
        Ok(())
    }
}

/// The `[routing]` settings a snapshot's requests use.
#[derive(Debug, Clone)]
pub struct Policy {
    pub max_attempts: u32,
    pub retry_budget: Duration,
    pub default_cooldown: Duration,
    pub max_cooldown: Duration,
    pub headroom: bool,
    pub headroom_ttl: Duration,
    pub queue_wait: Duration,
    pub breaker: BreakerConfig,
    /// Sidecar mode: a 429 is relayed as the backend sent it and starts no cool-down, so a
    /// deployment at its limit never holds back the others behind the same URL.
    pub transparent: bool,
}

impl Policy {
    fn new(r: &crate::config::routing::RoutingConfig, transparent: bool) -> Self {
        Self {
            max_attempts: r.max_attempts,
            retry_budget: r.retry_budget.0,
            default_cooldown: r.default_cooldown.0,
            max_cooldown: r.max_cooldown.0,
            headroom: r.headroom,
            headroom_ttl: r.headroom_ttl.0,
            queue_wait: r.queue_wait.0,
            breaker: r.breaker,
            transparent,
        }
    }
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
    /// Public name → its pool's priority groups.
    by_deployment: HashMap<String, Vec<Group>>,
    /// All backends sorted by priority, for operations that name no deployment.
    default_order: Vec<usize>,
    public_names: Vec<String>,
    pub policy: Policy,
}

/// Backends of one priority serving one deployment, and the smooth weighted round robin
/// that orders them: one state per worker (a worker only ever locks its own).
#[derive(Debug)]
struct Group {
    members: Vec<usize>,
    weights: Vec<i64>,
    total: i64,
    current: Box<[Mutex<Vec<i64>>]>,
}

impl Group {
    fn new(members: Vec<usize>, backends: &[Arc<Backend>], workers: usize) -> Self {
        let weights: Vec<i64> = members
            .iter()
            .map(|&i| i64::from(backends[i].weight.max(1)))
            .collect();
        Self {
            total: weights.iter().sum(),
            current: (0..workers.max(1))
                .map(|_| Mutex::new(vec![0; members.len()]))
                .collect(),
            weights,
            members,
        }
    }

    /// Append the group's backends: the round robin's pick first, the rest by weight.
    fn order_into(&self, out: &mut Vec<usize>) {
        if self.members.len() == 1 {
            out.push(self.members[0]);
            return;
        }
        let slot = crate::worker::index() % self.current.len();
        let lead = {
            let mut cur = self.current[slot]
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut best = 0;
            for (i, w) in self.weights.iter().enumerate() {
                cur[i] += w;
                if cur[i] > cur[best] {
                    best = i;
                }
            }
            cur[best] -= self.total;
            best
        };
        out.push(self.members[lead]);
        let mut rest: Vec<usize> = (0..self.members.len()).filter(|&i| i != lead).collect();
        rest.sort_by_key(|&i| std::cmp::Reverse(self.weights[i]));
        out.extend(rest.into_iter().map(|i| self.members[i]));
    }
}

impl BackendTable {
    /// Build the table, creating one upstream connection pool per backend.
    /// `credentials` is index-aligned with `config.backends`.
    /// `registry` holds the health kept from earlier snapshots.
    pub fn build(
        v: &Validated,
        credentials: &[Credential],
        metrics: &Metrics,
        registry: &HealthRegistry,
    ) -> Result<Self, BuildError> {
        Self::build_from(v, credentials, metrics, registry, None)
    }

    /// [`BackendTable::build`] for a configuration reload: a backend whose connection
    /// settings (scheme, authority, `http2`, CA file and content, connect timeout) equal
    /// those of a backend in `previous` shares that backend's pool, idle connections
    /// included; the other pools are new, and the old ones close when the last request
    /// of the previous snapshot is done with them. Health (cool-downs, circuits) is kept
    /// by `registry` for every backend whose name and URL are unchanged.
    pub fn build_from(
        v: &Validated,
        credentials: &[Credential],
        metrics: &Metrics,
        registry: &HealthRegistry,
        previous: Option<&BackendTable>,
    ) -> Result<Self, BuildError> {
        let mut backends = Vec::with_capacity(v.config.backends.len());
        let mut configured = Vec::with_capacity(v.config.backends.len());
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
            let health = registry.backend(b.name.as_str(), b.url.as_str());
            configured.push((b.name.to_string(), b.url.to_string()));
            let deployment_health = b
                .deployments
                .iter()
                .map(|(public, upstream)| (public.clone(), health.deployment(upstream.as_str())))
                .collect();
            let api_version = b
                .api_version
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_else(|| DEFAULT_AZURE_API_VERSION.to_owned());
            let probe = match &b.health {
                Some(h) => Some(
                    probe::ProbeSpec::new(h, b.kind, &base_path, &api_version)
                        .with_pool(&scheme, &authority, &opts)
                        .map_err(|e| BuildError::Client(i, e))?,
                ),
                None => None,
            };
            backends.push(Arc::new(Backend {
                name: b.name.to_string(),
                series: metrics.backend_series(label.clone()),
                label,
                kind: b.kind,
                scheme,
                authority,
                base_path,
                api_version,
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
                retry_on: b.retry_on.clone(),
                max_concurrent: b.max_concurrent,
                total_timeout: b.timeouts.total.map(|d| d.0),
                any_health: health.deployment(""),
                health,
                deployment_health,
                probe,
            }));
        }
        registry.retain(&configured);
        let workers = crate::worker::count(v.config.server.workers);
        Ok(Self::from_backends(
            backends,
            Policy::new(&v.config.routing, v.config.passthrough),
            workers,
        ))
    }

    fn from_backends(backends: Vec<Arc<Backend>>, policy: Policy, workers: usize) -> Self {
        let mut default_order: Vec<usize> = (0..backends.len()).collect();
        default_order.sort_by_key(|&i| backends[i].priority);
        let mut by_priority: HashMap<String, Vec<usize>> = HashMap::new();
        for &i in &default_order {
            for name in backends[i].deployments.keys() {
                by_priority.entry(name.clone()).or_default().push(i);
            }
        }
        let by_deployment = by_priority
            .into_iter()
            .map(|(name, order)| {
                let mut groups = Vec::new();
                let mut start = 0;
                while start < order.len() {
                    let prio = backends[order[start]].priority;
                    let end = order[start..]
                        .iter()
                        .position(|&i| backends[i].priority != prio)
                        .map_or(order.len(), |n| start + n);
                    groups.push(Group::new(order[start..end].to_vec(), &backends, workers));
                    start = end;
                }
                (name, groups)
            })
            .collect::<HashMap<_, _>>();
        let mut public_names: Vec<String> = by_deployment.keys().cloned().collect();
        public_names.sort();
        Self {
            backends,
            by_deployment,
            default_order,
            public_names,
            policy,
        }
    }

    /// Each public deployment with its backends in priority order (for readiness).
    pub fn pools(&self) -> impl Iterator<Item = (&str, Vec<&Arc<Backend>>)> {
        self.public_names.iter().map(|name| {
            let members = self.by_deployment[name]
                .iter()
                .flat_map(|g| g.members.iter().map(|&i| &self.backends[i]))
                .collect();
            (name.as_str(), members)
        })
    }

    /// Public deployment names, sorted (what `GET /v1/models` lists).
    pub fn public_names(&self) -> &[String] {
        &self.public_names
    }

    /// Whether any backend serves this public name.
    pub fn serves(&self, deployment: &str) -> bool {
        self.by_deployment.contains_key(deployment)
    }

    /// Whether the order of `deployment`'s candidates depends on the request's token
    /// estimate: with `routing.headroom`, when two or more backends serve it.
    pub fn weighs_tokens(&self, deployment: Option<&str>) -> bool {
        self.policy.headroom
            && deployment
                .and_then(|d| self.by_deployment.get(d))
                .is_some_and(|groups| pool_size(groups) > 1)
    }

    /// Whether any deployment's order depends on token estimates.
    pub fn weighs_any_tokens(&self) -> bool {
        self.policy.headroom
            && self
                .by_deployment
                .values()
                .any(|groups| pool_size(groups) > 1)
    }

    /// All backends, in configuration order.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// Candidate backends in the order to try them: by priority, the smooth weighted
    /// round robin's pick first within one priority; with `routing.headroom`, those whose
    /// reported room cannot hold `tokens` after all the others. Returns `None` when no
    /// backend serves the deployment.
    ///
    /// With no deployment (files, batches, stored responses) the order is fixed — priority,
    /// then configuration order — because the ids those calls create and use exist only on
    /// the backend that made them.
    pub fn candidates(&self, deployment: Option<&str>, tokens: u64) -> Option<Vec<Arc<Backend>>> {
        let Some(d) = deployment else {
            return Some(
                self.default_order
                    .iter()
                    .map(|&i| self.backends[i].clone())
                    .collect(),
            );
        };
        let groups = self.by_deployment.get(d)?;
        let mut order = Vec::with_capacity(groups.iter().map(|g| g.members.len()).sum());
        for g in groups {
            g.order_into(&mut order);
        }
        if self.policy.headroom && order.len() > 1 {
            let now = health::now_ms();
            let (fits, short): (Vec<usize>, Vec<usize>) = order
                .iter()
                .partition(|&&i| self.backends[i].deployment(Some(d)).has_room(now, tokens));
            if !short.is_empty() && !fits.is_empty() {
                order = fits;
                order.extend(short);
            }
        }
        Some(
            order
                .into_iter()
                .map(|i| self.backends[i].clone())
                .collect(),
        )
    }
}

/// Backends in a deployment's pool, all priorities together.
fn pool_size(groups: &[Group]) -> usize {
    groups.iter().map(|g| g.members.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(toml: &str) -> BackendTable {
        let v = crate::config::load_str(toml, "t", std::path::Path::new(".")).unwrap();
        let creds =
            crate::upstream_auth::BackendCredentials::start(&v, &Default::default()).unwrap();
        BackendTable::build(
            &v,
            &creds.credentials,
            &Metrics::new(),
            &HealthRegistry::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_rebuilt_table_keeps_the_pools_of_backends_whose_connection_is_unchanged() {
        let build = |toml: &str, previous: Option<&BackendTable>| {
            let v = crate::config::load_str(toml, "t", std::path::Path::new(".")).unwrap();
            let creds =
                crate::upstream_auth::BackendCredentials::start(&v, &Default::default()).unwrap();
            BackendTable::build_from(
                &v,
                &creds.credentials,
                &Metrics::new(),
                &HealthRegistry::default(),
                previous,
            )
            .unwrap()
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
        let mut leads = Vec::new();
        for _ in 0..2000 {
            let c = t.candidates(Some("gpt-4o"), 0).unwrap();
            assert_eq!(c.len(), 3);
            assert_eq!(c[2].name, "paygo", "lower priority always last");
            leads.push(c[0].name.clone());
        }
        // Smooth weighted round robin, 3:1: exactly 3 of every 4 requests lead with ptu-a,
        // and ptu-b's turn is spread out (never two in a row).
        for w in leads.chunks(4) {
            assert_eq!(w.iter().filter(|n| *n == "ptu-a").count(), 3, "{w:?}");
        }
        assert!(leads
            .windows(2)
            .all(|w| !(w[0] == "ptu-b" && w[1] == "ptu-b")));
        assert_eq!(names(&t.candidates(Some("emb"), 0).unwrap()), ["paygo"]);
        assert!(t.candidates(Some("nope"), 0).is_none());
        for _ in 0..50 {
            assert_eq!(
                names(&t.candidates(None, 0).unwrap()),
                ["ptu-a", "ptu-b", "paygo"],
                "no deployment: one fixed order"
            );
        }
        assert_eq!(t.public_names(), ["emb", "gpt-4o"]);
        assert_eq!(t.backends()[1].base_path, "/prefix");
    }

    #[test]
    fn only_pools_of_two_or_more_with_headroom_weigh_tokens() {
        let t = table(THREE);
        assert!(t.weighs_tokens(Some("gpt-4o")), "three backends");
        assert!(!t.weighs_tokens(Some("emb")), "one backend");
        assert!(!t.weighs_tokens(Some("unknown")));
        assert!(!t.weighs_tokens(None));
        assert!(t.weighs_any_tokens());
        let off = table(&format!("[routing]\nheadroom = false\n{THREE}"));
        assert!(!off.weighs_tokens(Some("gpt-4o")));
        assert!(!off.weighs_any_tokens());
    }

    #[test]
    fn backends_short_of_reported_room_go_last() {
        let t = table(THREE);
        let now = health::now_ms();
        let ptu_a = &t.backends()[1];
        ptu_a
            .deployment(Some("gpt-4o"))
            .report(now, Some(500), Some(10), now + 60_000);
        for _ in 0..8 {
            let c = t.candidates(Some("gpt-4o"), 1000).unwrap();
            assert_eq!(names(&c)[2], "ptu-a", "500 tokens left cannot hold 1,000");
            let c = t.candidates(Some("gpt-4o"), 400).unwrap();
            assert_eq!(names(&c)[2], "paygo", "400 fit");
        }
    }

    #[test]
    fn health_survives_a_rebuild_of_unchanged_backends() {
        let v = crate::config::load_str(THREE, "t", std::path::Path::new(".")).unwrap();
        let creds =
            crate::upstream_auth::BackendCredentials::start(&v, &Default::default()).unwrap();
        let reg = HealthRegistry::default();
        let m = Metrics::new();
        let a = BackendTable::build(&v, &creds.credentials, &m, &reg).unwrap();
        let now = health::now_ms();
        a.backends()[1].deployment(Some("gpt-4o")).cool(
            now,
            Duration::from_secs(60),
            health::CoolSource::Default,
        );
        let b = BackendTable::build(&v, &creds.credentials, &m, &reg).unwrap();
        assert!(b.backends()[1].deployment(Some("gpt-4o")).cooling(now) > 0);
        assert_eq!(b.backends()[2].deployment(Some("gpt-4o")).cooling(now), 0);
        // A new URL under the same name is a new backend.
        let moved = THREE.replace("127.0.0.1:2/prefix/", "127.0.0.1:9/prefix/");
        let v2 = crate::config::load_str(&moved, "t", std::path::Path::new(".")).unwrap();
        let c = BackendTable::build(&v2, &creds.credentials, &m, &reg).unwrap();
        assert_eq!(c.backends()[1].deployment(Some("gpt-4o")).cooling(now), 0);
    }
}
