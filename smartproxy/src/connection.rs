//! One connection, from accept to close: admission (limits, PROXY header, route),
//! TLS, the backend connect, then the lifecycle driver over the data path, and the
//! close, booked and logged with its reason.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tracing::field::{display, Empty};
use tracing::{debug, info, info_span, warn, Instrument, Span};

use crate::backend::{connect, keepalive, KnownKeepalive};
use crate::conn_error::{ConnError, Step};
use crate::datapath::adaptive::Place;
use crate::datapath::clock::{instant_of, monotonic_ns, ns_of};
use crate::datapath::kernel::{Kernel, SpliceError};
use crate::datapath::relay::{Moved, Resting};
use crate::datapath::{Meter, Peer, Relay, Report};
use crate::error_chain;
use crate::generation::{Generation, Placement};
use crate::lifecycle::{Action, Event, Lifecycle};
use crate::limits::Admissions;
use crate::park::Parked;
use crate::routing::{receive_proxy_header, route};
use crate::shared::{Closed, Shared, Stop};
use crate::table::{ConnRecord, ParkState};
use crate::upgrade::message::ConnectionRecord;
use crate::upgrade::{Outgoing, Phase};
use crate::vocab::{DataPathKind, Direction, Reason, Side};

/// One connection, from accept to close. Not an `async fn`: that would hold the
/// connection's future twice, once as the block below and once inside `Instrumented`
/// (3,056 bytes a connection instead of 1,568, measured in release).
pub(crate) fn serve(
    shared: Arc<Shared>,
    generation: Arc<Generation>,
    listen: SocketAddr,
    client: TcpStream,
    client_keepalive: KnownKeepalive,
    record: Arc<ConnRecord>,
) -> impl Future<Output = ()> {
    let span = info_span!("conn", id = record.id, client = Empty, via = Empty);
    // Behind a load balancer the client is known once its PROXY header is read.
    if generation.routes.inbound.contains_key(&listen) {
        span.record("via", display(record.peer));
    } else {
        span.record("client", display(record.peer));
    }
    async move {
        let mut admissions = Admissions::default();
        // Boxed: the handshake's state (a TLS one above all) is larger than the relay's,
        // and inline it would size this task for the connection's whole life.
        let established = Box::pin(establish(
            &shared,
            &generation,
            listen,
            client,
            client_keepalive,
            &record,
            &mut admissions,
        ))
        .await;
        let (reason, cause) = match established {
            Ok((route, client, backend)) => {
                let relayed = relay(
                    &shared,
                    &generation,
                    route,
                    client,
                    backend,
                    &record,
                    &mut admissions,
                );
                match relayed.await {
                    Ended::Closed(reason) => (reason, None),
                    Ended::Moved | Ended::Parked => return,
                }
            }
            Err(error) => (error.reason(), Some(error_chain(&error))),
        };
        // Before the close is announced: whoever hears of it may connect again at once.
        drop(admissions);
        close(&shared, &record, reason, cause.as_deref());
    }
    .instrument(span)
}

/// How a connection's task ended.
enum Ended {
    Closed(Reason),
    /// Handed to a successor process (`upgrade`), which closes it in the end.
    Moved,
    /// Parked without a task (`park`): a new task takes it up.
    Parked,
}

/// Where a connection went that [`resume`] took over or `park_or_take_up` was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resumed {
    /// A task of its own drives it.
    Running,
    /// The parking lot holds it.
    Parked,
}

