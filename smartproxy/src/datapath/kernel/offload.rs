//! The kernel data path, as the relay sees it: once a connection is spliced, the verdict
//! moves its bytes and the relay only forwards what the kernel passes up to the sockets
//! (a FIN, bytes of a failed redirect, or bytes passed because the peer is too slow and
//! `max_queued_bytes` are on their way to it). Before userspace writes anything to a
//! socket or shuts it, every byte the kernel redirected toward it must have been taken
//! into its send queue: otherwise userspace would overtake the kernel's backlog
//! (`docs/kernel-notes.md#drain-before-fin`). Each write is reported to the verdict, which redirects again once
//! userspace has forwarded every byte it passed.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::{interval_at, Instant, Interval, MissedTickBehavior, Sleep};

use super::{FlowCounters, Kernel, Splice, SpliceError, SpliceEvent, SpliceStep, TcpState, Wait};
use crate::vocab::{Direction, Side};

/// The first re-check of the kernel backlog, or of what a destination acknowledged;
/// doubles up to `BACKLOG_POLL_MAX`. There is no limit on the backlog wait itself: hundreds
/// of MB may be queued toward a slow reader.
pub(crate) const BACKLOG_POLL_MIN: Duration = Duration::from_millis(1);
pub(crate) const BACKLOG_POLL_MAX: Duration = Duration::from_millis(50);

/// The wait before a re-check whose wait doubled `doublings` times: `BACKLOG_POLL_MIN`,
/// doubled, up to `BACKLOG_POLL_MAX`.
fn backoff(doublings: u8) -> Duration {
    BACKLOG_POLL_MIN
        .saturating_mul(1 << doublings.min(16))
        .min(BACKLOG_POLL_MAX)
}

/// How often a half-closed spliced connection re-checks its sockets' TCP state while no
/// event can reach it (no reader runs: paused for a handoff, not started yet, or stopped).
/// While a reader runs, a lost event reaches every splice as a recheck instead
/// (`smartproxy/src/datapath/kernel/events.rs`).
pub(super) const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// More bytes than this passed up since a socket was last found quiet make a pass phase
/// (the destination's cap reached, or a move into the kernel that waits for userspace's
/// backlog), after which it stays watched for reads one empty read longer
/// ([`Offload::read_nothing`]); fewer, such as the bytes queued before a splice, do not.
const PASS_PHASE_BYTES: u64 = 64 * 1024;

/// Whether a source that a read found empty stays watched for reads: while userspace has
/// not read every byte the verdict passed (`passed` against `taken`; the verdict counts a
/// pass before the skb lands), and for one more empty read after a pass streak of more than
/// [`PASS_PHASE_BYTES`] since the source was last found quiet (at `quiet_at`). While the
/// verdict passes skb after skb, a source dropped at each pause would take every next skb
/// through an event and a new registration; reads fall behind, which keeps it passing.
fn stays_watched(passed: u64, taken: u64, quiet_at: u64) -> bool {
    passed > taken || passed.saturating_sub(quiet_at) > PASS_PHASE_BYTES
}

