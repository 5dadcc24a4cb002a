//! The in-memory limit check a request makes when its client has limits: one reservation of
//! three items (requests and tokens per minute, a monthly quota) and its reconciliation, on
//! one client (the lock it takes is that client's own) and spread over 1,000 subjects of one
//! client (per-subject counters). Run with `cargo bench --bench limits`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::admit::counters::{Adjust, Item, MemoryCounters, Outcome, Window};

const HUGE: u64 = 1 << 50;

fn items(prefix: &str) -> Vec<Item> {
    let minute = Window::Sliding { secs: 60 };
    let month = Window::Period {
        start_s: 1_796_083_200,
        end_s: 1_798_761_600,
    };
    vec![
        Item {
            key: format!("{prefix}rpm"),
            window: minute,
            limit: HUGE,
            amount: 1,
        },
        Item {
            key: format!("{prefix}tpm"),
            window: minute,
            limit: HUGE,
            amount: 1_200,
        },
        Item {
            key: format!("{prefix}q:1796083200"),
            window: month,
            limit: HUGE,
            amount: 1_200,
        },
    ]
}

fn memory(c: &mut Criterion) {
    let m = MemoryCounters::new();
    let one = items("");
    c.bench_function("memory_reserve_3_items", |b| {
        b.iter(|| match m.reserve("bench", &one) {
            Outcome::Admitted(a) => a.bucket_s,
            Outcome::Refused { .. } => panic!("refused"),
        })
    });
    let adjust: Vec<Adjust> = one
        .iter()
        .skip(1)
        .map(|i| Adjust {
            key: i.key.clone(),
            window: i.window,
            bucket_s: portcullis::admit::counters::now_ms() / 1000,
            delta: -1_100,
        })
        .collect();
    c.bench_function("memory_reserve_and_settle_3_items", |b| {
        b.iter(|| {
            m.reserve("bench", &one);
            m.adjust("bench", &adjust);
        })
    });
    let subjects: Vec<Vec<Item>> = (0..1000).map(|i| items(&format!("s:user-{i}:"))).collect();
    let mut i = 0;
    c.bench_function("memory_reserve_3_items_1000_subjects", |b| {
        b.iter(|| {
            i = (i + 1) % subjects.len();
            m.reserve("bench-subjects", &subjects[i])
        })
    });
}

criterion_group!(benches, memory);
criterion_main!(benches);
