//! The proxy's facade: starts a proxy (the kernel data path, the listeners, the control
//! socket and the metrics endpoint) and stops it. Each stage of a connection has its own
//! module: `listener`, `connection`, `routing`, `backend`; a reload is in `reload`.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backend::{listener_keepalive, start_checks};
use crate::config::{Config, DataPathMode, LoadOptions};
use crate::control::ControlServer;
use crate::datapath::kernel::{ensure_bpffs, pin_dir, EbpfError, Kernel, MapEntries, Pins};
use crate::error_chain;
use crate::generation::{select_data_path, Generation};
use crate::health::Registry;
use crate::limits::Limits;
use crate::listener::{bind_std, open_listener, Accepting};
use crate::metrics::MetricsServer;
use crate::park::Parking;
use crate::reload::{configure_limits, ReloadError, ReloadSummary};
use crate::resolve::{Resolve, SystemResolver};
use crate::shared::{Closed, Shared, Stop, MAP_FULL_WARNING_EVERY};
use crate::stats::{ConnectionRow, Snapshot, Stats};
use crate::table::ConnTable;
use crate::throttle::Throttle;
use crate::tls::TlsRoutes;
use crate::tls_files::TlsError;
use crate::upgrade::message::KernelMaps;
use crate::upgrade::{Inherited, Phase, SuccessorCommand, TakenOver, UpgradeError, Upgraded};
use crate::workers::{per_core, Workers};

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
    #[error("cannot take over from the running proxy: {0}")]
    Successor(String),
    #[error("control socket {path}: {source}")]
    Control {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start the connection runtimes: {0}")]
    Workers(#[source] io::Error),
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    pub(crate) shared: Arc<Shared>,
    metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<Stop>,
    /// In a successor: the handoff socket and the predecessor's pid, until
    /// [`Proxy::take_over`].
    handoff: Mutex<Option<(std::os::unix::net::UnixStream, u32)>>,
    /// The connection runtimes: they stop once the connections ended.
    _workers: Workers,
}

/// A proxy set up but not running yet: its kernel data path loaded and every socket it
/// listens on bound. Made without a tokio runtime, so that the binary drops its
/// privileges after this and before any runtime thread exists.
pub struct Prepared {
    config: Config,
    tls: TlsRoutes,
    kernel: Option<Kernel>,
    listeners: Vec<(SocketAddr, std::net::TcpListener)>,
    control: ControlServer,
    /// With its bound address (they differ for port 0).
    metrics: Option<(MetricsServer, SocketAddr)>,
    successor: SuccessorCommand,
    handoff: Option<(std::os::unix::net::UnixStream, u32)>,
    /// A successor's first connection id (0 otherwise).
    first_id: u64,
    /// How many connection runtimes to start: one per core.
    pub(crate) runtimes: usize,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("kernel", &self.kernel)
            .field("listeners", &self.listeners)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// Whether the kernel data path loaded (some routes may still use userspace).
    pub fn uses_ebpf(&self) -> bool {
        self.kernel.is_some()
    }

    /// Where the kernel maps are pinned, if they are.
    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        self.kernel.as_ref()?.pin_dir()
    }

    /// How an upgrade starts this proxy's successor (by default: this executable, `run
    /// --config` the same file).
    pub fn set_successor(&mut self, successor: SuccessorCommand) {
        self.successor = successor;
    }
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
        Self::start_prepared(Self::prepare(config)?, resolver).await
    }

    /// The first half of [`Proxy::start`], without a runtime: loads the TLS material and
    /// the kernel data path, and binds the listeners, the control socket and the metrics
    /// endpoint.
    pub fn prepare(config: Config) -> Result<Prepared, StartError> {
        Self::prepare_inherited(config, None)
    }

    /// [`Proxy::prepare`] for a successor (`upgrade`): the sockets its predecessor handed
    /// over are used instead of binding them again, and its kernel maps are reused.
    pub fn prepare_inherited(
        config: Config,
        inherited: Option<Inherited>,
    ) -> Result<Prepared, StartError> {
        let tls = TlsRoutes::load(&config).map_err(StartError::Tls)?;
        // Before any listener exists: sockets only run the sock_ops program if they are
        // created in the cgroup it is attached to.
        let kernel = load_kernel(&config, inherited.as_ref().map(|i| i.kernel.as_ref()))?;
        let first_id = inherited.as_ref().map_or(0, |i| i.first_id);
        let (mut inherited_listeners, inherited_control, mut inherited_metrics, handoff) =
            match inherited {
                Some(inherited) => {
                    let predecessor = inherited.predecessor;
                    let (listeners, control, metrics, socket) = inherited.into_parts();
                    (
                        listeners,
                        Some(control),
                        metrics,
                        Some((socket, predecessor)),
                    )
                }
                None => (Vec::new(), None, None, None),
            };
        let metrics = match config.proxy.metrics {
            Some(addr) => {
                let bind_error = |source| StartError::Bind { addr, source };
                let server = match inherited_metrics.take() {
                    Some((configured, listener)) if configured == addr => {
                        MetricsServer::from_std(listener).map_err(bind_error)?
                    }
                    _ => MetricsServer::bind(addr).map_err(bind_error)?,
                };
                let bound = server.local_addr().map_err(bind_error)?;
                Some((server, bound))
            }
            None => None,
        };
        let mut listeners: Vec<(SocketAddr, std::net::TcpListener)> = Vec::new();
        for route in &config.routes {
            let addr = route.listen;
            if listeners.iter().any(|(bound, _)| *bound == addr) {
                continue;
            }
            let listener = match inherited_listeners.iter().position(|(a, _)| *a == addr) {
                Some(index) => inherited_listeners.swap_remove(index).1,
                None => bind_std(addr, listener_keepalive(&config, addr))
                    .map_err(|source| StartError::Bind { addr, source })?,
            };
            listeners.push((addr, listener));
        }
        let control_socket = &config.proxy.control_socket;
        let control_error = |source| StartError::Control {
            path: control_socket.clone(),
            source,
        };
        let control = match inherited_control {
            Some(listener) => ControlServer::from_std(listener).map_err(control_error)?,
            None => ControlServer::bind(control_socket).map_err(control_error)?,
        };
        let successor = SuccessorCommand {
            binary: std::env::current_exe().unwrap_or_else(|_| "/proc/self/exe".into()),
            args: match &config.source {
                Some(path) => vec!["run".into(), "--config".into(), path.into()],
                None => Vec::new(),
            },
        };
        Ok(Prepared {
            config,
            tls,
            kernel,
            listeners,
            control,
            metrics,
            successor,
            handoff,
            first_id,
            runtimes: per_core(),
        })
    }

    /// The second half of [`Proxy::start`], on the runtime: starts accepting on what
    /// [`Proxy::prepare`] bound.
    pub async fn start_prepared(
        prepared: Prepared,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Proxy, StartError> {
        let Prepared {
            config,
            tls,
            kernel,
            listeners: bound,
            control,
            metrics,
            successor,
            handoff,
            first_id,
            runtimes,
        } = prepared;
        // A successor reads the kernel's events once it adopted every connection
        // ([`Proxy::take_over`]): the predecessor read them until then.
        if let (Some(kernel), None) = (&kernel, &handoff) {
            kernel.start_events().map_err(StartError::Ebpf)?;
        }
        // The default for routes that set none: what `stats` reports as the proxy's.
        let data_path = select_data_path(config.proxy.data_path, kernel.is_some(), false).kind();
        let stats = Stats::new(data_path);
        let control_socket = config.proxy.control_socket.clone();
        let health = Registry::default();
        let generation = Generation::new(config, tls, &stats, &health);
        let (stop, stop_rx) = watch::channel(Stop::Running);
        let (closed, _) = broadcast::channel(1024);
        let limits = Limits::new(
            generation.config.proxy.per_ip,
            generation.config.proxy.ipv6_prefix_per_ip,
            [],
        );
        configure_limits(&limits, &generation);
        let tasks = TaskTracker::new();
        let (workers, runtimes) = Workers::start(runtimes, &tasks).map_err(StartError::Workers)?;
        let parking = Parking::new()
            .inspect_err(|e| warn!(error = %e, "idle connections keep their tasks: no epoll instance to park them"))
            .ok();
        let shared = Arc::new(Shared {
            runtimes,
            parking,
            generation: watch::Sender::new(Arc::new(generation)),
            listeners: Mutex::default(),
            accepting: Accepting::default(),
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
            tasks,
            services: TaskTracker::new(),
            upgrade: watch::Sender::new(if handoff.is_some() {
                Phase::TakingOver
            } else {
                Phase::Idle
            }),
            handoff: Mutex::default(),
            handoff_sockets: Mutex::default(),
            successor,
        });
        shared.table.continue_ids(first_id);
        shared.tasks.spawn(crate::park::run(Arc::clone(&shared)));
        start_checks(&shared, &shared.generation());
        {
            let mut listeners = shared.lock_listeners();
            for (addr, listener) in bound {
                if let Err(source) = open_listener(&shared, &mut listeners, addr, listener) {
                    // Nothing accepts yet: stop the listeners already open.
                    stop.send_replace(Stop::Exit);
                    return Err(StartError::Bind { addr, source });
                }
            }
        }
        {
            let mut sockets = shared.lock_handoff_sockets();
            let duplicate = |fd: std::os::fd::BorrowedFd<'_>| {
                fd.try_clone_to_owned()
                    .map_err(|source| StartError::Control {
                        path: shared.control_socket.clone(),
                        source,
                    })
            };
            sockets.control = Some(duplicate(control.as_fd())?);
            if let (Some((server, _)), Some(configured)) = (&metrics, generation_metrics(&shared)) {
                sockets.metrics = Some((configured, duplicate(server.as_fd())?));
            }
        }
        shared.services.spawn(control.serve(Arc::clone(&shared)));
        // What setup allocated and freed (the eBPF objects, their verifier's logs) would
        // otherwise stay in the process until the allocator is busy again.
        if let Err(e) = crate::memory::release_freed() {
            debug!(error = %e, "memory freed by setup could not be given back");
        }
        let metrics_addr = metrics.map(|(server, bound)| {
            info!(listen = %bound, "metrics endpoint at /metrics");
            shared.services.spawn(server.serve(Arc::clone(&shared)));
            bound
        });
        Ok(Proxy {
            shared,
            metrics_addr,
            stop,
            handoff: Mutex::new(handoff),
            _workers: workers,
        })
    }

    /// Upgrades this proxy to a successor process started from `binary` (default: the
    /// binary it was started from) that takes over its listeners and connections
    /// (`upgrade`). Once it returns `Ok`, what stayed here drains: call
    /// [`Proxy::shutdown`] and [`Proxy::wait`]. On error everything runs here as before.
    /// Run it to its end (on a task of its own, say): dropped half-way, it leaves the
    /// handoff unsettled, and [`Proxy::wait`] waiting for it.
    pub async fn upgrade(&self, binary: Option<PathBuf>) -> Result<Upgraded, UpgradeError> {
        crate::upgrade::upgrade(&self.shared, binary).await
    }

    /// Resolves once an upgrade handed this proxy over (whoever asked for it).
    pub async fn handed_off(&self) {
        let mut upgrade = self.shared.upgrade.subscribe();
        let _ = upgrade.wait_for(|phase| *phase == Phase::HandedOff).await;
    }

    /// In a successor: takes over the predecessor's connections (`None` in a proxy not
    /// started by an upgrade). Call it once [`Proxy::start_prepared`] returned: the
    /// predecessor stops accepting once told this proxy accepts. This proxy cannot be
    /// upgraded until it returned `Ok`. On error, exit: the predecessor stops this process
    /// and runs on with what it did not hand over, on the kernel maps it still owns.
    pub async fn take_over(&self) -> Option<std::io::Result<TakenOver>> {
        let (socket, predecessor) = self
            .handoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()?;
        let taken = crate::upgrade::take_over(&self.shared, socket, predecessor).await;
        if taken.is_ok() {
            if let Some(kernel) = &self.shared.kernel {
                // The pins are this proxy's now, whatever became of the predecessor.
                kernel.own_pins();
            }
            self.shared.read_kernel_events();
            self.shared.upgrade.send_replace(Phase::Idle);
        }
        Some(taken)
    }

    /// `(configured, bound)` for every listen address: they differ for port 0.
    pub fn listen_addrs(&self) -> Vec<(SocketAddr, SocketAddr)> {
        self.shared
            .lock_listeners()
            .iter()
            .map(|(configured, listening)| (*configured, listening.bound))
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
        self.shared
            .lock_listeners()
            .get(&configured)
            .map(|listening| listening.bound)
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

    /// Moves the stop stage forward to `stage`, never back, and tells every connection.
    fn advance(&self, stage: Stop) {
        let advanced = self.stop.send_if_modified(|now| {
            let later = *now < stage;
            if later {
                *now = stage;
            }
            later
        });
        if advanced {
            self.shared.table.nudge_all();
        }
    }

    /// Waits until the proxy stopped: after `shutdown`, when the last connection closed,
    /// and an upgrade under way ended (a [`Proxy::cut`] does not shorten that wait).
    pub async fn wait(&self) {
        // An upgrade under way ends first, within its timeouts: a failed one gives
        // connections back to drain here, and a successful one passes the stop on.
        let mut upgrade = self.shared.upgrade.subscribe();
        let _ = upgrade
            .wait_for(|phase| !matches!(phase, Phase::Starting | Phase::HandingOff))
            .await;
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        self.advance(Stop::Exit);
        self.shared.services.close();
        self.shared.services.wait().await;
        if *self.shared.upgrade.borrow() == Phase::HandedOff {
            // The successor answers on the control socket, and owns the pinned maps.
            return;
        }
        let path = &self.shared.control_socket;
        if let Err(e) = std::fs::remove_file(path) {
            debug!(path = %path.display(), error = %e, "control socket already gone");
        }
    }
}

