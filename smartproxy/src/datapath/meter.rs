//! Bytes each way and the last activity of one connection, by either data path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::clock::monotonic_ns;
use super::kernel::offload::{CountsKernelFlows, KernelFlows};
use crate::vocab::Direction;

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
    kernel: Mutex<Option<KernelFlows>>,
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

/// A meter's own counts as a successor process takes them over (`upgrade`). Without the
/// live counters of a splice: those stay in the kernel's maps, and the successor's meter
/// reads them again once it adopts the splice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MeterRecord {
    userspace: [u64; 2],
    kernel_ended: [u64; 2],
    last_activity_ns: u64,
}

impl Meter {
    /// This meter's own counts (see [`MeterRecord`]).
    pub fn to_record(&self) -> MeterRecord {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        MeterRecord {
            userspace: self.bytes.each_ref().map(load),
            kernel_ended: self.kernel_bytes.each_ref().map(load),
            last_activity_ns: load(&self.last_activity_ns),
        }
    }

    /// A meter that goes on from a predecessor's counts.
    pub fn from_record(record: &MeterRecord) -> Meter {
        Meter {
            bytes: record.userspace.map(AtomicU64::new),
            kernel_bytes: record.kernel_ended.map(AtomicU64::new),
            last_activity_ns: AtomicU64::new(record.last_activity_ns),
            kernel: Mutex::new(None),
        }
    }

    pub fn record(&self, direction: Direction, bytes: usize) {
        self.bytes[direction.index()].fetch_add(bytes as u64, Ordering::Relaxed);
        self.last_activity_ns
            .store(monotonic_ns(), Ordering::Relaxed);
    }

    /// The bytes userspace moved each way, indexed like `Direction`: no kernel lookup.
    pub fn userspace_bytes(&self) -> [u64; 2] {
        self.bytes
            .each_ref()
            .map(|bytes| bytes.load(Ordering::Relaxed))
    }

    /// Every byte moved, both ways, by either path.
    pub fn total_bytes(&self) -> u64 {
        Direction::BOTH.into_iter().map(|d| self.bytes(d)).sum()
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

    fn kernel(&self) -> MutexGuard<'_, Option<KernelFlows>> {
        // Each guarded operation is one assignment: a poisoned lock is still consistent.
        self.kernel.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl CountsKernelFlows for Meter {
    fn attach_kernel(&self, flows: KernelFlows) {
        *self.kernel() = Some(flows);
    }

    fn detach_kernel(&self) -> Option<[u64; 2]> {
        let flows = self.kernel().take()?;
        let mut folded = [0; 2];
        for direction in Direction::BOTH {
            let counters = flows.counters(direction);
            folded[direction.index()] = counters.redirected;
            self.kernel_bytes[direction.index()].fetch_add(counters.redirected, Ordering::Relaxed);
            self.last_activity_ns
                .fetch_max(counters.last_activity_ns, Ordering::Relaxed);
        }
        Some(folded)
    }
}
