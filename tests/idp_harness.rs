//! The test IdP itself (`tests/idp/idp.mjs` + `tests/common/idp.rs`): real tokens verify
//! against its discovered JWKS, keys rotate, outages and counters work, forged tokens carry
//! its real signatures, certificate (`private_key_jwt`) and secret clients take tokens for
//! Entra's `.default` scopes. Other suites build on this.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::idp::{decode_unverified, sign_token, unsigned_token, Idp};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use serde_json::{json, Value};

const API: &str = "api://portcullis";

/// Verify `token` the way a resource server does: discovery → jwks_uri → key by kid.
async fn verify(idp: &Idp, token: &str, aud: &str) -> (jsonwebtoken::Header, Value) {
    let discovery = idp.discovery().await;
    assert_eq!(discovery["issuer"], idp.issuer());
    assert_eq!(discovery["jwks_uri"], idp.jwks_uri());
    let jwks: JwkSet = serde_json::from_value(idp.jwks().await).unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    let kid = header.kid.clone().expect("token has a kid");
    let jwk = jwks
        .find(&kid)
        .unwrap_or_else(|| panic!("kid {kid} not in JWKS"));
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[idp.issuer()]);
    validation.set_audience(&[aud]);
    let data =
        jsonwebtoken::decode::<Value>(token, &DecodingKey::from_jwk(jwk).unwrap(), &validation)
            .unwrap_or_else(|e| panic!("token does not verify: {e}"));
    (header, data.claims)
}

