//! Kernel data path: loads the eBPF programs, splices socket pairs into the sockhash, and
//! delivers TCP state changes of spliced sockets from the ring buffer.
//!
//! The facts behind every rule here were measured on the target kernel and are collected in
//! KERNEL-NOTES.md; comments point there instead of repeating the measurements.
//!
//! - [`Kernel::load`] loads the object built by `build.rs`, attaches the stream verdict to the
//!   `SOCKETS` sockhash and the sock_ops program to the proxy's own cgroup v2, and spawns a
//!   tokio task that reads `EVENTS`.
//! - [`Kernel::splice`] hands a routed client/backend pair to the kernel. The returned
//!   [`Splice`] yields that pair's [`StateChange`]s, reads its per-direction counters, tells
//!   when a direction's redirected bytes have all reached the peer socket
//!   ([`Splice::delivered`]), and undoes everything when dropped.
//!
//! Sockets created before the first `load` (in this process) may not be covered: see
//! [`proxy_cgroup`].

use std::{
    collections::{HashMap as StdHashMap, VecDeque},
    fmt, fs, io,
    mem::{size_of, MaybeUninit},
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    task::{Context, Poll, Waker},
};

use aya::{
    maps::{HashMap, MapData, MapError, MapKeys, PerCpuArray, RingBuf, SockHash},
    programs::{CgroupAttachMode, ProgramError, SkSkb, SockOps},
    Ebpf, EbpfLoader,
};
use smartproxy_common::{
    Control, Flow, SocketEvent, DEFAULT_MAX_SOCKETS, DEFAULT_RING_BUFFER_BYTES, MAP_CONTROL,
    MAP_EVENTS, MAP_EVENTS_LOST, MAP_FLOWS, MAP_SOCKETS, MAP_TARGETS, PROG_REDIRECT,
    PROG_STATE_EVENTS,
};
use tokio::{
    io::{unix::AsyncFd, Interest},
    task::JoinHandle,
};

use crate::lifecycle::{Direction, Side};

/// The eBPF object `build.rs` built from `smartproxy-ebpf` (empty when built with
/// `AYA_BUILD_SKIP=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/smartproxy-ebpf"));

/// The default of [`LoadOptions::max_queued_bytes`] and of `proxy.max_queued_bytes`.
/// Measured with `cargo xtask bench` on loopback: at 4 MiB fast readers hit the cap all
/// the time (5-12 % of their bytes went through the kernel); at 16 MiB 63-96 % did, and a
/// slow reader still holds at most about twice the cap.
pub const DEFAULT_MAX_QUEUED_BYTES: u64 = 16 * 1024 * 1024;

/// `SO_RCVBUF` of spliced sockets (the kernel doubles the value): what a paused sender
/// may fill, pinned so that autotuning cannot grow it to many MB (KERNEL-NOTES
/// "Backpressure").
const SPLICED_RECEIVE_BUFFER: usize = 512 * 1024;

/// What userspace reads at once from a spliced socket whose verdict passes a stream: its
/// whole receive queue. The verdict redirects again only once userspace has forwarded
/// every byte it passed; a fast sender refills a queue read in 64 KiB steps before that
/// moment comes, and the connection stays on the userspace copy (bench, bulk: 62-85 % of
/// the bytes through the kernel with 64 KiB reads, 94-98 % with whole-queue reads).
pub const PASSED_READ_BYTES: usize = 2 * SPLICED_RECEIVE_BUFFER;

/// How much more a spliced socket's send buffer holds than `max_queued_bytes`: room for
/// the skb that crosses the cap, plus skb overhead.
const SEND_BUFFER_MARGIN: u64 = 1024 * 1024;

/// Flag for map updates: fail with EEXIST instead of replacing an entry.
const BPF_NOEXIST: u64 = 1;

/// What [`Splice::may_write`] waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The kernel's backlog toward the destination is in its send queue (before a FIN).
    Delivered,
    /// That, and the send queue has room under `max_queued_bytes` (before bytes).
    Room,
}

/// Why the kernel data path could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this binary was built without its eBPF object (AYA_BUILD_SKIP was set at build time)"
    )]
    NotBuilt,
    #[error("ring buffer size {0} is not a power of two of at least one page")]
    RingBufferSize(u32),
    #[error("maps for {0} connections would need more than u32::MAX entries")]
    MapSize(u32),
    #[error("no tokio runtime: Kernel::load spawns the ring-buffer reader on the current one")]
    NoRuntime,
    #[error("failed to load the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("map {map}: {step} failed")]
    Map {
        map: &'static str,
        step: &'static str,
        #[source]
        source: MapError,
    },
    #[error("program {program}: {step} failed")]
    Program {
        program: &'static str,
        step: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("cgroup v2: {step} {}", path.display())]
    Cgroup {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("ring buffer {MAP_EVENTS}: registering its fd with tokio failed")]
    RingBufPoll(#[source] io::Error),
}

