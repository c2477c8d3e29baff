//! The proxy: binds the listeners, accepts, routes, connects, and drives each
//! connection's lifecycle over its data path until it closes with one reason.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::config::{Config, ConfigError, DataPathMode, LifecycleConfig, RouteConfig, Target};
use crate::control::ControlServer;
use crate::datapath::clock::instant_of;
use crate::datapath::kernel::{EbpfError, Kernel, MapEntries, SpliceError};
use crate::datapath::{Peer, Relay};
use crate::error_chain;
use crate::generation::{check_reloadable, Generation, NotReloadable};
use crate::health::{self, Change, FailureKind, Registry, TargetHealth, TargetSnapshot};
use crate::lifecycle::{Action, Event, Lifecycle};
use crate::limits::{Admissions, Limits};
use crate::metrics::MetricsServer;
use crate::resolve::{Resolve, SystemResolver};
use crate::route::ListenerRoutes;
use crate::sni::{parse_client_hello, Peek, MAX_CLIENT_HELLO};
use crate::stats::{ConnectionRow, EbpfSnapshot, Snapshot, Stats};
use crate::table::{ConnRecord, ConnTable};
use crate::throttle::Throttle;
use crate::tls::{TlsError, TlsRoutes};
use crate::vocab::DataPathKind;
use crate::vocab::Reason;

/// At most one warning that the kernel maps are full per this interval.
const MAP_FULL_WARNING_EVERY: Duration = Duration::from_secs(10);

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

/// Why a reload was refused; the running configuration stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the configuration was not read from a file, so there is nothing to re-read")]
    NoSource,
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{file}: {source}")]
    NotReloadable {
        file: PathBuf,
        #[source]
        source: NotReloadable,
    },
    #[error("{file}: {source}")]
    Tls {
        file: PathBuf,
        #[source]
        source: TlsError,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

/// What a reload changed, by route name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl std::fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |names: &[String]| {
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        };
        write!(
            f,
            "routes added: {}; removed: {}; changed: {}",
            list(&self.added),
            list(&self.removed),
            list(&self.changed)
        )
    }
}

/// A connection that ended, for whoever listens (tests, logs).
#[derive(Clone, Debug)]
pub struct Closed {
    pub id: u64,
    pub route: Option<String>,
    pub reason: Reason,
}

/// How far the proxy is in stopping; each stage comes after the ones listed before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Stop {
    Running,
    /// No new connections; the open ones finish on their own or at `grace_period`.
    Drain,
    /// The open connections end now (a second SIGTERM/SIGINT).
    Cut,
    /// No connection is left: the control socket and the metrics endpoint, which
    /// answer until then so that the drain can be watched, stop too.
    Exit,
}

/// Resolves once the proxy reached `stage` (or is gone). Every accept loop waits on this:
/// the listeners for [`Stop::Drain`], the control socket and metrics for [`Stop::Exit`].
pub(crate) async fn reached(stop: &mut watch::Receiver<Stop>, stage: Stop) {
    let _ = stop.wait_for(|now| *now >= stage).await;
}

/// What every connection task shares.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The configuration new connections are accepted under; swapped by a reload.
    generation: watch::Sender<Arc<Generation>>,
    /// Every open listener: configured address -> bound address (they differ for port
    /// 0). Changed only under this lock, by a reload or by an accept loop that stops, so
    /// that a reload never binds an address a listener still holds.
    listeners: Mutex<BTreeMap<SocketAddr, SocketAddr>>,
    /// One reload at a time.
    reloading: tokio::sync::Mutex<()>,
    control_socket: PathBuf,
    pub(crate) table: ConnTable,
    pub(crate) stats: Stats,
    /// Every target's health, kept across reloads.
    health: Registry,
    /// The soft RLIMIT_NOFILE at start (raised by then): what an unset `max_connections`
    /// is derived from (`fdlimit`).
    fd_limit: u64,
    limits: Limits,
    resolver: Arc<dyn Resolve>,
    /// The loaded kernel data path, if any route may use it and it loaded.
    kernel: Option<Kernel>,
    /// Of the warning that the kernel maps are full.
    map_full_warnings: Throttle,
    closed: broadcast::Sender<Closed>,
    pub(crate) stop: watch::Receiver<Stop>,
    /// The accept loops and the connections.
    tasks: TaskTracker,
    /// The control socket and the metrics endpoint: they outlive `tasks`.
    services: TaskTracker,
}

