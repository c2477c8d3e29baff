//! The proxy: binds the listeners, accepts, routes, connects, and drives each
//! connection's lifecycle over its data path until it closes with one reason.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::config::{Config, DataPathMode, LifecycleConfig, Target};
use crate::control::ControlServer;
use crate::datapath::{instant_of, DataPathKind, Peer, Relay};
use crate::ebpf::{EbpfError, Kernel, LoadOptions};
use crate::error_chain;
use crate::lifecycle::{Action, Event, Lifecycle, Reason};
use crate::route::{ListenerRoutes, RouteTable};
use crate::sni::{parse_client_hello, Peek, MAX_CLIENT_HELLO};
use crate::stats::{ConnectionRow, EbpfSnapshot, Snapshot, Stats};
use crate::table::{ConnRecord, ConnTable};
use crate::tls::{TlsError, TlsRoutes};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the eBPF data path was requested (data_path = \"ebpf\") but cannot load: {0}")]
    Ebpf(#[source] EbpfError),
    #[error("TLS: {0}")]
    Tls(#[source] TlsError),
    #[error("control socket {path}: {source}")]
    Control {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A connection that ended, for whoever listens (tests, logs).
#[derive(Clone, Debug)]
pub struct Closed {
    pub id: u64,
    pub route: Option<String>,
    pub reason: Reason,
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    routes: RouteTable,
    /// Certificates and TLS configs of the terminating routes.
    tls: TlsRoutes,
    pub(crate) table: ConnTable,
    pub(crate) stats: Stats,
    /// The loaded kernel data path, if any route may use it and it loaded.
    kernel: Option<Kernel>,
    closed: broadcast::Sender<Closed>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl Shared {
    pub(crate) fn snapshot(&self) -> Snapshot {
        let ebpf = self
            .kernel
            .as_ref()
            .map_or_else(EbpfSnapshot::default, |kernel| {
                let kernel = kernel.stats();
                EbpfSnapshot {
                    sockhash_entries: kernel.sockhash_entries,
                    events: kernel.events,
                    events_lost: kernel.events_lost,
                    splice_failures: self.stats.splice_failures(),
                }
            });
        self.stats.snapshot(&self.table, ebpf)
    }

    /// The data path a connection of `route` takes.
    fn data_path(&self, route: usize) -> DataPathKind {
        let config = &self.config.routes[route];
        let mode = config.data_path.unwrap_or(self.config.proxy.data_path);
        let terminates = config.tls.is_some_and(|tls| tls.terminates());
        match (mode, &self.kernel) {
            (DataPathMode::Auto | DataPathMode::Ebpf, Some(_)) if !terminates => DataPathKind::Ebpf,
            _ => DataPathKind::Userspace,
        }
    }

    pub(crate) fn connection_rows(&self) -> Vec<ConnectionRow> {
        self.stats.connection_rows(&self.table)
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    listen_addrs: Vec<(SocketAddr, SocketAddr)>,
    shutdown: watch::Sender<bool>,
    tasks: TaskTracker,
}

impl Proxy {
    /// Binds every listener and the control socket, then starts accepting. Returns once
    /// the proxy is ready: every listener accepts from now on.
    pub async fn start(config: Config) -> Result<Proxy, StartError> {
        let tls = TlsRoutes::load(&config).map_err(StartError::Tls)?;
        // Before any listener exists: sockets only run the sock_ops program if they are
        // created in the cgroup it is attached to.
        let kernel = load_kernel(&config)?;
        let routes = RouteTable::new(&config);
        let data_path = match (&kernel, config.proxy.data_path) {
            (Some(_), DataPathMode::Auto | DataPathMode::Ebpf) => DataPathKind::Ebpf,
            _ => DataPathKind::Userspace,
        };
        let stats = Stats::new(data_path, config.routes.iter().map(|r| r.name.as_str()));
        let mut listeners = Vec::with_capacity(routes.listeners.len());
        for (addr, _) in &routes.listeners {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr: *addr,
                    source,
                })?;
            listeners.push(listener);
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (closed, _) = broadcast::channel(1024);
        let control_path = config.proxy.control_socket.clone();
        let shared = Arc::new(Shared {
            config,
            routes,
            tls,
            table: ConnTable::default(),
            stats,
            kernel,
            closed,
            shutdown: shutdown_rx,
        });
        let control = ControlServer::bind(&control_path).map_err(|source| StartError::Control {
            path: control_path.clone(),
            source,
        })?;
        let tasks = TaskTracker::new();
        tasks.spawn(control.serve(Arc::clone(&shared)));
        let mut listen_addrs = Vec::new();
        for (index, listener) in listeners.into_iter().enumerate() {
            let configured = shared.routes.listeners[index].0;
            let bound = listener.local_addr().map_err(|source| StartError::Bind {
                addr: configured,
                source,
            })?;
            listen_addrs.push((configured, bound));
            info!(listen = %bound, "listening");
            tasks.spawn(accept_loop(
                listener,
                index,
                Arc::clone(&shared),
                tasks.clone(),
            ));
        }
        Ok(Proxy {
            shared,
            listen_addrs,
            shutdown,
            tasks,
        })
    }

    /// `(configured, bound)` for every listen address: they differ for port 0.
    pub fn listen_addrs(&self) -> &[(SocketAddr, SocketAddr)] {
        &self.listen_addrs
    }

    /// The bound address of the named route's listener.
    pub fn route_addr(&self, route: &str) -> Option<SocketAddr> {
        let configured = self
            .shared
            .config
            .routes
            .iter()
            .find(|r| r.name == route)?
            .listen;
        self.listen_addrs
            .iter()
            .find(|(c, _)| *c == configured)
            .map(|(_, bound)| *bound)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot()
    }

    pub fn connection_rows(&self) -> Vec<ConnectionRow> {
        self.shared.connection_rows()
    }

    /// Closed connections from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Closed> {
        self.shared.closed.subscribe()
    }

    /// Stops accepting at once; connections finish on their own or are closed after
    /// `grace_period`.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    /// Waits until the proxy stopped: after `shutdown`, when the last connection closed.
    pub async fn wait(self) {
        self.tasks.close();
        self.tasks.wait().await;
        let path = &self.shared.config.proxy.control_socket;
        if let Err(e) = std::fs::remove_file(path) {
            debug!(path = %path.display(), error = %e, "control socket already gone");
        }
    }
}

/// Loads the kernel data path if any route may use it. `auto` falls back to userspace and
/// says why; `ebpf` that cannot load is a startup error.
fn load_kernel(config: &Config) -> Result<Option<Kernel>, StartError> {
    let modes = std::iter::once(config.proxy.data_path)
        .chain(config.routes.iter().filter_map(|r| r.data_path));
    let (mut required, mut wanted) = (false, false);
    for mode in modes {
        required |= mode == DataPathMode::Ebpf;
        wanted |= mode != DataPathMode::Userspace;
    }
    if !wanted {
        return Ok(None);
    }
    let options = LoadOptions {
        max_queued_bytes: config.proxy.max_queued_bytes,
        ..LoadOptions::default()
    };
    match Kernel::load(options) {
        Ok(kernel) => {
            info!("eBPF data path loaded");
            Ok(Some(kernel))
        }
        Err(e) if required => Err(StartError::Ebpf(e)),
        Err(e) => {
            let why = error_chain(&e);
            warn!(reason = %why, "data_path = \"auto\": eBPF unavailable, using the userspace data path");
            Ok(None)
        }
    }
}

async fn accept_loop(listener: TcpListener, index: usize, shared: Arc<Shared>, tasks: TaskTracker) {
    let mut shutdown = shared.shutdown.clone();
    let mut last_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                let record = shared.table.insert(peer);
                shared.stats.accepted();
                tasks.spawn(serve(Arc::clone(&shared), index, client, record));
            }
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS: the connection stays in the backlog; back off
                // instead of spinning, and say so at most once a second.
                let now = Instant::now();
                if last_warning.is_none_or(|at| now - at >= Duration::from_secs(1)) {
                    warn!(error = %e, "accept failed; backing off");
                    last_warning = Some(now);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One connection, from accept to close.
async fn serve(shared: Arc<Shared>, listener: usize, client: TcpStream, record: Arc<ConnRecord>) {
    let span = info_span!("conn", id = record.id, client = %record.client);
    async {
        let reason = match establish(&shared, listener, client, &record).await {
            Ok((route, client, backend)) => relay(&shared, route, client, backend, &record).await,
            Err(reason) => reason,
        };
        close(&shared, &record, reason);
    }
    .instrument(span)
    .await
}

fn close(shared: &Shared, record: &ConnRecord, reason: Reason) {
    shared.stats.closed(record, reason);
    shared.table.remove(record.id);
    let route = record
        .route
        .get()
        .map(|r| shared.config.routes[*r].name.clone());
    info!(
        route = route.as_deref().unwrap_or("-"),
        backend = ?record.backend.get(),
        data_path = ?record.data_path(),
        client_to_backend = record.meter.bytes(crate::lifecycle::Direction::ClientToBackend),
        backend_to_client = record.meter.bytes(crate::lifecycle::Direction::BackendToClient),
        duration_ms = record.started.elapsed().as_millis() as u64,
        %reason,
        "closed"
    );
    // Nobody listening is fine.
    let _ = shared.closed.send(Closed {
        id: record.id,
        route,
        reason,
    });
}

/// Routes the connection, terminates TLS if its route says so, and connects its backend
/// (over TLS for reencrypt). The routing bytes already read reach the backend (or the TLS
/// handshake) before this returns. On error the client is closed: RST for
/// `max_connections`, else FIN (after close_notify once TLS is up).
async fn establish(
    shared: &Shared,
    listener: usize,
    client: TcpStream,
    record: &ConnRecord,
) -> Result<(usize, Peer, Peer), Reason> {
    if shared.table.len() > shared.config.proxy.max_connections {
        // Refused connections get an RST, every time, at once.
        let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
        return Err(Reason::MaxConnections);
    }
    let accepted_at = Instant::now();
    let mut shutdown = shared.shutdown.clone();
    let routes = &shared.routes.listeners[listener].1;
    let (route, peeked) = tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => return Err(Reason::Shutdown),
        routed = route(shared, routes, &client) => routed?,
    };
    let _ = record.route.set(route);
    shared.stats.routed(route);
    let config = &shared.config.routes[route];
    keepalive(&client, &config.lifecycle);
    let Some(tls) = shared.tls.route(route) else {
        let backend = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return Err(Reason::Shutdown),
            connected = connect(shared, route, record) => connected?.0,
        };
        write_all(&backend, &peeked).await?;
        return Ok((route, client.into(), backend.into()));
    };
    // The whole TLS handshake, ClientHello included, within handshake_timeout.
    let deadline = accepted_at + config.lifecycle.handshake_timeout;
    let (client, negotiated) = tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => return Err(Reason::Shutdown),
        accepted = tls.accept(client, peeked, deadline) => accepted?,
    };
    let backend = async {
        let (backend, target) = connect(shared, route, record).await?;
        let deadline = Instant::now() + config.lifecycle.connect_timeout;
        tls.connect(backend, &negotiated, target, deadline).await
    };
    let backend = tokio::select! {
        _ = shutdown.wait_for(|stop| *stop) => Err(Reason::Shutdown),
        connected = backend => connected,
    };
    match backend {
        Ok(backend) => Ok((route, client, backend)),
        Err(reason) => {
            client.close(config.lifecycle.grace_period).await;
            Err(reason)
        }
    }
}

/// Picks the route: at once for a plain listener, from the ClientHello for SNI ones.
async fn route(
    shared: &Shared,
    routes: &ListenerRoutes,
    client: &TcpStream,
) -> Result<(usize, Vec<u8>), Reason> {
    if !routes.needs_client_hello() {
        let route = routes.select(None).ok_or(Reason::NoRoute)?;
        return Ok((route, Vec::new()));
    }
    let deadline = Instant::now() + shared.config.lifecycle.handshake_timeout;
    let mut hello = Vec::with_capacity(1024);
    loop {
        match parse_client_hello(&hello) {
            Ok(Peek::Complete(parsed)) => {
                let route = routes.select(parsed.server_name.as_deref());
                debug!(server_name = ?parsed.server_name, ?route, "client hello");
                return route.map(|r| (r, hello)).ok_or(Reason::NoRoute);
            }
            Ok(Peek::Incomplete) => {}
            Err(e) => {
                debug!(error = %e, "bad client hello");
                return Err(Reason::BadHandshake);
            }
        }
        if hello.len() > MAX_CLIENT_HELLO * 2 {
            return Err(Reason::BadHandshake);
        }
        timeout_at(deadline, client.readable())
            .await
            .map_err(|_| Reason::HandshakeTimeout)?
            .map_err(|_| Reason::ClientReset)?;
        hello.reserve(4096);
        match client.try_read_buf(&mut hello) {
            Ok(0) => return Err(Reason::BadHandshake),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(Reason::ClientReset),
        }
    }
}

/// Connects to the route's targets, round-robin, trying the next one on failure; returns
/// the socket (with keepalive set, its address in the record) and the target it reached.
async fn connect<'a>(
    shared: &'a Shared,
    route: usize,
    record: &ConnRecord,
) -> Result<(TcpStream, &'a Target), Reason> {
    let config = &shared.config.routes[route];
    let mut reason = Reason::ConnectFailed;
    for target in shared.routes.targets_in_order(route, &config.targets) {
        let deadline = Instant::now() + config.lifecycle.connect_timeout;
        match timeout_at(deadline, connect_target(target)).await {
            Ok(Ok(stream)) => {
                if let Ok(addr) = stream.peer_addr() {
                    let _ = record.backend.set(addr);
                }
                keepalive(&stream, &config.lifecycle);
                return Ok((stream, target));
            }
            Ok(Err(e)) => {
                warn!(%target, error = %e, "connect failed");
                reason = Reason::ConnectFailed;
            }
            Err(_) => {
                warn!(%target, "connect timed out");
                reason = Reason::ConnectTimeout;
            }
        }
    }
    Err(reason)
}