/// What [`Kernel::load`] may be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Size of the `EVENTS` ring buffer in bytes: a power of two, at least one page. Each event
    /// takes 32 bytes (24 + header); when it is full, events are counted as lost.
    pub ring_buffer_bytes: u32,
    /// How many spliced connections `FLOWS`, `CONTROL`, `TARGETS` and `SOCKETS` hold (two
    /// entries each); a splice beyond it fails with [`SpliceError::map_full`]. At most
    /// `u32::MAX / 2`.
    pub max_connections: u32,
    /// Per direction, the most bytes that may be on their way to the peer (redirected or
    /// forwarded, not yet acknowledged by the peer) before the verdict passes instead of
    /// redirecting, so that the sender's window closes.
    pub max_queued_bytes: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            ring_buffer_bytes: DEFAULT_RING_BUFFER_BYTES,
            max_connections: DEFAULT_MAX_SOCKETS / 2,
            max_queued_bytes: DEFAULT_MAX_QUEUED_BYTES,
        }
    }
}

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
    shared: Arc<Shared>,
    reader: JoinHandle<()>,
    /// Keeps the programs loaded and the sock_ops link attached; dropping it detaches them.
    _ebpf: Ebpf,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// State shared with the ring-buffer reader task.
#[derive(Default)]
struct Shared {
    /// Socket cookie -> the splice it belongs to.
    registry: Mutex<StdHashMap<u64, Registration>>,
    events: AtomicU64,
    sockhash_entries: AtomicU64,
}

struct Registration {
    side: Side,
    events: Arc<EventQueue>,
}

/// One splice's state changes, from the ring-buffer reader to its relay. It allocates
/// nothing until a change arrives: an unbounded channel would allocate a block of slots
/// for every idle connection.
#[derive(Debug, Default)]
struct EventQueue(Mutex<EventQueueState>);

#[derive(Debug, Default)]
struct EventQueueState {
    changes: VecDeque<StateChange>,
    waker: Option<Waker>,
    /// The reader stopped: no change will come any more.
    closed: bool,
}

