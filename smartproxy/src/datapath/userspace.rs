//! The userspace data path: copies each direction with tokio, one half-duplex per
//! direction, and reports what it sees as lifecycle events. Each half says which side
//! failed, so a reset is told apart from a reset of the other side.
//!
//! The kernel data path uses the same relay: once spliced ([`Relay::offload`]), the
//! sockets only ever hand userspace what the verdict passed up (a FIN, bytes of a failed
//! redirect), and the relay treats those exactly as here, after the kernel's backlog
//! toward the destination is delivered.

use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use socket2::SockRef;
use tokio::net::TcpStream;

use super::ebpf::Offload;
use super::Meter;
use crate::ebpf::{Kernel, SpliceError};
use crate::lifecycle::{Direction, Event, Side};

/// Per direction buffer. Allocated on first use, so idle connections cost none.
const BUFFER_BYTES: usize = 64 * 1024;

/// One direction: reads from its source, writes to its destination.
#[derive(Debug)]
struct Half {
    direction: Direction,
    buf: Vec<u8>,
    /// `buf[start..end]` was read and not yet written.
    start: usize,
    end: usize,
    /// The source's FIN was seen (and reported).
    eof: bool,
    /// `Action::Finish` was asked for.
    finishing: bool,
    /// The destination's write side is shut (and `Finished` reported).
    finished: bool,
}

impl Half {
    fn new(direction: Direction) -> Half {
        Half {
            direction,
            buf: Vec::new(),
            start: 0,
            end: 0,
            eof: false,
            finishing: false,
            finished: false,
        }
    }

    /// Moves bytes until something worth reporting happens or no progress is possible.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        source: &TcpStream,
        destination: &TcpStream,
        meter: &Meter,
        mut offload: Option<&mut Offload>,
    ) -> Poll<Event> {
        let source_side = self.direction.source();
        let destination_side = self.direction.destination();
        loop {
            let must_write = self.start < self.end;
            if must_write || (self.finishing && !self.finished) {
                if let Some(offload) = offload.as_deref_mut() {
                    if ready!(offload.poll_delivered(cx, self.direction)).is_err() {
                        return Poll::Ready(Event::Reset(destination_side));
                    }
                }
            }
            if must_write {
                match ready!(poll_write(cx, destination, &self.buf[self.start..self.end])) {
                    Ok(written) => {
                        self.start += written;
                        if let Some(offload) = offload.as_deref_mut() {
                            offload.wrote(self.direction, written);
                        }
                    }
                    Err(_) => return Poll::Ready(Event::Reset(destination_side)),
                }
                continue;
            }
            if self.finishing && !self.finished {
                // Every byte before the FIN is in the destination's send queue: the
                // FIN queued now goes out behind them.
                if SockRef::from(destination)
                    .shutdown(Shutdown::Write)
                    .is_err()
                {
                    return Poll::Ready(Event::Reset(destination_side));
                }
                self.finished = true;
                return Poll::Ready(Event::Finished(self.direction));
            }
            if self.eof {
                return Poll::Pending;
            }
            if self.buf.is_empty() {
                self.buf = vec![0; BUFFER_BYTES];
            }
            match ready!(poll_read(cx, source, &mut self.buf)) {
                Ok(0) => {
                    self.eof = true;
                    return Poll::Ready(Event::Eof(source_side));
                }
                Ok(read) => {
                    meter.record(self.direction, read);
                    // After a forced finish the source's bytes are dropped: the
                    // destination already has its FIN.
                    if !self.finishing {
                        self.start = 0;
                        self.end = read;
                    }
                }
                Err(_) => return Poll::Ready(Event::Reset(source_side)),
            }
        }
    }
}

/// Errors that mean the peer's end of the connection is gone: an RST, or TCP giving up
/// (keepalive or retransmission timeout). EPIPE is not one: it is our own shut write
/// side, which the kernel also reports when its backlog meets it.
fn is_reset(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ECONNRESET | libc::ETIMEDOUT | libc::EHOSTUNREACH | libc::ENETUNREACH)
    )
}

fn poll_read(cx: &mut Context<'_>, stream: &TcpStream, buf: &mut [u8]) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        match stream.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}

fn poll_write(cx: &mut Context<'_>, stream: &TcpStream, buf: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match stream.try_write(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            result => return Poll::Ready(result),
        }
    }
}

