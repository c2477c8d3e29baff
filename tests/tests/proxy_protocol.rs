//! `proxy_protocol = "v1" | "v2"` on a route, on each data path, over IPv4 and IPv6: the
//! backend parses the header (with its own parser of the spec, not the proxy's encoder)
//! and reports the client address it saw, which is the client's real address; the
//! client's bytes follow the header exactly once, in order; on a TLS passthrough route
//! the ClientHello read for routing comes after the header; a route without the key
//! sends no header.
//!
//! `accept_proxy_protocol` (a load balancer's header in front of the client's bytes), on
//! each data path: from a trusted sender, v1 and v2, the backend gets the client's bytes
//! only, the connection's row and the header sent on to the backend carry the address the
//! header named, and the kernel variant is spliced; per-IP limits count that address;
//! also behind an SNI route; a LOCAL header counts as the load balancer's own connection.
//! An untrusted sender is reset (`denied`); a malformed header closes with
//! `bad_handshake`, a slow one with `handshake_timeout`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smartproxy::vocab::{Direction, Reason};
use smartproxy_tests::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Reads a PROXY header (v1 or v2) off `stream`: `(source, destination)`.
async fn read_header(stream: &mut BufReader<TcpStream>) -> (SocketAddr, SocketAddr) {
    let first = stream.fill_buf().await.expect("backend reads");
    if first.starts_with(b"PROXY ") {
        let mut line = String::new();
        stream.read_line(&mut line).await.expect("v1 line");
        let line = line
            .strip_suffix("\r\n")
            .unwrap_or_else(|| panic!("v1 line ends in CRLF: {line:?}"));
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 6, "PROXY proto src dst sport dport: {line:?}");
        let ip = |text: &str| -> IpAddr { text.parse().expect("an address") };
        let port = |text: &str| -> u16 { text.parse().expect("a port") };
        let (src, dst) = (ip(fields[2]), ip(fields[3]));
        match fields[1] {
            "TCP4" => assert!(src.is_ipv4() && dst.is_ipv4(), "{line}"),
            "TCP6" => assert!(src.is_ipv6() && dst.is_ipv6(), "{line}"),
            other => panic!("unexpected v1 protocol {other}"),
        }
        return (
            SocketAddr::new(src, port(fields[4])),
            SocketAddr::new(dst, port(fields[5])),
        );
    }
    let mut fixed = [0u8; 16];
    stream.read_exact(&mut fixed).await.expect("v2 fixed part");
    assert_eq!(&fixed[..12], V2_SIGNATURE, "v2 signature");
    assert_eq!(fixed[12], 0x21, "version 2, command PROXY");
    let length = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let mut addresses = vec![0u8; length];
    stream
        .read_exact(&mut addresses)
        .await
        .expect("v2 addresses");
    let port = |at: usize| u16::from_be_bytes([addresses[at], addresses[at + 1]]);
    match fixed[13] {
        0x11 => {
            assert_eq!(length, 12, "TCP4 address block");
            let ip = |at: usize| {
                let octets: [u8; 4] = addresses[at..at + 4].try_into().expect("4 bytes");
                IpAddr::V4(Ipv4Addr::from(octets))
            };
            (
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            )
        }
        0x21 => {
            assert_eq!(length, 36, "TCP6 address block");
            let ip = |at: usize| {
                let octets: [u8; 16] = addresses[at..at + 16].try_into().expect("16 bytes");
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            (
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            )
        }
        other => panic!("unexpected v2 family/protocol byte {other:#04x}"),
    }
}

/// A backend that parses the header, answers `<source> <destination>\n`, then echoes.
async fn header_echo(stream: TcpStream) {
    let mut stream = BufReader::new(stream);
    let (src, dst) = read_header(&mut stream).await;
    // Client bytes the reader already holds are echoed first.
    let mut answer = format!("{src} {dst}\n").into_bytes();
    answer.extend_from_slice(stream.buffer());
    let mut stream = stream.into_inner();
    stream.write_all(&answer).await.expect("backend answers");
    echo(stream).await;
}

/// A backend that sends back every byte it got, header or not.
async fn raw_echo(stream: TcpStream) {
    echo(stream).await;
}

