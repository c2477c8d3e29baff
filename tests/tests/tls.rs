//! TLS termination (`tls = "terminate"`) and re-encryption (`"reencrypt"`) with real
//! clients, certificates made at test time by a test CA (userspace data path, which TLS
//! routes always take):
//! - TLS 1.2 and TLS 1.3 each complete with the route's certificate and relay both ways;
//! - SNI picks the certificate (and route) among three on one listen address, a wildcard
//!   among them; an unknown name with no default route closes with `no_route`, counted;
//! - plain text instead of a ClientHello, and a ClientHello offering only TLS 1.1 (no
//!   version in common), close with `bad_handshake`, counted;
//! - a client that stops in the middle of its handshake closes with `handshake_timeout`;
//! - reencrypt: the backend is verified against `backend_ca`, gets the client's SNI (or
//!   `backend_sni`) and is offered the ALPN protocol the client chose;
//! - reencrypt: half-close both ways across the two TLS sessions (close_notify each way),
//!   byte counts and sha256;
//! - reencrypt: a backend with an expired certificate is refused (`connect_failed`,
//!   counted) and the client gets a clean close (close_notify); with
//!   `backend_verify = false` the same backend is accepted;
//! - `openssl s_client` (TLS 1.2 and 1.3, SNI, verified) and `curl` (HTTP/1.1 over TLS 1.2
//!   and 1.3) through a terminating route;
//! - a reload serves new certificates to new connections while an open session runs on,
//!   and a certificate with a key that does not match it is refused, the old one staying.
//!
//! Half-close and resets over terminated TLS run with the plain-TCP bodies in
//! `half_close.rs` and `reset.rs`.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;

use rustls::ProtocolVersion;
use smartproxy::config::DataPathMode;
use smartproxy::vocab::Reason;
use smartproxy_tests::tls::{connect_tls, Leaf, TestPki, BOTH_VERSIONS};
use smartproxy_tests::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

const USERSPACE: DataPathMode = DataPathMode::Userspace;

/// A `[[route]]` on port 0 with `tls = "{mode}"` presenting `leaf`, plus `extra` lines.
fn tls_route(
    name: &str,
    mode: &str,
    sni: &[&str],
    leaf: &Leaf,
    target: SocketAddr,
    extra: &str,
) -> String {
    let sni = if sni.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = sni.iter().map(|n| format!("{n:?}")).collect();
        format!("sni = [{}]\n", names.join(", "))
    };
    format!(
        "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\ntls = \"{mode}\"\n{sni}\
         targets = [\"{target}\"]\ncert = {:?}\nkey = {:?}\n{extra}\n",
        leaf.cert.display().to_string(),
        leaf.key.display().to_string()
    )
}

/// A proxy with the route most tests here have: "front", `tls = "{mode}"`, presenting
/// `leaf`, to `backend`, plus `extra` lines.
async fn front_proxy(mode: &str, leaf: &Leaf, backend: &Backend, extra: &str) -> TestProxy {
    TestProxy::start(
        USERSPACE,
        &tls_route("front", mode, &[], leaf, backend.addr, extra),
    )
    .await
}

/// A client of [`front_proxy`]'s route: a TLS handshake for front.test.
async fn connect_front(
    connector: &TlsConnector,
    proxy: &TestProxy,
) -> std::io::Result<TlsStream<TcpStream>> {
    connect_tls(connector, proxy.addr("front"), "front.test").await
}

fn path(file: &std::path::Path) -> String {
    format!("{:?}", file.display().to_string())
}

/// A plaintext backend that greets with its name, then echoes until the client's EOF.
async fn greeter(name: &'static str) -> Backend {
    Backend::spawn(move |mut stream| async move {
        stream
            .write_all(format!("{name}\n").as_bytes())
            .await
            .expect("backend greets");
        echo(stream).await;
    })
    .await
}

