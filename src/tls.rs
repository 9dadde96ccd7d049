//! TLS over our own buffers (sans-IO), for inbound STARTTLS and implicit TLS alike and for
//! outbound delivery: ciphertext in, plaintext out, and back. No socket is touched, so the
//! io_uring and epoll drivers move the bytes exactly as they do for plain SMTP.
//!
//! Built on rustls 0.23's buffered connection API (`read_tls`, `process_new_packets`,
//! `reader`, `writer`, `write_tls`) with the *ring* crypto provider (no C toolchain or
//! cmake needed, unlike aws-lc-rs). TLS 1.2 and 1.3 (RFC 5246, RFC 8446), rustls' safe
//! default cipher suites; STARTTLS itself is RFC 3207, implicit TLS on submission ports
//! RFC 8314.
//!
//! - [`TlsSession`]: one connection's TLS state, server or client side.
//! - [`server_config`]: the certificate chain and key from PEM files (`tls.cert_file`,
//!   `tls.key_file`), with errors that name the file.
//! - [`client_config`]: outbound, by Postfix's `smtp_tls_security_level` words
//!   ([`TlsLevel`]): `verify` checks the chain against Mozilla's root programme as bundled
//!   by the `webpki-roots` crate, plus the operator's `delivery.tls_ca_file`; `may` and
//!   `encrypt` accept any certificate, as opportunistic SMTP TLS does (RFC 7435), while
//!   still checking the handshake signatures with the server's key.
//!
//! Why bundled roots (`webpki-roots`) and not the system store (`rustls-native-certs`):
//! the relay then trusts the same anchors on every machine and in every container image,
//! including minimal ones with no `ca-certificates` package, and reads no file at startup
//! it was not told about. An operator who wants the distribution's store names it as
//! `delivery.tls_ca_file` (e.g. `/etc/ssl/certs/ca-certificates.crt`); the bundle moves
//! with the crate's releases.
//!
//! Build each config once (at startup or reload) and share the `Arc`: loading roots and
//! parsing keys is not per-connection work. Note that a shared config also shares rustls'
//! session-resumption cache (a mutex) between the shards that use it.
//!
//! The caller's duties, which this layer cannot do for it: after STARTTLS, discard every
//! plaintext byte received before the handshake began (CVE-2011-0411), and run the SMTP
//! session over [`TlsSession::take_plaintext`] only; after an error, still send what
//! [`TlsSession::take_tls_output`] holds (the alert), then close.

use std::fmt;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CipherSuite, ClientConfig, ClientConnection, Connection, DigitallySignedStruct,
    ProtocolVersion, RootCertStore, ServerConfig, ServerConnection, SignatureScheme,
};

/// Why TLS could not be set up, or broke.
#[derive(Debug)]
pub enum TlsError {
    /// A certificate, key or CA file could not be used: which file, and why.
    File {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it, for the operator.
        reason: String,
    },
    /// rustls refused the configuration (no usable protocol version or cipher suite).
    Config(rustls::Error),
    /// A next hop's name that cannot be a TLS server name.
    ServerName(String),
    /// The peer broke the protocol or the handshake failed (a certificate refused, no
    /// cipher in common, garbage instead of records). Close the connection, after sending
    /// what [`TlsSession::take_tls_output`] holds.
    Protocol(rustls::Error),
    /// rustls' record buffer refused the input (a record larger than TLS allows).
    Buffer(String),
    /// Plaintext offered after [`TlsSession::send_close_notify`].
    Closed,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::File { path, reason } => write!(f, "{}: {reason}", path.display()),
            TlsError::Config(e) => write!(f, "TLS configuration refused: {e}"),
            TlsError::ServerName(name) => write!(f, "{name:?} cannot be a TLS server name"),
            TlsError::Protocol(e) => write!(f, "TLS: {e}"),
            TlsError::Buffer(e) => write!(f, "TLS record buffer: {e}"),
            TlsError::Closed => f.write_str("TLS: data sent after close_notify"),
        }
    }
}

impl std::error::Error for TlsError {}

