//! The adaptive data path's policy (`data_path = "auto"`): which path a connection's
//! bytes should take, from the traffic it shows. Pure logic: the relay feeds it the bytes
//! it read and the bytes moved while the kernel redirects, and carries out the moves.
//!
//! A connection starts on the relay, out of the kernel's maps: small messages cost less
//! there than a redirect, which takes a kworker hop per skb (`docs/kernel-notes.md#redirect-cost`).
//! It goes into the kernel once both directions reach `auto_splice_rate` within one
//! `auto_window` (either one with `auto_splice_one_way`: a one-way stream is faster on the
//! relay, see `DEFAULT_AUTO_SPLICE_ONE_WAY` in `smartproxy/src/config.rs`), and back out
//! (to pass mode: the sockets stay in the maps, and the verdict passes every skb up to
//! the relay) when a window in the kernel moves less than `auto_leave_rate`, both
//! directions together. From pass mode either direction at the splice rate takes it back
//! to redirect. After `auto_max_moves` moves it stays.

use std::time::{Duration, Instant};

use crate::config::AutoConfig;

/// Where a connection's bytes move now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// Userspace copies them: out of the maps, or in pass mode.
    Relay,
    /// The verdict redirects them.
    Kernel,
}

/// One connection's policy state.
#[derive(Clone, Debug)]
pub struct Policy {
    config: AutoConfig,
    place: Place,
    moves: u32,
    /// The current read window's start, and the bytes read per direction since.
    window_start: Option<Instant>,
    read_in_window: [u64; 2],
    /// The relay's read totals per direction when last fed.
    read_seen: [u64; 2],
    /// Bytes moved both ways, as of the last tick in the kernel.
    moved_seen: u64,
}

impl Policy {
    /// A connection at `place` that made `moves` moves so far; `read` and `moved` are its
    /// totals now (see [`Policy::on_reads`], [`Policy::on_tick`]).
    pub fn new(config: AutoConfig, place: Place, moves: u32, read: [u64; 2], moved: u64) -> Policy {
        Policy {
            config,
            place,
            moves,
            window_start: None,
            read_in_window: [0; 2],
            read_seen: read,
            moved_seen: moved,
        }
    }

    pub fn place(&self) -> Place {
        self.place
    }

    pub fn moves(&self) -> u32 {
        self.moves
    }

    pub fn window(&self) -> Duration {
        self.config.window
    }

    /// The relay has read `read` bytes per direction in all (its totals, so that no read
    /// is missed between two calls). True: on the relay, and both directions reached the
    /// splice rate within the current window, with a move left. Either direction is
    /// enough with `splice_one_way`, or when the connection is `spliced` already (pass
    /// mode): its skbs go through the verdict either way, and in the one measurement of
    /// pass mode one stream was faster redirected than passed (docs/performance.md, "Pass
    /// mode as a path of its own").
    pub fn on_reads(&mut self, read: [u64; 2], now: Instant, spliced: bool) -> bool {
        let fresh = [0, 1].map(|i| read[i].saturating_sub(self.read_seen[i]));
        self.read_seen = read;
        if self.place == Place::Kernel || !self.may_move() {
            return false;
        }
        let current = self
            .window_start
            .is_some_and(|start| now.saturating_duration_since(start) < self.config.window);
        if !current {
            self.window_start = Some(now);
            self.read_in_window = [0; 2];
        }
        for (in_window, fresh) in self.read_in_window.iter_mut().zip(fresh) {
            *in_window += fresh;
        }
        let threshold = bytes_per_window(self.config.splice_rate, self.config.window);
        let reached = self.read_in_window.map(|bytes| bytes >= threshold);
        if self.config.splice_one_way || spliced {
            reached.contains(&true)
        } else {
            reached == [true; 2]
        }
    }

