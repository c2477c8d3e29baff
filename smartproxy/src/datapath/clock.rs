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

/// The `Instant` of a CLOCK_MONOTONIC stamp, past or future (both count from the same
/// origin on Linux, but `Instant` has no constructor from raw nanoseconds).
pub fn instant_of(stamp_ns: u64) -> Instant {
    let (now, now_ns) = (Instant::now(), monotonic_ns());
    if stamp_ns >= now_ns {
        return now + Duration::from_nanos(stamp_ns - now_ns);
    }
    now.checked_sub(Duration::from_nanos(now_ns - stamp_ns))
        .unwrap_or(now)
}

/// The CLOCK_MONOTONIC stamp of an `Instant` (the inverse of [`instant_of`]): how a
/// connection's timers travel to a successor process, which reads the same clock.
pub fn ns_of(at: Instant) -> u64 {
    let (now, now_ns) = (Instant::now(), monotonic_ns());
    match at.checked_duration_since(now) {
        Some(ahead) => now_ns.saturating_add(ahead.as_nanos() as u64),
        None => now_ns.saturating_sub(now.duration_since(at).as_nanos() as u64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_and_instants_convert_both_ways_within_a_millisecond() {
        let now = Instant::now();
        for at in [
            now,
            now + Duration::from_secs(90),
            now - Duration::from_millis(5),
        ] {
            let back = instant_of(ns_of(at));
            let error = back.max(at) - back.min(at);
            assert!(error < Duration::from_millis(1), "{error:?}");
        }
    }
}
