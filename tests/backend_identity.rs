//! Backend identity (issue #4): the gateway authenticates to backends with Entra-style
//! tokens from a real OpenID provider (`oidc-provider`), and the simulated backend verifies
//! every token it receives (signature against the IdP's JWKS, `aud`, `exp` with no leeway),
//! so client → gateway → IdP → backend is proven end to end. Covered: client secret (post
//! and basic), certificate assertions (PS256, RS256, ES256; `x5t#S256`, `x5c`; verified by
//! the IdP, `jti` not replayable), certificate rotation on disk, managed identity (IMDS with
//! a user-assigned identity, App Service), workload identity (token file re-read), refresh
//! ahead of expiry under traffic with a slow IdP, an IdP outage through token expiry and
//! back, routing around a backend whose credential is not ready, and a backend that
//! rejects the gateway's token (one renewal and one retry, then its circuit opens).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use common::idp::{decode_unverified, Idp};
use common::msi::{Identity, Msi};
use common::{bearer_sim, error_code, http, Gateway, ANYONE};
use portcullis::sim::{get, Behavior, SimHandle, SimOptions};
use serde_json::{json, Value};

/// The audience of the default scope (`https://cognitiveservices.azure.com/.default`).
const AUD: &str = "https://cognitiveservices.azure.com";

/// A `[[backends]]` section serving `deployment` with the given `[backends.auth]` body.
fn backend(name: &str, url: &str, deployment: &str, extra: &str, auth: &str) -> String {
    format!(
        "[[backends]]\nname = \"{name}\"\nurl = \"{url}\"\ntype = \"azure\"\ndeployments = {{ \"{deployment}\" = \"gpt-4o\" }}\n{extra}\n[backends.auth]\n{auth}\n"
    )
}

fn secret_auth(idp: &Idp, client: &str, secret: &str, extra: &str) -> String {
    format!(
        "type = \"entra_secret\"\ntoken_url = \"{}\"\nclient_id = \"{client}\"\nclient_secret = \"{secret}\"\n{extra}",
        idp.token_endpoint()
    )
}

async fn add_secret_client(idp: &Idp, client: &str, secret: &str, method: &str, ttl: u64) {
    idp.add_client(json!({
        "client_id": client,
        "client_secret": secret,
        "token_endpoint_auth_method": method,
        "access_token_ttl": ttl,
    }))
    .await;
}