impl EventQueue {
    fn push(&self, change: StateChange) {
        let waker = {
            let mut state = lock(&self.0);
            state.changes.push_back(change);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn close(&self) {
        let waker = {
            let mut state = lock(&self.0);
            state.closed = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<StateChange>> {
        let mut state = lock(&self.0);
        if let Some(change) = state.changes.pop_front() {
            return Poll::Ready(Some(change));
        }
        if state.closed {
            return Poll::Ready(None);
        }
        if !state
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.waker = Some(cx.waker().clone());
        }
        Poll::Pending
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
    /// Loads and attaches everything; spawns the ring-buffer reader task on the current tokio
    /// runtime (so this must be called from within one).
    ///
    /// The sock_ops program is attached to the cgroup v2 this process runs in, moving the
    /// process out of the root cgroup first (see [`proxy_cgroup`]). It is attached with a
    /// bpf_link, which the kernel always treats as multi-attach: several `Kernel`s (proxies,
    /// parallel tests) can attach at once, and a killed process leaves nothing attached.
    pub fn load(opts: LoadOptions) -> Result<Kernel, EbpfError> {
        let LoadOptions {
            ring_buffer_bytes,
            max_connections,
            max_queued_bytes,
        } = opts;
        if OBJECT.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        if !ring_buffer_bytes.is_power_of_two() || (ring_buffer_bytes as usize) < page_size() {
            return Err(EbpfError::RingBufferSize(ring_buffer_bytes));
        }
        let max_sockets = max_connections
            .checked_mul(2)
            .ok_or(EbpfError::MapSize(max_connections))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| EbpfError::NoRuntime)?;
        let cgroup = proxy_cgroup()?;

        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_EVENTS, ring_buffer_bytes)
            .map_max_entries(MAP_TARGETS, max_sockets)
            .map_max_entries(MAP_SOCKETS, max_sockets)
            .map_max_entries(MAP_FLOWS, max_sockets)
            .map_max_entries(MAP_CONTROL, max_sockets)
            .load(OBJECT)
            .map_err(EbpfError::Load)?;

        let targets: SockHash<_, u64> = take_map(&mut ebpf, MAP_TARGETS)?;
        let sockets: SockHash<_, u64> = take_map(&mut ebpf, MAP_SOCKETS)?;
        let flows: HashMap<_, u64, Flow> = take_map(&mut ebpf, MAP_FLOWS)?;
        let control: HashMap<_, u64, Control> = take_map(&mut ebpf, MAP_CONTROL)?;
        let events: RingBuf<_> = take_map(&mut ebpf, MAP_EVENTS)?;
        let events_lost: PerCpuArray<_, u64> = take_map(&mut ebpf, MAP_EVENTS_LOST)?;

        let verdict: &mut SkSkb = program(&mut ebpf, PROG_REDIRECT)?;
        verdict
            .load()
            .map_err(program_error(PROG_REDIRECT, "load"))?;
        verdict
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

        let shared = Arc::new(Shared::default());
        let events = {
            let _entered = runtime.enter();
            // SAFETY: the RingBuf owns its map's fd (aya's MapData holds an OwnedFd) and
            // always returns that same fd; it moves into the AsyncFd and closes only with it.
            unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
                .map_err(|e| EbpfError::RingBufPoll(e.into_parts().1))?
        };
        let reader = runtime.spawn(read_events(events, Arc::clone(&shared)));
        tracing::info!(
            cgroup = %cgroup.display(),
            ring_buffer_bytes,
            max_connections,
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
                shared,
                reader,
                _ebpf: ebpf,
            }),
        })
    }

    /// Hands a routed pair to the kernel: from now on each socket's received bytes are
    /// redirected to the other one's send path.
    ///
    /// Both sockets must be established TCP sockets, and the caller must keep them open for as
    /// long as the returned [`Splice`] lives (it keeps their raw fds, for [`Splice::delivered`]).
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
    /// No byte was redirected by then, so the stream stays whole.
    pub fn splice(
        &self,
        client: BorrowedFd<'_>,
        backend: BorrowedFd<'_>,
    ) -> Result<Splice, SpliceError> {
        let client = SpliceSocket::read(Side::Client, client)?;
        let backend = SpliceSocket::read(Side::Backend, backend)?;
        let events = Arc::new(EventQueue::default());
        self.inner.shared.register(
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
        let shared = &self.inner.shared;
        let events_lost = match self.inner.events_lost.get(&0, 0) {
            Ok(per_cpu) => per_cpu.iter().sum(),
            Err(err) => {
                tracing::warn!(error = %err, map = MAP_EVENTS_LOST, "reading the lost-event counter failed");
                0
            }
        };
        KernelStats {
            sockhash_entries: shared.sockhash_entries.load(Ordering::Relaxed),
            events: shared.events.load(Ordering::Relaxed),
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

impl Shared {
    /// Registers both cookies, or neither if one is already spliced.
    fn register(
        &self,
        sockets: &[(u64, Side); 2],
        events: &Arc<EventQueue>,
    ) -> Result<(), SpliceError> {
        let mut registry = lock(&self.registry);
        if let Some((_, side)) = sockets.iter().find(|(c, _)| registry.contains_key(c)) {
            return Err(SpliceError::new(
                *side,
                SpliceStep::Register,
                io::Error::new(io::ErrorKind::AlreadyExists, "socket is already spliced"),
            ));
        }
        for (cookie, side) in sockets {
            registry.insert(
                *cookie,
                Registration {
                    side: *side,
                    events: Arc::clone(events),
                },
            );
        }
        Ok(())
    }

    fn dispatch(&self, bytes: &[u8]) {
        let Some(raw) = bytes.get(..size_of::<SocketEvent>()) else {
            debug_assert!(
                false,
                "ring buffer record of {} bytes is shorter than SocketEvent",
                bytes.len()
            );
            return;
        };
        let event: SocketEvent = bytemuck::pod_read_unaligned(raw);
        self.events.fetch_add(1, Ordering::Relaxed);
        let registry = lock(&self.registry);
        // A socket whose splice was just dropped may still report a change: nobody listens.
        if let Some(Registration { side, events }) = registry.get(&event.cookie) {
            events.push(StateChange {
                side: *side,
                old: TcpState::from(event.old_state),
                new: TcpState::from(event.new_state),
                at_ns: event.timestamp_ns,
            });
        }
    }
}

/// Reads `EVENTS` until the fd fails; then drops every registration so that
/// [`Splice::next_event`] returns `None` instead of waiting forever.
async fn read_events(mut ring: AsyncFd<RingBuf<MapData>>, shared: Arc<Shared>) {
    loop {
        let mut guard = match ring.readable_mut().await {
            Ok(guard) => guard,
            Err(err) => {
                tracing::error!(error = %err, "eBPF ring buffer reader stopped; no more socket events");
                break;
            }
        };
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            shared.dispatch(&item);
        }
        guard.clear_ready();
    }
    for (_, registration) in lock(&shared.registry).drain() {
        registration.events.close();
    }
}

/// Why [`Kernel::splice`] failed (or fell back to passing), which socket and step.
#[derive(Debug, thiserror::Error)]
#[error("splice: {step} of the {side} socket failed")]
pub struct SpliceError {
    pub side: Side,
    pub step: SpliceStep,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl SpliceError {
    pub(crate) fn new(
        side: Side,
        step: SpliceStep,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            side,
            step,
            source: source.into(),
        }
    }

    /// Whether a map had no room for the pair: an insert failed with E2BIG, which the
    /// kernel's hash maps and sockhashes return when they hold `max_entries` already.
    pub fn map_full(&self) -> bool {
        let inserted = matches!(
            self.step,
            SpliceStep::Flows | SpliceStep::Targets | SpliceStep::Sockets
        );
        inserted
            && matches!(
                self.source.downcast_ref::<MapError>(),
                Some(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG)
            )
    }
}

/// The steps of [`Kernel::splice`], in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpliceStep {
    /// `getsockopt(SO_COOKIE)`.
    Cookie,
    /// `TCP_INFO` / `SIOCOUTQ`, the drain baseline.
    Baseline,
    /// Registering the cookie for events.
    Register,
    /// `CONTROL` or `FLOWS` insert.
    Flows,
    /// `setsockopt` of the buffer sizes.
    Buffers,
    /// `TARGETS` insert.
    Targets,
    /// `SOCKETS` insert.
    Sockets,
    /// `setsockopt(SO_RCVLOWAT, 1)`.
    RcvLowat,
    /// The `CONTROL` update that switches a direction from pass to redirect.
    Redirect,
}

impl fmt::Display for SpliceStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpliceStep::Cookie => "getsockopt(SO_COOKIE)",
            SpliceStep::Baseline => "reading the send counters (TCP_INFO, SIOCOUTQ)",
            SpliceStep::Register => "registering for events",
            SpliceStep::Flows => "CONTROL/FLOWS insert",
            SpliceStep::Targets => "TARGETS insert",
            SpliceStep::Sockets => "SOCKETS insert",
            SpliceStep::RcvLowat => "setsockopt(SO_RCVLOWAT)",
            SpliceStep::Buffers => "setsockopt(SO_RCVBUFFORCE/SO_SNDBUFFORCE)",
            SpliceStep::Redirect => "CONTROL update to redirect",
        })
    }
}

