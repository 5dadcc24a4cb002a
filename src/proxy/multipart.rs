//! The `model` field of `multipart/form-data` bodies (audio, image edits), read and
//! rewritten by one small parser so that routing and rewriting can never disagree.
//!
//! Only the part boundaries and the `Content-Disposition` of each part are read; file
//! contents are skipped, never copied. A form with more than one `model` field is refused:
//! backends differ on which one they take, and the gateway must check the one that runs.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::error::GatewayError;

fn invalid(msg: &str) -> GatewayError {
    GatewayError::InvalidRequest(format!("invalid multipart body: {msg}"))
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

/// Whether a part's headers name it `model` (`name="model"`, not `filename="model"`).
fn is_model_part(headers: &[u8]) -> bool {
    let text = String::from_utf8_lossy(headers).to_ascii_lowercase();
    text.lines()
        .filter(|l| l.starts_with("content-disposition:"))
        .any(|l| {
            l.split(';')
                .map(str::trim)
                .any(|p| p == "name=\"model\"" || p == "name=model")
        })
}

/// Byte range of the `model` field's value, `None` if the form has none.
pub fn model_span(body: &[u8], boundary: &str) -> Result<Option<Range<usize>>, GatewayError> {
    let delim = format!("--{boundary}");
    let next_delim = format!("\r\n--{boundary}");
    let mut pos = find(body, delim.as_bytes(), 0).ok_or_else(|| invalid("no opening boundary"))?;
    let mut found: Option<Range<usize>> = None;
    loop {
        let after = pos + delim.len();
        if body.get(after..after + 2) == Some(b"--") {
            return Ok(found);
        }
        if body.get(after..after + 2) != Some(b"\r\n") {
            return Err(invalid("malformed boundary line"));
        }
        let head_start = after + 2;
        let head_end = find(body, b"\r\n\r\n", head_start)
            .ok_or_else(|| invalid("unterminated part headers"))?;
        let value_start = head_end + 4;
        let value_end = find(body, next_delim.as_bytes(), value_start)
            .ok_or_else(|| invalid("missing closing boundary"))?;
        if is_model_part(&body[head_start..head_end]) {
            if found.is_some() {
                return Err(invalid("more than one `model` field"));
            }
            found = Some(value_start..value_end);
        }
        pos = value_end + 2;
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

    #[test]
    fn reads_the_model_field_not_a_file_named_model() {
        assert_eq!(
            model(FORM.as_bytes(), "XX").unwrap().as_deref(),
            Some("whisper")
        );
        let no_model =
            "--XX\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc\r\n--XX--\r\n";
        assert_eq!(model(no_model.as_bytes(), "XX").unwrap(), None);
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
