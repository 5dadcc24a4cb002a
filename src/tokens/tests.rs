#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::Engine;
use serde_json::json;

use super::image::{audio_tokens, data_url_dimensions, tile_tokens};
use super::*;
use crate::route::Operation;

/// Token counts in (cl100k_base, o200k_base). The first four strings and their cl100k counts
/// are published in OpenAI's cookbook "How to count tokens with tiktoken" (with "tiktoken is
/// great!" at 6 in both); every count here was cross-checked with tiktoken 0.14.0 (PyPI)
/// loading the same two tables from local files whose SHA-256 matched the hashes tiktoken
/// itself pins for them.
const KNOWN: [(&str, u64, u64); 11] = [
    ("tiktoken is great!", 6, 6),
    ("antidisestablishmentarianism", 6, 6),
    ("2 + 2 = 4", 7, 7),
    ("お誕生日おめでとう", 9, 8),
    ("Hello, world! I'm here; they'll see. DON'T PANIC.", 17, 14),
    ("fn main() {\n    println!(\"{}\", 1234567);\n}\n", 13, 13),
    ("    indented\n\n\n   trailing spaces   ", 8, 8),
    (
        "Ünïcödé façade – naïve café, Привет мир, مرحبا بالعالم, 你好，世界 👋🏽🚀",
        46,
        30,
    ),
    ("https://example.com/path?q=1&r=two#frag", 13, 13),
    (
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        8,
        8,
    ),
    ("", 0, 0),
];

