//! TLS for `terminate` and `reencrypt` routes: certificates, keys and CA files from PEM,
//! a rustls server config per route (its certificate chain, its ALPN list), client configs
//! toward reencrypt backends, and the two handshakes.
//!
//! [`TlsRoutes::load`] builds all of it from a [`Config`] in one call, so that a reload can
//! build a new set and keep the old one if that fails. Certificates are chosen by SNI
//! before TLS starts: the route is picked from the ClientHello (`route`), and that
//! route's acceptor has exactly one certificate chain.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::SingleCertAndKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{debug, warn};

use crate::config::{BackendVerify, Config, RouteConfig, Target};
use crate::conn_error::{ConnError, Step};
use crate::datapath::peer::{Peer, TcpIo};
use crate::tls_files::{load_certificates, load_certified_key, load_roots, provider, TlsError};
use crate::vocab::Side;

/// The TLS state of every route, by route index: built from one config, replaced whole.
pub struct TlsRoutes {
    routes: Vec<Option<RouteTls>>,
}

impl std::fmt::Debug for TlsRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let terminating = self.routes.iter().filter(|r| r.is_some()).count();
        f.debug_struct("TlsRoutes")
            .field("terminating_routes", &terminating)
            .finish()
    }
}

impl TlsRoutes {
    /// Reads every certificate, key and CA file the config names and builds the TLS
    /// configs. Logs a warning for each route with `backend_verify = false`.
    ///
    /// # Errors
    ///
    /// A [`TlsError`] naming the file (or the route) that cannot be used. `Config` already
    /// checked the files, so this fails only if they changed since, or for missing system
    /// root certificates.
    pub fn load(config: &Config) -> Result<TlsRoutes, TlsError> {
        let mut system_roots = None;
        let routes = config
            .routes
            .iter()
            .map(|route| {
                route
                    .tls
                    .is_some_and(|tls| tls.terminates())
                    .then(|| RouteTls::load(route, &mut system_roots))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        Ok(TlsRoutes { routes })
    }

    /// The TLS state of a terminating route; `None` for plain and passthrough routes.
    pub fn route(&self, route: usize) -> Option<&RouteTls> {
        self.routes.get(route).and_then(Option::as_ref)
    }
}

/// What the client's handshake settled that the backend's needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    pub server_name: Option<String>,
    pub alpn: Option<Vec<u8>>,
}

/// One terminating route: its acceptor and, for reencrypt, its connectors.
pub struct RouteTls {
    acceptor: TlsAcceptor,
    backend: Option<BackendTls>,
}

struct BackendTls {
    /// One connector per ALPN protocol the route offers clients (the one a client chose is
    /// offered to the backend), then one that offers none.
    by_alpn: Vec<(Vec<u8>, TlsConnector)>,
    no_alpn: TlsConnector,
    server_name: Option<ServerName<'static>>,
    verify: bool,
}

impl RouteTls {
    fn load(
        route: &RouteConfig,
        system_roots: &mut Option<Arc<RootCertStore>>,
    ) -> Result<RouteTls, TlsError> {
        let (Some(cert), Some(key)) = (&route.cert, &route.key) else {
            unreachable!("config validation requires cert and key on terminating routes");
        };
        let certified = load_certified_key(load_certificates(cert)?, cert, key)?;
        let rustls_error = |source| TlsError::Rustls {
            route: route.name.clone(),
            source,
        };
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls_error)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
        server.alpn_protocols = route.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();

