//! DKIM signing (RFC 6376; Ed25519 per RFC 8463): the `[dkim."domain"]` keys, loaded and
//! checked, and the signing of a message whose `From:` domain has one, once, when it is
//! accepted (before the spool, so a retry never signs again).
//!
//! What is ours: reading and checking the keys (PEM, PKCS#8, RSA of at least 1024 bits or
//! Ed25519; errors name the domain and the file), reading a message's header section
//! (which `From:` domain, which headers to sign, or why it cannot be signed), and the
//! choice of headers. The canonicalization (relaxed/relaxed), hashing and the signature
//! itself are Stalwart's `mail-auth` crate.
//!
//! Which mail is signed: exactly the `From:` domain of a configured block, compared
//! without regard to case; a subdomain (`news.example.com`) is not signed by its parent's
//! block (give it its own). Not signed, with a warning, and still relayed: no `From:`,
//! several `From:` headers (RFC 5322 allows one), a `From:` with several mailboxes or
//! none, and a header section that cannot be read (a line that is neither a field nor a
//! continuation).
//!
//! Headers signed: those of [`SIGNED_HEADERS`] the message has (each instance), and
//! `From` once more than present (over-signing), so a second `From:` added later breaks
//! the signature. The `DKIM-Signature:` header is prepended to the message.
//!
//! Signing an RSA-2048 key costs about a millisecond: [`sign_off_thread`] runs it on
//! tokio's blocking pool, a few at a time, so a shard keeps serving its other sessions.
//!
//! Messages held in pieces: [`MessageSigner`] is built from the header section alone
//! ([`Signers::signer_for`]); it signs a whole message ([`MessageSigner::sign`]) or one fed
//! in chunks ([`MessageSigner::stream`]: the headers are buffered, the body hashed as it
//! comes), with the same result.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use mail_auth::common::crypto::{
    Algorithm, CryptoError, DkimKey, Ed25519Key, RsaKey, Sha256, SigningKey,
};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner, DkimSigningStream, Done};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

/// `[dkim."example.com"]`: the key that signs mail whose `From:` domain is the table's name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimDomain {
    /// The selector (`s=`): the key is published at `SELECTOR._domainkey.DOMAIN`.
    pub selector: String,
    /// PEM PKCS#8 private key: RSA (at least 1024 bits; 2048 advised) or Ed25519.
    pub key_file: PathBuf,
}

/// Headers signed when present (RFC 6376 §5.4.1's list, and the mailing-list headers of
/// RFC 2369/2919/8058). `From` is also signed once more than present.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-ID",
    "Content-Description",
    "Resent-Date",
    "Resent-From",
    "Resent-Sender",
    "Resent-To",
    "Resent-Cc",
    "Resent-Message-ID",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
];

/// The smallest RSA key accepted (RFC 8301 §3.2: signers MUST use at least 1024 bits).
pub const MIN_RSA_BITS: usize = 1024;

/// A loaded private key, shared by the per-message signers.
enum LoadedKey {
    /// RSA of 2048 bits or more: signed by ring (the TLS stack's), several times faster
    /// than the pure-Rust `rsa` crate behind mail-auth's backend (measured in
    /// benches/results/dkim_2026-12-04.txt) and constant-time.
    RingRsa(ring::signature::RsaKeyPair),
    /// Ed25519, and RSA under 2048 bits (ring refuses those): mail-auth's backend.
    MailAuth(DkimKey),
}

impl LoadedKey {
    fn algorithm(&self) -> Algorithm {
        match self {
            LoadedKey::RingRsa(_) => Algorithm::RsaSha256,
            LoadedKey::MailAuth(k) => k.algorithm(),
        }
    }
}

/// The key in a form `mail-auth` takes by value, cheap to make for each message.
#[derive(Clone)]
struct SharedKey(Arc<LoadedKey>);

impl SigningKey for SharedKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        match &*self.0 {
            LoadedKey::MailAuth(k) => k.sign(input),
            LoadedKey::RingRsa(pair) => {
                // What is signed: the canonical headers and the signature's own header
                // (a few KiB at most); ring hashes it (SHA-256) and pads (PKCS#1 v1.5).
                let mut data = Vec::with_capacity(1024);
                input.write(&mut data);
                let mut sig = vec![0u8; pair.public().modulus_len()];
                let rng = ring::rand::SystemRandom::new();
                pair.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, &data, &mut sig)
                    .map_err(|_| {
                        mail_auth::Error::Crypto(CryptoError::Library(
                            "ring: RSA signing failed".into(),
                        ))
                    })?;
                Ok(sig)
            }
        }
    }

    fn algorithm(&self) -> Algorithm {
        self.0.algorithm()
    }
}

