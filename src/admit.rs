//! Admit: is there room for this request?
//!
//! Two checks, both before the request is routed:
//! - [`admit`], before the body is read: a client's `max_concurrent_requests` (requests in
//!   flight at once, open streams included, one atomic per limited client). The
//!   [`Admission`] it returns is held until the answer has been relayed to the end.
//! - [`Limiter::reserve`], once the body has been read and the deployment is known: every
//!   rate limit, token limit, quota and budget that applies to the request (the client's
//!   own, those of `limits = [...]` entries matching the deployment, and `per_subject` ones
//!   for the caller's subject), reserved together, atomically, against the estimate of what
//!   the request will cost (see [`crate::tokens`]). The [`Reservation`] is reconciled with
//!   the real usage by the account stage ([`crate::account`]).
//!
//! Counters live in memory ([`counters::MemoryCounters`]) or in Redis ([`redis`]); both
//! have the semantics documented in [`counters`]. With Redis unreachable, `on_redis_error`
//! decides: `fail_closed` refuses limited requests (503 `limits_unavailable`), `fail_open`
//! counts them in this replica's memory (so each replica enforces the limits on its own:
//! with N replicas up to N times a limit may be admitted) and tries Redis again at most once
//! a second, returning to it as soon as it answers.

pub mod counters;
pub mod period;
pub mod redis;

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use wildmatch::WildMatch;

use crate::config::limits::{LimitSet, OnRedisError};
use crate::config::ClientConfig;
use crate::error::{GatewayError, PeriodRefusal, TooLarge};
use crate::identify::Caller;
use crate::metrics::{AccountingMetrics, RefusalLabels};
use crate::pricing::{self, Price, PriceTable, Tokens};
use crate::tokens::{Estimate, EstimateOptions};
use counters::{Adjust, Admitted, Item, MemoryCounters, Outcome, Window};

/// One client's admission limits and the state they count, shared by all its requests.
#[derive(Debug, Default)]
pub struct ClientLimits {
    client: Arc<str>,
    max_concurrent: Option<u32>,
    /// Requests holding an [`Admission`]; shared with the same client's limits in the
    /// configurations before and after a reload, so requests admitted under the old one
    /// still count against the new limit.
    in_flight: Arc<AtomicU32>,
    own: LimitSet,
    deployments: Vec<DeploymentRule>,
    per_subject: Option<LimitSet>,
    /// Whether any of the limits counts tokens (see [`ClientLimits::counts_tokens`]): read
    /// by every request, so worked out once.
    counts_tokens: bool,
}

#[derive(Debug)]
struct DeploymentRule {
    /// The globs as written, joined by `,`: part of the counter keys and messages.
    label: String,
    globs: Vec<WildMatch>,
    set: LimitSet,
}

impl ClientLimits {
    pub fn new(c: &ClientConfig) -> Self {
        Self::new_from(c, None)
    }

