//! Prometheus metrics served on the admin listener at `/metrics`.
//!
//! Label sets are small and bounded: operation names, status codes and configured backend
//! names — never a request path, client-supplied string or credential.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of `portcullis_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: &'static str,
    pub status: u16,
    /// Shared with the backend: cloning a label costs a reference count, not a copy.
    pub backend: Arc<String>,
}

/// Labels of `portcullis_request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub operation: &'static str,
    pub backend: Arc<String>,
}

/// Labels of `portcullis_upstream_attempts_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub backend: Arc<String>,
    /// `response`, `connect_error`, `timeout`, `rate_limited`.
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// Every metric the gateway exports.
pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    pub upstream_attempts: Family<AttemptLabels, Counter>,
    pub streams_in_flight: Gauge,
    pub audit_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Create and register all metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by operation, status and backend",
            requests.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time until the response head was sent, by operation and backend",
            latency.clone(),
        );
        let upstream_attempts = Family::<AttemptLabels, Counter>::default();
        registry.register(
            "upstream_attempts",
            "Requests sent to backends, by backend and outcome",
            upstream_attempts.clone(),
        );
        let streams_in_flight = Gauge::default();
        registry.register(
            "streams_in_flight",
            "Response bodies currently being relayed to clients",
            streams_in_flight.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_dropped",
            "Audit records dropped because the writer fell behind",
            audit_dropped.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            upstream_attempts,
            streams_in_flight,
            audit_dropped,
        }
    }

    /// Render in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
