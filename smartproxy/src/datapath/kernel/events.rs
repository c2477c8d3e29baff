//! What happens to spliced sockets: the sock_ops program writes their TCP state changes
//! to the `EVENTS` ring buffer, and the verdict the bytes it passes up while redirecting;
//! one tokio task reads it and hands each event to the splice its socket cookie is
//! registered for. When the ring was full and events were lost, every splice is told to
//! re-check its sockets.

use std::{
    collections::{HashMap, VecDeque},
    io,
    mem::size_of,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use smartproxy_common::SocketEvent;
use tokio::io::unix::AsyncFd;

use super::error::{SpliceError, SpliceStep};
use super::lock;
use crate::vocab::Side;

/// Which splice each spliced socket belongs to (by socket cookie), and the counters the
/// ring-buffer reader keeps: shared between [`super::Kernel`] and the reader task.
#[derive(Default)]
pub(super) struct SpliceRegistry {
    /// Socket cookie -> the splice it belongs to.
    by_cookie: Mutex<HashMap<u64, Registration>>,
    pub(super) events: AtomicU64,
    pub(super) sockhash_entries: AtomicU64,
    /// A reader runs and reads `EVENTS` ([`super::Kernel::reads_events`]): set when one
    /// starts, cleared when it pauses or stops.
    reading: AtomicBool,
    /// The lost-event count splices were last told of ([`SpliceRegistry::note_losses`]).
    /// Kept across readers: a loss while none runs (paused for a handoff that then failed)
    /// is told when the next one starts.
    losses_told: AtomicU64,
}

struct Registration {
    side: Side,
    /// Spliced (not adopted) while no reader of this process ran: another process's reader
    /// (the predecessor's, before it paused for the handoff) may have taken this socket's
    /// events, which nothing counts as lost. An adoption comes after that reader paused,
    /// and re-checks the sockets itself.
    unread: bool,
    events: Arc<EventQueue>,
}

/// How often the reader compares the lost-event counter with what it last saw, after it
/// read events: a splice learns of a lost event at most this late.
const LOSS_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// One splice's events, from the ring-buffer reader to its relay. It allocates nothing
/// until an event arrives: an unbounded channel would allocate a block of slots for every
/// idle connection.
#[derive(Debug, Default)]
pub(super) struct EventQueue(Mutex<EventQueueState>);

#[derive(Debug, Default)]
struct EventQueueState {
    changes: VecDeque<SpliceEvent>,
    waker: Option<Waker>,
    /// The reader stopped: no change will come any more.
    closed: bool,
}

impl EventQueue {
    /// Queues `change`; a [`SpliceEvent::Recheck`] right behind another adds nothing (the
    /// queue is registered for both of a splice's sockets).
    fn push(&self, change: SpliceEvent) {
        let waker = {
            let mut state = lock(&self.0);
            if change == SpliceEvent::Recheck && state.changes.back() == Some(&change) {
                return;
            }
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

    /// Ready while an event waits or the reader stopped, without taking anything; wakes
    /// `cx` when that turns so otherwise (a parked connection's wake-up, `park`).
    pub(super) fn poll_waiting(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = lock(&self.0);
        if !state.changes.is_empty() || state.closed {
            return Poll::Ready(());
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Drops the waiting events if there are some and every one reports lost events
    /// ([`SpliceEvent::Recheck`]), and says whether it did.
    pub(super) fn drop_rechecks(&self) -> bool {
        let mut state = lock(&self.0);
        let only_rechecks = !state.changes.is_empty()
            && state
                .changes
                .iter()
                .all(|change| matches!(change, SpliceEvent::Recheck));
        if only_rechecks {
            state.changes.clear();
        }
        only_rechecks
    }

    pub(super) fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<SpliceEvent>> {
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

impl SpliceRegistry {
    /// A registry whose splices have been told of `lost` lost events already: the count
    /// when the maps were loaded. A successor's adoption re-checks every splice it takes
    /// over, which covers losses from before.
    pub(super) fn new(lost: u64) -> SpliceRegistry {
        SpliceRegistry {
            losses_told: AtomicU64::new(lost),
            ..SpliceRegistry::default()
        }
    }

    pub(super) fn reading(&self) -> bool {
        self.reading.load(Ordering::Acquire)
    }

    pub(super) fn set_reading(&self, reading: bool) {
        self.reading.store(reading, Ordering::Release);
    }

    /// A reader starts: splices registered while none ran re-check their sockets, and
    /// every splice does if events were lost meanwhile (`lost`, see
    /// [`SpliceRegistry::note_losses`]).
    fn reader_started(&self, lost: Option<u64>) {
        for registration in lock(&self.by_cookie).values_mut() {
            if std::mem::take(&mut registration.unread) {
                registration.events.push(SpliceEvent::Recheck);
            }
        }
        self.note_losses(lost);
    }

    /// Tells every splice to re-check its sockets if the lost-event count is `now` higher
    /// than when they were last told. `None`: the count could not be read (logged).
    fn note_losses(&self, now: Option<u64>) {
        let Some(now) = now else { return };
        let told = self.losses_told.fetch_max(now, Ordering::AcqRel);
        if now > told {
            tracing::debug!(
                lost = now - told,
                "eBPF events lost; every splice re-checks its sockets"
            );
            for registration in lock(&self.by_cookie).values() {
                registration.events.push(SpliceEvent::Recheck);
            }
        }
    }

    /// The reader stopped for good: every splice registered learns that no event comes
    /// any more, and later ones that nobody reads the events, as before a first reader.
    fn reader_stopped(&self) {
        self.set_reading(false);
        for (_, registration) in lock(&self.by_cookie).drain() {
            registration.events.close();
        }
    }

    /// Registers both cookies, or neither if one is already spliced. `adopted`: the splice
    /// is taken over from another process, not made here.
    pub(super) fn register(
        &self,
        sockets: &[(u64, Side); 2],
        events: &Arc<EventQueue>,
        adopted: bool,
    ) -> Result<(), SpliceError> {
        let mut registry = lock(&self.by_cookie);
        if let Some((_, side)) = sockets.iter().find(|(c, _)| registry.contains_key(c)) {
            return Err(SpliceError::new(
                *side,
                SpliceStep::Register,
                io::Error::new(io::ErrorKind::AlreadyExists, "socket is already spliced"),
            ));
        }
        let unread = !adopted && !self.reading();
        for (cookie, side) in sockets {
            registry.insert(
                *cookie,
                Registration {
                    side: *side,
                    unread,
                    events: Arc::clone(events),
                },
            );
        }
        Ok(())
    }

    /// Forgets both cookies: changes of these sockets are not delivered any more.
    pub(super) fn unregister(&self, cookies: &[u64; 2]) {
        let mut registry = lock(&self.by_cookie);
        for cookie in cookies {
            registry.remove(cookie);
        }
    }

    /// Hands one ring-buffer record to the splice its socket is registered for.
    pub(super) fn dispatch(&self, bytes: &[u8]) {
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
        let registry = lock(&self.by_cookie);
        // A socket whose splice was just dropped may still report a change: nobody listens.
        if let Some(Registration { side, events, .. }) = registry.get(&event.cookie) {
            events.push(if event.new_state == SocketEvent::BYTES_PASSED {
                SpliceEvent::Passed(*side)
            } else {
                SpliceEvent::State(StateChange {
                    side: *side,
                    old: TcpState::from(event.old_state),
                    new: TcpState::from(event.new_state),
                    at_ns: event.timestamp_ns,
                })
            });
        }
    }
}

/// Reads `EVENTS` until the fd fails, or until `pause` fires (or its sender is gone). On
/// a pause it returns between two batches, with every record it read consumed (the
/// consumer position in the map moved past it) and the registrations kept. When the fd
/// fails it drops every registration, so that [`Splice::next_event`] returns `None`
/// instead of waiting forever, and [`super::Kernel::reads_events`] turns false.
///
/// `lost` reads the count of events the ring had no room for. When it grew, every splice
/// is sent [`SpliceEvent::Recheck`]. It is read when the reader starts (losses while no
/// reader ran; splices registered meanwhile are sent one anyway), and then once per
/// [`LOSS_CHECK_INTERVAL`] in which records were read: a loss happens only while the ring
/// is full, so records follow it. However the task ends other than by a pause (its fd
/// failed, it panicked, its runtime shut down), the kernel counts as not reading from
/// then on.
///
/// [`Splice::next_event`]: super::Splice::next_event
pub(super) async fn read_events(
    mut ring: AsyncFd<RingBuf<MapData>>,
    mut reader: ReadingRegistry,
    mut pause: tokio::sync::oneshot::Receiver<()>,
    lost: impl Fn() -> Option<u64>,
) {
    let registry = Arc::clone(&reader.registry);
    registry.reader_started(lost());
    let mut read_since_check = false;
    let mut loss_check = tokio::time::interval(LOSS_CHECK_INTERVAL);
    loss_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let paused = tokio::select! {
            biased;
            _ = &mut pause => true,
            _ = loss_check.tick(), if read_since_check => {
                read_since_check = false;
                registry.note_losses(lost());
                false
            }
            guard = ring.readable_mut() => {
                let mut guard = match guard {
                    Ok(guard) => guard,
                    Err(err) => {
                        tracing::error!(error = %err, "eBPF ring buffer reader stopped; no more socket events");
                        break;
                    }
                };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    registry.dispatch(&item);
                    read_since_check = true;
                }
                guard.clear_ready();
                false
            }
        };
        if paused {
            tracing::debug!("eBPF ring buffer reader paused");
            reader.paused = true;
            return;
        }
    }
}

/// The registry, as [`read_events`] holds it: dropped other than after a pause (the fd
/// failed, the task panicked, or its runtime shut down, polled or not), it marks the
/// reader stopped for good ([`SpliceRegistry::reader_stopped`]).
pub(super) struct ReadingRegistry {
    registry: Arc<SpliceRegistry>,
    paused: bool,
}

impl ReadingRegistry {
    pub(super) fn new(registry: Arc<SpliceRegistry>) -> ReadingRegistry {
        ReadingRegistry {
            registry,
            paused: false,
        }
    }
}

impl Drop for ReadingRegistry {
    fn drop(&mut self) {
        if !self.paused {
            self.registry.reader_stopped();
        }
    }
}

/// What a splice's relay learns from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpliceEvent {
    /// One of its sockets changed TCP state.
    State(StateChange),
    /// The verdict passed bytes of this side's socket up while redirecting.
    Passed(Side),
    /// Events were lost: any socket may have changed state or received passed bytes.
    Recheck,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Losses are told once each, counted from the registry's start.
    #[test]
    fn losses_are_told_once() {
        let registry = SpliceRegistry::new(5);
        let events = Arc::new(EventQueue::default());
        registry
            .register(&[(1, Side::Client), (2, Side::Backend)], &events, false)
            .unwrap();
        registry.note_losses(Some(5));
        registry.note_losses(None);
        assert!(!events.drop_rechecks(), "nothing lost since the start");
        registry.note_losses(Some(7));
        registry.note_losses(Some(7));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(
            events.poll_next(&mut cx),
            Poll::Ready(Some(SpliceEvent::Recheck))
        );
        assert_eq!(events.poll_next(&mut cx), Poll::Pending, "told once");
    }

    #[test]
    fn unknown_tcp_states_are_kept() {
        assert_eq!(TcpState::from(8), TcpState::CloseWait);
        assert_eq!(TcpState::from(99), TcpState::Other(99));
    }
}
