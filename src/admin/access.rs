//! Who an admin request is: the admin token presented (`Authorization: Bearer`), matched
//! in constant time against every configured one, and whether its scopes allow the
//! endpoint.
//!
//! With no admin credential configured at all, the admin listener (loopback by default)
//! stays as open as it always was — `/admin/backends`, `/metrics`, `POST /admin/reload` —
//! and nothing more: clients, usage, refusals and keys always need a configured token.

use http::{header, HeaderMap, HeaderValue, StatusCode};
use subtle::{Choice, ConstantTimeEq};

use super::error;
use crate::config::admin::{AdminToken, Scope, Scopes};
use crate::error::Body;

/// What an admin request may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The admin token's name; `None` on a listener without admin credentials.
    pub name: Option<String>,
    pub scopes: Scopes,
}

/// The grant of the request's bearer token among `tokens`; `None` when it presents none
/// or a wrong one (and some are configured).
pub fn authenticate(tokens: &[AdminToken], headers: &HeaderMap) -> Option<Grant> {
    if tokens.is_empty() {
        return Some(Grant {
            name: None,
            scopes: [Scope::Read, Scope::Config].into_iter().collect(),
        });
    }
    let presented = bearer(headers)?;
    // Digests are compared, not the tokens: equal lengths, so the time taken says nothing
    // about a token's length either. Every token is compared, whichever matches.
    let presented = crate::digest::sha256(presented.as_bytes());
    let mut found: Option<&AdminToken> = None;
    for t in tokens {
        let equal: Choice = presented.ct_eq(t.digest());
        if bool::from(equal) && found.is_none() {
            found = Some(t);
        }
    }
    found.map(|t| Grant {
        name: Some(t.name.clone()),
        scopes: t.scopes,
    })
}

/// `Authorization: Bearer <token>` (the scheme in any case).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// `grant` if it may use an endpoint needing `scope`; otherwise the 401 (`missing_credentials`
/// when `headers` carry no bearer token, `invalid_admin_token` for a wrong one) or the 403.
/// On a listener without admin credentials, only endpoints `open_without_tokens` (those
/// that were open before admin tokens existed: backends, metrics, reload) are answered.
pub fn check<'a>(
    grant: Option<&'a Grant>,
    headers: &HeaderMap,
    scope: Option<Scope>,
    open_without_tokens: bool,
) -> Result<&'a Grant, Box<http::Response<Body>>> {
    // Without any admin credential configured, only what was open before stays open.
    let grant = grant.filter(|g| g.name.is_some() || open_without_tokens);
    let Some(grant) = grant else {
        let (code, message) = if !open_without_tokens && bearer(headers).is_none() {
            (
                "missing_credentials",
                "this endpoint needs an admin token: configure [[admin.tokens]] and send Authorization: Bearer <token>",
            )
        } else if bearer(headers).is_some() {
            ("invalid_admin_token", "this admin token is not valid")
        } else {
            (
                "missing_credentials",
                "an admin token is required (Authorization: Bearer <token>)",
            )
        };
        let mut r = error(StatusCode::UNAUTHORIZED, code, message);
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"portcullis-admin\""),
        );
        return Err(Box::new(r));
    };
    match scope {
        Some(s) if !grant.scopes.contains(s) => {
            let message = match &grant.name {
                Some(name) => format!(
                    "admin token '{name}' does not have the '{}' scope",
                    s.as_str()
                ),
                None => format!(
                    "the '{}' scope needs an admin token: configure [[admin.tokens]] with scopes = [\"{}\"]",
                    s.as_str(),
                    s.as_str()
                ),
            };
            Err(Box::new(error(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                &message,
            )))
        }
        _ => Ok(grant),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn tokens() -> Vec<AdminToken> {
        vec![
            AdminToken::new(
                "reader".into(),
                Secret::new("reader-token-0123456789".into()),
                [Scope::Read].into_iter().collect(),
            ),
            AdminToken::new(
                "ops".into(),
                Secret::new("ops-token-0123456789ab".into()),
                [Scope::Read, Scope::Keys].into_iter().collect(),
            ),
        ]
    }

    fn with(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    #[test]
    fn the_right_token_gets_its_own_scopes_and_nothing_more() {
        let t = tokens();
        let g = authenticate(&t, &with("Bearer ops-token-0123456789ab")).unwrap();
        assert_eq!(g.name.as_deref(), Some("ops"));
        assert!(check(Some(&g), &HeaderMap::new(), Some(Scope::Keys), false).is_ok());
        let r = check(Some(&g), &HeaderMap::new(), Some(Scope::Config), false).unwrap_err();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let g = authenticate(&t, &with("bearer reader-token-0123456789")).unwrap();
        assert_eq!(g.name.as_deref(), Some("reader"));
        assert!(check(Some(&g), &HeaderMap::new(), Some(Scope::Keys), false).is_err());
    }

    #[test]
    fn wrong_missing_or_partial_tokens_are_refused() {
        let t = tokens();
        for h in [
            HeaderMap::new(),
            with("Bearer ops-token-0123456789a"),
            with("Bearer ops-token-0123456789abc"),
            with("Basic ops-token-0123456789ab"),
            with("Bearer "),
            with("ops-token-0123456789ab"),
        ] {
            let g = authenticate(&t, &h);
            assert!(g.is_none(), "{h:?}");
            let r = check(g.as_ref(), &h, None, false).unwrap_err();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
            assert!(r.headers().contains_key(header::WWW_AUTHENTICATE));
        }
    }

    #[test]
    fn without_admin_credentials_only_what_was_open_before_stays_open() {
        let g = authenticate(&[], &HeaderMap::new()).unwrap();
        assert_eq!(g.name, None);
        let none = HeaderMap::new();
        assert!(check(Some(&g), &none, Some(Scope::Read), true).is_ok());
        assert!(check(Some(&g), &none, Some(Scope::Config), true).is_ok());
        // Clients, usage, keys: never without a configured token.
        for scope in [Scope::Read, Scope::Keys] {
            let r = check(Some(&g), &none, Some(scope), false).unwrap_err();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        }
    }
}
