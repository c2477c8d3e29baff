//! TLS ClientHello reader: finds the SNI name and ALPN list in a client's first bytes (no I/O).
//!
//! The caller keeps appending what it reads from the client to one buffer and calls
//! [`parse_client_hello`] again after every read, until it gets [`Peek::Complete`] or an
//! error. Nothing here consumes or rewrites the buffer: the caller forwards it verbatim to
//! the backend afterwards.
//!
//! What is accepted, and why:
//! - Record layer (RFC 8446 §5.1): consecutive `handshake` records whose payloads are
//!   concatenated, so a ClientHello fragmented over several records is reassembled. A
//!   buffer that does not start like a TLS handshake record is [`ClientHelloError::NotTls`]
//!   as soon as the offending byte is there, without waiting for more data: a plain-text
//!   client must not hold a connection open until `handshake_timeout`.
//! - Any prefix of a valid ClientHello is [`Peek::Incomplete`], never an error, whatever
//!   the TCP segmentation.
//! - At most [`MAX_CLIENT_HELLO`] bytes of records are read before the ClientHello must be
//!   complete ([`ClientHelloError::TooLarge`]); this bounds what a connection can make the
//!   proxy buffer before it is routed.
//! - The ClientHello body (RFC 8446 §4.1.2) is checked field by field with bounds checks;
//!   `server_name` (RFC 6066 §3) and `application_layer_protocol_negotiation` (RFC 7301)
//!   are decoded, other extensions are skipped. Bytes after the ClientHello (TLS 1.3 early
//!   data, say) are not looked at.

use std::collections::HashSet;

/// Record bytes (headers included) allowed before the ClientHello is complete.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// RFC 8446 §5.2 allows a record up to 2^14 + 256 bytes; TLS 1.2 allowed 2^14 + 2048 for
/// ciphertext. A handshake record longer than that is not TLS.
const MAX_RECORD_LEN: usize = 16384 + 2048;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
const CONTENT_TYPE_HANDSHAKE: u8 = 0x16;
const HANDSHAKE_TYPE_CLIENT_HELLO: u8 = 0x01;
const EXTENSION_SERVER_NAME: u16 = 0x0000;
const EXTENSION_ALPN: u16 = 0x0010;
const SERVER_NAME_TYPE_HOST_NAME: u8 = 0x00;

/// The outcome of looking at the bytes read so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peek {
    /// A valid prefix of a ClientHello: read more and call again.
    Incomplete,
    /// The whole ClientHello has arrived.
    Complete(ClientHello),
}

/// What routing needs from a ClientHello.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The SNI `host_name`, lowercased and without a trailing dot; `None` when the client
    /// sent no `server_name` extension (or one without a `host_name` entry).
    pub server_name: Option<String>,
    /// ALPN protocol names in the client's order; empty when the extension is absent.
    pub alpn: Vec<Vec<u8>>,
}

/// Why the bytes cannot be a ClientHello we route on.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ClientHelloError {
    /// The first bytes are not a TLS handshake record header (wrong content type or
    /// protocol version): a plain-text or non-TLS client.
    #[error("not a TLS handshake")]
    NotTls,
    /// Looks like TLS but breaks the ClientHello grammar; the text names the broken part.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// More than [`MAX_CLIENT_HELLO`] bytes of records without a complete ClientHello.
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
}

