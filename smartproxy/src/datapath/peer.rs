//! One side of a relayed connection as the relay drives it: a TCP socket (registered with
//! the runtime as tokio does, or, once spliced, as the kernel path needs), or a TLS session
//! over one. All offer the same five operations (read, write, flush, shut the write side,
//! abort), so the relay has one copy loop for plain, spliced, terminated and re-encrypted
//! connections.
//!
//! Over TLS, shutting the write side sends close_notify and then a FIN; a close_notify
//! from the peer reads as EOF. A FIN without close_notify also reads as EOF (as HAProxy
//! does; logged at debug): for the proxy, the byte stream ended either way. An abort is an
//! RST on the TCP socket, whatever runs over it.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Per direction buffer, held only while bytes move.
pub const BUFFER_BYTES: usize = 64 * 1024;

/// The most the relay reads at once from a plain socket. After a read that filled
/// [`BUFFER_BYTES`], each read that fills its buffer doubles the next, up to this, while
/// the destination takes what is read without a wait: a stream then costs a quarter of
/// the reads, wake-ups and context switches per byte. `cargo xtask bench` on the relay,
/// one stream: about 12 Gbit/s with 64 KiB reads, 17-18 with reads growing to 1 MiB
/// (docs/performance.md). The buffer is given back when the source pauses, and after the
/// destination made the half wait.
pub const STREAM_READ_BYTES: usize = 1024 * 1024;

/// A read larger than this takes no more than the destination's send buffer has room for
/// ([`Peer::send_room`]), so that the relay holds at most this much that a slow reader
/// has not taken yet, not [`STREAM_READ_BYTES`]. Smaller reads skip the check: asking
/// for the room on every read from 128 KiB on made 32 connections of 256 KiB messages
/// about 4 % slower.
pub const ROOM_CHECKED_READ_BYTES: usize = 256 * 1024;

/// `SO_MEMINFO` from `asm-generic/socket.h`, and the count of its values up to
/// `SK_MEMINFO_DROPS` (the libc crate exports the indices only).
const SO_MEMINFO: libc::c_int = 55;
const SK_MEMINFO_VARS: usize = 9;

/// A TLS session over a TCP socket, server side (the client's) or client side (the
/// backend's).
pub type TlsSession = tokio_rustls::TlsStream<TcpIo>;

/// One side of a connection.
pub enum Peer {
    Tcp(Arc<TcpStream>),
    Spliced(SplicedTcp),
    Tls {
        /// The socket under the session, for the relay's error watch and for aborts.
        tcp: Arc<TcpStream>,
        session: Box<TlsSession>,
    },
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(tcp) => f.debug_tuple("Tcp").field(tcp).finish(),
            Peer::Spliced(spliced) => f.debug_tuple("Spliced").field(spliced).finish(),
            Peer::Tls { tcp, session } => f
                .debug_struct("Tls")
                .field("tcp", tcp)
                .field("version", &session.get_ref().1.protocol_version())
                .finish_non_exhaustive(),
        }
    }
}

impl From<TcpStream> for Peer {
    fn from(tcp: TcpStream) -> Self {
        Peer::Tcp(Arc::new(tcp))
    }
}

impl From<TlsSession> for Peer {
    fn from(session: TlsSession) -> Self {
        Peer::Tls {
            tcp: Arc::clone(&session.get_ref().0.tcp),
            session: Box::new(session),
        }
    }
}

/// A socket of a spliced connection. While the verdict redirects what it receives, the
/// runtime does not watch it for reads: the verdict's data-ready callback wakes the
/// socket's readers after every skb, also one it redirected, and epoll drops such a
/// wake-up (its key is `EPOLLIN`) for a registration without `EPOLLIN`. What userspace
/// must read then, bytes the verdict passed up, a FIN or an RST, is reported through the
/// ring buffer instead (`docs/kernel-notes.md#read-wake-ups`). In pass mode it is watched
/// for reads as any socket is. Its descriptor stays the same from the splice on: the
/// splice uses it.
#[derive(Debug)]
pub struct SplicedTcp {
    /// Declared first: deregistered before the socket closes. `None` only after
    /// registering it again failed, which the relay takes as that side's failure.
    readiness: Option<AsyncFd<SocketFd>>,
    socket: std::net::TcpStream,
    reads_watched: bool,
}

