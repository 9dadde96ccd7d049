//! TLS settings for STARTTLS (RFC 3207): the client configuration `send --starttls` uses and
//! the server configuration `sink --tls-cert/--tls-key` loads from PEM files. Both run on
//! rustls with the ring provider. By default the client checks no certificate, because load
//! tests run against self-signed ones; it still checks that the server holds the key of the
//! certificate it shows (the handshake signature), so the handshake costs what a real one
//! does. `--tls-verify` checks certificates against the Mozilla roots and `--tls-ca`.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::path::Path;
use std::sync::Arc;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts any certificate chain, but verifies handshake signatures with the provider's
/// algorithms: no identity check, full cryptographic cost.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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

/// Reads every certificate in a PEM file; an error names the file.
fn read_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bad = |e: &dyn std::fmt::Display| format!("invalid {flag} {}: {e}", path.display());
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no CERTIFICATE section"));
    }
    Ok(certs)
}

/// The client configuration for `send --starttls`. With `verify` (or a `ca` file), the
/// server's certificate must chain to the Mozilla roots or to a certificate in `ca`, and
/// match the host name of `--target`; without, any certificate is accepted.
pub fn client_config(verify: bool, ca: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let p = provider();
    let builder = ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let config = if verify || ca.is_some() {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = ca {
            for c in read_certs("--tls-ca", ca)? {
                roots
                    .add(c)
                    .map_err(|e| format!("invalid --tls-ca {}: {e}", ca.display()))?;
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(p)))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// The sink's server configuration: a PEM certificate chain (leaf first) and its private
/// key (PKCS#8, PKCS#1 or SEC1).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let certs = read_certs("--tls-cert", cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("invalid --tls-key {}: {e}", key.display()))?;
    server_config_from(certs, key)
}

/// The sink's server configuration from a decoded chain and key.
pub fn server_config_from(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, String> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("--tls-cert/--tls-key do not make a usable pair: {e}"))?;
    Ok(Arc::new(config))
}

/// The name the client expects in the server's certificate: the host part of `--target`
/// (an IP address is matched against the certificate's IP addresses).
pub fn server_name(target: &str) -> Result<ServerName<'static>, String> {
    let host = match target.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
        None => target,
    };
    ServerName::try_from(host.to_string())
        .map_err(|e| format!("invalid host name in --target '{target}': {e}"))
}