/// Drives a connection a predecessor process handed over (or an upgrade that failed gave
/// back) from where it was: same id, counters, lifecycle state and timers. One whose meter
/// says it was quiet for `park_idle_after` (most were parked there) is parked here at
/// once, without a task that would only park it at a later sweep; bytes that came
/// meanwhile wait in its socket and take it up at once. A spliced one parks so only if
/// its meter, which counts the kernel's bytes from the adoption on, still says so, and
/// neither socket shows what the events its predecessor read could have announced
/// ([`Relay::parkable_as_adopted`]). This process reads the splices' events only once it
/// adopted them all: until then the lot watches those sockets for reads too
/// ([`crate::park::Parking::watch_splices_again`]).
pub(crate) fn resume(
    shared: &Arc<Shared>,
    moved: ConnectionRecord,
    sockets: Moved,
) -> io::Result<Resumed> {
    let generation = shared.generation();
    let slot = shared.stats.route_slot(&moved.route);
    let route = generation
        .config
        .routes
        .iter()
        .position(|route| route.name == moved.route);
    let target = route.and_then(|index| {
        generation
            .health(index)
            .iter()
            .find(|target| moved.target.as_deref() == Some(&*target.target.to_string()))
            .cloned()
    });
    let meter = Arc::new(Meter::from_record(&moved.meter));
    let mut lifecycle = Lifecycle::from_record(&moved.lifecycle, instant_of);
    if let Some(index) = route {
        lifecycle.share_config(&generation.config.routes[index].lifecycle);
    }
    let record = shared.table.insert_moved(&moved, slot, target, meter);
    // Admitted there, it counts against the limits here.
    let mut admissions = shared
        .limits
        .hold(slot, record.client().ip(), std::time::Instant::now());
    let quiet_since = sockets
        .is_quiet()
        .then(|| may_park_now(shared, &lifecycle, &record))
        .flatten();
    if let Some(quiet_since) = quiet_since {
        let Moved {
            client,
            backend,
            moves,
            ..
        } = sockets;
        let sockets = Resting {
            offload: None,
            client,
            backend,
        };
        return Ok(park_or_take_up(
            shared,
            Parked::new(record, sockets, lifecycle, moves, admissions, quiet_since),
        ));
    }
    let runtime = shared.runtimes.place(None);
    let meter = Arc::clone(&record.meter);
    let mut relay = relay_on(shared, runtime, moved.moves, |kernel| {
        Relay::from_moved(sockets, meter, kernel)
    })
    .inspect_err(|_| shared.table.remove(record.id))?;
    // After the adoption: the meter counts the kernel's bytes since the handoff.
    let quiet_since =
        may_park_now(shared, &lifecycle, &record).filter(|_| relay.parkable_as_adopted());
    if let Some(quiet_since) = quiet_since {
        match park(
            shared,
            relay,
            lifecycle,
            &record,
            &mut admissions,
            quiet_since,
        ) {
            Ok(resumed) => return Ok(resumed),
            Err(back) => (relay, lifecycle) = *back,
        }
    }
    let span = info_span!("conn", id = record.id, client = %record.client(), moved = true);
    spawn_drive(
        shared,
        runtime,
        record,
        (relay, lifecycle),
        admissions,
        span,
    );
    Ok(Resumed::Running)
}

