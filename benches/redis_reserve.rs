//! The round trip of one Redis `reserve` with 3 items (requests and tokens per minute, a
//! monthly quota), as a gateway replica makes it per request: one EVALSHA to the Redis at
//! `PORTCULLIS_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`). Skipped with a message
//! when Redis is not reachable. Run with `cargo bench --bench redis_reserve`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::admit::redis::{
    Adjust, Item, RedisLimiter, RedisLimiterConfig, Reservation, Window, MAX_VALUE,
};

fn reserve(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = std::env::var("PORTCULLIS_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let mut config = RedisLimiterConfig::new(&url);
    config.namespace = format!("pclbench-{}", uuid::Uuid::new_v4().simple());
    let limiter = rt.block_on(async {
        let l = RedisLimiter::new(&config)?;
        l.ping().await.map(|_| l)
    });
    let limiter = match limiter {
        Ok(l) => l,
        Err(e) => {
            eprintln!("redis_reserve: skipped, Redis is not reachable ({e})");
            return;
        }
    };
    // Limits no run reaches, so every reserve is admitted and charges all three counters.
    let items = [
        Item {
            key: "rpm".to_owned(),
            window: Window::Minute,
            limit: MAX_VALUE,
            amount: 1,
        },
        Item {
            key: "tpm".to_owned(),
            window: Window::Minute,
            limit: MAX_VALUE,
            amount: 1200,
        },
        Item {
            key: "q:1764547200".to_owned(),
            window: Window::Period {
                start_s: 1_764_547_200,
                end_s: 4_102_444_800,
            },
            limit: MAX_VALUE,
            amount: 1200,
        },
    ];
    c.bench_function("redis_reserve_3_items", |b| {
        b.iter(|| {
            rt.block_on(limiter.reserve("bench-client", &items))
                .unwrap()
        })
    });
    // A reconciliation of the last reservation: one more token on each token counter.
    let charged = rt
        .block_on(limiter.reserve("bench-client", &items))
        .unwrap();
    let bucket_s = match charged {
        Reservation::Admitted(a) => a.bucket_s,
        Reservation::Refused(r) => panic!("refused: {r:?}"),
    };
    let adjust: Vec<Adjust> = items[1..]
        .iter()
        .map(|i| Adjust {
            key: i.key.clone(),
            window: i.window,
            bucket_s,
            delta: 1,
        })
        .collect();
    c.bench_function("redis_adjust_2_items", |b| {
        b.iter(|| {
            rt.block_on(limiter.adjust("bench-client", &adjust))
                .unwrap()
        })
    });
    // The quota counter would otherwise stay until its period ends.
    let keys: Vec<String> = items
        .iter()
        .map(|i| limiter.counter_key("bench-client", &i.key))
        .collect();
    let cleanup = async {
        let mut conn = redis::Client::open(url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        redis::cmd("DEL")
            .arg(keys)
            .query_async::<()>(&mut conn)
            .await
    };
    if let Err(e) = rt.block_on(cleanup) {
        eprintln!("redis_reserve: could not delete the bench's keys: {e}");
    }
}

criterion_group!(benches, reserve);
criterion_main!(benches);
