//! Forward: send the request to a backend and hand back its response head.
//!
//! Client headers are cleaned (hop-by-hop headers and every client credential removed),
//! the backend's credential is added, and candidates are tried in routing order. A
//! request moves to the next candidate only when the backend cannot have processed it
//! (connection failure) or refused it for capacity (429); anything else is the answer.
//! The response body is relayed by [`body::Relay`] without buffering.

pub mod body;
pub mod h1;
pub mod multipart;
pub mod pool;
pub mod rewrite;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::error::GatewayError;
use crate::route::Route;
use crate::routing::Backend;

/// Whether a header describes the connection rather than the message (RFC 9110 §7.6.1).
/// Matched on the (lower-case) name: comparing strings costs less than building and
/// comparing `HeaderName` values, and this runs for every header of every message.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Client headers that carry the client's credentials, or choose which account the
/// gateway's credential bills (`OpenAI-Organization`, `OpenAI-Project`): never sent upstream.
fn is_client_credential(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization"
            | "api-key"
            | "cookie"
            | "ocp-apim-subscription-key"
            | "x-api-key"
            | "x-goog-api-key"
            | "openai-organization"
            | "openai-project"
    )
}

/// The request id header, taken from the client or generated.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers named as hop-by-hop by the `Connection` header(s) (rare: parsed only when present).
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        // `keep-alive` (what most servers send) names a header removed anyway: not parsed.
        .filter(|n| !n.eq_ignore_ascii_case("keep-alive"))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect()
}

/// Remove hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    remove_where(headers, |_| false);
}

/// The client's headers as they may go upstream: no hop-by-hop headers, no client
/// credentials, no `Host` (set from the backend URL), no stale `Content-Length`, no
/// `Expect` (the gateway answered it and holds the whole body), and the request id the
/// gateway settled on.
pub fn upstream_headers(mut client: HeaderMap, request_id: &HeaderValue) -> HeaderMap {
    remove_where(&mut client, |n| {
        is_client_credential(n)
            || n == header::HOST
            || n == header::CONTENT_LENGTH
            || n == header::EXPECT
    });
    client.insert(REQUEST_ID.clone(), request_id.clone());
    client
}

/// Remove every hop-by-hop header, any header the `Connection` header names, and those
/// `also` selects. One pass over the names finds the few to remove (typically `Host` and
/// `Content-Length` on requests, `Connection: keep-alive` on responses); only they are
/// looked up again. This runs twice per request: cheaper than rebuilding the map.
fn remove_where(headers: &mut HeaderMap, also: fn(&HeaderName) -> bool) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    let mut has_connection = false;
    for name in headers.keys() {
        if is_hop_by_hop(name) || also(name) {
            has_connection |= name == header::CONNECTION;
            doomed.push(name.clone());
        }
    }
    if has_connection {
        doomed.extend(connection_named(headers));
    }
    for name in doomed {
        headers.remove(name);
    }
}

/// One request to forward.
pub struct Outgoing<'a> {
    pub route: &'a Route,
    /// The public deployment name the request resolved to.
    pub deployment: Option<&'a str>,
    pub method: &'a Method,
    /// Headers already cleaned by [`upstream_headers`].
    pub headers: HeaderMap,
    pub body: Bytes,
    pub content_type: Option<&'a str>,
}

/// A backend's answer and who gave it.
pub struct Answer {
    /// The body holds an HTTP/1.1 connection until it has been read; see [`pool`].
    pub response: Response<pool::ResponseBody>,
    pub backend: Arc<Backend>,
    pub attempts: u32,
}

/// A failed forward, with the last backend tried (for audit and metrics).
pub struct Failed {
    pub error: GatewayError,
    pub backend: Option<Arc<Backend>>,
    pub attempts: u32,
}

