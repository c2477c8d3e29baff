//! The splice protocol: one routed pair's entries in the kernel maps, made in the order
//! that loses no byte (`Splice::attach`) and removed when the [`Splice`] is dropped; and
//! what the relay asks of a spliced pair (counters, the drain rule, control updates).

use std::{
    fmt, io,
    os::fd::{AsRawFd, BorrowedFd, RawFd},
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
};

use smartproxy_common::{Control, Flow, MAP_CONTROL, MAP_FLOWS, MAP_SOCKETS, MAP_TARGETS};

use super::error::{SpliceError, SpliceStep};
use super::events::{EventQueue, SpliceEvent};
use super::offload::{ControlRecord, SocketRecord, StepsDone};
use super::sys::{
    acked_and_outq, arm_events, baseline, bytes_to_read, map_delete, map_update, next_unread_seq,
    pin_buffers, readable_now, set_rcvlowat, socket_cookie,
};
use super::{FlowCounters, Kernel};
use crate::vocab::{Direction, Side};

/// Flag for map updates: fail with EEXIST instead of replacing an entry.
pub(super) const BPF_NOEXIST: u64 = 1;

/// What [`Splice::may_write`] waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// The kernel's backlog toward the destination is in its send queue (before a FIN).
    Delivered,
    /// That, and the send queue has room under `max_queued_bytes` (before bytes).
    Room,
}

/// One socket of a splice.
#[derive(Debug)]
pub(super) struct SpliceSocket {
    side: Side,
    fd: RawFd,
    pub(super) cookie: u64,
    /// `tcpi_bytes_acked + SIOCOUTQ` at splice time: everything written to the socket before
    /// (plus the SYN on connected sockets, which `bytes_acked` counts).
    pub(super) handed_at_splice: u64,
    /// `tcpi_bytes_acked` at splice time.
    pub(super) acked_at_splice: u64,
    /// `SIOCINQ` at splice time: bytes received before the splice, not read yet.
    pub(super) queued_at_splice: u64,
    /// The sequence number of the first byte userspace had not read, when it could be
    /// learnt: the verdict trims anything before it (`Flow::next_seq`).
    pub(super) next_unread_seq: Option<u32>,
}