/// A TCP state change of one socket of a splice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateChange {
    /// Which of the proxy's two sockets changed.
    pub side: Side,
    pub old: TcpState,
    pub new: TcpState,
    /// CLOCK_MONOTONIC nanoseconds (`bpf_ktime_get_ns`) of the change.
    pub at_ns: u64,
}

/// Linux TCP socket states (`include/net/tcp_states.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpState {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    /// The peer sent its FIN.
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    BoundInactive,
    /// A number this code does not know.
    Other(u32),
}

impl From<u32> for TcpState {
    fn from(state: u32) -> Self {
        match state {
            1 => TcpState::Established,
            2 => TcpState::SynSent,
            3 => TcpState::SynRecv,
            4 => TcpState::FinWait1,
            5 => TcpState::FinWait2,
            6 => TcpState::TimeWait,
            7 => TcpState::Close,
            8 => TcpState::CloseWait,
            9 => TcpState::LastAck,
            10 => TcpState::Listen,
            11 => TcpState::Closing,
            12 => TcpState::NewSynRecv,
            13 => TcpState::BoundInactive,
            other => TcpState::Other(other),
        }
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
    /// (`bpf_ktime_get_ns`; compare with `datapath::monotonic_ns()`); 0 = none yet.
    pub last_activity_ns: u64,
}

/// One socket of a splice.
#[derive(Debug)]
struct SpliceSocket {
    side: Side,
    fd: RawFd,
    cookie: u64,
    /// `tcpi_bytes_acked + SIOCOUTQ` at splice time: everything written to the socket before
    /// (plus the SYN on connected sockets, which `bytes_acked` counts).
    handed_at_splice: u64,
    /// `tcpi_bytes_acked` at splice time.
    acked_at_splice: u64,
    /// `SIOCINQ` at splice time: bytes received before the splice, not read yet.
    queued_at_splice: u64,
}

impl SpliceSocket {
    fn read(side: Side, fd: BorrowedFd<'_>) -> Result<Self, SpliceError> {
        let cookie =
            socket_cookie(fd).map_err(|e| SpliceError::new(side, SpliceStep::Cookie, e))?;
        let (acked_at_splice, outq) =
            acked_and_outq(fd).map_err(|e| SpliceError::new(side, SpliceStep::Baseline, e))?;
        let queued_at_splice =
            bytes_to_read(fd).map_err(|e| SpliceError::new(side, SpliceStep::Baseline, e))?;
        Ok(Self {
            side,
            fd: fd.as_raw_fd(),
            cookie,
            handed_at_splice: acked_at_splice + outq,
            acked_at_splice,
            queued_at_splice,
        })
    }

    fn borrow(&self) -> BorrowedFd<'_> {
        // SAFETY: `Kernel::splice` requires the caller to keep the socket open while the
        // Splice lives. Even if it broke that contract, the fd is only passed to
        // getsockopt/ioctl, which cannot touch memory outside the buffers we give them.
        unsafe { BorrowedFd::borrow_raw(self.fd) }
    }
}

/// Which steps of [`Kernel::splice`] completed, per socket (`[client, backend]`), so that
/// undoing removes exactly those.
#[derive(Debug, Default)]
struct Done {
    control: [bool; 2],
    flows: [bool; 2],
    targets: [bool; 2],
    sockets: [bool; 2],
}

/// A routed pair whose bytes move in the kernel. Dropping it removes its `FLOWS`, `SOCKETS`
/// and `TARGETS` entries and its event registration; from then on received bytes stay in the
/// sockets' own receive queues.
pub struct Splice {
    kernel: Kernel,
    client: SpliceSocket,
    backend: SpliceSocket,
    events: Arc<EventQueue>,
    /// Userspace's copy of each source's `CONTROL` entry, `[client, backend]`: every update
    /// writes the whole value.
    control: [Control; 2],
    done: Done,
    /// Set when the splice could not complete and passes every byte to userspace.
    fallback: Option<SpliceError>,
}

