//! Why the kernel data path could not load ([`EbpfError`]) or could not splice a pair
//! ([`SpliceError`], at which [`SpliceStep`]).

use std::{fmt, io, path::PathBuf};

use aya::{maps::MapError, programs::ProgramError};
use smartproxy_common::MAP_EVENTS;

use crate::vocab::Side;

/// Why the kernel data path could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this binary was built without its eBPF object (AYA_BUILD_SKIP was set at build time)"
    )]
    NotBuilt,
    #[error("ring buffer size {0} is not a power of two and a multiple of the page size")]
    RingBufferSize(u32),
    #[error("maps for {0} connections would need more than u32::MAX entries")]
    MapSize(u32),
    #[error(
        "no tokio runtime: Kernel::start_events spawns the ring-buffer reader on the current one"
    )]
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
    #[error("ring buffer {MAP_EVENTS}: the reader task failed while pausing")]
    EventsPause(#[source] tokio::task::JoinError),
    #[error("bpffs: {step} {}", path.display())]
    Bpffs {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("map pins: {step} {}", path.display())]
    PinDir {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinned map {map}: {step} {} failed", path.display())]
    Pin {
        map: &'static str,
        step: &'static str,
        path: PathBuf,
        /// Boxed: `MapError` is large, and every `EbpfError` would carry its size.
        #[source]
        source: Box<MapError>,
    },
    #[error(
        "no maps of this binary's layout (version {}) are pinned in {}: found {found} \
         (a predecessor of another version pins in its own layout directory)",
        smartproxy_common::LAYOUT_VERSION,
        path.display()
    )]
    PinsMissing { path: PathBuf, found: String },
    #[error(
        "pinned map {map} at {}: its {what} is {found}, this binary expects {expected}; \
         it was created by another version or another configuration and is not reused",
        path.display()
    )]
    PinnedMapMismatch {
        map: &'static str,
        path: PathBuf,
        what: &'static str,
        found: String,
        expected: String,
    },
    #[error(
        "pinned map {map}: the loader used map id {loaded}, not the pinned map id {pinned} \
         that was checked (the pin was replaced during the load)"
    )]
    PinReplaced {
        map: &'static str,
        pinned: u32,
        loaded: u32,
    },
}

/// Why [`Kernel::splice`](super::Kernel::splice) failed (or fell back to passing), which socket and step.
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
            && self
                .source
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.raw_os_error() == Some(libc::E2BIG))
    }
}

/// The steps of [`Kernel::splice`](super::Kernel::splice), in order, and the adoption check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpliceStep {
    /// `getsockopt(SO_COOKIE)`.
    Cookie,
    /// `TCP_INFO` / `SIOCOUTQ`, the drain baseline.
    Baseline,
    /// Registering the cookie for events.
    Register,
    /// Turning on the socket's sock_ops callbacks (`Kernel::arms_at_splice`).
    ArmEvents,
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
    /// Checking a predecessor's record against this process's sockets and maps
    /// ([`Offload::adopt`](super::Offload::adopt)).
    Adopt,
    /// The `CONTROL` update that switches a direction from pass to redirect.
    Redirect,
    /// Registering the sockets with the runtime as a spliced connection's
    /// (`datapath::peer::Peer::for_splice`).
    Reregister,
}

impl fmt::Display for SpliceStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SpliceStep::Cookie => "getsockopt(SO_COOKIE)",
            SpliceStep::Baseline => "reading the send counters (TCP_INFO, SIOCOUTQ)",
            SpliceStep::Register => "registering for events",
            SpliceStep::ArmEvents => "arming the sock_ops callbacks (cgroup setsockopt program)",
            SpliceStep::Flows => "CONTROL/FLOWS insert",
            SpliceStep::Targets => "TARGETS insert",
            SpliceStep::Sockets => "SOCKETS insert",
            SpliceStep::RcvLowat => "setsockopt(SO_RCVLOWAT)",
            SpliceStep::Buffers => "setsockopt(SO_RCVBUFFORCE/SO_SNDBUFFORCE)",
            SpliceStep::Redirect => "CONTROL update to redirect",
            SpliceStep::Adopt => "adopting the predecessor's splice",
            SpliceStep::Reregister => "registering the socket with the runtime again",
        })
    }
}

impl SpliceStep {
    /// Every step, for the number a handoff record carries ([`SpliceStep::code`]).
    /// New steps go at the end: the numbers of the others must not change.
    pub const ALL: [SpliceStep; 12] = [
        SpliceStep::Cookie,
        SpliceStep::Baseline,
        SpliceStep::Register,
        SpliceStep::Flows,
        SpliceStep::Buffers,
        SpliceStep::Targets,
        SpliceStep::Sockets,
        SpliceStep::RcvLowat,
        SpliceStep::Redirect,
        SpliceStep::Adopt,
        SpliceStep::Reregister,
        SpliceStep::ArmEvents,
    ];

    /// The step's index in [`SpliceStep::ALL`].
    pub fn code(self) -> u8 {
        Self::ALL.iter().position(|s| *s == self).unwrap_or(0) as u8
    }

    /// The step of a [`SpliceStep::code`]; `None` for a number this binary does not know.
    pub fn from_code(code: u8) -> Option<SpliceStep> {
        Self::ALL.get(usize::from(code)).copied()
    }
}
