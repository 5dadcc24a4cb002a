//! The `model` field of `multipart/form-data` bodies (audio, image edits), read and
//! rewritten by one small parser so that routing and rewriting can never disagree.
//!
//! Only the part boundaries and each part's headers are read; file contents are skipped,
//! never copied. The gateway checks the `model` that the backend will run, so a form that
//! another parser could read differently is refused (400) rather than guessed at:
//! - the request's `Content-Type` must name exactly one valid `boundary`;
//! - the body starts with the first delimiter (no preamble), every `--boundary` in it
//!   starts a line (`\r\n` before it: a bare `\n--boundary` is a delimiter to lenient
//!   parsers), and nothing but a line break follows the closing delimiter;
//! - part headers are `Name: value` lines (no space before the colon, no folded lines), with
//!   at most one `Content-Disposition` and one `Content-Type` per part;
//! - a disposition is `form-data` with `token=token` or `token="quoted"` parameters: no
//!   spaces around `=`, no backslash in a quoted value, no parameter twice, no `name*`
//!   (RFC 7578 §4.2 forbids it), and exactly one `name`;
//! - a field named `model` in another case (`Model`) is refused, and so is more than one
//!   `model` field, and a `model` part with a `Content-Transfer-Encoding` or a non-text
//!   `Content-Type` (a backend could decode its value into another name).

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use memchr::memmem;

use crate::error::GatewayError;

fn invalid(msg: &str) -> GatewayError {
    GatewayError::InvalidRequest(format!("invalid multipart body: {msg}"))
}

/// `tchar` of RFC 9110 §5.6.2.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `bchars` of RFC 2046 §5.1.1 (a space only inside, never last).
fn is_bchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&b)
}

/// One `;`-separated parameter list, strictly: `; token=token` or `; token="quoted"`, with
/// optional spaces around the `;` only. Names are lower-cased; a name twice is an error.
fn params(mut rest: &[u8]) -> Result<Vec<(String, Vec<u8>)>, &'static str> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    loop {
        rest = trim_start(rest);
        if rest.is_empty() {
            return Ok(out);
        }
        rest = rest
            .strip_prefix(b";")
            .ok_or("expected ';' between parameters")?;
        rest = trim_start(rest);
        if rest.is_empty() {
            return Ok(out); // a trailing ';' is harmless
        }
        let name_len = rest.iter().take_while(|&&b| is_tchar(b)).count();
        if name_len == 0 {
            return Err("a parameter has no name");
        }
        let name = String::from_utf8_lossy(&rest[..name_len]).to_ascii_lowercase();
        rest = rest[name_len..]
            .strip_prefix(b"=")
            .ok_or("a parameter is not written as name=value")?;
        let value = if let Some(q) = rest.strip_prefix(b"\"") {
            let end = q
                .iter()
                .position(|&b| b == b'"' || b == b'\\')
                .ok_or("unterminated quoted parameter")?;
            if q[end] == b'\\' {
                return Err("a backslash in a quoted parameter");
            }
            let v = q[..end].to_vec();
            rest = &q[end + 1..];
            v
        } else {
            let len = rest.iter().take_while(|&&b| is_tchar(b)).count();
            if len == 0 {
                return Err("a parameter has an empty value");
            }
            let v = rest[..len].to_vec();
            rest = &rest[len..];
            v
        };
        if value.iter().any(|&b| b < 0x20 || b == 0x7f) {
            return Err("a control character in a parameter");
        }
        if out.iter().any(|(n, _)| *n == name) {
            return Err("a parameter is given twice");
        }
        out.push((name, value));
    }
}

fn trim_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|&&c| c == b' ' || c == b'\t').count();
    &b[n..]
}

/// The boundary of a `multipart/form-data` request, `None` for any other content type.
/// A multipart type whose parameters are not exactly one valid `boundary` (and optional
/// others, each once) is an error: parsers differ on which of two boundaries they use.
pub fn boundary(content_type: Option<&str>) -> Result<Option<String>, GatewayError> {
    let Some(ct) = content_type else {
        return Ok(None);
    };
    let (mime, rest) = ct.split_at(ct.find(';').unwrap_or(ct.len()));
    if !mime.trim().eq_ignore_ascii_case("multipart/form-data") {
        return Ok(None);
    }
    let list = params(rest.as_bytes()).map_err(|why| invalid(&format!("Content-Type: {why}")))?;
    let b = list
        .into_iter()
        .find(|(n, _)| n == "boundary")
        .map(|(_, v)| v)
        .ok_or_else(|| invalid("Content-Type names no boundary"))?;
    if b.is_empty() || b.len() > 70 || b.ends_with(b" ") || !b.iter().all(|&c| is_bchar(c)) {
        return Err(invalid("the boundary is not 1-70 valid characters"));
    }
    Ok(Some(String::from_utf8_lossy(&b).into_owned()))
}

