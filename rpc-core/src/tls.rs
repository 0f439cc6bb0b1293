//! TLS configuration (rustls, ring provider) from PEM files. The connection driver is generic over
//! the byte stream, so a TLS stream runs through the same driver as plain TCP; socket options are
//! set on the TCP socket underneath before the TLS handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// Client-side TLS: which CAs to trust, and an optional client certificate for mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(deny_unknown_fields)
)]
pub struct TlsClientConfig {
    /// PEM file with the CA certificates that sign the servers' certificates.
    pub ca_file: PathBuf,
    /// PEM certificate chain presented to servers that require client certificates.
    #[cfg_attr(feature = "serde", serde(default))]
    pub cert_file: Option<PathBuf>,
    /// PEM private key for `cert_file`.
    #[cfg_attr(feature = "serde", serde(default))]
    pub key_file: Option<PathBuf>,
    /// Name to verify the server's certificate against. Default: the endpoint's IP address.
    #[cfg_attr(feature = "serde", serde(default))]
    pub server_name: Option<String>,
    /// Not a setting: struct literals outside tether must end in `..Default::default()` (or
    /// start from a constructor), so adding a setting is not a breaking change.
    #[doc(hidden)]
    #[cfg_attr(feature = "serde", serde(skip))]
    pub __non_exhaustive: (),
}

/// Server-side TLS: the server's certificate and key, and optionally the CAs whose client
/// certificates it requires (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(deny_unknown_fields)
)]
pub struct TlsServerConfig {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, every client must present a certificate they sign.
    #[cfg_attr(feature = "serde", serde(default))]
    pub client_ca_file: Option<PathBuf>,
    /// Time allowed for the TLS handshake of an accepted connection. Default 10 s.
    #[cfg_attr(
        feature = "serde",
        serde(default = "default_handshake_timeout", with = "humantime_serde")
    )]
    pub handshake_timeout: Duration,
    /// Not a setting: struct literals outside tether must end in `..Default::default()` (or
    /// start from a constructor), so adding a setting is not a breaking change.
    #[doc(hidden)]
    #[cfg_attr(feature = "serde", serde(skip))]
    pub __non_exhaustive: (),
}

#[cfg(feature = "serde")]
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}

impl TlsServerConfig {
    /// Server TLS from a certificate and key, without client certificates.
    pub fn new(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        TlsServerConfig {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            client_ca_file: None,
            handshake_timeout: Duration::from_secs(10),
            __non_exhaustive: (),
        }
    }
}

impl TlsClientConfig {
    /// Client TLS trusting the CAs in `ca_file`.
    pub fn new(ca_file: impl Into<PathBuf>) -> Self {
        TlsClientConfig {
            ca_file: ca_file.into(),
            cert_file: None,
            key_file: None,
            server_name: None,
            __non_exhaustive: (),
        }
    }
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the configuration (for example a key that does not match the certificate).
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    /// A client certificate without a key, or the reverse.
    #[error("cert_file and key_file go together")]
    CertWithoutKey,
}

fn pem_error(path: &Path, message: impl ToString) -> TlsConfigError {
    TlsConfigError::Pem {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no certificates"));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, e))
}

fn roots(path: &Path) -> Result<RootCertStore, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path)? {
        roots.add(cert)?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the rustls client configuration.
pub fn client_config(c: &TlsClientConfig) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(&c.ca_file)?);
    let config = match (&c.cert_file, &c.key_file) {
        (Some(cert), Some(k)) => builder.with_client_auth_cert(certs(cert)?, key(k)?)?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(TlsConfigError::CertWithoutKey),
    };
    Ok(Arc::new(config))
}

/// Builds the rustls server configuration.
pub fn server_config(c: &TlsServerConfig) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
    let builder = match &c.client_ca_file {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                .build()
                .map_err(|e| TlsConfigError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(
        builder.with_single_cert(certs(&c.cert_file)?, key(&c.key_file)?)?,
    ))
}