/// One domain's signing settings.
#[derive(Clone)]
struct DomainKey {
    domain: String,
    selector: String,
    key: SharedKey,
    description: String,
}

/// Every configured signing key, by `From:` domain (lower case).
#[derive(Default)]
pub struct Signers {
    domains: BTreeMap<String, DomainKey>,
}

impl std::fmt::Debug for Signers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self
            .domains
            .values()
            .map(|d| d.description.as_str())
            .collect();
        f.debug_struct("Signers").field("keys", &keys).finish()
    }
}

/// Signatures computed at once on the blocking pool, process-wide (every shard, every
/// reloaded key set): one per CPU; further messages wait their turn without a thread.
fn running() -> &'static Semaphore {
    static RUNNING: OnceLock<Semaphore> = OnceLock::new();
    RUNNING
        .get_or_init(|| Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get())))
}

impl Signers {
    /// Reads and checks every key of the `[dkim]` tables. The error names the table
    /// (`dkim."example.com"`), the file and what is wrong with it.
    pub fn load(config: &BTreeMap<String, DkimDomain>) -> Result<Signers, String> {
        let mut signers = Signers::default();
        for (domain, d) in config {
            let name = format!("dkim.{domain:?}");
            let key = load_key(&d.key_file)
                .map_err(|e| format!("{name}.key_file: {}: {e}", d.key_file.display()))?;
            let description = format!(
                "{domain} (s={}, {})",
                d.selector,
                match key.algorithm() {
                    Algorithm::Ed25519Sha256 => "ed25519-sha256",
                    _ => "rsa-sha256",
                }
            );
            signers.domains.insert(
                domain.to_ascii_lowercase(),
                DomainKey {
                    domain: domain.to_ascii_lowercase(),
                    selector: d.selector.clone(),
                    key: SharedKey(Arc::new(key)),
                    description,
                },
            );
        }
        Ok(signers)
    }

    /// No keys: nothing is signed.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// What is configured, one entry per domain: `example.com (s=s1, rsa-sha256)`.
    pub fn describe(&self) -> Vec<String> {
        self.domains
            .values()
            .map(|d| d.description.clone())
            .collect()
    }

    /// The signer for a message, from its header section (or the whole message; reading
    /// stops at the empty line): `Ok(None)` when its `From:` domain has no key,
    /// `Err` when it cannot be signed (see the module's doc).
    pub fn signer_for(&self, message: &[u8]) -> Result<Option<MessageSigner>, Unsignable> {
        if self.domains.is_empty() {
            return Ok(None);
        }
        let head = read_header_section(message)?;
        let Some(d) = self.domains.get(&head.from_domain) else {
            return Ok(None);
        };
        let mut names: Vec<&str> = SIGNED_HEADERS
            .iter()
            .copied()
            .filter(|n| head.names.iter().any(|h| h.eq_ignore_ascii_case(n)))
            .collect();
        // Listed twice: mail-auth signs every `From:` present for the first and, finding
        // none left for the second, lists it once more in h= (RFC 6376 §8.15).
        names.push("From");
        let signer = DkimSigner::from_key(d.key.clone())
            .domain(d.domain.clone())
            .selector(d.selector.clone())
            .headers(names)
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed);
        Ok(Some(MessageSigner {
            signer,
            domain: d.domain.clone(),
        }))
    }
}

/// Signs one message (or several with the same signed headers) for its `From:` domain.
pub struct MessageSigner {
    signer: DkimSigner<SharedKey, Done>,
    domain: String,
}

impl MessageSigner {
    /// The signing domain (`d=`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The `DKIM-Signature:` header (folded, ending in CRLF) for the whole message.
    pub fn sign(&self, message: &[u8]) -> Result<String, String> {
        self.signer
            .sign(message)
            .map(|s| s.to_header())
            .map_err(|e| e.to_string())
    }

