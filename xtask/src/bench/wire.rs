//! The bench's wire protocol between load generator and backend, and reads that time their
//! waits.
//!
//! A connection opens with a 16-byte header: a mode byte, 7 zero bytes, a little-endian u64.
//! - `U` upload: the client sends bytes until it shuts down its write side; the backend then
//!   answers with an [`UploadReply`] (24 bytes) and closes.
//! - `D n` download: the backend sends `n` bytes and shuts down its write side; it closes once
//!   the client has closed.
//! - `X n` both ways: the backend sends `n` bytes while it reads until the client shuts down
//!   its write side, then answers with an [`UploadReply`] after its `n` bytes and closes.
//! - `E n` echo: the backend answers every `n`-byte message with the same `n` bytes until EOF.
//! - `O n` echo once: the backend answers one `n`-byte message, then closes first (churn with
//!   server-first close).

use std::{
    io::{self, Read as _},
    net::TcpStream,
    time::{Duration, Instant},
};

pub const HEADER_LEN: usize = 16;
/// Read and write size of the bulk loops.
pub const CHUNK: usize = 256 * 1024;
/// The largest echo message the backend accepts: the largest request/response scenario's.
pub const MAX_ECHO: u64 = 256 * 1024;
/// Read timeout set on blocking sockets so a wait notices its deadline at least this often.
pub const READ_POLL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Upload,
    Download(u64),
    Duplex(u64),
    Echo(u64),
    EchoOnce(u64),
}

impl Request {
    pub fn encode(self) -> [u8; HEADER_LEN] {
        let (mode, arg) = match self {
            Request::Upload => (b'U', 0),
            Request::Download(n) => (b'D', n),
            Request::Duplex(n) => (b'X', n),
            Request::Echo(n) => (b'E', n),
            Request::EchoOnce(n) => (b'O', n),
        };
        let mut header = [0; HEADER_LEN];
        header[0] = mode;
        header[8..].copy_from_slice(&arg.to_le_bytes());
        header
    }

    pub fn decode(header: &[u8; HEADER_LEN]) -> Option<Self> {
        let arg = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        match header[0] {
            b'U' => Some(Request::Upload),
            b'D' => Some(Request::Download(arg)),
            b'X' => Some(Request::Duplex(arg)),
            b'E' if (1..=MAX_ECHO).contains(&arg) => Some(Request::Echo(arg)),
            b'O' if (1..=MAX_ECHO).contains(&arg) => Some(Request::EchoOnce(arg)),
            _ => None,
        }
    }
}

/// What the backend says after an upload's EOF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadReply {
    pub received: u64,
    /// The longest single read wait at the backend (the receiving end of an upload).
    pub longest_wait: Duration,
    /// Bytes the backend had read before that wait.
    pub longest_after: u64,
}

impl UploadReply {
    pub const LEN: usize = 24;

    pub fn encode(self) -> [u8; Self::LEN] {
        let nanos = u64::try_from(self.longest_wait.as_nanos()).unwrap_or(u64::MAX);
        let mut reply = [0; Self::LEN];
        reply[..8].copy_from_slice(&self.received.to_le_bytes());
        reply[8..16].copy_from_slice(&nanos.to_le_bytes());
        reply[16..].copy_from_slice(&self.longest_after.to_le_bytes());
        reply
    }

    pub fn decode(reply: &[u8; Self::LEN]) -> Self {
        let word = |i: usize| u64::from_le_bytes(reply[i..i + 8].try_into().expect("8 bytes"));
        Self {
            received: word(0),
            longest_wait: Duration::from_nanos(word(8)),
            longest_after: word(16),
        }
    }
}

/// The longest a receiver spent blocked in one `read()` before data (or EOF) arrived: a stall
/// shows here. For a receiver that reads back to back this is the longest gap between reads.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReadWaits {
    pub longest: Duration,
    /// Bytes read before the longest wait: where in a transfer the stall was.
    pub longest_after: u64,
    /// Bytes read so far.
    received: u64,
}

impl ReadWaits {
    fn record(&mut self, wait: Duration, got: usize) {
        if wait > self.longest {
            self.longest = wait;
            self.longest_after = self.received;
        }
        self.received += got as u64;
    }
}

/// What one timed read got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Got {
    Data(usize),
    Eof,
    /// The deadline passed with nothing read.
    Deadline,
}

/// One `read()` into `buf`, waiting at most until `deadline`, recording how long it waited.
/// The socket must be blocking with a read timeout (e.g. [`READ_POLL`]) so the deadline is seen.
pub fn read_timed(
    stream: &mut TcpStream,
    buf: &mut [u8],
    waits: &mut ReadWaits,
    deadline: Instant,
) -> io::Result<Got> {
    let start = Instant::now();
    // Bounded: every pass blocks at most the socket's read timeout, and ends at the deadline.
    loop {
        match stream.read(buf) {
            Ok(0) => {
                waits.record(start.elapsed(), 0);
                return Ok(Got::Eof);
            }
            Ok(n) => {
                waits.record(start.elapsed(), n);
                return Ok(Got::Data(n));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                if Instant::now() >= deadline {
                    return Ok(Got::Deadline);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Fills `buf` with timed reads; EOF or the deadline before it is full is an error.
pub fn read_exact_timed(
    stream: &mut TcpStream,
    buf: &mut [u8],
    waits: &mut ReadWaits,
    deadline: Instant,
) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match read_timed(stream, &mut buf[filled..], waits, deadline)? {
            Got::Data(n) => filled += n,
            Got::Eof => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("EOF after {filled} of {} bytes", buf.len()),
                ))
            }
            Got::Deadline => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("timed out after {filled} of {} bytes", buf.len()),
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_bad_headers_are_refused() {
        for request in [
            Request::Upload,
            Request::Download(1 << 30),
            Request::Duplex(1 << 30),
            Request::Echo(64),
            Request::EchoOnce(16 * 1024),
        ] {
            assert_eq!(Request::decode(&request.encode()), Some(request));
        }
        assert_eq!(Request::decode(&[0; HEADER_LEN]), None);
        assert_eq!(Request::decode(&Request::Echo(0).encode()), None);
        assert_eq!(Request::decode(&Request::Echo(MAX_ECHO + 1).encode()), None);
    }

    #[test]
    fn upload_reply_round_trips() {
        let reply = UploadReply {
            received: 123_456_789,
            longest_wait: Duration::from_micros(2500),
            longest_after: 1 << 20,
        };
        assert_eq!(UploadReply::decode(&reply.encode()), reply);
    }
}
