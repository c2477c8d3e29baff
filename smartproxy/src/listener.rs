//! Listening: binding the proxy's listen addresses and accepting on them, and the one
//! accept loop every listening socket (the proxy's, the control socket's, the metrics
//! endpoint's) runs until its stop stage.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::connection::serve;
use crate::shared::{reached, Shared, Stop};
use crate::upgrade::Phase;

/// After a failed accept (EMFILE, ENFILE, ENOBUFS) the connection stays in the backlog:
/// wait this long instead of spinning on it.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// At most one warning of failed accepts per this interval.
const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(1);

/// Accepts with `accept` until `until` resolves, handing each connection to `accepted`;
/// returns what `until` resolved to. Each caller picks its stop stage in `until`: the
/// proxy's listeners stop at [`Stop::Drain`], the control socket and the metrics endpoint
/// at [`Stop::Exit`].
pub(crate) async fn accept_until<S, P, A, T>(
    listener: &str,
    mut accept: impl FnMut() -> A,
    until: impl Future<Output = T>,
    mut accepted: impl FnMut(S, P),
) -> T
where
    A: Future<Output = io::Result<(S, P)>>,
{
    tokio::pin!(until);
    let mut last_warning: Option<Instant> = None;
    loop {
        let result = tokio::select! {
            ended = &mut until => return ended,
            result = accept() => result,
        };
        match result {
            Ok((stream, peer)) => accepted(stream, peer),
            Err(e) => {
                let now = Instant::now();
                if last_warning.is_none_or(|at| now - at >= ACCEPT_WARNING_EVERY) {
                    warn!(listener, error = %e, "accept failed; backing off");
                    last_warning = Some(now);
                }
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Binds a listener and starts accepting on it. The caller holds the listeners lock.
pub(crate) fn open_listener(
    shared: &Arc<Shared>,
    listeners: &mut BTreeMap<SocketAddr, SocketAddr>,
    addr: SocketAddr,
    listener: std::net::TcpListener,
) -> io::Result<()> {
    let inherited = std::os::fd::AsFd::as_fd(&listener).try_clone_to_owned()?;
    let listener = ProxyListener::new(listener)?;
    let bound = listener.local_addr()?;
    listeners.insert(addr, bound);
    shared
        .lock_handoff_sockets()
        .listeners
        .insert(addr, inherited);
    info!(listen = %bound, "listening");
    shared
        .tasks
        .spawn(accept_loop(listener, addr, bound, Arc::clone(shared)));
    Ok(())
}

/// Closes the descriptor of `addr`'s listener kept for an upgrade's successor: as long as
/// it is open, the socket listens, and clients would wait in its backlog, not be refused.
fn forget_inherited(shared: &Shared, addr: SocketAddr) {
    shared.lock_handoff_sockets().listeners.remove(&addr);
}

/// A listening socket of the proxy's, on the runtime its accept loop runs on. What it
/// accepts is registered with the connection's own runtime ([`crate::workers`]), once:
/// not first with this one's poller, then moved.
pub(crate) struct ProxyListener(AsyncFd<std::net::TcpListener>);

impl ProxyListener {
    pub(crate) fn new(listener: std::net::TcpListener) -> io::Result<ProxyListener> {
        // Accepted sockets inherit it (one system call here instead of one per
        // connection); set here, not at bind, so that a listener inherited from a
        // predecessor has it too.
        socket2::SockRef::from(&listener).set_nodelay(true)?;
        // An inherited descriptor says what its predecessor set: a blocking accept
        // would hold up the control plane's one thread.
        listener.set_nonblocking(true)?;
        // SAFETY: the std listener owns its descriptor and always returns that one; it
        // moves into the AsyncFd and closes only with it.
        unsafe { AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE) }
            .map(ProxyListener)
            .map_err(|e| e.into_parts().1)
    }

    pub(crate) fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
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

/// A listening socket with a backlog fit for bursts of connections. Made without a
/// runtime: at start, listeners are bound before privileges are dropped and before the
/// runtime's threads exist; [`open_listener`] puts it on the runtime.
pub(crate) fn bind_std(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Accepts on one listen address until shutdown, or until a reload leaves no route on
/// it.
async fn accept_loop(
    listener: ProxyListener,
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
        let stopped = accept_until(
            "proxy",
            || listener.accept(),
            until,
            |client, peer| {
                let runtime = shared.runtimes.next();
                let client = {
                    let _registers_with = runtime.enter();
                    TcpStream::from_std(client)
                };
                let client = match client {
                    Ok(client) => client,
                    // As when tokio's own accept fails to register: the socket closes.
                    Err(e) => return warn!(listen = %bound, error = %e, "cannot register an accepted connection; closed it"),
                };
                let record = shared.table.insert(peer);
                shared.stats.accepted();
                let generation = shared.generation();
                shared.tasks.spawn_on(
                    serve(Arc::clone(&shared), generation, addr, client, record),
                    runtime,
                );
            },
        )
        .await;
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
            // Closed under the lock: a reload that adds the address back binds it anew.
            drop(listener);
            listeners.remove(&addr);
            forget_inherited(&shared, addr);
            info!(listen = %bound, "no route uses this address any more: listener closed");
            return;
        }
    }
}
