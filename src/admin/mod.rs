//! The admin listener: the operator's console. Never on the request path.
//!
//! - Open: `/health`, `/ready` (probes), `/admin/openapi.json` (the API's OpenAPI 3.1
//!   document) and the dashboard's static files under `/dashboard/` (embedded in the
//!   binary, served with a Content-Security-Policy that allows nothing but themselves).
//! - Behind an admin token ([`access`]): the JSON API of [`api`] — clients with what their
//!   limits have left, API keys (list, create, rotate, revoke), usage reports and series,
//!   server-rendered charts, refusals by reason, backends, reload — and `/metrics`.
//!
//! Every request to `/admin/*` and `/metrics`, allowed or refused, gets an audit line
//! naming the admin token (never the token itself).

mod access;
mod api;
mod assets;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};

use crate::audit::AdminAuditRecord;
use crate::config::admin::Scope;
use crate::error::{json_response, Body, BoxError};
use crate::gateway::{self, Gateway};
use crate::identify::api_key::{ApiKeys, KeyAdmin};
use crate::reload::Reloader;
use crate::store::Store;

pub use access::Grant;

/// What the admin API manages beyond the gateway itself.
#[derive(Default)]
pub struct Stores {
    /// Issue and revoke keys, and the table this replica checks them against.
    pub keys: Option<(KeyAdmin, Arc<ApiKeys>)>,
    /// Usage records, for reports and charts.
    pub usage: Option<Arc<dyn Store>>,
}

/// Admin request handler. Cheap to clone.
#[derive(Clone)]
pub struct Admin {
    inner: Arc<Inner>,
}

struct Inner {
    gateway: Arc<Gateway>,
    reloader: Arc<Reloader>,
    stores: Stores,
}

/// One admin endpoint, as routed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    WhoAmI,
    Clients,
    Client(String),
    Keys,
    CreateKey,
    RotateKey,
    RevokeKey(String),
    Usage,
    Series,
    UsageChart,
    Refusals,
    RefusalsChart,
    Backends,
    Reload,
    Metrics,
}

impl Endpoint {
    /// Whether it answers on a listener without admin credentials (what was open before
    /// admin tokens existed).
    fn open_without_tokens(&self) -> bool {
        matches!(
            self,
            Endpoint::Backends | Endpoint::Metrics | Endpoint::Reload
        )
    }

    /// The path as audit lines show it: a template, with no id (an operator may paste a
    /// key where its id belongs).
    fn template(&self) -> &'static str {
        match self {
            Endpoint::WhoAmI => "/admin/whoami",
            Endpoint::Clients => "/admin/clients",
            Endpoint::Client(_) => "/admin/clients/{client}",
            Endpoint::Keys | Endpoint::CreateKey => "/admin/keys",
            Endpoint::RotateKey => "/admin/keys/rotate",
            Endpoint::RevokeKey(_) => "/admin/keys/{id}",
            Endpoint::Usage => "/admin/usage",
            Endpoint::Series => "/admin/usage/series",
            Endpoint::UsageChart => "/admin/usage/chart.svg",
            Endpoint::Refusals => "/admin/refusals",
            Endpoint::RefusalsChart => "/admin/refusals/chart.svg",
            Endpoint::Backends => "/admin/backends",
            Endpoint::Reload => "/admin/reload",
            Endpoint::Metrics => "/metrics",
        }
    }

    /// The scope an admin token needs for it (`whoami`: any valid token).
    fn scope(&self) -> Option<Scope> {
        match self {
            Endpoint::WhoAmI => None,
            Endpoint::CreateKey | Endpoint::RotateKey | Endpoint::RevokeKey(_) => Some(Scope::Keys),
            Endpoint::Reload => Some(Scope::Config),
            _ => Some(Scope::Read),
        }
    }
}

/// An answer before any scope was checked: the endpoint, or what to answer instead.
enum Routed {
    Open(Response<Body>),
    Api(Endpoint),
}

impl Admin {
    pub fn new(gateway: Arc<Gateway>, reloader: Arc<Reloader>, stores: Stores) -> Self {
        Self {
            inner: Arc::new(Inner {
                gateway,
                reloader,
                stores,
            }),
        }
    }

