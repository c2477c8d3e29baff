//! TLS passthrough routing by SNI on one shared listen address, with real ClientHellos
//! from rustls, on each data path. Two named routes (`alpha.test`, `*.example.test`) and
//! a default share the address:
//! - an exact name reaches its route's backend, which gets the ClientHello byte for
//!   byte, followed by the client's further bytes;
//! - a name under the wildcard reaches the wildcard route;
//! - a ClientHello without SNI (IP address server name) reaches the default route;
//! - a ClientHello written 1 byte per write is still routed;
//! - without a default route, an unknown name is closed with `no_route`;
//! - plain text instead of a ClientHello is closed with `bad_handshake` at once (well
//!   before the 10 s `handshake_timeout`);
//! - a partial ClientHello followed by silence is closed with `handshake_timeout`.
//!
//! The handshake phase under hostile input:
//! - a slowloris ClientHello (1 byte per second) ends at `handshake_timeout`;
//! - more than 16 KiB of handshake without a complete ClientHello is `bad_handshake`;
//! - 5,000 connections that say nothing do not keep a legitimate client from being
//!   served, and their descriptors are all gone once they close.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use smartproxy::vocab::Reason;
use smartproxy_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the client sends after its ClientHello (stands in for the rest of a handshake).
const AFTER_HELLO: &[u8] = b"the rest of the client's bytes";

/// A backend that reads everything up to the client's FIN and answers with its name
/// and the digest of what it got; it checks that a ClientHello came first.
async fn named_backend(name: &'static str) -> Backend {
    Backend::spawn(move |mut stream| async move {
        let mut received = Vec::new();
        stream
            .read_to_end(&mut received)
            .await
            .expect("backend reads up to the client's FIN");
        assert!(
            matches!(
                smartproxy::sni::parse_client_hello(&received),
                Ok(smartproxy::sni::Peek::Complete(_))
            ),
            "backend {name}: the bytes do not start with a whole ClientHello"
        );
        stream
            .write_all(&reply(name, &received))
            .await
            .expect("backend answers");
    })
    .await
}

fn reply(name: &str, received: &[u8]) -> Vec<u8> {
    let mut reply = format!("{name}\n").into_bytes();
    reply.extend_from_slice(&sha256(received));
    reply
}

/// `[[route]]`s sharing one address: `alpha` (exact name), `wild` (wildcard) and, when
/// given, `default`.
fn sni_routes(
    handshake_timeout: &str,
    alpha: SocketAddr,
    wild: SocketAddr,
    default: Option<SocketAddr>,
) -> String {
    let route = |name: &str, sni: &str, target: SocketAddr| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\ntls = \"passthrough\"\n\
             {sni}targets = [\"{target}\"]\n\n"
        )
    };
    let mut config = format!("[lifecycle]\nhandshake_timeout = \"{handshake_timeout}\"\n\n");
    config += &route("alpha", "sni = [\"alpha.test\"]\n", alpha);
    config += &route("wild", "sni = [\"*.example.test\"]\n", wild);
    if let Some(default) = default {
        config += &route("default", "", default);
    }
    config
}

/// A proxy with the three routes of [`sni_routes`] and their backends.
struct SniProxy {
    proxy: TestProxy,
    addr: SocketAddr,
    backends: Vec<Backend>,
}

impl SniProxy {
    async fn start(mode: smartproxy::config::DataPathMode, with_default: bool) -> SniProxy {
        let backends = vec![
            named_backend("alpha").await,
            named_backend("wild").await,
            named_backend("default").await,
        ];
        let default = with_default.then_some(backends[2].addr);
        let config = sni_routes("10s", backends[0].addr, backends[1].addr, default);
        let proxy = TestProxy::start(mode, &config).await;
        let addr = proxy.addr("alpha");
        assert_eq!(addr, proxy.addr("wild"), "SNI routes share one listener");
        SniProxy {
            proxy,
            addr,
            backends,
        }
    }

    async fn stop(self) {
        for backend in self.backends {
            backend.join().await;
        }
        self.proxy.stop().await;
    }
}