/// `/ready` on the admin listener, which gives the reasons in full.
async fn ready(gw: &Gateway) -> (u16, String) {
    let resp = http()
        .get(format!("{}/ready", gw.admin_url))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Until `/ready` says `ready` (not merely `degraded`: every backend usable).
async fn wait_ready(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = ready(gw).await;
        if status == 200 && body.contains("\"ready\"") {
            return;
        }
        assert!(Instant::now() < deadline, "gateway never ready: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A chat completion for `deployment` with a request id; the response.
async fn chat(gw: &Gateway, deployment: &str, rid: &str) -> reqwest::Response {
    http()
        .post(format!(
            "{}/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21",
            gw.url
        ))
        .header("x-request-id", rid)
        .json(&common::chat_body(false))
        .send()
        .await
        .unwrap()
}

/// The claims of the last token the sim accepted.
fn last_claims(sim: &SimHandle) -> Value {
    sim.bearer_tokens()
        .pop()
        .expect("the sim accepted a token")
        .claims
}

/// A self-signed certificate (PEM) with its private key (PKCS#8 PEM) and the
/// `x5t#S256` Entra matches it by.
fn certificate(alg: &'static rcgen::SignatureAlgorithm) -> (String, String, String) {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["portcullis-gateway".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = cert.der().to_vec();
    let thumb = URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &der));
    (cert.pem(), key.serialize_pem(), thumb)
}

/// Token requests the IdP answered for `client`, oldest first.
async fn requests_of(idp: &Idp, client: &str) -> Vec<Value> {
    idp.token_requests()
        .await
        .into_iter()
        .filter(|r| r["params"]["client_id"] == client || r["client_id"] == client)
        .collect()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Replace a file the way rotation tools do: write aside, then rename over it.
fn replace_file(path: &std::path::Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn client_secret_post_and_basic_tokens_reach_a_backend_that_verifies_them() {
    let idp = Idp::start().await;
    add_secret_client(
        &idp,
        "gw-post",
        "post-secret-0123456789",
        "client_secret_post",
        3600,
    )
    .await;
    add_secret_client(
        &idp,
        "gw-basic",
        "basic:secret/+=",
        "client_secret_basic",
        3600,
    )
    .await;
    let sim = bearer_sim(&idp).await;
    let backends = [
        backend(
            "post",
            &sim.url(),
            "a",
            "",
            &secret_auth(&idp, "gw-post", "post-secret-0123456789", ""),
        ),
        backend(
            "basic",
            &sim.url(),
            "b",
            "",
            &secret_auth(
                &idp,
                "gw-basic",
                "basic:secret/+=",
                "token_endpoint_auth_method = \"client_secret_basic\"",
            ),
        ),
    ]
    .concat();
    let gw = Gateway::start("", &backends).await;
    wait_ready(&gw).await;

    for (deployment, client, rid) in [("a", "gw-post", "rid-post"), ("b", "gw-basic", "rid-basic")]
    {
        let resp = chat(&gw, deployment, rid).await;
        assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
        let claims = last_claims(&sim);
        assert_eq!(claims["client_id"], client);
        assert_eq!(claims["aud"], AUD, "the default scope names Azure OpenAI");
        let audit = gw.audit_for(rid).await;
        assert_eq!(audit["backend_auth"], "entra_secret");
        assert_eq!(audit["backend_identity"], client);
    }
    assert_eq!(get(&sim.counters().bearer_rejected), 0);

    // How each client authenticated at the token endpoint.
    let post = requests_of(&idp, "gw-post").await;
    assert!(post.iter().all(|r| r["auth_scheme"].is_null()), "{post:?}");
    assert_eq!(post[0]["params"]["scope"], format!("{AUD}/.default"));
    assert_eq!(post[0]["params"]["grant_type"], "client_credentials");
    let basic = requests_of(&idp, "gw-basic").await;
    assert_eq!(basic[0]["auth_scheme"], "Basic", "{basic:?}");
    assert!(basic[0]["params"]["client_secret"].is_null());

    // One token per credential serves many requests: no exchange per request.
    for i in 0..5 {
        assert_eq!(chat(&gw, "a", &format!("again-{i}")).await.status(), 200);
    }
    assert_eq!(requests_of(&idp, "gw-post").await.len(), 1);

    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            "portcullis_backend_token_requests_total{credential=\"entra_secret:gw-post\",outcome=\"ok\"} 1"
        ),
        "{metrics}"
    );
    let expiry: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with(
                "portcullis_backend_token_expiry_seconds{credential=\"entra_secret:gw-basic\"}",
            )
        })
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(expiry > 3500.0 && expiry <= 3600.0, "{expiry}");
}

