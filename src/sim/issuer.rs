//! A minimal embedded token issuer for `portcullis demo` and the micro-benchmarks: an ES256
//! and an RS256 key generated at start, an OpenID discovery document and a JWKS on loopback,
//! and a way to sign access tokens with either.
//!
//! The gateway validates its tokens exactly as it validates Entra ID's or Okta's: it
//! discovers the JWKS, fetches it and checks every claim. (The test suite uses a real
//! OpenID provider instead; this exists so the demo needs no network and no IdP.)

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

/// A running demo issuer.
pub struct DemoIssuer {
    pub addr: SocketAddr,
    ec_kid: String,
    ec: EcdsaKeyPair,
    rsa_kid: String,
    rsa: RsaKeyPair,
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
            "id_token_signing_alg_values_supported": ["ES256"],
        });
        let docs = Arc::new((
            Bytes::from(discovery.to_string()),
            Bytes::from(jwks.to_string()),
        ));
        let svc = move |req: Request<Incoming>| {
            let docs = docs.clone();
            async move {
                match req.uri().path() {
                    "/.well-known/openid-configuration" => {
                        json_response(StatusCode::OK, docs.0.clone())
                    }
                    "/jwks" => json_response(StatusCode::OK, docs.1.clone()),
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
            ec_kid,
            ec,
            rsa_kid,
            rsa,
            stop: Some(stop),
        })
    }

    /// The issuer URL (`iss`).
    pub fn issuer(&self) -> String {
        format!("http://{}", self.addr)
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
        let now = jsonwebtoken::get_current_timestamp();
        let mut body = serde_json::json!({
            "iss": self.issuer(),
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

    /// Stop serving.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

impl Drop for DemoIssuer {
    fn drop(&mut self) {
        self.stop();
    }
}
