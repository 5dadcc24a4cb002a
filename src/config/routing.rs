//! `[routing]` and the pool keys of `[[backends]]`: retries, cool-downs, the circuit
//! breaker, headroom-aware ordering, health probes and per-backend concurrency.
//!
//! Typed here, validated with key paths in [`validate`]; the runtime state they configure
//! lives in `routing::health`.

use serde::Deserialize;
use std::time::Duration;

use super::values::{Dur, Text};
use super::{check_duration, problem, Config, Problem};

/// `[routing]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Backends tried per request, at most (the first attempt included).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Time from the first attempt after which no further backend is tried.
    #[serde(default = "default_retry_budget")]
    pub retry_budget: Dur,
    /// How long a backend that answered 429 is skipped when its answer names no usable wait
    /// (no `retry-after-ms`, `x-ms-retry-after-ms` or `retry-after`, or nonsense).
    #[serde(default = "default_cooldown")]
    pub default_cooldown: Dur,
    /// Longest cool-down a 429 can ask for; longer waits are cut to this.
    #[serde(default = "default_max_cooldown")]
    pub max_cooldown: Dur,
    /// Try a backend whose last reported `x-ratelimit-remaining-tokens`/`-requests` cannot
    /// hold this request after the others, instead of collecting its 429.
    #[serde(default = "yes")]
    pub headroom: bool,
    /// How long a reported remaining count is believed when the answer gave no
    /// `x-ratelimit-reset-*` time.
    #[serde(default = "default_headroom_ttl")]
    pub headroom_ttl: Dur,
    /// How long a request waits for a slot when every eligible backend is at its
    /// `max_concurrent` (0: it is refused at once).
    #[serde(default = "zero")]
    pub queue_wait: Dur,
    #[serde(default)]
    pub breaker: BreakerConfig,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            retry_budget: default_retry_budget(),
            default_cooldown: default_cooldown(),
            max_cooldown: default_max_cooldown(),
            headroom: true,
            headroom_ttl: default_headroom_ttl(),
            queue_wait: Dur(Duration::ZERO),
            breaker: BreakerConfig::default(),
        }
    }
}

/// `[routing.breaker]`: when a backend's circuit opens.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Failures in a row that open the circuit.
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    /// Share of failed attempts over `window` that opens the circuit…
    #[serde(default = "default_failure_rate")]
    pub failure_rate: f64,
    /// …once the window holds at least this many attempts.
    #[serde(default = "default_min_requests")]
    pub min_requests: u32,
    #[serde(default = "default_window")]
    pub window: Dur,
    /// Time the circuit stays open after its first trip; doubled on each trip in a row…
    #[serde(default = "default_open_for")]
    pub open_for: Dur,
    /// …up to this.
    #[serde(default = "default_max_open_for")]
    pub max_open_for: Dur,
    /// Consecutive 401 answers (each after a token refresh) that open the circuit.
    #[serde(default = "default_unauthorized")]
    pub unauthorized: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive(),
            failure_rate: default_failure_rate(),
            min_requests: default_min_requests(),
            window: default_window(),
            open_for: default_open_for(),
            max_open_for: default_max_open_for(),
            unauthorized: default_unauthorized(),
        }
    }
}

/// What a backend's failed attempt may be retried on elsewhere, besides a 429 and a
/// connection that could not be made (always retried).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RetryOn {
    #[serde(rename = "500")]
    S500,
    #[serde(rename = "502")]
    S502,
    #[serde(rename = "503")]
    S503,
    #[serde(rename = "504")]
    S504,
    /// No response head within `timeouts.first_byte`.
    #[serde(rename = "first_byte_timeout")]
    FirstByteTimeout,
}

impl RetryOn {
    /// Whether an answer with this status is retried.
    pub fn status(list: &[RetryOn], status: u16) -> bool {
        list.iter().any(|r| {
            matches!(
                (r, status),
                (RetryOn::S500, 500)
                    | (RetryOn::S502, 502)
                    | (RetryOn::S503, 503)
                    | (RetryOn::S504, 504)
            )
        })
    }
}

/// The default `retry_on`: the statuses that say the backend did not run the request
/// (bad gateway, unavailable, gateway timeout) and a backend that never started to answer.
/// A 500 may come after the model ran (and was billed): opt in.
pub fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::S502,
        RetryOn::S503,
        RetryOn::S504,
        RetryOn::FirstByteTimeout,
    ]
}

