//! Entry points for the fuzz targets in `fuzz/` (built only with the `fuzzing` feature; not
//! an API). Each takes arbitrary bytes, must never panic, and checks the invariants the
//! gateway's security rests on where a property can be stated: a failed check is a
//! finding, so these panic on purpose.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use bytes::Bytes;

/// JWT header and claims, read before any signature check.
pub fn jwt(data: &[u8]) {
    if let Ok(token) = std::str::from_utf8(data) {
        crate::identify::jwt::fuzz_peek(token);
    }
}

/// `tls::forwarded::parse` (first byte picks the format): whatever it returns is at most
/// `MAX_CERTIFICATES` non-empty DER blobs, and nothing is read from a header over the size
/// bound.
pub fn forwarded(data: &[u8]) {
    use crate::tls::forwarded::{parse, ForwardedFormat, MAX_CERTIFICATES, MAX_HEADER_BYTES};
    let Some((&f, value)) = data.split_first() else {
        return;
    };
    let format = if f % 2 == 0 {
        ForwardedFormat::Xfcc
    } else {
        ForwardedFormat::PemUrlencoded
    };
    if let Ok(chain) = parse(format, value) {
        assert!(value.len() <= MAX_HEADER_BYTES);
        assert!(!chain.is_empty() && chain.len() <= MAX_CERTIFICATES);
        assert!(chain.iter().all(|c| !c.as_ref().is_empty()));
    }
}

/// `route::parse`: whatever it accepts means exactly what it says.
pub fn route(data: &[u8]) {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (text, None),
    };
    let method =
        [http::Method::GET, http::Method::POST, http::Method::DELETE][usize::from(m % 3)].clone();
    if let Ok(r) = crate::route::parse(&method, path, query) {
        for segment in r.rest.split('/') {
            assert!(!segment.is_empty() && !segment.starts_with('.'), "{path}");
            assert!(!segment.contains([';', '%', '\\']), "{path}");
        }
        if let Some(d) = &r.deployment {
            assert!(crate::route::valid_name(d), "{path}");
        }
        assert!(path.ends_with(&r.rest), "{path}");
        let _ = r.check_method(&method);
    }
}

/// The upstream HTTP/1.1 response parser and body decoder (`proxy/h1.rs`); the first two
/// bytes choose where the input is split in the second reading.
pub fn h1_response(data: &[u8]) {
    let (split, rest) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };
    crate::proxy::h1::fuzz_response(rest, split);
}

/// The multipart `model` reader and rewriter: the first line is the content type.
pub fn multipart(data: &[u8]) {
    let Some(nl) = data.iter().position(|&b| b == b'\n') else {
        return;
    };
    let Ok(ct) = std::str::from_utf8(&data[..nl]) else {
        return;
    };
    let body = Bytes::copy_from_slice(&data[nl + 1..]);
    let Ok(Some(boundary)) = crate::proxy::multipart::boundary(Some(ct)) else {
        return;
    };
    if let Ok(found) = crate::proxy::multipart::model(&body, &boundary) {
        // Rewriting a readable form yields a readable form naming the new model, or the
        // same bytes when it already did.
        let out = crate::proxy::multipart::with_model(&body, &boundary, "mapped-model")
            .expect("a form that was read can be rewritten");
        let again =
            crate::proxy::multipart::model(&out, &boundary).expect("a rewritten form can be read");
        assert_eq!(again.as_deref(), Some("mapped-model"));
        if found.as_deref() == Some("mapped-model") {
            assert_eq!(out, body);
        }
    }
}

/// The JSON body `model` reader and its rewrite.
pub fn json_model(data: &[u8]) {
    let body = Bytes::copy_from_slice(data);
    if let Ok(Some(found)) = crate::proxy::rewrite::body_model(&body, Some("application/json")) {
        let out = crate::proxy::rewrite::fuzz_with_model(&body, "mapped-model")
            .expect("a body whose model was read can be rewritten");
        let again = crate::proxy::rewrite::body_model(&out, Some("application/json"))
            .expect("a rewritten body can be read");
        assert_eq!(again.as_deref(), Some("mapped-model"));
        if found == "mapped-model" {
            assert_eq!(
                out, body,
                "a body already naming the model is kept byte for byte"
            );
        }
    }
}

/// The configuration loader: any text gives a configuration or errors, never a panic;
/// errors name a key path or say why the text is unreadable.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = |_: &str| None;
    if let Err(e) =
        crate::config::load_str_with_env(text, "fuzz", std::path::Path::new("/nonexistent"), &env)
    {
        let _ = e.to_string();
    }
}
