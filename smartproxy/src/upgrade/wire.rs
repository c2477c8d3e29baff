//! The handoff's wire: frames over a Unix stream socket, each a JSON message, an optional
//! binary tail (bytes a relay held) and the descriptors that travel with it (SCM_RIGHTS).
//!
//! A frame is `[json length: u32 LE][tail length: u32 LE][json][tail]`. Its descriptors are
//! attached to the frame's first `sendmsg`; the kernel hands them over with the first read
//! that takes bytes of that write, which is the read of the frame's header here.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::Interest;
use tokio::net::UnixStream;

/// The most descriptors one frame carries: a connection's two sockets, or the listeners,
/// the control socket and the metrics endpoint.
pub(crate) const MAX_FDS: usize = 64;
/// Larger frames are refused: a JSON record is a few KiB, a relay holds at most a few MiB.
const MAX_FRAME: u32 = 64 << 20;
const HEADER: usize = 8;

/// One received frame.
#[derive(Debug)]
pub(crate) struct Frame<M> {
    pub(crate) message: M,
    pub(crate) tail: Vec<u8>,
    pub(crate) fds: Vec<OwnedFd>,
}

fn encode<M: Serialize>(message: &M, tail: &[u8]) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec(message).map_err(io::Error::other)?;
    let too_large = |len: usize| {
        u32::try_from(len)
            .ok()
            .filter(|len| *len <= MAX_FRAME)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "handoff frame too large"))
    };
    let mut frame = Vec::with_capacity(HEADER + json.len() + tail.len());
    frame.extend_from_slice(&too_large(json.len())?.to_le_bytes());
    frame.extend_from_slice(&too_large(tail.len())?.to_le_bytes());
    frame.extend_from_slice(&json);
    frame.extend_from_slice(tail);
    Ok(frame)
}

fn lengths(header: &[u8; HEADER]) -> io::Result<(usize, usize)> {
    let [a, b, c, d, e, f, g, h] = *header;
    let (json, tail) = (
        u32::from_le_bytes([a, b, c, d]),
        u32::from_le_bytes([e, f, g, h]),
    );
    if json > MAX_FRAME || tail > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("handoff frame of {json} + {tail} bytes is larger than allowed"),
        ));
    }
    Ok((json as usize, tail as usize))
}

fn decode<M: DeserializeOwned>(body: &[u8], json: usize) -> io::Result<(M, Vec<u8>)> {
    let message = serde_json::from_slice(&body[..json])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((message, body[json..].to_vec()))
}

/// Sends `fds` and as much of `bytes` as the socket takes now (at least one byte, or an
/// error such as `WouldBlock`).
fn send_with_fds(socket: RawFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let payload = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u8; if raw.is_empty() { 0 } else { space }];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is valid (no name, no control); it is filled below.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    if !raw.is_empty() {
        header.msg_control = control.as_mut_ptr().cast();
        header.msg_controllen = control.len() as _;
        // SAFETY: the control buffer holds CMSG_SPACE(payload) bytes, enough for one
        // header and `raw`; CMSG_FIRSTHDR points into it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&header);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(cmsg).cast(), raw.len());
        }
    }
    // SAFETY: every pointer in `header` is valid for the call.
    let sent = unsafe { libc::sendmsg(socket, &header, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sent as usize)
}

/// Receives into `buf` and takes the descriptors that came with those bytes.
fn receive_with_fds(socket: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * std::mem::size_of::<RawFd>()) as u32) };
    let mut control = vec![0u8; space as usize];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as in `send_with_fds`.
    let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
    header.msg_iov = &mut iov;
    header.msg_iovlen = 1;
    header.msg_control = control.as_mut_ptr().cast();
    header.msg_controllen = control.len() as _;
    // SAFETY: every pointer in `header` is valid for the call.
    let read = unsafe { libc::recvmsg(socket, &mut header, libc::MSG_CMSG_CLOEXEC) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled `header` and its control buffer; the CMSG macros walk
    // only within `msg_controllen`.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&header);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    // The kernel installed a new descriptor for each: ours to close.
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&header, cmsg);
        }
    }
    if header.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more descriptors than a handoff frame may carry",
        ));
    }
    Ok(read as usize)
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "the other process closed the handoff socket",
    )
}

