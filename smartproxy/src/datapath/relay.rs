//! The relay of both data paths. On the userspace path it copies each direction with
//! tokio, one half-duplex per direction, and reports what it sees as lifecycle events. Each half says which side
//! failed, so a reset is told apart from a reset of the other side. The sides are
//! [`Peer`]s: plain TCP, or TLS the proxy terminates, with the same events either way.
//!
//! The kernel data path uses the same relay: once spliced ([`Relay::offload`]), the
//! sockets only ever hand userspace what the verdict passed up (a FIN, bytes of a failed
//! redirect), and the relay treats those exactly as here, after the kernel's backlog
//! toward the destination is delivered.
//!
//! On `data_path = "auto"` ([`Relay::adapt`]) the relay also carries out the moves its
//! [`Policy`] asks for: a splice in the middle of the connection, and switches between the
//! verdict's redirect and pass modes.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::net::TcpStream;
use tokio::time::{interval_at, Instant, Interval, MissedTickBehavior};

use super::adaptive::{Place, Policy};
use super::kernel::offload::{BACKLOG_POLL_MAX, BACKLOG_POLL_MIN};
use super::kernel::{
    Kernel, Offload, OffloadRecord, SpliceError, SpliceStep, Wait, PASSED_READ_BYTES,
};
use super::peer::{Peer, BUFFER_BYTES, ROOM_CHECKED_READ_BYTES, STREAM_READ_BYTES};
use super::Meter;
use crate::config::AutoConfig;
use crate::lifecycle::Event;
use crate::vocab::{Direction, Side};

thread_local! {
    /// Where a half without a buffer of its own reads: under small messages the
    /// destination takes every read at once, and no connection needs a buffer (nor one
    /// zeroed and freed for each message).
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; BUFFER_BYTES].into_boxed_slice());
}

/// Which step of a read failed: the read, or the write of what it read.
enum ReadError {
    Reading(io::Error),
    Writing(io::Error),
}

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
    /// The last read filled the buffer it was given.
    read_filled: bool,
    /// Writing what the last read took made the half wait for the destination.
    waited_to_write: bool,
    /// On the relay, what the next read takes: 64 KiB after a read that did not fill its
    /// buffer, and doubling with each one that did, up to `STREAM_READ_BYTES`.
    stream_read: usize,
    /// Bytes were written that a TLS session may still hold.
    unflushed: bool,
    /// `Action::Finish` was asked for.
    finishing: bool,
    /// The destination's write side is shut (and `Finished` reported).
    finished: bool,
}

impl Half {
    /// Bytes read and not yet written, or written where a TLS session may still hold them.
    fn holds_bytes(&self) -> bool {
        self.start < self.end || self.unflushed
    }

    fn new(direction: Direction) -> Half {
        Half {
            direction,
            buf: Vec::new(),
            start: 0,
            end: 0,
            eof: false,
            read_filled: false,
            waited_to_write: false,
            stream_read: BUFFER_BYTES,
            unflushed: false,
            finishing: false,
            finished: false,
        }
    }

