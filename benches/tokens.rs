//! Token estimates on the request path (criterion): a chat prompt of ~1k and ~32k tokens,
//! and 1 MiB pathological inputs (random letters with no whitespace, random letters in short
//! words, one repeated character, random Unicode), whose work the cap in `portcullis::tokens`
//! bounds.
//! Run with `cargo bench --bench tokens`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use portcullis::route::Operation;
use portcullis::tokens::{self, Encoding, EstimateOptions, ReserveOutput};

const OPTS: EstimateOptions = EstimateOptions {
    default_max_tokens: 4096,
    reserve_output: ReserveOutput::MaxTokens,
    default_image_tokens: 765,
};

/// Prose-like text from a fixed vocabulary, grown until it has at least `tokens` tokens.
fn prose(tokens: u64) -> String {
    const WORDS: [&str; 24] = [
        "the",
        "gateway",
        "forwards",
        "each",
        "request",
        "to",
        "a",
        "backend",
        "that",
        "answers",
        "with",
        "tokens,",
        "and",
        "counts",
        "usage",
        "per",
        "client.",
        "Limits",
        "are",
        "checked",
        "before",
        "streaming",
        "begins;",
        "quotas",
    ];
    let mut rng = fastrand::Rng::with_seed(1);
    let mut text = String::new();
    while tokens::count(Encoding::O200k, &text) < tokens {
        for _ in 0..64 {
            text.push_str(WORDS[rng.usize(..WORDS.len())]);
            text.push(if rng.u8(..16) == 0 { '\n' } else { ' ' });
        }
    }
    text
}

fn chat_body(content: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content},
        ],
        "max_tokens": 512,
    }))
    .unwrap()
}

fn bench(c: &mut Criterion) {
    tokens::warm_up();
    let mut g = c.benchmark_group("estimate_chat");
    for target in [1_000u64, 32_000] {
        let body = chat_body(&prose(target));
        let e = tokens::estimate(Operation::Chat, "gpt-4o", &body, None, &OPTS);
        eprintln!(
            "chat prompt ~{target}: {} bytes, {} prompt tokens",
            body.len(),
            e.prompt
        );
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(target), &body, |b, body| {
            b.iter(|| tokens::estimate(Operation::Chat, "gpt-4o", body, None, &OPTS))
        });
    }
    g.finish();

    let mut rng = fastrand::Rng::with_seed(2);
    let letters: String = (0..1 << 20).map(|_| rng.lowercase()).collect();
    let mut unicode = String::new();
    while unicode.len() < 1 << 20 {
        if let Some(ch) = char::from_u32(rng.u32(0x20..0x3_0000)) {
            unicode.push(ch);
        }
    }
    let mut letter_words = String::new();
    while letter_words.len() < 1 << 20 {
        for _ in 0..rng.usize(1..16) {
            letter_words.push(rng.lowercase());
        }
        letter_words.push(' ');
    }
    let repeated = "a".repeat(1 << 20);
    let mut g = c.benchmark_group("pathological_1mib");
    g.sample_size(10);
    let body = chat_body(&letters);
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("estimate_chat_letters", |b| {
        b.iter(|| tokens::estimate(Operation::Chat, "gpt-4o", &body, None, &OPTS))
    });
    for (name, text) in [
        ("count_letters", &letters),
        ("count_letter_words", &letter_words),
        ("count_repeated", &repeated),
        ("count_unicode", &unicode),
    ] {
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_function(name, |b| b.iter(|| tokens::count(Encoding::O200k, text)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
