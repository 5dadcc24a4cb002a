//! Route recognition: turns a request line into a [`Route`] — which API style the client
//! speaks, which operation it calls, and which deployment (when the path names one).
//!
//! Three styles are served:
//! - Azure data plane: `/openai/deployments/{deployment}/{operation...}?api-version=...`
//! - Azure v1: `/openai/v1/{operation...}` (model in the body)
//! - OpenAI: `/v1/{operation...}` (model in the body)
//!
//! Sidecar mode ([`passthrough`]) takes any path: it goes to the one backend as it is, and
//! is read only to name the operation and deployment in audit lines and metrics.

use http::Method;

use crate::error::GatewayError;

/// The API dialect the client used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    AzureDeployments,
    AzureV1,
    OpenAi,
    /// Sidecar mode: `rest` is the whole path, forwarded unchanged.
    Passthrough,
}

/// The operation family of a request, as named in client policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Chat,
    Completions,
    Embeddings,
    Images,
    Audio,
    Responses,
    Files,
    Batches,
    Models,
    /// Anything else under a served prefix: passed through unchanged.
    Other,
}

impl Operation {
    /// The name used in config (`operations = [...]`), metrics and audit lines.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Images => "images",
            Self::Audio => "audio",
            Self::Responses => "responses",
            Self::Files => "files",
            Self::Batches => "batches",
            Self::Models => "models",
            Self::Other => "other",
        }
    }

    /// Every operation, in the order the README lists them.
    pub const ALL: [Self; 10] = [
        Self::Chat,
        Self::Completions,
        Self::Embeddings,
        Self::Images,
        Self::Audio,
        Self::Responses,
        Self::Files,
        Self::Batches,
        Self::Models,
        Self::Other,
    ];

    /// The operation a config name (`operations = [...]`) stands for.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.as_str() == name)
    }

    /// Operations that always run against one deployment: the request must name one.
    pub fn needs_deployment(self) -> bool {
        matches!(
            self,
            Self::Chat | Self::Completions | Self::Embeddings | Self::Images | Self::Audio
        )
    }

    /// The methods this operation uses, as the `Allow` header of a 405 lists them.
    /// Anything else is refused: a policy that allows `chat` allows creating completions,
    /// not whatever a backend might do with `PUT` or a made-up method on that path.
    pub const fn methods(self) -> &'static [Method] {
        match self {
            Self::Chat | Self::Completions | Self::Embeddings | Self::Images | Self::Audio => {
                &[Method::POST]
            }
            Self::Models => &[Method::GET],
            Self::Batches => &[Method::GET, Method::POST],
            Self::Responses | Self::Files | Self::Other => {
                &[Method::GET, Method::POST, Method::DELETE]
            }
        }
    }

    /// The operation a path's first segment after the style prefix names.
    fn classify(first: &str) -> Self {
        Self::from_name(first).unwrap_or(Self::Other)
    }
}

/// What the client asked for, independent of any backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub style: Style,
    pub operation: Operation,
    /// Deployment named in the path (Azure data plane); v1 styles fill it from the body.
    pub deployment: Option<String>,
    /// The operation path after the style's prefix, e.g. `chat/completions`.
    pub rest: String,
    /// The client's `api-version`, if given.
    pub api_version: Option<String>,
    /// The client's other query parameters, raw, in their original order.
    pub query: Vec<String>,
}

impl Route {
    /// Refuse a method the operation does not use (405 with `Allow`).
    pub fn check_method(&self, method: &Method) -> Result<(), GatewayError> {
        if self.style == Style::Passthrough {
            return Ok(());
        }
        let allowed = self.operation.methods();
        if allowed.contains(method) {
            Ok(())
        } else {
            Err(GatewayError::MethodNotAllowed {
                method: crate::shown::shown(method.as_str()),
                allow: allowed,
            })
        }
    }

    /// Whether this call creates something that runs on a model, so the request must name
    /// one: the operations bound to a deployment, and `POST /responses` (the Responses API's
    /// create; its other calls address a stored response by id).
    pub fn must_name_model(&self, method: &Method) -> bool {
        self.style != Style::Passthrough && self.must_name_model_inner(method)
    }

