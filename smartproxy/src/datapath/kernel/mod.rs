//! The kernel data path: loads the eBPF programs (`smartproxy-ebpf`), splices socket pairs
//! into the sockhash, and delivers TCP state changes of spliced sockets from the ring buffer.
//!
//! The kernel behaviours every rule here relies on were measured on the target kernel and
//! are collected in `docs/kernel-notes.md`; comments point there instead of repeating them.
//!
//! - [`Kernel::load`] loads the object built by `build.rs`, attaches the stream verdict to the
//!   `SOCKETS` sockhash and the sock_ops program to the proxy's own cgroup v2 ([`cgroup`]), and
//!   spawns a tokio task that reads `EVENTS` ([`events`]).
//! - [`Kernel::splice`] hands a routed client/backend pair to the kernel. The returned
//!   [`Splice`] ([`splice`]) yields that pair's [`StateChange`]s, reads its per-direction
//!   counters, tells when a direction's redirected bytes have all reached the peer socket
//!   ([`Splice::may_write`]), and undoes everything when dropped.
//! - [`Offload`] ([`offload`]) is a spliced connection's kernel side as the relay drives it.
//! - [`sys`] holds the raw socket syscalls; [`error`] the typed errors.
//! - [`pins`]: [`Kernel::load_pinned`] pins the maps in bpffs, so that a successor process
//!   (`smartproxy upgrade`) reuses them; [`Offload::export`] and [`Offload::adopt`] move a
//!   spliced connection's bookkeeping to it.
//!
//! Sockets created before the first `load` (in this process) may not be covered: see
//! [`proxy_cgroup`].

pub mod cgroup;
pub mod error;
pub mod events;
pub mod offload;
pub mod pins;
pub mod splice;
pub mod sys;

use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
};

use aya::{
    maps::{HashMap, Map, MapData, MapError, MapKeys, PerCpuArray, RingBuf, SockHash},
    programs::{sk_skb::SkSkbLinkId, CgroupAttachMode, ProgramError, SkSkb, SockOps},
    Ebpf, EbpfLoader,
};
use smartproxy_common::{
    Control, Flow, MAP_CONTROL, MAP_EVENTS, MAP_EVENTS_LOST, MAP_FLOWS, MAP_SOCKETS, MAP_TARGETS,
    PROG_REDIRECT, PROG_STATE_EVENTS,
};
use std::fmt;
use std::fs;
use std::os::fd::BorrowedFd;
use tokio::{
    io::{unix::AsyncFd, Interest},
    task::JoinHandle,
};

pub use cgroup::proxy_cgroup;
pub use error::{EbpfError, SpliceError, SpliceStep};
pub use events::{StateChange, TcpState};
pub use offload::{KernelFlows, Offload, OffloadRecord};
pub use pins::{ensure_bpffs, pin_dir, Pins, DEFAULT_PIN_ROOT};
#[cfg(feature = "test-hooks")]
pub use splice::test_hooks;
pub use splice::{Splice, Wait};
pub(crate) use sys::bytes_to_read;
pub use sys::{all_acknowledged, socket_cookie, tcp_state, PASSED_READ_BYTES};

use crate::config::{ring_buffer_bytes_valid, LoadOptions};
use crate::vocab::Side;
use events::{read_events, EventQueue, SpliceRegistry};
use splice::{Done, SpliceSocket};

/// The eBPF object `build.rs` built from `smartproxy-ebpf` (empty when built with
/// `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/smartproxy-ebpf"));

/// Totals for `smartproxy stats` (`ebpf.*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Sockets currently in `SOCKETS` (two per live splice).
    pub sockhash_entries: u64,
    /// State-change events read from the ring buffer since load.
    pub events: u64,
    /// Events the sock_ops program could not queue because the ring buffer was full.
    pub events_lost: u64,
}

/// Entries of each map, counted in the kernel ([`Kernel::map_entries`]). After every
/// connection closed, all four are zero: `FLOWS` and `CONTROL` are where a leak shows, as
/// the kernel removes a closed socket from the sockhashes by itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapEntries {
    pub sockets: u64,
    pub targets: u64,
    pub flows: u64,
    pub control: u64,
}

