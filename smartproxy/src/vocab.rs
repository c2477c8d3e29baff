//! The words every module shares about a connection: its two [`Side`]s, its two
//! [`Direction`]s, why it closed ([`Reason`]) and which data path carries it
//! ([`DataPathKind`]). A leaf: it imports nothing of the crate, so any module may use it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One of the two peers of a proxied connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Backend,
}

impl Side {
    pub fn peer(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One of the two byte streams of a proxied connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    ClientToBackend,
    BackendToClient,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::ClientToBackend, Direction::BackendToClient];

    /// The direction whose bytes come from `side`.
    pub fn from_source(side: Side) -> Direction {
        match side {
            Side::Client => Direction::ClientToBackend,
            Side::Backend => Direction::BackendToClient,
        }
    }

    pub fn source(self) -> Side {
        match self {
            Direction::ClientToBackend => Side::Client,
            Direction::BackendToClient => Side::Backend,
        }
    }

    pub fn destination(self) -> Side {
        self.source().peer()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ClientToBackend => "client->backend",
            Direction::BackendToClient => "backend->client",
        }
    }

    /// 0 or 1: for per-direction arrays.
    pub fn index(self) -> usize {
        match self {
            Direction::ClientToBackend => 0,
            Direction::BackendToClient => 1,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection ended. Every closed connection gets exactly one.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Normal,
    ClientReset,
    BackendReset,
    ConnectFailed,
    ConnectTimeout,
    HandshakeTimeout,
    BadHandshake,
    NoRoute,
    InactivityTimeout,
    ParityCheck,
    Denied,
    MaxConnections,
    Shutdown,
    ProxyError,
}

impl Reason {
    pub const ALL: [Reason; 14] = [
        Reason::Normal,
        Reason::ClientReset,
        Reason::BackendReset,
        Reason::ConnectFailed,
        Reason::ConnectTimeout,
        Reason::HandshakeTimeout,
        Reason::BadHandshake,
        Reason::NoRoute,
        Reason::InactivityTimeout,
        Reason::ParityCheck,
        Reason::Denied,
        Reason::MaxConnections,
        Reason::Shutdown,
        Reason::ProxyError,
    ];

    /// The stats key of this reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Normal => "normal",
            Reason::ClientReset => "client_reset",
            Reason::BackendReset => "backend_reset",
            Reason::ConnectFailed => "connect_failed",
            Reason::ConnectTimeout => "connect_timeout",
            Reason::HandshakeTimeout => "handshake_timeout",
            Reason::BadHandshake => "bad_handshake",
            Reason::NoRoute => "no_route",
            Reason::InactivityTimeout => "inactivity_timeout",
            Reason::ParityCheck => "parity_check",
            Reason::Denied => "denied",
            Reason::MaxConnections => "max_connections",
            Reason::Shutdown => "shutdown",
            Reason::ProxyError => "proxy_error",
        }
    }

    /// Whether the proxy refused the connection (a limit or an access list): such a
    /// connection is reset at once.
    pub fn is_refusal(self) -> bool {
        matches!(self, Reason::Denied | Reason::MaxConnections)
    }

    pub fn index(self) -> usize {
        Reason::ALL
            .iter()
            .position(|r| *r == self)
            .expect("Reason::ALL lists every reason")
    }

    /// The reason for a connection that `side` reset.
    pub fn reset_by(side: Side) -> Reason {
        match side {
            Side::Client => Reason::ClientReset,
            Side::Backend => Reason::BackendReset,
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which data path carries a connection's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataPathKind {
    Userspace,
    Ebpf,
}

impl DataPathKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DataPathKind::Userspace => "userspace",
            DataPathKind::Ebpf => "ebpf",
        }
    }
}

impl fmt::Display for DataPathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
