//! Admission counters shared by every gateway replica, in Redis (`[limits] backend = "redis"`).
//!
//! Each limit of a request is an [`Item`]: a counter key unique within its client, a
//! [`Window`], a limit and the amount the request wants (tokens, requests, or micro-USD for
//! budgets). [`RedisLimiter::reserve`] checks every item and charges all of them only if all
//! fit, in one Lua script run with `EVALSHA` (one round trip, atomic); the
//! script reads the clock from Redis `TIME`, never from the gateway, so replicas agree.
//! [`RedisLimiter::adjust`] applies the reconciliation once the real usage is known.
//! The semantics are the in-memory backend's, item for item:
//!
//! - **Sliding windows** ([`Window::Minute`], or [`Window::Sliding`] of any length `W`): a
//!   HASH of 1-second buckets (field = unix second, value = amount). At Redis time `t`,
//!   `used = Σ buckets b with floor(t) - W <= b <= floor(t)` (`W + 1` buckets), so in *any*
//!   `W`-second interval the admitted amounts never exceed the limit. Older fields are
//!   deleted by the script when it charges; the key expires `W + 2` s after its last write.
//!   A refusal's wait is found by letting buckets age out oldest first: the first bucket `b`
//!   after which the request fits gives `retry_after_ms = (b + W + 1) * 1000 - t_ms`.
//! - **Periods** ([`Window::Period`], calendar quotas and budgets): a plain counter whose key
//!   the caller makes unique per period (it includes `start_s`); it expires one day after the
//!   period's end. A refusal waits until the end.
//!
//! Keys are `<namespace>:{<client>}:<key>`: the `{<client>}` hash tag puts one client's keys
//! in one Redis Cluster slot, so one script may touch them all. `%`, `{` and `}` in client
//! ids are percent-encoded so no client id can change the tag.
//!
//! **Unreconciled reservations.** A reservation whose request never reports back (the
//! gateway was killed mid-request) stays charged and ages out with its window, or stays in
//! its period: the limit errs on the safe side, never the permissive one.
//!
//! **Numbers.** Lua numbers are doubles, exact for integers below 2^53. Limits, amounts,
//! deltas and period ends must be at most [`MAX_VALUE`] (2^52), so a counter plus an amount
//! stays below 2^53; counters are changed only with `HINCRBY`/`INCRBY`/`HSET` of integers.
//!
//! **Failures.** Every call has a deadline (`response_timeout`, 250 ms by default; each
//! connection attempt has `connect_timeout`), so an unreachable or hung Redis surfaces as a
//! [`RedisLimitError`] quickly and the caller applies `on_redis_error = fail_closed |
//! fail_open`. The connection manager reconnects in the background; [`RedisLimiter::ping`]
//! tells the caller when Redis is back. A reserve that timed out may still run on Redis
//! later and charge (the safe direction, like an unreconciled reservation). A URL's password
//! never appears in errors or `Debug` output (it is shown as `***`).
//!
//! **Runtimes.** The connection's driver task runs on the Tokio runtime that first
//! connects. With one runtime per worker thread, give each worker its own limiter (one
//! connection each) rather than sharing one across runtimes.

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::aio::ConnectionManagerConfig;
use ::redis::{RedisError, Script};

use crate::store::error::{redact_url, Scrubber};

/// Largest limit, amount, delta, second or period end accepted (2^52): sums of two such
/// values stay below 2^53, where the script's doubles are exact.
pub const MAX_VALUE: u64 = 1 << 52;

/// Namespace prefixed to every key unless configured otherwise.
pub const DEFAULT_NAMESPACE: &str = "pcl";

static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("reserve.lua")));
static ADJUST: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("adjust.lua")));

/// How a counter's usage is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// A sliding 60-second window (61 one-second buckets).
    Minute,
    /// A sliding window of `secs` seconds (`secs + 1` one-second buckets); `Minute` is
    /// `Sliding { secs: 60 }`.
    Sliding { secs: u32 },
    /// A calendar period `[start_s, end_s)` in unix seconds, computed by the caller.
    Period { start_s: u64, end_s: u64 },
}

impl Window {
    /// The window length in seconds, for sliding windows.
    pub fn sliding_secs(&self) -> Option<u32> {
        match *self {
            Window::Minute => Some(60),
            Window::Sliding { secs } => Some(secs),
            Window::Period { .. } => None,
        }
    }

