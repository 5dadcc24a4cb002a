//! Tests against a real Redis: `PORTCULLIS_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`);
//! every test uses its own namespace, so they run in parallel. The outage test starts its
//! own `redis-server` (Debian package `redis-server`) on a free port.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use super::*;

fn server_url() -> String {
    std::env::var("PORTCULLIS_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn config(url: &str) -> RedisLimiterConfig {
    let mut c = RedisLimiterConfig::new(url);
    c.namespace = format!("pcltest-{}", uuid::Uuid::new_v4().simple());
    c
}

/// A limiter in a fresh namespace, and a plain connection to look at what it wrote.
async fn setup() -> (RedisLimiter, ::redis::aio::MultiplexedConnection) {
    let url = server_url();
    let limiter = RedisLimiter::new(&config(&url)).unwrap();
    limiter
        .ping()
        .await
        .unwrap_or_else(|e| panic!("Redis at {url} (PORTCULLIS_TEST_REDIS_URL): {e}"));
    let raw = ::redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    (limiter, raw)
}

/// Delete every key of `l`'s namespace (period counters would otherwise stay a day).
async fn forget(l: &RedisLimiter, raw: &mut ::redis::aio::MultiplexedConnection) {
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{}:*", l.namespace))
        .query_async(raw)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = ::redis::cmd("DEL")
            .arg(keys)
            .query_async(raw)
            .await
            .unwrap();
    }
}

async fn redis_now_s(raw: &mut ::redis::aio::MultiplexedConnection) -> u64 {
    let (s, _us): (u64, u64) = ::redis::cmd("TIME").query_async(raw).await.unwrap();
    s
}

async fn bucket_sum(raw: &mut ::redis::aio::MultiplexedConnection, key: &str) -> u64 {
    let h: std::collections::HashMap<u64, u64> = ::redis::cmd("HGETALL")
        .arg(key)
        .query_async(raw)
        .await
        .unwrap();
    h.values().sum()
}

async fn get_u64(raw: &mut ::redis::aio::MultiplexedConnection, key: &str) -> Option<u64> {
    ::redis::cmd("GET").arg(key).query_async(raw).await.unwrap()
}

fn item(key: &str, window: Window, limit: u64, amount: u64) -> Item {
    Item {
        key: key.to_owned(),
        window,
        limit,
        amount,
    }
}

fn admitted(r: Reservation) -> Admitted {
    match r {
        Reservation::Admitted(a) => a,
        Reservation::Refused(r) => panic!("refused: {r:?}"),
    }
}

fn refused(r: Reservation) -> Refused {
    match r {
        Reservation::Refused(r) => r,
        Reservation::Admitted(a) => panic!("admitted: {a:?}"),
    }
}

#[test]
fn keys_carry_the_client_hash_tag_and_escape_braces() {
    assert_eq!(counter_key("pcl", "team-a", "tpm"), "pcl:{team-a}:tpm");
    assert_eq!(
        counter_key("pcl", "a}:{b%", "s:{x}:tpm"),
        "pcl:{a%7D:%7Bb%25}:s:{x}:tpm"
    );
}