    /// The limits of `c` after a reload: the requests in flight are those counted by
    /// `previous` (the same client's limits in the configuration being replaced).
    pub fn new_from(c: &ClientConfig, previous: Option<&ClientLimits>) -> Self {
        let mut limits = Self {
            client: Arc::from(c.id.as_str()),
            max_concurrent: c.max_concurrent_requests,
            in_flight: previous.map_or_else(Arc::default, |p| p.in_flight.clone()),
            own: c.limit_set(),
            deployments: c
                .limits
                .iter()
                .map(|d| DeploymentRule {
                    label: d
                        .deployments
                        .iter()
                        .map(|g| g.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    globs: d
                        .deployments
                        .iter()
                        .map(|g| WildMatch::new(g.as_str()))
                        .collect(),
                    set: d.set(),
                })
                .collect(),
            per_subject: c.per_subject.clone().filter(|s| !s.is_empty()),
            counts_tokens: false,
        };
        limits.counts_tokens = limits.own.counts_tokens()
            || limits.deployments.iter().any(|d| d.set.counts_tokens())
            || limits
                .per_subject
                .as_ref()
                .is_some_and(LimitSet::counts_tokens);
        limits
    }

    /// Requests of this client admitted and not yet finished (0 when it has no limit:
    /// unlimited clients are not counted).
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether any rate limit, token limit, quota or budget applies to this client.
    pub fn has_limits(&self) -> bool {
        !self.own.is_empty() || !self.deployments.is_empty() || self.per_subject.is_some()
    }

    /// Whether a token limit, token quota or budget applies (so admission needs the
    /// request's token estimate).
    pub fn counts_tokens(&self) -> bool {
        self.counts_tokens
    }

    /// Whether a budget applies (so the request must be priced).
    pub fn has_budget(&self) -> bool {
        self.own.budget.is_some()
            || self.deployments.iter().any(|d| d.set.budget.is_some())
            || self
                .per_subject
                .as_ref()
                .is_some_and(|s| s.budget.is_some())
    }

    /// The items a request reserves, with what each one is.
    fn plan(
        &self,
        deployment: Option<&str>,
        subject: Option<&str>,
        demand: Demand,
        now_s: i64,
    ) -> (Vec<Item>, Vec<Meta>) {
        let mut items = Vec::new();
        let mut metas = Vec::new();
        let mut add = |prefix: String, scope: Scope, set: &LimitSet| {
            push_set(&mut items, &mut metas, &prefix, scope, set, demand, now_s);
        };
        add(String::new(), Scope::Client, &self.own);
        if let Some(d) = deployment {
            for (i, r) in self.deployments.iter().enumerate() {
                if r.globs.iter().any(|g| g.matches(d)) {
                    add(format!("d:{}:", r.label), Scope::Deployments(i), &r.set);
                }
            }
        }
        if let (Some(s), Some(set)) = (subject, &self.per_subject) {
            add(format!("s:{s}:"), Scope::Subject, set);
        }
        (items, metas)
    }

    /// Whose limit `scope` is, for a refusal's message (built only when refusing).
    fn scope_text(&self, scope: Scope, subject: Option<&str>) -> String {
        let client = &self.client;
        match scope {
            Scope::Client => format!("client '{client}'"),
            Scope::Deployments(i) => {
                let label = self.deployments.get(i).map_or("", |r| r.label.as_str());
                format!("client '{client}' on deployments '{label}'")
            }
            Scope::Subject => format!(
                "subject '{}' of client '{client}'",
                crate::shown::shown(subject.unwrap_or_default())
            ),
        }
    }
}

fn push_set(
    items: &mut Vec<Item>,
    metas: &mut Vec<Meta>,
    prefix: &str,
    scope: Scope,
    set: &LimitSet,
    demand: Demand,
    now_s: i64,
) {
    const MINUTE: Window = Window::Sliding { secs: 60 };
    let mut push = |key: String, window, limit, amount, kind| {
        items.push(Item {
            key,
            window,
            limit,
            amount,
        });
        metas.push(Meta { kind, scope });
    };
    if let Some(l) = set.requests_per_minute {
        push(format!("{prefix}rpm"), MINUTE, l, 1, Kind::Requests);
    }
    if let Some(l) = set.tokens_per_minute {
        push(
            format!("{prefix}tpm"),
            MINUTE,
            l,
            demand.tokens,
            Kind::Tokens,
        );
    }
    if let Some(q) = set.token_quota {
        let (start_s, end_s) = period::bounds(q.period, now_s);
        let window = Window::Period { start_s, end_s };
        push(
            format!("{prefix}q:{start_s}"),
            window,
            q.tokens,
            demand.tokens,
            Kind::Quota(q.period),
        );
    }
    if let Some(b) = set.budget {
        let (start_s, end_s) = period::bounds(b.period, now_s);
        let window = Window::Period { start_s, end_s };
        let limit = crate::pricing::micro_usd(b.usd);
        push(
            format!("{prefix}b:{start_s}"),
            window,
            limit,
            demand.micro_usd,
            Kind::Budget(b.period),
        );
    }
}

/// What an item limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Requests,
    Tokens,
    Quota(crate::config::limits::Period),
    Budget(crate::config::limits::Period),
}

impl Kind {
    /// The metric label.
    fn label(self) -> &'static str {
        match self {
            Kind::Requests => "requests",
            Kind::Tokens => "tokens",
            Kind::Quota(_) => "quota",
            Kind::Budget(_) => "budget",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Meta {
    kind: Kind,
    scope: Scope,
}

/// Whose limit an item is: the client's own, a `limits` entry (by index), the subject's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Client,
    Deployments(usize),
    Subject,
}

/// What a request is expected to cost: prompt plus reserved output tokens, and their price.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    pub tokens: u64,
    pub micro_usd: u64,
}

/// A request's hold on its client's concurrency limit; released on drop.
#[derive(Debug, Default)]
pub struct Admission {
    concurrent: Option<Arc<ClientLimits>>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(l) = self.concurrent.take() {
            l.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Admit `caller`'s request, or refuse it with 429 `too_many_concurrent_requests`.
pub fn admit(caller: &Caller) -> Result<Admission, GatewayError> {
    let limits = &caller.client.limits;
    let Some(max) = limits.max_concurrent else {
        return Ok(Admission::default());
    };
    // Increment only while below the limit, so a burst of refusals never pushes the count
    // over it (and a refused request has nothing to give back).
    let taken = limits
        .in_flight
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        });
    match taken {
        Ok(_) => Ok(Admission {
            concurrent: Some(limits.clone()),
        }),
        Err(_) => Err(GatewayError::TooManyConcurrentRequests {
            client: limits.client.to_string(),
            limit: max,
        }),
    }
}

/// The request admission looks at.
pub struct Ask<'a> {
    pub method: &'a http::Method,
    pub operation: crate::route::Operation,
    pub deployment: Option<&'a str>,
    pub body: &'a [u8],
    pub content_type: Option<&'a str>,
}