    /// A signature over a message given in pieces, in order: the header section is
    /// buffered, the body hashed as it comes. [`SignStream::finish`] gives the same header
    /// as [`MessageSigner::sign`] over the concatenation.
    pub fn stream(&self) -> SignStream<'_> {
        SignStream {
            inner: self.signer.sign_streaming(),
        }
    }
}

/// A signature being computed over a message fed in chunks.
pub struct SignStream<'a> {
    inner: DkimSigningStream<'a, SharedKey>,
}

impl SignStream<'_> {
    /// The next piece of the message (lines may be split anywhere).
    pub fn write(&mut self, chunk: &[u8]) {
        self.inner.write(chunk);
    }

    /// The `DKIM-Signature:` header, ending in CRLF.
    pub fn finish(self) -> Result<String, String> {
        self.inner
            .finish()
            .map(|s| s.to_header())
            .map_err(|e| e.to_string())
    }
}

/// Why a message is relayed unsigned although signing is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unsignable {
    /// No `From:` header.
    NoFrom,
    /// More than one `From:` header.
    SeveralFrom(usize),
    /// A `From:` header whose address cannot be read, or that has several (or no)
    /// mailboxes.
    BadFrom(String),
    /// A header line that is neither `name: value` nor a continuation.
    BadHeader(String),
}

impl std::fmt::Display for Unsignable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unsignable::NoFrom => f.write_str("no From: header"),
            Unsignable::SeveralFrom(n) => write!(f, "{n} From: headers"),
            Unsignable::BadFrom(why) => write!(f, "From: header: {why}"),
            Unsignable::BadHeader(line) => write!(f, "unreadable header line {line:?}"),
        }
    }
}

/// What signing needs from a header section.
#[derive(Debug, PartialEq, Eq)]
struct HeaderSection {
    /// The domain of the single `From:` mailbox, lower case, without a final dot.
    from_domain: String,
    /// Every field name, in order.
    names: Vec<String>,
}