#[tokio::test]
async fn reserve_charges_every_item_or_none() {
    let (l, mut raw) = setup().await;
    let end_s = redis_now_s(&mut raw).await + 3600;
    let quota = Window::Period {
        start_s: end_s - 7200,
        end_s,
    };
    let items = [
        item("rpm", Window::Minute, 10, 1),
        item("tpm", Window::Minute, 1000, 600),
        item("q:0", quota, 5000, 600),
    ];
    let a = admitted(l.reserve("c", &items).await.unwrap());
    let remaining: Vec<u64> = a.items.iter().map(|i| i.remaining).collect();
    assert_eq!(remaining, [9, 400, 4400]);
    let minute_reset = (a.bucket_s + 61) * 1000 - a.now_ms;
    assert_eq!(a.items[0].reset_ms, minute_reset);
    assert_eq!(a.items[1].reset_ms, minute_reset);
    assert_eq!(a.items[2].reset_ms, end_s * 1000 - a.now_ms);
    assert_eq!(a.bucket_s, a.now_ms / 1000);

    // tpm has 400 left: the same request is refused, and nothing at all is charged.
    let r = refused(l.reserve("c", &items).await.unwrap());
    assert_eq!(r.item, 1);
    let remaining: Vec<u64> = r.items.iter().map(|i| i.remaining).collect();
    assert_eq!(remaining, [9, 400, 4400]);
    assert_eq!(bucket_sum(&mut raw, &l.counter_key("c", "rpm")).await, 1);
    assert_eq!(bucket_sum(&mut raw, &l.counter_key("c", "tpm")).await, 600);
    assert_eq!(
        get_u64(&mut raw, &l.counter_key("c", "q:0")).await,
        Some(600)
    );

    // Another client's counters are its own.
    admitted(l.reserve("d", &items).await.unwrap());

    // When several items refuse, the answer names the one with the longest wait: the quota,
    // which only resets at the end of its period.
    let both = [
        item("tpm", Window::Minute, 1000, 600),
        item("q:0", quota, 700, 600),
    ];
    let r = refused(l.reserve("c", &both).await.unwrap());
    assert_eq!(r.item, 1);
    assert_eq!(r.retry_after_ms, end_s * 1000 - r.now_ms);
    forget(&l, &mut raw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reserves_never_exceed_the_limit() {
    let (first, mut raw) = setup().await;
    // Four limiters (four connections, as four replicas would have) share one namespace.
    let mut cfg = config(&server_url());
    cfg.namespace = first.namespace.to_string();
    let limiters: Vec<RedisLimiter> = (0..4).map(|_| RedisLimiter::new(&cfg).unwrap()).collect();
    let amount = |i: usize| 50 + (i as u64 % 4) * 25; // 50, 75, 100, 125: 17,500 asked in all
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let l = limiters[i % 4].clone();
            tokio::spawn(async move {
                let items = [item("tpm", Window::Minute, 10_000, amount(i))];
                (i, l.reserve("c", &items).await.unwrap())
            })
        })
        .collect();
    let (mut sum, mut refusals) = (0, Vec::new());
    for t in tasks {
        match t.await.unwrap() {
            (i, Reservation::Admitted(_)) => sum += amount(i),
            (i, Reservation::Refused(_)) => refusals.push(amount(i)),
        }
    }
    assert!(sum <= 10_000, "admitted {sum}");
    // The most that fits: every refused request was larger than what was still left.
    for a in &refusals {
        assert!(*a > 10_000 - sum, "{a} refused with {} left", 10_000 - sum);
    }
    assert!(!refusals.is_empty());
    assert_eq!(
        bucket_sum(&mut raw, &first.counter_key("c", "tpm")).await,
        sum
    );
    forget(&first, &mut raw).await;
}

#[tokio::test]
async fn retry_after_follows_the_bucket_arithmetic() {
    let (l, mut raw) = setup().await;
    let key = l.counter_key("c", "tpm");
    let now = redis_now_s(&mut raw).await;
    let (b0, b1, stale) = (now - 50, now - 20, now - 100);
    let _: () = ::redis::cmd("HSET")
        .arg(&key)
        .arg(b0)
        .arg(300)
        .arg(b1)
        .arg(300)
        .arg(stale)
        .arg(999)
        .query_async(&mut raw)
        .await
        .unwrap();

    // 600 used: 500 more fits once b0 has aged out, 800 more only once b1 has too.
    let r = refused(
        l.reserve("c", &[item("tpm", Window::Minute, 1000, 500)])
            .await
            .unwrap(),
    );
    assert_eq!(r.retry_after_ms, (b0 + 61) * 1000 - r.now_ms);
    assert_eq!(r.items[0].remaining, 400, "the stale bucket is not counted");
    assert_eq!(r.items[0].reset_ms, (b1 + 61) * 1000 - r.now_ms);
    let r = refused(
        l.reserve("c", &[item("tpm", Window::Minute, 1000, 800)])
            .await
            .unwrap(),
    );
    assert_eq!(r.retry_after_ms, (b1 + 61) * 1000 - r.now_ms);

    // A charge deletes the stale bucket and keeps the key for 62 s.
    let a = admitted(
        l.reserve("c", &[item("tpm", Window::Minute, 1000, 400)])
            .await
            .unwrap(),
    );
    assert_eq!(a.items[0].remaining, 0);
    let stale_left: bool = ::redis::cmd("HEXISTS")
        .arg(&key)
        .arg(stale)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(!stale_left);
    let ttl: i64 = ::redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!((61..=62).contains(&ttl), "ttl {ttl}");
    forget(&l, &mut raw).await;
}

