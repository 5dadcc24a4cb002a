//! Backend tokens: one cache per (credential, scope), kept fresh by one background task.
//!
//! Requests only ever read the cache (an atomic load): they never wait on the identity
//! provider. The refresher acquires the first token at start, then refreshes ahead of
//! expiry — at the IdP's `refresh_in` when it sends one, at half-life for tokens of two
//! hours or more, else at the later of half-life and five minutes before expiry — so there
//! is always a valid token while the IdP answers. Failed exchanges are retried with
//! exponential backoff and jitter, honouring `Retry-After`, and otherwise never more than a
//! quarter of the token lifetime apart: an outage is invisible to clients as long as it
//! ends before the token held at its start stops being usable. With no valid
//! token, [`TokenCache::header`] returns `None`: the request fails fast and routing moves
//! to a backend whose credential is ready.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

use super::source::{FetchError, Fetched, Source};
use crate::metrics::Metrics;

/// Longest pause between retries, whatever the token lifetime.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Shortest cap on the pause between retries (for very short-lived tokens).
const MIN_BACKOFF_CAP: Duration = Duration::from_secs(2);
/// First retry after this long.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// A `Retry-After` longer than this is not believed.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// Longest lifetime believed (the token sources clamp to it too): keeps deadline
/// arithmetic far from overflow.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// One exchange may take this long before it counts as failed.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(15);

/// A token and how long it may be sent.
struct Token {
    /// `Bearer <token>`, marked sensitive.
    header: HeaderValue,
    /// Past this instant the token is not sent: it could expire in flight.
    usable_until: Instant,
    /// When the IdP said it expires (for the expiry gauge).
    expires_at: SystemTime,
}

#[derive(Default)]
struct Status {
    /// Why the last exchange failed, while it has not succeeded since.
    last_error: Option<String>,
    next_attempt: Option<Instant>,
}

/// The current token of one credential and scope.
pub struct TokenCache {
    /// `kind:identity`, the metric label and the name in logs and `/ready`.
    name: String,
    current: ArcSwapOption<Token>,
    status: Mutex<Status>,
    metrics: Arc<Metrics>,
    /// Wakes the refresher before its schedule (a backend rejected the token).
    wake: tokio::sync::Notify,
    /// Bumped after every exchange (a token stored or a failure), so a request can wait
    /// for the outcome of a forced renewal.
    exchanged: tokio::sync::watch::Sender<u64>,
    /// When a renewal was last forced (ms on the routing clock; 0: never).
    forced_at: AtomicU64,
    /// A forced renewal has not finished yet.
    forced_pending: std::sync::atomic::AtomicBool,
    /// `portcullis_backend_token_expiry_seconds` of this credential (set at scrape time).
    expiry: Gauge<f64, AtomicU64>,
}

impl Drop for TokenCache {
    /// A credential a reload removed holds no token any more (a cache that replaced it
    /// under the same name sets the gauge again at the next scrape).
    fn drop(&mut self) {
        self.expiry.set(0.0);
    }
}