/// A TLS backend presenting `leaf`: greets with the SNI and ALPN protocol it got, then
/// reads to the client's close_notify, echoes it all and closes (close_notify).
async fn tls_backend(pki: &TestPki, leaf: &Leaf, alpn: &[&str]) -> Backend {
    Backend::spawn_with(pki.server(leaf, alpn), |stream, acceptor| async move {
        let mut tls = acceptor.accept(stream).await.expect("backend handshake");
        let connection = tls.get_ref().1;
        let greeting = format!(
            "sni={} alpn={}\n",
            connection.server_name().unwrap_or("-"),
            connection
                .alpn_protocol()
                .map_or("-".into(), String::from_utf8_lossy)
        );
        tls.write_all(greeting.as_bytes())
            .await
            .expect("backend greets");
        let mut received = Vec::new();
        tls.read_to_end(&mut received)
            .await
            .expect("backend reads to the client's close_notify");
        tls.write_all(&received).await.expect("backend echoes");
        tls.shutdown().await.expect("backend close_notify");
    })
    .await
}

/// Reads a line (without its newline).
async fn read_line(stream: &mut (impl AsyncRead + Unpin)) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        within("a line arrives", stream.read_exact(&mut byte))
            .await
            .expect("read a line");
        if byte[0] == b'\n' {
            return String::from_utf8(line).expect("a text line");
        }
        line.push(byte[0]);
    }
}

/// Reads the backend's greeting, sends a message, half-closes and checks that exactly the
/// message comes back before EOF. Returns the greeting.
async fn exchange(stream: &mut (impl AsyncRead + AsyncWrite + Unpin)) -> String {
    let greeting = read_line(stream).await;
    let message = b"through the proxy".to_vec();
    stream.write_all(&message).await.expect("client writes");
    stream.shutdown().await.expect("client half-closes");
    let mut echoed = Vec::new();
    within("the echo and EOF", stream.read_to_end(&mut echoed))
        .await
        .expect("client reads to EOF");
    assert_eq!(echoed, message, "echoed bytes");
    greeting
}

fn closed(proxy: &TestProxy, reason: &str) -> u64 {
    proxy.stats().closed[reason]
}

