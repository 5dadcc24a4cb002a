//! The admin listener: `/metrics` (Prometheus text), `/health`, `/ready` (with every
//! reason in full), `GET /admin/backends` (each backend's pool position, credential,
//! circuit, probe, in-flight requests, last error, and per deployment its cool-down and
//! last reported rate-limit room) and `POST /admin/reload`.
//!
//! It only reads gateway state and never sits on the request path. When `admin.token` is
//! set, `/metrics` and `/admin/*` require `Authorization: Bearer <token>` (compared in
//! constant time; the token is the one of the configuration applied last); health and
//! readiness stay open for probes.
//!
//! `POST /admin/reload` reloads the configuration file ([`crate::reload`]) and answers its
//! [`crate::reload::Outcome`] as JSON: 200 when applied (with `restart_required` listing
//! start-time-only keys that changed), 422 when rejected (with `errors`, each with its key
//! path and line).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use subtle::ConstantTimeEq;

use crate::error::{full, json_response, Body};
use crate::gateway::{self, Gateway};
use crate::reload::{Reloader, Trigger};

/// Admin request handler.
#[derive(Clone)]
pub struct Admin {
    gateway: Arc<Gateway>,
    reloader: Arc<Reloader>,
}

impl Admin {
    pub fn new(gateway: Arc<Gateway>, reloader: Arc<Reloader>) -> Self {
        Self { gateway, reloader }
    }

    /// Answer one admin request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body> {
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
            (&Method::POST, "/admin/reload") => {
                if !self.authorized(req.headers()) {
                    return unauthorized();
                }
                let outcome = self.reloader.reload(Trigger::Admin).await;
                let status = if outcome.applied() {
                    StatusCode::OK
                } else {
                    StatusCode::UNPROCESSABLE_ENTITY
                };
                let body = serde_json::to_vec(&outcome).unwrap_or_default();
                json_response(status, Bytes::from(body))
            }
            (_, "/admin/reload") => admin_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "use POST /admin/reload",
            ),
            _ => admin_error(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
        }
    }

    fn authorized(&self, headers: &http::HeaderMap) -> bool {
        let token = self.reloader.admin_token();
        let token = token.load();
        let Some(token) = token.as_ref() else {
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