/// The cookbook's example conversation: 129 prompt tokens for gpt-4-0613 / gpt-3.5-turbo-0613
/// (cl100k; published, and the API agreed), 124 for gpt-4o (o200k; tiktoken, same counting).
fn cookbook_chat(model: Option<&str>) -> Vec<u8> {
    let mut body = json!({
        "messages": [
            {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
            {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
            {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
            {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
            {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
            {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
        ]
    });
    if let Some(m) = model {
        body["model"] = json!(m);
    }
    serde_json::to_vec(&body).unwrap()
}

const OPTS: EstimateOptions = EstimateOptions {
    default_max_tokens: 1000,
    reserve_output: ReserveOutput::MaxTokens,
    default_image_tokens: 777,
};

const NO_OUTPUT: EstimateOptions = EstimateOptions {
    reserve_output: ReserveOutput::None,
    ..OPTS
};

fn est(op: Operation, model: &str, body: &serde_json::Value) -> Estimate {
    estimate(op, model, &serde_json::to_vec(body).unwrap(), None, &OPTS)
}

fn chat_prompt(model: &str, body: &serde_json::Value) -> u64 {
    est(Operation::Chat, model, body).prompt
}

#[test]
fn known_counts_in_both_encodings() {
    for (text, cl, o) in KNOWN {
        assert_eq!(count(Encoding::Cl100k, text), cl, "cl100k {text:?}");
        assert_eq!(count(Encoding::O200k, text), o, "o200k {text:?}");
        // Our piecewise counting is the crate's own count below the cap.
        assert_eq!(
            Encoding::O200k.tokenizer().count(text) as u64,
            o,
            "crate {text:?}"
        );
    }
}

#[test]
fn model_names_pick_their_encoding() {
    for m in [
        "gpt-4o",
        "gpt-4o-mini-2024-07-18",
        "chatgpt-4o-latest",
        "GPT-4.1-nano",
        "gpt41_mini",
        "gpt-4.5-preview",
        "gpt-5",
        "gpt-5-mini",
        "o1",
        "o1-preview",
        "o3-mini",
        "o4-mini",
        "prod-o3",
        "gpt-oss-120b",
        "computer-use-preview",
        "prod-chat",
        "my-deployment",
        "",
    ] {
        assert_eq!(encoding_for(m), Encoding::O200k, "{m}");
    }
    for m in [
        "gpt-4",
        "gpt-4-0613",
        "gpt-4-32k",
        "gpt-4-1106-preview",
        "gpt-4-turbo",
        "GPT4_turbo",
        "gpt-35-turbo",
        "gpt-3.5-turbo-0125",
        "text-embedding-ada-002",
        "text-embedding-3-large",
        "davinci-002",
        "babbage-002",
        "team-ada",
    ] {
        assert_eq!(encoding_for(m), Encoding::Cl100k, "{m}");
    }
    assert_eq!(
        encoding_for("o365-helper"),
        Encoding::O200k,
        "unknown: default"
    );
    assert_eq!(Encoding::Cl100k.as_str(), "cl100k_base");
}

#[test]
fn chat_counting_matches_the_cookbook() {
    let body = cookbook_chat(None);
    let e = estimate(Operation::Chat, "gpt-4-0613", &body, None, &NO_OUTPUT);
    assert_eq!(
        e,
        Estimate {
            prompt: 129,
            output: 0
        }
    );
    let e = estimate(Operation::Chat, "gpt-4o", &body, None, &NO_OUTPUT);
    assert_eq!(e.prompt, 124);
    // No model from the caller: the body's `model` decides the encoding.
    let body = cookbook_chat(Some("gpt-3.5-turbo-0613"));
    let e = estimate(Operation::Chat, "", &body, None, &NO_OUTPUT);
    assert_eq!(e.prompt, 129);
    // The caller's deployment wins over the body's model.
    let e = estimate(Operation::Chat, "gpt-4o", &body, None, &NO_OUTPUT);
    assert_eq!(e.prompt, 124);
}

#[test]
fn chat_overhead_per_message_and_name() {
    // 3 (message) + 1 ("user") + 6 + 3 (reply priming).
    let one = json!({"messages": [{"role": "user", "content": "tiktoken is great!"}]});
    assert_eq!(chat_prompt("gpt-4o", &one), 13);
    let named = json!({"messages": [{"role": "user", "name": "tiktoken", "content": "tiktoken is great!"}]});
    // + "tiktoken" (3 tokens: "t", "ik", "token") + 1 for the name.
    assert_eq!(chat_prompt("gpt-4o", &named), 13 + 3 + 1);
    let parts = json!({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "tiktoken is great!"},
        {"type": "text", "text": "2 + 2 = 4"}
    ]}]});
    assert_eq!(chat_prompt("gpt-4o", &parts), 13 + 7);
    assert_eq!(chat_prompt("gpt-4o", &json!({"messages": []})), 3);
}

#[test]
fn tools_schemas_and_tool_calls_count_as_compact_json() {
    let base = json!({"messages": [{"role": "user", "content": "What is the weather in Paris?"}]});
    let base_tokens = chat_prompt("gpt-4o", &base);
    assert_eq!(base_tokens, 3 + 1 + 7 + 3);
    let tools = r#"[{"type":"function","function":{"name":"get_weather","description":"Current weather","parameters":{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}}}]"#;
    let tools_tokens = count(Encoding::O200k, tools);
    assert!(tools_tokens > 20, "{tools_tokens}");
    let mut with_tools = base.clone();
    with_tools["tools"] = serde_json::from_str(tools).unwrap();
    assert_eq!(
        chat_prompt("gpt-4o", &with_tools),
        base_tokens + tools_tokens
    );
    let mut with_functions = base.clone();
    with_functions["functions"] = serde_json::from_str(tools).unwrap();
    assert_eq!(
        chat_prompt("gpt-4o", &with_functions),
        base_tokens + tools_tokens
    );

    let schema =
        r#"{"name":"weather","schema":{"type":"object","properties":{"temp":{"type":"number"}}}}"#;
    let mut with_schema = base.clone();
    with_schema["response_format"] = json!({"type": "json_schema", "json_schema": serde_json::from_str::<serde_json::Value>(schema).unwrap()});
    assert_eq!(
        chat_prompt("gpt-4o", &with_schema),
        base_tokens + count(Encoding::O200k, schema)
    );
    let mut json_object = base.clone();
    json_object["response_format"] = json!({"type": "json_object"});
    assert_eq!(chat_prompt("gpt-4o", &json_object), base_tokens);

    let calls = r#"[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]"#;
    let convo = json!({"messages": [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": serde_json::from_str::<serde_json::Value>(calls).unwrap()},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    ]});
    let expected = base_tokens
        + 3 + 1 + count(Encoding::O200k, calls) // assistant: role + tool calls
        + 3 + 1 + count(Encoding::O200k, "call_1") + count(Encoding::O200k, "18C");
    assert_eq!(chat_prompt("gpt-4o", &convo), expected);
}

/// The first 24 bytes of a PNG: signature and IHDR with the given size.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut b = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
    b.extend_from_slice(&w.to_be_bytes());
    b.extend_from_slice(&h.to_be_bytes());
    b.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]); // depth, colour, ..., a CRC's room
    b
}

fn data_url(mime: &str, bytes: &[u8]) -> String {
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn image_message(url: &str, detail: Option<&str>) -> serde_json::Value {
    let mut image = json!({"url": url});
    if let Some(d) = detail {
        image["detail"] = json!(d);
    }
    json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": image}]}]})
}

#[test]
fn image_tile_formula() {
    // OpenAI's documented examples.
    assert_eq!(tile_tokens(1024, 1024), 765);
    assert_eq!(tile_tokens(2048, 4096), 1105);
    assert_eq!(tile_tokens(512, 512), 255);
    assert_eq!(tile_tokens(100, 100), 255, "small images are not scaled up");
    assert_eq!(tile_tokens(4096, 8192), 1105);

    let overhead = 3 + 1 + 3; // message, "user", reply priming
    let png = data_url("image/png", &png_header(1024, 1024));
    assert_eq!(
        chat_prompt("gpt-4o", &image_message(&png, None)),
        overhead + 765
    );
    assert_eq!(
        chat_prompt("gpt-4o", &image_message(&png, Some("high"))),
        overhead + 765
    );
    assert_eq!(
        chat_prompt("gpt-4o", &image_message(&png, Some("low"))),
        overhead + 85
    );
    let tall = data_url("image/png", &png_header(2048, 4096));
    assert_eq!(
        chat_prompt("gpt-4o", &image_message(&tall, Some("auto"))),
        overhead + 1105
    );
    // Not sizable: a remote URL, a non-image data URL, a corrupt header.
    for url in [
        "https://example.com/cat.png".to_owned(),
        data_url("text/plain", &png_header(1024, 1024)),
        data_url("image/png", b"not a png at all, really"),
        "data:image/png;base64,!!!!".to_owned(),
    ] {
        assert_eq!(
            chat_prompt("gpt-4o", &image_message(&url, None)),
            overhead + OPTS.default_image_tokens,
            "{url}"
        );
    }
    // The base64 payload past the header is never decoded: garbage there changes nothing.
    let mut big = png;
    big.push_str(&"A".repeat(1 << 20));
    big.push_str("!!!");
    assert_eq!(
        chat_prompt("gpt-4o", &image_message(&big, None)),
        overhead + 765
    );
}

#[test]
fn image_headers_of_each_format() {
    let png = data_url("image/png", &png_header(640, 480));
    assert_eq!(data_url_dimensions(&png), Some((640, 480)));
    assert_eq!(
        data_url_dimensions(&png.replacen("data:image/png", "DATA:Image/PNG", 1)),
        Some((640, 480))
    );

    let gif = data_url("image/gif", b"GIF89a\x80\x02\xe0\x01\xf7\x00\x00");
    assert_eq!(data_url_dimensions(&gif), Some((640, 480)));

    // JPEG: SOI, an APP0 segment, a DQT segment, then SOF0 (height 480, width 640).
    let mut jpg = vec![0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10];
    jpg.extend_from_slice(b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00");
    jpg.extend_from_slice(&[0xff, 0xdb, 0x00, 0x43]);
    jpg.extend_from_slice(&[0u8; 0x41]);
    jpg.extend_from_slice(&[0xff, 0xc0, 0x00, 0x11, 0x08, 0x01, 0xe0, 0x02, 0x80, 0x03]);
    jpg.extend_from_slice(&[0u8; 9]);
    assert_eq!(
        data_url_dimensions(&data_url("image/jpeg", &jpg)),
        Some((640, 480))
    );
    // A JPEG whose scan starts before any frame header cannot be sized.
    let no_frame = [0xff, 0xd8, 0xff, 0xda, 0x00, 0x08, 0, 0, 0, 0, 0, 0];
    assert_eq!(
        data_url_dimensions(&data_url("image/jpeg", &no_frame)),
        None
    );

    let riff = |chunk: &[u8; 4], payload: &[u8]| {
        let mut b = b"RIFF\x00\x00\x00\x00WEBP".to_vec();
        b.extend_from_slice(chunk);
        b.extend_from_slice(&[0x10, 0, 0, 0]);
        b.extend_from_slice(payload);
        b
    };
    // VP8X: flags, reserved, canvas width - 1 and height - 1 (24 bits LE).
    let vp8x = riff(b"VP8X", &[0, 0, 0, 0, 0x7f, 0x02, 0x00, 0xdf, 0x01, 0x00]);
    assert_eq!(
        data_url_dimensions(&data_url("image/webp", &vp8x)),
        Some((640, 480))
    );
    // VP8 (lossy): frame tag, start code, width and height (14 bits LE).
    let vp8 = riff(
        b"VP8 ",
        &[0, 0, 0, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0xe0, 0x01],
    );
    assert_eq!(
        data_url_dimensions(&data_url("image/webp", &vp8)),
        Some((640, 480))
    );
    // VP8L (lossless): signature, then width - 1 and height - 1 packed in 14 bits each.
    let bits: u32 = 639 | (479 << 14);
    let mut payload = vec![0x2f];
    payload.extend_from_slice(&bits.to_le_bytes());
    payload.extend_from_slice(&[0; 5]);
    let vp8l = riff(b"VP8L", &payload);
    assert_eq!(
        data_url_dimensions(&data_url("image/webp", &vp8l)),
        Some((640, 480))
    );
    // Unpadded base64 is read too.
    let unpadded = png_header(7, 9);
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(&unpadded[..26])
    );
    assert_eq!(data_url_dimensions(&url), Some((7, 9)));
}

#[test]
fn responses_parts_images_files_and_audio() {
    let png = data_url("image/png", &png_header(1024, 1024));
    let body = json!({
        "model": "gpt-4.1",
        "instructions": "tiktoken is great!",
        "input": [
            {"role": "user", "content": [
                {"type": "input_text", "text": "2 + 2 = 4"},
                {"type": "input_image", "image_url": png},
                {"type": "input_image", "file_id": "file-1"},
                {"type": "input_file", "file_id": "file-2"},
            ]},
            {"type": "function_call_output", "call_id": "c", "output": "18C"},
        ],
        "max_output_tokens": 50,
    });
    let e = est(Operation::Responses, "", &body);
    let item = count(
        Encoding::O200k,
        r#"{"type":"function_call_output","call_id":"c","output":"18C"}"#,
    );
    let expected = 3 // reply priming
        + 3 + 6 // instructions
        + 3 + 1 + 7 + 765 + 777 + 777 // the message
        + item;
    assert_eq!(
        e,
        Estimate {
            prompt: expected,
            output: 50
        }
    );
    let plain = est(
        Operation::Responses,
        "gpt-5",
        &json!({"input": "tiktoken is great!"}),
    );
    assert_eq!(
        plain,
        Estimate {
            prompt: 3 + 3 + 6,
            output: 1000
        }
    );

    // One second of 16 kHz 16-bit mono WAV (byte rate 32,000): ten tokens per second.
    let mut wav = b"RIFF\x00\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00".to_vec();
    wav.extend_from_slice(&16_000u32.to_le_bytes()); // sample rate
    wav.extend_from_slice(&32_000u32.to_le_bytes()); // byte rate
    wav.extend_from_slice(b"\x02\x00\x10\x00data");
    wav.extend_from_slice(&32_000u32.to_le_bytes());
    wav.resize(44 + 32_000, 0);
    let data = base64::engine::general_purpose::STANDARD.encode(&wav);
    assert_eq!(
        audio_tokens(&data, Some("wav")),
        11,
        "1.001 s with the header, rounded up"
    );
    // Without a header to read, the size is taken at 128 kbit/s (16,000 bytes/s): 2 s.
    assert_eq!(audio_tokens(&data, Some("mp3")), 21);
    let audio_chat = json!({"messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
    ]}]});
    assert_eq!(
        chat_prompt("gpt-4o-audio-preview", &audio_chat),
        3 + 1 + 11 + 3
    );
}

