//! Listening: binding the proxy's listen addresses and accepting on them, and the one
//! accept loop every listening socket (the proxy's, the control socket's, the metrics
//! endpoint's) runs until its stop stage.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
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
    let listener = TcpListener::from_std(listener)?;
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

/// A listening socket with a backlog fit for bursts of connections, on the runtime.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr)?)
}

/// [`bind`] without a runtime: at start, listeners are bound before privileges are
/// dropped and before the runtime's threads exist.
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
pub(crate) async fn accept_loop(
    listener: TcpListener,
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
                let record = shared.table.insert(peer);
                shared.stats.accepted();
                let generation = shared.generation();
                shared
                    .tasks
                    .spawn(serve(Arc::clone(&shared), generation, addr, client, record));
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
