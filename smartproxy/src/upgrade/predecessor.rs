//! The running proxy's side of an upgrade: starts the successor, hands everything over,
//! and takes back whatever the successor did not take should it fail.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tracing::{info, warn};

use super::binary::{check, BinaryError, CheckedBinary};
use super::message::{Hello, KernelMaps, Message, Stamp};
use super::order::Order;
use super::wire::{self, Frame};
use super::{Outgoing, Phase, ANSWER_TIMEOUT, BINARY_FD_ENV, HANDOFF_FD_ENV, READY_TIMEOUT};
use crate::connection::resume;
use crate::datapath::clock::monotonic_ns;
use crate::shared::{Shared, Stop};

/// How often the handoff checks whether every connection that can move has moved.
const SETTLED_CHECK: Duration = Duration::from_millis(20);
/// How long the handoff waits for the accept loops, each on its own runtime, to stop.
const ACCEPTS_STOP_WITHIN: Duration = Duration::from_secs(1);

/// A finished upgrade.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Upgraded {
    pub old_pid: u32,
    pub new_pid: u32,
    /// Connections the successor took over.
    pub moved: u64,
    /// Connections that stay here until they end (TLS this proxy terminates).
    pub staying: u64,
    pub elapsed_ms: f64,
    pub binary: PathBuf,
    pub sha256: String,
}

/// Why an upgrade did not happen; the running proxy keeps everything.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("the proxy is shutting down")]
    Draining,
    #[error("another upgrade is under way")]
    InProgress,
    #[error(
        "this proxy is still taking over from its predecessor; ask again once it logged \"ready\""
    )]
    TakingOver,
    #[error("the proxy was not started from a configuration file, which a successor must read")]
    NoConfigFile,
    #[error(transparent)]
    Binary(#[from] BinaryError),
    #[error("cannot start the successor {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the successor refused: {0}")]
    Refused(String),
    #[error("the successor exited ({0}) before it confirmed; its log says why")]
    Exited(String),
    #[error("the successor did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the handoff failed while {step}: {source}")]
    Handoff {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel data path: {0}")]
    Kernel(String),
    #[error("unexpected message from the successor: {0}")]
    Protocol(String),
}

fn handoff(step: &'static str) -> impl FnOnce(io::Error) -> UpgradeError {
    move |source| UpgradeError::Handoff { step, source }
}

/// Upgrades the running proxy to a successor started from `binary` (or the binary this
/// proxy was started from). Returns once the successor confirmed; the caller then drains
/// what stayed. On error everything is as it was.
pub(crate) async fn upgrade(
    shared: &Arc<Shared>,
    binary: Option<PathBuf>,
) -> Result<Upgraded, UpgradeError> {
    let started = Instant::now();
    begin(*shared.stop.borrow(), &shared.upgrade)?;
    let result = hand_over(shared, binary, started).await;
    if result.is_ok() {
        if let Some(kernel) = &shared.kernel {
            // The successor reuses the maps: they outlive this process.
            kernel.keep_pins();
        }
    }
    // Read before the handoff is published: the drain that follows it is no stop to
    // pass on.
    let stopped = *shared.stop.borrow() != Stop::Running;
    shared.upgrade.send_replace(if result.is_ok() {
        Phase::HandedOff
    } else {
        Phase::Idle
    });
    if let (Ok(upgraded), true) = (&result, stopped) {
        pass_stop_on(upgraded.new_pid);
    }
    result
}

/// A stop (SIGTERM, SIGINT, `Proxy::shutdown`) that came while this process handed over
/// was meant for the service, which the successor is now: it drains too. A stop after the
/// handoff is this process's alone.
fn pass_stop_on(successor: u32) {
    // Not 0 (unknown), which would signal this process's whole group.
    let Some(pid) = libc::pid_t::try_from(successor).ok().filter(|pid| *pid > 0) else {
        return warn!(successor, "upgrade: a stop came during the handoff, and the successor's pid is unknown: stop it by hand");
    };
    // SAFETY: kill(2) with integer arguments only. The successor confirmed a moment ago:
    // the pid is still its own unless it died and was reaped since.
    if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
        info!(
            successor,
            "upgrade: a stop came during the handoff; passed on to the successor"
        );
    } else {
        let e = io::Error::last_os_error();
        warn!(successor, error = %e, "upgrade: a stop came during the handoff, and the successor cannot be told: stop it by hand");
    }
}