/// A spliced connection's kernel side, owned by its relay.
#[derive(Debug)]
pub struct Offload {
    splice: Splice,
    meter: Arc<dyn CountsKernelFlows>,
    /// Bytes userspace read from each direction's source since the splice: what the
    /// verdict passed up.
    taken: [u64; 2],
    /// Bytes userspace wrote to each direction's destination since the splice.
    written: [u64; 2],
    retry: [Option<Pin<Box<Sleep>>>; 2],
    /// Per direction: how often the next re-check's wait doubled ([`backoff`]). A count,
    /// not a `Duration`: every spliced connection keeps it, parked or not.
    doublings: [u8; 2],
    /// Made by the first [`Offload::poll_state_check`] that sweeps (a side sent FIN while
    /// no event reader runs): most splices never need one, and a timer takes a few hundred
    /// bytes of every spliced connection, parked or not.
    sweep: Option<Box<Interval>>,
    /// `FLOWS.redirected` per direction when this process took the splice over (zero for
    /// its own splices): the meter counts only what the kernel moved since.
    kernel_base: [u64; 2],
    /// The next [`Offload::poll_state_check`] reports a check as due: after an adoption
    /// (events the predecessor read before it stopped were never seen here), an EOF read
    /// ([`Offload::read_eof`]), or lost events a parked splice did not stay parked for.
    recheck: bool,
    /// Per source ([`Direction::index`] of the direction it is the source of): an event
    /// reported its socket's move to CLOSE ([`Offload::reported_closed`]).
    closed: [bool; 2],
    /// Per direction: its source may hold bytes the verdict passed up, or a FIN or an
    /// error, that userspace has not read ([`Offload::watches_reads`]).
    passing: [bool; 2],
    /// Per direction: `FLOWS.passed` at the last read that found the source empty with
    /// every passed byte read ([`Offload::read_nothing`]); zero before any.
    quiet_at: [u64; 2],
    /// The ring-buffer reader stopped: no event comes any more, so every socket is
    /// watched for reads.
    events_closed: bool,
}

impl Offload {
    /// Splices the pair and makes `meter` count the kernel's bytes too. The meter reads
    /// the verdict's counters, which count from the splice on, whenever it is asked: what
    /// the kernel moves before it is attached, a moment later, is counted all the same.
    pub fn new(
        kernel: &Kernel,
        client: std::os::fd::BorrowedFd<'_>,
        backend: std::os::fd::BorrowedFd<'_>,
        meter: Arc<dyn CountsKernelFlows>,
    ) -> Result<Offload, SpliceError> {
        let splice = kernel.splice(client, backend)?;
        meter.attach_kernel(KernelFlows {
            kernel: kernel.clone(),
            cookies: [splice.cookie(Side::Client), splice.cookie(Side::Backend)],
            base: [0; 2],
        });
        Ok(Offload::with_splice(
            splice, meter, [0; 2], [0; 2], [0; 2], false,
        ))
    }

    fn with_splice(
        splice: Splice,
        meter: Arc<dyn CountsKernelFlows>,
        taken: [u64; 2],
        written: [u64; 2],
        kernel_base: [u64; 2],
        recheck: bool,
    ) -> Offload {
        Offload {
            splice,
            meter,
            taken,
            written,
            retry: [None, None],
            doublings: [0; 2],
            sweep: None,
            kernel_base,
            recheck,
            closed: [false; 2],
            passing: [true; 2],
            quiet_at: [0; 2],
            events_closed: false,
        }
    }

    /// Hands this spliced connection over to a successor process (`smartproxy upgrade`):
    /// returns what cannot be recomputed from the sockets and the maps, for
    /// [`Offload::adopt`] there. Nothing is undone: the map entries and the sockets'
    /// options stay, and the kernel keeps redirecting. This process stops receiving the
    /// sockets' state changes (their registration goes), and the meter is detached:
    /// its kernel bytes from then on include, for good, everything the verdict redirected
    /// up to this call (`redirected_at_export` in the record, minus what this process
    /// itself adopted at, if it adopted the splice), and nothing the kernel moves after.
    /// The successor's meter counts from `redirected_at_export` on, so the meter's totals
    /// read after this call plus the successor's are every byte once.
    ///
    /// Call [`Kernel::pause_events`] first: events the reader dispatches after this are
    /// dropped here, and the successor re-checks the TCP states instead.
    pub fn export(mut self) -> OffloadRecord {
        let folded = self.meter.detach_kernel();
        let redirected_at_export = Direction::BOTH.map(|direction| {
            let index = direction.index();
            match folded {
                Some(folded) => self.kernel_base[index] + folded[index],
                // Not attached (cannot happen while the Offload lives): the live count.
                None => self
                    .splice
                    .flow(direction.source())
                    .map_or(self.kernel_base[index], |flow| flow.redirected),
            }
        });
        let record = OffloadRecord {
            client: self.splice.socket_record(Side::Client),
            backend: self.splice.socket_record(Side::Backend),
            taken: self.taken,
            written: self.written,
            redirected_at_export,
            fallback: self.splice.fallback().map(|e| FallbackRecord {
                side: Direction::from_source(e.side).index() as u8,
                step: e.step.code(),
                reason: crate::error_chain(e),
            }),
        };
        // The drop that follows removes nothing: no step is recorded as done any more,
        // and the meter is detached already.
        self.splice.release();
        record
    }