fn kids(jwks: &Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn rs256_and_es256_clients_get_tokens_that_verify_against_the_discovered_jwks() {
    let idp = Idp::start().await;
    assert!(idp.issuer().starts_with("http://127.0.0.1:"));
    idp.add_client(json!({
        "client_id": "team-a",
        "client_secret": "team-a-secret",
        "access_token_claims": {
            "roles": ["OpenAI.TeamA"], "tid": "tenant-1", "azp": "team-a-app", "oid": "oid-a"
        },
    }))
    .await;
    idp.add_client(json!({
        "client_id": "team-b",
        "client_secret": "team-b secret/+&=",
        "token_endpoint_auth_method": "client_secret_post",
        "access_token_alg": "ES256",
        "access_token_header": { "typ": "JWT" },
        "access_token_claims": { "sub": "oid-b", "client_id": null },
        "access_token_scopes": "chat",
    }))
    .await;

    let a = idp
        .token("team-a", "team-a-secret", API, Some("chat embeddings"))
        .await;
    let (header, claims) = verify(&idp, &a, API).await;
    assert_eq!(header.alg, Algorithm::RS256);
    assert_eq!(header.kid.as_deref(), Some("rsa-1"));
    assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    assert_eq!(claims["iss"], idp.issuer());
    assert_eq!(claims["aud"], API);
    assert_eq!(claims["client_id"], "team-a");
    assert_eq!(claims["sub"], "team-a");
    assert_eq!(claims["scope"], "chat embeddings");
    assert_eq!(claims["roles"], json!(["OpenAI.TeamA"]));
    assert_eq!(claims["tid"], "tenant-1");
    assert_eq!(claims["azp"], "team-a-app");
    assert_eq!(claims["oid"], "oid-a");
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 3600);

    // The client's scope allowlist filters what it asks for; claims may override and remove.
    let b = idp
        .token("team-b", "team-b secret/+&=", API, Some("chat embeddings"))
        .await;
    let (header, claims) = verify(&idp, &b, API).await;
    assert_eq!(header.alg, Algorithm::ES256);
    assert_eq!(header.kid.as_deref(), Some("ec-1"));
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    assert_eq!(claims["scope"], "chat");
    assert_eq!(claims["sub"], "oid-b");
    assert!(claims.get("client_id").is_none(), "{claims}");

    // Secrets are really checked.
    let (status, body) = idp
        .token_request(
            "team-a",
            "wrong",
            &[("grant_type", "client_credentials"), ("resource", API)],
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    let stats = idp.stats().await;
    assert_eq!(stats["token"], 3, "{stats}");
}

#[tokio::test]
async fn entra_style_default_scope_names_the_audience_and_ttl_is_per_client() {
    let idp = Idp::start().await;
    idp.add_client(json!({
        "client_id": "gateway", "client_secret": "s", "access_token_ttl": 30,
    }))
    .await;
    let (status, body) = idp
        .token_request(
            "gateway",
            "s",
            &[
                ("grant_type", "client_credentials"),
                ("scope", "https://cognitiveservices.azure.com/.default"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 30);
    let token = body["access_token"].as_str().unwrap();
    let (_, claims) = verify(&idp, token, "https://cognitiveservices.azure.com").await;
    assert!(claims.get("scope").is_none(), "{claims}");
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        30
    );
}

#[tokio::test]
async fn rotation_adds_a_signing_key_and_keeps_the_old_one_published() {
    let idp = Idp::start().await;
    idp.add_client(json!({ "client_id": "c", "client_secret": "s" }))
        .await;
    let old = idp.token("c", "s", API, None).await;
    assert_eq!(kids(&idp.jwks().await), ["rsa-1", "ec-1"]);

    let kid = idp.rotate("RS256").await;
    assert_eq!(kid, "rsa-2");
    assert_eq!(kids(&idp.jwks().await), ["rsa-1", "ec-1", "rsa-2"]);
    let new = idp.token("c", "s", API, None).await;
    let (header, _) = verify(&idp, &new, API).await;
    assert_eq!(header.kid.as_deref(), Some("rsa-2"));
    // The old token still verifies while its key is published; the client survived the
    // provider rebuild.
    let (header, _) = verify(&idp, &old, API).await;
    assert_eq!(header.kid.as_deref(), Some("rsa-1"));

    idp.unpublish("rsa-1").await;
    assert_eq!(kids(&idp.jwks().await), ["ec-1", "rsa-2"]);
    let keys = idp.keys().await;
    let rsa1 = keys.iter().find(|k| k.kid == "rsa-1").unwrap();
    assert!(!rsa1.published && !rsa1.active);
    idp.publish("rsa-1").await;
    assert_eq!(kids(&idp.jwks().await), ["rsa-1", "ec-1", "rsa-2"]);

    // A key can be published ahead of use, then activated.
    let next = idp.add_key("ES256", false).await;
    assert!(kids(&idp.jwks().await).contains(&next));
    idp.add_client(json!({ "client_id": "e", "client_secret": "s", "access_token_alg": "ES256" }))
        .await;
    let t = idp.token("e", "s", API, None).await;
    assert_eq!(decode_unverified(&t).0["kid"], "ec-1");
    idp.activate(&next).await;
    let t = idp.token("e", "s", API, None).await;
    let (header, _) = verify(&idp, &t, API).await;
    assert_eq!(header.kid.as_deref(), Some(next.as_str()));
}

#[tokio::test]
async fn outage_counters_and_cache_control() {
    let idp = Idp::start().await;
    let http = common::http();
    let status = |url: String| {
        let http = http.clone();
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    let discovery = format!("{}/.well-known/openid-configuration", idp.issuer());
    idp.add_client(json!({ "client_id": "c", "client_secret": "s" }))
        .await;

    idp.reset_stats().await;
    idp.jwks().await;
    idp.jwks().await;
    idp.discovery().await;
    assert_eq!(
        idp.stats().await,
        json!({ "discovery": 1, "jwks": 2, "token": 0 })
    );

    idp.set_down(true).await;
    assert_eq!(status(idp.jwks_uri()).await, 503);
    assert_eq!(status(discovery.clone()).await, 503);
    // The token endpoint keeps working: tests can still take tokens during the outage.
    idp.token("c", "s", API, None).await;
    assert_eq!(
        idp.stats().await,
        json!({ "discovery": 2, "jwks": 3, "token": 1 })
    );
    idp.set_down(false).await;
    assert_eq!(status(idp.jwks_uri()).await, 200);
    assert_eq!(status(discovery).await, 200);

    // The token endpoint can fail too (with any status), for token-refresh tests.
    idp.set_outage(&["token"], 429).await;
    let (s, body) = idp
        .token_request(
            "c",
            "s",
            &[("grant_type", "client_credentials"), ("resource", API)],
        )
        .await;
    assert_eq!(
        (s, body["error"].as_str()),
        (429, Some("temporarily_unavailable"))
    );
    assert_eq!(status(idp.jwks_uri()).await, 200);
    idp.set_down(false).await;

    idp.reset_stats().await;
    assert_eq!(
        idp.stats().await,
        json!({ "discovery": 0, "jwks": 0, "token": 0 })
    );

    let cache_control = |resp: reqwest::Response| {
        resp.headers()
            .get("cache-control")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(
        cache_control(http.get(idp.jwks_uri()).send().await.unwrap()),
        None
    );
    idp.set_jwks_max_age(Some(300)).await;
    assert_eq!(
        cache_control(http.get(idp.jwks_uri()).send().await.unwrap()).as_deref(),
        Some("max-age=300")
    );
}

#[tokio::test]
async fn forged_tokens_carry_the_idp_signatures() {
    let idp = Idp::start().await;
    let mut claims = idp.claims("forger", API);
    claims["roles"] = json!(["OpenAI.Admin"]);

    for (kid, alg) in [("rsa-1", "RS256"), ("ec-1", "ES256")] {
        let header = json!({ "alg": alg, "typ": "at+jwt", "kid": kid });
        let token = idp.forge(header, claims.clone()).await;
        let (h, c) = verify(&idp, &token, API).await;
        assert_eq!(h.kid.as_deref(), Some(kid));
        assert_eq!(c, claims);
    }

    // Header and claims are serialized exactly as given.
    let header = json!({ "typ": "JWT", "alg": "RS256" });
    let token = idp
        .forge_with("rsa-1", header.clone(), claims.clone())
        .await;
    assert_eq!(decode_unverified(&token), (header, claims.clone()));

    // HS256 with the RSA public key as the secret (the algorithm-confusion attack).
    let token = idp
        .forge(json!({ "alg": "HS256", "kid": "rsa-1" }), claims.clone())
        .await;
    let rsa1 = idp
        .keys()
        .await
        .into_iter()
        .find(|k| k.kid == "rsa-1")
        .unwrap();
    let again = sign_token(
        &json!({ "alg": "HS256", "kid": "rsa-1" }),
        &claims,
        &EncodingKey::from_secret(rsa1.public_pem.as_bytes()),
        Algorithm::HS256,
    );
    assert_eq!(token, again);
    assert_eq!(idp.signing_keys().await.len(), 2);

    let none = unsigned_token(&json!({ "alg": "none" }), &claims, b"");
    assert!(none.ends_with('.'));
    assert_eq!(decode_unverified(&none).0["alg"], "none");
    let zero = unsigned_token(&json!({ "alg": "ES256", "kid": "ec-1" }), &claims, &[0; 64]);
    let sig = zero.rsplit('.').next().unwrap();
    assert_eq!(URL_SAFE_NO_PAD.decode(sig).unwrap(), [0; 64]);
}

/// A client-credentials request authenticated by a client assertion.
async fn request(idp: &Idp, assertion: &str) -> (u16, Value) {
    idp.token_request(
        "gw-cert",
        "",
        &[
            ("grant_type", "client_credentials"),
            ("scope", "https://cognitiveservices.azure.com/.default"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
        ],
    )
    .await
}

/// What the Entra backend-identity tests need: a private_key_jwt client whose assertions the
/// IdP verifies for real, with jti replay refusal and a lifetime cap.
#[tokio::test]
async fn private_key_jwt_assertions_are_verified_and_not_replayable() {
    let idp = Idp::start().await;
    let key = rcgen::KeyPair::generate().unwrap(); // EC P-256
    let point = key.public_key_raw(); // 0x04 || x || y
    let jwk = json!({
        "kty": "EC", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    });
    idp.add_client(json!({
        "client_id": "gw-cert",
        "token_endpoint_auth_method": "private_key_jwt",
        "jwks": { "keys": [jwk] },
        "assertion_max_age": 600,
        "access_token_claims": { "oid": "gw-oid", "tid": "tenant-1" },
    }))
    .await;
    let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let assertion = |lifetime: u64| {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = json!({
            "iss": "gw-cert", "sub": "gw-cert", "aud": idp.token_endpoint(),
            "jti": uuid::Uuid::new_v4().to_string(), "iat": now, "nbf": now, "exp": now + lifetime,
        });
        sign_token(
            &json!({ "alg": "ES256", "typ": "JWT", "x5t#S256": "thumbprint" }),
            &claims,
            &signing,
            Algorithm::ES256,
        )
    };
    let a = assertion(300);
    let (status, body) = request(&idp, &a).await;
    assert_eq!(status, 200, "{body}");
    let (_, claims) = verify(
        &idp,
        body["access_token"].as_str().unwrap(),
        "https://cognitiveservices.azure.com",
    )
    .await;
    assert_eq!(
        (claims["oid"].as_str(), claims["sub"].as_str()),
        (Some("gw-oid"), Some("gw-cert"))
    );

    let (status, body) = request(&idp, &a).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    let last = idp.token_requests().await.pop().unwrap();
    assert_eq!(last["params"]["client_assertion"], a.as_str());
    let detail = last["error_detail"].as_str().unwrap();
    assert!(detail.contains("only be used once"), "{detail}");

    let (status, _) = request(&idp, &assertion(3600)).await;
    assert_eq!(status, 401);
    let detail = idp.token_requests().await.pop().unwrap()["error_detail"].clone();
    assert!(
        detail.as_str().unwrap().contains("at most 600s"),
        "{detail}"
    );
}

/// A self-signed certificate and its private key (PKCS#8 PEM), as a gateway would hold them.
struct Cert {
    pem: String,
    der: Vec<u8>,
    key_pem: String,
}

fn cert(alg: &'static rcgen::SignatureAlgorithm) -> Cert {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["gateway.portcullis.test".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    Cert {
        pem: cert.pem(),
        der: cert.der().to_vec(),
        key_pem: key.serialize_pem(),
    }
}

/// An Entra-style client assertion (RFC 7523): iss = sub = client_id, aud = the token
/// endpoint, a fresh jti, 5 minutes of life; the certificate named by `x5t#S256`.
fn client_assertion(idp: &Idp, client_id: &str, alg: Algorithm, cert: &Cert) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = json!({
        "iss": client_id, "sub": client_id, "aud": idp.token_endpoint(),
        "jti": uuid::Uuid::new_v4().to_string(), "iat": now, "nbf": now, "exp": now + 300,
    });
    let thumbprint = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &cert.der);
    let header = json!({
        "alg": format!("{alg:?}"), "typ": "JWT",
        "x5t#S256": URL_SAFE_NO_PAD.encode(thumbprint.as_ref()),
    });
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(cert.key_pem.as_bytes()),
        _ => EncodingKey::from_rsa_pem(cert.key_pem.as_bytes()),
    }
    .unwrap();
    sign_token(&header, &claims, &key, alg)
}

/// Client credentials for `api://backend/.default`, authenticated by `assertion`.
async fn assertion_request(idp: &Idp, client_id: &str, assertion: &str) -> (u16, Value) {
    idp.token_request(
        client_id,
        "",
        &[
            ("grant_type", "client_credentials"),
            ("scope", "api://backend/.default"),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion),
        ],
    )
    .await
}

