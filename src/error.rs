//! Errors the gateway itself answers with, and the one place they become HTTP responses.
//!
//! Every refusal a client sees is OpenAI-shaped:
//! `{"error":{"message":...,"type":...,"code":...,"param":null}}` with a stable `code`
//! (documented in the README). Upstream errors never pass through here: they reach the
//! client unchanged.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};

/// The body type every gateway response uses: either a buffered body or an upstream stream.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;
/// Boxed error carried by response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A refusal or failure produced by the gateway, with its stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    /// The path is not one the gateway serves.
    #[error("no route for {method} {path}")]
    NotFound { method: String, path: String },
    /// The request names a deployment or model no backend serves.
    #[error("the deployment '{0}' does not exist or is not served by this gateway")]
    UnknownDeployment(String),
    /// The request cannot be understood (bad JSON, missing model, ...).
    #[error("{0}")]
    InvalidRequest(String),
    /// The method is not one the operation uses (405, with `Allow`).
    #[error("method {method} is not allowed here")]
    MethodNotAllowed {
        method: String,
        allow: &'static [Method],
    },
    /// The client did not send its body within `server.body_timeout`.
    #[error("the request body did not arrive within {0}")]
    RequestTimeout(String),
    /// The request body is over `server.max_body_bytes`.
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    /// No backend could be reached (connection refused, reset, TLS failure, ...).
    #[error("no backend could serve the request: {0}")]
    BackendUnavailable(String),
    /// The backend did not answer in time.
    #[error("the backend did not respond within {0}")]
    BackendTimeout(String),
    /// No valid credential: 401 with a `WWW-Authenticate: Bearer` challenge.
    #[error("{message}")]
    Unauthenticated {
        /// `missing_credentials`, `invalid_token`, `token_expired` or
        /// `invalid_client_certificate`.
        code: &'static str,
        /// RFC 6750 `error` attribute of the challenge (`None` when nothing was presented).
        bearer_error: Option<&'static str>,
        message: String,
    },
    /// The caller is known but its client may not do this.
    #[error("{0}")]
    ClientNotAllowed(String),
    /// A client certificate and a header credential on one request name different clients.
    #[error("{0}")]
    IdentityMismatch(String),
    /// The caller's token lacks scopes or roles the deployment requires.
    #[error("the deployment '{deployment}' requires the scope or role: {scope}")]
    InsufficientScope { deployment: String, scope: String },
    /// The gateway cannot hold the credential it needs for any backend that could serve.
    #[error("the gateway cannot authenticate to the backend: {0}")]
    BackendAuthUnavailable(String),
    /// The backend's answer cannot be relayed (a status outside 100–599, a broken body).
    #[error("the backend sent an invalid response: {0}")]
    BackendInvalidResponse(String),
    /// The gateway holds as many request bodies as `server.max_buffered_body_bytes` allows,
    /// and none was released in time.
    #[error("the gateway is overloaded; retry after {}s", retry_secs(*.retry_after))]
    Overloaded { retry_after: Duration },
    /// The client has `max_concurrent_requests` requests (or open streams) already.
    #[error("client '{client}' already has {limit} requests in flight, its limit of concurrent requests")]
    TooManyConcurrentRequests { client: String, limit: u32 },
    /// A `requests_per_minute` limit is reached (429).
    #[error("rate limit reached for {scope}: {limit} requests per minute; retry after {}s", retry_secs(*.retry_after))]
    RateLimitExceeded {
        scope: String,
        limit: u64,
        retry_after: Duration,
    },
    /// A `tokens_per_minute` limit is reached (429).
    #[error("token rate limit reached for {scope}: {limit} tokens per minute, this request needs {requested}; retry after {}s", retry_secs(*.retry_after))]
    TokenLimitExceeded {
        scope: String,
        limit: u64,
        requested: u64,
        retry_after: Duration,
    },
    /// A `token_quota` is used up until its period ends (403: retrying cannot help).
    #[error("token quota of {} used up: {} tokens per {}, this request needs {}; the quota resets at {}", .0.scope, .0.limit, .0.period, .0.requested, .0.reset)]
    QuotaExceeded(Box<PeriodRefusal>),
    /// A `budget` is spent until its period ends (403). Amounts in micro-USD.
    #[error("budget of {} spent: {:.2} USD per {}; the budget resets at {}", .0.scope, .0.limit as f64 / 1e6, .0.period, .0.reset)]
    BudgetExceeded(Box<PeriodRefusal>),
    /// The request alone needs more than a limit allows: it can never fit (400).
    #[error("this request needs {} {unit}, more than the {} {unit} {} of {} allows; lower max_tokens (or max_completion_tokens) or shorten the prompt", .0.requested, .0.limit, .0.what, .0.scope, unit = .0.unit)]
    RequestTooLargeForLimit(Box<TooLarge>),
    /// Every backend that serves the deployment is cooling down after a 429: nothing was
    /// sent upstream (429, `retry-after` = the shortest remaining wait).
    #[error("every backend serving '{deployment}' is at capacity; retry after {}s", retry_secs(*.retry_after))]
    BackendsBusy {
        deployment: String,
        retry_after: Duration,
    },
    /// No backend that serves the deployment is usable now: circuits open, probes failing,
    /// or all at their `max_concurrent` (503).
    #[error("no backend can take the request now: {reason}; retry after {}s", retry_secs(*.retry_after))]
    NoUsableBackend {
        reason: String,
        retry_after: Duration,
    },
    /// The shared limit counters (Redis) cannot be reached and `on_redis_error` is
    /// `fail_closed` (503).
    #[error("limits cannot be checked right now; retry after 1s")]
    LimitsUnavailable,
}

