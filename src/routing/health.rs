//! What a pool remembers about its backends between requests: 429 cool-downs and reported
//! headroom per backend × deployment; the circuit breaker, the health probe's verdict,
//! requests in flight and the last error per backend.
//!
//! Everything a request reads or writes is an atomic of the backend it touches: no lock is
//! shared by all requests. The few mutexes (the last error, the registry) are taken on
//! failures, at build time and by the admin listener only.
//!
//! State lives in a [`HealthRegistry`] owned by the gateway, not in a configuration
//! snapshot, so a reload keeps cool-downs, open circuits and counts for every backend whose
//! name and URL did not change.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::config::routing::BreakerConfig;

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Milliseconds on a monotonic clock private to this process (never 0).
pub fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

/// A monotonic instant of [`now_ms`] as wall-clock time (for the admin API).
pub fn wall(at_ms: u64) -> SystemTime {
    let now = now_ms();
    let now_wall = SystemTime::now();
    if at_ms >= now {
        now_wall + Duration::from_millis(at_ms - now)
    } else {
        now_wall - Duration::from_millis(now - at_ms)
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Where a cool-down's length came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CoolSource {
    RetryAfterMs = 1,
    XMsRetryAfterMs = 2,
    RetryAfterSeconds = 3,
    RetryAfterDate = 4,
    /// No usable value: `routing.default_cooldown`.
    Default = 5,
}

impl CoolSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RetryAfterMs => "retry-after-ms",
            Self::XMsRetryAfterMs => "x-ms-retry-after-ms",
            Self::RetryAfterSeconds => "retry-after",
            Self::RetryAfterDate => "retry-after (date)",
            Self::Default => "routing.default_cooldown",
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::RetryAfterMs,
            2 => Self::XMsRetryAfterMs,
            3 => Self::RetryAfterSeconds,
            4 => Self::RetryAfterDate,
            5 => Self::Default,
            _ => return None,
        })
    }
}

/// Unknown remaining count.
const UNKNOWN: i64 = i64::MIN;

/// One deployment on one backend: its 429 cool-down and the rate-limit room it reported.
#[derive(Debug)]
pub struct DeploymentHealth {
    /// The backend's own deployment name.
    pub upstream: String,
    cool_until: AtomicU64,
    cool_source: AtomicU8,
    cool_asked_ms: AtomicU64,
    remaining_tokens: AtomicI64,
    remaining_requests: AtomicI64,
    /// Until when the remaining counts are believed.
    remaining_until: AtomicU64,
    /// When they were last reported.
    reported_at: AtomicU64,
}

/// What the admin API shows of a deployment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeploymentView {
    pub upstream: String,
    /// RFC 3339 end of a running cool-down.
    pub cooling_until: Option<String>,
    pub cooling_ms: Option<u64>,
    /// Which header the cool-down came from.
    pub cooling_because: Option<&'static str>,
    pub remaining_tokens: Option<i64>,
    pub remaining_requests: Option<i64>,
    /// Seconds since the remaining counts were reported.
    pub reported_secs_ago: Option<f64>,
}

impl DeploymentHealth {
    fn new(upstream: &str) -> Self {
        Self {
            upstream: upstream.to_owned(),
            cool_until: AtomicU64::new(0),
            cool_source: AtomicU8::new(0),
            cool_asked_ms: AtomicU64::new(0),
            remaining_tokens: AtomicI64::new(UNKNOWN),
            remaining_requests: AtomicI64::new(UNKNOWN),
            remaining_until: AtomicU64::new(0),
            reported_at: AtomicU64::new(0),
        }
    }

    /// Milliseconds of cool-down left at `now` (0: not cooling).
    pub fn cooling(&self, now: u64) -> u64 {
        self.cool_until.load(Ordering::Relaxed).saturating_sub(now)
    }

    /// Skip this deployment for `wait` from `now`. A later end wins over an earlier one
    /// (two 429s in a row never shorten a cool-down).
    pub fn cool(&self, now: u64, wait: Duration, source: CoolSource) {
        let until = now.saturating_add(ms(wait));
        let prev = self.cool_until.fetch_max(until, Ordering::Relaxed);
        if prev < until {
            self.cool_source.store(source as u8, Ordering::Relaxed);
            self.cool_asked_ms.store(ms(wait), Ordering::Relaxed);
        }
    }