/// Looks at everything the client has sent so far and says whether it holds a complete
/// ClientHello.
///
/// # Errors
///
/// [`ClientHelloError::NotTls`] when the first record header is not a TLS handshake one,
/// [`ClientHelloError::Malformed`] for a TLS record stream that breaks the ClientHello
/// grammar, [`ClientHelloError::TooLarge`] past [`MAX_CLIENT_HELLO`] record bytes. A
/// valid prefix is never an error.
pub fn parse_client_hello(buf: &[u8]) -> Result<Peek, ClientHelloError> {
    // Handshake-layer bytes reassembled from the records seen so far. A ClientHello is
    // a few hundred bytes and the caller re-calls only after a read, so copying is cheap.
    let mut handshake = Vec::new();
    let mut record_start = 0;
    loop {
        let rest = &buf[record_start..];
        check_record_header(rest, record_start == 0)?;
        let Some(header) = rest.get(..RECORD_HEADER_LEN) else {
            return Ok(Peek::Incomplete);
        };
        let record_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if record_len == 0 {
            // RFC 8446 §5.1: zero-length handshake fragments MUST NOT be sent.
            return Err(ClientHelloError::Malformed("empty handshake record"));
        }
        if record_len > MAX_RECORD_LEN {
            return Err(ClientHelloError::Malformed(
                "record longer than 18432 bytes",
            ));
        }
        let payload_start = record_start + RECORD_HEADER_LEN;
        let payload = &rest[RECORD_HEADER_LEN..];
        let available = record_len.min(payload.len());
        let before = handshake.len();
        handshake.extend_from_slice(&payload[..available]);

        if handshake
            .first()
            .is_some_and(|&t| t != HANDSHAKE_TYPE_CLIENT_HELLO)
        {
            return Err(ClientHelloError::Malformed(
                "first handshake message is not a ClientHello",
            ));
        }
        let hello_len = handshake.get(..HANDSHAKE_HEADER_LEN).map(|h| {
            HANDSHAKE_HEADER_LEN
                + (usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]))
        });
        // The earliest offset in `buf` at which the ClientHello can end, from the lengths
        // declared so far. Checking the cap against it (and not against the bytes read)
        // makes `TooLarge` a property of the bytes, not of how they were segmented: it
        // comes as soon as it is certain, and a longer buffer never turns it into
        // `Complete`.
        let earliest_end = match hello_len {
            Some(total) => {
                debug_assert!(
                    before < total,
                    "a complete hello returned on the previous record"
                );
                let remaining = total.saturating_sub(before);
                if remaining <= record_len {
                    payload_start + remaining
                } else {
                    // The rest needs at least one more record header.
                    payload_start + record_len + RECORD_HEADER_LEN + (remaining - record_len)
                }
            }
            None => payload_start + 1,
        };
        if earliest_end > MAX_CLIENT_HELLO {
            return Err(ClientHelloError::TooLarge);
        }
        if let Some(body) = hello_len.and_then(|total| handshake.get(HANDSHAKE_HEADER_LEN..total)) {
            return parse_body(body).map(Peek::Complete);
        }
        if available < record_len {
            return Ok(Peek::Incomplete);
        }
        record_start = payload_start + record_len;
    }
}

/// Checks the bytes of a record header that have arrived (0 to 5 of them).
fn check_record_header(header: &[u8], first: bool) -> Result<(), ClientHelloError> {
    let bad = |reason| {
        if first {
            ClientHelloError::NotTls
        } else {
            ClientHelloError::Malformed(reason)
        }
    };
    if header.first().is_some_and(|&t| t != CONTENT_TYPE_HANDSHAKE) {
        return Err(bad("non-handshake record before the ClientHello ended"));
    }
    // legacy_record_version: 0x0300 (SSL 3.0) to 0x0304; clients send 0x0301 or 0x0303.
    if header.get(1).is_some_and(|&major| major != 0x03) {
        return Err(bad("record version is not 3.x"));
    }
    if header.get(2).is_some_and(|&minor| minor > 0x04) {
        return Err(bad("record version is not 3.0 to 3.4"));
    }
    Ok(())
}

/// Parses a complete ClientHello body (after the 4-byte handshake header).
fn parse_body(body: &[u8]) -> Result<ClientHello, ClientHelloError> {
    let mut r = Reader(body);
    r.take(2, "legacy_version")?;
    r.take(32, "random")?;
    let session_id = r.vec_u8("legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(ClientHelloError::Malformed(
            "legacy_session_id longer than 32 bytes",
        ));
    }
    let cipher_suites = r.vec_u16("cipher_suites")?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(ClientHelloError::Malformed("cipher_suites"));
    }
    if r.vec_u8("legacy_compression_methods")?.is_empty() {
        return Err(ClientHelloError::Malformed(
            "legacy_compression_methods is empty",
        ));
    }
    let mut hello = ClientHello::default();
    if r.is_empty() {
        // A TLS 1.2 (or older) ClientHello may omit the extensions block entirely.
        return Ok(hello);
    }
    let mut extensions = Reader(r.vec_u16("extensions")?);
    if !r.is_empty() {
        return Err(ClientHelloError::Malformed("bytes after the extensions"));
    }
    let mut seen = HashSet::new();
    while !extensions.is_empty() {
        let kind = extensions.u16("extension type")?;
        let data = extensions.vec_u16("extension data")?;
        if !seen.insert(kind) {
            // RFC 8446 §4.2: at most one extension of each type.
            return Err(ClientHelloError::Malformed("duplicate extension"));
        }
        match kind {
            EXTENSION_SERVER_NAME => hello.server_name = parse_server_name(data)?,
            EXTENSION_ALPN => hello.alpn = parse_alpn(data)?,
            _ => {}
        }
    }
    Ok(hello)
}

