//! A local managed-identity endpoint for the tests, speaking both wire forms Azure has:
//!
//! - IMDS (VMs, AKS node identity): `GET /metadata/identity/oauth2/token?api-version=2018-02-01
//!   &resource=R[&client_id=|&object_id=|&msi_res_id=]` with `Metadata: true`; a request
//!   carrying `X-Forwarded-For` is refused (IMDS only answers the VM itself).
//! - App Service / Container Apps: `GET /msi/token?api-version=2019-08-01&resource=R
//!   [&client_id=|&principal_id=|&mi_res_id=]` with `X-IDENTITY-HEADER: <secret>`
//!   (the `IDENTITY_ENDPOINT` / `IDENTITY_HEADER` pair).
//!
//! The tokens are real: each identity (the system-assigned one and every user-assigned
//! [`Identity`]) is a `client_secret_post` client of the test IdP ([`Idp`]), and a token
//! request becomes a `client_credentials` grant for `scope=R/.default`, so `aud` = R and the
//! simulated backend in bearer mode accepts it. Tokens carry the identity's ids the way Entra
//! puts them in managed-identity tokens: `oid` and `sub` (object id), `appid` (client id),
//! `xms_mirid` (resource id). Nothing is cached: every request is a fresh grant.
//!
//! Answers are shaped like Azure's: every field a string (`"expires_in":"3599"`,
//! `"expires_on":"<epoch seconds>"`), errors `{"error","error_description"}`. Tests can make
//! it fail ([`Msi::set_status`]), shorten token lifetimes ([`Msi::set_token_ttl`]) and read
//! what clients sent ([`Msi::requests`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use portcullis::error::{json_response, Body};
use portcullis::listener::{self, ServeOptions};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::idp::{decode_unverified, form, form_decode, Idp};

/// The IMDS token path.
pub const IMDS_PATH: &str = "/metadata/identity/oauth2/token";
/// The App Service / Container Apps token path (`IDENTITY_ENDPOINT`).
pub const APP_SERVICE_PATH: &str = "/msi/token";
const IMDS_API_VERSION: &str = "2018-02-01";
const APP_SERVICE_API_VERSION: &str = "2019-08-01";

/// A managed identity's ids, as Azure names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The application (client) id: `client_id` in requests and answers, `appid` in tokens.
    pub client_id: String,
    /// The service principal's object id: `object_id` (IMDS) or `principal_id` (App
    /// Service) in requests, `oid` in tokens.
    pub object_id: String,
    /// The ARM resource id: `mi_res_id` in requests, `xms_mirid` in tokens.
    pub mi_res_id: String,
}

impl Identity {
    /// Fresh ids for a user-assigned identity called `name`.
    pub fn user_assigned(name: &str) -> Identity {
        Identity {
            client_id: uuid::Uuid::new_v4().to_string(),
            object_id: uuid::Uuid::new_v4().to_string(),
            mi_res_id: format!(
                "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/portcullis-test/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
            ),
        }
    }

    fn system_assigned() -> Identity {
        Identity {
            mi_res_id: "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/portcullis-test/providers/Microsoft.Compute/virtualMachines/portcullis-test-vm".to_owned(),
            ..Identity::user_assigned("")
        }
    }
}

/// A request the endpoint received, and the status it answered.
#[derive(Debug, Clone)]
pub struct MsiRequest {
    pub method: Method,
    pub path: String,
    /// The decoded query parameters.
    pub query: BTreeMap<String, String>,
    pub headers: HeaderMap,
    pub status: u16,
}

struct State {
    token_endpoint: String,
    http: reqwest::Client,
    identity_header: String,
    system: Identity,
    user_assigned: Vec<Identity>,
    /// client_id → IdP client secret, for every identity.
    secrets: BTreeMap<String, String>,
    status: Mutex<Option<u16>>,
    log: Mutex<Vec<MsiRequest>>,
}

/// A running managed-identity endpoint on loopback; stops when dropped.
pub struct Msi {
    addr: SocketAddr,
    state: Arc<State>,
    _stop: oneshot::Sender<()>,
}