/// A descriptor [`SplicedTcp::socket`] owns, as the runtime's registration holds it.
#[derive(Debug)]
struct SocketFd(RawFd);

impl AsRawFd for SocketFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

impl SplicedTcp {
    /// The socket, out of the runtime: the same descriptor, which the splice goes on
    /// using (a parked connection, `park`).
    pub fn into_socket(self) -> OwnedFd {
        let SplicedTcp {
            readiness, socket, ..
        } = self;
        // Deregistered before the socket is handed on.
        drop(readiness);
        socket.into()
    }

    fn register(socket: &std::net::TcpStream, watch_reads: bool) -> io::Result<AsyncFd<SocketFd>> {
        let interest = if watch_reads {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::WRITABLE
        };
        // SAFETY: the descriptor stays open while it is registered: `SplicedTcp::socket`
        // owns it and is dropped after `readiness`, which deregisters it.
        unsafe { AsyncFd::register_with_interest(SocketFd(socket.as_raw_fd()), interest) }
            .map_err(|e| e.into_parts().1)
    }

    fn readiness(&self) -> io::Result<&AsyncFd<SocketFd>> {
        self.readiness.as_ref().ok_or_else(|| {
            io::Error::other("the spliced socket is no longer registered with the runtime")
        })
    }
}

impl Peer {
    /// A socket of a spliced connection ([`SplicedTcp`]), watched for reads until
    /// [`Peer::watch_reads`] says otherwise.
    pub fn spliced(socket: std::net::TcpStream) -> io::Result<Peer> {
        socket.set_nonblocking(true)?;
        Ok(Peer::Spliced(SplicedTcp {
            readiness: Some(SplicedTcp::register(&socket, true)?),
            socket,
            reads_watched: true,
        }))
    }

