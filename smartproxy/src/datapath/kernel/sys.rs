//! Raw socket syscalls of the kernel data path (as aya keeps its own `sys` module): socket
//! cookie, `TCP_INFO`, `SIOCINQ`/`SIOCOUTQ`, `poll`, the `setsockopt`s of a splice, page size.
//! Every `unsafe` of the kernel path outside the ring-buffer registration lives here.

use std::{
    io,
    mem::{size_of, MaybeUninit},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use aya::maps::IterableMap;

use super::events::TcpState;

/// `SO_RCVBUF` of spliced sockets (the kernel doubles the value): what a paused sender
/// may fill, pinned so that autotuning cannot grow it to many MB
/// (`docs/kernel-notes.md#backpressure`).
const SPLICED_RECEIVE_BUFFER: usize = 512 * 1024;

/// What userspace reads at once from a spliced socket whose verdict passes a stream: its
/// whole receive queue. The verdict redirects again only once userspace has forwarded
/// every byte it passed; a fast sender refills a queue read in 64 KiB steps before that
/// moment comes, and the connection stays on the userspace copy (bench, bulk: 62-85 % of
/// the bytes through the kernel with 64 KiB reads, 94-98 % with whole-queue reads).
pub const PASSED_READ_BYTES: usize = 2 * SPLICED_RECEIVE_BUFFER;

/// How much more a spliced socket's send buffer holds than `max_queued_bytes`: room for
/// the skb that crosses the cap, plus skb overhead.
const SEND_BUFFER_MARGIN: u64 = 1024 * 1024;

/// `SO_COOKIE` from `asm-generic/socket.h` (the libc crate does not export it).
const SO_COOKIE: libc::c_int = 57;

/// The socket's cookie: the key the eBPF programs see via `bpf_get_socket_cookie`.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt::<u64>(fd, libc::SOL_SOCKET, SO_COOKIE)
}

/// The socket's TCP state (`TCP_INFO.tcpi_state`).
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<TcpState> {
    Ok(TcpState::from(u32::from(tcp_info(fd)?.state)))
}