    /// Record the backend's reported remaining tokens / requests, believed until `until`.
    pub fn report(&self, now: u64, tokens: Option<i64>, requests: Option<i64>, until: u64) {
        if tokens.is_none() && requests.is_none() {
            return;
        }
        self.remaining_tokens
            .store(tokens.unwrap_or(UNKNOWN), Ordering::Relaxed);
        self.remaining_requests
            .store(requests.unwrap_or(UNKNOWN), Ordering::Relaxed);
        self.remaining_until.store(until, Ordering::Relaxed);
        self.reported_at.store(now, Ordering::Relaxed);
    }

    /// Whether the last report leaves room for a request of `tokens` at `now`. Unknown or
    /// stale reports leave room.
    pub fn has_room(&self, now: u64, tokens: u64) -> bool {
        if self.remaining_until.load(Ordering::Relaxed) <= now {
            return true;
        }
        let t = self.remaining_tokens.load(Ordering::Relaxed);
        let r = self.remaining_requests.load(Ordering::Relaxed);
        let tokens_ok = t == UNKNOWN || t >= i64::try_from(tokens).unwrap_or(i64::MAX);
        let requests_ok = r == UNKNOWN || r >= 1;
        tokens_ok && requests_ok
    }

    /// A request of `tokens` is on its way: take it off the reported room (until the
    /// backend's next report replaces it).
    pub fn spend(&self, tokens: u64) {
        let t = i64::try_from(tokens).unwrap_or(i64::MAX);
        let _ = self
            .remaining_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v != UNKNOWN).then(|| v.saturating_sub(t))
            });
        let _ = self
            .remaining_requests
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v != UNKNOWN).then(|| v.saturating_sub(1))
            });
    }

    pub fn view(&self, now: u64) -> DeploymentView {
        let left = self.cooling(now);
        let fresh = self.remaining_until.load(Ordering::Relaxed) > now;
        let known = |v: i64| (fresh && v != UNKNOWN).then_some(v);
        let at = self.reported_at.load(Ordering::Relaxed);
        DeploymentView {
            upstream: self.upstream.clone(),
            cooling_until: (left > 0).then(|| rfc3339(wall(now + left))),
            cooling_ms: (left > 0).then_some(left),
            cooling_because: (left > 0)
                .then(|| CoolSource::from_u8(self.cool_source.load(Ordering::Relaxed)))
                .flatten()
                .map(CoolSource::as_str),
            remaining_tokens: known(self.remaining_tokens.load(Ordering::Relaxed)),
            remaining_requests: known(self.remaining_requests.load(Ordering::Relaxed)),
            reported_secs_ago: (at > 0).then(|| (now.saturating_sub(at)) as f64 / 1000.0),
        }
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// Buckets of the breaker's failure-rate window.
const BUCKETS: usize = 10;

#[derive(Debug, Default)]
struct Bucket {
    /// Index of the period (`now / bucket length`) the counts belong to.
    period: AtomicU64,
    ok: AtomicU32,
    failed: AtomicU32,
}

/// What the breaker lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Closed: go.
    Pass,
    /// Half-open, and this request is the one probe.
    Probe,
    /// Open (or half-open with its probe already out) for this many more milliseconds
    /// (0 when the end is the probe's outcome).
    Blocked(u64),
}

/// The circuit breaker, probe verdict, concurrency and last error of one backend.
#[derive(Debug)]
pub struct BackendHealth {
    pub name: String,
    state: AtomicU8,
    open_until: AtomicU64,
    /// Trips in a row (the open time doubles with each).
    trips: AtomicU32,
    consecutive: AtomicU32,
    unauthorized: AtomicU32,
    probe_out: AtomicBool,
    window: [Bucket; BUCKETS],
    /// The active probe's verdict (true until a probe says otherwise).
    probe_healthy: AtomicBool,
    probe_streak: AtomicI64,
    in_flight: AtomicU32,
    released: tokio::sync::Notify,
    /// Requests waiting in [`BackendHealth::wait_release`] (only they need a wake-up, so a
    /// lease's release touches the `Notify`'s lock only when someone waits).
    waiting: AtomicU32,
    last_error: Mutex<Option<(SystemTime, String)>>,
    deployments: Mutex<HashMap<String, Arc<DeploymentHealth>>>,
}

