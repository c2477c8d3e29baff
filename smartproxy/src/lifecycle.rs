//! The connection lifecycle: one pure state machine that every data path feeds.
//!
//! It performs no I/O: no sockets, no clock reads, no runtime. A data path reports what
//! it saw ([`Event`]) together with the current time, and carries out the [`Action`]s it
//! gets back. The single timer a connection needs is derived: [`Lifecycle::deadline`].
//!
//! Each direction (client->backend, backend->client) closes on its own:
//!
//! | event | what happens |
//! | --- | --- |
//! | FIN from one side | `Finish` that side's direction: deliver every byte already read, then `shutdown(SHUT_WR)` the other socket; the other direction keeps flowing |
//! | FIN from both, both directions finished | `Close(Normal)` |
//! | RST from one side | reset the other side once it has acknowledged every byte the proxy already sent it (the resetting side's last bytes among them: an RST discards what a send queue holds), or after `grace_period` if it does not (`AbortWhenDelivered`); `Close(ClientReset / BackendReset)` |
//! | idle for `inactivity_timeout` | `timeout_behavior`: `close` = graceful close (`InactivityTimeout`); `reset` = `InactivityReset` (count it) and re-arm; `ignore` = no timer |
//! | one side sent FIN longer than `parity_check_timeout` ago AND idle longer than `parity_inactivity` (whether or not its direction finished delivering) | graceful close (`ParityCheck`) |
//! | `allow_half_open = false` and a FIN | graceful close with reason `Normal`: in-flight data delivered, FIN both ways |
//! | graceful close | `Finish` every open direction, wait for both peers' FIN, `Close` after `grace_period` at the latest |
//! | proxy shutdown | the connection may finish on its own; `Close(Shutdown)` after `grace_period` |
//! | a second SIGTERM/SIGINT during the shutdown (`Cut`) | as at the end of a grace period, at once, reason `shutdown` |
//! | end of a grace period (graceful close or shutdown) | both directions finished: the sockets close with FIN; otherwise `Abort` both sides (RST), so that no peer takes a cut stream for a complete one |
//!
//! The wait before passing a reset on is bounded by `grace_period`, the time the proxy
//! gives in-flight bytes at every close it starts: a destination that does not read must
//! not keep a reset connection open for longer than a graceful close would be.
//!
//! Invariants (checked by the tests): exactly one `Close` per connection, no action
//! after it, no deadline left after it.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{LifecycleConfig, TimeoutBehavior};
use crate::vocab::{Direction, Reason, Side};

/// What a data path reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `side` sent FIN: every byte before it has been taken from its socket.
    Eof(Side),
    /// The data path carried out `Action::Finish(direction)`: every byte it had taken
    /// from the source reached the destination socket, whose write side is now shut.
    Finished(Direction),
    /// `side` reset the connection (RST, or a hard error on its socket).
    Reset(Side),
    /// The deadline passed. `last_activity`: when bytes last moved either way.
    Timer { last_activity: Instant },
    /// The proxy is shutting down.
    Shutdown,
    /// The proxy must end now: a connection whose two directions both finished closes
    /// normally, any other is aborted on both sides (RST).
    Cut,
}

/// What the data path must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Stop taking new bytes from the source only if it has not sent FIN yet (the bytes
    /// it sends later are read and dropped, so that its FIN is still seen); deliver every
    /// byte already taken, then `shutdown(SHUT_WR)` the destination; report `Finished`.
    Finish(Direction),
    /// Reset this side's connection (RST) now.
    Abort(Side),
    /// The other side reset: reset `side` once it has acknowledged every byte the proxy
    /// sent it, or at `deadline` if it has not by then. An abort discards the send queue,
    /// and what it holds are the last bytes the resetting side sent.
    AbortWhenDelivered { side: Side, deadline: Instant },
    /// An inactivity timeout passed under `timeout_behavior = "reset"`: count it.
    InactivityReset,
    /// The connection is over: close both sockets, record the reason.
    Close(Reason),
}

