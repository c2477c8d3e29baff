//! Dropping root: `[proxy] user` makes the proxy run as that user (its primary group, no
//! supplementary groups) once eBPF is loaded and the listeners and the control socket
//! are bound, keeping only the capabilities the data path still uses. Without `user` the
//! ids stay and the capabilities are reduced the same way ([`keep_only`]).
//!
//! What is kept, and why (found by the tests in `tests/privileges.rs`, kernel 6.18):
//! - ebpf data path: `CAP_NET_ADMIN`, for `SO_SNDBUFFORCE` on each spliced socket (see
//!   `datapath::kernel::sys::pin_buffers`). Sockhash and hash map updates through map descriptors the
//!   proxy already holds need no capability since Linux 6.5; reading the ring buffer
//!   neither. Kernels before 6.5 with `kernel.unprivileged_bpf_disabled` set would need
//!   `CAP_BPF` for the map updates: there a splice fails and the connection takes the
//!   userspace path (counted in `ebpf.splice_failures`).
//! - userspace data path: nothing.
//!   `CAP_NET_BIND_SERVICE` is not kept: every listener is bound before the drop.
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

/// `CAP_NET_ADMIN` from `linux/capability.h`.
const CAP_NET_ADMIN: u32 = 12;
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

/// The capabilities kept for the data paths in use.
pub fn kept_capabilities(kernel_data_path: bool) -> u64 {
    if kernel_data_path {
        1 << CAP_NET_ADMIN
    } else {
        0
    }
}

/// Gives the control socket to `user`, then becomes `user` with only `keep` (a mask of
/// capability numbers) in the permitted and effective sets. While the process has one
/// thread only.
pub fn drop_to(user: &User, control_socket: &Path, keep: u64) -> Result<(), PrivilegeError> {
    std::os::unix::fs::chown(control_socket, Some(user.uid), Some(user.gid)).map_err(|source| {
        PrivilegeError::Syscall {
            step: "chown the control socket",
            source,
        }
    })?;
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

/// Sets the permitted and effective sets of the process to `keep`, inheritable empty.
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
            inheritable: 0,
        },
        CapData {
            effective: high,
            permitted: high,
            inheritable: 0,
        },
    ];
    // SAFETY: capset reads a valid header and two data words.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(syscall_error("capset"));
    }
    Ok(())
}

fn thread_count() -> io::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/task")?.count())
}
