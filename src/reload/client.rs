//! `portcullis reload`: ask a running gateway to reload its configuration file.
//!
//! Reads only the `[admin]` section of the configuration (`listen`, and `token` or
//! `token_file`, or the first `[[admin.tokens]]` entry with the `config` scope), so it works even when the rest of the file is the invalid change being
//! tried: the gateway itself validates the file and answers with every problem. It sends
//! `POST /admin/reload` to the admin listener (an unspecified listen address such as
//! `0.0.0.0` is reached on loopback) and reads the [`super::Outcome`] it answers.
//!
//! The token is the one in the file now; when a change rotates `admin.token`, reload with
//! `SIGHUP` (or let the file watcher do it), since the gateway still expects the old one.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::{Changes, ReportedProblem};
use crate::config::{self, AdminConfig, Secret};

/// Where and how to reach a gateway's admin listener.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port/admin/reload`.
    pub url: String,
    pub token: Option<Secret>,
}

/// A gateway's answer to a reload.
#[derive(Debug, Clone, Deserialize)]
pub struct Reply {
    pub outcome: String,
    #[serde(default)]
    pub origin: String,
    #[serde(default)]
    pub errors: Vec<ReportedProblem>,
    #[serde(default)]
    pub restart_required: Vec<String>,
    #[serde(default)]
    pub changes: Changes,
}

impl Reply {
    pub fn applied(&self) -> bool {
        self.outcome == "applied"
    }
}

/// The admin endpoint of the gateway configured by `path`; `admin` (host:port) overrides
/// `[admin] listen`.
pub fn admin_target(path: &Path, admin: Option<&str>) -> Result<Target, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let doc: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    let section: AdminConfig = match doc.get("admin") {
        Some(v) => v.clone().try_into().map_err(|e: toml::de::Error| {
            format!("{}: [admin]: {}", path.display(), e.message())
        })?,
        None => AdminConfig::default(),
    };
    let listen = match admin {
        Some(a) => a.to_owned(),
        None => section.listen.as_str().to_owned(),
    };
    if listen.is_empty() {
        return Err(format!(
            "{}: the admin listener is disabled (admin.listen = \"\"); send SIGHUP to the gateway instead",
            path.display()
        ));
    }
    let mut addr: SocketAddr = listen
        .parse()
        .map_err(|_| format!("'{listen}' is not a socket address (host:port)"))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut problems = Vec::new();
    // `[admin] token`, or else the first `[[admin.tokens]]` entry with the `config` scope.
    let token = config::admin::resolve(&section, base, &mut problems)
        .into_iter()
        .find(|t| t.scopes.contains(config::admin::Scope::Config))
        .map(|t| t.secret);
    if let Some(p) = problems.first() {
        return Err(format!("{}: {p}", path.display()));
    }
    Ok(Target {
        url: format!("http://{addr}/admin/reload"),
        token,
    })
}

/// Ask for the reload and read the answer.
pub async fn request(target: &Target) -> Result<Reply, String> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        // A reload may wait a few seconds for a new issuer's keys.
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| format!("cannot create the HTTP client: {e}"))?;
    let mut req = http.post(&target.url);
    if let Some(t) = &target.token {
        req = req.bearer_auth(t.expose());
    }
    let resp = req.send().await.map_err(|e| {
        format!(
            "cannot reach the gateway's admin listener at {}: {e}",
            target.url
        )
    })?;
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| format!("{}: reading the answer: {e}", target.url))?;
    match status.as_u16() {
        200 | 422 => serde_json::from_slice(&body)
            .map_err(|e| format!("{}: unexpected answer: {e}", target.url)),
        401 => Err(format!(
            "{}: the admin listener refused the token (401); check [admin] token",
            target.url
        )),
        _ => Err(format!(
            "{}: answered {status}: {}",
            target.url,
            String::from_utf8_lossy(&body)
                .chars()
                .take(500)
                .collect::<String>()
        )),
    }
}

/// The answer as lines for people.
pub fn describe(r: &Reply) -> String {
    let mut out = String::new();
    if r.applied() {
        out.push_str(&format!("configuration reloaded from {}\n", r.origin));
        let c = &r.changes;
        for (what, names) in [
            ("backends added", &c.backends_added),
            ("backends removed", &c.backends_removed),
            ("clients added", &c.clients_added),
            ("clients removed", &c.clients_removed),
            ("issuers added", &c.issuers_added),
            ("issuers removed", &c.issuers_removed),
        ] {
            if !names.is_empty() {
                out.push_str(&format!("  {what}: {}\n", names.join(", ")));
            }
        }
        if !r.restart_required.is_empty() {
            out.push_str(&format!(
                "restart required for: {} (the running values are kept until then)\n",
                r.restart_required.join(", ")
            ));
        }
    } else {
        out.push_str(&format!(
            "configuration rejected ({} problem{}); the running configuration is kept:\n",
            r.errors.len(),
            if r.errors.len() == 1 { "" } else { "s" }
        ));
        for p in &r.errors {
            let problem = config::Problem {
                path: p.key.clone(),
                line: p.line,
                message: p.message.clone(),
            };
            out.push_str(&format!("  - {problem}\n"));
        }
    }
    out
}
