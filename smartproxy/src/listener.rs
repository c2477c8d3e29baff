//! Listening: binding the proxy's listen addresses and accepting on them, and the one
//! accept loop every listening socket (the proxy's, the control socket's, the metrics
//! endpoint's) runs until its stop stage.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::backend::{inherited_keepalive, set_listener_keepalive, KnownKeepalive};
use crate::connection::serve;
use crate::shared::{reached, Shared, Stop};
use crate::throttle::Throttle;
use crate::upgrade::Phase;

/// After a failed accept (EMFILE, ENFILE, ENOBUFS) the connection stays in the backlog:
/// wait this long instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// At most one warning of failed accepts per this interval.
const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(1);

/// The warnings of failed accepts on one listening socket, shared by every loop that
/// accepts on it: at most one per [`ACCEPT_WARNING_EVERY`].
pub(crate) fn accept_warnings() -> Throttle {
    Throttle::new(ACCEPT_WARNING_EVERY)
}

/// How many of the proxy's accept loops are accepting. An upgrade waits until none is
/// ([`Accepting::none`]) before it counts the connections to hand over: a loop on another
/// thread may have accepted one just as the handoff began, and it must be in the table by
/// then, or it would be left behind.
#[derive(Debug, Default)]
pub(crate) struct Accepting {
    loops: AtomicUsize,
    stopped: Notify,
}

/// One loop counted in [`Accepting`] while it accepts.
struct AcceptingLoop<'a>(&'a Accepting);

impl Accepting {
    fn enter(&self) -> AcceptingLoop<'_> {
        self.loops.fetch_add(1, Ordering::SeqCst);
        AcceptingLoop(self)
    }

    /// Resolves once no loop accepts.
    pub(crate) async fn none(&self) {
        loop {
            let stopped = self.stopped.notified();
            tokio::pin!(stopped);
            stopped.as_mut().enable();
            if self.loops.load(Ordering::SeqCst) == 0 {
                return;
            }
            stopped.await;
        }
    }
}

impl Drop for AcceptingLoop<'_> {
    fn drop(&mut self) {
        if self.0.loops.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.stopped.notify_waiters();
        }
    }
}

