//! A minimal embedded token issuer for `portcullis demo` and the micro-benchmarks: an ES256
//! and an RS256 key generated at start, an OpenID discovery document and a JWKS on loopback,
//! a way to sign access tokens with either, and a client-credentials token endpoint for one
//! confidential client (the gateway itself, as Entra's token endpoint would serve it).
//!
//! The gateway validates its tokens exactly as it validates Entra ID's or Okta's: it
//! discovers the JWKS, fetches it and checks every claim; and it obtains its backend token
//! from `/token` exactly as from Entra (`entra_secret`). (The test suite uses a real OpenID
//! provider instead; this exists so the demo needs no network and no IdP.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};
use base64::Engine as _;
use bytes::Bytes;
use http::{Request, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::error::json_response;
use crate::listener::{self, ServeOptions};

/// Why the issuer could not start.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("cannot generate the signing key")]
    Key,
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot sign")]
    Sign,
}

/// Which of the issuer's keys signs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlg {
    Es256,
    Rs256,
}

/// The client the token endpoint serves (the gateway, in the demo).
pub const DEMO_GATEWAY_CLIENT: &str = "portcullis-gateway";
/// Lifetime of tokens from the token endpoint.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Largest token request read.
const MAX_FORM_BYTES: usize = 8 * 1024;

/// The issuer's keys and name, shared with its HTTP handlers.
struct Keys {
    issuer: String,
    ec_kid: String,
    ec: EcdsaKeyPair,
    rsa_kid: String,
    rsa: RsaKeyPair,
    /// The secret of [`DEMO_GATEWAY_CLIENT`].
    client_secret: String,
}

/// A running demo issuer.
pub struct DemoIssuer {
    pub addr: SocketAddr,
    keys: Arc<Keys>,
    stop: Option<oneshot::Sender<()>>,
}

impl DemoIssuer {
    /// Generate a key and serve discovery and JWKS on 127.0.0.1.
    pub async fn start() -> Result<Self, IssuerError> {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| IssuerError::Key)?;
        let ec = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
            .map_err(|_| IssuerError::Key)?;
        let rsa = RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| IssuerError::Key)?;
        // Uncompressed point: 0x04 || x (32) || y (32).
        let point = ec.public_key().as_ref();
        if point.len() != 65 {
            return Err(IssuerError::Key);
        }
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let ec_kid = format!("demo-ec-{}", &tag[..8]);
        let rsa_kid = format!("demo-rsa-{}", &tag[..8]);
        let public = rsa.public_key();
        let jwks = serde_json::json!({ "keys": [
            {
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": ec_kid,
                "x": b64(&point[1..33]), "y": b64(&point[33..65]),
            },
            {
                "kty": "RSA", "use": "sig", "alg": "RS256", "kid": rsa_kid,
                "n": b64(public.modulus().big_endian_without_leading_zero()),
                "e": b64(public.exponent().big_endian_without_leading_zero()),
            },
        ]});
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let issuer = format!("http://{addr}");
        let discovery = serde_json::json!({
            "issuer": issuer,
            "jwks_uri": format!("{issuer}/jwks"),
            "token_endpoint": format!("{issuer}/token"),
            "id_token_signing_alg_values_supported": ["ES256"],
        });
        let docs = Arc::new((
            Bytes::from(discovery.to_string()),
            Bytes::from(jwks.to_string()),
        ));
        let keys = Arc::new(Keys {
            issuer,
            ec_kid,
            ec,
            rsa_kid,
            rsa,
            client_secret: format!(
                "demo-{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ),
        });
        let shared = keys.clone();
        let svc = move |req: Request<Incoming>, _peer| {
            let docs = docs.clone();
            let keys = shared.clone();
            async move {
                match req.uri().path() {
                    "/.well-known/openid-configuration" => {
                        json_response(StatusCode::OK, docs.0.clone())
                    }
                    "/jwks" => json_response(StatusCode::OK, docs.1.clone()),
                    "/token" if req.method() == http::Method::POST => {
                        let (status, body) = token_endpoint(&keys, req).await;
                        json_response(status, Bytes::from(body.to_string()))
                    }
                    _ => json_response(StatusCode::NOT_FOUND, Bytes::from_static(b"{}")),
                }
            }
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let opts = ServeOptions {
            drain_timeout: Duration::from_millis(100),
            ..ServeOptions::default()
        };
        tokio::spawn(listener::serve(listener, svc, opts, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            addr,
            keys,
            stop: Some(stop),
        })
    }

    /// The issuer URL (`iss`).
    pub fn issuer(&self) -> String {
        self.keys.issuer.clone()
    }

    /// The client-credentials token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.keys.issuer)
    }

    /// The secret of [`DEMO_GATEWAY_CLIENT`] at the token endpoint.
    pub fn client_secret(&self) -> &str {
        &self.keys.client_secret
    }

    /// Sign an access token for `audience` carrying `claims` (plus `iss`, `aud`, `iat`,
    /// `nbf`, `exp` = now + `lifetime`).
    pub fn sign(
        &self,
        audience: &str,
        lifetime: Duration,
        claims: serde_json::Value,
    ) -> Result<String, IssuerError> {
        self.sign_with(SigningAlg::Es256, audience, lifetime, claims)
    }

    /// [`DemoIssuer::sign`] with the chosen key.
    pub fn sign_with(
        &self,
        alg: SigningAlg,
        audience: &str,
        lifetime: Duration,
        claims: serde_json::Value,
    ) -> Result<String, IssuerError> {
        self.keys.sign(alg, audience, lifetime, claims)
    }

    /// Stop serving.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Keys {
    fn sign(
        &self,
        alg: SigningAlg,
        audience: &str,
        lifetime: Duration,
        claims: serde_json::Value,
    ) -> Result<String, IssuerError> {
        let now = jsonwebtoken::get_current_timestamp();
        let mut body = serde_json::json!({
            "iss": self.issuer,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + lifetime.as_secs(),
        });
        if let (Some(b), serde_json::Value::Object(extra)) = (body.as_object_mut(), claims) {
            b.extend(extra);
        }
        let (name, kid) = match alg {
            SigningAlg::Es256 => ("ES256", &self.ec_kid),
            SigningAlg::Rs256 => ("RS256", &self.rsa_kid),
        };
        let header = serde_json::json!({ "alg": name, "typ": "at+jwt", "kid": kid });
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(body.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let signature = match alg {
            SigningAlg::Es256 => self
                .ec
                .sign(&rng, input.as_bytes())
                .map_err(|_| IssuerError::Sign)?
                .as_ref()
                .to_vec(),
            SigningAlg::Rs256 => {
                let mut sig = vec![0; self.rsa.public_modulus_len()];
                self.rsa
                    .sign(&RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut sig)
                    .map_err(|_| IssuerError::Sign)?;
                sig
            }
        };
        Ok(format!("{input}.{}", b64(&signature)))
    }
}

