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
//!   [`Splice`] ([`splice`]) yields that pair's [`SpliceEvent`]s, reads its per-direction
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
    os::fd::AsFd,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
};

use aya::{
    maps::{HashMap, Map, MapData, MapError, MapKeys, PerCpuArray, RingBuf, SockHash},
    programs::{
        sk_skb::SkSkbLinkId, CgroupAttachMode, CgroupSockopt, ProgramError, SkSkb, SockOps,
    },
    Ebpf, EbpfLoader,
};
use smartproxy_common::{
    Control, Flow, MAP_CONTROL, MAP_EVENTS, MAP_EVENTS_LOST, MAP_FLOWS, MAP_SOCKETS, MAP_TARGETS,
    PROG_ARM_EVENTS, PROG_REDIRECT, PROG_STATE_EVENTS, PROG_STATE_EVENTS_ALL,
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
pub use events::{SpliceEvent, StateChange, TcpState};
pub use offload::{KernelFlows, Offload, OffloadRecord};
pub use pins::{ensure_bpffs, pin_dir, Pins, DEFAULT_PIN_ROOT};
#[cfg(feature = "test-hooks")]
pub use splice::test_hooks;
pub use splice::{Splice, Wait};
pub(crate) use sys::bytes_to_read;
pub use sys::{all_acknowledged, socket_cookie, tcp_state, PASSED_READ_BYTES};

use crate::config::{ring_buffer_bytes_valid, LoadOptions};
use crate::vocab::Side;
use events::{read_events, EventQueue, ReadingRegistry, SpliceRegistry};
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
    // No lock: the element operations go through `sys::map_update` and its kin.
    targets: SockHash<MapData, u64>,
    sockets: SockHash<MapData, u64>,
    flows: HashMap<MapData, u64, Flow>,
    control: HashMap<MapData, u64, Control>,
    max_connections: u32,
    max_queued_bytes: u64,
    /// Whether splices turn on their sockets' sock_ops callbacks ([`Kernel::arms_at_splice`]).
    arms_at_splice: bool,
    events_lost: Arc<PerCpuArray<MapData, u64>>,
    /// The `EVENTS` map, from which [`Kernel::start_events`] makes each reader's ring
    /// buffer: a new one reads the consumer position from the map, where the last reader
    /// (this process's before a pause, or a predecessor's) left it.
    events: Map,
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

/// `EVENTS_LOST` summed over the CPUs; `None` (logged) if it cannot be read.
fn lost_events(events_lost: &PerCpuArray<MapData, u64>) -> Option<u64> {
    match events_lost.get(&0, 0) {
        Ok(per_cpu) => Some(per_cpu.iter().sum()),
        Err(err) => {
            tracing::warn!(error = %err, map = MAP_EVENTS_LOST, "reading the lost-event counter failed");
            None
        }
    }
}

/// The sock_ops program that goes with where sockets are armed.
fn state_events_program(arms_at_splice: bool) -> &'static str {
    if arms_at_splice {
        PROG_STATE_EVENTS
    } else {
        PROG_STATE_EVENTS_ALL
    }
}

