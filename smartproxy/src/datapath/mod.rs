//! Data paths: how the bytes of a routed connection move. On the userspace path the
//! [`Relay`] (`relay`) copies them with tokio; on the kernel path (`kernel`) the eBPF
//! verdict redirects them through the sockhash and the same relay only forwards what the
//! kernel passes up. Both report the same lifecycle events.

pub mod kernel;
pub mod peer;
pub mod relay;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::vocab::Direction;

pub use peer::Peer;
pub use relay::Relay;

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
/// (which writes) and the connection table (which reads for stats). While the connection
/// is spliced, the kernel's counters are added in.
#[derive(Debug)]
pub struct Meter {
    /// Bytes userspace moved.
    bytes: [AtomicU64; 2],
    /// Bytes the kernel moved, once the splice ended (live ones are read from its maps).
    kernel_bytes: [AtomicU64; 2],
    last_activity_ns: AtomicU64,
    kernel: Mutex<Option<kernel::KernelFlows>>,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            kernel_bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            last_activity_ns: AtomicU64::new(monotonic_ns()),
            kernel: Mutex::new(None),
        }
    }
}

impl Meter {
    pub fn record(&self, direction: Direction, bytes: usize) {
        self.bytes[direction.index()].fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_activity_ns
            .store(monotonic_ns(), Ordering::Relaxed);
    }

    /// Every byte moved in `direction`, by either path.
    pub fn bytes(&self, direction: Direction) -> u64 {
        let [userspace, kernel] = self.bytes_by_path(direction);
        userspace + kernel
    }

    /// The bytes moved in `direction` as `[userspace, kernel]`, each read once: their sum
    /// is the total, which two separate reads of a live kernel counter would not give.
    pub fn bytes_by_path(&self, direction: Direction) -> [u64; 2] {
        [
            self.bytes[direction.index()].load(Ordering::Relaxed),
            self.kernel_bytes(direction),
        ]
    }

    /// The bytes the kernel moved in `direction`.
    pub fn kernel_bytes(&self, direction: Direction) -> u64 {
        let live = self
            .kernel()
            .as_ref()
            .map_or(0, |k| k.counters(direction).redirected);
        self.kernel_bytes[direction.index()].load(Ordering::Relaxed) + live
    }

    /// CLOCK_MONOTONIC nanoseconds of the last byte moved either way.
    pub fn last_activity_ns(&self) -> u64 {
        let own = self.last_activity_ns.load(Ordering::Relaxed);
        match self.kernel().as_ref() {
            Some(k) => Direction::BOTH
                .into_iter()
                .map(|d| k.counters(d).last_activity_ns)
                .fold(own, u64::max),
            None => own,
        }
    }

    fn attach_kernel(&self, flows: kernel::KernelFlows) {
        *self.kernel() = Some(flows);
    }

    /// Folds the kernel's final counts into this meter, before the splice goes away.
    fn detach_kernel(&self) {
        let Some(flows) = self.kernel().take() else {
            return;
        };
        for direction in Direction::BOTH {
            let counters = flows.counters(direction);
            self.kernel_bytes[direction.index()].fetch_add(counters.redirected, Ordering::Relaxed);
            self.last_activity_ns
                .fetch_max(counters.last_activity_ns, Ordering::Relaxed);
        }
    }

    fn kernel(&self) -> MutexGuard<'_, Option<kernel::KernelFlows>> {
        // Each guarded operation is one assignment: a poisoned lock is still consistent.
        self.kernel.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Whether the kernel data path can load here; `Err` says why not. Loads the programs
/// and releases them again.
pub fn probe_ebpf() -> Result<(), String> {
    kernel::Kernel::load(kernel::LoadOptions::default())
        .map(drop)
        .map_err(|e| crate::error_chain(&e))
}
