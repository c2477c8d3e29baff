//! The order connections go over in. A connection waits from its last event here to its
//! first in the successor, and the connections go over one at a time, so each one sent
//! adds to the wait of every one queued behind it: with ten thousand connections, the last
//! waits about a second. An idle connection does not notice; a stream does. So the
//! connections that moved a byte within [`BUSY_WITHIN`] are asked first, when nothing is
//! ahead of them, and the quiet ones (parked ones among them) once the busy ones have gone
//! over and the successor took every one. Meanwhile the quiet ones wait here: one that
//! wakes goes over at once, and nothing is asked to park
//! (docs/upgrade.md#the-order-connections-go-over-in).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::park::quiet_for;
use crate::table::{ConnRecord, ConnTable, ParkState};

/// A connection that moved a byte within this long is busy: it goes over first.
const BUSY_WITHIN: Duration = Duration::from_secs(1);

/// The connections of a handoff in their order: the busy ones asked and not gone yet,
/// and the quiet ones waiting for their turn.
#[derive(Debug)]
pub(super) struct Order {
    quiet: Vec<Arc<ConnRecord>>,
    /// The busy connections asked to go over that have not yet: established ones that
    /// can move (one still in its handshake moves once set up, and is not waited for).
    busy: Vec<Arc<ConnRecord>>,
    /// Their turn comes by then at the latest, whatever is still on its way.
    until: Instant,
}

impl Order {
    /// Asks every busy connection in `table` to go over, and keeps the quiet ones for
    /// later; their turn comes by `until` at the latest.
    pub(super) fn busy_first(table: &ConnTable, now_ns: u64, until: Instant) -> Order {
        // Outside the table's lock: the activity of a spliced connection is read from
        // the kernel's maps.
        let (mut busy, quiet): (Vec<_>, Vec<_>) = table
            .records()
            .into_iter()
            .partition(|record| is_busy(record, now_ns));
        busy.iter().for_each(|record| record.nudge.raise());
        busy.retain(|record| record.data_path().is_some());
        Order { quiet, busy, until }
    }

    /// Looks whether the quiet connections' turn came, and asks them to go over if so:
    /// `queued` says whether a connection waits to be sent, `unanswered` how many were
    /// sent and not yet taken by the successor. Returns how many were asked now.
    pub(super) fn look(&mut self, table: &ConnTable, queued: bool, unanswered: usize) -> usize {
        if self.quiet.is_empty() {
            return 0;
        }
        // One found to stay here (TLS this proxy holds) never goes.
        self.busy
            .retain(|record| !record.stays.load(Ordering::Relaxed));
        table.keep_present(&mut self.busy);
        let settled = self.busy.is_empty() && !queued && unanswered == 0;
        if !turn_came(settled, Instant::now(), self.until) {
            return 0;
        }
        self.busy.clear();
        let asked = self.quiet.len();
        // A record gone from the table meanwhile: its nudge reaches nobody.
        self.quiet.drain(..).for_each(|record| record.nudge.raise());
        asked
    }
}

/// Whether `record`'s connection counts as busy at `now_ns`: not parked, and a byte moved
/// within [`BUSY_WITHIN`]. A parked splice may be streaming through the kernel; it goes
/// with the quiet ones, and the kernel keeps moving its bytes meanwhile.
fn is_busy(record: &ConnRecord, now_ns: u64) -> bool {
    record.park_state() != ParkState::Parked && !quiet_for(record, now_ns, BUSY_WITHIN)
}

/// The quiet connections' turn: once the busy ones have gone over (every one gone from the
/// table, none waiting to be sent, the successor took every one sent), or at `until`.
fn turn_came(settled: bool, now: Instant, until: Instant) -> bool {
    settled || now >= until
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Waker};

    use super::*;
    use crate::datapath::clock::monotonic_ns;
    use crate::vocab::{DataPathKind, Direction};

    fn record(table: &ConnTable, port: u16) -> Arc<ConnRecord> {
        let record = table.insert(format!("127.0.0.1:{port}").parse().expect("an address"));
        record.set_data_path(DataPathKind::Userspace);
        record
    }

    fn nudged(record: &ConnRecord) -> bool {
        record
            .nudge
            .poll_nudged(&mut Context::from_waker(Waker::noop()))
            .is_ready()
    }

    #[test]
    fn busy_connections_are_asked_first_and_quiet_ones_once_they_are_gone() {
        let table = ConnTable::default();
        let quiet = record(&table, 1);
        let parked = record(&table, 2);
        parked.set_park_state(ParkState::Parked);
        let created_ns = quiet
            .meter
            .last_activity_ns()
            .max(parked.meter.last_activity_ns());
        // Looked at `BUSY_WITHIN` after those two were created, with a byte moved on the
        // third after that and on a fourth still in its handshake (no data path yet).
        let busy = record(&table, 3);
        let handshaking = table.insert("127.0.0.1:4".parse().expect("an address"));
        while monotonic_ns() <= created_ns {}
        busy.meter.record(Direction::ClientToBackend, 1);
        handshaking.meter.record(Direction::ClientToBackend, 1);
        let now_ns = created_ns + BUSY_WITHIN.as_nanos() as u64;
        // A deadline far off: only the settling may start the quiet ones' turn here.
        let far = Instant::now() + Duration::from_secs(3600);
        let mut order = Order::busy_first(&table, now_ns, far);
        assert!(nudged(&busy) && nudged(&handshaking));
        assert!(
            !nudged(&quiet) && !nudged(&parked),
            "quiet ones are asked later"
        );
        assert_eq!(
            order.look(&table, false, 0),
            0,
            "the busy one is still here"
        );
        // It goes over: out of the table, sent, answered. The one in its handshake is not
        // waited for.
        table.remove(busy.id);
        assert_eq!(order.look(&table, true, 0), 0, "one still queued");
        assert_eq!(order.look(&table, false, 1), 0, "one not taken yet");
        assert_eq!(
            order.look(&table, false, 0),
            2,
            "settled: the quiet ones' turn"
        );
        assert!(nudged(&quiet) && nudged(&parked));
        assert_eq!(order.look(&table, false, 0), 0, "asked once");
    }

    #[test]
    fn the_quiet_ones_turn_comes_by_the_deadline_whatever_is_on_its_way() {
        let now = Instant::now();
        assert!(!turn_came(false, now, now + BUSY_WITHIN));
        assert!(turn_came(false, now + BUSY_WITHIN, now + BUSY_WITHIN));
        assert!(turn_came(true, now, now + BUSY_WITHIN));
    }
}
