//! Backend health: which targets of a route a connection may try, learnt from connect
//! outcomes (passive) and, where a route asks for them, TCP checks (active).
//!
//! [`TargetState`] decides, with no I/O and no clock of its own (time comes in as `now`):
//! - passive: `fails` connect failures in a row take a target down for a back-off that
//!   doubles from `backoff` up to `backoff_max` while its trial connects keep failing.
//!   Once the back-off expires one connection tries it; one success restores it.
//! - active: `fall` failed checks in a row take it down, `rise` passed checks in a row
//!   bring it back. A route with checks leaves its down targets to them: no trial
//!   connects, the checks say when a target is back.
//!
//! When no target of a route is usable, the least recently failed one is tried anyway:
//! a proxy that refuses on stale knowledge would be worse than one slow connect.
//!
//! [`Registry`] keeps one [`TargetHealth`] per (route slot, target as written), so that a
//! reload keeps the state of the targets it keeps.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{CheckConfig, HealthConfig, Target};
use crate::histogram::{Histogram, HistogramSnapshot, CONNECT_BUCKETS};

/// How often a failing target may log a connect warning; the rest are counted and the
/// count goes with the next warning.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Whether a failed connect ran out of something on this host (descriptors, socket
/// memory, local ports) rather than being turned away by the target: such a failure says
/// nothing of the target's health, and the other targets would fail the same way.
pub fn is_local_shortage(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Why a connect failed, as counted per target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    Refused,
    Timeout,
    /// Unreachable, reset, name not resolved, ...
    Other,
}

impl FailureKind {
    pub const ALL: [FailureKind; 3] = [
        FailureKind::Refused,
        FailureKind::Timeout,
        FailureKind::Other,
    ];

    pub fn of(error: &io::Error) -> FailureKind {
        match error.kind() {
            io::ErrorKind::ConnectionRefused => FailureKind::Refused,
            io::ErrorKind::TimedOut => FailureKind::Timeout,
            _ => FailureKind::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Refused => "refused",
            FailureKind::Timeout => "timeout",
            FailureKind::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A change of a target's state, to be logged once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    Down,
    Up,
}

/// One target's health: the pure decision logic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetState {
    down: bool,
    /// Connect failures in a row.
    fails: u32,
    /// Check results in a row: passed, failed (one of them is zero).
    passes: u32,
    check_fails: u32,
    /// The back-off of a down target; doubles on each failed trial.
    backoff: Duration,
    /// When a down target may be tried by a connection; `None` while it is up, or when
    /// only the checks may bring it back.
    retry_at: Option<Instant>,
    last_failure: Option<Instant>,
    /// Connect warnings: when one was last logged, and how many were held back since.
    warned_at: Option<Instant>,
    suppressed: u64,
}

impl TargetState {
    pub fn is_up(&self) -> bool {
        !self.down
    }

    pub fn last_failure(&self) -> Option<Instant> {
        self.last_failure
    }

    /// Whether a connection may try this target now. Taking the trial of a down target
    /// whose back-off expired moves its next trial a back-off later, so that only one
    /// connection at a time pays for a target that may still be dead.
    pub fn take_usable(&mut self, now: Instant) -> bool {
        if !self.down {
            return true;
        }
        match self.retry_at {
            Some(at) if at <= now => {
                self.retry_at = Some(now + self.backoff);
                true
            }
            _ => false,
        }
    }

    pub fn connect_succeeded(&mut self) -> Option<Change> {
        self.fails = 0;
        self.restore()
    }

    pub fn connect_failed(&mut self, config: &HealthConfig, now: Instant) -> Option<Change> {
        self.last_failure = Some(now);
        self.fails = self.fails.saturating_add(1);
        if self.down {
            self.backoff = (self.backoff * 2).min(config.backoff_max);
            self.retry_at = self.trial_at(config, now);
            return None;
        }
        if self.fails < config.fails {
            return None;
        }
        self.backoff = config.backoff;
        self.take_down(config, now)
    }

