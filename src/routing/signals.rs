//! What a backend's answer says about its capacity: how long a 429 asks to wait, and the
//! room left in its rate-limit window (`x-ratelimit-remaining-*`, `x-ratelimit-reset-*`).
//!
//! Backends disagree on the forms. Azure sends `retry-after-ms` and `retry-after` (seconds)
//! on most 429s, `x-ms-retry-after-ms` on some, an HTTP date now and then, and on the
//! Responses API a 429 with `-1`/`0` rate-limit headers and no wait at all. OpenAI writes
//! resets as Go durations (`6m0s`, `1s`, `20ms`). Nonsense (negative, zero, unparsable,
//! dates in the past) is ignored, so the configured default applies instead.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

use super::health::CoolSource;

/// The wait a 429 asks for, and which header said so; `None` when no header holds a
/// usable value.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<(Duration, CoolSource)> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(d) = text("retry-after-ms").and_then(positive_ms) {
        return Some((d, CoolSource::RetryAfterMs));
    }
    if let Some(d) = text("x-ms-retry-after-ms").and_then(positive_ms) {
        return Some((d, CoolSource::XMsRetryAfterMs));
    }
    let ra = text("retry-after")?;
    if let Ok(secs) = ra.parse::<u64>() {
        return (secs > 0).then(|| (Duration::from_secs(secs), CoolSource::RetryAfterSeconds));
    }
    let at = httpdate::parse_http_date(ra).ok()?;
    let d = at.duration_since(now).ok()?;
    (!d.is_zero()).then_some((d, CoolSource::RetryAfterDate))
}

/// A positive number of milliseconds (decimals allowed: `1500.5`).
fn positive_ms(v: &str) -> Option<Duration> {
    let n: f64 = v.parse().ok()?;
    (n.is_finite() && n > 0.0 && n < 1e12).then(|| Duration::from_micros((n * 1000.0) as u64))
}

/// The room a backend reported: remaining tokens and requests (each when present and not
/// negative), and how long the report holds (the later of the `x-ratelimit-reset-*` times
/// that parse).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Room {
    pub tokens: Option<i64>,
    pub requests: Option<i64>,
    pub reset: Option<Duration>,
}

pub fn room(headers: &HeaderMap) -> Room {
    let int = |v: &http::HeaderValue| {
        v.to_str()
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|n| *n >= 0)
    };
    // One pass over the fields (this runs on every answer): only `x-ratelimit-*` ones are
    // looked at, and none is hashed or looked up by name.
    let mut room = Room::default();
    for (name, value) in headers {
        let Some(rest) = name.as_str().strip_prefix("x-ratelimit-") else {
            continue;
        };
        match rest {
            "remaining-tokens" => room.tokens = int(value),
            "remaining-requests" => room.requests = int(value),
            "reset-tokens" | "reset-requests" => {
                if let Some(d) = value.to_str().ok().and_then(go_duration) {
                    room.reset = Some(room.reset.map_or(d, |r| r.max(d)));
                }
            }
            _ => {}
        }
    }
    room
}

/// A Go-style duration (`1h2m3.5s`, `20ms`, `6m0s`) or plain seconds (`12`, `0.5`).
pub fn go_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs > 0.0 && secs < 1e9)
            .then(|| Duration::from_secs_f64(secs));
    }
    let mut total = 0f64;
    let mut rest = v;
    while !rest.is_empty() {
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .filter(|&e| e > 0)?;
        let n: f64 = rest[..end].parse().ok()?;
        rest = &rest[end..];
        let (unit, len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with("us") || rest.starts_with("µs") {
            (
                0.000_001,
                if rest.starts_with("us") {
                    2
                } else {
                    "µs".len()
                },
            )
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else {
            return None;
        };
        total += n * unit;
        rest = &rest[len..];
    }
    (total > 0.0 && total < 1e9).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, v.parse().unwrap());
        }
        m
    }

    #[test]
    fn every_retry_after_form() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000);
        let at = |p: &[(&'static str, &str)]| retry_after(&h(p), now);
        assert_eq!(
            at(&[("retry-after-ms", "1500"), ("retry-after", "2")]),
            Some((Duration::from_millis(1500), CoolSource::RetryAfterMs)),
            "the exact form wins"
        );
        assert_eq!(
            at(&[("x-ms-retry-after-ms", "250")]),
            Some((Duration::from_millis(250), CoolSource::XMsRetryAfterMs))
        );
        assert_eq!(
            at(&[("retry-after", "7")]),
            Some((Duration::from_secs(7), CoolSource::RetryAfterSeconds))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            at(&[("retry-after", date.as_str())]),
            Some((Duration::from_secs(30), CoolSource::RetryAfterDate))
        );
        // Nonsense is no answer: the configured default applies.
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        for p in [
            &[][..],
            &[("retry-after", "0")],
            &[("retry-after", "-1")],
            &[("retry-after-ms", "-1"), ("retry-after", "soon")],
            &[("retry-after-ms", "0"), ("x-ms-retry-after-ms", "NaN")],
            &[("retry-after", past.as_str())],
            &[
                ("x-ratelimit-remaining-tokens", "-1"),
                ("x-ratelimit-reset-tokens", "0"),
            ],
        ] {
            assert_eq!(at(p), None, "{p:?}");
        }
        // A bad exact value falls through to a good coarse one.
        assert_eq!(
            at(&[("retry-after-ms", "-1"), ("retry-after", "3")]),
            Some((Duration::from_secs(3), CoolSource::RetryAfterSeconds))
        );
    }

    #[test]
    fn room_and_resets() {
        let r = room(&h(&[
            ("x-ratelimit-remaining-tokens", "900"),
            ("x-ratelimit-remaining-requests", "4"),
            ("x-ratelimit-reset-tokens", "6m0s"),
            ("x-ratelimit-reset-requests", "20ms"),
        ]));
        assert_eq!(r.tokens, Some(900));
        assert_eq!(r.requests, Some(4));
        assert_eq!(r.reset, Some(Duration::from_secs(360)));
        let r = room(&h(&[
            ("x-ratelimit-remaining-tokens", "-1"),
            ("x-ratelimit-remaining-requests", "0"),
        ]));
        assert_eq!((r.tokens, r.requests, r.reset), (None, Some(0), None));
        assert_eq!(
            go_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(go_duration("0.5"), Some(Duration::from_millis(500)));
        for bad in ["", "0", "-3s", "5x", "s", "1.2.3s"] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
    }
}
