//! OTLP's protobuf wire format, written by hand for the few messages a trace export needs.
//!
//! A leaf of [`crate::telemetry`]. The messages and field numbers are those of
//! `opentelemetry/proto/trace/v1/trace.proto`, `common/v1/common.proto`,
//! `resource/v1/resource.proto` and `collector/trace/v1/trace_service.proto` (OTLP 1.x):
//! an `ExportTraceServiceRequest` holding one `ResourceSpans` with one `ScopeSpans`.
//!
//! Why not the SDK's exporter: it copies every attribute into its own span data, then into
//! generated structs, which `prost` then measures again at every level of nesting when it
//! encodes them — about 60,000 instructions per traced request, more than the whole request
//! path. Here each span is encoded once, when it ends, straight from the gateway's own data
//! (attribute values are borrowed, never copied into an intermediate value), into the
//! request's buffer; a batch is those buffers concatenated behind a resource and a scope
//! encoded once at start. A key-value's length is worked out from its parts before it is
//! written; a span's is patched in once its fields are written (see [`span`]).

/// `Span.SpanKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// `SpanFlags`: the W3C trace flags (sampled) and whether the parent is known to be remote.
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

// Tags: (field number << 3) | wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).
const SPAN_TRACE_ID: u8 = 1 << 3 | 2;
const SPAN_SPAN_ID: u8 = 2 << 3 | 2;
const SPAN_PARENT_SPAN_ID: u8 = 4 << 3 | 2;
const SPAN_NAME: u8 = 5 << 3 | 2;
const SPAN_KIND: u8 = 6 << 3;
const SPAN_START: u8 = 7 << 3 | 1;
const SPAN_END: u8 = 8 << 3 | 1;
const SPAN_ATTRIBUTE: u8 = 9 << 3 | 2;
const SPAN_STATUS: u8 = 15 << 3 | 2;
/// Field 16, fixed32: the tag is a two-byte varint.
const SPAN_FLAGS: [u8; 2] = [(16 << 3 | 5) as u8 | 0x80, 1];
const STATUS_MESSAGE: u8 = 2 << 3 | 2;
const STATUS_CODE: u8 = 3 << 3;
const STATUS_CODE_ERROR: u8 = 2;
const KEY_VALUE_KEY: u8 = 1 << 3 | 2;
const KEY_VALUE_VALUE: u8 = 2 << 3 | 2;
const ANY_STRING: u8 = 1 << 3 | 2;
const ANY_BOOL: u8 = 2 << 3;
const ANY_INT: u8 = 3 << 3;
/// `ScopeSpans.spans`: every encoded span is prefixed with it.
const SCOPE_SPANS_SPAN: u8 = 2 << 3 | 2;
/// Field 1 of `ExportTraceServiceRequest` (resource_spans), `ResourceSpans` (resource),
/// `Resource` (attributes), `ScopeSpans` (scope) and `InstrumentationScope` (name).
const FIELD_1: u8 = 1 << 3 | 2;
/// Field 2 of `ResourceSpans` (scope_spans) and `InstrumentationScope` (version).
const FIELD_2: u8 = 2 << 3 | 2;

#[inline(always)]
pub(super) fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline(always)]
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// A length-delimited field: tag, length, bytes.
#[inline(always)]
fn field(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An attribute's value (`AnyValue`), borrowed.
#[derive(Debug, Clone, Copy)]
pub(super) enum Value<'a> {
    /// A string's UTF-8 bytes.
    Str(&'a [u8]),
    Int(i64),
    Bool(bool),
}

impl Value<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        match self {
            Value::Str(s) => 1 + varint_len(s.len() as u64) + s.len(),
            Value::Int(i) => 1 + varint_len(*i as u64),
            Value::Bool(_) => 2,
        }
    }

    #[inline(always)]
    fn write(&self, out: &mut Vec<u8>) {
        match *self {
            Value::Str(s) => field(out, ANY_STRING, s),
            // int64 is a varint of the two's complement (ten bytes when negative).
            Value::Int(i) => {
                out.push(ANY_INT);
                varint(out, i as u64);
            }
            Value::Bool(b) => out.extend_from_slice(&[ANY_BOOL, u8::from(b)]),
        }
    }
}

