//! The token usage a backend reports, and finding it in a non-streamed JSON answer.
//!
//! [`Usage`] reads the three shapes a `usage` object takes: chat and text completions
//! (`prompt_tokens`, `completion_tokens` and their `*_details`), embeddings (`prompt_tokens`,
//! `total_tokens`) and the Responses API (`input_tokens`, `output_tokens` and their
//! `*_details`). [`JsonUsage`] is fed an answer's bytes frame by frame, as they are relayed,
//! and keeps only the value of the top-level `"usage"` member: nothing else is buffered.

use serde::Deserialize;

/// Tokens one request used, as its backend reported them.
///
/// `cached` is part of `prompt` and `reasoning` part of `completion`, as OpenAI counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
    pub reasoning: u64,
}

impl Usage {
    /// Prompt and completion tokens together.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }

    /// Read a `usage` object from its JSON text. Missing members count as 0; `None` when it
    /// is not a JSON object or a member has the wrong type (a string, a negative number).
    pub fn from_json(text: &[u8]) -> Option<Self> {
        // serde's derived structs also accept arrays: only an object is a usage object.
        if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return None;
        }
        serde_json::from_slice::<Raw>(text).ok().map(Raw::usage)
    }

    /// Read a `usage` object already parsed; see [`Usage::from_json`].
    pub fn from_value(value: &serde_json::Value) -> Option<Self> {
        if !value.is_object() {
            return None;
        }
        Raw::deserialize(value).ok().map(Raw::usage)
    }
}

/// Every member any of the three shapes uses; `null` reads as absent.
#[derive(Deserialize)]
struct Raw {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl Raw {
    fn usage(self) -> Usage {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        let detail = |a: Option<Details>, b: Option<Details>, f: fn(&Details) -> Option<u64>| {
            a.as_ref().and_then(f).or_else(|| b.as_ref().and_then(f))
        };
        Usage {
            // A usage that only gives a total (some embedding servers) is all prompt.
            prompt: match (prompt, completion) {
                (None, None) => self.total_tokens.unwrap_or(0),
                _ => prompt.unwrap_or(0),
            },
            cached: detail(self.prompt_tokens_details, self.input_tokens_details, |d| {
                d.cached_tokens
            })
            .unwrap_or(0),
            completion: completion.unwrap_or(0),
            reasoning: detail(
                self.completion_tokens_details,
                self.output_tokens_details,
                |d| d.reasoning_tokens,
            )
            .unwrap_or(0),
        }
    }
}

/// The most a captured `usage` value may hold; a longer one is not a usage object.
pub const MAX_USAGE_BYTES: usize = 16 * 1024;

/// The longest `model` name kept for traces.
pub const MAX_MODEL_BYTES: usize = 256;

/// A `model` string's contents (between its quotes) read as written, when they need no
/// unescaping — a model name never does — and are not too long: the cheap path both
/// scanners take before anything else.
pub(super) fn model_as_written(raw: &[u8]) -> Option<String> {
    if raw.is_empty() || raw.len() > MAX_MODEL_BYTES || raw.contains(&b'\\') {
        return None;
    }
    std::str::from_utf8(raw).ok().map(str::to_owned)
}

/// The longest member name compared with `usage` (escapes included, as written).
const MAX_KEY_BYTES: usize = 32;

/// Where [`JsonUsage`] is in the document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Doc {
    /// Before the first non-whitespace byte.
    Start,
    /// Inside the top-level object.
    Object,
    /// After the top-level object, or the document is not an object: nothing more to read.
    Done,
}

/// Finds the top-level `"usage"` member of a JSON answer fed frame by frame.
///
/// It follows the JSON structure (strings, escapes, nesting), so a `"usage"` inside a string
/// or a nested object is not taken for it, and a member split across frames at any byte is
/// found all the same. Linear in the input; only the usage value itself is kept, up to
/// [`MAX_USAGE_BYTES`]. It does not validate the document: a malformed answer yields `None`
/// or whatever `usage` value it can make out.
///
/// `MODEL`: whether the top-level `model` string is read too (for traces,
/// [`JsonUsage::with_model`]). A constant, so the scanner of an untraced answer is compiled
/// without that check at all.
#[derive(Debug)]
pub struct JsonUsage<const MODEL: bool = false> {
    doc: Doc,
    depth: u32,
    in_string: bool,
    escape: bool,
    /// At depth 1, the next string is a member name.
    expect_key: bool,
    /// Reading a depth-1 member name into `key`.
    in_key: bool,
    key: Vec<u8>,
    key_too_long: bool,
    /// The member name just read is `usage`: its value is captured from the next byte.
    matched: bool,
    capturing: bool,
    captured: Vec<u8>,
    /// The last complete `usage` value read as a usage object (the last one wins, as for
    /// most JSON readers); `None` when it is not one, or there is none yet.
    usage: Option<Usage>,
    /// The top-level `model` is what is captured now (`MODEL` only).
    capturing_model: bool,
    /// The top-level `model` string, when asked for.
    model: Option<String>,
}