    fn must_name_model_inner(&self, method: &Method) -> bool {
        self.operation.needs_deployment()
            || (self.operation == Operation::Responses
                && method == Method::POST
                && self.rest == "responses")
    }

    /// Whether the gateway answers this itself from its deployment table.
    pub fn is_model_listing(&self) -> bool {
        self.operation == Operation::Models
            && !matches!(self.style, Style::AzureDeployments | Style::Passthrough)
    }
}

/// Parse a request path and query into a route.
pub fn parse(method: &Method, path: &str, query: Option<&str>) -> Result<Route, GatewayError> {
    let not_found = || GatewayError::NotFound {
        method: method.to_string(),
        path: path.to_owned(),
    };
    let (style, deployment, rest) = if let Some(r) = path.strip_prefix("/openai/deployments/") {
        let (d, rest) = r.split_once('/').ok_or_else(not_found)?;
        if !valid_name(d) {
            return Err(GatewayError::InvalidRequest(format!(
                "invalid deployment name in path: '{}'",
                d.escape_default()
            )));
        }
        (Style::AzureDeployments, Some(d.to_owned()), rest)
    } else if let Some(r) = path.strip_prefix("/openai/v1/") {
        (Style::AzureV1, None, r)
    } else if let Some(r) = path.strip_prefix("/v1/") {
        (Style::OpenAi, None, r)
    } else if path == "/openai/models" {
        (Style::AzureV1, None, "models")
    } else {
        return Err(not_found());
    };
    // One pass over the bytes (this runs for every request): the segments, the bytes a
    // path must not hold, and where the operation segment ends.
    let (mut dot_segment, mut dot_start, mut empty_segment, mut forbidden) =
        (false, false, false, false);
    let mut first_end = None;
    let mut start = 0;
    let bytes = rest.as_bytes();
    for i in 0..=bytes.len() {
        match bytes.get(i).copied().unwrap_or(b'/') {
            b'/' => {
                let segment = &bytes[start..i];
                dot_segment |= segment == b"." || segment == b"..";
                dot_start |= segment.first() == Some(&b'.');
                empty_segment |= segment.is_empty();
                first_end.get_or_insert(i);
                start = i + 1;
            }
            // `;` starts path parameters for some servers and proxies (`..;/` walks up a
            // level in Tomcat, Spring, Jetty): no OpenAI or Azure path uses it.
            b'%' | b'\\' | b';' => forbidden = true,
            _ => {}
        }
    }
    if rest.is_empty() || dot_segment {
        return Err(not_found());
    }
    // Policy decisions key on the operation, so the path must mean exactly what it says:
    // no percent-encoding (`chat%2Fcompletions`), empty segments or backslashes that a
    // backend might normalise into a different operation than the one checked here.
    if empty_segment || forbidden || dot_start {
        return Err(GatewayError::InvalidRequest(
            "the path must not contain percent-encoding, backslashes, semicolons, empty \
             segments or segments that begin with a dot"
                .into(),
        ));
    }
    // The operation segment is matched exactly: `CHAT/completions` would otherwise become
    // an uninterpreted pass-through that a case-insensitive backend runs as chat.
    let first = &rest[..first_end.unwrap_or(rest.len())];
    if first.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(not_found());
    }
    // A v1-style path must not name a deployment itself: `/v1/deployments/X/...` would be
    // forwarded as `/openai/deployments/X/...` without X ever being checked.
    if style != Style::AzureDeployments && first == "deployments" {
        return Err(not_found());
    }
    let mut api_version = None;
    let mut params = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        if CREDENTIAL_PARAMS
            .iter()
            .any(|c| c.eq_ignore_ascii_case(name))
        {
            continue; // a client credential in the URL never goes upstream
        }
        match pair.strip_prefix("api-version=") {
            Some(v) => api_version = Some(v.to_owned()),
            None => params.push(pair.to_owned()),
        }
    }
    Ok(Route {
        style,
        operation: Operation::classify(first),
        deployment,
        rest: rest.to_owned(),
        api_version,
        query: params,
    })
}

