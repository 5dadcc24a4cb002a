//! A test PKI, generated with rcgen when a test starts and written to a temporary directory.
//!
//! Client side: a root CA, an intermediate CA signed by the root, and leaf certificates
//! signed by the intermediate (valid, expired, not yet valid, revoked, wrong EKU), one from
//! an unrelated CA and one self-signed. A CRL signed by the intermediate revokes the
//! `revoked` leaf (and any others [`Pki::write_crl`] is given); the root's CRL is empty.
//! Server side: a separate server CA with two certificates for `localhost` and 127.0.0.1
//! (ECDSA and RSA, for rotation).
//!
//! Files (in [`Pki::dir`]): `clients-ca.pem` (root only), `clients-bundle.pem` (root and
//! intermediate), `root.crl` (DER), `clients.crl` (PEM), `server-ca.pem`, and for each leaf
//! `NAME.pem` (leaf), `NAME.key`, `NAME-chain.pem` (leaf and its intermediate).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
    PKCS_RSA_SHA256,
};
use time::{Duration, OffsetDateTime};

type Ca = CertifiedIssuer<'static, KeyPair>;

/// The names a client certificate carries.
#[derive(Debug, Clone, Default)]
pub struct Names<'a> {
    pub cn: &'a str,
    pub dns: &'a [&'a str],
    pub uri: &'a [&'a str],
    pub email: &'a [&'a str],
}

/// A leaf certificate, its key and the files they were written to.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub name: String,
    pub der: Vec<u8>,
    pub pem: String,
    pub key_pem: String,
    /// The leaf followed by the CA certificate that signed it, when that is the
    /// intermediate (what a client sends so a root-only bundle can verify it).
    pub chain_pem: String,
    pub serial: SerialNumber,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub chain_file: PathBuf,
}

impl Leaf {
    /// SHA-256 of the DER certificate, lowercase hex without separators.
    pub fn sha256(&self) -> String {
        sha256_hex(&self.der)
    }
}

pub struct Pki {
    pub dir: tempfile::TempDir,
    root: Ca,
    intermediate: Ca,
    server_ca: Ca,
    other_ca: Ca,
    serial: AtomicU64,
    crl_number: AtomicU64,
    /// Bound by the tests' `batch` client: DNS `batch.internal`, URI
    /// `spiffe://corp/batch`, email `batch@corp.example`, CN `batch`.
    pub valid: Leaf,
    /// Valid, with names no client binds.
    pub unbound: Leaf,
    pub expired: Leaf,
    pub not_yet_valid: Leaf,
    /// Listed in `clients.crl`.
    pub revoked: Leaf,
    /// EKU serverAuth only.
    pub wrong_eku: Leaf,
    /// Signed by a CA the gateway does not trust.
    pub other_ca_leaf: Leaf,
    pub self_signed: Leaf,
    /// `localhost` and 127.0.0.1, ECDSA, valid 30 days.
    pub server: Leaf,
    /// `localhost` and 127.0.0.1, RSA, valid 60 days.
    pub server2: Leaf,
}

