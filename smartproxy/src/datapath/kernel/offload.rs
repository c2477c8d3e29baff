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

use super::{sys, FlowCounters, Kernel, Splice, SpliceError, SpliceStep, Wait};
use crate::vocab::{Direction, Side};

/// The first re-check of the kernel backlog, or of what a destination acknowledged;
/// doubles up to `BACKLOG_POLL_MAX`. There is no limit on the backlog wait itself: hundreds
/// of MB may be queued toward a slow reader.
pub(crate) const BACKLOG_POLL_MIN: Duration = Duration::from_millis(1);
pub(crate) const BACKLOG_POLL_MAX: Duration = Duration::from_millis(50);

/// How often a half-closed spliced connection re-checks its sockets' TCP state, in case
/// the ring buffer lost the event of an RST.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

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
    backoff: [Duration; 2],
    sweep: Interval,
}

impl Offload {
    /// Splices the pair and makes `meter` count the kernel's bytes too: from before the
    /// splice, since the kernel may move bytes before this task runs again.
    pub fn new(
        kernel: &Kernel,
        client: std::os::fd::BorrowedFd<'_>,
        backend: std::os::fd::BorrowedFd<'_>,
        meter: Arc<dyn CountsKernelFlows>,
    ) -> Result<Offload, SpliceError> {
        let cookie = |side, fd| {
            sys::socket_cookie(fd).map_err(|e| SpliceError::new(side, SpliceStep::Cookie, e))
        };
        meter.attach_kernel(KernelFlows {
            kernel: kernel.clone(),
            cookies: [
                cookie(Side::Client, client)?,
                cookie(Side::Backend, backend)?,
            ],
        });
        let splice = kernel.splice(client, backend).inspect_err(|_| {
            // Nothing of the kernel's to count: its entries are gone again.
            meter.detach_kernel();
        })?;
        Ok(Offload {
            splice,
            meter,
            taken: [0; 2],
            written: [0; 2],
            retry: [None, None],
            backoff: [BACKLOG_POLL_MIN; 2],
            sweep: {
                let mut sweep = interval_at(Instant::now() + SWEEP_INTERVAL, SWEEP_INTERVAL);
                sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
                sweep
            },
        })
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
                self.backoff[index] = BACKLOG_POLL_MIN;
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
                    self.backoff[index] = BACKLOG_POLL_MIN;
                    return Poll::Ready(());
                }
            }
            ready!(self.poll_retry(cx, index));
        }
    }

    /// Waits for the next re-check of `index`, backing off.
    fn poll_retry(&mut self, cx: &mut Context<'_>, index: usize) -> Poll<()> {
        let backoff = self.backoff[index];
        let sleep = self.retry[index].get_or_insert_with(|| Box::pin(tokio::time::sleep(backoff)));
        ready!(sleep.as_mut().poll(cx));
        self.retry[index] = None;
        self.backoff[index] = (backoff * 2).min(BACKLOG_POLL_MAX);
        Poll::Ready(())
    }

    /// Whether a read of `direction`'s source may find anything: see
    /// [`Splice::may_have_bytes_to_read`].
    pub fn may_have_bytes_to_read(&self, direction: Direction) -> bool {
        self.splice.may_have_bytes_to_read(direction.source())
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

    /// Whether a socket's TCP state may have changed: the sock_ops program reported a
    /// change, or, while `watching` (a side sent FIN), the periodic sweep is due. The sweep
    /// finds what a ring-buffer event that was lost would have reported.
    pub fn poll_state_check(&mut self, cx: &mut Context<'_>, watching: bool) -> bool {
        let mut due = false;
        while let Poll::Ready(Some(change)) = self.splice.poll_event(cx) {
            tracing::debug!(?change, "tcp state change");
            due = true;
        }
        if watching {
            while self.sweep.poll_tick(cx).is_ready() {
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
    /// Folds the kernel's final counts in, before the splice goes away.
    fn detach_kernel(&self);
}

/// Reads a spliced connection's kernel counters, for its meter.
#[derive(Debug)]
pub struct KernelFlows {
    kernel: Kernel,
    /// `[client, backend]`: the sources of client->backend and backend->client.
    cookies: [u64; 2],
}

impl KernelFlows {
    /// The verdict's counters of `direction`; zero if they cannot be read (the connection
    /// is being torn down).
    pub fn counters(&self, direction: Direction) -> FlowCounters {
        self.kernel
            .flow_counters(self.cookies[direction.index()])
            .unwrap_or_default()
    }
}