/// Sidecar mode: any path and query, forwarded as they are but for credential parameters
/// (dropped). Refused (404) only when the path could climb out of the backend URL's own
/// path: a `.` or `..` segment, literal or percent-encoded, an encoded `/`, or a backslash.
/// The operation and deployment are read from the path where it has a known shape, for
/// audit lines and metrics; anything else is `other`.
pub fn passthrough(
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Result<Route, GatewayError> {
    // Checked on the bytes as they are, without decoding into a copy: this runs for every
    // sidecar request.
    let is_dot = |s: &[u8]| s == b"." || s.eq_ignore_ascii_case(b"%2e");
    let climbs = path.split('/').any(|segment| {
        let b = segment.as_bytes();
        match b.len() {
            1 | 3 => is_dot(b),
            2 | 4 | 6 => (1..b.len()).any(|i| is_dot(&b[..i]) && is_dot(&b[i..])),
            _ => false,
        }
    });
    let encoded_separator = path.as_bytes().windows(3).any(|w| {
        w[0] == b'%' && (w[1..].eq_ignore_ascii_case(b"2f") || w[1..].eq_ignore_ascii_case(b"5c"))
    });
    if !path.starts_with('/') || climbs || path.contains('\\') || encoded_separator {
        return Err(GatewayError::NotFound {
            method: method.to_string(),
            path: path.to_owned(),
        });
    }
    let (operation, deployment) = match parse(method, path, None) {
        Ok(r) => (r.operation, r.deployment),
        Err(_) => (Operation::Other, None),
    };
    let query = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|pair| {
            let name = pair.split_once('=').map_or(*pair, |(n, _)| n);
            !CREDENTIAL_PARAMS
                .iter()
                .any(|c| c.eq_ignore_ascii_case(name))
        })
        .map(str::to_owned)
        .collect();
    Ok(Route {
        style: Style::Passthrough,
        operation,
        deployment,
        rest: path.to_owned(),
        api_version: None,
        query,
    })
}

/// Query parameters that carry credentials (APIM subscription keys, API keys, function
/// keys): dropped, never forwarded.
const CREDENTIAL_PARAMS: [&str; 5] = ["subscription-key", "api-key", "key", "code", "sig"];

