//! Configuration: the typed TOML surface, loading with `${ENV}` expansion and `_file`
//! secrets, and validation that reports every problem with its key path and line.
//!
//! [`load_str`] is the single entry point: it either returns a [`Validated`] configuration
//! (every secret resolved, every address parsed) or a [`ConfigErrors`] listing all problems.

pub mod admin;
pub mod backend_auth;
pub mod identity;
pub mod limits;
mod model;
pub mod operator;
pub mod routing;
pub mod telemetry;
pub mod tls;
mod values;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use backend_auth::{EnvLookup, ResolvedAuth, SourceSpec, TokenSpec};
pub use model::{
    AdminConfig, AuditConfig, AuthConfig, BackendAuthConfig, BackendConfig, BackendKind,
    ClaimMatch, ClientConfig, Config, IssuerConfig, JwtBinding, ServerConfig, StoreConfig,
    Timeouts,
};
pub use values::{expand_env, Dur, Secret, Text};

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path such as `backends[1].auth.key`; empty for a syntax error.
    pub path: String,
    /// 1-based line in the file, when it can be found.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.path.is_empty(), self.line) {
            (false, Some(l)) => write!(f, "{} (line {l}): {}", self.path, self.message),
            (false, None) => write!(f, "{}: {}", self.path, self.message),
            (true, Some(l)) => write!(f, "line {l}: {}", self.message),
            (true, None) => f.write_str(&self.message),
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors {
    pub origin: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration {} ({} problem{}):",
            self.origin,
            self.problems.len(),
            if self.problems.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// A configuration that passed validation, with secrets and addresses resolved.
#[derive(Debug, Clone)]
pub struct Validated {
    pub config: Config,
    pub listen: SocketAddr,
    /// `None` when the admin listener is disabled (`admin.listen = ""`).
    pub admin_listen: Option<SocketAddr>,
    pub admin_token: Option<Secret>,
    /// Every admin credential: `admin.token` (as `admin`, every scope), then
    /// `[[admin.tokens]]`.
    pub admin_tokens: Vec<admin::AdminToken>,
    /// Resolved backend credentials, index-aligned with `config.backends`.
    pub backend_auth: Vec<ResolvedAuth>,
    /// `store.key_hmac_secret`, resolved; API keys are disabled without it.
    pub key_hmac_secret: Option<Secret>,
    /// Resolved `hmac_secret` per issuer, index-aligned with `config.issuers`.
    pub issuer_secrets: Vec<Option<Secret>>,
    /// Directory relative paths are resolved against.
    pub base_dir: PathBuf,
    /// `server.trusted_proxies`, parsed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `server.max_buffered_body_bytes`, or the default sized for this machine.
    pub max_buffered_body_bytes: u64,
    /// `[server.tls]`, validated.
    pub server_tls: Option<tls::TlsSettings>,
    /// `[admin.tls]`, validated.
    pub admin_tls: Option<tls::TlsSettings>,
    /// Each client's `certificates`, normalised; index-aligned with `config.clients`.
    pub cert_bindings: Vec<Vec<tls::CertMatcher>>,
    /// `[telemetry]`, resolved; `None` when no traces are exported.
    pub telemetry: Option<telemetry::TelemetrySettings>,
}

/// Read and validate a configuration file.
pub fn load_file(path: &Path) -> Result<Validated, ConfigErrors> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        origin: origin.clone(),
        problems: vec![Problem {
            path: String::new(),
            line: None,
            message: format!("cannot read file: {e}"),
        }],
    })?;
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    load_str(&text, &origin, &base)
}

/// Parse and validate configuration text. `base_dir` anchors relative file paths.
pub fn load_str(text: &str, origin: &str, base_dir: &Path) -> Result<Validated, ConfigErrors> {
    load_str_with_env(text, origin, base_dir, &|name| std::env::var(name).ok())
}

/// [`load_str`] with the environment Azure sets for managed and workload identity
/// (`IDENTITY_ENDPOINT`, `AZURE_CLIENT_ID`, ...) read through `env`.
pub fn load_str_with_env(
    text: &str,
    origin: &str,
    base_dir: &Path,
    env: EnvLookup<'_>,
) -> Result<Validated, ConfigErrors> {
    let fail = |problems| ConfigErrors {
        origin: origin.to_owned(),
        problems,
    };
    let config = parse(text).map_err(|p| fail(vec![p]))?;
    let doc = toml_edit::Document::parse(text.to_owned()).ok();
    let mut problems = Vec::new();
    let validated = validate(config, base_dir, env, &mut problems);
    for p in &mut problems {
        if p.line.is_none() {
            p.line = doc.as_ref().and_then(|d| line_of(d, text, &p.path));
        }
    }
    match validated {
        Some(v) if problems.is_empty() => Ok(v),
        _ => Err(fail(problems)),
    }
}