// === termination ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_and_tls13_terminate_with_the_route_certificate() {
    init_tracing();
    let pki = TestPki::new();
    let leaf = pki.leaf(&["front.test"]);
    let backend = greeter("plain").await;
    let mut proxy = front_proxy("terminate", &leaf, &backend, "").await;
    for (version, expected) in [
        (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
    ] {
        let connector = pki.client(&[version], &[]);
        let mut client = connect_front(&connector, &proxy)
            .await
            .unwrap_or_else(|e| panic!("{expected:?} handshake: {e}"));
        assert_eq!(client.get_ref().1.protocol_version(), Some(expected));
        assert_eq!(exchange(&mut client).await, "plain", "{expected:?}");
        proxy.expect_closed(Reason::Normal).await;
    }
    backend.join().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_among_three_on_one_address_and_unknown_names_get_no_route() {
    init_tracing();
    let pki = TestPki::new();
    let backends = [
        greeter("a").await,
        greeter("b").await,
        greeter("wild").await,
    ];
    let routes = [
        ("a", "a.test", pki.leaf(&["a.test"])),
        ("b", "b.test", pki.leaf(&["b.test"])),
        ("wild", "*.wild.test", pki.leaf(&["*.wild.test"])),
    ];
    let config: String = routes
        .iter()
        .zip(&backends)
        .map(|((name, sni, leaf), backend)| {
            tls_route(name, "terminate", &[sni], leaf, backend.addr, "")
        })
        .collect();
    let mut proxy = TestProxy::start(USERSPACE, &config).await;
    let addr = proxy.addr("a");
    assert_eq!(addr, proxy.addr("wild"), "the routes share one listener");
    // The client verifies the certificate against the name it asked for: a handshake that
    // completes proves the route's own certificate was served.
    let connector = pki.client(BOTH_VERSIONS, &[]);
    for (server_name, route) in [("a.test", "a"), ("b.test", "b"), ("x.wild.test", "wild")] {
        let mut client = connect_tls(&connector, addr, server_name)
            .await
            .unwrap_or_else(|e| panic!("handshake for {server_name}: {e}"));
        assert_eq!(
            exchange(&mut client).await,
            route,
            "route for {server_name}"
        );
        proxy.expect_closed(Reason::Normal).await;
    }
    assert!(
        connect_tls(&connector, addr, "c.test").await.is_err(),
        "a handshake for a name no route claims"
    );
    proxy.expect_closed(Reason::NoRoute).await;
    assert_eq!(closed(&proxy, "no_route"), 1, "closed.no_route");
    for backend in backends {
        backend.join().await;
    }
    proxy.stop().await;
}

/// A ClientHello offering only TLS 1.1 (legacy version 0x0302, no supported_versions).
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend([0x5a; 32]); // random
    body.push(0); // no session id
    body.extend([0x00, 0x04, 0x00, 0x2f, 0xc0, 0x13]); // two TLS 1.1 cipher suites
    body.extend([0x01, 0x00]); // null compression
                               // signature_algorithms (ecdsa_secp256r1_sha256, rsa_pkcs1_sha256) and supported_groups
                               // (x25519, secp256r1): all that is missing is a version in common.
    let extensions = [
        0x00, 0x0d, 0x00, 0x06, 0x00, 0x04, 0x04, 0x03, 0x04, 0x01, // signature_algorithms
        0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x1d, 0x00, 0x17, // supported_groups
    ];
    body.extend([0x00, extensions.len() as u8]);
    body.extend(extensions);
    let mut handshake = vec![0x01, 0x00, 0x00, body.len() as u8];
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01, 0x00, handshake.len() as u8];
    record.extend(handshake);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_and_a_tls11_only_hello_close_with_bad_handshake() {
    init_tracing();
    let pki = TestPki::new();
    let leaf = pki.leaf(&["front.test"]);
    let backend = Backend::spawn(|_| async { panic!("no connection may reach the backend") }).await;
    let mut proxy = front_proxy("terminate", &leaf, &backend, "").await;
    for (what, bytes) in [
        (
            "plain text",
            b"GET / HTTP/1.1\r\nHost: front.test\r\n\r\n".to_vec(),
        ),
        ("a TLS 1.1 ClientHello", tls11_client_hello()),
    ] {
        let mut client = connect(proxy.addr("front")).await;
        client.write_all(&bytes).await.expect("client writes");
        // rustls may answer with an alert before it hangs up.
        let mut answer = Vec::new();
        let _ = within("the proxy hangs up", client.read_to_end(&mut answer)).await;
        if let Some(&first) = answer.first() {
            assert_eq!(first, 0x15, "{what}: only a TLS alert may come back");
        }
        proxy.expect_closed(Reason::BadHandshake).await;
    }
    assert_eq!(closed(&proxy, "bad_handshake"), 2, "closed.bad_handshake");
    backend.join().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_stalls_after_the_client_hello_closes_with_handshake_timeout() {
    init_tracing();
    let pki = TestPki::new();
    let leaf = pki.leaf(&["front.test"]);
    let backend = Backend::spawn(|_| async { panic!("no connection may reach the backend") }).await;
    let mut proxy = front_proxy(
        "terminate",
        &leaf,
        &backend,
        "handshake_timeout = \"500ms\"",
    )
    .await;
    // A real ClientHello, and then nothing: the server's flight is never answered.
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("default versions")
    .with_root_certificates(pki.roots())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("front.test").expect("a server name");
    let mut connection =
        rustls::ClientConnection::new(Arc::new(config), name).expect("a client connection");
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).expect("write to a Vec");
    let mut client = connect(proxy.addr("front")).await;
    client
        .write_all(&hello)
        .await
        .expect("client writes its hello");
    let mut answer = Vec::new();
    within("the proxy hangs up", client.read_to_end(&mut answer))
        .await
        .expect("client reads the server's flight, then EOF");
    assert!(!answer.is_empty(), "the server's first flight");
    proxy.expect_closed(Reason::HandshakeTimeout).await;
    backend.join().await;
    proxy.stop().await;
}