/// What admission decided for an admitted request: its estimate (none when nothing needed
/// it), its price, and the reservation (none when the client has no limit) the account
/// stage settles.
pub struct Ticket {
    pub estimate: Option<Estimate>,
    pub price: Option<Price>,
    pub reservation: Option<Reservation>,
}

/// Where a reservation was counted (and so where it is reconciled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Memory,
    Redis,
    /// This replica's memory while Redis is unreachable (`fail_open`).
    Fallback,
}

/// How long `fail_open` counts locally before trying Redis again.
const REDIS_RETRY_MS: i64 = 1000;

/// The limit counters of a running gateway (kept across configuration swaps).
pub struct Limiter {
    memory: MemoryCounters,
    redis: Option<redis::RedisLimiter>,
    on_error: OnRedisError,
    /// Until this time (unix ms), `fail_open` skips Redis.
    redis_retry_at: AtomicI64,
    metrics: AccountingMetrics,
}

impl Limiter {
    /// Counters in this process's memory.
    pub fn memory(metrics: AccountingMetrics) -> Self {
        Self {
            memory: MemoryCounters::new(),
            redis: None,
            on_error: OnRedisError::FailClosed,
            redis_retry_at: AtomicI64::new(0),
            metrics,
        }
    }

    /// Counters in Redis, shared by every replica.
    pub fn shared(
        redis: redis::RedisLimiter,
        on_error: OnRedisError,
        metrics: AccountingMetrics,
    ) -> Self {
        Self {
            memory: MemoryCounters::new(),
            redis: Some(redis),
            on_error,
            redis_retry_at: AtomicI64::new(0),
            metrics,
        }
    }

    /// Estimate `ask` when `estimate` is set (a POST's prompt and answer; nothing for other
    /// methods: a GET of a stored response creates no billed work), price it when a budget
    /// applies, and reserve it against every limit of `caller`. Without an estimate the
    /// reservation counts the request alone (its client has no token limit).
    pub async fn admit(
        self: &Arc<Self>,
        caller: &Caller,
        ask: Ask<'_>,
        estimate: bool,
        opts: &EstimateOptions,
        prices: &PriceTable,
    ) -> Result<Ticket, GatewayError> {
        let model = ask.deployment.unwrap_or_default();
        let estimate = estimate.then(|| {
            if *ask.method == http::Method::POST {
                crate::tokens::estimate(ask.operation, model, ask.body, ask.content_type, opts)
            } else {
                Estimate::default()
            }
        });
        let price = ask.deployment.and_then(|d| prices.price(d));
        let e = estimate.unwrap_or_default();
        let micro_usd = match price {
            Some(p) if caller.client.limits.has_budget() => pricing::micro_usd(p.usd(Tokens {
                prompt: e.prompt,
                cached: 0,
                completion: e.output,
            })),
            _ => 0,
        };
        let demand = Demand {
            tokens: e.total(),
            micro_usd,
        };
        let reservation = self.reserve(caller, ask.deployment, demand).await?;
        Ok(Ticket {
            estimate,
            price,
            reservation,
        })
    }

    /// Reserve `demand` against every limit that applies to `caller`'s request to
    /// `deployment`. `None` when the client has no such limit.
    pub async fn reserve(
        self: &Arc<Self>,
        caller: &Caller,
        deployment: Option<&str>,
        demand: Demand,
    ) -> Result<Option<Reservation>, GatewayError> {
        let limits = &caller.client.limits;
        if !limits.has_limits() {
            return Ok(None);
        }
        let p = &caller.principal;
        let subject = p.subject.as_deref().or(p.key_id.as_deref());
        let now = counters::now_ms();
        let (items, metas) = limits.plan(deployment, subject, demand, now.div_euclid(1000));
        let refuse = |limit: &'static str, e: GatewayError| {
            self.metrics
                .refusals
                .get_or_create(&RefusalLabels {
                    client: limits.client.clone(),
                    limit,
                })
                .inc();
            Err(e)
        };
        if let Some(i) = items.iter().position(|it| it.amount > it.limit) {
            let scope = limits.scope_text(metas[i].scope, subject);
            return refuse("too_large", too_large(&items[i], metas[i].kind, scope));
        }
        let (outcome, store) = match self.count(&limits.client, &items).await {
            Ok(o) => o,
            Err(e) => return refuse("unavailable", e),
        };
        match outcome {
            Outcome::Admitted(admitted) => Ok(Some(Reservation {
                limiter: self.clone(),
                client: limits.client.clone(),
                items,
                metas,
                admitted,
                store,
                demand,
            })),
            Outcome::Refused {
                index,
                retry_after_ms,
            } => {
                let (it, m) = (&items[index], &metas[index]);
                let scope = limits.scope_text(m.scope, subject);
                refuse(
                    m.kind.label(),
                    refusal(it, m.kind, scope, retry_after_ms, now),
                )
            }
        }
    }

    async fn count(&self, client: &str, items: &[Item]) -> Result<(Outcome, Store), GatewayError> {
        let Some(redis) = &self.redis else {
            return Ok((self.memory.reserve(client, items), Store::Memory));
        };
        let fail_open = self.on_error == OnRedisError::FailOpen;
        if fail_open && counters::now_ms() < self.redis_retry_at.load(Ordering::Relaxed) {
            return Ok((self.memory.reserve(client, items), Store::Fallback));
        }
        match redis
            .reserve(client, &to_redis(items))
            .await
            .map(from_redis)
        {
            Ok(o) => {
                if fail_open && self.redis_retry_at.swap(0, Ordering::Relaxed) != 0 {
                    self.metrics.fail_open.set(0);
                    tracing::info!("Redis answers again: limits are shared by all replicas again");
                }
                Ok((o, Store::Redis))
            }
            Err(e) => {
                self.metrics.backend_errors.inc();
                if fail_open {
                    let was = self
                        .redis_retry_at
                        .swap(counters::now_ms() + REDIS_RETRY_MS, Ordering::Relaxed);
                    if was == 0 {
                        self.metrics.fail_open.set(1);
                        tracing::warn!(error = %e, "Redis unreachable: counting limits in this replica only (on_redis_error = fail_open)");
                    }
                    Ok((self.memory.reserve(client, items), Store::Fallback))
                } else {
                    tracing::warn!(error = %e, "Redis unreachable: refusing limited requests (on_redis_error = fail_closed)");
                    Err(GatewayError::LimitsUnavailable)
                }
            }
        }
    }
}