/// Forced renewals of one credential are at least this far apart, however many backends
/// reject its token: a backend answering 401 to everything must not flood the IdP.
const FORCED_RENEWAL_GAP: Duration = Duration::from_secs(10);

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    /// An empty cache; [`spawn_refresher`] fills it.
    pub fn new(name: String, metrics: Arc<Metrics>) -> Arc<Self> {
        let gauge: Gauge<f64, AtomicU64> = metrics.token_expiry(&name);
        let cache = Arc::new(Self {
            name,
            current: ArcSwapOption::empty(),
            status: Mutex::new(Status::default()),
            metrics,
            wake: tokio::sync::Notify::new(),
            exchanged: tokio::sync::watch::channel(0).0,
            forced_at: AtomicU64::new(0),
            forced_pending: std::sync::atomic::AtomicBool::new(false),
            expiry: gauge.clone(),
        });
        let weak = Arc::downgrade(&cache);
        cache.metrics.before_render(Box::new(move || {
            if let Some(c) = weak.upgrade() {
                let secs = c.current.load().as_ref().map_or(0.0, |t| {
                    t.expires_at
                        .duration_since(SystemTime::now())
                        .map_or(0.0, |d| d.as_secs_f64())
                });
                gauge.set(secs);
            }
        }));
        cache
    }

    /// The credential's name (`entra_certificate:<client id>`, ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `Authorization: Bearer ...` while a token is valid; `None` otherwise.
    pub fn header(&self) -> Option<HeaderValue> {
        let guard = self.current.load();
        let t = guard.as_ref()?;
        (Instant::now() < t.usable_until).then(|| t.header.clone())
    }

    /// A backend rejected `rejected` (401): get a new token now, unless one newer than it
    /// is already held, and wait for it at most `wait`. Returns whether a token other than
    /// `rejected` is held afterwards. Renewals forced this way are at least
    /// [`FORCED_RENEWAL_GAP`] apart; within the gap this waits only for a renewal still
    /// under way, and otherwise returns at once.
    pub async fn renew_rejected(&self, rejected: &HeaderValue, wait: Duration) -> bool {
        let fresh = |c: &Self| {
            c.header()
                .is_some_and(|h| h.as_bytes() != rejected.as_bytes())
        };
        if fresh(self) {
            return true;
        }
        let mut exchanged = self.exchanged.subscribe();
        exchanged.mark_unchanged();
        let now = crate::routing::health::now_ms();
        let gap = u64::try_from(FORCED_RENEWAL_GAP.as_millis()).unwrap_or(u64::MAX);
        let last = self.forced_at.load(Ordering::Acquire);
        if (last == 0 || now.saturating_sub(last) >= gap)
            && self
                .forced_at
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            tracing::info!(credential = %self.name, "a backend rejected the token; renewing it now");
            self.forced_pending.store(true, Ordering::Release);
            self.wake.notify_one();
        } else if !self.forced_pending.load(Ordering::Acquire) {
            return false;
        }
        let _ = tokio::time::timeout(wait, exchanged.changed()).await;
        fresh(self)
    }

    /// Before the refresher's first exchange has finished (the gateway has just started):
    /// wait at most `wait` for it. Whether a valid token is held afterwards. Once an
    /// exchange has finished — a token, or a failure the refresher retries on its own
    /// schedule — this returns at once: only the first moments after a start are waited
    /// through, never an IdP outage.
    pub async fn first_token(&self, wait: Duration) -> bool {
        // Subscribed before looking, so an exchange finishing in between is not missed.
        let mut exchanged = self.exchanged.subscribe();
        exchanged.mark_unchanged();
        if self.header().is_some() {
            return true;
        }
        if self.attempted() {
            return false;
        }
        let _ = tokio::time::timeout(wait, exchanged.changed()).await;
        self.header().is_some()
    }

    /// Whether the refresher has finished at least one exchange, successful or not.
    pub fn attempted(&self) -> bool {
        self.current.load().is_some()
            || self
                .status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .next_attempt
                .is_some()
    }

    /// `Ok` while a valid token is held; otherwise why not.
    pub fn readiness(&self) -> Result<(), String> {
        if self.header().is_some() {
            return Ok(());
        }
        let st = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let mut why = match (&st.last_error, self.current.load().is_some()) {
            (Some(e), true) => format!("token expired and cannot be renewed: {e}"),
            (Some(e), false) => format!("no token yet: {e}"),
            (None, true) => "token expired; renewing".to_owned(),
            (None, false) => "first token not acquired yet".to_owned(),
        };
        if let Some(at) = st.next_attempt {
            let secs = at.saturating_duration_since(Instant::now()).as_secs_f64();
            why.push_str(&format!(" (next attempt in {secs:.0}s)"));
        }
        Err(why)
    }

    fn store(&self, f: Fetched, started: Instant) -> Result<Duration, FetchError> {
        let mut header =
            HeaderValue::try_from(format!("Bearer {}", f.access_token)).map_err(|_| {
                FetchError {
                    message: "the access token is not a valid header value".into(),
                    retryable: false,
                    retry_after: None,
                }
            })?;
        header.set_sensitive(true);
        let lifetime = f.expires_in.min(MAX_LIFETIME);
        self.current.store(Some(Arc::new(Token {
            header,
            usable_until: started + lifetime - safety_margin(lifetime),
            expires_at: SystemTime::now() + lifetime.saturating_sub(started.elapsed()),
        })));

        Ok(refresh_after(lifetime, f.refresh_in))
    }
}

