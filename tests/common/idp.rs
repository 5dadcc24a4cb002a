//! A real OpenID provider for the tests: `oidc-provider` from npm, run by
//! `tests/idp/idp.mjs` (installed by `scripts/test.sh`; by hand: `npm ci --prefix tests/idp`).
//!
//! [`Idp::start`] spawns it on an ephemeral loopback port. Tests register their own clients,
//! take real access tokens over the real `client_credentials` grant, rotate and unpublish
//! signing keys, switch discovery/JWKS (or the token endpoint) off, read request counters, and
//! forge tokens with the IdP's own private keys. The control API is in `tests/idp/README.md`.
//!
//! The node process dies with the [`Idp`] (kill on drop) and also when the test process dies
//! (it exits when its stdin closes). `PORTCULLIS_TEST_NODE` overrides the `node` binary.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// How long node may take to print its ready line (cold start under a loaded test run; an
/// idle machine takes under a second).
const START_DEADLINE: Duration = Duration::from_secs(15);
/// Node processes started before giving up.
const START_ATTEMPTS: u32 = 3;

/// One signing key of the IdP, private parts included.
#[derive(Debug, Clone)]
pub struct IdpKey {
    pub kid: String,
    /// The JWS alg it signs with: `RS256`, `PS256`, `ES256` or `ES384`.
    pub alg: String,
    /// `RSA` or `EC`.
    pub kty: String,
    /// In the JWKS (see [`Idp::unpublish`]).
    pub published: bool,
    /// Signs new access tokens of its alg.
    pub active: bool,
    /// PKCS#8 PEM.
    pub private_pem: String,
    /// SPKI PEM.
    pub public_pem: String,
    /// The JWK as the JWKS publishes it.
    pub public_jwk: Value,
}

/// A running IdP; the node process is killed when this is dropped.
pub struct Idp {
    issuer: String,
    jwks_uri: String,
    token_endpoint: String,
    http: reqwest::Client,
    /// client_id → token_endpoint_auth_method, so [`Idp::token`] authenticates as registered.
    auth_methods: Mutex<HashMap<String, String>>,
    _stdin: ChildStdin,
    _stdout: BufReader<ChildStdout>,
    _child: Child,
}

