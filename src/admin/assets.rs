//! What the admin listener serves without a token: the admin API's OpenAPI document and
//! the dashboard's static files, embedded in the binary (no CDN, nothing fetched at run
//! time). The page holds no secret: it asks for an admin token and keeps it in the tab's
//! session storage.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::error;
use crate::error::{full, Body};

const OPENAPI: &str = include_str!("openapi.json");

/// Everything the page may load: its own files and the admin API, nothing inline.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `(path, content type, body)` of each dashboard file.
const FILES: &[(&str, &str, &str)] = &[
    (
        "/dashboard/",
        "text/html; charset=utf-8",
        include_str!("dashboard/index.html"),
    ),
    (
        "/dashboard/app.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/app.js"),
    ),
    (
        "/dashboard/app.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/app.css"),
    ),
    (
        "/dashboard/favicon.svg",
        "image/svg+xml",
        include_str!("dashboard/favicon.svg"),
    ),
];

/// `GET /admin/openapi.json`.
pub fn openapi() -> Response<Body> {
    file("application/json", OPENAPI)
}

/// `GET /` and `GET /dashboard`.
pub fn redirect_to_dashboard() -> Response<Body> {
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::FOUND;
    r.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/dashboard/"));
    r
}

/// `GET /dashboard/...`.
pub fn dashboard(path: &str) -> Response<Body> {
    match FILES.iter().find(|(p, _, _)| *p == path) {
        Some((_, content_type, body)) => {
            let mut r = file(content_type, body);
            r.headers_mut().insert(
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            );
            r
        }
        None => error(StatusCode::NOT_FOUND, "not_found", "no such dashboard file"),
    }
}

fn file(content_type: &'static str, body: &'static str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(body.as_bytes())));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
