//! Translation between API dialects: where a request goes on a given backend.
//!
//! A client may speak the Azure data-plane dialect, Azure v1 or the OpenAI dialect to any
//! backend. This module computes the upstream path, query and (only when it must change)
//! the body: the public deployment name is mapped to the backend's own name, `api-version`
//! is added for Azure, and `model` is set in JSON bodies sent to OpenAI-style endpoints.
//! Bodies that need no change are forwarded byte for byte.

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;

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

/// The `model` named in a request body: the `model` field of a multipart form, or the
/// `model` member of a JSON object. Any other non-empty body is refused: a body the gateway
/// cannot read could name a model the gateway never checked. So is a `model` that is not a
/// string (`null` included: some backends fall back to a default model) and a member whose
/// name is `model` in another case (`Model`, `MODEL`: case-insensitive deserialisers, as in
/// .NET, take it as the model). `Ok(None)` when none is named.
pub fn body_model(
    body: &Bytes,
    content_type: Option<&str>,
) -> Result<Option<String>, GatewayError> {
    if body.is_empty() {
        return Ok(None);
    }
    if let Some(boundary) = super::multipart::boundary(content_type)? {
        return super::multipart::model(body, &boundary);
    }
    Ok(json_model(body)?.map(|(m, _)| m))
}

