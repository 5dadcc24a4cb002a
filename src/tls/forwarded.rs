//! The client certificate a TLS-terminating load balancer forwards in a header
//! (`forwarded_cert`): Envoy's `x-forwarded-client-cert`, or a URL-encoded PEM as nginx's
//! `$ssl_client_escaped_cert` (and a base64 DER as Azure App Service's `X-ARR-ClientCert`).
//!
//! [`parse`] only reads the certificates out of the header value; it checks nothing about
//! them (the XFCC `Hash=` excepted). The caller decides whether the peer may send the header
//! at all, and verifies the chain exactly as it would one from a TLS handshake. It never
//! panics, bounds its work by [`MAX_HEADER_BYTES`] and [`MAX_CERTIFICATES`], and its errors
//! never quote the header.
//!
//! A leaf module: it uses [`super::identity`] for the thumbprint and knows no other part of
//! the gateway.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use rustls::pki_types::CertificateDer;

use super::identity::{normalize_sha256, sha256_hex};

/// Longer header values are refused before any work.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// The most certificates (leaf and intermediates) one header may carry.
pub const MAX_CERTIFICATES: usize = 8;

/// How the header carries the certificate (`forwarded_cert.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedFormat {
    /// Envoy's `x-forwarded-client-cert`: `;`-separated `Key=Value` pairs, one element per
    /// proxy hop, `,`-separated; the last element (the nearest proxy's) is read.
    Xfcc,
    /// The whole value is a URL-encoded PEM, leaf first (nginx `$ssl_client_escaped_cert`);
    /// or, when it holds no `-----BEGIN`, one base64 DER certificate (Azure `X-ARR-ClientCert`).
    PemUrlencoded,
}

/// Where in the header a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// XFCC `Cert=`.
    Cert,
    /// XFCC `Chain=`.
    Chain,
    /// The whole value (`pem-urlencoded`).
    Value,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Cert => "its Cert=",
            Part::Chain => "its Chain=",
            Part::Value => "the value",
        })
    }
}

/// Why a header value does not yield certificates. The messages never quote the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardedError {
    /// Nothing but whitespace.
    #[error("the header is empty")]
    Empty,
    /// Longer than [`MAX_HEADER_BYTES`].
    #[error("the header is {0} bytes long, more than the {MAX_HEADER_BYTES} read")]
    TooLarge(usize),
    /// Bytes that are not UTF-8 (before any decoding).
    #[error("the header is not valid UTF-8")]
    NotUtf8,
    /// The XFCC syntax is broken.
    #[error("malformed x-forwarded-client-cert: {0}")]
    Xfcc(&'static str),
    /// The last XFCC element carries no certificate.
    #[error("the last x-forwarded-client-cert element has no Cert= (the proxy must forward the certificate, not only its hash or subject)")]
    NoCert,
    /// A `%` not followed by two hex digits.
    #[error("{0} has bad percent-encoding (a '%' not followed by two hex digits)")]
    BadPercentEncoding(Part),
    /// URL-decoding gave bytes that are not UTF-8.
    #[error("{0} is not UTF-8 once URL-decoded")]
    BadUtf8(Part),
    /// A PEM section that cannot be read (no END line, bad base64 inside, ...).
    #[error("{0} is not valid PEM")]
    BadPem(Part),
    /// PEM without a `BEGIN CERTIFICATE` section (or an empty value).
    #[error("{0} holds no certificate (expected a BEGIN CERTIFICATE block)")]
    NoCertificate(Part),
    /// XFCC `Cert=` with more than the leaf.
    #[error(
        "its Cert= holds {0} certificates; it carries the leaf only (intermediates go in Chain=)"
    )]
    SeveralLeaves(usize),
    /// Neither PEM nor base64.
    #[error("the value is neither PEM nor base64 DER (bad base64)")]
    BadBase64,
    /// XFCC `Hash=` that is not 64 hex digits.
    #[error("its Hash= is not a SHA-256 hex digest")]
    BadHash,
    /// XFCC `Hash=` that is not the thumbprint of `Cert=`.
    #[error("its Hash= is not the SHA-256 of its Cert= certificate")]
    HashMismatch,
    /// More than [`MAX_CERTIFICATES`].
    #[error("it holds more than {MAX_CERTIFICATES} certificates")]
    TooManyCertificates,
}

