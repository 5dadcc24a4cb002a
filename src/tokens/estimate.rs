//! Request estimates: the prompt tokens a request body will cost and the output tokens to
//! reserve for its answer, from the raw body the client sent, before it is forwarded.
//!
//! Never fails: a body that is not a JSON object (or is a form) is estimated from its length,
//! one token per 4 bytes rounded up. Rules per operation:
//! - chat: OpenAI's documented counting — 3 tokens per message plus the tokens of each of
//!   its string fields (`role`, `content`, `name` and one more when `name` is present, any
//!   other string such as `tool_call_id`), plus 3 priming the reply. `content` may be a
//!   string or an array of parts: `text` / `refusal` parts count as text, `image_url` parts
//!   by the tile formula (85 for `detail: "low"`; otherwise sized from a base64 `data:` URL's
//!   header, or `default_image_tokens` when it cannot be sized — a remote URL, say),
//!   `input_audio` parts at 10 tokens per second of audio (the duration from a WAV header, or
//!   from the size at 128 kbit/s), `file` parts `default_image_tokens` each (a PDF's real cost
//!   depends on its pages and text, which only the backend extracts), unknown parts as their
//!   compact JSON text. `tool_calls` / `function_call` in messages, `tools` / `functions`
//!   definitions and a `json_schema` `response_format` count as their compact JSON text.
//! - completions: `prompt` (a string, an array of strings, an array of token ids counted as
//!   their number, or an array of such arrays) and `suffix`.
//! - embeddings: `input`, in the same shapes; no output.
//! - responses: `instructions` and each `input` message counted like chat messages, with
//!   `input_text` / `output_text` / `input_image` / `input_file` / `input_audio` parts;
//!   other input items (function calls and their outputs, reasoning, references) as their
//!   compact JSON text; `tools` and a `json_schema` `text.format` as compact JSON.
//! - anything else (images, audio, files, batches, models, ...): 0 and 0; not priced in tokens.
//!
//! The output reserved is `max_completion_tokens`, else `max_tokens` (chat), `max_tokens`
//! (completions) or `max_output_tokens` (responses), else `default_max_tokens`; times `n`
//! (the larger of `n` and `best_of` for completions, and times the number of prompts, each of
//! which gets its own choices); 0 with [`ReserveOutput::None`] and for embeddings.
//!
//! The encoding is the caller's `model` (the deployment, for Azure) or, when that is empty,
//! the body's `model`. Text counting shares one budget per request ([`super::EXACT_BYTES`]).

use std::borrow::Cow;
use std::fmt;

use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::image::{audio_tokens, data_url_dimensions, tile_tokens, LOW_DETAIL_TOKENS};
use super::{encoding_for, Counter};
use crate::route::Operation;

/// Tokens a request is expected to cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Estimate {
    /// Tokens of the prompt (the request's input).
    pub prompt: u64,
    /// Tokens reserved for the answer.
    pub output: u64,
}

impl Estimate {
    /// Prompt and output together.
    pub fn total(self) -> u64 {
        self.prompt.saturating_add(self.output)
    }
}

/// Whether the estimate reserves tokens for the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReserveOutput {
    /// Reserve the request's `max_*tokens` (or `default_max_tokens`), times its choices.
    MaxTokens,
    /// Reserve nothing: output is charged only when the backend reports it.
    None,
}

/// How to estimate what a request does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EstimateOptions {
    /// Output tokens reserved per choice when the request sets no `max_*tokens`.
    pub default_max_tokens: u64,
    pub reserve_output: ReserveOutput,
    /// Tokens of an image whose size cannot be read (a remote URL, a file id), and of each
    /// file part.
    pub default_image_tokens: u64,
}

/// Tokens per message (`<|start|>{role}<|message|>...<|end|>`).
const PER_MESSAGE: u64 = 3;
/// Tokens priming the reply (`<|start|>assistant<|message|>`).
const REPLY_PRIMING: u64 = 3;
/// Extra tokens of a message that has a `name`.
const PER_NAME: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completions,
    Embeddings,
    Responses,
}