/// Not sent in the last sixth of its life (at most a minute): clocks differ and requests
/// take time to reach the backend.
fn safety_margin(lifetime: Duration) -> Duration {
    (lifetime / 6).min(Duration::from_secs(60))
}

/// Tokens living this long or longer are refreshed at half-life when the IdP sends no
/// `refresh_in` (MSAL's rule: a 24 h managed-identity token then survives a 12 h outage,
/// not five minutes).
const LONG_LIVED: Duration = Duration::from_secs(2 * 3600);

/// When to refresh a token of `lifetime`: at `refresh_in` if the IdP sent it; else at
/// half-life for tokens of two hours or more, and at the later of half-life and five
/// minutes before expiry for shorter ones. Always before the safety margin, and never
/// sooner than 30 s (or half-life) so a bogus `refresh_in` cannot make a refresh loop.
pub fn refresh_after(lifetime: Duration, refresh_in: Option<Duration>) -> Duration {
    let usable = lifetime.saturating_sub(safety_margin(lifetime));
    let half = lifetime / 2;
    let at = refresh_in.unwrap_or_else(|| {
        if lifetime >= LONG_LIVED {
            half
        } else {
            half.max(lifetime.saturating_sub(Duration::from_secs(300)))
        }
    });
    let at = at.max(half.min(Duration::from_secs(30)));
    if at < usable {
        at
    } else {
        usable.mul_f64(0.9)
    }
}