/// How hard outbound delivery insists on TLS: Postfix's `smtp_tls_security_level` words,
/// as `delivery.tls` and `delivery.tls_policy` take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsLevel {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, any certificate; plaintext when not offered (and, as Postfix
    /// does, plaintext again when the handshake fails).
    May,
    /// STARTTLS required (defer when not offered), any certificate.
    Encrypt,
    /// STARTTLS required and the certificate must chain to a trusted root and match the
    /// next hop's name.
    Verify,
}

impl TlsLevel {
    /// The level named `word` (`none`, `may`, `encrypt`, `verify`; case-insensitive).
    pub fn parse(word: &str) -> Option<TlsLevel> {
        [
            TlsLevel::None,
            TlsLevel::May,
            TlsLevel::Encrypt,
            TlsLevel::Verify,
        ]
        .into_iter()
        .find(|level| level.name().eq_ignore_ascii_case(word))
    }

    /// The level's word, as in the config.
    pub fn name(self) -> &'static str {
        match self {
            TlsLevel::None => "none",
            TlsLevel::May => "may",
            TlsLevel::Encrypt => "encrypt",
            TlsLevel::Verify => "verify",
        }
    }

    /// True for `encrypt` and `verify`: without TLS, the delivery must not go ahead.
    pub fn requires_tls(self) -> bool {
        matches!(self, TlsLevel::Encrypt | TlsLevel::Verify)
    }
}

/// The crypto provider every config here uses: *ring*, whatever else the process has.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config from a PEM certificate chain (leaf first) and a PEM private key
/// (PKCS#8, PKCS#1 or SEC1; the two may be the same file). Errors name the file: missing
/// or unreadable, no certificate, no key, a key that does not match the certificate.
pub fn server_config(cert_pem: &Path, key_pem: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = read_certificates(cert_pem)?;
    let key = PrivateKeyDer::from_pem_file(key_pem).map_err(|e| {
        file_error(
            key_pem,
            match e {
                pem::Error::NoItemsFound => {
                    "no private key in it (expected a PEM \"PRIVATE KEY\" block)".to_string()
                }
                pem::Error::Io(e) => format!("cannot read the key file: {e}"),
                other => format!("bad PEM: {other}"),
            },
        )
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => file_error(
                key_pem,
                format!(
                    "the private key does not match the certificate in {}",
                    cert_pem.display()
                ),
            ),
            rustls::Error::InvalidCertificate(e) => {
                file_error(cert_pem, format!("unusable certificate: {e}"))
            }
            other => file_error(key_pem, format!("unusable private key: {other}")),
        })?;
    Ok(Arc::new(config))
}

/// The client config for outbound delivery at `level`: `None` for [`TlsLevel::None`].
/// `extra_ca_file` (PEM, one or more CA certificates) adds trust anchors for
/// [`TlsLevel::Verify`] beside the bundled roots; the other levels ignore it.
pub fn client_config(
    level: TlsLevel,
    extra_ca_file: Option<&Path>,
) -> Result<Option<Arc<ClientConfig>>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?;
    let config = match level {
        TlsLevel::None => return Ok(None),
        TlsLevel::May | TlsLevel::Encrypt => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth(),
        TlsLevel::Verify => {
            let mut roots = RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            if let Some(path) = extra_ca_file {
                for cert in read_certificates(path)? {
                    roots.add(cert).map_err(|e| {
                        file_error(path, format!("not a usable CA certificate: {e}"))
                    })?;
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(Arc::new(config)))
}

/// Every certificate in a PEM file; at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| match e {
            pem::Error::Io(e) => file_error(path, format!("cannot read the certificate file: {e}")),
            other => file_error(path, format!("bad PEM: {other}")),
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(
            path,
            "no certificate in it (expected a PEM \"CERTIFICATE\" block)".into(),
        ));
    }
    Ok(certs)
}

fn file_error(path: &Path, reason: String) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason,
    }
}