/// Estimate the tokens of a request `body` for `op` on `model` (see the module docs). Meant
/// for calls that run a model: for `responses`, only its create (`POST /responses`).
pub fn estimate(
    op: Operation,
    model: &str,
    body: &[u8],
    content_type: Option<&str>,
    opts: &EstimateOptions,
) -> Estimate {
    estimate_body(op, model, body, is_form(content_type), opts)
}

/// [`estimate`] of a body already known to be a form (`form`, never parsed as JSON) or not.
pub fn estimate_body(
    op: Operation,
    model: &str,
    body: &[u8],
    form: bool,
    opts: &EstimateOptions,
) -> Estimate {
    let kind = match op {
        Operation::Chat => Kind::Chat,
        Operation::Completions => Kind::Completions,
        Operation::Embeddings => Kind::Embeddings,
        Operation::Responses => Kind::Responses,
        _ => return Estimate::default(),
    };
    let doc = if form {
        None
    } else {
        serde_json::from_slice::<Top<'_>>(body).ok()
    };
    let Some(Top(Some(doc))) = doc else {
        return Estimate {
            prompt: (body.len() as u64).div_ceil(4),
            output: output(kind, &Doc::default(), opts),
        };
    };
    let model = if model.is_empty() {
        doc.model.as_deref().unwrap_or("")
    } else {
        model
    };
    let mut p = Prompt {
        c: Counter::new(encoding_for(model)),
        opts,
    };
    let prompt = match kind {
        Kind::Chat => p.chat(&doc),
        Kind::Completions => p.inputs(doc.prompt.as_ref()) + p.text(doc.suffix.as_ref()),
        Kind::Embeddings => p.inputs(doc.input.as_ref()),
        Kind::Responses => p.responses(&doc),
    };
    Estimate {
        prompt,
        output: output(kind, &doc, opts),
    }
}

/// Whether a body of this content type is a form, not JSON (never parsed as JSON).
pub fn is_form(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        let mime = ct.split(';').next().unwrap_or("").trim();
        mime.eq_ignore_ascii_case("multipart/form-data")
            || mime.eq_ignore_ascii_case("application/x-www-form-urlencoded")
    })
}

fn uint(v: &Option<Value>) -> Option<u64> {
    v.as_ref().and_then(Value::as_u64)
}

/// Output tokens to reserve (see the module docs).
fn output(kind: Kind, doc: &Doc<'_>, opts: &EstimateOptions) -> u64 {
    if opts.reserve_output == ReserveOutput::None || kind == Kind::Embeddings {
        return 0;
    }
    let asked = match kind {
        Kind::Chat => uint(&doc.max_completion_tokens).or_else(|| uint(&doc.max_tokens)),
        Kind::Completions => uint(&doc.max_tokens),
        Kind::Responses => uint(&doc.max_output_tokens),
        Kind::Embeddings => None,
    };
    let n = uint(&doc.n).unwrap_or(1).max(1);
    let choices = match kind {
        Kind::Completions => n
            .max(uint(&doc.best_of).unwrap_or(1))
            .saturating_mul(prompts(doc.prompt.as_ref())),
        Kind::Chat => n,
        Kind::Responses | Kind::Embeddings => 1,
    };
    asked
        .unwrap_or(opts.default_max_tokens)
        .saturating_mul(choices)
}

/// How many prompts a completions `prompt` holds: one string or token array, or several.
fn prompts(prompt: Option<&Value>) -> u64 {
    match prompt {
        Some(Value::Array(a)) if a.iter().all(|v| !v.is_number()) => (a.len() as u64).max(1),
        _ => 1,
    }
}

/// Counts one request's prompt against one budget.
struct Prompt<'o> {
    c: Counter,
    opts: &'o EstimateOptions,
}