/// `POST /token`: the client-credentials grant for [`DEMO_GATEWAY_CLIENT`], with the secret
/// in the form (as Entra takes it) and the audience named by a `{resource}/.default` scope.
/// Answers and errors are shaped like Entra's.
async fn token_endpoint(keys: &Keys, req: Request<Incoming>) -> (StatusCode, serde_json::Value) {
    use http_body_util::BodyExt as _;
    let error = |status, code: &str, aadsts: u64, what: &str| {
        (
            status,
            serde_json::json!({
                "error": code,
                "error_description": format!("AADSTS{aadsts}: {what}"),
                "error_codes": [aadsts],
            }),
        )
    };
    let limited = http_body_util::Limited::new(req.into_body(), MAX_FORM_BYTES);
    let Ok(body) = limited.collect().await.map(|b| b.to_bytes()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            900144,
            "the request body could not be read",
        );
    };
    let form: std::collections::HashMap<String, String> =
        form_urlencoded::parse(&body).into_owned().collect();
    let field = |k: &str| form.get(k).map(String::as_str);
    if field("grant_type") != Some("client_credentials") {
        return error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "only client_credentials is supported",
        );
    }
    let secret_ok = field("client_secret").is_some_and(|s| {
        subtle::ConstantTimeEq::ct_eq(s.as_bytes(), keys.client_secret.as_bytes()).into()
    });
    if field("client_id") != Some(DEMO_GATEWAY_CLIENT) || !secret_ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "invalid client secret provided",
        );
    }
    let Some(resource) = field("scope").and_then(|s| s.strip_suffix("/.default")) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            "the scope must be {resource}/.default",
        );
    };
    let claims = serde_json::json!({
        "sub": DEMO_GATEWAY_CLIENT, "appid": DEMO_GATEWAY_CLIENT, "azp": DEMO_GATEWAY_CLIENT,
        "idtyp": "app", "jti": uuid::Uuid::new_v4().to_string(),
    });
    match keys.sign(SigningAlg::Es256, resource, TOKEN_LIFETIME, claims) {
        Ok(token) => (
            StatusCode::OK,
            serde_json::json!({
                "token_type": "Bearer",
                "expires_in": TOKEN_LIFETIME.as_secs(),
                "ext_expires_in": TOKEN_LIFETIME.as_secs(),
                "access_token": token,
            }),
        ),
        Err(_) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            50000,
            "signing failed",
        ),
    }
}

impl Drop for DemoIssuer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(issuer: &DemoIssuer, form: &[(&str, &str)]) -> (u16, serde_json::Value) {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let resp = reqwest::Client::new()
            .post(issuer.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    }

    #[tokio::test]
    async fn token_endpoint_serves_only_its_client() {
        let issuer = DemoIssuer::start().await.unwrap();
        let secret = issuer.client_secret().to_owned();
        let scope = "https://cognitiveservices.azure.com/.default";
        let good = [
            ("grant_type", "client_credentials"),
            ("client_id", DEMO_GATEWAY_CLIENT),
            ("client_secret", secret.as_str()),
            ("scope", scope),
        ];
        let (status, body) = post(&issuer, &good).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "Bearer");
        let token = body["access_token"].as_str().unwrap();
        let payload = token.split('.').nth(1).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["aud"], "https://cognitiveservices.azure.com");
        assert_eq!(claims["appid"], DEMO_GATEWAY_CLIENT);

        let mut wrong = good;
        wrong[2].1 = "guess";
        let (status, body) = post(&issuer, &wrong).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client"))
        );
        let mut grant = good;
        grant[0].1 = "password";
        assert_eq!(post(&issuer, &grant).await.0, 400);
        let mut no_scope = good;
        no_scope[3].1 = "openid";
        assert_eq!(post(&issuer, &no_scope).await.1["error"], "invalid_scope");
    }
}
