//! Idle connections without a task. A connection that moved no byte for its park delay
//! (`[proxy] park_idle_after`, 1 s by default, or longer for one that traffic keeps taking
//! up soon after: `doublings_after_traffic`; through the kernel either), with both
//! directions open and nothing held, gives its task up: its two sockets go to one epoll
//! instance, its lifecycle deadline to one ordered set, and its nudge (a stop, an upgrade)
//! to one queue, all driven by one task ([`run`]). A spliced one keeps its splice live, and
//! its splice's events wake it too. Whichever comes first, a socket to read (or, while the
//! verdict redirects, a FIN or an error), an event, the deadline or a nudge, takes the
//! connection up again on a runtime, where it goes on from where it stopped
//! (`connection::take_up`); during an upgrade's handoff it goes to the successor from here
//! instead. A parked connection keeps its record, its descriptors, its lifecycle and its
//! admissions: a few hundred bytes instead of a task, its future and two reactor
//! registrations (docs/performance.md#idle-connections).

mod epoll;

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Wake, Waker};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::datapath::clock::monotonic_ns;
use crate::datapath::relay::{Moved, Resting};
use crate::error_chain;
use crate::lifecycle::Lifecycle;
use crate::limits::Admissions;
use crate::shared::{Shared, Stop};
use crate::table::{ConnRecord, ConnTable, ParkState};
use crate::upgrade::Phase;
use crate::vocab::{Direction, Side};

use epoll::Epoll;

/// The longest between two looks over the connections for ones to park: a connection is
/// parked between its park delay and that plus the sweep's period after its last byte
/// ([`sweep_period`]).
const MAX_SWEEP_EVERY: Duration = Duration::from_millis(500);

/// The most connections one sweep asks to park: each parks in its own task, and thousands
/// at once queue ahead of the busy connections on their runtimes. A successor that took
/// over 9,872 idle spliced connections in tasks parked them all at its first sweep: the
/// longest pause of streams through it was about 130 ms (3 upgrades) without this limit,
/// and 63 ms with it (median of 5; docs/performance.md). A successor now parks quiet
/// adopted ones at once (`connection::resume`), but a burst of connections that go quiet
/// together still parks over a few sweeps. Each sweep starts after the last connection
/// the one before asked (by id), so that those that decline (a relay holding bytes for a
/// stalled reader) do not keep the others from their turn.
const MAX_ASKED_PER_SWEEP: usize = 1024;

/// The shortest between two purges of freed memory (`memory::release_freed`): each
/// costs a `madvise` per freed extent, and the pages it gives back fault in again when
/// used.
const MIN_RELEASE_EVERY: Duration = Duration::from_secs(1);

/// Ready sockets read from the epoll instance at once.
const READY_BATCH: usize = 256;

/// A connection that traffic takes up within this of going quiet parks later next time:
/// its park delay doubles ([`doublings_after_traffic`]) until it is at least this long.
/// Parking and taking up again cost about twice what relaying a small message does: in the
/// bench's heartbeat scenario (9,872 connections, an echo on each every 5 s), 103 µs of
/// proxy CPU per heartbeat with a park and a take-up each time, against 34 µs with parking
/// off, and no memory saved (docs/performance.md#heartbeats). 30 s is a judgement, not a
/// measured break-even: at one park and take-up per 30 s, parking costs a connection about
/// 2 µs of CPU a second, and heartbeats are rarely further apart than that.
const PARK_PAYS_AFTER: Duration = Duration::from_secs(30);

/// What a parked connection keeps.
#[derive(Debug)]
pub(crate) struct Parked {
    pub(crate) record: Arc<ConnRecord>,
    pub(crate) sockets: Resting,
    pub(crate) lifecycle: Lifecycle,
    /// On the adaptive path: the moves made so far.
    pub(crate) moves: Option<u32>,
    pub(crate) admissions: Admissions,
    /// Its meter's last activity when it was found quiet enough to park
    /// ([`quiet_long_enough_to_park`]): how long it was quiet when traffic takes it up
    /// ([`doublings_after_traffic`]). Read again then, a spliced connection's would be the
    /// arrival of the very bytes that woke it (the verdict stamps every skb).
    quiet_since_ns: u64,
}

