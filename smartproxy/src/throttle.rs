//! Warnings that a burst could repeat thousands of times a second (every new connection
//! while the kernel maps are full): at most one per interval, and the one that goes out
//! says how many were held back since the last.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            state: Mutex::default(),
        }
    }

    /// `Some(held back since the last one)` if a warning may go out at `now`; `None`
    /// counts this one as held back.
    pub fn admit(&self, now: Instant) -> Option<u64> {
        // Each guarded operation leaves the state whole: a poisoned lock is still sound.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            state.held_back += 1;
            return None;
        }
        state.last = Some(now);
        Some(std::mem::take(&mut state.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_interval_then_the_count_of_those_held_back() {
        let throttle = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(throttle.admit(t0), Some(0));
        for s in 1..=3 {
            assert_eq!(throttle.admit(t0 + Duration::from_secs(s)), None);
        }
        assert_eq!(throttle.admit(t0 + Duration::from_secs(10)), Some(3));
        assert_eq!(throttle.admit(t0 + Duration::from_secs(11)), None);
        assert_eq!(throttle.admit(t0 + Duration::from_secs(25)), Some(1));
    }
}
