//! Validation of the identity half of the configuration: `[store]`, `[auth]`,
//! `[[issuers]]` and `[[clients]]`.
//!
//! Deny by default shows here: an issuer must name its audiences, a client must name what
//! it may call, and an identity that could be two clients is refused before it can be
//! ambiguous at run time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use super::model::{ClaimMatch, ClientConfig, Config, IssuerConfig};
use crate::route::Operation;

use super::{problem, resolve_secret, Problem, Secret, Text};

/// Algorithms an issuer may allow.
pub const ASYMMETRIC_ALGS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];
/// Symmetric algorithms, allowed only with `hmac_secret`.
pub const HMAC_ALGS: &[&str] = &["HS256", "HS384", "HS512"];
/// Shortest accepted `store.key_hmac_secret`.
const MIN_HMAC_SECRET: usize = 32;

/// Secrets resolved from the identity sections.
pub struct IdentitySecrets {
    pub key_hmac_secret: Option<Secret>,
    /// Index-aligned with `config.issuers`.
    pub issuer_secrets: Vec<Option<Secret>>,
}

pub fn validate(config: &Config, base_dir: &Path, problems: &mut Vec<Problem>) -> IdentitySecrets {
    let store = &config.store;
    let url = store.url.as_str();
    if !(url.starts_with("sqlite:")
        || url.starts_with("postgres://")
        || url.starts_with("postgresql://"))
    {
        problem(
            problems,
            "store.url",
            format!(
                "'{}' is not a sqlite:// or postgres:// URL",
                crate::store::error::redact_url(url)
            ),
        );
    }
    let key_hmac_secret = resolve_secret(
        &store.key_hmac_secret,
        &store.key_hmac_secret_file,
        "store",
        "key_hmac_secret",
        false,
        base_dir,
        problems,
    );
    if key_hmac_secret
        .as_ref()
        .is_some_and(|s| s.expose().len() < MIN_HMAC_SECRET)
    {
        problem(
            problems,
            "store.key_hmac_secret",
            format!("must be at least {MIN_HMAC_SECRET} bytes (e.g. `openssl rand -hex 32`)"),
        );
    }
    for (name, d) in [
        ("refresh_interval", store.refresh_interval),
        ("last_used_flush", store.last_used_flush),
    ] {
        super::check_duration(d, &format!("store.{name}"), problems);
    }

    let auth = &config.auth;
    if let Some(r) = &auth.resource {
        check_url(r.as_str(), "auth.resource", problems);
    }
    if !(512..=1024 * 1024).contains(&auth.max_token_bytes) {
        problem(
            problems,
            "auth.max_token_bytes",
            "must be between 512 and 1048576",
        );
    }
    if auth.token_cache_size > 10_000_000 {
        problem(
            problems,
            "auth.token_cache_size",
            "must be at most 10000000",
        );
    }

    let mut issuer_secrets = Vec::with_capacity(config.issuers.len());
    let mut names = HashSet::new();
    for (i, iss) in config.issuers.iter().enumerate() {
        let path = format!("issuers[{i}]");
        if !valid_id(iss.name.as_str()) {
            problem(
                problems,
                format!("{path}.name"),
                "must be 1-64 letters, digits, '-', '_' or '.'",
            );
        } else if !names.insert(iss.name.as_str()) {
            problem(
                problems,
                format!("{path}.name"),
                format!("issuer name '{}' is used twice", iss.name),
            );
        }
        issuer_secrets.push(validate_issuer(iss, &path, base_dir, problems));
    }

    overlapping_issuers(&config.issuers, problems);
    validate_clients(config, &names, problems);
    IdentitySecrets {
        key_hmac_secret,
        issuer_secrets,
    }
}