impl Parked {
    pub(crate) fn new(
        record: Arc<ConnRecord>,
        sockets: Resting,
        lifecycle: Lifecycle,
        moves: Option<u32>,
        admissions: Admissions,
        quiet_since_ns: u64,
    ) -> Box<Parked> {
        Box::new(Parked {
            record,
            sockets,
            lifecycle,
            moves,
            admissions,
            quiet_since_ns,
        })
    }

    /// Its sockets as they go to a successor process ([`Resting::into_moved`]), and the
    /// rest of it.
    pub(crate) fn into_moved(self) -> (Moved, Arc<ConnRecord>, Lifecycle, Admissions) {
        let moved = self.sockets.into_moved(self.moves);
        (moved, self.record, self.lifecycle, self.admissions)
    }

    /// Each socket, and whether it is watched for reads: always on the relay; on a spliced
    /// connection only for a direction the verdict passes up, or while this process does
    /// not read the kernel's events ([`Offload::watches_reads`]), since a redirecting
    /// socket turns readable after every skb it redirected, and its splice's events say
    /// what there is to read (`docs/kernel-notes.md#read-wake-ups`).
    ///
    /// [`Offload::watches_reads`]: crate::datapath::kernel::Offload::watches_reads
    fn watched(&self) -> [(BorrowedFd<'_>, bool); 2] {
        let Resting {
            offload,
            client,
            backend,
        } = &self.sockets;
        let reads = |side: Side| {
            offload
                .as_deref()
                .is_none_or(|offload| offload.watches_reads(Direction::from_source(side)))
        };
        [
            (client.as_fd(), reads(Side::Client)),
            (backend.as_fd(), reads(Side::Backend)),
        ]
    }
}

/// The parked connections, and when each must wake for its lifecycle.
#[derive(Debug)]
struct Lot {
    /// Boxed: a map's slots are a power of two above its length, each as large as its
    /// value, and a parked connection is 192 bytes.
    parked: HashMap<u64, Box<Parked>>,
    deadlines: BTreeSet<(Instant, u64)>,
    /// Until the proxy stops: then nothing parks, and the driver ends once the lot is empty.
    open: bool,
    /// Whether a connection parked since memory was last given back: its task's memory
    /// is free.
    parked_since_release: bool,
}

/// Connections whose nudge was raised while they were parked.
#[derive(Debug, Default)]
struct Woken {
    ids: Mutex<Vec<u64>>,
    driver: Notify,
}

impl Woken {
    fn push(&self, id: u64) {
        self.ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(id);
        self.driver.notify_one();
    }

