//! Counters and the stats snapshot that `smartproxy stats` prints.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::datapath::clock::instant_of;
use crate::datapath::kernel::MapEntries;
use crate::health::TargetSnapshot;
use crate::histogram::{Histogram, HistogramSnapshot, CONNECT_BUCKETS, DURATION_BUCKETS};
use crate::limits::Refusal;
use crate::table::{ConnRecord, ConnTable, ParkState};
use crate::vocab::DataPathKind;
use crate::vocab::{Direction, Reason};

/// Counters of one route.
#[derive(Debug)]
struct RouteCounters {
    name: String,
    total: AtomicU64,
    /// Bytes of the route's connections that already closed; live ones are read from
    /// the table.
    closed_bytes: [AtomicU64; 2],
    /// The part of `closed_bytes` the kernel moved.
    closed_kernel_bytes: [AtomicU64; 2],
    closed: [AtomicU64; Reason::ALL.len()],
    duration: Histogram,
    connect: Histogram,
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
    map_full: AtomicU64,
    /// Moves of the adaptive path, by where to: `[kernel, relay]`.
    moves: [AtomicU64; 2],
    /// Every route any configuration named, by slot ([`Stats::route_slot`]). Append-only,
    /// so that a reload never resets a route's counters nor moves another's.
    routes: RwLock<Vec<RouteCounters>>,
    /// Closures of connections that ended before a route was chosen.
    unrouted_closed: [AtomicU64; Reason::ALL.len()],
    /// Refusals, by the limit that refused.
    refused: [AtomicU64; Refusal::ALL.len()],
}

/// Kernel data path counters, zero when it is not loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EbpfSnapshot {
    pub sockhash_entries: u64,
    pub events: u64,
    pub events_lost: u64,
    /// Connections the kernel could not take (they used the userspace copy instead).
    pub splice_failures: u64,
    /// The part of `splice_failures` that found the kernel maps full.
    pub map_full: u64,
    /// Moves of the adaptive path (`data_path = "auto"`) into the kernel (a splice, or
    /// pass mode back to redirect), and out of it (to pass mode).
    #[serde(default)]
    pub moves_to_kernel: u64,
    #[serde(default)]
    pub moves_to_relay: u64,
    /// How many connections the kernel maps hold (`proxy.ebpf_max_connections`).
    pub max_connections: u64,
    /// Entries counted in the kernel: only in the answer to a one-shot `stats` request
    /// (a count costs a syscall per entry), `null` otherwise.
    pub map_entries: Option<MapEntries>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionsSnapshot {
    pub active: u64,
    pub half_open: u64,
    pub total: u64,
    pub ebpf: u64,
    pub userspace: u64,
    /// `half_open`, by data path.
    pub half_open_ebpf: u64,
    pub half_open_userspace: u64,
    /// Idle connections parked without a task of their own (`park`).
    #[serde(default)]
    pub parked: u64,
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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteSnapshot {
    pub name: String,
    pub active: u64,
    pub total: u64,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
    /// The part of the above that the kernel data path moved.
    pub bytes_kernel_client_to_backend: u64,
    pub bytes_kernel_backend_to_client: u64,
    /// `active`, by data path; the rest are still connecting their backend.
    pub ebpf: u64,
    pub userspace: u64,
    pub half_open: u64,
    /// Every closure reason, zero included.
    pub closed: BTreeMap<String, u64>,
    pub connection_duration_seconds: HistogramSnapshot,
    pub backend_connect_seconds: HistogramSnapshot,
}

/// Connections that have no route (yet, or ever: `no_route`, `bad_handshake`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnroutedSnapshot {
    pub active: u64,
    /// Every closure reason, zero included.
    pub closed: BTreeMap<String, u64>,
}

/// The process, as Prometheus' standard `process_*` metrics have it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessSnapshot {
    pub open_fds: u64,
    /// The soft RLIMIT_NOFILE.
    pub max_fds: u64,
    /// Absent when `/proc` would not say (`process`): the rest of the snapshot stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resident_memory_bytes: Option<u64>,
    /// User and system CPU time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// Unix time the process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time_seconds: Option<f64>,
}