impl Shared {
    pub(crate) fn snapshot(&self) -> Snapshot {
        let ebpf = self
            .kernel
            .as_ref()
            .map_or_else(EbpfSnapshot::default, |kernel| {
                let max_connections = u64::from(kernel.max_connections());
                let kernel = kernel.stats();
                EbpfSnapshot {
                    sockhash_entries: kernel.sockhash_entries,
                    events: kernel.events,
                    events_lost: kernel.events_lost,
                    splice_failures: self.stats.splice_failures(),
                    map_full: self.stats.map_full_failures(),
                    max_connections,
                    map_entries: None,
                }
            });
        self.stats
            .snapshot(&self.table, ebpf, self.target_snapshots())
    }

    /// The targets of the running configuration, with their live connections.
    fn target_snapshots(&self) -> Vec<TargetSnapshot> {
        let mut active: std::collections::HashMap<*const TargetHealth, u64> =
            std::collections::HashMap::new();
        for record in self.table.records() {
            if let Some(target) = record.target.get() {
                *active.entry(Arc::as_ptr(target)).or_default() += 1;
            }
        }
        let generation = self.generation();
        generation
            .config
            .routes
            .iter()
            .enumerate()
            .flat_map(|(index, route)| {
                generation.health(index).iter().map(|target| {
                    let live = active.get(&Arc::as_ptr(target)).copied().unwrap_or(0);
                    target.snapshot(&route.name, live)
                })
            })
            .collect()
    }

    /// Starts the check task of every checked target of `generation` that has none yet.
    fn start_checks(self: &Arc<Self>, generation: &Generation) {
        for (index, route) in generation.config.routes.iter().enumerate() {
            for target in generation.health(index) {
                if target.claim_checks() {
                    self.tasks.spawn(check_target(
                        Arc::clone(target),
                        route.name.clone(),
                        self.stop.clone(),
                        Arc::clone(&self.resolver),
                    ));
                }
            }
        }
    }

    /// [`Shared::snapshot`] with the kernel maps' entries counted: a syscall per entry,
    /// for one-shot requests only. Blocks while it walks the maps.
    pub(crate) fn snapshot_counting_maps(&self) -> Snapshot {
        let mut snapshot = self.snapshot();
        snapshot.ebpf.map_entries = self.map_entries();
        snapshot
    }

    /// The kernel maps' entries, counted in the kernel; `None` without the kernel path or
    /// when the count failed (logged).
    pub(crate) fn map_entries(&self) -> Option<MapEntries> {
        match self.kernel.as_ref()?.map_entries() {
            Ok(entries) => Some(entries),
            Err(e) => {
                warn!(error = %error_chain(&e), "counting the kernel map entries failed");
                None
            }
        }
    }

    /// Books a splice that failed; loud, but throttled, when the maps were full.
    fn splice_failed(&self, error: &SpliceError) {
        self.stats.splice_failed();
        if !error.map_full() {
            return;
        }
        self.stats.map_full();
        if let Some(held_back) = self.map_full_warnings.admit(std::time::Instant::now()) {
            warn!(
                ebpf_max_connections = self.kernel.as_ref().map_or(0, Kernel::max_connections),
                held_back,
                "the kernel maps are full: new connections use the userspace data path \
                 (raise proxy.ebpf_max_connections and restart; held_back = the same \
                 warnings left out since the last one)"
            );
        }
    }

    pub(crate) fn connection_rows(&self) -> Vec<ConnectionRow> {
        self.stats.connection_rows(&self.table)
    }

    fn generation(&self) -> Arc<Generation> {
        Arc::clone(&self.generation.borrow())
    }

