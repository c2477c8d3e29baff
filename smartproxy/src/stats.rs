//! Counters and the stats snapshot that `smartproxy stats` prints.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::datapath::{instant_of, DataPathKind};
use crate::lifecycle::{Direction, Reason};
use crate::table::{ConnRecord, ConnTable};

/// Counters of one route.
#[derive(Debug)]
struct RouteCounters {
    name: String,
    total: AtomicU64,
    /// Bytes of the route's connections that already closed; live ones are read from
    /// the table.
    closed_bytes: [AtomicU64; 2],
}

/// The proxy's counters. Live figures (active, half-open, live bytes) are read from the
/// connection table when a snapshot is taken, so they can never drift.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    data_path: DataPathKind,
    total: AtomicU64,
    closed: [AtomicU64; Reason::ALL.len()],
    closed_bytes: [AtomicU64; 2],
    closed_kernel_bytes: [AtomicU64; 2],
    inactivity_resets: AtomicU64,
    splice_failures: AtomicU64,
    /// Every route any configuration named, by slot ([`Stats::route_slot`]). Append-only,
    /// so that a reload never resets a route's counters nor moves another's.
    routes: RwLock<Vec<RouteCounters>>,
}

/// Kernel data path counters, zero when it is not loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbpfSnapshot {
    pub sockhash_entries: u64,
    pub events: u64,
    pub events_lost: u64,
    /// Connections the kernel could not take (they used the userspace copy instead).
    pub splice_failures: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionsSnapshot {
    pub active: u64,
    pub half_open: u64,
    pub total: u64,
    pub ebpf: u64,
    pub userspace: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BytesSnapshot {
    pub client_to_backend: u64,
    pub backend_to_client: u64,
    /// The part of the above that the kernel data path moved (the rest was copied in
    /// userspace).
    pub kernel_client_to_backend: u64,
    pub kernel_backend_to_client: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSnapshot {
    pub name: String,
    pub active: u64,
    pub total: u64,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleSnapshot {
    /// Inactivity timeouts counted and re-armed under `timeout_behavior = "reset"`.
    pub inactivity_resets: u64,
}

/// `smartproxy stats --json`: the contract's keys, nested.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub data_path: DataPathKind,
    pub uptime_secs: u64,
    pub connections: ConnectionsSnapshot,
    pub bytes: BytesSnapshot,
    /// Every closure reason, zero included.
    pub closed: BTreeMap<String, u64>,
    pub ebpf: EbpfSnapshot,
    pub routes: Vec<RouteSnapshot>,
    pub lifecycle: LifecycleSnapshot,
}

impl Snapshot {
    pub fn closed(&self, reason: Reason) -> u64 {
        self.closed.get(reason.as_str()).copied().unwrap_or(0)
    }
}

/// One row of `smartproxy connections`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionRow {
    pub id: u64,
    pub route: Option<String>,
    pub client: String,
    pub backend: Option<String>,
    pub data_path: Option<DataPathKind>,
    pub age_secs: f64,
    pub idle_secs: f64,
    pub half_open: bool,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
}

impl Stats {
    pub fn new(data_path: DataPathKind) -> Stats {
        Stats {
            started: Instant::now(),
            data_path,
            total: AtomicU64::new(0),
            closed: std::array::from_fn(|_| AtomicU64::new(0)),
            closed_bytes: std::array::from_fn(|_| AtomicU64::new(0)),
            closed_kernel_bytes: std::array::from_fn(|_| AtomicU64::new(0)),
            inactivity_resets: AtomicU64::new(0),
            splice_failures: AtomicU64::new(0),
            routes: RwLock::default(),
        }
    }

    /// The counters slot of the route called `name`, created on first use. A route keeps
    /// its slot (and its counts) across reloads for as long as the proxy runs.
    pub fn route_slot(&self, name: &str) -> usize {
        if let Some(slot) = self.routes().iter().position(|r| r.name == name) {
            return slot;
        }
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        // Another reload may have added it between the two locks.
        if let Some(slot) = routes.iter().position(|r| r.name == name) {
            return slot;
        }
        routes.push(RouteCounters {
            name: name.to_owned(),
            total: AtomicU64::new(0),
            closed_bytes: std::array::from_fn(|_| AtomicU64::new(0)),
        });
        routes.len() - 1
    }

    /// The name of the route in `slot`.
    pub fn route_name(&self, slot: usize) -> Option<String> {
        self.routes().get(slot).map(|r| r.name.clone())
    }

    fn routes(&self) -> RwLockReadGuard<'_, Vec<RouteCounters>> {
        // Counters are atomics and the list only grows: a poisoned lock is still sound.
        self.routes.read().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn accepted(&self) {
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn routed(&self, route: usize) {
        self.routes()[route].total.fetch_add(1, Ordering::Relaxed);
    }

    pub fn splice_failed(&self) {
        self.splice_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn splice_failures(&self) -> u64 {
        self.splice_failures.load(Ordering::Relaxed)
    }

    pub fn inactivity_reset(&self) {
        self.inactivity_resets.fetch_add(1, Ordering::Relaxed);
    }

    /// Books a connection that ended: its reason and its bytes.
    pub fn closed(&self, record: &ConnRecord, reason: Reason) {
        self.closed[reason.index()].fetch_add(1, Ordering::Relaxed);
        let routes = self.routes();
        for direction in Direction::BOTH {
            let bytes = record.meter.bytes(direction);
            self.closed_bytes[direction.index()].fetch_add(bytes, Ordering::Relaxed);
            self.closed_kernel_bytes[direction.index()]
                .fetch_add(record.meter.kernel_bytes(direction), Ordering::Relaxed);
            if let Some(route) = record.route.get() {
                routes[*route].closed_bytes[direction.index()].fetch_add(bytes, Ordering::Relaxed);
            }
        }
    }

    pub fn snapshot(&self, table: &ConnTable, ebpf: EbpfSnapshot) -> Snapshot {
        let records = table.records();
        let routes = self.routes();
        let mut bytes = [0u64; 2];
        let mut kernel_bytes = [0u64; 2];
        let mut route_live = vec![(0u64, [0u64; 2]); routes.len()];
        let (mut half_open, mut on_ebpf, mut on_userspace) = (0, 0, 0);
        for record in &records {
            let live = Direction::BOTH.map(|d| record.meter.bytes(d));
            bytes[0] += live[0];
            bytes[1] += live[1];
            for direction in Direction::BOTH {
                kernel_bytes[direction.index()] += record.meter.kernel_bytes(direction);
            }
            if let Some(route) = record.route.get() {
                route_live[*route].0 += 1;
                route_live[*route].1[0] += live[0];
                route_live[*route].1[1] += live[1];
            }
            half_open += u64::from(record.half_open.load(Ordering::Relaxed));
            match record.data_path() {
                Some(DataPathKind::Ebpf) => on_ebpf += 1,
                Some(DataPathKind::Userspace) => on_userspace += 1,
                None => {}
            }
        }
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Snapshot {
            data_path: self.data_path,
            uptime_secs: self.started.elapsed().as_secs(),
            connections: ConnectionsSnapshot {
                active: records.len() as u64,
                half_open,
                total: load(&self.total),
                ebpf: on_ebpf,
                userspace: on_userspace,
            },
            bytes: BytesSnapshot {
                client_to_backend: load(&self.closed_bytes[0]) + bytes[0],
                backend_to_client: load(&self.closed_bytes[1]) + bytes[1],
                kernel_client_to_backend: load(&self.closed_kernel_bytes[0]) + kernel_bytes[0],
                kernel_backend_to_client: load(&self.closed_kernel_bytes[1]) + kernel_bytes[1],
            },
            closed: Reason::ALL
                .iter()
                .map(|reason| {
                    (
                        reason.as_str().to_owned(),
                        load(&self.closed[reason.index()]),
                    )
                })
                .collect(),
            ebpf,
            routes: routes
                .iter()
                .zip(route_live)
                .map(|(route, (active, live))| RouteSnapshot {
                    name: route.name.clone(),
                    active,
                    total: load(&route.total),
                    bytes_client_to_backend: load(&route.closed_bytes[0]) + live[0],
                    bytes_backend_to_client: load(&route.closed_bytes[1]) + live[1],
                })
                .collect(),
            lifecycle: LifecycleSnapshot {
                inactivity_resets: load(&self.inactivity_resets),
            },
        }
    }

    pub fn connection_rows(&self, table: &ConnTable) -> Vec<ConnectionRow> {
        let now = Instant::now();
        let routes = self.routes();
        let mut rows: Vec<ConnectionRow> = table
            .records()
            .iter()
            .map(|record| ConnectionRow {
                id: record.id,
                route: record.route.get().map(|r| routes[*r].name.clone()),
                client: record.client.to_string(),
                backend: record.backend.get().map(|b| b.to_string()),
                data_path: record.data_path(),
                age_secs: now.duration_since(record.started).as_secs_f64(),
                idle_secs: now
                    .saturating_duration_since(instant_of(record.meter.last_activity_ns()))
                    .as_secs_f64(),
                half_open: record.half_open.load(Ordering::Relaxed),
                bytes_client_to_backend: record.meter.bytes(Direction::ClientToBackend),
                bytes_backend_to_client: record.meter.bytes(Direction::BackendToClient),
            })
            .collect();
        rows.sort_by_key(|row| row.id);
        rows
    }
}