#[tokio::test]
async fn waiting_the_retry_after_lets_the_request_fit() {
    let (l, _raw) = setup().await;
    let window = Window::Sliding { secs: 2 };
    let want = |amount| [item("rpm", window, 10, amount)];
    let a0 = admitted(l.reserve("c", &want(6)).await.unwrap());
    // Wait (on Redis' clock) for the next second, so the next charge is in another bucket.
    let deadline = Instant::now() + Duration::from_secs(3);
    let a1 = loop {
        let a = admitted(l.reserve("c", &want(0)).await.unwrap());
        if a.bucket_s > a0.bucket_s {
            break admitted(l.reserve("c", &want(4)).await.unwrap());
        }
        assert!(Instant::now() < deadline, "Redis time did not advance");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(a1.bucket_s > a0.bucket_s);

    let r = refused(l.reserve("c", &want(5)).await.unwrap());
    assert_eq!(r.retry_after_ms, (a0.bucket_s + 3) * 1000 - r.now_ms);
    tokio::time::sleep(Duration::from_millis(r.retry_after_ms)).await;
    let a = admitted(l.reserve("c", &want(5)).await.unwrap());
    assert_eq!(a.items[0].remaining, 1, "4 (second bucket) + 5 of 10");
}

#[tokio::test]
async fn adjust_refunds_and_extra_charges() {
    let (l, mut raw) = setup().await;
    let key = l.counter_key("c", "tpm");
    let want = |amount| [item("tpm", Window::Minute, 1000, amount)];
    let a = admitted(l.reserve("c", &want(800)).await.unwrap());
    refused(l.reserve("c", &want(500)).await.unwrap());

    // The request used 300 of its 800: the refund makes room for the next one.
    let refund = |delta| Adjust {
        key: "tpm".to_owned(),
        window: Window::Minute,
        bucket_s: a.bucket_s,
        delta,
    };
    let done = l.adjust("c", &[refund(-500)]).await.unwrap();
    assert_eq!(done.applied, [-500]);
    admitted(l.reserve("c", &want(500)).await.unwrap());
    assert_eq!(bucket_sum(&mut raw, &key).await, 800);

    // A counter never goes below zero.
    let done = l.adjust("c", &[refund(-5000)]).await.unwrap();
    assert_eq!(bucket_sum(&mut raw, &key).await, 0);
    assert_eq!(done.applied, [-800]);

    // A bucket that has aged out: a refund does nothing, an extra charge lands now.
    let old = |delta| Adjust {
        key: "tpm".to_owned(),
        window: Window::Minute,
        bucket_s: a.bucket_s - 61,
        delta,
    };
    let done = l.adjust("c", &[old(-100)]).await.unwrap();
    assert_eq!(done.applied, [0]);
    assert_eq!(bucket_sum(&mut raw, &key).await, 0);
    let done = l.adjust("c", &[old(250)]).await.unwrap();
    assert_eq!(done.applied, [250]);
    let field: Option<u64> = ::redis::cmd("HGET")
        .arg(&key)
        .arg(done.now_ms / 1000)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(field, Some(250));
    let r = refused(l.reserve("c", &want(800)).await.unwrap());
    assert_eq!(r.items[0].remaining, 750);
    forget(&l, &mut raw).await;
}

#[tokio::test]
async fn period_counters_expire_a_day_after_the_period() {
    let (l, mut raw) = setup().await;
    let key = l.counter_key("c", "q:1000");
    let end_s = redis_now_s(&mut raw).await + 600;
    let window = Window::Period {
        start_s: 1000,
        end_s,
    };
    let a = admitted(
        l.reserve("c", &[item("q:1000", window, 1_000_000, 700_000)])
            .await
            .unwrap(),
    );
    assert_eq!(a.items[0].remaining, 300_000);
    let expire_time = |mut raw: ::redis::aio::MultiplexedConnection, key: String| async move {
        let t: i64 = ::redis::cmd("EXPIRETIME")
            .arg(&key)
            .query_async(&mut raw)
            .await
            .unwrap();
        t
    };
    assert_eq!(
        expire_time(raw.clone(), key.clone()).await,
        (end_s + 86_400) as i64
    );
    let r = refused(
        l.reserve("c", &[item("q:1000", window, 1_000_000, 400_000)])
            .await
            .unwrap(),
    );
    assert_eq!(r.retry_after_ms, end_s * 1000 - r.now_ms);

    let adj = |delta| Adjust {
        key: "q:1000".to_owned(),
        window,
        bucket_s: a.bucket_s,
        delta,
    };
    l.adjust("c", &[adj(-200_000)]).await.unwrap();
    assert_eq!(get_u64(&mut raw, &key).await, Some(500_000));
    admitted(
        l.reserve("c", &[item("q:1000", window, 1_000_000, 400_000)])
            .await
            .unwrap(),
    );
    let done = l.adjust("c", &[adj(-2_000_000)]).await.unwrap();
    assert_eq!(done.applied, [-900_000]);
    assert_eq!(get_u64(&mut raw, &key).await, Some(0));
    assert_eq!(expire_time(raw.clone(), key).await, (end_s + 86_400) as i64);
    forget(&l, &mut raw).await;
}

#[tokio::test]
async fn values_up_to_the_maximum_stay_exact() {
    let (l, mut raw) = setup().await;
    let end_s = redis_now_s(&mut raw).await + 60;
    let window = Window::Period { start_s: 0, end_s };
    let items = [
        item("big", window, MAX_VALUE, MAX_VALUE - 1),
        item("bigm", Window::Minute, MAX_VALUE, MAX_VALUE - 3),
    ];
    let a = admitted(l.reserve("c", &items).await.unwrap());
    assert_eq!(a.items[0].remaining, 1);
    assert_eq!(a.items[1].remaining, 3);
    assert_eq!(
        get_u64(&mut raw, &l.counter_key("c", "big")).await,
        Some(MAX_VALUE - 1)
    );
    let r = refused(
        l.reserve("c", &[item("big", window, MAX_VALUE, 2)])
            .await
            .unwrap(),
    );
    assert_eq!(r.items[0].remaining, 1);
    admitted(
        l.reserve("c", &[item("big", window, MAX_VALUE, 1)])
            .await
            .unwrap(),
    );
    let adj = Adjust {
        key: "bigm".to_owned(),
        window: Window::Minute,
        bucket_s: a.bucket_s,
        delta: 2,
    };
    l.adjust("c", &[adj]).await.unwrap();
    assert_eq!(
        bucket_sum(&mut raw, &l.counter_key("c", "bigm")).await,
        MAX_VALUE - 1
    );
    forget(&l, &mut raw).await;
}

#[tokio::test]
async fn the_script_is_reloaded_after_script_flush() {
    let (l, mut raw) = setup().await;
    let want = [item("rpm", Window::Minute, 10, 1)];
    admitted(l.reserve("c", &want).await.unwrap());
    let _: () = ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut raw)
        .await
        .unwrap();
    let a = admitted(l.reserve("c", &want).await.unwrap());
    assert_eq!(a.items[0].remaining, 8);
    let exists: Vec<bool> = ::redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg(RESERVE.get_hash())
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(exists, [true]);
    forget(&l, &mut raw).await;
}