/// The loaded eBPF programs and their maps. Cheap to clone; everything is released (programs
/// detached, maps freed, reader task stopped) when the last clone and the last [`Splice`] are
/// dropped. Several `Kernel`s may live in one process, each with its own maps.
#[derive(Clone)]
pub struct Kernel {
    inner: Arc<Inner>,
}

struct Inner {
    targets: Mutex<SockHash<MapData, u64>>,
    sockets: Mutex<SockHash<MapData, u64>>,
    flows: Mutex<HashMap<MapData, u64, Flow>>,
    control: Mutex<HashMap<MapData, u64, Control>>,
    max_connections: u32,
    max_queued_bytes: u64,
    events_lost: PerCpuArray<MapData, u64>,
    /// The `EVENTS` map, from which [`Kernel::start_events`] makes each reader's ring
    /// buffer: a new one reads the consumer position from the map, where the last reader
    /// (this process's before a pause, or a predecessor's) left it.
    events: OwnedFd,
    registry: Arc<SpliceRegistry>,
    reader: Mutex<Reader>,
    /// The instance's pin directory ([`Pins`]), if the maps are pinned.
    pins: Option<PathBuf>,
    /// Leave the pins in place when dropped ([`Kernel::keep_pins`]).
    keep_pins: AtomicBool,
    /// The verdict's attachment to `SOCKETS`, detached by hand when dropped so that the
    /// outcome is logged (aya's own detach on drop discards it).
    verdict_link: Option<SkSkbLinkId>,
    /// Keeps the programs loaded and the sock_ops link attached; dropping it detaches them.
    ebpf: Ebpf,
}

/// The reader of the `EVENTS` ring buffer.
enum Reader {
    /// Not reading: not started yet, or paused ([`Kernel::pause_events`]).
    Idle,
    Running {
        task: JoinHandle<()>,
        /// Tells the task to stop reading ([`Kernel::pause_events`]).
        pause: tokio::sync::oneshot::Sender<()>,
    },
    /// [`Kernel::pause_events`] waits for the task to stop.
    Pausing,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Reader::Running { task, .. } = &*lock(&self.reader) {
            task.abort();
        }
        self.detach_verdict();
        if let Some(dir) = &self.pins {
            if self.keep_pins.load(Ordering::Relaxed) {
                tracing::info!(path = %dir.display(), "eBPF map pins left for the successor");
            } else {
                pins::remove(dir);
            }
        }
    }
}

impl Inner {
    /// Detaches this process's verdict from `SOCKETS`. The map has one verdict slot: once a
    /// successor attached its own program to the reused map, ours is no longer there, and
    /// the kernel refuses to detach it (ENOENT) without touching the successor's. Sockets
    /// inserted while ours was attached keep running it either way (each socket holds the
    /// program it was inserted with).
    fn detach_verdict(&mut self) {
        let Some(link) = self.verdict_link.take() else {
            return;
        };
        let verdict: Result<&mut SkSkb, _> = program(&mut self.ebpf, PROG_REDIRECT);
        let result = verdict.and_then(|verdict| {
            verdict
                .detach(link)
                .map_err(program_error(PROG_REDIRECT, "detach from SOCKETS"))
        });
        match result {
            Ok(()) => {}
            Err(EbpfError::Program {
                source: ProgramError::SyscallError(e),
                ..
            }) if e.io_error.raw_os_error() == Some(libc::ENOENT) => tracing::debug!(
                "the verdict was already replaced on SOCKETS (a successor attached its own)"
            ),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "detaching the verdict failed")
            }
        }
    }
}