/// What the admin API shows of a backend's health.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendView {
    /// `closed`, `open` or `half_open`.
    pub circuit: &'static str,
    pub circuit_open_until: Option<String>,
    pub consecutive_failures: u32,
    pub trips: u32,
    pub consecutive_unauthorized: u32,
    /// The active probe's verdict (`null` without a probe).
    pub probe_healthy: Option<bool>,
    pub in_flight: u32,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
}

impl BackendHealth {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            state: AtomicU8::new(CLOSED),
            open_until: AtomicU64::new(0),
            trips: AtomicU32::new(0),
            consecutive: AtomicU32::new(0),
            unauthorized: AtomicU32::new(0),
            probe_out: AtomicBool::new(false),
            window: Default::default(),
            probe_healthy: AtomicBool::new(true),
            probe_streak: AtomicI64::new(0),
            in_flight: AtomicU32::new(0),
            released: tokio::sync::Notify::new(),
            waiting: AtomicU32::new(0),
            last_error: Mutex::new(None),
            deployments: Mutex::new(HashMap::new()),
        }
    }

    /// The state of `upstream` (this backend's deployment name), created on first use.
    /// Build time only.
    pub fn deployment(&self, upstream: &str) -> Arc<DeploymentHealth> {
        let mut d = self.deployments.lock().unwrap_or_else(|p| p.into_inner());
        d.entry(upstream.to_owned())
            .or_insert_with(|| Arc::new(DeploymentHealth::new(upstream)))
            .clone()
    }

    /// Ask the breaker whether a request may go to this backend at `now`.
    pub fn gate(&self, now: u64) -> Gate {
        match self.state.load(Ordering::Acquire) {
            CLOSED => Gate::Pass,
            OPEN => {
                let until = self.open_until.load(Ordering::Acquire);
                if now < until {
                    return Gate::Blocked(until - now);
                }
                // The open time is over: one request may probe.
                let _ = self.state.compare_exchange(
                    OPEN,
                    HALF_OPEN,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                self.claim_probe()
            }
            _ => self.claim_probe(),
        }
    }

    fn claim_probe(&self) -> Gate {
        if self.state.load(Ordering::Acquire) == CLOSED {
            return Gate::Pass;
        }
        match self
            .probe_out
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Gate::Probe,
            Err(_) => Gate::Blocked(0),
        }
    }

    /// Whether the breaker would let a request through now (without claiming the probe).
    pub fn usable(&self, now: u64) -> bool {
        match self.state.load(Ordering::Acquire) {
            CLOSED => true,
            OPEN => now >= self.open_until.load(Ordering::Acquire),
            _ => !self.probe_out.load(Ordering::Acquire),
        }
    }

    /// Whether the circuit is closed (the backend is healthy as far as traffic tells).
    pub fn closed(&self) -> bool {
        self.state.load(Ordering::Acquire) == CLOSED
    }

    fn bucket(&self, now: u64, cfg: &BreakerConfig) -> &Bucket {
        let len = (ms(cfg.window.0) / BUCKETS as u64).max(1);
        let period = now / len;
        let b = &self.window[(period % BUCKETS as u64) as usize];
        let seen = b.period.load(Ordering::Acquire);
        if seen != period
            && b.period
                .compare_exchange(seen, period, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            b.ok.store(0, Ordering::Release);
            b.failed.store(0, Ordering::Release);
        }
        b
    }

    /// Attempts and failures over the window ending at `now`.
    fn window_counts(&self, now: u64, cfg: &BreakerConfig) -> (u32, u32) {
        let len = (ms(cfg.window.0) / BUCKETS as u64).max(1);
        let current = now / len;
        let (mut total, mut failed) = (0u32, 0u32);
        for b in &self.window {
            let p = b.period.load(Ordering::Acquire);
            if p + (BUCKETS as u64) > current && p <= current {
                let f = b.failed.load(Ordering::Acquire);
                total = total.saturating_add(b.ok.load(Ordering::Acquire) + f);
                failed = failed.saturating_add(f);
            }
        }
        (total, failed)
    }

    /// The backend answered (a status under 500, not 401).
    pub fn succeeded(&self, now: u64, gate: Gate, cfg: &BreakerConfig) {
        self.bucket(now, cfg).ok.fetch_add(1, Ordering::AcqRel);
        self.consecutive.store(0, Ordering::Release);
        self.unauthorized.store(0, Ordering::Release);
        if gate == Gate::Probe || self.state.load(Ordering::Acquire) != CLOSED {
            if self.state.swap(CLOSED, Ordering::AcqRel) != CLOSED {
                tracing::info!(backend = %self.name, "circuit closed: the probe request succeeded");
            }
            self.trips.store(0, Ordering::Release);
            self.probe_out.store(false, Ordering::Release);
        }
    }

    /// The attempt failed (connect error, 5xx, timeout, reset before the head).
    /// Returns whether this opened the circuit.
    pub fn failed(&self, now: u64, gate: Gate, cfg: &BreakerConfig, why: &str) -> bool {
        self.note_error(why);
        self.bucket(now, cfg).failed.fetch_add(1, Ordering::AcqRel);
        let consecutive = self.consecutive.fetch_add(1, Ordering::AcqRel) + 1;
        if gate == Gate::Probe {
            return self.trip(now, cfg, "the probe request failed");
        }
        if self.state.load(Ordering::Acquire) != CLOSED {
            return false;
        }
        if consecutive >= cfg.consecutive_failures {
            return self.trip(now, cfg, "consecutive failures");
        }
        let (total, failed) = self.window_counts(now, cfg);
        if total >= cfg.min_requests && f64::from(failed) >= cfg.failure_rate * f64::from(total) {
            return self.trip(now, cfg, "failure rate");
        }
        false
    }

    /// The backend rejected the gateway's credential (401) even after a token refresh.
    /// Returns whether this opened the circuit.
    pub fn unauthorized(&self, now: u64, gate: Gate, cfg: &BreakerConfig) -> bool {
        self.note_error("the backend rejected the gateway's credential (401)");
        let n = self.unauthorized.fetch_add(1, Ordering::AcqRel) + 1;
        if gate == Gate::Probe || n >= cfg.unauthorized {
            return self.trip(now, cfg, "the backend rejects the gateway's credential");
        }
        false
    }

    /// The attempt ended with no verdict (a 429, the client gave up): a claimed probe is
    /// released for the next request.
    pub fn neutral(&self, gate: Gate) {
        if gate == Gate::Probe {
            self.probe_out.store(false, Ordering::Release);
        }
    }

    /// The attempt holding `gate` ended without reaching a verdict (its request was
    /// cancelled mid-flight): a probe still out is handed to the next request, so a
    /// client hanging up can never leave the circuit half-open forever.
    pub fn abandon(&self, gate: Gate) {
        if gate == Gate::Probe && self.state.load(Ordering::Acquire) == HALF_OPEN {
            self.probe_out.store(false, Ordering::Release);
        }
    }

    fn trip(&self, now: u64, cfg: &BreakerConfig, why: &str) -> bool {
        let trips = self.trips.fetch_add(1, Ordering::AcqRel) + 1;
        let factor = 1u32 << (trips - 1).min(16);
        let open = cfg
            .open_for
            .0
            .saturating_mul(factor)
            .min(cfg.max_open_for.0);
        self.open_until
            .store(now.saturating_add(ms(open)), Ordering::Release);
        self.state.store(OPEN, Ordering::Release);
        self.probe_out.store(false, Ordering::Release);
        self.consecutive.store(0, Ordering::Release);
        for b in &self.window {
            b.ok.store(0, Ordering::Release);
            b.failed.store(0, Ordering::Release);
        }
        tracing::warn!(backend = %self.name, reason = why, trips, open_ms = ms(open), "circuit opened");
        true
    }

    fn note_error(&self, why: &str) {
        let mut e = self.last_error.lock().unwrap_or_else(|p| p.into_inner());
        *e = Some((SystemTime::now(), why.to_owned()));
    }

    /// Record an error shown by the admin API without counting it for the breaker.
    pub fn note(&self, why: &str) {
        self.note_error(why);
    }

    /// Record one active probe's result. Returns the verdict when it changed.
    pub fn probed(&self, ok: bool, unhealthy_after: u32, healthy_after: u32) -> Option<bool> {
        // The streak: positive for passes in a row, negative for failures.
        let next = |s: i64| match (ok, s > 0) {
            (true, true) => s.saturating_add(1),
            (true, false) => 1,
            (false, false) => s.saturating_sub(1),
            (false, true) => -1,
        };
        let prev = self
            .probe_streak
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| Some(next(s)))
            .unwrap_or_else(|s| s);
        let streak = next(prev);
        let healthy = self.probe_healthy.load(Ordering::Acquire);
        if healthy && !ok && streak <= -i64::from(unhealthy_after) {
            self.probe_healthy.store(false, Ordering::Release);
            return Some(false);
        }
        if !healthy && ok && streak >= i64::from(healthy_after) {
            self.probe_healthy.store(true, Ordering::Release);
            return Some(true);
        }
        None
    }

    /// The active probe's verdict (true without a probe).
    pub fn probe_healthy(&self) -> bool {
        self.probe_healthy.load(Ordering::Acquire)
    }

    /// Take a slot when fewer than `max` requests are in flight (`None`: no limit).
    pub fn try_enter(self: &Arc<Self>, max: Option<u32>) -> Option<Lease> {
        let limit = max.unwrap_or(u32::MAX);
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(Lease {
            health: self.clone(),
        })
    }

    /// Wait until this backend has fewer than `max` requests in flight (or `deadline`).
    pub async fn wait_release(&self, max: Option<u32>, deadline: tokio::time::Instant) {
        struct Waiting<'a>(&'a AtomicU32);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let notified = self.released.notified();
        tokio::pin!(notified);
        // Registered before counting, so a release between the two is not missed.
        notified.as_mut().enable();
        // SeqCst pairs with the lease's release: either it sees this waiter, or this sees
        // its slot free.
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        if self.in_flight.load(Ordering::SeqCst) < max.unwrap_or(u32::MAX) {
            return;
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// The health shown by the admin API; `probed` when an active probe runs.
    pub fn view(&self, now: u64, probed: bool) -> BackendView {
        let state = self.state.load(Ordering::Acquire);
        let until = self.open_until.load(Ordering::Acquire);
        let (circuit, open_until) = match state {
            CLOSED => ("closed", None),
            OPEN if now < until => ("open", Some(rfc3339(wall(until)))),
            _ => ("half_open", None),
        };
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        BackendView {
            circuit,
            circuit_open_until: open_until,
            consecutive_failures: self.consecutive.load(Ordering::Acquire),
            trips: self.trips.load(Ordering::Acquire),
            consecutive_unauthorized: self.unauthorized.load(Ordering::Acquire),
            probe_healthy: probed.then(|| self.probe_healthy()),
            in_flight: self.in_flight(),
            last_error_at: last.as_ref().map(|(t, _)| rfc3339(*t)),
            last_error: last.map(|(_, e)| e),
        }
    }

    /// Breaker state for the metrics gauge: 0 closed, 1 open, 2 half-open.
    pub fn circuit_code(&self) -> i64 {
        i64::from(self.state.load(Ordering::Acquire))
    }
}

