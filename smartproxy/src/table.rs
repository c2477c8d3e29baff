//! The connection table: one record per live connection, from accept to close.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime};

use std::time::Duration;

use crate::datapath::clock::instant_of;
use crate::datapath::Meter;
use crate::upgrade::message::ConnectionRecord;

use crate::health::TargetHealth;
use crate::nudge::Nudge;
use crate::vocab::DataPathKind;

/// What the proxy knows of one live connection.
#[derive(Debug)]
pub struct ConnRecord {
    pub id: u64,
    /// The TCP peer: the client, or the load balancer that sent a PROXY header.
    pub peer: SocketAddr,
    /// Known once a PROXY header naming the client was read (`accept_proxy_protocol`).
    /// Boxed: most connections have none, and every record is kept while they live
    /// (inline, it would take a quarter of the record).
    pub carried: OnceLock<Box<Carried>>,
    pub started: Instant,
    pub started_at: SystemTime,
    /// Known once routed: the route's counters slot ([`crate::stats::Stats::route_slot`]),
    /// which outlives the configuration the connection was routed by.
    pub route: OnceLock<usize>,
    /// Known once connected.
    pub backend: OnceLock<SocketAddr>,
    /// Known once connected: the target as configured, with its health.
    pub target: OnceLock<Arc<TargetHealth>>,
    /// Known once the bytes move: 0 none yet, 1 userspace, 2 ebpf. Set before the
    /// kernel starts moving bytes, and changed back if the splice fails.
    data_path: AtomicU8,
    pub meter: Arc<Meter>,
    pub half_open: AtomicBool,
    /// Relayed over TLS this proxy holds the keys of: an upgrade cannot move it.
    pub stays: AtomicBool,
    /// Raised for the connection to look at the stop stage and the upgrade again.
    pub nudge: Nudge,
    /// A [`ParkState`]: whether the connection is parked without a task (`park`).
    park_state: AtomicU8,
    /// How many times its park delay doubled (`park::park_delay`).
    park_doublings: AtomicU8,
}

/// Whether a connection is parked without a task (`park`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParkState {
    /// In a task of its own.
    Awake,
    /// In a task of its own, asked to park by the sweep (which then nudges it): only
    /// such a nudge parks a connection, so that one just taken up reads what woke it first.
    Asked,
    Parked,
    /// In a task of its own until it closes (TLS this proxy holds, a splice whose events
    /// stopped, or a connection whose handoff failed).
    Never,
}

/// The addresses a load balancer's PROXY header carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Carried {
    pub client: SocketAddr,
    /// The address the client connected to (the load balancer's).
    pub destination: SocketAddr,
}

impl ConnRecord {
    /// The client, for logs, stats, limits and the PROXY header sent to the backend: the
    /// address a PROXY header carried, else the TCP peer.
    pub fn client(&self) -> SocketAddr {
        self.carried
            .get()
            .map_or(self.peer, |carried| carried.client)
    }

    pub fn set_data_path(&self, kind: DataPathKind) {
        let code = match kind {
            DataPathKind::Userspace => 1,
            DataPathKind::Ebpf => 2,
        };
        self.data_path.store(code, Ordering::Relaxed);
    }

    pub fn set_park_state(&self, state: ParkState) {
        self.park_state.store(state as u8, Ordering::Relaxed);
    }

    pub fn park_state(&self) -> ParkState {
        match self.park_state.load(Ordering::Relaxed) {
            1 => ParkState::Asked,
            2 => ParkState::Parked,
            3 => ParkState::Never,
            _ => ParkState::Awake,
        }
    }