impl fmt::Debug for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kernel")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Kernel {
    /// Loads and attaches everything. Needs no runtime, so that it runs before the
    /// privileges are dropped and before any thread starts; the ring buffer is read once
    /// [`Kernel::start_events`] is called on a runtime.
    ///
    /// The sock_ops program is attached to the cgroup v2 this process runs in, moving the
    /// process out of the root cgroup first (see [`proxy_cgroup`]). It is attached with a
    /// bpf_link, which the kernel always treats as multi-attach: several `Kernel`s (proxies,
    /// parallel tests) can attach at once, and a killed process leaves nothing attached.
    pub fn load(opts: LoadOptions) -> Result<Kernel, EbpfError> {
        Self::load_with(opts, None)
    }

    /// Like [`Kernel::load`], with every map pinned in the instance directory `pins`
    /// names, inside a bpffs mount ([`ensure_bpffs`], [`pin_dir`]).
    ///
    /// - [`Pins::Fresh`]: removes what an earlier process left there, creates the maps and
    ///   pins them. Dropping the last clone removes the pins, unless [`Kernel::keep_pins`]
    ///   was called.
    /// - [`Pins::Reuse`]: checks every pinned map's type, key and value size, capacity
    ///   and flags against what this binary and `opts` would create, refuses a mismatch
    ///   ([`EbpfError::PinnedMapMismatch`], [`EbpfError::PinsMissing`]), then loads this
    ///   binary's programs against those maps and attaches them: its verdict to the reused
    ///   `SOCKETS` (replacing the predecessor's there; sockets spliced before keep the
    ///   predecessor's verdict) and its sock_ops program to this process's cgroup, next to
    ///   the predecessor's until that one exits (each state change is then reported twice,
    ///   which the relay's state checks take in their stride). The pins stay when this one
    ///   is dropped, unless [`Kernel::own_pins`] was called: a successor that fails before
    ///   the handoff is confirmed must not remove its running predecessor's pins.
    ///
    /// Start reading events ([`Kernel::start_events`]) only once the predecessor has
    /// paused its reader ([`Kernel::pause_events`]): the ring buffer has one consumer
    /// position, and two readers would corrupt it.
    pub fn load_pinned(opts: LoadOptions, pins: Pins) -> Result<Kernel, EbpfError> {
        Self::load_with(opts, Some(pins))
    }

    fn load_with(opts: LoadOptions, pins: Option<Pins>) -> Result<Kernel, EbpfError> {
        let LoadOptions {
            ring_buffer_bytes,
            max_connections,
            max_queued_bytes,
        } = opts;
        if OBJECT.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        if !ring_buffer_bytes_valid(ring_buffer_bytes) {
            return Err(EbpfError::RingBufferSize(ring_buffer_bytes));
        }
        let max_sockets = max_connections
            .checked_mul(2)
            .ok_or(EbpfError::MapSize(max_connections))?;
        let cgroup = proxy_cgroup()?;
        let expected = pins::expected_maps(ring_buffer_bytes, max_sockets);
        // Reuse: the ids of the checked maps, which the load must end up with.
        let reused = match &pins {
            None => None,
            Some(Pins::Fresh(dir)) => {
                pins::clear(dir)?;
                None
            }
            Some(Pins::Reuse(dir)) => Some(pins::check_pins(dir, &expected)?),
        };

        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(MAP_EVENTS, ring_buffer_bytes)
            .map_max_entries(MAP_TARGETS, max_sockets)
            .map_max_entries(MAP_SOCKETS, max_sockets)
            .map_max_entries(MAP_FLOWS, max_sockets)
            .map_max_entries(MAP_CONTROL, max_sockets);
        if let Some(pins) = &pins {
            // aya opens the map pinned at this path if there is one, else creates the map
            // and pins it there.
            let layout = pins::layout_dir(pins.dir());
            for map in &expected {
                loader.map_pin_path(map.name, layout.join(map.name));
            }
        }
        let mut ebpf = loader.load(OBJECT).map_err(EbpfError::Load)?;
        // The loaded maps against this binary's table: on a reuse the pins were checked
        // already, and this proves the load took those same maps; otherwise it keeps the
        // table true to the object.
        for (i, map) in expected.iter().enumerate() {
            let info = ebpf
                .map(map.name)
                .and_then(pins::map_data)
                .ok_or(EbpfError::Missing {
                    kind: "map",
                    name: map.name,
                })?
                .info()
                .map_err(|source| EbpfError::Map {
                    map: map.name,
                    step: "read the info",
                    source,
                })?;
            let path = pins
                .as_ref()
                .map(|p| pins::layout_dir(p.dir()).join(map.name))
                .unwrap_or_default();
            map.check(&info, &path)?;
            if let Some(pinned) = reused.as_ref().and_then(|ids| ids.get(i)) {
                if *pinned != info.id() {
                    return Err(EbpfError::PinReplaced {
                        map: map.name,
                        pinned: *pinned,
                        loaded: info.id(),
                    });
                }
            }
        }

        let targets: SockHash<_, u64> = take_map(&mut ebpf, MAP_TARGETS)?;
        let sockets: SockHash<_, u64> = take_map(&mut ebpf, MAP_SOCKETS)?;
        let flows: HashMap<_, u64, Flow> = take_map(&mut ebpf, MAP_FLOWS)?;
        let control: HashMap<_, u64, Control> = take_map(&mut ebpf, MAP_CONTROL)?;
        let events = ebpf
            .take_map(MAP_EVENTS)
            .ok_or(EbpfError::Missing {
                kind: "map",
                name: MAP_EVENTS,
            })
            .and_then(|map| {
                pins::map_data(&map)
                    .map(|data| data.fd().as_fd().try_clone_to_owned())
                    .ok_or(EbpfError::Missing {
                        kind: "map",
                        name: MAP_EVENTS,
                    })?
                    .map_err(|e| EbpfError::Map {
                        map: MAP_EVENTS,
                        step: "duplicate the fd",
                        source: MapError::SyscallError(aya::sys::SyscallError {
                            call: "dup",
                            io_error: e,
                        }),
                    })
            })?;
        let events_lost: PerCpuArray<_, u64> = take_map(&mut ebpf, MAP_EVENTS_LOST)?;

        let verdict: &mut SkSkb = program(&mut ebpf, PROG_REDIRECT)?;
        verdict
            .load()
            .map_err(program_error(PROG_REDIRECT, "load"))?;
        let verdict_link = verdict
            .attach(sockets.fd())
            .map_err(program_error(PROG_REDIRECT, "attach to SOCKETS"))?;

        let cgroup_dir = fs::File::open(&cgroup).map_err(|source| EbpfError::Cgroup {
            step: "open",
            path: cgroup.clone(),
            source,
        })?;
        let state_events: &mut SockOps = program(&mut ebpf, PROG_STATE_EVENTS)?;
        state_events
            .load()
            .map_err(program_error(PROG_STATE_EVENTS, "load"))?;
        // aya attaches with a bpf_link (kernel >= 5.7). The kernel rejects any flag on a cgroup
        // link (EINVAL for AllowMultiple) and always attaches links as BPF_F_ALLOW_MULTI, so
        // `Single` here still lets several Kernels attach to the same cgroup.
        state_events
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(program_error(
                PROG_STATE_EVENTS,
                "attach to the proxy's cgroup",
            ))?;

        let registry = Arc::new(SpliceRegistry::default());
        tracing::info!(
            cgroup = %cgroup.display(),
            ring_buffer_bytes,
            max_connections,
            pins = ?pins,
            "eBPF data path loaded"
        );
        Ok(Kernel {
            inner: Arc::new(Inner {
                targets: Mutex::new(targets),
                sockets: Mutex::new(sockets),
                flows: Mutex::new(flows),
                control: Mutex::new(control),
                max_connections,
                max_queued_bytes,
                events_lost,
                events,
                registry,
                reader: Mutex::new(Reader::Idle),
                keep_pins: AtomicBool::new(matches!(pins, Some(Pins::Reuse(_)))),
                pins: pins.map(|p| p.dir().to_path_buf()),
                verdict_link: Some(verdict_link),
                ebpf,
            }),
        })
    }

    /// Starts reading the `EVENTS` ring buffer on the current tokio runtime; state changes
    /// reach the splices from then on (events written before wait in the ring). Later
    /// calls do nothing, until [`Kernel::pause_events`]; after it, this resumes reading
    /// where the last reader stopped.
    pub fn start_events(&self) -> Result<(), EbpfError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| EbpfError::NoRuntime)?;
        let mut reader = lock(&self.inner.reader);
        if !matches!(*reader, Reader::Idle) {
            return Ok(());
        }
        // A new ring buffer each time: it reads the consumer position from the map, so
        // that bytes another reader consumed meanwhile are not read again.
        let ring = self
            .inner
            .events
            .try_clone()
            .map_err(EbpfError::RingBufPoll)
            .and_then(|fd| {
                MapData::from_fd(fd).map_err(|source| EbpfError::Map {
                    map: MAP_EVENTS,
                    step: "open",
                    source,
                })
            })
            .and_then(|data| {
                RingBuf::try_from(Map::RingBuf(data)).map_err(|source| EbpfError::Map {
                    map: MAP_EVENTS,
                    step: "open",
                    source,
                })
            })?;
        let events = {
            let _entered = runtime.enter();
            // SAFETY: the RingBuf owns its map's fd (aya's MapData holds an OwnedFd) and
            // always returns that same fd; it moves into the AsyncFd and closes only with it.
            unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
                .map_err(|e| EbpfError::RingBufPoll(e.into_parts().1))?
        };
        let (pause, paused) = tokio::sync::oneshot::channel();
        *reader = Reader::Running {
            task: runtime.spawn(read_events(
                events,
                Arc::clone(&self.inner.registry),
                paused,
            )),
            pause,
        };
        Ok(())
    }

    /// Stops this process's reading of `EVENTS` and returns once its reader no longer
    /// consumes the ring buffer: before an upgrade's export, so that the successor's
    /// reader, which starts at the consumer position this one left, is the only one.
    /// Events written meanwhile wait in the ring buffer (or are counted lost if it fills).
    /// Splices stay registered; [`Kernel::start_events`] resumes if the upgrade fails.
    /// Does nothing if the reader is not running.
    pub async fn pause_events(&self) -> Result<(), EbpfError> {
        let (task, pause) = {
            let mut reader = lock(&self.inner.reader);
            match std::mem::replace(&mut *reader, Reader::Pausing) {
                Reader::Running { task, pause } => (task, pause),
                other => {
                    *reader = other;
                    return Ok(());
                }
            }
        };
        // The task may have stopped already (its fd failed): then the send finds no one.
        let _ = pause.send(());
        let result = task.await;
        *lock(&self.inner.reader) = Reader::Idle;
        result.map_err(EbpfError::EventsPause)
    }

    /// Leaves the pins in place when the last clone is dropped: the old process calls it
    /// once its successor confirmed the handoff (the successor holds the maps then).
    pub fn keep_pins(&self) {
        self.inner.keep_pins.store(true, Ordering::Relaxed);
    }

    /// Removes the pins when the last clone is dropped (the default of [`Pins::Fresh`]): a
    /// successor calls it once the handoff is confirmed and the pins are its own.
    pub fn own_pins(&self) {
        self.inner.keep_pins.store(false, Ordering::Relaxed);
    }

    /// The instance's pin directory, if the maps are pinned.
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        self.inner.pins.as_deref()
    }

    /// Hands a routed pair to the kernel: from now on each socket's received bytes are
    /// redirected to the other one's send path.
    ///
    /// Both sockets must be established TCP sockets, and the caller must keep them open for as
    /// long as the returned [`Splice`] lives (it keeps their raw fds, for [`Splice::may_write`]).
    /// Bytes userspace already read from either socket (a peeked ClientHello) must have been
    /// written to the other socket before this call; bytes still queued in a socket are pushed
    /// through the verdict here, after them, in order.
    ///
    /// Order: register both cookies for events, create both `CONTROL` entries (passing every
    /// byte) and `FLOWS` entries, insert both sockets into `TARGETS`, then both into
    /// `SOCKETS`, then set `SO_RCVLOWAT` to 1 on both, which runs bytes already queued
    /// through the verdict; only then switch both directions to redirect.
    ///
    /// A failure before the first `SOCKETS` insert undoes everything and is returned: the
    /// caller carries on with the userspace copy. A failure after it cannot be undone
    /// (removing a socket from `SOCKETS` drops the bytes its psock holds), and it is not an
    /// error: the kernel refuses to insert a socket that already got its FIN, which a peer
    /// that answers and closes at once makes routine. The splice is then kept with the
    /// verdict passing every byte to userspace for good, and [`Splice::fallback`] says why.
    /// Nothing was redirected before a failed `SOCKETS` insert; should a later switch to
    /// redirect fail half way, what the first direction redirected is counted, and the
    /// relay's writes wait for it as on any spliced connection, so the stream stays whole.
    pub fn splice(
        &self,
        client: BorrowedFd<'_>,
        backend: BorrowedFd<'_>,
    ) -> Result<Splice, SpliceError> {
        let client = SpliceSocket::read(Side::Client, client)?;
        let backend = SpliceSocket::read(Side::Backend, backend)?;
        let events = Arc::new(EventQueue::default());
        self.inner.registry.register(
            &[
                (client.cookie, Side::Client),
                (backend.cookie, Side::Backend),
            ],
            &events,
        )?;
        // From here on, dropping `splice` undoes exactly the steps recorded in it.
        let mut splice = Splice {
            kernel: self.clone(),
            client,
            backend,
            events,
            control: [Control {
                cap: self.inner.max_queued_bytes,
                ..Control::default()
            }; 2],
            done: Done::default(),
            fallback: None,
        };
        match splice.attach() {
            Ok(()) => Ok(splice),
            Err(err) if splice.done.sockets.contains(&true) => {
                splice.fallback = Some(err);
                Ok(splice)
            }
            Err(err) => {
                splice.undo();
                Err(err)
            }
        }
    }

    /// Totals for the stats output.
    pub fn stats(&self) -> KernelStats {
        let registry = &self.inner.registry;
        let events_lost = match self.inner.events_lost.get(&0, 0) {
            Ok(per_cpu) => per_cpu.iter().sum(),
            Err(err) => {
                tracing::warn!(error = %err, map = MAP_EVENTS_LOST, "reading the lost-event counter failed");
                0
            }
        };
        KernelStats {
            sockhash_entries: registry.sockhash_entries.load(Ordering::Relaxed),
            events: registry.events.load(Ordering::Relaxed),
            events_lost,
        }
    }

    /// How many connections the maps hold ([`LoadOptions::max_connections`]).
    pub fn max_connections(&self) -> u32 {
        self.inner.max_connections
    }

    /// Counts the entries of each map in the kernel. It walks the keys, a syscall each, with
    /// the map's lock held (no splice starts or ends meanwhile): for one-shot requests, not
    /// for every scrape. `FLOWS` and `CONTROL` are exact. The kernel may remove a closed
    /// socket from a sockhash during the walk, which then starts over and may count some
    /// keys twice, up to the map's capacity; once nothing closes, the counts are exact.
    pub fn map_entries(&self) -> Result<MapEntries, EbpfError> {
        let inner = &self.inner;
        let capacity = u64::from(inner.max_connections) * 2;
        let count = |map: &'static str, keys: MapKeys<'_, u64>| {
            let mut entries = 0;
            for key in keys.take(usize::try_from(capacity).unwrap_or(usize::MAX)) {
                key.map_err(|source| EbpfError::Map {
                    map,
                    step: "walking the keys",
                    source,
                })?;
                entries += 1;
            }
            Ok::<u64, EbpfError>(entries)
        };
        // One lock at a time, each released before the next is taken.
        let sockets = count(MAP_SOCKETS, lock(&inner.sockets).keys())?;
        let targets = count(MAP_TARGETS, lock(&inner.targets).keys())?;
        let flows = count(MAP_FLOWS, lock(&inner.flows).keys())?;
        let control = count(MAP_CONTROL, lock(&inner.control).keys())?;
        Ok(MapEntries {
            sockets,
            targets,
            flows,
            control,
        })
    }

    /// The verdict's counters for the direction whose source socket has `cookie` (see
    /// [`Splice::cookie`]); fails once that splice is gone.
    pub fn flow_counters(&self, cookie: u64) -> io::Result<FlowCounters> {
        let flow = lock(&self.inner.flows).get(&cookie, 0).map_err(|e| {
            io::Error::other(format!("{MAP_FLOWS} lookup of socket cookie {cookie}: {e}"))
        })?;
        Ok(FlowCounters {
            redirected: flow.redirected,
            passed: flow.passed,
            last_activity_ns: flow.last_activity_ns,
        })
    }
}