/// A quota or budget refusal: whose, how much, and when its period ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodRefusal {
    pub scope: String,
    pub limit: u64,
    pub requested: u64,
    pub period: &'static str,
    /// RFC 3339 time the period ends.
    pub reset: String,
    pub retry_after: Duration,
}

/// A request larger than a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    pub scope: String,
    pub what: &'static str,
    pub unit: &'static str,
    pub requested: u64,
    pub limit: u64,
}

/// Whole seconds for `retry-after`, never 0 (a client would retry at once).
fn retry_secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000).max(1) as u64
}

impl GatewayError {
    /// HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound { .. } | Self::UnknownDeployment(_) => StatusCode::NOT_FOUND,
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BackendUnavailable(_) | Self::BackendInvalidResponse(_) => {
                StatusCode::BAD_GATEWAY
            }
            Self::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooManyConcurrentRequests { .. }
            | Self::RateLimitExceeded { .. }
            | Self::TokenLimitExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::QuotaExceeded(_) | Self::BudgetExceeded(_) => StatusCode::FORBIDDEN,
            Self::RequestTooLargeForLimit(_) => StatusCode::BAD_REQUEST,
            Self::LimitsUnavailable | Self::NoUsableBackend { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::BackendsBusy { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::BackendTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::BackendAuthUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::ClientNotAllowed(_)
            | Self::IdentityMismatch(_)
            | Self::InsufficientScope { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// Stable machine-readable code (the `error.code` field).
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::UnknownDeployment(_) => "unknown_deployment",
            Self::InvalidRequest(_) => "invalid_request",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::RequestTimeout(_) => "request_timeout",
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::BackendUnavailable(_) => "backend_unavailable",
            Self::BackendTimeout(_) => "backend_timeout",
            Self::BackendAuthUnavailable(_) => "backend_auth_unavailable",
            Self::BackendInvalidResponse(_) => "backend_invalid_response",
            Self::Overloaded { .. } => "overloaded",
            Self::TooManyConcurrentRequests { .. } => "too_many_concurrent_requests",
            Self::RateLimitExceeded { .. } => "rate_limit_exceeded",
            Self::TokenLimitExceeded { .. } => "token_limit_exceeded",
            Self::QuotaExceeded(_) => "quota_exceeded",
            Self::BudgetExceeded(_) => "budget_exceeded",
            Self::RequestTooLargeForLimit(_) => "request_too_large_for_limit",
            Self::LimitsUnavailable => "limits_unavailable",
            Self::BackendsBusy { .. } => "backends_busy",
            Self::NoUsableBackend { .. } => "no_usable_backend",
            Self::Unauthenticated { code, .. } => code,
            Self::ClientNotAllowed(_) => "client_not_allowed",
            Self::IdentityMismatch(_) => "identity_mismatch",
            Self::InsufficientScope { .. } => "insufficient_scope",
        }
    }

    /// OpenAI's coarse `error.type` for this error.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NotFound { .. }
            | Self::UnknownDeployment(_)
            | Self::InvalidRequest(_)
            | Self::MethodNotAllowed { .. }
            | Self::RequestTimeout(_)
            | Self::PayloadTooLarge { .. }
            | Self::RequestTooLargeForLimit(_) => "invalid_request_error",
            Self::BackendUnavailable(_)
            | Self::BackendTimeout(_)
            | Self::BackendAuthUnavailable(_)
            | Self::BackendInvalidResponse(_)
            | Self::Overloaded { .. }
            | Self::NoUsableBackend { .. }
            | Self::LimitsUnavailable => "api_error",
            Self::BackendsBusy { .. } => "requests",
            // OpenAI's `type` for request-count and token-count limits.
            Self::TooManyConcurrentRequests { .. } | Self::RateLimitExceeded { .. } => "requests",
            Self::TokenLimitExceeded { .. } => "tokens",
            Self::QuotaExceeded(_) | Self::BudgetExceeded(_) => "insufficient_quota",
            Self::Unauthenticated { .. } => "authentication_error",
            Self::ClientNotAllowed(_)
            | Self::IdentityMismatch(_)
            | Self::InsufficientScope { .. } => "permission_error",
        }
    }

    /// Whether this is an access decision (authentication or authorization refused).
    pub fn is_access_denial(&self) -> bool {
        matches!(
            self,
            Self::Unauthenticated { .. }
                | Self::ClientNotAllowed(_)
                | Self::IdentityMismatch(_)
                | Self::InsufficientScope { .. }
        )
    }

    /// Whether the response carries a `WWW-Authenticate` challenge.
    pub fn challenges(&self) -> bool {
        matches!(
            self,
            Self::Unauthenticated { .. } | Self::InsufficientScope { .. }
        )
    }

    /// The OpenAI-shaped JSON body.
    pub fn body(&self) -> Bytes {
        let v = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "code": self.code(),
                "param": serde_json::Value::Null,
            }
        });
        Bytes::from(v.to_string())
    }

    /// Render as a complete HTTP response. `resource_metadata` is the URL of this
    /// gateway's RFC 9728 document, named in `WWW-Authenticate` challenges.
    pub fn into_response(self, resource_metadata: Option<&str>) -> Response<Body> {
        let mut resp = json_response(self.status(), self.body());
        if let Some(challenge) = self.challenge(resource_metadata) {
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
        }
        let h = resp.headers_mut();
        match &self {
            Self::MethodNotAllowed { allow, .. } => {
                let list: Vec<&str> = allow.iter().map(Method::as_str).collect();
                if let Ok(v) = HeaderValue::from_str(&list.join(", ")) {
                    h.insert(header::ALLOW, v);
                }
            }
            Self::Overloaded { retry_after } => retry_after_headers(h, *retry_after),
            Self::TooManyConcurrentRequests { .. } | Self::LimitsUnavailable => {
                retry_after_headers(h, Duration::from_secs(1));
            }
            Self::RateLimitExceeded { retry_after, .. }
            | Self::TokenLimitExceeded { retry_after, .. }
            | Self::BackendsBusy { retry_after, .. }
            | Self::NoUsableBackend { retry_after, .. } => retry_after_headers(h, *retry_after),
            Self::QuotaExceeded(r) | Self::BudgetExceeded(r) => {
                retry_after_headers(h, r.retry_after);
            }
            _ => {}
        }
        resp
    }

    /// The RFC 6750 `WWW-Authenticate` challenge for 401s and scope refusals.
    fn challenge(&self, resource_metadata: Option<&str>) -> Option<String> {
        let mut c = String::from("Bearer realm=\"portcullis\"");
        match self {
            Self::Unauthenticated { bearer_error, .. } => {
                if let Some(e) = bearer_error {
                    c.push_str(&format!(
                        ", error=\"{e}\", error_description=\"{}\"",
                        quoted(&self.to_string())
                    ));
                }
            }
            Self::InsufficientScope { scope, .. } => c.push_str(&format!(
                ", error=\"insufficient_scope\", error_description=\"{}\", scope=\"{}\"",
                quoted(&self.to_string()),
                quoted(scope)
            )),
            _ => return None,
        }
        if let Some(url) = resource_metadata {
            c.push_str(&format!(", resource_metadata=\"{}\"", quoted(url)));
        }
        Some(c)
    }
}