impl Prompt<'_> {
    fn str(&mut self, s: &str) -> u64 {
        self.c.text(s)
    }

    /// Tokens of a string value; nothing for anything else.
    fn text(&mut self, v: Option<&Value>) -> u64 {
        match v {
            Some(Value::String(s)) => self.c.text(s),
            _ => 0,
        }
    }

    /// Tokens of a value's compact JSON text (none for null).
    fn json(&mut self, v: Option<&Value>) -> u64 {
        match v {
            None | Some(Value::Null) => 0,
            Some(v) => serde_json::to_string(v).map_or(0, |s| self.c.text(&s)),
        }
    }

    /// Embeddings `input`, completions `prompt`: strings, token ids, or arrays of either.
    fn inputs(&mut self, v: Option<&Value>) -> u64 {
        match v {
            Some(Value::String(s)) => self.str(s),
            Some(Value::Number(_)) => 1,
            Some(Value::Array(a)) => a
                .iter()
                .fold(0, |t: u64, x| t.saturating_add(self.inputs(Some(x)))),
            _ => 0,
        }
    }

    fn chat(&mut self, doc: &Doc<'_>) -> u64 {
        let mut t = REPLY_PRIMING;
        for m in doc.messages.iter().flatten() {
            t = t.saturating_add(match m {
                Msg::Object(members) => self.members(members.iter().map(|(k, v)| (&**k, v.view()))),
                Msg::Other(v) => PER_MESSAGE + self.json(Some(v)),
            });
        }
        t += self.json(doc.tools.as_ref()) + self.json(doc.functions.as_ref());
        if let Some(rf) = &doc.response_format {
            if rf.get("type").and_then(Value::as_str) == Some("json_schema") {
                t += self.json(rf.get("json_schema"));
            }
        }
        t
    }

    /// One Responses message item: the overhead and each member.
    fn message(&mut self, m: &Value) -> u64 {
        let Value::Object(m) = m else {
            return PER_MESSAGE + self.json(Some(m));
        };
        self.members(m.iter().map(|(k, v)| (k.as_str(), Member::of(v))))
    }

    /// A chat message's (or Responses message item's) members, in document order: the
    /// overhead and each member.
    fn members<'v>(&mut self, members: impl Iterator<Item = (&'v str, Member<'v>)>) -> u64 {
        let mut t = PER_MESSAGE;
        for (key, v) in members {
            t = t.saturating_add(match (key, v) {
                ("content", Member::Str(s)) => self.str(s),
                ("content", Member::Value(v)) => self.content(v),
                ("name", Member::Str(s)) => self.str(s) + PER_NAME,
                ("tool_calls" | "function_call", Member::Str(s)) => {
                    serde_json::to_string(s).map_or(0, |j| self.c.text(&j))
                }
                ("tool_calls" | "function_call", Member::Value(v)) => self.json(Some(v)),
                // Responses items name their kind: `"type": "message"` is not prompt text.
                ("type", Member::Str("message")) => 0,
                (_, Member::Str(s)) => self.str(s),
                (_, Member::Value(v @ (Value::Array(_) | Value::Object(_)))) => self.json(Some(v)),
                _ => 0,
            });
        }
        t
    }

    fn content(&mut self, v: &Value) -> u64 {
        match v {
            Value::String(s) => self.str(s),
            Value::Array(parts) => parts
                .iter()
                .fold(0, |t: u64, p| t.saturating_add(self.part(p))),
            Value::Null => 0,
            v => self.json(Some(v)),
        }
    }

    /// One content part, of chat or of the Responses API.
    fn part(&mut self, p: &Value) -> u64 {
        let Value::Object(o) = p else {
            return match p {
                Value::String(s) => self.str(s),
                _ => self.json(Some(p)),
            };
        };
        match o.get("type").and_then(Value::as_str) {
            Some("text" | "input_text" | "output_text") => self.text(o.get("text")),
            Some("refusal") => self.text(o.get("refusal")),
            // Chat: {"image_url": {"url", "detail"}} (or a bare URL string).
            Some("image_url") => match o.get("image_url") {
                Some(Value::Object(i)) => self.image(
                    i.get("url").and_then(Value::as_str),
                    i.get("detail").and_then(Value::as_str),
                ),
                Some(Value::String(url)) => self.image(Some(url), None),
                _ => self.image(None, None),
            },
            // Responses: {"image_url": "...", "detail"} or {"file_id", "detail"}.
            Some("input_image") => self.image(
                o.get("image_url").and_then(Value::as_str),
                o.get("detail").and_then(Value::as_str),
            ),
            Some("input_audio") => match o.get("input_audio") {
                Some(a) => match a.get("data").and_then(Value::as_str) {
                    Some(data) => audio_tokens(data, a.get("format").and_then(Value::as_str)),
                    None => 0,
                },
                None => 0,
            },
            Some("file" | "input_file") => self.opts.default_image_tokens,
            _ => self.json(Some(p)),
        }
    }

    fn image(&mut self, url: Option<&str>, detail: Option<&str>) -> u64 {
        if detail.is_some_and(|d| d.eq_ignore_ascii_case("low")) {
            return LOW_DETAIL_TOKENS;
        }
        match url.and_then(data_url_dimensions) {
            Some((w, h)) => tile_tokens(w, h),
            None => self.opts.default_image_tokens,
        }
    }

    fn responses(&mut self, doc: &Doc<'_>) -> u64 {
        let mut t = REPLY_PRIMING;
        if let Some(Value::String(s)) = &doc.instructions {
            t += PER_MESSAGE + self.str(s);
        }
        match &doc.input {
            Some(Value::String(s)) => t += PER_MESSAGE + self.str(s),
            Some(Value::Array(items)) => {
                for item in items {
                    let is_message = item.get("content").is_some()
                        && item
                            .get("type")
                            .and_then(Value::as_str)
                            .is_none_or(|ty| ty == "message");
                    t = t.saturating_add(if is_message {
                        self.message(item)
                    } else {
                        self.json(Some(item))
                    });
                }
            }
            _ => {}
        }
        t += self.json(doc.tools.as_ref());
        let format = doc.text.as_ref().and_then(|x| x.get("format"));
        if format.and_then(|f| f.get("type")).and_then(Value::as_str) == Some("json_schema") {
            t += self.json(format);
        }
        t
    }
}

