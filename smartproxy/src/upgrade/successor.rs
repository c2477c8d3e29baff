//! The successor's side of an upgrade: before its runtime starts it inherits the
//! listening sockets ([`inherit`]); once it accepts on them it takes over the
//! connections ([`take_over`]).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream as StdUnixStream};
use std::sync::Arc;

use tokio::net::UnixStream;
use tracing::{info, warn};

use super::message::{ConnectionRecord, Hello, KernelMaps, Message, Stamp, ID_GAP};
use super::wire::{self, Frame};
use super::{BINARY_FD_ENV, HANDOFF_FD_ENV, HELLO_TIMEOUT};
use crate::connection::{resume, Resumed};
use crate::datapath::kernel::Kernel;
use crate::datapath::relay::Moved;
use crate::shared::Shared;

/// Why a successor cannot take over.
#[derive(Debug, thiserror::Error)]
pub enum SuccessorError {
    #[error("{HANDOFF_FD_ENV}={0:?} is not a descriptor number")]
    BadDescriptor(String),
    #[error("reading the predecessor's sockets: {0}")]
    Hello(#[source] io::Error),
    #[error("the predecessor sent {0} first")]
    Protocol(String),
    #[error("{0}")]
    Incompatible(String),
    #[error("the predecessor sent {sent} descriptors for {expected} sockets")]
    Descriptors { sent: usize, expected: usize },
}

/// What a successor inherits before its runtime starts.
#[derive(Debug)]
pub struct Inherited {
    socket: StdUnixStream,
    pub predecessor: u32,
    /// By configured address.
    pub listeners: Vec<(SocketAddr, std::net::TcpListener)>,
    pub control: UnixListener,
    pub metrics: Option<(SocketAddr, std::net::TcpListener)>,
    /// The predecessor's kernel maps, to reuse.
    pub kernel: Option<KernelMaps>,
    /// Where this process's own connection ids start.
    pub first_id: u64,
}

/// In a process started by an upgrade (its environment names the handoff socket):
/// closes its binary's descriptor, reads the predecessor's first message and its sockets,
/// and checks that it can take over. `None` in a process started otherwise. Without a
/// runtime, before any thread exists (it changes the environment).
pub fn inherit() -> Result<Option<Inherited>, SuccessorError> {
    let Some(fd) = take_descriptor(HANDOFF_FD_ENV)? else {
        return Ok(None);
    };
    // Its own binary, which it was started from, is of no further use.
    drop(take_descriptor(BINARY_FD_ENV)?);
    let socket = StdUnixStream::from(fd);
    let result = receive_hello(&socket);
    match result {
        Ok((hello, fds)) => match assemble(&socket, hello, fds) {
            Ok(inherited) => Ok(Some(inherited)),
            Err(e) => {
                refuse(&socket, &e.to_string());
                Err(e)
            }
        },
        Err(e) => {
            refuse(&socket, &e.to_string());
            Err(e)
        }
    }
}

fn take_descriptor(name: &str) -> Result<Option<OwnedFd>, SuccessorError> {
    let Some(value) = std::env::var_os(name) else {
        return Ok(None);
    };
    // Its own successors must not see it.
    std::env::remove_var(name);
    let text = value.to_string_lossy().into_owned();
    let fd: RawFd = text
        .parse()
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or(SuccessorError::BadDescriptor(text))?;
    // SAFETY: the predecessor started this process with `fd` open for it alone, and
    // nothing else in this process knows the number.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn receive_hello(socket: &StdUnixStream) -> Result<(Hello, Vec<OwnedFd>), SuccessorError> {
    socket
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(SuccessorError::Hello)?;
    let Frame { message, fds, .. } =
        wire::receive_blocking::<Message>(socket).map_err(SuccessorError::Hello)?;
    let hello = match message {
        Message::Hello(hello) => *hello,
        other => return Err(SuccessorError::Protocol(format!("{other:?}"))),
    };
    if let Some(why) = Stamp::this_build().incompatible(&hello.stamp) {
        return Err(SuccessorError::Incompatible(why));
    }
    Ok((hello, fds))
}

fn assemble(
    socket: &StdUnixStream,
    hello: Hello,
    fds: Vec<OwnedFd>,
) -> Result<Inherited, SuccessorError> {
    let expected = hello.listeners.len() + 1 + usize::from(hello.metrics.is_some());
    if fds.len() != expected {
        return Err(SuccessorError::Descriptors {
            sent: fds.len(),
            expected,
        });
    }
    let mut fds = fds.into_iter();
    let mut next = || {
        fds.next()
            .ok_or(SuccessorError::Descriptors { sent: 0, expected })
    };
    let mut listeners = Vec::new();
    for addr in &hello.listeners {
        listeners.push((*addr, std::net::TcpListener::from(next()?)));
    }
    let control = UnixListener::from(next()?);
    let metrics = match hello.metrics {
        Some(addr) => Some((addr, std::net::TcpListener::from(next()?))),
        None => None,
    };
    let socket = socket.try_clone().map_err(SuccessorError::Hello)?;
    socket
        .set_read_timeout(None)
        .map_err(SuccessorError::Hello)?;
    Ok(Inherited {
        socket,
        predecessor: hello.pid,
        listeners,
        control,
        metrics,
        kernel: hello.kernel,
        first_id: hello.next_id.saturating_add(ID_GAP),
    })
}

/// Tells the predecessor why this successor does not take over, once it holds what it
/// inherited (see [`Inherited::refuser`]).
#[derive(Debug)]
pub struct Refuser(StdUnixStream);

impl Refuser {
    pub fn refuse(&self, reason: &str) {
        refuse(&self.0, reason);
    }
}

impl Inherited {
    /// A way to refuse that outlives this value (the proxy's setup consumes it).
    pub fn refuser(&self) -> io::Result<Refuser> {
        self.socket.try_clone().map(Refuser)
    }