/// Opportunistic TLS (RFC 7435): any certificate is taken, since an MX host's name is not
/// authenticated anyway without DNSSEC/DANE or MTA-STS, and refusing would only push the
/// mail to plaintext. The handshake signatures are still checked against the
/// certificate's key, so the peer must hold the key of the certificate it shows.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One connection's TLS, server or client side: ciphertext from the peer goes in through
/// [`receive_tls`](Self::receive_tls), plaintext comes out of
/// [`take_plaintext`](Self::take_plaintext); plaintext to send goes in through
/// [`send_plaintext`](Self::send_plaintext), ciphertext comes out of
/// [`take_tls_output`](Self::take_tls_output).
///
/// A driver's turn: read from the socket, `receive_tls`, `take_plaintext` into the SMTP
/// session, hand the session's output to `send_plaintext`, then write whatever
/// `take_tls_output` gives (handshake messages too: call it after every `receive_tls`,
/// even while [`is_handshaking`](Self::is_handshaking)).
///
/// Buffers: plaintext given to `send_plaintext` is never refused (rustls' own limit is
/// lifted), so the caller bounds it by draining `take_tls_output` each turn; received
/// plaintext is at most what the ciphertext given to `receive_tls` held.
pub struct TlsSession {
    conn: Connection,
    /// Decrypted bytes not yet taken.
    plaintext: BytesMut,
    /// The peer sent close_notify.
    peer_closed: bool,
    /// We sent close_notify.
    close_sent: bool,
}

impl fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSession")
            .field("server", &matches!(self.conn, Connection::Server(_)))
            .field("handshaking", &self.conn.is_handshaking())
            .field("protocol", &self.protocol_version())
            .field("cipher_suite", &self.cipher_suite())
            .field("plaintext_pending", &self.plaintext.len())
            .field("peer_closed", &self.peer_closed)
            .field("close_sent", &self.close_sent)
            .finish()
    }
}

impl TlsSession {
    /// The server side of a new connection (after `220 Ready to start TLS`, or at once on
    /// an implicit-TLS listener).
    pub fn server(config: Arc<ServerConfig>) -> Result<TlsSession, TlsError> {
        let conn = ServerConnection::new(config).map_err(TlsError::Config)?;
        Ok(TlsSession::wrap(conn.into()))
    }

    /// The client side, towards `server_name`: the next hop's host name (checked against
    /// its certificate at [`TlsLevel::Verify`], and sent as SNI) or an IP address literal.
    /// A trailing dot is allowed.
    pub fn client(config: Arc<ClientConfig>, server_name: &str) -> Result<TlsSession, TlsError> {
        let bare = server_name.strip_suffix('.').unwrap_or(server_name);
        let name = ServerName::try_from(bare.to_string())
            .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
        let conn = ClientConnection::new(config, name).map_err(TlsError::Config)?;
        Ok(TlsSession::wrap(conn.into()))
    }

    fn wrap(mut conn: Connection) -> TlsSession {
        // We bound what we queue ourselves (see the type's doc); rustls' default limit
        // would make a large write silently partial.
        conn.set_buffer_limit(None);
        TlsSession {
            conn,
            plaintext: BytesMut::new(),
            peer_closed: false,
            close_sent: false,
        }
    }

    /// Feeds ciphertext received from the peer and processes every complete record in it:
    /// handshake messages advance the handshake (answers then wait in
    /// [`take_tls_output`](Self::take_tls_output)), application data waits in
    /// [`take_plaintext`](Self::take_plaintext). A partial record is kept for the next
    /// call, so any split of the input is fine.
    ///
    /// Returns how many bytes were taken: all of `input`, until the peer's close_notify
    /// has been seen; from then on none (and bytes that came behind the close_notify in
    /// the same call are ignored). An error is final: send what `take_tls_output` holds
    /// (an alert), then close.
    pub fn receive_tls(&mut self, input: &[u8]) -> Result<usize, TlsError> {
        let mut rest = input;
        while !rest.is_empty() {
            // `read_tls` advances `rest` past what it took.
            let n = self
                .conn
                .read_tls(&mut rest)
                .map_err(|e| TlsError::Buffer(e.to_string()))?;
            if n == 0 {
                break;
            }
            let state = self
                .conn
                .process_new_packets()
                .map_err(TlsError::Protocol)?;
            if state.peer_has_closed() {
                self.peer_closed = true;
            }
            // Emptied at once, so rustls' own plaintext limit never stops `read_tls`.
            self.drain_plaintext();
        }
        Ok(input.len() - rest.len())
    }

