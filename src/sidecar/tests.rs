//! Unit tests of the environment → configuration mapping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;

use super::*;

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name: &str| map.get(name).cloned()
}

fn problems(pairs: &[(&str, &str)], opts: Options) -> Vec<(String, String)> {
    let env = env_of(pairs);
    from_env(&env, opts, Path::new("/nonexistent"))
        .unwrap_err()
        .problems
}

#[test]
fn nothing_set_names_the_missing_base_url() {
    let p = problems(&[], Options::default());
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "API_BASE_URL");
}

#[test]
fn every_problem_is_listed_under_its_variable() {
    let p = problems(
        &[
            ("HOST", "0.0.0.0"),
            ("PORT", "80800"),
            ("AZURE_CERTIFICATE_PATH", "/certs/gw.pem"),
            ("AZURE_CLIENT_SECRET", "s3cret"),
        ],
        Options::default(),
    );
    let vars: Vec<&str> = p.iter().map(|(v, _)| v.as_str()).collect();
    for want in [
        "API_BASE_URL",
        "HOST",
        "PORT",
        "AZURE_CLIENT_SECRET",
        "AZURE_CLIENT_ID",
        "AZURE_TENANT_ID",
    ] {
        assert!(vars.contains(&want), "{want} missing from {p:?}");
    }
    let host = &p.iter().find(|(v, _)| v == "HOST").unwrap().1;
    assert!(
        host.contains("PORTCULLIS_SIDECAR_ALLOW_NON_LOOPBACK"),
        "{host}"
    );
    // The secret's value is never quoted back.
    assert!(!format!("{p:?}").contains("s3cret"));
}

#[test]
fn non_loopback_needs_the_opt_in() {
    let base = [
        ("API_BASE_URL", "http://127.0.0.1:9"),
        ("HOST", "0.0.0.0"),
        ("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi"),
        ("IDENTITY_HEADER", "h"),
    ];
    assert!(problems(&base, Options::default())
        .iter()
        .any(|(v, _)| v == "HOST"));
    let env = env_of(&base);
    let v = from_env(
        &env,
        Options {
            allow_non_loopback: true,
        },
        Path::new("."),
    )
    .unwrap();
    assert!(v.listen.ip().is_unspecified());
    let mut with_var = base.to_vec();
    with_var.push(("PORTCULLIS_SIDECAR_ALLOW_NON_LOOPBACK", "true"));
    let env = env_of(&with_var);
    assert!(from_env(&env, Options::default(), Path::new(".")).is_ok());
}

#[test]
fn defaults_are_loopback_8080_and_the_cognitive_services_scope() {
    let env = env_of(&[
        ("API_BASE_URL", "https://contoso.openai.azure.com/"),
        ("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi"),
        ("IDENTITY_HEADER", "h"),
    ]);
    let v = from_env(&env, Options::default(), Path::new(".")).unwrap();
    assert_eq!(v.listen.to_string(), "127.0.0.1:8080");
    assert!(v.config.passthrough);
    assert_eq!(
        v.config.backends[0].url.as_str(),
        "https://contoso.openai.azure.com"
    );
    match &v.backend_auth[0] {
        crate::config::ResolvedAuth::Token(t) => {
            assert_eq!(t.kind, "managed_identity");
            assert_eq!(t.scope, DEFAULT_SCOPE);
        }
        other => panic!("{other:?}"),
    }
    assert!(!v.config.store.record_usage, "nothing written to disk");
    assert!(v.admin_listen.is_none());
}

#[test]
fn the_body_limit_is_64_mib_unless_set() {
    let base = [
        ("API_BASE_URL", "https://contoso.openai.azure.com/"),
        ("IDENTITY_ENDPOINT", "http://127.0.0.1:9/msi"),
        ("IDENTITY_HEADER", "h"),
    ];
    let limit = |extra: &[(&str, &str)]| {
        let env = env_of(&[&base[..], extra].concat());
        from_env(&env, Options::default(), Path::new(".")).map(|v| v.config.server.max_body_bytes)
    };
    assert_eq!(limit(&[]).unwrap(), 64 * 1024 * 1024);
    let big = [("PORTCULLIS_MAX_BODY_BYTES", "536870912")];
    assert_eq!(limit(&big).unwrap(), 512 * 1024 * 1024);
    for bad in ["0", "-1", "64MiB", "4294967297"] {
        let p = limit(&[("PORTCULLIS_MAX_BODY_BYTES", bad)])
            .unwrap_err()
            .problems;
        assert_eq!(p.len(), 1, "{bad}: {p:?}");
        assert_eq!(p[0].0, "PORTCULLIS_MAX_BODY_BYTES");
        assert!(p[0].1.contains(bad), "{p:?}");
    }
}

#[test]
fn workload_identity_and_a_certificate_contradict() {
    let p = problems(
        &[
            ("API_BASE_URL", "https://contoso.openai.azure.com"),
            ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/secrets/token"),
            ("AZURE_CERTIFICATE_PATH", "/certs/gw.pem"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_TENANT_ID", "t"),
        ],
        Options::default(),
    );
    assert!(
        p.iter().any(|(v, _)| v == "AZURE_FEDERATED_TOKEN_FILE"),
        "{p:?}"
    );
}

#[test]
fn an_unreadable_certificate_is_reported_under_its_variable() {
    let p = problems(
        &[
            ("API_BASE_URL", "https://contoso.openai.azure.com"),
            ("AZURE_CERTIFICATE_PATH", "/nonexistent/gw.pem"),
            ("AZURE_CLIENT_ID", "c"),
            ("AZURE_TENANT_ID", "t"),
        ],
        Options::default(),
    );
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].0, "AZURE_CERTIFICATE_PATH");
}

#[test]
fn a_dollar_in_a_value_is_not_a_reference() {
    let env = env_of(&[
        ("API_BASE_URL", "https://contoso.openai.azure.com"),
        ("AZURE_CLIENT_SECRET", "pa$${HOME}ss"),
        ("AZURE_CLIENT_ID", "c"),
        ("AZURE_TENANT_ID", "t"),
    ]);
    let v = from_env(&env, Options::default(), Path::new(".")).unwrap();
    match &v.backend_auth[0] {
        crate::config::ResolvedAuth::Token(t) => match &t.source {
            crate::config::SourceSpec::ClientSecret { secret, .. } => {
                assert_eq!(secret.expose(), "pa$${HOME}ss")
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
}