/// Takes a parked connection up again in a task of its own, from where it stopped; while
/// an upgrade takes connections over, hands it to the successor as it is instead, unless
/// the proxy started to stop (the task sees to the stop first, as every connection's does).
pub(crate) fn take_up(shared: &Arc<Shared>, parked: Parked) {
    let handoff = handoff_requested(shared).filter(|_| *shared.stop.borrow() == Stop::Running);
    let parked = match handoff {
        Some(handoff) => match hand_off_parked(shared, parked, handoff) {
            Ok(()) => return,
            Err(parked) => *parked,
        },
        None => parked,
    };
    let runtime = shared.runtimes.place(None);
    // A failed registration closes the descriptors it was given (tokio's `from_std`);
    // these keep both sockets until the relay holds them, so that a failure resets them:
    // a FIN would tell the backend that a stream cut short had ended. Without them (no
    // descriptor to spare) the take-up goes ahead all the same.
    let kept = parked
        .sockets
        .client
        .try_clone()
        .and_then(|c| Ok([c, parked.sockets.backend.try_clone()?]));
    let Parked {
        record,
        sockets,
        lifecycle,
        moves,
        admissions,
        ..
    } = parked;
    let meter = Arc::clone(&record.meter);
    let relay = relay_on(shared, runtime, moves, |_| {
        Relay::from_resting(sockets, meter)
    });
    #[cfg(feature = "test-hooks")]
    let relay = relay.and_then(test_hooks::take_up);
    let relay = match relay {
        Ok(relay) => {
            drop(kept);
            relay
        }
        Err(e) => {
            let cause = e.to_string();
            warn!(id = record.id, error = %cause, "a parked connection could not be taken up");
            for socket in kept.iter().flatten() {
                // Best effort: without it the last close sends a FIN.
                let _ = SockRef::from(socket).set_linger(Some(Duration::ZERO));
            }
            drop(kept);
            drop(admissions);
            close(shared, &record, Reason::ProxyError, Some(&cause));
            return;
        }
    };
    let span = info_span!("conn", id = record.id, client = %record.client());
    debug!(parent: &span, "taken up");
    spawn_drive(
        shared,
        runtime,
        record,
        (relay, lifecycle),
        admissions,
        span,
    );
}

/// The relay of a connection that comes back (from a predecessor, or parked), as `build`
/// makes it from this process's kernel path, registered with `runtime`; on the adaptive
/// path again if it was (`moves`: those it made).
fn relay_on(
    shared: &Shared,
    runtime: &Handle,
    moves: Option<u32>,
    build: impl FnOnce(Option<&Kernel>) -> io::Result<Relay>,
) -> io::Result<Relay> {
    let mut relay = {
        let _registers_with = runtime.enter();
        build(shared.kernel.as_ref())?
    };
    if let (Some(moves), Some(kernel)) = (moves, &shared.kernel) {
        relay.adapt(kernel, shared.generation().config.proxy.auto, moves);
    }
    Ok(relay)
}

/// Drives `parts` in a task of its own on `runtime`, and closes the connection when the
/// lifecycle does.
fn spawn_drive(
    shared: &Arc<Shared>,
    runtime: &Handle,
    record: Arc<ConnRecord>,
    parts: (Relay, Lifecycle),
    mut admissions: Admissions,
    span: Span,
) {
    let tasks = shared.tasks.clone();
    let shared = Arc::clone(shared);
    // Boxed and unpacked in a block of its own: the relay and the lifecycle then take room
    // only in `drive`'s future, not also as what this one captured.
    let parts = Box::new(parts);
    let task = async move {
        let ended = {
            let (relay, lifecycle) = *parts;
            drive(&shared, relay, lifecycle, &record, &mut admissions)
        }
        .await;
        if let Ended::Closed(reason) = ended {
            drop(admissions);
            close(&shared, &record, reason, None);
        }
    };
    tasks.spawn_on(task.instrument(span), runtime);
}

