//! Listening: binding the proxy's listen addresses and accepting on them, and the one
//! accept loop every listening socket (the proxy's, the control socket's, the metrics
//! endpoint's) runs until its stop stage.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
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

/// A listen address in use: where it is bound, and which runtimes accept on it.
#[derive(Debug)]
pub(crate) struct Listening {
    pub(crate) bound: SocketAddr,
    /// Open as long as an accept loop holds it.
    socket: Weak<std::net::TcpListener>,
    /// By runtime index: whether an accept loop of that runtime holds the socket.
    accepting_on: Vec<bool>,
    warnings: Arc<Throttle>,
    keepalive: KnownKeepalive,
}

/// The proxy's listen addresses, by the address configured.
pub(crate) type Listeners = BTreeMap<SocketAddr, Listening>;

/// Starts accepting on a bound listener, on every connection runtime. The caller holds the
/// listeners lock.
pub(crate) fn open_listener(
    shared: &Arc<Shared>,
    listeners: &mut Listeners,
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
    let mut listening = Listening {
        bound,
        socket: Arc::downgrade(&listener),
        accepting_on: vec![false; shared.runtimes.all().len()],
        warnings: Arc::new(accept_warnings()),
        keepalive,
    };
    let registered = register_where_missing(shared, &listening, &listener)?;
    shared
        .lock_handoff_sockets()
        .listeners
        .insert(addr, inherited);
    info!(listen = %bound, "listening");
    spawn_accept_loops(shared, addr, &mut listening, registered);
    listeners.insert(addr, listening);
    Ok(())
}

/// Accepts on `addr` again on every runtime whose loop let go of it: a reload removed the
/// address, and the one that adds it back came before each runtime had seen the first.
/// The caller holds the listeners lock.
pub(crate) fn accept_again(
    shared: &Arc<Shared>,
    listeners: &mut Listeners,
    addr: SocketAddr,
) -> io::Result<()> {
    let Some(listening) = listeners.get_mut(&addr) else {
        return Ok(());
    };
    // The address leaves the map with the last loop's socket: an entry's socket is open.
    let Some(socket) = listening.socket.upgrade() else {
        return Ok(());
    };
    let registered = register_where_missing(shared, listening, &socket)?;
    if !registered.is_empty() {
        info!(listen = %listening.bound, runtimes = registered.len(), "accepting again");
    }
    spawn_accept_loops(shared, addr, listening, registered);
    Ok(())
}

/// The socket registered with each runtime that has no accept loop on it, by index: all
/// of them, or none.
fn register_where_missing<'a>(
    shared: &'a Shared,
    listening: &Listening,
    socket: &Arc<std::net::TcpListener>,
) -> io::Result<Vec<(usize, ProxyListener, &'a tokio::runtime::Handle)>> {
    shared
        .runtimes
        .all()
        .iter()
        .enumerate()
        .filter(|(index, _)| !listening.accepting_on[*index])
        .map(|(index, runtime)| {
            let _registers_with = runtime.enter();
            ProxyListener::new(Arc::clone(socket)).map(|accepting| (index, accepting, runtime))
        })
        .collect()
}

fn spawn_accept_loops(
    shared: &Arc<Shared>,
    addr: SocketAddr,
    listening: &mut Listening,
    registered: Vec<(usize, ProxyListener, &tokio::runtime::Handle)>,
) {
    for (index, accepting, runtime) in registered {
        listening.accepting_on[index] = true;
        shared.tasks.spawn_on(
            accept_loop(
                accepting,
                index,
                Arc::clone(&listening.warnings),
                listening.keepalive,
                addr,
                listening.bound,
                Arc::clone(shared),
            ),
            runtime,
        );
    }
}