impl Default for JsonUsage {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonUsage {
    pub fn new() -> Self {
        Self::blank()
    }

    /// A scanner that also reads the answer's top-level `model` string (see
    /// [`JsonUsage::model`]).
    pub fn with_model() -> JsonUsage<true> {
        JsonUsage::blank()
    }
}

impl<const MODEL: bool> JsonUsage<MODEL> {
    fn blank() -> Self {
        Self {
            doc: Doc::Start,
            depth: 0,
            in_string: false,
            escape: false,
            expect_key: false,
            in_key: false,
            key: Vec::new(),
            key_too_long: false,
            matched: false,
            capturing: false,
            captured: Vec::new(),
            usage: None,
            capturing_model: false,
            model: None,
        }
    }

    /// Read the next bytes of the answer.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut i = 0;
        while i < bytes.len() && self.doc != Doc::Done {
            if self.doc == Doc::Start {
                match bytes[i] {
                    b' ' | b'\t' | b'\n' | b'\r' => {}
                    b'{' => {
                        self.doc = Doc::Object;
                        self.depth = 1;
                        self.expect_key = true;
                    }
                    _ => self.doc = Doc::Done,
                }
                i += 1;
                continue;
            }
            if self.in_string {
                i = self.string_bytes(bytes, i);
                continue;
            }
            if self.depth > 1 {
                // Nested: only quotes and brackets matter; skip (or capture) the rest at once.
                let rest = &bytes[i..];
                let run = rest
                    .iter()
                    .position(|&b| NESTED_STOP[usize::from(b)])
                    .unwrap_or(rest.len());
                if self.capturing && run > 0 {
                    self.capture(&rest[..run]);
                }
                i += run;
                if i == bytes.len() {
                    break;
                }
            }
            let b = bytes[i];
            i += 1;
            let top = self.depth == 1;
            match b {
                b',' | b'}' | b']' if top => {
                    self.end_capture();
                    if b == b',' {
                        self.expect_key = true;
                    } else {
                        self.depth = 0;
                        self.doc = Doc::Done;
                    }
                    continue;
                }
                b':' if top => {
                    self.expect_key = false;
                    if std::mem::take(&mut self.matched) {
                        self.capturing = true;
                        self.captured.clear();
                        self.captured.reserve(256);
                    }
                    continue;
                }
                b'"' => {
                    self.in_string = true;
                    if top && self.expect_key {
                        self.in_key = true;
                        self.key.clear();
                        self.key_too_long = false;
                    }
                }
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                _ => {}
            }
            if self.capturing && !(self.captured.is_empty() && b.is_ascii_whitespace()) {
                self.capture(&[b]);
            }
        }
    }

    /// Inside a string from `bytes[i]`: consume up to and including its closing quote (or
    /// the end of `bytes`) and return where reading goes on.
    fn string_bytes(&mut self, bytes: &[u8], i: usize) -> usize {
        let mut j = i;
        if self.escape {
            self.escape = false;
            j += 1;
        }
        // Skip to the next quote or backslash: the only bytes that matter in a string.
        let end = loop {
            match quote_or_backslash(&bytes[j..]) {
                None => break None,
                Some(k) if bytes[j + k] == b'\\' => {
                    if j + k + 1 < bytes.len() {
                        j += k + 2;
                    } else {
                        self.escape = true;
                        break None;
                    }
                }
                Some(k) => break Some(j + k),
            }
        };
        let stop = end.map_or(bytes.len(), |e| e + 1);
        let piece = &bytes[i..stop];
        if self.in_key {
            let name = end.map_or(piece, |_| &piece[..piece.len() - 1]);
            if self.key.len() + name.len() > MAX_KEY_BYTES {
                self.key_too_long = true;
            } else {
                self.key.extend_from_slice(name);
            }
        }
        if self.capturing {
            self.capture(piece);
        }
        if end.is_some() {
            self.in_string = false;
            if std::mem::take(&mut self.in_key) {
                self.matched = !self.key_too_long && is_usage(&self.key);
                if MODEL {
                    self.capturing_model = !self.matched && self.key == b"model";
                    self.matched |= self.capturing_model;
                }
            }
        }
        stop
    }

    fn capture(&mut self, piece: &[u8]) {
        if self.captured.len() + piece.len() > MAX_USAGE_BYTES {
            // Too long to be a usage object: forget it.
            self.capturing = false;
            self.captured = Vec::new();
        } else {
            self.captured.extend_from_slice(piece);
        }
    }

