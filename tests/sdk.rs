//! The official `openai` Python SDK (OpenAI and AzureOpenAI clients) against the gateway.
//!
//! The SDK lives in the project's venv, created by `scripts/test.sh`; set
//! `PORTCULLIS_PYTHON` to use another interpreter that has `openai` installed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

#[tokio::test]
async fn official_openai_python_sdk_works_through_the_gateway() {
    let issuer = portcullis::sim::issuer::DemoIssuer::start().await.unwrap();
    let s = sim().await;
    let b = backend(
        "sim",
        &s.url(),
        "azure",
        "deployments = { \"gpt-4o\" = \"gpt-4o-ptu\", \"text-embedding-3-small\" = \"emb\", \"images-only\" = \"dalle\" }",
    );
    let identity = format!(
        r#"
[[issuers]]
name = "corp"
issuer = "{}"
audiences = ["api://sdk"]
[[clients]]
id = "sdk"
jwt = [{{ issuer = "corp", claims = {{ azp = "sdk-app" }} }}]
deployments = ["gpt-4o", "text-embedding-*", "no-such-model"]
operations = ["chat", "embeddings", "models"]
"#,
        issuer.issuer()
    );
    let gw = Gateway::start_with("", &identity, &b).await;
    let sim = s;
    let key = gw.issue_key("sdk").await;
    let jwt = issuer
        .sign(
            "api://sdk",
            Duration::from_secs(600),
            serde_json::json!({ "azp": "sdk-app", "sub": "sdk-user" }),
        )
        .unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sdk/openai_sdk_check.py");
    let run = tokio::process::Command::new(python("the openai SDK"))
        .arg(&script)
        .env("GATEWAY_URL", &gw.url)
        .env("GATEWAY_KEY", &key)
        .env("GATEWAY_JWT", &jwt)
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
    assert!(reqs.len() >= 9, "{}", reqs.len());
    for r in reqs {
        assert_eq!(r.headers["api-key"], BACKEND_KEY);
        assert!(r.headers.get("authorization").is_none());
    }
    // Each request is attributed to the client, by key or by token.
    wait_until(
        "audit lines for both methods",
        Duration::from_secs(5),
        || {
            let lines = gw.audit();
            lines
                .iter()
                .any(|l| l["client"] == "sdk" && l["auth_method"] == "api_key")
                && lines.iter().any(|l| {
                    l["client"] == "sdk"
                        && l["auth_method"] == "jwt"
                        && l["identity"]["subject"] == "sdk-user"
                })
        },
    )
    .await;
}