    fn lock_listeners(&self) -> std::sync::MutexGuard<'_, BTreeMap<SocketAddr, SocketAddr>> {
        // Every change is a single insert or remove: a poisoned lock is still sound.
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Binds a listener and starts accepting on it. The caller holds the listeners lock.
    fn open_listener(
        self: &Arc<Self>,
        listeners: &mut BTreeMap<SocketAddr, SocketAddr>,
        addr: SocketAddr,
    ) -> io::Result<()> {
        let listener = bind(addr)?;
        let bound = listener.local_addr()?;
        listeners.insert(addr, bound);
        info!(listen = %bound, "listening");
        self.tasks
            .spawn(accept_loop(listener, addr, bound, Arc::clone(self)));
        Ok(())
    }

    /// Re-reads the configuration file and applies it to new connections. On any error
    /// the running configuration stays in force, untouched.
    pub(crate) async fn reload(self: &Arc<Self>) -> Result<ReloadSummary, ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        // A listener it opened would close at once, and a restart-only key could not
        // apply either: nothing would change but the book.
        if *self.stop.borrow() >= Stop::Drain {
            return Err(ReloadError::ShuttingDown);
        }
        let running = self.generation();
        let file = running.config.source.clone().ok_or(ReloadError::NoSource)?;
        let next = Config::from_file(&file)?;
        check_reloadable(&running.config, &next, self.kernel.is_some()).map_err(|source| {
            ReloadError::NotReloadable {
                file: file.clone(),
                source,
            }
        })?;
        let summary = summarize(&running.config, &next);
        let max_connections_changed = (
            next.proxy.max_connections,
            next.proxy.max_connections_explicit,
        ) != (
            running.config.proxy.max_connections,
            running.config.proxy.max_connections_explicit,
        );
        // Certificates are read again: a reload is how new ones take effect.
        let tls = TlsRoutes::load(&next).map_err(|source| ReloadError::Tls {
            file: file.clone(),
            source,
        })?;
        let mut listeners = self.lock_listeners();
        let added: BTreeSet<SocketAddr> = next
            .routes
            .iter()
            .map(|route| route.listen)
            .filter(|addr| !listeners.contains_key(addr))
            .collect();
        // Bind every new address before anything changes: one that fails refuses the
        // whole reload.
        let mut bound = Vec::with_capacity(added.len());
        for addr in added {
            bound.push((
                addr,
                bind(addr).map_err(|source| ReloadError::Bind { addr, source })?,
            ));
        }
        // Only now, when nothing can fail any more: new route names get counters here.
        let next = Arc::new(Generation::new(next, tls, &self.stats, &self.health));
        configure_limits(&self.limits, &next);
        self.start_checks(&next);
        // Accept loops whose address is gone stop when they see this generation.
        self.generation.send_replace(next);
        for (addr, listener) in bound {
            match listener.local_addr() {
                Ok(local) => {
                    listeners.insert(addr, local);
                    info!(listen = %local, "listening");
                    self.tasks
                        .spawn(accept_loop(listener, addr, local, Arc::clone(self)));
                }
                Err(e) => warn!(listen = %addr, error = %e, "new listener unusable"),
            }
        }
        // It applies live: a new value the descriptor limit falls short of is said, as
        // at start.
        if max_connections_changed {
            let next = self.generation();
            crate::fdlimit::assess(
                &next.config.proxy,
                crate::fdlimit::reserved(&next.config),
                self.fd_limit,
            )
            .log();
        }
        Ok(summary)
    }
}

/// Applies the route limits of `generation`, by the routes' counters slots.
fn configure_limits(limits: &Limits, generation: &Generation) {
    for (index, route) in generation.config.routes.iter().enumerate() {
        limits.configure_route(generation.slot(index), &route.limits);
    }
}

/// Route names added, removed and changed from `running` to `next`.
fn summarize(running: &Config, next: &Config) -> ReloadSummary {
    let find = |config: &Config, name: &str| config.routes.iter().position(|r| r.name == name);
    let mut summary = ReloadSummary::default();
    for route in &next.routes {
        match find(running, &route.name) {
            None => summary.added.push(route.name.clone()),
            Some(index) if running.routes[index] != *route => {
                summary.changed.push(route.name.clone())
            }
            Some(_) => {}
        }
    }
    for route in &running.routes {
        if find(next, &route.name).is_none() {
            summary.removed.push(route.name.clone());
        }
    }
    summary
}

/// A listening socket with a backlog fit for bursts of connections.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<Stop>,
}