    /// The script's two arguments: kind and window length (sliding) or end (period).
    fn script_args(&self) -> Result<(&'static str, u64), RedisLimitError> {
        match *self {
            Window::Period { start_s, end_s } => {
                if end_s > MAX_VALUE || start_s > end_s {
                    return Err(invalid(format!(
                        "period [{start_s}, {end_s}) is not a valid period"
                    )));
                }
                Ok(("p", end_s))
            }
            _ => match self.sliding_secs() {
                Some(secs) if secs > 0 => Ok(("s", u64::from(secs))),
                _ => Err(invalid("a sliding window must be at least 1 second")),
            },
        }
    }
}

/// One limit a request must fit in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The counter, unique within the client (`tpm`, `rpm`, `d0:tpm`, `q:<period_start>`).
    pub key: String,
    pub window: Window,
    pub limit: u64,
    /// What this request charges. Callers refuse an amount above the limit themselves (400):
    /// such an item never fits.
    pub amount: u64,
}

/// One reconciliation: the difference between what a reservation charged and what the
/// request really used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjust {
    /// The item's key, as reserved.
    pub key: String,
    /// The item's window, as reserved.
    pub window: Window,
    /// The bucket second the reservation charged ([`Admitted::bucket_s`]).
    pub bucket_s: u64,
    /// Positive: charge more; negative: refund (a counter never goes below zero).
    pub delta: i64,
}

/// One item's state after a reservation, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ItemState {
    /// `limit - used` (after this request's charge when admitted), at least 0.
    pub remaining: u64,
    /// Milliseconds until the counter is fully reset: the newest non-empty bucket ages out
    /// (sliding; 0 when empty) or the period ends.
    pub reset_ms: u64,
}

/// Every item fitted and has been charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    /// Redis time of the charge, in unix milliseconds.
    pub now_ms: u64,
    /// The bucket second charged in sliding windows; pass it back in [`Adjust::bucket_s`].
    pub bucket_s: u64,
    /// One per item, in order.
    pub items: Vec<ItemState>,
}

/// At least one item did not fit; nothing was charged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Redis time of the check, in unix milliseconds.
    pub now_ms: u64,
    /// Index of the refusing item (of several, the one with the longest wait).
    pub item: usize,
    /// Milliseconds until the request would fit that item.
    pub retry_after_ms: u64,
    /// One per item, in order (`remaining` without this request).
    pub items: Vec<ItemState>,
}

/// The answer to [`RedisLimiter::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    Admitted(Admitted),
    Refused(Refused),
}

/// The answer to [`RedisLimiter::adjust`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adjusted {
    /// Redis time of the adjustment, in unix milliseconds.
    pub now_ms: u64,
    /// The delta each item actually received, in order: clamped so no counter goes below
    /// zero, 0 for a refund to a bucket that has aged out.
    pub applied: Vec<i64>,
}

/// Why a Redis limit operation failed. Never contains the URL's password.
///
/// Everything but [`RedisLimitError::Invalid`] (a caller's bug) and the construction
/// errors is Redis being unreachable or refusing: apply `on_redis_error`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisLimitError {
    /// `limits.redis.url` cannot be used.
    #[error("limits.redis.url '{url}': {reason}")]
    Url { url: String, reason: String },
    /// The namespace would break the key layout.
    #[error("limits.redis.namespace '{0}': must be non-empty and contain no '{{' or '}}'")]
    Namespace(String),
    /// [`RedisLimiter::new`] was called outside a Tokio runtime.
    #[error("the Redis limiter must be created inside a Tokio runtime")]
    NoRuntime,
    /// No answer within the deadline (Redis hung, or still reconnecting).
    #[error("Redis at {url} did not answer within {timeout:?}")]
    Timeout { url: Arc<str>, timeout: Duration },
    /// Redis could not be reached (connection refused, reset or lost).
    #[error("Redis at {url} is unreachable: {detail}")]
    Unavailable { url: Arc<str>, detail: String },
    /// Redis answered with an error (e.g. out of memory, a read-only replica).
    #[error("Redis at {url} refused the command: {detail}")]
    Command { url: Arc<str>, detail: String },
    /// The script's reply was not the expected shape.
    #[error("unexpected reply from Redis at {url}: {detail}")]
    Reply { url: Arc<str>, detail: String },
    /// The items passed are unusable (nothing was sent).
    #[error("invalid limit items: {0}")]
    Invalid(String),
}

impl RedisLimitError {
    /// Whether Redis is unreachable or hung (as opposed to refusing a command).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            RedisLimitError::Timeout { .. } | RedisLimitError::Unavailable { .. }
        )
    }
}

fn invalid(msg: impl Into<String>) -> RedisLimitError {
    RedisLimitError::Invalid(msg.into())
}