/// One limit of a client and what it has left now (the admin API's view).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LimitView {
    /// `client` (written on the client) or `deployments` (a `limits` entry).
    pub scope: &'static str,
    /// The entry's deployment globs (`null` for the client's own limits).
    pub deployments: Option<Vec<String>>,
    /// `requests_per_minute`, `tokens_per_minute`, `token_quota` or `budget`.
    pub kind: &'static str,
    /// Requests, tokens, or USD for a budget.
    pub limit: f64,
    /// What is left now; `null` when the counters did not answer.
    pub remaining: Option<f64>,
    /// `requests`, `tokens` or `usd`.
    pub unit: &'static str,
    /// A quota's or budget's calendar period.
    pub period: Option<&'static str>,
    /// When everything counted so far has left the window, or the period ends (RFC 3339).
    pub resets_at: Option<String>,
}

impl Limiter {
    /// What each of the client's own and per-deployment limits has left now (per-subject
    /// limits are per user and not listed), and where that was read: `memory`, `redis`,
    /// `unavailable` (Redis did not answer) or `none` (no such limit). Nothing is charged.
    pub async fn remaining(&self, limits: &ClientLimits) -> (Vec<LimitView>, &'static str) {
        let now = counters::now_ms();
        let now_s = now.div_euclid(1000);
        let mut items = Vec::new();
        let mut metas = Vec::new();
        // Per item: the deployment globs of its `limits` entry.
        let mut globs: Vec<Option<Vec<String>>> = Vec::new();
        let zero = Demand::default();
        push_set(
            &mut items,
            &mut metas,
            "",
            Scope::Client,
            &limits.own,
            zero,
            now_s,
        );
        globs.resize(items.len(), None);
        for (i, r) in limits.deployments.iter().enumerate() {
            let prefix = format!("d:{}:", r.label);
            let scope = Scope::Deployments(i);
            push_set(&mut items, &mut metas, &prefix, scope, &r.set, zero, now_s);
            let names: Vec<String> = r.label.split(',').map(str::to_owned).collect();
            globs.resize(items.len(), Some(names));
        }
        if items.is_empty() {
            return (Vec::new(), "none");
        }
        for it in &mut items {
            it.amount = 0;
        }
        let peek = |items: Vec<Item>| async move {
            match &self.redis {
                None => Some((self.memory.reserve(&limits.client, &items), "memory")),
                Some(redis) => redis
                    .reserve(&limits.client, &to_redis(&items))
                    .await
                    .ok()
                    .map(|r| (from_redis(r), "redis")),
            }
        };
        let Some((outcome, source)) = peek(items.clone()).await else {
            return (views(&items, &metas, &globs, None), "unavailable");
        };
        let admitted = match outcome {
            Outcome::Admitted(a) => a,
            // A limit already overdrawn (a reconciliation charged more than was left)
            // refuses even nothing: read each limit alone; an overdrawn one has 0 left.
            Outcome::Refused { .. } => {
                let mut each = Admitted {
                    now_ms: now,
                    bucket_s: now_s,
                    remaining: vec![0; items.len()],
                    reset_ms: vec![0; items.len()],
                };
                for (i, it) in items.iter().enumerate() {
                    if let Some((Outcome::Admitted(a), _)) = peek(vec![it.clone()]).await {
                        each.now_ms = a.now_ms;
                        each.remaining[i] = a.remaining[0];
                        each.reset_ms[i] = a.reset_ms[0];
                    }
                }
                each
            }
        };
        (views(&items, &metas, &globs, Some(&admitted)), source)
    }
}