/// Deployment and model names: what Azure and OpenAI allow, nothing that could bend a path.
/// A leading dot is refused too: `..;`-style segments and hidden names bend paths on some
/// servers.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_keeps_path_and_query_but_not_credentials() {
        let r = passthrough(
            &Method::PATCH,
            "/openai/deployments/gpt-4o/chat/completions",
            Some("api-version=2025-01-01&Subscription-Key=s&x=%20y&api-key=k"),
        )
        .unwrap();
        assert_eq!(r.style, Style::Passthrough);
        assert_eq!(r.rest, "/openai/deployments/gpt-4o/chat/completions");
        assert_eq!(r.query, ["api-version=2025-01-01", "x=%20y"]);
        assert_eq!(
            r.api_version, None,
            "the client's api-version stays in the query"
        );
        assert_eq!(r.operation, Operation::Chat);
        assert_eq!(r.deployment.as_deref(), Some("gpt-4o"));
        assert!(r.check_method(&Method::PATCH).is_ok());
        assert!(!r.must_name_model(&Method::POST));
        assert!(!r.is_model_listing());
    }

    #[test]
    fn passthrough_names_what_it_cannot_read_other() {
        for path in [
            "/",
            "/anything/at%20all",
            "/v1/models",
            "/openai/deployments/x",
        ] {
            let r = passthrough(&Method::GET, path, None).unwrap();
            assert_eq!(r.rest, path);
            assert!(!r.is_model_listing(), "{path}: the backend answers it");
        }
        let r = passthrough(&Method::GET, "/anything/at%20all", None).unwrap();
        assert_eq!((r.operation, r.deployment), (Operation::Other, None));
    }

    #[test]
    fn passthrough_refuses_paths_that_climb() {
        for path in [
            "/openai/../admin",
            "/openai/./x",
            "/..",
            "/openai/%2e%2E/x",
            "/openai/%2E/x",
            "/openai/a%2Fb",
            "/openai/a%5cb",
            "/openai/a\\b",
            "",
            "*",
        ] {
            assert!(
                matches!(
                    passthrough(&Method::GET, path, None),
                    Err(GatewayError::NotFound { .. })
                ),
                "{path}"
            );
        }
    }

    #[test]
    fn azure_data_plane() {
        let r = parse(
            &Method::POST,
            "/openai/deployments/gpt-4o/chat/completions",
            Some("api-version=2024-10-21&x=1"),
        )
        .unwrap();
        assert_eq!(r.style, Style::AzureDeployments);
        assert_eq!(r.operation, Operation::Chat);
        assert_eq!(r.deployment.as_deref(), Some("gpt-4o"));
        assert_eq!(r.rest, "chat/completions");
        assert_eq!(r.api_version.as_deref(), Some("2024-10-21"));
        assert_eq!(r.query, vec!["x=1".to_owned()]);
        let r = parse(
            &Method::POST,
            "/v1/embeddings",
            Some("subscription-key=s&API-KEY=k&key=x&code=c&keep=1"),
        )
        .unwrap();
        assert_eq!(
            r.query,
            vec!["keep=1".to_owned()],
            "credentials dropped from the query"
        );
    }

    #[test]
    fn v1_styles() {
        let r = parse(&Method::POST, "/v1/embeddings", None).unwrap();
        assert_eq!(
            (r.style, r.operation),
            (Style::OpenAi, Operation::Embeddings)
        );
        let r = parse(&Method::POST, "/openai/v1/responses", None).unwrap();
        assert_eq!(
            (r.style, r.operation),
            (Style::AzureV1, Operation::Responses)
        );
        let r = parse(&Method::POST, "/v1/audio/transcriptions", None).unwrap();
        assert_eq!(r.operation, Operation::Audio);
        let r = parse(&Method::GET, "/v1/models", None).unwrap();
        assert!(r.is_model_listing());
        let r = parse(&Method::GET, "/openai/models", None).unwrap();
        assert!(r.is_model_listing());
        let r = parse(&Method::GET, "/v1/fine_tuning/jobs", None).unwrap();
        assert_eq!(r.operation, Operation::Other);
    }

    #[test]
    fn refuses_unknown_and_traversal() {
        for p in [
            "/",
            "/v2/chat",
            "/openai/deployments/x",
            "/v1/",
            "/v1/../admin",
            "/health2",
            "/v1/deployments/o1-internal/chat/completions",
            "/openai/v1/deployments/x/embeddings",
            "/v1/deployments",
            "/v1/CHAT/completions",
            "/openai/deployments/gpt-4o/Chat/completions",
        ] {
            assert!(
                matches!(
                    parse(&Method::GET, p, None),
                    Err(GatewayError::NotFound { .. })
                ),
                "{p}"
            );
        }
        for p in [
            "/openai/deployments/a%2F..%2Fb/chat/completions",
            "/v1/chat%2Fcompletions",
            "/v1//chat/completions",
            "/v1/chat/completions/",
            "/openai/deployments/gpt-4o/chat%2fcompletions",
            "/v1/chat\\completions",
            // `;` path parameters and dot-led segments: a backend that strips `;...` from a
            // segment would resolve `..;` as `..` and run another deployment or operation.
            "/openai/deployments/rec/chat/..;/..;/..;/secret/chat/completions",
            "/openai/deployments/rec/chat/.;/completions",
            "/v1/chat/..;/embeddings",
            "/v1/audio/..;/chat/completions",
            "/v1/chat/completions;jsessionid=x",
            "/v1/chat/.hidden",
            "/v1/chat/...",
            "/openai/deployments/.rec/chat/completions",
            "/openai/deployments/rec;x=y/chat/completions",
        ] {
            assert!(
                matches!(
                    parse(&Method::POST, p, None),
                    Err(GatewayError::InvalidRequest(_))
                ),
                "{p}"
            );
        }
    }
}