/// RFC 6066 §3 `ServerNameList`: the `host_name` entry, if any.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, ClientHelloError> {
    let mut outer = Reader(data);
    let mut list = Reader(outer.vec_u16("server_name_list")?);
    if !outer.is_empty() || list.is_empty() {
        return Err(ClientHelloError::Malformed("server_name extension"));
    }
    let mut host_name = None;
    while !list.is_empty() {
        let name_type = list.u8("server name type")?;
        let name = list.vec_u16("server name")?;
        if name_type != SERVER_NAME_TYPE_HOST_NAME {
            continue; // RFC 6066 leaves room for other name types; none is defined.
        }
        if host_name.is_some() {
            return Err(ClientHelloError::Malformed("more than one host_name"));
        }
        let name = std::str::from_utf8(name)
            .ok()
            .map(|n| n.strip_suffix('.').unwrap_or(n))
            .filter(|n| is_dns_name(n))
            .ok_or(ClientHelloError::Malformed("host_name is not a DNS name"))?;
        host_name = Some(name.to_ascii_lowercase());
    }
    Ok(host_name)
}

/// RFC 7301 §3.1 `ProtocolNameList`.
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, ClientHelloError> {
    let mut outer = Reader(data);
    let mut list = Reader(outer.vec_u16("protocol_name_list")?);
    if !outer.is_empty() || list.is_empty() {
        return Err(ClientHelloError::Malformed("ALPN extension"));
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let name = list.vec_u8("ALPN protocol name")?;
        if name.is_empty() {
            return Err(ClientHelloError::Malformed("empty ALPN protocol name"));
        }
        protocols.push(name.to_vec());
    }
    Ok(protocols)
}

/// Whether `name` is a DNS host name as SNI carries it: ASCII letters, digits, `-` and
/// `_` (seen in real names, and accepted by common TLS stacks), labels of 1 to 63 bytes
/// that neither start nor end with `-`, 253 bytes at most, no trailing dot. Shared with
/// `config`, so that every name a route can list is one a client can send.
pub(crate) fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A bounds-checked cursor over TLS wire bytes; running past the end is `Malformed`
/// with the name of the field being read.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        let (head, tail) = self
            .0
            .split_at_checked(n)
            .ok_or(ClientHelloError::Malformed(what))?;
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ClientHelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ClientHelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec_u8(&mut self, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what)
    }

    /// A vector with a two-byte length prefix.
    fn vec_u16(&mut self, what: &'static str) -> Result<&'a [u8], ClientHelloError> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }
}

#[cfg(test)]
mod tests {
    //! Covers: a real rustls ClientHello (every prefix incomplete, whole one complete),
    //! re-split into 1-byte reads and re-framed into 50-byte records, no SNI, ALPN,
    //! garbage and non-ClientHello handshakes, size caps, malformed names, and random
    //! and mutated inputs (no panic, prefixes of valid input never an error).

    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::sync::Arc;

