//! The state every task of a running proxy holds: the configuration in force, the
//! listeners, the connection table and counters, the kernel data path, and how far the
//! proxy is in stopping.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::datapath::kernel::{Kernel, MapEntries, SpliceError};
use crate::error_chain;
use crate::generation::Generation;
use crate::health::{Registry, TargetHealth, TargetSnapshot};
use crate::limits::Limits;
use crate::listener::{Accepting, Listeners};
use crate::park::Parking;
use crate::resolve::Resolve;
use crate::stats::{ConnectionRow, EbpfSnapshot, Snapshot, Stats};
use crate::table::ConnTable;
use crate::throttle::Throttle;
use crate::upgrade::{HandoffSockets, Outgoing, Phase, SuccessorCommand};
use crate::vocab::{DataPathKind, Reason};
use crate::workers::Runtimes;

/// At most one warning that the kernel maps are full per this interval.
pub(crate) const MAP_FULL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// A connection that ended, for whoever listens (tests, logs).
#[derive(Clone, Debug)]
pub struct Closed {
    pub id: u64,
    pub route: Option<String>,
    pub reason: Reason,
}

/// How far the proxy is in stopping; each stage comes after the ones listed before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stop {
    Running,
    /// No new connections; the open ones finish on their own or at `grace_period`.
    Drain,
    /// The open connections end now (a second SIGTERM/SIGINT).
    Cut,
    /// No connection is left: the control socket and the metrics endpoint, which
    /// answer until then so that the drain can be watched, stop too.
    Exit,
}

/// Resolves once the proxy reached `stage` (or is gone). Every accept loop waits on this:
/// the listeners for [`Stop::Drain`], the control socket and metrics for [`Stop::Exit`].
pub(crate) async fn reached(stop: &mut watch::Receiver<Stop>, stage: Stop) {
    let _ = stop.wait_for(|now| *now >= stage).await;
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The configuration new connections are accepted under; swapped by a reload.
    pub(crate) generation: watch::Sender<Arc<Generation>>,
    /// Every open listener, by configured address: its bound address (they differ for
    /// port 0) and the runtimes accepting on it. Changed only under this lock, by a reload
    /// or by an accept loop that stops, so that a reload never binds an address a listener
    /// still holds, and accepts again where a loop let go of one it keeps.
    pub(crate) listeners: Mutex<Listeners>,
    /// The proxy's accept loops that are accepting (an upgrade waits for none).
    pub(crate) accepting: Accepting,
    /// One reload at a time.
    pub(crate) reloading: tokio::sync::Mutex<()>,
    pub(crate) control_socket: PathBuf,
    pub(crate) table: ConnTable,
    pub(crate) stats: Stats,
    /// Every target's health, kept across reloads.
    pub(crate) health: Registry,
    /// The soft RLIMIT_NOFILE at start (raised by then): what an unset `max_connections`
    /// is derived from (`fdlimit`).
    pub(crate) fd_limit: u64,
    pub(crate) limits: Limits,
    pub(crate) resolver: Arc<dyn Resolve>,
    /// The loaded kernel data path, if any route may use it and it loaded.
    pub(crate) kernel: Option<Kernel>,
    /// Of the warning that the kernel maps are full.
    pub(crate) map_full_warnings: Throttle,
    pub(crate) closed: broadcast::Sender<Closed>,
    pub(crate) stop: watch::Receiver<Stop>,
    /// The accept loops and the connections.
    pub(crate) tasks: TaskTracker,
    /// Where connections run.
    pub(crate) runtimes: Runtimes,
    /// Idle connections without a task; `None` if its epoll instance could not be made.
    pub(crate) parking: Option<Parking>,
    /// The control socket and the metrics endpoint: they outlive `tasks`.
    pub(crate) services: TaskTracker,
    /// Where an upgrade is.
    pub(crate) upgrade: watch::Sender<Phase>,
    /// While an upgrade takes connections over: where they go.
    pub(crate) handoff: Mutex<Option<mpsc::UnboundedSender<Outgoing>>>,
    /// What a successor inherits.
    pub(crate) handoff_sockets: Mutex<HandoffSockets>,
    /// How a successor is started.
    pub(crate) successor: SuccessorCommand,
}