/// A member of a message as the counting rules see it: a string, or any other JSON value.
#[derive(Clone, Copy)]
enum Member<'v> {
    Str(&'v str),
    Value(&'v Value),
}

impl<'v> Member<'v> {
    fn of(v: &'v Value) -> Self {
        match v {
            Value::String(s) => Self::Str(s),
            v => Self::Value(v),
        }
    }
}

// The request body, read in one pass without building a `serde_json::Value` of all of it:
// strings are borrowed from the body where they have no escapes, members the rules do not
// look at are skipped, and only the values counted as compact JSON text (tools, schemas,
// content parts, ...) or read as numbers become `Value`s. The reading accepts exactly what
// `serde_json::from_slice::<Value>` accepts — everything goes through serde_json's
// `deserialize_any`, with its nesting limit counted from the body's root — and repeated
// keys behave as in a `Value` (with `preserve_order`): the last value, at the first
// key's position.

/// The top level: `None` for valid JSON that is not an object.
struct Top<'a>(Option<Doc<'a>>);

/// The top-level members estimates read.
#[derive(Default)]
struct Doc<'a> {
    /// `model`, when it is a string.
    model: Option<Cow<'a, str>>,
    /// `messages`, when it is an array.
    messages: Option<Vec<Msg<'a>>>,
    tools: Option<Value>,
    functions: Option<Value>,
    response_format: Option<Value>,
    prompt: Option<Value>,
    suffix: Option<Value>,
    input: Option<Value>,
    instructions: Option<Value>,
    text: Option<Value>,
    max_completion_tokens: Option<Value>,
    max_tokens: Option<Value>,
    max_output_tokens: Option<Value>,
    n: Option<Value>,
    best_of: Option<Value>,
}

/// One element of `messages`.
enum Msg<'a> {
    /// An object's members in document order (repeated keys: see above).
    Object(Vec<(Cow<'a, str>, Val<'a>)>),
    Other(Value),
}

/// A string (borrowed when it has no escapes) or any other value.
enum Val<'a> {
    Str(Cow<'a, str>),
    Value(Value),
}

impl Val<'_> {
    fn view(&self) -> Member<'_> {
        match self {
            Self::Str(s) => Member::Str(s),
            Self::Value(v) => Member::Value(v),
        }
    }
}

/// Members of this many keys or fewer are checked for repeats by a linear scan.
const LINEAR_KEYS: usize = 16;