impl Msi {
    /// Register the system-assigned identity and `user_assigned` ones as IdP clients (tokens
    /// valid for an hour) and serve both endpoints on 127.0.0.1.
    pub async fn start(idp: &Idp, user_assigned: &[Identity]) -> Msi {
        let system = Identity::system_assigned();
        let mut secrets = BTreeMap::new();
        for id in std::iter::once(&system).chain(user_assigned) {
            secrets.insert(id.client_id.clone(), uuid::Uuid::new_v4().to_string());
        }
        let state = Arc::new(State {
            token_endpoint: idp.token_endpoint(),
            http: super::http(),
            identity_header: uuid::Uuid::new_v4().to_string(),
            system,
            user_assigned: user_assigned.to_vec(),
            secrets,
            status: Mutex::new(None),
            log: Mutex::new(Vec::new()),
        });
        let msi_state = state.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let svc = move |req: Request<Incoming>, _peer| handle(msi_state.clone(), req);
        let opts = ServeOptions {
            drain_timeout: Duration::from_millis(100),
            ..ServeOptions::default()
        };
        tokio::spawn(listener::serve(listener, svc, opts, async {
            let _ = stopped.await;
        }));
        let msi = Msi {
            addr,
            state,
            _stop: stop,
        };
        msi.set_token_ttl(idp, 3600).await;
        msi
    }

    /// `http://127.0.0.1:PORT/metadata/identity/oauth2/token` (IMDS).
    pub fn imds_url(&self) -> String {
        format!("http://{}{IMDS_PATH}", self.addr)
    }

    /// `http://127.0.0.1:PORT/msi/token` (App Service's `IDENTITY_ENDPOINT`).
    pub fn app_service_url(&self) -> String {
        format!("http://{}{APP_SERVICE_PATH}", self.addr)
    }

    /// The secret App Service requests must carry as `X-IDENTITY-HEADER` (`IDENTITY_HEADER`).
    pub fn identity_header(&self) -> String {
        self.state.identity_header.clone()
    }

    /// The system-assigned identity (used when a request names none).
    pub fn system_identity(&self) -> &Identity {
        &self.state.system
    }

    /// `Some(status)`: answer every request with it (an outage, throttling);
    /// `None`: answer normally again.
    pub fn set_status(&self, status: Option<u16>) {
        *self.state.status.lock().unwrap() = status;
    }

    /// Re-register every identity at the IdP so that new tokens live `secs` seconds.
    pub async fn set_token_ttl(&self, idp: &Idp, secs: u64) {
        let s = &self.state;
        for id in std::iter::once(&s.system).chain(&s.user_assigned) {
            idp.add_client(json!({
                "client_id": id.client_id,
                "client_secret": s.secrets[&id.client_id],
                "token_endpoint_auth_method": "client_secret_post",
                "access_token_ttl": secs,
                "access_token_header": { "typ": "JWT" },
                "access_token_claims": {
                    "sub": id.object_id, "oid": id.object_id, "appid": id.client_id,
                    "xms_mirid": id.mi_res_id, "idtyp": "app",
                },
            }))
            .await;
        }
    }

    /// Requests received so far, oldest first.
    pub fn requests(&self) -> Vec<MsiRequest> {
        self.state.log.lock().unwrap().clone()
    }
}

/// IMDS or App Service: which parameters select a user-assigned identity.
#[derive(Clone, Copy)]
enum Flavor {
    Imds,
    AppService,
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let query: BTreeMap<String, String> = form_decode(req.uri().query().unwrap_or_default())
        .into_iter()
        .collect();
    let (status, body) = answer(&state, &req, &query).await;
    state.log.lock().unwrap().push(MsiRequest {
        method: req.method().clone(),
        path: req.uri().path().to_owned(),
        query,
        headers: req.headers().clone(),
        status: status.as_u16(),
    });
    json_response(status, Bytes::from(body.to_string()))
}