/// Takes runtime `runtime`'s accept loop off `addr`'s socket. Returns whether that closed
/// the socket (no other loop held it). The caller holds the listeners lock.
fn let_go(
    listeners: &mut Listeners,
    addr: SocketAddr,
    runtime: usize,
    listener: ProxyListener,
) -> bool {
    if let Some(listening) = listeners.get_mut(&addr) {
        listening.accepting_on[runtime] = false;
    }
    Arc::into_inner(listener.into_shared()).is_some()
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
        // Before every accept, the first one too: a receiver subscribed after a reload
        // (this task may first run after one that removed the address) sees no change.
        {
            let mut listeners = shared.lock_listeners();
            if !generations
                .borrow_and_update()
                .routes
                .listeners
                .contains_key(&addr)
            {
                // Each runtime's loop lets go of the socket here, under the lock, and the
                // last one closes it and forgets the address: a reload that adds it back
                // binds it anew, or, if it comes before the last let go, finds it still
                // open and accepts on it again where loops let go ([`accept_again`]).
                if let_go(&mut listeners, addr, runtime, listener) {
                    listeners.remove(&addr);
                    forget_inherited(&shared, addr);
                    info!(listen = %bound, "no route uses this address any more: listener closed");
                }
                return;
            }
        }
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
                    let_go(&mut shared.lock_listeners(), addr, runtime, listener);
                    forget_inherited(&shared, addr);
                    return;
                }
                continue;
            }
        };
        if stopped {
            // Its last descriptor closes with the listener: connects are refused from now.
            let_go(&mut shared.lock_listeners(), addr, runtime, listener);
            forget_inherited(&shared, addr);
            return;
        }
        // A new generation: checked at the top of the loop.
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

    /// How many runtimes accept on the configured address `addr` (0 once it is closed).
    fn runtimes_accepting(proxy: &crate::Proxy, addr: SocketAddr) -> usize {
        proxy
            .shared
            .lock_listeners()
            .get(&addr)
            .map_or(0, |listening| listening.socket.strong_count())
    }

    /// A reload that removes an address, and one that adds it back before every runtime
    /// saw the first: the socket stayed open, and each runtime accepts on it again. One
    /// runtime is held up so that its loop sees neither reload until both are done, while
    /// the other's loop lets go in between.
    #[tokio::test]
    async fn an_address_added_back_before_every_runtime_let_go_is_accepted_on_each() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let file = dir.path().join("smartproxy.toml");
        let extra: SocketAddr = "127.0.0.2:0".parse().expect("an address");
        let write = |with_extra: bool| {
            let mut text = format!(
                "[proxy]\ndata_path = \"userspace\"\ncontrol_socket = {:?}\n\n\
                 [[route]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\ntargets = [\"127.0.0.1:9\"]\n",
                dir.path().join("control.sock").display().to_string()
            );
            if with_extra {
                text += &format!(
                    "[[route]]\nname = \"extra\"\nlisten = \"{extra}\"\ntargets = [\"127.0.0.1:9\"]\n"
                );
            }
            std::fs::write(&file, text).expect("write the config");
        };
        write(true);
        let mut prepared = crate::Proxy::prepare(
            crate::config::Config::from_file(&file).expect("the config loads"),
        )
        .expect("the proxy prepares");
        prepared.runtimes = 2;
        let proxy =
            crate::Proxy::start_prepared(prepared, Arc::new(crate::resolve::SystemResolver))
                .await
                .expect("the proxy starts");
        assert_eq!(runtimes_accepting(&proxy, extra), 2);

        let (release, released) = std::sync::mpsc::channel::<()>();
        let (held, holding) = tokio::sync::oneshot::channel();
        proxy.shared.runtimes.all()[1].spawn(async move {
            let _ = held.send(());
            // Blocks the runtime's one thread, and with it the accept loops on it.
            let _ = released.recv();
        });
        holding.await.expect("runtime 1 is held up");
        write(false);
        proxy.reload().await.expect("removing the address");
        smartproxy_test_support::wait_for("runtime 0 lets go of the address", || {
            runtimes_accepting(&proxy, extra) == 1
        })
        .await;
        write(true);
        proxy.reload().await.expect("adding it back");
        release.send(()).expect("runtime 1 is released");
        smartproxy_test_support::wait_for("both runtimes accept on it again", || {
            runtimes_accepting(&proxy, extra) == 2
        })
        .await;
        // Runtime 1's loop saw the address back, and runtime 0's new one stays: still two
        // once runtime 1 went through both reloads.
        let (through, gone_through) = tokio::sync::oneshot::channel();
        proxy.shared.runtimes.all()[1].spawn(async move {
            let _ = through.send(());
        });
        gone_through.await.expect("runtime 1 runs again");
        tokio::task::yield_now().await;
        assert_eq!(runtimes_accepting(&proxy, extra), 2);
        proxy.shutdown();
        proxy.wait().await;
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