/// Idle -> Starting, unless the proxy drains, still takes over, or another upgrade runs.
fn begin(stop: Stop, upgrade: &watch::Sender<Phase>) -> Result<(), UpgradeError> {
    if stop != Stop::Running {
        return Err(UpgradeError::Draining);
    }
    let mut refused = None;
    upgrade.send_if_modified(|phase| {
        refused = match *phase {
            Phase::Idle => None,
            Phase::TakingOver => Some(UpgradeError::TakingOver),
            Phase::Starting | Phase::HandingOff | Phase::HandedOff => {
                Some(UpgradeError::InProgress)
            }
        };
        if refused.is_none() {
            *phase = Phase::Starting;
        }
        refused.is_none()
    });
    refused.map_or(Ok(()), Err)
}

async fn hand_over(
    shared: &Arc<Shared>,
    binary: Option<PathBuf>,
    started: Instant,
) -> Result<Upgraded, UpgradeError> {
    let generation = shared.generation();
    if generation.config.source.is_none() {
        return Err(UpgradeError::NoConfigFile);
    }
    if let Some(kernel) = &shared.kernel {
        if kernel.pin_dir().is_none() {
            return Err(UpgradeError::Kernel(
                "its maps are not pinned (the start log says why), so a successor cannot reuse them: set proxy.ebpf_pin_root to a bpffs, or to a directory where the proxy may mount one, and restart".into(),
            ));
        }
    }
    if shared.successor.args.is_empty() {
        return Err(UpgradeError::NoConfigFile);
    }
    let path = binary.unwrap_or_else(|| shared.successor.binary.clone());
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    // Hashing the binary reads all of it: not on a worker that relays connections.
    let binary = tokio::task::spawn_blocking(move || check(&path, euid))
        .await
        .map_err(|e| handoff("checking the binary")(io::Error::other(e)))??;
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(handoff("creating the socket pair"))?;
    let mut child = spawn(shared, &binary, theirs.as_fd())?;
    drop(theirs);
    let new_pid = child.id().unwrap_or(0);
    info!(binary = %binary.path.display(), sha256 = %binary.sha256, pid = new_pid, "upgrade: successor started");
    let result = async {
        ours.set_nonblocking(true)
            .map_err(handoff("setting up the socket"))?;
        let socket = UnixStream::from_std(ours).map_err(handoff("setting up the socket"))?;
        if let Err(e) = send_hello(shared, &socket).await {
            // A successor that exits at once closes its end before the first message.
            return Err(match e {
                UpgradeError::Handoff { source, .. }
                    if matches!(
                        source.kind(),
                        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
                    ) =>
                {
                    exited(&mut child).await
                }
                e => e,
            });
        }
        let (frames, mut incoming) = mpsc::unbounded_channel();
        let socket = Arc::new(socket);
        let reader = tokio::spawn(read_frames(Arc::clone(&socket), frames));
        let moved = async {
            let splices_armed = match next(&mut incoming, &mut child, READY_TIMEOUT).await? {
                Message::Ready { pid, splices_armed } => {
                    info!(pid, splices_armed, "upgrade: successor ready, handing over");
                    splices_armed
                }
                other => return Err(unexpected(other)),
            };
            move_connections(shared, &socket, &mut incoming, &mut child, !splices_armed).await
        }
        .await;
        reader.abort();
        moved
    }
    .await;
    match result {
        Ok((moved, staying)) => Ok(Upgraded {
            old_pid: std::process::id(),
            new_pid,
            moved,
            staying,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            binary: binary.path,
            sha256: binary.sha256,
        }),
        Err(e) => {
            // The successor may run on, holding what it took: a second proxy would share
            // the listeners. It ends here.
            stop_successor(&mut child).await;
            Err(e)
        }
    }
}

/// Kills the successor unless it has exited, and reaps it.
async fn stop_successor(child: &mut Child) {
    // None once reaped: it exited, or an earlier call stopped it.
    if child.id().is_some() {
        if let Err(kill) = child.start_kill() {
            warn!(error = %kill, "upgrade: cannot stop the successor");
        }
    }
    let _ = child.wait().await;
}

