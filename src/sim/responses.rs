//! The simulator's answers, shaped like Azure OpenAI's (and OpenAI's) on the wire.

use std::sync::atomic::Ordering;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{json, respond, SimState};
use crate::error::{Body, BoxError};

/// Per-request context.
pub(super) struct Ctx<'a> {
    pub state: &'a std::sync::Arc<SimState>,
    pub latency: Duration,
    pub reset: Option<Reset>,
    pub seq: u64,
    /// `x-sim-seed`: ids and `created` derive from it instead of the sequence and the clock.
    pub seed: Option<u64>,
    /// `x-sim-cached-tokens`: the prompt tokens reported as cached (at most the prompt).
    pub cached_tokens: u64,
}

/// Where a stream is cut short by a connection reset.
#[derive(Debug, Clone, Copy)]
pub(super) enum Reset {
    /// After this many frames.
    After(usize),
    /// After this many frames carrying generated text.
    AfterText(usize),
}

impl Ctx<'_> {
    /// The number in this answer's ids.
    fn id(&self) -> u64 {
        self.seed.unwrap_or(self.seq)
    }

    /// The answer's `created` time.
    fn created(&self) -> u64 {
        self.seed.map_or_else(now, |s| 1_700_000_000 + s)
    }
}

/// The reasoning tokens a reasoning model (`o…`) reports.
const REASONING_TOKENS: u64 = 16;

/// Tokens in `text` (o200k, as current OpenAI models count).
fn tokens(text: &str) -> u64 {
    bpe_openai::o200k_base().count(text) as u64
}

/// What a request used, as the simulator reports it.
struct Counts {
    prompt: u64,
    cached: u64,
    completion: u64,
    reasoning: u64,
}

impl Counts {
    fn new(ctx: &Ctx<'_>, model: &str, prompt: u64, answer: &str) -> Self {
        let reasoning = if model.starts_with('o') {
            REASONING_TOKENS
        } else {
            0
        };
        Self {
            prompt,
            cached: ctx.cached_tokens.min(prompt),
            completion: tokens(answer) + reasoning,
            reasoning,
        }
    }

    /// Chat and completions' `usage`.
    fn chat(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": { "cached_tokens": self.cached },
            "completion_tokens_details": { "reasoning_tokens": self.reasoning },
        })
    }

    /// The Responses API's `usage`.
    fn responses(&self) -> Value {
        json!({
            "input_tokens": self.prompt,
            "input_tokens_details": { "cached_tokens": self.cached },
            "output_tokens": self.completion,
            "output_tokens_details": { "reasoning_tokens": self.reasoning },
            "total_tokens": self.prompt + self.completion,
        })
    }
}

const WORDS: [&str; 12] = [
    "Portcullis",
    "is",
    "relaying",
    "this",
    "simulated",
    "answer",
    "from",
    "a",
    "local",
    "Azure",
    "OpenAI",
    "backend.",
];

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Azure's error body: `{"error":{"code":"...","message":"..."}}`.
pub(super) fn azure_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(
        status,
        &json!({ "error": { "code": code, "message": message } }),
    )
}

/// Azure's 401 for a missing or invalid bearer token, with its `WWW-Authenticate: Bearer`.
pub(super) fn bearer_unauthorized() -> Response<Body> {
    let body = json!({ "error": { "code": "401", "message": super::bearer::UNAUTHORIZED } });
    respond(
        StatusCode::UNAUTHORIZED,
        &[
            ("content-type", "application/json".into()),
            ("www-authenticate", "Bearer".into()),
        ],
        crate::error::full(body.to_string()),
    )
}