    /// Moves what rustls decrypted into our buffer.
    fn drain_plaintext(&mut self) {
        let mut reader = self.conn.reader();
        loop {
            match reader.fill_buf() {
                Ok([]) => {
                    // A clean end of stream: close_notify was received.
                    self.peer_closed = true;
                    break;
                }
                Ok(chunk) => {
                    let n = chunk.len();
                    self.plaintext.extend_from_slice(chunk);
                    reader.consume(n);
                }
                // WouldBlock: nothing more for now. UnexpectedEof cannot happen here
                // (we never hand rustls an end of input), and is the caller's to see.
                Err(_) => break,
            }
        }
    }

    /// Appends the plaintext received so far to `out`; returns how many bytes.
    pub fn take_plaintext(&mut self, out: &mut BytesMut) -> usize {
        let n = self.plaintext.len();
        out.extend_from_slice(&self.plaintext);
        self.plaintext.clear();
        n
    }

    /// Queues plaintext to send to the peer (held until the handshake completes, then
    /// encrypted). Fails only after [`send_close_notify`](Self::send_close_notify).
    pub fn send_plaintext(&mut self, data: &[u8]) -> Result<(), TlsError> {
        if self.close_sent {
            return Err(TlsError::Closed);
        }
        self.conn
            .writer()
            .write_all(data)
            .map_err(|e| TlsError::Buffer(e.to_string()))
    }