/// A request's slot on a backend, held until its answer has been relayed.
#[derive(Debug)]
pub struct Lease {
    health: Arc<BackendHealth>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.health.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.health.waiting.load(Ordering::SeqCst) > 0 {
            self.health.released.notify_waiters();
        }
    }
}

/// Every backend's health, kept across configuration reloads.
#[derive(Debug, Default)]
pub struct HealthRegistry {
    backends: Mutex<HashMap<(String, String), Arc<BackendHealth>>>,
}

impl HealthRegistry {
    /// A registry whose state is exported in `metrics` (circuit state, in-flight requests,
    /// cool-downs), computed when the metrics are rendered.
    pub fn new(metrics: &crate::metrics::Metrics) -> Arc<Self> {
        let registry = Arc::new(Self::default());
        let weak = Arc::downgrade(&registry);
        let m = metrics.routing.clone();
        metrics.before_render(Box::new(move || {
            let Some(r) = weak.upgrade() else { return };
            let now = now_ms();
            let all: Vec<Arc<BackendHealth>> = r
                .backends
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned()
                .collect();
            for b in all {
                let label = crate::metrics::BackendLabels {
                    backend: Arc::new(b.name.clone()),
                };
                m.circuit_state.get_or_create(&label).set(b.circuit_code());
                m.in_flight
                    .get_or_create(&label)
                    .set(i64::from(b.in_flight()));
                let deployments: Vec<Arc<DeploymentHealth>> = b
                    .deployments
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .filter(|d| !d.upstream.is_empty())
                    .cloned()
                    .collect();
                for d in deployments {
                    m.cooling
                        .get_or_create(&crate::metrics::BackendDeploymentLabels {
                            backend: b.name.clone(),
                            deployment: d.upstream.clone(),
                        })
                        .set(d.cooling(now) as f64 / 1000.0);
                }
            }
        }));
        registry
    }

