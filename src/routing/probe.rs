//! Active health probes: `GET <health.path>` to a backend every `health.interval`, with the
//! backend's credential, on a connection pool of the probe's own (never a worker's).
//!
//! A probe passes when the backend answers within `health.timeout` with a status under 500
//! other than 401 and 403 (a 429 is a busy backend, not a dead one: cool-downs handle it).
//! `unhealthy_after` failures in a row take the backend out of rotation, `healthy_after`
//! passes in a row put it back. A probe task holds its backend weakly and ends with the
//! last snapshot that holds the backend.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{HeaderMap, Method};
use http_body_util::BodyExt;

use super::{Backend, BackendTable};
use crate::config::routing::HealthProbe;
use crate::config::BackendKind;
use crate::proxy::pool::{self, Pool};

/// A backend's probe, resolved from `health = { ... }`.
#[derive(Debug)]
pub struct ProbeSpec {
    /// Path and query under the backend URL.
    pub target: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
    /// Set by [`ProbeSpec::with_pool`] once the backend's connection settings are known.
    pool: Option<Pool>,
}

impl ProbeSpec {
    pub fn new(h: &HealthProbe, kind: BackendKind, base_path: &str, api_version: &str) -> Self {
        let path = match (&h.path, kind) {
            (Some(p), _) => p.as_str().to_owned(),
            (None, BackendKind::Azure) => format!("/openai/models?api-version={api_version}"),
            (None, BackendKind::Openai) => "/v1/models".to_owned(),
        };
        Self {
            target: format!("{base_path}{path}"),
            interval: h.interval.0,
            timeout: h.timeout.0,
            unhealthy_after: h.unhealthy_after,
            healthy_after: h.healthy_after,
            pool: None,
        }
    }

    /// Give the probe its own connections to the backend.
    pub fn with_pool(
        mut self,
        scheme: &http::uri::Scheme,
        authority: &http::uri::Authority,
        opts: &pool::PoolOptions,
    ) -> Result<Self, pool::SetupError> {
        let opts = pool::PoolOptions {
            workers: 1,
            ..opts.clone()
        };
        self.pool = Some(Pool::new(scheme, authority, &opts)?);
        Ok(self)
    }
}

/// Start the probe of every backend of `table` that has one, on the current runtime.
pub fn spawn_all(table: &BackendTable) {
    for b in table.backends() {
        if b.probe.is_some() {
            tokio::spawn(run(Arc::downgrade(b)));
        }
    }
}

async fn run(backend: Weak<Backend>) {
    loop {
        let Some(b) = backend.upgrade() else { return };
        let Some(spec) = &b.probe else { return };
        let interval = spec.interval;
        let result = once(&b).await;
        let ok = result.is_ok();
        b.series.probe(if ok { "pass" } else { "fail" });
        if let Some(healthy) = b
            .health
            .probed(ok, spec.unhealthy_after, spec.healthy_after)
        {
            match &result {
                Ok(()) => {
                    tracing::info!(backend = %b.name, "health probe passes again; backend back in rotation")
                }
                Err(why) => {
                    tracing::warn!(backend = %b.name, reason = %why, "health probe failing; backend out of rotation");
                    b.health.note(&format!("health probe: {why}"));
                }
            }
            debug_assert_eq!(healthy, ok);
        }
        drop(b);
        tokio::time::sleep(interval).await;
    }
}

/// One probe: `Ok` when it passes, else why not.
pub async fn once(b: &Backend) -> Result<(), String> {
    let Some(spec) = &b.probe else {
        return Ok(());
    };
    let Some(pool) = &spec.pool else {
        return Err("no connection pool".into());
    };
    let mut headers = HeaderMap::new();
    match b.credential.header() {
        Ok(Some((name, value))) => {
            headers.insert(name, value);
        }
        Ok(None) => {}
        Err(_) => return Err("the gateway holds no valid credential for it".into()),
    }
    let req = pool::Outbound {
        method: Method::GET,
        target: pool::OriginForm::new(spec.target.clone())
            .map_err(|_| "the probe path is not a valid request target".to_owned())?,
        headers,
        traceparent: None,
        body: bytes::Bytes::new(),
    };
    let exchange = async {
        let resp = pool.send(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        // Read to the end, so the connection can serve the next probe.
        let _ = resp.into_body().collect().await;
        Ok::<u16, String>(status)
    };
    match tokio::time::timeout(spec.timeout, exchange).await {
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(spec.timeout)
        )),
        Ok(Err(e)) => Err(e),
        Ok(Ok(s)) if s >= 500 || s == 401 || s == 403 => Err(format!("answered {s}")),
        Ok(Ok(_)) => Ok(()),
    }
}