#[tokio::test]
async fn unusable_items_are_refused_before_anything_is_sent() {
    // Nothing listens on port 1: these fail without needing Redis.
    let l = RedisLimiter::new(&config("redis://127.0.0.1:1")).unwrap();
    let m = |key: &str, limit| item(key, Window::Minute, limit, 1);
    let cases = [
        vec![],
        vec![m("a", 1), m("a", 2)],
        vec![m("a", MAX_VALUE + 1)],
        vec![item("a", Window::Sliding { secs: 0 }, 1, 1)],
        vec![item(
            "a",
            Window::Period {
                start_s: 10,
                end_s: 5,
            },
            1,
            1,
        )],
    ];
    for items in cases {
        let e = l.reserve("c", &items).await.unwrap_err();
        assert!(matches!(e, RedisLimitError::Invalid(_)), "{items:?}: {e}");
    }
    let mut cfg = config("redis://127.0.0.1:1");
    cfg.namespace = "p{x}".to_owned();
    assert!(matches!(
        RedisLimiter::new(&cfg),
        Err(RedisLimitError::Namespace(_))
    ));
}

#[tokio::test]
async fn errors_never_show_the_password() {
    let url = "redis://app:hunter2-secret@127.0.0.1:1/0";
    let l = RedisLimiter::new(&config(url)).unwrap();
    let started = Instant::now();
    let e = l
        .reserve("c", &[item("rpm", Window::Minute, 1, 1)])
        .await
        .unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
    assert!(started.elapsed() < Duration::from_millis(400));
    for shown in [
        e.to_string(),
        format!("{e:?}"),
        format!("{l:?}"),
        format!("{:?}", config(url)),
    ] {
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
    }
    let bad = RedisLimiter::new(&config("redis://app:hunter2-secret@")).unwrap_err();
    assert!(!bad.to_string().contains("hunter2"), "{bad}");
}