/// The first line the client gets back, then the echo of `payload`. The client's FIN
/// goes last, once the bytes move: a socket closed before the splice is not spliced.
async fn exchange(client: TcpStream, payload: &[u8]) -> String {
    let mut client = BufReader::new(client);
    client
        .get_mut()
        .write_all(payload)
        .await
        .expect("client writes");
    let mut line = String::new();
    within("the backend's answer", client.read_line(&mut line))
        .await
        .expect("client reads the answer");
    let mut echoed = vec![0u8; payload.len()];
    within("the echo", client.read_exact(&mut echoed))
        .await
        .expect("client reads the echo");
    assert!(
        echoed == payload,
        "client bytes after the header, once, in order"
    );
    client.get_mut().shutdown().await.expect("client FIN");
    let mut rest = Vec::new();
    within("the backend's FIN", client.read_to_end(&mut rest))
        .await
        .expect("client reads to the end");
    assert!(rest.is_empty(), "nothing after the echo: {rest:?}");
    line.strip_suffix('\n').unwrap_or(&line).to_owned()
}

#[tokio::test]
async fn backend_sees_the_client_address_in_v1_and_v2_over_ipv4_and_ipv6() {
    for_each_data_path(|mode| async move {
        for version in ["v1", "v2"] {
            for listen in ["127.0.0.1:0", "[::1]:0"] {
                eprintln!("--- {version} on {listen}");
                let backend = Backend::spawn(header_echo).await;
                let route = plain_route(
                    "pp",
                    backend.addr,
                    &format!("proxy_protocol = \"{version}\""),
                )
                .replace("127.0.0.1:0", listen);
                let mut proxy = TestProxy::start(mode, &route).await;
                let listen_addr = proxy.addr("pp");
                let client = connect(listen_addr).await;
                let client_addr = client.local_addr().expect("client address");
                let seen = exchange(client, &pattern(50_000, 3)).await;
                assert_eq!(
                    seen,
                    format!("{client_addr} {listen_addr}"),
                    "{version} over {listen}: the backend sees the client and the proxy's address"
                );
                proxy.expect_closed(Reason::Normal).await;
                if splices(mode) {
                    assert_eq!(
                        proxy.stats().ebpf.splice_failures,
                        0,
                        "the connection was spliced after its header"
                    );
                }
                proxy.stop().await;
                backend.join().await;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn on_an_sni_route_the_header_precedes_the_client_hello() {
    for_each_data_path(|mode| async move {
        for version in ["v1", "v2"] {
            let backend = Backend::spawn(header_echo).await;
            let extra = format!(
                "sni = [\"pp.test\"]\ntls = \"passthrough\"\nproxy_protocol = \"{version}\""
            );
            let mut proxy = TestProxy::start(mode, &plain_route("tls", backend.addr, &extra)).await;
            let client = connect(proxy.addr("tls")).await;
            let client_addr = client.local_addr().expect("client address");
            // `exchange` checks the ClientHello arrives whole, once, after the header.
            let seen = exchange(client, &client_hello("pp.test")).await;
            assert_eq!(
                seen,
                format!("{client_addr} {}", proxy.addr("tls")),
                "{version}"
            );
            proxy.expect_closed(Reason::Normal).await;
            proxy.stop().await;
            backend.join().await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_route_without_proxy_protocol_sends_no_header() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(raw_echo).await;
        let mut proxy = TestProxy::start(mode, &plain_route("plain", backend.addr, "")).await;
        let mut client = connect(proxy.addr("plain")).await;
        client.write_all(b"hello").await.expect("client writes");
        let mut echoed = [0u8; 5];
        within("the echo", client.read_exact(&mut echoed))
            .await
            .expect("client reads the echo");
        assert_eq!(&echoed, b"hello", "no header before the client's bytes");
        client.shutdown().await.expect("client FIN");
        within("the backend's FIN", client.read_to_end(&mut Vec::new()))
            .await
            .expect("client reads to the end");
        proxy.expect_closed(Reason::Normal).await;
        proxy.stop().await;
        backend.join().await;
    })
    .await;
}

// === accepting a load balancer's header ===

/// The address the headers below say the client connected to, of the client's family (a
/// header with mixed families names no address).
fn front(client: &str) -> &'static str {
    if client.starts_with('[') {
        "[2001:db8::1]:443"
    } else {
        "198.51.100.1:443"
    }
}

/// The header a load balancer sends for the connection of `client` to [`front`].
fn balancer_header(version: &str, client: &str) -> Vec<u8> {
    let version = match version {
        "v1" => smartproxy::proxy_protocol::Version::V1,
        "v2" => smartproxy::proxy_protocol::Version::V2,
        other => panic!("no PROXY protocol version {other}"),
    };
    let destination: SocketAddr = front(client).parse().expect("an address");
    let client: SocketAddr = client.parse().expect("a client address");
    smartproxy::proxy_protocol::header(version, client, destination)
}

/// A route behind a load balancer on 127.0.0.1 that sends its backend a v2 header.
fn behind_balancer(backend: SocketAddr, accept: &str, extra: &str) -> String {
    plain_route(
        "lb",
        backend,
        &format!(
            "accept_proxy_protocol = \"{accept}\"\nproxy_protocol_trusted = [\"127.0.0.1/32\"]\nproxy_protocol = \"v2\"\n{extra}"
        ),
    )
}

/// A connection through the load balancer for `client`: sends the header and `hello`,
/// and checks that the backend saw `client` (and [`front`]) in the header the proxy sent
/// it, then `hello` alone.
async fn through_balancer(addr: SocketAddr, version: &str, client: &str) -> BufReader<TcpStream> {
    let mut stream = BufReader::new(connect(addr).await);
    let hello = b"hello";
    let sent = [balancer_header(version, client), hello.to_vec()].concat();
    stream
        .get_mut()
        .write_all(&sent)
        .await
        .expect("client writes");
    let mut line = String::new();
    within("the backend's answer", stream.read_line(&mut line))
        .await
        .expect("client reads the answer");
    assert_eq!(
        line,
        format!("{client} {}\n", front(client)),
        "{version}: the header sent on"
    );
    let mut echoed = [0u8; 5];
    within("the echo", stream.read_exact(&mut echoed))
        .await
        .expect("client reads the echo");
    assert_eq!(
        &echoed, hello,
        "{version}: the client's bytes, without the header"
    );
    stream
}

async fn hang_up(mut stream: BufReader<TcpStream>) {
    stream.get_mut().shutdown().await.expect("client FIN");
    let mut rest = Vec::new();
    within("the backend's FIN", stream.read_to_end(&mut rest))
        .await
        .expect("client reads to the end");
    assert!(rest.is_empty(), "nothing after the echo: {rest:?}");
}

#[tokio::test]
async fn a_trusted_balancers_header_names_the_client() {
    for_each_data_path(|mode| async move {
        for (accept, version, client) in [
            ("v1", "v1", "192.0.2.10:40001"),
            ("v2", "v2", "192.0.2.11:40002"),
            ("any", "v1", "[2001:db8::12]:40003"),
            ("any", "v2", "[2001:db8::13]:40004"),
        ] {
            eprintln!("--- accept {accept}, a {version} header for {client}");
            let backend = Backend::spawn(header_echo).await;
            let mut proxy =
                TestProxy::start(mode, &behind_balancer(backend.addr, accept, "")).await;
            let mut stream = through_balancer(proxy.addr("lb"), version, client).await;
            let rows = proxy.proxy.connection_rows();
            assert_eq!(rows.len(), 1, "{rows:?}");
            assert_eq!(rows[0].client, client, "the row shows the carried client");
            // On auto the splice follows the echo on the connection's own thread.
            wait_for("the row booked on the proxy's data path", || {
                proxy.proxy.connection_rows()[0].data_path == Some(proxy.stats().data_path)
            })
            .await;
            // Past the splice: the kernel variant moves these itself.
            let before = proxy.kernel_bytes();
            let payload = pattern(20_000, 7);
            stream
                .get_mut()
                .write_all(&payload)
                .await
                .expect("client writes");
            let mut echoed = vec![0u8; payload.len()];
            within("the echo", stream.read_exact(&mut echoed))
                .await
                .expect("client reads the echo");
            assert!(echoed == payload, "echoed whole, in order");
            proxy.assert_kernel_moved(before, Direction::ClientToBackend);
            hang_up(stream).await;
            proxy.expect_closed(Reason::Normal).await;
            proxy.stop().await;
            backend.join().await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_local_header_counts_as_the_balancer_itself() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(header_echo).await;
        let mut proxy = TestProxy::start(mode, &behind_balancer(backend.addr, "v2", "")).await;
        let addr = proxy.addr("lb");
        let mut stream = BufReader::new(connect(addr).await);
        let balancer = stream.get_ref().local_addr().expect("client address");
        // A v2 LOCAL command (a health check): no address block.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        local.extend_from_slice(b"hello");
        stream
            .get_mut()
            .write_all(&local)
            .await
            .expect("client writes");
        let mut line = String::new();
        within("the backend's answer", stream.read_line(&mut line))
            .await
            .expect("client reads the answer");
        assert_eq!(
            line,
            format!("{balancer} {addr}\n"),
            "the connection's own addresses"
        );
        let rows = proxy.proxy.connection_rows();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0].client, balancer.to_string());
        let mut echoed = [0u8; 5];
        within("the echo", stream.read_exact(&mut echoed))
            .await
            .expect("client reads the echo");
        assert_eq!(&echoed, b"hello", "the client's bytes, without the header");
        hang_up(stream).await;
        proxy.expect_closed(Reason::Normal).await;
        proxy.stop().await;
        backend.join().await;
    })
    .await;
}

#[tokio::test]
async fn per_ip_limits_count_the_carried_client_not_the_balancer() {
    for_each_data_path(|mode| async move {
        // In `[proxy]` (charged at accept), then on the route (charged once routed).
        for (proxy_keys, route_keys) in [
            ("max_connections_per_ip = 1\n", ""),
            ("", "max_connections_per_ip = 1"),
        ] {
            eprintln!("--- {proxy_keys}{route_keys}");
            let backend = Backend::spawn(header_echo).await;
            let config = format!(
                "{proxy_keys}{}",
                behind_balancer(backend.addr, "v2", route_keys)
            );
            let mut proxy = TestProxy::start(mode, &config).await;
            let addr = proxy.addr("lb");
            // Both from 127.0.0.1, for two clients: both pass.
            let first = through_balancer(addr, "v2", "192.0.2.1:1000").await;
            let second = through_balancer(addr, "v2", "192.0.2.2:1000").await;
            proxy.assert_nothing_closed();

            // The first client again: over its limit.
            let mut again = connect(addr).await;
            again
                .write_all(&balancer_header("v2", "192.0.2.1:2000"))
                .await
                .expect("client writes the header");
            expect_reset(&mut again).await;
            proxy.expect_closed(Reason::MaxConnections).await;

            hang_up(first).await;
            hang_up(second).await;
            proxy.wait_idle().await;
            proxy.stop().await;
            backend.join().await;
        }
    })
    .await;
}

#[tokio::test]
async fn an_untrusted_sender_is_reset_before_anything_is_read() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(header_echo).await;
        let mut proxy = TestProxy::start(mode, &behind_balancer(backend.addr, "any", "")).await;
        expect_refused("127.0.0.2", proxy.addr("lb")).await;
        proxy.expect_closed(Reason::Denied).await;
        assert_eq!(proxy.stats().closed(Reason::Denied), 1, "counted");
        proxy.stop().await;
        backend.join().await;
    })
    .await;
}

#[tokio::test]
async fn a_malformed_header_is_a_bad_handshake() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(header_echo).await;
        let mut proxy = TestProxy::start(mode, &behind_balancer(backend.addr, "v1", "")).await;
        let mut oversized = V2_SIGNATURE.to_vec();
        oversized.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        for (what, bytes) in [
            ("no header", b"GET / HTTP/1.1\r\n\r\n".to_vec()),
            (
                "a bad address",
                b"PROXY TCP4 192.0.2.300 198.51.100.1 1 2\r\nhello".to_vec(),
            ),
            (
                "a v2 header where v1 is expected",
                balancer_header("v2", "192.0.2.1:1"),
            ),
            (
                "a v1 line without its end",
                [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat(),
            ),
            ("v2 announcing 64 KiB", oversized),
        ] {
            eprintln!("--- {what}");
            let mut stream = connect(proxy.addr("lb")).await;
            stream.write_all(&bytes).await.expect("client writes");
            expect_hangup(&mut stream).await;
            proxy.expect_closed(Reason::BadHandshake).await;
        }
        proxy.stop().await;
        backend.join().await;
    })
    .await;
}