/// What a part's headers say, as far as the `model` check needs.
struct PartHead {
    name: Vec<u8>,
    /// `Content-Transfer-Encoding` present, or a `Content-Type` a value could be decoded by.
    encoded: bool,
}

/// Parse one part's header block (without its final blank line).
fn part_head(block: &[u8]) -> Result<PartHead, GatewayError> {
    let mut disposition: Option<&[u8]> = None;
    let mut content_type: Option<&[u8]> = None;
    let mut encoded = false;
    // `block` ends with the CRLF of its last line: the piece after it is empty.
    let lines = block.strip_suffix(b"\n").unwrap_or(block);
    for line in lines.split(|&b| b == b'\n') {
        let line = line
            .strip_suffix(b"\r")
            .ok_or_else(|| invalid("a part header line does not end with CRLF"))?;
        if line.first().is_some_and(|&b| b == b' ' || b == b'\t') {
            return Err(invalid("a folded part header line"));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| invalid("a part header line has no ':'"))?;
        let (name, value) = (&line[..colon], trim_start(&line[colon + 1..]));
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(invalid(
                "a part header name is not a token (space before ':'?)",
            ));
        }
        let slot = if name.eq_ignore_ascii_case(b"content-disposition") {
            &mut disposition
        } else if name.eq_ignore_ascii_case(b"content-type") {
            &mut content_type
        } else {
            if name.eq_ignore_ascii_case(b"content-transfer-encoding") {
                encoded = true;
            }
            continue;
        };
        if slot.replace(value).is_some() {
            return Err(invalid("a part has a header twice"));
        }
    }
    let disposition = disposition.ok_or_else(|| invalid("a part has no Content-Disposition"))?;
    let kind_len = disposition.iter().take_while(|&&b| is_tchar(b)).count();
    if !disposition[..kind_len].eq_ignore_ascii_case(b"form-data") {
        return Err(invalid("a part's Content-Disposition is not form-data"));
    }
    let disp = params(&disposition[kind_len..])
        .map_err(|why| invalid(&format!("Content-Disposition: {why}")))?;
    if disp.iter().any(|(n, _)| n == "name*") {
        return Err(invalid(
            "Content-Disposition: name* is not allowed in forms",
        ));
    }
    let name = disp
        .into_iter()
        .find(|(n, _)| n == "name")
        .map(|(_, v)| v)
        .ok_or_else(|| invalid("a part's Content-Disposition has no name"))?;
    if let Some(ct) = content_type {
        let mime = ct.split(|&b| b == b';').next().unwrap_or_default();
        let text = mime.trim_ascii().eq_ignore_ascii_case(b"text/plain");
        let charset_ok = params(&ct[mime.len()..]).is_ok_and(|p| {
            p.iter().all(|(n, v)| {
                n != "charset"
                    || v.eq_ignore_ascii_case(b"utf-8")
                    || v.eq_ignore_ascii_case(b"us-ascii")
            })
        });
        encoded |= !(text && charset_ok);
    }
    Ok(PartHead { name, encoded })
}