/// A `KeyValue` as field `tag` of its message.
#[inline(always)]
fn key_value(out: &mut Vec<u8>, tag: u8, key: &str, value: Value<'_>) {
    // The common case, in four writes: every length fits a one-byte varint (a `KeyValue`
    // under 128 bytes) and an integer is below 128.
    let (k, small) = (
        key.len(),
        match value {
            Value::Str(s) => key.len() + s.len() <= 120,
            Value::Int(i) => key.len() <= 120 && (0..128).contains(&i),
            Value::Bool(_) => key.len() <= 120,
        },
    );
    if small {
        let head = [tag, 0, KEY_VALUE_KEY, k as u8];
        match value {
            Value::Str(s) => {
                let n = s.len() as u8;
                let mut head = head;
                head[1] = 6 + k as u8 + n;
                out.extend_from_slice(&head);
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(&[KEY_VALUE_VALUE, n + 2, ANY_STRING, n]);
                out.extend_from_slice(s);
            }
            Value::Int(i) => {
                let mut head = head;
                head[1] = 6 + k as u8;
                out.extend_from_slice(&head);
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(&[KEY_VALUE_VALUE, 2, ANY_INT, i as u8]);
            }
            Value::Bool(b) => {
                let mut head = head;
                head[1] = 6 + k as u8;
                out.extend_from_slice(&head);
                out.extend_from_slice(key.as_bytes());
                out.extend_from_slice(&[KEY_VALUE_VALUE, 2, ANY_BOOL, u8::from(b)]);
            }
        }
        return;
    }
    let v = value.len();
    let len = 1 + varint_len(k as u64) + k + 1 + varint_len(v as u64) + v;
    out.push(tag);
    varint(out, len as u64);
    field(out, KEY_VALUE_KEY, key.as_bytes());
    out.push(KEY_VALUE_VALUE);
    varint(out, v as u64);
    value.write(out);
}

/// The attributes of a span being written.
pub(super) struct Attributes<'a>(&'a mut Vec<u8>);

impl Attributes<'_> {
    #[inline(always)]
    pub fn str(&mut self, key: &str, value: &str) {
        key_value(self.0, SPAN_ATTRIBUTE, key, Value::Str(value.as_bytes()));
    }
    /// A string attribute from bytes the caller knows are ASCII (no UTF-8 check).
    #[inline(always)]
    pub fn ascii(&mut self, key: &str, value: &[u8]) {
        debug_assert!(value.is_ascii());
        key_value(self.0, SPAN_ATTRIBUTE, key, Value::Str(value));
    }
    #[inline(always)]
    pub fn int(&mut self, key: &str, value: i64) {
        key_value(self.0, SPAN_ATTRIBUTE, key, Value::Int(value));
    }
    #[inline(always)]
    pub fn bool(&mut self, key: &str, value: bool) {
        key_value(self.0, SPAN_ATTRIBUTE, key, Value::Bool(value));
    }
}

/// What a span is, apart from its attributes.
pub(super) struct Span<'a> {
    pub trace_id: &'a [u8; 16],
    pub span_id: [u8; 8],
    /// All zeros: a root span with no parent.
    pub parent: [u8; 8],
    /// The parent is the client's span (from its `traceparent`), not one of ours.
    pub remote_parent: bool,
    /// The name, in parts written one after the other (`chat`, ` `, `gpt-4o`).
    pub name: &'a [&'a str],
    pub kind: Kind,
    pub start_ns: u64,
    pub end_ns: u64,
    /// The span failed: `Status { code: ERROR, message }`.
    pub error: Option<&'a str>,
}

