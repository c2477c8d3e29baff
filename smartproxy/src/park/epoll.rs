//! The epoll instance that watches parked connections' sockets. Every `unsafe` of parking
//! lives here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// What wakes a parked connection: bytes or a FIN to read, an RST, an error. One shot: a
/// socket reports once, and its connection is then taken up and removed from here (a
/// registration left behind cannot report again).
const READY: u32 = (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32;

/// [`READY`] without bytes to read: a FIN, an RST, an error. A wake-up for bytes (its key
/// is `EPOLLIN`) does not even wake the instance.
const CLOSING: u32 = (libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32;

#[derive(Debug)]
pub(super) struct Epoll(OwnedFd);

impl Epoll {
    pub(super) fn new() -> io::Result<Epoll> {
        // SAFETY: no pointer argument; a descriptor is returned or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        Ok(Epoll(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Registers this instance with the current runtime: it is readable while a socket it
    /// watches is ready.
    pub(super) fn register(self: &Arc<Self>) -> io::Result<AsyncFd<Arc<Epoll>>> {
        // SAFETY: the instance owns its descriptor and always returns that one; the Arc
        // keeps it open as long as the registration.
        unsafe { AsyncFd::register_with_interest(Arc::clone(self), Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
    }

    /// Watches `socket`, for bytes to read too if `reads`; its readiness reports `token`.
    pub(super) fn add(&self, socket: BorrowedFd<'_>, token: u64, reads: bool) -> io::Result<()> {
        self.watch(libc::EPOLL_CTL_ADD, socket, token, reads)
    }

    /// Watches `socket`, already watched, for what [`Epoll::add`] says, and arms it again.
    pub(super) fn modify(&self, socket: BorrowedFd<'_>, token: u64, reads: bool) -> io::Result<()> {
        self.watch(libc::EPOLL_CTL_MOD, socket, token, reads)
    }

    fn watch(
        &self,
        op: libc::c_int,
        socket: BorrowedFd<'_>,
        token: u64,
        reads: bool,
    ) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: if reads { READY } else { CLOSING },
            u64: token,
        };
        self.control(op, socket, &mut event)
    }

    pub(super) fn remove(&self, socket: BorrowedFd<'_>) -> io::Result<()> {
        // Ignored by the kernel for a removal, but must be a valid pointer before 2.6.9.
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        self.control(libc::EPOLL_CTL_DEL, socket, &mut event)
    }

    fn control(
        &self,
        op: libc::c_int,
        socket: BorrowedFd<'_>,
        event: &mut libc::epoll_event,
    ) -> io::Result<()> {
        // SAFETY: both descriptors are open for the call; `event` is a valid epoll_event.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, socket.as_raw_fd(), event) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The tokens of sockets ready now, without waiting; at most `events.len()`.
    pub(super) fn ready(&self, events: &mut [libc::epoll_event]) -> io::Result<Vec<u64>> {
        let capacity = libc::c_int::try_from(events.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `events` is valid for `capacity` entries; timeout 0 does not block.
        let n = unsafe { libc::epoll_wait(self.0.as_raw_fd(), events.as_mut_ptr(), capacity, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(events[..n as usize].iter().map(|event| event.u64).collect())
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