    /// Moves bytes until something worth reporting happens or no progress is possible.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        source: &mut Peer,
        destination: &mut Peer,
        meter: &Meter,
        mut offload: Option<&mut Offload>,
    ) -> Poll<Event> {
        let source_side = self.direction.source();
        let destination_side = self.direction.destination();
        loop {
            let must_write = self.start < self.end;
            if must_write || (self.finishing && !self.finished) {
                if let Some(offload) = offload.as_deref_mut() {
                    let wait = if must_write {
                        Wait::Room
                    } else {
                        Wait::Delivered
                    };
                    if let Err(e) = ready!(offload.poll_may_write(cx, self.direction, wait)) {
                        return self.failed(destination_side, "reading its send counters", &e);
                    }
                }
            }
            if must_write {
                let Poll::Ready(written) =
                    destination.poll_write(cx, &self.buf[self.start..self.end])
                else {
                    self.waited_to_write = true;
                    return Poll::Pending;
                };
                match written {
                    Ok(written) => {
                        self.start += written;
                        self.unflushed = true;
                        if let Some(offload) = offload.as_deref_mut() {
                            offload.wrote(self.direction, written);
                        }
                    }
                    Err(e) => return self.failed(destination_side, "writing", &e),
                }
                continue;
            }
            if self.unflushed {
                if let Err(e) = ready!(destination.poll_flush(cx)) {
                    return self.failed(destination_side, "flushing", &e);
                }
                self.unflushed = false;
            }
            if self.finishing && !self.finished {
                // Every byte before the FIN is in the destination's send queue: the
                // FIN (and a close_notify before it) queued now goes out behind them.
                if let Err(e) = ready!(destination.poll_shutdown_write(cx)) {
                    return self.failed(destination_side, "shutting down its write side", &e);
                }
                self.finished = true;
                return Poll::Ready(Event::Finished(self.direction));
            }
            if self.eof {
                return Poll::Pending;
            }
            let capacity = self.read_capacity(offload.is_some(), || destination.send_room());
            let direction = self.direction;
            // Set when the kernel said the source holds nothing: `read_nothing` need not
            // ask again.
            let found_empty = std::cell::Cell::new(false);
            let worth_reading = |offload: &Option<&mut Offload>| {
                let worth = offload
                    .as_deref()
                    .is_none_or(|offload| offload.may_have_bytes_to_read(direction));
                found_empty.set(!worth);
                worth
            };
            let read = if self.buf.len() < capacity && capacity <= BUFFER_BYTES {
                // No buffer of its own: read into the thread's, and keep only what the
                // destination does not take at once.
                SCRATCH.with_borrow_mut(|scratch| {
                    let buf = &mut scratch[..capacity];
                    let read = ready!(source.poll_read(cx, buf, || worth_reading(&offload)))
                        .map_err(ReadError::Reading)?;
                    self.book_read(read, capacity, meter, offload.as_deref_mut());
                    if read > 0 && !self.finishing {
                        let direct = offload.is_none();
                        self.keep_unwritten(cx, destination, &scratch[..read], direct)
                            .map_err(ReadError::Writing)?;
                    }
                    Poll::Ready(Ok(read))
                })
            } else {
                if self.buf.len() < capacity {
                    self.buf.resize(capacity, 0);
                }
                let buf = &mut self.buf[..capacity];
                source
                    .poll_read(cx, buf, || worth_reading(&offload))
                    .map(|read| {
                        let read = read.map_err(ReadError::Reading)?;
                        self.book_read(read, capacity, meter, offload.as_deref_mut());
                        self.start = 0;
                        self.end = if self.finishing { 0 } else { read };
                        Ok(read)
                    })
            };
            let read = match read {
                Poll::Ready(read) => read,
                Poll::Pending => {
                    // Idle, with nothing left to write: give the buffer back, so that
                    // idle connections (and kernel-path ones, which read almost
                    // nothing) hold none.
                    self.buf = Vec::new();
                    self.read_filled = false;
                    if let Some(offload) = offload {
                        offload.read_nothing(self.direction, found_empty.get());
                    }
                    return Poll::Pending;
                }
            };
            match read {
                Ok(0) => {
                    // The kernel may still hold bytes it passed before the FIN: the EOF
                    // is final only once every one of them was read.
                    if let Some(offload) = offload.as_deref_mut() {
                        ready!(offload.poll_passed_read(cx, self.direction));
                        offload.read_eof();
                    }
                    // Nothing is left to write and nothing more will be read: give the
                    // buffer back now, not when the connection ends. Kept, it made a
                    // half-closed connection hold 64 KiB, and the soak's 200 idle
                    // connections closing at once left 11 MiB more RSS.
                    self.buf = Vec::new();
                    self.eof = true;
                    return Poll::Ready(Event::Eof(source_side));
                }
                // Booked, and kept for the destination unless a forced finish already gave
                // it its FIN (then they are dropped).
                Ok(_) => {}
                Err(ReadError::Writing(e)) => return self.failed(destination_side, "writing", &e),
                Err(ReadError::Reading(e)) => return self.failed(source_side, "reading", &e),
            }
        }
    }

    /// How much the next read takes. A read that filled its buffer means a stream. On a
    /// spliced connection, the whole receive queue the verdict passes is taken from then
    /// on (`PASSED_READ_BYTES`). On the relay, each read that fills its buffer doubles the
    /// next one, up to `STREAM_READ_BYTES`, while the destination takes what is read
    /// without making the half wait. Not at once: most reads are a message, a FIN or a few
    /// bytes, and a megabyte buffer for each message (zeroed, and faulted in page by page)
    /// made 256 KiB request/response slower. A half that waited goes back to 64 KiB reads
    /// and gives a larger buffer back (it is called only once the buffer is written). A
    /// read above `ROOM_CHECKED_READ_BYTES` takes no more than `destination_room` says the
    /// destination's send buffer takes at once (and at least 64 KiB): toward a slow reader,
    /// whose socket drains in steps, reads grew to 1 MiB between its waits and the rest
    /// stayed in the relay. Waiting for the source to run dry before growing again also
    /// kept that at 64 KiB, but cost bulk streams the whole gain, since they wait now and
    /// then too.
    fn read_capacity(
        &mut self,
        spliced: bool,
        destination_room: impl FnOnce() -> Option<usize>,
    ) -> usize {
        if spliced {
            return if self.read_filled {
                PASSED_READ_BYTES
            } else {
                BUFFER_BYTES
            };
        }
        if self.waited_to_write {
            if self.buf.len() > BUFFER_BYTES {
                self.buf = Vec::new();
            }
            return BUFFER_BYTES;
        }
        if self.stream_read <= ROOM_CHECKED_READ_BYTES {
            return self.stream_read;
        }
        destination_room().map_or(self.stream_read, |room| {
            room.clamp(BUFFER_BYTES, self.stream_read)
        })
    }

    /// Books a read before anything else can fail: the bytes left the source, whatever
    /// becomes of them.
    fn book_read(
        &mut self,
        read: usize,
        capacity: usize,
        meter: &Meter,
        offload: Option<&mut Offload>,
    ) {
        self.read_filled = read == capacity;
        self.stream_read = if self.read_filled {
            (2 * capacity).min(STREAM_READ_BYTES)
        } else {
            BUFFER_BYTES
        };
        if read == 0 {
            return;
        }
        self.waited_to_write = false;
        meter.record(self.direction, read);
        if let Some(offload) = offload {
            offload.read(self.direction, read);
        }
    }

    /// After a read into the thread's buffer: writes what the destination takes at once (if
    /// `direct`; a kernel-path destination is first checked by the caller's loop), and
    /// moves the rest into the half's own buffer, which then serves the reads until the
    /// source has nothing more.
    fn keep_unwritten(
        &mut self,
        cx: &mut Context<'_>,
        destination: &mut Peer,
        bytes: &[u8],
        direct: bool,
    ) -> io::Result<()> {
        let written = match direct.then(|| destination.poll_write(cx, bytes)) {
            Some(Poll::Ready(written)) => {
                self.unflushed = true;
                written?
            }
            Some(Poll::Pending) => {
                self.waited_to_write = true;
                0
            }
            None => 0,
        };
        let rest = &bytes[written..];
        if !rest.is_empty() && self.buf.len() < BUFFER_BYTES {
            self.buf.resize(BUFFER_BYTES, 0);
        }
        self.buf[..rest.len()].copy_from_slice(rest);
        self.start = 0;
        self.end = rest.len();
        Ok(())
    }

    /// A socket error: that side reset (or is otherwise gone).
    fn failed(&self, side: Side, step: &str, error: &io::Error) -> Poll<Event> {
        tracing::debug!(direction = %self.direction, %side, step, %error, "socket failed");
        Poll::Ready(Event::Reset(side))
    }
}

/// Resolves to `side` once `stream` has a pending error.
async fn socket_error(side: Side, stream: Arc<TcpStream>) -> Side {
    match stream.ready(tokio::io::Interest::ERROR).await {
        Ok(_) => {
            let error = stream.take_error().ok().flatten();
            tracing::debug!(%side, ?error, "socket error after FIN");
        }
        Err(e) => tracing::debug!(%side, error = %e, "socket readiness failed after FIN"),
    }
    side
}