    /// Takes over a connection a predecessor spliced and [`Offload::export`]ed: `client`
    /// and `backend` are the same sockets (received over SCM_RIGHTS; their cookies must be
    /// the record's), and `kernel` was loaded with [`Pins::Reuse`](super::Pins::Reuse) of
    /// the predecessor's pins (the record's `FLOWS` entries must be in its maps, and its
    /// `max_queued_bytes` must be the predecessor's). The result behaves as the
    /// predecessor's did: dropping it removes the entries, and the meter counts the
    /// kernel's bytes from `redirected_at_export` on. Its first
    /// [`Offload::poll_state_check`] reports a check as due, since a state change the
    /// predecessor consumed before it paused is not delivered here.
    pub fn adopt(
        kernel: &Kernel,
        client: std::os::fd::BorrowedFd<'_>,
        backend: std::os::fd::BorrowedFd<'_>,
        meter: Arc<dyn CountsKernelFlows>,
        record: OffloadRecord,
    ) -> Result<Offload, SpliceError> {
        let fallback = record.fallback.as_ref().map(|f| {
            let side = if usize::from(f.side) == Direction::from_source(Side::Client).index() {
                Side::Client
            } else {
                Side::Backend
            };
            // A step this binary does not know is reported as the adoption's.
            let step = SpliceStep::from_code(f.step).unwrap_or(SpliceStep::Adopt);
            SpliceError::new(side, step, io::Error::other(f.reason.clone()))
        });
        let splice = Splice::adopt(
            kernel,
            [(client, &record.client), (backend, &record.backend)],
            fallback,
        )?;
        meter.attach_kernel(KernelFlows {
            kernel: kernel.clone(),
            cookies: [record.client.cookie, record.backend.cookie],
            base: record.redirected_at_export,
        });
        Ok(Offload::with_splice(
            splice,
            meter,
            record.taken,
            record.written,
            record.redirected_at_export,
            true,
        ))
    }

    /// Ready once userspace may write to `direction`'s destination: see
    /// [`Splice::may_write`] for what `wait` waits for.
    pub fn poll_may_write(
        &mut self,
        cx: &mut Context<'_>,
        direction: Direction,
        wait: Wait,
    ) -> Poll<io::Result<()>> {
        let index = direction.index();
        loop {
            if self
                .splice
                .may_write(direction.source(), self.written[index], wait)?
            {
                self.retry[index] = None;
                self.doublings[index] = 0;
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_retry(cx, index));
        }
    }

    /// Ready once userspace has read every byte the verdict passed up in `direction`.
    /// Passed bytes can reach the socket after its FIN is visible (`docs/kernel-notes.md#fin-skb`), so an
    /// EOF is final only then. Map errors end the wait: the EOF is taken as final.
    pub fn poll_passed_read(&mut self, cx: &mut Context<'_>, direction: Direction) -> Poll<()> {
        let index = direction.index();
        loop {
            match self.splice.flow(direction.source()) {
                Ok(flow) if flow.passed > self.taken[index] => {}
                Ok(_) | Err(_) => {
                    self.retry[index] = None;
                    self.doublings[index] = 0;
                    return Poll::Ready(());
                }
            }
            ready!(self.poll_retry(cx, index));
        }
    }

    /// Waits for the next re-check of `index`, backing off.
    fn poll_retry(&mut self, cx: &mut Context<'_>, index: usize) -> Poll<()> {
        let wait = backoff(self.doublings[index]);
        let sleep = self.retry[index].get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
        ready!(sleep.as_mut().poll(cx));
        self.retry[index] = None;
        if wait < BACKLOG_POLL_MAX {
            self.doublings[index] += 1;
        }
        Poll::Ready(())
    }