/// Starts the successor with its end of the socket pair and its binary open.
fn spawn(
    shared: &Shared,
    binary: &CheckedBinary,
    socket: BorrowedFd<'_>,
) -> Result<Child, UpgradeError> {
    let (socket_fd, binary_fd) = (socket.as_raw_fd(), binary.file.as_raw_fd());
    // The file that was checked is the one started: through its descriptor, not its
    // path, which may name another file by now.
    let mut command = Command::new(format!("/proc/self/fd/{binary_fd}"));
    command
        .args(&shared.successor.args)
        .env(HANDOFF_FD_ENV, socket_fd.to_string())
        .env(BINARY_FD_ENV, binary_fd.to_string())
        .stdin(Stdio::null())
        .kill_on_drop(false);
    // SAFETY: between fork and exec the closure only calls fcntl, which is
    // async-signal-safe, on descriptors this process keeps open until the spawn returns.
    unsafe {
        command.pre_exec(move || {
            for fd in [socket_fd, binary_fd] {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    command.spawn().map_err(|source| UpgradeError::Spawn {
        binary: binary.path.clone(),
        source,
    })
}

async fn send_hello(shared: &Shared, socket: &UnixStream) -> Result<(), UpgradeError> {
    let duplicate = |e| handoff("duplicating the listening sockets")(e);
    // New descriptors, so that no lock is held while the frame is sent.
    let (listeners, control, metrics) = {
        let sockets = shared.lock_handoff_sockets();
        let mut listeners = Vec::new();
        for (addr, fd) in &sockets.listeners {
            listeners.push((*addr, fd.try_clone().map_err(duplicate)?));
        }
        let control = match &sockets.control {
            Some(fd) => fd.try_clone().map_err(duplicate)?,
            None => {
                return Err(UpgradeError::Protocol(
                    "the control socket has no descriptor to hand over".into(),
                ))
            }
        };
        let metrics = match &sockets.metrics {
            Some((addr, fd)) => Some((*addr, fd.try_clone().map_err(duplicate)?)),
            None => None,
        };
        (listeners, control, metrics)
    };
    let mut fds: Vec<BorrowedFd<'_>> = listeners.iter().map(|(_, fd)| fd.as_fd()).collect();
    fds.push(control.as_fd());
    fds.extend(metrics.iter().map(|(_, fd)| fd.as_fd()));
    // The ebpf keys are restart-only: the running configuration made the maps.
    let options = shared.generation().config.kernel_options();
    let kernel = shared.kernel.as_ref().and_then(|kernel| {
        Some(KernelMaps {
            pins: kernel.pin_dir()?.to_owned(),
            ring_buffer_bytes: options.ring_buffer_bytes,
            max_connections: options.max_connections,
            max_queued_bytes: options.max_queued_bytes,
            arms_at_splice: kernel.arms_at_splice(),
        })
    });
    let hello = Message::Hello(Box::new(Hello {
        stamp: Stamp::this_build(),
        pid: std::process::id(),
        listeners: listeners.iter().map(|(addr, _)| *addr).collect(),
        metrics: metrics.as_ref().map(|(addr, _)| *addr),
        next_id: shared.table.next_id(),
        kernel,
    }));
    wire::send(socket, &hello, &[], &fds)
        .await
        .map_err(handoff("sending the listening sockets"))
}

/// Reads every frame the successor sends, in order, until the socket closes.
async fn read_frames(socket: Arc<UnixStream>, frames: mpsc::UnboundedSender<io::Result<Message>>) {
    loop {
        let frame = wire::receive::<Message>(&socket).await;
        let end = frame.is_err();
        if frames
            .send(frame.map(|Frame { message, .. }| message))
            .is_err()
            || end
        {
            return;
        }
    }
}

/// The successor's next message, within `within`.
async fn next(
    incoming: &mut mpsc::UnboundedReceiver<io::Result<Message>>,
    child: &mut Child,
    within: Duration,
) -> Result<Message, UpgradeError> {
    tokio::select! {
        frame = incoming.recv() => match frame {
            Some(Ok(Message::Refused { reason })) => Err(UpgradeError::Refused(reason)),
            Some(Ok(message)) => Ok(message),
            // A reset: it closed its end with our messages unread.
            Some(Err(e)) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => Err(exited(child).await),
            Some(Err(e)) => Err(handoff("reading the successor's answer")(e)),
            None => Err(exited(child).await),
        },
        _ = sleep_until(Instant::now() + within) => Err(UpgradeError::Timeout(within)),
    }
}

/// The successor closed its socket: how it exited, waiting briefly for it.
async fn exited(child: &mut Child) -> UpgradeError {
    match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(status)) => UpgradeError::Exited(status.to_string()),
        Ok(Err(e)) => UpgradeError::Exited(format!("status unknown: {e}")),
        Err(_) => UpgradeError::Exited("closed the handoff socket and still runs".into()),
    }
}

fn unexpected(message: Message) -> UpgradeError {
    UpgradeError::Protocol(format!("{message:?}"))
}

/// Stops accepting, moves every connection that can move, and waits for the successor's
/// confirmation. Returns (moved, staying). On error, every connection the successor did
/// not take is resumed here.
async fn move_connections(
    shared: &Arc<Shared>,
    socket: &UnixStream,
    incoming: &mut mpsc::UnboundedReceiver<io::Result<Message>>,
    child: &mut Child,
    arm_unspliced: bool,
) -> Result<(u64, u64), UpgradeError> {
    if let Some(kernel) = &shared.kernel {
        // From here the successor reads the kernel's state changes.
        if let Err(e) = kernel.pause_events().await {
            return Err(UpgradeError::Kernel(crate::error_chain(&e)));
        }
    }
    let (sender, mut outgoing) = mpsc::unbounded_channel::<Outgoing>();
    *shared.lock_handoff() = Some(sender);
    shared.upgrade.send_replace(Phase::HandingOff);
    // Every connection accepted here is in the table before it is counted. Bounded: a
    // loop that does not answer leaves what it accepts here, to drain.
    if tokio::time::timeout(ACCEPTS_STOP_WITHIN, shared.accepting.none())
        .await
        .is_err()
    {
        warn!("upgrade: an accept loop did not stop in time; what it accepts stays here");
    }
    let lifecycle = shared.generation().config.lifecycle;
    // A connection still in its handshake or backend connect moves once it is set up;
    // one that takes longer than both timeouts allow stays here.
    let started = Instant::now();
    let give_up = started + lifecycle.handshake_timeout + lifecycle.connect_timeout;
    let mut order = Order::busy_first(
        &shared.table,
        monotonic_ns(),
        started + (give_up - started) / 2,
    );
    let mut pending: HashMap<u64, Outgoing> = HashMap::new();
    let queues = Queues {
        outgoing: &mut outgoing,
        pending: &mut pending,
        order: &mut order,
    };
    let result = exchange(
        shared,
        socket,
        incoming,
        child,
        queues,
        give_up,
        arm_unspliced,
    )
    .await;
    // No connection is handed to the handoff from now on; those on their way stay here.
    shared.lock_handoff().take();
    if result.is_err() {
        // It may drive connections whose `Taken` is still unread here: it stops before
        // they run here again, or two processes would read their sockets.
        stop_successor(child).await;
        let mut back = 0;
        // Ends once no task holds a sender: none keeps one across an await.
        while let Some(out) = outgoing.recv().await {
            pending.insert(out.record.id, out);
        }
        for (_, Outgoing { record, moved }) in pending.drain() {
            let id = record.id;
            if let Err(e) = resume(shared, record, moved) {
                warn!(id, error = %e, "upgrade failed and a connection could not be resumed here");
            }
            back += 1;
        }
        shared.read_kernel_events();
        info!(
            resumed = back,
            "upgrade failed: the connections not taken over run here again"
        );
    }
    result
}

async fn exchange(
    shared: &Arc<Shared>,
    socket: &UnixStream,
    incoming: &mut mpsc::UnboundedReceiver<io::Result<Message>>,
    child: &mut Child,
    queues: Queues<'_>,
    give_up: Instant,
    arm_unspliced: bool,
) -> Result<(u64, u64), UpgradeError> {
    let Queues {
        outgoing,
        pending,
        order,
    } = queues;
    let mut moved = 0u64;
    // Set once no connection is handed over any more: the connections that stay here.
    let mut closing: Option<u64> = None;
    // Every sender is gone: nothing more can come.
    let mut drained = false;
    let mut done_sent = false;
    let mut settled = tokio::time::interval(SETTLED_CHECK);
    loop {
        if let (Some(staying), true, true, false) =
            (closing, drained, pending.is_empty(), done_sent)
        {
            let message = Message::Done {
                totals: Box::new(shared.stats.totals()),
                next_id: shared.table.next_id(),
                staying,
            };
            within_answer_timeout(wire::send(socket, &message, &[], &[]))
                .await?
                .map_err(handoff("sending the end of the handoff"))?;
            done_sent = true;
        }
        tokio::select! {
            out = outgoing.recv(), if !drained => match out {
                Some(out) => {
                    if arm_unspliced {
                        arm_for_successor(shared, &out);
                    }
                    let sent = within_answer_timeout(send_connection(socket, &out)).await;
                    // Kept should the send fail: the failed upgrade resumes it here.
                    pending.insert(out.record.id, out);
                    sent??;
                }
                None => drained = true,
            },
            message = next(incoming, child, ANSWER_TIMEOUT), if !pending.is_empty() || done_sent => {
                match message? {
                    Message::Taken { id } => {
                        if pending.remove(&id).is_some() {
                            moved += 1;
                        }
                    }
                    Message::Confirmed { connections } if done_sent => {
                        let staying = closing.unwrap_or(0);
                        info!(moved, connections, staying, "upgrade: the successor confirmed");
                        return Ok((moved, staying));
                    }
                    other => return Err(unexpected(other)),
                }
            }
            _ = settled.tick(), if closing.is_none() => {
                let asked = order.look(&shared.table, !outgoing.is_empty(), pending.len());
                if asked > 0 {
                    info!(after = moved, quiet = asked, "upgrade: the quiet connections go over now");
                }
                let (movable, staying) = shared.table.remaining_for_handoff();
                if movable == 0 || Instant::now() >= give_up {
                    // Tasks hold a clone only while they hand over, never across an
                    // await: the channel ends right after the ones on their way.
                    shared.lock_handoff().take();
                    closing = Some(staying + movable);
                }
            }
        }
    }
}

/// What the handoff moves connections through: those handed to it and not yet sent, those
/// sent and not yet taken, and the quiet ones, asked last.
struct Queues<'a> {
    outgoing: &'a mut mpsc::UnboundedReceiver<Outgoing>,
    pending: &'a mut HashMap<u64, Outgoing>,
    order: &'a mut Order,
}

/// `send` unless it takes longer than [`ANSWER_TIMEOUT`]: a successor that stops reading
/// without closing its socket would hold the exchange, whose other checks wait meanwhile.
async fn within_answer_timeout<T>(send: impl Future<Output = T>) -> Result<T, UpgradeError> {
    tokio::time::timeout(ANSWER_TIMEOUT, send)
        .await
        .map_err(|_| UpgradeError::Timeout(ANSWER_TIMEOUT))
}

/// For a successor that splices sockets without arming them (see `Message::Ready`): turns
/// on the sock_ops callbacks of a connection that is not spliced, which this process would
/// have done at its splice. Without them a later splice there would never hear of a FIN
/// or an RST. A failure is logged, and the connection moves all the same: the successor
/// may never splice it.
fn arm_for_successor(shared: &Shared, out: &Outgoing) {
    let Some(kernel) = &shared.kernel else {
        return;
    };
    if out.record.offload.is_some() {
        return;
    }
    for (side, fd) in [
        ("client", &out.moved.client),
        ("backend", &out.moved.backend),
    ] {
        if let Err(e) = kernel.arm_events(fd.as_fd()) {
            warn!(
                id = out.record.id,
                side,
                error = %e,
                "arming a socket's state events for the successor failed"
            );
        }
    }
}

async fn send_connection(socket: &UnixStream, out: &Outgoing) -> Result<(), UpgradeError> {
    let [to_backend, to_client] = &out.moved.pending;
    let tail = [to_backend.as_slice(), to_client.as_slice()].concat();
    let fds = [out.moved.client.as_fd(), out.moved.backend.as_fd()];
    wire::send(
        socket,
        &Message::Connection(Box::new(out.record.clone())),
        &tail,
        &fds,
    )
    .await
    .map_err(handoff("sending a connection"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begun(stop: Stop, phase: Phase) -> (Result<(), UpgradeError>, Phase) {
        let upgrade = watch::Sender::new(phase);
        let result = begin(stop, &upgrade);
        let now = *upgrade.borrow();
        (result, now)
    }

    #[test]
    fn only_an_idle_running_proxy_begins_an_upgrade() {
        assert!(matches!(
            begun(Stop::Running, Phase::Idle),
            (Ok(()), Phase::Starting)
        ));
        assert!(matches!(
            begun(Stop::Drain, Phase::Idle),
            (Err(UpgradeError::Draining), Phase::Idle)
        ));
        for under_way in [Phase::Starting, Phase::HandingOff, Phase::HandedOff] {
            let (result, now) = begun(Stop::Running, under_way);
            assert!(
                matches!(result, Err(UpgradeError::InProgress)),
                "{under_way:?}"
            );
            assert_eq!(now, under_way);
        }
    }

    #[test]
    fn a_successor_still_taking_over_refuses_its_own_upgrade() {
        let (result, now) = begun(Stop::Running, Phase::TakingOver);
        let refused = result.expect_err("refused");
        assert!(matches!(refused, UpgradeError::TakingOver));
        assert!(refused.to_string().contains("still taking over"));
        assert_eq!(now, Phase::TakingOver);
    }
}
