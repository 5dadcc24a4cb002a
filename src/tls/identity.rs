//! What a client certificate says about its holder: the subject (as RFC 4514 text), its
//! common names, the SAN DNS names, URIs and email addresses, and the SHA-256 thumbprint of
//! the DER certificate. These are the fields a `[[clients]].certificates` matcher binds and
//! the audit line records; the certificate itself is never kept, logged or quoted in an
//! error. Reading a certificate here checks nothing about it (signature, validity, usage):
//! call it on a certificate the verifier has accepted.
//!
//! A leaf module: it uses `x509-parser` and [`crate::digest`], and knows no other part of
//! the gateway.

use x509_parser::asn1_rs::{Any, Tag, ToDer};
use x509_parser::nom;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Error, X509Name};

/// The identity fields of a client certificate (never the certificate itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    /// The subject as RFC 4514 text, e.g. `CN=batch,O=Corp`: the relative distinguished
    /// names from last to first (the reverse of their order in the certificate, as RFC 4514
    /// writes them), joined by `,`; the attributes of a multi-valued one joined by `+`.
    /// Attribute types by their registered short names (`CN`, `L`, `ST`, `O`, `OU`, `C`,
    /// `STREET`, `DC`, `UID`, `serialNumber`, `SN`, `givenName`, `title`, `emailAddress`),
    /// others as a dotted OID. String values (UTF8String, PrintableString, IA5String,
    /// BMPString, ...) as text, with `"+,;<>\`, a leading `#` or space, a trailing space and
    /// control characters escaped; other values (and any value of a type written as an OID)
    /// as `#` and the lowercase hex of their DER. Empty when the subject is.
    pub subject: String,
    /// The subject's common names (usually one), in certificate order. A common name that is
    /// not a readable string is left out.
    pub common_names: Vec<String>,
    /// SAN dNSName entries, ASCII-lowercased.
    pub dns: Vec<String>,
    /// SAN uniformResourceIdentifier entries, as written.
    pub uris: Vec<String>,
    /// SAN rfc822Name entries, ASCII-lowercased.
    pub emails: Vec<String>,
    /// SHA-256 of the DER certificate, lowercase hex without separators.
    pub sha256: String,
}

/// Why bytes are not a readable certificate. The messages never quote the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertParseError {
    /// No bytes at all.
    #[error("no certificate: the input is empty")]
    Empty,
    /// PEM text where DER was expected.
    #[error("not a DER certificate: this is PEM text (decode the BEGIN CERTIFICATE block first)")]
    Pem,
    /// The DER declares more bytes than there are.
    #[error("the certificate is cut short (its DER declares more bytes than the input holds)")]
    Truncated,
    /// Bytes that are not an X.509 certificate; the parser's reason (no input bytes).
    #[error("not a DER X.509 certificate ({0})")]
    Malformed(String),
    /// A certificate followed by more bytes.
    #[error("{0} bytes follow the certificate's DER")]
    TrailingBytes(usize),
    /// The subjectAltName extension is unreadable or present twice.
    #[error("the subject alternative name extension cannot be read ({0})")]
    SubjectAltName(String),
}

impl CertIdentity {
    /// Parse a DER certificate. Errors say what is wrong (empty, PEM instead of DER, cut
    /// short, not a certificate, trailing bytes, an unreadable subjectAltName).
    pub fn from_der(der: &[u8]) -> Result<Self, CertParseError> {
        let cert = parse(der)?;
        let subject = cert.subject();
        let common_names = subject
            .iter_common_name()
            .filter_map(|cn| text(cn.attr_value()))
            .collect();
        let (mut dns, mut uris, mut emails) = (Vec::new(), Vec::new(), Vec::new());
        let san = cert
            .subject_alternative_name()
            .map_err(|e| CertParseError::SubjectAltName(e.to_string()))?;
        if let Some(san) = san {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => dns.push(d.to_ascii_lowercase()),
                    GeneralName::URI(u) => uris.push((*u).to_owned()),
                    GeneralName::RFC822Name(e) => emails.push(e.to_ascii_lowercase()),
                    _ => {}
                }
            }
        }
        Ok(Self {
            subject: rfc4514(subject),
            common_names,
            dns,
            uris,
            emails,
            sha256: sha256_hex(der),
        })
    }

    /// SAN entries as the audit line writes them: `DNS:x`, `URI:y`, `email:z` (all DNS
    /// names, then all URIs, then all emails, each in certificate order).
    pub fn san(&self) -> Vec<String> {
        let dns = self.dns.iter().map(|d| format!("DNS:{d}"));
        let uris = self.uris.iter().map(|u| format!("URI:{u}"));
        let emails = self.emails.iter().map(|e| format!("email:{e}"));
        dns.chain(uris).chain(emails).collect()
    }
}