/// Azure's 429: retry-after in seconds (rounded up) and in milliseconds.
pub(super) fn rate_limited(retry_after_ms: u64, form: super::RetryForm) -> Response<Body> {
    use super::RetryForm;
    let secs = retry_after_ms.div_ceil(1000).max(1);
    let body = json!({ "error": { "code": "429", "message": format!(
        "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after {secs} seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."
    ) } });
    let mut headers = vec![("content-type", "application/json".to_owned())];
    match form {
        RetryForm::Azure => {
            headers.push(("retry-after", secs.to_string()));
            headers.push(("retry-after-ms", retry_after_ms.to_string()));
        }
        RetryForm::Ms => headers.push(("retry-after-ms", retry_after_ms.to_string())),
        RetryForm::XMs => headers.push(("x-ms-retry-after-ms", retry_after_ms.to_string())),
        RetryForm::Seconds => headers.push(("retry-after", secs.to_string())),
        RetryForm::Date => headers.push((
            "retry-after",
            httpdate::fmt_http_date(
                std::time::SystemTime::now() + std::time::Duration::from_millis(retry_after_ms),
            ),
        )),
        RetryForm::None => {}
        RetryForm::Nonsense => {
            headers.push(("x-ratelimit-remaining-requests", "-1".into()));
            headers.push(("x-ratelimit-remaining-tokens", "0".into()));
            headers.push(("x-ratelimit-reset-requests", "-1".into()));
            headers.push(("x-ratelimit-reset-tokens", "0".into()));
        }
    }
    if form != RetryForm::Nonsense {
        headers.push(("x-ratelimit-remaining-requests", "0".into()));
        headers.push(("x-ratelimit-remaining-tokens", "0".into()));
    }
    headers.push(("apim-request-id", uuid::Uuid::new_v4().to_string()));
    respond(
        StatusCode::TOO_MANY_REQUESTS,
        &headers,
        crate::error::full(body.to_string()),
    )
}

/// A 5xx as Azure sends it.
pub(super) fn server_error(code: u16) -> Response<Body> {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    azure_error(
        status,
        "InternalServerError",
        "The server had an error while processing your request. Sorry about that!",
    )
}

fn ok_headers() -> Vec<(&'static str, String)> {
    vec![
        ("x-ratelimit-limit-requests", "100".into()),
        ("x-ratelimit-remaining-requests", "99".into()),
        ("x-ratelimit-limit-tokens", "100000".into()),
        ("x-ratelimit-remaining-tokens", "99000".into()),
        ("apim-request-id", uuid::Uuid::new_v4().to_string()),
    ]
}

fn ok_json(v: &Value) -> Response<Body> {
    let mut h = ok_headers();
    h.push(("content-type", "application/json".into()));
    respond(StatusCode::OK, &h, crate::error::full(v.to_string()))
}

/// Route a request to its answer.
pub(super) fn dispatch(
    ctx: Ctx<'_>,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &Bytes,
) -> Response<Body> {
    let (azure, deployment, op) = if let Some(r) = path.strip_prefix("/openai/deployments/") {
        let Some((d, op)) = r.split_once('/') else {
            return not_found();
        };
        if !has_api_version(query) {
            return azure_error(StatusCode::NOT_FOUND, "404", "Resource not found");
        }
        (true, Some(d.to_owned()), op)
    } else if let Some(op) = path.strip_prefix("/openai/v1/") {
        (true, None, op)
    } else if let Some(op) = path.strip_prefix("/openai/") {
        // Resource-level operations (responses, files, batches) also need an api-version.
        if !has_api_version(query) {
            return azure_error(StatusCode::NOT_FOUND, "404", "Resource not found");
        }
        (true, None, op)
    } else if let Some(op) = path.strip_prefix("/v1/") {
        (false, None, op)
    } else {
        return not_found();
    };
    let multipart = op.starts_with("audio/") || op.starts_with("images/edits");
    let req: Value = if body.is_empty() || multipart {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return azure_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("We could not parse the JSON body of your request. ({e})"),
                )
            }
        }
    };
    let model = deployment.or_else(|| req.get("model").and_then(Value::as_str).map(str::to_owned));
    let needs_model = matches!(op, "chat/completions" | "completions" | "embeddings");
    if needs_model && model.is_none() {
        return azure_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "you must provide a model parameter",
        );
    }
    let model = model.unwrap_or_else(|| "sim".to_owned());
    match (method, op) {
        (&Method::POST, "chat/completions") => text_generation(ctx, azure, &model, &req, true),
        (&Method::POST, "completions") => text_generation(ctx, azure, &model, &req, false),
        (&Method::POST, "embeddings") => embeddings(&model, &req),
        (&Method::POST, "images/generations") => ok_json(&json!({
            "created": now(),
            "data": [{ "b64_json": base64::engine::general_purpose::STANDARD.encode(b"\x89PNG sim"), "revised_prompt": "a simulated image" }]
        })),
        (&Method::POST, o) if o.starts_with("audio/") => {
            ok_json(&json!({ "text": "simulated transcription" }))
        }
        (&Method::POST, "responses") => responses(ctx, &model, &req),
        _ => ok_json(&json!({ "object": "sim.echo", "method": method.as_str(), "path": path })),
    }
}

