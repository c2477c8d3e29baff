//! `proxy_protocol = "v1" | "v2"` on a route, on each data path, over IPv4 and IPv6: the
//! backend parses the header (with its own parser of the spec, not the proxy's encoder)
//! and reports the client address it saw, which is the client's real address; the
//! client's bytes follow the header exactly once, in order; on a TLS passthrough route
//! the ClientHello read for routing comes after the header; a route without the key
//! sends no header.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use smartproxy::config::DataPathMode;
use smartproxy::vocab::Reason;
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
                if mode == DataPathMode::Ebpf {
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
