//! TLS for the tests: a CA made at run time (rcgen) with leaf certificates for any names,
//! expired ones too, written as PEM files; rustls clients and servers that trust it; and
//! [`Frontend`], which runs a lifecycle test body over plain TCP on each data path and
//! over TLS the proxy terminates.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedProtocolVersion};
use smartproxy::config::DataPathMode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::{for_each_data_path, plain_route, within};

/// Every TLS version the proxy offers.
pub const BOTH_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test CA in a temporary directory.
pub struct TestPki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    ca_file: PathBuf,
    files: AtomicUsize,
}

/// A leaf certificate and its key, as PEM files and as DER.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    chain: Vec<CertificateDer<'static>>,
    key_der: PrivateKeyDer<'static>,
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut params = CertificateParams::new(Vec::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "smartproxy test CA");
        let key = KeyPair::generate().expect("a CA key");
        let ca = params.self_signed(&key).expect("the CA certificate");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write the CA certificate");
        TestPki {
            dir,
            issuer: Issuer::new(params, key),
            ca_der: ca.der().clone(),
            ca_pem: ca.pem(),
            ca_file,
            files: AtomicUsize::new(0),
        }
    }

    /// The CA certificate's PEM file (for `backend_ca`, curl and openssl).
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A leaf certificate for `names`, valid now.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        self.issue(names, false)
    }

    /// A leaf certificate for `names` that expired in 2020.
    pub fn expired_leaf(&self, names: &[&str]) -> Leaf {
        self.issue(names, true)
    }

    fn issue(&self, names: &[&str], expired: bool) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let key = KeyPair::generate().expect("a leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign a leaf");
        let n = self.files.fetch_add(1, Ordering::Relaxed);
        let cert_file = self.dir.path().join(format!("leaf{n}.pem"));
        let key_file = self.dir.path().join(format!("leaf{n}-key.pem"));
        // The chain as a server sends it: the leaf, then the CA.
        std::fs::write(&cert_file, cert.pem() + &self.ca_pem).expect("write a leaf");
        std::fs::write(&key_file, key.serialize_pem()).expect("write a leaf key");
        Leaf {
            cert: cert_file,
            key: key_file,
            chain: vec![cert.der().clone(), self.ca_der.clone()],
            key_der: PrivateKeyDer::try_from(key.serialize_der()).expect("a PKCS#8 key"),
        }
    }

    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("the test CA");
        roots
    }

    /// A client that trusts the test CA, offering `versions` and `alpn`.
    pub fn client(
        &self,
        versions: &[&'static SupportedProtocolVersion],
        alpn: &[&str],
    ) -> TlsConnector {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .expect("ring supports these versions")
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }

    /// A TLS server (a backend) presenting `leaf`, choosing among `alpn`.
    pub fn server(&self, leaf: &Leaf, alpn: &[&str]) -> TlsAcceptor {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_no_client_auth()
            .with_single_cert(leaf.chain.clone(), leaf.key_der.clone_key())
            .expect("a matching key");
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        TlsAcceptor::from(Arc::new(config))
    }
}

/// Connects to `addr` and completes a TLS handshake for `server_name`.
pub async fn connect_tls(
    connector: &TlsConnector,
    addr: SocketAddr,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = crate::connect(addr).await;
    let name = ServerName::try_from(server_name.to_owned()).expect("a valid server name");
    within("the TLS handshake", connector.connect(name, tcp)).await
}

/// How a lifecycle test's client reaches the proxy.
#[derive(Clone)]
pub enum Frontend {
    /// Plain TCP, on a data path.
    Plain(DataPathMode),
    /// TLS the proxy terminates (`tls = "terminate"`, userspace), plaintext to the backend.
    Terminate(Arc<TerminateFixture>),
}

/// The certificate a terminating test route presents, and a client that trusts it.
pub struct TerminateFixture {
    pki: TestPki,
    leaf: Leaf,
}

/// The name the terminating test routes' certificate is for.
const FRONT_NAME: &str = "front.test";

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Frontend::Plain(mode) => write!(f, "plain TCP, {mode} data path"),
            Frontend::Terminate(_) => f.write_str("TLS terminated, userspace data path"),
        }
    }
}

impl Frontend {
    pub fn data_path(&self) -> DataPathMode {
        match self {
            Frontend::Plain(mode) => *mode,
            Frontend::Terminate(_) => DataPathMode::Userspace,
        }
    }

    /// A `[[route]]` named `name` to `target` (see [`plain_route`]), terminating TLS if
    /// this frontend does.
    pub fn route(&self, name: &str, target: SocketAddr, extra: &str) -> String {
        match self {
            Frontend::Plain(_) => plain_route(name, target, extra),
            Frontend::Terminate(fixture) => plain_route(
                name,
                target,
                &format!(
                    "tls = \"terminate\"\ncert = {:?}\nkey = {:?}\n{extra}",
                    fixture.leaf.cert.display().to_string(),
                    fixture.leaf.key.display().to_string()
                ),
            ),
        }
    }

    /// A client connected to `addr`, its TLS handshake (if any) done.
    pub async fn connect(&self, addr: SocketAddr) -> Client {
        match self {
            Frontend::Plain(_) => Client::Plain(crate::connect(addr).await),
            Frontend::Terminate(fixture) => {
                let connector = fixture.pki.client(BOTH_VERSIONS, &[]);
                let stream = connect_tls(&connector, addr, FRONT_NAME)
                    .await
                    .expect("TLS handshake with the proxy");
                Client::Tls(Box::new(stream))
            }
        }
    }
}

/// Runs `body` over plain TCP on each data path ([`for_each_data_path`]), then over TLS
/// terminated by the proxy.
pub async fn for_each_frontend<F, Fut>(body: F)
where
    F: Fn(Frontend) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for_each_data_path(|mode| body(Frontend::Plain(mode))).await;
    let pki = TestPki::new();
    let leaf = pki.leaf(&[FRONT_NAME]);
    let frontend = Frontend::Terminate(Arc::new(TerminateFixture { pki, leaf }));
    eprintln!("--- {frontend}");
    body(frontend).await;
}

/// A test client: plain TCP, or TLS over it.
pub enum Client {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Client {
    /// The TCP socket (under the TLS session, if any).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Client::Plain(tcp) => tcp,
            Client::Tls(tls) => tls.get_ref().0,
        }
    }

    /// The plain TCP stream of a [`Frontend::Plain`] client, for tests that run on the
    /// data paths only.
    pub fn into_tcp(self) -> TcpStream {
        match self {
            Client::Plain(tcp) => tcp,
            Client::Tls(_) => panic!("a TLS client has no plain TCP stream to hand out"),
        }
    }

    /// Resets the TCP connection (SO_LINGER 0, close).
    pub fn reset(self) {
        let tcp = match self {
            Client::Plain(tcp) => tcp,
            Client::Tls(tls) => tls.into_inner().0,
        };
        crate::reset(tcp);
    }
}

impl AsyncRead for Client {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Client::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Client::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Client {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Client::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Client::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Client::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Client::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Client::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Client::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}
