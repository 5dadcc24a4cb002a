//! `[backends.auth]`: checking and resolving how the gateway authenticates to a backend.
//!
//! Resolution turns each section into a [`ResolvedAuth`]: a static key, or a
//! [`TokenSpec`] saying where tokens come from (token URL, client id, proof, scope). Values
//! the section leaves out come from the environment Azure sets (`IDENTITY_ENDPOINT`,
//! `AZURE_CLIENT_ID`, ...), read through a lookup function so tests can supply their own.
//! Certificates are loaded and checked here, so `portcullis check` reports a bad PEM, a
//! key that does not match its certificate or an unsupported algorithm with its key path.

use std::path::{Path, PathBuf};

use super::model::BackendAuthConfig;
use super::values::{Secret, Text};
use super::{is_loopback_host, problem, resolve_secret, Problem};
use crate::upstream_auth::assertion::{CertificateFile, RsaAlg};

/// Entra ID's public cloud.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// Azure OpenAI's resource, in the v2 scope form.
pub const DEFAULT_SCOPE: &str = "https://cognitiveservices.azure.com/.default";
/// Where IMDS answers on every Azure VM.
pub const IMDS_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// A backend's credential, resolved.
#[derive(Debug, Clone)]
pub enum ResolvedAuth {
    None,
    ApiKey(Secret),
    Token(TokenSpec),
}

/// Where a backend's bearer tokens come from.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// The configured `type` (`entra_certificate`, ...).
    pub kind: &'static str,
    /// Who the gateway is at the IdP, for logs, metrics and audit: a client id, or
    /// `system`/the selector of a managed identity. Never a secret.
    pub identity: String,
    pub scope: String,
    pub source: SourceSpec,
}

/// The protocol and proof of a [`TokenSpec`].
#[derive(Debug, Clone)]
pub enum SourceSpec {
    ClientSecret {
        token_url: String,
        client_id: String,
        secret: Secret,
        basic: bool,
    },
    Certificate {
        token_url: String,
        client_id: String,
        certificate_file: PathBuf,
        key_file: Option<PathBuf>,
        rsa: RsaAlg,
        send_x5c: bool,
    },
    Federated {
        token_url: String,
        client_id: String,
        token_file: PathBuf,
    },
    Imds {
        endpoint: String,
        selector: Option<(&'static str, String)>,
    },
    AppService {
        endpoint: String,
        header: Secret,
        selector: Option<(&'static str, String)>,
    },
}

impl TokenSpec {
    /// Whether token requests must bypass any configured HTTP proxy: managed-identity
    /// endpoints and token URLs on this machine.
    pub fn must_not_be_proxied(&self) -> bool {
        match &self.source {
            SourceSpec::Imds { .. } | SourceSpec::AppService { .. } => true,
            SourceSpec::ClientSecret { token_url, .. }
            | SourceSpec::Certificate { token_url, .. }
            | SourceSpec::Federated { token_url, .. } => token_url
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_owned))
                .is_some_and(|h| is_loopback_host(&h)),
        }
    }

    /// Backends whose specs have equal keys share one token cache (and one refresher).
    pub fn cache_key(&self) -> String {
        let src = match &self.source {
            SourceSpec::ClientSecret {
                token_url,
                client_id,
                secret,
                basic,
            } => format!(
                "secret|{token_url}|{client_id}|{basic}|{:x?}",
                crate::digest::sha256(secret.expose().as_bytes())
            ),
            SourceSpec::Certificate {
                token_url,
                client_id,
                certificate_file,
                key_file,
                rsa,
                send_x5c,
            } => format!(
                "cert|{token_url}|{client_id}|{}|{key_file:?}|{rsa:?}|{send_x5c}",
                certificate_file.display()
            ),
            SourceSpec::Federated {
                token_url,
                client_id,
                token_file,
            } => format!("federated|{token_url}|{client_id}|{}", token_file.display()),
            SourceSpec::Imds { endpoint, selector } => format!("imds|{endpoint}|{selector:?}"),
            SourceSpec::AppService {
                endpoint, selector, ..
            } => format!("appservice|{endpoint}|{selector:?}"),
        };
        format!("{src}|{}", self.scope)
    }
}