impl Proxy {
    /// Binds every listener and the control socket, then starts accepting. Returns once
    /// the proxy is ready: every listener accepts from now on.
    pub async fn start(config: Config) -> Result<Proxy, StartError> {
        Self::start_with_resolver(config, Arc::new(SystemResolver)).await
    }

    /// [`Proxy::start`], resolving target host names with `resolver`.
    pub async fn start_with_resolver(
        config: Config,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Proxy, StartError> {
        let tls = TlsRoutes::load(&config).map_err(StartError::Tls)?;
        // Before any listener exists: sockets only run the sock_ops program if they are
        // created in the cgroup it is attached to.
        let kernel = load_kernel(&config)?;
        let data_path = match (&kernel, config.proxy.data_path) {
            (Some(_), DataPathMode::Auto | DataPathMode::Ebpf) => DataPathKind::Ebpf,
            _ => DataPathKind::Userspace,
        };
        let stats = Stats::new(data_path);
        let control_socket = config.proxy.control_socket.clone();
        let metrics = match config.proxy.metrics {
            Some(addr) => Some(bind_metrics(addr).await?),
            None => None,
        };
        let health = Registry::default();
        let generation = Generation::new(config, tls, &stats, &health);
        let (stop, stop_rx) = watch::channel(Stop::Running);
        let (closed, _) = broadcast::channel(1024);
        let addrs: Vec<SocketAddr> = generation.routes.listeners.keys().copied().collect();
        let limits = Limits::new(
            generation.config.proxy.per_ip,
            generation.config.proxy.ipv6_prefix_per_ip,
            [],
        );
        configure_limits(&limits, &generation);
        let shared = Arc::new(Shared {
            generation: watch::Sender::new(Arc::new(generation)),
            listeners: Mutex::default(),
            reloading: tokio::sync::Mutex::default(),
            control_socket,
            table: ConnTable::default(),
            stats,
            health,
            // Unreadable (it never is): nothing to derive from.
            fd_limit: crate::fdlimit::limit().map_or(u64::MAX, |limit| limit.soft),
            limits,
            resolver,
            kernel,
            map_full_warnings: Throttle::new(MAP_FULL_WARNING_EVERY),
            closed,
            stop: stop_rx,
            tasks: TaskTracker::new(),
            services: TaskTracker::new(),
        });
        shared.start_checks(&shared.generation());
        {
            let mut listeners = shared.lock_listeners();
            for addr in addrs {
                if let Err(source) = shared.open_listener(&mut listeners, addr) {
                    // Nothing accepts yet: stop the listeners already open.
                    stop.send_replace(Stop::Exit);
                    return Err(StartError::Bind { addr, source });
                }
            }
        }
        let control = ControlServer::bind(&shared.control_socket).map_err(|source| {
            stop.send_replace(Stop::Exit);
            StartError::Control {
                path: shared.control_socket.clone(),
                source,
            }
        })?;
        shared.services.spawn(control.serve(Arc::clone(&shared)));
        let metrics_addr = metrics.map(|(server, bound)| {
            info!(listen = %bound, "metrics endpoint at /metrics");
            shared.services.spawn(server.serve(Arc::clone(&shared)));
            bound
        });
        Ok(Proxy {
            shared,
            metrics_addr,
            stop,
        })
    }

    /// `(configured, bound)` for every listen address: they differ for port 0.
    pub fn listen_addrs(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.shared
            .lock_listeners()
            .iter()
            .map(|(configured, bound)| (*configured, *bound))
            .collect()
    }

    /// The bound address of the Prometheus endpoint, if `[proxy] metrics` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bound address of the named route's listener.
    pub fn route_addr(&self, route: &str) -> Option<SocketAddr> {
        let configured = self
            .shared
            .generation()
            .config
            .routes
            .iter()
            .find(|r| r.name == route)?
            .listen;
        self.shared.lock_listeners().get(&configured).copied()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.shared.snapshot()
    }

    /// Whether the kernel data path loaded (some routes may still use userspace).
    pub fn uses_ebpf(&self) -> bool {
        self.shared.kernel.is_some()
    }

    pub fn connection_rows(&self) -> Vec<ConnectionRow> {
        self.shared.connection_rows()
    }

    /// The entries of each kernel map, counted in the kernel (a syscall per entry; blocks
    /// meanwhile). `None` when the kernel path is not loaded or the count failed.
    pub fn map_entries(&self) -> Option<MapEntries> {
        self.shared.map_entries()
    }

    /// Re-reads the configuration file: new connections follow it, running ones keep
    /// the configuration they started under. A bad file changes nothing.
    pub async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        self.shared.reload().await
    }