        let backend = match &route.backend_tls {
            None => None,
            Some(backend) => {
                let verifier = match &backend.verify {
                    BackendVerify::SystemRoots => Some(Arc::clone(match system_roots {
                        Some(roots) => roots,
                        None => system_roots.insert(load_system_roots(&route.name)?),
                    })),
                    BackendVerify::Ca(path) => Some(Arc::new(load_roots(path)?)),
                    BackendVerify::Off => {
                        warn!(route = %route.name, "backend_verify = false: the backend's certificate is not verified");
                        None
                    }
                };
                let builder = ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .map_err(rustls_error)?;
                let client = match verifier {
                    Some(roots) => builder.with_root_certificates(roots),
                    None => builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(NoVerifier(provider()))),
                }
                .with_no_client_auth();
                let offering = |alpn: Option<&[u8]>| {
                    let mut config = client.clone();
                    config.alpn_protocols = alpn.map(|p| vec![p.to_vec()]).unwrap_or_default();
                    TlsConnector::from(Arc::new(config))
                };
                let server_name = backend
                    .server_name
                    .as_deref()
                    .map(|name| {
                        ServerName::try_from(name.to_owned()).map_err(|_| TlsError::Rustls {
                            route: route.name.clone(),
                            source: rustls::Error::General(format!(
                                "backend_sni {name:?} is not a server name"
                            )),
                        })
                    })
                    .transpose()?;
                Some(BackendTls {
                    by_alpn: server
                        .alpn_protocols
                        .iter()
                        .map(|p| (p.clone(), offering(Some(p))))
                        .collect(),
                    no_alpn: offering(None),
                    server_name,
                    verify: backend.verify != BackendVerify::Off,
                })
            }
        };
        Ok(RouteTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            backend,
        })
    }

    /// The TLS handshake with the client, done by `deadline`. `replay` are bytes already
    /// read from the client (the ClientHello read for routing): the handshake reads them
    /// first.
    ///
    /// # Errors
    ///
    /// The client's TLS handshake timed out or failed (`ConnError::reason` tells a reset
    /// socket from a bad handshake).
    pub async fn accept(
        &self,
        client: TcpStream,
        replay: Vec<u8>,
        deadline: Instant,
    ) -> Result<(Peer, Negotiated), ConnError> {
        let io = TcpIo::new(Arc::new(client), replay);
        let session = match timeout_at(deadline, self.acceptor.accept(io)).await {
            Err(_) => {
                return Err(ConnError::Timeout {
                    side: Side::Client,
                    step: Step::TlsHandshake,
                })
            }
            Ok(Err(e)) => {
                debug!(error = %e, "TLS handshake with the client failed");
                return Err(ConnError::io(Side::Client, Step::TlsHandshake, e));
            }
            Ok(Ok(session)) => session,
        };
        let connection = session.get_ref().1;
        let negotiated = Negotiated {
            server_name: connection.server_name().map(str::to_owned),
            alpn: connection.alpn_protocol().map(<[u8]>::to_vec),
        };
        debug!(
            version = ?connection.protocol_version(),
            cipher_suite = ?connection.negotiated_cipher_suite().map(|s| s.suite()),
            server_name = ?negotiated.server_name,
            alpn = ?negotiated.alpn.as_deref().map(String::from_utf8_lossy),
            "TLS handshake with the client done"
        );
        Ok((tokio_rustls::TlsStream::from(session).into(), negotiated))
    }

    /// The backend side: for reencrypt, the TLS handshake with the backend connected to
    /// `target`, done by `deadline`, offering the ALPN protocol the client chose; for
    /// terminate, the plain socket.
    ///
    /// # Errors
    ///
    /// The backend's TLS handshake timed out or failed, a certificate that does not verify
    /// included (logged as a warning with the reason).
    pub async fn connect(
        &self,
        backend: TcpStream,
        client: &Negotiated,
        target: &Target,
        deadline: Instant,
    ) -> Result<Peer, ConnError> {
        let Some(tls) = &self.backend else {
            return Ok(backend.into());
        };
        let server_name = tls.server_name(client, target).ok_or_else(|| {
            warn!(%target, "no server name to verify the backend's certificate against: the client sent no SNI, backend_sni is not set and the target is an IP address");
            ConnError::Malformed {
                side: Side::Backend,
                step: Step::TlsHandshake,
                why: "no server name to verify its certificate against".to_owned(),
            }
        })?;
        let connector = client
            .alpn
            .as_ref()
            .and_then(|chosen| tls.by_alpn.iter().find(|(p, _)| p == chosen))
            .map_or(&tls.no_alpn, |(_, connector)| connector);
        let io = TcpIo::new(Arc::new(backend), Vec::new());
        let session = match timeout_at(deadline, connector.connect(server_name.clone(), io)).await {
            Err(_) => {
                warn!(%target, "TLS handshake with the backend timed out");
                return Err(ConnError::Timeout {
                    side: Side::Backend,
                    step: Step::TlsHandshake,
                });
            }
            Ok(Err(e)) => {
                warn!(%target, server_name = ?server_name, error = %e, "TLS handshake with the backend failed");
                return Err(ConnError::io(Side::Backend, Step::TlsHandshake, e));
            }
            Ok(Ok(session)) => session,
        };
        let connection = session.get_ref().1;
        let alpn = connection.alpn_protocol();
        if alpn != client.alpn.as_deref() {
            debug!(
                client = ?client.alpn.as_deref().map(String::from_utf8_lossy),
                backend = ?alpn.map(String::from_utf8_lossy),
                "the backend chose another ALPN protocol than the client"
            );
        }
        debug!(
            version = ?connection.protocol_version(),
            server_name = ?server_name,
            "TLS handshake with the backend done"
        );
        Ok(tokio_rustls::TlsStream::from(session).into())
    }
}