/// Reads one environment variable.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Check `auth` (at key path `path`) and resolve it.
pub fn resolve(
    auth: &BackendAuthConfig,
    path: &str,
    base_dir: &Path,
    env: EnvLookup<'_>,
    problems: &mut Vec<Problem>,
) -> Option<ResolvedAuth> {
    let before = problems.len();
    let resolved = match auth {
        BackendAuthConfig::None => Some(ResolvedAuth::None),
        BackendAuthConfig::ApiKey { key, key_file } => {
            let s = resolve_secret(key, key_file, path, "key", true, base_dir, problems)?;
            // It is sent as a header value: refuse what cannot be one (a two-line key file).
            if !s.expose().bytes().all(|c| c.is_ascii_graphic()) {
                problem(
                    problems,
                    path,
                    "the key may only contain printable ASCII without spaces",
                );
            }
            Some(ResolvedAuth::ApiKey(s))
        }
        BackendAuthConfig::EntraSecret {
            tenant_id,
            client_id,
            client_secret,
            client_secret_file,
            token_endpoint_auth_method,
            authority,
            token_url,
            scope,
        } => {
            let url = token_url_of(path, tenant_id, authority, token_url, problems);
            let client_id = required_id(client_id, path, "client_id", problems);
            let secret = resolve_secret(
                client_secret,
                client_secret_file,
                path,
                "client_secret",
                true,
                base_dir,
                problems,
            );
            let basic = match token_endpoint_auth_method.as_ref().map(Text::as_str) {
                None | Some("client_secret_post") => false,
                Some("client_secret_basic") => true,
                Some(other) => {
                    problem(
                        problems,
                        format!("{path}.token_endpoint_auth_method"),
                        format!("'{other}' is not one of client_secret_post, client_secret_basic"),
                    );
                    false
                }
            };
            let scope = scope_of(scope, path, problems);
            let (token_url, client_id, secret) = (url?, client_id?, secret?);
            Some(ResolvedAuth::Token(TokenSpec {
                kind: "entra_secret",
                identity: client_id.clone(),
                scope,
                source: SourceSpec::ClientSecret {
                    token_url,
                    client_id,
                    secret,
                    basic,
                },
            }))
        }
        BackendAuthConfig::EntraCertificate {
            tenant_id,
            client_id,
            certificate_file,
            key_file,
            algorithm,
            send_x5c,
            authority,
            token_url,
            scope,
        } => {
            let url = token_url_of(path, tenant_id, authority, token_url, problems);
            let client_id = required_id(client_id, path, "client_id", problems);
            let scope = scope_of(scope, path, problems);
            let rsa = match algorithm.as_ref().map(Text::as_str) {
                None => Some(RsaAlg::default()),
                Some(a) if RsaAlg::parse(a).is_some() => RsaAlg::parse(a),
                Some("ES256" | "ES384") => Some(RsaAlg::default()),
                Some(other) => {
                    problem(
                        problems,
                        format!("{path}.algorithm"),
                        format!("'{other}' is not one of PS256, RS256 (RSA keys) or ES256, ES384 (EC keys, chosen by curve)"),
                    );
                    None
                }
            };
            let cert_path = base_dir.join(certificate_file.as_str());
            let key_path = key_file.as_ref().map(|k| base_dir.join(k.as_str()));
            if let Some(rsa) = rsa {
                match CertificateFile::check(&cert_path, key_path.as_deref(), rsa) {
                    Ok(cert) => {
                        if let Some(a) = algorithm.as_ref().map(Text::as_str) {
                            if a != cert.alg() {
                                problem(
                                    problems,
                                    format!("{path}.algorithm"),
                                    format!(
                                        "'{a}' does not fit the key, which signs {}",
                                        cert.alg()
                                    ),
                                );
                            }
                        }
                    }
                    Err(e) => problem(problems, format!("{path}.certificate_file"), e),
                }
            }
            let (token_url, client_id, rsa) = (url?, client_id?, rsa?);
            Some(ResolvedAuth::Token(TokenSpec {
                kind: "entra_certificate",
                identity: client_id.clone(),
                scope,
                source: SourceSpec::Certificate {
                    token_url,
                    client_id,
                    certificate_file: cert_path,
                    key_file: key_path,
                    rsa,
                    send_x5c: *send_x5c,
                },
            }))
        }
        BackendAuthConfig::ManagedIdentity {
            client_id,
            object_id,
            mi_res_id,
            endpoint,
            scope,
        } => {
            let scope = scope_of(scope, path, problems);
            let chosen: Vec<_> = [
                ("client_id", client_id),
                ("object_id", object_id),
                ("mi_res_id", mi_res_id),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k, v.to_string())))
            .collect();
            if chosen.len() > 1 {
                problem(
                    problems,
                    path,
                    "name a user-assigned identity by at most one of client_id, object_id, mi_res_id",
                );
            }
            for (k, v) in &chosen {
                required_id(&Text(v.clone()), path, k, problems);
            }
            let selector = chosen.into_iter().next();
            let app_service = (
                env("IDENTITY_ENDPOINT").filter(|s| !s.is_empty()),
                env("IDENTITY_HEADER").filter(|s| !s.is_empty()),
            );
            // IMDS documents the resource id as `msi_res_id`; App Service as `mi_res_id`.
            let imds_selector = selector
                .clone()
                .map(|(k, v)| (if k == "mi_res_id" { "msi_res_id" } else { k }, v));
            if endpoint.is_none() {
                for (var, what) in [
                    ("IDENTITY_SERVER_THUMBPRINT", "Service Fabric"),
                    ("IMDS_ENDPOINT", "Azure Arc"),
                ] {
                    if env(var).is_some_and(|v| !v.is_empty()) {
                        problem(
                            problems,
                            path,
                            format!("{var} is set: the {what} managed identity is not supported; set `endpoint` to an IMDS-compatible token endpoint"),
                        );
                    }
                }
            }
            let source = match (endpoint, app_service) {
                (Some(e), _) => {
                    check_url(
                        e.as_str(),
                        &format!("{path}.endpoint"),
                        Plain::LoopbackOrImds,
                        problems,
                    );
                    SourceSpec::Imds {
                        endpoint: e.to_string(),
                        selector: imds_selector,
                    }
                }
                (None, (Some(url), Some(header))) => {
                    check_url(
                        &url,
                        &format!("{path} (IDENTITY_ENDPOINT)"),
                        Plain::LoopbackOrImds,
                        problems,
                    );
                    SourceSpec::AppService {
                        endpoint: url,
                        header: Secret::new(header),
                        // App Service names an object id `principal_id`.
                        selector: selector
                            .clone()
                            .map(|(k, v)| (if k == "object_id" { "principal_id" } else { k }, v)),
                    }
                }
                (None, (Some(_), None)) => {
                    problem(
                        problems,
                        path,
                        "IDENTITY_ENDPOINT is set without IDENTITY_HEADER: not an App Service or Container Apps identity",
                    );
                    return None;
                }
                (None, _) => SourceSpec::Imds {
                    endpoint: IMDS_ENDPOINT.to_owned(),
                    selector: imds_selector,
                },
            };
            Some(ResolvedAuth::Token(TokenSpec {
                kind: "managed_identity",
                identity: selector.map_or_else(|| "system".to_owned(), |(k, v)| format!("{k}={v}")),
                scope,
                source,
            }))
        }
        BackendAuthConfig::WorkloadIdentity {
            tenant_id,
            client_id,
            token_file,
            authority,
            token_url,
            scope,
        } => {
            let from_env = |v: &Option<Text>, var: &str, key: &str, problems: &mut Vec<Problem>| {
                match v
                    .as_ref()
                    .map(Text::to_string)
                    .or_else(|| env(var))
                    .filter(|s| !s.is_empty())
                {
                    Some(s) => Some(Text(s)),
                    None => {
                        problem(
                            problems,
                            format!("{path}.{key}"),
                            format!("not set, and {var} is not in the environment (is the pod labelled azure.workload.identity/use=true?)"),
                        );
                        None
                    }
                }
            };
            let client_id = from_env(client_id, "AZURE_CLIENT_ID", "client_id", problems);
            let file = from_env(
                token_file,
                "AZURE_FEDERATED_TOKEN_FILE",
                "token_file",
                problems,
            );
            let tenant = match (tenant_id, token_url) {
                (None, Some(_)) => None,
                _ => from_env(tenant_id, "AZURE_TENANT_ID", "tenant_id", problems),
            };
            // AKS always sets AZURE_AUTHORITY_HOST: it only matters when no token_url is given.
            let authority = authority.clone().or_else(|| {
                env("AZURE_AUTHORITY_HOST")
                    .filter(|s| !s.is_empty() && token_url.is_none())
                    .map(Text)
            });
            let url = token_url_of(path, &tenant, &authority, token_url, problems);
            let client_id = client_id.and_then(|c| required_id(&c, path, "client_id", problems));
            let scope = scope_of(scope, path, problems);
            let token_file = file.map(|f| base_dir.join(f.as_str()));
            if let Some(f) = &token_file {
                if let Err(e) = std::fs::metadata(f) {
                    problem(
                        problems,
                        format!("{path}.token_file"),
                        format!("cannot read {}: {e}", f.display()),
                    );
                }
            }
            let (token_url, client_id, token_file) = (url?, client_id?, token_file?);
            Some(ResolvedAuth::Token(TokenSpec {
                kind: "workload_identity",
                identity: client_id.clone(),
                scope,
                source: SourceSpec::Federated {
                    token_url,
                    client_id,
                    token_file,
                },
            }))
        }
    };
    if problems.len() > before {
        return None;
    }
    resolved
}

