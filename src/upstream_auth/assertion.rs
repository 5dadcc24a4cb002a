//! Client assertions signed with a certificate's private key (RFC 7523, as Entra ID
//! expects them for certificate credentials).
//!
//! The PEM file is read again before every assertion, so a certificate rotated on disk is
//! used from the next token exchange on; parsing is skipped while the file's bytes are
//! unchanged. A file that no longer parses keeps the last good certificate in use (a
//! half-written file during rotation must not take the backend down) and says so in the
//! error log. Signing uses aws-lc-rs directly: no OpenSSL, no PKCS#12.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeyPair as RsaKeyPair;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rustls_pemfile::Item;

/// Lifetime of an assertion. Entra refuses assertions valid for more than 10 minutes.
const ASSERTION_LIFETIME_SECS: u64 = 5 * 60;

/// Signature algorithm for RSA keys (EC keys sign with the algorithm of their curve).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RsaAlg {
    /// RSASSA-PSS with SHA-256, Entra's default for certificate credentials.
    #[default]
    Ps256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, for IdPs without PSS.
    Rs256,
}

impl RsaAlg {
    /// Parse a configured `algorithm`; `None` means the value is not an RSA JWS alg.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "PS256" => Some(Self::Ps256),
            "RS256" => Some(Self::Rs256),
            _ => None,
        }
    }
}

enum Signer {
    Rsa(RsaKeyPair, RsaAlg),
    Ec(EcdsaKeyPair, &'static str),
}

impl Signer {
    fn alg(&self) -> &'static str {
        match self {
            Self::Rsa(_, RsaAlg::Ps256) => "PS256",
            Self::Rsa(_, RsaAlg::Rs256) => "RS256",
            Self::Ec(_, alg) => alg,
        }
    }

    fn public_key(&self) -> &[u8] {
        match self {
            Self::Rsa(k, _) => k.public_key().as_ref(),
            Self::Ec(k, _) => k.public_key().as_ref(),
        }
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let rng = SystemRandom::new();
        match self {
            Self::Rsa(k, alg) => {
                let mut sig = vec![0u8; k.public_modulus_len()];
                let padding: &'static dyn signature::RsaEncoding = match alg {
                    RsaAlg::Ps256 => &signature::RSA_PSS_SHA256,
                    RsaAlg::Rs256 => &signature::RSA_PKCS1_SHA256,
                };
                k.sign(padding, &rng, message, &mut sig)
                    .map_err(|_| "RSA signing failed".to_owned())?;
                Ok(sig)
            }
            Self::Ec(k, _) => k
                .sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| "ECDSA signing failed".to_owned()),
        }
    }
}

/// A certificate and its private key, ready to sign assertions.
pub struct Certificate {
    signer: Signer,
    /// `x5t#S256`: base64url SHA-256 of the leaf certificate.
    x5t_s256: String,
    /// `x5t`: base64url SHA-1 of the leaf (older tenants match on it).
    x5t: String,
    /// `x5c`: the chain, standard base64 DER, leaf first.
    x5c: Vec<String>,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("alg", &self.signer.alg())
            .field("x5t#S256", &self.x5t_s256)
            .finish_non_exhaustive()
    }
}