    /// The TCP socket: the peer's own, or the one under its TLS session.
    pub fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Peer::Tcp(tcp) | Peer::Tls { tcp, .. } => tcp.as_fd(),
            Peer::Spliced(spliced) => spliced.socket.as_fd(),
        }
    }

    /// The tokio socket, for watches of its own; not once spliced.
    pub fn shared_tcp(&self) -> Option<&Arc<TcpStream>> {
        match self {
            Peer::Tcp(tcp) | Peer::Tls { tcp, .. } => Some(tcp),
            Peer::Spliced(_) => None,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Peer::Tls { .. })
    }

    /// Before a splice: what a plain socket becomes, a [`SplicedTcp`] under a new
    /// descriptor, which the splice then uses for good (the old one closes with its
    /// registration once this replaces it). `None`: it stays as it is (one shared with a
    /// watch of its own, or already spliced). Changes nothing itself, so that a pair is
    /// replaced only once both sides could be. Not for TLS sessions, which are never
    /// spliced.
    pub fn for_splice(&self) -> io::Result<Option<Peer>> {
        match self {
            Peer::Tcp(tcp) if Arc::strong_count(tcp) == 1 => {
                let socket = std::net::TcpStream::from(tcp.as_fd().try_clone_to_owned()?);
                Peer::spliced(socket).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// For a [`SplicedTcp`]: registers it again, watched for reads or not, under the same
    /// descriptor, and says whether it did. A new registration starts without the wakers
    /// of the old one. On error it is registered as before if that still works, and not
    /// at all otherwise. Other sockets are always watched; nothing changes for them.
    pub fn watch_reads(&mut self, watch: bool) -> io::Result<bool> {
        let Peer::Spliced(spliced) = self else {
            return Ok(false);
        };
        if spliced.reads_watched == watch && spliced.readiness.is_some() {
            return Ok(false);
        }
        // Deregistered first: a descriptor is registered once at a time.
        spliced.readiness = None;
        match SplicedTcp::register(&spliced.socket, watch) {
            Ok(readiness) => {
                spliced.readiness = Some(readiness);
                spliced.reads_watched = watch;
                Ok(true)
            }
            Err(e) => {
                spliced.readiness =
                    SplicedTcp::register(&spliced.socket, spliced.reads_watched).ok();
                Err(e)
            }
        }
    }

    /// Reads into `buf`. `Ok(0)`: EOF (a FIN; over TLS a close_notify, or a FIN without
    /// one). A plain TCP socket that turned readable is read only if `worth_reading` says
    /// so; if not, its readiness is dropped and the read waits for the next one. A socket
    /// whose reads are not watched ([`Peer::watch_reads`]) is never ready: it waits
    /// until the relay watches it again.
    pub fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        mut worth_reading: impl FnMut() -> bool,
    ) -> Poll<io::Result<usize>> {
        match self {
            Peer::Tcp(tcp) => loop {
                ready!(tcp.poll_read_ready(cx))?;
                // The check runs inside `try_io`, which drops the readiness it saw before
                // the check began: a wake-up that comes during the check is kept.
                let (worth_reading, buf) = (&mut worth_reading, &mut *buf);
                let read = try_read_with(tcp, move || worth_reading().then_some(buf));
                match read {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    result => return Poll::Ready(result),
                }
            },
            Peer::Spliced(spliced) => loop {
                let mut guard = ready!(spliced.readiness()?.poll_read_ready(cx))?;
                let mut short_read = None;
                let (worth_reading, buf) = (&mut worth_reading, &mut *buf);
                let socket = &spliced.socket;
                let read = guard.try_io(|_| {
                    read_short_as_blocked(
                        &mut short_read,
                        || worth_reading().then_some(buf),
                        |buf| (&*socket).read(buf),
                    )
                });
                match (read, short_read) {
                    (_, Some(read)) => return Poll::Ready(Ok(read)),
                    (Ok(result), None) => return Poll::Ready(result),
                    (Err(_would_block), None) => continue,
                }
            },
            Peer::Tls { session, .. } => {
                // The session's own buffer first: an idle session holds none of ours. One
                // chunk (a TLS record) per read.
                let mut session = Pin::new(&mut **session);
                let plaintext = match ready!(session.as_mut().poll_fill_buf(cx)) {
                    Ok(plaintext) => plaintext,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        tracing::debug!("TCP FIN without TLS close_notify; taken as EOF");
                        return Poll::Ready(Ok(0));
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                };
                if plaintext.is_empty() {
                    return Poll::Ready(Ok(0));
                }
                let read = plaintext.len().min(buf.len());
                buf[..read].copy_from_slice(&plaintext[..read]);
                session.consume(read);
                Poll::Ready(Ok(read))
            }
        }
    }

    /// Room left in the socket's send buffer, in the kernel's own accounting: the buffer's
    /// size less what is queued, skb overhead included (`SO_MEMINFO`). A write takes
    /// about that much payload at once. `None` if the kernel does not say.
    pub fn send_room(&self) -> Option<usize> {
        let mut meminfo = [0u32; SK_MEMINFO_VARS];
        let mut len = libc::socklen_t::try_from(size_of_val(&meminfo)).ok()?;
        // SAFETY: SO_MEMINFO writes at most `len` bytes into `meminfo`, which is that long,
        // and sets `len` to what it wrote.
        let rc = unsafe {
            libc::getsockopt(
                self.fd().as_raw_fd(),
                libc::SOL_SOCKET,
                SO_MEMINFO,
                meminfo.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 || usize::try_from(len).ok()? < size_of_val(&meminfo) {
            return None;
        }
        let size = meminfo[libc::SK_MEMINFO_SNDBUF as usize];
        let queued = meminfo[libc::SK_MEMINFO_WMEM_QUEUED as usize];
        usize::try_from(size.saturating_sub(queued)).ok()
    }

    /// Writes some of `buf`. Over TLS the bytes may stay in the session until
    /// [`Peer::poll_flush`].
    pub fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = match self {
            Peer::Tcp(tcp) => ready!(poll_write_tcp(cx, tcp, buf)),
            Peer::Spliced(spliced) => loop {
                let mut guard = ready!(spliced.readiness()?.poll_write_ready(cx))?;
                if let Ok(result) = guard.try_io(|_| (&spliced.socket).write(buf)) {
                    break result;
                }
            },
            Peer::Tls { session, .. } => ready!(Pin::new(&mut **session).poll_write(cx, buf)),
        };
        Poll::Ready(match written {
            Ok(0) => Err(io::ErrorKind::WriteZero.into()),
            result => result,
        })
    }

    /// Ready once every byte written is in the socket's send queue.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Peer::Tcp(_) | Peer::Spliced(_) => Poll::Ready(Ok(())),
            Peer::Tls { session, .. } => Pin::new(&mut **session).poll_flush(cx),
        }
    }

    /// Shuts the write side: FIN, after every byte already written; over TLS a
    /// close_notify first.
    pub fn poll_shutdown_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Peer::Tcp(_) | Peer::Spliced(_) => {
                Poll::Ready(SockRef::from(&self.fd()).shutdown(Shutdown::Write))
            }
            Peer::Tls { session, .. } => Pin::new(&mut **session).poll_shutdown(cx),
        }
    }

    /// Closing the socket will send RST, not FIN.
    pub fn abort(&self) {
        // Best effort: a socket that already failed needs no RST from us.
        let _ = SockRef::from(&self.fd()).set_linger(Some(Duration::ZERO));
    }

    /// Closes gracefully: FIN (after close_notify over TLS), waiting at most `within` for
    /// the TLS part; then the socket is closed.
    pub async fn close(mut self, within: Duration) {
        if let Peer::Tls { session, .. } = &mut self {
            if tokio::time::timeout(within, session.shutdown())
                .await
                .is_err()
            {
                tracing::debug!("close_notify not sent in time");
            }
        }
    }
}