/// Reads the header section of `message` (up to the empty line, or the end).
fn read_header_section(message: &[u8]) -> Result<HeaderSection, Unsignable> {
    let mut names = Vec::new();
    let mut froms: Vec<Vec<u8>> = Vec::new();
    // The field the current continuation lines belong to (its index in `froms` if From).
    let mut in_from = false;
    let mut rest = message;
    let mut first = true;
    while !rest.is_empty() {
        let (line, next) = match memchr::memmem::find(rest, b"\r\n") {
            Some(i) => (&rest[..i], &rest[i + 2..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            if first {
                return Err(Unsignable::BadHeader(excerpt(line)));
            }
            if in_from {
                if let Some(v) = froms.last_mut() {
                    v.extend_from_slice(line);
                }
            }
            continue;
        }
        first = false;
        let colon = memchr::memchr(b':', line)
            .filter(|&i| i > 0 && line[..i].iter().all(|&b| (33..=126).contains(&b)))
            .ok_or_else(|| Unsignable::BadHeader(excerpt(line)))?;
        let name = String::from_utf8_lossy(&line[..colon]).into_owned();
        in_from = name.eq_ignore_ascii_case("From");
        if in_from {
            froms.push(line[colon + 1..].to_vec());
        }
        names.push(name);
    }
    let from = match froms.len() {
        0 => return Err(Unsignable::NoFrom),
        1 => &froms[0],
        n => return Err(Unsignable::SeveralFrom(n)),
    };
    let from_domain = from_domain(from).map_err(Unsignable::BadFrom)?;
    Ok(HeaderSection { from_domain, names })
}

/// The start of a line, for a log.
fn excerpt(line: &[u8]) -> String {
    String::from_utf8_lossy(&line[..line.len().min(60)]).into_owned()
}

/// The domain of the one mailbox in a `From:` value (RFC 5322 §3.4: `addr-spec`, or a
/// display name and `<addr-spec>`, comments anywhere), lower case, without a final dot.
fn from_domain(value: &[u8]) -> Result<String, String> {
    let mut quoted = false;
    let mut escaped = false;
    let mut comment = 0usize;
    let mut angle: Option<Vec<u8>> = None;
    let mut in_angle = false;
    let mut bare = Vec::new();
    for &b in value {
        if escaped {
            escaped = false;
            if in_angle {
                angle.get_or_insert_with(Vec::new).push(b);
            } else if comment == 0 {
                bare.push(b);
            }
            continue;
        }
        match b {
            b'\\' if quoted || comment > 0 => escaped = true,
            b'"' if comment == 0 => {
                quoted = !quoted;
                if in_angle {
                    angle.get_or_insert_with(Vec::new).push(b);
                } else {
                    bare.push(b);
                }
            }
            _ if quoted => {
                if in_angle {
                    angle.get_or_insert_with(Vec::new).push(b);
                } else {
                    bare.push(b);
                }
            }
            b'(' => comment += 1,
            b')' if comment > 0 => comment -= 1,
            _ if comment > 0 => {}
            b'<' if !in_angle => {
                if angle.is_some() {
                    return Err("more than one <address>".into());
                }
                in_angle = true;
                angle = Some(Vec::new());
            }
            b'>' if in_angle => in_angle = false,
            b',' if !in_angle => return Err("more than one mailbox".into()),
            _ if in_angle => angle.get_or_insert_with(Vec::new).push(b),
            _ => bare.push(b),
        }
    }
    if quoted || comment > 0 || in_angle {
        return Err("unbalanced quotes, comment or <address>".into());
    }
    let address = match angle {
        Some(a) => a,
        None => bare,
    };
    let address = String::from_utf8_lossy(&address);
    let address = address.trim();
    let domain = address
        .rsplit_once('@')
        .map(|(_, d)| d.trim().trim_end_matches('.'))
        .filter(|d| !d.is_empty() && !d.contains(|c: char| c.is_whitespace() || c == '"'))
        .ok_or_else(|| format!("no address with a domain in {address:?}"))?;
    Ok(domain.to_ascii_lowercase())
}

/// Reads and checks one key file.
fn load_key(path: &Path) -> Result<LoadedKey, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let der =
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("not a PEM private key ({e})"))?;
    let pkcs8 = match der {
        PrivateKeyDer::Pkcs8(k) => k,
        PrivateKeyDer::Pkcs1(_) => {
            return Err(
                "a PKCS#1 RSA key (BEGIN RSA PRIVATE KEY); PKCS#8 is required: \
                        openssl pkcs8 -topk8 -nocrypt -in OLD -out NEW"
                    .into(),
            )
        }
        PrivateKeyDer::Sec1(_) => {
            return Err("an EC (SEC1) key; DKIM signs with RSA or Ed25519 (PKCS#8)".into())
        }
        _ => return Err("not a PKCS#8 private key".into()),
    };
    let der = pkcs8.secret_pkcs8_der();
    match key_type(der) {
        Some(KeyType::Rsa) => {
            if let Ok(pair) = ring::signature::RsaKeyPair::from_pkcs8(der) {
                return Ok(LoadedKey::RingRsa(pair));
            }
            let key = RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(pkcs8.clone_key()))
                .map_err(|e| format!("unreadable RSA key ({e})"))?;
            let bits = rsa_public_bits(&key.public_key())
                .ok_or("unreadable RSA key (its modulus)".to_string())?;
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "an RSA key of {bits} bits; at least {MIN_RSA_BITS} are required \
                     (2048 advised)"
                ));
            }
            Ok(LoadedKey::MailAuth(DkimKey::Rsa(key)))
        }
        Some(KeyType::Ed25519) => Ed25519Key::from_pkcs8_maybe_unchecked_der(der)
            .map(|k| LoadedKey::MailAuth(DkimKey::Ed25519(k)))
            .map_err(|e| format!("unreadable Ed25519 key ({e})")),
        None => Err("an unsupported key type; DKIM signs with RSA or Ed25519".into()),
    }
}

enum KeyType {
    Rsa,
    Ed25519,
}

/// The algorithm of a PKCS#8 `PrivateKeyInfo` (RFC 5208): the OID of its
/// `privateKeyAlgorithm`, the first OID in the structure.
fn key_type(der: &[u8]) -> Option<KeyType> {
    // rsaEncryption 1.2.840.113549.1.1.1 and id-Ed25519 1.3.101.112 (RFC 8410), DER.
    const RSA: &[u8] = &[
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
    ];
    const ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
    let at = memchr::memchr(0x06, der)?;
    let head = &der[at..der.len().min(at + RSA.len())];
    if head.starts_with(RSA) {
        Some(KeyType::Rsa)
    } else if head.starts_with(ED25519) {
        Some(KeyType::Ed25519)
    } else {
        None
    }
}

