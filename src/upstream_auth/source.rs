//! Where backend tokens come from: one exchange with an identity provider per call.
//!
//! [`TokenSource`] is the seam between the token cache (scheduling, retries) and the
//! protocols: the OAuth 2.0 client-credentials grant (RFC 6749 4.4) with a client secret,
//! a certificate-signed assertion (RFC 7523) or a federated token file (AKS workload
//! identity), and the Azure managed-identity endpoints (IMDS and App Service / Container
//! Apps). Errors carry a safe message (the IdP's error code and `AADSTS` number, never a
//! response body that could echo a secret) and whether retrying can help.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

use super::assertion::CertificateFile;
use crate::config::Secret;

/// One token as the IdP issued it.
pub struct Fetched {
    pub access_token: String,
    /// Lifetime from the moment the exchange began.
    pub expires_in: Duration,
    /// When the IdP asks for an earlier refresh (`refresh_in`).
    pub refresh_in: Option<Duration>,
}

/// A failed exchange.
#[derive(Debug, Clone)]
pub struct FetchError {
    /// Safe to log and to show on `/ready`.
    pub message: String,
    /// 429, 5xx, timeouts and network errors; a refused credential is not.
    pub retryable: bool,
    /// The IdP's `Retry-After`.
    pub retry_after: Option<Duration>,
}

impl FetchError {
    fn new(message: impl Into<String>, retryable: bool) -> Self {
        Self {
            message: message.into(),
            retryable,
            retry_after: None,
        }
    }
}

/// A future returned by [`TokenSource::fetch`].
pub type FetchFuture<'a> = Pin<Box<dyn Future<Output = Result<Fetched, FetchError>> + Send + 'a>>;

/// Something that can obtain a token for one scope.
pub trait TokenSource: Send + Sync {
    /// Perform one exchange.
    fn fetch(&self) -> FetchFuture<'_>;
}

/// How a client-credentials request proves the client.
pub enum ClientProof {
    /// `client_secret` in the form (Entra) or HTTP Basic.
    Secret { secret: Secret, basic: bool },
    /// An assertion signed with a certificate's key, re-read from disk for each exchange.
    Certificate {
        file: CertificateFile,
        send_x5c: bool,
    },
    /// A token file written by someone else (the kubelet), re-read for each exchange.
    FederatedFile(PathBuf),
}

/// The OAuth 2.0 client-credentials grant against a token endpoint.
pub struct ClientCredentials {
    pub http: reqwest::Client,
    pub token_url: String,
    pub client_id: String,
    pub scope: String,
    pub proof: ClientProof,
}

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

impl ClientCredentials {
    async fn exchange(&self) -> Result<Fetched, FetchError> {
        let mut form: Vec<(&str, String)> = vec![
            ("grant_type", "client_credentials".into()),
            ("scope", self.scope.clone()),
        ];
        let mut basic = None;
        match &self.proof {
            ClientProof::Secret {
                secret,
                basic: true,
            } => basic = Some(secret),
            ClientProof::Secret { secret, .. } => {
                form.push(("client_id", self.client_id.clone()));
                form.push(("client_secret", secret.expose().to_owned()));
            }
            ClientProof::Certificate { file, send_x5c } => {
                let cert = file
                    .current()
                    .map_err(|e| FetchError::new(format!("certificate: {e}"), false))?;
                let assertion = cert
                    .assertion(&self.client_id, &self.token_url, *send_x5c)
                    .map_err(|e| FetchError::new(e, false))?;
                form.push(("client_id", self.client_id.clone()));
                form.push(("client_assertion_type", ASSERTION_TYPE.into()));
                form.push(("client_assertion", assertion));
            }
            ClientProof::FederatedFile(path) => {
                let token = tokio::fs::read_to_string(path).await.map_err(|e| {
                    FetchError::new(
                        format!(
                            "cannot read the federated token file {}: {e}",
                            path.display()
                        ),
                        true,
                    )
                })?;
                let token = token.trim();
                if token.is_empty() {
                    return Err(FetchError::new(
                        format!("the federated token file {} is empty", path.display()),
                        true,
                    ));
                }
                form.push(("client_id", self.client_id.clone()));
                form.push(("client_assertion_type", ASSERTION_TYPE.into()));
                form.push(("client_assertion", token.to_owned()));
            }
        }
        let mut req = self
            .http
            .post(&self.token_url)
            .header(http::header::ACCEPT, "application/json")
            .form(&form);
        if let Some(secret) = basic {
            // RFC 6749 2.3.1: both parts form-urlencoded before Basic encoding.
            req = req.basic_auth(
                form_encode(&self.client_id),
                Some(form_encode(secret.expose())),
            );
        }
        let resp = req.send().await.map_err(network_error)?;
        parse_token_response(resp).await
    }
}