/// `token_url`, or `{authority}/{tenant_id}/oauth2/v2.0/token`.
fn token_url_of(
    path: &str,
    tenant_id: &Option<Text>,
    authority: &Option<Text>,
    token_url: &Option<Text>,
    problems: &mut Vec<Problem>,
) -> Option<String> {
    if let Some(url) = token_url {
        let key = format!("{path}.token_url");
        if tenant_id.is_some() || authority.is_some() {
            problem(
                problems,
                &key,
                "give either token_url or tenant_id/authority, not both",
            );
        }
        return check_url(url.as_str(), &key, Plain::LoopbackOnly, problems)
            .then(|| url.to_string());
    }
    let Some(tenant) = tenant_id else {
        problem(
            problems,
            format!("{path}.tenant_id"),
            "is required (or give the full token_url)",
        );
        return None;
    };
    let t = tenant.as_str();
    if !t.chars().any(|c| c.is_ascii_alphanumeric())
        || t.contains("..")
        || t.starts_with('.')
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        problem(
            problems,
            format!("{path}.tenant_id"),
            format!("'{}' is not a tenant id or domain", t.escape_default()),
        );
        return None;
    }
    let authority = authority
        .as_ref()
        .map_or(DEFAULT_AUTHORITY, Text::as_str)
        .trim_end_matches('/');
    let key = format!("{path}.authority");
    if authority.contains('?') {
        problem(problems, &key, "must not carry a query string");
        return None;
    }
    check_url(authority, &key, Plain::LoopbackOnly, problems)
        .then(|| format!("{authority}/{t}/oauth2/v2.0/token"))
}