impl Certificate {
    /// Parse a certificate chain and a private key from PEM text. `key_pem` defaults to
    /// `cert_pem` (one file holding both).
    pub fn from_pem(cert_pem: &[u8], key_pem: Option<&[u8]>, rsa: RsaAlg) -> Result<Self, String> {
        let mut chain = Vec::new();
        let mut keys = Vec::new();
        // The parser's own error quotes the text it choked on, which may be a private key
        // (a PEM flattened onto one line): never show it.
        const FLAT: &str = "is not valid PEM (flattened onto one line, or cut short?)";
        for item in rustls_pemfile::read_all(&mut &cert_pem[..]) {
            match item.map_err(|_| FLAT.to_owned())? {
                Item::X509Certificate(c) => chain.push(c.as_ref().to_vec()),
                other if key_pem.is_none() => keys.push(other),
                _ => {}
            }
        }
        if let Some(k) = key_pem {
            for item in rustls_pemfile::read_all(&mut &k[..]) {
                keys.push(item.map_err(|_| format!("the key file {FLAT}"))?);
            }
        }
        let leaf = chain
            .first()
            .ok_or("holds no certificate (expected a `BEGIN CERTIFICATE` block)")?;
        let mut signers = keys
            .into_iter()
            .filter_map(|k| signer_of(k, rsa).transpose());
        let signer = signers
            .next()
            .ok_or("holds no private key (expected `BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY`)")??;
        if signers.next().is_some() {
            return Err("holds more than one private key".into());
        }
        let der = rustls::pki_types::CertificateDer::from(leaf.as_slice());
        let cert = webpki::EndEntityCert::try_from(&der)
            .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
        // The SPKI ends with the public key's bit string: RSAPublicKey DER for RSA, the
        // uncompressed point for EC — which is what aws-lc-rs hands out as `public_key()`.
        if !cert
            .subject_public_key_info()
            .as_ref()
            .ends_with(signer.public_key())
        {
            return Err("the private key does not belong to the certificate".into());
        }
        Ok(Self {
            x5t_s256: URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, leaf)),
            x5t: URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, leaf)),
            x5c: chain.iter().map(|c| STANDARD.encode(c)).collect(),
            signer,
        })
    }

    /// The JWS algorithm this certificate signs with.
    pub fn alg(&self) -> &'static str {
        self.signer.alg()
    }

    /// The `x5t#S256` thumbprint (safe to log: it identifies, it does not authenticate).
    pub fn thumbprint(&self) -> &str {
        &self.x5t_s256
    }

    /// A signed client assertion for `client_id` at `audience` (the token endpoint).
    pub fn assertion(&self, client_id: &str, audience: &str, x5c: bool) -> Result<String, String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut header = serde_json::json!({
            "alg": self.signer.alg(),
            "typ": "JWT",
            "x5t#S256": self.x5t_s256,
            "x5t": self.x5t,
        });
        if x5c {
            header["x5c"] = serde_json::json!(self.x5c);
        }
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": uuid::Uuid::new_v4().to_string(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
        });
        let mut jws = String::with_capacity(1024);
        jws.push_str(&URL_SAFE_NO_PAD.encode(header.to_string()));
        jws.push('.');
        jws.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let sig = self.signer.sign(jws.as_bytes())?;
        jws.push('.');
        jws.push_str(&URL_SAFE_NO_PAD.encode(sig));
        Ok(jws)
    }
}

/// A signer for a PEM key item; `Ok(None)` for items that are not private keys.
fn signer_of(item: Item, rsa: RsaAlg) -> Result<Option<Signer>, String> {
    let bad = |what: &str| {
        format!("the {what} private key cannot be used: it is malformed or of an unsupported size")
    };
    match item {
        Item::Pkcs1Key(k) => RsaKeyPair::from_der(k.secret_pkcs1_der())
            .map(|k| Some(Signer::Rsa(k, rsa)))
            .map_err(|_| bad("RSA")),
        Item::Pkcs8Key(k) => {
            let der = k.secret_pkcs8_der();
            if let Ok(k) = RsaKeyPair::from_pkcs8(der) {
                return Ok(Some(Signer::Rsa(k, rsa)));
            }
            ec_signer(der).map(Some).ok_or_else(|| bad("PKCS#8"))
        }
        Item::Sec1Key(k) => ec_signer(k.secret_sec1_der())
            .map(Some)
            .ok_or_else(|| bad("EC")),
        _ => Ok(None),
    }
}

/// An ECDSA signer for a P-256 or P-384 key (PKCS#8 or SEC1 DER).
fn ec_signer(der: &[u8]) -> Option<Signer> {
    [
        (&signature::ECDSA_P256_SHA256_FIXED_SIGNING, "ES256"),
        (&signature::ECDSA_P384_SHA384_FIXED_SIGNING, "ES384"),
    ]
    .into_iter()
    .find_map(|(alg, name)| {
        EcdsaKeyPair::from_private_key_der(alg, der)
            .ok()
            .map(|k| Signer::Ec(k, name))
    })
}

/// A certificate file watched by content: re-read before each use, re-parsed on change.
pub struct CertificateFile {
    cert_path: PathBuf,
    key_path: Option<PathBuf>,
    rsa: RsaAlg,
    current: Mutex<Option<Loaded>>,
}