    /// The first flight rustls sends for `server_name`, with `alpn` offered.
    fn rustls_client_hello(server_name: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())
            .expect("test server names are valid");
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), name).expect("client connection");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out)
                .expect("writing to a Vec cannot fail");
        }
        out
    }

    /// Splits the handshake payload of `flight` (one or more records) into records of at
    /// most `size` payload bytes.
    fn reframe(flight: &[u8], size: usize) -> Vec<u8> {
        let mut payload = Vec::new();
        let mut rest = flight;
        while !rest.is_empty() {
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            payload.extend_from_slice(&rest[5..5 + len]);
            rest = &rest[5 + len..];
        }
        records(&payload, size)
    }

    fn records(payload: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in payload.chunks(size) {
            out.extend_from_slice(&[0x16, 0x03, 0x01]);
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A minimal ClientHello handshake message with the given extensions block contents.
    fn hello_with_extensions(extensions: &[u8]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&u16::try_from(extensions.len()).unwrap().to_be_bytes());
        body.extend_from_slice(extensions);
        let mut msg = vec![HANDSHAKE_TYPE_CLIENT_HELLO];
        msg.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    fn sni_extension(name: &[u8]) -> Vec<u8> {
        let mut ext = vec![0x00, 0x00];
        let entry_len = 3 + name.len();
        ext.extend_from_slice(&u16::try_from(entry_len + 2).unwrap().to_be_bytes());
        ext.extend_from_slice(&u16::try_from(entry_len).unwrap().to_be_bytes());
        ext.push(SERVER_NAME_TYPE_HOST_NAME);
        ext.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
        ext.extend_from_slice(name);
        ext
    }

    fn assert_prefixes_incomplete(buf: &[u8]) {
        for end in 0..buf.len() {
            assert_eq!(
                parse_client_hello(&buf[..end]),
                Ok(Peek::Incomplete),
                "prefix of {end} of {} bytes",
                buf.len()
            );
        }
    }

    fn complete(buf: &[u8]) -> ClientHello {
        match parse_client_hello(buf) {
            Ok(Peek::Complete(hello)) => hello,
            other => panic!("expected a complete ClientHello, got {other:?}"),
        }
    }

    #[test]
    fn every_prefix_of_a_rustls_hello_is_incomplete_and_the_whole_is_complete() {
        let flight = rustls_client_hello("Backend.Example.COM", &[]);
        assert_prefixes_incomplete(&flight);
        let hello = complete(&flight);
        assert_eq!(hello.server_name.as_deref(), Some("backend.example.com"));
        assert!(hello.alpn.is_empty());
    }

    #[test]
    fn one_byte_reads_reach_complete_only_at_the_last_byte() {
        let flight = rustls_client_hello("example.com", &[]);
        let mut buf = Vec::new();
        for (i, byte) in flight.iter().enumerate() {
            buf.push(*byte);
            let peek = parse_client_hello(&buf).expect("a prefix is never an error");
            assert_eq!(
                peek == Peek::Incomplete,
                i + 1 < flight.len(),
                "after {} bytes",
                i + 1
            );
        }
    }

    #[test]
    fn hello_fragmented_into_50_byte_records_is_reassembled() {
        let flight = rustls_client_hello("example.com", &[b"h2"]);
        let framed = reframe(&flight, 50);
        assert!(
            framed.len() > flight.len() + 5,
            "really split over several records"
        );
        assert_prefixes_incomplete(&framed);
        let hello = complete(&framed);
        assert_eq!(hello.server_name.as_deref(), Some("example.com"));
        assert_eq!(hello.alpn, vec![b"h2".to_vec()]);
    }

    #[test]
    fn hello_fragmented_into_1_byte_records_is_reassembled() {
        let flight = rustls_client_hello("a.example.org", &[]);
        let framed = reframe(&flight, 1);
        assert!(
            framed.len() <= MAX_CLIENT_HELLO,
            "fits under the cap even with overhead"
        );
        assert_eq!(
            complete(&framed).server_name.as_deref(),
            Some("a.example.org")
        );
    }

    #[test]
    fn ip_address_server_name_sends_no_sni() {
        let flight = rustls_client_hello("127.0.0.1", &[]);
        assert_prefixes_incomplete(&flight);
        assert_eq!(complete(&flight).server_name, None);
    }

    #[test]
    fn alpn_protocols_are_listed_in_client_order() {
        let flight = rustls_client_hello("example.com", &[b"h2", b"http/1.1"]);
        assert_eq!(
            complete(&flight).alpn,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn bytes_after_the_hello_are_ignored() {
        let mut buf = rustls_client_hello("example.com", &[]);
        buf.extend_from_slice(b"\x17\x03\x03\x00\x05early");
        assert_eq!(complete(&buf).server_name.as_deref(), Some("example.com"));
    }

    #[test]
    fn plain_text_is_not_tls_from_the_first_byte() {
        assert_eq!(parse_client_hello(b"G"), Err(ClientHelloError::NotTls));
        assert_eq!(
            parse_client_hello(b"GET / HTTP/1.1\r\n"),
            Err(ClientHelloError::NotTls)
        );
        assert_eq!(
            parse_client_hello(b"SSH-2.0-OpenSSH_9.6\r\n"),
            Err(ClientHelloError::NotTls)
        );
    }

    #[test]
    fn bad_record_version_is_not_tls() {
        assert_eq!(
            parse_client_hello(&[0x16, 0x02]),
            Err(ClientHelloError::NotTls)
        );
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x05]),
            Err(ClientHelloError::NotTls)
        );
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x01]),
            Ok(Peek::Incomplete)
        );
    }

    #[test]
    fn other_handshake_message_is_malformed() {
        let server_hello = [0x16, 0x03, 0x03, 0x00, 0x04, 0x02, 0x00, 0x00, 0x26];
        assert_eq!(
            parse_client_hello(&server_hello[..6]),
            Err(ClientHelloError::Malformed(
                "first handshake message is not a ClientHello"
            ))
        );
    }

    #[test]
    fn alert_between_fragments_is_malformed() {
        let flight = rustls_client_hello("example.com", &[]);
        let mut framed = reframe(&flight, 50);
        framed.truncate(55);
        framed.extend_from_slice(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
        assert!(matches!(
            parse_client_hello(&framed),
            Err(ClientHelloError::Malformed(_))
        ));
    }

    #[test]
    fn record_longer_than_the_tls_limit_is_malformed() {
        let len = u16::try_from(MAX_RECORD_LEN + 1).unwrap().to_be_bytes();
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x01, len[0], len[1]]),
            Err(ClientHelloError::Malformed(
                "record longer than 18432 bytes"
            ))
        );
        assert_eq!(
            parse_client_hello(&[0x16, 0x03, 0x01, 0x00, 0x00]),
            Err(ClientHelloError::Malformed("empty handshake record"))
        );
    }

    #[test]
    fn declared_hello_over_the_cap_is_too_large_before_it_arrives() {
        // In one record, 5 + 4 + body bytes: the largest body that fits is 16384 - 9.
        let header = |body: usize| {
            let len = u32::try_from(body).unwrap().to_be_bytes();
            [0x16, 0x03, 0x01, 0x40, 0x00, 0x01, len[1], len[2], len[3]]
        };
        let fits = MAX_CLIENT_HELLO - RECORD_HEADER_LEN - HANDSHAKE_HEADER_LEN;
        assert_eq!(parse_client_hello(&header(fits)), Ok(Peek::Incomplete));
        assert_eq!(
            parse_client_hello(&header(fits + 1)),
            Err(ClientHelloError::TooLarge)
        );
    }

    #[test]
    fn hello_of_exactly_the_cap_is_complete() {
        let sni = sni_extension(b"example.com");
        let overhead = RECORD_HEADER_LEN + hello_with_extensions(&sni).len() + 4;
        let mut ext = sni.clone();
        ext.extend_from_slice(&[0x00, 0x15]); // padding extension
        let pad = MAX_CLIENT_HELLO - overhead;
        ext.extend_from_slice(&u16::try_from(pad).unwrap().to_be_bytes());
        ext.resize(ext.len() + pad, 0);
        let framed = records(&hello_with_extensions(&ext), MAX_RECORD_LEN);
        assert_eq!(framed.len(), MAX_CLIENT_HELLO);
        assert_eq!(
            complete(&framed).server_name.as_deref(),
            Some("example.com")
        );

        // One byte more, and it is refused as soon as its length is read.
        ext.push(0);
        let len_at = sni.len() + 2;
        ext[len_at..len_at + 2].copy_from_slice(&u16::try_from(pad + 1).unwrap().to_be_bytes());
        let framed = records(&hello_with_extensions(&ext), MAX_RECORD_LEN);
        assert_eq!(
            parse_client_hello(&framed[..9]),
            Err(ClientHelloError::TooLarge)
        );
    }

    #[test]
    fn many_tiny_records_past_the_cap_are_too_large() {
        // A hello that fits the cap by size but is framed so that the record overhead
        // (5 bytes per 1-byte record) passes the cap before it completes.
        let padding = vec![0xaa; 3000];
        let mut ext = vec![0x00, 0x15]; // padding extension
        ext.extend_from_slice(&u16::try_from(padding.len()).unwrap().to_be_bytes());
        ext.extend_from_slice(&padding);
        let framed = records(&hello_with_extensions(&ext), 1);
        assert!(framed.len() > MAX_CLIENT_HELLO);
        assert_eq!(parse_client_hello(&framed), Err(ClientHelloError::TooLarge));
        // Known from the declared lengths before the cap's worth of bytes is buffered.
        assert_eq!(
            parse_client_hello(&framed[..MAX_CLIENT_HELLO]),
            Err(ClientHelloError::TooLarge)
        );
    }

    #[test]
    fn handmade_hello_without_extensions_has_no_sni() {
        let mut msg = hello_with_extensions(&[]);
        // Drop the (empty) extensions block entirely, as a TLS 1.2 client may.
        msg.truncate(msg.len() - 2);
        let body_len = u32::try_from(msg.len() - 4).unwrap().to_be_bytes();
        msg[1..4].copy_from_slice(&body_len[1..]);
        assert_eq!(complete(&records(&msg, 512)), ClientHello::default());
    }

    #[test]
    fn sni_with_trailing_dot_and_upper_case_is_normalised() {
        let msg = hello_with_extensions(&sni_extension(b"WWW.Example.com."));
        assert_eq!(
            complete(&records(&msg, 512)).server_name.as_deref(),
            Some("www.example.com")
        );
    }

    #[test]
    fn sni_that_is_not_a_dns_name_is_malformed() {
        for bad in [
            &b"ex ample.com"[..],
            b"\xc3\xa9.example",
            b"",
            b"a..b",
            b"-a.example",
            b".",
        ] {
            let msg = hello_with_extensions(&sni_extension(bad));
            assert_eq!(
                parse_client_hello(&records(&msg, 512)),
                Err(ClientHelloError::Malformed("host_name is not a DNS name")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn duplicate_extension_is_malformed() {
        let mut ext = sni_extension(b"a.example");
        ext.extend_from_slice(&sni_extension(b"b.example"));
        let msg = hello_with_extensions(&ext);
        assert_eq!(
            parse_client_hello(&records(&msg, 512)),
            Err(ClientHelloError::Malformed("duplicate extension"))
        );
    }

    #[test]
    fn dns_name_rules() {
        assert!(is_dns_name("example.com"));
        assert!(is_dns_name("_acme.x-1.example"));
        assert!(is_dns_name(&format!("{}.com", "a".repeat(63))));
        assert!(!is_dns_name(&format!("{}.com", "a".repeat(64))));
        assert!(!is_dns_name(&["a"; 128].join(".")));
        assert!(!is_dns_name("example.com."));
        assert!(!is_dns_name("a-.example"));
        assert!(!is_dns_name("*.example"));
    }

    /// Feeds random bytes, and rustls hellos with random bytes changed, to the parser with
    /// every prefix: it must never panic, and an error on a prefix must persist on every
    /// longer buffer (the caller stops at the first error, so a flip-flop would mean a
    /// verdict depends on TCP segmentation).
    #[test]
    fn random_and_mutated_input_never_panics_and_verdicts_are_prefix_stable() {
        let seed = std::env::var("SNI_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_u64);
        let mut rng = StdRng::seed_from_u64(seed);
        let hellos = [
            rustls_client_hello("example.com", &[b"h2"]),
            reframe(&rustls_client_hello("a.example.org", &[]), 37),
        ];
        for case in 0..300 {
            let mut buf = if case % 3 == 0 {
                let len = rng.gen_range(0..600);
                let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                if rng.gen_bool(0.5) && bytes.len() >= 3 {
                    bytes[..3].copy_from_slice(&[0x16, 0x03, 0x01]);
                }
                bytes
            } else {
                hellos[case % 2].clone()
            };
            for _ in 0..rng.gen_range(1..4) {
                if buf.is_empty() {
                    break;
                }
                let i = rng.gen_range(0..buf.len());
                buf[i] = rng.gen();
            }
            let mut first_error = None;
            for end in 0..=buf.len() {
                let result = parse_client_hello(&buf[..end]);
                if let Some(err) = &first_error {
                    assert_eq!(
                        result.as_ref(),
                        Err(err),
                        "seed {seed} case {case}: an error at a shorter prefix, then this at {end}"
                    );
                } else if let Err(err) = result {
                    first_error = Some(err);
                }
            }
        }
    }
}