impl BackendTls {
    fn server_name(&self, client: &Negotiated, target: &Target) -> Option<ServerName<'static>> {
        backend_server_name(
            self.server_name.as_ref(),
            client.server_name.as_deref(),
            &target.host,
            self.verify,
        )
    }
}

/// The name to ask the backend for and verify its certificate against: `backend_sni`,
/// else the client's SNI, else the target's host if it is a DNS name. The target's IP
/// address only when nothing is verified (an IP address sends no SNI).
fn backend_server_name(
    configured: Option<&ServerName<'static>>,
    client: Option<&str>,
    target_host: &str,
    verify: bool,
) -> Option<ServerName<'static>> {
    if let Some(name) = configured {
        return Some(name.clone());
    }
    let name = client.unwrap_or(target_host);
    match ServerName::try_from(name.to_owned()).ok()? {
        ServerName::IpAddress(_) if verify => None,
        name => Some(name),
    }
}

fn load_system_roots(route: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        debug!(%error, "a system root certificate store could not be read");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    debug!(added, ignored, "system root certificates");
    if roots.is_empty() {
        let why = match found.errors.first() {
            Some(error) => error.to_string(),
            None => "none found".to_owned(),
        };
        return Err(TlsError::NoSystemRoots {
            route: route.to_owned(),
            why,
        });
    }
    Ok(Arc::new(roots))
}

/// `backend_verify = false`: any certificate is accepted; the handshake signatures are
/// still checked, so the session is at least bound to the certificate presented.
#[derive(Debug)]
struct NoVerifier(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerifier {
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
        rustls::crypto::verify_tls12_signature(
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
        rustls::crypto::verify_tls13_signature(
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

#[cfg(test)]
mod tests {
    //! Covers: the backend's server name (backend_sni, the client's SNI, the target host)
    //! and the PEM errors that name their file. Handshakes are tested end to end in
    //! `tests/tests/tls.rs`.

    use std::path::Path;

    use super::*;

    fn name(text: &str) -> ServerName<'static> {
        ServerName::try_from(text.to_owned()).expect("a server name")
    }

    #[test]
    fn backend_name_is_backend_sni_then_client_sni_then_target_host() {
        let configured = name("inner.test");
        assert_eq!(
            backend_server_name(Some(&configured), Some("front.test"), "10.0.0.5", true),
            Some(name("inner.test"))
        );
        assert_eq!(
            backend_server_name(None, Some("front.test"), "10.0.0.5", true),
            Some(name("front.test"))
        );
        assert_eq!(
            backend_server_name(None, None, "backend.internal", true),
            Some(name("backend.internal"))
        );
    }

    #[test]
    fn an_ip_target_without_any_name_is_refused_unless_nothing_is_verified() {
        assert_eq!(backend_server_name(None, None, "10.0.0.5", true), None);
        assert_eq!(
            backend_server_name(None, None, "10.0.0.5", false),
            Some(name("10.0.0.5"))
        );
    }

    #[test]
    fn pem_errors_name_the_file() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/config/certs");
        let (cert, key, other) = (
            dir.join("cert.pem"),
            dir.join("key.pem"),
            dir.join("other-key.pem"),
        );
        let e = load_certificates(&key).expect_err("a key file has no certificate");
        assert!(
            e.to_string()
                .ends_with("key.pem: no certificate found (a PEM \"CERTIFICATE\" block)"),
            "{e}"
        );
        let chain = load_certificates(&cert).expect("the test certificate");
        let e = load_certified_key(chain.clone(), &cert, &other).expect_err("a mismatched key");
        assert!(matches!(e, TlsError::KeyMismatch { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("other-key.pem: the private key does not match the certificate in"),
            "{e}"
        );
        load_certified_key(chain, &cert, &key).expect("the matching key");
        let e =
            load_certified_key(Vec::new(), &cert, &cert).expect_err("no key in a certificate file");
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
    }
}