#[test]
fn output_reservation_n_best_of_and_none() {
    let chat = |extra: serde_json::Value| {
        let mut b = json!({"messages": [{"role": "user", "content": "hi"}]});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        est(Operation::Chat, "gpt-4o", &b).output
    };
    assert_eq!(chat(json!({})), 1000, "default_max_tokens");
    assert_eq!(chat(json!({"max_tokens": 100})), 100);
    assert_eq!(
        chat(json!({"max_tokens": 100, "max_completion_tokens": 40})),
        40
    );
    assert_eq!(chat(json!({"max_tokens": 100, "n": 3})), 300);
    assert_eq!(chat(json!({"n": 2})), 2000);
    assert_eq!(
        chat(json!({"max_tokens": null, "n": 0})),
        1000,
        "null and 0 ignored"
    );
    assert_eq!(
        chat(json!({"max_tokens": u64::MAX, "n": 4})),
        u64::MAX,
        "saturates"
    );

    let completions = |b: serde_json::Value| est(Operation::Completions, "davinci-002", &b);
    let e = completions(
        json!({"prompt": "tiktoken is great!", "max_tokens": 10, "n": 2, "best_of": 5}),
    );
    assert_eq!(
        e,
        Estimate {
            prompt: 6,
            output: 50
        }
    );
    let e = completions(
        json!({"prompt": ["tiktoken is great!", "2 + 2 = 4"], "max_tokens": 10, "n": 3}),
    );
    assert_eq!(
        e,
        Estimate {
            prompt: 13,
            output: 60
        },
        "each prompt gets n choices"
    );
    let e = completions(json!({"prompt": [1, 2, 3, 4], "suffix": "2 + 2 = 4", "max_tokens": 10}));
    assert_eq!(
        e,
        Estimate {
            prompt: 4 + 7,
            output: 10
        }
    );
    let e = completions(json!({"prompt": [[1, 2], [3, 4, 5]], "max_tokens": 10}));
    assert_eq!(
        e,
        Estimate {
            prompt: 5,
            output: 20
        }
    );

    let body = serde_json::to_vec(&json!({"messages": [], "max_tokens": 100, "n": 3})).unwrap();
    let e = estimate(Operation::Chat, "gpt-4o", &body, None, &NO_OUTPUT);
    assert_eq!(
        e,
        Estimate {
            prompt: 3,
            output: 0
        }
    );
}