/// Where plain `http://` is allowed besides this machine.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Plain {
    /// Token endpoints: secrets go only over TLS, except to localhost (tests, local proxies).
    LoopbackOnly,
    /// Managed-identity endpoints: also the link-local IMDS address, which Azure serves over
    /// plain HTTP.
    LoopbackOrImds,
}

/// Check a URL credentials are sent to. Never echoes a URL carrying `user:password@`.
fn check_url(url: &str, key: &str, plain: Plain, problems: &mut Vec<Problem>) -> bool {
    let Ok(u) = url.parse::<http::Uri>() else {
        problem(problems, key, "is not a URL");
        return false;
    };
    if u.authority().is_some_and(|a| a.as_str().contains('@')) {
        problem(problems, key, "must not carry a user name or password (`user:pass@`); secrets belong in their own keys");
        return false;
    }
    if u.path_and_query().is_some_and(|p| p.as_str().contains('#')) {
        problem(problems, key, format!("'{url}' must not carry a fragment"));
        return false;
    }
    let host = u.host().unwrap_or("");
    let local =
        is_loopback_host(host) || (plain == Plain::LoopbackOrImds && host == "169.254.169.254");
    match u.scheme_str() {
        Some("https") if !host.is_empty() => true,
        Some("http") if local => true,
        Some("http") => {
            let what = match plain {
                Plain::LoopbackOnly => "localhost",
                Plain::LoopbackOrImds => "localhost or IMDS",
            };
            problem(
                problems,
                key,
                format!("'{url}' must use https (plain http only to {what})"),
            );
            false
        }
        _ => {
            problem(
                problems,
                key,
                format!("'{url}' is not an https:// URL with a host"),
            );
            false
        }
    }
}

fn required_id(v: &Text, path: &str, key: &str, problems: &mut Vec<Problem>) -> Option<String> {
    let s = v.as_str();
    if s.is_empty() || s.chars().any(|c| c.is_control() || c == ' ') {
        problem(
            problems,
            format!("{path}.{key}"),
            "must be a non-empty identifier",
        );
        return None;
    }
    Some(s.to_owned())
}

fn scope_of(scope: &Option<Text>, path: &str, problems: &mut Vec<Problem>) -> String {
    let s = scope.as_ref().map_or(DEFAULT_SCOPE, Text::as_str);
    if s.is_empty() || s.chars().any(char::is_control) {
        problem(
            problems,
            format!("{path}.scope"),
            "must be a non-empty scope",
        );
    }
    s.to_owned()
}