/// `cause`: why the setup failed, the error chain; `None` once the bytes moved.
fn close(shared: &Shared, record: &ConnRecord, reason: Reason, cause: Option<&str>) {
    shared.stats.closed(record, reason);
    shared.table.remove(record.id);
    let route = record
        .route
        .get()
        .and_then(|slot| shared.stats.route_name(*slot));
    info!(
        id = record.id,
        route = %route.as_deref().unwrap_or("-"),
        client = %record.client(),
        backend = %record.backend.get().map_or_else(|| "-".to_owned(), |b| b.to_string()),
        data_path = %record.data_path().map_or("-", DataPathKind::as_str),
        client_to_backend = record.meter.bytes(Direction::ClientToBackend),
        backend_to_client = record.meter.bytes(Direction::BackendToClient),
        duration_ms = record.started.elapsed().as_millis() as u64,
        %reason,
        cause,
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
    client_keepalive: KnownKeepalive,
    record: &ConnRecord,
    admissions: &mut Admissions,
) -> Result<(usize, Peer, Peer), ConnError> {
    let accepted_at = Instant::now();
    let (route, peeked) = match admit(shared, generation, listen, &client, record, admissions).await
    {
        Ok(routed) => routed,
        Err(error) => {
            if error.reason().is_refusal() {
                // Refused connections get an RST, every time, at once.
                let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
            }
            return Err(error);
        }
    };
    let config = &generation.config.routes[route];
    keepalive(
        SockRef::from(&client),
        config.lifecycle.tcp_keepalive,
        client_keepalive,
    );
    let header = match config.proxy_protocol {
        Some(version) => {
            let (client, local) = match record.carried.get() {
                Some(carried) => (carried.client, carried.destination),
                None => (
                    record.client(),
                    client
                        .local_addr()
                        .map_err(|e| ConnError::io(Side::Client, Step::LocalAddress, e))?,
                ),
            };
            crate::proxy_protocol::header(version, client, local)
        }
        None => Vec::new(),
    };
    let Some(tls) = generation.tls.route(route) else {
        let backend = tokio::select! {
            () = draining(shared, record) => return Err(ConnError::Shutdown),
            connected = connect(shared, generation, route, record) => connected?.0,
        };
        write_all(&backend, &[header, peeked].concat()).await?;
        return Ok((route, client.into(), backend.into()));
    };
    // The whole TLS handshake, ClientHello included, within handshake_timeout.
    let deadline = accepted_at + config.lifecycle.handshake_timeout;
    let (client, negotiated) = tokio::select! {
        () = draining(shared, record) => return Err(ConnError::Shutdown),
        accepted = tls.accept(client, peeked, deadline) => accepted?,
    };
    let backend = async {
        let (backend, target) = connect(shared, generation, route, record).await?;
        write_all(&backend, &header).await?;
        let deadline = Instant::now() + config.lifecycle.connect_timeout;
        tls.connect(backend, &negotiated, target, deadline).await
    };
    let backend = tokio::select! {
        () = draining(shared, record) => Err(ConnError::Shutdown),
        connected = backend => connected,
    };
    match backend {
        Ok(backend) => Ok((route, client, backend)),
        Err(error) => {
            client.close(config.lifecycle.grace_period).await;
            Err(error)
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
) -> Result<(usize, Vec<u8>), ConnError> {
    // The PROXY header and the ClientHello both come before the route is known: the
    // [lifecycle] handshake_timeout bounds them together.
    let deadline = Instant::now() + generation.config.lifecycle.handshake_timeout;
    let read = match generation.routes.inbound.get(&listen) {
        Some(inbound) => tokio::select! {
            () = draining(shared, record) => return Err(ConnError::Shutdown),
            received = receive_proxy_header(client, inbound, record, deadline) => received?,
        },
        None => Vec::new(),
    };
    // Charged to the client a PROXY header named, not to its load balancer.
    let ip = record.client().ip();
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
            .map_err(|refusal| ConnError::Refused(shared.stats.refused(refusal)))?,
    );
    // None: accepted just before a reload removed the address.
    let routes = generation
        .routes
        .listeners
        .get(&listen)
        .ok_or(ConnError::NoRoute)?;
    let (route, peeked) = tokio::select! {
        () = draining(shared, record) => return Err(ConnError::Shutdown),
        routed = route(routes, client, read, deadline) => routed?,
    };
    let slot = generation.slot(route);
    let _ = record.route.set(slot);
    shared.stats.routed(slot);
    admissions.extend(
        shared
            .limits
            .admit_route(slot, ip, std::time::Instant::now())
            .map_err(|refusal| ConnError::Refused(shared.stats.refused(refusal)))?,
    );
    Ok((route, peeked))
}

async fn write_all(backend: &TcpStream, mut bytes: &[u8]) -> Result<(), ConnError> {
    let failed = |e| ConnError::io(Side::Backend, Step::Send, e);
    while !bytes.is_empty() {
        backend.writable().await.map_err(failed)?;
        match backend.try_write(bytes) {
            Ok(written) => bytes = &bytes[written..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(failed(e)),
        }
    }
    Ok(())
}

/// Moves the bytes and feeds the lifecycle until it closes the connection. Not `async`
/// itself: as an async fn it kept room for the relay and the lifecycle beside the `drive`
/// future they move into, 704 bytes more in each connection's task for its whole life.
fn relay<'a>(
    shared: &'a Arc<Shared>,
    generation: &Generation,
    route: usize,
    client: Peer,
    backend: Peer,
    record: &'a Arc<ConnRecord>,
    admissions: &'a mut Admissions,
) -> impl Future<Output = Ended> + 'a {
    let config = Arc::clone(&generation.config.routes[route].lifecycle);
    let mut relay = Relay::new(client, backend, Arc::clone(&record.meter));
    let placement = generation.data_path(route, shared.kernel.is_some());
    record.set_data_path(DataPathKind::Userspace);
    match (placement, &shared.kernel) {
        (Placement::Kernel, Some(kernel)) => {
            // Before the splice: from then on the kernel may move bytes before this task
            // runs.
            record.set_data_path(DataPathKind::Ebpf);
            let result = relay.offload(kernel);
            book_splice(shared, &relay, record, result);
        }
        (Placement::Adaptive, Some(kernel)) => {
            relay.adapt(kernel, generation.config.proxy.auto, 0);
        }
        _ => {}
    }
    let lifecycle = Lifecycle::new(config, Instant::now().into_std());
    drive(shared, relay, lifecycle, record, admissions)
}

/// Books a splice (`result`): on the kernel path if it completed, on the userspace path
/// otherwise, which is routine for a peer that already sent its FIN (the kernel refuses
/// such a socket), so not a warning: `ebpf.splice_failures` counts them. A splice that
/// failed half way stays in the maps, passing every byte to the relay: userspace moves
/// them.
fn book_splice(
    shared: &Shared,
    relay: &Relay,
    record: &ConnRecord,
    result: Result<(), SpliceError>,
) {
    let failed = |e: &SpliceError| {
        shared.splice_failed(e);
        debug!(error = %error_chain(e), "splice failed; this connection uses the userspace data path");
    };
    let completed = match result {
        Ok(()) => relay.splice_fallback().inspect(|e| failed(e)).is_none(),
        Err(e) => {
            failed(&e);
            false
        }
    };
    record.set_data_path(if completed {
        DataPathKind::Ebpf
    } else {
        DataPathKind::Userspace
    });
}

/// Books a move of the adaptive path: the connection's path, and the proxy's count.
fn book_move(shared: &Shared, record: &ConnRecord, place: Place) {
    let path = match place {
        Place::Kernel => DataPathKind::Ebpf,
        Place::Relay => DataPathKind::Userspace,
    };
    record.set_data_path(path);
    shared.stats.moved_to(path);
    debug!(to = %path, "moved");
}

/// Feeds the lifecycle what the relay reports and carries out its actions, until it
/// closes the connection, an upgrade moves it to the successor, or it parks (then its
/// admissions go with it). Not `async` itself: an async fn keeps its arguments apart from
/// the locals they become, so the relay and the lifecycle would take their room twice in
/// every connection's task.
#[allow(clippy::manual_async_fn)]
fn drive<'a>(
    shared: &'a Arc<Shared>,
    mut relay: Relay,
    mut lifecycle: Lifecycle,
    record: &'a Arc<ConnRecord>,
    admissions: &'a mut Admissions,
) -> impl Future<Output = Ended> + 'a {
    async move {
        let mut stop = shared.stop.clone();
        let mut stop_seen = Stop::Running;
        let mut movable = relay.movable();
        record.stays.store(!movable, Ordering::Relaxed);
        rule_out_parking(&relay, record);
        // A stop or an upgrade that came before the connection's record did is seen on the
        // first turn.
        record.nudge.raise();
        loop {
            let deadline = lifecycle.deadline().map(Instant::from_std);
            let event = tokio::select! {
                report = relay.next_event() => match report {
                    Report::Event(event) => event,
                    Report::Spliced(result) => {
                        book_splice(shared, &relay, record, result);
                        if record.data_path() == Some(DataPathKind::Ebpf) {
                            shared.stats.moved_to(DataPathKind::Ebpf);
                        }
                        rule_out_parking(&relay, record);
                        continue;
                    }
                    Report::Moved(place) => {
                        book_move(shared, record, place);
                        rule_out_parking(&relay, record);
                        continue;
                    }
                },
                _ = sleep_until_some(deadline) => Event::Timer {
                    last_activity: instant_of(relay.meter().last_activity_ns()),
                },
                () = record.nudge.nudged() => {
                    let stage = if stop_seen < Stop::Cut {
                        next_stage(&mut stop, stop_seen)
                    } else {
                        None
                    };
                    let handoff = if movable { handoff_requested(shared) } else { None };
                    if let Some(stage) = stage {
                        if handoff.is_some() {
                            // The handoff on the next turn.
                            record.nudge.raise();
                        }
                        stop_seen = stage;
                        if stage == Stop::Drain { Event::Shutdown } else { Event::Cut }
                    } else if let Some(handoff) = handoff {
                        match hand_off(shared, relay, &lifecycle, record, handoff) {
                            Ok(()) => return Ended::Moved,
                            Err(kept) => {
                                // It stays here, and the upgrade need not wait for it; a
                                // parked one would come back movable.
                                relay = *kept;
                                movable = false;
                                record.stays.store(true, Ordering::Relaxed);
                                record.set_park_state(ParkState::Never);
                                continue;
                            }
                        }
                    } else if let Some(quiet_since) = (record
                        .switch_park_state(ParkState::Asked, ParkState::Awake)
                        && stop_seen == Stop::Running)
                        .then(|| may_park(shared, &relay, &lifecycle, record))
                        .flatten()
                    {
                        match park(shared, relay, lifecycle, record, admissions, quiet_since) {
                            Ok(_) => return Ended::Parked,
                            Err(kept) => {
                                (relay, lifecycle) = *kept;
                                continue;
                            }
                        }
                    } else {
                        // A splice whose events stopped cannot park any more.
                        rule_out_parking(&relay, record);
                        continue;
                    }
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
                    Action::Close(reason) => return Ended::Closed(reason),
                }
            }
            record
                .half_open
                .store(lifecycle.is_half_open(), Ordering::Relaxed);
        }
    }
}