impl ProcessSnapshot {
    fn now() -> ProcessSnapshot {
        let figures = crate::process::figures();
        // Zero for a descriptor figure the kernel would not give: the rest stands.
        ProcessSnapshot {
            open_fds: crate::fdlimit::open_fds().unwrap_or(0),
            max_fds: crate::fdlimit::limit().map_or(0, |limit| limit.soft),
            resident_memory_bytes: figures.resident_memory_bytes,
            cpu_seconds: figures.cpu_seconds,
            start_time_seconds: figures.start_time_seconds,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleSnapshot {
    /// Inactivity timeouts counted and re-armed under `timeout_behavior = "reset"`.
    pub inactivity_resets: u64,
}

/// `smartproxy stats --json`: the contract's keys, nested.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub data_path: DataPathKind,
    pub uptime_secs: u64,
    pub connections: ConnectionsSnapshot,
    pub bytes: BytesSnapshot,
    /// Every closure reason, zero included.
    pub closed: BTreeMap<String, u64>,
    /// Refused connections by the limit that refused them ([`Refusal`]), zero included.
    /// Each is also in `closed`, as `max_connections` or `denied`.
    pub refused: BTreeMap<String, u64>,
    pub ebpf: EbpfSnapshot,
    pub routes: Vec<RouteSnapshot>,
    pub unrouted: UnroutedSnapshot,
    pub lifecycle: LifecycleSnapshot,
    pub process: ProcessSnapshot,
    /// Every target of the running configuration: health and connect counters.
    #[serde(default)]
    pub targets: Vec<TargetSnapshot>,
}

impl Snapshot {
    pub fn closed(&self, reason: Reason) -> u64 {
        self.closed.get(reason.as_str()).copied().unwrap_or(0)
    }

    pub fn refused(&self, refusal: Refusal) -> u64 {
        self.refused.get(refusal.as_str()).copied().unwrap_or(0)
    }
}

/// One row of `smartproxy connections`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConnectionRow {
    pub id: u64,
    pub route: Option<String>,
    pub client: String,
    pub backend: Option<String>,
    /// The target as configured (`backend` is the address it resolved to).
    #[serde(default)]
    pub target: Option<String>,
    pub data_path: Option<DataPathKind>,
    pub age_secs: f64,
    pub idle_secs: f64,
    pub half_open: bool,
    pub bytes_client_to_backend: u64,
    pub bytes_backend_to_client: u64,
}

/// Live figures of a set of connections, counted from the table.
#[derive(Clone, Copy, Debug, Default)]
struct LiveCounts {
    active: u64,
    ebpf: u64,
    userspace: u64,
    half_open: u64,
    half_open_ebpf: u64,
    half_open_userspace: u64,
    parked: u64,
    bytes: [u64; 2],
    /// The part of `bytes` the kernel moved.
    kernel_bytes: [u64; 2],
}

impl LiveCounts {
    /// `live`: the record's bytes by direction, each `[userspace, kernel]`.
    fn add(&mut self, record: &ConnRecord, live: [[u64; 2]; 2]) {
        let half_open = u64::from(record.half_open.load(Ordering::Relaxed));
        self.active += 1;
        self.half_open += half_open;
        self.parked += u64::from(record.park_state() == ParkState::Parked);
        match record.data_path() {
            Some(DataPathKind::Ebpf) => {
                self.ebpf += 1;
                self.half_open_ebpf += half_open;
            }
            Some(DataPathKind::Userspace) => {
                self.userspace += 1;
                self.half_open_userspace += half_open;
            }
            None => {}
        }
        for (direction, [userspace, kernel]) in live.into_iter().enumerate() {
            self.bytes[direction] += userspace + kernel;
            self.kernel_bytes[direction] += kernel;
        }
    }
}

/// A proxy's counters as its successor carries them on (`upgrade`): closures, refusals and
/// the bytes of connections that ended. Keyed by name, so that a successor with more
/// reasons or routes adds what it knows; live connections move with their own meters.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    total: u64,
    closed: BTreeMap<Reason, u64>,
    closed_bytes: [u64; 2],
    closed_kernel_bytes: [u64; 2],
    inactivity_resets: u64,
    splice_failures: u64,
    map_full: u64,
    /// `[kernel, relay]`; absent from a predecessor without the adaptive path.
    #[serde(default)]
    moves: [u64; 2],
    unrouted_closed: BTreeMap<Reason, u64>,
    refused: BTreeMap<String, u64>,
    routes: Vec<RouteTotals>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct RouteTotals {
    name: String,
    total: u64,
    closed: BTreeMap<Reason, u64>,
    closed_bytes: [u64; 2],
    closed_kernel_bytes: [u64; 2],
    duration: (Vec<u64>, u64),
    connect: (Vec<u64>, u64),
}

fn by_reason(counters: &[AtomicU64; Reason::ALL.len()]) -> BTreeMap<Reason, u64> {
    Reason::ALL
        .iter()
        .map(|reason| (*reason, counters[reason.index()].load(Ordering::Relaxed)))
        .collect()
}

fn add_by_reason(counters: &[AtomicU64; Reason::ALL.len()], more: &BTreeMap<Reason, u64>) {
    for (reason, count) in more {
        counters[reason.index()].fetch_add(*count, Ordering::Relaxed);
    }
}

fn add_pair(counters: &[AtomicU64; 2], more: [u64; 2]) {
    for (counter, more) in counters.iter().zip(more) {
        counter.fetch_add(more, Ordering::Relaxed);
    }
}

impl Stats {
    /// The counters a successor carries on ([`Totals`]).
    pub fn totals(&self) -> Totals {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Totals {
            total: load(&self.total),
            closed: by_reason(&self.closed),
            closed_bytes: self.closed_bytes.each_ref().map(load),
            closed_kernel_bytes: self.closed_kernel_bytes.each_ref().map(load),
            inactivity_resets: load(&self.inactivity_resets),
            splice_failures: load(&self.splice_failures),
            map_full: load(&self.map_full),
            moves: self.moves.each_ref().map(load),
            unrouted_closed: by_reason(&self.unrouted_closed),
            refused: Refusal::ALL
                .iter()
                .map(|r| (r.as_str().to_owned(), load(&self.refused[r.index()])))
                .collect(),
            routes: self
                .routes()
                .iter()
                .map(|route| RouteTotals {
                    name: route.name.clone(),
                    total: load(&route.total),
                    closed: by_reason(&route.closed),
                    closed_bytes: route.closed_bytes.each_ref().map(load),
                    closed_kernel_bytes: route.closed_kernel_bytes.each_ref().map(load),
                    duration: route.duration.raw(),
                    connect: route.connect.raw(),
                })
                .collect(),
        }
    }

