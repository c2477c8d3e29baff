//! CLOCK_MONOTONIC stamps, the clock the eBPF programs read (`bpf_ktime_get_ns`).

use std::time::{Duration, Instant};

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