/// Try `candidates` in order until one answers.
pub async fn forward(
    mut out: Outgoing<'_>,
    candidates: Vec<Arc<Backend>>,
) -> Result<Answer, Failed> {
    let total = candidates.len();
    let mut last_error = GatewayError::BackendUnavailable("no backend available".into());
    let mut last_backend = None;
    let mut attempts = 0u32;
    // A 429 kept in case no later candidate answers at all.
    let mut rate_limited: Option<Answer> = None;
    for (i, backend) in candidates.into_iter().enumerate() {
        let is_last = i + 1 == total;
        // Read once: the token applied is the one checked (it may expire meanwhile).
        let Ok(credential) = backend.credential.header() else {
            record(&backend, "credential_unavailable");
            last_error = GatewayError::BackendAuthUnavailable(format!(
                "the gateway holds no valid credential for backend '{}'",
                backend.name
            ));
            last_backend = Some(backend);
            continue;
        };
        let up = match rewrite::rewrite(
            out.route,
            out.deployment,
            &backend,
            &out.body,
            out.content_type,
        ) {
            Ok(u) => u,
            Err(error) => {
                return Err(Failed {
                    error,
                    backend: Some(backend),
                    attempts,
                })
            }
        };
        // Only a failover needs the headers again: the last candidate takes them.
        let mut headers = if is_last {
            std::mem::take(&mut out.headers)
        } else {
            out.headers.clone()
        };
        if !up.body.is_empty() || out.method == Method::POST || out.method == Method::PUT {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(up.body.len()));
        }
        if let Some((name, value)) = credential {
            headers.insert(name, value);
        }
        let req = pool::Outbound {
            method: out.method.clone(),
            target: up.target,
            headers,
            body: up.body,
        };
        attempts += 1;
        let sent = tokio::time::timeout(backend.first_byte_timeout, backend.pool.send(req)).await;
        let outcome = match sent {
            Ok(Ok(resp)) => {
                if resp.status() == StatusCode::TOO_MANY_REQUESTS && !is_last {
                    record(&backend, "rate_limited");
                    tracing::info!(backend = %backend.name, "backend answered 429; trying the next one");
                    rate_limited = Some(Answer {
                        response: resp,
                        backend,
                        attempts,
                    });
                    continue;
                }
                record(&backend, "response");
                return Ok(Answer {
                    response: resp,
                    backend,
                    attempts,
                });
            }
            Ok(Err(e)) if e.is_connect() => {
                record(&backend, "connect_error");
                tracing::warn!(backend = %backend.name, error = %error_chain(&e), "cannot connect to backend");
                GatewayError::BackendUnavailable(format!(
                    "cannot connect to backend '{}'",
                    backend.name
                ))
            }
            Ok(Err(e)) => {
                record(&backend, "error");
                tracing::warn!(backend = %backend.name, error = %error_chain(&e), "backend request failed");
                // The backend may have processed it: never resend.
                return Err(Failed {
                    error: GatewayError::BackendUnavailable(format!(
                        "backend '{}' closed the connection before answering",
                        backend.name
                    )),
                    backend: Some(backend),
                    attempts,
                });
            }
            Err(_) => {
                record(&backend, "timeout");
                return Err(Failed {
                    error: GatewayError::BackendTimeout(
                        humantime::format_duration(backend.first_byte_timeout).to_string(),
                    ),
                    backend: Some(backend),
                    attempts,
                });
            }
        };
        last_error = outcome;
        last_backend = Some(backend);
    }
    if let Some(mut answer) = rate_limited {
        answer.attempts = attempts;
        return Ok(answer);
    }
    Err(Failed {
        error: last_error,
        backend: last_backend,
        attempts,
    })
}

fn record(backend: &Backend, outcome: &'static str) {
    backend.series.attempt(outcome);
}

/// `error: cause: cause` — for logs. Never contains request data.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_headers_drop_credentials_and_hop_by_hop() {
        let mut c = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer client"),
            ("api-key", "client-key"),
            ("cookie", "a=b"),
            ("ocp-apim-subscription-key", "sub"),
            ("x-api-key", "k"),
            ("openai-organization", "org-other"),
            ("openai-project", "proj-other"),
            ("host", "gateway"),
            ("content-length", "10"),
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "hop"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("x-request-id", "old"),
            ("accept", "application/json"),
            ("x-ms-useragent", "sdk"),
        ] {
            c.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        c.append("accept", HeaderValue::from_static("text/event-stream"));
        let h = upstream_headers(c, &HeaderValue::from_static("rid"));
        // The order of differently named fields carries no meaning (RFC 9110 §5.3).
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "x-ms-useragent", "x-request-id"]);
        assert_eq!(
            h.get_all("accept").iter().count(),
            2,
            "repeated headers kept"
        );
        assert_eq!(h["x-request-id"], "rid");
    }

    #[test]
    fn strip_hop_by_hop_on_responses() {
        let mut r = HeaderMap::new();
        r.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        r.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("9"),
        );
        let before = r.clone();
        strip_hop_by_hop(&mut r);
        assert_eq!(r, before, "nothing to strip, nothing changed");
        r.insert("connection", HeaderValue::from_static("close, x-hop"));
        r.insert("x-hop", HeaderValue::from_static("1"));
        r.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        strip_hop_by_hop(&mut r);
        assert_eq!(r, before);
    }
}