/// Loads the cgroup setsockopt program that arms a socket's sock_ops callbacks when it is
/// spliced, attaches it to the proxy's cgroup and tries it on a socket of its own. Where it
/// cannot (a kernel before 6.12 knows no `TCP_BPF_SOCK_OPS_CB_FLAGS` for `bpf_setsockopt`,
/// one before 5.15 no `bpf_setsockopt` in that program type), the log says why and every
/// established socket arms itself instead, as it always did
/// (`docs/kernel-notes.md#state-events`).
fn attach_splice_arming(ebpf: &mut Ebpf, cgroup: &fs::File) -> bool {
    let tried = (|| -> Result<(), String> {
        let arm: &mut CgroupSockopt = program(ebpf, PROG_ARM_EVENTS).map_err(|e| e.to_string())?;
        arm.load()
            .map_err(|e| format!("load: {}", crate::error_chain(&e)))?;
        let link = arm
            .attach(cgroup, CgroupAttachMode::Single)
            .map_err(|e| format!("attach: {}", crate::error_chain(&e)))?;
        let armed = sys::tcp_socket()
            .map_err(|e| format!("a probe socket: {e}"))
            .and_then(|probe| {
                sys::arm_events(probe.as_fd()).map_err(|e| format!("arming a probe socket: {e}"))
            });
        if armed.is_err() {
            let _ = arm.detach(link);
        }
        armed
    })();
    match tried {
        Ok(()) => true,
        Err(why) => {
            tracing::info!(
                reason = %why,
                "sock_ops callbacks cannot be armed at splice time on this kernel; every \
                 socket of the proxy runs them from its handshake on"
            );
            false
        }
    }
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
            arm_at_splice,
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
        // Kept as it is, open: the programs, loaded below, refer to the maps by these fds.
        let events = ebpf.take_map(MAP_EVENTS).ok_or(EbpfError::Missing {
            kind: "map",
            name: MAP_EVENTS,
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
        let arms_at_splice = arm_at_splice && attach_splice_arming(&mut ebpf, &cgroup_dir);
        let state_events_name = state_events_program(arms_at_splice);
        let state_events: &mut SockOps = program(&mut ebpf, state_events_name)?;
        state_events
            .load()
            .map_err(program_error(state_events_name, "load"))?;
        // aya attaches with a bpf_link (kernel >= 5.7). The kernel rejects any flag on a cgroup
        // link (EINVAL for AllowMultiple) and always attaches links as BPF_F_ALLOW_MULTI, so
        // `Single` here still lets several Kernels attach to the same cgroup.
        state_events
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .map_err(program_error(
                state_events_name,
                "attach to the proxy's cgroup",
            ))?;

        let registry = Arc::new(SpliceRegistry::new(lost_events(&events_lost).unwrap_or(0)));
        tracing::info!(
            cgroup = %cgroup.display(),
            ring_buffer_bytes,
            max_connections,
            arms_at_splice,
            pins = ?pins,
            "eBPF data path loaded"
        );
        Ok(Kernel {
            inner: Arc::new(Inner {
                targets,
                sockets,
                flows,
                control,
                max_connections,
                max_queued_bytes,
                arms_at_splice,
                events_lost: Arc::new(events_lost),
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
        let ring = pins::map_data(&self.inner.events)
            .ok_or(EbpfError::Missing {
                kind: "map",
                name: MAP_EVENTS,
            })?
            .fd()
            .as_fd()
            .try_clone_to_owned()
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
        let events_lost = Arc::clone(&self.inner.events_lost);
        // Before the task, which clears it if it stops at once.
        self.inner.registry.set_reading(true);
        *reader = Reader::Running {
            task: runtime.spawn(read_events(
                events,
                ReadingRegistry::new(Arc::clone(&self.inner.registry)),
                paused,
                move || lost_events(&events_lost),
            )),
            pause,
        };
        Ok(())
    }

    /// Whether this process reads the kernel's events: not before [`Kernel::start_events`]
    /// (a successor reads them only once it adopted every connection, and accepts before),
    /// nor during a pause, nor once the reader stopped for good (its fd failed). Until it
    /// does, nothing tells a spliced connection of a FIN or of bytes passed up, so its
    /// sockets stay watched for reads ([`Offload::watches_reads`]).
    pub fn reads_events(&self) -> bool {
        self.inner.registry.reading()
    }

    /// Stops this process's reading of `EVENTS` and returns once its reader no longer
    /// consumes the ring buffer: before an upgrade's export, so that the successor's
    /// reader, which starts at the consumer position this one left, is the only one.
    /// Events written meanwhile wait in the ring buffer (or are counted lost if it fills).
    /// Splices stay registered; [`Kernel::start_events`] resumes if the upgrade fails.
    /// A spliced relay that stopped watching its sockets hears of a FIN that comes
    /// meanwhile when it moves (the adoption re-checks both sockets) or when the reader
    /// resumes: waking all of them here instead cost an upgrade's streams half a second
    /// with 10,000 spliced connections (docs/upgrade.md). Does nothing if the reader is
    /// not running.
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
        self.inner.registry.set_reading(false);
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

    /// Whether [`Kernel::splice`] turns on its sockets' sock_ops callbacks (state changes,
    /// acknowledged bytes): then no other socket runs them after its handshake. Otherwise
    /// every socket of the proxy's cgroup does from its handshake on (a kernel before 6.12, or
    /// [`LoadOptions::arm_at_splice`] off).
    pub fn arms_at_splice(&self) -> bool {
        self.inner.arms_at_splice
    }

    /// Turns on the sock_ops callbacks of a socket that is not spliced, for a process that
    /// may splice it without doing so itself (an upgrade's successor built before
    /// [`Kernel::arms_at_splice`] existed, or one that arms at the handshake). Nothing to
    /// do unless this one arms at splice: otherwise the socket armed itself.
    pub fn arm_events(&self, socket: BorrowedFd<'_>) -> io::Result<()> {
        if self.inner.arms_at_splice {
            sys::arm_events(socket)?;
        }
        Ok(())
    }

    /// How often this process's sock_ops program ran since it was loaded. The kernel counts
    /// only while run statistics are on (`sysctl kernel.bpf_stats_enabled`, or
    /// `aya::sys::enable_stats`).
    pub fn sock_ops_runs(&self) -> Result<u64, EbpfError> {
        let name = state_events_program(self.inner.arms_at_splice);
        let info = self
            .inner
            .ebpf
            .program(name)
            .ok_or(EbpfError::Missing {
                kind: "program",
                name,
            })?
            .info()
            .map_err(program_error(name, "read the info"))?;
        Ok(info.run_count())
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
    /// Order: register both cookies for events, arm both sockets' sock_ops callbacks (where
    /// [`Kernel::arms_at_splice`]; never undone, a socket stays armed until it closes),
    /// create both `CONTROL` entries (passing every byte) and `FLOWS` entries, insert both
    /// sockets into `TARGETS`, then both into `SOCKETS`, then set `SO_RCVLOWAT` to 1 on
    /// both, which runs bytes already queued through the verdict; only then switch both
    /// directions to redirect.
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
            false,
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
                splice.fallback = Some(Box::new(err));
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
        KernelStats {
            sockhash_entries: registry.sockhash_entries.load(Ordering::Relaxed),
            events: registry.events.load(Ordering::Relaxed),
            events_lost: lost_events(&self.inner.events_lost).unwrap_or(0),
        }
    }

    /// How many connections the maps hold ([`LoadOptions::max_connections`]).
    pub fn max_connections(&self) -> u32 {
        self.inner.max_connections
    }

    /// Counts the entries of each map in the kernel. It walks the keys, a syscall each: for
    /// one-shot requests, not for every scrape. Splices start and end during the walk; a
    /// removed key makes the walk start over, which may count some keys twice, up to the
    /// map's capacity. Once no connection opens or closes, the counts are exact.
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
        let sockets = count(MAP_SOCKETS, inner.sockets.keys())?;
        let targets = count(MAP_TARGETS, inner.targets.keys())?;
        let flows = count(MAP_FLOWS, inner.flows.keys())?;
        let control = count(MAP_CONTROL, inner.control.keys())?;
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
        let flow: Flow = sys::map_lookup(&self.inner.flows, &cookie).map_err(|e| {
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
    // A panic while holding one of these locks (the reader's state, the registry of
    // splices, an event queue) cannot leave what it guards half-updated: each guarded
    // change is one assignment or one insert or removal. A poisoned lock is still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::fd::AsRawFd;
    use std::task::Poll;

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
        let Some(kernel) = load_or_skip(
            LoadOptions {
                max_connections: 1,
                ..LoadOptions::default()
            },
            None,
        ) else {
            return;
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
            sys::map_update(
                &kernel.inner.targets,
                &cookie,
                &socket.as_raw_fd(),
                BPF_NOEXIST,
            )
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

    /// A bpffs mounted on a temporary directory for one test (the machine's
    /// `/sys/fs/bpf` may not be one), unmounted when dropped.
    struct TestBpffs {
        root: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    impl TestBpffs {
        /// A bpffs of its own and the pin directory of a proxy answering on `control`;
        /// `None` (skipped, loudly) unless root, which mounting needs, and a failure when
        /// SMARTPROXY_REQUIRE_EBPF=1.
        fn with_pins(control: &str) -> Option<(TestBpffs, std::path::PathBuf)> {
            // SAFETY: geteuid cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                assert_ne!(
                    std::env::var("SMARTPROXY_REQUIRE_EBPF").as_deref(),
                    Ok("1"),
                    "SMARTPROXY_REQUIRE_EBPF=1 but mounting bpffs needs root"
                );
                eprintln!("SKIPPING: mounting bpffs needs root");
                return None;
            }
            let bpffs = TestBpffs::mount();
            let dir = pin_dir(&bpffs.root, std::path::Path::new(control));
            Some((bpffs, dir))
        }

        fn mount() -> TestBpffs {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("bpf");
            ensure_bpffs(&root).unwrap();
            ensure_bpffs(&root).expect("a second call finds the mount");
            assert!(pins::is_bpffs(&root).unwrap());
            TestBpffs { root, _dir: dir }
        }
    }

    impl Drop for TestBpffs {
        fn drop(&mut self) {
            let path = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a NUL-terminated path.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }

    /// The kernel data path, or `None` (the test is skipped, and says so) where it cannot
    /// load; `SMARTPROXY_REQUIRE_EBPF=1` makes that a failure.
    pub(crate) fn load_or_skip(opts: LoadOptions, pins: Option<Pins>) -> Option<Kernel> {
        match Kernel::load_with(opts, pins) {
            Ok(kernel) => Some(kernel),
            Err(e @ (EbpfError::NotBuilt | EbpfError::Load(_) | EbpfError::Program { .. }))
                if std::env::var("SMARTPROXY_REQUIRE_EBPF").as_deref() != Ok("1") =>
            {
                eprintln!("SKIPPING: eBPF unavailable: {}", crate::error_chain(&e));
                None
            }
            Err(e) => panic!("load failed: {}", crate::error_chain(&e)),
        }
    }

    pub(crate) fn small() -> LoadOptions {
        LoadOptions {
            max_connections: 8,
            ..LoadOptions::default()
        }
    }

    /// A stale pin set (a process that could not remove it) is replaced by a fresh start;
    /// a successor refuses pins of another size or none; a normal stop removes the pins.
    #[test]
    fn reuse_checks_the_pinned_maps_and_a_normal_stop_removes_them() {
        let Some((_mounted, dir)) = TestBpffs::with_pins("/run/test-a/control.sock") else {
            return;
        };
        let err =
            Kernel::load_pinned(small(), Pins::Reuse(dir.clone())).expect_err("nothing pinned");
        assert!(
            matches!(err, EbpfError::PinsMissing { .. } | EbpfError::NotBuilt),
            "{}",
            crate::error_chain(&err)
        );
        let Some(stale) = load_or_skip(small(), Some(Pins::Fresh(dir.clone()))) else {
            return;
        };
        let layout = pins::layout_dir(&dir);
        for map in [
            "SOCKETS",
            "TARGETS",
            "FLOWS",
            "CONTROL",
            "EVENTS",
            "EVENTS_LOST",
        ] {
            assert!(layout.join(map).exists(), "{map} is pinned");
        }
        // As if killed: the pins outlive it.
        stale.keep_pins();
        let stale_id = aya::maps::MapData::from_pin(layout.join(MAP_FLOWS))
            .unwrap()
            .info()
            .unwrap()
            .id();
        drop(stale);
        assert!(layout.join(MAP_FLOWS).exists());

        let fresh = Kernel::load_pinned(small(), Pins::Fresh(dir.clone())).unwrap();
        let fresh_id = aya::maps::MapData::from_pin(layout.join(MAP_FLOWS))
            .unwrap()
            .info()
            .unwrap()
            .id();
        assert_ne!(stale_id, fresh_id, "the stale maps were replaced");

        let bigger = LoadOptions {
            max_connections: 16,
            ..small()
        };
        let err = Kernel::load_pinned(bigger, Pins::Reuse(dir.clone()))
            .expect_err("maps of another capacity");
        match &err {
            EbpfError::PinnedMapMismatch {
                map,
                what,
                found,
                expected,
                ..
            } => {
                assert_eq!(*map, MAP_TARGETS);
                assert_eq!(*what, "max_entries");
                assert_eq!((found.as_str(), expected.as_str()), ("16", "32"));
            }
            other => panic!("{}", crate::error_chain(other)),
        }
        assert!(err.to_string().contains("TARGETS"), "{err}");
        let ring = LoadOptions {
            ring_buffer_bytes: 2 * smartproxy_common::DEFAULT_RING_BUFFER_BYTES,
            ..small()
        };
        let err = Kernel::load_pinned(ring, Pins::Reuse(dir.clone())).expect_err("another ring");
        assert!(
            matches!(
                err,
                EbpfError::PinnedMapMismatch {
                    map: MAP_EVENTS,
                    what: "max_entries",
                    ..
                }
            ),
            "{}",
            crate::error_chain(&err)
        );

        // A successor that does not own the pins leaves them to its predecessor.
        let successor = Kernel::load_pinned(small(), Pins::Reuse(dir.clone())).unwrap();
        drop(successor);
        assert!(layout.join(MAP_FLOWS).exists());
        drop(fresh);
        assert!(!dir.exists(), "a normal stop removes the pins");
    }

    /// `smartproxy upgrade` on the kernel path, without the process boundary: a pair
    /// spliced under Kernel A is exported, A is dropped, Kernel B (Reuse) adopts it; the
    /// kernel keeps redirecting, B sees the FIN that arrived while nobody read events,
    /// new splices under B redirect, and dropping B's offloads empties the maps.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spliced_connection_moves_to_a_successor_kernel() {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::os::fd::AsFd;
        use std::time::Duration;

        use crate::datapath::Meter;
        use crate::vocab::Direction;

        let Some((_mounted, dir)) = TestBpffs::with_pins("/run/test-b/control.sock") else {
            return;
        };
        let Some(a) = load_or_skip(small(), Some(Pins::Fresh(dir.clone()))) else {
            return;
        };
        a.start_events().unwrap();

        // (app client, proxy's client socket, proxy's backend socket, app backend)
        let quad = || {
            let front = TcpListener::bind("127.0.0.1:0").unwrap();
            let back = TcpListener::bind("127.0.0.1:0").unwrap();
            let app_client = TcpStream::connect(front.local_addr().unwrap()).unwrap();
            let proxy_client = front.accept().unwrap().0;
            let proxy_backend = TcpStream::connect(back.local_addr().unwrap()).unwrap();
            let app_backend = back.accept().unwrap().0;
            for s in [&app_client, &app_backend] {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            }
            (app_client, proxy_client, proxy_backend, app_backend)
        };
        let relay = |from: &mut TcpStream, to: &mut TcpStream, bytes: &[u8]| {
            from.write_all(bytes).unwrap();
            let mut got = vec![0; bytes.len()];
            to.read_exact(&mut got).unwrap();
            assert_eq!(got, bytes);
        };

        // Events A consumes before it pauses; B must not read them again.
        let (x_client, x_proxy_client, x_proxy_backend, _x_backend) = quad();
        let x = a
            .splice(x_proxy_client.as_fd(), x_proxy_backend.as_fd())
            .unwrap();
        x_client.shutdown(Shutdown::Write).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while a.stats().events == 0 {
            assert!(std::time::Instant::now() < deadline, "A got no event");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(x);

        let (mut c1, p1c, p1b, mut s1) = quad();
        let meter_a = Arc::new(Meter::default());
        let offload = Offload::new(&a, p1c.as_fd(), p1b.as_fd(), meter_a.clone()).unwrap();
        relay(&mut c1, &mut s1, b"hello");
        relay(&mut s1, &mut c1, b"hi");
        let cookie = socket_cookie(p1c.as_fd()).unwrap();
        assert_eq!(a.flow_counters(cookie).unwrap().redirected, 5);

        // The successor loads while the predecessor still runs.
        let b = Kernel::load_pinned(small(), Pins::Reuse(dir.clone())).unwrap();
        a.pause_events().await.unwrap();
        let record = offload.export();
        let record: OffloadRecord =
            serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
        assert_eq!(record.redirected_at_export, [5, 2]);
        assert_eq!(meter_a.kernel_bytes(Direction::ClientToBackend), 5);
        assert_eq!(
            a.map_entries().unwrap(),
            MapEntries {
                sockets: 2,
                targets: 2,
                flows: 2,
                control: 2
            },
            "the export undid nothing"
        );
        a.keep_pins();
        // Detaching A's verdict fails harmlessly (B's replaced it), and A's sock_ops link goes.
        drop(a);

        // (a) still redirected, with no process reading or writing those sockets.
        relay(&mut c1, &mut s1, b"world");
        assert_eq!(b.flow_counters(cookie).unwrap().redirected, 10);
        assert_eq!(
            meter_a.kernel_bytes(Direction::ClientToBackend),
            5,
            "A's meter is final"
        );
        // A FIN while nobody reads events: it waits in the ring buffer.
        c1.shutdown(Shutdown::Write).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;

        let meter_b = Arc::new(Meter::default());
        let wrong = Offload::adopt(
            &b,
            p1b.as_fd(),
            p1c.as_fd(),
            meter_b.clone(),
            record.clone(),
        )
        .expect_err("sockets swapped");
        assert_eq!(wrong.step, SpliceStep::Cookie, "{wrong}");
        let mut adopted =
            Offload::adopt(&b, p1c.as_fd(), p1b.as_fd(), meter_b.clone(), record).unwrap();
        b.start_events().unwrap();
        assert_eq!(
            meter_b.kernel_bytes(Direction::ClientToBackend),
            5,
            "since the export"
        );
        let first =
            std::future::poll_fn(|cx| Poll::Ready(adopted.poll_state_check(cx, false))).await;
        assert!(
            first,
            "the first poll after an adoption re-checks the states"
        );
        // The reader may have queued the FIN before that first poll, which took it: wait
        // for the reader's count, not for a second state check.
        tokio::time::timeout(Duration::from_secs(5), async {
            while b.stats().events == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("B receives the FIN the predecessor never read");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            b.stats().events,
            1,
            "B read on from where A stopped: the FIN only, none of A's events"
        );
        assert_eq!(tcp_state(p1c.as_fd()).unwrap(), TcpState::CloseWait);
        // The other direction still redirects after the half-close.
        relay(&mut s1, &mut c1, b"back");
        assert_eq!(meter_b.kernel_bytes(Direction::BackendToClient), 4);

        // (b) a new pair under B.
        let (mut c2, p2c, p2b, mut s2) = quad();
        let second =
            Offload::new(&b, p2c.as_fd(), p2b.as_fd(), Arc::new(Meter::default())).unwrap();
        relay(&mut c2, &mut s2, b"new pair");
        let cookie2 = socket_cookie(p2c.as_fd()).unwrap();
        assert_eq!(b.flow_counters(cookie2).unwrap().redirected, 8);

        drop(adopted);
        drop(second);
        assert_eq!(b.map_entries().unwrap(), MapEntries::default());
        assert_eq!(b.stats().sockhash_entries, 0);
        b.own_pins();
        drop(b);
        assert!(
            !dir.exists(),
            "the successor's stop removes the pins it owns"
        );
    }

    /// The sequence number of the next unread byte is read in repair mode only from a
    /// socket userspace has read from; before any read, the verdict's first skb starts at
    /// the first byte.
    #[tokio::test]
    async fn repair_mode_only_for_a_socket_userspace_read_from() {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        use std::os::fd::AsFd;

        let Some(kernel) = load_or_skip(small(), None) else {
            return;
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let back = TcpListener::bind("127.0.0.1:0").unwrap();
        for read_first in [0, 4] {
            let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let mut proxy_client = listener.accept().unwrap().0;
            let proxy_backend = TcpStream::connect(back.local_addr().unwrap()).unwrap();
            let _backend = back.accept().unwrap().0;
            client.write_all(&[1; 10]).unwrap();
            let mut read = vec![0; read_first];
            proxy_client.read_exact(&mut read).unwrap();
            while sys::bytes_to_read(proxy_client.as_fd()).unwrap() < 10 - read_first as u64 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            let splice = kernel
                .splice(proxy_client.as_fd(), proxy_backend.as_fd())
                .unwrap();
            assert_eq!(
                splice.client.next_unread_seq.is_some(),
                read_first > 0,
                "{read_first} bytes read before the splice"
            );
            assert_eq!(splice.backend.next_unread_seq, None, "nothing received");
        }
    }

    /// Adds `more` to the count of events the ring had no room for, as the sock_ops
    /// program does when `EVENTS` is full.
    fn count_lost_events(kernel: &Kernel, more: u64) {
        use aya::maps::{IterableMap, PerCpuValues};

        let fd = kernel
            .inner
            .events_lost
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .unwrap();
        let mut lost: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(Map::PerCpuArray(MapData::from_fd(fd).unwrap())).unwrap();
        let mut per_cpu = lost.get(&0, 0).unwrap().to_vec();
        per_cpu[0] += more;
        lost.set(0, PerCpuValues::try_from(per_cpu).unwrap(), 0)
            .unwrap();
    }

    /// A client and a backend connected through two sockets of the proxy's, on loopback:
    /// `[client, proxy's client side, proxy's backend side, backend]`.
    pub(crate) fn proxied_pair() -> [std::net::TcpStream; 4] {
        use std::net::TcpListener;

        let front = TcpListener::bind("127.0.0.1:0").expect("bind");
        let back = TcpListener::bind("127.0.0.1:0").expect("bind");
        let app_client =
            std::net::TcpStream::connect(front.local_addr().expect("addr")).expect("connect");
        let proxy_client = front.accept().expect("accept").0;
        let proxy_backend =
            std::net::TcpStream::connect(back.local_addr().expect("addr")).expect("connect");
        let app_backend = back.accept().expect("accept").0;
        [app_client, proxy_client, proxy_backend, app_backend]
    }

    /// A pair of the proxy's sockets on loopback, spliced by `kernel` into an Offload:
    /// `(offload, [client, proxy's client side, proxy's backend side, backend])`.
    fn spliced_offload(kernel: &Kernel) -> (Offload, [std::net::TcpStream; 4]) {
        let sockets = proxied_pair();
        let offload = Offload::new(
            kernel,
            sockets[1].as_fd(),
            sockets[2].as_fd(),
            Arc::new(crate::datapath::Meter::default()),
        )
        .unwrap();
        (offload, sockets)
    }

    /// Polls `offload` as the relay does (`watching`: a side is half-closed), until a
    /// check of the TCP states is due or `within` passed: whether one was due.
    async fn state_check_within(
        offload: &mut Offload,
        watching: bool,
        within: std::time::Duration,
    ) -> bool {
        let due = std::future::poll_fn(|cx| {
            if offload.poll_state_check(cx, watching) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        tokio::time::timeout(within, due).await.is_ok()
    }

    /// A half-closed splice re-reads its sockets' TCP states every second only while no
    /// event can reach it: not while the reader runs (a lost event reaches every splice
    /// as a recheck), and again once the reader paused for a handoff.
    #[tokio::test]
    async fn a_half_closed_splice_sweeps_only_while_no_event_can_come() {
        let Some(kernel) = load_or_skip(small(), None) else {
            return;
        };
        kernel.start_events().unwrap();
        let (mut offload, _sockets) = spliced_offload(&kernel);
        let longer_than_a_sweep = offload::SWEEP_INTERVAL + std::time::Duration::from_millis(500);
        assert!(
            !state_check_within(&mut offload, true, longer_than_a_sweep).await,
            "no sweep while events come"
        );
        kernel.pause_events().await.unwrap();
        assert!(
            state_check_within(&mut offload, true, 2 * longer_than_a_sweep).await,
            "a sweep once no event can come"
        );
    }

    /// The sock_ops program runs before the kernel stores a socket's new state
    /// (`tcp_set_state`), so an event may report CLOSE while the socket still reads as
    /// before: the Offload keeps what the event said, for its side only.
    #[tokio::test]
    async fn an_event_reporting_close_is_kept_whatever_the_socket_reads() {
        let Some(kernel) = load_or_skip(small(), None) else {
            return;
        };
        let (mut offload, sockets) = spliced_offload(&kernel);
        let proxy_client = sockets[1].as_fd();
        let event = smartproxy_common::SocketEvent {
            cookie: socket_cookie(proxy_client).unwrap(),
            timestamp_ns: 0,
            // CLOSE_WAIT to CLOSE (`include/net/tcp_states.h`): an RST after the peer's FIN.
            old_state: 8,
            new_state: 7,
        };
        kernel.inner.registry.dispatch(bytemuck::bytes_of(&event));
        assert!(
            state_check_within(&mut offload, false, std::time::Duration::from_secs(1)).await,
            "the event makes a check due"
        );
        assert!(offload.reported_closed(Side::Client));
        assert!(!offload.reported_closed(Side::Backend));
        assert_eq!(tcp_state(proxy_client).unwrap(), TcpState::Established);
    }

    /// A reader that ends other than by a pause (here its runtime shuts down; a failed fd
    /// ends it the same way) closes the queues of the splices it served, which then watch
    /// their sockets themselves, and the kernel no longer counts as read, so that splices
    /// made later do not wait for events either.
    #[test]
    fn a_reader_that_ends_unpaused_stops_reading() {
        let Some(kernel) = load_or_skip(small(), None) else {
            return;
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (mut offload, _sockets) = runtime.block_on(async {
            kernel.start_events().unwrap();
            spliced_offload(&kernel)
        });
        assert!(kernel.reads_events());
        drop(runtime);
        assert!(!kernel.reads_events(), "the reader's runtime is gone");
        let other = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        other.block_on(async {
            std::future::poll_fn(|cx| {
                offload.poll_state_check(cx, false);
                Poll::Ready(())
            })
            .await;
            assert!(offload.events_stopped(), "its queue was closed");
            let (later, _sockets) = spliced_offload(&kernel);
            assert!(later.watches_reads(crate::vocab::Direction::ClientToBackend));
            assert!(!later.parkable());
        });
    }

    /// An adopted splice may park at once only if neither socket shows what its
    /// predecessor's events could have announced: a quiet one settles the adoption's check,
    /// and once events are read it is parkable and watches no socket for reads; one whose
    /// client's FIN waits does not, and its check stays due.
    #[tokio::test]
    async fn an_adopted_splice_settles_only_when_its_sockets_show_nothing() {
        use std::net::Shutdown;
        use std::time::{Duration, Instant};

        use crate::vocab::Direction;

        let Some(kernel) = load_or_skip(small(), None) else {
            return;
        };
        let (offload, sockets) = spliced_offload(&kernel);
        let readopt = |offload: Offload| {
            Offload::adopt(
                &kernel,
                sockets[1].as_fd(),
                sockets[2].as_fd(),
                Arc::new(crate::datapath::Meter::default()),
                offload.export(),
            )
            .unwrap()
        };
        let mut quiet = readopt(offload);
        assert!(!quiet.parkable(), "adopted: a check is due");
        assert!(quiet.settle_adoption());
        kernel.start_events().unwrap();
        assert!(quiet.parkable());
        for direction in Direction::BOTH {
            assert!(!quiet.watches_reads(direction), "{direction}");
        }

        let mut waiting_fin = readopt(quiet);
        sockets[0].shutdown(Shutdown::Write).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !waiting_fin.may_have_bytes_to_read(Direction::ClientToBackend) {
            assert!(
                Instant::now() < deadline,
                "the FIN reached the proxy's socket"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!waiting_fin.settle_adoption());
        assert!(!waiting_fin.parkable(), "its check stays due");
    }

    /// Events lost while no reader ran (paused for an upgrade that then failed) reach
    /// every splice as a recheck once reading resumes; losses it was told of already do
    /// not come again. (Each reader used to start from the count it found.)
    #[tokio::test]
    async fn events_lost_while_paused_are_told_when_reading_resumes() {
        use std::time::Duration;

        let Some(kernel) = load_or_skip(small(), None) else {
            return;
        };
        kernel.start_events().unwrap();
        let (mut offload, _sockets) = spliced_offload(&kernel);
        kernel.pause_events().await.unwrap();
        count_lost_events(&kernel, 3);
        kernel.start_events().unwrap();
        assert!(
            state_check_within(&mut offload, false, Duration::from_secs(5)).await,
            "the losses during the pause make a check due"
        );
        kernel.pause_events().await.unwrap();
        kernel.start_events().unwrap();
        assert!(
            !state_check_within(&mut offload, false, Duration::from_millis(300)).await,
            "no loss since"
        );
    }

    /// An upgrade that fails after the pause: the old process resumes reading, and gets
    /// the state change that arrived while it did not read, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn paused_events_resume_where_they_stopped() {
        use std::net::{Shutdown, TcpListener, TcpStream};
        use std::os::fd::AsFd;
        use std::time::Duration;

        let Some(kernel) = load_or_skip(small(), None) else {
            return;
        };
        kernel.start_events().unwrap();
        kernel.pause_events().await.unwrap();
        kernel.pause_events().await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let proxy_client = listener.accept().unwrap().0;
        let back = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy_backend = TcpStream::connect(back.local_addr().unwrap()).unwrap();
        let _backend = back.accept().unwrap().0;
        let mut splice = kernel
            .splice(proxy_client.as_fd(), proxy_backend.as_fd())
            .unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(kernel.stats().events, 0, "paused: nothing read");
        kernel.start_events().unwrap();
        async fn next(splice: &mut Splice) -> SpliceEvent {
            tokio::time::timeout(Duration::from_secs(5), splice.next_event())
                .await
                .expect("an event")
                .expect("reader running")
        }
        assert_eq!(
            next(&mut splice).await,
            SpliceEvent::Recheck,
            "spliced while no reader ran: its events may have gone to another process's"
        );
        let event = next(&mut splice).await;
        let SpliceEvent::State(change) = event else {
            panic!("a state change, not {event:?}");
        };
        assert_eq!(change.new, TcpState::CloseWait);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(kernel.stats().events, 1);
    }
}