    /// One window passed in the kernel; `moved` is every byte the connection moved so far,
    /// both ways, by either path. True: less than the leave rate moved in that window, with
    /// a move left.
    pub fn on_tick(&mut self, moved: u64) -> bool {
        let in_window = moved.saturating_sub(self.moved_seen);
        self.moved_seen = moved;
        self.place == Place::Kernel
            && self.may_move()
            && in_window < bytes_per_window(self.config.leave_rate, self.config.window)
    }

    /// The connection moved to `place` (or tried to and could not: a failed splice uses up
    /// a move too, so that a full map is not tried again and again); `moved` and `read` are
    /// its totals now. Measuring starts afresh there: what the relay read before (passed
    /// bytes while in the kernel, say) does not count in the first window after.
    pub fn moved(&mut self, place: Place, moved: u64, read: [u64; 2]) {
        self.place = place;
        self.moves += 1;
        self.window_start = None;
        self.read_in_window = [0; 2];
        self.read_seen = read;
        self.moved_seen = moved;
    }

    /// In the kernel with a move left: the relay must tick each window to see whether the
    /// connection should leave ([`Policy::on_tick`]).
    pub fn measures_kernel(&self) -> bool {
        self.place == Place::Kernel && self.may_move()
    }

    fn may_move(&self) -> bool {
        self.moves < self.config.max_moves
    }
}