/// Whether the socket is readable (bytes, EOF) or failed, by a `poll` that does not wait.
pub(super) fn readable_now(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and the count says one.
    let rc = unsafe { libc::poll(&mut pollfd, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pollfd.revents != 0)
}

/// `SIOCINQ`: bytes received and not read yet.
pub(crate) fn bytes_to_read(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut inq: libc::c_int = 0;
    // SAFETY: SIOCINQ writes one c_int through the pointer, which points at `inq`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut inq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    u64::try_from(inq).map_err(|_| io::Error::other(format!("SIOCINQ returned {inq}")))
}

/// Whether the peer acknowledged every byte written to the socket (`SIOCOUTQ` is 0): an
/// abort, which discards the send queue, then loses nothing.
pub fn all_acknowledged(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(acked_and_outq(fd)?.1 == 0)
}

/// `(tcpi_bytes_acked, SIOCOUTQ)`: their sum is every byte ever taken into the socket's
/// send queue (plus the SYN, on connected sockets).
pub(super) fn acked_and_outq(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let acked = tcp_info(fd)?.bytes_acked;
    Ok((acked, send_queue(fd)?))
}

/// `SIOCOUTQ`: bytes in the send queue, sent or not, that the peer has not acknowledged.
fn send_queue(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int through the pointer, which points at `outq`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    u64::try_from(outq).map_err(|_| io::Error::other(format!("SIOCOUTQ returned {outq}")))
}

/// A socket's counters when it is spliced: `SIOCINQ`, then `TCP_INFO`, `SIOCOUTQ` and
/// `TCP_INFO` again.
#[derive(Clone, Copy, Debug)]
pub(super) struct Baseline {
    /// `tcpi_bytes_acked`.
    pub(super) acked: u64,
    /// `SIOCOUTQ`.
    pub(super) outq: u64,
    /// `SIOCINQ`: bytes received and not read yet.
    pub(super) queued: u64,
    /// `tcpi_bytes_received`: every byte received in order (and a FIN).
    received: u64,
}

impl Baseline {
    /// Whether nobody ever read from the socket: every byte it received is still queued.
    /// `queued` is read first, so `received` can only have grown since (bytes that
    /// arrived in between), and a FIN counts in `received` only: an equality is never
    /// wrong, only sometimes missed.
    pub(super) fn nothing_read(&self) -> bool {
        self.received == self.queued
    }
}

/// How often [`baseline`] reads again while acknowledgements keep arriving.
const BASELINE_READS: usize = 8;

pub(super) fn baseline(fd: BorrowedFd<'_>) -> io::Result<Baseline> {
    let queued = bytes_to_read(fd)?;
    let mut info = tcp_info(fd)?;
    // An ACK between `TCP_INFO` and `SIOCOUTQ` moves bytes from the send queue to
    // `bytes_acked`, and their sum would fall short of what the socket was handed: the
    // drain check (`Splice::may_write`) would then let a FIN overtake the kernel's
    // backlog by that many bytes. So `bytes_acked` must hold still across `SIOCOUTQ`.
    for _ in 0..BASELINE_READS {
        let outq = send_queue(fd)?;
        let after = tcp_info(fd)?;
        if after.bytes_acked == info.bytes_acked {
            return Ok(Baseline {
                acked: info.bytes_acked,
                outq,
                queued,
                received: info.bytes_received,
            });
        }
        info = after;
    }
    Err(io::Error::other(
        "acknowledgements kept arriving while the send queue was read",
    ))
}

/// The head of the kernel's `struct tcp_info` (`include/uapi/linux/tcp.h`) up to
/// `tcpi_bytes_received`; the libc crate's glibc version of the struct stops before them.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpInfoHead {
    state: u8,
    /// ca_state .. the two bitfield bytes.
    _bytes: [u8; 7],
    /// tcpi_rto .. tcpi_total_retrans.
    _words: [u32; 24],
    _pacing_rate: u64,
    _max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

const _: () = assert!(size_of::<TcpInfoHead>() == 136);

fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfoHead> {
    getsockopt::<TcpInfoHead>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// `getsockopt` for a plain-data `T`; fails if the kernel returns fewer bytes than `T`.
fn getsockopt<T: Copy>(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, which has room for them.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < size_of::<T>() {
        return Err(io::Error::other(format!(
            "getsockopt({level}, {name}) returned {len} bytes, expected {}",
            size_of::<T>()
        )));
    }
    // SAFETY: zero-initialised and then fully written by the kernel (checked above); every `T`
    // used here is plain integers, valid for any bit pattern.
    Ok(unsafe { value.assume_init() })
}

/// Pins the receive buffer to [`SPLICED_RECEIVE_BUFFER`], and the send buffer above the
/// cap: the kernel's redirect backlog must never meet a full send queue in the middle of
/// an skb. On 6.18, when the send then returns nothing, it reports EPIPE, drops the skb
/// and disables the socket's send path (lost bytes). The cap counts the whole send
/// queue, so with the send buffer above it, the backlog only ever waits before an skb,
/// which is harmless. The `FORCE` variants (CAP_NET_ADMIN, which the kernel path needs
/// anyway) because `net.core.rmem_max` and `wmem_max` usually clamp the plain ones below
/// these sizes.
pub(super) fn pin_buffers(fd: BorrowedFd<'_>, max_queued_bytes: u64) -> io::Result<()> {
    // The kernel doubles the sizes it is given (`SPLICED_RECEIVE_BUFFER` already is one).
    let send = (max_queued_bytes + SEND_BUFFER_MARGIN) / 2;
    for (name, bytes) in [
        (libc::SO_RCVBUFFORCE, SPLICED_RECEIVE_BUFFER as u64),
        (libc::SO_SNDBUFFORCE, send),
    ] {
        let bytes = libc::c_int::try_from(bytes)
            .map_err(|_| io::Error::other(format!("buffer of {bytes} bytes is too large")))?;
        set_socket_option(fd, name, bytes)?;
    }
    Ok(())
}

/// Turns on the sock_ops callbacks of a spliced socket through the cgroup setsockopt
/// program (`smartproxy-ebpf/src/main.rs` `arm_events`): its state changes and acknowledged
/// bytes are reported from then on. ENOPROTOOPT when that program is not attached to the
/// socket's cgroup, EPERM when it could not arm the socket.
pub(super) fn arm_events(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_tcp_option(fd, smartproxy_common::ARM_EVENTS_OPTION, 1)
}

/// A TCP socket that is neither bound nor connected, created in this process's cgroup.
pub(super) fn tcp_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant arguments; the fd is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    set_socket_option(fd, libc::SO_RCVLOWAT, bytes)
}

/// `linux/tcp.h`: `TCP_REPAIR` values and the receive queue of `TCP_REPAIR_QUEUE` (the
/// libc crate exports only the option names).
const TCP_REPAIR_ON: libc::c_int = 1;
const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;
const TCP_NO_QUEUE: libc::c_int = 0;
const TCP_RECV_QUEUE: libc::c_int = 1;

/// The TCP sequence number of the next byte userspace has not read (`copied_seq`), for the
/// verdict to trim what was read already from a retransmitted skb
/// (`docs/kernel-notes.md#retransmitted-skbs`). Only repair mode tells it
/// (`TCP_QUEUE_SEQ` of the receive queue is `rcv_nxt`; less `SIOCINQ`), for a moment,
/// during which the socket neither sends nor is sent to by the verdict (call it before
/// the splice). CAP_NET_ADMIN, which the kernel path keeps. `rcv_nxt` moves with each
/// arriving byte, so it is read between two equal `SIOCINQ`s.
pub(super) fn next_unread_seq(fd: BorrowedFd<'_>) -> io::Result<u32> {
    set_tcp_option(fd, libc::TCP_REPAIR, TCP_REPAIR_ON)?;
    let seq = (|| {
        set_tcp_option(fd, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
        for _ in 0..8 {
            let before = bytes_to_read(fd)?;
            let rcv_nxt = getsockopt::<u32>(fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)?;
            if bytes_to_read(fd)? == before {
                // SIOCINQ is `rcv_nxt - copied_seq` in 32-bit sequence space.
                return Ok(rcv_nxt.wrapping_sub(before as u32));
            }
        }
        Err(io::Error::other(
            "bytes kept arriving while the sequence number was read",
        ))
    })();
    let left = set_tcp_option(fd, libc::TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        .and_then(|()| set_tcp_option(fd, libc::TCP_REPAIR, TCP_REPAIR_OFF_NO_WP));
    left.and(seq)
}

/// `setsockopt(IPPROTO_TCP, name)` of an int.
fn set_tcp_option(fd: BorrowedFd<'_>, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    set_option(fd, libc::IPPROTO_TCP, name, value)
}

/// `setsockopt(SOL_SOCKET, name)` of an int.
fn set_socket_option(fd: BorrowedFd<'_>, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    set_option(fd, libc::SOL_SOCKET, name, value)
}

fn set_option(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `bpf(2)` commands on one map element (`include/uapi/linux/bpf.h`).
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// The head of `union bpf_attr` that those commands read; the kernel takes a shorter
/// attribute than its own and zeroes the rest.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn map_elem(
    command: libc::c_long,
    map: BorrowedFd<'_>,
    key: *const u8,
    value: *mut u8,
    flags: u64,
) -> io::Result<()> {
    let attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key as u64,
        value: value as u64,
        flags,
    };
    // SAFETY: the kernel reads `size_of::<MapElemAttr>()` bytes of `attr`, and through it
    // the key and value, which the callers size as the map's key and value; it writes
    // only the value, and only on a lookup, whose callers pass a writable one.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            &attr as *const MapElemAttr,
            size_of::<MapElemAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Plain data a map holds as key or value: aya's bound (the map checked its sizes against
/// the kernel's when it was opened) and bytemuck's (for the bytes).
pub(super) trait Element: aya::Pod + bytemuck::Pod {}
impl<T: aya::Pod + bytemuck::Pod> Element for T {}

fn fd_of<K: Element, V: Element>(map: &impl IterableMap<K, V>) -> BorrowedFd<'_> {
    map.map().fd().as_fd()
}

/// Inserts or replaces `key` in `map` (`flags`: 0, or `BPF_NOEXIST`). Takes `&self`, unlike
/// aya's insert: one `bpf(2)` call, which the kernel orders against the others on the same
/// map, so every connection runtime makes them at once without a lock. (A lock around
/// each map made six futex calls per connection in `ebpf` churn.) The key and value types
/// are the map's own, whose sizes aya checked when it opened the map.
pub(super) fn map_update<K: Element, V: Element>(
    map: &impl IterableMap<K, V>,
    key: &K,
    value: &V,
    flags: u64,
) -> io::Result<()> {
    let value = bytemuck::bytes_of(value).as_ptr().cast_mut();
    map_elem(
        BPF_MAP_UPDATE_ELEM,
        fd_of(map),
        bytemuck::bytes_of(key).as_ptr(),
        value,
        flags,
    )
}

/// The value of `key` in `map`; ENOENT if it has none.
pub(super) fn map_lookup<K: Element, V: Element>(
    map: &impl IterableMap<K, V>,
    key: &K,
) -> io::Result<V> {
    let mut value = V::zeroed();
    let out = bytemuck::bytes_of_mut(&mut value).as_mut_ptr();
    map_elem(
        BPF_MAP_LOOKUP_ELEM,
        fd_of(map),
        bytemuck::bytes_of(key).as_ptr(),
        out,
        0,
    )?;
    Ok(value)
}

/// Removes `key` from `map`; ENOENT if it has none.
pub(super) fn map_delete<K: Element, V: Element>(
    map: &impl IterableMap<K, V>,
    key: &K,
) -> io::Result<()> {
    let key = bytemuck::bytes_of(key).as_ptr();
    map_elem(
        BPF_MAP_DELETE_ELEM,
        fd_of(map),
        key,
        std::ptr::null_mut(),
        0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_state_and_cookie_of_a_connected_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        use std::os::fd::AsFd;
        assert_eq!(tcp_state(client.as_fd()).unwrap(), TcpState::Established);
        assert_eq!(tcp_state(listener.as_fd()).unwrap(), TcpState::Listen);
        let (a, b) = (
            socket_cookie(client.as_fd()).unwrap(),
            socket_cookie(server.as_fd()).unwrap(),
        );
        assert_ne!(a, b, "cookies are unique per socket");
        // Nothing written yet: the baseline is the SYN at most.
        let (acked, outq) = acked_and_outq(client.as_fd()).unwrap();
        assert!(acked + outq <= 1);
    }

    /// `Baseline::nothing_read` holds until the first read, and a FIN makes it miss (a
    /// repair-mode read then, which is only slower).
    #[test]
    fn nothing_read_until_the_first_read() {
        use std::io::{Read, Write};
        use std::os::fd::AsFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let settled = |server: &std::net::TcpStream, queued: u64| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let now = baseline(server.as_fd()).unwrap();
                if now.queued == queued || std::time::Instant::now() > deadline {
                    return now;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        assert!(settled(&server, 0).nothing_read(), "nothing received");
        client.write_all(&[7; 10]).unwrap();
        assert!(settled(&server, 10).nothing_read(), "10 bytes queued");
        let mut four = [0; 4];
        server.read_exact(&mut four).unwrap();
        let after_read = settled(&server, 6);
        assert_eq!(after_read.received, 10);
        assert!(!after_read.nothing_read(), "4 bytes were read");

        let mut other = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (other_server, _) = listener.accept().unwrap();
        other.write_all(&[7; 3]).unwrap();
        other.shutdown(std::net::Shutdown::Write).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while tcp_state(other_server.as_fd()).unwrap() != TcpState::CloseWait {
            assert!(std::time::Instant::now() < deadline, "no FIN");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let with_fin = baseline(other_server.as_fd()).unwrap();
        assert_eq!(with_fin.queued, 3);
        assert!(
            !with_fin.nothing_read(),
            "the FIN counts in tcpi_bytes_received"
        );
    }
}