/// `health = { path, interval, timeout, unhealthy_after, healthy_after }` of a backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthProbe {
    /// Path (and query) probed with `GET`, under the backend URL's path; by default
    /// `/openai/models?api-version=<api_version>` (Azure) or `/v1/models`.
    #[serde(default)]
    pub path: Option<Text>,
    #[serde(default = "default_probe_interval")]
    pub interval: Dur,
    #[serde(default = "default_probe_timeout")]
    pub timeout: Dur,
    /// Failed probes in a row that take the backend out of rotation.
    #[serde(default = "default_unhealthy_after")]
    pub unhealthy_after: u32,
    /// Passed probes in a row that put it back.
    #[serde(default = "default_healthy_after")]
    pub healthy_after: u32,
}

fn zero() -> Dur {
    Dur(Duration::ZERO)
}
fn yes() -> bool {
    true
}
fn default_max_attempts() -> u32 {
    3
}
fn default_retry_budget() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_cooldown() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_max_cooldown() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_headroom_ttl() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_consecutive() -> u32 {
    5
}
fn default_failure_rate() -> f64 {
    0.5
}
fn default_min_requests() -> u32 {
    20
}
fn default_window() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_open_for() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_max_open_for() -> Dur {
    Dur(Duration::from_secs(120))
}
fn default_unauthorized() -> u32 {
    3
}
fn default_probe_interval() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_probe_timeout() -> Dur {
    Dur(Duration::from_secs(2))
}
fn default_unhealthy_after() -> u32 {
    2
}
fn default_healthy_after() -> u32 {
    1
}

/// Check `[routing]` and the pool keys of every backend.
pub(super) fn validate(config: &Config, problems: &mut Vec<Problem>) {
    let r = &config.routing;
    if r.max_attempts == 0 || r.max_attempts > 20 {
        problem(problems, "routing.max_attempts", "must be between 1 and 20");
    }
    check_duration(r.retry_budget, "routing.retry_budget", problems);
    check_duration(r.default_cooldown, "routing.default_cooldown", problems);
    check_duration(r.max_cooldown, "routing.max_cooldown", problems);
    check_duration(r.headroom_ttl, "routing.headroom_ttl", problems);
    if r.default_cooldown.0 > r.max_cooldown.0 {
        problem(
            problems,
            "routing.default_cooldown",
            "must not be longer than routing.max_cooldown",
        );
    }
    if r.queue_wait.0 > Duration::from_secs(60) {
        problem(problems, "routing.queue_wait", "must be at most 60s");
    }
    let b = &r.breaker;
    if b.consecutive_failures == 0 {
        problem(
            problems,
            "routing.breaker.consecutive_failures",
            "must be at least 1",
        );
    }
    if !(b.failure_rate > 0.0 && b.failure_rate <= 1.0) {
        problem(
            problems,
            "routing.breaker.failure_rate",
            "must be greater than 0 and at most 1",
        );
    }
    if b.min_requests == 0 {
        problem(
            problems,
            "routing.breaker.min_requests",
            "must be at least 1",
        );
    }
    if b.unauthorized == 0 {
        problem(
            problems,
            "routing.breaker.unauthorized",
            "must be at least 1",
        );
    }
    check_duration(b.window, "routing.breaker.window", problems);
    check_duration(b.open_for, "routing.breaker.open_for", problems);
    check_duration(b.max_open_for, "routing.breaker.max_open_for", problems);
    if b.open_for.0 > b.max_open_for.0 {
        problem(
            problems,
            "routing.breaker.open_for",
            "must not be longer than routing.breaker.max_open_for",
        );
    }
    for (i, be) in config.backends.iter().enumerate() {
        let path = format!("backends[{i}]");
        if be.max_concurrent == Some(0) {
            problem(
                problems,
                format!("{path}.max_concurrent"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
        if let Some(total) = be.timeouts.total {
            check_duration(total, &format!("{path}.timeouts.total"), problems);
            if total.0 <= be.timeouts.first_byte.0 {
                problem(
                    problems,
                    format!("{path}.timeouts.total"),
                    "must be longer than timeouts.first_byte",
                );
            }
        }
        if let Some(h) = &be.health {
            let at = format!("{path}.health");
            check_duration(h.interval, &format!("{at}.interval"), problems);
            check_duration(h.timeout, &format!("{at}.timeout"), problems);
            if h.timeout.0 >= h.interval.0 {
                problem(
                    problems,
                    format!("{at}.timeout"),
                    "must be shorter than health.interval",
                );
            }
            if h.unhealthy_after == 0 || h.healthy_after == 0 {
                problem(
                    problems,
                    at.clone(),
                    "unhealthy_after and healthy_after must be at least 1",
                );
            }
            if let Some(p) = &h.path {
                let p = p.as_str();
                if !p.starts_with('/') || p.parse::<http::uri::PathAndQuery>().is_err() {
                    problem(
                        problems,
                        format!("{at}.path"),
                        format!("'{}' is not a path starting with '/'", p.escape_default()),
                    );
                }
            }
        }
    }
}