/// Validate a configuration built in code (sidecar mode) rather than read from text: the
/// problems carry key paths but no lines.
pub fn validate_config(
    config: Config,
    base_dir: &Path,
    env: EnvLookup<'_>,
) -> Result<Validated, Vec<Problem>> {
    let mut problems = Vec::new();
    match validate(config, base_dir, env, &mut problems) {
        Some(v) if problems.is_empty() => Ok(v),
        _ => Err(problems),
    }
}

fn parse(text: &str) -> Result<Config, Problem> {
    let de = toml::Deserializer::parse(text).map_err(|e| Problem {
        path: String::new(),
        line: e.span().map(|s| line_at(text, s.start)),
        message: e.message().to_owned(),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        Problem {
            path: if path == "." { String::new() } else { path },
            line: inner.span().map(|s| line_at(text, s.start)),
            message: inner.message().to_owned(),
        }
    })
}

pub(crate) fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Find the line of a key path like `backends[1].auth.key` in the document.
fn line_of(doc: &toml_edit::Document<String>, text: &str, path: &str) -> Option<usize> {
    let mut item = doc.as_item();
    let mut best = None;
    for seg in path.split('.') {
        let (name, index) = match seg.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        item = item.get(name)?;
        best = item.span().or(best);
        if let Some(i) = index {
            item = item.get(i)?;
            best = item.span().or(best);
        }
    }
    best.map(|s| line_at(text, s.start))
}

pub(crate) fn problem(
    problems: &mut Vec<Problem>,
    path: impl Into<String>,
    message: impl Into<String>,
) {
    problems.push(Problem {
        path: path.into(),
        line: None,
        message: message.into(),
    });
}

/// Addresses or CIDR ranges (`10.0.0.0/8`, `127.0.0.1`) of the list at `path`.
pub(crate) fn parse_nets(
    list: &[Text],
    path: &str,
    problems: &mut Vec<Problem>,
) -> Vec<ipnet::IpNet> {
    let mut nets = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let text = t.as_str();
        let net = text
            .parse::<ipnet::IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
        match net {
            Ok(n) => nets.push(n.trunc()),
            Err(_) => problem(
                problems,
                format!("{path}[{i}]"),
                format!(
                    "'{}' is not an IP address or CIDR range (e.g. 10.0.0.0/8)",
                    text.escape_default()
                ),
            ),
        }
    }
    nets
}

fn parse_addr(value: &str, path: &str, problems: &mut Vec<Problem>) -> Option<SocketAddr> {
    match value.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            problem(
                problems,
                path,
                format!(
                    "'{value}' is not a socket address (expected host:port, e.g. 127.0.0.1:8080)"
                ),
            );
            None
        }
    }
}

/// `localhost` or a loopback address (`127.0.0.0/8`, `[::1]`): plain http to it stays on
/// this machine.
pub(crate) fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Read a secret given either inline or as a `_file`; exactly one of them is required
/// when `required`.
pub(crate) fn resolve_secret(
    inline: &Option<Secret>,
    file: &Option<Text>,
    path: &str,
    key: &str,
    required: bool,
    base_dir: &Path,
    problems: &mut Vec<Problem>,
) -> Option<Secret> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            problem(
                problems,
                format!("{path}.{key}"),
                format!("give either `{key}` or `{key}_file`, not both"),
            );
            None
        }
        (Some(s), None) => {
            if s.expose().is_empty() {
                problem(problems, format!("{path}.{key}"), "must not be empty");
            }
            Some(s.clone())
        }
        (None, Some(f)) => {
            let p = base_dir.join(f.as_str());
            match std::fs::read_to_string(&p) {
                Ok(s) if !s.trim().is_empty() => Some(Secret::new(s.trim().to_owned())),
                Ok(_) => {
                    problem(
                        problems,
                        format!("{path}.{key}_file"),
                        format!("file {} is empty", p.display()),
                    );
                    None
                }
                Err(e) => {
                    problem(
                        problems,
                        format!("{path}.{key}_file"),
                        format!("cannot read {}: {e}", p.display()),
                    );
                    None
                }
            }
        }
        (None, None) => {
            if required {
                problem(
                    problems,
                    path,
                    format!("`{key}` or `{key}_file` is required"),
                );
            }
            None
        }
    }
}