/// The certificate's `notAfter` (unix seconds); `None` when `der` is not a certificate.
pub fn not_after(der: &[u8]) -> Option<i64> {
    parse(der)
        .ok()
        .map(|cert| cert.validity().not_after.timestamp())
}

/// Lowercase hex, without separators, of the SHA-256 of `der`.
pub fn sha256_hex(der: &[u8]) -> String {
    hex(&crate::digest::sha256(der))
}

/// Normalise a configured thumbprint: hex digits in any case, optionally separated by `:`
/// or spaces (`AB:CD:...`, `ab cd ...`), to 64 lowercase hex digits. The error says what is
/// wrong (a thumbprint is not a secret: it quotes the offending character).
pub fn normalize_sha256(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(64);
    for c in text.chars() {
        match c {
            ':' | ' ' => {}
            c if c.is_ascii_hexdigit() => out.push(c.to_ascii_lowercase()),
            c => {
                return Err(format!(
                    "{c:?} is not a hex digit (a SHA-256 thumbprint is 64 hex digits, ':' or space separators allowed)"
                ))
            }
        }
    }
    if out.len() != 64 {
        return Err(format!(
            "{} hex digits where a SHA-256 thumbprint has 64",
            out.len()
        ));
    }
    Ok(out)
}

/// One certificate, exactly: no bytes before or after it.
fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CertParseError> {
    if der.is_empty() {
        return Err(CertParseError::Empty);
    }
    if der.trim_ascii_start().starts_with(b"-----BEGIN") {
        return Err(CertParseError::Pem);
    }
    if declares_more_than(der) {
        return Err(CertParseError::Truncated);
    }
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(CertParseError::TrailingBytes(rest.len())),
        Err(nom::Err::Incomplete(_)) => Err(CertParseError::Truncated),
        Err(nom::Err::Error(e) | nom::Err::Failure(e)) => Err(match e {
            X509Error::Der(x509_parser::asn1_rs::Error::Incomplete(_)) => CertParseError::Truncated,
            e => CertParseError::Malformed(e.to_string()),
        }),
    }
}

/// Whether `der` starts a DER SEQUENCE (as a certificate does) whose header, or whose
/// declared length, runs past the end of `der`: a certificate cut short. (x509-parser
/// reports some of these as a generic end-of-input error.)
fn declares_more_than(der: &[u8]) -> bool {
    let [0x30, rest @ ..] = der else {
        return false;
    };
    let Some((&first, rest)) = rest.split_first() else {
        return true;
    };
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81..=0x84 => {
            let n = usize::from(first & 0x7f);
            let Some((bytes, rest)) = rest.split_at_checked(n) else {
                return true;
            };
            let len = bytes.iter().fold(0usize, |l, &b| (l << 8) | usize::from(b));
            (len, rest)
        }
        // Indefinite or absurd lengths: not DER; x509-parser says why.
        _ => return false,
    };
    len > rest.len()
}