/// The actions one event yields, in order. Events are rare (FIN, RST, timers), never
/// per packet, so a `Vec` costs nothing worth saving.
pub type Actions = Vec<Action>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Flow<T = Instant> {
    Open,
    /// `Finish` was asked for; the data path has not reported `Finished` yet.
    Finishing,
    Finished {
        at: T,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Phase<T = Instant> {
    Relaying,
    /// The proxy is shutting down; the connection is closed at `deadline`.
    ShuttingDown {
        deadline: T,
    },
    /// A graceful close for `reason` is under way; destroyed at `deadline` at the latest.
    Closing {
        reason: Reason,
        deadline: T,
    },
    Closed(Reason),
}

impl<T: Copy> Flow<T> {
    fn map<U>(self, f: impl Fn(T) -> U) -> Flow<U> {
        match self {
            Flow::Open => Flow::Open,
            Flow::Finishing => Flow::Finishing,
            Flow::Finished { at } => Flow::Finished { at: f(at) },
        }
    }
}

impl<T: Copy> Phase<T> {
    fn map<U>(self, f: impl Fn(T) -> U) -> Phase<U> {
        match self {
            Phase::Relaying => Phase::Relaying,
            Phase::ShuttingDown { deadline } => Phase::ShuttingDown {
                deadline: f(deadline),
            },
            Phase::Closing { reason, deadline } => Phase::Closing {
                reason,
                deadline: f(deadline),
            },
            Phase::Closed(reason) => Phase::Closed(reason),
        }
    }
}

/// A lifecycle as a successor process takes it over (`upgrade`): the whole state, with
/// every instant as CLOCK_MONOTONIC nanoseconds, the clock both processes share, so that
/// its timers keep their deadlines. The configuration moves with it: a connection keeps
/// the settings it was accepted under, as across a reload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LifecycleRecord {
    config: LifecycleConfig,
    flows: [Flow<u64>; 2],
    eof_at: [Option<u64>; 2],
    phase: Phase<u64>,
    last_activity: u64,
    idle_since: u64,
}

/// The lifecycle of one routed connection.
#[derive(Debug)]
pub struct Lifecycle {
    /// Shared with the route: a parked connection keeps little more than its lifecycle
    /// (smartproxy/src/park/mod.rs), and the settings are most of it.
    config: Arc<LifecycleConfig>,
    flows: [Flow; 2],
    /// When each side sent FIN, indexed like `Direction` (by source).
    eof_at: [Option<Instant>; 2],
    phase: Phase,
    /// The latest activity the data path reported.
    last_activity: Instant,
    /// Idleness is measured from here: the later of `last_activity` and the last
    /// inactivity timeout that was counted and re-armed.
    idle_since: Instant,
}

impl Lifecycle {
    pub fn new(config: Arc<LifecycleConfig>, now: Instant) -> Self {
        Lifecycle {
            config,
            flows: [Flow::Open; 2],
            eof_at: [None; 2],
            phase: Phase::Relaying,
            last_activity: now,
            idle_since: now,
        }
    }

    /// This lifecycle as a successor takes it over; `ns` gives an instant's CLOCK_MONOTONIC
    /// nanoseconds.
    pub fn record(&self, ns: impl Fn(Instant) -> u64) -> LifecycleRecord {
        LifecycleRecord {
            config: *self.config,
            flows: self.flows.map(|flow| flow.map(&ns)),
            eof_at: self.eof_at.map(|at| at.map(&ns)),
            phase: self.phase.map(&ns),
            last_activity: ns(self.last_activity),
            idle_since: ns(self.idle_since),
        }
    }

    /// The lifecycle a predecessor recorded; `instant` is the inverse of `record`'s `ns`.
    pub fn from_record(record: &LifecycleRecord, instant: impl Fn(u64) -> Instant) -> Self {
        Lifecycle {
            config: Arc::new(record.config),
            flows: record.flows.map(|flow| flow.map(&instant)),
            eof_at: record.eof_at.map(|at| at.map(&instant)),
            phase: record.phase.map(&instant),
            last_activity: instant(record.last_activity),
            idle_since: instant(record.idle_since),
        }
    }

    /// Shares `config` if this lifecycle runs by equal settings: one taken over from a
    /// predecessor ([`Lifecycle::from_record`]) brings its own copy.
    pub fn share_config(&mut self, config: &Arc<LifecycleConfig>) {
        if *self.config == **config {
            self.config = Arc::clone(config);
        }
    }

    /// The closure reason, once the connection is closed.
    pub fn closed(&self) -> Option<Reason> {
        match self.phase {
            Phase::Closed(reason) => Some(reason),
            _ => None,
        }
    }

    /// Exactly one direction has stopped (or is stopping) while the other still flows.
    pub fn is_half_open(&self) -> bool {
        let [a, b] = self.flows;
        matches!(self.phase, Phase::Relaying | Phase::ShuttingDown { .. })
            && ((a == Flow::Open) != (b == Flow::Open))
    }

    /// Relaying, with neither direction stopped nor stopping.
    pub fn is_open_both_ways(&self) -> bool {
        self.phase == Phase::Relaying && self.flows == [Flow::Open; 2]
    }

    /// When the data path must send `Event::Timer`, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        let phase_deadline = match self.phase {
            Phase::Closed(_) => return None,
            Phase::Closing { deadline, .. } => return Some(deadline),
            Phase::ShuttingDown { deadline } => Some(deadline),
            Phase::Relaying => None,
        };
        [
            phase_deadline,
            self.inactivity_deadline(),
            self.parity_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn inactivity_deadline(&self) -> Option<Instant> {
        match self.config.timeout_behavior {
            TimeoutBehavior::Ignore => None,
            TimeoutBehavior::Close | TimeoutBehavior::Reset => {
                Some(self.idle_since + self.config.inactivity_timeout)
            }
        }
    }

    /// Set from the first FIN on, counted from it: also while the direction it ends is
    /// still delivering, which a destination that never reads would make last forever.
    fn parity_deadline(&self) -> Option<Instant> {
        let ended_at = self.eof_at.into_iter().flatten().min()?;
        Some(std::cmp::max(
            ended_at + self.config.parity_check_timeout,
            self.last_activity + self.config.parity_inactivity,
        ))
    }

    /// Feeds one event; returns what the data path must do now.
    pub fn on_event(&mut self, event: Event, now: Instant) -> Actions {
        let mut actions = Actions::new();
        if self.closed().is_some() {
            return actions;
        }
        match event {
            Event::Eof(side) => {
                self.eof_at[Direction::from_source(side).index()].get_or_insert(now);
                self.finish(Direction::from_source(side), &mut actions);
                if !self.config.allow_half_open {
                    self.begin_graceful_close(Reason::Normal, now, &mut actions);
                }
            }
            Event::Finished(direction) => {
                debug_assert_eq!(
                    self.flows[direction.index()],
                    Flow::Finishing,
                    "a data path reported Finished for a direction it was not asked to finish"
                );
                self.flows[direction.index()] = Flow::Finished { at: now };
            }
            Event::Reset(side) => {
                actions.push(Action::AbortWhenDelivered {
                    side: side.peer(),
                    deadline: now + self.config.grace_period,
                });
                let reason = match self.phase {
                    Phase::Closing { reason, .. } => reason,
                    _ => Reason::reset_by(side),
                };
                self.close(reason, &mut actions);
                return actions;
            }
            Event::Timer { last_activity } => self.on_timer(last_activity, now, &mut actions),
            Event::Shutdown => match self.phase {
                Phase::Relaying => {
                    self.phase = Phase::ShuttingDown {
                        deadline: now + self.config.grace_period,
                    }
                }
                Phase::ShuttingDown { .. } | Phase::Closing { .. } | Phase::Closed(_) => {}
            },
            Event::Cut => {
                self.cut(Reason::Shutdown, &mut actions);
                return actions;
            }
        }
        self.settle(now, &mut actions);
        actions
    }

    fn on_timer(&mut self, last_activity: Instant, now: Instant, actions: &mut Actions) {
        self.last_activity = self.last_activity.max(last_activity);
        self.idle_since = self.idle_since.max(self.last_activity);
        if !matches!(self.phase, Phase::Relaying | Phase::ShuttingDown { .. }) {
            return;
        }
        if self.parity_deadline().is_some_and(|at| now >= at) {
            self.begin_graceful_close(Reason::ParityCheck, now, actions);
            return;
        }
        if self.inactivity_deadline().is_some_and(|at| now >= at) {
            match self.config.timeout_behavior {
                TimeoutBehavior::Close => {
                    self.begin_graceful_close(Reason::InactivityTimeout, now, actions)
                }
                TimeoutBehavior::Reset => {
                    self.idle_since = now;
                    actions.push(Action::InactivityReset);
                }
                TimeoutBehavior::Ignore => {}
            }
        }
    }

    fn finish(&mut self, direction: Direction, actions: &mut Actions) {
        if self.flows[direction.index()] == Flow::Open {
            self.flows[direction.index()] = Flow::Finishing;
            actions.push(Action::Finish(direction));
        }
    }

    fn begin_graceful_close(&mut self, reason: Reason, now: Instant, actions: &mut Actions) {
        if let Phase::Closing { .. } | Phase::Closed(_) = self.phase {
            return;
        }
        let deadline = match self.phase {
            Phase::ShuttingDown { deadline } => deadline.min(now + self.config.grace_period),
            _ => now + self.config.grace_period,
        };
        self.phase = Phase::Closing { reason, deadline };
        for direction in Direction::BOTH {
            self.finish(direction, actions);
        }
    }

    /// Decides, from both directions and the phase, whether the connection is over.
    fn settle(&mut self, now: Instant, actions: &mut Actions) {
        let both_finished = self.both_finished();
        let both_eof = self.eof_at.iter().all(Option::is_some);
        match self.phase {
            Phase::Closed(_) => {}
            Phase::Relaying | Phase::ShuttingDown { .. } if both_finished && both_eof => {
                self.close(Reason::Normal, actions)
            }
            Phase::Closing { reason, .. } if both_finished && both_eof => {
                self.close(reason, actions)
            }
            Phase::Closing { reason, deadline } if now >= deadline => self.cut(reason, actions),
            Phase::ShuttingDown { deadline } if now >= deadline => {
                self.cut(Reason::Shutdown, actions)
            }
            Phase::Relaying | Phase::ShuttingDown { .. } | Phase::Closing { .. } => {}
        }
    }

    fn both_finished(&self) -> bool {
        matches!(self.flows, [Flow::Finished { .. }, Flow::Finished { .. }])
    }

    /// Ends the connection before both peers said they were done. It ends with a FIN each
    /// way only if both directions finished, each with the FIN after its last byte. Any
    /// other stream is cut where it stands, and an RST to both sides says so: the proxy
    /// cannot know where a message ends, so an idle stream may be mid-message too.
    fn cut(&mut self, reason: Reason, actions: &mut Actions) {
        if !self.both_finished() {
            actions.extend([Action::Abort(Side::Client), Action::Abort(Side::Backend)]);
        }
        self.close(reason, actions);
    }

    fn close(&mut self, reason: Reason, actions: &mut Actions) {
        self.phase = Phase::Closed(reason);
        actions.push(Action::Close(reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use std::time::Duration;

    const SEC: Duration = Duration::from_secs(1);

    fn config() -> LifecycleConfig {
        LifecycleConfig {
            connect_timeout: 5 * SEC,
            handshake_timeout: 10 * SEC,
            inactivity_timeout: 60 * SEC,
            timeout_behavior: TimeoutBehavior::Close,
            allow_half_open: true,
            parity_check_timeout: 30 * SEC,
            parity_inactivity: 10 * SEC,
            grace_period: 5 * SEC,
            tcp_keepalive: Some(60 * SEC),
        }
    }

    /// A lifecycle plus a clock, so each test reads as a script.
    struct Script {
        lifecycle: Lifecycle,
        start: Instant,
        now: Instant,
    }

    impl Script {
        fn new(config: LifecycleConfig) -> Self {
            let start = Instant::now();
            Script {
                lifecycle: Lifecycle::new(Arc::new(config), start),
                start,
                now: start,
            }
        }

        fn at(&mut self, offset: Duration) -> &mut Self {
            self.now = self.start + offset;
            self
        }

        fn on(&mut self, event: Event) -> Actions {
            self.lifecycle.on_event(event, self.now)
        }

        /// Fires the timer at its deadline; bytes last moved at `last_activity`.
        fn fire(&mut self, last_activity: Duration) -> Actions {
            self.now = self.lifecycle.deadline().expect("a deadline is armed");
            let last_activity = self.start + last_activity;
            self.on(Event::Timer { last_activity })
        }
    }

    use Action::*;
    use Direction::*;
    use Event::*;
    use Side::*;

    #[test]
    fn client_fin_finishes_only_client_to_backend() {
        let mut s = Script::new(config());
        assert_eq!(s.on(Eof(Client)), vec![Finish(ClientToBackend)]);
        assert_eq!(s.on(Finished(ClientToBackend)), vec![]);
        assert!(s.lifecycle.is_half_open());
        assert_eq!(s.lifecycle.closed(), None);
    }

    #[test]
    fn open_both_ways_until_a_fin_or_a_shutdown() {
        let s = Script::new(config());
        assert!(s.lifecycle.is_open_both_ways());
        for event in [Eof(Client), Eof(Backend), Shutdown] {
            let mut s = Script::new(config());
            s.on(event);
            assert!(!s.lifecycle.is_open_both_ways(), "after {event:?}");
        }
    }

    #[test]
    fn backend_fin_finishes_only_backend_to_client() {
        let mut s = Script::new(config());
        assert_eq!(s.on(Eof(Backend)), vec![Finish(BackendToClient)]);
        assert_eq!(s.on(Finished(BackendToClient)), vec![]);
        assert!(s.lifecycle.is_half_open());
    }

    #[test]
    fn fin_from_both_closes_normal_once_both_directions_finished() {
        let mut s = Script::new(config());
        s.on(Eof(Client));
        s.on(Eof(Backend));
        assert_eq!(s.on(Finished(BackendToClient)), vec![]);
        assert_eq!(s.on(Finished(ClientToBackend)), vec![Close(Reason::Normal)]);
        assert_eq!(s.lifecycle.deadline(), None);
    }

    #[test]
    fn reset_aborts_the_other_side_with_a_reason_naming_the_resetter() {
        for (side, reason) in [
            (Client, Reason::ClientReset),
            (Backend, Reason::BackendReset),
        ] {
            let mut s = Script::new(config());
            assert_eq!(
                s.at(SEC).on(Reset(side)),
                vec![
                    AbortWhenDelivered {
                        side: side.peer(),
                        deadline: s.start + 6 * SEC
                    },
                    Close(reason)
                ]
            );
        }
    }

    #[test]
    fn reset_of_a_half_closed_connection_still_aborts_the_peer() {
        let mut s = Script::new(config());
        s.on(Eof(Client));
        s.on(Finished(ClientToBackend));
        assert_eq!(
            s.on(Reset(Client)),
            vec![
                AbortWhenDelivered {
                    side: Backend,
                    deadline: s.start + 5 * SEC
                },
                Close(Reason::ClientReset)
            ]
        );
    }

    #[test]
    fn inactivity_close_is_a_graceful_close() {
        let mut s = Script::new(config());
        assert_eq!(s.lifecycle.deadline(), Some(s.start + 60 * SEC));
        assert_eq!(
            s.fire(Duration::ZERO),
            vec![Finish(ClientToBackend), Finish(BackendToClient)]
        );
        s.on(Finished(ClientToBackend));
        s.on(Finished(BackendToClient));
        s.on(Eof(Client));
        assert_eq!(s.on(Eof(Backend)), vec![Close(Reason::InactivityTimeout)]);
    }

    #[test]
    fn inactivity_timer_follows_reported_activity() {
        let mut s = Script::new(config());
        assert_eq!(s.fire(50 * SEC), vec![]);
        assert_eq!(s.lifecycle.deadline(), Some(s.start + 110 * SEC));
    }

    #[test]
    fn inactivity_reset_counts_and_rearms_and_never_closes() {
        let mut s = Script::new(LifecycleConfig {
            timeout_behavior: TimeoutBehavior::Reset,
            ..config()
        });
        for round in 1..=100u32 {
            assert_eq!(s.fire(Duration::ZERO), vec![InactivityReset]);
            assert_eq!(
                s.lifecycle.deadline(),
                Some(s.start + 60 * SEC * (round + 1))
            );
        }
        assert_eq!(s.lifecycle.closed(), None);
    }

    #[test]
    fn inactivity_ignore_arms_no_timer() {
        let s = Script::new(LifecycleConfig {
            timeout_behavior: TimeoutBehavior::Ignore,
            ..config()
        });
        assert_eq!(s.lifecycle.deadline(), None);
    }

    #[test]
    fn graceful_close_is_destroyed_after_grace_period() {
        let mut s = Script::new(config());
        s.fire(Duration::ZERO);
        assert_eq!(s.lifecycle.deadline(), Some(s.start + 65 * SEC));
        assert_eq!(
            s.fire(Duration::ZERO),
            vec![
                Abort(Client),
                Abort(Backend),
                Close(Reason::InactivityTimeout)
            ]
        );
    }

    #[test]
    fn graceful_close_whose_directions_both_finished_ends_with_fin_at_the_deadline() {
        let mut s = Script::new(config());
        s.fire(Duration::ZERO);
        s.on(Finished(ClientToBackend));
        s.on(Finished(BackendToClient));
        assert_eq!(
            s.fire(Duration::ZERO),
            vec![Close(Reason::InactivityTimeout)]
        );
    }

    #[test]
    fn parity_check_closes_a_silent_half_open_connection() {
        let mut s = Script::new(LifecycleConfig {
            timeout_behavior: TimeoutBehavior::Ignore,
            ..config()
        });
        s.at(2 * SEC).on(Eof(Client));
        s.on(Finished(ClientToBackend));
        // Finished at 2 s, idle since 0: both conditions hold at 32 s.
        assert_eq!(s.lifecycle.deadline(), Some(s.start + 32 * SEC));
        assert_eq!(s.fire(Duration::ZERO), vec![Finish(BackendToClient)]);
        s.on(Finished(BackendToClient));
        assert_eq!(s.on(Eof(Backend)), vec![Close(Reason::ParityCheck)]);
    }

    #[test]
    fn parity_check_closes_a_direction_that_never_finishes_delivering() {
        let mut s = Script::new(LifecycleConfig {
            timeout_behavior: TimeoutBehavior::Ignore,
            ..config()
        });
        // The client's FIN at 2 s; its direction never reports Finished (a destination
        // that does not read).
        s.at(2 * SEC).on(Eof(Client));
        assert_eq!(s.lifecycle.deadline(), Some(s.start + 32 * SEC));
        assert_eq!(s.fire(Duration::ZERO), vec![Finish(BackendToClient)]);
        s.on(Finished(BackendToClient));
        // Still not delivered at the end of the grace period: cut, both sides.
        assert_eq!(
            s.fire(Duration::ZERO),
            vec![Abort(Client), Abort(Backend), Close(Reason::ParityCheck)]
        );
    }

    #[test]
    fn parity_check_counts_from_the_first_fin_when_both_sides_ended() {
        let mut s = Script::new(LifecycleConfig {
            timeout_behavior: TimeoutBehavior::Ignore,
            ..config()
        });
        s.at(SEC).on(Eof(Client));
        s.at(3 * SEC).on(Eof(Backend));
        s.on(Finished(BackendToClient));
        // client->backend never finishes.
        assert_eq!(s.lifecycle.deadline(), Some(s.start + 31 * SEC));
        assert_eq!(s.fire(Duration::ZERO), vec![]);
        assert_eq!(
            s.fire(Duration::ZERO),
            vec![Abort(Client), Abort(Backend), Close(Reason::ParityCheck)]
        );
    }

    #[test]
    fn parity_check_spares_a_half_open_connection_that_keeps_moving() {
        let mut s = Script::new(LifecycleConfig {
            timeout_behavior: TimeoutBehavior::Ignore,
            ..config()
        });
        s.on(Eof(Client));
        s.on(Finished(ClientToBackend));
        // The open direction moved bytes 25 s in: not idle long enough at 30 s.
        assert_eq!(s.fire(25 * SEC), vec![]);
        assert_eq!(s.lifecycle.deadline(), Some(s.start + 35 * SEC));
        assert_eq!(s.fire(34 * SEC), vec![]);
        assert_eq!(s.lifecycle.closed(), None);
    }

    #[test]
    fn no_half_open_turns_a_fin_into_a_graceful_close_of_both_directions() {
        let mut s = Script::new(LifecycleConfig {
            allow_half_open: false,
            ..config()
        });
        assert_eq!(
            s.on(Eof(Client)),
            vec![Finish(ClientToBackend), Finish(BackendToClient)]
        );
        s.on(Finished(BackendToClient));
        s.on(Finished(ClientToBackend));
        assert_eq!(s.on(Eof(Backend)), vec![Close(Reason::Normal)]);
    }

    #[test]
    fn no_half_open_closes_after_grace_when_the_peer_never_answers_the_fin() {
        let mut s = Script::new(LifecycleConfig {
            allow_half_open: false,
            ..config()
        });
        s.on(Eof(Backend));
        s.on(Finished(BackendToClient));
        s.on(Finished(ClientToBackend));
        assert_eq!(s.fire(Duration::ZERO), vec![Close(Reason::Normal)]);
    }

    #[test]
    fn shutdown_lets_the_connection_finish_on_its_own() {
        let mut s = Script::new(config());
        assert_eq!(s.on(Shutdown), vec![]);
        s.on(Eof(Client));
        s.on(Eof(Backend));
        s.on(Finished(ClientToBackend));
        assert_eq!(s.on(Finished(BackendToClient)), vec![Close(Reason::Normal)]);
    }

    #[test]
    fn shutdown_closes_what_is_left_after_grace_period() {
        let mut s = Script::new(config());
        s.at(SEC).on(Shutdown);
        assert_eq!(s.lifecycle.deadline(), Some(s.start + 6 * SEC));
        // Idle or not at that instant, an open stream is cut on both sides.
        assert_eq!(
            s.fire(6 * SEC),
            vec![Abort(Client), Abort(Backend), Close(Reason::Shutdown)]
        );
    }

    #[test]
    fn shutdown_ends_with_fin_where_both_directions_finished() {
        let mut s = Script::new(config());
        s.on(Eof(Client));
        s.on(Finished(ClientToBackend));
        s.on(Shutdown);
        s.on(Eof(Backend));
        s.on(Finished(BackendToClient));
        // Both finished and both sent FIN: closed normally before the deadline.
        assert_eq!(s.lifecycle.closed(), Some(Reason::Normal));
    }

    #[test]
    fn cut_aborts_both_sides_unless_both_directions_finished() {
        let mut s = Script::new(config());
        s.on(Shutdown);
        s.on(Eof(Client));
        s.on(Finished(ClientToBackend));
        assert_eq!(
            s.on(Cut),
            vec![Abort(Client), Abort(Backend), Close(Reason::Shutdown)]
        );
        assert_eq!(s.lifecycle.deadline(), None);

        let mut s = Script::new(config());
        s.fire(Duration::ZERO);
        s.on(Finished(ClientToBackend));
        s.on(Finished(BackendToClient));
        assert_eq!(s.on(Cut), vec![Close(Reason::Shutdown)]);
    }

    #[test]
    fn reset_during_graceful_close_keeps_the_first_reason() {
        let mut s = Script::new(config());
        s.fire(Duration::ZERO);
        assert_eq!(
            s.on(Reset(Backend)),
            vec![
                AbortWhenDelivered {
                    side: Client,
                    deadline: s.start + 65 * SEC
                },
                Close(Reason::InactivityTimeout)
            ]
        );
    }

    /// A lifecycle moved to a successor (through its JSON record) keeps its state and its
    /// deadlines: a half-closed connection stays half-closed, its parity timer unchanged.
    #[test]
    fn a_recorded_lifecycle_resumes_with_its_state_and_deadlines() {
        let t0 = Instant::now();
        let mut original = Lifecycle::new(Arc::new(config()), t0);
        original.on_event(Event::Eof(Side::Client), t0 + SEC);
        original.on_event(Event::Finished(Direction::ClientToBackend), t0 + 2 * SEC);
        original.on_event(Event::Shutdown, t0 + 3 * SEC);
        // An arbitrary origin: the record holds absolute clock readings.
        let origin = 7_000_000_000_000u64;
        let ns = |at: Instant| origin + at.duration_since(t0).as_nanos() as u64;
        let instant = |at: u64| t0 + Duration::from_nanos(at - origin);
        let json = serde_json::to_string(&original.record(ns)).expect("serializable");
        let record: LifecycleRecord = serde_json::from_str(&json).expect("deserializable");
        let mut moved = Lifecycle::from_record(&record, instant);
        assert_eq!(moved.deadline(), original.deadline());
        assert!(moved.is_half_open());
        let now = t0 + 4 * SEC;
        assert_eq!(
            moved.on_event(Event::Eof(Side::Backend), now),
            original.on_event(Event::Eof(Side::Backend), now)
        );
        assert_eq!(
            moved.on_event(Event::Finished(Direction::BackendToClient), now),
            vec![Action::Close(Reason::Normal)]
        );
    }

    /// A lifecycle taken over from a predecessor shares the route's settings only if they
    /// are the ones it runs by (a reload may have changed the route since).
    #[test]
    fn a_recorded_lifecycle_shares_only_equal_settings() {
        let t0 = Instant::now();
        let record = Lifecycle::new(Arc::new(config()), t0).record(|_| 0);
        let mut moved = Lifecycle::from_record(&record, |_| t0);
        let other = Arc::new(LifecycleConfig {
            grace_period: Duration::ZERO,
            ..config()
        });
        moved.share_config(&other);
        assert!(!Arc::ptr_eq(&moved.config, &other));
        let route = Arc::new(config());
        moved.share_config(&route);
        assert!(Arc::ptr_eq(&moved.config, &route));
    }

    #[test]
    fn zero_grace_period_closes_at_once() {
        let mut s = Script::new(LifecycleConfig {
            grace_period: Duration::ZERO,
            ..config()
        });
        assert_eq!(
            s.on(Shutdown),
            vec![Abort(Client), Abort(Backend), Close(Reason::Shutdown)]
        );
    }

    /// Drives random event sequences through the lifecycle the way a data path would
    /// (it only reports `Finished` for directions it was told to finish) and checks the
    /// invariants after every step. Replay one seed with `LIFECYCLE_SEED=N`.
    #[test]
    fn random_sequences_close_exactly_once_and_leave_nothing_armed() {
        let seeds: Vec<u64> = match std::env::var("LIFECYCLE_SEED") {
            Ok(seed) => vec![seed.parse().expect("LIFECYCLE_SEED is a number")],
            Err(_) => (0..2_000).collect(),
        };
        for seed in seeds {
            run_random_sequence(seed);
        }
    }

    fn run_random_sequence(seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let behaviors = [
            TimeoutBehavior::Close,
            TimeoutBehavior::Reset,
            TimeoutBehavior::Ignore,
        ];
        let config = LifecycleConfig {
            timeout_behavior: behaviors[rng.gen_range(0..3)],
            allow_half_open: rng.gen_bool(0.7),
            grace_period: Duration::from_secs(rng.gen_range(0..3)),
            ..config()
        };
        let start = Instant::now();
        let mut now = start;
        let mut last_activity = start;
        let mut lifecycle = Lifecycle::new(Arc::new(config), now);
        let mut to_finish: Vec<Direction> = Vec::new();
        let mut eof_sent = [false; 2];
        let mut closes = 0;
        for step in 0..200 {
            let context = format!("seed {seed} step {step}");
            let event = match rng.gen_range(0..7) {
                0 if !to_finish.is_empty() => {
                    Finished(to_finish.remove(rng.gen_range(0..to_finish.len())))
                }
                1 | 2 => {
                    let side = if rng.gen_bool(0.5) { Client } else { Backend };
                    let index = Direction::from_source(side).index();
                    if eof_sent[index] {
                        continue;
                    }
                    eof_sent[index] = true;
                    Eof(side)
                }
                3 if rng.gen_bool(0.1) => Reset(if rng.gen_bool(0.5) { Client } else { Backend }),
                4 if rng.gen_bool(0.2) => Shutdown,
                4 if rng.gen_bool(0.05) => Cut,
                _ => match lifecycle.deadline() {
                    Some(deadline) => {
                        now = now.max(deadline);
                        if rng.gen_bool(0.5) {
                            last_activity = now - Duration::from_millis(rng.gen_range(0..5_000));
                        }
                        Timer { last_activity }
                    }
                    None => continue,
                },
            };
            let was_closed = lifecycle.closed().is_some();
            let actions = lifecycle.on_event(event, now);
            if was_closed {
                assert!(
                    actions.is_empty(),
                    "{context}: action after close: {actions:?}"
                );
            }
            for action in &actions {
                match *action {
                    Finish(direction) => {
                        assert!(!to_finish.contains(&direction), "{context}: finished twice");
                        to_finish.push(direction);
                    }
                    Close(_) => closes += 1,
                    Abort(_) | AbortWhenDelivered { .. } | InactivityReset => {}
                }
            }
            if lifecycle.closed().is_some() {
                assert_eq!(
                    lifecycle.deadline(),
                    None,
                    "{context}: deadline after close"
                );
            } else {
                // A live connection always has a way to end: a timer, or events still due.
                let waiting_on_peers = !to_finish.is_empty() || eof_sent != [true, true];
                assert!(
                    lifecycle.deadline().is_some() || waiting_on_peers,
                    "{context}: live connection that nothing can end"
                );
                // Once a side ended, a timer always runs: a direction that never finishes
                // delivering must not keep the connection forever.
                assert!(
                    lifecycle.deadline().is_some() || eof_sent == [false, false],
                    "{context}: a side ended and no timer runs"
                );
            }
            assert!(closes <= 1, "{context}: closed {closes} times");
        }
    }
}