/// Byte range of the `model` field's value, `None` if the form has none.
pub fn model_span(body: &[u8], boundary: &str) -> Result<Option<Range<usize>>, GatewayError> {
    let delim = format!("--{boundary}");
    let finder = memmem::Finder::new(delim.as_bytes());
    if !body.starts_with(delim.as_bytes()) {
        return Err(invalid("the body does not start with the boundary"));
    }
    let mut pos = 0;
    let mut found: Option<Range<usize>> = None;
    loop {
        let after = pos + delim.len();
        if body.get(after..after + 2) == Some(b"--") {
            // The closing delimiter: only a line break may follow.
            let tail = &body[after + 2..];
            if !(tail.is_empty() || tail == b"\r\n") {
                return Err(invalid("data after the closing boundary"));
            }
            return Ok(found);
        }
        if body.get(after..after + 2) != Some(b"\r\n") {
            return Err(invalid("malformed boundary line"));
        }
        let head_start = after + 2;
        let head_end = memmem::find(&body[head_start..], b"\r\n\r\n")
            .map(|p| p + head_start)
            .ok_or_else(|| invalid("unterminated part headers"))?;
        let value_start = head_end + 4;
        // The next `CRLF--boundary`. Boundary text inside a line is content (RFC 2046
        // §5.1.1); at the start of a line after a bare LF, lenient parsers take it for a
        // delimiter where this one would not: refused.
        let mut from = value_start;
        let next = loop {
            let at = finder
                .find(&body[from..])
                .map(|p| p + from)
                .ok_or_else(|| invalid("missing closing boundary"))?;
            match (
                at.checked_sub(2).map(|i| &body[i..at]),
                body.get(at.wrapping_sub(1)),
            ) {
                (Some(b"\r\n"), _) if at >= value_start + 2 => break at,
                (_, Some(b'\n')) => return Err(invalid("a boundary after a bare line feed")),
                _ => from = at + 1,
            }
        };
        let value_end = next - 2;
        let head = part_head(&body[head_start..head_end + 2])?;
        if head.name.eq_ignore_ascii_case(b"model") {
            if head.name != b"model" {
                return Err(invalid("a field named `model` in another case"));
            }
            if head.encoded {
                return Err(invalid("the `model` field is encoded or not plain text"));
            }
            if found.is_some() {
                return Err(invalid("more than one `model` field"));
            }
            found = Some(value_start..value_end);
        }
        pos = next;
    }
}

/// The `model` field's value.
pub fn model(body: &[u8], boundary: &str) -> Result<Option<String>, GatewayError> {
    match model_span(body, boundary)? {
        Some(r) => String::from_utf8(body[r].to_vec())
            .map(Some)
            .map_err(|_| invalid("`model` is not UTF-8")),
        None => Ok(None),
    }
}