    /// Whether a read of `direction`'s source may find anything: see
    /// [`Splice::may_have_bytes_to_read`].
    pub fn may_have_bytes_to_read(&self, direction: Direction) -> bool {
        self.splice.may_have_bytes_to_read(direction.source())
    }

    /// Whether the runtime must wake the relay when `direction`'s source turns readable. A
    /// redirecting socket turns readable after every skb, redirected or not
    /// (`docs/kernel-notes.md#read-wake-ups`), so it is watched only while the verdict
    /// passes it up bytes userspace has not read yet, or may have (an event said so: bytes
    /// passed, a state change, lost events), and otherwise not, as long as the verdict
    /// redirects and this process reads the events ([`Kernel::reads_events`]).
    pub fn watches_reads(&self, direction: Direction) -> bool {
        self.events_closed
            || !self.splice.kernel.reads_events()
            || !self.splice.redirects(direction.source())
            || self.passing[direction.index()]
    }

    /// Whether the connection may wait without a task (`park`) as far as the kernel side
    /// goes: this process reads the splice's events, which then take it up (bytes passed
    /// up, a FIN, an RST, events lost), no check is due, no re-check of the backlog is
    /// pending, and while the verdict redirects a direction, no byte it passed is left to
    /// read. A direction in pass mode is watched for reads while parked, as on the relay
    /// ([`Offload::watches_reads`]).
    pub fn parkable(&self) -> bool {
        !self.events_closed
            && self.splice.kernel.reads_events()
            && !self.recheck
            && self.retry.iter().all(Option::is_none)
            && Direction::BOTH.into_iter().all(|direction| {
                !self.splice.redirects(direction.source()) || !self.passing[direction.index()]
            })
    }

    /// An adopted splice ([`Offload::adopt`]) that may wait without a task at once: neither
    /// socket shows anything the events its predecessor read could have announced (see
    /// [`Offload::stays_parked`]), which settles the check the adoption made due, and both
    /// directions redirect; nor does either need watching for reads once events come
    /// ([`Offload::read_nothing`] would find the same). Until this process reads its
    /// events, its sockets are watched for reads ([`Offload::watches_reads`]), so a FIN or
    /// bytes wake it. Nothing changes if it may not.
    pub fn settle_adoption(&mut self) -> bool {
        let settled = !self.events_closed
            && self.retry.iter().all(Option::is_none)
            && Direction::BOTH
                .into_iter()
                .all(|direction| self.splice.redirects(direction.source()))
            && self.shows_nothing();
        if settled {
            self.recheck = false;
            self.passing = [false; 2];
        }
        settled
    }

    /// The ring-buffer reader stopped for good: no event comes for this splice any more.
    pub fn events_stopped(&self) -> bool {
        self.events_closed
    }

    /// Ready while one of the splice's events waits: a parked connection registers its
    /// waker here ([`Offload::parkable`]).
    pub fn poll_event_waiting(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.splice.poll_event_waiting(cx)
    }

    /// A parked splice was woken, not by its nudge: whether it stays parked. It does if
    /// no event waits (a wake-up already seen to), or if every waiting event reports lost
    /// events and neither socket has anything to act on: nothing to read, no FIN, no
    /// error, and every byte the verdict passed read; then the waker in `cx` is registered
    /// again. Losses come while the ring buffer overflows: a take-up of every parked splice
    /// for each (a task and about 24 system calls each) would add to the load then, and
    /// these checks cost four. Reports of lost events it does not stay for make a check
    /// due at the take-up.
    pub fn stays_parked(&mut self, cx: &mut Context<'_>) -> bool {
        if self.splice.drop_rechecks() && !self.shows_nothing() {
            self.recheck = true;
            return false;
        }
        self.splice.poll_event_waiting(cx).is_pending()
    }