    pub fn check_passed(&mut self, config: &HealthConfig) -> Option<Change> {
        self.check_fails = 0;
        self.passes = self.passes.saturating_add(1);
        let rise = config.check.map_or(1, |check| check.rise);
        if self.down && self.passes >= rise {
            return self.restore();
        }
        None
    }

    pub fn check_failed(&mut self, config: &HealthConfig, now: Instant) -> Option<Change> {
        self.last_failure = Some(now);
        self.passes = 0;
        self.check_fails = self.check_fails.saturating_add(1);
        let fall = config.check.map_or(u32::MAX, |check| check.fall);
        if !self.down && self.check_fails >= fall {
            self.backoff = config.backoff;
            return self.take_down(config, now);
        }
        None
    }

    /// A reload turned the checks off: a target that waited for them gets a trial
    /// connect at once, as it would have nothing else to bring it back.
    pub fn checks_stopped(&mut self, config: &HealthConfig, now: Instant) {
        if self.down && self.retry_at.is_none() {
            self.backoff = self.backoff.max(config.backoff);
            self.retry_at = Some(now);
        }
    }

    /// Whether a connect warning may be logged now; `Some(n)`: yes, and `n` were held
    /// back since the last one.
    pub fn warning(&mut self, now: Instant) -> Option<u64> {
        if self
            .warned_at
            .is_some_and(|at| now.saturating_duration_since(at) < WARN_INTERVAL)
        {
            self.suppressed += 1;
            return None;
        }
        self.warned_at = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    fn take_down(&mut self, config: &HealthConfig, now: Instant) -> Option<Change> {
        self.down = true;
        self.passes = 0;
        self.retry_at = self.trial_at(config, now);
        Some(Change::Down)
    }

    /// With checks, they alone bring a down target back.
    fn trial_at(&self, config: &HealthConfig, now: Instant) -> Option<Instant> {
        config.check.is_none().then(|| now + self.backoff)
    }

    fn restore(&mut self) -> Option<Change> {
        self.check_fails = 0;
        self.backoff = Duration::ZERO;
        self.retry_at = None;
        std::mem::replace(&mut self.down, false).then_some(Change::Up)
    }
}

/// Of targets none of which is usable, the one to try anyway: the least recently failed
/// (one that never failed first), the first in `candidates` order on a tie.
pub fn least_recently_failed(
    candidates: impl IntoIterator<Item = (usize, Option<Instant>)>,
) -> Option<usize> {
    candidates
        .into_iter()
        .min_by_key(|(_, failed)| *failed)
        .map(|(index, _)| index)
}

// === the shared, per-target state ===

/// Counters of one target, for stats and metrics.
#[derive(Debug)]
struct Counters {
    failures: [AtomicU64; FailureKind::ALL.len()],
    suppressed_warnings: AtomicU64,
    connect: Histogram,
}

/// What one connection may ask of a target's health: its state, under a lock held only
/// for a decision, and its counters.
#[derive(Debug)]
pub struct TargetHealth {
    pub slot: usize,
    pub target: Target,
    inner: Mutex<Inner>,
    counters: Counters,
    /// Whether a check task runs for this target.
    checking: AtomicBool,
}

#[derive(Debug)]
struct Inner {
    /// The settings of the newest generation that has this target; `check` is `None`
    /// once a generation drops it, which ends its check task.
    config: HealthConfig,
    state: TargetState,
}

impl TargetHealth {
    fn new(slot: usize, target: Target, config: HealthConfig) -> TargetHealth {
        TargetHealth {
            slot,
            target,
            inner: Mutex::new(Inner {
                config,
                state: TargetState::default(),
            }),
            counters: Counters {
                failures: std::array::from_fn(|_| AtomicU64::new(0)),
                suppressed_warnings: AtomicU64::new(0),
                connect: Histogram::new(CONNECT_BUCKETS),
            },
            checking: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change is a single call on plain data: a poisoned lock is still sound.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn take_usable(&self, now: Instant) -> bool {
        self.lock().state.take_usable(now)
    }

    pub fn last_failure(&self) -> Option<Instant> {
        self.lock().state.last_failure()
    }

    pub fn is_up(&self) -> bool {
        self.lock().state.is_up()
    }

    pub fn connected(&self, elapsed: Duration) -> Option<Change> {
        self.counters.connect.observe(elapsed);
        self.lock().state.connect_succeeded()
    }

    /// Books a failed connect. Returns the state change, and whether to warn (with how
    /// many warnings were held back since the last).
    pub fn connect_failed(&self, kind: FailureKind, now: Instant) -> (Option<Change>, Option<u64>) {
        self.counters.failures[kind.index()].fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let Inner { config, state } = &mut *inner;
        let change = state.connect_failed(config, now);
        let warning = state.warning(now);
        if warning.is_none() {
            self.counters
                .suppressed_warnings
                .fetch_add(1, Ordering::Relaxed);
        }
        (change, warning)
    }

    pub fn check_done(&self, passed: bool, now: Instant) -> Option<Change> {
        let mut inner = self.lock();
        let Inner { config, state } = &mut *inner;
        if passed {
            state.check_passed(config)
        } else {
            state.check_failed(config, now)
        }
    }

    /// The check settings in force; `None` ends the check task.
    pub fn check_config(&self) -> Option<CheckConfig> {
        self.lock().config.check
    }

    /// Claims the check task of this target: true when none runs and the caller is to
    /// start it.
    pub fn claim_checks(&self) -> bool {
        self.check_config().is_some() && !self.checking.swap(true, Ordering::AcqRel)
    }

    /// The check task is ending because checks are off. Returns true when a generation
    /// turned them on again meanwhile and the task is to go on instead.
    pub fn release_checks(&self) -> bool {
        self.checking.store(false, Ordering::Release);
        self.claim_checks()
    }

    fn configure(&self, config: HealthConfig) {
        let mut inner = self.lock();
        if config.check.is_none() {
            inner.state.checks_stopped(&config, Instant::now());
        }
        inner.config = config;
    }

    fn stop_checks(&self) {
        self.lock().config.check = None;
    }

    pub fn snapshot(&self, route: &str, active: u64) -> TargetSnapshot {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        TargetSnapshot {
            route: route.to_owned(),
            target: self.target.to_string(),
            up: self.is_up(),
            active,
            connect_failures: FailureKind::ALL
                .iter()
                .map(|kind| {
                    (
                        kind.as_str().to_owned(),
                        load(&self.counters.failures[kind.index()]),
                    )
                })
                .collect(),
            suppressed_warnings: load(&self.counters.suppressed_warnings),
            connect_seconds: self.counters.connect.snapshot(),
        }
    }
}

/// One target in `smartproxy stats --json` (`targets`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TargetSnapshot {
    pub route: String,
    /// As written in the config.
    pub target: String,
    pub up: bool,
    /// Live connections to it.
    pub active: u64,
    /// Failed connects by kind (`refused`, `timeout`, `other`), zero included.
    pub connect_failures: BTreeMap<String, u64>,
    /// Connect warnings not logged (at most one per target every [`WARN_INTERVAL`]).
    pub suppressed_warnings: u64,
    pub connect_seconds: HistogramSnapshot,
}

impl TargetSnapshot {
    pub fn failures(&self, kind: FailureKind) -> u64 {
        self.connect_failures
            .get(kind.as_str())
            .copied()
            .unwrap_or(0)
    }
}

/// Every target's health by (route slot, target): what a reload finds again.
#[derive(Debug, Default)]
pub struct Registry {
    /// Weak: a target no generation has any more is gone with its last generation.
    targets: Mutex<HashMap<(usize, Target), Weak<TargetHealth>>>,
}

impl Registry {
    /// The health of each route's targets in a new generation: `routes` holds, per route
    /// in config order, its slot, its targets and its settings. Targets of the previous
    /// generations that this one drops stop being checked.
    pub fn generation<'a>(
        &self,
        routes: impl IntoIterator<Item = (usize, &'a [Target], HealthConfig)>,
    ) -> Vec<Vec<Arc<TargetHealth>>> {
        let mut targets = self.targets.lock().unwrap_or_else(PoisonError::into_inner);
        let built: Vec<Vec<Arc<TargetHealth>>> = routes
            .into_iter()
            .map(|(slot, list, config)| {
                list.iter()
                    .map(|target| {
                        let key = (slot, target.clone());
                        match targets.get(&key).and_then(Weak::upgrade) {
                            Some(health) => {
                                health.configure(config);
                                health
                            }
                            None => {
                                let health =
                                    Arc::new(TargetHealth::new(slot, target.clone(), config));
                                targets.insert(key, Arc::downgrade(&health));
                                health
                            }
                        }
                    })
                    .collect()
            })
            .collect();
        targets.retain(|key, weak| match weak.upgrade() {
            Some(health) => {
                let kept = built
                    .iter()
                    .flatten()
                    .any(|h| (h.slot, &h.target) == (key.0, &key.1));
                if !kept {
                    health.stop_checks();
                }
                true
            }
            None => false,
        });
        built
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shortage_of_this_host_is_told_from_a_failing_target() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(is_local_shortage(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::ECONNREFUSED, libc::ETIMEDOUT, libc::EHOSTUNREACH] {
            assert!(!is_local_shortage(&io::Error::from_raw_os_error(errno)));
        }
        assert!(!is_local_shortage(&io::Error::other("no such host")));
    }

    const MS: Duration = Duration::from_millis(1);

    fn passive() -> HealthConfig {
        HealthConfig {
            fails: 2,
            backoff: 100 * MS,
            backoff_max: 300 * MS,
            check: None,
        }
    }

    fn checked() -> HealthConfig {
        HealthConfig {
            check: Some(CheckConfig {
                interval: 100 * MS,
                timeout: 50 * MS,
                rise: 2,
                fall: 2,
            }),
            ..passive()
        }
    }

    #[test]
    fn fails_in_a_row_take_a_target_down_and_one_success_restores_it() {
        let config = passive();
        let t0 = Instant::now();
        let mut state = TargetState::default();
        assert_eq!(state.connect_failed(&config, t0), None);
        assert_eq!(state.connect_succeeded(), None, "a success resets the run");
        assert_eq!(state.connect_failed(&config, t0), None);
        assert_eq!(state.connect_failed(&config, t0), Some(Change::Down));
        assert!(!state.take_usable(t0 + 99 * MS), "within the back-off");
        assert!(state.take_usable(t0 + 100 * MS), "its trial");
        assert_eq!(state.connect_succeeded(), Some(Change::Up));
        assert!(state.is_up() && state.take_usable(t0 + 100 * MS));
    }

    #[test]
    fn the_back_off_doubles_up_to_its_cap_while_trials_fail() {
        let config = passive();
        let t0 = Instant::now();
        let mut state = TargetState::default();
        state.connect_failed(&config, t0);
        state.connect_failed(&config, t0);
        let mut now = t0;
        for backoff in [100, 200, 300, 300] {
            assert!(!state.take_usable(now + (backoff - 1) * MS));
            now += backoff * MS;
            assert!(state.take_usable(now), "trial after {backoff} ms");
            assert_eq!(state.connect_failed(&config, now), None, "still down");
        }
    }

    #[test]
    fn one_connection_takes_the_trial() {
        let config = passive();
        let t0 = Instant::now();
        let mut state = TargetState::default();
        state.connect_failed(&config, t0);
        state.connect_failed(&config, t0);
        let at = t0 + 100 * MS;
        assert!(state.take_usable(at));
        assert!(
            !state.take_usable(at),
            "the next waits for the trial's outcome"
        );
    }

    #[test]
    fn checks_fall_and_rise() {
        let config = checked();
        let t0 = Instant::now();
        let mut state = TargetState::default();
        assert_eq!(state.check_failed(&config, t0), None);
        assert_eq!(state.check_passed(&config), None, "a pass resets the run");
        assert_eq!(state.check_failed(&config, t0), None);
        assert_eq!(state.check_failed(&config, t0), Some(Change::Down));
        assert!(
            !state.take_usable(t0 + Duration::from_secs(3600)),
            "with checks, no trial connects"
        );
        assert_eq!(state.check_passed(&config), None);
        assert_eq!(state.check_passed(&config), Some(Change::Up));
    }

    #[test]
    fn checks_bring_back_a_target_that_connects_took_down() {
        let config = checked();
        let t0 = Instant::now();
        let mut state = TargetState::default();
        assert_eq!(state.check_passed(&config), None);
        assert_eq!(state.check_passed(&config), None);
        state.connect_failed(&config, t0);
        assert_eq!(state.connect_failed(&config, t0), Some(Change::Down));
        assert!(!state.take_usable(t0 + Duration::from_secs(3600)));
        assert_eq!(
            state.check_passed(&config),
            None,
            "passes before it went down do not count"
        );
        assert_eq!(state.check_passed(&config), Some(Change::Up));
    }

    #[test]
    fn a_target_left_to_checks_gets_a_trial_when_they_stop() {
        let t0 = Instant::now();
        let mut state = TargetState::default();
        state.check_failed(&checked(), t0);
        assert_eq!(state.check_failed(&checked(), t0), Some(Change::Down));
        assert!(!state.take_usable(t0 + MS));
        state.checks_stopped(&passive(), t0 + MS);
        assert!(state.take_usable(t0 + MS), "tried at once");
        assert!(!state.take_usable(t0 + MS), "by one connection");
        assert_eq!(state.connect_failed(&passive(), t0 + MS), None);
        assert!(
            !state.take_usable(t0 + 100 * MS),
            "then the back-off doubles as for any failed trial"
        );
        assert!(state.take_usable(t0 + 201 * MS));
    }

    #[test]
    fn the_least_recently_failed_is_tried_when_all_are_down() {
        let t0 = Instant::now();
        let failed = [(0, Some(t0 + 2 * MS)), (1, Some(t0)), (2, Some(t0 + MS))];
        assert_eq!(least_recently_failed(failed), Some(1));
        assert_eq!(least_recently_failed([(3, Some(t0)), (4, None)]), Some(4));
        assert_eq!(least_recently_failed([]), None);
    }

    #[test]
    fn warnings_are_held_back_and_counted() {
        let t0 = Instant::now();
        let mut state = TargetState::default();
        assert_eq!(state.warning(t0), Some(0));
        assert_eq!(state.warning(t0 + MS), None);
        assert_eq!(state.warning(t0 + 2 * MS), None);
        assert_eq!(state.warning(t0 + WARN_INTERVAL), Some(2));
    }

    #[test]
    fn a_reload_keeps_the_state_of_the_targets_it_keeps() {
        let registry = Registry::default();
        let a = Target::parse("127.0.0.1:1").expect("a target");
        let b = Target::parse("127.0.0.1:2").expect("a target");
        let first = registry.generation([(0, &[a.clone(), b.clone()][..], checked())]);
        let t0 = Instant::now();
        first[0][0].connect_failed(FailureKind::Refused, t0);
        first[0][0].connect_failed(FailureKind::Refused, t0);
        assert!(!first[0][0].is_up());
        let second = registry.generation([(0, &[a.clone()][..], checked())]);
        assert!(
            Arc::ptr_eq(&first[0][0], &second[0][0]),
            "same slot, same target"
        );
        assert!(!second[0][0].is_up());
        assert_eq!(first[0][1].check_config(), None, "dropped: its checks stop");
        let other_route = registry.generation([(1, &[a][..], checked())]);
        assert!(
            other_route[0][0].is_up(),
            "another route's target is another state"
        );
    }
}