/// [`Limiter::remaining`]'s answer for `items`, with what `admitted` says is left.
fn views(
    items: &[Item],
    metas: &[Meta],
    globs: &[Option<Vec<String>>],
    admitted: Option<&Admitted>,
) -> Vec<LimitView> {
    items
        .iter()
        .zip(metas)
        .enumerate()
        .map(|(i, (it, m))| {
            let usd = matches!(m.kind, Kind::Budget(_));
            let amount = |v: u64| if usd { v as f64 / 1e6 } else { v as f64 };
            let (kind, unit, period) = match m.kind {
                Kind::Requests => ("requests_per_minute", "requests", None),
                Kind::Tokens => ("tokens_per_minute", "tokens", None),
                Kind::Quota(p) => ("token_quota", "tokens", Some(period::name(p))),
                Kind::Budget(p) => ("budget", "usd", Some(period::name(p))),
            };
            let resets_at = match (it.window, admitted) {
                (Window::Period { end_s, .. }, _) => Some(period::rfc3339(end_s)),
                (Window::Sliding { .. }, Some(a)) => Some(period::rfc3339(
                    (a.now_ms + a.reset_ms[i] as i64).div_euclid(1000),
                )),
                (Window::Sliding { .. }, None) => None,
            };
            LimitView {
                scope: if m.scope == Scope::Client {
                    "client"
                } else {
                    "deployments"
                },
                deployments: globs.get(i).cloned().flatten(),
                kind,
                limit: amount(it.limit),
                remaining: admitted.as_ref().map(|a| amount(a.remaining[i])),
                unit,
                period,
                resets_at,
            }
        })
        .collect()
}

fn window_to_redis(w: Window) -> redis::Window {
    match w {
        Window::Sliding { secs } => redis::Window::Sliding { secs },
        Window::Period { start_s, end_s } => redis::Window::Period {
            start_s: u64::try_from(start_s).unwrap_or(0),
            end_s: u64::try_from(end_s).unwrap_or(0),
        },
    }
}

fn to_redis(items: &[Item]) -> Vec<redis::Item> {
    items
        .iter()
        .map(|it| redis::Item {
            key: it.key.clone(),
            window: window_to_redis(it.window),
            limit: it.limit,
            amount: it.amount,
        })
        .collect()
}

fn adjusts_to_redis(adjusts: &[Adjust]) -> Vec<redis::Adjust> {
    adjusts
        .iter()
        .map(|a| redis::Adjust {
            key: a.key.clone(),
            window: window_to_redis(a.window),
            bucket_s: u64::try_from(a.bucket_s).unwrap_or(0),
            delta: a.delta,
        })
        .collect()
}

fn from_redis(r: redis::Reservation) -> Outcome {
    let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    match r {
        redis::Reservation::Admitted(a) => Outcome::Admitted(Admitted {
            now_ms: ms(a.now_ms),
            bucket_s: ms(a.bucket_s),
            remaining: a.items.iter().map(|i| i.remaining).collect(),
            reset_ms: a.items.iter().map(|i| i.reset_ms).collect(),
        }),
        redis::Reservation::Refused(r) => Outcome::Refused {
            index: r.item,
            retry_after_ms: r.retry_after_ms,
        },
    }
}

fn too_large(it: &Item, kind: Kind, scope: String) -> GatewayError {
    let (what, unit) = match kind {
        Kind::Requests => ("per-minute limit", "requests"),
        Kind::Tokens => ("per-minute limit", "tokens"),
        Kind::Quota(_) => ("quota", "tokens"),
        Kind::Budget(_) => ("budget", "micro-USD"),
    };
    GatewayError::RequestTooLargeForLimit(Box::new(TooLarge {
        scope,
        what,
        unit,
        requested: it.amount,
        limit: it.limit,
    }))
}

fn refusal(it: &Item, kind: Kind, scope: String, retry_after_ms: u64, now_ms: i64) -> GatewayError {
    let retry_after = Duration::from_millis(retry_after_ms);
    // A period's reset is its end (the wait was measured from the counter's own clock
    // reading, a little later than `now_ms`).
    let reset = || match it.window {
        Window::Period { end_s, .. } => period::rfc3339(end_s),
        Window::Sliding { .. } => {
            period::rfc3339((now_ms + retry_after_ms as i64).div_euclid(1000))
        }
    };
    match kind {
        Kind::Requests => GatewayError::RateLimitExceeded {
            scope,
            limit: it.limit,
            retry_after,
        },
        Kind::Tokens => GatewayError::TokenLimitExceeded {
            scope,
            limit: it.limit,
            requested: it.amount,
            retry_after,
        },
        Kind::Quota(p) => GatewayError::QuotaExceeded(Box::new(PeriodRefusal {
            scope,
            limit: it.limit,
            requested: it.amount,
            period: period::name(p),
            reset: reset(),
            retry_after,
        })),
        Kind::Budget(p) => GatewayError::BudgetExceeded(Box::new(PeriodRefusal {
            scope,
            limit: it.limit,
            requested: it.amount,
            period: period::name(p),
            reset: reset(),
            retry_after,
        })),
    }
}