/// Where to hand the connection, if an upgrade is taking connections over now.
fn handoff_requested(shared: &Shared) -> Option<mpsc::UnboundedSender<Outgoing>> {
    if *shared.upgrade.borrow() != Phase::HandingOff {
        return None;
    }
    // None: that handoff already ended.
    shared.lock_handoff().clone()
}

/// Takes the relay apart and hands it, with its record, to the upgrade; gives it back if
/// it cannot move now.
fn hand_off(
    shared: &Arc<Shared>,
    relay: Relay,
    lifecycle: &Lifecycle,
    record: &ConnRecord,
    handoff: mpsc::UnboundedSender<Outgoing>,
) -> Result<(), Box<Relay>> {
    let Some(placed) = Placed::of(shared, record) else {
        return Err(Box::new(relay));
    };
    let moved = match relay.into_moved() {
        Ok(moved) => moved,
        Err(failed) => {
            let (relay, e) = *failed;
            warn!(error = %e, "this connection cannot move to the successor");
            return Err(Box::new(relay));
        }
    };
    send_over(shared, placed.outgoing(record, lifecycle, moved), handoff);
    debug!("handed to the successor");
    Ok(())
}

/// Hands a parked connection to the upgrade as it is, without a task to take it up first;
/// gives it back if it cannot move.
fn hand_off_parked(
    shared: &Arc<Shared>,
    parked: Parked,
    handoff: mpsc::UnboundedSender<Outgoing>,
) -> Result<(), Box<Parked>> {
    let Some(placed) = Placed::of(shared, &parked.record) else {
        return Err(Box::new(parked));
    };
    let (moved, record, lifecycle, admissions) = parked.into_moved();
    drop(admissions);
    send_over(shared, placed.outgoing(&record, &lifecycle, moved), handoff);
    debug!(
        id = record.id,
        "handed to the successor from the parking lot"
    );
    Ok(())
}

