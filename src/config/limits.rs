//! `[limits]`, `[prices]` and the limit keys of `[[clients]]`: their types and validation.
//!
//! A client's limits are written in three places — on the client itself, per deployment glob
//! (`limits = [{ deployments = [...], ... }]`) and per user inside the client (`per_subject`) —
//! with the same four keys each ([`LimitSet`]). What they mean and how they are counted is in
//! [`crate::admit`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::values::{Dur, Secret, Text};
use super::{problem, Config, Problem};

/// `[limits]`: where limit counters live and how requests are estimated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// `memory` (one replica) or `redis` (shared by all replicas).
    #[serde(default)]
    pub backend: LimitsBackend,
    /// The Redis server for `backend = "redis"`.
    #[serde(default)]
    pub redis_url: Option<Secret>,
    /// What happens to requests while Redis cannot be reached.
    #[serde(default)]
    pub on_redis_error: OnRedisError,
    /// How long one Redis call may take before it counts as an error.
    #[serde(default = "default_redis_timeout")]
    pub redis_timeout: Dur,
    /// Prefix of every Redis key (several gateways may share one Redis).
    #[serde(default = "default_redis_prefix")]
    pub redis_prefix: Text,
    /// Output tokens reserved when a request names no `max_tokens` (or its siblings).
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u64,
    /// `max_tokens`: reserve the most the answer may cost (never overshoots a limit);
    /// `none`: reserve the prompt only (more concurrency, may overshoot by the answers).
    #[serde(default)]
    pub reserve_output: ReserveOutput,
    /// Tokens charged for an image whose size cannot be read from the request.
    #[serde(default = "default_image_tokens")]
    pub default_image_tokens: u64,
    /// `when_needed`: estimate a request's tokens before forwarding it only when something
    /// decides by the estimate (a token limit, quota or budget of its client, or headroom
    /// routing across two or more backends); `always`: every request.
    #[serde(default)]
    pub estimate: EstimateWhen,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            backend: LimitsBackend::default(),
            redis_url: None,
            on_redis_error: OnRedisError::default(),
            redis_timeout: default_redis_timeout(),
            redis_prefix: default_redis_prefix(),
            default_max_tokens: default_max_tokens(),
            reserve_output: ReserveOutput::default(),
            default_image_tokens: default_image_tokens(),
            estimate: EstimateWhen::default(),
        }
    }
}

fn default_redis_timeout() -> Dur {
    Dur(Duration::from_millis(250))
}
fn default_redis_prefix() -> Text {
    Text::from("pcl")
}
fn default_max_tokens() -> u64 {
    4096
}
/// A 1024×1024 image at high detail: 4 tiles × 170 + 85.
fn default_image_tokens() -> u64 {
    765
}

/// `[limits] backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LimitsBackend {
    #[default]
    Memory,
    Redis,
}

/// `[limits] on_redis_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    /// Refuse limited requests with 503 `limits_unavailable`.
    #[default]
    FailClosed,
    /// Count in this replica's memory until Redis is back.
    FailOpen,
}

/// `[limits] reserve_output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReserveOutput {
    #[default]
    MaxTokens,
    None,
}

/// `[limits] estimate`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EstimateWhen {
    /// Only requests whose admission or routing reads the estimate.
    #[default]
    WhenNeeded,
    /// Every request (its estimate is then in every audit line and usage record).
    Always,
}

/// A calendar period in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Hour,
    Day,
    /// Monday 00:00 UTC to the next Monday.
    Week,
    Month,
}

/// `token_quota = { tokens, period }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenQuota {
    pub tokens: u64,
    pub period: Period,
}

/// `budget = { usd, period }`, priced from `[prices]`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    pub usd: f64,
    pub period: Period,
}

/// The four limits, wherever they are written. Absent = unlimited.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSet {
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub token_quota: Option<TokenQuota>,
    #[serde(default)]
    pub budget: Option<Budget>,
}

impl LimitSet {
    /// Whether any of these limits counts tokens (or dollars, which are priced tokens).
    pub fn counts_tokens(&self) -> bool {
        self.tokens_per_minute.is_some() || self.token_quota.is_some() || self.budget.is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.requests_per_minute.is_none()
            && self.tokens_per_minute.is_none()
            && self.token_quota.is_none()
            && self.budget.is_none()
    }
}

