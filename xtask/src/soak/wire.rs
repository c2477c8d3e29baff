//! What a soak client asks of the soak backend (a header at the start of each connection),
//! and the byte pattern both sides send and check.
//!
//! Every byte of a connection is a function of the connection id, the direction and its
//! offset, so a receiver checks each byte as it arrives: a lost, duplicated or reordered
//! byte shows as a wrong byte at a known offset (or a wrong count at the end).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::traffic::Kind;

pub const HEADER_LEN: usize = 18;
/// Bytes per read and per write.
pub const CHUNK: usize = 16 * 1024;

/// What the backend does with a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// The client sends `client` bytes and FINs first; the backend reads to EOF, then sends
    /// `backend` bytes and FINs.
    ClientFinsFirst { client: u32, backend: u32 },
    /// The backend sends `backend` bytes and FINs first; the client reads to EOF, then sends
    /// `client` bytes and FINs.
    BackendFinsFirst { client: u32, backend: u32 },
    /// Both sides send until the client FINs; the backend at `rate` bytes/s, or as fast as
    /// the client reads when `rate` is 0. The backend then FINs and reports its counts in
    /// the ledger.
    Stream { rate: u32 },
    /// The backend sends `backend` bytes, then reads until the proxy resets it (the client
    /// sends an RST).
    ClientResets { backend: u32 },
    /// The backend sends `backend` bytes, waits for one byte from the client, then resets.
    BackendResets { backend: u32 },
    /// The client sends `client` bytes (no FIN); the backend reads them, answers `backend`
    /// bytes and at once ends the connection as `end` says.
    Answer { client: u32, backend: u32, end: End },
    /// The client sends `client` bytes and at once ends the connection as `end` says; the
    /// backend reads until its EOF or RST and reports what it got in the ledger.
    Request { client: u32, end: End },
}

/// How a side ends a connection right after its last write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// `close()`: a FIN.
    Close,
    /// `SO_LINGER` 0, then `close()`: an RST.
    Reset,
}

impl End {
    /// In the order of their values (the header's tag adds the value).
    const ALL: [End; 2] = [End::Close, End::Reset];
}

impl Plan {
    /// The header of connection `id`, which belongs to traffic of `kind` (so the backend
    /// can say which kind a failure it sees belongs to).
    pub fn encode(self, id: u64, kind: Kind) -> [u8; HEADER_LEN] {
        let (tag, a, b) = match self {
            Plan::ClientFinsFirst { client, backend } => (0, client, backend),
            Plan::BackendFinsFirst { client, backend } => (1, client, backend),
            Plan::Stream { rate } => (2, rate, 0),
            Plan::ClientResets { backend } => (3, 0, backend),
            Plan::BackendResets { backend } => (4, 0, backend),
            Plan::Answer {
                client,
                backend,
                end,
            } => (5 + end as u8, client, backend),
            Plan::Request { client, end } => (7 + end as u8, client, 0),
        };
        let mut header = [0; HEADER_LEN];
        header[..8].copy_from_slice(&id.to_be_bytes());
        header[8] = kind as u8;
        header[9] = tag;
        header[10..14].copy_from_slice(&a.to_be_bytes());
        header[14..].copy_from_slice(&b.to_be_bytes());
        header
    }