struct Loaded {
    /// SHA-256 of the file contents it was parsed from.
    digest: [u8; 32],
    cert: std::sync::Arc<Certificate>,
}

impl CertificateFile {
    /// Watch `cert_path` (and `key_path`, if the key is apart).
    pub fn new(cert_path: PathBuf, key_path: Option<PathBuf>, rsa: RsaAlg) -> Self {
        Self {
            cert_path,
            key_path,
            rsa,
            current: Mutex::new(None),
        }
    }

    /// Load and check the files once (configuration validation).
    pub fn check(
        cert_path: &Path,
        key_path: Option<&Path>,
        rsa: RsaAlg,
    ) -> Result<Certificate, String> {
        let (cert, key) = read(cert_path, key_path)?;
        Certificate::from_pem(&cert, key.as_deref(), rsa)
            .map_err(|e| format!("{}: {e}", cert_path.display()))
    }

    /// The certificate as the files hold it now. When they changed but no longer parse,
    /// the previous certificate is returned and the problem logged; so it is while the
    /// files cannot be read (a rotation that deletes, then recreates them).
    pub fn current(&self) -> Result<std::sync::Arc<Certificate>, String> {
        let (cert_pem, key_pem) = match read(&self.cert_path, self.key_path.as_deref()) {
            Ok(files) => files,
            Err(e) => {
                let slot = self.current.lock().unwrap_or_else(|p| p.into_inner());
                let Some(l) = slot.as_ref() else {
                    return Err(e);
                };
                tracing::error!(error = %e, "certificate file unreadable; still signing with the previous certificate");
                return Ok(l.cert.clone());
            }
        };
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&cert_pem);
        if let Some(k) = &key_pem {
            ctx.update(k);
        }
        let mut sum = [0u8; 32];
        sum.copy_from_slice(ctx.finish().as_ref());
        let mut slot = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = slot.as_ref().filter(|l| l.digest == sum) {
            return Ok(l.cert.clone());
        }
        match Certificate::from_pem(&cert_pem, key_pem.as_deref(), self.rsa) {
            Ok(cert) => {
                let cert = std::sync::Arc::new(cert);
                if slot.is_some() {
                    tracing::info!(file = %self.cert_path.display(), thumbprint = cert.thumbprint(), "certificate changed on disk; new assertions use it");
                }
                *slot = Some(Loaded {
                    digest: sum,
                    cert: cert.clone(),
                });
                Ok(cert)
            }
            Err(e) => match slot.as_ref() {
                Some(l) => {
                    tracing::error!(file = %self.cert_path.display(), error = %e, "certificate file changed but cannot be used; still signing with the previous certificate");
                    Ok(l.cert.clone())
                }
                None => Err(format!("{}: {e}", self.cert_path.display())),
            },
        }
    }
}

