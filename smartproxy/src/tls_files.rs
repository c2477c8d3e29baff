//! TLS files: certificate chains, private keys and CA certificates read from PEM, each
//! checked as far as it can be without a route (a key must match its certificate). Config
//! validation and the TLS setup of routes (`tls.rs`) read them through here; it depends on
//! neither.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

/// A TLS file that cannot be used, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", .path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{}: no certificate found (a PEM \"CERTIFICATE\" block)", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no private key found (a PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\" block)", .path.display())]
    NoKey { path: PathBuf },
    #[error("{}: unusable private key: {source}", .path.display())]
    BadKey {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{}: the private key does not match the certificate in {}", .key.display(), .cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{}: not a usable CA certificate: {source}", .path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("route {route:?}: no system root certificates to verify its backend against ({why}); set backend_ca, or install the CA certificates")]
    NoSystemRoots { route: String, why: String },
    #[error("route {route:?}: {source}")]
    Rustls {
        route: String,
        #[source]
        source: rustls::Error,
    },
}

/// The crypto provider for every TLS session: ring (builds with just a C compiler).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// Every certificate of a PEM file, leaf first: a certificate chain, or CA certificates.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

/// The private key of `key` with the certificate chain read from `cert`, checked to match
/// the chain's leaf certificate.
pub fn load_certified_key(
    chain: Vec<CertificateDer<'static>>,
    cert: &Path,
    key: &Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let der = PrivateKeyDer::from_pem_file(key).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: key.to_owned(),
        },
        source => TlsError::Pem {
            path: key.to_owned(),
            source,
        },
    })?;
    CertifiedKey::from_der(chain, der, &provider())
        .map(Arc::new)
        .map_err(|source| match source {
            rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            },
            source => TlsError::BadKey {
                path: key.to_owned(),
                source,
            },
        })
}

/// The CA certificates of a PEM file, as trust anchors.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certificates(path)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}