async fn connect_target(target: &Target) -> io::Result<TcpStream> {
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for addr in tokio::net::lookup_host((target.host.as_str(), target.port)).await? {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

fn keepalive(stream: &TcpStream, config: &LifecycleConfig) {
    let socket = SockRef::from(stream);
    // Latency matters more than segment count for the protocols this proxy carries.
    let _ = socket.set_nodelay(true);
    if let Some(idle) = config.tcp_keepalive {
        let keepalive = TcpKeepalive::new()
            .with_time(idle)
            .with_interval(idle / 4 + Duration::from_secs(1))
            .with_retries(4);
        if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
            debug!(error = %e, "cannot set TCP keepalive");
        }
    }
}

async fn write_all(backend: &TcpStream, mut bytes: &[u8]) -> Result<(), Reason> {
    while !bytes.is_empty() {
        backend.writable().await.map_err(|_| Reason::BackendReset)?;
        match backend.try_write(bytes) {
            Ok(written) => bytes = &bytes[written..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Err(Reason::BackendReset),
        }
    }
    Ok(())
}

/// Moves the bytes and feeds the lifecycle until it closes the connection.
async fn relay(
    shared: &Shared,
    route: usize,
    client: Peer,
    backend: Peer,
    record: &ConnRecord,
) -> Reason {
    let config = shared.config.routes[route].lifecycle;
    let mut relay = Relay::new(client, backend, Arc::clone(&record.meter));
    let data_path = shared.data_path(route);
    // Before the splice: from then on the kernel may move bytes before this task runs.
    record.set_data_path(data_path);
    if let (DataPathKind::Ebpf, Some(kernel)) = (data_path, &shared.kernel) {
        if let Err(e) = relay.offload(kernel) {
            shared.stats.splice_failed();
            if !e.stream_intact {
                // Bytes already moved in the kernel: a userspace copy could reorder them.
                warn!(error = %error_chain(&e), "splice failed after bytes moved; aborting");
                relay.abort(crate::lifecycle::Side::Client);
                relay.abort(crate::lifecycle::Side::Backend);
                return Reason::ConnectFailed;
            }
            warn!(error = %error_chain(&e), "splice failed; this connection uses the userspace data path");
            record.set_data_path(DataPathKind::Userspace);
        }
    }
    let mut lifecycle = Lifecycle::new(config, Instant::now().into_std());
    let mut shutdown = shared.shutdown.clone();
    let mut shutdown_seen = false;
    loop {
        let deadline = lifecycle.deadline().map(Instant::from_std);
        let event = tokio::select! {
            event = relay.next_event() => event,
            _ = sleep_until_some(deadline) => Event::Timer {
                last_activity: instant_of(relay.meter().last_activity_ns()),
            },
            _ = shutdown.wait_for(|stop| *stop), if !shutdown_seen => {
                shutdown_seen = true;
                Event::Shutdown
            }
        };
        debug!(?event, "lifecycle event");
        for action in lifecycle.on_event(event, Instant::now().into_std()) {
            match action {
                Action::Finish(direction) => relay.finish(direction),
                Action::Abort(side) => relay.abort(side),
                Action::InactivityReset => shared.stats.inactivity_reset(),
                Action::Close(reason) => return reason,
            }
        }
        record.half_open.store(
            lifecycle.is_half_open(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