    /// Neither source has anything to read (bytes, a FIN, an error) nor a passed byte on
    /// its way: what a lost event could have announced.
    fn shows_nothing(&self) -> bool {
        Direction::BOTH.into_iter().all(|direction| {
            let source = direction.source();
            !self.splice.may_have_bytes_to_read(source)
                && self
                    .splice
                    .flow(source)
                    .is_ok_and(|flow| flow.passed <= self.taken[direction.index()])
        })
    }

    /// Back from parking: each source is read once more, whatever took the connection up,
    /// before it stops being watched for reads again.
    pub fn watch_reads_again(&mut self) {
        self.passing = [true; 2];
    }

    /// Called when a read of `direction`'s source is pending: once the socket holds nothing
    /// to read (no byte, no FIN, no error; a new registration may not have reported it
    /// yet) and userspace has read every byte the verdict passed, the source need not be
    /// watched for reads ([`Offload::watches_reads`]) until the next event. `found_empty`:
    /// [`Offload::may_have_bytes_to_read`] just said no, so it is not asked again. A failed
    /// lookup keeps it watched.
    pub fn read_nothing(&mut self, direction: Direction, found_empty: bool) {
        let index = direction.index();
        let source = direction.source();
        if !self.passing[index] || (!found_empty && self.splice.may_have_bytes_to_read(source)) {
            return;
        }
        if let Ok(flow) = self.splice.flow(source) {
            let taken = self.taken[index];
            self.passing[index] = stays_watched(flow.passed, taken, self.quiet_at[index]);
            if flow.passed <= taken {
                self.quiet_at[index] = flow.passed;
            }
        }
    }

    /// Whether an event reported `side`'s socket moved to CLOSE. The sock_ops program runs
    /// before the kernel stores the new state (`tcp_set_state`), so a check of the socket's
    /// state right after the event may still read the old one.
    pub fn reported_closed(&self, side: Side) -> bool {
        self.closed[Direction::from_source(side).index()]
    }

    /// Userspace read the EOF of `direction`'s source, for good ([`Offload::poll_passed_read`]).
    /// The next [`Offload::poll_state_check`] reports a check as due: the event of an RST
    /// that followed the FIN may have been taken in before the EOF was read, when no side
    /// had sent FIN yet and the check found nothing to act on.
    pub fn read_eof(&mut self) {
        self.recheck = true;
    }

    /// Userspace read `bytes` from `direction`'s source.
    pub fn read(&mut self, direction: Direction, bytes: usize) {
        self.taken[direction.index()] += bytes as u64;
    }

    /// Userspace wrote `bytes` to `direction`'s destination.
    /// The verdict learns of it at once: once userspace has written every byte it passed,
    /// it redirects again. A failed update only keeps the connection on the userspace
    /// copy longer.
    pub fn wrote(&mut self, direction: Direction, bytes: usize) {
        let index = direction.index();
        self.written[index] += bytes as u64;
        if let Err(e) = self.splice.flushed(direction.source(), self.written[index]) {
            tracing::debug!(%direction, error = %e, "cannot report forwarded bytes to the kernel");
        }
    }

    /// Stops the verdict redirecting `direction`'s bytes, before userspace shuts its
    /// destination on its own authority: redirected into a write-shut socket, they would
    /// fail its send path (EPIPE). From then on the source's bytes are passed up, where the
    /// relay reads and drops them, as the userspace path does.
    pub fn stop_redirecting(&mut self, direction: Direction) -> io::Result<()> {
        self.splice.stop_redirecting(direction.source())
    }

    /// Whether the verdict may redirect (both directions switch together).
    pub fn redirecting(&self) -> bool {
        self.splice.redirecting()
    }

    /// Moves both directions to pass mode (`redirect = false`) or back to redirect: see
    /// [`Splice::set_redirect`].
    pub fn set_redirect(&mut self, redirect: bool) -> io::Result<()> {
        self.splice.set_redirect(redirect)?;
        // Passed bytes userspace has not read may wait in the sockets.
        self.passing = [true; 2];
        Ok(())
    }

    /// Whether `direction`'s destination acknowledged every byte sent to it since the
    /// splice, by the kernel or by userspace.
    pub fn acknowledged(&self, direction: Direction) -> io::Result<bool> {
        self.splice
            .acknowledged(direction.source(), self.written[direction.index()])
    }