    fn end_capture(&mut self) {
        if std::mem::take(&mut self.capturing) {
            if MODEL && std::mem::take(&mut self.capturing_model) {
                // Read as written when it can be; else let serde_json unescape it (or
                // refuse what is not a string).
                let c = &self.captured;
                let plain = match c.as_slice() {
                    [b'"', inner @ .., b'"'] if !inner.contains(&b'"') => model_as_written(inner),
                    _ => None,
                };
                self.model = plain
                    .or_else(|| serde_json::from_slice::<String>(c).ok())
                    .filter(|m| m.len() <= MAX_MODEL_BYTES);
            } else {
                self.usage = Usage::from_json(&self.captured);
            }
            self.captured.clear();
        }
    }

    /// The answer's top-level `model` string, when [`JsonUsage::with_model`] asked for it.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The same, handed over.
    pub fn take_model(&mut self) -> Option<String> {
        self.model.take()
    }

    /// The usage read so far: the last complete top-level `usage` value, when it is a usage
    /// object (`None` for `null`, a non-object, or no `usage` member).
    pub fn finish(&self) -> Option<Usage> {
        self.usage
    }
}

/// The bytes that end a run of uninteresting bytes inside a nested value: quotes and
/// brackets.
const NESTED_STOP: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'{' as usize] = true;
    t[b'}' as usize] = true;
    t[b'[' as usize] = true;
    t[b']' as usize] = true;
    t
};

/// Where the first `"` or `\` of `s` is: most strings of an answer are short, so a plain loop
/// looks at the first 32 bytes and `memchr2` (which costs more to start) at the rest.
fn quote_or_backslash(s: &[u8]) -> Option<usize> {
    let head = s.len().min(32);
    match s[..head].iter().position(|&b| b == b'"' || b == b'\\') {
        Some(k) => Some(k),
        None => memchr::memchr2(b'"', b'\\', &s[head..]).map(|k| k + head),
    }
}

