//! Data paths: how the bytes of a routed connection move. `userspace` copies them with
//! tokio; `ebpf` hands them to the kernel's sockhash and only forwards what the kernel
//! passes up. Both report the same lifecycle events through one [`Relay`].

pub mod userspace;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::lifecycle::Direction;

pub use userspace::Relay;

/// Which data path carries a connection's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPathKind {
    Userspace,
    Ebpf,
}

impl DataPathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DataPathKind::Userspace => "userspace",
            DataPathKind::Ebpf => "ebpf",
        }
    }
}

impl fmt::Display for DataPathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads, so kernel and
/// userspace activity stamps compare directly.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `Instant` of a CLOCK_MONOTONIC stamp (both count from the same origin on Linux,
/// but `Instant` has no constructor from raw nanoseconds).
pub fn instant_of(stamp_ns: u64) -> Instant {
    let now = Instant::now();
    let age = monotonic_ns().saturating_sub(stamp_ns);
    now.checked_sub(Duration::from_nanos(age)).unwrap_or(now)
}

/// Bytes each way and the last activity of one connection, shared between its relay
/// (which writes) and the connection table (which reads for stats).
#[derive(Debug)]
pub struct Meter {
    bytes: [AtomicU64; 2],
    last_activity_ns: AtomicU64,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            last_activity_ns: AtomicU64::new(monotonic_ns()),
        }
    }
}

impl Meter {
    pub fn record(&self, direction: Direction, bytes: usize) {
        self.bytes[direction.index()].fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_activity_ns
            .store(monotonic_ns(), Ordering::Relaxed);
    }

    pub fn bytes(&self, direction: Direction) -> u64 {
        self.bytes[direction.index()].load(Ordering::Relaxed)
    }

    pub fn last_activity_ns(&self) -> u64 {
        self.last_activity_ns.load(Ordering::Relaxed)
    }
}