/// The leaf and any chain certificates (DER) the header carries, leaf first.
pub fn parse(
    format: ForwardedFormat,
    value: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ForwardedError> {
    if value.len() > MAX_HEADER_BYTES {
        return Err(ForwardedError::TooLarge(value.len()));
    }
    let text = std::str::from_utf8(value)
        .map_err(|_| ForwardedError::NotUtf8)?
        .trim_ascii();
    if text.is_empty() {
        return Err(ForwardedError::Empty);
    }
    match format {
        ForwardedFormat::Xfcc => xfcc(text),
        ForwardedFormat::PemUrlencoded => pem_urlencoded(text),
    }
}

/// The certificates of the last XFCC element.
fn xfcc(text: &str) -> Result<Vec<CertificateDer<'static>>, ForwardedError> {
    let element = split_unquoted(text, b',')?
        .last()
        .copied()
        .unwrap_or_default()
        .trim_ascii();
    if element.is_empty() {
        return Err(ForwardedError::Xfcc("the last element is empty"));
    }
    let (mut cert, mut chain, mut hash) = (None, None, None);
    for pair in split_unquoted(element, b';')? {
        let pair = pair.trim_ascii();
        if pair.is_empty() {
            continue;
        }
        let (key, value) = pair
            .split_once('=')
            .ok_or(ForwardedError::Xfcc("a pair without '='"))?;
        let key = key.trim_ascii();
        if key.is_empty() || key.contains('"') {
            return Err(ForwardedError::Xfcc("a pair without a key"));
        }
        let value = unquote(value.trim_ascii())?;
        let slot = if key.eq_ignore_ascii_case("cert") {
            &mut cert
        } else if key.eq_ignore_ascii_case("chain") {
            &mut chain
        } else if key.eq_ignore_ascii_case("hash") {
            &mut hash
        } else {
            // By, Subject, URI, DNS (which may repeat), and keys a later Envoy may add: the
            // gateway reads the certificate itself.
            continue;
        };
        if slot.replace(value).is_some() {
            return Err(ForwardedError::Xfcc(
                "Cert=, Chain= or Hash= twice in one element",
            ));
        }
    }
    let cert = cert.ok_or(ForwardedError::NoCert)?;
    let chain_given = chain.is_some();
    let mut certs = pem_certs(&url_decode(&cert, Part::Cert)?, Part::Cert)?;
    if certs.len() > 1 {
        return Err(ForwardedError::SeveralLeaves(certs.len()));
    }
    let leaf = certs
        .pop()
        .ok_or(ForwardedError::NoCertificate(Part::Cert))?;
    if let Some(hash) = hash {
        let hash = normalize_sha256(&hash).map_err(|_| ForwardedError::BadHash)?;
        if hash != sha256_hex(leaf.as_ref()) {
            return Err(ForwardedError::HashMismatch);
        }
    }
    let mut intermediates = match chain {
        None => Vec::new(),
        Some(chain) => pem_certs(&url_decode(&chain, Part::Chain)?, Part::Chain)?,
    };
    if chain_given && intermediates.is_empty() {
        return Err(ForwardedError::NoCertificate(Part::Chain));
    }
    // Envoy's Chain= starts with the leaf again.
    intermediates.retain(|c| *c != leaf);
    if intermediates.len() >= MAX_CERTIFICATES {
        return Err(ForwardedError::TooManyCertificates);
    }
    intermediates.insert(0, leaf);
    Ok(intermediates)
}

/// The certificates of a URL-encoded PEM, or of one base64 DER.
fn pem_urlencoded(text: &str) -> Result<Vec<CertificateDer<'static>>, ForwardedError> {
    let decoded = url_decode(text, Part::Value)?;
    if decoded.contains("-----BEGIN") {
        let certs = pem_certs(&decoded, Part::Value)?;
        if certs.is_empty() {
            return Err(ForwardedError::NoCertificate(Part::Value));
        }
        return Ok(certs);
    }
    let b64: Vec<u8> = decoded
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let der = engine.decode(&b64).map_err(|_| ForwardedError::BadBase64)?;
    if der.is_empty() {
        return Err(ForwardedError::NoCertificate(Part::Value));
    }
    Ok(vec![CertificateDer::from(der)])
}