async fn answer(
    state: &State,
    req: &Request<Incoming>,
    query: &BTreeMap<String, String>,
) -> (StatusCode, Value) {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if let Some(s) = *state.status.lock().unwrap() {
        let status = StatusCode::from_u16(s).unwrap();
        return (status, error("service_unavailable", "simulated outage"));
    }
    let flavor = match req.uri().path() {
        IMDS_PATH => Flavor::Imds,
        APP_SERVICE_PATH => Flavor::AppService,
        _ => {
            return (
                StatusCode::NOT_FOUND,
                error("not_found", "no such endpoint"),
            )
        }
    };
    if req.method() != Method::GET {
        let e = error("invalid_request", "only GET is supported");
        return (StatusCode::METHOD_NOT_ALLOWED, e);
    }
    let bad = |why: &str| (StatusCode::BAD_REQUEST, error("invalid_request", why));
    let api_version = query.get("api-version").map(String::as_str);
    match flavor {
        Flavor::Imds => {
            if header("x-forwarded-for").is_some() {
                return bad("Request contains X-Forwarded-For header");
            }
            if !header("metadata").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
                return bad("Required metadata header not specified");
            }
            match api_version {
                None => return bad("Required query variable 'api-version' is missing"),
                Some(IMDS_API_VERSION) => {}
                Some(_) => return bad("Unsupported api-version"),
            }
        }
        Flavor::AppService => {
            if header("x-identity-header") != Some(state.identity_header.as_str()) {
                let e = error("unauthorized", "X-IDENTITY-HEADER is missing or wrong");
                return (StatusCode::UNAUTHORIZED, e);
            }
            match api_version {
                None => return bad("api-version is required"),
                Some(APP_SERVICE_API_VERSION) => {}
                Some(_) => return bad("Unsupported api-version"),
            }
        }
    }
    let Some(resource) = query.get("resource").filter(|r| !r.is_empty()) else {
        return bad("Required audience parameter not specified");
    };
    let identity = match select(state, flavor, query) {
        Ok(id) => id,
        Err(why) => return bad(why),
    };
    match token(state, identity, resource).await {
        Ok((token, exp, nbf)) => {
            let now = jsonwebtoken::get_current_timestamp();
            let expires_in = exp.saturating_sub(now).to_string();
            let body = match flavor {
                Flavor::Imds => json!({
                    "access_token": token,
                    "client_id": identity.client_id,
                    "expires_in": expires_in,
                    "expires_on": exp.to_string(),
                    "ext_expires_in": expires_in,
                    "not_before": nbf.to_string(),
                    "resource": resource,
                    "token_type": "Bearer",
                }),
                Flavor::AppService => json!({
                    "access_token": token,
                    "expires_on": exp.to_string(),
                    "resource": resource,
                    "token_type": "Bearer",
                    "client_id": identity.client_id,
                }),
            };
            (StatusCode::OK, body)
        }
        Err((status, why)) => (status, error("unknown_error", &why)),
    }
}

/// The identity a request names: none → system-assigned; exactly one of the id parameters
/// → that user-assigned identity.
fn select<'a>(
    state: &'a State,
    flavor: Flavor,
    query: &BTreeMap<String, String>,
) -> Result<&'a Identity, &'static str> {
    type Field = fn(&Identity) -> &str;
    let params: &[(&str, Field)] = match flavor {
        Flavor::Imds => &[
            ("client_id", |i| &i.client_id),
            ("object_id", |i| &i.object_id),
            // IMDS documents only this name (App Service's `mi_res_id` is not accepted).
            ("msi_res_id", |i| &i.mi_res_id),
        ],
        Flavor::AppService => &[
            ("client_id", |i| &i.client_id),
            ("principal_id", |i| &i.object_id),
            ("mi_res_id", |i| &i.mi_res_id),
        ],
    };
    let given: Vec<_> = params
        .iter()
        .filter_map(|(name, field)| query.get(*name).map(|v| (v, field)))
        .collect();
    match given.as_slice() {
        [] => Ok(&state.system),
        [(value, field)] => state
            .user_assigned
            .iter()
            .find(|i| field(i).eq_ignore_ascii_case(value))
            .ok_or("Identity not found"),
        _ => Err("Only one of the identity parameters may be specified"),
    }
}

/// A real token for `identity` with `aud` = `resource`, and its `exp` and `nbf` (or `iat`).
async fn token(
    state: &State,
    identity: &Identity,
    resource: &str,
) -> Result<(String, u64, u64), (StatusCode, String)> {
    let scope = format!("{resource}/.default");
    let params = [
        ("grant_type", "client_credentials"),
        ("scope", scope.as_str()),
        ("client_id", identity.client_id.as_str()),
        ("client_secret", state.secrets[&identity.client_id].as_str()),
    ];
    let resp = state
        .http
        .post(&state.token_endpoint)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&params))
        .send()
        .await
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if status != StatusCode::OK {
        // Throttling and outages pass through; anything else is the endpoint's own failure.
        let ours = if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            status
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        return Err((
            ours,
            format!("the identity provider answered {status}: {body}"),
        ));
    }
    let token = body["access_token"].as_str().unwrap_or_default().to_owned();
    let (_, claims) = decode_unverified(&token);
    let exp = claims["exp"].as_u64().unwrap();
    let nbf = claims["nbf"].as_u64().or(claims["iat"].as_u64()).unwrap();
    Ok((token, exp, nbf))
}

fn error(code: &str, description: &str) -> Value {
    json!({ "error": code, "error_description": description })
}