impl SpliceSocket {
    pub(super) fn read(side: Side, fd: BorrowedFd<'_>) -> Result<Self, SpliceError> {
        let cookie =
            socket_cookie(fd).map_err(|e| SpliceError::new(side, SpliceStep::Cookie, e))?;
        let baseline = baseline(fd).map_err(|e| SpliceError::new(side, SpliceStep::Baseline, e))?;
        // Without it the verdict starts from the first skb it sees, which a retransmission
        // of bytes already read would duplicate: such a splice is still as good as before
        // the connection had moved bytes through userspace. Where nothing was read, the
        // first skb the verdict sees starts at the first byte, and repair mode (seven
        // system calls) is not needed.
        let next_unread_seq = if baseline.nothing_read() {
            None
        } else {
            next_unread_seq(fd)
                .inspect_err(|e| tracing::debug!(%side, error = %e, "cannot read the next unread sequence number"))
                .ok()
        };
        Ok(Self {
            side,
            fd: fd.as_raw_fd(),
            cookie,
            handed_at_splice: baseline.acked + baseline.outq,
            acked_at_splice: baseline.acked,
            queued_at_splice: baseline.queued,
            next_unread_seq,
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
pub(super) struct Done {
    pub(super) control: [bool; 2],
    pub(super) flows: [bool; 2],
    pub(super) targets: [bool; 2],
    pub(super) sockets: [bool; 2],
}

/// A routed pair whose bytes move in the kernel. Dropping it removes its `FLOWS`, `SOCKETS`
/// and `TARGETS` entries and its event registration; from then on received bytes stay in the
/// sockets' own receive queues.
pub struct Splice {
    pub(super) kernel: Kernel,
    pub(super) client: SpliceSocket,
    pub(super) backend: SpliceSocket,
    pub(super) events: Arc<EventQueue>,
    /// Userspace's copy of each source's `CONTROL` entry, `[client, backend]`: every update
    /// writes the whole value.
    pub(super) control: [Control; 2],
    pub(super) done: Done,
    /// Set when the splice could not complete and passes every byte to userspace.
    /// Boxed: most splices complete, and every spliced connection keeps this field.
    pub(super) fallback: Option<Box<SpliceError>>,
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
    /// The next event of either socket. Only state changes after the splice are reported (a
    /// FIN that arrived before it is not), so callers check [`tcp_state`](super::tcp_state) once after
    /// splicing. `None` means the event reader stopped (it logs why); fall back to polling
    /// [`tcp_state`](super::tcp_state) then.
    pub async fn next_event(&mut self) -> Option<SpliceEvent> {
        std::future::poll_fn(|cx| self.events.poll_next(cx)).await
    }

    /// Like [`Splice::next_event`], for hand-written futures.
    pub fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<SpliceEvent>> {
        self.events.poll_next(cx)
    }

    /// Drops the waiting events if they only report lost events (see
    /// [`EventQueue::drop_rechecks`]).
    pub fn drop_rechecks(&self) -> bool {
        self.events.drop_rechecks()
    }

    /// Ready while an event waits (see [`EventQueue::poll_waiting`]).
    pub fn poll_event_waiting(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.events.poll_waiting(cx)
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
    /// time, is at least `redirected + written` (`docs/kernel-notes.md#drain-before-fin`). Only then may
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

    /// Whether the verdict may redirect the client's bytes (after a completed splice,
    /// both directions' switch is the same until one of them stops).
    pub fn redirecting(&self) -> bool {
        self.redirects(Side::Client)
    }

    /// Whether the verdict may redirect `source`'s bytes: then it reports each pass up
    /// ([`SpliceEvent::Passed`]); otherwise it passes every byte without a word.
    pub fn redirects(&self, source: Side) -> bool {
        self.fallback.is_none() && self.control[index(source)].redirect != 0
    }

    /// Switches both directions between redirect and pass together (`data_path = "auto"`
    /// moving a connection), or neither: on an error both are back as they were. Back in
    /// redirect, the verdict still passes until userspace has forwarded every byte it
    /// passed before (`Control::flushed`), so no byte overtakes another.
    pub fn set_redirect(&mut self, redirect: bool) -> io::Result<()> {
        let before = self.control.map(|control| control.redirect);
        for side in [Side::Client, Side::Backend] {
            self.control[index(side)].redirect = u64::from(redirect);
            if let Err(e) = self.write_control(side) {
                for side in [Side::Client, Side::Backend] {
                    self.control[index(side)].redirect = before[index(side)];
                    let _ = self.write_control(side);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Why the splice could not complete, if it did not: its verdict then passes every
    /// byte to userspace.
    pub fn fallback(&self) -> Option<&SpliceError> {
        self.fallback.as_deref()
    }

    fn write_control(&self, source: Side) -> io::Result<()> {
        let cookie = self.socket(source).cookie;
        let control = &self.kernel.inner.control;
        map_update(control, &cookie, &self.control[index(source)], 0).map_err(|e| {
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
    pub(super) fn attach(&mut self) -> Result<(), SpliceError> {
        let inner = Arc::clone(&self.kernel.inner);
        let pair = [&self.client, &self.backend].map(|s| (s.side, s.fd, s.cookie));
        // Before the FLOWS inserts, from which on the callbacks report: a state change
        // before them is caught by the caller's state check after the splice, as ever.
        if inner.arms_at_splice {
            for socket in [&self.client, &self.backend] {
                arm_events(socket.borrow())
                    .map_err(|e| SpliceError::new(socket.side, SpliceStep::ArmEvents, e))?;
            }
        }
        for (i, (side, _, cookie)) in pair.into_iter().enumerate() {
            map_update(&inner.control, &cookie, &self.control[i], BPF_NOEXIST)
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
                next_seq: socket.next_unread_seq.unwrap_or(0),
                seq_known: u32::from(socket.next_unread_seq.is_some()),
                ..Flow::default()
            };
            let (side, cookie) = (socket.side, socket.cookie);
            map_update(&inner.flows, &cookie, &flow, BPF_NOEXIST)
                .map_err(|e| SpliceError::new(side, SpliceStep::Flows, e))?;
            self.done.flows[i] = true;
        }
        // Both must be targets before either gets the verdict: a redirect to a missing target
        // would drop ACKed bytes (`docs/kernel-notes.md#targets-before-sockets`).
        for (i, (side, fd, cookie)) in pair.into_iter().enumerate() {
            map_update(&inner.targets, &cookie, &fd, BPF_NOEXIST)
                .map_err(|e| SpliceError::new(side, SpliceStep::Targets, e))?;
            self.done.targets[i] = true;
        }
        for (i, (side, fd, cookie)) in pair.into_iter().enumerate() {
            #[cfg(feature = "test-hooks")]
            if i == 1 {
                test_hooks::pause_between_sockets_inserts();
            }
            map_update(&inner.sockets, &cookie, &fd, BPF_NOEXIST)
                .map_err(|e| SpliceError::new(side, SpliceStep::Sockets, e))?;
            self.done.sockets[i] = true;
            inner
                .registry
                .sockhash_entries
                .fetch_add(1, Ordering::Relaxed);
        }
        // Bytes queued before the insert may otherwise sit until the next skb arrives; this
        // calls the data-ready hook, which runs them through the verdict (in pass mode).
        for socket in [&self.client, &self.backend] {
            set_rcvlowat(socket.borrow(), 1)
                .map_err(|e| SpliceError::new(socket.side, SpliceStep::RcvLowat, e))?;
        }
        #[cfg(feature = "test-hooks")]
        if test_hooks::pass_only() {
            return Ok(());
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

    /// For an export to a successor: gives up this process's part without undoing
    /// anything in the kernel. The map entries and socket options stay; the cookies'
    /// event registration goes, and the `SOCKETS` count of the stats with it. Dropped
    /// after this, the splice removes nothing.
    pub(super) fn release(&mut self) {
        let inner = &self.kernel.inner;
        let in_sockets = self.done.sockets.iter().filter(|done| **done).count();
        inner
            .registry
            .sockhash_entries
            .fetch_sub(in_sockets as u64, Ordering::Relaxed);
        self.done = Done::default();
        inner
            .registry
            .unregister(&[self.client.cookie, self.backend.cookie]);
    }

    /// A splice a predecessor made and [`Splice::release`]d, taken over by this process:
    /// `sockets` are the same sockets (checked by cookie), with the baselines and
    /// `CONTROL` values the predecessor recorded, and `done` the steps it had completed,
    /// whose entries dropping the result removes as usual.
    pub(super) fn adopt(
        kernel: &Kernel,
        sockets: [(BorrowedFd<'_>, &SocketRecord); 2],
        fallback: Option<SpliceError>,
    ) -> Result<Splice, SpliceError> {
        let [client, backend] = [Side::Client, Side::Backend].map(|side| {
            let (fd, record) = sockets[index(side)];
            let cookie =
                socket_cookie(fd).map_err(|e| SpliceError::new(side, SpliceStep::Cookie, e))?;
            if cookie != record.cookie {
                return Err(SpliceError::new(
                    side,
                    SpliceStep::Cookie,
                    format!(
                        "the socket's cookie is {cookie}, the record's {}: not the socket \
                         the predecessor spliced",
                        record.cookie
                    ),
                ));
            }
            if record.control.cap != kernel.inner.max_queued_bytes {
                return Err(SpliceError::new(
                    side,
                    SpliceStep::Adopt,
                    format!(
                        "the predecessor's cap is {} bytes, this process's max_queued_bytes \
                         {}: both must agree with the verdict",
                        record.control.cap, kernel.inner.max_queued_bytes
                    ),
                ));
            }
            if record.done.flows {
                // Missing when this Kernel does not share the predecessor's maps.
                kernel
                    .flow_counters(cookie)
                    .map_err(|e| SpliceError::new(side, SpliceStep::Adopt, e))?;
            }
            Ok(SpliceSocket {
                side,
                fd: fd.as_raw_fd(),
                cookie,
                handed_at_splice: record.handed_at_splice,
                acked_at_splice: record.acked_at_splice,
                queued_at_splice: record.queued_at_splice,
                // The FLOWS entry, which holds it, is the predecessor's.
                next_unread_seq: None,
            })
        });
        let (client, backend) = (client?, backend?);
        let events = Arc::new(EventQueue::default());
        kernel.inner.registry.register(
            &[
                (client.cookie, Side::Client),
                (backend.cookie, Side::Backend),
            ],
            &events,
            true,
        )?;
        let records = [sockets[0].1, sockets[1].1];
        let done = Done {
            control: records.map(|r| r.done.control),
            flows: records.map(|r| r.done.flows),
            targets: records.map(|r| r.done.targets),
            sockets: records.map(|r| r.done.sockets),
        };
        let in_sockets = done.sockets.iter().filter(|done| **done).count();
        kernel
            .inner
            .registry
            .sockhash_entries
            .fetch_add(in_sockets as u64, Ordering::Relaxed);
        Ok(Splice {
            kernel: kernel.clone(),
            client,
            backend,
            events,
            control: records.map(|r| Control {
                flushed: r.control.flushed,
                cap: r.control.cap,
                redirect: r.control.redirect,
            }),
            done,
            fallback: fallback.map(Box::new),
        })
    }

    /// What a record of this splice holds for `side`; taken before [`Splice::release`].
    pub(super) fn socket_record(&self, side: Side) -> SocketRecord {
        let socket = self.socket(side);
        let i = index(side);
        let control = self.control[i];
        SocketRecord {
            cookie: socket.cookie,
            handed_at_splice: socket.handed_at_splice,
            acked_at_splice: socket.acked_at_splice,
            queued_at_splice: socket.queued_at_splice,
            control: ControlRecord {
                flushed: control.flushed,
                cap: control.cap,
                redirect: control.redirect,
            },
            done: StepsDone {
                control: self.done.control[i],
                flows: self.done.flows[i],
                targets: self.done.targets[i],
                sockets: self.done.sockets[i],
            },
        }
    }

    /// Removes every entry `attach` made. Never panics.
    pub(super) fn undo(&mut self) {
        let inner = Arc::clone(&self.kernel.inner);
        let cookies = [self.client.cookie, self.backend.cookie];
        // SOCKETS first so the verdict stops before its targets and counters go.
        for (i, cookie) in cookies.iter().enumerate() {
            if std::mem::take(&mut self.done.sockets[i]) {
                inner
                    .registry
                    .sockhash_entries
                    .fetch_sub(1, Ordering::Relaxed);
                remove_logged(MAP_SOCKETS, map_delete(&inner.sockets, cookie));
            }
        }
        for (i, cookie) in cookies.iter().enumerate() {
            if std::mem::take(&mut self.done.targets[i]) {
                remove_logged(MAP_TARGETS, map_delete(&inner.targets, cookie));
            }
        }
        for (i, cookie) in cookies.iter().enumerate() {
            if std::mem::take(&mut self.done.flows[i]) {
                remove_logged(MAP_FLOWS, map_delete(&inner.flows, cookie));
            }
            if std::mem::take(&mut self.done.control[i]) {
                remove_logged(MAP_CONTROL, map_delete(&inner.control, cookie));
            }
        }
        inner.registry.unregister(&cookies);
    }
}

impl Drop for Splice {
    fn drop(&mut self) {
        self.undo();
    }
}

/// Logs a failed removal, except "not found": the kernel removes a socket from sockhashes
/// itself when it is closed.
fn remove_logged(map: &'static str, result: io::Result<()>) {
    match result {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(err) => tracing::warn!(map, error = %err, "removing a splice entry failed"),
    }
}

/// `[client, backend]` arrays are indexed like the direction each side is the source of.
fn index(side: Side) -> usize {
    Direction::from_source(side).index()
}

/// Test builds only (`--features test-hooks`): makes rare kernel races happen every time,
/// and keeps splices in pass mode for measuring it.
#[cfg(feature = "test-hooks")]
pub mod test_hooks {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Duration;

    /// Set (to anything) in a proxy's environment: its splices never turn redirect on by
    /// themselves (on `data_path = "ebpf"`, nothing else does), so every byte goes through
    /// the verdict's pass mode and the sockmap's receive path, where `data_path = "auto"`
    /// leaves a connection it moved out of the kernel. Pass mode
    /// measured as a path of its own (docs/performance.md), with `cargo xtask bench
    /// --targets ebpf --proxy-bin` a binary built with this feature.
    pub const PASS_ONLY_VARIABLE: &str = "SMARTPROXY_TEST_PASS_ONLY";

    pub(super) fn pass_only() -> bool {
        static PASS_ONLY: OnceLock<bool> = OnceLock::new();
        *PASS_ONLY.get_or_init(|| std::env::var_os(PASS_ONLY_VARIABLE).is_some())
    }

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
