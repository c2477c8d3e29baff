//! The backend side: connecting to a route's targets (round-robin, skipping those
//! down), the sockets' keepalive, and the targets' active health checks.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, Socket, TcpKeepalive};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};
use tracing::{debug, info, warn};

use crate::config::{Config, RouteConfig, Target};
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
                keepalive(
                    SockRef::from(&stream),
                    config.lifecycle.tcp_keepalive,
                    FRESH_SOCKET,
                );
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

/// What keepalive a socket is known to have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KnownKeepalive {
    /// Exactly what [`keepalive`] gives this `tcp_keepalive` (`None`: off).
    Has(Option<Duration>),
    /// Set by someone else, or unreadable.
    Unknown,
}

/// A socket the proxy made itself has no keepalive.
pub(crate) const FRESH_SOCKET: KnownKeepalive = KnownKeepalive::Has(None);

/// The route's `tcp_keepalive` on `socket` (`None`: off), unless it is known to have it
/// already (`has`): an accepted socket inherits its listener's ([`listener_keepalive`]).
pub(crate) fn keepalive(socket: SockRef<'_>, wanted: Option<Duration>, has: KnownKeepalive) {
    if has == KnownKeepalive::Has(wanted) {
        return;
    }
    let set = match wanted {
        Some(idle) => socket.set_tcp_keepalive(&keepalive_of(idle)),
        None => socket.set_keepalive(false),
    };
    if let Err(e) = set {
        debug!(error = %e, "cannot set TCP keepalive");
    }
}

/// Keepalive after `idle` without traffic: a probe every `idle / 4 + 1 s`, 4 of them.
fn keepalive_of(idle: Duration) -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(idle)
        .with_interval(probe_interval(idle))
        .with_retries(KEEPALIVE_PROBES)
}

const KEEPALIVE_PROBES: u32 = 4;

fn probe_interval(idle: Duration) -> Duration {
    idle / 4 + Duration::from_secs(1)
}

/// The keepalive a listener on `addr` is bound with, so that what it accepts has it
/// already: the routes' `tcp_keepalive` when every route on the address agrees on one.
/// Otherwise none, and each connection sets its route's.
pub(crate) fn listener_keepalive(config: &Config, addr: SocketAddr) -> Option<Duration> {
    let mut settings = config
        .routes
        .iter()
        .filter(|route| route.listen == addr)
        .map(|route| route.lifecycle.tcp_keepalive);
    let first = settings.next().flatten()?;
    settings
        .all(|setting| setting == Some(first))
        .then_some(first)
}

/// Sets `idle` ([`listener_keepalive`]) on a listener before it listens.
pub(crate) fn set_listener_keepalive(listener: &Socket, idle: Option<Duration>) -> io::Result<()> {
    match idle {
        Some(idle) => listener.set_tcp_keepalive(&keepalive_of(idle)),
        None => Ok(()),
    }
}

/// What the sockets `listener` accepts inherit, read back from it: a listener handed over
/// by a predecessor has what that process set.
pub(crate) fn inherited_keepalive(listener: SockRef<'_>) -> KnownKeepalive {
    let read = || {
        if !listener.keepalive().ok()? {
            return Some(None);
        }
        // The kernel keeps whole seconds.
        let idle = listener.keepalive_time().ok()?;
        let ours = listener.keepalive_interval().ok()?.as_secs() == probe_interval(idle).as_secs()
            && listener.keepalive_retries().ok()? == KEEPALIVE_PROBES;
        ours.then_some(Some(idle))
    };
    read().map_or(KnownKeepalive::Unknown, KnownKeepalive::Has)
}

#[cfg(test)]
mod tests {
    use socket2::{Domain, Type};

    use super::*;

    fn listener() -> Socket {
        Socket::new(Domain::IPV4, Type::STREAM, None).expect("a socket")
    }

    #[test]
    fn a_listener_tells_what_its_sockets_inherit_when_it_is_ours() {
        let off = listener();
        assert_eq!(inherited_keepalive(SockRef::from(&off)), FRESH_SOCKET);

        let ours = listener();
        set_listener_keepalive(&ours, Some(Duration::from_secs(30))).expect("set keepalive");
        assert_eq!(
            inherited_keepalive(SockRef::from(&ours)),
            KnownKeepalive::Has(Some(Duration::from_secs(30)))
        );

        // Set by someone else (another interval): unknown, so each connection sets its
        // route's.
        let theirs = listener();
        theirs
            .set_tcp_keepalive(
                &TcpKeepalive::new()
                    .with_time(Duration::from_secs(30))
                    .with_interval(Duration::from_secs(2)),
            )
            .expect("set keepalive");
        assert_eq!(
            inherited_keepalive(SockRef::from(&theirs)),
            KnownKeepalive::Unknown
        );
    }
}