// === re-encryption ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencrypt_verifies_the_backend_and_passes_on_sni_and_the_chosen_alpn() {
    init_tracing();
    let pki = TestPki::new();
    let ca = path(pki.ca_file());
    let front = pki.leaf(&["front.test"]);
    let other = pki.leaf(&["other.test"]);
    let inner = pki.leaf(&["inner.test"]);
    // Without backend_sni the backend is asked for the client's name: its certificate is
    // for front.test.
    let same_name = tls_backend(&pki, &front, &["h2", "http/1.1"]).await;
    let renamed = tls_backend(&pki, &inner, &[]).await;
    let config = tls_route(
        "same-name",
        "reencrypt",
        &["front.test"],
        &front,
        same_name.addr,
        &format!("backend_ca = {ca}\nalpn = [\"h2\", \"http/1.1\"]"),
    ) + &tls_route(
        "renamed",
        "reencrypt",
        &["other.test"],
        &other,
        renamed.addr,
        &format!("backend_ca = {ca}\nbackend_sni = \"inner.test\""),
    );
    let mut proxy = TestProxy::start(USERSPACE, &config).await;
    let addr = proxy.addr("same-name");
    for (server_name, offered, chosen, greeting) in [
        (
            "front.test",
            &["h2", "http/1.1"][..],
            Some("h2"),
            "sni=front.test alpn=h2",
        ),
        (
            "front.test",
            &["http/1.1"][..],
            Some("http/1.1"),
            "sni=front.test alpn=http/1.1",
        ),
        ("front.test", &[][..], None, "sni=front.test alpn=-"),
        ("other.test", &[][..], None, "sni=inner.test alpn=-"),
    ] {
        let connector = pki.client(BOTH_VERSIONS, offered);
        let mut client = connect_tls(&connector, addr, server_name)
            .await
            .unwrap_or_else(|e| panic!("handshake for {server_name}: {e}"));
        let alpn = client.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        assert_eq!(
            alpn,
            chosen.map(|p| p.as_bytes().to_vec()),
            "ALPN with the client"
        );
        assert_eq!(
            exchange(&mut client).await,
            greeting,
            "what the backend got"
        );
        proxy.expect_closed(Reason::Normal).await;
    }
    same_name.join().await;
    renamed.join().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencrypt_half_close_keeps_the_other_direction_flowing_both_ways() {
    const ONE_MIB: usize = 1024 * 1024;
    init_tracing();
    let pki = TestPki::new();
    let leaf = pki.leaf(&["front.test"]);
    let up = pattern(ONE_MIB, 21);
    let down = pattern(ONE_MIB, 22);
    // The client's first byte says who closes first: 'c' the client, 'b' the backend.
    let backend = Backend::spawn_with(pki.server(&leaf, &[]), |stream, acceptor| async move {
        let (up, down) = (pattern(ONE_MIB, 21), pattern(ONE_MIB, 22));
        let mut tls = acceptor.accept(stream).await.expect("backend handshake");
        let mut first = [0u8; 1];
        tls.read_exact(&mut first).await.expect("backend reads");
        if first[0] == b'b' {
            write_chunked(&mut tls, &down)
                .await
                .expect("backend streams");
            tls.shutdown().await.expect("backend close_notify");
        }
        let (len, hash) = read_to_end_hashed(&mut tls)
            .await
            .expect("backend reads to the client's close_notify");
        assert_eq!((len, hash), (ONE_MIB, sha256(&up)), "bytes at the backend");
        if first[0] == b'c' {
            write_chunked(&mut tls, &down)
                .await
                .expect("backend streams after it");
            tls.shutdown().await.expect("backend close_notify");
        }
    })
    .await;
    let ca = path(pki.ca_file());
    let mut proxy = front_proxy("reencrypt", &leaf, &backend, &format!("backend_ca = {ca}")).await;
    let connector = pki.client(BOTH_VERSIONS, &[]);
    for first in [b'c', b'b'] {
        let mut client = connect_front(&connector, &proxy)
            .await
            .expect("client handshake");
        client.write_all(&[first]).await.expect("client writes");
        if first == b'b' {
            let (len, hash) = within(
                "the backend's bytes and close",
                read_to_end_hashed(&mut client),
            )
            .await
            .expect("client reads to the backend's close");
            assert_eq!((len, hash), (ONE_MIB, sha256(&down)), "bytes at the client");
        }
        within("the client streams", write_chunked(&mut client, &up))
            .await
            .expect("client streams");
        client.shutdown().await.expect("client close_notify");
        if first == b'c' {
            let (len, hash) = within(
                "the backend's bytes and close",
                read_to_end_hashed(&mut client),
            )
            .await
            .expect("client reads after its own close_notify");
            assert_eq!((len, hash), (ONE_MIB, sha256(&down)), "bytes at the client");
        }
        proxy.expect_closed(Reason::Normal).await;
    }
    backend.join().await;
    proxy.stop().await;
}