impl fmt::Debug for Splice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Splice")
            .field("client", &self.client)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Splice {
    /// The next state change of either socket. Only changes after the splice are reported (a
    /// FIN that arrived before it is not), so callers check [`tcp_state`] once after
    /// splicing. `None` means the event reader stopped (it logs why); fall back to polling
    /// [`tcp_state`] then.
    pub async fn next_event(&mut self) -> Option<StateChange> {
        std::future::poll_fn(|cx| self.events.poll_next(cx)).await
    }

    /// Like [`Splice::next_event`], for hand-written futures.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<StateChange>> {
        self.events.poll_next(cx)
    }

    /// The verdict's counters for the direction whose bytes come from `source`.
    pub fn flow(&self, source: Side) -> io::Result<FlowCounters> {
        self.kernel.flow_counters(self.socket(source).cookie)
    }

    /// Whether a read from `source` would find anything now: bytes the verdict passed up, a
    /// FIN or an error. Asked with `poll`, which takes no socket lock; a failed `poll` says
    /// yes, and the read then finds out.
    ///
    /// Otherwise the socket was readable only for a moment (the verdict wakes its readers
    /// after every skb, also one it redirects), and a read must not be tried: it holds the
    /// socket, and skbs that arrive meanwhile wait in its backlog. TCP counts that whole
    /// backlog against the receive buffer until it has processed all of it, and a
    /// retransmission in it is acknowledged at once, with the window that leaves: after a
    /// window's worth, zero or less than one segment. The verdict then takes the bytes, so
    /// no read announces the reopened window, and the sender waits for its persist timer
    /// (200 ms on loopback). Bench bulk transfers stalled so in about one run in eight.
    pub fn may_have_bytes_to_read(&self, source: Side) -> bool {
        readable_now(self.socket(source).borrow()).unwrap_or(true)
    }

    /// Whether userspace may write to the destination of `source`'s bytes now.
    ///
    /// Always, for a FIN (`Wait::Delivered`): every byte the verdict redirected from
    /// `source`, plus `written` bytes that userspace wrote to the destination itself since
    /// the splice, has been taken into the destination socket's send queue:
    /// `(tcpi_bytes_acked + SIOCOUTQ)` of the destination, minus that value at splice
    /// time, is at least `redirected + written` (KERNEL-NOTES drain rule). Only then may
    /// userspace write or pass a FIN on with `shutdown(SHUT_WR)` without overtaking the
    /// kernel's backlog. The wait can be long (hundreds of MB may be queued), so do not put
    /// a short timeout on it.
    ///
    /// For bytes (`Wait::Room`), also: the destination's send queue holds less than
    /// `max_queued_bytes`, the bound the verdict keeps. Its send buffer is pinned above
    /// the cap; filled to the brim, it would wake a writer only once a third of it drained,
    /// which at a slow reader's pace keeps the source's window shut long enough for its
    /// sender to probe it (zero-window probes that a direct connection does not see).
    pub fn may_write(&self, source: Side, written: u64, wait: Wait) -> io::Result<bool> {
        let redirected = self.flow(source)?.redirected;
        let dest = self.socket(source.peer());
        let (acked, outq) = acked_and_outq(dest.borrow())?;
        let handed = (acked + outq).saturating_sub(dest.handed_at_splice);
        let delivered = handed >= redirected.saturating_add(written);
        Ok(match wait {
            Wait::Delivered => delivered,
            Wait::Room => delivered && outq < self.kernel.inner.max_queued_bytes,
        })
    }

    /// Whether the destination of `source`'s bytes has acknowledged every one of them: each
    /// byte the verdict redirected and the `written` bytes userspace wrote since the splice
    /// left its send queue and reached the peer's receiver. Only then does an abort (which
    /// discards the send queue) lose nothing of what `source` sent.
    pub fn acknowledged(&self, source: Side, written: u64) -> io::Result<bool> {
        let redirected = self.flow(source)?.redirected;
        let dest = self.socket(source.peer());
        let (acked, _) = acked_and_outq(dest.borrow())?;
        Ok(acked.saturating_sub(dest.handed_at_splice) >= redirected.saturating_add(written))
    }

    /// Tells the verdict that userspace has written `flushed` bytes it read from `source`
    /// to the peer. Once that is every byte the verdict passed, it redirects again.
    pub fn flushed(&mut self, source: Side, flushed: u64) -> io::Result<()> {
        self.control[index(source)].flushed = flushed;
        self.write_control(source)
    }

    /// Makes the verdict pass every byte of `source` from now on, so that nothing more is
    /// redirected toward a destination userspace is about to shut. Returns once no verdict
    /// run that still saw the old value can be in progress: `SIOCINQ` takes the source
    /// socket's lock, which the verdict holds while it runs (it runs from the socket's
    /// data-ready callback). After that, the verdict's `redirected` count is final.
    pub fn stop_redirecting(&mut self, source: Side) -> io::Result<()> {
        self.control[index(source)].redirect = 0;
        self.write_control(source)?;
        bytes_to_read(self.socket(source).borrow()).map(drop)
    }

    /// Why the splice could not complete, if it did not: its verdict then passes every
    /// byte to userspace.
    pub fn fallback(&self) -> Option<&SpliceError> {
        self.fallback.as_ref()
    }

    fn write_control(&self, source: Side) -> io::Result<()> {
        let cookie = self.socket(source).cookie;
        lock(&self.kernel.inner.control)
            .insert(cookie, self.control[index(source)], 0)
            .map_err(|e| {
                io::Error::other(format!("{MAP_CONTROL} update for the {source} socket: {e}"))
            })
    }

    /// Socket cookie of one side (the key of its map entries).
    pub fn cookie(&self, side: Side) -> u64 {
        self.socket(side).cookie
    }

    fn socket(&self, side: Side) -> &SpliceSocket {
        match side {
            Side::Client => &self.client,
            Side::Backend => &self.backend,
        }
    }

    /// The map inserts of [`Kernel::splice`], recording each success in `self.done`.
    fn attach(&mut self) -> Result<(), SpliceError> {
        let inner = Arc::clone(&self.kernel.inner);
        let pair = [&self.client, &self.backend].map(|s| (s.side, s.fd, s.cookie));
        for (i, (side, _, cookie)) in pair.into_iter().enumerate() {
            lock(&inner.control)
                .insert(cookie, self.control[i], BPF_NOEXIST)
                .map_err(|e| SpliceError::new(side, SpliceStep::Flows, e))?;
            self.done.control[i] = true;
        }
        for (i, socket) in [&self.client, &self.backend].into_iter().enumerate() {
            pin_buffers(socket.borrow(), inner.max_queued_bytes)
                .map_err(|e| SpliceError::new(socket.side, SpliceStep::Buffers, e))?;
            let flow = Flow {
                peer_cookie: pair[1 - i].2,
                acked: socket.acked_at_splice,
                acked_base: socket.handed_at_splice,
                pass_first: socket.queued_at_splice,
                ..Flow::default()
            };
            let (side, cookie) = (socket.side, socket.cookie);
            lock(&inner.flows)
                .insert(cookie, flow, BPF_NOEXIST)
                .map_err(|e| SpliceError::new(side, SpliceStep::Flows, e))?;
            self.done.flows[i] = true;
        }
        // Both must be targets before either gets the verdict: a redirect to a missing target
        // would drop ACKed bytes (KERNEL-NOTES).
        for (i, (side, fd, cookie)) in pair.into_iter().enumerate() {
            lock(&inner.targets)
                .insert(cookie, fd, BPF_NOEXIST)
                .map_err(|e| SpliceError::new(side, SpliceStep::Targets, e))?;
            self.done.targets[i] = true;
        }
        for (i, (side, fd, cookie)) in pair.into_iter().enumerate() {
            #[cfg(feature = "test-hooks")]
            if i == 1 {
                test_hooks::pause_between_sockets_inserts();
            }
            lock(&inner.sockets)
                .insert(cookie, fd, BPF_NOEXIST)
                .map_err(|e| SpliceError::new(side, SpliceStep::Sockets, e))?;
            self.done.sockets[i] = true;
            inner
                .shared
                .sockhash_entries
                .fetch_add(1, Ordering::Relaxed);
        }
        // Bytes queued before the insert may otherwise sit until the next skb arrives; this
        // calls the data-ready hook, which runs them through the verdict (in pass mode).
        for socket in [&self.client, &self.backend] {
            set_rcvlowat(socket.borrow(), 1)
                .map_err(|e| SpliceError::new(socket.side, SpliceStep::RcvLowat, e))?;
        }
        // Both sockets are in: the verdict may redirect. Either both directions do, or
        // neither (a direction left redirecting alone would still be correct, but booking
        // the connection on one path must be true of both).
        for (i, side) in [Side::Client, Side::Backend].into_iter().enumerate() {
            self.control[i].redirect = 1;
            if let Err(e) = self.write_control(side) {
                for side in [Side::Client, Side::Backend] {
                    self.control[index(side)].redirect = 0;
                    let _ = self.write_control(side);
                }
                return Err(SpliceError::new(side, SpliceStep::Redirect, e));
            }
        }
        Ok(())
    }

    /// Removes every entry `attach` made. Never panics.
    fn undo(&mut self) {
        let inner = Arc::clone(&self.kernel.inner);
        let cookies = [self.client.cookie, self.backend.cookie];
        // SOCKETS first so the verdict stops before its targets and counters go.
        for (i, cookie) in cookies.iter().enumerate() {
            if std::mem::take(&mut self.done.sockets[i]) {
                inner
                    .shared
                    .sockhash_entries
                    .fetch_sub(1, Ordering::Relaxed);
                remove_logged(MAP_SOCKETS, lock(&inner.sockets).remove(cookie));
            }
        }
        for (i, cookie) in cookies.iter().enumerate() {
            if std::mem::take(&mut self.done.targets[i]) {
                remove_logged(MAP_TARGETS, lock(&inner.targets).remove(cookie));
            }
        }
        for (i, cookie) in cookies.iter().enumerate() {
            if std::mem::take(&mut self.done.flows[i]) {
                remove_logged(MAP_FLOWS, lock(&inner.flows).remove(cookie));
            }
            if std::mem::take(&mut self.done.control[i]) {
                remove_logged(MAP_CONTROL, lock(&inner.control).remove(cookie));
            }
        }
        let mut registry = lock(&inner.shared.registry);
        for cookie in cookies {
            registry.remove(&cookie);
        }
    }
}