impl TokenSource for ClientCredentials {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(self.exchange())
    }
}

/// Which managed-identity protocol the host speaks.
pub enum ManagedEndpoint {
    /// Azure Instance Metadata Service (VMs, VM scale sets, AKS nodes, Arc via a proxy).
    Imds { url: String },
    /// App Service, Functions and Container Apps (`IDENTITY_ENDPOINT`, `IDENTITY_HEADER`).
    AppService { url: String, header: Secret },
}

/// An Azure managed identity.
pub struct ManagedIdentity {
    pub http: reqwest::Client,
    pub endpoint: ManagedEndpoint,
    /// The resource (the scope without `/.default`).
    pub resource: String,
    /// A user-assigned identity: query parameter name and value.
    pub selector: Option<(&'static str, String)>,
}

impl ManagedIdentity {
    async fn exchange(&self) -> Result<Fetched, FetchError> {
        let mut query: Vec<(&str, &str)> = Vec::with_capacity(3);
        let req = match &self.endpoint {
            ManagedEndpoint::Imds { url } => {
                query.push(("api-version", "2018-02-01"));
                self.http.get(url).header("Metadata", "true")
            }
            ManagedEndpoint::AppService { url, header } => {
                query.push(("api-version", "2019-08-01"));
                let mut v = http::HeaderValue::from_str(header.expose()).map_err(|_| {
                    FetchError::new("IDENTITY_HEADER is not a valid header value", false)
                })?;
                v.set_sensitive(true);
                self.http.get(url).header("X-IDENTITY-HEADER", v)
            }
        };
        query.push(("resource", &self.resource));
        if let Some((k, v)) = &self.selector {
            query.push((k, v));
        }
        let resp = req.query(&query).send().await.map_err(network_error)?;
        parse_token_response(resp).await
    }
}

impl TokenSource for ManagedIdentity {
    fn fetch(&self) -> FetchFuture<'_> {
        Box::pin(self.exchange())
    }
}

/// A token endpoint's answer. Managed-identity endpoints send numbers as strings.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<NumberOrString>,
    expires_on: Option<NumberOrString>,
    refresh_in: Option<NumberOrString>,
}

/// An OAuth error answer.
#[derive(Deserialize)]
struct ErrorResponse {
    error: Option<String>,
    error_description: Option<String>,
    error_codes: Option<Vec<u64>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Number(f64),
    Text(String),
}

impl NumberOrString {
    fn secs(&self) -> Option<u64> {
        match self {
            Self::Number(n) if n.is_finite() && *n >= 0.0 => Some(*n as u64),
            Self::Text(s) => s.trim().parse::<u64>().ok(),
            _ => None,
        }
    }
}

/// Longest token lifetime believed (managed-identity tokens live 24 h).
const MAX_LIFETIME_SECS: u64 = 24 * 3600;

/// Longest response accepted from a token endpoint.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