/// A TLS backend with an expired certificate, whose handshakes are expected to fail
/// (`refused`) or succeed and greet as [`tls_backend`] does.
async fn expired_backend(pki: &TestPki, refused: bool) -> Backend {
    let leaf = pki.expired_leaf(&["front.test"]);
    if !refused {
        return tls_backend(pki, &leaf, &[]).await;
    }
    Backend::spawn_with(pki.server(&leaf, &[]), |stream, acceptor| async move {
        assert!(
            acceptor.accept(stream).await.is_err(),
            "the proxy must refuse the expired certificate"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencrypt_refuses_a_backend_with_an_expired_certificate_and_closes_the_client_cleanly() {
    init_tracing();
    let pki = TestPki::new();
    let leaf = pki.leaf(&["front.test"]);
    let backend = expired_backend(&pki, true).await;
    let ca = path(pki.ca_file());
    let mut proxy = front_proxy("reencrypt", &leaf, &backend, &format!("backend_ca = {ca}")).await;
    let connector = pki.client(BOTH_VERSIONS, &[]);
    let mut client = connect_front(&connector, &proxy)
        .await
        .expect("the handshake with the proxy completes");
    let mut rest = Vec::new();
    within("the proxy closes", client.read_to_end(&mut rest))
        .await
        .expect("a clean close: close_notify, not a reset or a bare FIN");
    assert!(rest.is_empty(), "{} bytes before the close", rest.len());
    proxy.expect_closed(Reason::ConnectFailed).await;
    assert_eq!(closed(&proxy, "connect_failed"), 1, "closed.connect_failed");
    backend.join().await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reencrypt_with_backend_verify_false_accepts_the_expired_backend() {
    init_tracing();
    let pki = TestPki::new();
    let leaf = pki.leaf(&["front.test"]);
    let backend = expired_backend(&pki, false).await;
    let mut proxy = front_proxy("reencrypt", &leaf, &backend, "backend_verify = false").await;
    let connector = pki.client(BOTH_VERSIONS, &[]);
    let mut client = connect_front(&connector, &proxy)
        .await
        .expect("client handshake");
    assert_eq!(exchange(&mut client).await, "sni=front.test alpn=-");
    proxy.expect_closed(Reason::Normal).await;
    backend.join().await;
    proxy.stop().await;
}

// === real clients ===

/// Panics, naming how to get it, if `tool` is not installed (only whether it runs at all
/// counts: not every tool knows `--version`).
fn require(tool: &str) {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        found,
        "{tool} is not installed: `cargo xtask test` installs it (apt-get install {tool})"
    );
}

/// A backend that answers one line with `{name}: {line}` and closes.
async fn line_backend(name: &'static str) -> Backend {
    Backend::spawn(move |mut stream: TcpStream| async move {
        let line = read_line(&mut stream).await;
        stream
            .write_all(format!("{name}: {line}\n").as_bytes())
            .await
            .expect("backend answers");
        stream.shutdown().await.expect("backend FIN");
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
    })
    .await
}

/// A backend that answers one HTTP/1.1 request with `hello` and closes.
async fn http_backend() -> Backend {
    Backend::spawn(|mut stream: TcpStream| async move {
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n") {
            let read = stream
                .read(&mut buf)
                .await
                .expect("backend reads the request");
            assert!(read > 0, "EOF inside the request");
            request.extend_from_slice(&buf[..read]);
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
            .await
            .expect("backend answers");
        stream.shutdown().await.expect("backend FIN");
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
    })
    .await
}

/// Runs a command to its end with `stdin` as its input, bounded by [`WAIT`].
async fn run(command: &mut tokio::process::Command, stdin: &[u8]) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
    let mut input = child.stdin.take().expect("a piped stdin");
    input.write_all(stdin).await.expect("write to the child");
    drop(input);
    within("the command ends", child.wait_with_output())
        .await
        .expect("the command's output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_gets_the_sni_route_over_tls12_and_tls13() {
    init_tracing();
    require("openssl");
    let pki = TestPki::new();
    let backends = [line_backend("a").await, line_backend("b").await];
    let config = tls_route(
        "a",
        "terminate",
        &["a.test"],
        &pki.leaf(&["a.test"]),
        backends[0].addr,
        "",
    ) + &tls_route(
        "b",
        "terminate",
        &["b.test"],
        &pki.leaf(&["b.test"]),
        backends[1].addr,
        "",
    );
    let mut proxy = TestProxy::start(USERSPACE, &config).await;
    let addr = proxy.addr("b").to_string();
    for (flag, version) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let output = run(
            tokio::process::Command::new("openssl")
                .args([
                    "s_client",
                    "-connect",
                    &addr,
                    "-servername",
                    "b.test",
                    "-CAfile",
                ])
                .arg(pki.ca_file())
                .args(["-verify_return_error", "-brief", "-ign_eof", flag]),
            b"hello\n",
        )
        .await;
        let (stdout, stderr) = (
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        assert!(
            output.status.success(),
            "openssl {flag}: {}\n{stderr}",
            output.status
        );
        assert!(
            stdout.contains("b: hello"),
            "openssl {flag} stdout: {stdout:?}"
        );
        assert!(
            stderr.contains(&format!("Protocol version: {version}")),
            "openssl {flag} stderr: {stderr}"
        );
        assert!(
            stderr.contains("Verification: OK"),
            "openssl {flag} stderr: {stderr}"
        );
        proxy.next_closed().await;
    }
    for backend in backends {
        backend.join().await;
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_an_https_answer_over_tls12_and_tls13() {
    init_tracing();
    require("curl");
    let pki = TestPki::new();
    let backend = http_backend().await;
    let config = tls_route(
        "web",
        "terminate",
        &["web.test"],
        &pki.leaf(&["web.test"]),
        backend.addr,
        "alpn = [\"http/1.1\"]",
    );
    let mut proxy = TestProxy::start(USERSPACE, &config).await;
    let port = proxy.addr("web").port();
    for versions in [&["--tlsv1.2", "--tls-max", "1.2"][..], &["--tlsv1.3"][..]] {
        let output = run(
            tokio::process::Command::new("curl")
                .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
                .arg(pki.ca_file())
                .args(["--resolve", &format!("web.test:{port}:127.0.0.1")])
                .args(versions)
                .args(["--write-out", "\n%{http_version} %{ssl_verify_result}"])
                .arg(format!("https://web.test:{port}/")),
            b"",
        )
        .await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "curl {versions:?}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            stdout, "hello\n1.1 0",
            "curl {versions:?}: body, HTTP version, verify result"
        );
        proxy.next_closed().await;
    }
    backend.join().await;
    proxy.stop().await;
}

// === reload ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_new_certificates_to_new_connections_and_refuses_a_bad_pair() {
    init_tracing();
    let (old_pki, new_pki) = (TestPki::new(), TestPki::new());
    let (old_leaf, new_leaf) = (old_pki.leaf(&["front.test"]), new_pki.leaf(&["front.test"]));
    let backend = greeter("plain").await;
    let mut proxy = TestProxy::start(
        USERSPACE,
        &tls_route("front", "terminate", &[], &old_leaf, backend.addr, ""),
    )
    .await;
    let addr = proxy.addr("front");
    let (trusts_old, trusts_new) = (
        old_pki.client(BOTH_VERSIONS, &[]),
        new_pki.client(BOTH_VERSIONS, &[]),
    );
    let mut before = connect_tls(&trusts_old, addr, "front.test")
        .await
        .expect("the old certificate before the reload");

    proxy.rewrite_config(&tls_route(
        "front",
        "terminate",
        &[],
        &new_leaf,
        backend.addr,
        "",
    ));
    proxy.proxy.reload().await.expect("new certificates load");
    let mut after = connect_tls(&trusts_new, addr, "front.test")
        .await
        .expect("the new certificate after the reload");
    assert!(
        connect_tls(&trusts_old, addr, "front.test").await.is_err(),
        "the old certificate is no longer served"
    );
    proxy.expect_closed(Reason::BadHandshake).await;

    // A certificate with another certificate's key: refused, the new one stays in force.
    proxy.rewrite_config(&format!(
        "[[route]]\nname = \"front\"\nlisten = \"127.0.0.1:0\"\ntls = \"terminate\"\n\
         targets = [\"{}\"]\ncert = {}\nkey = {}\n",
        backend.addr,
        path(&new_leaf.cert),
        path(&old_leaf.key)
    ));
    let error = proxy
        .proxy
        .reload()
        .await
        .expect_err("a mismatched pair is refused");
    assert!(
        error.to_string().contains("route[0].key"),
        "the error names the key: {error}"
    );
    let mut still = connect_tls(&trusts_new, addr, "front.test")
        .await
        .expect("the certificate in force after a refused reload");

    // The connection from before the reload kept its session and still relays.
    for client in [&mut before, &mut after, &mut still] {
        assert_eq!(exchange(client).await, "plain");
        proxy.expect_closed(Reason::Normal).await;
    }
    backend.join().await;
    proxy.stop().await;
}
