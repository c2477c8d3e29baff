//! PROXY protocol headers (HAProxy's spec, versions 1 and 2) that a route sends to its
//! backend first, so the backend sees the real client address.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

/// `proxy_protocol` of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// The text header: `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`.
    V1,
    /// The binary header.
    V2,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        })
    }
}

/// The 12 bytes every version 2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
const V2_UNSPEC: u8 = 0x00;
const V2_TCP4: u8 = 0x11;
const V2_TCP6: u8 = 0x21;

/// The header for a connection from `client` that arrived at `local` (the proxy's
/// address the client connected to).
///
/// IPv4-mapped IPv6 addresses (a dual-stack listener) are written as IPv4. Should the two
/// still differ in family, the header says so (v1 `UNKNOWN`, v2 `AF_UNSPEC`) and the
/// backend falls back to the connection's own addresses, as the spec asks.
pub fn header(version: Version, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (src, dst) = (client.ip().to_canonical(), local.ip().to_canonical());
    let (sport, dport) = (client.port(), local.port());
    match version {
        Version::V1 => {
            let line = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => format!("PROXY TCP4 {s} {d} {sport} {dport}\r\n"),
                (IpAddr::V6(s), IpAddr::V6(d)) => format!("PROXY TCP6 {s} {d} {sport} {dport}\r\n"),
                _ => "PROXY UNKNOWN\r\n".to_owned(),
            };
            line.into_bytes()
        }
        Version::V2 => {
            let (family, mut addresses) = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => (V2_TCP4, [s.octets(), d.octets()].concat()),
                (IpAddr::V6(s), IpAddr::V6(d)) => (V2_TCP6, [s.octets(), d.octets()].concat()),
                _ => (V2_UNSPEC, Vec::new()),
            };
            if family != V2_UNSPEC {
                addresses.extend_from_slice(&sport.to_be_bytes());
                addresses.extend_from_slice(&dport.to_be_bytes());
            }
            let length = u16::try_from(addresses.len()).expect("at most 36 address bytes");
            let mut header = Vec::with_capacity(16 + addresses.len());
            header.extend_from_slice(&V2_SIGNATURE);
            header.push(V2_PROXY);
            header.push(family);
            header.extend_from_slice(&length.to_be_bytes());
            header.extend_from_slice(&addresses);
            header
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("a socket address")
    }

    #[test]
    fn v1_tcp4_is_the_text_line_of_the_spec() {
        let h = header(
            Version::V1,
            addr("192.168.0.1:56324"),
            addr("192.168.0.11:443"),
        );
        assert_eq!(h, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
    }

    #[test]
    fn v1_tcp6_uses_the_compressed_address_form() {
        let h = header(Version::V1, addr("[2001:db8::1]:1234"), addr("[::1]:80"));
        assert_eq!(h, b"PROXY TCP6 2001:db8::1 ::1 1234 80\r\n");
    }

    #[test]
    fn v1_ipv4_mapped_addresses_are_written_as_tcp4() {
        let h = header(
            Version::V1,
            addr("[::ffff:10.0.0.1]:1000"),
            addr("[::ffff:10.0.0.2]:2000"),
        );
        assert_eq!(h, b"PROXY TCP4 10.0.0.1 10.0.0.2 1000 2000\r\n");
    }

    #[test]
    fn v1_mixed_families_are_unknown() {
        let h = header(
            Version::V1,
            addr("10.0.0.1:1000"),
            addr("[2001:db8::2]:2000"),
        );
        assert_eq!(h, b"PROXY UNKNOWN\r\n");
    }

    #[test]
    fn v2_tcp4_layout() {
        let h = header(
            Version::V2,
            addr("192.168.0.1:56324"),
            addr("192.168.0.11:443"),
        );
        let mut expected = vec![
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54,
            0x0A, // signature
            0x21, // version 2, PROXY
            0x11, // AF_INET, STREAM
            0x00, 12, // address length
            192, 168, 0, 1, // source
            192, 168, 0, 11, // destination
        ];
        expected.extend_from_slice(&56324u16.to_be_bytes());
        expected.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(h, expected);
    }

    #[test]
    fn v2_tcp6_layout() {
        let h = header(Version::V2, addr("[2001:db8::1]:1234"), addr("[::1]:80"));
        assert_eq!(h[..12], V2_SIGNATURE);
        assert_eq!(h[12], 0x21, "version 2, PROXY");
        assert_eq!(h[13], 0x21, "AF_INET6, STREAM");
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 36);
        assert_eq!(h.len(), 16 + 36);
        let src: std::net::Ipv6Addr = "2001:db8::1".parse().expect("ipv6");
        assert_eq!(h[16..32], src.octets());
        assert_eq!(h[32..48], std::net::Ipv6Addr::LOCALHOST.octets());
        assert_eq!(h[48..50], 1234u16.to_be_bytes());
        assert_eq!(h[50..52], 80u16.to_be_bytes());
    }

    #[test]
    fn v2_mixed_families_are_unspec_with_no_addresses() {
        let h = header(
            Version::V2,
            addr("10.0.0.1:1000"),
            addr("[2001:db8::2]:2000"),
        );
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x00, 0x00, 0x00]);
        assert_eq!(h, expected);
    }
}