/// RFC 4514 text of a distinguished name (see [`CertIdentity::subject`]).
fn rfc4514(name: &X509Name<'_>) -> String {
    let mut out = String::new();
    let rdns: Vec<_> = name.iter_rdn().collect();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = attr.attr_type().to_id_string();
            let short = short_name(&oid);
            out.push_str(short.unwrap_or(&oid));
            out.push('=');
            // RFC 4514 2.4: a type written as an OID has its value as `#` and hex DER.
            match short.and_then(|_| text(attr.attr_value())) {
                Some(value) => escape(&value, &mut out),
                None => {
                    out.push('#');
                    let value = attr.attr_value();
                    out.push_str(&hex(&value
                        .to_der_vec()
                        .unwrap_or_else(|_| value.data.to_vec())));
                }
            }
        }
    }
    out
}

/// The registered LDAP short names (RFC 4514 3, RFC 4519, RFC 2985) of the attribute types
/// client certificate subjects carry.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.42" => "givenName",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "emailAddress",
        _ => return None,
    })
}

/// A directory string attribute value as text; `None` for other types and undecodable
/// bytes. TeletexString is read as UTF-8 (as x509-parser does), BMPString as UTF-16BE,
/// UniversalString as UTF-32BE.
fn text(value: &Any<'_>) -> Option<String> {
    let data = value.data;
    match value.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::NumericString
        | Tag::VisibleString
        | Tag::T61String => std::str::from_utf8(data).ok().map(str::to_owned),
        Tag::BmpString if data.len().is_multiple_of(2) => {
            let units = data
                .chunks_exact(2)
                .map(|u| u16::from_be_bytes([u[0], u[1]]));
            char::decode_utf16(units).collect::<Result<_, _>>().ok()
        }
        Tag::UniversalString if data.len().is_multiple_of(4) => data
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => None,
    }
}

