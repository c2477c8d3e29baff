//! Dropping root: `[proxy] user` makes the proxy run as that user (its primary group, no
//! supplementary groups) once eBPF is loaded and the listeners and the control socket
//! are bound, keeping only the capabilities the data path still uses. Without `user` the
//! ids stay and the capabilities are reduced the same way ([`keep_only`]).
//!
//! What is kept, and why (found by the tests in `tests/privileges.rs`, kernel 6.18):
//! - ebpf data path: `CAP_NET_ADMIN`, for `SO_SNDBUFFORCE` on each spliced socket (see
//!   `datapath::kernel::sys::pin_buffers`). Sockhash and hash map updates through map descriptors the
//!   proxy already holds need no capability since Linux 6.5; reading the ring buffer
//!   neither. For an upgrade (`upgrade`), `CAP_BPF` and `CAP_PERFMON` with it: the
//!   successor loads its programs and attaches them (sk_skb to the reused sockhash,
//!   sock_ops to the cgroup it inherits). All three stay in the ambient set, which an
//!   `execve` as a user other than root keeps; as root, `execve` gives the successor the
//!   bounding set in any case. The pinned maps are given to `user`, who opens them next.
//! - userspace data path: nothing; a successor needs no privilege to take over.
//!   `CAP_NET_BIND_SERVICE` is not kept: every listener is bound before the drop, and a
//!   successor inherits them (a new port below 1024 takes a restart).
//!
//! Linux credentials belong to each thread, and `capset` changes only the calling one.
//! So all of it happens while the process has one thread: the binary loads the kernel
//! path and binds every socket first (`Proxy::prepare`), drops privileges here, and only
//! then starts the tokio runtime, whose threads copy the reduced credentials. [`prepare`]
//! sets `PR_SET_KEEPCAPS` so that the permitted set survives the uid change.

use std::ffi::CString;
use std::io;
use std::path::Path;

/// The user to run as, looked up at startup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
}

/// Why the proxy could not become its configured user.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("no user named {0:?}")]
    NoSuchUser(String),
    #[error("{step}: {source}")]
    Syscall {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{threads} threads run already; capabilities must be dropped while the process has one"
    )]
    Threads { threads: usize },
}

fn syscall_error(step: &'static str) -> PrivilegeError {
    PrivilegeError::Syscall {
        step,
        source: io::Error::last_os_error(),
    }
}

/// Looks `name` up (getpwnam_r).
pub fn lookup(name: &str) -> Result<User, PrivilegeError> {
    let missing = || PrivilegeError::NoSuchUser(name.to_owned());
    let c_name = CString::new(name).map_err(|_| missing())?;
    let mut buffer = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value (null pointers, zero ids); getpwnam_r
    // fills it and points its strings into `buffer`, which outlives the call.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buffer.len()` is its size.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(missing());
    }
    Ok(User {
        name: name.to_owned(),
        uid: entry.pw_uid,
        gid: entry.pw_gid,
    })
}

/// While the process has a single thread: keep the permitted capabilities across the
/// coming uid change, in this thread and every thread created from now on.
pub fn prepare() -> Result<(), PrivilegeError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        return Err(syscall_error("prctl(PR_SET_KEEPCAPS)"));
    }
    Ok(())
}

/// From `linux/capability.h`.
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;
/// `CAP_SYS_RESOURCE` from `linux/capability.h`: raising a hard resource limit.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// This thread's capability sets (capget), or None if the call fails.
fn this_thread_capabilities() -> Option<[CapData; 2]> {
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget writes two data words into a valid local array.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &header, data.as_mut_ptr()) };
    (rc == 0).then_some(data)
}

/// Whether this thread has capability `cap` in its effective set.
pub fn has_effective(cap: u32) -> bool {
    this_thread_capabilities()
        .and_then(|data| data.get(cap as usize / 32).map(|d| d.effective))
        .is_some_and(|word| word & (1 << (cap % 32)) != 0)
}