/// Where a connection runs, as its successor needs it: known once it is routed and
/// connected (one still in its handshake or connect moves once it is).
struct Placed {
    route: String,
    backend: SocketAddr,
    data_path: DataPathKind,
}

impl Placed {
    fn of(shared: &Shared, record: &ConnRecord) -> Option<Placed> {
        Some(Placed {
            route: record
                .route
                .get()
                .and_then(|slot| shared.stats.route_name(*slot))?,
            backend: record.backend.get().copied()?,
            data_path: record.data_path()?,
        })
    }

    /// The connection as it goes to the successor. After the relay was taken apart: a
    /// splice is exported then, so the meter's kernel bytes are final up to here, and the
    /// successor's meter counts only what the kernel moves from now on.
    fn outgoing(self, record: &ConnRecord, lifecycle: &Lifecycle, moved: Moved) -> Outgoing {
        Outgoing {
            record: ConnectionRecord {
                id: record.id,
                peer: record.peer,
                carried: record.carried.get().map(|c| (c.client, c.destination)),
                started_ns: ns_of(record.started),
                started_unix_ms: record
                    .started_at
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                route: self.route,
                backend: self.backend,
                target: record.target.get().map(|t| t.target.to_string()),
                data_path: self.data_path,
                meter: record.meter.to_record(),
                lifecycle: lifecycle.record(ns_of),
                halves: moved.halves,
                pending: moved.pending.each_ref().map(Vec::len),
                offload: moved.offload.clone(),
                moves: moved.moves,
                park_doublings: record.park_doublings(),
            },
            moved,
        }
    }
}