/// Certificates registered with `jwks_pem` (what `add_cert_client` sends): RS256, PS256 and
/// ES256 assertions signed with the certificate's key get tokens for the `.default` scope's
/// resource, and each assertion works once.
#[tokio::test]
async fn certificate_clients_sign_rs256_ps256_and_es256_assertions() {
    let idp = Idp::start().await;
    let rsa = cert(&rcgen::PKCS_RSA_SHA256);
    let ec = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
    idp.add_cert_client("gw-rsa", &[&rsa.pem], Value::Null)
        .await;
    idp.add_cert_client(
        "gw-ec",
        &[ec.pem.as_str()],
        json!({ "assertion_max_age": 600 }),
    )
    .await;

    for (client, alg, cert) in [
        ("gw-rsa", Algorithm::RS256, &rsa),
        ("gw-rsa", Algorithm::PS256, &rsa),
        ("gw-ec", Algorithm::ES256, &ec),
    ] {
        let a = client_assertion(&idp, client, alg, cert);
        let (status, body) = assertion_request(&idp, client, &a).await;
        assert_eq!(status, 200, "{client} {alg:?}: {body}");
        let token = body["access_token"].as_str().unwrap();
        let (_, claims) = verify(&idp, token, "api://backend").await;
        assert_eq!(claims["sub"], client);
        assert_eq!(claims["client_id"], client);

        let (status, body) = assertion_request(&idp, client, &a).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client")),
            "{client} {alg:?}: a replayed assertion"
        );
        let detail = last_error_detail(&idp).await;
        assert!(detail.contains("only be used once"), "{detail}");
    }

    // The registered JWK is the certificate's public key: another key is refused, and so is
    // an assertion for one client signed with another's certificate.
    let other = cert(&rcgen::PKCS_RSA_SHA256);
    for (client, alg, cert, why) in [
        (
            "gw-rsa",
            Algorithm::RS256,
            &other,
            "signature verification failed",
        ),
        ("gw-rsa", Algorithm::ES256, &ec, NO_KEY),
        ("gw-ec", Algorithm::RS256, &rsa, NO_KEY),
    ] {
        let a = client_assertion(&idp, client, alg, cert);
        let (status, _) = assertion_request(&idp, client, &a).await;
        assert_eq!(status, 401, "{client} {alg:?}");
        assert_eq!(last_error_detail(&idp).await, why, "{client} {alg:?}");
    }
}

