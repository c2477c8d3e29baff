//! Upgrades that keep every connection (`smartproxy upgrade`, SIGUSR2): the running proxy
//! starts its successor from a binary ([`binary`]), hands it the listening sockets, the
//! control socket, the metrics endpoint and every live connection it can move, each with
//! its two sockets and its record ([`message`], over [`wire`]), and exits once the
//! successor confirmed and what could not move (TLS sessions this proxy holds the keys of)
//! has drained. The predecessor's side is in [`predecessor`], the successor's in
//! [`successor`]; `docs/upgrade.md` tells the whole protocol and its guarantees.

pub mod binary;
pub mod message;
mod order;
mod predecessor;
mod successor;
mod wire;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

pub use binary::BinaryError;
pub(crate) use predecessor::upgrade;
pub use predecessor::{UpgradeError, Upgraded};
pub(crate) use successor::take_over;
pub use successor::{inherit, Inherited, Refuser, SuccessorError, TakenOver};

use crate::datapath::relay::Moved;
use message::ConnectionRecord;

/// Names the handoff socket's descriptor in a successor's environment.
pub const HANDOFF_FD_ENV: &str = "SMARTPROXY_HANDOFF_FD";
/// Names the descriptor of a successor's own binary, which it was started from and closes.
pub const BINARY_FD_ENV: &str = "SMARTPROXY_UPGRADE_BINARY_FD";

/// How long a successor may take to load (TLS material, eBPF) and say it accepts.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a successor may take to confirm once every connection was sent, and the
/// longest wait for any one answer during the handoff.
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a successor waits for its predecessor's first message.
pub(crate) const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Where an upgrade is. Each stage comes after the ones listed before it; a failed
/// upgrade goes back to `Idle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// A successor still taking over from its predecessor: its own upgrade would start
    /// a third process while the second still adopts connections and before it reads
    /// the kernel's events.
    TakingOver,
    Idle,
    /// A successor is starting; this process still accepts.
    Starting,
    /// The successor accepts; this process does not, and its connections move.
    HandingOff,
    /// The successor confirmed: what is left here drains.
    HandedOff,
}

/// What starts a successor: a binary and the arguments of its `smartproxy run`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuccessorCommand {
    /// The binary this proxy was started from; `smartproxy upgrade --binary` may name
    /// another.
    pub binary: PathBuf,
    pub args: Vec<OsString>,
}

/// A connection on its way to the successor.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) record: ConnectionRecord,
    pub(crate) moved: Moved,
}

/// New descriptors of the sockets a successor inherits, kept while the proxy runs.
#[derive(Debug, Default)]
pub(crate) struct HandoffSockets {
    /// By configured listen address.
    pub(crate) listeners: BTreeMap<SocketAddr, OwnedFd>,
    pub(crate) control: Option<OwnedFd>,
    /// With its configured address.
    pub(crate) metrics: Option<(SocketAddr, OwnedFd)>,
}