/// Append `value` escaped as an RFC 4514 string (2.4), control characters as `\XX` pairs.
fn escape(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push('\\');
                    out.push_str(&hex(&[b]).to_ascii_uppercase());
                }
            }
            c => out.push(c),
        }
    }
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue, KeyPair, SanType};

    fn params(dn: &[(DnType, DnValue)], sans: Vec<SanType>) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        for (ty, value) in dn {
            p.distinguished_name.push(ty.clone(), value.clone());
        }
        p.subject_alt_names = sans;
        p
    }

    fn der(p: &CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn utf8(s: &str) -> DnValue {
        DnValue::Utf8String(s.to_owned())
    }

    fn ia5(s: &str) -> rcgen::string::Ia5String {
        s.try_into().unwrap()
    }

    #[test]
    fn reads_every_san_kind_in_order() {
        let p = params(
            &[
                (DnType::OrganizationName, utf8("Corp")),
                (DnType::CommonName, utf8("batch")),
            ],
            vec![
                SanType::DnsName(ia5("batch.internal")),
                SanType::URI(ia5("spiffe://corp/Batch")),
                SanType::Rfc822Name(ia5("batch@corp.example")),
                SanType::IpAddress("10.0.0.1".parse().unwrap()),
                SanType::DnsName(ia5("batch-2.internal")),
                SanType::URI(ia5("urn:example:batch")),
            ],
        );
        let der = der(&p);
        let id = CertIdentity::from_der(&der).unwrap();
        assert_eq!(id.subject, "CN=batch,O=Corp");
        assert_eq!(id.common_names, ["batch"]);
        assert_eq!(id.dns, ["batch.internal", "batch-2.internal"]);
        assert_eq!(id.uris, ["spiffe://corp/Batch", "urn:example:batch"]);
        assert_eq!(id.emails, ["batch@corp.example"]);
        assert_eq!(
            id.san(),
            [
                "DNS:batch.internal",
                "DNS:batch-2.internal",
                "URI:spiffe://corp/Batch",
                "URI:urn:example:batch",
                "email:batch@corp.example",
            ]
        );
        assert_eq!(id.sha256, hex(&crate::digest::sha256(&der)));
        assert_eq!(id.sha256.len(), 64);
    }

    #[test]
    fn lowercases_dns_and_email_not_uris() {
        let p = params(
            &[(DnType::CommonName, utf8("Batch"))],
            vec![
                SanType::DnsName(ia5("Batch.INTERNAL")),
                SanType::Rfc822Name(ia5("Batch@Corp.Example")),
                SanType::URI(ia5("SPIFFE://Corp/Batch")),
            ],
        );
        let id = CertIdentity::from_der(&der(&p)).unwrap();
        assert_eq!(id.dns, ["batch.internal"]);
        assert_eq!(id.emails, ["batch@corp.example"]);
        assert_eq!(id.uris, ["SPIFFE://Corp/Batch"]);
        // The common name and subject keep their case.
        assert_eq!(id.common_names, ["Batch"]);
        assert_eq!(id.subject, "CN=Batch");
    }

    #[test]
    fn no_san_and_no_subject() {
        let id = CertIdentity::from_der(&der(&params(&[], vec![]))).unwrap();
        assert_eq!(id.subject, "");
        assert!(id.common_names.is_empty());
        assert!(id.dns.is_empty() && id.uris.is_empty() && id.emails.is_empty());
        assert!(id.san().is_empty());
    }

    #[test]
    fn several_common_names_and_none() {
        // rcgen keeps one value per attribute type: the second CN goes in by its OID.
        let p = params(
            &[
                (DnType::CommonName, utf8("first")),
                (
                    DnType::CustomDnType(vec![2, 5, 4, 3]),
                    DnValue::PrintableString("second".try_into().unwrap()),
                ),
            ],
            vec![SanType::DnsName(ia5("a.example"))],
        );
        let id = CertIdentity::from_der(&der(&p)).unwrap();
        assert_eq!(id.common_names, ["first", "second"]);
        assert_eq!(id.subject, "CN=second,CN=first");

        let p = params(
            &[
                (DnType::OrganizationName, utf8("Corp")),
                (DnType::OrganizationalUnitName, utf8("Batch jobs")),
            ],
            vec![],
        );
        let id = CertIdentity::from_der(&der(&p)).unwrap();
        assert!(id.common_names.is_empty());
        assert_eq!(id.subject, "OU=Batch jobs,O=Corp");
    }

    #[test]
    fn subject_is_rfc4514() {
        let p = params(
            &[
                (
                    DnType::CountryName,
                    DnValue::PrintableString("US".try_into().unwrap()),
                ),
                (
                    DnType::OrganizationName,
                    DnValue::BmpString("Cörp ☃".try_into().unwrap()),
                ),
                (
                    DnType::OrganizationalUnitName,
                    DnValue::UniversalString("#Ünit".try_into().unwrap()),
                ),
                (DnType::CommonName, utf8(" #a,b+c;d<e>f\"g\\h=i ")),
                // emailAddress has a registered short name; an unknown type is an OID with
                // the value's DER in hex (0x0c: UTF8String, 0x02: two bytes).
                (
                    DnType::CustomDnType(vec![1, 2, 840, 113549, 1, 9, 1]),
                    DnValue::Ia5String(ia5("ops@corp.example")),
                ),
                (
                    DnType::CustomDnType(vec![1, 3, 6, 1, 4, 1, 99999, 1]),
                    utf8("hi"),
                ),
            ],
            vec![],
        );
        let id = CertIdentity::from_der(&der(&p)).unwrap();
        assert_eq!(
            id.subject,
            "1.3.6.1.4.1.99999.1=#0c026869,emailAddress=ops@corp.example,\
             CN=\\ #a\\,b\\+c\\;d\\<e\\>f\\\"g\\\\h=i\\ ,OU=\\#Ünit,O=Cörp ☃,C=US"
        );
        assert_eq!(id.common_names, [" #a,b+c;d<e>f\"g\\h=i "]);
    }

    #[test]
    fn multi_valued_rdn_and_control_characters() {
        // Name ::= SEQUENCE { SET { CN "a\n", O "b" }, SET { C INTEGER 5 } }, by hand:
        // rcgen writes one attribute per RDN.
        let cn = [
            0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x02, b'a', b'\n',
        ];
        let o = [0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x0a, 0x0c, 0x01, b'b'];
        let c = [0x30, 0x08, 0x06, 0x03, 0x55, 0x04, 0x06, 0x02, 0x01, 0x05];
        let mut set1 = vec![0x31, (cn.len() + o.len()) as u8];
        set1.extend(cn);
        set1.extend(o);
        let mut set2 = vec![0x31, c.len() as u8];
        set2.extend(c);
        let mut name = vec![0x30, (set1.len() + set2.len()) as u8];
        name.extend(&set1);
        name.extend(&set2);
        let (rest, name) = X509Name::from_der(&name).unwrap();
        assert!(rest.is_empty());
        assert_eq!(rfc4514(&name), "C=#020105,CN=a\\0A+O=b");
    }

    #[test]
    fn refuses_what_is_not_one_certificate() {
        let der = der(&params(&[(DnType::CommonName, utf8("batch"))], vec![]));
        assert_eq!(CertIdentity::from_der(&[]), Err(CertParseError::Empty));

        for cut in [1, 2, 10, der.len() / 2, der.len() - 1] {
            assert_eq!(
                CertIdentity::from_der(&der[..cut]),
                Err(CertParseError::Truncated),
                "cut at {cut}"
            );
        }

        let mut long = der.clone();
        long.extend([0, 0, 0]);
        assert_eq!(
            CertIdentity::from_der(&long),
            Err(CertParseError::TrailingBytes(3))
        );

        let garbage = b"definitely not a certificate";
        let e = CertIdentity::from_der(garbage).unwrap_err();
        assert!(matches!(e, CertParseError::Malformed(_)), "{e:?}");
        assert!(!e.to_string().contains("definitely"), "{e}");

        // A DER SEQUENCE that is not a certificate.
        let e = CertIdentity::from_der(&[0x30, 0x03, 0x02, 0x01, 0x05]).unwrap_err();
        assert!(matches!(e, CertParseError::Malformed(_)), "{e:?}");

        let pem = params(&[], vec![])
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .pem();
        assert_eq!(
            CertIdentity::from_der(pem.as_bytes()),
            Err(CertParseError::Pem)
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let der = der(&params(
            &[(DnType::CommonName, utf8("batch"))],
            vec![SanType::DnsName(ia5("a.b"))],
        ));
        let mut rng = fastrand::Rng::with_seed(16);
        for _ in 0..3000 {
            let mut bytes = der.clone();
            for _ in 0..rng.usize(1..8) {
                let i = rng.usize(..bytes.len());
                bytes[i] = rng.u8(..);
            }
            bytes.truncate(rng.usize(..=bytes.len()));
            let _ = CertIdentity::from_der(&bytes);
            let _ = not_after(&bytes);
        }
    }

    #[test]
    fn not_after_reads_validity() {
        let mut p = params(&[], vec![]);
        p.not_after = rcgen::date_time_ymd(2031, 5, 17);
        assert_eq!(not_after(&der(&p)), Some(1_936_742_400));
        assert_eq!(not_after(b"nope"), None);
    }

    #[test]
    fn sha256_hex_is_lowercase_hex() {
        // FIPS 180-2, appendix B.1.
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn normalizes_thumbprints() {
        let lower = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(normalize_sha256(lower).unwrap(), lower);
        let upper = lower.to_ascii_uppercase();
        let colons = upper
            .as_bytes()
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap())
            .collect::<Vec<_>>();
        assert_eq!(normalize_sha256(&colons.join(":")).unwrap(), lower);
        assert_eq!(normalize_sha256(&colons.join(" ")).unwrap(), lower);
        assert_eq!(normalize_sha256(&format!(" {lower} ")).unwrap(), lower);

        let e = normalize_sha256(&lower[..62]).unwrap_err();
        assert!(e.contains("62 hex digits"), "{e}");
        let e = normalize_sha256(&format!("{lower}00")).unwrap_err();
        assert!(e.contains("66 hex digits"), "{e}");
        let e = normalize_sha256(&format!("{}g", &lower[..63])).unwrap_err();
        assert!(e.contains("'g' is not a hex digit"), "{e}");
        assert!(normalize_sha256("").unwrap_err().contains("0 hex digits"));
        assert!(normalize_sha256(&lower.replace('b', "-")).is_err());
    }
}