/// A `redis-server` of the test's own, on a free port.
struct OwnRedis {
    port: u16,
    child: tokio::process::Child,
}

impl OwnRedis {
    fn start(port: u16) -> OwnRedis {
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (Debian package redis-server) must be installed");
        OwnRedis { port, child }
    }

    async fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        let status = tokio::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .await
            .unwrap();
        assert!(status.success());
    }

    async fn stop(mut self) {
        self.child.kill().await.unwrap();
    }
}

async fn until_ping_succeeds(l: &RedisLimiter) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = l.ping().await {
        assert!(Instant::now() < deadline, "Redis did not come back: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_outage_fails_within_the_deadline_and_the_same_limiter_recovers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let redis = OwnRedis::start(port);
    let l = RedisLimiter::new(&config(&format!("redis://127.0.0.1:{}", redis.port))).unwrap();
    until_ping_succeeds(&l).await;
    let want = [item("rpm", Window::Minute, 100, 1)];
    admitted(l.reserve("c", &want).await.unwrap());
    // The deadline plus scheduling slack on a loaded machine.
    let bound = l.timeout + Duration::from_millis(150);

    // Hung (SIGSTOP): the call times out.
    redis.signal("-STOP").await;
    let started = Instant::now();
    let e = l.reserve("c", &want).await.unwrap_err();
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    assert!(matches!(e, RedisLimitError::Timeout { .. }), "{e:?}");
    redis.signal("-CONT").await;
    until_ping_succeeds(&l).await;
    admitted(l.reserve("c", &want).await.unwrap());

    // Gone: the call fails fast, again and again.
    redis.stop().await;
    for _ in 0..3 {
        let started = Instant::now();
        let e = l.reserve("c", &want).await.unwrap_err();
        assert!(started.elapsed() < bound, "{:?}", started.elapsed());
        assert!(e.is_unavailable(), "{e:?}");
    }

    // Back (an empty server on the same port): the same limiter works again.
    let redis = OwnRedis::start(port);
    until_ping_succeeds(&l).await;
    let a = admitted(l.reserve("c", &want).await.unwrap());
    assert_eq!(a.items[0].remaining, 99);
    redis.stop().await;
}