    /// Adds a predecessor's counters to these.
    pub fn add_totals(&self, totals: &Totals) {
        let add = |counter: &AtomicU64, more: u64| {
            counter.fetch_add(more, Ordering::Relaxed);
        };
        add(&self.total, totals.total);
        add_by_reason(&self.closed, &totals.closed);
        add_pair(&self.closed_bytes, totals.closed_bytes);
        add_pair(&self.closed_kernel_bytes, totals.closed_kernel_bytes);
        add(&self.inactivity_resets, totals.inactivity_resets);
        add(&self.splice_failures, totals.splice_failures);
        add(&self.map_full, totals.map_full);
        add_pair(&self.moves, totals.moves);
        add_by_reason(&self.unrouted_closed, &totals.unrouted_closed);
        for refusal in Refusal::ALL {
            if let Some(more) = totals.refused.get(refusal.as_str()) {
                add(&self.refused[refusal.index()], *more);
            }
        }
        for route in &totals.routes {
            let slot = self.route_slot(&route.name);
            let routes = self.routes();
            let own = &routes[slot];
            add(&own.total, route.total);
            add_by_reason(&own.closed, &route.closed);
            add_pair(&own.closed_bytes, route.closed_bytes);
            add_pair(&own.closed_kernel_bytes, route.closed_kernel_bytes);
            own.duration.add(&route.duration.0, route.duration.1);
            own.connect.add(&route.connect.0, route.connect.1);
        }
    }

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
            map_full: AtomicU64::new(0),
            moves: std::array::from_fn(|_| AtomicU64::new(0)),
            routes: RwLock::default(),
            unrouted_closed: std::array::from_fn(|_| AtomicU64::new(0)),
            refused: std::array::from_fn(|_| AtomicU64::new(0)),
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
            closed_kernel_bytes: std::array::from_fn(|_| AtomicU64::new(0)),
            closed: std::array::from_fn(|_| AtomicU64::new(0)),
            duration: Histogram::new(DURATION_BUCKETS),
            connect: Histogram::new(CONNECT_BUCKETS),
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