/// Where and how to reach Redis.
#[derive(Clone)]
pub struct RedisLimiterConfig {
    /// `redis://[user:password@]host:port[/db]`, `rediss://` is not enabled.
    pub url: String,
    /// Prefix of every key (default `pcl`); no `{` or `}`.
    pub namespace: String,
    /// Deadline of every call, and of every response on the connection (default 250 ms).
    pub response_timeout: Duration,
    /// Deadline of each connection attempt (default 250 ms).
    pub connect_timeout: Duration,
}

impl RedisLimiterConfig {
    /// Defaults for `url`: namespace `pcl`, 250 ms deadlines.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            response_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_millis(250),
        }
    }
}

impl fmt::Debug for RedisLimiterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiterConfig")
            .field("url", &redact_url(&self.url))
            .field("namespace", &self.namespace)
            .field("response_timeout", &self.response_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Shared admission counters in Redis. Cheap to clone (clones share one connection).
#[derive(Clone)]
pub struct RedisLimiter {
    conn: ConnectionManager,
    namespace: Arc<str>,
    timeout: Duration,
    /// The URL with its password replaced by `***`.
    shown_url: Arc<str>,
    scrubber: Arc<Scrubber>,
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("url", &self.shown_url)
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl RedisLimiter {
    /// A limiter for `config`. Does not wait for Redis: the first call connects, so a
    /// gateway starts (and applies `on_redis_error`) while Redis is down. Must be called
    /// inside a Tokio runtime.
    pub fn new(config: &RedisLimiterConfig) -> Result<Self, RedisLimitError> {
        let ns = &config.namespace;
        if ns.is_empty() || ns.contains(['{', '}']) {
            return Err(RedisLimitError::Namespace(ns.clone()));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(RedisLimitError::NoRuntime);
        }
        let shown_url: Arc<str> = Arc::from(redact_url(&config.url));
        let scrubber = Scrubber::for_url(&config.url);
        let url_error = |e: RedisError| RedisLimitError::Url {
            url: shown_url.to_string(),
            reason: scrubber.scrub(e),
        };
        let client = ::redis::Client::open(config.url.as_str()).map_err(url_error)?;
        // Few, short reconnection attempts: a call never waits past its deadline anyway,
        // and the next call after a failed attempt starts a new one.
        let manager_config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.response_timeout))
            .set_connection_timeout(Some(config.connect_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn =
            ConnectionManager::new_lazy_with_config(client, manager_config).map_err(url_error)?;
        Ok(Self {
            conn,
            namespace: Arc::from(ns.as_str()),
            timeout: config.response_timeout,
            shown_url,
            scrubber: Arc::new(scrubber),
        })
    }

    /// The Redis key of `client`'s counter `key`: `<namespace>:{<client>}:<key>`.
    pub fn counter_key(&self, client: &str, key: &str) -> String {
        counter_key(&self.namespace, client, key)
    }

    /// Check every item and charge them all only if all fit (one atomic round trip).
    pub async fn reserve(
        &self,
        client: &str,
        items: &[Item],
    ) -> Result<Reservation, RedisLimitError> {
        check_keys(items.iter().map(|i| i.key.as_str()))?;
        let mut call = RESERVE.prepare_invoke();
        for item in items {
            let (kind, window) = item.window.script_args()?;
            if item.limit > MAX_VALUE || item.amount > MAX_VALUE {
                return Err(invalid(format!(
                    "limit and amount of '{}' must be at most 2^52",
                    crate::shown::shown(&item.key)
                )));
            }
            call.key(self.counter_key(client, &item.key))
                .arg(kind)
                .arg(window)
                .arg(item.limit)
                .arg(item.amount);
        }
        let reply: Vec<i64> = self.run(call.invoke_async(&mut self.conn.clone())).await?;
        self.parse_reservation(&reply, items.len())
    }

    /// Apply reconciliation deltas (one round trip). Sliding windows: the charged bucket
    /// is corrected while it is inside the window (never below zero); once it has aged out
    /// an extra charge goes to the current bucket and a refund is dropped. Periods: the
    /// counter is corrected (never below zero), keeping its expiry.
    pub async fn adjust(
        &self,
        client: &str,
        items: &[Adjust],
    ) -> Result<Adjusted, RedisLimitError> {
        check_keys(items.iter().map(|i| i.key.as_str()))?;
        let mut call = ADJUST.prepare_invoke();
        for item in items {
            let (kind, window) = item.window.script_args()?;
            if item.bucket_s > MAX_VALUE || item.delta.unsigned_abs() > MAX_VALUE {
                return Err(invalid(format!(
                    "bucket and delta of '{}' must be at most 2^52",
                    crate::shown::shown(&item.key)
                )));
            }
            call.key(self.counter_key(client, &item.key))
                .arg(kind)
                .arg(window)
                .arg(item.bucket_s)
                .arg(item.delta);
        }
        let reply: Vec<i64> = self.run(call.invoke_async(&mut self.conn.clone())).await?;
        let bad = || self.reply_error(format!("adjust returned {} values", reply.len()));
        if reply.len() != 2 + items.len() {
            return Err(bad());
        }
        Ok(Adjusted {
            now_ms: u64::try_from(reply[0]).map_err(|_| bad())?,
            applied: reply[2..].to_vec(),
        })
    }

    /// `PING` within the deadline: `Ok` once Redis answers (after an outage, too).
    pub async fn ping(&self) -> Result<(), RedisLimitError> {
        let mut conn = self.conn.clone();
        let pong: String = self
            .run(::redis::cmd("PING").query_async(&mut conn))
            .await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(self.reply_error(format!("PING answered {:?}", crate::shown::shown(&pong))))
        }
    }

    /// `fut` within the deadline, its error classified and scrubbed.
    async fn run<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, RedisLimitError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(self.timeout_error()),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => Err(self.timeout_error()),
            Ok(Err(e)) if e.is_io_error() || e.is_connection_dropped() => {
                Err(RedisLimitError::Unavailable {
                    url: self.shown_url.clone(),
                    detail: self.scrubber.scrub(e),
                })
            }
            Ok(Err(e)) if e.kind() == ::redis::ErrorKind::UnexpectedReturnType => {
                Err(self.reply_error(self.scrubber.scrub(e)))
            }
            Ok(Err(e)) => Err(RedisLimitError::Command {
                url: self.shown_url.clone(),
                detail: self.scrubber.scrub(e),
            }),
        }
    }

    fn timeout_error(&self) -> RedisLimitError {
        RedisLimitError::Timeout {
            url: self.shown_url.clone(),
            timeout: self.timeout,
        }
    }

    fn reply_error(&self, detail: String) -> RedisLimitError {
        RedisLimitError::Reply {
            url: self.shown_url.clone(),
            detail,
        }
    }

    fn parse_reservation(&self, r: &[i64], n: usize) -> Result<Reservation, RedisLimitError> {
        let bad = || self.reply_error(format!("reserve returned {} values", r.len()));
        if r.len() != 5 + 2 * n {
            return Err(bad());
        }
        let u = |v: i64| u64::try_from(v).map_err(|_| bad());
        let items = r[5..]
            .chunks_exact(2)
            .map(|s| {
                Ok(ItemState {
                    remaining: u(s[0])?,
                    reset_ms: u(s[1])?,
                })
            })
            .collect::<Result<Vec<_>, RedisLimitError>>()?;
        let now_ms = u(r[1])?;
        if r[0] == 1 {
            return Ok(Reservation::Admitted(Admitted {
                now_ms,
                bucket_s: u(r[2])?,
                items,
            }));
        }
        let item = usize::try_from(r[3])
            .ok()
            .and_then(|i| i.checked_sub(1))
            .filter(|&i| i < n)
            .ok_or_else(bad)?;
        Ok(Reservation::Refused(Refused {
            now_ms,
            item,
            retry_after_ms: u(r[4])?,
            items,
        }))
    }
}

/// `<namespace>:{<client>}:<key>`, with `%`, `{` and `}` of the client id percent-encoded.
fn counter_key(namespace: &str, client: &str, key: &str) -> String {
    let mut s = String::with_capacity(namespace.len() + client.len() + key.len() + 4);
    s.push_str(namespace);
    s.push_str(":{");
    for c in client.chars() {
        match c {
            '%' => s.push_str("%25"),
            '{' => s.push_str("%7B"),
            '}' => s.push_str("%7D"),
            c => s.push(c),
        }
    }
    s.push_str("}:");
    s.push_str(key);
    s
}

/// At least one item, and no key twice (a second charge would not see the first).
fn check_keys<'a>(keys: impl Iterator<Item = &'a str>) -> Result<(), RedisLimitError> {
    let mut seen: Vec<&str> = Vec::new();
    for k in keys {
        if seen.contains(&k) {
            return Err(invalid(format!(
                "key '{}' appears twice",
                crate::shown::shown(k)
            )));
        }
        seen.push(k);
    }
    if seen.is_empty() {
        return Err(invalid("no items"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
