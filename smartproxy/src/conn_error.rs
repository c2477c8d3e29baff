//! Why a connection's setup (admission, PROXY header, ClientHello, backend connect, TLS)
//! failed: which side, which step, and the cause. Mapped to the closure [`Reason`] in one
//! place, [`ConnError::reason`]; the `closed` log line carries the whole chain.

use std::fmt;
use std::io;

use crate::vocab::{Reason, Side};

/// A step of a connection's setup, as the error and the log name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The inbound PROXY protocol header from a load balancer.
    ProxyHeader,
    /// The ClientHello read for SNI routing.
    ClientHello,
    /// The socket's own address, for the outgoing PROXY header.
    LocalAddress,
    /// The TCP connect to a target.
    Connect,
    /// Sending the outgoing PROXY header and the bytes read while routing.
    Send,
    /// The TLS handshake (terminate or reencrypt).
    TlsHandshake,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::ProxyHeader => "PROXY header",
            Step::ClientHello => "ClientHello",
            Step::LocalAddress => "local address",
            Step::Connect => "connect",
            Step::Send => "send",
            Step::TlsHandshake => "TLS handshake",
        })
    }
}

/// Why a connection ended before its bytes could move.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// A socket call failed.
    #[error("{side} {step}")]
    Io {
        side: Side,
        step: Step,
        #[source]
        source: io::Error,
    },
    /// The step did not finish within its timeout.
    #[error("{side} {step}: timed out")]
    Timeout { side: Side, step: Step },
    /// The peer sent what the step cannot accept, or closed inside it.
    #[error("{side} {step}: {why}")]
    Malformed { side: Side, step: Step, why: String },
    /// An access list or a limit refused the connection (`reason` says which kind).
    #[error("refused: {0}")]
    Refused(Reason),
    #[error("no route for this connection")]
    NoRoute,
    #[error("the proxy is shutting down")]
    Shutdown,
}

impl ConnError {
    pub fn io(side: Side, step: Step, source: io::Error) -> ConnError {
        ConnError::Io { side, step, source }
    }

    /// The closure reason this error is counted and logged under: the one mapping.
    pub fn reason(&self) -> Reason {
        match self {
            ConnError::Io {
                side: Side::Client,
                step: Step::TlsHandshake,
                source,
            } => match source.kind() {
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
                    Reason::ClientReset
                }
                // Not TLS, no common version or cipher suite, an alert, EOF.
                _ => Reason::BadHandshake,
            },
            ConnError::Io {
                side: Side::Client, ..
            } => Reason::ClientReset,
            ConnError::Io {
                side: Side::Backend,
                step: Step::Connect | Step::TlsHandshake,
                ..
            } => Reason::ConnectFailed,
            ConnError::Io {
                side: Side::Backend,
                ..
            } => Reason::BackendReset,
            ConnError::Timeout {
                side: Side::Client, ..
            } => Reason::HandshakeTimeout,
            ConnError::Timeout {
                side: Side::Backend,
                ..
            } => Reason::ConnectTimeout,
            ConnError::Malformed {
                side: Side::Client, ..
            } => Reason::BadHandshake,
            ConnError::Malformed {
                side: Side::Backend,
                ..
            } => Reason::ConnectFailed,
            ConnError::Refused(reason) => *reason,
            ConnError::NoRoute => Reason::NoRoute,
            ConnError::Shutdown => Reason::Shutdown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_names_the_side_and_the_step_and_maps_to_one_reason() {
        let refused = ConnError::io(
            Side::Backend,
            Step::Connect,
            io::Error::from(io::ErrorKind::ConnectionRefused),
        );
        assert_eq!(refused.reason(), Reason::ConnectFailed);
        assert!(
            crate::error_chain(&refused).starts_with("backend connect: "),
            "{}",
            crate::error_chain(&refused)
        );
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(
            ConnError::io(Side::Backend, Step::Send, reset).reason(),
            Reason::BackendReset
        );
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(
            ConnError::io(Side::Client, Step::TlsHandshake, eof).reason(),
            Reason::BadHandshake
        );
        let timeout = ConnError::Timeout {
            side: Side::Client,
            step: Step::ClientHello,
        };
        assert_eq!(timeout.reason(), Reason::HandshakeTimeout);
        assert_eq!(timeout.to_string(), "client ClientHello: timed out");
    }
}