/// A [`socket_error`] watch on a side that sent its FIN, boxed: most of the time no side
/// has, and inline the two watches would make every connection's task larger by their
/// size (about 300 bytes).
type ErrorWatch = Option<Pin<Box<dyn Future<Output = Side> + Send>>>;

/// Resolves as the watch does; never without one.
async fn watch_error(watch: ErrorWatch) -> Side {
    match watch {
        Some(watch) => watch.await,
        None => std::future::pending().await,
    }
}

/// What [`Relay::next_event`] reports.
#[derive(Debug)]
pub enum Report {
    /// For the lifecycle.
    Event(Event),
    /// The adaptive path spliced the connection: on `Ok`, [`Relay::splice_fallback`] still
    /// says whether the splice completed. On `Err` nothing changed.
    Spliced(Result<(), SpliceError>),
    /// The adaptive path switched a spliced connection between redirect and pass.
    Moved(Place),
}

/// What [`Relay::poll_adaptive`] decided: what to report, and whether the connection
/// stays on the adaptive path (not after a switch that failed).
struct Decided {
    report: Option<Report>,
    keep: bool,
}

impl Decided {
    const NOTHING: Decided = Decided {
        report: None,
        keep: true,
    };
    const STAY: Decided = Decided {
        report: None,
        keep: false,
    };

    fn report(report: Report) -> Decided {
        Decided {
            report: Some(report),
            keep: true,
        }
    }
}

/// The adaptive path's part of a relay.
#[derive(Debug)]
struct Adaptive {
    policy: Policy,
    kernel: Kernel,
    /// While the kernel redirects: one tick per window, to measure what it moved.
    tick: Option<Interval>,
}

/// One direction's state as a successor takes it over (`upgrade`); the bytes read and
/// not yet written travel beside it ([`Moved::pending`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HalfRecord {
    eof: bool,
    finishing: bool,
    finished: bool,
}

impl HalfRecord {
    /// The direction stopped or is stopping.
    pub fn ended(&self) -> bool {
        self.finishing || self.finished
    }
}

/// A relay as it leaves this process: its state, the bytes it holds, and its two
/// sockets (new descriptors of the same sockets; the relay's own are closed).
#[derive(Debug)]
pub struct Moved {
    pub halves: [HalfRecord; 2],
    /// Per direction: read from the source, not yet written to the destination.
    pub pending: [Vec<u8>; 2],
    pub client: OwnedFd,
    pub backend: OwnedFd,
    /// The kernel's bookkeeping, when spliced: the maps keep the splice meanwhile.
    pub offload: Option<OffloadRecord>,
    /// On the adaptive path: the moves made so far.
    pub moves: Option<u32>,
}

impl Moved {
    /// A connection with both directions open and nothing held (a parked one, `park`).
    pub fn quiet(client: OwnedFd, backend: OwnedFd, moves: Option<u32>) -> Moved {
        Moved {
            halves: Default::default(),
            pending: Default::default(),
            client,
            backend,
            offload: None,
            moves,
        }
    }

    /// Both directions open, nothing held, not spliced: what [`Moved::quiet`] makes.
    pub fn is_quiet(&self) -> bool {
        self.halves == <[HalfRecord; 2]>::default()
            && self.pending.iter().all(Vec::is_empty)
            && self.offload.is_none()
    }
}

/// A quiet relay's sockets as the parking lot holds them (`park`): both directions open,
/// nothing held. A spliced one keeps its splice live, and its descriptors, which the
/// splice uses: the kernel goes on moving its bytes and the meter counting them.
#[derive(Debug)]
pub struct Resting {
    /// Declared first: the splice is undone before the sockets close.
    pub offload: Option<Box<Offload>>,
    pub client: OwnedFd,
    pub backend: OwnedFd,
}

impl Resting {
    /// As it goes to a successor process: a splice is exported (the event reader was
    /// paused before the handoff began).
    pub fn into_moved(self, moves: Option<u32>) -> Moved {
        let Resting {
            offload,
            client,
            backend,
        } = self;
        Moved {
            offload: offload.map(|offload| offload.export()),
            ..Moved::quiet(client, backend, moves)
        }
    }
}

/// Both directions of one connection.
#[derive(Debug)]
pub struct Relay {
    /// Declared first: the splice is undone before the sockets close. Boxed: most
    /// connections are never spliced, and inline it would make each one's task about 340
    /// bytes larger.
    offload: Option<Box<Offload>>,
    client: Peer,
    backend: Peer,
    halves: [Half; 2],
    meter: Arc<Meter>,
    /// Which half is polled first; alternates so that a busy direction cannot starve
    /// the other.
    first: usize,
    /// On `data_path = "auto"`, until the connection starts to close.
    adaptive: Option<Adaptive>,
}

