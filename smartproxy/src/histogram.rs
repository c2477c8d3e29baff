//! Lock-free latency histograms (connection duration, backend connect) and their
//! Prometheus-shaped snapshots. A leaf: stats and health both keep histograms.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds, in seconds, of the connection duration histogram: from short requests
/// to the day-long connections this proxy is made for.
pub const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0, 86400.0,
];
/// Upper bounds, in seconds, of the backend connect histogram: loopback to a slow WAN.
pub const CONNECT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A lock-free histogram: one counter per bucket (not cumulative) plus `+Inf`, and the
/// sum in microseconds (a u64 of microseconds holds half a million years).
#[derive(Debug)]
pub(crate) struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub(crate) fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub(crate) fn observe(&self, value: Duration) {
        // Prometheus buckets count the observations `<= le`.
        let secs = value.as_secs_f64();
        let bucket = self.bounds.partition_point(|&le| le < secs);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// The raw counts (per bucket, `+Inf` last) and the sum in microseconds, for a
    /// successor process to add to its own ([`Histogram::add`]).
    pub(crate) fn raw(&self) -> (Vec<u64>, u64) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (
            self.counts.iter().map(load).collect(),
            load(&self.sum_micros),
        )
    }

    /// Adds counts taken by [`Histogram::raw`] of a histogram with the same bounds;
    /// counts of other bounds are ignored (false).
    pub(crate) fn add(&self, counts: &[u64], sum_micros: u64) -> bool {
        if counts.len() != self.counts.len() {
            return false;
        }
        for (own, more) in self.counts.iter().zip(counts) {
            own.fetch_add(*more, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add(sum_micros, Ordering::Relaxed);
        true
    }

    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (le, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            buckets.push(BucketSnapshot {
                le: *le,
                count: cumulative,
            });
        }
        let overflow = self.counts.last().map_or(0, |c| c.load(Ordering::Relaxed));
        HistogramSnapshot {
            buckets,
            count: cumulative + overflow,
            sum_secs: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// A histogram: cumulative buckets (`count` of observations `<= le` seconds; `+Inf` is
/// `count`), as Prometheus has them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    pub buckets: Vec<BucketSnapshot>,
    pub count: u64,
    pub sum_secs: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BucketSnapshot {
    pub le: f64,
    pub count: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_count_observations_up_to_and_including_their_bound() {
        let h = Histogram::new(&[0.1, 1.0]);
        for ms in [50, 100, 101, 1000, 5000] {
            h.observe(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        let counts: Vec<(f64, u64)> = s.buckets.iter().map(|b| (b.le, b.count)).collect();
        assert_eq!(counts, [(0.1, 2), (1.0, 4)], "cumulative, `<= le`");
        assert_eq!(s.count, 5, "+Inf holds every observation");
        assert!((s.sum_secs - 6.251).abs() < 1e-9, "sum {}", s.sum_secs);
    }
}