/// Sends `outgoing` to the upgrade, out of the table first: the upgrade counts what is
/// left to move there.
fn send_over(shared: &Arc<Shared>, outgoing: Outgoing, handoff: mpsc::UnboundedSender<Outgoing>) {
    shared.table.remove(outgoing.record.id);
    // The upgrade reads until every sender is gone, and this one is alive: the send
    // cannot fail. Should it, the connection goes on here all the same.
    if let Err(returned) = handoff.send(outgoing) {
        let Outgoing { record, moved } = returned.0;
        let id = record.id;
        if let Err(e) = resume(shared, record, moved) {
            warn!(id, error = %e, "a connection whose handoff ended could not resume");
        }
    }
}

/// Once a connection can never park ([`Relay::may_ever_park`]), the sweep leaves it alone.
fn rule_out_parking(relay: &Relay, record: &ConnRecord) {
    if !relay.may_ever_park() {
        record.set_park_state(ParkState::Never);
    }
}

/// Whether the connection parks now: its relay may ([`Relay::parkable`]), and
/// [`may_park_now`], whose last activity it gives.
fn may_park(
    shared: &Shared,
    relay: &Relay,
    lifecycle: &Lifecycle,
    record: &ConnRecord,
) -> Option<u64> {
    relay
        .parkable()
        .then(|| may_park_now(shared, lifecycle, record))
        .flatten()
}

/// The connection's last activity, if one that may park and holds nothing parks now:
/// parking on, quiet for its park delay (`park_idle_after`, or longer, see
/// `park::quiet_long_enough_to_park`), both directions open, and no lifecycle deadline due
/// (one that woke it is seen to first). Read once: it goes with the parked connection.
fn may_park_now(shared: &Shared, lifecycle: &Lifecycle, record: &ConnRecord) -> Option<u64> {
    let after = shared.generation().config.proxy.park_idle_after?;
    let now = std::time::Instant::now();
    if !lifecycle.is_open_both_ways() || lifecycle.deadline().is_some_and(|at| at <= now) {
        return None;
    }
    crate::park::quiet_long_enough_to_park(record, monotonic_ns(), after)
}