    /// A backend of `route` accepted the connection `elapsed` after the attempt began.
    pub fn backend_connected(&self, route: usize, elapsed: Duration) {
        self.routes()[route].connect.observe(elapsed);
    }

    pub fn splice_failed(&self) {
        self.splice_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn splice_failures(&self) -> u64 {
        self.splice_failures.load(Ordering::Relaxed)
    }

    /// A splice failed because the kernel maps were full (counted in `splice_failed` too).
    pub fn map_full(&self) {
        self.map_full.fetch_add(1, Ordering::Relaxed);
    }

    pub fn map_full_failures(&self) -> u64 {
        self.map_full.load(Ordering::Relaxed)
    }

    /// The adaptive path moved a connection to `path`.
    pub fn moved_to(&self, path: DataPathKind) {
        self.moves[Self::move_index(path)].fetch_add(1, Ordering::Relaxed);
    }

    /// The adaptive path's moves to `path` so far.
    pub fn moves_to(&self, path: DataPathKind) -> u64 {
        self.moves[Self::move_index(path)].load(Ordering::Relaxed)
    }

    fn move_index(path: DataPathKind) -> usize {
        match path {
            DataPathKind::Ebpf => 0,
            DataPathKind::Userspace => 1,
        }
    }

    pub fn inactivity_reset(&self) {
        self.inactivity_resets.fetch_add(1, Ordering::Relaxed);
    }

    /// Books a connection that `refusal`'s limit refused; returns its closure reason.
    pub fn refused(&self, refusal: Refusal) -> Reason {
        self.refused[refusal.index()].fetch_add(1, Ordering::Relaxed);
        refusal.reason()
    }

    /// Books a connection that ended: its reason, its bytes and its duration.
    pub fn closed(&self, record: &ConnRecord, reason: Reason) {
        self.closed[reason.index()].fetch_add(1, Ordering::Relaxed);
        let routes = self.routes();
        match record.route.get() {
            Some(route) => {
                let route = &routes[*route];
                route.closed[reason.index()].fetch_add(1, Ordering::Relaxed);
                route.duration.observe(record.started.elapsed());
            }
            None => {
                self.unrouted_closed[reason.index()].fetch_add(1, Ordering::Relaxed);
            }
        }
        for direction in Direction::BOTH {
            let [userspace, kernel] = record.meter.bytes_by_path(direction);
            let i = direction.index();
            self.closed_bytes[i].fetch_add(userspace + kernel, Ordering::Relaxed);
            self.closed_kernel_bytes[i].fetch_add(kernel, Ordering::Relaxed);
            if let Some(route) = record.route.get() {
                let route = &routes[*route];
                route.closed_bytes[i].fetch_add(userspace + kernel, Ordering::Relaxed);
                route.closed_kernel_bytes[i].fetch_add(kernel, Ordering::Relaxed);
            }
        }
    }

    pub fn snapshot(
        &self,
        table: &ConnTable,
        ebpf: EbpfSnapshot,
        targets: Vec<TargetSnapshot>,
    ) -> Snapshot {
        let records = table.records();
        let routes = self.routes();
        let mut route_live = vec![LiveCounts::default(); routes.len()];
        let mut all = LiveCounts::default();
        let mut unrouted_active = 0;
        for record in &records {
            let live = Direction::BOTH.map(|d| record.meter.bytes_by_path(d));
            all.add(record, live);
            match record.route.get() {
                Some(route) => route_live[*route].add(record, live),
                None => unrouted_active += 1,
            }
        }
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let by_reason = |counters: &[AtomicU64; Reason::ALL.len()]| -> BTreeMap<String, u64> {
            Reason::ALL
                .iter()
                .map(|reason| (reason.as_str().to_owned(), load(&counters[reason.index()])))
                .collect()
        };
        Snapshot {
            data_path: self.data_path,
            uptime_secs: self.started.elapsed().as_secs(),
            connections: ConnectionsSnapshot {
                active: records.len() as u64,
                half_open: all.half_open,
                total: load(&self.total),
                ebpf: all.ebpf,
                userspace: all.userspace,
                half_open_ebpf: all.half_open_ebpf,
                half_open_userspace: all.half_open_userspace,
                parked: all.parked,
            },
            bytes: BytesSnapshot {
                client_to_backend: load(&self.closed_bytes[0]) + all.bytes[0],
                backend_to_client: load(&self.closed_bytes[1]) + all.bytes[1],
                kernel_client_to_backend: load(&self.closed_kernel_bytes[0]) + all.kernel_bytes[0],
                kernel_backend_to_client: load(&self.closed_kernel_bytes[1]) + all.kernel_bytes[1],
            },
            closed: by_reason(&self.closed),
            refused: Refusal::ALL
                .iter()
                .map(|r| (r.as_str().to_owned(), load(&self.refused[r.index()])))
                .collect(),
            ebpf,
            routes: routes
                .iter()
                .zip(route_live)
                .map(|(route, live)| RouteSnapshot {
                    name: route.name.clone(),
                    active: live.active,
                    total: load(&route.total),
                    bytes_client_to_backend: load(&route.closed_bytes[0]) + live.bytes[0],
                    bytes_backend_to_client: load(&route.closed_bytes[1]) + live.bytes[1],
                    bytes_kernel_client_to_backend: load(&route.closed_kernel_bytes[0])
                        + live.kernel_bytes[0],
                    bytes_kernel_backend_to_client: load(&route.closed_kernel_bytes[1])
                        + live.kernel_bytes[1],
                    ebpf: live.ebpf,
                    userspace: live.userspace,
                    half_open: live.half_open,
                    closed: by_reason(&route.closed),
                    connection_duration_seconds: route.duration.snapshot(),
                    backend_connect_seconds: route.connect.snapshot(),
                })
                .collect(),
            unrouted: UnroutedSnapshot {
                active: unrouted_active,
                closed: by_reason(&self.unrouted_closed),
            },
            lifecycle: LifecycleSnapshot {
                inactivity_resets: load(&self.inactivity_resets),
            },
            process: ProcessSnapshot::now(),
            targets,
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
                client: record.client().to_string(),
                backend: record.backend.get().map(|b| b.to_string()),
                target: record.target.get().map(|t| t.target.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A successor that adds its predecessor's totals reports what the predecessor did,
    /// through JSON, route by name.
    #[test]
    fn totals_carry_over_to_a_successor() {
        let old = Stats::new(DataPathKind::Userspace);
        let web = old.route_slot("web");
        old.accepted();
        old.routed(web);
        old.backend_connected(web, Duration::from_millis(3));
        old.refused(Refusal::ALL[0]);
        old.inactivity_reset();
        let table = ConnTable::default();
        let record = table.insert("127.0.0.1:1".parse().unwrap());
        record.route.set(web).unwrap();
        record.meter.record(Direction::ClientToBackend, 10);
        old.closed(&record, Reason::ClientReset);
        let json = serde_json::to_string(&old.totals()).unwrap();

        let new = Stats::new(DataPathKind::Userspace);
        new.route_slot("other");
        new.add_totals(&serde_json::from_str(&json).unwrap());
        let empty = ConnTable::default();
        let (before, after) = (
            old.snapshot(&empty, EbpfSnapshot::default(), Vec::new()),
            new.snapshot(&empty, EbpfSnapshot::default(), Vec::new()),
        );
        assert_eq!(after.connections.total, 1);
        assert_eq!(after.closed, before.closed);
        assert_eq!(after.refused, before.refused);
        assert_eq!(after.bytes, before.bytes);
        assert_eq!(after.lifecycle.inactivity_resets, 1);
        let route = |s: &Snapshot| s.routes.iter().find(|r| r.name == "web").cloned();
        assert_eq!(route(&after), route(&before));
    }
}