    /// Closed connections from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Closed> {
        self.shared.closed.subscribe()
    }

    /// Stops accepting at once; connections finish on their own or are closed after
    /// `grace_period`. The control socket and the metrics endpoint answer until the last
    /// one ended.
    pub fn shutdown(&self) {
        self.advance(Stop::Drain);
    }

    /// Ends the connections still open now, as [`crate::lifecycle::Event::Cut`] says;
    /// implies [`Proxy::shutdown`].
    pub fn cut(&self) {
        self.advance(Stop::Cut);
    }

    /// Moves the stop stage forward to `stage`, never back.
    fn advance(&self, stage: Stop) {
        self.stop.send_if_modified(|now| {
            let later = *now < stage;
            if later {
                *now = stage;
            }
            later
        });
    }

    /// Waits until the proxy stopped: after `shutdown`, when the last connection closed.
    pub async fn wait(&self) {
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        self.advance(Stop::Exit);
        self.shared.services.close();
        self.shared.services.wait().await;
        let path = &self.shared.control_socket;
        if let Err(e) = std::fs::remove_file(path) {
            debug!(path = %path.display(), error = %e, "control socket already gone");
        }
    }
}

async fn bind_metrics(addr: SocketAddr) -> Result<(MetricsServer, SocketAddr), StartError> {
    let bind_error = |source| StartError::Bind { addr, source };
    let server = MetricsServer::bind(addr).await.map_err(bind_error)?;
    let bound = server.local_addr().map_err(bind_error)?;
    Ok((server, bound))
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
    match Kernel::load(config.proxy.kernel_options()) {
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

/// Accepts on one listen address until shutdown, or until a reload leaves no route on
/// it.
async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    bound: SocketAddr,
    shared: Arc<Shared>,
) {
    let mut stop = shared.stop.clone();
    let mut generations = shared.generation.subscribe();
    let mut last_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            _ = reached(&mut stop, Stop::Drain) => return,
            _ = generations.changed() => {
                let mut listeners = shared.lock_listeners();
                if !generations.borrow_and_update().routes.listeners.contains_key(&addr) {
                    // Closed under the lock: a reload that adds the address back binds it anew.
                    drop(listener);
                    listeners.remove(&addr);
                    info!(listen = %bound, "no route uses this address any more: listener closed");
                    return;
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                let record = shared.table.insert(peer);
                shared.stats.accepted();
                let generation = shared.generation();
                shared
                    .tasks
                    .spawn(serve(Arc::clone(&shared), generation, addr, client, record));
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

/// One connection, from accept to close. Not an `async fn`: that would hold the
/// connection's future twice, once as the block below and once inside `Instrumented`
/// (3,056 bytes a connection instead of 1,568, measured in release).
fn serve(
    shared: Arc<Shared>,
    generation: Arc<Generation>,
    listen: SocketAddr,
    client: TcpStream,
    record: Arc<ConnRecord>,
) -> impl Future<Output = ()> {
    let span = info_span!("conn", id = record.id, client = %record.client);
    async move {
        let mut admissions = Admissions::default();
        // Boxed: the handshake's state (a TLS one above all) is larger than the relay's,
        // and inline it would size this task for the connection's whole life.
        let established = Box::pin(establish(
            &shared,
            &generation,
            listen,
            client,
            &record,
            &mut admissions,
        ))
        .await;
        let reason = match established {
            Ok((route, client, backend)) => {
                relay(&shared, &generation, route, client, backend, &record).await
            }
            Err(reason) => reason,
        };
        // Before the close is announced: whoever hears of it may connect again at once.
        drop(admissions);
        close(&shared, &record, reason);
    }
    .instrument(span)
}

fn close(shared: &Shared, record: &ConnRecord, reason: Reason) {
    shared.stats.closed(record, reason);
    shared.table.remove(record.id);
    let route = record
        .route
        .get()
        .and_then(|slot| shared.stats.route_name(*slot));
    info!(
        id = record.id,
        route = %route.as_deref().unwrap_or("-"),
        client = %record.client,
        backend = %record.backend.get().map_or_else(|| "-".to_owned(), |b| b.to_string()),
        data_path = %record.data_path().map_or("-", DataPathKind::as_str),
        client_to_backend = record.meter.bytes(crate::vocab::Direction::ClientToBackend),
        backend_to_client = record.meter.bytes(crate::vocab::Direction::BackendToClient),
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

/// Admits, routes and connects the connection: terminates TLS if its route says so and
/// connects its backend (over TLS for reencrypt). Toward the backend, the route's PROXY
/// header goes first, then the routing bytes already read (or, terminating, the TLS
/// handshake takes them). On error the client is closed: RST for a refusal, else FIN
/// (after close_notify once TLS is up).
async fn establish(
    shared: &Shared,
    generation: &Generation,
    listen: SocketAddr,
    client: TcpStream,
    record: &ConnRecord,
    admissions: &mut Admissions,
) -> Result<(usize, Peer, Peer), Reason> {
    let accepted_at = Instant::now();
    let (route, peeked) = match admit(shared, generation, listen, &client, record, admissions).await
    {
        Ok(routed) => routed,
        Err(reason) => {
            if reason.is_refusal() {
                // Refused connections get an RST, every time, at once.
                let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
            }
            return Err(reason);
        }
    };
    let config = &generation.config.routes[route];
    keepalive(&client, &config.lifecycle);
    let header = match config.proxy_protocol {
        Some(version) => {
            let local = client.local_addr().map_err(|_| Reason::ClientReset)?;
            crate::proxy_protocol::header(version, record.client, local)
        }
        None => Vec::new(),
    };
    let mut stop = shared.stop.clone();
    let Some(tls) = generation.tls.route(route) else {
        let backend = tokio::select! {
            _ = reached(&mut stop, Stop::Drain) => return Err(Reason::Shutdown),
            connected = connect(shared, generation, route, record) => connected?.0,
        };
        write_all(&backend, &[header, peeked].concat()).await?;
        return Ok((route, client.into(), backend.into()));
    };
    // The whole TLS handshake, ClientHello included, within handshake_timeout.
    let deadline = accepted_at + config.lifecycle.handshake_timeout;
    let (client, negotiated) = tokio::select! {
        _ = reached(&mut stop, Stop::Drain) => return Err(Reason::Shutdown),
        accepted = tls.accept(client, peeked, deadline) => accepted?,
    };
    let backend = async {
        let (backend, target) = connect(shared, generation, route, record).await?;
        write_all(&backend, &header).await?;
        let deadline = Instant::now() + config.lifecycle.connect_timeout;
        tls.connect(backend, &negotiated, target, deadline).await
    };
    let backend = tokio::select! {
        _ = reached(&mut stop, Stop::Drain) => Err(Reason::Shutdown),
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

/// The limits at accept, the route (from the ClientHello on an SNI listener, whose bytes
/// are returned), and the route's own limits.
async fn admit(
    shared: &Shared,
    generation: &Generation,
    listen: SocketAddr,
    client: &TcpStream,
    record: &ConnRecord,
    admissions: &mut Admissions,
) -> Result<(usize, Vec<u8>), Reason> {
    let ip = record.client.ip();
    let max_connections = crate::fdlimit::max_connections(&generation.config, shared.fd_limit);
    admissions.push(
        shared
            .limits
            .admit_client(
                shared.table.len(),
                max_connections,
                ip,
                std::time::Instant::now(),
            )
            .map_err(|refusal| shared.stats.refused(refusal))?,
    );
    let mut stop = shared.stop.clone();
    // None: accepted just before a reload removed the address.
    let routes = generation
        .routes
        .listeners
        .get(&listen)
        .ok_or(Reason::NoRoute)?;
    let (route, peeked) = tokio::select! {
        _ = reached(&mut stop, Stop::Drain) => return Err(Reason::Shutdown),
        routed = route(generation, routes, client) => routed?,
    };
    let slot = generation.slot(route);
    let _ = record.route.set(slot);
    shared.stats.routed(slot);
    admissions.extend(
        shared
            .limits
            .admit_route(slot, ip, std::time::Instant::now())
            .map_err(|refusal| shared.stats.refused(refusal))?,
    );
    Ok((route, peeked))
}

/// Picks the route: at once for a plain listener, from the ClientHello for SNI ones.
async fn route(
    generation: &Generation,
    routes: &ListenerRoutes,
    client: &TcpStream,
) -> Result<(usize, Vec<u8>), Reason> {
    if !routes.needs_client_hello() {
        let route = routes.select(None).ok_or(Reason::NoRoute)?;
        return Ok((route, Vec::new()));
    }
    let deadline = Instant::now() + generation.config.lifecycle.handshake_timeout;
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
        // The parser refuses a ClientHello that says it is longer; this bounds what an
        // endless run of records that never completes one can make us hold.
        if hello.len() > MAX_CLIENT_HELLO {
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

/// Connects to the route's targets, round-robin, trying the next one on failure and
/// skipping those its health has down (when all are, the least recently failed one is
/// tried anyway); returns the socket (with keepalive set, its address and target in the
/// record) and the target it reached.
async fn connect<'a>(
    shared: &Shared,
    generation: &'a Generation,
    route: usize,
    record: &ConnRecord,
) -> Result<(TcpStream, &'a Target), Reason> {
    let config = &generation.config.routes[route];
    let targets = generation.health(route);
    let order = generation.routes.targets_in_order(route, targets.len());
    // Lazy: a down target's trial is taken only when it is its turn.
    let mut usable = order
        .clone()
        .filter(|&index| targets[index].take_usable(std::time::Instant::now()))
        .peekable();
    let fallback = match usable.peek() {
        Some(_) => None,
        None => {
            health::least_recently_failed(order.map(|index| (index, targets[index].last_failure())))
        }
    };
    let mut reason = Reason::ConnectFailed;
    for index in usable.chain(fallback) {
        let target = &targets[index];
        match connect_one(shared, config, generation.slot(route), target).await {
            Ok(stream) => {
                if let Ok(addr) = stream.peer_addr() {
                    let _ = record.backend.set(addr);
                }
                let _ = record.target.set(Arc::clone(target));
                keepalive(&stream, &config.lifecycle);
                return Ok((stream, &config.targets[index]));
            }
            Err(why) => reason = why,
        }
    }
    Err(reason)
}

/// One connect to one target, within `connect_timeout`, booked in its health and
/// counters. A failure warns at most once per target every [`health::WARN_INTERVAL`].
async fn connect_one(
    shared: &Shared,
    config: &RouteConfig,
    slot: usize,
    health: &TargetHealth,
) -> Result<TcpStream, Reason> {
    let target = &health.target;
    let started = Instant::now();
    let deadline = started + config.lifecycle.connect_timeout;
    let (kind, error, reason) =
        match timeout_at(deadline, connect_target(&*shared.resolver, target)).await {
            Ok(Ok(stream)) => {
                let elapsed = started.elapsed();
                shared.stats.backend_connected(slot, elapsed);
                log_change(health.connected(elapsed), &config.name, target);
                return Ok(stream);
            }
            Ok(Err(e)) => (FailureKind::of(&e), e.to_string(), Reason::ConnectFailed),
            Err(_) => (
                FailureKind::Timeout,
                format!("no answer within {:?}", config.lifecycle.connect_timeout),
                Reason::ConnectTimeout,
            ),
        };
    let (change, warning) = health.connect_failed(kind, std::time::Instant::now());
    if let Some(suppressed) = warning {
        warn!(route = %config.name, %target, kind = kind.as_str(), %error, suppressed, "connect failed");
    }
    log_change(change, &config.name, target);
    Err(reason)
}

/// Says once that a target went down or came back.
fn log_change(change: Option<Change>, route: &str, target: &Target) {
    match change {
        Some(Change::Down) => warn!(%route, %target, "target down: skipped until it is back"),
        Some(Change::Up) => info!(%route, %target, "target up"),
        None => {}
    }
}

/// The active checks of one target: a TCP connect (closed at once) every
/// `check_interval`, for as long as the newest configuration checks it.
async fn check_target(
    health: Arc<TargetHealth>,
    route: String,
    mut stop: watch::Receiver<Stop>,
    resolver: Arc<dyn Resolve>,
) {
    loop {
        let Some(check) = health.check_config() else {
            if health.release_checks() {
                continue;
            }
            return;
        };
        let probe = tokio::time::timeout(check.timeout, connect_target(&*resolver, &health.target));
        let passed = tokio::select! {
            _ = reached(&mut stop, Stop::Drain) => return,
            probed = probe => matches!(probed, Ok(Ok(_))),
        };
        debug!(%route, target = %health.target, passed, "health check");
        log_change(
            health.check_done(passed, std::time::Instant::now()),
            &route,
            &health.target,
        );
        tokio::select! {
            _ = reached(&mut stop, Stop::Drain) => return,
            _ = tokio::time::sleep(check.interval) => {}
        }
    }
}

async fn connect_target(resolver: &dyn Resolve, target: &Target) -> io::Result<TcpStream> {
    let addrs = match target.socket_addr() {
        Some(addr) => vec![addr],
        None => resolver.lookup(&target.host, target.port).await?,
    };
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for addr in addrs {
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
    generation: &Generation,
    route: usize,
    client: Peer,
    backend: Peer,
    record: &ConnRecord,
) -> Reason {
    let config = generation.config.routes[route].lifecycle;
    let mut relay = Relay::new(client, backend, Arc::clone(&record.meter));
    let data_path = generation.data_path(route, shared.kernel.is_some());
    // Before the splice: from then on the kernel may move bytes before this task runs.
    record.set_data_path(data_path);
    if let (DataPathKind::Ebpf, Some(kernel)) = (data_path, &shared.kernel) {
        // Routine for a peer that already sent its FIN (the kernel refuses such a socket),
        // so not a warning: `ebpf.splice_failures` counts them. A splice that failed half
        // way stays in the maps, passing every byte to the relay: userspace moves them.
        let failed = |e: &SpliceError| {
            shared.splice_failed(e);
            debug!(error = %error_chain(e), "splice failed; this connection uses the userspace data path");
        };
        let fell_back = match relay.offload(kernel) {
            Ok(()) => relay.splice_fallback().inspect(|e| failed(e)).is_some(),
            Err(e) => {
                failed(&e);
                true
            }
        };
        if fell_back {
            record.set_data_path(DataPathKind::Userspace);
        }
    }
    let mut lifecycle = Lifecycle::new(config, Instant::now().into_std());
    let mut stop = shared.stop.clone();
    let mut stop_seen = Stop::Running;
    loop {
        let deadline = lifecycle.deadline().map(Instant::from_std);
        let event = tokio::select! {
            event = relay.next_event() => event,
            _ = sleep_until_some(deadline) => Event::Timer {
                last_activity: instant_of(relay.meter().last_activity_ns()),
            },
            stage = next_stage(&mut stop, stop_seen), if stop_seen < Stop::Cut => {
                stop_seen = stage;
                if stage == Stop::Drain { Event::Shutdown } else { Event::Cut }
            }
        };
        debug!(?event, "lifecycle event");
        for action in lifecycle.on_event(event, Instant::now().into_std()) {
            match action {
                Action::Finish(direction) => relay.finish(direction),
                Action::Abort(side) => relay.abort(side),
                Action::AbortWhenDelivered { side, deadline } => {
                    relay
                        .abort_when_delivered(side, Instant::from_std(deadline))
                        .await
                }
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

/// The stop stage after `seen`, once the proxy reaches it.
async fn next_stage(stop: &mut watch::Receiver<Stop>, seen: Stop) -> Stop {
    let next = stop.wait_for(|now| *now > seen).await.map(|now| *now);
    match next {
        Ok(now) => now,
        // The proxy was dropped without a shutdown: as one, then nothing more.
        Err(_) if seen < Stop::Drain => Stop::Drain,
        Err(_) => std::future::pending().await,
    }
}

async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
