//! The estimate as first written, on a whole `serde_json::Value` of the body: the oracle the
//! typed, borrowing reader of [`super::estimate`] is checked against
//! (`tests::typed_reading_agrees_with_the_value_reference`). Test-only; the counting rules
//! are documented there.

use serde_json::{Map, Value};

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
    let kind = match op {
        Operation::Chat => Kind::Chat,
        Operation::Completions => Kind::Completions,
        Operation::Embeddings => Kind::Embeddings,
        Operation::Responses => Kind::Responses,
        _ => return Estimate::default(),
    };
    let doc = if is_form(content_type) {
        None
    } else {
        serde_json::from_slice::<Value>(body).ok()
    };
    let Some(Value::Object(doc)) = doc else {
        return Estimate {
            prompt: (body.len() as u64).div_ceil(4),
            output: output(kind, &Map::new(), opts),
        };
    };
    let model = if model.is_empty() {
        doc.get("model").and_then(Value::as_str).unwrap_or("")
    } else {
        model
    };
    let mut p = Prompt {
        c: Counter::new(encoding_for(model)),
        opts,
    };
    let prompt = match kind {
        Kind::Chat => p.chat(&doc),
        Kind::Completions => p.inputs(doc.get("prompt")) + p.text(doc.get("suffix")),
        Kind::Embeddings => p.inputs(doc.get("input")),
        Kind::Responses => p.responses(&doc),
    };
    Estimate {
        prompt,
        output: output(kind, &doc, opts),
    }
}

/// Whether the body is a form, not JSON (never parsed as JSON).
fn is_form(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        let mime = ct.split(';').next().unwrap_or("").trim();
        mime.eq_ignore_ascii_case("multipart/form-data")
            || mime.eq_ignore_ascii_case("application/x-www-form-urlencoded")
    })
}

fn uint(doc: &Map<String, Value>, key: &str) -> Option<u64> {
    doc.get(key).and_then(Value::as_u64)
}

/// Output tokens to reserve (see the module docs).
fn output(kind: Kind, doc: &Map<String, Value>, opts: &EstimateOptions) -> u64 {
    if opts.reserve_output == ReserveOutput::None || kind == Kind::Embeddings {
        return 0;
    }
    let asked = match kind {
        Kind::Chat => uint(doc, "max_completion_tokens").or_else(|| uint(doc, "max_tokens")),
        Kind::Completions => uint(doc, "max_tokens"),
        Kind::Responses => uint(doc, "max_output_tokens"),
        Kind::Embeddings => None,
    };
    let n = uint(doc, "n").unwrap_or(1).max(1);
    let choices = match kind {
        Kind::Completions => n
            .max(uint(doc, "best_of").unwrap_or(1))
            .saturating_mul(prompts(doc.get("prompt"))),
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

    fn chat(&mut self, doc: &Map<String, Value>) -> u64 {
        let mut t = REPLY_PRIMING;
        if let Some(Value::Array(messages)) = doc.get("messages") {
            for m in messages {
                t = t.saturating_add(self.message(m));
            }
        }
        t += self.json(doc.get("tools")) + self.json(doc.get("functions"));
        if let Some(rf) = doc.get("response_format") {
            if rf.get("type").and_then(Value::as_str) == Some("json_schema") {
                t += self.json(rf.get("json_schema"));
            }
        }
        t
    }

    /// One chat message (or Responses message item): the overhead and each member.
    fn message(&mut self, m: &Value) -> u64 {
        let Value::Object(m) = m else {
            return PER_MESSAGE + self.json(Some(m));
        };
        let mut t = PER_MESSAGE;
        for (key, v) in m {
            t = t.saturating_add(match (key.as_str(), v) {
                ("content", v) => self.content(v),
                ("name", Value::String(s)) => self.str(s) + PER_NAME,
                ("tool_calls" | "function_call", v) => self.json(Some(v)),
                // Responses items name their kind: `"type": "message"` is not prompt text.
                ("type", Value::String(s)) if s == "message" => 0,
                (_, Value::String(s)) => self.str(s),
                (_, Value::Array(_) | Value::Object(_)) => self.json(Some(v)),
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

    fn responses(&mut self, doc: &Map<String, Value>) -> u64 {
        let mut t = REPLY_PRIMING;
        if let Some(Value::String(s)) = doc.get("instructions") {
            t += PER_MESSAGE + self.str(s);
        }
        match doc.get("input") {
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
        t += self.json(doc.get("tools"));
        let format = doc.get("text").and_then(|x| x.get("format"));
        if format.and_then(|f| f.get("type")).and_then(Value::as_str) == Some("json_schema") {
            t += self.json(format);
        }
        t
    }
}