#[tokio::test]
async fn certificate_assertions_are_verified_by_the_idp_and_cannot_be_replayed() {
    let idp = Idp::start().await;
    let sim = bearer_sim(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    // (client, key type, configured algorithm, key in its own file, send x5c, JWS alg)
    let cases = [
        (
            "cert-ps256",
            &rcgen::PKCS_RSA_SHA256,
            "",
            false,
            false,
            "PS256",
        ),
        (
            "cert-rs256",
            &rcgen::PKCS_RSA_SHA256,
            "algorithm = \"RS256\"",
            false,
            false,
            "RS256",
        ),
        (
            "cert-es256",
            &rcgen::PKCS_ECDSA_P256_SHA256,
            "",
            true,
            true,
            "ES256",
        ),
    ];
    let mut backends = String::new();
    let mut thumbs = Vec::new();
    for (client, alg, algorithm, apart, x5c, _) in cases {
        let (cert, key, thumb) = certificate(alg);
        idp.add_cert_client(
            client,
            &[cert.as_str()],
            json!({ "assertion_max_age": 600 }),
        )
        .await;
        let cert_file = dir.path().join(format!("{client}.pem"));
        let mut auth = format!(
            "type = \"entra_certificate\"\ntoken_url = \"{}\"\nclient_id = \"{client}\"\ncertificate_file = \"{}\"\n{algorithm}\nsend_x5c = {x5c}\n",
            idp.token_endpoint(),
            cert_file.display()
        );
        if apart {
            let key_file = dir.path().join(format!("{client}.key"));
            std::fs::write(&key_file, &key).unwrap();
            std::fs::write(&cert_file, &cert).unwrap();
            auth.push_str(&format!("key_file = \"{}\"\n", key_file.display()));
        } else {
            std::fs::write(&cert_file, format!("{cert}{key}")).unwrap();
        }
        backends.push_str(&backend(client, &sim.url(), client, "", &auth));
        thumbs.push(thumb);
    }
    let gw = Gateway::start("", &backends).await;
    wait_ready(&gw).await;

    for ((client, _, _, _, x5c, alg), thumb) in cases.iter().zip(&thumbs) {
        let resp = chat(&gw, client, &format!("rid-{client}")).await;
        assert_eq!(
            resp.status(),
            200,
            "{client}: {}",
            resp.text().await.unwrap()
        );
        assert_eq!(last_claims(&sim)["client_id"], *client);
        let audit = gw.audit_for(&format!("rid-{client}")).await;
        assert_eq!(audit["backend_auth"], "entra_certificate");

        let reqs = requests_of(&idp, client).await;
        assert_eq!(reqs.len(), 1, "{reqs:?}");
        let r = &reqs[0];
        assert_eq!(r["status"], 200, "{r}");
        let params = &r["params"];
        assert_eq!(
            params["client_assertion_type"],
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        );
        assert!(params["client_secret"].is_null());
        let assertion = params["client_assertion"].as_str().unwrap();
        let (header, claims) = decode_unverified(assertion);
        assert_eq!(header["alg"], *alg);
        assert_eq!(
            header["x5t#S256"],
            thumb.as_str(),
            "Entra matches the certificate by x5t#S256"
        );
        assert!(header["x5t"].is_string());
        assert!(header.get("kid").is_none());
        if *x5c {
            let chain = header["x5c"].as_array().unwrap();
            let leaf = STANDARD.decode(chain[0].as_str().unwrap()).unwrap();
            let sum = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &leaf);
            assert_eq!(
                URL_SAFE_NO_PAD.encode(sum),
                *thumb,
                "x5c[0] is the certificate"
            );
        } else {
            assert!(header.get("x5c").is_none());
        }
        assert_eq!(claims["aud"], idp.token_endpoint());
        assert_eq!(claims["iss"], *client);
        assert_eq!(claims["sub"], *client);
        assert!(claims["jti"].as_str().unwrap().len() >= 16);
        let (iat, exp) = (
            claims["iat"].as_u64().unwrap(),
            claims["exp"].as_u64().unwrap(),
        );
        assert!(
            exp > iat && exp - iat <= 600,
            "Entra refuses assertions over 10 minutes"
        );
        assert!(claims["nbf"].as_u64().unwrap() <= now_secs());

        // Someone who captured the assertion cannot use it again.
        let replay = http()
            .post(idp.token_endpoint())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(common::idp::form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client),
                ("scope", &format!("{AUD}/.default")),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion),
            ]))
            .send()
            .await
            .unwrap();
        assert_eq!(replay.status(), 401, "a replayed assertion is refused");
        let body: Value = replay.json().await.unwrap();
        assert_eq!(body["error"], "invalid_client");
    }
    assert_eq!(get(&sim.counters().bearer_rejected), 0);
}