impl Drop for Splice {
    fn drop(&mut self) {
        self.undo();
    }
}

/// Logs a failed removal, except "not found": the kernel removes a socket from sockhashes
/// itself when it is closed.
fn remove_logged(map: &'static str, result: Result<(), MapError>) {
    match result {
        Ok(()) => {}
        Err(MapError::ElementNotFound) => {}
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
        Err(err) => tracing::warn!(map, error = %err, "removing a splice entry failed"),
    }
}

/// The cgroup v2 the sock_ops program is attached to: this process's own.
///
/// The mount point comes from `/proc/self/mountinfo` (type `cgroup2`), the path from the
/// `0::` line of `/proc/self/cgroup`. If the process sits in the root cgroup, it first
/// creates `<mount>/smartproxy` and moves itself there: attached to the root, the program
/// would run for every TCP socket of the host (KERNEL-NOTES measured it there), and each of
/// them would pay for a state-change callback and a map lookup. Sockets keep the cgroup they
/// were created in (accepted sockets: their listener's), so sockets and listeners created
/// before that move are not covered; create them after the first `Kernel::load`, or call
/// this function first.
pub fn proxy_cgroup() -> Result<PathBuf, EbpfError> {
    let mountinfo = read_proc("/proc/self/mountinfo")?;
    let mount = cgroup2_mount(&mountinfo).ok_or_else(|| EbpfError::Cgroup {
        step: "find a cgroup2 mount in",
        path: "/proc/self/mountinfo".into(),
        source: io::Error::new(io::ErrorKind::NotFound, "no cgroup2 file system is mounted"),
    })?;
    let cgroups = read_proc("/proc/self/cgroup")?;
    let own = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| EbpfError::Cgroup {
            step: "find the \"0::\" line in",
            path: "/proc/self/cgroup".into(),
            source: io::Error::new(io::ErrorKind::NotFound, "process has no cgroup v2"),
        })?;
    let own = own.trim().trim_start_matches('/');
    if !own.is_empty() {
        return Ok(mount.join(own));
    }
    let dir = mount.join("smartproxy");
    match fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(EbpfError::Cgroup {
                step: "create",
                path: dir,
                source,
            })
        }
    }
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string()).map_err(|source| EbpfError::Cgroup {
        step: "move this process into",
        path: procs,
        source,
    })?;
    tracing::info!(cgroup = %dir.display(), "moved out of the root cgroup so sock_ops only sees the proxy's sockets");
    Ok(dir)
}

