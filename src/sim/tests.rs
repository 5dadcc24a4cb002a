//! The simulator's answers: token counts, usage in streams, the Responses API, seeds and cut
//! streams, checked as a client sees them on the wire.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::Bytes;
use serde_json::{json, Value};

use super::{SimHandle, SimOptions};

/// An answer as a client reads it.
pub(crate) struct Answer {
    pub status: u16,
    /// The body's frames, as they arrived.
    pub frames: Vec<Bytes>,
    /// The body ended in an error (a reset) rather than cleanly.
    pub failed: bool,
}

impl Answer {
    pub fn body(&self) -> Vec<u8> {
        self.frames.concat()
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body()).unwrap()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body()).unwrap()
    }

    /// The `data:` payloads of an SSE body, `[DONE]` excepted, as JSON.
    pub fn events(&self) -> Vec<Value> {
        self.text()
            .split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }
}

/// POST `body` to the simulator at `path` with `headers`.
pub(crate) async fn post(
    sim: &SimHandle,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut req = client
        .post(format!("{}{path}", sim.url()))
        .header("content-type", "application/json")
        .body(body.to_vec());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let mut frames = Vec::new();
    let failed = loop {
        match resp.chunk().await {
            Ok(Some(c)) => frames.push(c),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    Answer {
        status,
        frames,
        failed,
    }
}

pub(crate) const AZURE_CHAT: &str =
    "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21";

/// The simulator's default answer (12 words).
pub(crate) const ANSWER: &str =
    "Portcullis is relaying this simulated answer from a local Azure OpenAI backend.";

fn tokens(s: &str) -> u64 {
    bpe_openai::o200k_base().count(s) as u64
}

#[tokio::test]
async fn chat_usage_is_counted_with_the_tokenizer() {
    let sim = SimHandle::start(SimOptions::default()).await.unwrap();
    let body = json!({ "messages": [
        { "role": "system", "content": "You are terse." },
        { "role": "user", "name": "ana", "content": [{ "type": "text", "text": "Say hello, please." }] },
    ]});
    let a = post(&sim, AZURE_CHAT, &[], body.to_string().as_bytes()).await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["choices"][0]["message"]["content"], ANSWER);
    let prompt = 3
        + tokens("system")
        + tokens("You are terse.")
        + 3
        + tokens("user")
        + tokens("ana")
        + 1
        + tokens("Say hello, please.")
        + 3;
    let completion = tokens(ANSWER);
    assert!(completion > 12, "real tokens, not words: {completion}");
    assert_eq!(
        v["usage"],
        json!({ "prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "prompt_tokens_details": { "cached_tokens": 0 },
                "completion_tokens_details": { "reasoning_tokens": 0 } })
    );

    // Cached tokens on request (never more than the prompt), reasoning for `o` models.
    let o3 = "/openai/deployments/o3-mini/chat/completions?api-version=2024-10-21";
    let a = post(
        &sim,
        o3,
        &[("x-sim-cached-tokens", "10")],
        body.to_string().as_bytes(),
    )
    .await;
    let u = &a.json()["usage"];
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 10);
    assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 16);
    assert_eq!(u["completion_tokens"], completion + 16);
    let a = post(
        &sim,
        o3,
        &[("x-sim-cached-tokens", "100000")],
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(
        a.json()["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt
    );
    let a = post(&sim, o3, &[("x-sim-cached-tokens", "many")], b"{}").await;
    assert_eq!(a.status, 400);

    // Completions and embeddings count their text too.
    let a = post(
        &sim,
        "/v1/completions",
        &[],
        br#"{"model":"m","prompt":"Once upon a time"}"#,
    )
    .await;
    assert_eq!(
        a.json()["usage"]["prompt_tokens"],
        tokens("Once upon a time")
    );
    let a = post(
        &sim,
        "/v1/embeddings",
        &[],
        br#"{"model":"e","input":["alpha beta","gamma"]}"#,
    )
    .await;
    assert_eq!(
        a.json()["usage"],
        json!({ "prompt_tokens": tokens("alpha beta") + tokens("gamma"), "total_tokens": tokens("alpha beta") + tokens("gamma") })
    );
}

#[tokio::test]
async fn streams_carry_usage_only_with_include_usage() {
    let sim = SimHandle::start(SimOptions::default()).await.unwrap();
    let plain = br#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let with = br#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#;
    for (path, azure) in [(AZURE_CHAT, true), ("/v1/chat/completions", false)] {
        let body = |b: &[u8]| {
            let mut v: Value = serde_json::from_slice(b).unwrap();
            v["model"] = json!("gpt-4o");
            v.to_string()
        };
        let a = post(&sim, path, &[], body(plain).as_bytes()).await;
        assert!(a.text().ends_with("data: [DONE]\n\n"));
        assert!(!a.text().contains("usage"), "{}", a.text());
        let first = &a.events()[0];
        assert_eq!(
            first["choices"] == json!([]),
            azure,
            "Azure's filter chunk first"
        );

        let a = post(&sim, path, &[], body(with).as_bytes()).await;
        assert!(a.text().ends_with("data: [DONE]\n\n"));
        let events = a.events();
        let (last, rest) = events.split_last().unwrap();
        assert!(rest
            .iter()
            .all(|e| e.as_object().unwrap().get("usage") == Some(&Value::Null)));
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["object"], "chat.completion.chunk");
        assert_eq!(last["usage"]["completion_tokens"], tokens(ANSWER));
        assert_eq!(
            last["usage"]["prompt_tokens"],
            3 + tokens("user") + tokens("hi") + 3
        );
        let text: String = rest
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, ANSWER);
        if azure {
            assert!(rest[0]["prompt_filter_results"].is_array());
            assert_eq!(rest[0]["choices"], json!([]));
        }
    }
}

