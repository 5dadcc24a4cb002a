//! Sidecar mode: `portcullis sidecar` configured by the environment alone, as a drop-in for
//! the credential-adding proxies pods already run beside their application.
//!
//! The variables are the ones such sidecars read: `API_BASE_URL`, `HOST`, `PORT`,
//! `AZURE_CLIENT_ID`, `AZURE_TENANT_ID`, `AZURE_CERTIFICATE_PATH`, `AZURE_SCOPE` (see
//! [`VARIABLES`]). They become an ordinary [`Config`] with one backend, one anonymous
//! client and [`Config::passthrough`] set, validated by the same code as a file; each
//! problem is reported under the variable that caused it. The gateway then forwards every
//! path and method to `API_BASE_URL` unchanged, with the client's credentials removed and
//! the backend credential added by the same token machinery as `serve`.
//!
//! A proxy that adds a credential and checks none is an open door on any address but
//! loopback: binding one needs [`Options::allow_non_loopback`] (or
//! `PORTCULLIS_SIDECAR_ALLOW_NON_LOOPBACK=true`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use crate::config::{self, Config, EnvLookup, Problem, Validated};

/// Every variable sidecar mode reads, with what it means, for `--help` and the README.
pub const VARIABLES: [(&str, &str); 17] = [
    ("API_BASE_URL", "the backend every request goes to (required), e.g. https://contoso.openai.azure.com"),
    ("HOST", "address to listen on (default 127.0.0.1)"),
    ("PORT", "port to listen on (default 8080)"),
    ("AZURE_SCOPE", "scope of the backend token (default https://cognitiveservices.azure.com/.default)"),
    ("AZURE_CLIENT_ID", "the app registration (certificate, secret, workload identity) or user-assigned managed identity"),
    ("AZURE_TENANT_ID", "the Entra tenant (certificate, secret, workload identity)"),
    ("AZURE_CERTIFICATE_PATH", "PEM with the certificate and its private key: certificate credentials"),
    ("AZURE_CLIENT_CERTIFICATE_PATH", "the same, under the Azure SDKs' name"),
    ("AZURE_CLIENT_SECRET", "a client secret instead of a certificate"),
    ("AZURE_FEDERATED_TOKEN_FILE", "workload identity (set by the AKS webhook); without it and a certificate or secret, the managed identity is used"),
    ("AZURE_AUTHORITY_HOST", "the Entra authority (default https://login.microsoftonline.com)"),
    ("PORTCULLIS_TOKEN_URL", "a token endpoint instead of {authority}/{tenant}/oauth2/v2.0/token (other IdPs, tests)"),
    ("PORTCULLIS_SIDECAR_ALLOW_NON_LOOPBACK", "true: allow a HOST other than loopback (anyone who reaches it uses the credential)"),
    ("PORTCULLIS_ADMIN_LISTEN", "address of the admin listener (/metrics, /admin/backends); default: none"),
    ("PORTCULLIS_AUDIT", "audit log: - for standard output (default) or a file"),
    ("PORTCULLIS_WORKERS", "worker threads (default 1)"),
    ("PORTCULLIS_MAX_BODY_BYTES", "largest request body accepted, in bytes (default 67108864, 64 MiB; at most 4 GiB)"),
];

/// The largest request body a sidecar accepts unless `PORTCULLIS_MAX_BODY_BYTES` says
/// otherwise: uploads (audio, files) can be large.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;

/// The Azure OpenAI scope sidecars ask for by default.
pub const DEFAULT_SCOPE: &str = "https://cognitiveservices.azure.com/.default";

/// How `portcullis sidecar` was started besides the environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// `--allow-non-loopback`.
    pub allow_non_loopback: bool,
}

/// Every problem with the sidecar's environment, each under its variable.
#[derive(Debug, Clone, thiserror::Error)]
pub struct EnvErrors {
    pub problems: Vec<(String, String)>,
}

impl fmt::Display for EnvErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "invalid sidecar environment ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for (var, message) in &self.problems {
            writeln!(f, "  - {var}: {message}")?;
        }
        Ok(())
    }
}

/// The backend credential the environment selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credential {
    Certificate,
    Secret,
    Workload,
    Managed,
}