#[tokio::test]
async fn a_header_slower_than_handshake_timeout_times_out() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(header_echo).await;
        let config = format!(
            "[lifecycle]\nhandshake_timeout = \"300ms\"\n\n{}",
            behind_balancer(backend.addr, "v1", "")
        );
        let mut proxy = TestProxy::start(mode, &config).await;
        let mut stream = connect(proxy.addr("lb")).await;
        let header = balancer_header("v1", "192.0.2.1:1000");
        stream
            .write_all(&header[..10])
            .await
            .expect("client writes");
        expect_hangup(&mut stream).await;
        proxy.expect_closed(Reason::HandshakeTimeout).await;
        proxy.stop().await;
        backend.join().await;
    })
    .await;
}

#[tokio::test]
async fn on_an_sni_route_the_balancers_header_precedes_the_client_hello() {
    for_each_data_path(|mode| async move {
        let backend = Backend::spawn(header_echo).await;
        let extra = "sni = [\"pp.test\"]\ntls = \"passthrough\"";
        let mut proxy = TestProxy::start(mode, &behind_balancer(backend.addr, "v2", extra)).await;
        let client = "192.0.2.20:5555";
        let mut stream = connect(proxy.addr("lb")).await;
        stream
            .write_all(&balancer_header("v2", client))
            .await
            .expect("client writes the header");
        // `exchange` checks the ClientHello arrives whole, once, without the header.
        let seen = exchange(stream, &client_hello("pp.test")).await;
        assert_eq!(seen, format!("{client} {}", front(client)));
        proxy.expect_closed(Reason::Normal).await;
        proxy.stop().await;
        backend.join().await;
    })
    .await;
}
