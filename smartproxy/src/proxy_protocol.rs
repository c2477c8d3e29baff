//! PROXY protocol headers (HAProxy's spec, versions 1 and 2): the one a route sends to its
//! backend first, so the backend sees the real client address, and the one a trusted load
//! balancer sends the proxy first (`accept_proxy_protocol`), read here.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

use crate::limits::Cidr;

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

// === receiving: the header a trusted load balancer sends before the client's bytes ===

/// `accept_proxy_protocol` of a route: the header versions its listen address requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accept {
    V1,
    V2,
    Any,
}

impl Accept {
    fn admits(self, version: Version) -> bool {
        matches!(
            (self, version),
            (Self::Any, _) | (Self::V1, Version::V1) | (Self::V2, Version::V2)
        )
    }
}

impl std::fmt::Display for Accept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
            Self::Any => "any",
        })
    }
}

/// A listen address's inbound PROXY protocol (the same on every route there: the header
/// comes before routing).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inbound {
    pub accept: Accept,
    /// `proxy_protocol_trusted`, never empty: the only peers admitted on the address.
    pub trusted: Vec<Cidr>,
}

impl Inbound {
    /// Whether `peer` may connect at all. Anyone else is refused whether or not they send
    /// a header, so that no client can name its own address.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted.iter().any(|cidr| cidr.contains(peer))
    }
}

/// The most header bytes read. A v1 line is at most 107 bytes; a v2 header may announce
/// 16 + 65,535, but its addresses and the TLVs load balancers add (AWS's VPC endpoint id,
/// a TLS summary) take a few hundred: a longer one is refused rather than buffered.
pub const MAX_HEADER: usize = 4096;
/// A v1 line, `\r\n` included (the spec's worst case, TCP6 with the longest addresses).
const V1_MAX: usize = 107;
const V1_PREFIX: &[u8] = b"PROXY ";
/// Signature, version and command, family, and the 2-byte length of the rest.
const V2_FIXED: usize = 16;

/// A complete header at the start of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Its length in bytes: the client's own stream starts right after it.
    pub len: usize,
    /// The client and the address it connected to. `None` when the header carries none: a
    /// v2 LOCAL command (the load balancer's own health check), v1 `UNKNOWN`, or a family
    /// or protocol other than TCP over IPv4/IPv6; the connection's own addresses stand.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
}

/// What the first bytes of a stream say so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peeked {
    /// A valid start: more bytes are needed.
    Incomplete,
    Complete(Received),
}

/// Why the bytes are not a header this address accepts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("the stream does not start with a PROXY protocol header")]
    NotAHeader,
    #[error("a {got} header, but this address accepts {accepted}")]
    Version { got: Version, accepted: Accept },
    #[error("a {version} header longer than {max} bytes")]
    TooLong { version: Version, max: usize },
    #[error("a malformed {version} header: {reason}")]
    Malformed { version: Version, reason: String },
}