impl Relay {
    pub fn new(client: Peer, backend: Peer, meter: Arc<Meter>) -> Relay {
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
            adaptive: None,
        }
    }

    pub fn meter(&self) -> &Arc<Meter> {
        &self.meter
    }

    /// Whether a successor process can take this relay over: not over TLS, whose session
    /// state stays in this process.
    pub fn movable(&self) -> bool {
        !self.client.is_tls() && !self.backend.is_tls()
    }

    /// Whether the connection may ever be parked (`park`): plain TCP on both sides, and if
    /// spliced, its events still come (they take a parked splice up).
    pub fn may_ever_park(&self) -> bool {
        self.movable()
            && self
                .offload
                .as_deref()
                .is_none_or(|offload| !offload.events_stopped())
    }

    /// Whether the connection may be parked now (`park`): the relay may rest
    /// ([`Relay::may_rest`]) and, if spliced, the kernel side is ready to wait
    /// ([`Offload::parkable`]). Both directions open is the lifecycle's to say.
    pub fn parkable(&self) -> bool {
        self.may_rest() && self.offload.as_deref().is_none_or(Offload::parkable)
    }

    /// Whether a spliced relay a predecessor moved here ([`Relay::from_moved`]) may be
    /// parked at once, before this process reads the kernel's events: the relay may rest
    /// ([`Relay::may_rest`]) and the adoption's check is settled without events
    /// ([`Offload::settle_adoption`], which clears it). Unlike [`Relay::parkable`] it does
    /// not ask for events read: the parking lot watches its sockets for reads until then.
    pub fn parkable_as_adopted(&mut self) -> bool {
        self.may_rest()
            && self
                .offload
                .as_deref_mut()
                .is_some_and(Offload::settle_adoption)
    }

    /// What parking asks of the relay itself: plain TCP on both sides, nothing held, and if
    /// spliced, both sockets its own ([`Peer::Spliced`]) and no window of the adaptive
    /// path's to measure in the kernel (a parked connection has no tick).
    fn may_rest(&self) -> bool {
        self.movable()
            && !self.holds_bytes()
            && (self.offload.is_none()
                || self.sockets_own_splice()
                    && self
                        .adaptive
                        .as_ref()
                        .is_none_or(|adaptive| !adaptive.policy.measures_kernel()))
    }

    /// Takes a quiet relay apart to park it; call it only when [`Relay::parkable`]. A plain
    /// relay's sockets go as new descriptors ([`Relay::into_moved`]), a spliced one's as
    /// they are, with the splice. On error nothing changed.
    pub fn into_resting(self) -> Result<Resting, Box<(Relay, io::Error)>> {
        if self.offload.is_none() {
            let moved = self.into_moved()?;
            return Ok(Resting {
                offload: None,
                client: moved.client,
                backend: moved.backend,
            });
        }
        match self {
            Relay {
                offload,
                client: Peer::Spliced(client),
                backend: Peer::Spliced(backend),
                ..
            } => Ok(Resting {
                offload,
                client: client.into_socket(),
                backend: backend.into_socket(),
            }),
            relay => {
                let e = io::Error::other("a spliced socket is shared with a watch of its own");
                Err(Box::new((relay, e)))
            }
        }
    }

    /// Both sockets are the relay's own spliced ones ([`Peer::Spliced`]), not shared with
    /// a watch of their own: what a parked splice keeps.
    fn sockets_own_splice(&self) -> bool {
        matches!(
            (&self.client, &self.backend),
            (Peer::Spliced(_), Peer::Spliced(_))
        )
    }

    /// The relay of a parked connection, on the runtime (see [`Relay::into_resting`]). Not
    /// on the adaptive path yet ([`Relay::adapt`]). On error a socket may close before the
    /// splice is undone (its undo goes by socket cookie); `connection::take_up` keeps
    /// duplicates open where it can, to reset both sides.
    pub fn from_resting(resting: Resting, meter: Arc<Meter>) -> io::Result<Relay> {
        let Resting {
            offload,
            client,
            backend,
        } = resting;
        let Some(mut offload) = offload else {
            return Relay::from_moved(Moved::quiet(client, backend, None), meter, None);
        };
        let peers = Peer::spliced(client.into())
            .and_then(|client| Ok((client, Peer::spliced(backend.into())?)));
        let (client, backend) = peers?;
        // Registered with reads watched: whatever took it up is read first.
        offload.watch_reads_again();
        let mut relay = Relay::new(client, backend, meter);
        relay.offload = Some(offload);
        Ok(relay)
    }

    /// A byte read and not written yet, in either direction.
    pub fn holds_bytes(&self) -> bool {
        self.halves.iter().any(Half::holds_bytes)
    }

    /// Takes the relay apart for a successor process. Call it between two `next_event`s
    /// (which is cancel-safe, so every byte read is in a buffer here), and only when
    /// [`Relay::movable`]. A spliced connection stays in the kernel's maps, its
    /// bookkeeping exported ([`Offload::export`]). On error nothing changed.
    pub fn into_moved(mut self) -> Result<Moved, Box<(Relay, io::Error)>> {
        debug_assert!(self.movable(), "attempted to move a TLS session");
        let duplicate = |peer: &Peer| peer.fd().try_clone_to_owned();
        let (client, backend) = match (duplicate(&self.client), duplicate(&self.backend)) {
            (Ok(client), Ok(backend)) => (client, backend),
            (Err(e), _) | (_, Err(e)) => return Err(Box::new((self, e))),
        };
        let halves = self.halves.each_ref().map(|half| HalfRecord {
            eof: half.eof,
            finishing: half.finishing,
            finished: half.finished,
        });
        let pending = self
            .halves
            .each_mut()
            .map(|half| match half.buf.get(half.start..half.end) {
                // An idle half gave its buffer back: nothing is held.
                Some(held) if half.start < half.end => held.to_vec(),
                _ => Vec::new(),
            });
        let offload = self.offload.take().map(|offload| offload.export());
        Ok(Moved {
            halves,
            pending,
            client,
            backend,
            offload,
            moves: self.moves(),
        })
    }

    /// The relay a predecessor moved here, on the runtime; a spliced one is adopted by
    /// `kernel`, which must reuse the predecessor's maps.
    pub fn from_moved(
        moved: Moved,
        meter: Arc<Meter>,
        kernel: Option<&Kernel>,
    ) -> io::Result<Relay> {
        let Moved {
            halves,
            pending,
            client,
            backend,
            offload,
            moves: _,
        } = moved;
        let offload = match (offload, kernel) {
            (None, _) => None,
            (Some(record), Some(kernel)) => Some(Box::new(
                Offload::adopt(
                    kernel,
                    client.as_fd(),
                    backend.as_fd(),
                    Arc::<Meter>::clone(&meter),
                    record,
                )
                .map_err(io::Error::other)?,
            )),
            (Some(_), None) => {
                return Err(io::Error::other(
                    "a spliced connection, and the kernel data path is not loaded here",
                ))
            }
        };
        // A spliced socket keeps its descriptor from the adoption on: the splice uses it.
        let spliced = offload.is_some();
        let peer = |fd: OwnedFd| -> io::Result<Peer> {
            let stream = std::net::TcpStream::from(fd);
            if spliced {
                return Peer::spliced(stream);
            }
            stream.set_nonblocking(true)?;
            Ok(TcpStream::from_std(stream)?.into())
        };
        let mut relay = Relay::new(peer(client)?, peer(backend)?, meter);
        relay.offload = offload;
        for ((half, record), bytes) in relay.halves.iter_mut().zip(halves).zip(pending) {
            half.eof = record.eof;
            half.finishing = record.finishing;
            half.finished = record.finished;
            half.end = bytes.len();
            half.buf = bytes;
        }
        Ok(relay)
    }

    /// Hands the connection's bytes to the kernel. Before the first `next_event`, or, on
    /// the adaptive path, when neither half holds a byte it read (see
    /// [`Relay::poll_adaptive`]); both sides must be plain TCP (TLS is decrypted here). On
    /// error nothing was spliced. A splice that could not complete is kept, passing every byte
    /// to this relay: [`Relay::splice_fallback`] says why.
    pub fn offload(&mut self, kernel: &Kernel) -> Result<(), SpliceError> {
        debug_assert!(
            self.offload.is_none(),
            "attempted to splice a connection twice"
        );
        debug_assert!(
            !self.client.is_tls() && !self.backend.is_tls(),
            "attempted to splice a TLS session"
        );
        let for_splice = |side: Side, peer: &Peer| {
            peer.for_splice()
                .map_err(|e| SpliceError::new(side, SpliceStep::Reregister, e))
        };
        let client = for_splice(Side::Client, &self.client)?;
        let backend = for_splice(Side::Backend, &self.backend)?;
        for (peer, spliced) in [(&mut self.client, client), (&mut self.backend, backend)] {
            if let Some(spliced) = spliced {
                *peer = spliced;
            }
        }
        self.offload = Some(Box::new(Offload::new(
            kernel,
            self.client.fd(),
            self.backend.fd(),
            Arc::<Meter>::clone(&self.meter),
        )?));
        Ok(())
    }

    /// Why the splice could not complete, if it did not: the kernel then passes every byte
    /// up, and this relay moves them as on the userspace path.
    pub fn splice_fallback(&self) -> Option<&SpliceError> {
        self.offload.as_deref().and_then(Offload::fallback)
    }

    /// Puts the connection on the adaptive path: from now on it moves between the relay
    /// and the kernel as its traffic asks ([`Policy`]). `moves`: those it made in a
    /// predecessor process. Both sides must be plain TCP; a splice that could not
    /// complete stays where it is.
    pub fn adapt(&mut self, kernel: &Kernel, config: AutoConfig, moves: u32) {
        if !self.movable() || self.splice_fallback().is_some() {
            return;
        }
        let place = match &self.offload {
            Some(offload) if offload.redirecting() => Place::Kernel,
            _ => Place::Relay,
        };
        let read = self.meter.userspace_bytes();
        self.adaptive = Some(Adaptive {
            policy: Policy::new(config, place, moves, read, self.meter.total_bytes()),
            kernel: kernel.clone(),
            tick: None,
        });
    }

    /// On the adaptive path: the moves made so far.
    pub fn moves(&self) -> Option<u32> {
        self.adaptive
            .as_ref()
            .map(|adaptive| adaptive.policy.moves())
    }

    /// The next lifecycle event. Cancel-safe: no progress is lost when the future is
    /// dropped before it completes.
    ///
    /// A side that sent FIN has no read pending, and its reads return EOF for good, so a
    /// later RST from it would go unseen until bytes are written to it. Its socket's
    /// error readiness (EPOLLERR: EPIPE for an RST in CLOSE_WAIT, ETIMEDOUT from
    /// keepalive) is watched instead. Not on a spliced connection: there the kernel also
    /// sets socket errors of its own (a failed redirect), and the sock_ops state changes
    /// tell a reset ([`Relay::poll_state_changes`]).
    pub async fn next_event(&mut self) -> Report {
        let spliced = self.offload.is_some();
        // The sockets are shared with these watches, which hold them while the halves
        // borrow the relay.
        let watched = |side: Side, peer: &Peer| -> ErrorWatch {
            let after_fin = self.halves[Direction::from_source(side).index()].eof;
            let tcp = peer.shared_tcp().filter(|_| after_fin && !spliced)?;
            Some(Box::pin(socket_error(side, Arc::clone(tcp))))
        };
        let client = watched(Side::Client, &self.client);
        let backend = watched(Side::Backend, &self.backend);
        tokio::select! {
            report = poll_fn(|cx| self.poll_event(cx)) => report,
            side = watch_error(client) => Report::Event(Event::Reset(side)),
            side = watch_error(backend) => Report::Event(Event::Reset(side)),
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Report> {
        if let Some(side) = self.poll_state_changes(cx) {
            return Poll::Ready(Report::Event(Event::Reset(side)));
        }
        if let Some(side) = self.watch_reads_as_needed(cx) {
            return Poll::Ready(Report::Event(Event::Reset(side)));
        }
        self.first ^= 1;
        for offset in 0..2 {
            let index = (self.first + offset) % 2;
            let (source, destination) = match self.halves[index].direction {
                Direction::ClientToBackend => (&mut self.client, &mut self.backend),
                Direction::BackendToClient => (&mut self.backend, &mut self.client),
            };
            let offload = self.offload.as_deref_mut();
            if let Poll::Ready(event) =
                self.halves[index].poll(cx, source, destination, &self.meter, offload)
            {
                return Poll::Ready(Report::Event(event));
            }
        }
        if let Some(report) = self.poll_adaptive(cx) {
            return Poll::Ready(report);
        }
        // A half that caught up with what the verdict passed stops watching its source
        // now: an idle relay is not polled again for the wake-ups that would bring.
        match self.watch_reads_as_needed(cx) {
            Some(side) => Poll::Ready(Report::Event(Event::Reset(side))),
            None => Poll::Pending,
        }
    }

    /// The adaptive path, once both halves are waiting: asks the policy and carries out a
    /// move. A splice happens only while neither half holds a byte it read: each one's
    /// last read then found its socket empty, so no skb is left half read, which the
    /// verdict would receive whole (`docs/kernel-notes.md#window-updates-for-early-bytes`).
    /// A connection that starts to close stays where it is: a direction that finishes stops
    /// the verdict redirecting it, for good.
    fn poll_adaptive(&mut self, cx: &mut Context<'_>) -> Option<Report> {
        let mut adaptive = self.adaptive.take()?;
        if self.halves.iter().any(|half| half.eof || half.finishing) {
            return None;
        }
        let Decided { report, keep } = match adaptive.policy.place() {
            Place::Kernel => self.leave_kernel(cx, &mut adaptive),
            Place::Relay => self.enter_kernel(&mut adaptive),
        };
        if keep {
            self.adaptive = Some(adaptive);
        }
        report
    }

    /// In the kernel: on each window's tick, back to the relay (pass mode) if too little
    /// moved.
    fn leave_kernel(&mut self, cx: &mut Context<'_>, adaptive: &mut Adaptive) -> Decided {
        let window = adaptive.policy.window();
        let tick = adaptive.tick.get_or_insert_with(|| {
            let mut tick = interval_at(Instant::now() + window, window);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            tick
        });
        let mut due = false;
        while tick.poll_tick(cx).is_ready() {
            due = true;
        }
        if !due {
            return Decided::NOTHING;
        }
        // Reads the kernel's counters: once a window, not on every wake-up.
        let moved = self.meter.total_bytes();
        let Some(offload) = self.offload.as_mut() else {
            return Decided::STAY;
        };
        if !adaptive.policy.on_tick(moved) {
            return Decided::NOTHING;
        }
        if let Err(e) = offload.set_redirect(false) {
            tracing::warn!(error = %e, "cannot move the connection out of the kernel; it stays there");
            return Decided::STAY;
        }
        let read = self.meter.userspace_bytes();
        adaptive.policy.moved(Place::Relay, moved, read);
        adaptive.tick = None;
        Decided::report(Report::Moved(Place::Relay))
    }

    /// On the relay: into the kernel once the policy asks, by a splice or, when spliced
    /// already (pass mode), back to redirect.
    fn enter_kernel(&mut self, adaptive: &mut Adaptive) -> Decided {
        let read = self.meter.userspace_bytes();
        let spliced = self.offload.is_some();
        if !adaptive
            .policy
            .on_reads(read, Instant::now().into_std(), spliced)
        {
            return Decided::NOTHING;
        }
        let moved = self.meter.total_bytes();
        if let Some(offload) = self.offload.as_mut() {
            if let Err(e) = offload.set_redirect(true) {
                tracing::warn!(error = %e, "cannot move the connection into the kernel; it stays on the relay");
                return Decided::STAY;
            }
            adaptive.policy.moved(Place::Kernel, moved, read);
            return Decided::report(Report::Moved(Place::Kernel));
        }
        if self.holds_bytes() {
            return Decided::NOTHING;
        }
        let result = self.offload(&adaptive.kernel);
        let completed = result.is_ok() && self.splice_fallback().is_none();
        adaptive.policy.moved(
            if completed {
                Place::Kernel
            } else {
                Place::Relay
            },
            moved,
            read,
        );
        Decided {
            report: Some(Report::Spliced(result)),
            // A splice that could not complete passes every byte up for good.
            keep: self.splice_fallback().is_none(),
        }
    }

    /// On a spliced connection, registers each socket with the runtime for reads or not, as
    /// [`Offload::watches_reads`] says for the direction it is the source of: a splice, a
    /// move and a finishing direction change it. A new registration has none of the
    /// wakers the halves left with the old one (a write waiting for room, say), so the
    /// relay is polled again after a change. Returns the side whose socket could not be
    /// registered for reads: it would wait for its bytes forever, and is taken as failed.
    fn watch_reads_as_needed(&mut self, cx: &mut Context<'_>) -> Option<Side> {
        let offload = self.offload.as_deref()?;
        for side in [Side::Client, Side::Backend] {
            let watch = offload.watches_reads(Direction::from_source(side));
            let peer = match side {
                Side::Client => &mut self.client,
                Side::Backend => &mut self.backend,
            };
            match peer.watch_reads(watch) {
                Ok(false) => {}
                Ok(true) => cx.waker().wake_by_ref(),
                Err(e) => {
                    tracing::debug!(%side, watch, error = %e, "cannot register the spliced socket again");
                    if watch {
                        return Some(side);
                    }
                    cx.waker().wake_by_ref();
                }
            }
        }
        None
    }

    /// On a spliced connection, finds an RST (or keepalive timeout) of a side that already
    /// sent its FIN: no read is pending on it, so only its TCP state shows it. Checked on
    /// each sock_ops event, on lost events, once a side's EOF is read, and by a periodic
    /// sweep while no event can come ([`Offload::poll_state_check`]). Such a side was reset
    /// exactly when it is CLOSE, or an event reported CLOSE ([`Offload::reported_closed`]),
    /// while the direction toward it is not finished: a graceful close reaches CLOSE only
    /// through LAST_ACK, after our FIN. (Its pending error would not tell: the kernel
    /// reports an RST in CLOSE_WAIT as EPIPE, which it also sets itself.)
    fn poll_state_changes(&mut self, cx: &mut Context<'_>) -> Option<Side> {
        let offload = self.offload.as_mut()?;
        let watching = self.halves.iter().any(|half| half.eof);
        if !offload.poll_state_check(cx, watching) {
            return None;
        }
        let offload = &**offload;
        [Side::Client, Side::Backend].into_iter().find(|side| {
            let from = &self.halves[Direction::from_source(*side).index()];
            let toward = &self.halves[Direction::from_source(side.peer()).index()];
            let peer = match side {
                Side::Client => &self.client,
                Side::Backend => &self.backend,
            };
            from.eof
                && !toward.finished
                && (offload.reported_closed(*side)
                    || super::kernel::tcp_state(peer.fd())
                        .is_ok_and(|state| state == super::kernel::TcpState::Close))
        })
    }

    /// `Action::Finish`: the half stops forwarding once its buffer is written, shuts the
    /// destination's write side and reports `Finished`.
    /// On a spliced connection the verdict stops redirecting toward the destination
    /// first, so that the shut socket receives nothing after its FIN.
    pub fn finish(&mut self, direction: Direction) {
        let half = &mut self.halves[direction.index()];
        debug_assert!(!half.finishing, "attempted to finish {direction} twice");
        half.finishing = true;
        if let Some(offload) = self.offload.as_mut() {
            if let Err(e) = offload.stop_redirecting(direction) {
                // The direction still finishes once the kernel's backlog is delivered; only
                // bytes the source sends later may meet the shut socket.
                tracing::warn!(%direction, error = %e, "cannot stop the kernel redirecting");
            }
        }
    }

    /// `Action::Abort`: closing this side's socket will send RST, not FIN.
    pub fn abort(&mut self, side: Side) {
        match side {
            Side::Client => self.client.abort(),
            Side::Backend => self.backend.abort(),
        }
    }

    /// `Action::AbortWhenDelivered`: aborts `side` once it has acknowledged every byte
    /// sent to it (an abort discards its send queue), or at `deadline`.
    pub async fn abort_when_delivered(&mut self, side: Side, deadline: Instant) {
        let toward = Direction::from_source(side.peer());
        let mut pause = BACKLOG_POLL_MIN;
        loop {
            match self.acknowledged(toward) {
                Ok(true) => break,
                Ok(false) if Instant::now() < deadline => {}
                Ok(false) => {
                    tracing::debug!(%side, "not every byte was acknowledged by the deadline; resetting");
                    break;
                }
                Err(e) => {
                    tracing::debug!(%side, error = %e, "cannot tell what was acknowledged; resetting");
                    break;
                }
            }
            tokio::time::sleep_until(deadline.min(Instant::now() + pause)).await;
            pause = (pause * 2).min(BACKLOG_POLL_MAX);
        }
        self.abort(side);
    }

    /// Whether `direction`'s destination acknowledged every byte sent to it.
    fn acknowledged(&self, direction: Direction) -> io::Result<bool> {
        match &self.offload {
            Some(offload) => offload.acknowledged(direction),
            None => {
                let destination = match direction.destination() {
                    Side::Client => &self.client,
                    Side::Backend => &self.backend,
                };
                super::kernel::all_acknowledged(destination.fd())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay between the proxy's two sockets, spliced by `kernel`, on the current
    /// runtime.
    fn spliced_relay(
        kernel: &Kernel,
        client: std::net::TcpStream,
        backend: std::net::TcpStream,
    ) -> Relay {
        let peer = |socket: std::net::TcpStream| -> Peer {
            socket.set_nonblocking(true).expect("non-blocking");
            TcpStream::from_std(socket).expect("register").into()
        };
        let mut relay = Relay::new(peer(client), peer(backend), Arc::new(Meter::default()));
        relay.offload(kernel).expect("splice");
        assert!(relay.splice_fallback().is_none(), "the splice completed");
        relay
    }

    /// The relay polls both sockets, finds them empty and reports nothing within 100 ms.
    async fn nothing_to_report_yet(relay: &mut Relay) {
        let report =
            tokio::time::timeout(std::time::Duration::from_millis(100), relay.next_event()).await;
        assert!(report.is_err(), "nothing to report yet: {report:?}");
    }

    /// A spliced connection whose bytes the kernel redirects does not wake its relay's
    /// thread for them (`docs/kernel-notes.md#read-wake-ups`). The relay runs on a runtime of its own thread;
    /// 300 round trips of 64 bytes (an skb each, each of which used to wake that thread
    /// through the socket's data-ready callback) leave it asleep but for a few wake-ups
    /// (its voluntary context switches), and it moves none of the bytes itself. The
    /// client's FIN still reaches the relay (through the sock_ops event), and is reported
    /// as an EOF.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redirecting_relay_is_not_woken_by_redirected_bytes() {
        use std::io::{Read, Write};
        use std::net::Shutdown;

        use crate::datapath::kernel::tests::{load_or_skip, small};

        const ROUND_TRIPS: usize = 300;
        /// Wake-ups the relay's thread may take for them: the old registration took two
        /// per round trip.
        const MOST_WAKE_UPS: u64 = 30;
        let Some(kernel) = load_or_skip(small(), None) else {
            return;
        };
        kernel.start_events().expect("event reader");
        let [mut app_client, proxy_client, proxy_backend, mut app_backend] =
            crate::datapath::kernel::tests::proxied_pair();

        let (started, thread_id) = std::sync::mpsc::channel();
        let (spliced_tx, spliced) = std::sync::mpsc::channel();
        let relay_thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let _ = started.send(unsafe { libc::gettid() });
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let mut relay = spliced_relay(&kernel, proxy_client, proxy_backend);
                let _ = spliced_tx.send(());
                let report = relay.next_event().await;
                let relayed = relay.meter.userspace_bytes();
                (report, relayed)
            })
        });
        let thread_id = thread_id.recv().expect("relay thread id");
        let wake_ups = || -> u64 {
            let status = std::fs::read_to_string(format!("/proc/self/task/{thread_id}/status"))
                .expect("thread status");
            status
                .lines()
                .find_map(|line| line.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|count| count.trim().parse().ok())
                .expect("voluntary_ctxt_switches")
        };

        // Bytes sent before the splice would be passed up, and read by the relay.
        spliced.recv().expect("the relay spliced");
        let (mut request, mut response) = ([0u8; 64], [0u8; 64]);
        // From the end of the first round trip: the relay's first poll comes with it.
        let mut before = None;
        for round in 0..ROUND_TRIPS {
            request.fill(round as u8);
            app_client.write_all(&request).expect("client writes");
            app_backend
                .read_exact(&mut response)
                .expect("backend reads");
            assert_eq!(response, request, "round {round}, up");
            app_backend.write_all(&response).expect("backend writes");
            app_client.read_exact(&mut request).expect("client reads");
            assert_eq!(request, response, "round {round}, down");
            before.get_or_insert_with(wake_ups);
        }
        let woken = wake_ups() - before.unwrap_or(0);
        app_client.shutdown(Shutdown::Write).expect("client FIN");
        let (report, relayed) = relay_thread.join().expect("relay thread");
        assert!(
            woken <= MOST_WAKE_UPS,
            "the relay's thread was woken {woken} times for {ROUND_TRIPS} round trips"
        );
        assert!(
            matches!(report, Report::Event(Event::Eof(Side::Client))),
            "{report:?}"
        );
        assert_eq!(relayed, [0, 0], "bytes the relay moved itself");
    }

    /// A successor accepts and splices before it reads the kernel's events: it starts once
    /// it adopted every connection, while the predecessor hands them over. Until then no
    /// event reports a FIN, so a spliced socket stays watched for reads and the relay
    /// learns of the FIN from the socket itself. (An upgrade with a loop of short
    /// connections left them all open, until the successor ran out of descriptors.)
    #[tokio::test]
    async fn a_relay_spliced_before_events_are_read_sees_the_fin() {
        use std::io::{Read, Write};
        use std::net::Shutdown;
        use std::time::Duration;

        use crate::datapath::kernel::tests::{load_or_skip, small};

        let Some(kernel) = load_or_skip(small(), None) else {
            return;
        };
        assert!(!kernel.reads_events(), "no reader before start_events");
        let [mut app_client, proxy_client, proxy_backend, mut app_backend] =
            crate::datapath::kernel::tests::proxied_pair();
        let mut relay = spliced_relay(&kernel, proxy_client, proxy_backend);
        // The relay finds both sockets empty: with events read, it would stop watching.
        nothing_to_report_yet(&mut relay).await;

        app_client.write_all(b"hello").expect("client writes");
        app_client.shutdown(Shutdown::Write).expect("client FIN");
        let report = tokio::time::timeout(Duration::from_secs(5), relay.next_event())
            .await
            .expect("the client's FIN reached the relay");
        assert!(
            matches!(report, Report::Event(Event::Eof(Side::Client))),
            "{report:?}"
        );
        app_backend
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let mut received = [0u8; 5];
        app_backend
            .read_exact(&mut received)
            .expect("the backend gets the bytes");
        assert_eq!(&received, b"hello");
    }

    /// A backend that sends FIN and then RST, both taken in as events before the relay
    /// read the EOF: the check of the states they made due found no side that had sent
    /// FIN. Reading the EOF makes one due again, which finds the reset. (While events come
    /// there is no periodic sweep to find it later.) On the current-thread runtime of
    /// `#[tokio::test]`: the reader task cannot run between the relay's polls, so both
    /// events wait in the queue before the first poll takes them in.
    #[tokio::test]
    async fn a_reset_seen_before_the_fin_was_read_is_found_at_the_eof() {
        use std::net::Shutdown;
        use std::time::Duration;

        use crate::datapath::kernel::tests::{load_or_skip, small};
        use crate::datapath::kernel::{tcp_state, TcpState};

        let Some(kernel) = load_or_skip(small(), None) else {
            return;
        };
        kernel.start_events().expect("event reader");
        let [_app_client, proxy_client, proxy_backend, app_backend] =
            crate::datapath::kernel::tests::proxied_pair();
        let backend_side = proxy_backend.try_clone().expect("dup");
        let mut relay = spliced_relay(&kernel, proxy_client, proxy_backend);
        nothing_to_report_yet(&mut relay).await;

        let events_before = kernel.stats().events;
        app_backend.shutdown(Shutdown::Write).expect("backend FIN");
        socket2::SockRef::from(&app_backend)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        drop(app_backend);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !(tcp_state(backend_side.as_fd()).is_ok_and(|state| state == TcpState::Close)
            && kernel.stats().events >= events_before + 2)
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the FIN and the RST reached the proxy's socket and their events were read"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        let mut reports = Vec::new();
        loop {
            let report = tokio::time::timeout(Duration::from_secs(5), relay.next_event())
                .await
                .unwrap_or_else(|_| panic!("no reset reported; reports: {reports:?}"));
            let reset = matches!(report, Report::Event(Event::Reset(Side::Backend)));
            reports.push(report);
            if reset {
                break;
            }
        }
        assert!(
            matches!(reports[0], Report::Event(Event::Eof(Side::Backend))),
            "the EOF was read first: {reports:?}"
        );
    }

    /// Reads on the relay double while they fill their buffer, up to a megabyte, fall back
    /// to 64 KiB after a short read, and after a wait for the destination, which also
    /// gives a larger buffer back; a read above 256 KiB takes no more than the
    /// destination's send buffer has room for (never less than 64 KiB); a spliced half
    /// takes the whole queue after one filled read.
    #[test]
    fn stream_reads_grow_while_the_destination_keeps_up() {
        let meter = Meter::default();
        let mut half = Half::new(Direction::ClientToBackend);
        let mut sizes = Vec::new();
        for _ in 0..6 {
            let capacity = half.read_capacity(false, || Some(4 * STREAM_READ_BYTES));
            sizes.push(capacity / 1024);
            half.book_read(capacity, capacity, &meter, None);
        }
        assert_eq!(sizes, [64, 128, 256, 512, 1024, 1024]);
        half.book_read(10, STREAM_READ_BYTES, &meter, None);
        assert_eq!(
            half.read_capacity(false, || unreachable!("a 64 KiB read asks for no room")),
            BUFFER_BYTES,
            "after a short read"
        );

        // Up to ROOM_CHECKED_READ_BYTES no room is asked for; above, the read takes what
        // the destination has room for, never less than 64 KiB.
        let mut capacity = BUFFER_BYTES;
        while capacity < ROOM_CHECKED_READ_BYTES {
            half.book_read(capacity, capacity, &meter, None);
            capacity = half.read_capacity(false, || unreachable!("no room asked for"));
        }
        assert_eq!(capacity, ROOM_CHECKED_READ_BYTES);
        half.book_read(capacity, capacity, &meter, None);
        assert_eq!(
            half.read_capacity(false, || Some(300 * 1024)),
            300 * 1024,
            "as much as the destination has room for"
        );
        assert_eq!(
            half.read_capacity(false, || Some(1024)),
            BUFFER_BYTES,
            "64 KiB even toward a full send buffer"
        );
        assert_eq!(
            half.read_capacity(false, || None),
            2 * ROOM_CHECKED_READ_BYTES,
            "the doubling alone when the room is unknown"
        );

        half.book_read(BUFFER_BYTES, BUFFER_BYTES, &meter, None);
        half.buf = vec![0; 2 * BUFFER_BYTES];
        half.waited_to_write = true;
        assert_eq!(
            half.read_capacity(false, || Some(STREAM_READ_BYTES)),
            BUFFER_BYTES,
            "after a wait"
        );
        assert!(half.buf.is_empty(), "the larger buffer is given back");

        half.book_read(BUFFER_BYTES, BUFFER_BYTES, &meter, None);
        let room = || Some(BUFFER_BYTES);
        assert_eq!(half.read_capacity(true, room), PASSED_READ_BYTES);
        half.book_read(10, PASSED_READ_BYTES, &meter, None);
        assert_eq!(half.read_capacity(true, room), BUFFER_BYTES);
    }
}
