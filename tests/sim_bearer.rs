//! The simulated backend in bearer mode (`SimOptions::bearer`): it verifies Entra-style
//! access tokens from the real test IdP against the IdP's JWKS, refuses everything else with
//! Azure's 401, and records what it accepted.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::idp::{decode_unverified, unsigned_token, Idp};
use portcullis::sim::{get, BearerCheck, SimHandle, SimOptions};
use serde_json::{json, Value};

/// The audience Azure OpenAI tokens carry.
const AUD: &str = "https://cognitiveservices.azure.com";
/// A key the simulator would accept if it were not in bearer mode.
const KEY: &str = "sim-static-key";
const AZURE_401: &str = "Unauthorized. Access token is missing, invalid, audience is incorrect (https://cognitiveservices.azure.com), or have expired.";

async fn bearer_sim(idp: &Idp, issuer: Option<String>) -> SimHandle {
    SimHandle::start(SimOptions {
        api_key: Some(KEY.to_owned()),
        bearer: Some(BearerCheck {
            jwks_uri: idp.jwks_uri(),
            audience: AUD.to_owned(),
            issuer,
        }),
        ..SimOptions::default()
    })
    .await
    .unwrap()
}

/// A chat completion on an Azure deployment path, with these headers.
async fn call(sim: &SimHandle, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = common::http().post(format!(
        "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
        sim.url()
    ));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.json(&common::chat_body(false)).send().await.unwrap()
}

async fn with_token(sim: &SimHandle, token: &str) -> reqwest::Response {
    call(sim, &[("authorization", &format!("Bearer {token}"))]).await
}

/// Azure's bearer 401, byte for byte where it matters.
async fn assert_refused(what: &str, resp: reqwest::Response) {
    assert_eq!(resp.status(), 401, "{what}");
    assert_eq!(
        resp.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap()),
        Some("Bearer"),
        "{what}"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        body,
        json!({ "error": { "code": "401", "message": AZURE_401 } }),
        "{what}"
    );
}

#[tokio::test]
async fn real_idp_tokens_are_accepted_and_their_claims_recorded() {
    let idp = Idp::start().await;
    idp.add_client(json!({ "client_id": "gateway", "client_secret": "s" }))
        .await;
    idp.add_client(json!({
        "client_id": "gateway-ec", "client_secret": "s", "access_token_alg": "ES256",
        "access_token_header": { "typ": "JWT" },
    }))
    .await;
    let sim = bearer_sim(&idp, Some(idp.issuer())).await;

    // resource=AUD (RFC 8707) and Entra's scope=AUD/.default both give aud = AUD.
    let rs = idp.token("gateway", "s", AUD, None).await;
    let (status, body) = idp
        .token_request(
            "gateway-ec",
            "s",
            &[
                ("grant_type", "client_credentials"),
                ("scope", &format!("{AUD}/.default")),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let es = body["access_token"].as_str().unwrap().to_owned();

    let before = SystemTime::now();
    for token in [&rs, &es] {
        let resp = with_token(&sim, token).await;
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["object"], "chat.completion");
    }
    let seen = sim.bearer_tokens();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].claims, decode_unverified(&rs).1);
    assert_eq!(seen[1].claims, decode_unverified(&es).1);
    assert_eq!(seen[1].claims["client_id"], "gateway-ec");
    assert_eq!(seen[1].claims["aud"], AUD);
    assert!(seen.iter().all(|s| s.received_at >= before));
    assert_eq!(sim.captured().len(), 2);
    assert_eq!(get(&sim.counters().bearer_rejected), 0);

    // `aud` may be an array containing the audience; a case-insensitive scheme is fine.
    let mut claims = idp.claims("gateway", "other");
    claims["aud"] = json!(["api://other", AUD]);
    claims["iss"] = json!(idp.issuer());
    let token = idp
        .forge(json!({ "alg": "RS256", "kid": "rsa-1" }), claims)
        .await;
    let resp = call(&sim, &[("authorization", &format!("bearer {token}"))]).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(sim.bearer_tokens().len(), 3);
}