#[tokio::test]
async fn a_certificate_rotated_on_disk_signs_the_next_assertion() {
    let idp = Idp::start().await;
    let sim = bearer_sim(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert1, key1, thumb1) = certificate(&rcgen::PKCS_ECDSA_P256_SHA256);
    // Short-lived tokens: a new exchange every few seconds.
    let extra = json!({ "access_token_ttl": 6 });
    idp.add_cert_client("rotating", &[cert1.as_str()], extra.clone())
        .await;
    let file = dir.path().join("gateway.pem");
    std::fs::write(&file, format!("{cert1}{key1}")).unwrap();
    let auth = format!(
        "type = \"entra_certificate\"\ntoken_url = \"{}\"\nclient_id = \"rotating\"\ncertificate_file = \"{}\"\n",
        idp.token_endpoint(),
        file.display()
    );
    let gw = Gateway::start("", &backend("aoai", &sim.url(), "gpt-4o", "", &auth)).await;
    wait_ready(&gw).await;
    assert_eq!(chat(&gw, "gpt-4o", "before").await.status(), 200);
    let first = requests_of(&idp, "rotating").await;
    let (h, _) = decode_unverified(first[0]["params"]["client_assertion"].as_str().unwrap());
    assert_eq!(h["x5t#S256"], thumb1);

    // Rotation: the new certificate is registered (the old one withdrawn), then the file
    // is replaced. No restart.
    let (cert2, key2, thumb2) = certificate(&rcgen::PKCS_ECDSA_P256_SHA256);
    idp.add_cert_client("rotating", &[cert2.as_str()], extra)
        .await;
    replace_file(&file, &format!("{cert2}{key2}"));
    let rotated_at = now_secs();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let reqs = requests_of(&idp, "rotating").await;
        let used_new = reqs.iter().any(|r| {
            r["status"] == 200
                && decode_unverified(r["params"]["client_assertion"].as_str().unwrap()).0
                    ["x5t#S256"]
                    == thumb2
        });
        if used_new {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never used: {reqs:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The backend now receives tokens obtained with the new certificate.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(chat(&gw, "gpt-4o", "after").await.status(), 200);
        if last_claims(&sim)["iat"].as_u64().unwrap() >= rotated_at {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tokens from before the rotation only"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A rotation tool that leaves a broken file behind does not stop the gateway.
    let signed_with_new = |reqs: &[Value]| {
        reqs.iter()
            .filter(|r| {
                r["status"] == 200
                    && decode_unverified(r["params"]["client_assertion"].as_str().unwrap()).0
                        ["x5t#S256"]
                        == thumb2
            })
            .count()
    };
    let before = signed_with_new(&requests_of(&idp, "rotating").await);
    std::fs::write(&file, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while signed_with_new(&requests_of(&idp, "rotating").await) <= before {
        assert!(
            Instant::now() < deadline,
            "no exchange with the last good certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(chat(&gw, "gpt-4o", "broken-file").await.status(), 200);
}

#[tokio::test]
async fn managed_identity_by_imds_with_a_user_assigned_identity_and_by_app_service() {
    let idp = Idp::start().await;
    let ua = Identity::user_assigned("gateway-ua");
    let msi = Msi::start(&idp, std::slice::from_ref(&ua)).await;
    let sim = bearer_sim(&idp).await;
    let backends = [
        backend(
            "imds",
            &sim.url(),
            "imds",
            "",
            &format!(
                "type = \"managed_identity\"\nendpoint = \"{}\"\nclient_id = \"{}\"",
                msi.imds_url(),
                ua.client_id
            ),
        ),
        backend(
            "imds-res",
            &sim.url(),
            "imds-res",
            "",
            &format!(
                "type = \"managed_identity\"\nendpoint = \"{}\"\nmi_res_id = \"{}\"",
                msi.imds_url(),
                ua.mi_res_id
            ),
        ),
        backend(
            "appsvc",
            &sim.url(),
            "appsvc",
            "",
            "type = \"managed_identity\"",
        ),
    ]
    .concat();
    let header = msi.identity_header();
    let env = [
        ("IDENTITY_ENDPOINT", msi.app_service_url()),
        ("IDENTITY_HEADER", header.clone()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let gw = Gateway::start_env("", ANYONE, &backends, &env).await;
    wait_ready(&gw).await;

    assert_eq!(chat(&gw, "imds", "rid-imds").await.status(), 200);
    assert_eq!(last_claims(&sim)["appid"], ua.client_id.as_str());
    assert_eq!(
        gw.audit_for("rid-imds").await["backend_identity"],
        format!("client_id={}", ua.client_id)
    );
    // IMDS names the resource id `msi_res_id` (App Service: `mi_res_id`).
    assert_eq!(chat(&gw, "imds-res", "rid-imds-res").await.status(), 200);
    assert_eq!(last_claims(&sim)["xms_mirid"], ua.mi_res_id.as_str());
    assert_eq!(chat(&gw, "appsvc", "rid-appsvc").await.status(), 200);
    assert_eq!(
        last_claims(&sim)["appid"],
        msi.system_identity().client_id.as_str()
    );
    let audit = gw.audit_for("rid-appsvc").await;
    assert_eq!(audit["backend_auth"], "managed_identity");
    assert_eq!(audit["backend_identity"], "system");

    let reqs = msi.requests();
    let imds = reqs
        .iter()
        .find(|r| r.path.contains("metadata") && r.query.contains_key("client_id"))
        .unwrap();
    assert_eq!(imds.status, 200);
    assert_eq!(imds.headers["metadata"], "true");
    assert_eq!(imds.query["api-version"], "2018-02-01");
    assert_eq!(imds.query["resource"], AUD);
    assert_eq!(imds.query["client_id"], ua.client_id);
    let app = reqs.iter().find(|r| !r.path.contains("metadata")).unwrap();
    assert_eq!(app.status, 200);
    assert_eq!(app.headers["x-identity-header"], header.as_str());
    assert_eq!(app.query["api-version"], "2019-08-01");
    assert_eq!(app.query["resource"], AUD);
    assert!(!app.query.contains_key("client_id"));
}

#[tokio::test]
async fn workload_identity_reads_the_token_file_again_for_every_exchange() {
    let idp = Idp::start().await;
    let sim = bearer_sim(&idp).await;
    // The kubelet's side: a key the IdP trusts for this client (Entra's federated
    // credential), and a token file it rewrites.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    idp.add_cert_client(
        "wi-app",
        &[key.public_key_pem()],
        json!({ "access_token_ttl": 6 }),
    )
    .await;
    let signing = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let kubelet_token = |n: u32| {
        let now = now_secs();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &json!({
                "iss": "wi-app", "sub": "wi-app", "aud": idp.token_endpoint(),
                "jti": format!("kubelet-{n}-{now}"), "iat": now, "exp": now + 3600,
            }),
            &signing,
        )
        .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    let first = kubelet_token(1);
    std::fs::write(&file, &first).unwrap();
    let file_s = file.display().to_string();
    let env = [
        ("AZURE_CLIENT_ID", "wi-app"),
        ("AZURE_TENANT_ID", "ignored-with-token-url"),
        // AKS always sets it; an explicit token_url wins.
        ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/"),
        ("AZURE_FEDERATED_TOKEN_FILE", file_s.as_str()),
    ];
    let auth = format!(
        "type = \"workload_identity\"\ntoken_url = \"{}\"",
        idp.token_endpoint()
    );
    let gw = Gateway::start_env(
        "",
        ANYONE,
        &backend("aks", &sim.url(), "gpt-4o", "", &auth),
        &env,
    )
    .await;
    wait_ready(&gw).await;
    assert_eq!(chat(&gw, "gpt-4o", "rid-wi").await.status(), 200);
    assert_eq!(last_claims(&sim)["client_id"], "wi-app");
    assert_eq!(
        gw.audit_for("rid-wi").await["backend_auth"],
        "workload_identity"
    );
    let reqs = requests_of(&idp, "wi-app").await;
    assert_eq!(reqs[0]["params"]["client_assertion"], first.as_str());

    // The kubelet rotates the token: the next exchange sends the new content.
    let second = kubelet_token(2);
    replace_file(&file, &second);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !requests_of(&idp, "wi-app")
        .await
        .iter()
        .any(|r| r["params"]["client_assertion"] == second.as_str() && r["status"] == 200)
    {
        assert!(
            Instant::now() < deadline,
            "the rewritten token file was never sent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(chat(&gw, "gpt-4o", "rid-wi-2").await.status(), 200);
}

#[tokio::test]
async fn tokens_are_refreshed_ahead_so_steady_traffic_never_waits_or_carries_an_expired_one() {
    let idp = Idp::start().await;
    // 8 s tokens: refreshed at 4 s; the IdP takes 2.5 s to answer each refresh, so a
    // request that waited for one takes longer than any request slowed by a loaded machine.
    add_secret_client(
        &idp,
        "steady",
        "steady-secret-0123456789",
        "client_secret_post",
        8,
    )
    .await;
    let sim = bearer_sim(&idp).await;
    let auth = secret_auth(&idp, "steady", "steady-secret-0123456789", "");
    let gw = Gateway::start("", &backend("aoai", &sim.url(), "gpt-4o", "", &auth)).await;
    wait_ready(&gw).await;
    idp.set_token_delay(2500).await;

    let run_for = Duration::from_secs(18);
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..4 {
        let url = gw.url.clone();
        workers.push(tokio::spawn(async move {
            let client = http();
            let mut slowest = Duration::ZERO;
            let mut n = 0u32;
            while start.elapsed() < run_for {
                let t = Instant::now();
                let resp = client
                    .post(format!("{url}/v1/chat/completions"))
                    .json(&common::chat_body(false))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status();
                let body = resp.text().await.unwrap();
                assert_eq!(status, 200, "worker {w} request {n}: {body}");
                slowest = slowest.max(t.elapsed());
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (n, slowest)
        }));
    }
    let mut total = 0;
    for w in workers {
        let (n, slowest) = w.await.unwrap();
        total += n;
        // A request that waited for a refresh would take at least the IdP's 2.5 s.
        assert!(
            slowest < Duration::from_millis(2000),
            "a request took {slowest:?}"
        );
    }
    assert!(total > 200, "steady traffic: {total} requests");
    assert_eq!(
        get(&sim.counters().bearer_rejected),
        0,
        "no expired or invalid token reached the backend"
    );
    let seen = sim.bearer_tokens();
    for t in &seen {
        let exp = t.claims["exp"].as_u64().unwrap();
        let at = t
            .received_at
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!((exp as f64) > at, "token used after its expiry");
    }
    let distinct: HashSet<&str> = seen
        .iter()
        .map(|t| t.claims["jti"].as_str().unwrap())
        .collect();
    assert!(
        distinct.len() >= 3,
        "18 s of 8 s tokens: {} tokens",
        distinct.len()
    );
}

#[tokio::test]
async fn an_idp_outage_is_invisible_until_the_token_expires_then_503_then_recovery() {
    let idp = Idp::start().await;
    add_secret_client(
        &idp,
        "outage",
        "outage-secret-0123456789",
        "client_secret_post",
        8,
    )
    .await;
    let sim = bearer_sim(&idp).await;
    let auth = secret_auth(&idp, "outage", "outage-secret-0123456789", "");
    let gw = Gateway::start("", &backend("aoai", &sim.url(), "gpt-4o", "", &auth)).await;
    wait_ready(&gw).await;
    assert_eq!(chat(&gw, "gpt-4o", "before").await.status(), 200);

    // The outage begins right after a token was acquired (it is usable for ~6.6 s).
    idp.set_outage(&["token"], 503).await;
    let began = Instant::now();
    let mut refused_at = None;
    let mut i = 0;
    while began.elapsed() < Duration::from_secs(20) {
        let resp = chat(&gw, "gpt-4o", &format!("during-{i}")).await;
        i += 1;
        if resp.status() == 200 {
            continue;
        }
        let (status, code) = error_code(resp).await;
        assert_eq!((status, code.as_str()), (503, "backend_auth_unavailable"));
        refused_at = Some(began.elapsed());
        break;
    }
    let refused_at = refused_at.expect("requests fail once the token has expired");
    assert!(
        refused_at >= Duration::from_secs(4),
        "the valid token was used during the outage ({refused_at:?})"
    );
    let (status, body) = ready(&gw).await;
    assert_eq!(status, 503);
    assert!(
        body.contains("backend 'aoai'")
            && body.contains("entra_secret")
            && body.contains("answered 503"),
        "{body}"
    );
    assert!(!body.contains("outage-secret"), "{body}");
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("portcullis_backend_token_requests_total{credential=\"entra_secret:outage\",outcome=\"retryable_error\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("outcome=\"credential_unavailable\""),
        "{metrics}"
    );

    // The IdP returns; so does the backend, without a restart.
    idp.set_down(false).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while chat(&gw, "gpt-4o", "after").await.status() != 200 {
        assert!(Instant::now() < deadline, "no recovery after the outage");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_ready(&gw).await;
}

#[tokio::test]
async fn routing_skips_a_backend_without_a_valid_token_and_says_why() {
    let idp = Idp::start().await;
    let broken_sim = bearer_sim(&idp).await;
    let keyed_sim = SimHandle::start(SimOptions {
        api_key: Some(common::BACKEND_KEY.to_owned()),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let dead = format!("http://127.0.0.1:{}/token", common::dead_port());
    let broken_auth = format!(
        "type = \"entra_secret\"\ntoken_url = \"{dead}\"\nclient_id = \"nobody\"\nclient_secret = \"never-sent-secret\""
    );
    let backends = [
        backend(
            "ptu",
            &broken_sim.url(),
            "gpt-4o",
            "priority = 0",
            &broken_auth,
        ),
        backend(
            "paygo",
            &keyed_sim.url(),
            "gpt-4o",
            "priority = 1",
            &format!("type = \"api_key\"\nkey = \"{}\"", common::BACKEND_KEY),
        ),
    ]
    .concat();
    let gw = Gateway::start("", &backends).await;
    for i in 0..3 {
        let rid = format!("skip-{i}");
        assert_eq!(chat(&gw, "gpt-4o", &rid).await.status(), 200);
        assert_eq!(gw.audit_for(&rid).await["backend"], "paygo");
    }
    assert_eq!(
        get(&broken_sim.counters().requests),
        0,
        "nothing was sent without a token"
    );
    // Degraded, not down: pay-as-you-go still serves gpt-4o, so this replica stays in
    // its Kubernetes Service.
    let (status, body) = ready(&gw).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"degraded\""), "{body}");
    assert!(
        body.contains("backend 'ptu'") && body.contains("as nobody"),
        "{body}"
    );
    assert!(body.contains("cannot connect"), "{body}");
    assert!(!body.contains("never-sent-secret"));
    // The client listener says only that a credential is not ready, not whose or why.
    let public = http()
        .get(format!("{}/ready", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 200);
    let public = public.text().await.unwrap();
    assert!(
        public.contains("a backend credential is not ready"),
        "{public}"
    );
    assert!(
        !public.contains("ptu") && !public.contains("nobody"),
        "{public}"
    );

    // With no other backend, the request fails fast with the documented error.
    let only = backend("ptu", &broken_sim.url(), "gpt-4o", "", &broken_auth);
    let gw = Gateway::start("", &only).await;
    let t = Instant::now();
    let resp = chat(&gw, "gpt-4o", "no-token").await;
    let (status, code) = error_code(resp).await;
    assert_eq!((status, code.as_str()), (503, "backend_auth_unavailable"));
    assert!(t.elapsed() < Duration::from_secs(2), "fails fast");
    assert_eq!(
        gw.audit_for("no-token").await["error_code"],
        "backend_auth_unavailable"
    );
}

#[tokio::test]
async fn a_backend_rejecting_the_token_gets_one_renewed_token_and_one_retry() {
    let idp = Idp::start().await;
    add_secret_client(
        &idp,
        "gw-401",
        "secret-401-0123456789",
        "client_secret_post",
        3600,
    )
    .await;
    let sim = bearer_sim(&idp).await;
    let gw = Gateway::start(
        "[routing.breaker]\nunauthorized = 2\nopen_for = \"30s\"",
        &backend(
            "aoai",
            &sim.url(),
            "gpt-4o",
            "",
            &secret_auth(&idp, "gw-401", "secret-401-0123456789", ""),
        ),
    )
    .await;
    wait_ready(&gw).await;
    assert_eq!(chat(&gw, "gpt-4o", "before").await.status(), 200);
    let issued = requests_of(&idp, "gw-401").await.len();
    assert_eq!(issued, 1);

    // The backend rejects the token once (revoked, say): one renewal, one retry, and the
    // client never knows.
    sim.set_burst(1, Behavior::Unauthorized);
    let resp = chat(&gw, "gpt-4o", "renewed").await;
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    assert_eq!(
        requests_of(&idp, "gw-401").await.len(),
        issued + 1,
        "one renewal"
    );
    let a = gw.audit_for("renewed").await;
    assert_eq!(a["attempts"], 2);
    assert_eq!(a["tried"][0]["outcome"], "unauthorized");
    assert_eq!(a["tried"][1]["backend"], "aoai");
    assert_eq!(a["tried"][1]["outcome"], "response");
    let accepted = sim.bearer_tokens();
    let n = accepted.len();
    assert!(n >= 3);
    assert_ne!(
        accepted[n - 1].claims["jti"],
        accepted[n - 2].claims["jti"],
        "the retry carried the new token"
    );

    // A backend that rejects every token: each request is refused (503, the gateway's
    // problem, not the client's), renewals stay bounded, and the circuit opens.
    sim.set_behavior(Behavior::Unauthorized);
    for i in 0..2 {
        let resp = chat(&gw, "gpt-4o", &format!("rejected-{i}")).await;
        assert_eq!(
            error_code(resp).await,
            (503, "backend_auth_unavailable".into())
        );
    }
    assert!(
        requests_of(&idp, "gw-401").await.len() <= issued + 2,
        "a backend answering 401 to everything does not flood the IdP"
    );
    let before = sim.captured().len();
    let resp = chat(&gw, "gpt-4o", "open").await;
    assert_eq!(error_code(resp).await, (503, "no_usable_backend".into()));
    assert_eq!(sim.captured().len(), before, "nothing sent while open");
    let (status, body) = ready(&gw).await;
    assert_eq!(status, 503);
    assert!(body.contains("backend 'aoai': circuit open"), "{body}");
}