/// Without `user`: the same ids, and only `keep` of the capabilities this process holds
/// (the rest, ambient ones from a systemd unit included, are gone for good). Returns the
/// mask kept: `keep` less what the process did not have. While the process has one
/// thread only.
pub fn keep_only(keep: u64) -> Result<u64, PrivilegeError> {
    let data = this_thread_capabilities().ok_or_else(|| syscall_error("capget"))?;
    let permitted = u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32);
    let kept = keep & permitted;
    set_capabilities(kept)?;
    Ok(kept)
}

/// The capabilities kept for the data paths in use: on the kernel path `CAP_NET_ADMIN`
/// for `SO_SNDBUFFORCE`, and with `CAP_BPF` and `CAP_PERFMON` what an upgrade's
/// successor needs to load its programs and attach them to the reused maps and the
/// cgroup. They are kept in the ambient set too, so that they survive the successor's
/// `execve` under a user other than root (`user`, or a unit's `User=`).
pub fn kept_capabilities(kernel_data_path: bool) -> u64 {
    if kernel_data_path {
        (1 << CAP_NET_ADMIN) | (1 << CAP_BPF) | (1 << CAP_PERFMON)
    } else {
        0
    }
}

/// Gives the control socket and the pinned kernel maps (`pins`, a directory) to `user`,
/// then becomes `user` with only `keep` (a mask of capability numbers). A successor
/// started by an upgrade already runs as `user`: it keeps its ids. While the process has
/// one thread only.
pub fn drop_to(
    user: &User,
    control_socket: &Path,
    pins: Option<&Path>,
    keep: u64,
) -> Result<(), PrivilegeError> {
    let give = |step: &'static str, path: &Path| {
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
            .map_err(|source| PrivilegeError::Syscall { step, source })
    };
    give("chown the control socket", control_socket)?;
    if let Some(dir) = pins {
        // Its successor opens them as `user`.
        give("chown the pinned maps", dir)?;
        let entries = std::fs::read_dir(dir).map_err(|source| PrivilegeError::Syscall {
            step: "list the pinned maps",
            source,
        })?;
        for entry in entries.flatten() {
            give("chown the pinned maps", &entry.path())?;
            if let Ok(maps) = std::fs::read_dir(entry.path()) {
                for map in maps.flatten() {
                    give("chown the pinned maps", &map.path())?;
                }
            }
        }
    }
    // SAFETY: getuid and getgid cannot fail.
    let already = unsafe { libc::getuid() == user.uid && libc::getgid() == user.gid };
    if already {
        return set_capabilities(keep);
    }
    // SAFETY: plain id syscalls (glibc applies each to every thread).
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(syscall_error("setgroups"));
        }
        if libc::setresgid(user.gid, user.gid, user.gid) != 0 {
            return Err(syscall_error("setresgid"));
        }
        if libc::setresuid(user.uid, user.uid, user.uid) != 0 {
            return Err(syscall_error("setresuid"));
        }
    }
    set_capabilities(keep)
}

// === capabilities ===

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sets the permitted, effective, inheritable and ambient sets of the process to `keep`
/// (ambient: so that they survive an upgrade's `execve` as a user other than root).
/// `capset` changes the calling thread only, so this refuses to run once a second thread
/// exists: the binary drops its privileges before it starts the runtime, and threads
/// created afterwards copy these sets.
fn set_capabilities(keep: u64) -> Result<(), PrivilegeError> {
    let threads = thread_count().map_err(|source| PrivilegeError::Syscall {
        step: "count the threads in /proc/self/task",
        source,
    })?;
    if threads != 1 {
        return Err(PrivilegeError::Threads { threads });
    }
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let (low, high) = (keep as u32, (keep >> 32) as u32);
    let data = [
        CapData {
            effective: low,
            permitted: low,
            inheritable: low,
        },
        CapData {
            effective: high,
            permitted: high,
            inheritable: high,
        },
    ];
    // SAFETY: capset reads a valid header and two data words.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(syscall_error("capset"));
    }
    // Ambient capabilities outside the inheritable set are gone already; raise the kept.
    for cap in (0..64).filter(|cap| keep & (1 << cap) != 0) {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                cap as libc::c_ulong,
                0,
                0,
            )
        };
        if rc != 0 {
            return Err(syscall_error("prctl(PR_CAP_AMBIENT_RAISE)"));
        }
    }
    Ok(())
}

fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}