/// Tokens and cost a request was charged; reconciled with the real usage by
/// [`Reservation::settle`].
pub struct Reservation {
    limiter: Arc<Limiter>,
    client: Arc<str>,
    items: Vec<Item>,
    metas: Vec<Meta>,
    admitted: Admitted,
    store: Store,
    demand: Demand,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("client", &self.client)
            .field("items", &self.items)
            .field("store", &self.store)
            .field("demand", &self.demand)
            .finish()
    }
}

static LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
static LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
static REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
static RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

impl Reservation {
    /// What was reserved.
    pub fn demand(&self) -> Demand {
        self.demand
    }

    /// Replace the backend's `x-ratelimit-*` headers (they describe the shared capacity)
    /// with the client's own tightest limits, in OpenAI's names and formats.
    pub fn headers(&self, h: &mut HeaderMap) {
        crate::proxy::remove_where(h, |name, _| name.as_str().starts_with("x-ratelimit-"));
        let tightest = |pick: fn(Kind) -> bool| {
            (0..self.items.len())
                .filter(|&i| pick(self.metas[i].kind))
                .min_by_key(|&i| self.admitted.remaining[i])
        };
        let set = |h: &mut HeaderMap, names: [&HeaderName; 3], i: usize| {
            h.insert(names[0].clone(), HeaderValue::from(self.items[i].limit));
            h.insert(
                names[1].clone(),
                HeaderValue::from(self.admitted.remaining[i]),
            );
            if let Ok(v) = HeaderValue::from_str(&reset_text(self.admitted.reset_ms[i])) {
                h.insert(names[2].clone(), v);
            }
        };
        if let Some(i) = tightest(|k| k == Kind::Requests) {
            set(
                h,
                [&LIMIT_REQUESTS, &REMAINING_REQUESTS, &RESET_REQUESTS],
                i,
            );
        }
        if let Some(i) = tightest(|k| matches!(k, Kind::Tokens | Kind::Quota(_))) {
            set(h, [&LIMIT_TOKENS, &REMAINING_TOKENS, &RESET_TOKENS], i);
        }
    }

    /// Reconcile with what the request really cost: refund or charge the difference in
    /// every token, quota and budget counter (requests stay counted). Runs in the
    /// background for Redis.
    pub fn settle(self, actual: Demand) {
        let tokens = actual.tokens as i64 - self.demand.tokens as i64;
        let usd = actual.micro_usd as i64 - self.demand.micro_usd as i64;
        let adjusts: Vec<Adjust> = self
            .items
            .iter()
            .zip(&self.metas)
            .filter_map(|(it, m)| {
                let delta = match m.kind {
                    Kind::Requests => 0,
                    Kind::Tokens | Kind::Quota(_) => tokens,
                    Kind::Budget(_) => usd,
                };
                (delta != 0).then(|| Adjust {
                    key: it.key.clone(),
                    window: it.window,
                    bucket_s: self.admitted.bucket_s,
                    delta,
                })
            })
            .collect();
        if adjusts.is_empty() {
            return;
        }
        let limiter = self.limiter;
        match (self.store, &limiter.redis) {
            (Store::Redis, Some(_)) => {
                let client = self.client;
                let spawned = tokio::runtime::Handle::try_current().map(|h| {
                    h.spawn(async move {
                        if let Some(redis) = &limiter.redis {
                            if let Err(e) = redis.adjust(&client, &adjusts_to_redis(&adjusts)).await {
                                limiter.metrics.backend_errors.inc();
                                tracing::warn!(client = %client, error = %e, "could not reconcile a reservation in Redis: it stays charged as reserved");
                            }
                        }
                    })
                });
                if spawned.is_err() {
                    tracing::warn!("no runtime to reconcile a reservation in Redis: it stays charged as reserved");
                }
            }
            _ => limiter.memory.adjust(&self.client, &adjusts),
        }
    }
}

