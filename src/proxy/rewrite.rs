//! Translation between API dialects: where a request goes on a given backend.
//!
//! A client may speak the Azure data-plane dialect, Azure v1 or the OpenAI dialect to any
//! backend. This module computes the upstream path, query and (only when it must change)
//! the body: the public deployment name is mapped to the backend's own name, `api-version`
//! is added for Azure, and `model` is set in JSON bodies sent to OpenAI-style endpoints.
//! Bodies that need no change are forwarded byte for byte.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;

use super::pool::OriginForm;
use crate::config::BackendKind;
use crate::error::GatewayError;
use crate::route::{Route, Style};
use crate::routing::Backend;

/// Where and what to send upstream.
#[derive(Debug)]
pub struct Upstream {
    /// Origin-form target (`/openai/deployments/x/chat/completions?api-version=...`); the
    /// pool adds the backend's scheme and authority where the protocol needs them (HTTP/2).
    pub target: OriginForm,
    pub body: Bytes,
}

#[derive(Deserialize)]
struct ModelOnly<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
}

/// The boundary of a `multipart/form-data` body, if that is what it is.
pub fn multipart_boundary(content_type: Option<&str>) -> Option<String> {
    let ct = content_type?;
    let (mime, params) = ct.split_once(';').unwrap_or((ct, ""));
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
            .filter(|b| !b.is_empty())
    })
}

/// The `model` named in a request body: the `model` field of a multipart form, or the
/// `model` member of a JSON object. Any other non-empty body is refused: a body the gateway
/// cannot read could name a model the gateway never checked. `Ok(None)` when none is named.
pub fn body_model(
    body: &Bytes,
    content_type: Option<&str>,
) -> Result<Option<String>, GatewayError> {
    if body.is_empty() {
        return Ok(None);
    }
    if let Some(boundary) = multipart_boundary(content_type) {
        return super::multipart::model(body, &boundary);
    }
    match serde_json::from_slice::<ModelOnly<'_>>(body) {
        Ok(m) => Ok(m.model.map(Cow::into_owned)),
        Err(e) if e.is_data() => Err(GatewayError::InvalidRequest(
            "request body must be a JSON object whose `model` is a string".into(),
        )),
        Err(e) => Err(GatewayError::InvalidRequest(format!(
            "request body is not valid JSON: {e}"
        ))),
    }
}

/// Compute the upstream request for `route` on `backend`. `public` is the public
/// deployment name the request resolved to, if any.
pub fn rewrite(
    route: &Route,
    public: Option<&str>,
    backend: &Backend,
    body: &Bytes,
    content_type: Option<&str>,
) -> Result<Upstream, GatewayError> {
    let mapped = public
        .and_then(|p| backend.deployments.get(p))
        .map(String::as_str);
    let base = backend.base_path.as_str();
    // Built by appending into one buffer: this runs for every request and attempt, and
    // `format!` plus a joined query cost several times as much.
    let mut pq = String::with_capacity(
        base.len() + route.rest.len() + route.query.iter().map(|q| q.len() + 1).sum::<usize>() + 80,
    );
    pq.push_str(base);
    let mut set_model = false;
    let mut api_version = None;
    let backend_version = || Some(route.api_version.as_deref().unwrap_or(&backend.api_version));
    match backend.kind {
        BackendKind::Azure => match (route.style, mapped) {
            (Style::AzureDeployments, Some(m)) => {
                api_version = backend_version();
                push_all(&mut pq, &["/openai/deployments/", m, "/", &route.rest]);
            }
            (Style::OpenAi, Some(m)) if route.operation.needs_deployment() => {
                api_version = backend_version();
                push_all(&mut pq, &["/openai/deployments/", m, "/", &route.rest]);
            }
            (Style::AzureV1, _) => {
                set_model = true;
                api_version = route.api_version.as_deref();
                push_all(&mut pq, &["/openai/v1/", &route.rest]);
            }
            _ => {
                set_model = true;
                api_version = backend_version();
                push_all(&mut pq, &["/openai/", &route.rest]);
            }
        },
        BackendKind::Openai => {
            set_model = true;
            let v1 = if base.ends_with("/v1") { "/" } else { "/v1/" };
            push_all(&mut pq, &[v1, &route.rest]);
        }
    }
    let mut sep = "?";
    if let Some(v) = api_version {
        push_all(&mut pq, &[sep, "api-version=", v]);
        sep = "&";
    }
    for q in &route.query {
        push_all(&mut pq, &[sep, q]);
        sep = "&";
    }
    let target = OriginForm::new(pq)
        .map_err(|e| GatewayError::InvalidRequest(format!("cannot build upstream URL: {e}")))?;
    // v1-style routes took `public` from this very body: when it is already the backend's
    // name, the body is right as it is and need not be parsed again.
    let body_names_it = route.deployment.is_none() && public == mapped;
    let body = match mapped {
        Some(m) if set_model && !body_names_it && !body.is_empty() => {
            match multipart_boundary(content_type) {
                Some(boundary) => super::multipart::with_model(body, &boundary, m)?,
                None => with_model(body, m)?,
            }
        }
        _ => body.clone(),
    };
    Ok(Upstream { target, body })
}

fn push_all(buf: &mut String, parts: &[&str]) {
    for p in parts {
        buf.push_str(p);
    }
}