async fn parse_token_response(resp: reqwest::Response) -> Result<Fetched, FetchError> {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(retry_after);
    let body = read_limited(resp).await?;
    if !status.is_success() {
        let retryable =
            status.as_u16() == 429 || status.is_server_error() || status.as_u16() == 408;
        let mut e = FetchError::new(describe_error(status, &body), retryable);
        e.retry_after = retry_after;
        return Err(e);
    }
    let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
        FetchError::new(
            format!("the token endpoint answered {status} with a body that is not a token response ({:?})", e.classify()),
            true,
        )
    })?;
    let token = parsed
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| FetchError::new("the token response has no access_token", true))?;
    if let Some(t) = parsed.token_type.as_deref() {
        if !t.eq_ignore_ascii_case("bearer") {
            return Err(FetchError::new(
                format!(
                    "the token endpoint issued a '{}' token, not a bearer token",
                    t.chars().take(32).collect::<String>().escape_default()
                ),
                false,
            ));
        }
    }
    // RFC 6750: a token is sent in a header; refuse what cannot be one rather than fail
    // every request later.
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FetchError::new(
            "the access token contains characters not allowed in a header",
            false,
        ));
    }
    let expires_in = match (
        parsed.expires_in.as_ref().and_then(NumberOrString::secs),
        parsed.expires_on.as_ref().and_then(NumberOrString::secs),
    ) {
        (Some(s), _) => s,
        (None, Some(on)) => on.saturating_sub(unix_now()),
        (None, None) => {
            return Err(FetchError::new(
                "the token response says neither expires_in nor expires_on",
                true,
            ))
        }
    };
    if expires_in == 0 {
        return Err(FetchError::new(
            "the IdP issued an already expired token",
            true,
        ));
    }
    // Nobody issues day-long access tokens; a larger value is a bug or an attack, and would
    // overflow deadline arithmetic. Believe at most a day.
    let expires_in = expires_in.min(MAX_LIFETIME_SECS);
    Ok(Fetched {
        access_token: token,
        expires_in: Duration::from_secs(expires_in),
        refresh_in: parsed
            .refresh_in
            .as_ref()
            .and_then(NumberOrString::secs)
            .filter(|&s| s > 0 && s < expires_in)
            .map(Duration::from_secs),
    })
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(network_error)? {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(FetchError::new(
                "the token endpoint's answer is too large",
                true,
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// "the token endpoint answered 401 invalid_client (AADSTS7000215)": the status, the
/// OAuth error code and Entra's error number, which say what is wrong without echoing
/// anything the request carried.
fn describe_error(status: reqwest::StatusCode, body: &[u8]) -> String {
    let mut msg = format!("the token endpoint answered {}", status.as_u16());
    let Ok(e) = serde_json::from_slice::<ErrorResponse>(body) else {
        return msg;
    };
    if let Some(code) = e.error.as_deref().filter(|c| is_token(c)) {
        msg.push(' ');
        msg.push_str(code);
    }
    let aadsts = e.error_codes.and_then(|c| c.first().copied()).or_else(|| {
        let d = e.error_description.as_deref()?;
        let at = d.find("AADSTS")? + 6;
        let digits: String = d[at..].chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    });
    if let Some(n) = aadsts {
        msg.push_str(&format!(" (AADSTS{n})"));
    }
    msg
}

/// An OAuth error code: short, `[a-z_]`.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

fn network_error(e: reqwest::Error) -> FetchError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "failed"
    };
    // Without the URL: the credential's name says which endpoint, and a URL is no place
    // for a reader of logs or /ready to learn anything more.
    let e = e.without_url();
    FetchError::new(
        format!("token request {what}: {}", crate::proxy::error_chain(&e)),
        true,
    )
}

/// `Retry-After`: delay-seconds or an HTTP date (RFC 9110 10.2.3).
fn retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A shared handle to a source.
pub type Source = Arc<dyn TokenSource>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_code_and_aadsts_but_never_echo() {
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided. Ensure the secret being sent is 'hunter2'","error_codes":[7000215]}"#;
        let m = describe_error(reqwest::StatusCode::UNAUTHORIZED, body);
        assert_eq!(
            m,
            "the token endpoint answered 401 invalid_client (AADSTS7000215)"
        );
        let m = describe_error(
            reqwest::StatusCode::BAD_REQUEST,
            br#"{"error":"<script>","error_description":"AADSTS700027: x"}"#,
        );
        assert_eq!(m, "the token endpoint answered 400 (AADSTS700027)");
        let m = describe_error(reqwest::StatusCode::BAD_GATEWAY, b"<html>secret</html>");
        assert_eq!(m, "the token endpoint answered 502");
    }

    #[test]
    fn numbers_as_strings() {
        assert_eq!(NumberOrString::Text(" 3599 ".into()).secs(), Some(3599));
        assert_eq!(NumberOrString::Number(12.0).secs(), Some(12));
        assert_eq!(NumberOrString::Number(-1.0).secs(), None);
        assert_eq!(NumberOrString::Text("soon".into()).secs(), None);
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(retry_after(" 7 "), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let d = retry_after(&later).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        assert_eq!(
            retry_after("Mon, 01 Jan 2001 00:00:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn basic_auth_parts_are_form_encoded() {
        assert_eq!(form_encode("a b+c/d:é"), "a+b%2Bc%2Fd%3A%C3%A9");
    }
}