    /// Appends the ciphertext waiting to be sent (handshake messages, records, alerts) to
    /// `out`; returns how many bytes.
    pub fn take_tls_output(&mut self, out: &mut BytesMut) -> usize {
        let before = out.len();
        let mut writer = out.writer();
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut writer) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        writer.into_inner().len() - before
    }

    /// True when ciphertext waits for [`take_tls_output`](Self::take_tls_output).
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// True until the handshake has completed.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// True once the peer sent close_notify: no more plaintext will come (the plaintext
    /// before it may still wait in [`take_plaintext`](Self::take_plaintext)).
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Queues a close_notify alert (for [`take_tls_output`](Self::take_tls_output)); no
    /// plaintext can be sent after it.
    pub fn send_close_notify(&mut self) {
        self.close_sent = true;
        self.conn.send_close_notify();
    }

    /// The negotiated protocol, as the Received: header and logs name it (`TLSv1.3`,
    /// `TLSv1.2`); `None` before the handshake has got that far.
    pub fn protocol_version(&self) -> Option<&'static str> {
        self.conn.protocol_version().map(|v| match v {
            ProtocolVersion::TLSv1_3 => "TLSv1.3",
            ProtocolVersion::TLSv1_2 => "TLSv1.2",
            ProtocolVersion::TLSv1_1 => "TLSv1.1",
            ProtocolVersion::TLSv1_0 => "TLSv1",
            _ => "TLS",
        })
    }

    /// The negotiated cipher suite by its IANA name (`TLS_AES_256_GCM_SHA384`,
    /// `TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`), as OpenSSL-based MTAs print it in
    /// Received: headers; `None` before it is chosen.
    pub fn cipher_suite(&self) -> Option<&'static str> {
        let suite = self.conn.negotiated_cipher_suite()?.suite();
        // rustls prefixes its TLS 1.3 names with TLS13_; the registry's names do not.
        match suite {
            CipherSuite::TLS13_AES_128_GCM_SHA256 => Some("TLS_AES_128_GCM_SHA256"),
            CipherSuite::TLS13_AES_256_GCM_SHA384 => Some("TLS_AES_256_GCM_SHA384"),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some("TLS_CHACHA20_POLY1305_SHA256"),
            other => other.as_str(),
        }
    }

    /// Server side: the name the client asked for (SNI), if it sent one.
    pub fn sni(&self) -> Option<&str> {
        match &self.conn {
            Connection::Server(server) => server.server_name(),
            Connection::Client(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use std::sync::OnceLock;

    /// A CA and a leaf for `mx.example.test` signed by it, as PEM, made once per test run.
    struct Pki {
        ca_pem: String,
        leaf_pem: String,
        leaf_key_pem: String,
        other_key_pem: String,
    }

    fn pki() -> &'static Pki {
        static PKI: OnceLock<Pki> = OnceLock::new();
        PKI.get_or_init(|| {
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "ringrelay test CA");
            let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
            let leaf_key = KeyPair::generate().unwrap();
            let leaf = CertificateParams::new(vec!["mx.example.test".to_string()])
                .unwrap()
                .signed_by(&leaf_key, &*ca)
                .unwrap();
            Pki {
                ca_pem: ca.pem(),
                leaf_pem: leaf.pem(),
                leaf_key_pem: leaf_key.serialize_pem(),
                other_key_pem: KeyPair::generate().unwrap().serialize_pem(),
            }
        })
    }

    /// Files in a temporary directory, kept alive with it.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Files {
            Files {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    fn test_server_config() -> Arc<ServerConfig> {
        let files = Files::new();
        let cert = files.write("cert.pem", &pki().leaf_pem);
        let key = files.write("key.pem", &pki().leaf_key_pem);
        server_config(&cert, &key).unwrap()
    }

    fn opportunistic() -> Arc<ClientConfig> {
        client_config(TlsLevel::May, None).unwrap().unwrap()
    }

    /// Moves bytes both ways until neither side has anything to send. Returns the number
    /// of rounds, or the first error (with the side that failed).
    fn pump(
        client: &mut TlsSession,
        server: &mut TlsSession,
    ) -> Result<usize, (&'static str, TlsError)> {
        for round in 0..100 {
            let mut to_server = BytesMut::new();
            client.take_tls_output(&mut to_server);
            let mut to_client = BytesMut::new();
            if !to_server.is_empty() {
                server.receive_tls(&to_server).map_err(|e| ("server", e))?;
            }
            server.take_tls_output(&mut to_client);
            if !to_client.is_empty() {
                client.receive_tls(&to_client).map_err(|e| ("client", e))?;
            }
            if to_server.is_empty() && to_client.is_empty() && !client.wants_write() {
                return Ok(round);
            }
        }
        panic!("no quiet after 100 rounds");
    }

    fn connected(client_config: Arc<ClientConfig>) -> (TlsSession, TlsSession) {
        let mut client = TlsSession::client(client_config, "mx.example.test").unwrap();
        let mut server = TlsSession::server(test_server_config()).unwrap();
        pump(&mut client, &mut server).unwrap();
        assert!(!client.is_handshaking() && !server.is_handshaking());
        (client, server)
    }

    fn plaintext(session: &mut TlsSession) -> Vec<u8> {
        let mut out = BytesMut::new();
        session.take_plaintext(&mut out);
        out.to_vec()
    }

    #[test]
    fn handshake_and_data_both_ways() {
        let (mut client, mut server) = connected(opportunistic());
        assert_eq!(client.protocol_version(), Some("TLSv1.3"));
        assert_eq!(server.protocol_version(), Some("TLSv1.3"));
        let suite = server.cipher_suite().unwrap();
        assert!(
            suite.starts_with("TLS_") && !suite.starts_with("TLS13_"),
            "{suite}"
        );
        assert_eq!(client.cipher_suite(), Some(suite));
        assert_eq!(server.sni(), Some("mx.example.test"));

        server
            .send_plaintext(b"220 mx.example.test ESMTP\r\n")
            .unwrap();
        pump(&mut client, &mut server).unwrap();
        assert_eq!(plaintext(&mut client), b"220 mx.example.test ESMTP\r\n");
        client.send_plaintext(b"EHLO client\r\n").unwrap();
        client.send_plaintext(b"QUIT\r\n").unwrap();
        pump(&mut client, &mut server).unwrap();
        assert_eq!(plaintext(&mut server), b"EHLO client\r\nQUIT\r\n");
        assert!(plaintext(&mut server).is_empty());
        assert!(!server.peer_closed() && !client.peer_closed());
    }

    #[test]
    fn plaintext_queued_during_the_handshake_is_sent_after_it() {
        let mut client = TlsSession::client(opportunistic(), "mx.example.test").unwrap();
        let mut server = TlsSession::server(test_server_config()).unwrap();
        client.send_plaintext(b"EHLO early\r\n").unwrap();
        pump(&mut client, &mut server).unwrap();
        assert_eq!(plaintext(&mut server), b"EHLO early\r\n");
    }

    #[test]
    fn byte_by_byte_handshake() {
        let mut client = TlsSession::client(opportunistic(), "mx.example.test").unwrap();
        let mut server = TlsSession::server(test_server_config()).unwrap();
        client.send_plaintext(b"hello").unwrap();
        for _ in 0..10 {
            let mut out = BytesMut::new();
            client.take_tls_output(&mut out);
            for b in out.chunks(1) {
                assert_eq!(server.receive_tls(b).unwrap(), 1);
            }
            let mut back = BytesMut::new();
            server.take_tls_output(&mut back);
            for b in back.chunks(1) {
                assert_eq!(client.receive_tls(b).unwrap(), 1);
            }
        }
        assert!(!server.is_handshaking() && !client.is_handshaking());
        assert_eq!(plaintext(&mut server), b"hello");
    }

    #[test]
    fn truncated_client_hello_waits_for_more() {
        let mut client = TlsSession::client(opportunistic(), "mx.example.test").unwrap();
        let mut server = TlsSession::server(test_server_config()).unwrap();
        let mut hello = BytesMut::new();
        client.take_tls_output(&mut hello);
        assert!(hello.len() > 20);
        let (head, tail) = hello.split_at(hello.len() - 7);
        assert_eq!(server.receive_tls(head).unwrap(), head.len());
        assert!(server.is_handshaking());
        assert!(!server.wants_write());
        assert_eq!(server.protocol_version(), None);
        assert_eq!(server.cipher_suite(), None);
        server.receive_tls(tail).unwrap();
        assert!(
            server.wants_write(),
            "the ServerHello is ready once the hello is whole"
        );
    }

    #[test]
    fn garbage_first_flight_is_an_error_with_an_alert() {
        let mut server = TlsSession::server(test_server_config()).unwrap();
        let got = server.receive_tls(b"EHLO client.example\r\n");
        assert!(matches!(got, Err(TlsError::Protocol(_))), "{got:?}");
        let mut alert = BytesMut::new();
        server.take_tls_output(&mut alert);
        // Nothing panics afterwards either; the session stays failed.
        assert!(server.receive_tls(b"more").is_err());
        assert!(plaintext(&mut server).is_empty());

        let mut client = TlsSession::client(opportunistic(), "mx.example.test").unwrap();
        let mut hello = BytesMut::new();
        client.take_tls_output(&mut hello);
        let got = client.receive_tls(b"220 plain text, not TLS\r\n");
        assert!(matches!(got, Err(TlsError::Protocol(_))), "{got:?}");
    }

    #[test]
    fn a_record_header_announcing_too_much_is_refused() {
        let mut server = TlsSession::server(test_server_config()).unwrap();
        // A handshake record claiming 0xffff bytes: more than TLS allows.
        let got = server.receive_tls(&[0x16, 0x03, 0x01, 0xff, 0xff, 0x01]);
        assert!(got.is_err(), "{got:?}");
    }

    #[test]
    fn close_notify_is_seen_after_the_data_before_it() {
        let (mut client, mut server) = connected(opportunistic());
        client.send_plaintext(b"QUIT\r\n").unwrap();
        client.send_close_notify();
        assert!(matches!(
            client.send_plaintext(b"more"),
            Err(TlsError::Closed)
        ));
        let mut out = BytesMut::new();
        client.take_tls_output(&mut out);
        // Bytes behind the close_notify are ignored, and once it was seen nothing more
        // is read.
        let mut input = out.to_vec();
        input.extend_from_slice(b"trailing junk");
        server.receive_tls(&input).unwrap();
        assert!(server.peer_closed());
        assert_eq!(plaintext(&mut server), b"QUIT\r\n");
        assert_eq!(server.receive_tls(b"x").unwrap(), 0);
        // And the other way.
        server.send_close_notify();
        let mut back = BytesMut::new();
        server.take_tls_output(&mut back);
        client.receive_tls(&back).unwrap();
        assert!(client.peer_closed());
    }

    #[test]
    fn a_megabyte_in_one_go() {
        let (mut client, mut server) = connected(opportunistic());
        let data: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
        client.send_plaintext(&data).unwrap();
        let mut wire = BytesMut::new();
        client.take_tls_output(&mut wire);
        assert!(wire.len() > data.len());
        // All the ciphertext at once: more than rustls buffers by default.
        assert_eq!(server.receive_tls(&wire).unwrap(), wire.len());
        assert_eq!(plaintext(&mut server), data);
    }

    #[test]
    fn tls12_names() {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
            .with_no_client_auth();
        let (client, server) = connected(Arc::new(config));
        assert_eq!(server.protocol_version(), Some("TLSv1.2"));
        let suite = client.cipher_suite().unwrap();
        assert!(suite.starts_with("TLS_ECDHE_"), "{suite}");
        assert_eq!(server.cipher_suite(), Some(suite));
    }

    #[test]
    fn verify_accepts_a_chain_to_the_extra_ca() {
        let files = Files::new();
        let ca = files.write("ca.pem", &pki().ca_pem);
        let verify = client_config(TlsLevel::Verify, Some(&ca)).unwrap().unwrap();
        let (mut client, mut server) = connected(verify.clone());
        client.send_plaintext(b"ok").unwrap();
        pump(&mut client, &mut server).unwrap();
        assert_eq!(plaintext(&mut server), b"ok");

        // The wrong name: refused.
        let mut client = TlsSession::client(verify, "other.example.test").unwrap();
        let mut server = TlsSession::server(test_server_config()).unwrap();
        let (side, e) = pump(&mut client, &mut server).unwrap_err();
        assert_eq!(side, "client");
        assert!(
            matches!(e, TlsError::Protocol(rustls::Error::InvalidCertificate(_))),
            "{e}"
        );
    }

    #[test]
    fn verify_without_the_ca_refuses_the_certificate() {
        let verify = client_config(TlsLevel::Verify, None).unwrap().unwrap();
        let mut client = TlsSession::client(verify, "mx.example.test").unwrap();
        let mut server = TlsSession::server(test_server_config()).unwrap();
        let (side, e) = pump(&mut client, &mut server).unwrap_err();
        assert_eq!(side, "client");
        assert!(
            matches!(
                e,
                TlsError::Protocol(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                ))
            ),
            "{e}"
        );
    }

    #[test]
    fn opportunistic_levels_accept_any_certificate_and_none_has_no_config() {
        assert!(client_config(TlsLevel::None, None).unwrap().is_none());
        for level in [TlsLevel::May, TlsLevel::Encrypt] {
            let config = client_config(level, None).unwrap().unwrap();
            // Any name at all, even one the certificate does not carry, or an address.
            for name in ["unrelated.example", "192.0.2.7", "mx.example.test."] {
                let mut client = TlsSession::client(config.clone(), name).unwrap();
                let mut server = TlsSession::server(test_server_config()).unwrap();
                pump(&mut client, &mut server).unwrap();
                assert!(!client.is_handshaking());
            }
        }
    }

    #[test]
    fn bad_server_names() {
        for name in ["", "bad name", "a..b", "."] {
            let got = TlsSession::client(opportunistic(), name);
            assert!(matches!(got, Err(TlsError::ServerName(_))), "{name:?}");
        }
    }

    #[test]
    fn levels_by_name() {
        assert_eq!(TlsLevel::parse("may"), Some(TlsLevel::May));
        assert_eq!(TlsLevel::parse("VERIFY"), Some(TlsLevel::Verify));
        assert_eq!(TlsLevel::parse("none"), Some(TlsLevel::None));
        assert_eq!(TlsLevel::parse("encrypt"), Some(TlsLevel::Encrypt));
        assert_eq!(TlsLevel::parse("secure"), None);
        assert!(TlsLevel::Encrypt.requires_tls() && TlsLevel::Verify.requires_tls());
        assert!(!TlsLevel::May.requires_tls() && !TlsLevel::None.requires_tls());
    }

    #[test]
    fn server_config_errors_name_the_file() {
        let files = Files::new();
        let cert = files.write("cert.pem", &pki().leaf_pem);
        let key = files.write("key.pem", &pki().leaf_key_pem);
        let other_key = files.write("other.pem", &pki().other_key_pem);
        let empty = files.write("empty.pem", "");
        let garbage = files.write("garbage.pem", "-----BEGIN CERTIFICATE-----\n!!!!\n");
        let both = files.write(
            "both.pem",
            &format!("{}{}", pki().leaf_pem, pki().leaf_key_pem),
        );
        let missing = files.dir.path().join("missing.pem");

        let err = |c: &Path, k: &Path| match server_config(c, k) {
            Err(TlsError::File { path, reason }) => (path, reason),
            other => panic!("expected a file error, got {other:?}"),
        };
        let (path, reason) = err(&missing, &key);
        assert_eq!(path, missing);
        assert!(
            reason.starts_with("cannot read the certificate file"),
            "{reason}"
        );
        let (path, reason) = err(&cert, &missing);
        assert_eq!(path, missing);
        assert!(reason.starts_with("cannot read the key file"), "{reason}");
        let (path, reason) = err(&empty, &key);
        assert_eq!(path, empty);
        assert!(reason.starts_with("no certificate"), "{reason}");
        let (path, reason) = err(&key, &key);
        assert_eq!(path, key);
        assert!(reason.starts_with("no certificate"), "{reason}");
        let (path, reason) = err(&cert, &cert);
        assert_eq!(path, cert);
        assert!(reason.starts_with("no private key"), "{reason}");
        let (path, reason) = err(&cert, &other_key);
        assert_eq!(path, other_key);
        assert_eq!(
            reason,
            format!(
                "the private key does not match the certificate in {}",
                cert.display()
            )
        );
        let (path, reason) = err(&garbage, &key);
        assert_eq!(path, garbage);
        assert!(reason.starts_with("bad PEM"), "{reason}");
        // A message an operator can read, naming the file.
        let e = server_config(&empty, &key).unwrap_err().to_string();
        assert!(e.starts_with(&empty.display().to_string()), "{e}");
        // Certificate and key in one file is fine.
        assert!(server_config(&both, &both).is_ok());
    }

    #[test]
    fn extra_ca_file_errors_name_the_file() {
        let files = Files::new();
        let missing = files.dir.path().join("nope.pem");
        match client_config(TlsLevel::Verify, Some(&missing)) {
            Err(TlsError::File { path, .. }) => assert_eq!(path, missing),
            other => panic!("{other:?}"),
        }
        let no_certs = files.write("key.pem", &pki().other_key_pem);
        match client_config(TlsLevel::Verify, Some(&no_certs)) {
            Err(TlsError::File { path, reason }) => {
                assert_eq!(path, no_certs);
                assert!(reason.starts_with("no certificate"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        // The opportunistic levels never read it.
        assert!(client_config(TlsLevel::May, Some(&missing))
            .unwrap()
            .is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Random bytes to a server, in random pieces: an error or a wait, never a panic.
        #[test]
        fn garbage_never_panics(
            input in proptest::collection::vec(any::<u8>(), 0..600),
            cut in any::<usize>(),
            handshake_prefix in any::<bool>(),
        ) {
            let mut server = TlsSession::server(test_server_config()).unwrap();
            let mut bytes = if handshake_prefix { vec![0x16, 0x03, 0x01, 0x01, 0x00] } else { Vec::new() };
            bytes.extend_from_slice(&input);
            let cut = if bytes.is_empty() { 0 } else { cut % bytes.len() };
            let (a, b) = bytes.split_at(cut);
            if server.receive_tls(a).is_ok() {
                let _ = server.receive_tls(b);
            }
            let mut out = BytesMut::new();
            server.take_tls_output(&mut out);
            let _ = plaintext(&mut server);
        }
    }
}