/// One read of `tcp` into the buffer `buffer` gives (`None`: nothing is worth reading
/// now), under the read readiness tokio last saw, which a `WouldBlock` drops. A read that
/// fills less than the buffer emptied the socket, so it drops that readiness too, as
/// tokio's own `AsyncRead` does: epoll is edge-triggered, and otherwise the next read
/// finds out with an `EAGAIN`, a third of the relay's system calls under small messages.
/// A FIN queued behind the bytes is still seen: tokio never drops read-closed readiness.
fn try_read_with<'a>(
    tcp: &TcpStream,
    buffer: impl FnOnce() -> Option<&'a mut [u8]>,
) -> io::Result<usize> {
    let mut short_read = None;
    let read = tcp.try_io(Interest::READABLE, || {
        read_short_as_blocked(&mut short_read, buffer, |buf| tcp.try_read(buf))
    });
    match (read, short_read) {
        (_, Some(read)) => Ok(read),
        (read, None) => read,
    }
}

/// The body of one read under readiness ([`try_read_with`]): `WouldBlock`, which drops
/// the readiness, when nothing is worth reading (`buffer` gives none) and after a short
/// read, whose count goes to `short_read`.
fn read_short_as_blocked<'a>(
    short_read: &mut Option<usize>,
    buffer: impl FnOnce() -> Option<&'a mut [u8]>,
    read: impl FnOnce(&mut [u8]) -> io::Result<usize>,
) -> io::Result<usize> {
    let buf = buffer().ok_or(io::ErrorKind::WouldBlock)?;
    let count = read(buf)?;
    if 0 < count && count < buf.len() {
        *short_read = Some(count);
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(count)
}

fn poll_write_tcp(cx: &mut Context<'_>, tcp: &TcpStream, buf: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        ready!(tcp.poll_write_ready(cx))?;
        match tcp.try_write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

/// The socket under a TLS session: shared with the relay (which watches its errors and
/// aborts it), with bytes already read from it (the ClientHello read for routing)
/// replayed first.
#[derive(Debug)]
pub struct TcpIo {
    tcp: Arc<TcpStream>,
    replay: Vec<u8>,
    replayed: usize,
}

impl TcpIo {
    pub fn new(tcp: Arc<TcpStream>, replay: Vec<u8>) -> TcpIo {
        TcpIo {
            tcp,
            replay,
            replayed: 0,
        }
    }
}

impl AsyncRead for TcpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.replay.len() {
            let rest = &this.replay[this.replayed..];
            let take = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..take]);
            this.replayed += take;
            if this.replayed == this.replay.len() {
                this.replay = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(this.tcp.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match try_read_with(&this.tcp, move || Some(unfilled)) {
                Ok(read) => {
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for TcpIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_write_tcp(cx, &self.tcp, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(SockRef::from(&*self.tcp).shutdown(Shutdown::Write))
    }
}