/// What the verdict counted for one direction (keyed by its source socket).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCounters {
    /// Bytes redirected from the source socket to its peer.
    pub redirected: u64,
    /// Bytes the verdict passed up to userspace instead.
    pub passed: u64,
    /// CLOCK_MONOTONIC nanoseconds of the last non-empty skb the source socket received
    /// (`bpf_ktime_get_ns`; compare with `datapath::clock::monotonic_ns()`); 0 = none yet.
    pub last_activity_ns: u64,
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(EbpfError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(|source| EbpfError::Map {
        map: name,
        step: "open",
        source,
    })
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(EbpfError::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into().map_err(program_error(name, "type check"))
}

fn program_error(
    program: &'static str,
    step: &'static str,
) -> impl FnOnce(ProgramError) -> EbpfError {
    move |source| EbpfError::Program {
        program,
        step,
        source,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave a map half-updated (each guarded
    // operation is one syscall), so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::splice::BPF_NOEXIST;
    use super::*;

    #[test]
    fn a_ring_buffer_size_the_kernel_would_reject_is_refused_up_front() {
        let err = Kernel::load(LoadOptions {
            ring_buffer_bytes: 100_000,
            ..LoadOptions::default()
        })
        .expect_err("100000 is not a power of two");
        assert!(
            matches!(
                err,
                EbpfError::RingBufferSize(100_000) | EbpfError::NotBuilt
            ),
            "{err}"
        );
    }

    /// A sockhash at capacity refuses an insert with E2BIG, as a hash map does, so that
    /// [`SpliceError::map_full`] recognises both: `TARGETS` is filled behind the splice's
    /// back, while `CONTROL` and `FLOWS` still have room.
    #[tokio::test]
    async fn a_full_sockhash_fails_the_splice_as_map_full() {
        let kernel = match Kernel::load(LoadOptions {
            max_connections: 1,
            ..LoadOptions::default()
        }) {
            Ok(kernel) => kernel,
            Err(e) if std::env::var("SMARTPROXY_REQUIRE_EBPF").as_deref() == Ok("1") => {
                panic!("SMARTPROXY_REQUIRE_EBPF=1 but eBPF is unavailable: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPING: eBPF unavailable: {}", crate::error_chain(&e));
                return;
            }
        };
        use std::os::fd::AsFd;
        let pair = || {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            (client, listener.accept().unwrap().0)
        };
        let (filler, filler_peer) = pair();
        for socket in [&filler, &filler_peer] {
            let cookie = socket_cookie(socket.as_fd()).unwrap();
            lock(&kernel.inner.targets)
                .insert(cookie, socket.as_raw_fd(), BPF_NOEXIST)
                .unwrap();
        }
        let (client, backend) = pair();
        let err = kernel
            .splice(client.as_fd(), backend.as_fd())
            .expect_err("TARGETS is full");
        assert_eq!(err.step, SpliceStep::Targets, "{err}");
        assert!(err.map_full(), "{}", crate::error_chain(&err));
        let entries = kernel.map_entries().unwrap();
        assert_eq!(
            entries,
            MapEntries {
                targets: 2,
                ..MapEntries::default()
            },
            "the failed splice took its CONTROL and FLOWS entries back"
        );
    }
}