fn read_proc(path: &str) -> Result<String, EbpfError> {
    fs::read_to_string(path).map_err(|source| EbpfError::Cgroup {
        step: "read",
        path: path.into(),
        source,
    })
}

/// Mount point of the first cgroup2 file system in a mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (fields, fs_fields) = line.split_once(" - ")?;
        if fs_fields.split(' ').next()? != "cgroup2" {
            return None;
        }
        let mount_point = fields.split(' ').nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo writes space, tab, newline and backslash as `\ooo` octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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

/// `[client, backend]` arrays are indexed like the direction each side is the source of.
fn index(side: Side) -> usize {
    Direction::from_source(side).index()
}

/// Test builds only (`--features test-hooks`): makes rare kernel races happen every time.
#[cfg(feature = "test-hooks")]
pub mod test_hooks {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    static PAUSE_BETWEEN_SOCKETS_INSERTS_MS: AtomicU64 = AtomicU64::new(0);

    /// Every splice from now on waits `pause` between its two `SOCKETS` inserts, so that a
    /// peer's FIN can arrive in between. Process-wide: for a test binary of its own.
    pub fn set_pause_between_sockets_inserts(pause: Duration) {
        PAUSE_BETWEEN_SOCKETS_INSERTS_MS.store(pause.as_millis() as u64, Ordering::Relaxed);
    }