fn has_api_version(query: Option<&str>) -> bool {
    query
        .unwrap_or("")
        .split('&')
        .any(|p| p.starts_with("api-version=") && p.len() > "api-version=".len())
}

fn not_found() -> Response<Body> {
    azure_error(StatusCode::NOT_FOUND, "404", "Resource not found")
}

fn answer_words(ctx: &Ctx<'_>, req: &Value) -> Vec<&'static str> {
    let cap = req
        .get("max_tokens")
        .or_else(|| req.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let mut n = ctx.state.opts.answer_words.min(cap).max(1);
    let words =
        |n: usize| -> Vec<&'static str> { (0..n).map(|i| WORDS[i % WORDS.len()]).collect() };
    // Like a real model, the answer stops at max_tokens tokens (not words).
    while n > 1 && tokens(&words(n).join(" ")) > cap as u64 {
        n -= 1;
    }
    words(n)
}

/// Prompt tokens as OpenAI documents them for chat: 3 per message, the tokens of each of
/// its strings (text parts of a `content` array; other values as JSON), 1 more for a
/// `name`, and 3 priming the reply. A completions prompt is its text's tokens.
fn prompt_tokens(req: &Value, chat: bool) -> u64 {
    if chat {
        let messages = req.get("messages").and_then(Value::as_array);
        return messages.map_or(0, |ms| ms.iter().map(message_tokens).sum::<u64>()) + 3;
    }
    text_tokens(req.get("prompt"))
}

fn message_tokens(m: &Value) -> u64 {
    let Some(m) = m.as_object() else {
        return 3 + value_tokens(m);
    };
    3 + m
        .iter()
        .map(|(k, v)| value_tokens(v) + u64::from(k == "name"))
        .sum::<u64>()
}

/// A string's tokens; an array's parts' `text` (or the parts themselves); JSON otherwise.
fn value_tokens(v: &Value) -> u64 {
    match v {
        Value::Null => 0,
        Value::String(s) => tokens(s),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p.get("text") {
                Some(t) => value_tokens(t),
                None => value_tokens(p),
            })
            .sum(),
        other => tokens(&other.to_string()),
    }
}

/// A completions prompt or embeddings input: a string, strings, or token arrays.
fn text_tokens(v: Option<&Value>) -> u64 {
    match v {
        None | Some(Value::Null) => 0,
        Some(Value::String(s)) => tokens(s),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => items.len() as u64,
        Some(Value::Array(items)) => items.iter().map(|i| text_tokens(Some(i))).sum(),
        Some(other) => tokens(&other.to_string()),
    }
}

fn text_generation(
    ctx: Ctx<'_>,
    azure: bool,
    model: &str,
    req: &Value,
    chat: bool,
) -> Response<Body> {
    let words = answer_words(&ctx, req);
    let text = words.join(" ");
    let usage = Counts::new(&ctx, model, prompt_tokens(req, chat), &text).chat();
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let (id, object) = if chat {
        (format!("chatcmpl-sim{}", ctx.id()), "chat.completion")
    } else {
        (format!("cmpl-sim{}", ctx.id()), "text_completion")
    };
    let created = ctx.created();
    if !stream {
        let choice = if chat {
            json!({ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": "stop", "logprobs": null })
        } else {
            json!({ "index": 0, "text": text, "finish_reason": "stop", "logprobs": null })
        };
        let mut v = json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": [choice], "usage": usage, "system_fingerprint": "fp_sim"
        });
        if azure {
            v["prompt_filter_results"] =
                json!([{ "prompt_index": 0, "content_filter_results": {} }]);
        }
        return ok_json(&v);
    }
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let chunk_object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    // With include_usage, every chunk says `"usage":null` (last), as OpenAI documents.
    let chunk = |mut v: Value| {
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    let base = |choices: Value| {
        chunk(
            json!({ "id": id, "object": chunk_object, "created": created, "model": model,
                "system_fingerprint": "fp_sim", "choices": choices }),
        )
    };
    let mut events: Vec<Value> = Vec::with_capacity(words.len() + 4);
    if azure && chat {
        events.push(chunk(
            json!({ "id": "", "object": "", "created": 0, "model": "", "choices": [],
            "prompt_filter_results": [{ "prompt_index": 0, "content_filter_results": {} }] }),
        ));
    }
    if chat {
        events.push(base(json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null, "logprobs": null }])));
    }
    let first_text = events.len();
    for piece in pieces(&words) {
        events.push(if chat {
            base(json!([{ "index": 0, "delta": { "content": piece }, "finish_reason": null, "logprobs": null }]))
        } else {
            base(json!([{ "index": 0, "text": piece, "finish_reason": null, "logprobs": null }]))
        });
    }
    events.push(if chat {
        base(json!([{ "index": 0, "delta": {}, "finish_reason": "stop", "logprobs": null }]))
    } else {
        base(json!([{ "index": 0, "text": "", "finish_reason": "stop", "logprobs": null }]))
    });
    if include_usage {
        let mut u = base(json!([]));
        u["usage"] = usage;
        events.push(u);
    }
    let mut frames: Vec<Bytes> = events
        .iter()
        .map(|e| Bytes::from(format!("data: {e}\n\n")))
        .collect();
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    sse(ctx, frames, first_text)
}