/// The top-level `model` of a JSON object body and the byte range of its value (the
/// quoted string as written), read without building the document.
fn json_model(body: &[u8]) -> Result<Option<(String, Range<usize>)>, GatewayError> {
    use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
    use serde_json::value::RawValue;

    /// Why a body was refused, carried through serde's error type.
    const NOT_A_STRING: &str = "portcullis: model is not a string";
    const OTHER_CASE: &str = "portcullis: model in another case";
    const TWICE: &str = "portcullis: model twice";

    /// Where the body's text starts, to turn the raw value's slice into an offset.
    struct Top {
        base: usize,
        len: usize,
    }
    impl<'de> Visitor<'de> for Top {
        type Value = Option<(String, Range<usize>)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut model = None;
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                if key == "model" {
                    let raw: &'de RawValue = map.next_value()?;
                    let text = raw.get();
                    let m: String =
                        serde_json::from_str(text).map_err(|_| de::Error::custom(NOT_A_STRING))?;
                    // A borrowed raw value is a slice of the body itself.
                    let at = (text.as_ptr() as usize)
                        .checked_sub(self.base)
                        .filter(|at| at + text.len() <= self.len)
                        .ok_or_else(|| de::Error::custom(NOT_A_STRING))?;
                    if model.replace((m, at..at + text.len())).is_some() {
                        return Err(de::Error::custom(TWICE));
                    }
                } else if key.eq_ignore_ascii_case("model") {
                    return Err(de::Error::custom(OTHER_CASE));
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(model)
        }
    }

    // JSON is UTF-8 (RFC 8259 §8.1). Checked whole: skipping a member does not look inside
    // its strings, and a body the gateway let through should mean the same to every parser.
    let text = std::str::from_utf8(body)
        .map_err(|_| GatewayError::InvalidRequest("request body is not valid UTF-8".into()))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let top = Top {
        base: text.as_ptr() as usize,
        len: text.len(),
    };
    let result = (&mut de)
        .deserialize_map(top)
        .and_then(|m| de.end().map(|()| m));
    result.map_err(|e| {
        let text = e.to_string();
        let msg = if text.starts_with(NOT_A_STRING) {
            "`model` must be a string naming a deployment".to_owned()
        } else if text.starts_with(OTHER_CASE) {
            "the request body names `model` in another case: write it as `model`".to_owned()
        } else if text.starts_with(TWICE) {
            "the request body has more than one `model` member".to_owned()
        } else if e.is_data() {
            "request body must be a JSON object whose `model` is a string".to_owned()
        } else {
            format!("request body is not valid JSON: {e}")
        };
        GatewayError::InvalidRequest(msg)
    })
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
        // Sidecar mode: the client's path as it is, under the backend URL's.
        _ if route.style == Style::Passthrough => pq.push_str(&route.rest),
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
            match super::multipart::boundary(content_type)? {
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

/// [`with_model`], for the fuzz targets (feature `fuzzing`).
#[cfg(feature = "fuzzing")]
pub fn fuzz_with_model(body: &Bytes, model: &str) -> Result<Bytes, GatewayError> {
    with_model(body, model)
}

/// `body` with its `model` member set to `model`; the original bytes when it already is.
fn with_model(body: &Bytes, model: &str) -> Result<Bytes, GatewayError> {
    // Read as for routing (a `Model` the backend might take instead is refused), then only
    // the value's bytes change: every other byte is forwarded as the client wrote it.
    let quoted = serde_json::to_string(model)
        .map_err(|e| GatewayError::InvalidRequest(format!("cannot encode the model: {e}")))?;
    let mut out = Vec::with_capacity(body.len() + quoted.len() + 10);
    match json_model(body)? {
        Some((m, _)) if m == model => return Ok(body.clone()),
        Some((_, span)) => {
            out.extend_from_slice(&body[..span.start]);
            out.extend_from_slice(quoted.as_bytes());
            out.extend_from_slice(&body[span.end..]);
        }
        None => {
            // A JSON object (the reader checked): the member goes first, after the `{`.
            let open = body.iter().position(|&b| b == b'{').ok_or_else(|| {
                GatewayError::InvalidRequest("request body must be a JSON object".into())
            })?;
            let empty = body[open + 1..]
                .iter()
                .find(|b| !b.is_ascii_whitespace())
                .is_some_and(|&b| b == b'}');
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(b"\"model\":");
            out.extend_from_slice(quoted.as_bytes());
            if !empty {
                out.push(b',');
            }
            out.extend_from_slice(&body[open + 1..]);
        }
    }
    Ok(Bytes::from(out))
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
        crate::routing::BackendTable::build(
            &v,
            &creds.credentials,
            &Default::default(),
            &Default::default(),
        )
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
    fn the_model_is_rewritten_in_place_and_nothing_else_changes() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        for (body, want) in [
            (
                r#"{ "z":1, "model" : "gpt-4o" ,"a":2.50}"#,
                r#"{ "z":1, "model" : "gpt-4o-ptu" ,"a":2.50}"#,
            ),
            (r#"{"model":"gpt-\u0034o"}"#, r#"{"model":"gpt-4o-ptu"}"#),
            (
                r#"{"messages":[]}"#,
                r#"{"model":"gpt-4o-ptu","messages":[]}"#,
            ),
            (" { } ", r#" {"model":"gpt-4o-ptu" } "#),
            // Found by fuzzing (json_model): a number serde_json's value type cannot hold
            // passed the reader and failed a rewrite that rebuilt the document.
            (
                r#"{"model":"a","x":66E1666666666666666666}"#,
                r#"{"model":"gpt-4o-ptu","x":66E1666666666666666666}"#,
            ),
        ] {
            assert_eq!(
                with_model(&b(body), "gpt-4o-ptu").unwrap(),
                want.as_bytes(),
                "{body}"
            );
        }
        let same = b(r#"{"model":"gpt-4o-ptu"}"#);
        assert_eq!(with_model(&same, "gpt-4o-ptu").unwrap(), same);
        assert_eq!(
            with_model(&b("{}"), "a\"b").unwrap(),
            br#"{"model":"a\"b"}"#.as_slice(),
            "the name is encoded as a JSON string"
        );
        assert!(with_model(&b(r#"{"Model":"x"}"#), "m").is_err());
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
        assert_eq!(
            body_model(&Bytes::from_static(br#"{"input":"x"}"#), None).unwrap(),
            None
        );
        // Unicode escapes in the name are the same name, for the gateway as for a backend.
        let escaped = Bytes::from_static(br#"{"mod\u0065l":"m2"}"#);
        assert_eq!(body_model(&escaped, None).unwrap().as_deref(), Some("m2"));
        for bad in [
            &b"{not json"[..],
            br#"{"model":5}"#,
            br#"{"model":null}"#,
            br#"{"Model":"gpt-4o"}"#,
            br#"{"MODEL":"gpt-4o","model":"cheap"}"#,
            br#"{"model":"cheap","mOdEl":"gpt-4o"}"#,
            br#"{"model":"a","model":"b"}"#,
            br#"{"model":"a"} {"model":"b"}"#,
            br#"["model","a"]"#,
            // Found by fuzzing (json_model): invalid UTF-8 in a member the reader skips was
            // accepted here and refused by the rewrite.
            b"{\"model\":\"gpt-4o\",\"m\":[{\"ro\x94\x96\":\"user\",\"content\":\"hi\"}]}",
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
