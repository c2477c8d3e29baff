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
//! Linux credentials belong to each thread. glibc's `setresuid`/`setresgid`/`setgroups`
//! change every thread of the process, but `capset` only the calling one. So
//! [`prepare`] sets `PR_SET_KEEPCAPS` while the process has one thread (threads created
//! later inherit it), and [`drop_to`] changes the ids through glibc, then sets the
//! capabilities on every thread: itself directly, the others from a signal handler.

use std::ffi::CString;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

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
    #[error("{missed} threads did not take the reduced capabilities in time")]
    Threads { missed: usize },
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
/// (the rest, ambient ones from a systemd unit included, are gone for good) on every
/// thread. Returns the mask kept: `keep` less what the process did not have.
pub fn keep_only(keep: u64) -> Result<u64, PrivilegeError> {
    let data = this_thread_capabilities().ok_or_else(|| syscall_error("capget"))?;
    let permitted = u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32);
    let kept = keep & permitted;
    set_capabilities_everywhere(kept)?;
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
/// capability numbers) in every thread's permitted and effective sets.
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
    set_capabilities_everywhere(keep)
}

// === capabilities on every thread ===

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

/// The mask the signal handler applies (low and high word).
static TARGET_LOW: AtomicU32 = AtomicU32::new(0);
static TARGET_HIGH: AtomicU32 = AtomicU32::new(0);
static APPLIED: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicBool = AtomicBool::new(false);

/// Sets this thread's permitted and effective sets to the target mask; inheritable empty.
/// Async-signal-safe: one raw syscall on stack data.
fn capset_this_thread() -> bool {
    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let (low, high) = (
        TARGET_LOW.load(Ordering::Acquire),
        TARGET_HIGH.load(Ordering::Acquire),
    );
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
    unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) == 0 }
}

extern "C" fn on_signal(_: libc::c_int) {
    if !capset_this_thread() {
        FAILED.store(true, Ordering::Release);
    }
    APPLIED.fetch_add(1, Ordering::AcqRel);
}

fn thread_ids() -> io::Result<Vec<libc::pid_t>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task")? {
        if let Some(id) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            ids.push(id);
        }
    }
    Ok(ids)
}

fn set_capabilities_everywhere(keep: u64) -> Result<(), PrivilegeError> {
    TARGET_LOW.store(keep as u32, Ordering::Release);
    TARGET_HIGH.store((keep >> 32) as u32, Ordering::Release);
    if !capset_this_thread() {
        return Err(syscall_error("capset"));
    }
    let signal = libc::SIGRTMAX() - 1;
    // SAFETY: installs a handler that only makes one syscall and touches atomics.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(syscall_error("sigaction"));
        }
    }
    // SAFETY: getpid/gettid take no arguments.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    let mut done = vec![me];
    let deadline = Instant::now() + Duration::from_secs(5);
    // Threads may start while this runs; they copy the credentials of the thread that
    // creates them, so repeat until a listing shows no thread left to do.
    loop {
        let threads = thread_ids().map_err(|source| PrivilegeError::Syscall {
            step: "list /proc/self/task",
            source,
        })?;
        let todo: Vec<libc::pid_t> = threads.into_iter().filter(|t| !done.contains(t)).collect();
        if todo.is_empty() {
            break;
        }
        APPLIED.store(0, Ordering::Release);
        let mut sent = 0;
        for &thread in &todo {
            // SAFETY: tgkill to a thread of this process; one that exited meanwhile
            // gives ESRCH, which is fine.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, thread, signal) } == 0 {
                sent += 1;
            }
        }
        loop {
            // A thread that exits before its handler runs never answers.
            let live = thread_ids().map_or(todo.len(), |now| {
                todo.iter().filter(|t| now.contains(t)).count()
            });
            let expected = sent.min(live);
            let applied = APPLIED.load(Ordering::Acquire);
            if applied >= expected {
                break;
            }
            if Instant::now() > deadline {
                return Err(PrivilegeError::Threads {
                    missed: expected - applied,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        done.extend(todo);
    }
    if FAILED.load(Ordering::Acquire) {
        return Err(PrivilegeError::Syscall {
            step: "capset in another thread",
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        });
    }
    Ok(())
}