#[tokio::test]
async fn everything_but_a_valid_token_is_refused_with_azures_401() {
    let idp = Idp::start().await;
    idp.add_client(json!({ "client_id": "gateway", "client_secret": "s" }))
        .await;
    let sim = bearer_sim(&idp, Some(idp.issuer())).await;
    let real = idp.token("gateway", "s", AUD, None).await;
    let now = jsonwebtoken::get_current_timestamp();
    let rsa = json!({ "alg": "RS256", "typ": "at+jwt", "kid": "rsa-1" });
    let forge = |edit: &dyn Fn(&mut Value)| {
        let mut claims = idp.claims("gateway", AUD);
        edit(&mut claims);
        idp.forge(rsa.clone(), claims)
    };

    let expired = forge(&|c| c["exp"] = json!(now - 1)).await;
    // No leeway: a token whose exp is this very second is already refused.
    let expiring = forge(&|c| c["exp"] = json!(now)).await;
    let no_exp = forge(&|c| {
        c.as_object_mut().unwrap().remove("exp");
    })
    .await;
    let not_yet = forge(&|c| c["nbf"] = json!(now + 600)).await;
    let wrong_aud = forge(&|c| c["aud"] = json!("api://someone-else")).await;
    let aud_without_ours = forge(&|c| c["aud"] = json!(["api://a", "api://b"])).await;
    let wrong_iss = forge(&|c| c["iss"] = json!("https://login.microsoftonline.com/x/v2.0")).await;
    // A real token whose payload was changed after signing.
    let tampered = {
        let (_, mut claims) = decode_unverified(&real);
        claims["client_id"] = json!("admin");
        let mut parts: Vec<String> = real.split('.').map(str::to_owned).collect();
        parts[1] = URL_SAFE_NO_PAD.encode(claims.to_string());
        parts.join(".")
    };
    let claims = idp.claims("gateway", AUD);
    let none = unsigned_token(&json!({ "alg": "none", "typ": "JWT" }), &claims, b"");
    // HS256 with the IdP's RSA public key as the secret (algorithm confusion).
    let confused = idp
        .forge(json!({ "alg": "HS256", "kid": "rsa-1" }), claims.clone())
        .await;
    // Signed by the RSA key but claiming the EC key's kid.
    let wrong_kid = idp
        .forge_with(
            "rsa-1",
            json!({ "alg": "RS256", "kid": "ec-1" }),
            claims.clone(),
        )
        .await;

    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("no credentials", vec![]),
        ("the static key alone", vec![("api-key", KEY.to_owned())]),
        (
            "the static key as a bearer",
            vec![("authorization", format!("Bearer {KEY}"))],
        ),
        (
            "a real token in another scheme",
            vec![("authorization", format!("Basic {real}"))],
        ),
        ("an empty bearer", vec![("authorization", "Bearer ".into())]),
        ("expired", bearer(&expired)),
        ("exp = now", bearer(&expiring)),
        ("no exp", bearer(&no_exp)),
        ("nbf in the future", bearer(&not_yet)),
        ("wrong aud", bearer(&wrong_aud)),
        ("aud array without ours", bearer(&aud_without_ours)),
        ("wrong iss", bearer(&wrong_iss)),
        ("tampered", bearer(&tampered)),
        ("alg none", bearer(&none)),
        ("HS256 confusion", bearer(&confused)),
        ("kid of another key", bearer(&wrong_kid)),
    ];
    for (what, headers) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_refused(what, call(&sim, &headers).await).await;
    }
    assert!(sim.bearer_tokens().is_empty());
    assert_eq!(
        get(&sim.counters().bearer_rejected),
        cases.len() as u64,
        "every refusal is counted"
    );
    // Refused requests are still captured.
    assert_eq!(sim.captured().len(), cases.len());

    // The real token itself passes, with or without an api-key next to it.
    let resp = call(
        &sim,
        &[
            ("authorization", &format!("Bearer {real}")),
            ("api-key", KEY),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
}

fn bearer(token: &str) -> Vec<(&'static str, String)> {
    vec![("authorization", format!("Bearer {token}"))]
}

/// Without a configured issuer any `iss` passes; everything else is still checked.
#[tokio::test]
async fn issuer_is_checked_only_when_configured() {
    let idp = Idp::start().await;
    let sim = bearer_sim(&idp, None).await;
    let mut claims = idp.claims("gateway", AUD);
    claims["iss"] = json!("https://sts.windows.net/tenant/");
    let token = idp
        .forge(json!({ "alg": "ES256", "kid": "ec-1" }), claims)
        .await;
    assert_eq!(with_token(&sim, &token).await.status(), 200);
}

/// The point of no leeway: a real token that expires between two requests is refused by the
/// second, although jsonwebtoken's default 60 s leeway would let it through. (Three seconds
/// to live: with one, a busy CI machine sometimes made the first request after expiry.)
#[tokio::test]
async fn a_real_token_is_refused_as_soon_as_it_expires() {
    let idp = Idp::start().await;
    idp.add_client(json!({ "client_id": "short", "client_secret": "s", "access_token_ttl": 3 }))
        .await;
    let sim = bearer_sim(&idp, Some(idp.issuer())).await;
    let token = idp.token("short", "s", AUD, None).await;
    let exp = decode_unverified(&token).1["exp"].as_u64().unwrap();
    assert_eq!(with_token(&sim, &token).await.status(), 200);
    while jsonwebtoken::get_current_timestamp() < exp {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_refused("expired in flight", with_token(&sim, &token).await).await;
    assert_eq!(get(&sim.counters().bearer_rejected), 1);
}

#[tokio::test]
async fn rotated_and_new_kinds_of_keys_are_picked_up_from_the_jwks() {
    let idp = Idp::start().await;
    idp.add_client(json!({ "client_id": "gateway", "client_secret": "s" }))
        .await;
    let sim = bearer_sim(&idp, Some(idp.issuer())).await;
    let old = idp.token("gateway", "s", AUD, None).await;
    assert_eq!(with_token(&sim, &old).await.status(), 200);
    idp.reset_stats().await;

    // Rotation: the new kid is unknown to the cached key set, so the sim fetches it again.
    assert_eq!(idp.rotate("RS256").await, "rsa-2");
    let new = idp.token("gateway", "s", AUD, None).await;
    assert_eq!(decode_unverified(&new).0["kid"], "rsa-2");
    assert_eq!(with_token(&sim, &new).await.status(), 200);
    assert_eq!(idp.stats().await["jwks"], 1);
    // The old key is still published and cached.
    assert_eq!(with_token(&sim, &old).await.status(), 200);

    // PS256 and ES384 keys, and a token without kid (every RSA key is tried).
    for alg in ["PS256", "ES384"] {
        let kid = idp.rotate(alg).await;
        let client = format!("gateway-{alg}");
        idp.add_client(
            json!({ "client_id": client, "client_secret": "s", "access_token_alg": alg }),
        )
        .await;
        let token = idp.token(&client, "s", AUD, None).await;
        assert_eq!(decode_unverified(&token).0["kid"], kid.as_str());
        assert_eq!(with_token(&sim, &token).await.status(), 200, "{alg}");
    }
    let kidless = idp
        .forge_with(
            "rsa-2",
            json!({ "alg": "RS256", "typ": "at+jwt" }),
            idp.claims("gateway", AUD),
        )
        .await;
    assert_eq!(with_token(&sim, &kidless).await.status(), 200);
    assert_eq!(sim.bearer_tokens().len(), 6);

    // Unknown kids cannot make the sim hammer the IdP: at most one fetch per second.
    idp.reset_stats().await;
    let started = Instant::now();
    let unknown = idp
        .forge_with(
            "rsa-2",
            json!({ "alg": "RS256", "kid": "nobody" }),
            idp.claims("gateway", AUD),
        )
        .await;
    let (a, b, c) = tokio::join!(
        with_token(&sim, &unknown),
        with_token(&sim, &unknown),
        with_token(&sim, &unknown)
    );
    for r in [a, b, c] {
        assert_refused("unknown kid", r).await;
    }
    let fetches = idp.stats().await["jwks"].as_u64().unwrap();
    let allowed = started.elapsed().as_secs() + 1;
    assert!(
        (1..=allowed).contains(&fetches),
        "{fetches} fetches in {:?}",
        started.elapsed()
    );
}