    /// Tells the predecessor that this successor will not take over, and why; it keeps
    /// everything. The process should exit next.
    pub fn refuse(self, reason: &str) {
        refuse(&self.socket, reason);
    }

    /// Listeners, control socket, metrics endpoint, and the handoff socket.
    #[allow(clippy::type_complexity)]
    pub(crate) fn into_parts(
        self,
    ) -> (
        Vec<(SocketAddr, std::net::TcpListener)>,
        UnixListener,
        Option<(SocketAddr, std::net::TcpListener)>,
        StdUnixStream,
    ) {
        (self.listeners, self.control, self.metrics, self.socket)
    }
}

fn refuse(socket: &StdUnixStream, reason: &str) {
    let message = Message::Refused {
        reason: reason.to_owned(),
    };
    if let Err(e) = wire::send_blocking(socket, &message, &[], &[]) {
        warn!(error = %e, "cannot tell the predecessor why this successor refuses");
    }
}

/// What a successor took over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TakenOver {
    pub predecessor: u32,
    pub connections: u64,
    /// Whether the predecessor sent its end and got the confirmation; `false` when it
    /// went away during the handoff (what was taken until then runs here).
    pub complete: bool,
}

/// Says the successor accepts, then takes over every connection the predecessor sends
/// until it says it is done, and confirms.
pub(crate) async fn take_over(
    shared: &Arc<Shared>,
    socket: StdUnixStream,
    predecessor: u32,
) -> io::Result<TakenOver> {
    socket.set_nonblocking(true)?;
    let socket = UnixStream::from_std(socket)?;
    wire::send(
        &socket,
        &Message::Ready {
            pid: std::process::id(),
            splices_armed: shared.kernel.as_ref().is_none_or(Kernel::arms_at_splice),
        },
        &[],
        &[],
    )
    .await?;
    let mut connections = 0;
    // Of those, parked here at once.
    let mut parked = 0u64;
    // Set once an answer cannot be sent: the predecessor went away (killed, say). The
    // connections it sent before are still queued on the socket, their descriptors with
    // them: they are taken until the end of the stream, not left there.
    let mut gone: Option<io::Error> = None;
    loop {
        let frame = match wire::receive::<Message>(&socket).await {
            Ok(frame) => frame,
            Err(e) => {
                let e = gone.unwrap_or(e);
                warn!(predecessor, taken = connections, error = %e, "the predecessor went away during the handoff; the connections taken so far run here");
                return Ok(TakenOver {
                    predecessor,
                    connections,
                    complete: false,
                });
            }
        };
        match frame.message {
            Message::Connection(record) => {
                let id = record.id;
                // Should the predecessor never send its last id, new connections here
                // still get ids of their own.
                shared.table.continue_ids(id);
                let moved = moved(&record, frame.tail, frame.fds)?;
                if resume(shared, *record, moved)? == Resumed::Parked {
                    parked += 1;
                }
                connections += 1;
                if gone.is_none() {
                    if let Err(e) = wire::send(&socket, &Message::Taken { id }, &[], &[]).await {
                        gone = Some(e);
                    }
                }
            }
            Message::Done {
                totals,
                next_id,
                staying,
            } => {
                shared.stats.add_totals(&totals);
                shared.table.continue_ids(next_id);
                let confirmed = Message::Confirmed { connections };
                if let Err(e) = wire::send(&socket, &confirmed, &[], &[]).await {
                    warn!(predecessor, taken = connections, error = %e, "the predecessor went away before the confirmation; the connections taken run here");
                    return Ok(TakenOver {
                        predecessor,
                        connections,
                        complete: false,
                    });
                }
                info!(
                    predecessor,
                    connections,
                    parked,
                    staying_there = staying,
                    "upgrade: took over"
                );
                return Ok(TakenOver {
                    predecessor,
                    connections,
                    complete: true,
                });
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected handoff message {other:?}"),
                ))
            }
        }
    }
}

/// A connection's sockets and held bytes from its frame.
fn moved(record: &ConnectionRecord, tail: Vec<u8>, fds: Vec<OwnedFd>) -> io::Result<Moved> {
    let pending = record.pending;
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    if pending[0] + pending[1] != tail.len() {
        return Err(invalid(format!(
            "a connection's frame holds {} bytes for {} + {} pending",
            tail.len(),
            pending[0],
            pending[1]
        )));
    }
    let [client, backend]: [OwnedFd; 2] = fds.try_into().map_err(|fds: Vec<OwnedFd>| {
        invalid(format!("a connection came with {} descriptors", fds.len()))
    })?;
    let mut to_backend = tail;
    let to_client = to_backend.split_off(pending[0]);
    Ok(Moved {
        halves: record.halves,
        pending: [to_backend, to_client],
        client,
        backend,
        offload: record.offload.clone(),
        moves: record.moves,
    })
}