#[test]
fn embeddings_and_unpriced_operations() {
    let e = est(
        Operation::Embeddings,
        "text-embedding-3-small",
        &json!({"input": ["tiktoken is great!", "2 + 2 = 4"], "n": 4}),
    );
    assert_eq!(
        e,
        Estimate {
            prompt: 13,
            output: 0
        }
    );
    let e = est(
        Operation::Embeddings,
        "text-embedding-3-small",
        &json!({"input": [[1, 2, 3], [4]]}),
    );
    assert_eq!(e.prompt, 4);
    for op in [
        Operation::Images,
        Operation::Audio,
        Operation::Files,
        Operation::Batches,
        Operation::Models,
        Operation::Other,
    ] {
        assert_eq!(
            est(op, "gpt-4o", &json!({"prompt": "a cat", "n": 4})),
            Estimate::default(),
            "{op:?}"
        );
        assert_eq!(estimate(op, "x", b"{{{", None, &OPTS), Estimate::default());
    }
}

#[test]
fn invalid_bodies_fall_back_to_length() {
    for body in [
        &b"not json{"[..],
        b"[1, 2, 3]!",
        b"\"a string\"",
        b"\xff\xfe\x00garbage",
    ] {
        let e = estimate(Operation::Chat, "gpt-4o", body, None, &OPTS);
        assert_eq!(
            e,
            Estimate {
                prompt: body.len().div_ceil(4) as u64,
                output: 1000
            },
            "{body:?}"
        );
    }
    let e = estimate(Operation::Embeddings, "x", b"12345", None, &OPTS);
    assert_eq!(
        e,
        Estimate {
            prompt: 2,
            output: 0
        }
    );
    // A form is never read as JSON, even when it would parse.
    let body = br#"{"messages": []}"#;
    let e = estimate(
        Operation::Chat,
        "gpt-4o",
        body,
        Some("multipart/form-data; boundary=x"),
        &NO_OUTPUT,
    );
    assert_eq!(e.prompt, body.len().div_ceil(4) as u64);
    let e = estimate(
        Operation::Chat,
        "gpt-4o",
        body,
        Some("application/json; charset=utf-8"),
        &NO_OUTPUT,
    );
    assert_eq!(e.prompt, 3);
    // Deep nesting is refused by the parser, not a stack overflow.
    let deep = format!(
        "{{\"messages\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let e = estimate(Operation::Chat, "gpt-4o", deep.as_bytes(), None, &OPTS);
    assert_eq!(e.prompt, deep.len().div_ceil(4) as u64);
}

/// Letters with no whitespace, from a fixed seed: the slowest input measured.
fn random_letters(len: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(14);
    (0..len).map(|_| rng.lowercase()).collect()
}

#[test]
fn work_is_capped_with_an_over_estimate() {
    let exact = |t: &str| Encoding::O200k.tokenizer().count(t) as u64;
    // Below the cap: exact.
    let short = random_letters(EXACT_BYTES / 2);
    assert_eq!(count(Encoding::O200k, &short), exact(&short));
    // Above it: never below the exact count, never above one token per byte.
    let long = random_letters(EXACT_BYTES * 2);
    let capped = count(Encoding::O200k, &long);
    assert!(
        capped >= exact(&long) && capped <= long.len() as u64,
        "{capped}"
    );
    // One piece longer than the cap counts one per byte (the exact count is 1/8 of that).
    let one_piece = "a".repeat(EXACT_BYTES + 1);
    assert_eq!(count(Encoding::Cl100k, &one_piece), one_piece.len() as u64);
    // The cap is per request: many messages under it each still share one budget.
    let message = "tiktoken is great! ".repeat(1000);
    let messages: Vec<_> = (0..40)
        .map(|_| json!({"role": "user", "content": message}))
        .collect();
    let body = json!({ "messages": messages });
    let prompt = chat_prompt("gpt-4o", &body);
    let uncapped = 3 + 40 * (3 + 1 + exact(&message));
    assert!(
        prompt > uncapped && prompt <= 3 + 40 * (3 + 4 + message.len() as u64),
        "{prompt} vs {uncapped}"
    );
}

#[test]
fn kept_role_counts_are_the_tokenizers() {
    for enc in [Encoding::Cl100k, Encoding::O200k] {
        for (role, n) in ROLES.iter().zip(role_tokens(enc)) {
            assert_eq!(*n, enc.tokenizer().count(role) as u64, "{role} in {enc:?}");
            assert_eq!(count(enc, role), *n);
        }
    }
    // Past the budget a role counts one token per byte, like any text.
    let mut c = Counter::new(Encoding::O200k);
    c.left = 2;
    assert_eq!(c.text("user"), 4);
}

/// Bodies of every shape the rules distinguish, and the edges of what the parser accepts
/// (repeated and escaped keys, nesting at the limit, invalid UTF-8, bad escapes, numbers out
/// of range): the typed reader gives what the `Value` one gave, for every operation.
#[test]
fn typed_reading_agrees_with_the_value_reference() {
    let bodies: Vec<String> = vec![
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Say something short."}],"max_tokens":16}"#.into(),
        r#"{"messages":[{"role":"user","content":"a","role":"system","name":"x","content":"hello there"}],"model":"gpt-3.5-turbo","model":5}"#.into(),
        r#"{"model":"gpt-3.5-turbo","messages":[{"role":"user","con\u0074ent":"caf\u00e9 \"q\"","name":7,"tool_calls":"str","function_call":{"name":"f","arguments":"{}"},"x":[1,2.5,-0,1e2],"y":null,"z":true}]}"#.into(),
        r#"{"messages":[1,"two",null,[{"a":1}],{"content":null},{"content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"http://x","detail":"low"}},{"type":"weird","q":1}]},{"content":{"a":"b"}},{"content":12}], "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}], "functions": null, "response_format":{"type":"json_schema","json_schema":{"name":"s","schema":{"b":1,"a":2}}}}"#.into(),
        r#"{"messages":{"role":"user"}, "max_completion_tokens": 5, "max_tokens": 7, "n": 3}"#.into(),
        r#"{"messages":"x", "max_tokens": -1, "n": 2.0}"#.into(),
        r#"{"messages":[{"role":"user","content":"x"}], "max_tokens": 1e400}"#.into(),
        r#"{"messages":[{"role":"user","content":"x","k":"\ud800"}]}"#.into(),
        r#"{"messages":[{"role":"user","content":"x"}], "other": {"deep": [[[[{"a":"\u0000"}]]]]}}"#.into(),
        r#"{"messages":[{"role":"user","content":"x"}], "other": "bad \x escape"}"#.into(),
        r#"{"messages":[{"role":"user","content":"x"}]} trailing"#.into(),
        r#"{"messages":[{"role":"user","content":"x"}],}"#.into(),
        r#"{"prompt":["a","b",[1,2,3]],"suffix":"s","best_of":3,"n":2,"max_tokens":4}"#.into(),
        r#"{"prompt":[1,2,3],"max_tokens":4}"#.into(),
        r#"{"input":["hello", [1,2]], "model":"text-embedding-3-small"}"#.into(),
        r#"{"instructions":"be nice","input":[{"role":"user","content":[{"type":"input_text","text":"hi"}]},{"type":"function_call_output","output":"x"},{"type":"message","role":"user","content":"yo"}],"tools":[{"type":"web_search"}],"text":{"format":{"type":"json_schema","schema":{}}},"max_output_tokens":9}"#.into(),
        r#"{"input":"hello","model":"o3"}"#.into(),
        r#"[1,2]"#.into(),
        r#""s""#.into(),
        r#"{}"#.into(),
        "  {\"messages\" : [ { \"role\" : \"user\" , \"content\" : \"x\" } ] }  ".into(),
        format!("{{\"messages\":[{{{}}}]}}", (0..40).map(|i| format!("\"k{}\":\"v{}\"", i % 23, i)).collect::<Vec<_>>().join(",")),
        format!("{{\"messages\": {}{}}}", "[".repeat(126), "]".repeat(126)),
        format!("{{\"messages\": {}{}}}", "[".repeat(127), "]".repeat(127)),
        format!("{{\"messages\": {}{}}}", "[".repeat(128), "]".repeat(128)),
        format!("{{\"messages\":[{{\"content\":{}{}}}]}}", "[".repeat(125), "]".repeat(125)),
        format!("{{\"messages\":[{{\"content\":{}{}}}]}}", "[".repeat(126), "]".repeat(126)),
        format!("{{\"x\": {}{}}}", "[".repeat(127), "]".repeat(127)),
        format!("{{\"x\": {}{}}}", "[".repeat(128), "]".repeat(128)),
        format!("{{\"model\": {}{}}}", "[".repeat(128), "]".repeat(128)),
    ];
    let mut all: Vec<Vec<u8>> = bodies.into_iter().map(String::into_bytes).collect();
    all.push(b"{\"messages\":[{\"content\":\"\xff\"}]}".to_vec());
    all.push(b"{\"messages\":[{\"content\":\"x\"}],\"o\":\"\xff\"}".to_vec());
    for body in &all {
        for op in [
            Operation::Chat,
            Operation::Completions,
            Operation::Embeddings,
            Operation::Responses,
        ] {
            for model in ["", "gpt-4"] {
                let a = estimate(op, model, body, None, &OPTS);
                let o = super::reference::EstimateOptions {
                    default_max_tokens: 1000,
                    reserve_output: super::reference::ReserveOutput::MaxTokens,
                    default_image_tokens: 777,
                };
                let b = super::reference::estimate(op, model, body, None, &o);
                let b = Estimate {
                    prompt: b.prompt,
                    output: b.output,
                };
                assert_eq!(a, b, "{op:?} {model} {}", String::from_utf8_lossy(body));
            }
        }
    }
}

#[test]
fn kept_piece_counts_are_the_tokenizers() {
    // Counted twice (the second time from this thread's piece cache), in both encodings,
    // interleaved so that slots are shared: the same counts as the tokenizer's.
    let texts = [
        KNOWN[0].0,
        KNOWN[4].0,
        KNOWN[7].0,
        "Say something short.",
        "the the the",
    ];
    for _ in 0..2 {
        for enc in [Encoding::Cl100k, Encoding::O200k] {
            for t in texts {
                assert_eq!(
                    count(enc, t),
                    enc.tokenizer().count(t) as u64,
                    "{t} in {enc:?}"
                );
            }
        }
    }
}