/// Builds a `Value` from what serde_json hands a visitor, as `Value`'s own visitor does.
macro_rules! value_visits {
    ($wrap:expr) => {
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok($wrap(Value::Bool(v)))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(v)))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(v)))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok($wrap(Value::from(v)))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($wrap(Value::Null))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Value::deserialize(SeqAccessDeserializer::new(seq)).map($wrap)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Value::deserialize(MapAccessDeserializer::new(map)).map($wrap)
        }
    };
}

/// Anything, validated (nesting limit included) and dropped.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Skip, E> {
        Ok(Skip)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }
}

/// A string, borrowed from the body when it has no escapes (object keys, string values).
struct Str<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Str<'de>, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A string or, for any other value, `None` (the value validated and dropped).
struct MaybeStr<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for MaybeStr<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MaybeStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(MaybeStr(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MaybeStr(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(MaybeStr(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                SkipVisitor.visit_seq(seq).map(|_| MaybeStr(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                SkipVisitor.visit_map(map).map(|_| MaybeStr(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Val<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Val<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Val::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Val::Str(Cow::Owned(v.to_owned())))
            }
            value_visits!(Val::Value);
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Msg<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Msg<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Msg::Other(Value::String(v.to_owned())))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Msg::Other(Value::Bool(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Msg::Other(Value::from(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Msg::Other(Value::from(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(Msg::Other(Value::from(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Msg::Other(Value::Null))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Value::deserialize(SeqAccessDeserializer::new(seq)).map(Msg::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members: Vec<(Cow<'de, str>, Val<'de>)> = Vec::new();
                let mut index: Option<std::collections::HashMap<Cow<'de, str>, usize>> = None;
                while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
                    let v = map.next_value::<Val<'de>>()?;
                    if members.len() == LINEAR_KEYS && index.is_none() {
                        index = Some(
                            members
                                .iter()
                                .enumerate()
                                .map(|(i, (k, _))| (k.clone(), i))
                                .collect(),
                        );
                    }
                    let at = match &mut index {
                        Some(ix) => match ix.get(&key) {
                            Some(&i) => Some(i),
                            None => {
                                ix.insert(key.clone(), members.len());
                                None
                            }
                        },
                        None => members.iter().position(|(k, _)| *k == key),
                    };
                    match at {
                        Some(i) => members[i].1 = v,
                        None => members.push((key, v)),
                    }
                }
                Ok(Msg::Object(members))
            }
        }
        d.deserialize_any(V)
    }
}

/// `messages`: its elements when it is an array, else `None` (validated and dropped).
struct Messages<'a>(Option<Vec<Msg<'a>>>);

impl<'de> Deserialize<'de> for Messages<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Messages(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Messages(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Messages(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Messages(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Messages(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Messages(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(m) = seq.next_element::<Msg<'de>>()? {
                    v.push(m);
                }
                Ok(Messages(Some(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                SkipVisitor.visit_map(map).map(|_| Messages(None))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Top<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Top(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Top(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Top(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Top(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Top(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Top(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                SkipVisitor.visit_seq(seq).map(|_| Top(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut doc = Doc::default();
                while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
                    let slot = match &*key {
                        "model" => {
                            doc.model = map.next_value::<MaybeStr<'de>>()?.0;
                            continue;
                        }
                        "messages" => {
                            doc.messages = map.next_value::<Messages<'de>>()?.0;
                            continue;
                        }
                        "tools" => &mut doc.tools,
                        "functions" => &mut doc.functions,
                        "response_format" => &mut doc.response_format,
                        "prompt" => &mut doc.prompt,
                        "suffix" => &mut doc.suffix,
                        "input" => &mut doc.input,
                        "instructions" => &mut doc.instructions,
                        "text" => &mut doc.text,
                        "max_completion_tokens" => &mut doc.max_completion_tokens,
                        "max_tokens" => &mut doc.max_tokens,
                        "max_output_tokens" => &mut doc.max_output_tokens,
                        "n" => &mut doc.n,
                        "best_of" => &mut doc.best_of,
                        _ => {
                            map.next_value::<Skip>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value::<Value>()?);
                }
                Ok(Top(Some(doc)))
            }
        }
        d.deserialize_any(V)
    }
}