/// The answer's words as streamed: each with the space that follows it.
fn pieces(words: &[&str]) -> Vec<String> {
    let last = words.len().saturating_sub(1);
    words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i == last {
                (*w).to_owned()
            } else {
                format!("{w} ")
            }
        })
        .collect()
}

/// Responses API input tokens: `instructions` as a system message, a string `input` as a
/// user message, an array `input` as chat messages.
fn responses_input_tokens(req: &Value) -> u64 {
    let instructions = req
        .get("instructions")
        .and_then(Value::as_str)
        .map_or(0, |i| 3 + tokens("system") + tokens(i));
    let input = match req.get("input") {
        Some(Value::String(s)) => 3 + tokens("user") + tokens(s),
        Some(Value::Array(items)) => items.iter().map(message_tokens).sum(),
        Some(other) => 3 + value_tokens(other),
        None => 0,
    };
    instructions + input + 3
}

/// `POST /responses`: a `response` object, or with `"stream": true` its event stream.
fn responses(ctx: Ctx<'_>, model: &str, req: &Value) -> Response<Body> {
    let words = answer_words(&ctx, req);
    let text = words.join(" ");
    let usage = Counts::new(&ctx, model, responses_input_tokens(req), &text).responses();
    let (id, msg) = (
        format!("resp_sim{}", ctx.id()),
        format!("msg_sim{}", ctx.id()),
    );
    let created = ctx.created();
    let response = |status: &str, output: Value, usage: Value| {
        json!({
            "id": id, "object": "response", "created_at": created, "status": status,
            "model": model, "output": output, "usage": usage,
        })
    };
    let message = |status: &str, content: Value| json!({ "type": "message", "id": msg, "status": status, "role": "assistant", "content": content });
    let part = |text: &str| json!({ "type": "output_text", "text": text, "annotations": [] });
    let done = response(
        "completed",
        json!([message("completed", json!([part(&text)]))]),
        usage,
    );
    if !req.get("stream").and_then(Value::as_bool).unwrap_or(false) {
        return ok_json(&done);
    }
    let mut events: Vec<(&str, Value)> = vec![
        (
            "response.created",
            json!({ "response": response("in_progress", json!([]), Value::Null) }),
        ),
        (
            "response.in_progress",
            json!({ "response": response("in_progress", json!([]), Value::Null) }),
        ),
        (
            "response.output_item.added",
            json!({ "output_index": 0, "item": message("in_progress", json!([])) }),
        ),
        (
            "response.content_part.added",
            json!({ "item_id": msg, "output_index": 0, "content_index": 0, "part": part("") }),
        ),
    ];
    let first_text = events.len();
    for piece in pieces(&words) {
        events.push((
            "response.output_text.delta",
            json!({ "item_id": msg, "output_index": 0, "content_index": 0, "delta": piece }),
        ));
    }
    events.extend([
        (
            "response.output_text.done",
            json!({ "item_id": msg, "output_index": 0, "content_index": 0, "text": text }),
        ),
        (
            "response.content_part.done",
            json!({ "item_id": msg, "output_index": 0, "content_index": 0, "part": part(&text) }),
        ),
        (
            "response.output_item.done",
            json!({ "output_index": 0, "item": message("completed", json!([part(&text)])) }),
        ),
        ("response.completed", json!({ "response": done })),
    ]);
    let frames = events
        .into_iter()
        .enumerate()
        .map(|(n, (kind, fields))| {
            // `type` and `sequence_number` first, as OpenAI sends them.
            let mut v = json!({ "type": kind, "sequence_number": n });
            if let (Some(v), Value::Object(fields)) = (v.as_object_mut(), fields) {
                v.extend(fields);
            }
            Bytes::from(format!("event: {kind}\ndata: {v}\n\n"))
        })
        .collect();
    sse(ctx, frames, first_text)
}