/// Sends one frame on a blocking socket.
pub(crate) fn send_blocking<M: Serialize>(
    socket: &StdUnixStream,
    message: &M,
    tail: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let frame = encode(message, tail)?;
    let sent = send_with_fds(socket.as_raw_fd(), &frame, fds)?;
    (&*socket).write_all(&frame[sent..])
}

/// Receives one frame on a blocking socket (its read timeout applies).
pub(crate) fn receive_blocking<M: DeserializeOwned>(
    socket: &StdUnixStream,
) -> io::Result<Frame<M>> {
    let mut header = [0u8; HEADER];
    let mut fds = Vec::new();
    let mut filled = 0;
    while filled < HEADER {
        match receive_with_fds(socket.as_raw_fd(), &mut header[filled..], &mut fds)? {
            0 => return Err(closed()),
            read => filled += read,
        }
    }
    let (json, tail) = lengths(&header)?;
    let mut body = vec![0u8; json + tail];
    (&*socket).read_exact(&mut body)?;
    let (message, tail) = decode(&body, json)?;
    Ok(Frame { message, tail, fds })
}

/// Sends one frame. Not cancel-safe: a frame is written whole or the socket is dropped.
pub(crate) async fn send<M: Serialize>(
    socket: &UnixStream,
    message: &M,
    tail: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let frame = encode(message, tail)?;
    let mut sent = socket
        .async_io(Interest::WRITABLE, || {
            send_with_fds(socket.as_fd().as_raw_fd(), &frame, fds)
        })
        .await?;
    while sent < frame.len() {
        socket.writable().await?;
        match socket.try_write(&frame[sent..]) {
            Ok(written) => sent += written,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Receives one frame. Not cancel-safe: one task reads the socket, to the end of a frame.
pub(crate) async fn receive<M: DeserializeOwned>(socket: &UnixStream) -> io::Result<Frame<M>> {
    let mut header = [0u8; HEADER];
    let mut fds = Vec::new();
    let mut filled = 0;
    while filled < HEADER {
        let read = socket
            .async_io(Interest::READABLE, || {
                receive_with_fds(socket.as_fd().as_raw_fd(), &mut header[filled..], &mut fds)
            })
            .await?;
        if read == 0 {
            return Err(closed());
        }
        filled += read;
    }
    let (json, tail) = lengths(&header)?;
    let mut body = vec![0u8; json + tail];
    let mut filled = 0;
    while filled < body.len() {
        socket.readable().await?;
        match socket.try_read(&mut body[filled..]) {
            Ok(0) => return Err(closed()),
            Ok(read) => filled += read,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    let (message, tail) = decode(&body, json)?;
    Ok(Frame { message, tail, fds })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Note {
        n: u32,
    }

    /// Descriptors arrive with their frame, frames keep their order and their tails, on
    /// both the blocking and the async side.
    #[tokio::test]
    async fn frames_carry_their_descriptors_and_tails_in_order() {
        let (a, b) = StdUnixStream::pair().unwrap();
        let (file, _dir) = {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x");
            std::fs::write(&path, b"hello").unwrap();
            (std::fs::File::open(&path).unwrap(), dir)
        };
        let sender = std::thread::spawn(move || {
            send_blocking(&a, &Note { n: 1 }, b"tail", &[file.as_fd()]).unwrap();
            send_blocking(&a, &Note { n: 2 }, &[], &[]).unwrap();
            let big = vec![7u8; 3 << 20];
            send_blocking(&a, &Note { n: 3 }, &big, &[file.as_fd(), file.as_fd()]).unwrap();
        });
        b.set_nonblocking(true).unwrap();
        let b = UnixStream::from_std(b).unwrap();
        let first: Frame<Note> = receive(&b).await.unwrap();
        assert_eq!(
            (first.message.n, first.tail.as_slice(), first.fds.len()),
            (1, &b"tail"[..], 1)
        );
        let mut text = String::new();
        std::fs::File::from(first.fds.into_iter().next().unwrap())
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "hello");
        let second: Frame<Note> = receive(&b).await.unwrap();
        assert_eq!((second.message.n, second.fds.len()), (2, 0));
        let third: Frame<Note> = receive(&b).await.unwrap();
        assert_eq!(
            (third.message.n, third.tail.len(), third.fds.len()),
            (3, 3 << 20, 2)
        );
        sender.join().unwrap();
        let eof = receive::<Note>(&b).await.unwrap_err();
        assert_eq!(eof.kind(), io::ErrorKind::UnexpectedEof);
    }
}