#[tokio::test]
async fn a_seed_makes_answers_byte_identical() {
    let sim = SimHandle::start(SimOptions::default()).await.unwrap();
    let body = br#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let a = post(&sim, AZURE_CHAT, &[("x-sim-seed", "7")], body).await;
    let b = post(&sim, AZURE_CHAT, &[("x-sim-seed", "7")], body).await;
    assert_eq!(a.text(), b.text());
    assert!(a.text().contains("chatcmpl-sim7"));
    let c = post(&sim, AZURE_CHAT, &[], body).await;
    let d = post(&sim, AZURE_CHAT, &[], body).await;
    assert_ne!(c.text(), d.text(), "without a seed, ids differ");
}

#[tokio::test]
async fn the_responses_api_answers_and_streams() {
    let sim = SimHandle::start(SimOptions::default()).await.unwrap();
    let body = br#"{"model":"gpt-4o","instructions":"Be brief.","input":"Say hello"}"#;
    let input =
        3 + tokens("system") + tokens("Be brief.") + 3 + tokens("user") + tokens("Say hello") + 3;
    for path in [
        "/openai/v1/responses",
        "/openai/responses?api-version=2025-04-01-preview",
        "/v1/responses",
    ] {
        let a = post(&sim, path, &[("x-sim-cached-tokens", "2")], body).await;
        assert_eq!(a.status, 200, "{path}");
        let v = a.json();
        assert_eq!(v["object"], "response");
        assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
        assert_eq!(v["output"][0]["content"][0]["text"], ANSWER);
        assert_eq!(
            v["usage"],
            json!({ "input_tokens": input, "input_tokens_details": { "cached_tokens": 2 },
                    "output_tokens": tokens(ANSWER), "output_tokens_details": { "reasoning_tokens": 0 },
                    "total_tokens": input + tokens(ANSWER) }),
            "{path}"
        );
    }
    let stream = br#"{"model":"o4-mini","input":"Say hello","stream":true}"#;
    let a = post(&sim, "/openai/v1/responses", &[("x-sim-seed", "3")], stream).await;
    let text = a.text();
    assert!(!text.contains("[DONE]"));
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    for e in &events {
        let (kind, data) = e.split_once('\n').unwrap();
        let kind = kind.strip_prefix("event: ").unwrap();
        let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(data["type"], kind, "event: and type agree");
    }
    assert!(events[0].starts_with("event: response.created\n"));
    let last = a.events().pop().unwrap();
    assert_eq!(last["type"], "response.completed");
    assert_eq!(
        last["response"]["usage"]["output_tokens"],
        tokens(ANSWER) + 16
    );
    assert_eq!(
        last["response"]["usage"]["output_tokens_details"]["reasoning_tokens"],
        16
    );
    let deltas: String = a
        .events()
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .map(|e| e["delta"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(deltas, ANSWER);
}

#[tokio::test]
async fn a_cut_stream_has_sent_real_text() {
    let sim = SimHandle::start(SimOptions::default()).await.unwrap();
    let body = br#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let a = post(
        &sim,
        AZURE_CHAT,
        &[("x-sim-behavior", "cut-stream:3")],
        body,
    )
    .await;
    assert!(a.failed, "the stream ends in an error");
    let text: String = a
        .events()
        .iter()
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Portcullis is relaying ");
    let stream = br#"{"model":"gpt-4o","input":"x","stream":true}"#;
    let a = post(
        &sim,
        "/v1/responses",
        &[("x-sim-behavior", "cut-stream:2")],
        stream,
    )
    .await;
    assert!(a.failed);
    let deltas: Vec<Value> = a
        .events()
        .into_iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .collect();
    assert_eq!(deltas.len(), 2);
}