/// Sends `hello` (in writes of `chunk` bytes) and [`AFTER_HELLO`], then FIN; returns
/// everything the client got back.
async fn exchange(addr: SocketAddr, hello: &[u8], chunk: usize) -> Vec<u8> {
    let mut client = connect(addr).await;
    client.set_nodelay(true).expect("TCP_NODELAY");
    for piece in hello.chunks(chunk) {
        client.write_all(piece).await.expect("client writes");
        client.flush().await.expect("client flushes");
        tokio::task::yield_now().await;
    }
    client.write_all(AFTER_HELLO).await.expect("client writes");
    client.shutdown().await.expect("client FIN");
    let mut answer = Vec::new();
    within("the backend answers", client.read_to_end(&mut answer))
        .await
        .expect("client reads");
    answer
}

/// Asserts that a ClientHello for `server_name` reaches the backend named `expected`.
async fn assert_routed(sni: &mut SniProxy, server_name: &str, chunk: usize, expected: &str) {
    let hello = client_hello(server_name);
    let answer = exchange(sni.addr, &hello, chunk).await;
    let sent = [hello.as_slice(), AFTER_HELLO].concat();
    assert_eq!(
        String::from_utf8_lossy(answer.split(|b| *b == b'\n').next().unwrap_or_default()),
        expected,
        "backend that answered {server_name:?}"
    );
    assert_eq!(
        answer,
        reply(expected, &sent),
        "bytes the backend got for {server_name:?}"
    );
    let closed = sni.proxy.expect_closed(Reason::Normal).await;
    assert_eq!(
        closed.route.as_deref(),
        Some(expected),
        "route of {server_name:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_server_name_reaches_its_route_with_the_client_hello_intact() {
    for_each_data_path(|mode| async move {
        let mut sni = SniProxy::start(mode, true).await;
        assert_routed(&mut sni, "alpha.test", usize::MAX, "alpha").await;
        sni.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_under_a_wildcard_reaches_the_wildcard_route() {
    for_each_data_path(|mode| async move {
        let mut sni = SniProxy::start(mode, true).await;
        assert_routed(&mut sni, "api.example.test", usize::MAX, "wild").await;
        sni.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hello_without_sni_reaches_the_default_route() {
    for_each_data_path(|mode| async move {
        let mut sni = SniProxy::start(mode, true).await;
        // rustls sends no server_name extension for an IP address.
        let parsed = smartproxy::sni::parse_client_hello(&client_hello("127.0.0.1"));
        assert!(
            matches!(parsed, Ok(smartproxy::sni::Peek::Complete(ref hello)) if hello.server_name.is_none()),
            "a ClientHello without SNI: {parsed:?}"
        );
        assert_routed(&mut sni, "127.0.0.1", usize::MAX, "default").await;
        sni.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hello_written_one_byte_at_a_time_is_routed() {
    for_each_data_path(|mode| async move {
        let mut sni = SniProxy::start(mode, true).await;
        assert_routed(&mut sni, "alpha.test", 1, "alpha").await;
        sni.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_server_name_without_a_default_route_closes_with_no_route() {
    for_each_data_path(|mode| async move {
        let mut sni = SniProxy::start(mode, false).await;
        let mut client = connect(sni.addr).await;
        client
            .write_all(&client_hello("unknown.test"))
            .await
            .expect("client writes");
        expect_hangup(&mut client).await;
        sni.proxy.expect_closed(Reason::NoRoute).await;
        assert_no_backend_reached(&sni.proxy);
        sni.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_instead_of_a_client_hello_closes_with_bad_handshake_at_once() {
    for_each_data_path(|mode| async move {
        let mut sni = SniProxy::start(mode, true).await;
        let mut client = connect(sni.addr).await;
        let started = Instant::now();
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("client writes");
        expect_hangup(&mut client).await;
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(2),
            "garbage was closed after {waited:?}, as if waiting for the 10 s handshake timeout"
        );
        sni.proxy.expect_closed(Reason::BadHandshake).await;
        assert_no_backend_reached(&sni.proxy);
        sni.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_client_hello_then_silence_closes_with_handshake_timeout() {
    for_each_data_path(|mode| async move {
        let backend = named_backend("alpha").await;
        let config = sni_routes("300ms", backend.addr, backend.addr, None);
        let mut proxy = TestProxy::start(mode, &config).await;
        let mut client = connect(proxy.addr("alpha")).await;
        client
            .write_all(&client_hello("alpha.test")[..10])
            .await
            .expect("client writes");
        expect_hangup(&mut client).await;
        proxy.expect_closed(Reason::HandshakeTimeout).await;
        assert_no_backend_reached(&proxy);
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

/// No route counted a connection: the proxy never connected a backend.
fn assert_no_backend_reached(proxy: &TestProxy) {
    for route in proxy.stats().routes {
        assert_eq!(route.total, 0, "connections routed to {}", route.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_client_hello_ends_at_handshake_timeout() {
    for_each_data_path(|mode| async move {
        let backend = named_backend("alpha").await;
        let config = sni_routes("2s", backend.addr, backend.addr, None);
        let mut proxy = TestProxy::start(mode, &config).await;
        // Before the connect: the proxy's clock starts at its accept, which may come
        // before `connect` returns here.
        let started = Instant::now();
        let client = connect(proxy.addr("alpha")).await;
        client.set_nodelay(true).expect("TCP_NODELAY");
        let (mut read, mut write) = client.into_split();
        // One byte a second: each byte arrives well within the timeout, the whole never.
        let drip = tokio::spawn(async move {
            let hello = client_hello("alpha.test");
            let mut every = tokio::time::interval(Duration::from_secs(1));
            for byte in hello {
                every.tick().await;
                if write.write_all(&[byte]).await.is_err() {
                    return;
                }
            }
        });
        let mut buf = [0u8; 64];
        match within("the proxy hangs up", read.read(&mut buf)).await {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected a hang-up, got {other:?}"),
        }
        assert!(
            started.elapsed() >= Duration::from_secs(2),
            "closed before handshake_timeout, after {:?}",
            started.elapsed()
        );
        proxy.expect_closed(Reason::HandshakeTimeout).await;
        drip.abort();
        assert_no_backend_reached(&proxy);
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_over_16_kib_without_a_client_hello_is_bad_handshake() {
    for_each_data_path(|mode| async move {
        let backend = named_backend("alpha").await;
        let config = sni_routes("10s", backend.addr, backend.addr, None);
        let mut proxy = TestProxy::start(mode, &config).await;
        for declared in [20 * 1024, 16 * 1024 - 4] {
            // Handshake records that add up to more than 16 KiB: a ClientHello header
            // announcing `declared` bytes, then filler in records of at most 2^14 bytes.
            let mut handshake = vec![1u8];
            handshake.extend_from_slice(&(declared as u32).to_be_bytes()[1..]);
            handshake.resize(17 * 1024, 0x41);
            let mut bytes = Vec::new();
            for record in handshake.chunks(4096) {
                bytes.extend_from_slice(&[0x16, 0x03, 0x01]);
                bytes.extend_from_slice(&(record.len() as u16).to_be_bytes());
                bytes.extend_from_slice(record);
            }
            let mut client = connect(proxy.addr("alpha")).await;
            // The proxy may hang up before it read everything: a failed write is fine.
            let _ = client.write_all(&bytes).await;
            expect_hangup(&mut client).await;
            proxy.expect_closed(Reason::BadHandshake).await;
        }
        assert_no_backend_reached(&proxy);
        backend.join().await;
        proxy.stop().await;
    })
    .await;
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit.
fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_silent_connections_do_not_block_a_legitimate_client() {
    const SILENT: usize = 5_000;
    // Each silent connection is two descriptors here: the client's and the proxy's.
    let limit = raise_fd_limit();
    if limit < (2 * SILENT + 1000) as u64 {
        panic!("RLIMIT_NOFILE hard limit {limit} is too low for {SILENT} connections");
    }
    for_each_data_path(|mode| async move {
        let mut sni = SniProxy::start(mode, true).await;
        let baseline = open_fds();
        let mut silent = Vec::with_capacity(SILENT);
        for _ in 0..SILENT {
            silent.push(connect(sni.addr).await);
        }
        wait_for("every silent connection is accepted", || {
            sni.proxy.stats().connections.active as usize == SILENT
        })
        .await;
        assert_routed(&mut sni, "alpha.test", 4096, "alpha").await;
        assert_routed(&mut sni, "b.example.test", 4096, "wild").await;
        assert_eq!(
            sni.proxy.stats().connections.active as usize,
            SILENT,
            "the silent connections are still open"
        );
        drop(silent);
        sni.proxy.wait_idle().await;
        wait_for("the descriptors are back to the baseline", || {
            open_fds() <= baseline
        })
        .await;
        sni.stop().await;
    })
    .await;
}
