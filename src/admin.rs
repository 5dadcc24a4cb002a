//! The admin listener: `/metrics` (Prometheus text), `/health`, `/ready` (with every
//! reason in full) and `GET /admin/backends` (each backend's pool position, credential,
//! circuit, probe, in-flight requests, last error, and per deployment its cool-down and
//! last reported rate-limit room).
//!
//! It only reads gateway state and never sits on the request path. When `admin.token` is
//! set, `/metrics` and `/admin/*` require `Authorization: Bearer <token>` (compared in
//! constant time); health and readiness stay open for probes.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use subtle::ConstantTimeEq;

use crate::config::Secret;
use crate::error::{full, json_response, Body};
use crate::gateway::{self, Gateway};

/// Admin request handler.
#[derive(Clone)]
pub struct Admin {
    gateway: Arc<Gateway>,
    token: Option<Arc<Secret>>,
}

impl Admin {
    pub fn new(gateway: Arc<Gateway>, token: Option<Secret>) -> Self {
        Self {
            gateway,
            token: token.map(Arc::new),
        }
    }

    /// Answer one admin request.
    pub fn handle<B>(&self, req: &Request<B>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/health") => gateway::health(),
            (&Method::GET, "/ready") => gateway::ready(self.gateway.readiness()),
            (&Method::GET, "/admin/backends") => {
                if !self.authorized(req.headers()) {
                    return unauthorized();
                }
                json_response(
                    StatusCode::OK,
                    Bytes::from(self.gateway.backends_view().to_string()),
                )
            }
            (&Method::GET, "/metrics") => {
                if !self.authorized(req.headers()) {
                    return unauthorized();
                }
                let mut r = Response::new(full(self.gateway.metrics.render()));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                r
            }
            _ => admin_error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
        }
    }

    fn authorized(&self, headers: &http::HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        bool::from(given.as_bytes().ct_eq(token.expose().as_bytes()))
    }
}

/// 401 for a missing or wrong admin token, with its challenge.
fn unauthorized() -> Response<Body> {
    let mut r = admin_error(
        StatusCode::UNAUTHORIZED,
        "missing_credentials",
        "admin token required",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"portcullis-admin\""),
    );
    r
}

fn admin_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "error": { "message": message, "type": "invalid_request_error", "code": code, "param": null }
    });
    json_response(status, Bytes::from(body.to_string()))
}