/// OpenAI's reset format: `20ms`, `1s`, `1.5s`, `6m0s`, `1h2m3s`.
fn reset_text(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let (s, frac) = (rest / 1000, rest % 1000);
    let secs = if frac == 0 {
        format!("{s}s")
    } else {
        let f = format!("{frac:03}");
        format!("{s}.{}s", f.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::authorize::ClientPolicy;
    use crate::identify::AuthMethod;

    fn caller(max: Option<u32>) -> Caller {
        let mut c: ClientConfig =
            toml::from_str("id = \"a\"\ndeployments = [\"*\"]\noperations = [\"*\"]").unwrap();
        c.max_concurrent_requests = max;
        Caller {
            client: Arc::new(ClientPolicy::new(&c)),
            method: AuthMethod::ApiKey,
            principal: Default::default(),
            grants: Vec::new(),
        }
    }

    #[test]
    fn only_token_limits_quotas_and_budgets_need_an_estimate() {
        let limits = |extra: &str| {
            let c: ClientConfig = toml::from_str(&format!(
                "id = \"a\"\ndeployments = [\"*\"]\noperations = [\"*\"]\n{extra}"
            ))
            .unwrap();
            ClientLimits::new(&c).counts_tokens()
        };
        assert!(!limits(""));
        assert!(!limits("max_concurrent_requests = 2"));
        assert!(!limits("requests_per_minute = 10"));
        assert!(!limits("per_subject = { requests_per_minute = 10 }"));
        assert!(!limits(
            "limits = [{ deployments = [\"gpt-4o\"], requests_per_minute = 5 }]"
        ));
        assert!(limits("tokens_per_minute = 10"));
        assert!(limits("token_quota = { tokens = 10, period = \"day\" }"));
        assert!(limits("budget = { usd = 1.0, period = \"month\" }"));
        assert!(limits("per_subject = { tokens_per_minute = 10 }"));
        assert!(limits(
            "limits = [{ deployments = [\"gpt-4o\"], budget = { usd = 1.0, period = \"day\" } }]"
        ));
    }

    #[test]
    fn concurrency_is_capped_and_released_on_drop() {
        let c = caller(Some(2));
        let a = admit(&c).unwrap();
        let b = admit(&c).unwrap();
        let e = admit(&c).unwrap_err();
        assert_eq!(e.code(), "too_many_concurrent_requests");
        assert_eq!(e.status(), 429);
        assert_eq!(c.client.limits.in_flight(), 2, "a refusal takes no slot");
        drop(a);
        let _c = admit(&c).unwrap();
        drop(b);
        assert_eq!(c.client.limits.in_flight(), 1);
    }

    #[test]
    fn unlimited_clients_are_not_counted() {
        let c = caller(None);
        let held: Vec<_> = (0..100).map(|_| admit(&c).unwrap()).collect();
        assert_eq!(c.client.limits.in_flight(), 0);
        drop(held);
    }

    #[test]
    fn concurrent_admissions_never_exceed_the_limit() {
        let c = Arc::new(caller(Some(3)));
        let peak = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (c, peak) = (c.clone(), peak.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        if let Ok(a) = admit(&c) {
                            peak.fetch_max(c.client.limits.in_flight(), Ordering::Relaxed);
                            drop(a);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(peak.load(Ordering::Relaxed) <= 3);
        assert_eq!(c.client.limits.in_flight(), 0);
    }

    fn limited(extra: &str, subject: Option<&str>) -> Caller {
        let c: ClientConfig = toml::from_str(&format!(
            "id = \"a\"\ndeployments = [\"*\"]\noperations = [\"*\"]\n{extra}"
        ))
        .unwrap();
        Caller {
            client: Arc::new(ClientPolicy::new(&c)),
            method: AuthMethod::Jwt,
            principal: Arc::new(crate::identify::Principal {
                subject: subject.map(str::to_owned),
                ..Default::default()
            }),
            grants: Vec::new(),
        }
    }

    fn limiter() -> Arc<Limiter> {
        Arc::new(Limiter::memory(crate::metrics::Metrics::new().accounting))
    }

    fn tokens(n: u64) -> Demand {
        Demand {
            tokens: n,
            micro_usd: 0,
        }
    }

    #[tokio::test]
    async fn remaining_charges_nothing_and_reads_an_overdrawn_limit_as_zero() {
        let l = limiter();
        let extra = r#"
            requests_per_minute = 10
            tokens_per_minute = 1000
            limits = [{ deployments = ["gpt-4o*"], tokens_per_minute = 500 }]
        "#;
        let c = limited(extra, None);
        let r = l
            .reserve(&c, Some("gpt-4o"), tokens(400))
            .await
            .unwrap()
            .unwrap();
        let left = |v: &[LimitView]| v.iter().map(|x| x.remaining).collect::<Vec<_>>();
        let (views, source) = l.remaining(&c.client.limits).await;
        assert_eq!(source, "memory");
        assert_eq!(left(&views), vec![Some(9.0), Some(600.0), Some(100.0)]);
        assert_eq!(views[2].deployments, Some(vec!["gpt-4o*".to_owned()]));
        assert!(views.iter().all(|v| v.resets_at.is_some()));
        // Reading again changes nothing.
        let (again, _) = l.remaining(&c.client.limits).await;
        assert_eq!(left(&again), left(&views));
        // The answer used 800 tokens: the deployment limit is overdrawn (1200 of 500).
        r.settle(tokens(1200));
        let (views, _) = l.remaining(&c.client.limits).await;
        assert_eq!(left(&views), vec![Some(9.0), Some(0.0), Some(0.0)]);
        // A client without limits has nothing to show.
        let free = limited("", None);
        assert_eq!(l.remaining(&free.client.limits).await, (Vec::new(), "none"));
    }

    #[tokio::test]
    async fn clients_without_limits_reserve_nothing() {
        let l = limiter();
        let c = limited("", Some("u"));
        assert!(l
            .reserve(&c, Some("gpt-4o"), tokens(10))
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn every_applicable_limit_is_reserved_and_each_refusal_says_which() {
        let l = limiter();
        let extra = r#"
            requests_per_minute = 100
            tokens_per_minute = 1000
            limits = [{ deployments = ["gpt-4o*"], tokens_per_minute = 300 }]
            per_subject = { requests_per_minute = 2 }
        "#;
        let alice = limited(extra, Some("alice"));
        let bob = limited(extra, Some("bob"));
        let r = l
            .reserve(&alice, Some("gpt-4o"), tokens(200))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.items.len(), 4, "{r:?}");
        let mut h = HeaderMap::new();
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("999999"),
        );
        h.insert(
            "x-ratelimit-limit-requests",
            HeaderValue::from_static("999999"),
        );
        r.headers(&mut h);
        // The tightest: the subject's 2 requests, the deployment's 300 tokens.
        assert_eq!(h["x-ratelimit-limit-requests"], "2");
        assert_eq!(h["x-ratelimit-remaining-requests"], "1");
        // 61 s after the current second began, less the part of it already gone.
        let reset = h["x-ratelimit-reset-requests"].to_str().unwrap();
        assert!(reset.starts_with("1m") && reset.ends_with('s'), "{reset}");
        assert_eq!(h["x-ratelimit-limit-tokens"], "300");
        assert_eq!(h["x-ratelimit-remaining-tokens"], "100");
        // The deployment override refuses the next 200 on gpt-4o, not on another model.
        let e = l
            .reserve(&bob, Some("gpt-4o-mini"), tokens(200))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "token_limit_exceeded");
        assert_eq!(e.status(), 429);
        assert!(e.to_string().contains("deployments 'gpt-4o*'"), "{e}");
        l.reserve(&bob, Some("other"), tokens(200))
            .await
            .unwrap()
            .unwrap();
        // Alice's second request fits her own two; her third does not, Bob's still does.
        l.reserve(&alice, Some("other"), tokens(1))
            .await
            .unwrap()
            .unwrap();
        let e = l
            .reserve(&alice, Some("other"), tokens(1))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "rate_limit_exceeded");
        assert!(e.to_string().contains("subject 'alice'"), "{e}");
        l.reserve(&bob, Some("other"), tokens(1))
            .await
            .unwrap()
            .unwrap();
        // A request larger than a limit can never fit: 400, not an endless 429.
        let e = l
            .reserve(&bob, Some("other"), tokens(1001))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "request_too_large_for_limit");
        assert_eq!(e.status(), 400);
    }

    #[tokio::test]
    async fn quotas_and_budgets_refuse_with_403_until_the_period_ends() {
        let l = limiter();
        let c = limited(
            r#"token_quota = { tokens = 100, period = "day" }
               budget = { usd = 1.0, period = "month" }"#,
            None,
        );
        let spend = |t, usd| Demand {
            tokens: t,
            micro_usd: crate::pricing::micro_usd(usd),
        };
        l.reserve(&c, None, spend(60, 0.5)).await.unwrap().unwrap();
        let e = l.reserve(&c, None, spend(60, 0.1)).await.unwrap_err();
        assert_eq!((e.status().as_u16(), e.code()), (403, "quota_exceeded"));
        assert!(e.to_string().contains("T00:00:00Z"), "reset named: {e}");
        let resp = e.into_response(None);
        let after: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(after > 0 && after <= 86_400, "{after}");
        let e = l.reserve(&c, None, spend(10, 0.6)).await.unwrap_err();
        assert_eq!(e.code(), "budget_exceeded");
    }

    #[tokio::test]
    async fn settling_refunds_what_the_answer_did_not_use() {
        let l = limiter();
        let c = limited("tokens_per_minute = 1000", None);
        let r = l.reserve(&c, None, tokens(900)).await.unwrap().unwrap();
        assert!(l.reserve(&c, None, tokens(500)).await.is_err());
        r.settle(tokens(300));
        l.reserve(&c, None, tokens(700)).await.unwrap().unwrap();
        assert!(l.reserve(&c, None, tokens(1)).await.is_err());
    }

    #[test]
    fn reset_times_use_openai_format() {
        assert_eq!(reset_text(20), "20ms");
        assert_eq!(reset_text(1000), "1s");
        assert_eq!(reset_text(1500), "1.5s");
        assert_eq!(reset_text(360_000), "6m0s");
        assert_eq!(reset_text(3_723_000), "1h2m3s");
    }
}