fn validate_issuer(
    iss: &IssuerConfig,
    path: &str,
    base_dir: &Path,
    problems: &mut Vec<Problem>,
) -> Option<Secret> {
    let templated = iss.issuer.as_str().contains("{tenantid}");
    check_url(
        &iss.issuer.as_str().replace("{tenantid}", "t"),
        &format!("{path}.issuer"),
        problems,
    );
    match &iss.jwks_uri {
        Some(u) => check_url(u.as_str(), &format!("{path}.jwks_uri"), problems),
        None if templated => problem(
            problems,
            format!("{path}.jwks_uri"),
            "is required when the issuer contains {tenantid} (e.g. https://login.microsoftonline.com/common/discovery/v2.0/keys)",
        ),
        None => {}
    }
    if templated && iss.allowed_tenants.is_empty() {
        problem(
            problems,
            format!("{path}.allowed_tenants"),
            "list the tenants accepted for an issuer with {tenantid}",
        );
    }
    if !templated && !iss.allowed_tenants.is_empty() {
        problem(
            problems,
            format!("{path}.allowed_tenants"),
            "only applies when the issuer contains {tenantid}",
        );
    }
    if iss.audiences.is_empty() || iss.audiences.iter().any(|a| a.as_str().is_empty()) {
        problem(
            problems,
            format!("{path}.audiences"),
            "list the audiences this gateway accepts (tokens for other APIs must not pass)",
        );
    }
    let secret = resolve_secret(
        &iss.hmac_secret,
        &iss.hmac_secret_file,
        path,
        "hmac_secret",
        false,
        base_dir,
        problems,
    );
    if iss.algorithms.is_empty() {
        problem(problems, format!("{path}.algorithms"), "must not be empty");
    }
    for alg in &iss.algorithms {
        let a = alg.as_str();
        if a.eq_ignore_ascii_case("none") {
            problem(
                problems,
                format!("{path}.algorithms"),
                "\"none\" is never accepted: unsigned tokens prove nothing",
            );
        } else if HMAC_ALGS.contains(&a) {
            if secret.is_none() {
                problem(
                    problems,
                    format!("{path}.algorithms"),
                    format!("{a} needs `hmac_secret` (the shared key); asymmetric keys can never verify it"),
                );
            }
        } else if !ASYMMETRIC_ALGS.contains(&a) {
            problem(
                problems,
                format!("{path}.algorithms"),
                format!(
                    "unknown algorithm '{}'; use {}",
                    a.escape_default(),
                    ASYMMETRIC_ALGS.join(", ")
                ),
            );
        }
    }
    if secret.as_ref().is_some_and(|s| s.expose().len() < 32) {
        problem(
            problems,
            format!("{path}.hmac_secret"),
            "must be at least 32 bytes",
        );
    }
    super::check_duration(iss.leeway, &format!("{path}.leeway"), problems);
    if iss.leeway.0 > std::time::Duration::from_secs(300) {
        problem(problems, format!("{path}.leeway"), "must be at most 5m");
    }
    super::check_duration(
        iss.refresh_interval,
        &format!("{path}.refresh_interval"),
        problems,
    );
    secret
}

/// Two issuers that claim the same `iss` (equal, or one exact value a tenant template
/// matches): only the first would ever be used, silently.
fn overlapping_issuers(issuers: &[IssuerConfig], problems: &mut Vec<Problem>) {
    for (i, a) in issuers.iter().enumerate() {
        for b in &issuers[..i] {
            let (x, y) = (a.issuer.as_str(), b.issuer.as_str());
            let covers = |template: &str, exact: &str| {
                template.split_once("{tenantid}").is_some_and(|(pre, suf)| {
                    exact.len() > pre.len() + suf.len()
                        && exact.starts_with(pre)
                        && exact.ends_with(suf)
                })
            };
            if x == y || covers(x, y) || covers(y, x) {
                problem(
                    problems,
                    format!("issuers[{i}].issuer"),
                    format!(
                        "issuer '{}' also claims tokens of issuer '{}': give each `iss` one [[issuers]] entry",
                        a.name, b.name
                    ),
                );
            }
        }
    }
}

fn validate_clients(config: &Config, issuers: &HashSet<&str>, problems: &mut Vec<Problem>) {
    let mut ids = HashSet::new();
    let mut anonymous: Option<&str> = None;
    for (i, c) in config.clients.iter().enumerate() {
        let path = format!("clients[{i}]");
        if !valid_id(c.id.as_str()) {
            problem(
                problems,
                format!("{path}.id"),
                "must be 1-64 letters, digits, '-', '_' or '.'",
            );
        } else if !ids.insert(c.id.as_str()) {
            problem(
                problems,
                format!("{path}.id"),
                format!("client id '{}' is used twice", c.id),
            );
        }
        if c.anonymous {
            if let Some(other) = anonymous {
                problem(
                    problems,
                    format!("{path}.anonymous"),
                    format!("client '{other}' is already the anonymous client"),
                );
            }
            anonymous = Some(c.id.as_str());
            if !c.jwt.is_empty() {
                problem(
                    problems,
                    format!("{path}.jwt"),
                    "an anonymous client cannot also have JWT identities",
                );
            }
        }
        for (j, b) in c.jwt.iter().enumerate() {
            let multi_tenant = config.issuers.iter().any(|i| {
                i.name.as_str() == b.issuer.as_str()
                    && i.issuer.as_str().contains("{tenantid}")
                    && i.allowed_tenants.len() > 1
            });
            if multi_tenant && !b.claims.contains_key("tid") {
                problem(
                    problems,
                    format!("{path}.jwt[{j}].claims"),
                    format!(
                        "issuer '{}' accepts several tenants: bind `tid` too, or an admin of any of them could become this client",
                        b.issuer
                    ),
                );
            }
            if !issuers.contains(b.issuer.as_str()) {
                problem(
                    problems,
                    format!("{path}.jwt[{j}].issuer"),
                    format!("no [[issuers]] entry is named '{}'", b.issuer),
                );
            }
            for (claim, m) in &b.claims {
                let empty = match m {
                    ClaimMatch::One(v) => v.as_str().is_empty(),
                    ClaimMatch::All(v) => v.is_empty() || v.iter().any(|x| x.as_str().is_empty()),
                };
                if empty || claim.is_empty() {
                    problem(
                        problems,
                        format!("{path}.jwt[{j}].claims"),
                        format!("claim '{claim}' needs a non-empty value"),
                    );
                }
            }
        }
        if c.deployments.is_empty() {
            problem(
                problems,
                format!("{path}.deployments"),
                "list the deployments this client may call (globs allowed); nothing is allowed by default",
            );
        }
        for d in c
            .deployments
            .iter()
            .map(Text::as_str)
            .chain(c.deployment_scopes.keys().map(String::as_str))
        {
            if !valid_glob(d) {
                problem(
                    problems,
                    format!("{path}.deployments"),
                    format!("invalid deployment pattern '{}'", d.escape_default()),
                );
            }
        }
        if c.operations.is_empty() {
            problem(
                problems,
                format!("{path}.operations"),
                format!(
                    "list the operations this client may call: {} or \"*\"",
                    operation_names()
                ),
            );
        }
        for op in &c.operations {
            if op.as_str() != "*" && Operation::from_name(op.as_str()).is_none() {
                problem(
                    problems,
                    format!("{path}.operations"),
                    format!(
                        "unknown operation '{}'; use {} or \"*\"",
                        op.as_str().escape_default(),
                        operation_names()
                    ),
                );
            }
        }
        for (d, scopes) in &c.deployment_scopes {
            if scopes.is_empty() || scopes.iter().any(|s| s.as_str().is_empty()) {
                problem(
                    problems,
                    format!("{path}.deployment_scopes"),
                    format!("'{d}' needs at least one non-empty scope or role"),
                );
            }
        }
    }
    ambiguous_bindings(&config.clients, problems);
}

