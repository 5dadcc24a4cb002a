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
    pub reset_after: Option<usize>,
    pub seq: u64,
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
pub(super) fn rate_limited(retry_after_ms: u64) -> Response<Body> {
    let secs = retry_after_ms.div_ceil(1000).max(1);
    let body = json!({ "error": { "code": "429", "message": format!(
        "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 pricing tier. Please retry after {secs} seconds. Please go here: https://aka.ms/oai/quotaincrease if you would like to further increase the default rate limit."
    ) } });
    respond(
        StatusCode::TOO_MANY_REQUESTS,
        &[
            ("content-type", "application/json".into()),
            ("retry-after", secs.to_string()),
            ("retry-after-ms", retry_after_ms.to_string()),
            ("x-ratelimit-remaining-requests", "0".into()),
            ("x-ratelimit-remaining-tokens", "0".into()),
            ("apim-request-id", uuid::Uuid::new_v4().to_string()),
        ],
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
        (&Method::POST, "responses") => ok_json(&json!({
            "id": format!("resp_sim{}", ctx.seq),
            "object": "response",
            "created_at": now(),
            "status": "completed",
            "model": model,
            "output": [{ "type": "message", "id": format!("msg_sim{}", ctx.seq), "status": "completed", "role": "assistant",
                         "content": [{ "type": "output_text", "text": answer_words(&ctx, &req).join(" "), "annotations": [] }] }],
            "usage": { "input_tokens": 5, "output_tokens": answer_words(&ctx, &req).len(), "total_tokens": 5 + answer_words(&ctx, &req).len() }
        })),
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
    let n = ctx.state.opts.answer_words.min(cap).max(1);
    (0..n).map(|i| WORDS[i % WORDS.len()]).collect()
}

/// Rough prompt size: about four characters a token, as the simulator has no tokenizer.
fn prompt_tokens(req: &Value, chat: bool) -> u64 {
    let chars: usize = if chat {
        req.get("messages")
            .and_then(Value::as_array)
            .map(|ms| {
                ms.iter()
                    .map(|m| m.get("content").map_or(0, |c| c.to_string().len()) + 12)
                    .sum()
            })
            .unwrap_or(0)
    } else {
        req.get("prompt").map_or(0, |p| p.to_string().len())
    };
    (chars as u64).div_ceil(4).max(1)
}

fn text_generation(
    ctx: Ctx<'_>,
    azure: bool,
    model: &str,
    req: &Value,
    chat: bool,
) -> Response<Body> {
    let words = answer_words(&ctx, req);
    let usage = {
        let p = prompt_tokens(req, chat);
        let c = words.len() as u64;
        json!({ "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c })
    };
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let (id, object) = if chat {
        (format!("chatcmpl-sim{}", ctx.seq), "chat.completion")
    } else {
        (format!("cmpl-sim{}", ctx.seq), "text_completion")
    };
    if !stream {
        let text = words.join(" ");
        let choice = if chat {
            json!({ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": "stop", "logprobs": null })
        } else {
            json!({ "index": 0, "text": text, "finish_reason": "stop", "logprobs": null })
        };
        let mut v = json!({
            "id": id, "object": object, "created": now(), "model": model,
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
    let created = now();
    let base = |choices: Value| {
        json!({ "id": id, "object": chunk_object, "created": created, "model": model,
                "system_fingerprint": "fp_sim", "choices": choices })
    };
    let mut events: Vec<Value> = Vec::with_capacity(words.len() + 4);
    if azure && chat {
        events.push(
            json!({ "id": "", "object": "", "created": 0, "model": "", "choices": [],
            "prompt_filter_results": [{ "prompt_index": 0, "content_filter_results": {} }] }),
        );
    }
    if chat {
        events.push(base(json!([{ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null, "logprobs": null }])));
    }
    let last = words.len().saturating_sub(1);
    for (i, w) in words.iter().enumerate() {
        let piece = if i == last {
            (*w).to_owned()
        } else {
            format!("{w} ")
        };
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
    sse(ctx, frames)
}

/// Send `frames` one at a time, `latency` apart, noticing when the reader goes away.
fn sse(ctx: Ctx<'_>, frames: Vec<Bytes>) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
    let state = ctx.state.clone();
    let latency = ctx.latency;
    let reset_after = ctx.reset_after;
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
    let tokens: u64 = inputs
        .iter()
        .map(|s| (s.len() as u64).div_ceil(4).max(1))
        .sum();
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