impl Drop for Proxy {
    /// A proxy dropped without a shutdown drains its connections as one would (the
    /// connection runtimes end once they did).
    fn drop(&mut self) {
        self.advance(Stop::Drain);
    }
}

/// Loads the kernel data path if any route may use it. `auto` falls back to userspace and
/// says why; `ebpf` that cannot load is a startup error. The maps are pinned (so that an
/// upgrade can hand them over) where `ebpf_pin_root` is a bpffs or can be made one; a
/// successor (`inherited`) reuses its predecessor's and must be able to.
fn load_kernel(
    config: &Config,
    inherited: Option<Option<&KernelMaps>>,
) -> Result<Option<Kernel>, StartError> {
    let modes = std::iter::once(config.proxy.data_path)
        .chain(config.routes.iter().filter_map(|r| r.data_path));
    let (mut required, mut wanted) = (false, false);
    for mode in modes {
        required |= mode == DataPathMode::Ebpf;
        wanted |= select_data_path(mode, true, false).uses_kernel();
    }
    // A successor arms at splice time whatever its routes: sockets that finished their
    // handshake before its programs were attached (in an inherited listener's backlog, or
    // handed over unspliced) never armed themselves.
    let options = config.kernel_options();
    let options = LoadOptions {
        arm_at_splice: options.arm_at_splice || inherited.is_some(),
        ..options
    };
    let predecessor = inherited.flatten();
    if let Some(maps) = predecessor {
        if !wanted {
            return Err(StartError::Successor(
                "the running proxy's connections use the kernel data path, which this configuration does not load".into(),
            ));
        }
        let theirs = (
            maps.ring_buffer_bytes,
            maps.max_connections,
            maps.max_queued_bytes,
        );
        let ours = (
            options.ring_buffer_bytes,
            options.max_connections,
            options.max_queued_bytes,
        );
        if theirs != ours {
            return Err(StartError::Successor(format!(
                "the kernel maps were made with (ebpf_ring_buffer_bytes, ebpf_max_connections, max_queued_bytes) = {theirs:?} and this configuration says {ours:?}: restart to change them"
            )));
        }
        let kernel = Kernel::load_pinned(options, Pins::Reuse(maps.pins.clone()))
            .map_err(|e| StartError::Successor(error_chain(&e)))?;
        if maps.arms_at_splice && !kernel.arms_at_splice() {
            return Err(StartError::Successor(
                "the running proxy arms sockets' sock_ops callbacks at splice time and this one cannot (the start log says why): the sockets it has not spliced would never report a FIN or an RST here".into(),
            ));
        }
        return Ok(Some(kernel));
    }
    if !wanted {
        return Ok(None);
    }
    let root = &config.proxy.ebpf_pin_root;
    let control = std::path::absolute(&config.proxy.control_socket)
        .unwrap_or_else(|_| config.proxy.control_socket.clone());
    let pinned = ensure_bpffs(root)
        .and_then(|()| Kernel::load_pinned(options, Pins::Fresh(pin_dir(root, &control))));
    let loaded = match pinned {
        Ok(kernel) => Ok(kernel),
        // Pinning is for upgrades only: the kernel path runs without it.
        Err(pin_error) => Kernel::load(options).inspect(|_| {
            warn!(
                reason = %error_chain(&pin_error),
                "the kernel maps are not pinned: an upgrade cannot move kernel-path connections (set proxy.ebpf_pin_root to a bpffs this user may write, or to a directory where the proxy may mount one)"
            );
        }),
    };
    match loaded {
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

/// The configured metrics address of the running configuration.
fn generation_metrics(shared: &Shared) -> Option<SocketAddr> {
    shared.generation().config.proxy.metrics
}