/// `body` with its `model` field set to `model` (added as the first part when absent).
pub fn with_model(body: &Bytes, boundary: &str, model: &str) -> Result<Bytes, GatewayError> {
    let mut out = BytesMut::with_capacity(body.len() + model.len() + 96);
    match model_span(body, boundary)? {
        Some(r) if &body[r.clone()] == model.as_bytes() => return Ok(body.clone()),
        Some(r) => {
            out.extend_from_slice(&body[..r.start]);
            out.extend_from_slice(model.as_bytes());
            out.extend_from_slice(&body[r.end..]);
        }
        None => {
            out.extend_from_slice(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{model}\r\n")
                    .as_bytes(),
            );
            out.extend_from_slice(body);
        }
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: &str = "--XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model\"\r\nContent-Type: audio/wav\r\n\r\nRIFF--XX\r\n--XX\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XX--\r\n";

    fn form(parts: &[(&str, &str)]) -> String {
        let mut s = String::new();
        for (head, value) in parts {
            s.push_str(&format!("--XX\r\n{head}\r\n\r\n{value}\r\n"));
        }
        s.push_str("--XX--\r\n");
        s
    }

    #[test]
    fn reads_the_model_field_not_a_file_named_model() {
        assert_eq!(
            model(FORM.as_bytes(), "XX").unwrap().as_deref(),
            Some("whisper")
        );
        let no_model =
            "--XX\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc\r\n--XX--\r\n";
        assert_eq!(model(no_model.as_bytes(), "XX").unwrap(), None);
        // What real clients send: token names, a `;` inside a quoted filename, UTF-8 names,
        // a text/plain model part, header names in any case.
        let ok = form(&[
            ("content-disposition: form-data; name=file; filename=\"a;name=model.wav\"", "RIFF"),
            ("Content-Disposition: form-data; name=\"model\"\r\nContent-Type: text/plain; charset=utf-8", "whisper-1"),
            ("Content-Disposition: form-data; name=\"prompt\"; filename=\"h\u{e9}llo.txt\"", "x"),
        ]);
        assert_eq!(
            model(ok.as_bytes(), "XX").unwrap().as_deref(),
            Some("whisper-1")
        );
    }

    #[test]
    fn refuses_duplicate_model_fields_and_garbage() {
        let dup = "--XX\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--XX\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--XX--\r\n";
        assert!(model(dup.as_bytes(), "XX").is_err());
        for bad in [
            "",
            "--XX",
            "--XX\r\nContent-Disposition: form-data; name=\"model\"\r\n",
            "--YY--",
        ] {
            assert!(model(bad.as_bytes(), "XX").is_err(), "{bad:?}");
        }
    }

    /// Each of these hides a second `model` from a parser that reads forms one way, or
    /// names it in a way another parser reads differently.
    #[test]
    fn refuses_forms_other_parsers_could_read_differently() {
        let first = ("Content-Disposition: form-data; name=\"model\"", "whisper");
        for (why, second) in [
            ("spaces around =", ("Content-Disposition: form-data; name = \"model\"", "gpt-4o")),
            ("name*", ("Content-Disposition: form-data; name*=utf-8''model", "gpt-4o")),
            ("space before colon", ("Content-Disposition : form-data; name=\"model\"", "gpt-4o")),
            ("two dispositions", ("Content-Disposition: form-data; name=\"x\"\r\nContent-Disposition: form-data; name=\"model\"", "gpt-4o")),
            ("name twice", ("Content-Disposition: form-data; name=\"x\"; name=\"model\"", "gpt-4o")),
            ("two content types", ("Content-Disposition: form-data; name=\"x\"\r\nContent-Type: text/plain\r\nContent-Type: text/html", "gpt-4o")),
            ("backslash escape", ("Content-Disposition: form-data; name=\"x\\\"; name=\\\"model\"", "gpt-4o")),
            ("folded line", ("Content-Disposition: form-data;\r\n name=\"model\"", "gpt-4o")),
            ("other case", ("Content-Disposition: form-data; name=\"Model\"", "gpt-4o")),
            ("not form-data", ("Content-Disposition: attachment; name=\"model\"", "gpt-4o")),
            ("no name", ("Content-Disposition: form-data; filename=\"model\"", "gpt-4o")),
            ("bare LF header", ("Content-Disposition: form-data; name=\"x\"\nContent-Type: text/plain", "gpt-4o")),
        ] {
            let f = form(&[first, second]);
            assert!(model(f.as_bytes(), "XX").is_err(), "{why}: {f:?}");
        }
        // A model field whose value a backend would decode.
        for head in [
            "Content-Disposition: form-data; name=\"model\"\r\nContent-Transfer-Encoding: base64",
            "Content-Disposition: form-data; name=\"model\"\r\nContent-Type: text/plain; charset=utf-16",
            "Content-Disposition: form-data; name=\"model\"\r\nContent-Type: application/octet-stream",
        ] {
            let f = form(&[(head, "d2hpc3Blcg==")]);
            assert!(model(f.as_bytes(), "XX").is_err(), "{head}");
        }
        // A delimiter after a bare LF, a preamble, an epilogue with another part.
        for f in [
            "--XX\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc\n--XX\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o\r\n--XX--\r\n".to_owned(),
            format!("preamble\r\n{}", form(&[first])),
            format!("{}--XX\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o\r\n--XX--\r\n", form(&[first])),
        ] {
            assert!(model(f.as_bytes(), "XX").is_err(), "{f:?}");
        }
    }

    #[test]
    fn boundaries_are_read_strictly() {
        assert_eq!(boundary(Some("application/json")).unwrap(), None);
        assert_eq!(boundary(None).unwrap(), None);
        assert_eq!(
            boundary(Some("multipart/form-data; boundary=XX"))
                .unwrap()
                .as_deref(),
            Some("XX")
        );
        assert_eq!(
            boundary(Some(
                "Multipart/Form-Data; charset=utf-8; boundary=\"a b'c\""
            ))
            .unwrap()
            .as_deref(),
            Some("a b'c")
        );
        for bad in [
            "multipart/form-data; boundary=a; boundary=b",
            "multipart/form-data; boundary=a; BOUNDARY=b",
            "multipart/form-data",
            "multipart/form-data; boundary=",
            "multipart/form-data; boundary = a",
            "multipart/form-data; boundary=\"a \"",
            "multipart/form-data; boundary=\"{}\"",
        ] {
            assert!(boundary(Some(bad)).is_err(), "{bad}");
        }
        let long = format!("multipart/form-data; boundary={}", "a".repeat(71));
        assert!(boundary(Some(&long)).is_err());
    }

    #[test]
    fn rewrites_or_adds_the_model_and_keeps_everything_else() {
        let out = with_model(&Bytes::from(FORM), "XX", "whisper-prod").unwrap();
        assert_eq!(
            out,
            FORM.replace("\r\nwhisper\r\n", "\r\nwhisper-prod\r\n")
                .as_bytes()
        );
        let same = with_model(&Bytes::from(FORM), "XX", "whisper").unwrap();
        assert_eq!(same, FORM.as_bytes());
        let no_model =
            "--XX\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc\r\n--XX--\r\n";
        let out = with_model(&Bytes::from(no_model), "XX", "m1").unwrap();
        assert_eq!(model(&out, "XX").unwrap().as_deref(), Some("m1"));
        assert!(out.ends_with(no_model.as_bytes()));
    }
}