impl Shared {
    /// Starts (or resumes) reading the kernel's events, after an upgrade's takeover or a
    /// failed handoff, and has the parking lot watch the splices parked meanwhile as they
    /// now ask: no longer for reads while the verdict redirects. Logged if it fails: the
    /// splices then keep watching their sockets for reads.
    pub(crate) fn read_kernel_events(&self) {
        let Some(kernel) = &self.kernel else { return };
        if let Err(e) = kernel.start_events() {
            warn!(error = %error_chain(&e), "cannot read the kernel's state changes");
            return;
        }
        if let Some(parking) = &self.parking {
            parking.watch_splices_again();
        }
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        let ebpf = self
            .kernel
            .as_ref()
            .map_or_else(EbpfSnapshot::default, |kernel| {
                let max_connections = u64::from(kernel.max_connections());
                let kernel = kernel.stats();
                EbpfSnapshot {
                    sockhash_entries: kernel.sockhash_entries,
                    events: kernel.events,
                    events_lost: kernel.events_lost,
                    splice_failures: self.stats.splice_failures(),
                    map_full: self.stats.map_full_failures(),
                    moves_to_kernel: self.stats.moves_to(DataPathKind::Ebpf),
                    moves_to_relay: self.stats.moves_to(DataPathKind::Userspace),
                    max_connections,
                    map_entries: None,
                }
            });
        self.stats
            .snapshot(&self.table, ebpf, self.target_snapshots())
    }

    /// The targets of the running configuration, with their live connections.
    fn target_snapshots(&self) -> Vec<TargetSnapshot> {
        let mut active: std::collections::HashMap<*const TargetHealth, u64> =
            std::collections::HashMap::new();
        for record in self.table.records() {
            if let Some(target) = record.target.get() {
                *active.entry(Arc::as_ptr(target)).or_default() += 1;
            }
        }
        let generation = self.generation();
        generation
            .config
            .routes
            .iter()
            .enumerate()
            .flat_map(|(index, route)| {
                generation.health(index).iter().map(|target| {
                    let live = active.get(&Arc::as_ptr(target)).copied().unwrap_or(0);
                    target.snapshot(&route.name, live)
                })
            })
            .collect()
    }

    /// [`Shared::snapshot`] with the kernel maps' entries counted: a syscall per entry,
    /// for one-shot requests only. Blocks while it walks the maps.
    pub(crate) fn snapshot_counting_maps(&self) -> Snapshot {
        let mut snapshot = self.snapshot();
        snapshot.ebpf.map_entries = self.map_entries();
        snapshot
    }

    /// The kernel maps' entries, counted in the kernel; `None` without the kernel path or
    /// when the count failed (logged).
    pub(crate) fn map_entries(&self) -> Option<MapEntries> {
        match self.kernel.as_ref()?.map_entries() {
            Ok(entries) => Some(entries),
            Err(e) => {
                warn!(error = %error_chain(&e), "counting the kernel map entries failed");
                None
            }
        }
    }

    /// Books a splice that failed; loud, but throttled, when the maps were full.
    pub(crate) fn splice_failed(&self, error: &SpliceError) {
        self.stats.splice_failed();
        if !error.map_full() {
            return;
        }
        self.stats.map_full();
        if let Some(held_back) = self.map_full_warnings.admit(std::time::Instant::now()) {
            warn!(
                ebpf_max_connections = self.kernel.as_ref().map_or(0, Kernel::max_connections),
                held_back,
                "the kernel maps are full: new connections use the userspace data path \
                 (raise proxy.ebpf_max_connections and restart; held_back = the same \
                 warnings left out since the last one)"
            );
        }
    }

    pub(crate) fn connection_rows(&self) -> Vec<ConnectionRow> {
        self.stats.connection_rows(&self.table)
    }

    pub(crate) fn generation(&self) -> Arc<Generation> {
        Arc::clone(&self.generation.borrow())
    }

    pub(crate) fn lock_handoff(
        &self,
    ) -> std::sync::MutexGuard<'_, Option<mpsc::UnboundedSender<Outgoing>>> {
        // A single assignment at a time: a poisoned lock is still sound.
        self.handoff.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn lock_handoff_sockets(&self) -> std::sync::MutexGuard<'_, HandoffSockets> {
        // Single inserts and removals: a poisoned lock is still sound.
        self.handoff_sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves once the control socket and the metrics endpoint stop answering here: at
    /// exit, or once a successor answers on them.
    pub(crate) async fn services_end(&self) {
        let mut stop = self.stop.clone();
        let mut upgrade = self.upgrade.subscribe();
        tokio::select! {
            _ = reached(&mut stop, Stop::Exit) => {}
            _ = upgrade.wait_for(|phase| *phase == Phase::HandedOff) => {}
        }
    }

    pub(crate) fn lock_listeners(&self) -> std::sync::MutexGuard<'_, Listeners> {
        // Every change is a single insert or remove: a poisoned lock is still sound.
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
