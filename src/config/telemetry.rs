//! `[telemetry]`: OpenTelemetry traces exported over OTLP/HTTP (protobuf).
//!
//! Typed here and checked with key paths in [`validate`], which resolves the section into
//! [`TelemetrySettings`] (`None`: no section or no `otlp_endpoint`, telemetry off). The
//! exporter itself is `crate::telemetry`. Read once at start: a reload that changes the
//! section reports it as needing a restart (`crate::reload::START_ONLY`).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::values::{Dur, Secret, Text};
use super::{check_duration, is_loopback_host, problem, Problem};

/// `[telemetry]` as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`), or its full traces URL
    /// (ending in `/v1/traces`). Absent: nothing is exported.
    #[serde(default)]
    pub otlp_endpoint: Option<Text>,
    /// `service.name` of every span.
    #[serde(default = "default_service_name")]
    pub service_name: Text,
    /// Share of requests without a parent that are traced (0.0–1.0). A client's
    /// `traceparent` decides for its own request (parent-based sampling).
    #[serde(default = "default_ratio")]
    pub sampling_ratio: f64,
    /// Headers sent with every export (a collector's API key): values may be `${ENV}` and
    /// are never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// How long one export may take.
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Longest time a finished span waits before it is exported.
    #[serde(default = "default_batch_delay")]
    pub batch_delay: Dur,
    /// Finished spans held for export at most; more are dropped (and the request is not
    /// slowed).
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: default_service_name(),
            sampling_ratio: default_ratio(),
            headers: BTreeMap::new(),
            timeout: default_timeout(),
            batch_delay: default_batch_delay(),
            max_queue: default_max_queue(),
        }
    }
}

fn default_service_name() -> Text {
    Text::from("portcullis")
}
fn default_ratio() -> f64 {
    1.0
}
fn default_timeout() -> Dur {
    Dur(Duration::from_secs(10))
}
fn default_batch_delay() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_max_queue() -> usize {
    2048
}

/// `[telemetry]` checked and resolved: what the exporter is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySettings {
    /// The traces URL exports are POSTed to (`…/v1/traces`).
    pub endpoint: String,
    pub service_name: String,
    pub sampling_ratio: f64,
    /// Header name (lower case) → value; the values print as `[redacted]`.
    pub headers: Vec<(http::HeaderName, Secret)>,
    pub timeout: Duration,
    pub batch_delay: Duration,
    pub max_queue: usize,
}

/// The traces URL for an `otlp_endpoint`: the URL itself when its path ends in
/// `/v1/traces`, else the base URL with `/v1/traces` appended (as the OpenTelemetry SDKs do
/// with `OTEL_EXPORTER_OTLP_ENDPOINT`).
pub fn traces_url(endpoint: &str) -> String {
    if endpoint.ends_with("/v1/traces") {
        return endpoint.to_owned();
    }
    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
}

/// Check `[telemetry]`; `None` when telemetry is off or the section has problems.
pub(super) fn validate(
    t: &TelemetryConfig,
    problems: &mut Vec<Problem>,
) -> Option<TelemetrySettings> {
    let before = problems.len();
    if !(0.0..=1.0).contains(&t.sampling_ratio) {
        problem(
            problems,
            "telemetry.sampling_ratio",
            "must be between 0.0 and 1.0",
        );
    }
    if t.service_name.as_str().trim().is_empty() {
        problem(problems, "telemetry.service_name", "must not be empty");
    }
    check_duration(t.timeout, "telemetry.timeout", problems);
    check_duration(t.batch_delay, "telemetry.batch_delay", problems);
    if t.max_queue == 0 || t.max_queue > 1_000_000 {
        problem(
            problems,
            "telemetry.max_queue",
            "must be between 1 and 1000000",
        );
    }
    let mut headers = Vec::with_capacity(t.headers.len());
    for (name, value) in &t.headers {
        let at = format!("telemetry.headers.{name}");
        match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => headers.push((n, value.clone())),
            Err(_) => problem(
                problems,
                at.clone(),
                format!("'{}' is not a header name", name.escape_default()),
            ),
        }
        // Checked without quoting the value: it is a secret.
        if http::HeaderValue::from_str(value.expose()).is_err() {
            problem(problems, at, "is not a valid header value");
        }
    }
    let endpoint = t.otlp_endpoint.as_ref()?;
    let url = endpoint.as_str();
    match url.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some() => {
            if u.query().is_some() {
                problem(
                    problems,
                    "telemetry.otlp_endpoint",
                    format!("'{}' must not carry a query string", url.escape_default()),
                );
            }
            if u.authority().is_some_and(|a| a.as_str().contains('@')) {
                problem(
                    problems,
                    "telemetry.otlp_endpoint",
                    "must not carry a user or password (use telemetry.headers)",
                );
            }
            let host = u.host().unwrap_or_default();
            if u.scheme_str() == Some("http") && !t.headers.is_empty() && !is_loopback_host(host) {
                problem(
                    problems,
                    "telemetry.headers",
                    format!(
                        "would be sent in the clear to {host}: use an https:// otlp_endpoint \
                         (plain http is only allowed to loopback when headers are set)"
                    ),
                );
            }
        }
        _ => problem(
            problems,
            "telemetry.otlp_endpoint",
            format!(
                "'{}' is not an http:// or https:// URL with a host",
                url.escape_default()
            ),
        ),
    }
    if problems.len() > before {
        return None;
    }
    Some(TelemetrySettings {
        endpoint: traces_url(url),
        service_name: t.service_name.as_str().to_owned(),
        sampling_ratio: t.sampling_ratio,
        headers,
        timeout: t.timeout.0,
        batch_delay: t.batch_delay.0,
        max_queue: t.max_queue,
    })
}