/// Append `span` to `out` as one `ScopeSpans.spans` entry. Its fields are written in place
/// behind a two-byte length, patched when they are done (the common size, 128 bytes to
/// 16 KiB); a shorter or longer span has its fields moved to fit a one- or three-byte length,
/// so every length is canonical.
pub(super) fn span(
    out: &mut Vec<u8>,
    span: &Span<'_>,
    attributes: impl FnOnce(&mut Attributes<'_>),
) {
    out.reserve(1024);
    let at = out.len();
    // The fixed-size fields in two writes: the entry's head and the ids, then (after the
    // name) kind and times.
    let mut ids = [0u8; 3 + 18 + 10 + 10];
    ids[0] = SCOPE_SPANS_SPAN;
    ids[3] = SPAN_TRACE_ID;
    ids[4] = 16;
    ids[5..21].copy_from_slice(span.trace_id);
    ids[21] = SPAN_SPAN_ID;
    ids[22] = 8;
    ids[23..31].copy_from_slice(&span.span_id);
    ids[31] = SPAN_PARENT_SPAN_ID;
    ids[32] = 8;
    ids[33..].copy_from_slice(&span.parent);
    let has_parent = span.parent != [0; 8];
    out.extend_from_slice(if has_parent { &ids } else { &ids[..31] });
    let body = at + 3;
    let s = &mut *out;
    s.push(SPAN_NAME);
    varint(s, span.name.iter().map(|p| p.len() as u64).sum());
    for part in span.name {
        s.extend_from_slice(part.as_bytes());
    }
    let mut times = [0u8; 2 + 9 + 9];
    times[..3].copy_from_slice(&[SPAN_KIND, span.kind as u8, SPAN_START]);
    times[3..11].copy_from_slice(&span.start_ns.to_le_bytes());
    times[11] = SPAN_END;
    times[12..].copy_from_slice(&span.end_ns.to_le_bytes());
    s.extend_from_slice(&times);
    attributes(&mut Attributes(s));
    if let Some(message) = span.error {
        s.push(SPAN_STATUS);
        varint(
            s,
            (1 + varint_len(message.len() as u64) + message.len() + 2) as u64,
        );
        field(s, STATUS_MESSAGE, message.as_bytes());
        s.extend_from_slice(&[STATUS_CODE, STATUS_CODE_ERROR]);
    }
    let mut flags = FLAG_SAMPLED | FLAG_HAS_IS_REMOTE;
    if span.remote_parent {
        flags |= FLAG_IS_REMOTE;
    }
    let f = flags.to_le_bytes();
    s.extend_from_slice(&[SPAN_FLAGS[0], SPAN_FLAGS[1], f[0], f[1], f[2], f[3]]);
    let n = out.len() - body;
    match n {
        0..128 => {
            out[at + 1] = n as u8;
            out.copy_within(body.., body - 1);
            out.truncate(out.len() - 1);
        }
        128..16_384 => {
            out[at + 1] = n as u8 | 0x80;
            out[at + 2] = (n >> 7) as u8;
        }
        _ => {
            let mut len = Vec::with_capacity(10);
            varint(&mut len, n as u64);
            out.splice(at + 1..body, len);
        }
    }
}

/// The parts of every export that never change: the `Resource` (its attributes) and the
/// `InstrumentationScope`, each as a complete field.
#[derive(Debug, Clone)]
pub(super) struct Envelope {
    resource: Vec<u8>,
    scope: Vec<u8>,
}

impl Envelope {
    pub fn new(resource: &[(&str, &str)], scope_name: &str, scope_version: &str) -> Self {
        let mut attrs = Vec::new();
        for (k, v) in resource {
            key_value(&mut attrs, FIELD_1, k, Value::Str(v.as_bytes()));
        }
        let mut resource = Vec::new();
        field(&mut resource, FIELD_1, &attrs);
        let mut body = Vec::new();
        field(&mut body, FIELD_1, scope_name.as_bytes());
        field(&mut body, FIELD_2, scope_version.as_bytes());
        let mut scope = Vec::new();
        field(&mut scope, FIELD_1, &body);
        Self { resource, scope }
    }

    /// Room to leave at the front of a batch buffer for [`Envelope::seal`].
    pub fn headroom(&self) -> usize {
        // Two tags and two varints of at most five bytes (a batch is far below 4 GiB).
        self.resource.len() + self.scope.len() + 12
    }

    /// The `ExportTraceServiceRequest` of a batch: `buf` holds [`Envelope::headroom`] bytes
    /// of room, then `ScopeSpans.spans` entries as [`span`] writes them. The envelope is
    /// written into the end of the room and the request is the buffer from there: the spans
    /// are not copied.
    pub fn seal(&self, mut buf: Vec<u8>) -> bytes::Bytes {
        let room = self.headroom();
        let spans_len = buf.len() - room;
        let scope_spans = self.scope.len() + spans_len;
        let resource_spans = self.resource.len() + 1 + varint_len(scope_spans as u64) + scope_spans;
        let mut head = Vec::with_capacity(room);
        head.push(FIELD_1);
        varint(&mut head, resource_spans as u64);
        head.extend_from_slice(&self.resource);
        head.push(FIELD_2);
        varint(&mut head, scope_spans as u64);
        head.extend_from_slice(&self.scope);
        let start = room - head.len();
        buf[start..room].copy_from_slice(&head);
        bytes::Bytes::from(buf).slice(start..)
    }

    /// A batch buffer holding `spans` (for tests).
    #[cfg(test)]
    fn request(&self, spans: &[&[u8]]) -> bytes::Bytes {
        let mut buf = vec![0; self.headroom()];
        for s in spans {
            buf.extend_from_slice(s);
        }
        self.seal(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protobuf field as the wire format reads it.
    #[derive(Debug, PartialEq)]
    enum Wire<'a> {
        Varint(u64),
        Fixed64(u64),
        Fixed32(u32),
        Bytes(&'a [u8]),
    }

    fn read_varint(b: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let (first, rest) = b.split_first().expect("truncated varint");
            *b = rest;
            v |= u64::from(first & 0x7f) << shift;
            if first & 0x80 == 0 {
                return v;
            }
        }
        panic!("varint longer than ten bytes")
    }

    /// Every field of a message, in order; panics when a length runs past the end.
    fn fields(mut b: &[u8]) -> Vec<(u64, Wire<'_>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let tag = read_varint(&mut b);
            let value = match tag & 7 {
                0 => Wire::Varint(read_varint(&mut b)),
                1 => {
                    let (v, rest) = b.split_at(8);
                    b = rest;
                    Wire::Fixed64(u64::from_le_bytes(v.try_into().unwrap()))
                }
                2 => {
                    let n = read_varint(&mut b) as usize;
                    let (v, rest) = b.split_at(n);
                    b = rest;
                    Wire::Bytes(v)
                }
                5 => {
                    let (v, rest) = b.split_at(4);
                    b = rest;
                    Wire::Fixed32(u32::from_le_bytes(v.try_into().unwrap()))
                }
                w => panic!("wire type {w}"),
            };
            out.push((tag >> 3, value));
        }
        out
    }

    fn bytes<'a>(f: &[(u64, Wire<'a>)], n: u64) -> Vec<&'a [u8]> {
        f.iter()
            .filter(|(k, _)| *k == n)
            .map(|(_, v)| match v {
                Wire::Bytes(b) => *b,
                other => panic!("field {n} is {other:?}"),
            })
            .collect()
    }

    fn attribute(kv: &[u8]) -> (String, Wire<'_>) {
        let f = fields(kv);
        let key = String::from_utf8(bytes(&f, 1)[0].to_vec()).unwrap();
        let any = fields(bytes(&f, 2)[0]);
        assert_eq!(any.len(), 1);
        let (_, v) = any.into_iter().next().unwrap();
        (key, v)
    }

    #[test]
    fn varint_lengths_match_what_is_written() {
        for v in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            assert_eq!(read_varint(&mut out.as_slice()), v);
        }
    }

    #[test]
    fn a_request_decodes_field_by_field() {
        let env = Envelope::new(&[("service.name", "svc")], "portcullis", "1.2.3");
        let trace_id = [7u8; 16];
        let long = "p".repeat(300);
        let mut a = Vec::new();
        span(
            &mut a,
            &Span {
                trace_id: &trace_id,
                span_id: [1; 8],
                parent: [9; 8],
                remote_parent: true,
                name: &["chat", " ", "gpt-4o"],
                kind: Kind::Server,
                start_ns: 1_700_000_000_000_000_000,
                end_ns: 1_700_000_000_500_000_000,
                error: Some("429"),
            },
            |at| {
                at.str("url.path", &long);
                at.int("server.port", 443);
                at.int("negative", -2);
                at.bool("portcullis.stream", true);
                at.int("big", 128);
                at.str("edge", &"e".repeat(116));
                at.str("over", &"o".repeat(117));
            },
        );
        let mut b = Vec::new();
        span(
            &mut b,
            &Span {
                trace_id: &trace_id,
                span_id: [2; 8],
                parent: [0; 8],
                remote_parent: false,
                name: &["admit"],
                kind: Kind::Internal,
                start_ns: 5,
                end_ns: 6,
                error: None,
            },
            |_| {},
        );
        // A span over 16 KiB (a long path) gets a three-byte length.
        let mut c = Vec::new();
        let huge = "h".repeat(20_000);
        span(
            &mut c,
            &Span {
                trace_id: &trace_id,
                span_id: [3; 8],
                parent: [0; 8],
                remote_parent: false,
                name: &["big"],
                kind: Kind::Server,
                start_ns: 1,
                end_ns: 2,
                error: None,
            },
            |at| at.str("url.path", &huge),
        );
        let req = env.request(&[&a, &b, &c]);
        let top = fields(&req);
        let rs = fields(bytes(&top, 1)[0]);
        let resource = fields(bytes(&rs, 1)[0]);
        assert_eq!(
            attribute(bytes(&resource, 1)[0]),
            ("service.name".into(), Wire::Bytes(b"svc"))
        );
        let ss = fields(bytes(&rs, 2)[0]);
        let scope = fields(bytes(&ss, 1)[0]);
        assert_eq!(bytes(&scope, 1), [b"portcullis"]);
        assert_eq!(bytes(&scope, 2), [b"1.2.3"]);
        let spans = bytes(&ss, 2);
        assert_eq!(spans.len(), 3);
        assert!(
            b.len() < 130 && a.len() > 300,
            "one- and two-byte lengths both exercised"
        );
        let big = fields(spans[2]);
        let big_attr = attribute(bytes(&big, 9)[0]);
        assert_eq!(big_attr, ("url.path".into(), Wire::Bytes(huge.as_bytes())));
        assert_eq!(bytes(&big, 5), [b"big"]);

        let s = fields(spans[0]);
        assert_eq!(bytes(&s, 1), [&trace_id[..]]);
        assert_eq!(bytes(&s, 2), [&[1u8; 8][..]]);
        assert_eq!(bytes(&s, 4), [&[9u8; 8][..]]);
        assert_eq!(bytes(&s, 5), [b"chat gpt-4o"]);
        assert!(s.contains(&(6, Wire::Varint(2))));
        assert!(s.contains(&(7, Wire::Fixed64(1_700_000_000_000_000_000))));
        assert!(s.contains(&(8, Wire::Fixed64(1_700_000_000_500_000_000))));
        assert!(s.contains(&(16, Wire::Fixed32(0x301))));
        let attrs: Vec<_> = bytes(&s, 9).into_iter().map(attribute).collect();
        assert_eq!(attrs[0], ("url.path".into(), Wire::Bytes(long.as_bytes())));
        assert_eq!(attrs[1], ("server.port".into(), Wire::Varint(443)));
        assert_eq!(attrs[2], ("negative".into(), Wire::Varint(-2i64 as u64)));
        assert_eq!(attrs[3], ("portcullis.stream".into(), Wire::Varint(1)));
        assert_eq!(attrs[4], ("big".into(), Wire::Varint(128)));
        // 4 + 116 = 120: the last one-byte-length case, and the first past it.
        assert_eq!(
            attrs[5],
            ("edge".into(), Wire::Bytes("e".repeat(116).as_bytes()))
        );
        assert_eq!(
            attrs[6],
            ("over".into(), Wire::Bytes("o".repeat(117).as_bytes()))
        );
        let status = fields(bytes(&s, 15)[0]);
        assert_eq!(status, [(2, Wire::Bytes(b"429")), (3, Wire::Varint(2))]);

        let s = fields(spans[1]);
        assert!(
            bytes(&s, 4).is_empty(),
            "a root without parent has no parent id"
        );
        assert!(bytes(&s, 15).is_empty(), "no status when it did not fail");
        assert!(s.contains(&(16, Wire::Fixed32(0x101))));
    }
}