    pub fn decode(header: &[u8; HEADER_LEN]) -> Option<(u64, Kind, Plan)> {
        let id = u64::from_be_bytes(header[..8].try_into().ok()?);
        let kind = Kind::from_u8(header[8])?;
        let a = u32::from_be_bytes(header[10..14].try_into().ok()?);
        let b = u32::from_be_bytes(header[14..].try_into().ok()?);
        let plan = match header[9] {
            0 => Plan::ClientFinsFirst {
                client: a,
                backend: b,
            },
            1 => Plan::BackendFinsFirst {
                client: a,
                backend: b,
            },
            2 => Plan::Stream { rate: a },
            3 => Plan::ClientResets { backend: b },
            4 => Plan::BackendResets { backend: b },
            tag @ (5 | 6) => Plan::Answer {
                client: a,
                backend: b,
                end: End::ALL[usize::from(tag - 5)],
            },
            tag @ (7 | 8) => Plan::Request {
                client: a,
                end: End::ALL[usize::from(tag - 7)],
            },
            _ => return None,
        };
        Some((id, kind, plan))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    ClientToBackend,
    BackendToClient,
}

/// The byte at `offset` of direction `dir` of connection `id`.
fn pattern_byte(id: u64, dir: Dir, offset: u64) -> u8 {
    let key = id << 1 | u64::from(dir == Dir::BackendToClient);
    let x = (offset ^ key.rotate_left(40)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (x >> 56) as u8
}

/// The bytes of one direction of one connection, written or checked in order.
pub struct Pattern {
    id: u64,
    dir: Dir,
    /// Bytes written or checked so far.
    pub offset: u64,
}

impl Pattern {
    pub fn new(id: u64, dir: Dir) -> Self {
        Self { id, dir, offset: 0 }
    }

    /// Fills `buf` with the next bytes, without advancing (a write may take fewer).
    fn fill(&self, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = pattern_byte(self.id, self.dir, self.offset + i as u64);
        }
    }

    /// Checks `got` as the next bytes and advances past them.
    fn check(&mut self, got: &[u8]) -> io::Result<()> {
        for (i, &b) in got.iter().enumerate() {
            let offset = self.offset + i as u64;
            let want = pattern_byte(self.id, self.dir, offset);
            if b != want {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("wrong byte at offset {offset}: {b:#04x}, expected {want:#04x}"),
                ));
            }
        }
        self.offset += got.len() as u64;
        Ok(())
    }

    /// Writes the next `len` bytes.
    pub async fn send(&mut self, w: &mut (impl AsyncWrite + Unpin), len: u64) -> io::Result<()> {
        let mut buf = vec![0; CHUNK];
        let end = self.offset + len;
        while self.offset < end {
            let n = usize::try_from(end - self.offset).map_or(CHUNK, |l| l.min(CHUNK));
            self.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).await?;
            self.offset += n as u64;
        }
        Ok(())
    }

    /// Writes once, up to `len` bytes (what a cancellable writer needs); returns how many.
    pub async fn send_some(
        &mut self,
        w: &mut (impl AsyncWrite + Unpin),
        buf: &mut [u8],
    ) -> io::Result<usize> {
        self.fill(buf);
        let n = w.write(buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.offset += n as u64;
        Ok(n)
    }

    /// Reads once into `buf` and checks what came; returns the count (0 at EOF).
    pub async fn recv_some(
        &mut self,
        r: &mut (impl AsyncRead + Unpin),
        buf: &mut [u8],
    ) -> io::Result<usize> {
        let n = r.read(buf).await?;
        self.check(&buf[..n])?;
        Ok(n)
    }

    /// Reads and checks until EOF.
    pub async fn recv_to_eof(&mut self, r: &mut (impl AsyncRead + Unpin)) -> io::Result<()> {
        let mut buf = vec![0; CHUNK];
        while self.recv_some(r, &mut buf).await? > 0 {}
        Ok(())
    }

    /// Reads and checks exactly `len` more bytes.
    pub async fn recv_exact(
        &mut self,
        r: &mut (impl AsyncRead + Unpin),
        len: u64,
    ) -> io::Result<()> {
        let mut buf = vec![0; CHUNK];
        let end = self.offset + len;
        while self.offset < end {
            let n = usize::try_from(end - self.offset).map_or(CHUNK, |l| l.min(CHUNK));
            if self.recv_some(r, &mut buf[..n]).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {} of {end} bytes", self.offset),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        for plan in [
            Plan::ClientFinsFirst {
                client: 1,
                backend: u32::MAX,
            },
            Plan::BackendFinsFirst {
                client: 7,
                backend: 0,
            },
            Plan::Stream { rate: 262_144 },
            Plan::ClientResets { backend: 1024 },
            Plan::BackendResets { backend: 1 },
            Plan::Answer {
                client: 1,
                backend: 4096,
                end: End::Close,
            },
            Plan::Answer {
                client: 4096,
                backend: 1,
                end: End::Reset,
            },
            Plan::Request {
                client: 17,
                end: End::Close,
            },
            Plan::Request {
                client: 4096,
                end: End::Reset,
            },
        ] {
            for kind in Kind::ALL {
                assert_eq!(Plan::decode(&plan.encode(42, kind)), Some((42, kind, plan)));
            }
        }
    }

    #[test]
    fn a_shifted_or_foreign_byte_fails_the_check() {
        let sent = Pattern::new(3, Dir::ClientToBackend);
        let mut buf = vec![0; 4096];
        sent.fill(&mut buf);
        assert!(Pattern::new(3, Dir::ClientToBackend).check(&buf).is_ok());
        assert!(Pattern::new(3, Dir::BackendToClient).check(&buf).is_err());
        assert!(Pattern::new(4, Dir::ClientToBackend).check(&buf).is_err());
        let mut skipped = Pattern::new(3, Dir::ClientToBackend);
        assert!(skipped.check(&buf[1..]).is_err(), "a lost first byte shows");
    }
}