    /// Moves the park state from `from` to `to`; false if it was not `from`.
    pub fn switch_park_state(&self, from: ParkState, to: ParkState) -> bool {
        self.park_state
            .compare_exchange(from as u8, to as u8, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    pub fn park_doublings(&self) -> u8 {
        self.park_doublings.load(Ordering::Relaxed)
    }

    pub fn set_park_doublings(&self, doublings: u8) {
        self.park_doublings.store(doublings, Ordering::Relaxed);
    }

    pub fn data_path(&self) -> Option<DataPathKind> {
        match self.data_path.load(Ordering::Relaxed) {
            1 => Some(DataPathKind::Userspace),
            2 => Some(DataPathKind::Ebpf),
            _ => None,
        }
    }
}

/// The live connections, by id.
#[derive(Debug, Default)]
pub struct ConnTable {
    records: Mutex<HashMap<u64, Arc<ConnRecord>>>,
    next_id: AtomicU64,
}

impl ConnTable {
    /// Records a newly accepted connection and returns its record.
    pub fn insert(&self, peer: SocketAddr) -> Arc<ConnRecord> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let record = Arc::new(ConnRecord {
            id,
            peer,
            carried: OnceLock::new(),
            started: Instant::now(),
            started_at: SystemTime::now(),
            route: OnceLock::new(),
            backend: OnceLock::new(),
            target: OnceLock::new(),
            data_path: AtomicU8::new(0),
            meter: Arc::default(),
            half_open: AtomicBool::new(false),
            stays: AtomicBool::new(false),
            nudge: Nudge::default(),
            park_state: AtomicU8::new(ParkState::Awake as u8),
            park_doublings: AtomicU8::new(0),
        });
        self.lock().insert(id, Arc::clone(&record));
        record
    }

    /// Records a connection a predecessor process handed over, under its own id.
    pub fn insert_moved(
        &self,
        moved: &ConnectionRecord,
        route: usize,
        target: Option<Arc<TargetHealth>>,
        meter: Arc<Meter>,
    ) -> Arc<ConnRecord> {
        let carried = OnceLock::new();
        if let Some((client, destination)) = moved.carried {
            let _ = carried.set(Box::new(Carried {
                client,
                destination,
            }));
        }
        let record = Arc::new(ConnRecord {
            id: moved.id,
            peer: moved.peer,
            carried,
            started: instant_of(moved.started_ns),
            started_at: SystemTime::UNIX_EPOCH + Duration::from_millis(moved.started_unix_ms),
            route: OnceLock::from(route),
            backend: OnceLock::from(moved.backend),
            target: target.map_or_else(OnceLock::new, OnceLock::from),
            data_path: AtomicU8::new(0),
            meter,
            half_open: AtomicBool::new(moved.lifecycle_half_open()),
            stays: AtomicBool::new(false),
            nudge: Nudge::default(),
            park_state: AtomicU8::new(ParkState::Awake as u8),
            park_doublings: AtomicU8::new(moved.park_doublings),
        });
        record.set_data_path(moved.data_path);
        self.continue_ids(moved.id);
        self.lock().insert(moved.id, Arc::clone(&record));
        record
    }

    /// The next id handed out (ids of connections an upgrade moves are kept).
    pub fn next_id(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed) + 1
    }

    /// Hands out ids after `id` from now on (after a predecessor's).
    pub fn continue_ids(&self, id: u64) {
        self.next_id.fetch_max(id, Ordering::Relaxed);
    }

    /// `(movable, staying)`: live connections an upgrade has yet to move (set-ups
    /// included), and those that stay in this process.
    pub fn remaining_for_handoff(&self) -> (u64, u64) {
        let records = self.lock();
        let staying = records
            .values()
            .filter(|r| r.stays.load(Ordering::Relaxed))
            .count() as u64;
        (records.len() as u64 - staying, staying)
    }

    pub fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Nudges every live connection: the stop stage or the upgrade changed. A connection
    /// recorded after this looks at them when it starts to wait.
    pub fn nudge_all(&self) {
        for record in self.lock().values() {
            record.nudge.raise();
        }
    }

    /// Drops from `records` those no longer in the table (closed, or moved to a successor).
    pub fn keep_present(&self, records: &mut Vec<Arc<ConnRecord>>) {
        let table = self.lock();
        records.retain(|record| table.contains_key(&record.id));
    }

    /// A copy of the live records, taken without holding the lock while the caller reads.
    pub fn records(&self) -> Vec<Arc<ConnRecord>> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnRecord>>> {
        // A panic while holding this lock cannot leave the map half-updated (every
        // operation is a single insert or remove), so a poisoned lock is still sound.
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection keeps its record while it lives, parked or not: with the `Arc`'s
    /// two counters it stays within jemalloc's 224-byte size class
    /// (docs/performance.md#idle-connections).
    #[test]
    fn a_record_fits_in_224_bytes() {
        let size = std::mem::size_of::<ConnRecord>() + 2 * std::mem::size_of::<usize>();
        assert!(size <= 224, "a record takes {size} bytes with its counters");
    }
}