    /// The health of the backend `name` at `url`: the one kept from an earlier snapshot if
    /// both are unchanged, else a fresh one.
    pub fn backend(&self, name: &str, url: &str) -> Arc<BackendHealth> {
        let mut m = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((name.to_owned(), url.to_owned()))
            .or_insert_with(|| Arc::new(BackendHealth::new(name)))
            .clone()
    }

    /// Forget backends no longer configured (their state goes with the last snapshot that
    /// holds them).
    pub fn retain(&self, keep: &[(String, String)]) {
        let mut m = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|k, _| keep.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_requests: 10,
            window: crate::config::Dur(Duration::from_secs(10)),
            open_for: crate::config::Dur(Duration::from_secs(1)),
            max_open_for: crate::config::Dur(Duration::from_secs(3)),
            unauthorized: 2,
        }
    }

    #[test]
    fn consecutive_failures_open_then_one_probe_closes() {
        let h = BackendHealth::new("b");
        let c = cfg();
        let t = 1_000_000;
        assert!(!h.failed(t, Gate::Pass, &c, "x"));
        assert!(!h.failed(t, Gate::Pass, &c, "x"));
        assert!(h.failed(t, Gate::Pass, &c, "x"), "third in a row opens");
        assert_eq!(h.gate(t + 10), Gate::Blocked(990));
        assert!(!h.usable(t + 999));
        // After open_for: exactly one probe, the others wait for its outcome.
        assert_eq!(h.gate(t + 1000), Gate::Probe);
        assert_eq!(h.gate(t + 1001), Gate::Blocked(0));
        h.succeeded(t + 1100, Gate::Probe, &c);
        assert_eq!(h.gate(t + 1101), Gate::Pass);
        assert!(h.closed());
    }

    #[test]
    fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
        let h = BackendHealth::new("b");
        let c = cfg();
        let mut t = 5_000_000;
        for _ in 0..3 {
            h.failed(t, Gate::Pass, &c, "x");
        }
        let mut opens = Vec::new();
        for _ in 0..4 {
            let Gate::Blocked(left) = h.gate(t) else {
                panic!("open")
            };
            opens.push(left);
            t += left;
            assert_eq!(h.gate(t), Gate::Probe);
            assert!(h.failed(t, Gate::Probe, &c, "x"));
        }
        assert_eq!(
            opens,
            [1000, 2000, 3000, 3000],
            "doubling, capped at max_open_for"
        );
        // A probe that ends without a verdict hands the probe to the next request.
        t += 3000;
        assert_eq!(h.gate(t), Gate::Probe);
        h.neutral(Gate::Probe);
        assert_eq!(h.gate(t), Gate::Probe);
        // So does one abandoned mid-flight; after a verdict, abandoning changes nothing.
        h.abandon(Gate::Probe);
        assert_eq!(h.gate(t), Gate::Probe);
        h.succeeded(t, Gate::Probe, &c);
        h.abandon(Gate::Probe);
        assert_eq!(h.gate(t), Gate::Pass);
    }

    #[test]
    fn failure_rate_over_the_window_opens() {
        let h = BackendHealth::new("b");
        let c = cfg();
        let t = 9_000_000;
        // Alternating: never 3 in a row, but half of 10 fail.
        for i in 0..9 {
            if i % 2 == 0 {
                h.succeeded(t + i, Gate::Pass, &c);
            } else {
                assert!(!h.failed(t + i, Gate::Pass, &c, "x"));
            }
        }
        assert!(h.failed(t + 9, Gate::Pass, &c, "x"), "5 of 10 failed");
        // Old failures leave the window.
        let h = BackendHealth::new("b");
        for i in 0..5 {
            h.failed(t + i * 3, Gate::Pass, &c, "x");
            h.succeeded(t + i * 3 + 1, Gate::Pass, &c);
        }
        for i in 0..9 {
            h.succeeded(t + 20_000 + i, Gate::Pass, &c);
        }
        assert!(
            !h.failed(t + 20_010, Gate::Pass, &c, "x"),
            "1 of 10 in the window"
        );
    }

    #[test]
    fn unauthorized_answers_open_after_the_threshold() {
        let h = BackendHealth::new("b");
        let c = cfg();
        assert!(!h.unauthorized(1, Gate::Pass, &c));
        h.succeeded(2, Gate::Pass, &c);
        assert!(
            !h.unauthorized(3, Gate::Pass, &c),
            "a success resets the count"
        );
        assert!(h.unauthorized(4, Gate::Pass, &c));
        assert!(h.view(5, false).last_error.unwrap().contains("401"));
    }

    #[test]
    fn cool_downs_only_grow_and_headroom_is_spent() {
        let d = DeploymentHealth::new("gpt-4o");
        d.cool(1000, Duration::from_millis(1500), CoolSource::RetryAfterMs);
        d.cool(1100, Duration::from_millis(100), CoolSource::Default);
        assert_eq!(d.cooling(1200), 1300);
        assert_eq!(d.view(1200).cooling_because, Some("retry-after-ms"));
        assert_eq!(d.cooling(2500), 0);
        assert!(d.has_room(0, u64::MAX), "nothing reported: room");
        d.report(10, Some(1000), Some(5), 10_000);
        assert!(d.has_room(20, 1000));
        d.spend(600);
        assert!(!d.has_room(30, 500), "400 left");
        assert!(d.has_room(10_000, 500), "a stale report is not believed");
        d.report(40, Some(10_000), Some(0), 10_000);
        assert!(!d.has_room(50, 1), "no request left");
    }

    #[test]
    fn probe_verdicts_need_streaks() {
        let h = BackendHealth::new("b");
        assert_eq!(h.probed(false, 2, 2), None);
        assert_eq!(h.probed(false, 2, 2), Some(false));
        assert!(!h.probe_healthy());
        assert_eq!(h.probed(true, 2, 2), None);
        assert_eq!(h.probed(false, 2, 2), None);
        assert_eq!(h.probed(true, 2, 2), None);
        assert_eq!(h.probed(true, 2, 2), Some(true));
    }

    #[test]
    fn leases_bound_concurrency() {
        let h = Arc::new(BackendHealth::new("b"));
        let a = h.try_enter(Some(2)).unwrap();
        let _b = h.try_enter(Some(2)).unwrap();
        assert!(h.try_enter(Some(2)).is_none());
        assert_eq!(h.in_flight(), 2);
        drop(a);
        assert!(h.try_enter(Some(2)).is_some());
        assert!(h.try_enter(None).is_some());
    }
}