    /// Answer one admin request from `peer`.
    pub async fn handle<B>(&self, req: Request<B>, peer: SocketAddr) -> Response<Body>
    where
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let path = req.uri().path();
        let endpoint = match self.route(req.method(), path) {
            Routed::Api(e) => e,
            Routed::Open(r) if path.starts_with("/admin/") || path == "/metrics" => {
                // The API's own 404s, 405s and its document are admin requests too.
                let tokens = self.inner.reloader.admin_tokens().load_full();
                let grant = access::authenticate(&tokens, req.headers());
                let record = self.record(&req, shown_path(path), peer, grant.as_ref());
                return self.finish(r, record, None, false).await;
            }
            Routed::Open(r) => return with_security_headers(r),
        };
        // The work runs in a task of its own: a client that goes away mid-request cannot
        // cut a key change, or a reload, off from its audit line.
        let admin = self.clone();
        let work = tokio::spawn(async move {
            let tokens = admin.inner.reloader.admin_tokens().load_full();
            let grant = access::authenticate(&tokens, req.headers());
            let mut record =
                admin.record(&req, endpoint.template().to_owned(), peer, grant.as_ref());
            record.scope = endpoint.scope().map(Scope::as_str);
            let open = endpoint.open_without_tokens();
            match access::check(grant.as_ref(), req.headers(), endpoint.scope(), open) {
                Err(refusal) => admin.finish(*refusal, record, None, true).await,
                Ok(grant) => {
                    let (r, detail) = api::answer(&admin.inner, grant, endpoint, req).await;
                    admin.finish(r, record, detail, false).await
                }
            }
        });
        match work.await {
            Ok(r) => r,
            Err(_) => with_security_headers(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "the admin request failed; see the gateway's log",
            )),
        }
    }

    /// The audit record of a request, before its answer is known.
    fn record<B>(
        &self,
        req: &Request<B>,
        path: String,
        peer: SocketAddr,
        grant: Option<&Grant>,
    ) -> AdminAuditRecord {
        AdminAuditRecord {
            time: SystemTime::now(),
            kind: "admin",
            request_id: uuid::Uuid::new_v4().simple().to_string(),
            method: req.method().to_string(),
            path,
            peer: peer.to_string(),
            admin_token: grant.and_then(|g| g.name.clone()),
            scope: None,
            decision: "allowed",
            status: 0,
            detail: None,
        }
    }

    /// Write the audit line of `resp` and add the headers every admin answer carries.
    async fn finish(
        &self,
        resp: Response<Body>,
        mut record: AdminAuditRecord,
        detail: Option<serde_json::Value>,
        refused: bool,
    ) -> Response<Body> {
        record.status = resp.status().as_u16();
        record.detail = detail;
        if refused {
            record.decision = "refused";
        }
        let request_id = HeaderValue::from_str(&record.request_id).ok();
        self.inner.gateway.audit().emit_admin(record).await;
        let mut resp = with_security_headers(resp);
        if let Some(v) = request_id {
            resp.headers_mut().insert("x-request-id", v);
        }
        resp
    }

    fn route(&self, method: &Method, path: &str) -> Routed {
        let get = method == Method::GET || method == Method::HEAD;
        let only = |allowed: &'static str, e: Endpoint, ok: bool| {
            if ok {
                Routed::Api(e)
            } else {
                Routed::Open(method_not_allowed(allowed))
            }
        };
        match path {
            "/health" if get => Routed::Open(gateway::health()),
            "/ready" if get => Routed::Open(gateway::ready(self.inner.gateway.readiness())),
            "/admin/openapi.json" if get => Routed::Open(assets::openapi()),
            "/" | "/dashboard" if get => Routed::Open(assets::redirect_to_dashboard()),
            p if p.starts_with("/dashboard/") && get => Routed::Open(assets::dashboard(p)),
            "/health" | "/ready" | "/admin/openapi.json" => Routed::Open(method_not_allowed("GET")),
            "/metrics" => only("GET", Endpoint::Metrics, get),
            "/admin/whoami" => only("GET", Endpoint::WhoAmI, get),
            "/admin/clients" => only("GET", Endpoint::Clients, get),
            "/admin/keys" if method == Method::POST => Routed::Api(Endpoint::CreateKey),
            "/admin/keys" => only("GET, POST", Endpoint::Keys, get),
            "/admin/keys/rotate" => only("POST", Endpoint::RotateKey, method == Method::POST),
            "/admin/usage" => only("GET", Endpoint::Usage, get),
            "/admin/usage/series" => only("GET", Endpoint::Series, get),
            "/admin/usage/chart.svg" => only("GET", Endpoint::UsageChart, get),
            "/admin/refusals" => only("GET", Endpoint::Refusals, get),
            "/admin/refusals/chart.svg" => only("GET", Endpoint::RefusalsChart, get),
            "/admin/backends" => only("GET", Endpoint::Backends, get),
            "/admin/reload" => only("POST", Endpoint::Reload, method == Method::POST),
            p => {
                if let Some(id) = segment(p, "/admin/clients/") {
                    return only("GET", Endpoint::Client(id), get);
                }
                if let Some(id) = segment(p, "/admin/keys/") {
                    return only("DELETE", Endpoint::RevokeKey(id), method == Method::DELETE);
                }
                Routed::Open(error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such admin endpoint (the API is described at /admin/openapi.json)",
                ))
            }
        }
    }
}

/// A path an audit line may show: at most 128 bytes, and none that holds something shaped
/// like an API key.
fn shown_path(path: &str) -> String {
    if path.contains("pcl_") {
        return "[a path holding a key]".into();
    }
    let mut end = path.len().min(128);
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    path[..end].to_owned()
}

/// The one path segment after `prefix`, percent-decoded (`None` if there are more, or the
/// segment is empty or not UTF-8).
fn segment(path: &str, prefix: &str) -> Option<String> {
    let rest = path.strip_prefix(prefix)?;
    if rest.is_empty() || rest.contains('/') {
        return None;
    }
    percent_encoding::percent_decode_str(rest)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

fn method_not_allowed(allowed: &'static str) -> Response<Body> {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("this endpoint answers {allowed}"),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allowed));
    r
}

/// An OpenAI-shaped error.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({
        "error": { "message": message, "type": "invalid_request_error", "code": code, "param": null }
    });
    json_response(status, Bytes::from(body.to_string()))
}

/// Headers every admin answer carries: nothing is cached (answers hold keys and usage),
/// sniffed, framed or sent on as a referrer.
fn with_security_headers(mut r: Response<Body>) -> Response<Body> {
    let h = r.headers_mut();
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}