/// The certificate sections of `pem` (other sections are skipped), at most
/// [`MAX_CERTIFICATES`].
fn pem_certs(pem: &str, part: Part) -> Result<Vec<CertificateDer<'static>>, ForwardedError> {
    let mut certs = Vec::new();
    // The parser's own errors may quote the text: never show them.
    for item in rustls_pemfile::read_all(&mut pem.as_bytes()) {
        match item.map_err(|_| ForwardedError::BadPem(part))? {
            // An empty block is no certificate (found by the `forwarded` fuzz target).
            rustls_pemfile::Item::X509Certificate(c) if c.is_empty() => {
                return Err(ForwardedError::BadPem(part));
            }
            rustls_pemfile::Item::X509Certificate(c) => {
                if certs.len() == MAX_CERTIFICATES {
                    return Err(ForwardedError::TooManyCertificates);
                }
                certs.push(c);
            }
            _ => continue,
        }
    }
    Ok(certs)
}

/// `text` URL-decoded: every `%` must start a `%XX` escape (`+` stays `+`: it is a base64
/// character here, not a space); the result must be UTF-8.
fn url_decode(text: &str, part: Part) -> Result<String, ForwardedError> {
    let bytes = text.as_bytes();
    let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'%' && !(hex(i + 1) && hex(i + 2)) {
            return Err(ForwardedError::BadPercentEncoding(part));
        }
    }
    percent_encoding::percent_decode(bytes)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| ForwardedError::BadUtf8(part))
}