/// Names of the `batch` client's certificate ([`Pki::valid`]).
pub const BATCH: Names<'static> = Names {
    cn: "batch",
    dns: &["batch.internal"],
    uri: &["spiffe://corp/batch"],
    email: &["batch@corp.example"],
};

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let root = ca("Portcullis Test Root CA", None);
        let intermediate = ca("Portcullis Test Intermediate CA", Some(&root));
        let server_ca = ca("Portcullis Test Server CA", None);
        let other_ca = ca("Some Other CA", None);
        let now = OffsetDateTime::now_utc();
        let serial = AtomicU64::new(1);
        let next = || SerialNumber::from((0x10 << 56) | serial.fetch_add(1, Ordering::Relaxed));

        let client = |name: &str, names: &Names<'_>, issuer: Option<&Ca>, eku, from, to| {
            let mut p = params(names, next());
            p.extended_key_usages = vec![eku];
            p.not_before = from;
            p.not_after = to;
            issue(
                dir.path(),
                name,
                p,
                issuer,
                issuer
                    .is_some_and(|i| same(i, &intermediate))
                    .then_some(&intermediate),
            )
        };
        let ok = (now - Duration::hours(1), now + Duration::days(30));
        let int = Some(&intermediate);
        let clientauth = ExtendedKeyUsagePurpose::ClientAuth;
        let valid = client("valid", &BATCH, int, clientauth.clone(), ok.0, ok.1);
        let unbound_names = Names {
            cn: "stranger",
            dns: &["stranger.internal"],
            ..Names::default()
        };
        let unbound = client(
            "unbound",
            &unbound_names,
            int,
            clientauth.clone(),
            ok.0,
            ok.1,
        );
        let expired = client(
            "expired",
            &BATCH,
            int,
            clientauth.clone(),
            now - Duration::days(30),
            now - Duration::days(1),
        );
        let not_yet_valid = client(
            "not-yet-valid",
            &BATCH,
            int,
            clientauth.clone(),
            now + Duration::days(1),
            now + Duration::days(30),
        );
        let revoked = client("revoked", &BATCH, int, clientauth.clone(), ok.0, ok.1);
        let wrong_eku = client(
            "wrong-eku",
            &BATCH,
            int,
            ExtendedKeyUsagePurpose::ServerAuth,
            ok.0,
            ok.1,
        );
        let other_ca_leaf = client(
            "other-ca",
            &BATCH,
            Some(&other_ca),
            clientauth.clone(),
            ok.0,
            ok.1,
        );
        let self_signed = client("self-signed", &BATCH, None, clientauth, ok.0, ok.1);

        let server_names = |p: &mut CertificateParams| {
            p.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        };
        let mut p = params(
            &Names {
                cn: "localhost",
                ..Names::default()
            },
            next(),
        );
        server_names(&mut p);
        p.not_after = now + Duration::days(30);
        let server = issue(dir.path(), "server", p, Some(&server_ca), None);
        let mut p = params(
            &Names {
                cn: "localhost",
                ..Names::default()
            },
            next(),
        );
        server_names(&mut p);
        p.not_after = now + Duration::days(60);
        let server2 = issue_with(
            dir.path(),
            "server2",
            p,
            Some(&server_ca),
            None,
            &PKCS_RSA_SHA256,
        );

        let write = |file: &str, text: String| std::fs::write(dir.path().join(file), text).unwrap();
        write("clients-ca.pem", root.pem());
        write(
            "clients-bundle.pem",
            format!("{}{}", root.pem(), intermediate.pem()),
        );
        write("server-ca.pem", server_ca.pem());
        write("other-ca.pem", other_ca.pem());
        let root_crl = crl(&root, 1, &[], now + Duration::days(7));
        std::fs::write(dir.path().join("root.crl"), root_crl.der()).unwrap();

        let pki = Pki {
            dir,
            root,
            intermediate,
            server_ca,
            other_ca,
            serial,
            crl_number: AtomicU64::new(1),
            valid,
            unbound,
            expired,
            not_yet_valid,
            revoked,
            wrong_eku,
            other_ca_leaf,
            self_signed,
            server,
            server2,
        };
        pki.write_crl(&[]);
        pki
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// `clients-ca.pem`: the client root only (clients send the intermediate).
    pub fn clients_ca(&self) -> PathBuf {
        self.path("clients-ca.pem")
    }

    /// `clients-bundle.pem`: root and intermediate (clients may send their leaf alone).
    pub fn clients_bundle(&self) -> PathBuf {
        self.path("clients-bundle.pem")
    }

    /// `server-ca.pem`: what clients trust for the gateway's certificate.
    pub fn server_ca(&self) -> PathBuf {
        self.path("server-ca.pem")
    }

    pub fn server_ca_der(&self) -> Vec<u8> {
        self.server_ca.der().to_vec()
    }

    /// `root.crl` (DER, empty) and `clients.crl` (PEM, the intermediate's).
    pub fn crl_files(&self) -> [PathBuf; 2] {
        [self.path("root.crl"), self.path("clients.crl")]
    }

    /// A new leaf signed by the intermediate, EKU clientAuth, valid for 30 days.
    pub fn client(&self, name: &str, names: &Names<'_>) -> Leaf {
        let mut p = params(names, self.next_serial());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        issue(
            self.dir.path(),
            name,
            p,
            Some(&self.intermediate),
            Some(&self.intermediate),
        )
    }

    /// [`Pki::client`], valid until `not_after`.
    pub fn client_until(&self, name: &str, names: &Names<'_>, not_after: OffsetDateTime) -> Leaf {
        let mut p = params(names, self.next_serial());
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.not_after = not_after;
        issue(
            self.dir.path(),
            name,
            p,
            Some(&self.intermediate),
            Some(&self.intermediate),
        )
    }

    /// Replace `clients.crl` (atomically, by rename) with a CRL from the intermediate that
    /// revokes [`Pki::revoked`] and `also`, with the next CRL number.
    pub fn write_crl(&self, also: &[&Leaf]) {
        let n = self.crl_number.fetch_add(1, Ordering::Relaxed);
        let mut serials = vec![&self.revoked.serial];
        serials.extend(also.iter().map(|l| &l.serial));
        let crl = crl(
            &self.intermediate,
            n,
            &serials,
            OffsetDateTime::now_utc() + Duration::days(7),
        );
        replace(&self.path("clients.crl"), crl.pem().unwrap().as_bytes());
    }

    /// Write `clients.crl` as a CRL whose nextUpdate has passed (revoking only
    /// [`Pki::revoked`]).
    pub fn write_expired_crl(&self) {
        let n = self.crl_number.fetch_add(1, Ordering::Relaxed);
        let now = OffsetDateTime::now_utc();
        let mut p = crl_params(n, &[&self.revoked.serial], now - Duration::hours(1));
        p.this_update = now - Duration::days(2);
        let crl = p.signed_by(&*self.intermediate).unwrap();
        replace(&self.path("clients.crl"), crl.pem().unwrap().as_bytes());
    }

    fn next_serial(&self) -> SerialNumber {
        SerialNumber::from((0x10 << 56) | self.serial.fetch_add(1, Ordering::Relaxed))
    }
}