impl Credential {
    /// The variable a problem with the credential as a whole is reported under.
    fn variable(self) -> &'static str {
        match self {
            Credential::Certificate => "AZURE_CERTIFICATE_PATH",
            Credential::Secret => "AZURE_CLIENT_SECRET",
            Credential::Workload => "AZURE_FEDERATED_TOKEN_FILE",
            Credential::Managed => "AZURE_CLIENT_ID",
        }
    }
}

/// A validated configuration for sidecar mode from `env`. `base_dir` anchors relative
/// paths (the working directory).
pub fn from_env(
    env: EnvLookup<'_>,
    opts: Options,
    base_dir: &Path,
) -> Result<Validated, EnvErrors> {
    let mut problems = Vec::new();
    let var = |name: &str| {
        env(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let mut fail = |var: &str, message: String| problems.push((var.to_owned(), message));

    let base = var("API_BASE_URL");
    if base.is_none() {
        fail(
            "API_BASE_URL",
            "is required: the backend's URL, e.g. https://contoso.openai.azure.com".into(),
        );
    }
    let host = var("HOST").unwrap_or_else(|| "127.0.0.1".into());
    let ip = match host.as_str() {
        "localhost" => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        h => match h
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => Some(ip),
            Err(_) => {
                fail(
                    "HOST",
                    format!("'{}' is not an IP address", h.escape_default()),
                );
                None
            }
        },
    };
    let port = match var("PORT") {
        None => Some(8080),
        Some(p) => match p.parse::<u16>() {
            Ok(p) => Some(p),
            Err(_) => {
                fail(
                    "PORT",
                    format!("'{}' is not a port (0-65535)", p.escape_default()),
                );
                None
            }
        },
    };
    let allow = opts.allow_non_loopback
        || match var("PORTCULLIS_SIDECAR_ALLOW_NON_LOOPBACK").as_deref() {
            None | Some("false" | "0" | "no") => false,
            Some("true" | "1" | "yes") => true,
            Some(other) => {
                fail(
                    "PORTCULLIS_SIDECAR_ALLOW_NON_LOOPBACK",
                    format!("'{}' is not true or false", other.escape_default()),
                );
                false
            }
        };
    if let Some(ip) = ip.filter(|ip| !ip.is_loopback() && !allow) {
        fail(
            "HOST",
            format!(
                "{ip} is not a loopback address: the sidecar adds the backend credential to \
                 every request and authenticates no client, so anyone who can reach it uses \
                 that credential. Set PORTCULLIS_SIDECAR_ALLOW_NON_LOOPBACK=true (or pass \
                 --allow-non-loopback) if only trusted peers can reach it, or run \
                 `portcullis sidecar --config FILE` with client authentication"
            ),
        );
    }

    let certificate = match (
        var("AZURE_CERTIFICATE_PATH"),
        var("AZURE_CLIENT_CERTIFICATE_PATH"),
    ) {
        (Some(a), Some(b)) if a != b => {
            fail(
                "AZURE_CERTIFICATE_PATH",
                "AZURE_CLIENT_CERTIFICATE_PATH names another file: set one of them".into(),
            );
            None
        }
        (a, b) => a.or(b),
    };
    let secret = var("AZURE_CLIENT_SECRET");
    let federated = var("AZURE_FEDERATED_TOKEN_FILE");
    if var("AZURE_CLIENT_CERTIFICATE_PASSWORD").is_some() {
        fail(
            "AZURE_CLIENT_CERTIFICATE_PASSWORD",
            "password-protected certificates are not read: give a PEM whose private key is not encrypted".into(),
        );
    }
    if certificate.is_some() && secret.is_some() {
        fail(
            "AZURE_CLIENT_SECRET",
            "AZURE_CERTIFICATE_PATH is set too: give a certificate or a secret, not both".into(),
        );
    }
    if federated.is_some() && (certificate.is_some() || secret.is_some()) {
        fail(
            "AZURE_FEDERATED_TOKEN_FILE",
            "is set (the AKS workload identity webhook sets it on labelled pods) together \
             with a certificate or secret: use one credential"
                .into(),
        );
    }
    let credential = if certificate.is_some() {
        Credential::Certificate
    } else if secret.is_some() {
        Credential::Secret
    } else if federated.is_some() {
        Credential::Workload
    } else {
        Credential::Managed
    };
    let token_url = var("PORTCULLIS_TOKEN_URL");
    for (name, needed) in [
        ("AZURE_CLIENT_ID", true),
        ("AZURE_TENANT_ID", token_url.is_none()),
    ] {
        if needed
            && matches!(credential, Credential::Certificate | Credential::Secret)
            && var(name).is_none()
        {
            fail(
                name,
                format!(
                    "is required with {}",
                    if credential == Credential::Certificate {
                        "a certificate (AZURE_CERTIFICATE_PATH)"
                    } else {
                        "a client secret (AZURE_CLIENT_SECRET)"
                    }
                ),
            );
        }
    }

    // Values go into the configuration as literals: `$` would start a `${VAR}` reference.
    let lit = |s: &str| toml::Value::String(s.replace('$', "$$"));
    let mut auth = toml::Table::new();
    let kind = match credential {
        Credential::Certificate => "entra_certificate",
        Credential::Secret => "entra_secret",
        Credential::Workload => "workload_identity",
        Credential::Managed => "managed_identity",
    };
    auth.insert("type".into(), lit(kind));
    auth.insert(
        "scope".into(),
        lit(&var("AZURE_SCOPE").unwrap_or_else(|| DEFAULT_SCOPE.into())),
    );
    match credential {
        Credential::Certificate | Credential::Secret => {
            auth.insert(
                "client_id".into(),
                lit(&var("AZURE_CLIENT_ID").unwrap_or_default()),
            );
            if let Some(c) = &certificate {
                auth.insert("certificate_file".into(), lit(c));
            }
            if let Some(s) = &secret {
                auth.insert("client_secret".into(), lit(s));
            }
            match &token_url {
                Some(u) => {
                    auth.insert("token_url".into(), lit(u));
                }
                None => {
                    auth.insert(
                        "tenant_id".into(),
                        lit(&var("AZURE_TENANT_ID").unwrap_or_default()),
                    );
                    if let Some(a) = var("AZURE_AUTHORITY_HOST") {
                        auth.insert("authority".into(), lit(a.trim_end_matches('/')));
                    }
                }
            }
        }
        // Workload identity reads AZURE_CLIENT_ID, AZURE_TENANT_ID, AZURE_AUTHORITY_HOST
        // and the token file itself, as `serve` does.
        Credential::Workload => {
            if let Some(u) = &token_url {
                auth.insert("token_url".into(), lit(u));
            }
        }
        Credential::Managed => {
            if let Some(id) = var("AZURE_CLIENT_ID") {
                auth.insert("client_id".into(), lit(&id));
            }
        }
    }

    let mut backend = toml::Table::new();
    backend.insert("name".into(), lit("upstream"));
    backend.insert(
        "url".into(),
        lit(base
            .as_deref()
            .unwrap_or("http://127.0.0.1")
            .trim_end_matches('/')),
    );
    backend.insert("type".into(), lit("azure"));
    let mut timeouts = toml::Table::new();
    // A non-streamed answer of a reasoning model can take minutes to start.
    for (k, v) in [("connect", "5s"), ("first_byte", "10m"), ("idle", "5m")] {
        timeouts.insert(k.into(), lit(v));
    }
    backend.insert("timeouts".into(), toml::Value::Table(timeouts));
    backend.insert("auth".into(), toml::Value::Table(auth));

    let mut client = toml::Table::new();
    client.insert("id".into(), lit("sidecar"));
    client.insert("anonymous".into(), toml::Value::Boolean(true));
    for key in ["deployments", "operations"] {
        client.insert(key.into(), toml::Value::Array(vec![lit("*")]));
    }

    let listen = match (ip, port) {
        (Some(ip), Some(port)) => SocketAddr::new(ip, port).to_string(),
        _ => "127.0.0.1:0".into(),
    };
    let mut server = toml::Table::new();
    server.insert("listen".into(), lit(&listen));
    // Bodies are held for the one attempt; uploads (audio, files) can be large.
    let max_body = match var("PORTCULLIS_MAX_BODY_BYTES") {
        None => DEFAULT_MAX_BODY_BYTES,
        Some(b) => match b.parse::<u64>() {
            Ok(n) if (1..=config::MAX_BODY_LIMIT).contains(&n) => n,
            _ => {
                fail(
                    "PORTCULLIS_MAX_BODY_BYTES",
                    format!(
                        "'{}' is not a number of bytes from 1 to {} (4 GiB)",
                        b.escape_default(),
                        config::MAX_BODY_LIMIT
                    ),
                );
                DEFAULT_MAX_BODY_BYTES
            }
        },
    };
    server.insert(
        "max_body_bytes".into(),
        toml::Value::Integer(i64::try_from(max_body).unwrap_or(i64::MAX)),
    );
    let workers = match var("PORTCULLIS_WORKERS") {
        None => 1,
        Some(w) => match w.parse::<i64>() {
            Ok(n) if (1..=256).contains(&n) => n,
            _ => {
                fail(
                    "PORTCULLIS_WORKERS",
                    format!(
                        "'{}' is not a number of threads (1-256)",
                        w.escape_default()
                    ),
                );
                1
            }
        },
    };
    server.insert("workers".into(), toml::Value::Integer(workers));
    let mut admin = toml::Table::new();
    admin.insert(
        "listen".into(),
        lit(&var("PORTCULLIS_ADMIN_LISTEN").unwrap_or_default()),
    );
    let mut audit = toml::Table::new();
    audit.insert(
        "path".into(),
        lit(&var("PORTCULLIS_AUDIT").unwrap_or_else(|| "-".into())),
    );
    // Nothing is written to disk unless asked: the root filesystem may be read-only.
    let mut store = toml::Table::new();
    store.insert("record_usage".into(), toml::Value::Boolean(false));

    let mut doc = toml::Table::new();
    doc.insert("server".into(), toml::Value::Table(server));
    doc.insert("admin".into(), toml::Value::Table(admin));
    doc.insert("audit".into(), toml::Value::Table(audit));
    doc.insert("store".into(), toml::Value::Table(store));
    doc.insert(
        "clients".into(),
        toml::Value::Array(vec![toml::Value::Table(client)]),
    );
    doc.insert(
        "backends".into(),
        toml::Value::Array(vec![toml::Value::Table(backend)]),
    );

    let mut config: Config = match toml::Value::Table(doc).try_into() {
        Ok(c) => c,
        Err(e) => {
            // Built above from fixed keys: only a bug gets here.
            fail(
                "(internal)",
                format!("the sidecar configuration does not parse: {e}"),
            );
            return Err(EnvErrors { problems });
        }
    };
    config.passthrough = true;
    let validated = config::validate_config(config, base_dir, env);
    match validated {
        Ok(v) if problems.is_empty() => Ok(v),
        Ok(_) => Err(EnvErrors { problems }),
        Err(found) => {
            for p in found {
                let (var, message) = variable_of(&p, credential);
                if !problems.iter().any(|(v, m)| *v == var && *m == message) {
                    problems.push((var, message));
                }
            }
            Err(EnvErrors { problems })
        }
    }
}

/// The variable a problem of the generated configuration comes from.
fn variable_of(p: &Problem, credential: Credential) -> (String, String) {
    let auth = "backends[0].auth";
    let var = match p.path.as_str() {
        "server.listen" => "HOST",
        "backends[0].url" => "API_BASE_URL",
        "admin.listen" => "PORTCULLIS_ADMIN_LISTEN",
        "audit.path" => "PORTCULLIS_AUDIT",
        path if path == auth => credential.variable(),
        path => match path.strip_prefix(auth).and_then(|k| k.strip_prefix('.')) {
            Some("tenant_id") => "AZURE_TENANT_ID",
            Some("client_id") => "AZURE_CLIENT_ID",
            Some("certificate_file" | "key_file" | "algorithm") => "AZURE_CERTIFICATE_PATH",
            Some("client_secret") => "AZURE_CLIENT_SECRET",
            Some("scope") => "AZURE_SCOPE",
            Some("token_url") => "PORTCULLIS_TOKEN_URL",
            Some("authority") => "AZURE_AUTHORITY_HOST",
            Some("token_file") => "AZURE_FEDERATED_TOKEN_FILE",
            _ => return (p.path.clone(), p.message.clone()),
        },
    };
    (var.to_owned(), p.message.clone())
}

#[cfg(test)]
mod tests;