/// Two bindings on the same issuer where one's claims include all of the other's: every
/// token matching the narrower one matches both clients.
/// Bindings seen so far on one issuer: client index, client id, claims.
type Seen<'a> = Vec<(usize, &'a str, &'a BTreeMap<String, ClaimMatch>)>;

fn ambiguous_bindings(clients: &[ClientConfig], problems: &mut Vec<Problem>) {
    let mut seen: HashMap<&str, Seen<'_>> = HashMap::new();
    for (i, c) in clients.iter().enumerate() {
        for b in &c.jwt {
            let list = seen.entry(b.issuer.as_str()).or_default();
            for (other_i, other_id, other) in list.iter() {
                if *other_i == i {
                    continue;
                }
                if implied(other, &b.claims) || implied(&b.claims, other) {
                    problem(
                        problems,
                        format!("clients[{i}].jwt"),
                        format!(
                            "a token from issuer '{}' could be both client '{other_id}' and client '{}': make the claims distinguish them",
                            b.issuer, c.id
                        ),
                    );
                }
            }
            list.push((i, c.id.as_str(), &b.claims));
        }
    }
}

/// Whether every token matching `narrow` also matches `wide`.
fn implied(wide: &BTreeMap<String, ClaimMatch>, narrow: &BTreeMap<String, ClaimMatch>) -> bool {
    wide.iter().all(|(k, w)| {
        let Some(n) = narrow.get(k) else { return false };
        let values = |m: &ClaimMatch| -> Vec<String> {
            match m {
                ClaimMatch::One(v) => vec![v.0.clone()],
                ClaimMatch::All(v) => v.iter().map(|x| x.0.clone()).collect(),
            }
        };
        let nv = values(n);
        values(w).iter().all(|x| nv.contains(x))
    })
}

/// The operation names a client may be granted, for messages.
fn operation_names() -> String {
    Operation::ALL.map(Operation::as_str).join(", ")
}

/// Client ids, issuer names: short, printable, safe in logs and metric labels.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// A deployment pattern: a deployment name with `*` and `?` wildcards.
fn valid_glob(s: &str) -> bool {
    !s.is_empty() && crate::route::valid_name(&s.replace(['*', '?'], "x"))
}

/// Issuer and metadata URLs: https, or http on loopback (local IdPs and tests).
pub fn check_url(url: &str, path: &str, problems: &mut Vec<Problem>) {
    match url.parse::<http::Uri>() {
        Ok(u) if u.authority().is_some() => {
            let host = u.host().unwrap_or("");
            match u.scheme_str() {
                Some("https") => {}
                Some("http") if super::is_loopback_host(host) => {}
                Some("http") => problem(
                    problems,
                    path,
                    format!("'{url}' must use https (http is only accepted on loopback)"),
                ),
                _ => problem(problems, path, format!("'{url}' is not an https:// URL")),
            }
        }
        _ => problem(
            problems,
            path,
            format!("'{url}' is not an https:// URL with a host"),
        ),
    }
}