/// The pause before retry number `failures` (1-based): exponential from one second, capped
/// at a quarter of the token lifetime (between 2 and 30 seconds), with jitter in the
/// upper half; at least `Retry-After`.
pub fn backoff(
    failures: u32,
    lifetime: Option<Duration>,
    retry_after: Option<Duration>,
) -> Duration {
    let cap = lifetime
        .map_or(MAX_BACKOFF, |l| l / 4)
        .clamp(MIN_BACKOFF_CAP, MAX_BACKOFF);
    let exp = FIRST_BACKOFF.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let base = exp.min(cap);
    let jittered = base.mul_f64(0.5 + fastrand::f64() * 0.5);
    match retry_after {
        Some(r) => jittered.max(r.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

/// Start the task that keeps `cache` filled from `source`, on the current runtime.
pub fn spawn_refresher(cache: Arc<TokenCache>, source: Source) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut failures = 0u32;
        let mut lifetime = None;
        loop {
            let started = Instant::now();
            // A panic in one exchange (a bug, a hostile answer) must not end the refresher:
            // it counts as a failed attempt and is retried like one.
            let attempt = std::panic::AssertUnwindSafe(async {
                let fetched = match tokio::time::timeout(EXCHANGE_TIMEOUT, source.fetch()).await {
                    Ok(r) => r?,
                    Err(_) => {
                        return Err(FetchError {
                            message: format!(
                                "the token request took longer than {}s",
                                EXCHANGE_TIMEOUT.as_secs()
                            ),
                            retryable: true,
                            retry_after: None,
                        })
                    }
                };
                let l = fetched.expires_in.min(MAX_LIFETIME);
                cache.store(fetched, started).map(|wait| (wait, l))
            });
            let outcome = futures_util::FutureExt::catch_unwind(attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(FetchError {
                        message: "internal error in the token refresher".into(),
                        retryable: true,
                        retry_after: None,
                    })
                });
            let wait = match outcome {
                Ok((wait, l)) => {
                    failures = 0;
                    lifetime = Some(l);
                    cache.metrics.backend_token(&cache.name, "ok").inc();
                    tracing::info!(credential = %cache.name, expires_in_s = l.as_secs(), refresh_in_s = wait.as_secs(), "backend token acquired");
                    let mut st = cache.status.lock().unwrap_or_else(|p| p.into_inner());
                    st.last_error = None;
                    st.next_attempt = Some(started + wait);
                    wait.saturating_sub(started.elapsed())
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let outcome = if e.retryable {
                        "retryable_error"
                    } else {
                        "error"
                    };
                    cache.metrics.backend_token(&cache.name, outcome).inc();
                    let wait = backoff(failures, lifetime, e.retry_after);
                    let valid = cache.header().is_some();
                    tracing::warn!(credential = %cache.name, error = %e.message, failures, retry_in_ms = wait.as_millis() as u64, token_still_valid = valid, "backend token request failed");
                    let mut st = cache.status.lock().unwrap_or_else(|p| p.into_inner());
                    st.last_error = Some(e.message);
                    st.next_attempt = Some(Instant::now() + wait);
                    wait
                }
            };
            cache.forced_pending.store(false, Ordering::Release);
            cache.exchanged.send_modify(|n| *n += 1);
            // A forced renewal (a backend rejected the token) cuts the wait short.
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cache.wake.notified() => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream_auth::source::{FetchFuture, TokenSource};
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn refresh_schedule() {
        let s = Duration::from_secs;
        // one hour: five minutes before expiry beats half-life
        assert_eq!(refresh_after(s(3600), None), s(3300));
        // 30 s: half-life
        assert_eq!(refresh_after(s(30), None), s(15));
        // a 24 h managed-identity token: half-life
        assert_eq!(refresh_after(s(86400), None), s(43200));
        // the IdP's refresh_in wins
        assert_eq!(refresh_after(s(86400), Some(s(3600))), s(3600));
        // but never past the margin, nor in a loop
        assert!(refresh_after(s(60), Some(s(59))) < s(50));
        assert_eq!(refresh_after(s(3600), Some(s(1))), s(30));
    }

    #[test]
    fn backoff_grows_jitters_and_caps() {
        let s = Duration::from_secs;
        for _ in 0..100 {
            let b1 = backoff(1, None, None);
            assert!(b1 >= Duration::from_millis(500) && b1 <= s(1), "{b1:?}");
            let b5 = backoff(5, None, None);
            assert!(b5 >= s(8) && b5 <= s(16), "{b5:?}");
            assert!(backoff(30, None, None) <= s(30));
            // 10 s tokens: never more than 2.5 s apart
            assert!(backoff(30, Some(s(10)), None) <= Duration::from_millis(2500));
            assert!(
                backoff(1, None, Some(s(20))) >= s(20),
                "Retry-After honoured"
            );
            assert!(backoff(1, None, Some(s(99999))) <= s(300));
        }
    }

    struct Flaky {
        calls: AtomicU32,
        fail_from: u32,
    }

    impl TokenSource for Flaky {
        fn fetch(&self) -> FetchFuture<'_> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n >= self.fail_from {
                    return Err(FetchError {
                        message: "the token endpoint answered 503".into(),
                        retryable: true,
                        retry_after: None,
                    });
                }
                Ok(Fetched {
                    access_token: format!("token-{n}"),
                    expires_in: Duration::from_secs(60),
                    refresh_in: None,
                })
            })
        }
    }

    /// Answers absurd lifetimes, or panics, on alternate calls.
    struct Hostile(AtomicU32);

    impl TokenSource for Hostile {
        fn fetch(&self) -> FetchFuture<'_> {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                assert!(n.is_multiple_of(2), "a bug in a token source");
                Ok(Fetched {
                    access_token: format!("t{n}"),
                    expires_in: Duration::MAX,
                    refresh_in: None,
                })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_lifetimes_and_panics_do_not_stop_the_refresher() {
        let cache = TokenCache::new("test:hostile".into(), Arc::new(Metrics::new()));
        let source = Arc::new(Hostile(AtomicU32::new(0)));
        let task = spawn_refresher(cache.clone(), source.clone());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(cache.header().unwrap(), "Bearer t0");
        // a day at most is believed: refreshed at half a day, not in a loop
        assert_eq!(source.0.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(12 * 3600 + 5)).await;
        // the second call panicked; the refresher retried and got t2
        assert!(source.0.load(Ordering::SeqCst) >= 3);
        assert_eq!(cache.header().unwrap(), "Bearer t2");
        assert!(!task.is_finished());
        task.abort();
    }

    /// Answers after `delay`, or fails at once.
    struct Slow {
        delay: Duration,
        fail: bool,
    }

    impl TokenSource for Slow {
        fn fetch(&self) -> FetchFuture<'_> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                if self.fail {
                    return Err(FetchError {
                        message: "the token endpoint answered 503".into(),
                        retryable: true,
                        retry_after: None,
                    });
                }
                Ok(Fetched {
                    access_token: "first".into(),
                    expires_in: Duration::from_secs(3600),
                    refresh_in: None,
                })
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_at_start_waits_for_the_first_token_but_never_through_an_outage() {
        let cache = TokenCache::new("test:slow".into(), Arc::new(Metrics::new()));
        let slow = Slow {
            delay: Duration::from_secs(2),
            fail: false,
        };
        let task = spawn_refresher(cache.clone(), Arc::new(slow));
        let t0 = tokio::time::Instant::now();
        assert!(cache.first_token(Duration::from_secs(5)).await);
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(3));
        assert_eq!(cache.header().unwrap(), "Bearer first");
        task.abort();

        // Bounded: a slower first exchange is not waited for past `wait`.
        let cache = TokenCache::new("test:slower".into(), Arc::new(Metrics::new()));
        let slower = Slow {
            delay: Duration::from_secs(60),
            fail: false,
        };
        let task = spawn_refresher(cache.clone(), Arc::new(slower));
        let t0 = tokio::time::Instant::now();
        assert!(!cache.first_token(Duration::from_secs(5)).await);
        assert!(t0.elapsed() < Duration::from_secs(6));
        task.abort();

        // Once an exchange has failed, nobody waits: the refresher retries on its own.
        let cache = TokenCache::new("test:down".into(), Arc::new(Metrics::new()));
        let down = Slow {
            delay: Duration::ZERO,
            fail: true,
        };
        let task = spawn_refresher(cache.clone(), Arc::new(down));
        assert!(
            !cache.first_token(Duration::from_secs(5)).await,
            "first failure"
        );
        let t0 = tokio::time::Instant::now();
        assert!(!cache.first_token(Duration::from_secs(5)).await);
        assert_eq!(
            t0.elapsed(),
            Duration::ZERO,
            "no wait after a failed exchange"
        );
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn refreshes_ahead_then_outlives_an_outage_until_expiry() {
        let cache = TokenCache::new("test:c".into(), Arc::new(Metrics::new()));
        let source = Arc::new(Flaky {
            calls: AtomicU32::new(0),
            fail_from: 2,
        });
        assert!(cache.header().is_none());
        assert!(cache.readiness().unwrap_err().contains("first token"));
        let task = spawn_refresher(cache.clone(), source.clone());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(cache.header().unwrap(), "Bearer token-0");
        assert!(format!("{:?}", cache.header().unwrap()).contains("Sensitive"));
        // refreshed at half-life (30 s), before anyone sees an expired token
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(cache.header().unwrap(), "Bearer token-1");
        // from now on the IdP fails: token-1 is used until its margin (60 - 10 s)...
        tokio::time::sleep(Duration::from_secs(45)).await;
        assert_eq!(cache.header().unwrap(), "Bearer token-1");
        assert!(cache.readiness().is_ok());
        // ...then nothing is sent, and readiness says why
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(cache.header().is_none());
        let why = cache.readiness().unwrap_err();
        assert!(why.contains("answered 503"), "{why}");
        // retried at most a quarter lifetime (15 s) apart during the outage
        let calls = source.calls.load(Ordering::SeqCst);
        assert!(calls >= 5, "{calls}");
        task.abort();
    }
}