/// The modulus size in bits of a PKCS#1 `RSAPublicKey` (DER: a SEQUENCE whose first
/// element is the INTEGER modulus).
fn rsa_public_bits(der: &[u8]) -> Option<usize> {
    fn header(b: &[u8], tag: u8) -> Option<(usize, &[u8])> {
        if *b.first()? != tag {
            return None;
        }
        let first = *b.get(1)? as usize;
        if first < 0x80 {
            return Some((first, b.get(2..)?));
        }
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let len = b
            .get(2..2 + n)?
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | x as usize);
        Some((len, b.get(2 + n..)?))
    }
    let (_, seq) = header(der, 0x30)?;
    let (len, rest) = header(seq, 0x02)?;
    let modulus = rest.get(..len)?;
    let start = modulus.iter().position(|&b| b != 0)?;
    let top = modulus[start];
    Some((modulus.len() - start) * 8 - top.leading_zeros() as usize)
}

/// The message as it should be stored: signed (the `DKIM-Signature:` header first) when
/// its `From:` domain has a key, as it is otherwise. The signature is computed on tokio's
/// blocking pool (at most one per CPU at a time), not on the calling shard. Unsignable
/// messages and failures are logged (warn) and stored unsigned.
pub async fn sign_off_thread(signers: &Arc<Signers>, id: &str, message: Bytes) -> Bytes {
    let signer = match signers.signer_for(&message) {
        Ok(Some(s)) => s,
        Ok(None) => return message,
        Err(why) => {
            tracing::warn!(%id, "DKIM: not signed: {why}");
            return message;
        }
    };
    let Ok(_permit) = running().acquire().await else {
        return message;
    };
    let content = message.clone();
    let signed = tokio::task::spawn_blocking(move || {
        let header = signer.sign(&content)?;
        let mut out = BytesMut::with_capacity(header.len() + content.len());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(&content);
        Ok::<_, String>((out.freeze(), signer.domain))
    })
    .await;
    match signed {
        Ok(Ok((out, domain))) => {
            tracing::debug!(%id, "DKIM: signed for {domain}");
            out
        }
        Ok(Err(e)) => {
            tracing::warn!(%id, "DKIM: not signed: {e}");
            message
        }
        Err(e) => {
            tracing::warn!(%id, "DKIM: not signed: the signing task failed: {e}");
            message
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_domain_forms() {
        let d = |v: &str| from_domain(v.as_bytes());
        assert_eq!(d(" a@Example.COM").unwrap(), "example.com");
        assert_eq!(d(" Bob <bob@example.com>").unwrap(), "example.com");
        assert_eq!(d(" \"Doe, John\" <j@example.com>").unwrap(), "example.com");
        assert_eq!(
            d(" \"x <y@evil.test>\" <j@example.com>").unwrap(),
            "example.com"
        );
        assert_eq!(d(" j@example.com (Doe, John)").unwrap(), "example.com");
        assert_eq!(d(" <j@example.com.>").unwrap(), "example.com");
        assert_eq!(d(" \"quoted@at\"@example.com").unwrap(), "example.com");
        assert!(d(" a@example.com, b@example.com").is_err());
        assert!(d(" <a@example.com> <b@example.com>").is_err());
        assert!(d(" Bob").is_err());
        assert!(d(" <>").is_err());
        assert!(d(" \"unbalanced <a@example.com>").is_err());
    }

    #[test]
    fn header_section_reading() {
        let m = b"Received: from x\r\n\tby y\r\nFrom: Bob\r\n <bob@Example.com>\r\nTo: a@b\r\n\r\nFrom: body@other.test\r\n";
        let h = read_header_section(m).unwrap();
        assert_eq!(h.from_domain, "example.com");
        assert_eq!(h.names, ["Received", "From", "To"]);
        assert_eq!(
            read_header_section(b"To: a@b\r\n\r\nFrom: x@y\r\n"),
            Err(Unsignable::NoFrom)
        );
        assert_eq!(
            read_header_section(b"From: a@b\r\nfrom: c@d\r\n\r\n"),
            Err(Unsignable::SeveralFrom(2))
        );
        assert!(matches!(
            read_header_section(b"From: a@b\r\nnot a header\r\n\r\n"),
            Err(Unsignable::BadHeader(_))
        ));
        assert!(matches!(
            read_header_section(b" From: a@b\r\n\r\n"),
            Err(Unsignable::BadHeader(_))
        ));
        // Headers only, no body.
        assert_eq!(
            read_header_section(b"From: a@b.test").unwrap().from_domain,
            "b.test"
        );
    }

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/dkim")
            .join(name)
    }

    fn signers(file: &str) -> Result<Signers, String> {
        let mut config = BTreeMap::new();
        config.insert(
            "Example.com".to_string(),
            DkimDomain {
                selector: "s1".into(),
                key_file: fixture(file),
            },
        );
        Signers::load(&config)
    }

    /// The value of tag `t` in a DKIM-Signature header (unfolded, spaces removed).
    fn tag(header: &str, t: &str) -> String {
        let flat: String = header
            .split_once(':')
            .unwrap()
            .1
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        flat.split(';')
            .find_map(|kv| kv.strip_prefix(&format!("{t}=")).map(str::to_string))
            .unwrap_or_default()
    }

    const MESSAGE: &[u8] = b"Received: from x by y\r\nFrom: Bob <bob@example.COM>\r\n\
        To: a@b.test\r\nSubject: hi\r\nX-Other: not signed\r\n\r\nHello  \r\nworld\r\n\r\n";

    #[test]
    fn signs_rsa_and_ed25519_with_from_oversigned() {
        // RSA-2048 signs through ring, RSA-1024 and Ed25519 through mail-auth's backend.
        for (file, a) in [
            ("rsa2048.pem", "rsa-sha256"),
            ("rsa1024.pem", "rsa-sha256"),
            ("ed25519.pem", "ed25519-sha256"),
        ] {
            let s = signers(file).unwrap();
            let signer = s.signer_for(MESSAGE).unwrap().unwrap();
            assert_eq!(signer.domain(), "example.com");
            let header = signer.sign(MESSAGE).unwrap();
            assert!(header.starts_with("DKIM-Signature:"), "{header}");
            assert!(header.ends_with("\r\n"), "{header}");
            assert_eq!(tag(&header, "a"), a);
            assert_eq!(tag(&header, "d"), "example.com");
            assert_eq!(tag(&header, "s"), "s1");
            assert_eq!(tag(&header, "c"), "relaxed/relaxed");
            assert_eq!(
                tag(&header, "h").to_ascii_lowercase(),
                "subject:to:from:from"
            );
            // The same message in pieces, split inside the header section and the body.
            let mut stream = signer.stream();
            for chunk in MESSAGE.chunks(7) {
                stream.write(chunk);
            }
            let streamed = stream.finish().unwrap();
            assert_eq!(tag(&streamed, "bh"), tag(&header, "bh"));
            assert_eq!(tag(&streamed, "h"), tag(&header, "h"));
        }
    }

    #[test]
    fn other_domains_and_subdomains_are_not_signed() {
        let s = signers("ed25519.pem").unwrap();
        let other = b"From: a@example.org\r\n\r\nx\r\n";
        assert!(s.signer_for(other).unwrap().is_none());
        let sub = b"From: a@news.example.com\r\n\r\nx\r\n";
        assert!(s.signer_for(sub).unwrap().is_none());
        assert!(Signers::default().signer_for(b"garbage").unwrap().is_none());
    }

    #[test]
    fn bad_keys_are_refused_with_domain_and_file() {
        let cases = [
            ("missing.pem", "cannot read"),
            ("not-pem.txt", "not a PEM private key"),
            ("rsa1024-pkcs1.pem", "PKCS#1"),
            ("rsa512.pem", "512 bits"),
            ("ec-p256.pem", "unsupported key type"),
        ];
        for (file, why) in cases {
            let e = signers(file).unwrap_err();
            assert!(e.starts_with("dkim.\"Example.com\".key_file: "), "{e}");
            assert!(e.contains(file), "{e}");
            assert!(e.contains(why), "{file}: {e}");
        }
        assert!(signers("rsa1024.pem").is_ok());
    }

    #[test]
    fn rsa_modulus_bits() {
        // SEQUENCE { INTEGER 0x00 0x80 0x01 (= 16 bits), INTEGER 3 }
        let der = [0x30, 0x08, 0x02, 0x03, 0x00, 0x80, 0x01, 0x02, 0x01, 0x03];
        assert_eq!(rsa_public_bits(&der), Some(16));
        assert_eq!(rsa_public_bits(&[0x30]), None);
    }
}