/// Whether a member name, as written between its quotes, is `usage` (escapes decoded).
fn is_usage(raw: &[u8]) -> bool {
    if raw == b"usage" {
        return true;
    }
    if !raw.contains(&b'\\') {
        return false;
    }
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    serde_json::from_slice::<String>(&quoted).is_ok_and(|s| s == "usage")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn u(prompt: u64, cached: u64, completion: u64, reasoning: u64) -> Usage {
        Usage {
            prompt,
            cached,
            completion,
            reasoning,
        }
    }

    #[test]
    fn reads_the_three_usage_shapes() {
        let chat = br#"{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,
            "prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},
            "completion_tokens_details":{"reasoning_tokens":3,"audio_tokens":0}}"#;
        assert_eq!(Usage::from_json(chat), Some(u(19, 4, 10, 3)));
        assert_eq!(Usage::from_json(chat).unwrap().total(), 29);
        let embeddings = br#"{"prompt_tokens":8,"total_tokens":8}"#;
        assert_eq!(Usage::from_json(embeddings), Some(u(8, 0, 0, 0)));
        let responses = br#"{"input_tokens":36,"input_tokens_details":{"cached_tokens":0},
            "output_tokens":87,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":123}"#;
        assert_eq!(Usage::from_json(responses), Some(u(36, 0, 87, 64)));
        let v: serde_json::Value = serde_json::from_slice(responses).unwrap();
        assert_eq!(Usage::from_value(&v), Some(u(36, 0, 87, 64)));
    }

    #[test]
    fn missing_members_are_zero_and_malformed_objects_none() {
        assert_eq!(Usage::from_json(b"{}"), Some(Usage::default()));
        assert_eq!(
            Usage::from_json(br#"{"prompt_tokens":5,"prompt_tokens_details":null}"#),
            Some(u(5, 0, 0, 0))
        );
        assert_eq!(
            Usage::from_json(br#"{"total_tokens":7}"#),
            Some(u(7, 0, 0, 0))
        );
        for bad in [
            &b"null"[..],
            b"[1,2]",
            b"5",
            br#"{"prompt_tokens":"5"}"#,
            br#"{"prompt_tokens":-1}"#,
            br#"{"prompt_tokens":1.5}"#,
            br#"{"completion_tokens_details":{"reasoning_tokens":"x"}}"#,
            br#"{"prompt_tokens":1,"prompt_tokens":2}"#,
            br#"{"prompt_tokens":1"#,
        ] {
            assert_eq!(
                Usage::from_json(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(Usage::from_value(&serde_json::json!([1])), None);
    }

    #[test]
    fn reads_the_top_level_model_only_when_asked() {
        let doc = br#"{"id":"x","choices":[{"message":{"model":"inner"}}],"model" : "gpt-4o-2024-08-06","usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        for at in 0..=doc.len() {
            let mut s = JsonUsage::with_model();
            s.feed(&doc[..at]);
            s.feed(&doc[at..]);
            assert_eq!(s.model(), Some("gpt-4o-2024-08-06"), "split at {at}");
            assert_eq!(s.finish().map(|u| u.completion), Some(4));
        }
        let mut s = JsonUsage::new();
        s.feed(doc);
        assert_eq!(s.model(), None);
        let mut s = JsonUsage::with_model();
        s.feed(br#"{"model":{"not":"a string"},"usage":{"prompt_tokens":1}}"#);
        assert_eq!((s.model(), s.finish().map(|u| u.prompt)), (None, Some(1)));
    }

    /// Feed `doc` whole, one byte at a time and in pseudo-random pieces: same answer.
    fn scan_all_ways(doc: &[u8]) -> Option<Usage> {
        let whole = {
            let mut s = JsonUsage::new();
            s.feed(doc);
            s.finish()
        };
        let mut bytewise = JsonUsage::new();
        for b in doc {
            bytewise.feed(std::slice::from_ref(b));
        }
        assert_eq!(bytewise.finish(), whole, "byte by byte");
        for seed in 1..40u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut s = JsonUsage::new();
            let mut rest = doc;
            while !rest.is_empty() {
                let n = rng.usize(0..=rest.len().min(9));
                s.feed(&rest[..n]);
                rest = &rest[n..];
            }
            assert_eq!(s.finish(), whole, "pieces, seed {seed}");
        }
        // Split at every position in two.
        for at in 0..=doc.len() {
            let mut s = JsonUsage::new();
            s.feed(&doc[..at]);
            s.feed(&doc[at..]);
            assert_eq!(s.finish(), whole, "split at {at}");
        }
        whole
    }

    #[test]
    fn finds_the_top_level_usage_split_anywhere() {
        let doc = br#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":0}},"system_fingerprint":"fp"}"#;
        assert_eq!(scan_all_ways(doc), Some(u(9, 2, 1, 0)));
        // Last member, whitespace everywhere.
        let doc = b" \n{ \"a\" : [ 1 , 2 ] ,\r\n\t\"usage\"\n:\n { \"prompt_tokens\" : 3 , \"completion_tokens\" : 4 } \n} \n";
        assert_eq!(scan_all_ways(doc), Some(u(3, 0, 4, 0)));
        // The Responses API's answer: usage is top-level too.
        let doc = br#"{"id":"resp_1","object":"response","output":[{"type":"message","content":[{"type":"output_text","text":"x"}]}],"usage":{"input_tokens":5,"output_tokens":6,"output_tokens_details":{"reasoning_tokens":2}}}"#;
        assert_eq!(scan_all_ways(doc), Some(u(5, 0, 6, 2)));
    }

    #[test]
    fn usage_in_strings_or_nested_objects_is_ignored() {
        let doc = br#"{"choices":[{"message":{"content":"\"usage\":{\"prompt_tokens\":99}","usage":{"prompt_tokens":98}}}],"note":"usage","x\\":{"usage":{"prompt_tokens":97}},"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        assert_eq!(scan_all_ways(doc), Some(u(1, 0, 2, 0)));
        let nested_only = br#"{"data":{"usage":{"prompt_tokens":5}},"text":"\"usage\": {}"}"#;
        assert_eq!(scan_all_ways(nested_only), None);
        // A member *value* that reads "usage" is not a member name.
        let value = br#"{"kind":"usage","n":{"prompt_tokens":5}}"#;
        assert_eq!(scan_all_ways(value), None);
    }

    #[test]
    fn escaped_names_null_and_oversized_values() {
        let escaped = br#"{"\u0075sage":{"prompt_tokens":4}}"#;
        assert_eq!(scan_all_ways(escaped), Some(u(4, 0, 0, 0)));
        assert_eq!(scan_all_ways(br#"{"usage":null,"id":"x"}"#), None);
        assert_eq!(scan_all_ways(br#"[{"usage":{"prompt_tokens":1}}]"#), None);
        let mut huge = br#"{"usage":{"prompt_tokens":1,"pad":""#.to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_USAGE_BYTES));
        huge.extend_from_slice(br#""}}"#);
        let mut s = JsonUsage::new();
        s.feed(&huge);
        assert_eq!(s.finish(), None, "a value over the cap is dropped");
        // An answer cut inside the usage value has no usage.
        let mut s = JsonUsage::new();
        s.feed(br#"{"usage":{"prompt_tokens":1"#);
        assert_eq!(s.finish(), None);
    }
}