/// `body` with its `model` member set to `model`; the original bytes when it already is.
fn with_model(body: &Bytes, model: &str) -> Result<Bytes, GatewayError> {
    if let Ok(ModelOnly { model: Some(m) }) = serde_json::from_slice::<ModelOnly<'_>>(body) {
        if m == model {
            return Ok(body.clone());
        }
    }
    let mut value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        GatewayError::InvalidRequest(format!("request body is not valid JSON: {e}"))
    })?;
    let obj = value
        .as_object_mut()
        .ok_or_else(|| GatewayError::InvalidRequest("request body must be a JSON object".into()))?;
    obj.insert("model".into(), serde_json::Value::String(model.to_owned()));
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| GatewayError::InvalidRequest(format!("cannot encode request body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::parse;
    use http::Method;

    fn backend(kind: &str, url: &str) -> std::sync::Arc<Backend> {
        let toml = format!(
            "[[backends]]\nname = \"b\"\nurl = \"{url}\"\ntype = \"{kind}\"\napi_version = \"2024-06-01\"\ndeployments = {{ \"gpt-4o\" = \"gpt-4o-ptu\" }}\n"
        );
        let v = crate::config::load_str(&toml, "t", std::path::Path::new(".")).unwrap();
        let creds =
            crate::upstream_auth::BackendCredentials::start(&v, &Default::default()).unwrap();
        crate::routing::BackendTable::build(&v, &creds.credentials, &Default::default())
            .unwrap()
            .backends()[0]
            .clone()
    }

    fn go(kind: &str, url: &str, path: &str, query: Option<&str>, body: &str) -> (String, String) {
        let route = parse(&Method::POST, path, query).unwrap();
        let b = backend(kind, url);
        let up = rewrite(
            &route,
            Some("gpt-4o"),
            &b,
            &Bytes::from(body.to_owned()),
            None,
        )
        .unwrap();
        (
            up.target.as_str().to_owned(),
            String::from_utf8(up.body.to_vec()).unwrap(),
        )
    }

    #[test]
    fn openai_client_to_azure_backend() {
        let body = r#"{"model": "gpt-4o", "messages": []}"#;
        let (uri, out) = go(
            "azure",
            "https://x.openai.azure.com",
            "/v1/chat/completions",
            None,
            body,
        );
        assert_eq!(
            uri,
            "/openai/deployments/gpt-4o-ptu/chat/completions?api-version=2024-06-01"
        );
        assert_eq!(out, body, "body forwarded byte for byte");
    }

    #[test]
    fn azure_client_keeps_its_api_version() {
        let (uri, _) = go(
            "azure",
            "http://127.0.0.1:1",
            "/openai/deployments/gpt-4o/embeddings",
            Some("api-version=2025-01-01-preview&foo=bar"),
            "{}",
        );
        assert_eq!(
            uri,
            "/openai/deployments/gpt-4o-ptu/embeddings?api-version=2025-01-01-preview&foo=bar"
        );
    }

    #[test]
    fn azure_client_to_openai_backend_gets_model_injected() {
        let (uri, out) = go(
            "openai",
            "http://127.0.0.1:1",
            "/openai/deployments/gpt-4o/chat/completions",
            Some("api-version=2024-10-21"),
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        );
        assert_eq!(uri, "/v1/chat/completions");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["model"], "gpt-4o-ptu");
        assert_eq!(v["messages"][0]["content"], "hi");
    }

    #[test]
    fn openai_backend_with_v1_in_url() {
        let (uri, _) = go(
            "openai",
            "http://127.0.0.1:1/v1/",
            "/v1/embeddings",
            None,
            r#"{"model":"gpt-4o"}"#,
        );
        assert_eq!(uri, "/v1/embeddings");
    }

    #[test]
    fn azure_v1_route_maps_model() {
        let (uri, out) = go(
            "azure",
            "http://h:1",
            "/openai/v1/responses",
            None,
            r#"{"model":"gpt-4o","input":"x"}"#,
        );
        assert_eq!(uri, "/openai/v1/responses");
        assert!(out.contains(r#""model":"gpt-4o-ptu""#), "{out}");
    }

    #[test]
    fn finds_model_in_json_and_multipart() {
        let json = Bytes::from_static(br#"{"messages":[],"model":"m1"}"#);
        assert_eq!(
            body_model(&json, Some("application/json"))
                .unwrap()
                .as_deref(),
            Some("m1")
        );
        // curl -d labels JSON as a form: the body decides.
        let ct = Some("application/x-www-form-urlencoded");
        assert_eq!(body_model(&json, ct).unwrap().as_deref(), Some("m1"));
        let form = "--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF\r\n--XX\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XX--\r\n";
        let ct = Some("multipart/form-data; boundary=\"XX\"");
        assert_eq!(
            body_model(&Bytes::from(form), ct).unwrap().as_deref(),
            Some("whisper")
        );
        for bad in [
            &b"{not json"[..],
            br#"{"model":5}"#,
            b"\xef\xbb\xbf{\"model\":\"x\"}",
            b"model=x",
        ] {
            assert!(
                body_model(&Bytes::from_static(bad), None).is_err(),
                "{bad:?}"
            );
        }
    }
}
