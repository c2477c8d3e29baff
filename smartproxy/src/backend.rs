//! The backend side: connecting to a route's targets (round-robin, skipping those
//! down), the sockets' keepalive, and the targets' active health checks.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};
use tracing::{debug, info, warn};

use crate::config::{LifecycleConfig, RouteConfig, Target};
use crate::conn_error::{ConnError, Step};
use crate::generation::Generation;
use crate::health::{self, Change, FailureKind, TargetHealth};
use crate::resolve::Resolve;
use crate::shared::{reached, Shared, Stop};
use crate::table::ConnRecord;
use crate::vocab::Side;

/// Starts the check task of every checked target of `generation` that has none yet.
pub(crate) fn start_checks(shared: &Arc<Shared>, generation: &Generation) {
    for (index, route) in generation.config.routes.iter().enumerate() {
        for target in generation.health(index) {
            if target.claim_checks() {
                shared.tasks.spawn(check_target(
                    Arc::clone(target),
                    route.name.clone(),
                    shared.stop.clone(),
                    Arc::clone(&shared.resolver),
                ));
            }
        }
    }
}

/// Connects to the route's targets, round-robin, trying the next one on failure and
/// skipping those its health has down (when all are, the least recently failed one is
/// tried anyway); returns the socket (with keepalive set, its address and target in the
/// record) and the target it reached.
pub(crate) async fn connect<'a>(
    shared: &Shared,
    generation: &'a Generation,
    route: usize,
    record: &ConnRecord,
) -> Result<(TcpStream, &'a Target), ConnError> {
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
    // Every target is tried: the error is the last one's.
    let mut last_error = None;
    for index in usable.chain(fallback) {
        let target = &targets[index];
        match connect_one(shared, config, generation.slot(route), target).await {
            Ok((stream, addr)) => {
                let _ = record.backend.set(addr);
                let _ = record.target.set(Arc::clone(target));
                // Latency matters more than segment count for the protocols this proxy
                // carries. The client's socket has it from its listener (`listener.rs`).
                let _ = stream.set_nodelay(true);
                keepalive(&stream, &config.lifecycle);
                return Ok((stream, &config.targets[index]));
            }
            Err(e) => {
                let shortage =
                    matches!(&e, ConnError::Io { source, .. } if health::is_local_shortage(source));
                last_error = Some(e);
                if shortage {
                    break;
                }
            }
        }
    }
    // None: the route has no target, which validation refuses.
    Err(last_error.unwrap_or_else(|| {
        ConnError::io(
            Side::Backend,
            Step::Connect,
            io::Error::new(io::ErrorKind::NotFound, "the route has no target"),
        )
    }))
}

/// One connect to one target, within `connect_timeout`, booked in its health and
/// counters. A failure warns at most once per target every [`health::WARN_INTERVAL`].
async fn connect_one(
    shared: &Shared,
    config: &RouteConfig,
    slot: usize,
    health: &TargetHealth,
) -> Result<(TcpStream, SocketAddr), ConnError> {
    let target = &health.target;
    let started = Instant::now();
    let deadline = started + config.lifecycle.connect_timeout;
    let (kind, error) = match timeout_at(deadline, connect_target(&*shared.resolver, target)).await
    {
        Ok(Ok(connected)) => {
            let elapsed = started.elapsed();
            shared.stats.backend_connected(slot, elapsed);
            log_change(health.connected(elapsed), &config.name, target);
            return Ok(connected);
        }
        // This host ran short, the target did not fail: its health stays as it is.
        // Its closure line names the cause; the accept loop warns of the shortage.
        Ok(Err(e)) if health::is_local_shortage(&e) => {
            return Err(ConnError::io(Side::Backend, Step::Connect, e));
        }
        Ok(Err(e)) => (
            FailureKind::of(&e),
            ConnError::io(Side::Backend, Step::Connect, e),
        ),
        Err(_) => (
            FailureKind::Timeout,
            ConnError::Timeout {
                side: Side::Backend,
                step: Step::Connect,
            },
        ),
    };
    let (change, warning) = health.connect_failed(kind, std::time::Instant::now());
    if let Some(suppressed) = warning {
        let error = match &error {
            ConnError::Io { source, .. } => source.to_string(),
            _ => format!("no answer within {:?}", config.lifecycle.connect_timeout),
        };
        warn!(route = %config.name, %target, kind = kind.as_str(), %error, suppressed, "connect failed");
    }
    log_change(change, &config.name, target);
    Err(error)
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
        let probed = tokio::select! {
            _ = reached(&mut stop, Stop::Drain) => return,
            probed = probe => probed,
        };
        match probed {
            // A check this host could not make is not booked against the target.
            Ok(Err(e)) if health::is_local_shortage(&e) => {
                debug!(%route, target = %health.target, error = %e, "health check not made");
            }
            probed => {
                let passed = matches!(probed, Ok(Ok(_)));
                debug!(%route, target = %health.target, passed, "health check");
                log_change(
                    health.check_done(passed, std::time::Instant::now()),
                    &route,
                    &health.target,
                );
            }
        }
        tokio::select! {
            _ = reached(&mut stop, Stop::Drain) => return,
            _ = tokio::time::sleep(check.interval) => {}
        }
    }
}

/// The socket and the address it reached.
async fn connect_target(
    resolver: &dyn Resolve,
    target: &Target,
) -> io::Result<(TcpStream, SocketAddr)> {
    let addrs = match target.socket_addr() {
        Some(addr) => vec![addr],
        None => resolver.lookup(&target.host, target.port).await?,
    };
    let mut last_error = io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok((stream, addr)),
            Err(e) => last_error = e,
        }
    }
    Err(last_error)
}

pub(crate) fn keepalive(stream: &TcpStream, config: &LifecycleConfig) {
    let socket = SockRef::from(stream);
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