impl Idp {
    /// Spawn the IdP and wait (with a deadline) for its ready line.
    pub async fn start() -> Idp {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/idp");
        assert!(
            dir.join("node_modules/oidc-provider").is_dir(),
            "the test IdP is not installed: run scripts/test.sh, or `npm ci --prefix tests/idp`"
        );
        let node = std::env::var("PORTCULLIS_TEST_NODE").unwrap_or_else(|_| "node".to_owned());
        // A node process that prints nothing within the deadline (seen twice in hundreds of
        // starts, on an idle machine) is killed and replaced, a bounded number of times.
        let mut attempt = 0;
        let (child, stdin, stdout, line) = loop {
            attempt += 1;
            let mut child = tokio::process::Command::new(&node)
                .arg(dir.join("idp.mjs"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run `{node}` (set PORTCULLIS_TEST_NODE): {e}"));
            let stdin = child.stdin.take().unwrap();
            let mut stdout = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            match tokio::time::timeout(START_DEADLINE, stdout.read_line(&mut line)).await {
                Ok(Ok(n)) if n > 0 => break (child, stdin, stdout, line),
                Ok(r) => panic!("the IdP exited before it was ready ({r:?}); its stderr is above"),
                Err(_) if attempt < START_ATTEMPTS => {
                    eprintln!("the IdP printed no ready line within {START_DEADLINE:?}; starting another");
                    let _ = child.kill().await;
                }
                Err(_) => panic!(
                    "the IdP printed no ready line within {START_DEADLINE:?}, {START_ATTEMPTS} times"
                ),
            }
        };
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("bad IdP ready line {line:?}: {e}"));
        let field = |k: &str| ready[k].as_str().unwrap().to_owned();
        Idp {
            issuer: field("issuer"),
            jwks_uri: field("jwks_uri"),
            token_endpoint: field("token_endpoint"),
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            auth_methods: Mutex::new(HashMap::new()),
            _stdin: stdin,
            _stdout: stdout,
            _child: child,
        }
    }

    /// `http://127.0.0.1:PORT` (no trailing slash), the `iss` of every token.
    pub fn issuer(&self) -> String {
        self.issuer.clone()
    }

    /// The `jwks_uri` the discovery document names.
    pub fn jwks_uri(&self) -> String {
        self.jwks_uri.clone()
    }

    /// The `token_endpoint` the discovery document names (also the `aud` of client
    /// assertions).
    pub fn token_endpoint(&self) -> String {
        self.token_endpoint.clone()
    }

    /// The discovery document (`/.well-known/openid-configuration`); panics unless 200.
    pub async fn discovery(&self) -> Value {
        let url = format!("{}/.well-known/openid-configuration", self.issuer);
        self.get_ok(&url).await
    }

    /// The JWKS as published; panics unless 200.
    pub async fn jwks(&self) -> Value {
        self.get_ok(&self.jwks_uri).await
    }

    /// Register (or replace) a client. `client` is oidc-provider client metadata —
    /// `client_id`, `client_secret`, `token_endpoint_auth_method` (`client_secret_basic`,
    /// the default, `client_secret_post` or `private_key_jwt` with `jwks`, or `jwks_pem`: see
    /// [`Idp::add_cert_client`]) — plus the IdP's
    /// extras for its access tokens: `access_token_alg` (`RS256` default, `PS256`, `ES256`,
    /// `ES384`), `access_token_claims` (merged last into the payload; `null` removes a
    /// claim), `access_token_header` (e.g. `{"typ":"JWT"}`), `access_token_ttl` (seconds),
    /// `access_token_scopes` (space-separated allowlist), `assertion_max_age` (seconds,
    /// private_key_jwt).
    /// `grant_types` defaults to `["client_credentials"]`. Panics if the IdP refuses it.
    pub async fn add_client(&self, client: Value) {
        let id = client["client_id"].as_str().unwrap().to_owned();
        let method = client["token_endpoint_auth_method"]
            .as_str()
            .unwrap_or("client_secret_basic")
            .to_owned();
        self.control("POST", "/__test/clients", Some(client)).await;
        self.auth_methods.lock().unwrap().insert(id, method);
    }

    /// Register (or replace) a `private_key_jwt` client whose keys are the public keys of
    /// `pems` (PEM certificates, as Entra registers them, or SPKI public keys). `extra` is
    /// merged in last (`null` or an object): more client metadata, the IdP's extras, or
    /// `jwks_alg` / `jwks_kid` to put an `alg` / `kid` on the keys (see tests/idp/README.md;
    /// without `jwks_kid` an assertion whose header names a `kid` matches no key).
    pub async fn add_cert_client(&self, client_id: &str, pems: &[impl AsRef<str>], extra: Value) {
        let mut client = serde_json::json!({
            "client_id": client_id,
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks_pem": pems.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
        });
        match extra {
            Value::Null => {}
            Value::Object(extra) => client.as_object_mut().unwrap().extend(extra),
            other => panic!("add_cert_client: extra must be an object or null, not {other}"),
        }
        self.add_client(client).await;
    }

    /// Remove a client; its tokens stay valid (they are self-contained JWTs).
    pub async fn remove_client(&self, client_id: &str) {
        let path = format!("/__test/clients/{}", form_encode(client_id));
        self.control("DELETE", &path, None).await;
    }

    /// A real `client_credentials` grant: an access token for `resource` (its `aud`),
    /// authenticated with the client's registered method (basic or post). Panics unless 200.
    pub async fn token(
        &self,
        client_id: &str,
        secret: &str,
        resource: &str,
        scope: Option<&str>,
    ) -> String {
        let mut params = vec![("grant_type", "client_credentials"), ("resource", resource)];
        if let Some(scope) = scope {
            params.push(("scope", scope));
        }
        let (status, body) = self.token_request(client_id, secret, &params).await;
        assert_eq!(status, 200, "token request for {client_id} failed: {body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// POST `params` to the token endpoint as `client_id`, authenticated as registered
    /// (basic, post; for `private_key_jwt` only `client_id` is added, the assertion is up to
    /// `params`); the status and JSON body, whatever they are.
    pub async fn token_request(
        &self,
        client_id: &str,
        secret: &str,
        params: &[(&str, &str)],
    ) -> (u16, Value) {
        let method = self.auth_methods.lock().unwrap().get(client_id).cloned();
        let mut params = params.to_vec();
        let mut req = self.http.post(&self.token_endpoint);
        match method.as_deref() {
            Some("client_secret_post") => {
                params.push(("client_id", client_id));
                params.push(("client_secret", secret));
            }
            // The assertion (if any) is in `params`; `secret` is not used.
            Some("private_key_jwt" | "none") => params.push(("client_id", client_id)),
            _ => {
                // RFC 6749 2.3.1: both halves are form-encoded before base64.
                let pair = format!("{}:{}", form_encode(client_id), form_encode(secret));
                req = req.header("authorization", format!("Basic {}", STANDARD.encode(pair)));
            }
        }
        let resp = req
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&params))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    /// Add a new key for `alg` that signs new tokens from now on; the old key stays
    /// published. Returns the new kid.
    pub async fn rotate(&self, alg: &str) -> String {
        self.add_key(alg, true).await
    }

    /// Add a key for `alg` (`RS256`, `PS256`, `ES256`, `ES384`), published at once; it signs
    /// new tokens only if `activate` (else see [`Idp::activate`]). Returns its kid.
    pub async fn add_key(&self, alg: &str, activate: bool) -> String {
        let path = format!("/__test/rotate?alg={alg}&activate={activate}");
        let v = self.control("POST", &path, None).await;
        v["kid"].as_str().unwrap().to_owned()
    }

    /// Make an existing key the one that signs new tokens of its alg.
    pub async fn activate(&self, kid: &str) {
        let path = format!("/__test/activate?kid={}", form_encode(kid));
        self.control("POST", &path, None).await;
    }

    /// Remove a key from the JWKS. The IdP keeps it: if it is still active, new tokens are
    /// signed with a kid nobody can look up.
    pub async fn unpublish(&self, kid: &str) {
        let path = format!("/__test/unpublish?kid={}", form_encode(kid));
        self.control("POST", &path, None).await;
    }

    /// Make the token endpoint wait `ms` milliseconds before answering (0: no delay).
    pub async fn set_token_delay(&self, ms: u64) {
        self.control("POST", &format!("/__test/token-delay?ms={ms}"), None)
            .await;
    }

    /// Put an unpublished key back into the JWKS.
    pub async fn publish(&self, kid: &str) {
        let path = format!("/__test/publish?kid={}", form_encode(kid));
        self.control("POST", &path, None).await;
    }

    /// `true`: discovery and the JWKS answer 503 (the token endpoint and the control API keep
    /// working). `false`: everything answers again.
    pub async fn set_down(&self, down: bool) {
        if down {
            self.set_outage(&["discovery", "jwks"], 503).await;
        } else {
            self.control("POST", "/__test/up", None).await;
        }
    }

    /// Make the named endpoints (`discovery`, `jwks`, `token`) answer `status` with an
    /// OAuth error body; the others answer normally. `set_down(false)` ends it.
    pub async fn set_outage(&self, endpoints: &[&str], status: u16) {
        let path = format!(
            "/__test/down?endpoints={}&status={status}",
            endpoints.join(",")
        );
        self.control("POST", &path, None).await;
    }

    /// Send `Cache-Control: max-age=N` with the JWKS (`None`: no Cache-Control header).
    pub async fn set_jwks_max_age(&self, max_age: Option<u64>) {
        let path = match max_age {
            Some(n) => format!("/__test/jwks-cache?max_age={n}"),
            None => "/__test/jwks-cache".to_owned(),
        };
        self.control("POST", &path, None).await;
    }

    /// Requests received since start or the last [`Idp::reset_stats`], counted also while
    /// the endpoint is down: `{"discovery": n, "jwks": n, "token": n}`.
    pub async fn stats(&self) -> Value {
        self.control("GET", "/__test/stats", None).await
    }

    /// Zero the counters and forget the recorded token requests.
    pub async fn reset_stats(&self) {
        self.control("POST", "/__test/reset-stats", None).await;
    }

    /// The last 100 token requests, oldest first: `status`, `client_id` (when
    /// authenticated), `auth_scheme` (`Basic` or null), `params` (the form, client
    /// assertion and secret included), `error`, `error_description`, and `error_detail`
    /// (oidc-provider's reason, e.g. why an assertion was refused).
    pub async fn token_requests(&self) -> Vec<Value> {
        let v = self.control("GET", "/__test/token-requests", None).await;
        v.as_array().unwrap().clone()
    }

    /// Every key the IdP holds (published or not), private parts included.
    pub async fn keys(&self) -> Vec<IdpKey> {
        let v = self.control("GET", "/__test/keys", None).await;
        let s = |k: &Value, f: &str| k[f].as_str().unwrap().to_owned();
        v.as_array()
            .unwrap()
            .iter()
            .map(|k| IdpKey {
                kid: s(k, "kid"),
                alg: s(k, "alg"),
                kty: s(k, "kty"),
                published: k["published"].as_bool().unwrap(),
                active: k["active"].as_bool().unwrap(),
                private_pem: s(k, "private_pem"),
                public_pem: s(k, "public_pem"),
                public_jwk: k["public_jwk"].clone(),
            })
            .collect()
    }

    /// `(kid, alg, PKCS#8 PEM)` of every key the IdP holds.
    pub async fn signing_keys(&self) -> Vec<(String, String, String)> {
        self.keys()
            .await
            .into_iter()
            .map(|k| (k.kid, k.alg, k.private_pem))
            .collect()
    }

    /// A token signed with the IdP key named by `header.kid`, using `header.alg`. The header
    /// and claims are serialized exactly as given. For `HS*` algs the HMAC secret is that
    /// key's public PEM (the algorithm-confusion attack).
    pub async fn forge(&self, header: Value, claims: Value) -> String {
        let kid = header["kid"]
            .as_str()
            .expect("forge needs header.kid; use forge_with for tokens without one")
            .to_owned();
        self.forge_with(&kid, header, claims).await
    }

    /// Like [`Idp::forge`], but signed with the key `kid` whatever the header says (or
    /// omits).
    pub async fn forge_with(&self, kid: &str, header: Value, claims: Value) -> String {
        let key = self
            .keys()
            .await
            .into_iter()
            .find(|k| k.kid == kid)
            .unwrap_or_else(|| panic!("the IdP has no key {kid}"));
        let alg_name = header["alg"].as_str().expect("header.alg must be a string");
        let alg = Algorithm::from_str(alg_name)
            .unwrap_or_else(|_| panic!("cannot sign alg {alg_name:?}; use unsigned_token"));
        let encoding = match alg_name {
            a if a.starts_with("HS") => EncodingKey::from_secret(key.public_pem.as_bytes()),
            a if a.starts_with("ES") => EncodingKey::from_ec_pem(key.private_pem.as_bytes())
                .unwrap_or_else(|e| panic!("{kid} is not an EC key: {e}")),
            _ => EncodingKey::from_rsa_pem(key.private_pem.as_bytes())
                .unwrap_or_else(|e| panic!("{kid} is not an RSA key: {e}")),
        };
        sign_token(&header, &claims, &encoding, alg)
    }

    /// Claims as the IdP would issue them for `client_id` and `aud`, valid for an hour; a
    /// starting point for forged tokens.
    pub fn claims(&self, client_id: &str, aud: &str) -> Value {
        let now = jsonwebtoken::get_current_timestamp();
        serde_json::json!({
            "iss": self.issuer, "sub": client_id, "client_id": client_id, "aud": aud,
            "iat": now, "exp": now + 3600, "jti": uuid::Uuid::new_v4().to_string(),
        })
    }

    async fn get_ok(&self, url: &str) -> Value {
        let resp = self.http.get(url).send().await.unwrap();
        assert_eq!(resp.status(), 200, "GET {url}");
        resp.json().await.unwrap()
    }

    async fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.issuer);
        let mut req = self
            .http
            .request(method.parse().unwrap(), &url)
            .timeout(Duration::from_secs(10));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {text}");
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap()
        }
    }
}

/// `base64url(header).base64url(claims).base64url(signature)`, nothing checked: for `alg:
/// none`, garbage and all-zero signatures.
pub fn unsigned_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}",
        signing_input(header, claims),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// A token whose header and claims are serialized exactly as given, signed with `key`.
pub fn sign_token(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let input = signing_input(header, claims);
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), key, alg).unwrap();
    format!("{input}.{sig}")
}

/// A token's header and claims, decoded without any check.
pub fn decode_unverified(token: &str) -> (Value, Value) {
    let mut parts = token.split('.');
    let mut part = || {
        let bytes = URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap();
        serde_json::from_slice(&bytes).unwrap()
    };
    (part(), part())
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// `application/x-www-form-urlencoded` serialization (also good for query strings).
pub fn form(params: &[(&str, &str)]) -> String {
    params
        .iter()
        .map(|(k, v)| format!("{}={}", form_encode(k), form_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn form_encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `application/x-www-form-urlencoded` parsing (also of query strings): `+` is a space,
/// `%XX` a byte; an invalid escape is kept as written.
pub fn form_decode(s: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(s.as_bytes()).into_owned().collect()
}