/// `retry-after` (whole seconds, rounded up) and `retry-after-ms`, as Azure OpenAI sends them
/// and the OpenAI SDKs read them.
pub fn retry_after_headers(h: &mut http::HeaderMap, after: Duration) {
    h.insert(header::RETRY_AFTER, HeaderValue::from(retry_secs(after)));
    h.insert(
        http::HeaderName::from_static("retry-after-ms"),
        HeaderValue::from(after.as_millis().max(1) as u64),
    );
}

/// Text safe inside an RFC 7230 quoted-string (and a header value): printable ASCII
/// without `"` or `\\`.
fn quoted(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            c if c.is_ascii_graphic() || c == ' ' => c,
            _ => '?',
        })
        .collect()
}

/// A buffered JSON response.
pub fn json_response(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A buffered body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_is_openai_shaped() {
        let e = GatewayError::PayloadTooLarge { limit: 10 };
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "payload_too_large");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
        assert_eq!(e.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn refusals_carry_allow_and_retry_after() {
        let r = GatewayError::MethodNotAllowed {
            method: "FOO".into(),
            allow: &[Method::GET, Method::POST],
        }
        .into_response(None);
        assert_eq!(r.status(), 405);
        assert_eq!(r.headers()["allow"], "GET, POST");
        let r = GatewayError::Overloaded {
            retry_after: Duration::from_millis(1500),
        }
        .into_response(None);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["retry-after-ms"], "1500");
    }
}
