//! Micro-benchmarks of identification on the request path (criterion):
//! a JWT found in the verified-token cache, an API key check, and full RS256 / ES256
//! verification on a cache miss. Run with `cargo bench --bench identify`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::header::{HeaderMap, AUTHORIZATION};
use portcullis::identify::{api_key::ApiKeys, api_key::KeyAdmin, Identifier, KeyCheck};
use portcullis::metrics::Metrics;
use portcullis::sim::issuer::{DemoIssuer, SigningAlg};

fn config(issuer: &str, cache: usize) -> portcullis::config::Validated {
    let text = format!(
        r#"
[auth]
token_cache_size = {cache}
[store]
url = "sqlite::memory:"
key_hmac_secret = "bench-store-secret-0123456789abcdef0123456789"
[[issuers]]
name = "bench"
issuer = "{issuer}"
audiences = ["api://bench"]
algorithms = ["RS256", "ES256"]
[[clients]]
id = "bench"
jwt = [{{ issuer = "bench", claims = {{ azp = "bench-app" }} }}]
deployments = ["*"]
operations = ["*"]
[[backends]]
name = "b"
url = "http://127.0.0.1:9"
deployments = {{ "gpt-4o" = "gpt-4o" }}
"#
    );
    portcullis::config::load_str(&text, "bench", std::path::Path::new(".")).unwrap()
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    h
}

fn identify(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let issuer = rt.block_on(DemoIssuer::start()).unwrap();
    let sign = |alg| {
        issuer
            .sign_with(
                alg,
                "api://bench",
                Duration::from_secs(3600),
                serde_json::json!({ "azp": "bench-app", "sub": "u" }),
            )
            .unwrap()
    };
    let metrics = Arc::new(Metrics::new());

    // Warm cache: the token was verified once; every later request is a cache hit.
    let v = config(&issuer.issuer(), 10_000);
    let cached = rt.block_on(async {
        let id = Identifier::build(&v, None, metrics.clone());
        id.wait_keys(Duration::from_secs(5)).await;
        id
    });
    let warm = bearer(&sign(SigningAlg::Rs256));
    assert!(rt.block_on(cached.identify(&warm, None)).is_ok());
    c.bench_function("jwt: verified-token cache hit", |b| {
        b.iter(|| rt.block_on(cached.identify(&warm, None)).is_ok())
    });

    // Cache disabled: every call verifies the signature and claims.
    let v0 = config(&issuer.issuer(), 0);
    let uncached = rt.block_on(async {
        let id = Identifier::build(&v0, None, metrics.clone());
        id.wait_keys(Duration::from_secs(5)).await;
        id
    });
    for (name, alg) in [
        (
            "jwt: full RS256 verification (cache miss)",
            SigningAlg::Rs256,
        ),
        (
            "jwt: full ES256 verification (cache miss)",
            SigningAlg::Es256,
        ),
    ] {
        let h = bearer(&sign(alg));
        assert!(rt.block_on(uncached.identify(&h, None)).is_ok());
        c.bench_function(name, |b| {
            b.iter(|| rt.block_on(uncached.identify(&h, None)).is_ok())
        });
    }

    // API key: parse, table lookup, constant-time HMAC-SHA256 check.
    let secret = v.key_hmac_secret.clone().unwrap();
    let (keys, key) = rt.block_on(async {
        let store = portcullis::store::open("sqlite::memory:", std::path::Path::new("."))
            .await
            .unwrap();
        let (_, key) = KeyAdmin::new(store.clone(), &secret)
            .create("bench", None, None)
            .await
            .unwrap();
        let keys = ApiKeys::start(
            store,
            &secret,
            Duration::from_secs(60),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
        (keys, key.expose().to_owned())
    });
    assert!(keys.verify(&key).is_ok());
    c.bench_function("api key: verify", |b| b.iter(|| keys.verify(&key).is_ok()));
    let with_keys = rt.block_on(async {
        Identifier::build(&v, Some(keys.clone() as Arc<dyn KeyCheck>), metrics.clone())
    });
    let h = bearer(&key);
    assert!(rt.block_on(with_keys.identify(&h, None)).is_ok());
    c.bench_function("api key: identify (header to caller)", |b| {
        b.iter(|| rt.block_on(with_keys.identify(&h, None)).is_ok())
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = identify
}
criterion_main!(benches);