fn validate(
    config: Config,
    base_dir: &Path,
    env: EnvLookup<'_>,
    problems: &mut Vec<Problem>,
) -> Option<Validated> {
    let listen = parse_addr(config.server.listen.as_str(), "server.listen", problems);
    if config.server.max_body_bytes == 0 {
        problem(problems, "server.max_body_bytes", "must be greater than 0");
    } else if config.server.max_body_bytes > MAX_BODY_LIMIT {
        problem(problems, "server.max_body_bytes", "must be at most 4 GiB");
    }
    let max_buffered_body_bytes = match config.server.max_buffered_body_bytes {
        Some(n) if n < config.server.max_body_bytes => {
            problem(
                problems,
                "server.max_buffered_body_bytes",
                format!(
                    "must be at least server.max_body_bytes ({}), or no request of the largest allowed size could ever be read",
                    config.server.max_body_bytes
                ),
            );
            n
        }
        Some(n) => n,
        None => default_buffered_body_bytes(config.server.max_body_bytes),
    };
    check_duration(config.server.buffer_wait, "server.buffer_wait", problems);
    let trusted_proxies = parse_nets(
        &config.server.trusted_proxies,
        "server.trusted_proxies",
        problems,
    );
    let server_tls = config
        .server
        .tls
        .as_ref()
        .and_then(|s| tls::validate_section(s, "server.tls", "client", base_dir, problems));
    let admin_tls = config
        .admin
        .tls
        .as_ref()
        .and_then(|s| tls::validate_section(s, "admin.tls", "admin", base_dir, problems));
    let cert_bindings = tls::validate_bindings(
        &config,
        server_tls
            .as_ref()
            .is_some_and(tls::TlsSettings::verifies_clients),
        problems,
    );
    if config.server.workers > 256 {
        problem(
            problems,
            "server.workers",
            "must be at most 256 (0 = one per core)",
        );
    }
    check_duration(
        config.server.header_timeout,
        "server.header_timeout",
        problems,
    );
    check_duration(config.server.body_timeout, "server.body_timeout", problems);
    check_duration(
        config.server.drain_timeout,
        "server.drain_timeout",
        problems,
    );
    if config.server.shutdown_delay.0 > MAX_DURATION {
        problem(problems, "server.shutdown_delay", "must be at most 24h");
    }
    let admin_listen = if config.admin.listen.as_str().is_empty() {
        None
    } else {
        parse_addr(config.admin.listen.as_str(), "admin.listen", problems)
    };
    let admin_tokens = admin::resolve(&config.admin, base_dir, problems);
    // The single `[admin] token`, when given, is the first entry.
    let legacy = config.admin.token.is_some() || config.admin.token_file.is_some();
    let admin_token = admin_tokens
        .first()
        .filter(|_| legacy)
        .map(|t| t.secret.clone());
    if config.audit.path.as_str().is_empty() {
        problem(
            problems,
            "audit.path",
            "must be \"-\" (stdout) or a file path",
        );
    }

    if config.backends.is_empty() {
        problem(
            problems,
            "backends",
            "at least one [[backends]] entry is required",
        );
    }
    let mut names = std::collections::HashSet::new();
    let mut backend_auth = Vec::with_capacity(config.backends.len());
    for (i, b) in config.backends.iter().enumerate() {
        let path = format!("backends[{i}]");
        if b.name.as_str().is_empty() {
            problem(problems, format!("{path}.name"), "must not be empty");
        } else if !names.insert(b.name.as_str()) {
            problem(
                problems,
                format!("{path}.name"),
                format!("backend name '{}' is used twice", b.name),
            );
        }
        check_backend_url(b.url.as_str(), &format!("{path}.url"), problems);
        if b.deployments.is_empty() && !config.passthrough {
            problem(
                problems,
                format!("{path}.deployments"),
                "maps no deployment: add at least one `\"public-name\" = \"backend-name\"`",
            );
        }
        for (public, backend) in &b.deployments {
            for name in [public.as_str(), backend.as_str()] {
                if !crate::route::valid_name(name) {
                    problem(
                        problems,
                        format!("{path}.deployments"),
                        format!(
                            "invalid deployment name '{}': use letters, digits, '-', '_', '.' or ':'",
                            name.escape_default()
                        ),
                    );
                }
            }
        }
        if b.weight == 0 {
            problem(problems, format!("{path}.weight"), "must be at least 1");
        }
        if let Some(v) = &b.api_version {
            if v.as_str().is_empty()
                || !v
                    .as_str()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                problem(
                    problems,
                    format!("{path}.api_version"),
                    format!("invalid api-version '{v}'"),
                );
            }
        }
        for (name, d) in [
            ("connect", b.timeouts.connect),
            ("first_byte", b.timeouts.first_byte),
            ("idle", b.timeouts.idle),
        ] {
            check_duration(d, &format!("{path}.timeouts.{name}"), problems);
        }
        if b.timeouts.connect.0 >= b.timeouts.first_byte.0 {
            problem(
                problems,
                format!("{path}.timeouts.connect"),
                "must be shorter than timeouts.first_byte (or a slow connect is never failed over)",
            );
        }
        if let Some(ca) = &b.ca_file {
            let p = base_dir.join(ca.as_str());
            match std::fs::read(&p) {
                Ok(pem) => {
                    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
                    if certs.is_empty() || certs.iter().any(|c| c.is_err()) {
                        problem(
                            problems,
                            format!("{path}.ca_file"),
                            format!("{} holds no valid PEM certificate", p.display()),
                        );
                    }
                }
                Err(e) => problem(
                    problems,
                    format!("{path}.ca_file"),
                    format!("cannot read {}: {e}", p.display()),
                ),
            }
        }
        for (j, h) in b.pass_response_headers.iter().enumerate() {
            let at = format!("{path}.pass_response_headers[{j}]");
            match http::HeaderName::from_bytes(h.as_str().as_bytes()) {
                Ok(name) if crate::proxy::is_hop_by_hop(&name) => problem(
                    problems,
                    at,
                    format!(
                        "'{name}' is hop-by-hop: it describes one connection and is never relayed"
                    ),
                ),
                Ok(_) => {}
                Err(_) => problem(
                    problems,
                    at,
                    format!("'{}' is not a header name", h.as_str().escape_default()),
                ),
            }
        }
        let auth = backend_auth::resolve(&b.auth, &format!("{path}.auth"), base_dir, env, problems);
        backend_auth.push(auth.unwrap_or(ResolvedAuth::None));
    }

    for (i, c) in config.clients.iter().enumerate() {
        if c.max_concurrent_requests == Some(0) {
            problem(
                problems,
                format!("clients[{i}].max_concurrent_requests"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
    }
    limits::validate(&config, problems);
    routing::validate(&config, problems);
    let telemetry = telemetry::validate(&config.telemetry, problems);
    let ids = identity::validate(&config, base_dir, problems);
    Some(Validated {
        trusted_proxies,
        server_tls,
        admin_tls,
        cert_bindings,
        telemetry,
        max_buffered_body_bytes,
        key_hmac_secret: ids.key_hmac_secret,
        issuer_secrets: ids.issuer_secrets,
        listen: listen?,
        admin_listen,
        admin_token,
        admin_tokens,
        backend_auth,
        base_dir: base_dir.to_path_buf(),
        config,
    })
}

/// Largest `server.max_body_bytes`: bodies are held in memory, and no OpenAI or Azure
/// operation takes more.
pub const MAX_BODY_LIMIT: u64 = 4 * 1024 * 1024 * 1024;

/// The default `server.max_buffered_body_bytes`: an eighth of the memory this process may
/// use, between 64 MiB and 1 GiB, and never less than one largest body.
fn default_buffered_body_bytes(max_body: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    let memory = available_memory().unwrap_or(2048 * MIB);
    (memory / 8).clamp(64 * MIB, 1024 * MIB).max(max_body)
}

/// Memory available to this process: the cgroup v2 limit when there is one (containers),
/// else the machine's physical memory.
fn available_memory() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let physical = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    match (cgroup, physical) {
        (Some(c), Some(p)) => Some(c.min(p)),
        (c, p) => c.or(p),
    }
}

/// Longest duration accepted anywhere: longer values are typos or attempts to disable a
/// timeout, and would overflow deadline arithmetic.
const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

pub(crate) fn check_duration(d: Dur, path: &str, problems: &mut Vec<Problem>) {
    if d.0.is_zero() {
        problem(problems, path, "must be greater than 0");
    } else if d.0 > MAX_DURATION {
        problem(problems, path, "must be at most 24h");
    }
}

fn check_backend_url(url: &str, path: &str, problems: &mut Vec<Problem>) {
    match url.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() => {
            if u.query().is_some() {
                problem(
                    problems,
                    path,
                    format!("'{url}' must not carry a query string"),
                );
            }
        }
        _ => problem(
            problems,
            path,
            format!("'{url}' is not an http:// or https:// URL with a host"),
        ),
    }
}

#[cfg(test)]
mod tests;