    /// Why the splice could not complete, if it did not (every byte is then passed up).
    pub fn fallback(&self) -> Option<&SpliceError> {
        self.splice.fallback()
    }

    /// Takes in the splice's events, and says whether a socket's TCP state may have
    /// changed: the sock_ops program reported a change, events were lost, a side's EOF was
    /// just read ([`Offload::read_eof`]), or, while `watching` (a side sent FIN) and no
    /// event can come, the periodic sweep is due (every `SWEEP_INTERVAL` from the first
    /// call that sweeps). The sweep finds what an event would have reported. It does not
    /// run while events come: each sweep costs a `getsockopt` per half-closed splice, and
    /// 9,000 of them took a tenth of a core (docs/performance.md).
    pub fn poll_state_check(&mut self, cx: &mut Context<'_>, watching: bool) -> bool {
        let mut due = std::mem::take(&mut self.recheck);
        loop {
            match self.splice.poll_event(cx) {
                Poll::Ready(Some(SpliceEvent::Passed(side))) => {
                    self.passing[Direction::from_source(side).index()] = true;
                }
                Poll::Ready(Some(event)) => {
                    tracing::debug!(?event, "spliced socket event");
                    if let SpliceEvent::State(change) = event {
                        if change.new == TcpState::Close {
                            self.closed[Direction::from_source(change.side).index()] = true;
                        }
                    }
                    // A FIN or an RST is read from the socket.
                    self.passing = [true; 2];
                    due = true;
                }
                Poll::Ready(None) => {
                    self.events_closed = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if watching && (self.events_closed || !self.splice.kernel.reads_events()) {
            let sweep = self.sweep.get_or_insert_with(|| {
                let mut sweep = interval_at(Instant::now() + SWEEP_INTERVAL, SWEEP_INTERVAL);
                sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
                Box::new(sweep)
            });
            while sweep.poll_tick(cx).is_ready() {
                due = true;
            }
        }
        due
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        // Before the splice (a field, dropped after this) removes the kernel's counters.
        self.meter.detach_kernel();
    }
}

/// What counts a connection's bytes (`datapath::Meter`) and adds the kernel's while it is
/// spliced. A trait so that this module does not depend on the meter, which depends on
/// [`KernelFlows`].
pub trait CountsKernelFlows: std::fmt::Debug + Send + Sync {
    /// From now on, also count what `flows` reads from the kernel.
    fn attach_kernel(&self, flows: KernelFlows);
    /// Folds the kernel's final counts in, before the splice goes away (or moves to a
    /// successor). Returns the kernel bytes folded in, per direction (indexed like
    /// [`Direction::index`]), as [`KernelFlows::counters`] read them; `None` if nothing
    /// was attached.
    fn detach_kernel(&self) -> Option<[u64; 2]>;
}

/// Reads a spliced connection's kernel counters, for its meter.
#[derive(Debug)]
pub struct KernelFlows {
    kernel: Kernel,
    /// `[client, backend]`: the sources of client->backend and backend->client.
    cookies: [u64; 2],
    /// `redirected` per direction when this process took the splice over from a
    /// predecessor, which counted the bytes before; zero for its own splices.
    base: [u64; 2],
}

impl KernelFlows {
    /// The verdict's counters of `direction`, `redirected` counted from when this process
    /// took the splice over; zero if they cannot be read (the connection is being torn
    /// down).
    pub fn counters(&self, direction: Direction) -> FlowCounters {
        let index = direction.index();
        let mut counters = self
            .kernel
            .flow_counters(self.cookies[index])
            .unwrap_or_default();
        counters.redirected = counters.redirected.saturating_sub(self.base[index]);
        counters
    }
}

/// A spliced connection's kernel-side bookkeeping, moved to a successor process
/// ([`Offload::export`], [`Offload::adopt`]). Arrays of two are indexed like
/// [`Direction::index`] (client->backend first), which is also `[client, backend]` for
/// per-source values.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OffloadRecord {
    pub client: SocketRecord,
    pub backend: SocketRecord,
    /// Bytes userspace read from each direction's source since the splice.
    pub taken: [u64; 2],
    /// Bytes userspace wrote to each direction's destination since the splice.
    pub written: [u64; 2],
    /// `FLOWS.redirected` of each direction when exported: what the exporting meter
    /// counted up to; the adopting meter counts from there.
    pub redirected_at_export: [u64; 2],
    /// Why the splice could not complete, if it did not (every byte is then passed up).
    pub fallback: Option<FallbackRecord>,
}

/// One socket of an [`OffloadRecord`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SocketRecord {
    /// `SO_COOKIE`: the key of its map entries, and how the successor checks it holds
    /// the same socket.
    pub cookie: u64,
    /// `tcpi_bytes_acked + SIOCOUTQ` at splice time.
    pub handed_at_splice: u64,
    /// `tcpi_bytes_acked` at splice time.
    pub acked_at_splice: u64,
    /// `SIOCINQ` at splice time.
    pub queued_at_splice: u64,
    /// Userspace's copy of this source's `CONTROL` entry (every update writes it whole).
    pub control: ControlRecord,
    /// Which of the splice's entries for this socket exist (the successor removes those).
    pub done: StepsDone,
}

/// `smartproxy_common::Control`, field by field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ControlRecord {
    pub flushed: u64,
    pub cap: u64,
    pub redirect: u64,
}