/// Accepts with `accept` until `until` resolves, handing each connection to `accepted`;
/// returns what `until` resolved to. Each caller picks its stop stage in `until`: the
/// proxy's listeners stop at [`Stop::Drain`], the control socket and the metrics endpoint
/// at [`Stop::Exit`]. Failed accepts are warned of through `warnings` ([`accept_warnings`]).
pub(crate) async fn accept_until<S, P, A, T>(
    listener: &str,
    warnings: &Throttle,
    mut accept: impl FnMut() -> A,
    until: impl Future<Output = T>,
    mut accepted: impl FnMut(S, P),
) -> T
where
    A: Future<Output = io::Result<(S, P)>>,
{
    tokio::pin!(until);
    loop {
        let result = tokio::select! {
            // Once it may stop, it accepts nothing more.
            biased;
            ended = &mut until => return ended,
            result = accept() => result,
        };
        match result {
            Ok((stream, peer)) => accepted(stream, peer),
            Err(e) => {
                if let Some(held_back) = warnings.admit(std::time::Instant::now()) {
                    warn!(listener, error = %e, held_back, "accept failed; backing off");
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Starts accepting on a bound listener, on every connection runtime. The caller holds the
/// listeners lock.
pub(crate) fn open_listener(
    shared: &Arc<Shared>,
    listeners: &mut BTreeMap<SocketAddr, SocketAddr>,
    addr: SocketAddr,
    listener: std::net::TcpListener,
) -> io::Result<()> {
    let inherited = std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned()?;
    // Accepted sockets inherit it (one system call here instead of one per connection);
    // set here, not at bind, so that a listener inherited from a predecessor has it too.
    socket2::SockRef::from(&listener).set_nodelay(true)?;
    // An inherited descriptor says what its predecessor set: a blocking accept would hold
    // up a runtime.
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let keepalive = inherited_keepalive(socket2::SockRef::from(&listener));
    let listener = Arc::new(listener);
    let warnings = Arc::new(accept_warnings());
    let accepting = shared
        .runtimes
        .all()
        .iter()
        .map(|runtime| {
            let _registers_with = runtime.enter();
            ProxyListener::new(Arc::clone(&listener)).map(|accepting| (accepting, runtime))
        })
        .collect::<io::Result<Vec<_>>>()?;
    listeners.insert(addr, bound);
    shared
        .lock_handoff_sockets()
        .listeners
        .insert(addr, inherited);
    info!(listen = %bound, "listening");
    for (index, (accepting, runtime)) in accepting.into_iter().enumerate() {
        shared.tasks.spawn_on(
            accept_loop(
                accepting,
                index,
                Arc::clone(&warnings),
                keepalive,
                addr,
                bound,
                Arc::clone(shared),
            ),
            runtime,
        );
    }
    Ok(())
}

/// Closes the descriptor of `addr`'s listener kept for an upgrade's successor: as long as
/// it is open, the socket listens, and clients would wait in its backlog, not be refused.
fn forget_inherited(shared: &Shared, addr: SocketAddr) {
    shared.lock_handoff_sockets().listeners.remove(&addr);
}

/// A listening socket of the proxy's, registered with one connection runtime: each
/// runtime accepts on every listener, and serves what it accepted itself, so that no
/// wake-up crosses threads between the accept and the connection's first byte. The socket
/// closes with the last runtime's registration.
pub(crate) struct ProxyListener(AsyncFd<Arc<std::net::TcpListener>>);

impl ProxyListener {
    fn new(listener: Arc<std::net::TcpListener>) -> io::Result<ProxyListener> {
        // SAFETY: the std listener owns its descriptor and always returns that one; it
        // stays open as long as any registration holds the Arc.
        unsafe { AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE) }
            .map(ProxyListener)
            .map_err(|e| e.into_parts().1)
    }

    /// Takes the socket off this runtime's poller.
    fn into_shared(self) -> Arc<std::net::TcpListener> {
        self.0.into_inner()
    }

    /// The next connection, non-blocking, and registered with no runtime yet.
    async fn accept(&self) -> io::Result<(std::net::TcpStream, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            if let Ok(accepted) = ready.try_io(|listener| accept_nonblocking(listener.get_ref())) {
                return accepted;
            }
        }
    }
}

/// accept4(2) with the flags a tokio socket needs, in the one system call.
fn accept_nonblocking(
    listener: &std::net::TcpListener,
) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    // SAFETY: accept4 writes at most `len` bytes of address into `storage` and sets `len`
    // to what it wrote, which is what `try_init` expects of its closure.
    let (fd, peer) = unsafe {
        SockAddr::try_init(|storage, len| {
            let fd = libc::accept4(
                listener.as_raw_fd(),
                storage.cast(),
                len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            );
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(fd)
            }
        })?
    };
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    let peer = peer
        .as_socket()
        .ok_or_else(|| io::Error::other("accepted a connection with no IP address"))?;
    Ok((stream, peer))
}

/// A listening socket with a backlog fit for bursts of connections, and `keepalive`
/// ([`crate::backend::listener_keepalive`]) for what it accepts to inherit: set before it
/// listens and never changed after, so that every socket it accepts has it. Made without
/// a runtime: at start, listeners are bound before privileges are dropped and before the
/// runtime's threads exist; [`open_listener`] puts it on the runtime.
pub(crate) fn bind_std(
    addr: SocketAddr,
    keepalive: Option<Duration>,
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    set_listener_keepalive(&socket, keepalive)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Accepts on one listen address until shutdown, or until a reload leaves no route on
/// it.
async fn accept_loop(
    listener: ProxyListener,
    runtime: usize,
    warnings: Arc<Throttle>,
    keepalive: KnownKeepalive,
    addr: SocketAddr,
    bound: SocketAddr,
    shared: Arc<Shared>,
) {
    let mut stop = shared.stop.clone();
    let mut generations = shared.generation.subscribe();
    let mut upgrade = shared.upgrade.subscribe();
    loop {
        let until = async {
            tokio::select! {
                _ = reached(&mut stop, Stop::Drain) => Some(true),
                _ = generations.changed() => Some(false),
                _ = upgrade.wait_for(|phase| *phase >= Phase::HandingOff) => None,
            }
        };
        let accepting = shared.accepting.enter();
        let stopped = accept_until(
            "proxy",
            &warnings,
            || listener.accept(),
            until,
            |client, peer| {
                let placed_on = shared.runtimes.place(Some(runtime));
                let client = {
                    let _registers_with = placed_on.enter();
                    TcpStream::from_std(client)
                };
                let client = match client {
                    Ok(client) => client,
                    // As when tokio's own accept fails to register: the socket closes.
                    Err(e) => return warn!(listen = %bound, error = %e, "cannot register an accepted connection; closed it"),
                };
                let record = shared.table.insert(peer);
                shared.stats.accepted();
                let connection = serve(
                    Arc::clone(&shared),
                    shared.generation(),
                    addr,
                    client,
                    keepalive,
                    record,
                );
                shared.tasks.spawn_on(connection, placed_on);
            },
        )
        .await;
        drop(accepting);
        let stopped = match stopped {
            Some(stopped) => stopped,
            // The successor accepts on this socket: wait for the upgrade's outcome. One
            // that failed gives it back.
            None => {
                let phase = upgrade
                    .wait_for(|phase| *phase != Phase::HandingOff)
                    .await
                    .map_or(Phase::HandedOff, |phase| *phase);
                if phase == Phase::HandedOff {
                    forget_inherited(&shared, addr);
                    return;
                }
                continue;
            }
        };
        if stopped {
            // Its last descriptor closes with the listener: connects are refused from now.
            forget_inherited(&shared, addr);
            return;
        }
        let mut listeners = shared.lock_listeners();
        if !generations
            .borrow_and_update()
            .routes
            .listeners
            .contains_key(&addr)
        {
            // Each runtime's loop lets go of the socket here, under the lock, and the last
            // one closes it and forgets the address: a reload that adds it back binds it
            // anew, or, if it comes before the last let go, finds it still open.
            if Arc::into_inner(listener.into_shared()).is_some() {
                listeners.remove(&addr);
                forget_inherited(&shared, addr);
                info!(listen = %bound, "no route uses this address any more: listener closed");
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::task::{Context, Waker};

    use super::*;

    /// A loop whose stop is due accepts nothing more, even with connections waiting: an
    /// upgrade counts on it. Repeated, as without the bias the select picks either at
    /// random.
    #[tokio::test]
    async fn a_loop_whose_stop_is_due_accepts_nothing_more() {
        for _ in 0..32 {
            let mut accepted = 0;
            accept_until(
                "test",
                &accept_warnings(),
                || std::future::ready(Ok(((), ()))),
                std::future::ready(()),
                |(), ()| accepted += 1,
            )
            .await;
            assert_eq!(accepted, 0, "accepted a connection once its stop was due");
        }
    }

    #[test]
    fn an_upgrade_waits_until_every_loop_stopped_accepting() {
        let accepting = Accepting::default();
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            std::pin::pin!(accepting.none()).poll(&mut cx).is_ready(),
            "no loop accepts yet"
        );
        let first = accepting.enter();
        let second = accepting.enter();
        let mut none = std::pin::pin!(accepting.none());
        assert!(none.as_mut().poll(&mut cx).is_pending());
        drop(first);
        assert!(
            none.as_mut().poll(&mut cx).is_pending(),
            "one loop still accepts"
        );
        drop(second);
        assert!(none.as_mut().poll(&mut cx).is_ready());
    }
}