fn read(cert: &Path, key: Option<&Path>) -> Result<(Vec<u8>, Option<Vec<u8>>), String> {
    let c = std::fs::read(cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
    let k = match key {
        Some(k) => Some(std::fs::read(k).map_err(|e| format!("cannot read {}: {e}", k.display()))?),
        None => None,
    };
    Ok((c, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(alg: &'static rcgen::SignatureAlgorithm) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gateway.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn parts(jws: &str) -> (serde_json::Value, serde_json::Value) {
        let mut it = jws.split('.');
        let h = URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap();
        let c = URL_SAFE_NO_PAD.decode(it.next().unwrap()).unwrap();
        (
            serde_json::from_slice(&h).unwrap(),
            serde_json::from_slice(&c).unwrap(),
        )
    }

    #[test]
    fn ec_assertion_has_entra_header_and_claims() {
        let (c, k) = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        let pem = format!("{c}{k}");
        let cert = Certificate::from_pem(pem.as_bytes(), None, RsaAlg::Ps256).unwrap();
        assert_eq!(cert.alg(), "ES256");
        let jws = cert
            .assertion("client-1", "https://idp/token", true)
            .unwrap();
        let (h, claims) = parts(&jws);
        assert_eq!(h["alg"], "ES256");
        assert_eq!(h["x5t#S256"].as_str().unwrap().len(), 43);
        assert_eq!(h["x5t"].as_str().unwrap().len(), 27);
        assert_eq!(h["x5c"].as_array().unwrap().len(), 1);
        assert_eq!(claims["iss"], "client-1");
        assert_eq!(claims["sub"], "client-1");
        assert_eq!(claims["aud"], "https://idp/token");
        let life = claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap();
        assert!(life <= 600, "{life}");
        let again = cert
            .assertion("client-1", "https://idp/token", false)
            .unwrap();
        assert_ne!(parts(&again).1["jti"], claims["jti"], "jti is unique");
        assert!(parts(&again).0.get("x5c").is_none());
    }

    #[test]
    fn a_flattened_pem_is_refused_without_quoting_the_key() {
        let (c, k) = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        let secret_line = k.lines().nth(1).unwrap().to_owned();
        let flat = format!("{c}{k}").replace('\n', " ");
        let e = Certificate::from_pem(flat.as_bytes(), None, RsaAlg::Ps256).unwrap_err();
        assert!(e.contains("not valid PEM"), "{e}");
        assert!(!e.contains(&secret_line[..20]), "the key leaked: {e}");
        let flat_key = k.replace('\n', " ");
        let e = Certificate::from_pem(c.as_bytes(), Some(flat_key.as_bytes()), RsaAlg::Ps256)
            .unwrap_err();
        assert!(
            e.contains("key file") && !e.contains(&secret_line[..20]),
            "{e}"
        );
    }

    #[test]
    fn key_apart_and_mismatch() {
        let (c, k) = cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        let ok = Certificate::from_pem(c.as_bytes(), Some(k.as_bytes()), RsaAlg::Ps256).unwrap();
        assert_eq!(ok.alg(), "ES384");
        let (_, other) = cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        let e =
            Certificate::from_pem(c.as_bytes(), Some(other.as_bytes()), RsaAlg::Ps256).unwrap_err();
        assert!(e.contains("does not belong"), "{e}");
        let e = Certificate::from_pem(c.as_bytes(), None, RsaAlg::Ps256).unwrap_err();
        assert!(e.contains("no private key"), "{e}");
        let e = Certificate::from_pem(k.as_bytes(), None, RsaAlg::Ps256).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
        let e = Certificate::from_pem(b"garbage", None, RsaAlg::Ps256).unwrap_err();
        assert!(e.contains("no certificate"), "{e}");
    }

    #[test]
    fn rsa_signs_ps256_or_rs256_verifiably() {
        let (c, k) = cert(&rcgen::PKCS_RSA_SHA256);
        let pem = format!("{c}{k}");
        for (alg, name, verify) in [
            (RsaAlg::Ps256, "PS256", &signature::RSA_PSS_2048_8192_SHA256),
            (
                RsaAlg::Rs256,
                "RS256",
                &signature::RSA_PKCS1_2048_8192_SHA256,
            ),
        ] {
            let cert = Certificate::from_pem(pem.as_bytes(), None, alg).unwrap();
            let jws = cert.assertion("c", "a", false).unwrap();
            assert_eq!(parts(&jws).0["alg"], name);
            let (signed, sig) = jws.rsplit_once('.').unwrap();
            let public = signature::UnparsedPublicKey::new(verify, cert.signer.public_key());
            public
                .verify(signed.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
                .unwrap();
        }
    }

    #[test]
    fn file_rotation_and_bad_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.pem");
        let (c1, k1) = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        std::fs::write(&path, format!("{c1}{k1}")).unwrap();
        let f = CertificateFile::new(path.clone(), None, RsaAlg::Ps256);
        let first = f.current().unwrap().thumbprint().to_owned();
        let (c2, k2) = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        std::fs::write(&path, format!("{c2}{k2}")).unwrap();
        let second = f.current().unwrap().thumbprint().to_owned();
        assert_ne!(first, second, "a rotated file is picked up");
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\ntrunc").unwrap();
        assert_eq!(f.current().unwrap().thumbprint(), second, "last good kept");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            f.current().unwrap().thumbprint(),
            second,
            "a file missing mid-rotation keeps the last good certificate"
        );
        let never = CertificateFile::new(dir.path().join("never.pem"), None, RsaAlg::Ps256);
        assert!(
            never.current().is_err(),
            "with no certificate ever read, an error"
        );
    }
}