    pub(super) fn pause_between_sockets_inserts() {
        let ms = PAUSE_BETWEEN_SOCKETS_INSERTS_MS.load(Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave a map half-updated (each guarded
    // operation is one syscall), so a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The system's page size: the ring buffer's size is a multiple of it.
pub fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// `SO_COOKIE` from `asm-generic/socket.h` (the libc crate does not export it).
const SO_COOKIE: libc::c_int = 57;

/// The socket's cookie: the key the eBPF programs see via `bpf_get_socket_cookie`.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    getsockopt::<u64>(fd, libc::SOL_SOCKET, SO_COOKIE)
}

/// The socket's TCP state (`TCP_INFO.tcpi_state`).
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<TcpState> {
    Ok(TcpState::from(u32::from(tcp_info(fd)?.state)))
}

/// Whether the socket is readable (bytes, EOF) or failed, by a `poll` that does not wait.
fn readable_now(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, and the count says one.
    let rc = unsafe { libc::poll(&mut pollfd, 1, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(pollfd.revents != 0)
}

/// `SIOCINQ`: bytes received and not read yet.
pub(crate) fn bytes_to_read(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut inq: libc::c_int = 0;
    // SAFETY: SIOCINQ writes one c_int through the pointer, which points at `inq`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut inq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    u64::try_from(inq).map_err(|_| io::Error::other(format!("SIOCINQ returned {inq}")))
}

/// Whether the peer acknowledged every byte written to the socket (`SIOCOUTQ` is 0): an
/// abort, which discards the send queue, then loses nothing.
pub fn all_acknowledged(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(acked_and_outq(fd)?.1 == 0)
}

/// `(tcpi_bytes_acked, SIOCOUTQ)`: their sum is every byte ever taken into the socket's
/// send queue (plus the SYN, on connected sockets).
fn acked_and_outq(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let acked = tcp_info(fd)?.bytes_acked;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int through the pointer, which points at `outq`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let outq =
        u64::try_from(outq).map_err(|_| io::Error::other(format!("SIOCOUTQ returned {outq}")))?;
    Ok((acked, outq))
}

/// The head of the kernel's `struct tcp_info` (`include/uapi/linux/tcp.h`) up to
/// `tcpi_bytes_acked`; the libc crate's glibc version of the struct stops before it.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpInfoHead {
    state: u8,
    /// ca_state .. the two bitfield bytes.
    _bytes: [u8; 7],
    /// tcpi_rto .. tcpi_total_retrans.
    _words: [u32; 24],
    _pacing_rate: u64,
    _max_pacing_rate: u64,
    bytes_acked: u64,
}

const _: () = assert!(size_of::<TcpInfoHead>() == 128);

fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<TcpInfoHead> {
    getsockopt::<TcpInfoHead>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// `getsockopt` for a plain-data `T`; fails if the kernel returns fewer bytes than `T`.
fn getsockopt<T: Copy>(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, which has room for them.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            value.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < size_of::<T>() {
        return Err(io::Error::other(format!(
            "getsockopt({level}, {name}) returned {len} bytes, expected {}",
            size_of::<T>()
        )));
    }
    // SAFETY: zero-initialised and then fully written by the kernel (checked above); every `T`
    // used here is plain integers, valid for any bit pattern.
    Ok(unsafe { value.assume_init() })
}

/// Pins the receive buffer to [`SPLICED_RECEIVE_BUFFER`], and the send buffer above the
/// cap: the kernel's redirect backlog must never meet a full send queue in the middle of
/// an skb. On 6.18, when the send then returns nothing, it reports EPIPE, drops the skb
/// and disables the socket's send path (lost bytes). The cap counts the whole send
/// queue, so with the send buffer above it, the backlog only ever waits before an skb,
/// which is harmless. The `FORCE` variants (CAP_NET_ADMIN, which the kernel path needs
/// anyway) because `net.core.rmem_max` and `wmem_max` usually clamp the plain ones below
/// these sizes.
fn pin_buffers(fd: BorrowedFd<'_>, max_queued_bytes: u64) -> io::Result<()> {
    // The kernel doubles the sizes it is given (`SPLICED_RECEIVE_BUFFER` already is one).
    let send = (max_queued_bytes + SEND_BUFFER_MARGIN) / 2;
    for (name, bytes) in [
        (libc::SO_RCVBUFFORCE, SPLICED_RECEIVE_BUFFER as u64),
        (libc::SO_SNDBUFFORCE, send),
    ] {
        let bytes = libc::c_int::try_from(bytes)
            .map_err(|_| io::Error::other(format!("buffer of {bytes} bytes is too large")))?;
        set_socket_option(fd, name, bytes)?;
    }
    Ok(())
}

fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    set_socket_option(fd, libc::SO_RCVLOWAT, bytes)
}

/// `setsockopt(SOL_SOCKET, name)` of an int.
fn set_socket_option(fd: BorrowedFd<'_>, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: passes a pointer to a c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_among_v1_mounts() {
        let mountinfo = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
36 25 0:31 / /sys/fs/cgroup/uni\\040fied rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            cgroup2_mount(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/uni fied"))
        );
        assert_eq!(
            cgroup2_mount("26 25 0:24 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

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

    #[test]
    fn unknown_tcp_states_are_kept() {
        assert_eq!(TcpState::from(8), TcpState::CloseWait);
        assert_eq!(TcpState::from(99), TcpState::Other(99));
    }

    #[test]
    fn tcp_state_and_cookie_of_a_connected_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        use std::os::fd::AsFd;
        assert_eq!(tcp_state(client.as_fd()).unwrap(), TcpState::Established);
        assert_eq!(tcp_state(listener.as_fd()).unwrap(), TcpState::Listen);
        let (a, b) = (
            socket_cookie(client.as_fd()).unwrap(),
            socket_cookie(server.as_fd()).unwrap(),
        );
        assert_ne!(a, b, "cookies are unique per socket");
        // Nothing written yet: the baseline is the SYN at most.
        let (acked, outq) = acked_and_outq(client.as_fd()).unwrap();
        assert!(acked + outq <= 1);
    }
}