/// Parks the connection: its task ends, and the parking lot takes it up again. Gives the
/// relay and the lifecycle back if the sockets cannot be handed over (then it never
/// parks). Should the lot refuse (the proxy started to stop meanwhile, or the sockets
/// cannot be watched), a new task takes the connection up at once. Says which.
fn park(
    shared: &Arc<Shared>,
    relay: Relay,
    lifecycle: Lifecycle,
    record: &Arc<ConnRecord>,
    admissions: &mut Admissions,
    quiet_since_ns: u64,
) -> Result<Resumed, Box<(Relay, Lifecycle)>> {
    if shared.parking.is_none() {
        return Err(Box::new((relay, lifecycle)));
    }
    let moves = relay.moves();
    let sockets = match relay.into_resting() {
        Ok(sockets) => sockets,
        Err(failed) => {
            let (relay, e) = *failed;
            debug!(error = %e, "cannot park; it keeps its task");
            record.set_park_state(ParkState::Never);
            return Err(Box::new((relay, lifecycle)));
        }
    };
    let parked = Parked::new(
        Arc::clone(record),
        sockets,
        lifecycle,
        moves,
        std::mem::take(admissions),
        quiet_since_ns,
    );
    Ok(park_or_take_up(shared, parked))
}

/// Parks `parked`; should the lot refuse (the proxy started to stop meanwhile, parking is
/// off, or the sockets cannot be watched), a new task takes the connection up at once.
/// Says which.
fn park_or_take_up(shared: &Arc<Shared>, parked: Box<Parked>) -> Resumed {
    let Some(parking) = &shared.parking else {
        take_up(shared, *parked);
        return Resumed::Running;
    };
    match parking.park(parked) {
        Ok(()) => {
            debug!("parked");
            Resumed::Parked
        }
        Err(refused) => {
            take_up(shared, *refused);
            Resumed::Running
        }
    }
}

/// The stop stage the proxy reached, if it is past `seen`. A proxy dropped without a
/// shutdown moves to `Drain` first (`Proxy`'s `Drop`), so the stage the channel holds
/// once closed is the last one.
fn next_stage(stop: &mut watch::Receiver<Stop>, seen: Stop) -> Option<Stop> {
    let now = *stop.borrow_and_update();
    (now > seen).then_some(now)
}

/// Resolves once the proxy's stop stage is `Drain` or later.
async fn draining(shared: &Shared, record: &ConnRecord) {
    let mut stop = shared.stop.clone();
    while next_stage(&mut stop, Stop::Running).is_none() {
        record.nudge.nudged().await;
    }
}

pub(crate) async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Test builds only (`--features test-hooks`): failures nothing outside the process can
/// cause.
#[cfg(feature = "test-hooks")]
pub mod test_hooks {
    use std::io;
    use std::sync::atomic::{AtomicBool, Ordering};

    use crate::datapath::relay::Relay;

    static FAIL_TAKE_UPS: AtomicBool = AtomicBool::new(false);

    /// From now on, a parked connection's take-up fails as if its sockets could not be
    /// registered with a runtime again (the kernel out of memory). Process-wide: for a
    /// test binary of its own.
    pub fn fail_take_ups() {
        FAIL_TAKE_UPS.store(true, Ordering::Relaxed);
    }

    /// `relay`, or the failure [`fail_take_ups`] asked for (the relay, and its sockets,
    /// dropped as a failed registration drops them).
    pub(super) fn take_up(relay: Relay) -> io::Result<Relay> {
        if FAIL_TAKE_UPS.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        Ok(relay)
    }
}
