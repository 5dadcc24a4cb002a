//! The official `openai` Python SDK (OpenAI and AzureOpenAI clients) against the gateway.
//!
//! The SDK lives in the project's venv, created by `scripts/test.sh`; set
//! `PORTCULLIS_PYTHON` to use another interpreter that has `openai` installed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("PORTCULLIS_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        venv.exists(),
        "no Python with the openai SDK: run scripts/test.sh (it creates .venv) or set PORTCULLIS_PYTHON"
    );
    venv
}

#[tokio::test]
async fn official_openai_python_sdk_works_through_the_gateway() {
    let (sim, gw) = azure_pair("", "").await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/openai_sdk_check.py");
    let run = tokio::process::Command::new(python())
        .arg(&script)
        .env("GATEWAY_URL", &gw.url)
        .env("NO_PROXY", "127.0.0.1")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("openai-sdk: all checks passed"));
    // Both clients reached the backend with the gateway's key, never the client's.
    let reqs = sim.captured();
    assert!(reqs.len() >= 6, "{}", reqs.len());
    for r in reqs {
        assert_eq!(r.headers["api-key"], BACKEND_KEY);
        assert!(r.headers.get("authorization").is_none());
    }
}