/// Which map entries a splice made for one socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StepsDone {
    pub control: bool,
    pub flows: bool,
    pub targets: bool,
    pub sockets: bool,
}

/// [`Offload::fallback`], as numbers and text.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FallbackRecord {
    /// [`Direction::index`] of the side's direction: 0 client, 1 backend.
    pub side: u8,
    /// [`SpliceStep::code`].
    pub step: u8,
    /// The error and its causes, as text.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every spliced connection keeps its Offload, parked or not. It stays within
    /// jemalloc's 320-byte size class (it took 384 bytes before). Not 256: tokio's
    /// registrations of sockets (`Arc<ScheduledIo>`, 128-byte aligned) take that class and
    /// are freed when a connection parks, so long-lived Offloads among them keep the
    /// freed slabs' pages resident (measured in docs/performance.md#idle-connections).
    /// Below 225 bytes it would leave both classes behind.
    #[test]
    fn an_offload_takes_the_320_byte_class() {
        let size = std::mem::size_of::<Offload>();
        assert!(
            (257..=320).contains(&size) || size <= 224,
            "an Offload takes {size} bytes"
        );
    }

    #[test]
    fn the_backoff_doubles_from_its_least_to_its_most() {
        assert_eq!(backoff(0), BACKLOG_POLL_MIN);
        assert_eq!(backoff(1), BACKLOG_POLL_MIN * 2);
        assert_eq!(backoff(5), BACKLOG_POLL_MIN * 32);
        assert_eq!(backoff(6), BACKLOG_POLL_MAX);
        assert_eq!(backoff(u8::MAX), BACKLOG_POLL_MAX);
    }

    /// The bytes queued before a splice (a request) do not hold a source; a pass streak
    /// holds it for one more empty read, and nothing passed since lets it go; a count ahead
    /// of what userspace read always holds it.
    #[test]
    fn a_source_stays_watched_one_empty_read_after_a_pass_streak() {
        assert!(!stays_watched(64, 64, 0), "the first request passed up");
        let streak = 4 * PASS_PHASE_BYTES;
        assert!(
            stays_watched(streak, streak, 0),
            "the first empty read after a streak"
        );
        assert!(!stays_watched(streak, streak, streak), "the second one");
        assert!(
            stays_watched(streak + 1, streak, streak),
            "a pass not read yet"
        );
        assert!(
            !stays_watched(streak + PASS_PHASE_BYTES, streak + PASS_PHASE_BYTES, streak),
            "exactly PASS_PHASE_BYTES is no streak"
        );
    }
}