/// `rate` bytes per second over `window`, at least one byte.
fn bytes_per_window(rate: u64, window: Duration) -> u64 {
    let bytes = u128::from(rate) * window.as_nanos() / 1_000_000_000;
    u64::try_from(bytes).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn config() -> AutoConfig {
        AutoConfig {
            splice_rate: 10 * MIB,
            splice_one_way: false,
            leave_rate: MIB,
            window: Duration::from_millis(100),
            max_moves: 3,
        }
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn traffic_at_the_splice_rate_both_ways_goes_into_the_kernel_within_a_window() {
        let t0 = Instant::now();
        let mut policy = Policy::new(config(), Place::Relay, 0, [0; 2], 0);
        // 1 MiB per window is the threshold at 10 MiB/s over 100 ms.
        assert!(!policy.on_reads([512 * 1024, 512 * 1024], at(t0, 0), false));
        assert!(!policy.on_reads([MIB, 512 * 1024], at(t0, 30), false));
        assert!(policy.on_reads([MIB, MIB], at(t0, 50), false));
    }

    #[test]
    fn each_direction_at_the_rate_in_a_window_of_its_own_stays_on_the_relay() {
        let t0 = Instant::now();
        let mut policy = Policy::new(config(), Place::Relay, 0, [0; 2], 0);
        assert!(!policy.on_reads([MIB, 0], at(t0, 0), false));
        assert!(!policy.on_reads([MIB, MIB], at(t0, 150), false));
    }

    #[test]
    fn in_pass_mode_one_direction_at_the_rate_redirects_again() {
        let t0 = Instant::now();
        let mut policy = Policy::new(config(), Place::Relay, 2, [0; 2], 0);
        assert!(policy.on_reads([0, MIB], at(t0, 0), true));
    }

    #[test]
    fn bytes_read_before_a_move_do_not_count_after_it() {
        let t0 = Instant::now();
        let mut policy = Policy::new(config(), Place::Kernel, 1, [0; 2], 0);
        // In the kernel the verdict passed 5 MiB each way up to the relay, then it left.
        policy.moved(Place::Relay, 10 * MIB, [5 * MIB; 2]);
        assert!(!policy.on_reads([5 * MIB + 1024; 2], at(t0, 0), true));
    }

    #[test]
    fn a_one_way_stream_goes_into_the_kernel_only_with_splice_one_way() {
        let t0 = Instant::now();
        let mut both_ways = Policy::new(config(), Place::Relay, 0, [0; 2], 0);
        let one_way_config = AutoConfig {
            splice_one_way: true,
            ..config()
        };
        let mut one_way = Policy::new(one_way_config, Place::Relay, 0, [0; 2], 0);
        for window in 0..10u64 {
            let read = [0, (window + 1) * 100 * MIB];
            assert!(!both_ways.on_reads(read, at(t0, window * 100), false));
        }
        assert!(one_way.on_reads([0, MIB], at(t0, 0), false));
    }

    #[test]
    fn the_same_bytes_spread_over_several_windows_stay_on_the_relay() {
        let t0 = Instant::now();
        let mut policy = Policy::new(config(), Place::Relay, 0, [0; 2], 0);
        for window in 0..10u64 {
            let total = (window + 1) * 600 * 1024;
            assert!(!policy.on_reads([total; 2], at(t0, window * 150), false));
        }
    }

    #[test]
    fn both_directions_are_measured_apart_for_the_splice() {
        let t0 = Instant::now();
        let mut policy = Policy::new(config(), Place::Relay, 0, [0; 2], 0);
        assert!(!policy.on_reads([600 * 1024, 600 * 1024], at(t0, 10), false));
    }

    #[test]
    fn reads_before_the_policy_began_do_not_count() {
        let t0 = Instant::now();
        let mut policy = Policy::new(config(), Place::Relay, 0, [100 * MIB; 2], 0);
        assert!(!policy.on_reads([100 * MIB + 1024; 2], at(t0, 0), false));
    }

    #[test]
    fn a_quiet_window_in_the_kernel_moves_it_out_and_a_busy_one_keeps_it() {
        let mut policy = Policy::new(config(), Place::Kernel, 1, [0; 2], 0);
        assert!(
            !policy.on_tick(5 * MIB),
            "5 MiB in a window is above the leave rate"
        );
        assert!(
            policy.on_tick(5 * MIB + 50 * 1024),
            "50 KiB in a window is below 1 MiB/s"
        );
        policy.moved(Place::Relay, 5 * MIB + 50 * 1024, [0; 2]);
        assert_eq!(policy.place(), Place::Relay);
        assert!(!policy.on_tick(6 * MIB), "ticks only count in the kernel");
    }

    #[test]
    fn between_the_two_rates_nothing_moves() {
        // 5 MiB/s: below the splice rate, above the leave rate.
        let t0 = Instant::now();
        let mut relay = Policy::new(config(), Place::Relay, 0, [0; 2], 0);
        let mut kernel = Policy::new(config(), Place::Kernel, 1, [0; 2], 0);
        for window in 1..=20u64 {
            let total = window * 512 * 1024;
            assert!(!relay.on_reads([total; 2], at(t0, window * 100), false));
            assert!(!kernel.on_tick(total));
        }
    }

    #[test]
    fn after_the_last_move_it_stays_where_it_is() {
        let t0 = Instant::now();
        let mut policy = Policy::new(config(), Place::Relay, 0, [0; 2], 0);
        assert!(policy.on_reads([2 * MIB; 2], at(t0, 0), false));
        policy.moved(Place::Kernel, 4 * MIB, [2 * MIB; 2]);
        assert!(policy.on_tick(4 * MIB));
        policy.moved(Place::Relay, 4 * MIB, [2 * MIB; 2]);
        assert!(policy.on_reads([4 * MIB; 2], at(t0, 500), false));
        policy.moved(Place::Kernel, 8 * MIB, [4 * MIB; 2]);
        assert_eq!(policy.moves(), 3);
        assert!(!policy.on_tick(8 * MIB), "the cap of 3 moves is reached");
        assert_eq!(policy.place(), Place::Kernel);
    }

    #[test]
    fn a_splice_rate_of_one_byte_a_second_one_way_splices_at_the_first_read() {
        // The test harness's knobs (`test-support/src/data_path.rs`).
        let mut policy = Policy::new(
            AutoConfig {
                splice_rate: 1,
                splice_one_way: true,
                leave_rate: 0,
                ..config()
            },
            Place::Relay,
            0,
            [0; 2],
            0,
        );
        assert!(policy.on_reads([1, 0], Instant::now(), false));
    }
}