/// Reads the PROXY header at the start of `bytes` (the stream so far). The length is
/// framed here (v1: up to the first `\r\n`; v2: the fixed part's length field), so that
/// the caller knows where the client's own bytes start; the `ppp` crate then parses
/// exactly the header's bytes. A verdict other than `Incomplete` does not change with
/// more bytes, and comes within [`MAX_HEADER`] bytes.
pub fn read_header(bytes: &[u8], accept: Accept) -> Result<Peeked, HeaderError> {
    let version = match bytes.first() {
        None => return Ok(Peeked::Incomplete),
        Some(b'P') => Version::V1,
        Some(b'\r') => Version::V2,
        Some(_) => return Err(HeaderError::NotAHeader),
    };
    let (prefix, max) = match version {
        Version::V1 => (V1_PREFIX, V1_MAX),
        Version::V2 => (&V2_SIGNATURE[..], MAX_HEADER),
    };
    if !bytes.starts_with(prefix) && !prefix.starts_with(bytes) {
        return Err(HeaderError::NotAHeader);
    }
    if !accept.admits(version) {
        return Err(HeaderError::Version {
            got: version,
            accepted: accept,
        });
    }
    let malformed = |reason: String| HeaderError::Malformed { version, reason };
    match version {
        Version::V1 => {
            let Some(cr) = bytes.iter().take(max - 1).position(|&b| b == b'\r') else {
                return if bytes.len() >= max - 1 {
                    Err(HeaderError::TooLong { version, max })
                } else {
                    Ok(Peeked::Incomplete)
                };
            };
            match bytes.get(cr + 1) {
                None => return Ok(Peeked::Incomplete),
                Some(b'\n') => {}
                Some(_) => return Err(malformed("\\r not followed by \\n".to_owned())),
            }
            let len = cr + 2;
            let header =
                ppp::v1::Header::try_from(&bytes[..len]).map_err(|e| malformed(e.to_string()))?;
            let addresses = match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                ppp::v1::Addresses::Tcp6(a) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                ppp::v1::Addresses::Unknown => None,
            };
            Ok(Peeked::Complete(Received { len, addresses }))
        }
        Version::V2 => {
            let Some(length) = bytes.get(V2_FIXED - 2..V2_FIXED) else {
                return Ok(Peeked::Incomplete);
            };
            let len = V2_FIXED + usize::from(u16::from_be_bytes([length[0], length[1]]));
            if len > max {
                return Err(HeaderError::TooLong { version, max });
            }
            let Some(whole) = bytes.get(..len) else {
                return Ok(Peeked::Incomplete);
            };
            let header = ppp::v2::Header::try_from(whole).map_err(|e| malformed(e.to_string()))?;
            let addresses = match (header.command, header.protocol, header.addresses) {
                (
                    ppp::v2::Command::Proxy,
                    ppp::v2::Protocol::Stream,
                    ppp::v2::Addresses::IPv4(a),
                ) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                (
                    ppp::v2::Command::Proxy,
                    ppp::v2::Protocol::Stream,
                    ppp::v2::Addresses::IPv6(a),
                ) => Some((
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                )),
                _ => None,
            };
            Ok(Peeked::Complete(Received { len, addresses }))
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

    // === receiving ===

    fn received(len: usize, client: &str, destination: &str) -> Result<Peeked, HeaderError> {
        Ok(Peeked::Complete(Received {
            len,
            addresses: Some((addr(client), addr(destination))),
        }))
    }

    #[test]
    fn reads_what_header_writes_and_stops_at_its_end() {
        for version in [Version::V1, Version::V2] {
            for (client, local) in [
                ("192.0.2.7:40000", "10.0.0.1:443"),
                ("[2001:db8::7]:40000", "[2001:db8::1]:443"),
            ] {
                let mut stream = header(version, addr(client), addr(local));
                let len = stream.len();
                stream.extend_from_slice(b"\x16\x03\x01 the client's own bytes");
                assert_eq!(
                    read_header(&stream, Accept::Any),
                    received(len, client, local),
                    "{version} {client}"
                );
                for cut in 0..len {
                    assert_eq!(
                        read_header(&stream[..cut], Accept::Any),
                        Ok(Peeked::Incomplete),
                        "{version} {client} cut at {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn local_command_and_unknown_carry_no_address() {
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        let unknown = b"PROXY UNKNOWN\r\n";
        for (bytes, len) in [(&local[..], 16), (&unknown[..], unknown.len())] {
            assert_eq!(
                read_header(bytes, Accept::Any),
                Ok(Peeked::Complete(Received {
                    len,
                    addresses: None
                }))
            );
        }
    }

    #[test]
    fn a_version_the_address_does_not_accept_is_refused() {
        let v1 = header(Version::V1, addr("192.0.2.7:1"), addr("10.0.0.1:2"));
        let v2 = header(Version::V2, addr("192.0.2.7:1"), addr("10.0.0.1:2"));
        assert!(matches!(
            read_header(&v1, Accept::V2),
            Err(HeaderError::Version { .. })
        ));
        assert!(matches!(
            read_header(&v2[..1], Accept::V1),
            Err(HeaderError::Version { .. })
        ));
    }

    #[test]
    fn malformed_and_oversized_headers_are_refused() {
        let refused = |bytes: &[u8]| read_header(bytes, Accept::Any).unwrap_err();
        assert_eq!(refused(b"\x16\x03\x01"), HeaderError::NotAHeader);
        assert_eq!(refused(b"PROXX"), HeaderError::NotAHeader);
        assert!(matches!(
            refused(b"PROXY TCP4 300.0.0.1 10.0.0.1 1 2\r\n"),
            HeaderError::Malformed { .. }
        ));
        assert!(matches!(
            refused(b"PROXY TCP4 1.2.3.4\rX"),
            HeaderError::Malformed { .. }
        ));
        assert!(matches!(
            refused(&[b"PROXY ".as_slice(), &[b'1'; 101]].concat()),
            HeaderError::TooLong { .. }
        ));
        let mut long = V2_SIGNATURE.to_vec();
        let rest = u16::try_from(MAX_HEADER - 16 + 1).expect("fits");
        long.extend_from_slice(&[0x21, 0x11]);
        long.extend_from_slice(&rest.to_be_bytes());
        assert!(matches!(refused(&long), HeaderError::TooLong { .. }));
    }
}