    fn take(&self) -> Vec<u64> {
        std::mem::take(&mut *self.ids.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A parked connection's nudge wakes this instead of a task.
struct ParkedWake {
    id: u64,
    woken: Arc<Woken>,
}

impl Wake for ParkedWake {
    fn wake(self: Arc<Self>) {
        self.woken.push(self.id);
    }
}

#[derive(Debug)]
pub(crate) struct Parking {
    epoll: Arc<Epoll>,
    lot: Mutex<Lot>,
    woken: Arc<Woken>,
}

impl Parking {
    /// Closed until [`run`] drives it.
    pub(crate) fn new() -> io::Result<Parking> {
        Ok(Parking {
            epoll: Arc::new(Epoll::new()?),
            lot: Mutex::new(Lot {
                parked: HashMap::new(),
                deadlines: BTreeSet::new(),
                open: false,
                parked_since_release: false,
            }),
            woken: Arc::default(),
        })
    }

    /// Parks `parked`, or gives it back: the proxy is stopping, or its sockets cannot be
    /// watched (then the connection is never asked again).
    pub(crate) fn park(&self, parked: Box<Parked>) -> Result<(), Box<Parked>> {
        let id = parked.record.id;
        let record = Arc::clone(&parked.record);
        let deadline = parked.lifecycle.deadline();
        // Under the lock to the end: the driver cannot take the connection up (and its
        // new task register its own waker) before the nudge's waker is this one.
        let mut lot = self.lock();
        if !lot.open {
            return Err(parked);
        }
        if let Err(e) = self.watch(&parked, id) {
            debug!(error = %e, "cannot park: its sockets cannot be watched");
            record.set_park_state(ParkState::Never);
            return Err(parked);
        }
        let earliest = lot.deadlines.first().map(|(at, _)| *at);
        if let Some(at) = deadline {
            lot.deadlines.insert((at, id));
            if earliest.is_none_or(|earliest| at < earliest) {
                // The driver sleeps until a later deadline.
                self.woken.driver.notify_one();
            }
        }
        // A nudge or a splice's event from now on takes the connection up; one raised
        // before it parked (a stop or an upgrade that came meanwhile, bytes passed up)
        // does so at once. The nudge stays raised for the driver's look (`stays_parked`)
        // and the task that takes the connection up.
        let waker = self.waker(id);
        let mut cx = Context::from_waker(&waker);
        let nudged = record.nudge.watch(&mut cx);
        let event = (parked.sockets.offload.as_deref())
            .is_some_and(|offload| offload.poll_event_waiting(&mut cx).is_ready());
        lot.parked.insert(id, parked);
        lot.parked_since_release = true;
        record.set_park_state(ParkState::Parked);
        if nudged || event {
            self.woken.push(id);
        }
        Ok(())
    }

    /// Whether the connection `id`, woken through its waker, stays parked: a splice not
    /// nudged, for which [`Offload::stays_parked`](crate::datapath::kernel::Offload::stays_parked)
    /// says so. Everything else is taken up.
    fn stays_parked(&self, id: u64) -> bool {
        let mut lot = self.lock();
        let Some(parked) = lot.parked.get_mut(&id) else {
            return false;
        };
        let Parked {
            record, sockets, ..
        } = &mut **parked;
        let Some(offload) = sockets.offload.as_deref_mut() else {
            return false;
        };
        let waker = self.waker(id);
        let mut cx = Context::from_waker(&waker);
        !record.nudge.watch(&mut cx) && offload.stays_parked(&mut cx)
    }

    /// What a parked connection's nudge and events wake.
    fn waker(&self, id: u64) -> Waker {
        Waker::from(Arc::new(ParkedWake {
            id,
            woken: Arc::clone(&self.woken),
        }))
    }

    fn watch(&self, parked: &Parked, id: u64) -> io::Result<()> {
        let [(client, client_reads), (backend, backend_reads)] = parked.watched();
        self.epoll.add(client, id, client_reads)?;
        self.epoll.add(backend, id, backend_reads).inspect_err(|_| {
            let _ = self.epoll.remove(client);
        })
    }

    /// Watches every parked splice's sockets as it asks now ([`Parked::watched`]): once this
    /// process reads the kernel's events, those parked before (adopted from a predecessor)
    /// stop being watched for reads, which every skb the verdict redirects would wake.
    /// One that fired meanwhile is armed again; its take-up, under way, removes it.
    pub(crate) fn watch_splices_again(&self) {
        let lot = self.lock();
        for (id, parked) in &lot.parked {
            if parked.sockets.offload.is_none() {
                continue;
            }
            for (socket, reads) in parked.watched() {
                if let Err(e) = self.epoll.modify(socket, *id, reads) {
                    warn!(id, error = %e, "a parked splice's socket could not be watched again");
                }
            }
        }
    }

    /// Takes the connection `id` out, if it is still parked.
    fn take(&self, id: u64) -> Option<Box<Parked>> {
        let parked = {
            let mut lot = self.lock();
            let parked = lot.parked.remove(&id)?;
            if let Some(at) = parked.lifecycle.deadline() {
                lot.deadlines.remove(&(at, id));
            }
            parked
        };
        for (socket, _) in parked.watched() {
            // Cannot fail for a socket this instance watches: logged should it anyway.
            if let Err(e) = self.epoll.remove(socket) {
                warn!(id, error = %e, "a parked socket could not be unwatched");
            }
        }
        // The task that takes it up registers its own.
        parked.record.nudge.forget_waker();
        parked.record.set_park_state(ParkState::Awake);
        Some(parked)
    }

    /// Parked connections whose lifecycle deadline is `now` or earlier.
    fn due(&self, now: Instant) -> Vec<u64> {
        let lot = self.lock();
        lot.deadlines
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| *id)
            .collect()
    }

    /// Gives the memory of the tasks of connections parked since the last time back to
    /// the system, unless that was less than [`MIN_RELEASE_EVERY`] ago (then a later
    /// sweep does).
    fn release_freed(&self, last: &mut Option<Instant>, now: Instant) {
        if last.is_some_and(|at| now.duration_since(at) < MIN_RELEASE_EVERY)
            || !std::mem::take(&mut self.lock().parked_since_release)
        {
            return;
        }
        *last = Some(now);
        if let Err(e) = crate::memory::release_freed() {
            debug!(error = %e, "freed memory could not be given back");
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.lock().deadlines.first().map(|(at, _)| *at)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lot> {
        // Every change is a single insert or remove: a poisoned lock is still sound.
        self.lot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens the lot while running; once stopping, closes it and says whether it is
    /// empty, so that the driver may end.
    fn follow(&self, stopping: bool) -> bool {
        let mut lot = self.lock();
        lot.open = !stopping;
        stopping && lot.parked.is_empty()
    }
}

/// Whether the sweep should ask `record` to park: awake (not ruled out: TLS this proxy
/// holds is `Never`), relaying, both directions open, and quiet for its park delay (a
/// spliced connection's meter reads the kernel's counters: two map lookups). The
/// connection itself decides (`connection::drive`): this rule only spares the others a
/// wake-up.
fn worth_parking(record: &ConnRecord, now_ns: u64, after: Duration) -> bool {
    record.park_state() == ParkState::Awake
        && record.data_path().is_some()
        && !record.half_open.load(std::sync::atomic::Ordering::Relaxed)
        && quiet_long_enough_to_park(record, now_ns, after).is_some()
}

/// The last activity of `record`'s connection, if it has been quiet since for its park
/// delay: `after` (`park_idle_after`), doubled for each time traffic took it up soon after
/// it went quiet ([`doublings_after_traffic`]).
pub(crate) fn quiet_long_enough_to_park(
    record: &ConnRecord,
    now_ns: u64,
    after: Duration,
) -> Option<u64> {
    quiet_since(record, now_ns, park_delay(after, record.park_doublings()))
}

/// `after` doubled `doublings` times, and at most twice [`PARK_PAYS_AFTER`] (or `after`
/// itself, if longer): doublings earned under a short `park_idle_after` do not multiply a
/// longer one a reload sets.
fn park_delay(after: Duration, doublings: u8) -> Duration {
    let grown = after.saturating_mul(1 << doublings.min(MAX_DOUBLINGS));
    grown.min(after.max(2 * PARK_PAYS_AFTER))
}

/// Bounds the shift in [`park_delay`]. The delay stops growing long before: the shortest
/// `park_idle_after` reaches [`PARK_PAYS_AFTER`] in 9 doublings.
const MAX_DOUBLINGS: u8 = 16;

/// A parked connection's park doublings once traffic took it up `quiet` after it went
/// quiet: one more if that was within [`PARK_PAYS_AFTER`] and its delay is still shorter
/// than that; none once it stayed quiet that long (it had gone quiet for real).
fn doublings_after_traffic(doublings: u8, after: Duration, quiet: Duration) -> u8 {
    if quiet >= PARK_PAYS_AFTER {
        0
    } else if park_delay(after, doublings) < PARK_PAYS_AFTER {
        doublings.saturating_add(1)
    } else {
        doublings
    }
}

/// Asks up to [`MAX_ASKED_PER_SWEEP`] connections worth parking to park, in id order from
/// the first after `cursor`, round the table, and moves `cursor` to the last one asked;
/// returns how many. Outside the table's lock: a spliced connection's activity is read
/// from the kernel's maps.
fn ask_to_park(table: &ConnTable, now_ns: u64, after: Duration, cursor: &mut u64) -> usize {
    let mut records = table.records();
    records.sort_unstable_by_key(|record| record.id);
    let start = records.partition_point(|record| record.id <= *cursor);
    let (before, from) = records.split_at(start);
    let mut asked = 0;
    for record in from.iter().chain(before) {
        if asked == MAX_ASKED_PER_SWEEP {
            break;
        }
        if worth_parking(record, now_ns, after)
            && record.switch_park_state(ParkState::Awake, ParkState::Asked)
        {
            record.nudge.raise();
            *cursor = record.id;
            asked += 1;
        }
    }
    asked
}

/// Whether `record`'s connection moved no byte for `after` up to `now_ns`.
pub(crate) fn quiet_for(record: &ConnRecord, now_ns: u64, after: Duration) -> bool {
    quiet_since(record, now_ns, after).is_some()
}

/// The last activity of `record`'s connection (a spliced one's meter reads the kernel's
/// counters: two map lookups), if it was at least `after` before `now_ns`.
fn quiet_since(record: &ConnRecord, now_ns: u64, after: Duration) -> Option<u64> {
    let after = u64::try_from(after.as_nanos()).unwrap_or(u64::MAX);
    let last = record.meter.last_activity_ns();
    (now_ns.saturating_sub(last) >= after).then_some(last)
}

/// How often to look for connections quiet for `after`: twice within it, at most
/// [`MAX_SWEEP_EVERY`] apart.
fn sweep_period(after: Duration) -> Duration {
    (after / 2).min(MAX_SWEEP_EVERY)
}

/// Drives the parked connections until the proxy stops and none is left: takes up those
/// whose socket is ready, whose deadline came or that were nudged, and nudges quiet
/// connections to park. Without it nothing parks.
pub(crate) async fn run(shared: Arc<Shared>) {
    let Some(parking) = &shared.parking else {
        return;
    };
    let ready = match parking.epoll.register() {
        Ok(ready) => ready,
        Err(e) => {
            warn!(error = %error_chain(&e), "idle connections keep their tasks: the parking epoll cannot be watched");
            return;
        }
    };
    let mut stop = shared.stop.clone();
    let mut next_sweep = tokio::time::Instant::now() + MAX_SWEEP_EVERY;
    let mut released_at = None;
    let mut asked_up_to = 0;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; READY_BATCH];
    loop {
        // Whatever woke the driver, the nudged connections are taken up first (and
        // splices woken by events, unless only lost events woke them).
        for id in parking.woken.take() {
            if !parking.stays_parked(id) {
                take_up(&shared, parking, id);
            }
        }
        let stopping = *stop.borrow_and_update() >= Stop::Drain;
        if parking.follow(stopping) {
            break;
        }
        let deadline = parking.next_deadline().map(tokio::time::Instant::from_std);
        tokio::select! {
            guard = ready.readable() => {
                // Err: the runtime is shutting down.
                let Ok(mut guard) = guard else {
                    break;
                };
                #[cfg(feature = "test-hooks")]
                test_hooks::READY_WAKES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match parking.epoll.ready(&mut events) {
                    Ok(ids) if ids.is_empty() => guard.clear_ready(),
                    Ok(ids) => ids
                        .into_iter()
                        .for_each(|id| take_up_for_traffic(&shared, parking, id)),
                    Err(e) => {
                        warn!(error = %e, "reading the parking epoll failed");
                        guard.clear_ready();
                    }
                }
            }
            // Nudged connections (taken up at the top), or an earlier deadline.
            () = parking.woken.driver.notified() => {}
            () = crate::connection::sleep_until_some(deadline) => {
                for id in parking.due(Instant::now()) {
                    take_up(&shared, parking, id);
                }
            }
            () = tokio::time::sleep_until(next_sweep), if !stopping => {
                // Read each time: a reload may change it.
                let after = shared.generation().config.proxy.park_idle_after;
                // During a handoff a connection asked to park would go over instead, out
                // of its turn (`upgrade/order.rs`).
                let handing_off = *shared.upgrade.borrow() == Phase::HandingOff;
                if let Some(after) = after.filter(|_| !handing_off) {
                    ask_to_park(&shared.table, monotonic_ns(), after, &mut asked_up_to);
                }
                // The tasks of the connections parked since are gone (a burst's can
                // be megabytes), and a quiet proxy allocates nothing that would purge them.
                parking.release_freed(&mut released_at, Instant::now());
                let period = after.map_or(MAX_SWEEP_EVERY, sweep_period);
                next_sweep = tokio::time::Instant::now() + period;
            }
            // Err: the proxy is gone, and the stage it left is the last one.
            _ = stop.changed(), if !stopping => {}
        }
    }
}

fn take_up(shared: &Arc<Shared>, parking: &Parking, id: u64) {
    // None: taken up already (a nudge and a readable socket both asked).
    if let Some(parked) = parking.take(id) {
        crate::connection::take_up(shared, *parked);
    }
}

/// Takes up a connection one of whose sockets turned ready (bytes, or a FIN or an error),
/// and lengthens or resets its park delay by how long it was quiet.
fn take_up_for_traffic(shared: &Arc<Shared>, parking: &Parking, id: u64) {
    let Some(parked) = parking.take(id) else {
        return;
    };
    if let Some(after) = shared.generation().config.proxy.park_idle_after {
        let record = &parked.record;
        let quiet = monotonic_ns().saturating_sub(parked.quiet_since_ns);
        record.set_park_doublings(doublings_after_traffic(
            record.park_doublings(),
            after,
            Duration::from_nanos(quiet),
        ));
    }
    crate::connection::take_up(shared, *parked);
}

/// Test builds only (`--features test-hooks`): what the driver does, seen from outside.
#[cfg(feature = "test-hooks")]
pub mod test_hooks {
    use std::sync::atomic::{AtomicU64, Ordering};

    pub(super) static READY_WAKES: AtomicU64 = AtomicU64::new(0);

    /// How often a parking lot's epoll instance woke its driver, in every proxy of the
    /// process: for a test binary of its own.
    pub fn ready_wakes() -> u64 {
        READY_WAKES.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::vocab::DataPathKind;

    /// Heartbeats every 5 s with the default 1 s: the delay grows 1, 2, 4, 8 s over three
    /// take-ups, and then the connection keeps its task. A quiet spell longer than
    /// `PARK_PAYS_AFTER` brings the delay back to `park_idle_after`.
    #[test]
    fn a_connection_taken_up_soon_after_it_went_quiet_parks_later_next_time() {
        let after = Duration::from_secs(1);
        let every = Duration::from_secs(5);
        assert_eq!(park_delay(after, 0), after);
        let mut doublings = 0;
        let mut delays = vec![park_delay(after, doublings)];
        while park_delay(after, doublings) < every {
            doublings = doublings_after_traffic(doublings, after, every);
            delays.push(park_delay(after, doublings));
        }
        let secs: Vec<u64> = delays.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8]);
        assert_eq!(
            doublings_after_traffic(doublings, after, PARK_PAYS_AFTER),
            0
        );

        // It stops growing once it reaches PARK_PAYS_AFTER, whatever the base.
        let shortest = Duration::from_millis(100);
        let mut doublings = 0;
        for _ in 0..40 {
            doublings = doublings_after_traffic(doublings, shortest, Duration::from_secs(1));
        }
        let longest = park_delay(shortest, doublings);
        assert!(
            longest >= PARK_PAYS_AFTER && longest < 2 * PARK_PAYS_AFTER,
            "{longest:?}"
        );
        // A base above it never grows.
        let long = 2 * PARK_PAYS_AFTER;
        assert_eq!(doublings_after_traffic(0, long, Duration::from_secs(1)), 0);
        // Doublings earned under a short delay do not multiply a longer one a reload sets.
        assert_eq!(park_delay(Duration::from_secs(30), 5), 2 * PARK_PAYS_AFTER);
        assert_eq!(
            park_delay(Duration::from_secs(600), 5),
            Duration::from_secs(600)
        );
    }

    /// Every parked connection keeps one, boxed: within jemalloc's 192-byte size class
    /// (docs/performance.md#idle-connections).
    #[test]
    fn a_parked_connection_fits_in_192_bytes() {
        let size = std::mem::size_of::<Parked>();
        assert!(size <= 192, "a parked connection takes {size} bytes");
    }

    #[test]
    fn the_park_delay_of_a_record_is_its_own() {
        let table = ConnTable::default();
        let record = table.insert("127.0.0.1:1".parse().expect("an address"));
        let after = Duration::from_secs(1);
        let quiet = record.meter.last_activity_ns() + 3 * after.as_nanos() as u64;
        let last = record.meter.last_activity_ns();
        assert_eq!(quiet_long_enough_to_park(&record, quiet, after), Some(last));
        record.set_park_doublings(2);
        assert_eq!(
            quiet_long_enough_to_park(&record, quiet, after),
            None,
            "4 s now"
        );
        let later = quiet + after.as_nanos() as u64;
        assert_eq!(quiet_long_enough_to_park(&record, later, after), Some(last));
    }

    #[test]
    fn the_sweep_asks_only_quiet_awake_routed_connections() {
        let table = ConnTable::default();
        let record = table.insert("127.0.0.1:1".parse().expect("an address"));
        let after = Duration::from_secs(1);
        let start = record.meter.last_activity_ns();
        let quiet = start + after.as_nanos() as u64;
        let worth = |now_ns| worth_parking(&record, now_ns, after);
        // Not routed yet: no data path.
        assert!(!worth(quiet));
        record.set_data_path(DataPathKind::Userspace);
        assert!(!worth(quiet - 1), "not quiet for long");
        assert!(worth(quiet));
        for (state, asked) in [
            (ParkState::Asked, false),
            (ParkState::Parked, false),
            // TLS held here, or a handoff that failed.
            (ParkState::Never, false),
            (ParkState::Awake, true),
        ] {
            record.set_park_state(state);
            assert_eq!(worth(quiet), asked, "{state:?}");
        }
        record.half_open.store(true, Ordering::Relaxed);
        assert!(!worth(quiet), "half open");
        record.half_open.store(false, Ordering::Relaxed);
        // Spliced: the kernel's counters are not attached here, so the meter is the
        // record's own.
        record.set_data_path(DataPathKind::Ebpf);
        assert!(worth(quiet), "spliced");
    }

    #[test]
    fn a_sweep_asks_a_bounded_number_and_the_next_the_rest_first() {
        let table = ConnTable::default();
        let after = Duration::from_secs(1);
        let mut records = Vec::new();
        let mut quiet = 0;
        for _ in 0..MAX_ASKED_PER_SWEEP + 10 {
            let record = table.insert("127.0.0.1:1".parse().expect("an address"));
            record.set_data_path(DataPathKind::Userspace);
            quiet = quiet.max(record.meter.last_activity_ns() + after.as_nanos() as u64);
            records.push(record);
        }
        let mut cursor = 0;
        let asked = |cursor: &mut u64| ask_to_park(&table, quiet, after, cursor);
        assert_eq!(asked(&mut cursor), MAX_ASKED_PER_SWEEP);
        // Those asked declined (a relay holding bytes, say): awake again.
        let declined = records
            .iter()
            .filter(|record| record.park_state() == ParkState::Asked)
            .inspect(|record| record.set_park_state(ParkState::Awake))
            .count();
        assert_eq!(declined, MAX_ASKED_PER_SWEEP);
        let rest = |record: &&Arc<ConnRecord>| record.park_state() == ParkState::Awake;
        assert_eq!(
            asked(&mut cursor),
            MAX_ASKED_PER_SWEEP,
            "the rest, then round"
        );
        assert!(
            records[MAX_ASKED_PER_SWEEP..]
                .iter()
                .all(|record| record.park_state() == ParkState::Asked),
            "the ones not asked before were asked first"
        );
        assert_eq!(
            records.iter().filter(rest).count(),
            10,
            "and as many of the first as the bound allows"
        );
    }

    /// A nudge raised before the connection parked (a stop, an upgrade) stays raised for
    /// the driver's look, which would otherwise keep a splice parked through it.
    #[test]
    fn a_nudge_seen_as_a_connection_parks_stays_raised() {
        let parking = Parking::new().expect("an epoll instance");
        assert!(!parking.follow(false), "open");
        let table = ConnTable::default();
        let record = table.insert("127.0.0.1:1".parse().expect("an address"));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let client = std::net::TcpStream::connect(listener.local_addr().expect("its address"))
            .expect("a connection");
        let (backend, _) = listener.accept().expect("accepted");
        record.nudge.raise();
        let parked = Parked::new(
            Arc::clone(&record),
            Resting {
                offload: None,
                client: client.into(),
                backend: backend.into(),
            },
            Lifecycle::new(Arc::default(), Instant::now()),
            None,
            Admissions::default(),
            0,
        );
        assert!(parking.park(parked).is_ok(), "parked");
        assert_eq!(parking.woken.take(), vec![record.id], "to be taken up");
        let mut cx = Context::from_waker(Waker::noop());
        assert!(record.nudge.poll_nudged(&mut cx).is_ready(), "still raised");
    }

    /// The events mask the lot's epoll instance holds for the socket `fd`, from
    /// `/proc/self/fdinfo` (`tfd: <fd> events: <hex mask>`).
    fn watched_mask(parking: &Parking, fd: std::os::fd::RawFd) -> u32 {
        use std::os::fd::AsRawFd;

        let fdinfo =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", parking.epoll.as_raw_fd()))
                .expect("the epoll instance's fdinfo");
        fdinfo
            .lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                (fields.next() == Some("tfd:")
                    && fields.next() == Some(fd.to_string().as_str())
                    && fields.next() == Some("events:"))
                .then(|| {
                    fields
                        .next()
                        .and_then(|mask| u32::from_str_radix(mask, 16).ok())
                })
                .flatten()
            })
            .expect("the socket is watched")
    }

    /// A splice parked before this process reads the kernel's events (a successor's,
    /// adopted) is watched for reads; once the events are read, the lot watches it as any
    /// parked splice, for a FIN or an error only, so that redirected skbs wake nothing.
    #[tokio::test]
    async fn splices_parked_before_events_are_read_stop_being_watched_for_reads() {
        use crate::datapath::kernel::tests::{load_or_skip, proxied_pair, small};
        use crate::datapath::kernel::Offload;

        let Some(kernel) = load_or_skip(small(), None) else {
            return;
        };
        let parking = Parking::new().expect("an epoll instance");
        assert!(!parking.follow(false), "open");
        let [_app_client, client, backend, _app_backend] = proxied_pair();
        let table = ConnTable::default();
        let record = table.insert("127.0.0.1:1".parse().expect("an address"));
        let mut offload = Offload::new(
            &kernel,
            client.as_fd(),
            backend.as_fd(),
            Arc::clone(&record.meter) as _,
        )
        .expect("spliced");
        assert!(offload.settle_adoption(), "quiet");
        let parked = Parked::new(
            record,
            Resting {
                offload: Some(Box::new(offload)),
                client: client.into(),
                backend: backend.into(),
            },
            Lifecycle::new(Arc::default(), Instant::now()),
            None,
            Admissions::default(),
            0,
        );
        let sockets = parked
            .watched()
            .map(|(socket, _)| std::os::fd::AsRawFd::as_raw_fd(&socket));
        assert!(parking.park(parked).is_ok(), "parked");
        const EPOLLIN: u32 = libc::EPOLLIN as u32;
        for fd in sockets {
            let mask = watched_mask(&parking, fd);
            assert_ne!(mask & EPOLLIN, 0, "no events read yet: watched for reads");
        }
        kernel.start_events().expect("event reader");
        parking.watch_splices_again();
        for fd in sockets {
            let mask = watched_mask(&parking, fd);
            assert_eq!(mask & EPOLLIN, 0, "events read: a FIN or an error only");
            assert_ne!(mask & libc::EPOLLRDHUP as u32, 0, "a FIN still wakes it");
        }
    }

    #[test]
    fn the_sweep_looks_twice_within_the_delay_and_at_least_every_half_second() {
        assert_eq!(
            sweep_period(Duration::from_millis(100)),
            Duration::from_millis(50)
        );
        assert_eq!(sweep_period(Duration::from_secs(1)), MAX_SWEEP_EVERY);
        assert_eq!(sweep_period(Duration::from_secs(3600)), MAX_SWEEP_EVERY);
    }
}