/// oidc-provider's reason when no registered key fits the assertion's `alg` and `kid`.
const NO_KEY: &str = "no applicable key found in the JSON Web Key Set";

/// The `error_detail` of the IdP's last token request.
async fn last_error_detail(idp: &Idp) -> String {
    let last = idp.token_requests().await.pop().unwrap();
    last["error_detail"].as_str().unwrap_or_default().to_owned()
}

/// `jwks_alg` pins the keys' alg; `jwks_kid` names them (a `kid` in the assertion header must
/// then match); SPKI public keys work like certificates.
#[tokio::test]
async fn certificate_clients_with_pinned_alg_kid_and_spki_keys() {
    let idp = Idp::start().await;
    let rsa = cert(&rcgen::PKCS_RSA_SHA256);
    idp.add_cert_client("gw-ps", &[&rsa.pem], json!({ "jwks_alg": "PS256" }))
        .await;
    let a = client_assertion(&idp, "gw-ps", Algorithm::RS256, &rsa);
    assert_eq!(assertion_request(&idp, "gw-ps", &a).await.0, 401);
    assert_eq!(last_error_detail(&idp).await, NO_KEY);
    let a = client_assertion(&idp, "gw-ps", Algorithm::PS256, &rsa);
    assert_eq!(assertion_request(&idp, "gw-ps", &a).await.0, 200);

    // A header kid only matches a JWK with that kid.
    let ec = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
    let with_kid = |client: &str, kid: &str| {
        let (mut header, claims) =
            decode_unverified(&client_assertion(&idp, client, Algorithm::ES256, &ec));
        header["kid"] = json!(kid);
        let key = EncodingKey::from_ec_pem(ec.key_pem.as_bytes()).unwrap();
        sign_token(&header, &claims, &key, Algorithm::ES256)
    };
    idp.add_cert_client("gw-ec", &[&ec.pem], Value::Null).await;
    let (status, _) = assertion_request(&idp, "gw-ec", &with_kid("gw-ec", "cert-1")).await;
    assert_eq!(status, 401);
    assert_eq!(last_error_detail(&idp).await, NO_KEY);
    idp.add_cert_client("gw-ec-kid", &[&ec.pem], json!({ "jwks_kid": ["cert-1"] }))
        .await;
    let (status, body) =
        assertion_request(&idp, "gw-ec-kid", &with_kid("gw-ec-kid", "cert-1")).await;
    assert_eq!(status, 200, "{body}");
    let a = client_assertion(&idp, "gw-ec-kid", Algorithm::ES256, &ec);
    assert_eq!(assertion_request(&idp, "gw-ec-kid", &a).await.0, 200);

    // An SPKI public key instead of a certificate; several keys per client.
    let spki = rcgen::KeyPair::from_pem(&ec.key_pem)
        .unwrap()
        .public_key_pem();
    idp.add_cert_client("gw-spki", &[rsa.pem.as_str(), &spki], Value::Null)
        .await;
    for alg in [Algorithm::ES256, Algorithm::RS256] {
        let cert = if alg == Algorithm::ES256 { &ec } else { &rsa };
        let a = client_assertion(&idp, "gw-spki", alg, cert);
        assert_eq!(
            assertion_request(&idp, "gw-spki", &a).await.0,
            200,
            "{alg:?}"
        );
    }

    // Malformed registrations are refused with the reason.
    let resp = common::http()
        .post(format!("{}/__test/clients", idp.issuer()))
        .json(&json!({
            "client_id": "bad", "token_endpoint_auth_method": "private_key_jwt",
            "jwks_pem": ["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("jwks_pem[0]"),
        "{body}"
    );
}

/// Secret clients, basic and post, with Entra's `.default` scope.
#[tokio::test]
async fn secret_clients_basic_and_post_with_a_default_scope() {
    let idp = Idp::start().await;
    idp.add_client(json!({ "client_id": "gw-basic", "client_secret": "s3cret/+=" }))
        .await;
    idp.add_client(json!({
        "client_id": "gw-post", "client_secret": "s3cret/+=",
        "token_endpoint_auth_method": "client_secret_post",
    }))
    .await;
    let params = [
        ("grant_type", "client_credentials"),
        ("scope", "api://backend/.default"),
    ];
    for client in ["gw-basic", "gw-post"] {
        let (status, body) = idp.token_request(client, "s3cret/+=", &params).await;
        assert_eq!(status, 200, "{client}: {body}");
        assert_eq!(body["token_type"], "Bearer");
        let (_, claims) = verify(
            &idp,
            body["access_token"].as_str().unwrap(),
            "api://backend",
        )
        .await;
        assert_eq!(claims["client_id"], client);
        let (status, _) = idp.token_request(client, "wrong", &params).await;
        assert_eq!(status, 401, "{client}");
    }
    let seen = idp.token_requests().await;
    assert_eq!(seen[0]["auth_scheme"], "Basic");
    assert_eq!(seen[2]["auth_scheme"], Value::Null);
    assert_eq!(seen[2]["params"]["client_secret"], "s3cret/+=");
}

/// The IdP exits on its own when its stdin closes, so a test killed mid-run leaves nothing
/// behind.
#[tokio::test]
async fn the_idp_exits_when_stdin_closes() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/idp/idp.mjs");
    let node = std::env::var("PORTCULLIS_TEST_NODE").unwrap_or_else(|_| "node".to_owned());
    let mut child = tokio::process::Command::new(node)
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(30), stdout.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let ready: Value = serde_json::from_str(&line).unwrap();
    assert!(ready["port"].as_u64().is_some(), "{line}");

    drop(child.stdin.take());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the IdP is still running 10 s after its stdin closed")
        .unwrap();
    assert!(status.success(), "{status}");
}