/// Both directions of one connection.
#[derive(Debug)]
pub struct Relay {
    /// Declared first: the splice is undone before the sockets close.
    offload: Option<Offload>,
    client: TcpStream,
    backend: TcpStream,
    halves: [Half; 2],
    meter: Arc<Meter>,
    /// Which half is polled first; alternates so that a busy direction cannot starve
    /// the other.
    first: usize,
}

impl Relay {
    pub fn new(client: TcpStream, backend: TcpStream, meter: Arc<Meter>) -> Relay {
        Relay {
            offload: None,
            client,
            backend,
            halves: [
                Half::new(Direction::ClientToBackend),
                Half::new(Direction::BackendToClient),
            ],
            meter,
            first: 0,
        }
    }

    pub fn meter(&self) -> &Arc<Meter> {
        &self.meter
    }

    /// Hands the connection's bytes to the kernel. Must come before the first
    /// `next_event`. On error nothing was spliced unless `SpliceError::stream_intact` is
    /// false.
    pub fn offload(&mut self, kernel: &Kernel) -> Result<(), SpliceError> {
        debug_assert!(
            self.offload.is_none(),
            "attempted to splice a connection twice"
        );
        let client = std::os::fd::AsFd::as_fd(&self.client);
        let backend = std::os::fd::AsFd::as_fd(&self.backend);
        self.offload = Some(Offload::new(
            kernel,
            client,
            backend,
            Arc::clone(&self.meter),
        )?);
        Ok(())
    }

    /// The next lifecycle event. Cancel-safe: no progress is lost when the future is
    /// dropped before it completes.
    pub async fn next_event(&mut self) -> Event {
        poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        if let Some(side) = self.poll_state_changes(cx) {
            return Poll::Ready(Event::Reset(side));
        }
        self.first ^= 1;
        for offset in 0..2 {
            let index = (self.first + offset) % 2;
            let (source, destination) = match self.halves[index].direction {
                Direction::ClientToBackend => (&self.client, &self.backend),
                Direction::BackendToClient => (&self.backend, &self.client),
            };
            let offload = self.offload.as_mut();
            if let Poll::Ready(event) =
                self.halves[index].poll(cx, source, destination, &self.meter, offload)
            {
                return Poll::Ready(event);
            }
        }
        Poll::Pending
    }

    /// Drains the sock_ops events of a spliced connection. A side that sent FIN has no
    /// read pending, so its socket readiness would not show a later RST: its state-change
    /// event does, and the socket's pending error tells whether it was a reset. Any other
    /// change shows up on the socket itself (FIN: EOF behind every redirected byte).
    fn poll_state_changes(&mut self, cx: &mut Context<'_>) -> Option<Side> {
        let offload = self.offload.as_mut()?;
        while let Poll::Ready(Some(change)) = offload.poll_state_change(cx) {
            tracing::debug!(?change, "tcp state change");
            let side = change.side;
            if !self.halves[Direction::from_source(side).index()].eof {
                continue;
            }
            let stream = match side {
                Side::Client => &self.client,
                Side::Backend => &self.backend,
            };
            match stream.take_error() {
                Ok(Some(error)) if is_reset(&error) => {
                    tracing::debug!(%side, %error, "socket reset after FIN");
                    return Some(side);
                }
                Ok(Some(error)) => tracing::debug!(%side, %error, "socket error after FIN"),
                Ok(None) | Err(_) => {}
            }
        }
        None
    }

    /// `Action::Finish`: the half stops forwarding once its buffer is written, shuts the
    /// destination's write side and reports `Finished`.
    pub fn finish(&mut self, direction: Direction) {
        let half = &mut self.halves[direction.index()];
        debug_assert!(!half.finishing, "attempted to finish {direction} twice");
        half.finishing = true;
    }

    /// `Action::Abort`: closing this side's socket will send RST, not FIN.
    pub fn abort(&mut self, side: Side) {
        let stream = match side {
            Side::Client => &self.client,
            Side::Backend => &self.backend,
        };
        // Best effort: a socket that already failed needs no RST from us.
        let _ = SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
    }
}