/// Hex SHA-256 of `der`, lowercase, no separators.
pub fn sha256_hex(der: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Write `path` atomically: a sibling temporary file renamed over it.
pub fn replace(path: &Path, content: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn ca(cn: &str, parent: Option<&Ca>) -> Ca {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "Portcullis Tests");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::days(1);
    p.not_after = now + Duration::days(365);
    p.use_authority_key_identifier_extension = parent.is_some();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    match parent {
        Some(parent) => CertifiedIssuer::signed_by(p, key, &**parent).unwrap(),
        None => CertifiedIssuer::self_signed(p, key).unwrap(),
    }
}

fn params(names: &Names<'_>, serial: SerialNumber) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, names.cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "Portcullis Tests");
    let ia5 = |s: &&str| -> rcgen::string::Ia5String { (*s).try_into().unwrap() };
    p.subject_alt_names = names
        .dns
        .iter()
        .map(|d| SanType::DnsName(ia5(d)))
        .chain(names.uri.iter().map(|u| SanType::URI(ia5(u))))
        .chain(names.email.iter().map(|e| SanType::Rfc822Name(ia5(e))))
        .collect();
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(30);
    p.serial_number = Some(serial);
    p.use_authority_key_identifier_extension = true;
    p
}

fn same(a: &Ca, b: &Ca) -> bool {
    a.der() == b.der()
}

/// Sign `p` with `issuer` (self-signed when `None`) using a new P-256 key, and write the
/// files; the chain file appends `chain_ca`.
fn issue(
    dir: &Path,
    name: &str,
    p: CertificateParams,
    issuer: Option<&Ca>,
    chain_ca: Option<&Ca>,
) -> Leaf {
    issue_with(dir, name, p, issuer, chain_ca, &PKCS_ECDSA_P256_SHA256)
}

fn issue_with(
    dir: &Path,
    name: &str,
    mut p: CertificateParams,
    issuer: Option<&Ca>,
    chain_ca: Option<&Ca>,
    alg: &'static rcgen::SignatureAlgorithm,
) -> Leaf {
    let key = KeyPair::generate_for(alg).unwrap();
    let cert = match issuer {
        Some(ca) => p.signed_by(&key, &**ca).unwrap(),
        None => {
            p.use_authority_key_identifier_extension = false;
            p.self_signed(&key).unwrap()
        }
    };
    let pem = cert.pem();
    let chain_pem = match chain_ca {
        Some(ca) => format!("{pem}{}", ca.pem()),
        None => pem.clone(),
    };
    let leaf = Leaf {
        name: name.to_owned(),
        der: cert.der().to_vec(),
        key_pem: key.serialize_pem(),
        pem,
        chain_pem,
        serial: p.serial_number.clone().unwrap(),
        cert_file: dir.join(format!("{name}.pem")),
        key_file: dir.join(format!("{name}.key")),
        chain_file: dir.join(format!("{name}-chain.pem")),
    };
    std::fs::write(&leaf.cert_file, &leaf.pem).unwrap();
    std::fs::write(&leaf.key_file, &leaf.key_pem).unwrap();
    std::fs::write(&leaf.chain_file, &leaf.chain_pem).unwrap();
    leaf
}

fn crl_params(
    number: u64,
    serials: &[&SerialNumber],
    next_update: OffsetDateTime,
) -> CertificateRevocationListParams {
    let now = OffsetDateTime::now_utc();
    CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update,
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: (*s).clone(),
                revocation_time: now - Duration::minutes(1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
}

fn crl(
    issuer: &Issuer<'static, KeyPair>,
    number: u64,
    serials: &[&SerialNumber],
    next_update: OffsetDateTime,
) -> rcgen::CertificateRevocationList {
    crl_params(number, serials, next_update)
        .signed_by(issuer)
        .unwrap()
}

/// `leaf`'s P-256 key as SEC1 (`EC PRIVATE KEY`) PEM instead of PKCS#8.
pub fn sec1_key_pem(leaf: &Leaf) -> String {
    use aws_lc_rs::encoding::AsDer;
    let der = rustls_pemfile::private_key(&mut leaf.key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        der.secret_der(),
    )
    .unwrap();
    let sec1 = pair.private_key().as_der().unwrap();
    pem("EC PRIVATE KEY", sec1.as_ref())
}

/// PEM armour around `der`.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