/// Send `frames` one at a time, `latency` apart, noticing when the reader goes away.
/// `first_text` is the index of the first frame carrying generated text.
fn sse(ctx: Ctx<'_>, frames: Vec<Bytes>, first_text: usize) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
    let state = ctx.state.clone();
    let latency = ctx.latency;
    let reset_after = match ctx.reset {
        Some(Reset::After(n)) => Some(n),
        Some(Reset::AfterText(n)) => Some(first_text + n),
        None => None,
    };
    state
        .counters
        .streams_started
        .fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        for (i, f) in frames.into_iter().enumerate() {
            if reset_after == Some(i) {
                let _ = tx.send(Err("simulated connection reset".into())).await;
                return;
            }
            if !latency.is_zero() {
                tokio::select! {
                    () = tokio::time::sleep(latency) => {}
                    () = tx.closed() => {
                        state.counters.streams_cancelled.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            }
            if tx.send(Ok(Frame::data(f))).await.is_err() {
                state
                    .counters
                    .streams_cancelled
                    .fetch_add(1, Ordering::SeqCst);
                return;
            }
            state.counters.chunks_sent.fetch_add(1, Ordering::SeqCst);
        }
        state
            .counters
            .streams_completed
            .fetch_add(1, Ordering::SeqCst);
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut h = ok_headers();
    h.push(("content-type", "text/event-stream; charset=utf-8".into()));
    h.push(("cache-control", "no-cache".into()));
    respond(StatusCode::OK, &h, StreamBody::new(stream).boxed_unsync())
}

fn embeddings(model: &str, req: &Value) -> Response<Body> {
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().map(Value::to_string).collect(),
        _ => {
            return azure_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "'input' is a required property",
            )
        }
    };
    let b64 = req.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let v = vector(text);
            let embedding = if b64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    let tokens = text_tokens(req.get("input"));
    ok_json(&json!({
        "object": "list", "data": data, "model": model,
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens }
    }))
}

/// A deterministic 8-dimensional unit vector derived from the text.
fn vector(text: &str) -> Vec<f32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let raw: Vec<f32> = (0..8)
        .map(|i| (((h >> (i * 8)) & 0xff) as f32) / 255.0 - 0.5)
        .collect();
    let norm = raw.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    raw.into_iter().map(|x| x / norm).collect()
}