/// One entry of a client's `limits = [...]`: limits for the deployments its globs match.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentLimits {
    pub deployments: Vec<Text>,
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    #[serde(default)]
    pub token_quota: Option<TokenQuota>,
    #[serde(default)]
    pub budget: Option<Budget>,
}

impl DeploymentLimits {
    pub fn set(&self) -> LimitSet {
        LimitSet {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            token_quota: self.token_quota,
            budget: self.budget,
        }
    }
}

/// `[prices."<deployment glob>"]`: USD per 1M tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub input: f64,
    /// Cached prompt tokens; default: `input`.
    #[serde(default)]
    pub cached_input: Option<f64>,
    pub output: f64,
}

/// Largest limit value: counters are exact integers in Redis's Lua (doubles) below 2^53.
const MAX_LIMIT: u64 = 1 << 50;

/// Check `[limits]`, `[prices]` and every client's limits, naming each bad key.
pub(super) fn validate(config: &Config, problems: &mut Vec<Problem>) {
    let l = &config.limits;
    if l.backend == LimitsBackend::Redis && l.redis_url.is_none() {
        problem(
            problems,
            "limits.redis_url",
            "is required with limits.backend = \"redis\"",
        );
    }
    if let Some(url) = &l.redis_url {
        let u = url.expose();
        if !(u.starts_with("redis://") || u.starts_with("rediss://") || u.starts_with("unix://")) {
            problem(
                problems,
                "limits.redis_url",
                "must be a redis://, rediss:// or unix:// URL",
            );
        }
    }
    super::check_duration(l.redis_timeout, "limits.redis_timeout", problems);
    super::check_duration(config.store.usage_flush, "store.usage_flush", problems);
    if config.store.usage_queue == 0 {
        problem(
            problems,
            "store.usage_queue",
            "must be at least 1 (set store.record_usage = false to record nothing)",
        );
    }
    let prefix = l.redis_prefix.as_str();
    if prefix.is_empty()
        || prefix
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b == b'{' || b == b'}')
    {
        problem(
            problems,
            "limits.redis_prefix",
            "must be non-empty, without spaces or braces",
        );
    }
    if l.default_max_tokens == 0 || l.default_max_tokens > MAX_LIMIT {
        problem(
            problems,
            "limits.default_max_tokens",
            "must be between 1 and 2^50",
        );
    }
    for (glob, p) in &config.prices {
        let at = format!("prices.\"{}\"", glob.escape_default());
        for (name, v) in [
            ("input", Some(p.input)),
            ("cached_input", p.cached_input),
            ("output", Some(p.output)),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v >= 0.0) {
                    problem(
                        problems,
                        format!("{at}.{name}"),
                        "must be a price of 0 or more (USD per 1M tokens)",
                    );
                }
            }
        }
    }
    for (i, c) in config.clients.iter().enumerate() {
        let base = format!("clients[{i}]");
        check_set(&c.limit_set(), &base, problems);
        for (j, d) in c.limits.iter().enumerate() {
            let at = format!("{base}.limits[{j}]");
            if d.deployments.is_empty() {
                problem(
                    problems,
                    format!("{at}.deployments"),
                    "must name at least one deployment glob",
                );
            }
            if d.set().is_empty() {
                problem(problems, at.clone(), "sets no limit");
            }
            check_set(&d.set(), &at, problems);
        }
        if let Some(s) = &c.per_subject {
            check_set(s, &format!("{base}.per_subject"), problems);
        }
    }
}

fn check_set(s: &LimitSet, at: &str, problems: &mut Vec<Problem>) {
    for (name, v) in [
        ("requests_per_minute", s.requests_per_minute),
        ("tokens_per_minute", s.tokens_per_minute),
        ("token_quota.tokens", s.token_quota.map(|q| q.tokens)),
    ] {
        if let Some(v) = v {
            if v == 0 || v > MAX_LIMIT {
                problem(
                    problems,
                    format!("{at}.{name}"),
                    "must be between 1 and 2^50 (leave it out for no limit)",
                );
            }
        }
    }
    if let Some(b) = s.budget {
        if !(b.usd.is_finite() && b.usd > 0.0 && b.usd < 1e9) {
            problem(
                problems,
                format!("{at}.budget.usd"),
                "must be more than 0 and less than 1e9",
            );
        }
    }
}

/// `[prices]` as written: deployment glob → price.
pub type Prices = BTreeMap<String, PriceConfig>;