/// `text` split at each `sep` outside double quotes (a `\` inside quotes escapes the next
/// character).
fn split_unquoted(text: &str, sep: u8) -> Result<Vec<&str>, ForwardedError> {
    let (mut parts, mut start) = (Vec::new(), 0);
    let (mut quoted, mut escaped) = (false, false);
    for (i, &b) in text.as_bytes().iter().enumerate() {
        if quoted {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => quoted = false,
                _ => {}
            }
        } else if b == b'"' {
            quoted = true;
        } else if b == sep {
            // `sep` is ASCII: `i` is a character boundary.
            parts.push(&text[start..i]);
            start = i + 1;
        }
    }
    if quoted {
        return Err(ForwardedError::Xfcc("a quoted value is not closed"));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

/// A pair's value: as is, or the inside of `"..."` with `\"` and `\\` unescaped (other
/// backslashes are kept).
fn unquote(value: &str) -> Result<Cow<'_, str>, ForwardedError> {
    let Some(inner) = value.strip_prefix('"') else {
        if value.contains('"') {
            return Err(ForwardedError::Xfcc("a quote inside an unquoted value"));
        }
        return Ok(Cow::Borrowed(value));
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                if !chars.as_str().is_empty() {
                    return Err(ForwardedError::Xfcc("text after a closing quote"));
                }
                return Ok(Cow::Owned(out));
            }
            '\\' => match chars.next() {
                Some(e @ ('"' | '\\')) => out.push(e),
                Some(e) => {
                    out.push('\\');
                    out.push(e);
                }
                None => break,
            },
            c => out.push(c),
        }
    }
    Err(ForwardedError::Xfcc("a quoted value is not closed"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    /// A root, an intermediate and a leaf it signed; and an unrelated self-signed leaf.
    struct Pki {
        leaf: CertificateDer<'static>,
        intermediate: CertificateDer<'static>,
        root: CertificateDer<'static>,
        other: CertificateDer<'static>,
    }

    fn ca(name: &str) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p
    }

    fn pki() -> Pki {
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca("root");
        let root = root_params.self_signed(&root_key).unwrap();
        let root_issuer = Issuer::new(root_params, root_key);
        let int_key = KeyPair::generate().unwrap();
        let int_params = ca("intermediate");
        let intermediate = int_params.signed_by(&int_key, &root_issuer).unwrap();
        let int_issuer = Issuer::new(int_params, int_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["batch.internal".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &int_issuer)
            .unwrap();
        let other = CertificateParams::new(vec!["other.internal".to_owned()])
            .unwrap()
            .self_signed(&KeyPair::generate().unwrap())
            .unwrap();
        Pki {
            leaf: leaf.der().clone(),
            intermediate: intermediate.der().clone(),
            root: root.der().clone(),
            other: other.der().clone(),
        }
    }

    fn pem(certs: &[&CertificateDer<'_>]) -> String {
        use base64::Engine as _;
        let mut out = String::new();
        for c in certs {
            let b64 = base64::engine::general_purpose::STANDARD.encode(c.as_ref());
            out.push_str("-----BEGIN CERTIFICATE-----\n");
            for line in b64.as_bytes().chunks(64) {
                out.push_str(std::str::from_utf8(line).unwrap());
                out.push('\n');
            }
            out.push_str("-----END CERTIFICATE-----\n");
        }
        out
    }

    /// What Envoy writes in Cert= and Chain= (`urlEncodedPemEncodedPeerCertificate`).
    fn envoy(pem: &str) -> String {
        pem.replace('\n', "%0A")
            .replace(' ', "%20")
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D")
    }

    /// What nginx writes in `$ssl_client_escaped_cert` (URI component escaping).
    fn nginx(pem: &str) -> String {
        const KEEP: &AsciiSet = &NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'.')
            .remove(b'_')
            .remove(b'~');
        utf8_percent_encode(pem, KEEP).to_string()
    }

    fn xfcc(value: &str) -> Result<Vec<CertificateDer<'static>>, ForwardedError> {
        parse(ForwardedFormat::Xfcc, value.as_bytes())
    }

    #[test]
    fn envoy_element_with_every_key() {
        let p = pki();
        let value = format!(
            "By=spiffe://cluster.local/ns/default/sa/gateway;Hash={};Cert=\"{}\";Chain=\"{}\";\
             Subject=\"CN=batch,OU=Jobs,O=Corp\";URI=spiffe://corp/batch;DNS=batch.internal;DNS=www.batch.internal",
            sha256_hex(p.leaf.as_ref()),
            envoy(&pem(&[&p.leaf])),
            envoy(&pem(&[&p.leaf, &p.intermediate])),
        );
        assert_eq!(
            xfcc(&value).unwrap(),
            [p.leaf.clone(), p.intermediate.clone()]
        );

        // Without Chain=: the leaf alone; the hash in uppercase with colons is the same hash.
        let colons: Vec<String> = sha256_hex(p.leaf.as_ref())
            .to_ascii_uppercase()
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect();
        let value = format!(
            "Hash={};Cert=\"{}\"",
            colons.join(":"),
            envoy(&pem(&[&p.leaf]))
        );
        assert_eq!(xfcc(&value).unwrap(), vec![p.leaf.clone()]);

        // Cert= unquoted, nginx-style escaping, whitespace around pairs, a chain of three.
        let value = format!(
            " Cert={} ; Chain={} ;",
            nginx(&pem(&[&p.leaf])),
            nginx(&pem(&[&p.leaf, &p.intermediate, &p.root]))
        );
        assert_eq!(xfcc(&value).unwrap(), [p.leaf, p.intermediate, p.root]);
    }

    #[test]
    fn quoted_subject_with_commas_semicolons_and_quotes() {
        let p = pki();
        let value = format!(
            "By=spiffe://corp/gw;Subject=\"CN=a\\\"b\\\\,O=x;y, Inc.,C=US\";Cert=\"{}\";URI=,DNS=",
            envoy(&pem(&[&p.leaf])),
        );
        // The trailing `,URI=,DNS=` is a second element without Cert=.
        assert_eq!(xfcc(&value), Err(ForwardedError::NoCert));
        let value = value.replace(";URI=,DNS=", ";URI=spiffe://corp/batch");
        assert_eq!(xfcc(&value).unwrap(), [p.leaf]);
    }

    #[test]
    fn the_last_element_wins() {
        let p = pki();
        let value = format!(
            "By=spiffe://corp/edge;Hash={};Cert=\"{}\";Subject=\"CN=x, O=y\",By=spiffe://corp/gw;Hash={};Cert=\"{}\"",
            sha256_hex(p.other.as_ref()),
            envoy(&pem(&[&p.other])),
            sha256_hex(p.leaf.as_ref()),
            envoy(&pem(&[&p.leaf])),
        );
        assert_eq!(xfcc(&value).unwrap(), vec![p.leaf.clone()]);
        // A first element the gateway does not read may lack Cert=.
        let value = format!(
            "By=a;Hash=00;URI=x,By=b;Cert=\"{}\"",
            envoy(&pem(&[&p.leaf]))
        );
        assert_eq!(xfcc(&value).unwrap(), vec![p.leaf.clone()]);
        // The last one must have it, even when an earlier one does.
        let value = format!(
            "Cert=\"{}\",By=b;Hash={}",
            envoy(&pem(&[&p.leaf])),
            sha256_hex(p.leaf.as_ref())
        );
        assert_eq!(xfcc(&value), Err(ForwardedError::NoCert));
    }

    #[test]
    fn keys_are_case_insensitive() {
        let p = pki();
        let value = format!(
            "BY=x;HASH={};CERT=\"{}\";cHaIn=\"{}\";SUBJECT=\"CN=batch\"",
            sha256_hex(p.leaf.as_ref()).to_ascii_uppercase(),
            envoy(&pem(&[&p.leaf])),
            envoy(&pem(&[&p.leaf, &p.intermediate])),
        );
        assert_eq!(xfcc(&value).unwrap(), [p.leaf, p.intermediate]);
    }

    #[test]
    fn xfcc_errors() {
        let p = pki();
        let leaf = envoy(&pem(&[&p.leaf]));
        let e = xfcc(&format!(
            "Hash={};Cert=\"{leaf}\"",
            sha256_hex(p.other.as_ref())
        ));
        assert_eq!(e, Err(ForwardedError::HashMismatch));
        assert_eq!(
            xfcc(&format!("Hash=abc;Cert=\"{leaf}\"")),
            Err(ForwardedError::BadHash)
        );
        assert_eq!(
            xfcc("By=a;Hash=00;Subject=\"CN=x\""),
            Err(ForwardedError::NoCert)
        );
        assert_eq!(
            xfcc(&format!(
                "Cert=\"{}\"",
                envoy(&pem(&[&p.leaf, &p.intermediate]))
            )),
            Err(ForwardedError::SeveralLeaves(2))
        );
        assert_eq!(
            xfcc("Cert=\"\""),
            Err(ForwardedError::NoCertificate(Part::Cert))
        );
        assert_eq!(
            xfcc(&format!("Cert=\"{leaf}\";Chain=\"junk\"")),
            Err(ForwardedError::NoCertificate(Part::Chain))
        );
        assert_eq!(
            xfcc(&format!("Cert=\"{leaf}\";Cert=\"{leaf}\"")),
            Err(ForwardedError::Xfcc(
                "Cert=, Chain= or Hash= twice in one element"
            ))
        );
        assert_eq!(
            xfcc(&format!("Subject=\"CN=x\"y;Cert=\"{leaf}\"")),
            Err(ForwardedError::Xfcc("text after a closing quote"))
        );
        assert_eq!(
            xfcc(&format!("Cert=\"{leaf}")),
            Err(ForwardedError::Xfcc("a quoted value is not closed"))
        );
        assert_eq!(
            xfcc("Cert;Hash=1"),
            Err(ForwardedError::Xfcc("a pair without '='"))
        );
        assert_eq!(
            xfcc("=1"),
            Err(ForwardedError::Xfcc("a pair without a key"))
        );
        assert_eq!(
            xfcc("Cert=a\"b\""),
            Err(ForwardedError::Xfcc("a quote inside an unquoted value"))
        );
        assert_eq!(
            xfcc("By=a,"),
            Err(ForwardedError::Xfcc("the last element is empty"))
        );
        assert_eq!(
            xfcc("Cert=%0"),
            Err(ForwardedError::BadPercentEncoding(Part::Cert))
        );
        assert_eq!(
            xfcc("Cert=%zz"),
            Err(ForwardedError::BadPercentEncoding(Part::Cert))
        );
        assert_eq!(xfcc("Cert=%ff"), Err(ForwardedError::BadUtf8(Part::Cert)));
        // Cut short before its END line (cut before encoding: never inside an escape).
        let cut = pem(&[&p.leaf]);
        let cut = envoy(&cut[..cut.len() - 40]);
        assert_eq!(
            xfcc(&format!("Cert=\"{cut}\"")),
            Err(ForwardedError::BadPem(Part::Cert))
        );
        assert_eq!(xfcc(" \t "), Err(ForwardedError::Empty));

        let nine: Vec<_> = std::iter::repeat_n(&p.intermediate, 8)
            .chain([&p.leaf])
            .collect();
        assert_eq!(
            xfcc(&format!("Cert=\"{leaf}\";Chain=\"{}\"", envoy(&pem(&nine)))),
            Err(ForwardedError::TooManyCertificates)
        );
        // Leaf first, as Envoy sends it: eight certificates in all is the limit.
        let eight: Vec<_> = [&p.leaf]
            .into_iter()
            .chain(std::iter::repeat_n(&p.intermediate, 7))
            .collect();
        assert_eq!(
            xfcc(&format!(
                "Cert=\"{leaf}\";Chain=\"{}\"",
                envoy(&pem(&eight))
            ))
            .unwrap()
            .len(),
            8
        );
    }

    #[test]
    fn pem_urlencoded_with_chain() {
        let p = pki();
        let value = nginx(&pem(&[&p.leaf, &p.intermediate]));
        assert!(!value.contains('\n') && value.contains("%0A"));
        let certs = parse(ForwardedFormat::PemUrlencoded, value.as_bytes()).unwrap();
        assert_eq!(certs, [p.leaf.clone(), p.intermediate]);
        // Lowercase escapes and an unencoded PEM read the same.
        let lower = envoy(&pem(&[&p.leaf])).replace("%0A", "%0a");
        assert_eq!(
            parse(ForwardedFormat::PemUrlencoded, lower.as_bytes()).unwrap(),
            vec![p.leaf.clone()]
        );
        let plain = pem(&[&p.leaf]);
        assert_eq!(
            parse(ForwardedFormat::PemUrlencoded, plain.as_bytes()).unwrap(),
            [p.leaf]
        );
    }

    #[test]
    fn base64_der_as_azure_sends_it() {
        use base64::Engine as _;
        let p = pki();
        let b64 = base64::engine::general_purpose::STANDARD.encode(p.leaf.as_ref());
        let certs = parse(ForwardedFormat::PemUrlencoded, b64.as_bytes()).unwrap();
        assert_eq!(certs, vec![p.leaf.clone()]);
        // Whitespace and line breaks are ignored; padding is optional; escapes decode.
        let wrapped: Vec<_> = b64
            .as_bytes()
            .chunks(60)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        let wrapped = format!("  {}  ", wrapped.join("\r\n "));
        assert_eq!(
            parse(ForwardedFormat::PemUrlencoded, wrapped.as_bytes()).unwrap(),
            vec![p.leaf.clone()]
        );
        let unpadded = b64.trim_end_matches('=');
        assert_eq!(
            parse(ForwardedFormat::PemUrlencoded, unpadded.as_bytes()).unwrap(),
            vec![p.leaf.clone()]
        );
        let escaped = nginx(&b64);
        assert_eq!(
            parse(ForwardedFormat::PemUrlencoded, escaped.as_bytes()).unwrap(),
            [p.leaf]
        );
    }

    #[test]
    fn pem_urlencoded_errors() {
        let p = pki();
        let pem_url = |v: &[u8]| parse(ForwardedFormat::PemUrlencoded, v);
        assert_eq!(pem_url(b""), Err(ForwardedError::Empty));
        assert_eq!(pem_url(b"\xff\xfe"), Err(ForwardedError::NotUtf8));
        assert_eq!(
            pem_url(b"%C3%28"),
            Err(ForwardedError::BadUtf8(Part::Value))
        );
        assert_eq!(
            pem_url(b"abc%2"),
            Err(ForwardedError::BadPercentEncoding(Part::Value))
        );
        assert_eq!(pem_url(b"not*base64!"), Err(ForwardedError::BadBase64));
        assert_eq!(
            pem_url(b"%20%0A"),
            Err(ForwardedError::NoCertificate(Part::Value))
        );
        let e = pem_url(b"-----BEGIN CERTIFICATE-----\nsecretish\n").unwrap_err();
        assert_eq!(e, ForwardedError::BadPem(Part::Value));
        // An empty certificate block (the fuzz target's first finding).
        let empty = "-----BEGIN%20CERTIFICATE-----%0A%0A-----END%20CERTIFICATE-----%0A";
        assert_eq!(
            parse(ForwardedFormat::PemUrlencoded, empty.as_bytes()),
            Err(ForwardedError::BadPem(Part::Value))
        );
        assert!(!e.to_string().contains("secretish"), "{e}");
        let key =
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n";
        let e = pem_url(nginx(key).as_bytes()).unwrap_err();
        assert_eq!(e, ForwardedError::NoCertificate(Part::Value));
        assert!(!e.to_string().contains("MC4C"), "{e}");
        let nine: Vec<_> = std::iter::repeat_n(&p.leaf, 9).collect();
        assert_eq!(
            pem_url(nginx(&pem(&nine)).as_bytes()),
            Err(ForwardedError::TooManyCertificates)
        );
    }

    #[test]
    fn refuses_long_values_first() {
        // Longer than the limit and garbage: the length is the error, nothing is read.
        let long = vec![0xffu8; MAX_HEADER_BYTES + 1];
        for format in [ForwardedFormat::Xfcc, ForwardedFormat::PemUrlencoded] {
            assert_eq!(
                parse(format, &long),
                Err(ForwardedError::TooLarge(MAX_HEADER_BYTES + 1))
            );
        }
        let e = ForwardedError::TooLarge(MAX_HEADER_BYTES + 1).to_string();
        assert_eq!(
            e,
            "the header is 65537 bytes long, more than the 65536 read"
        );
    }

    #[test]
    fn format_names_in_config() {
        #[derive(serde::Deserialize)]
        struct F {
            format: ForwardedFormat,
        }
        let f: F = toml::from_str("format = \"xfcc\"").unwrap();
        assert_eq!(f.format, ForwardedFormat::Xfcc);
        let f: F = toml::from_str("format = \"pem-urlencoded\"").unwrap();
        assert_eq!(f.format, ForwardedFormat::PemUrlencoded);
        assert!(toml::from_str::<F>("format = \"pem\"").is_err());
    }

    #[test]
    fn arbitrary_input_never_panics() {
        let p = pki();
        let leaf = envoy(&pem(&[&p.leaf]));
        let pieces = [
            ";",
            ",",
            "=",
            "\"",
            "\\",
            "%",
            "%0A",
            "%2",
            "%zz",
            "%ff",
            "Cert=",
            "Chain=",
            "Hash=",
            "By=",
            "Subject=",
            "DNS=",
            "URI=",
            "-----BEGIN CERTIFICATE-----",
            "-----END CERTIFICATE-----",
            "\n",
            " ",
            "MIIB",
            "==",
            "a",
            "Z",
            "9",
            "é",
            &leaf,
        ];
        let mut rng = fastrand::Rng::with_seed(16);
        for _ in 0..4000 {
            let mut s = String::new();
            for _ in 0..rng.usize(0..40) {
                if rng.u8(..) < 16 {
                    s.push(rng.alphanumeric());
                } else {
                    s.push_str(pieces[rng.usize(..pieces.len())]);
                }
            }
            let mut bytes = s.into_bytes();
            if rng.u8(..) < 8 && !bytes.is_empty() {
                let i = rng.usize(..bytes.len());
                bytes[i] = rng.u8(..);
            }
            for format in [ForwardedFormat::Xfcc, ForwardedFormat::PemUrlencoded] {
                let _ = parse(format, &bytes);
            }
        }
    }
}
