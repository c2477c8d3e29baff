//! What one scenario run against one target measured: named metrics with units, and the CPU
//! counters read around a measured window.

use std::{collections::BTreeMap, time::Instant};

use anyhow::Result;

use super::system;

/// Every number the bench reports. The declaration order is the row order of the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    Throughput,
    ProxyCpuPerGib,
    MachineCpuPerGib,
    CtxPerGib,
    RequestsPerSec,
    LatencyMean,
    ConnsOverRate,
    LatencyP50,
    LatencyP99,
    LatencyP999,
    CtxPerRequest,
    ConnectionsPerSec,
    ConnectionP99,
    FailedConnections,
    Refused,
    Resets,
    CtxPerConn,
    HandoffMs,
    HandoffWallMs,
    UpgradeMoved,
    UpgradeLongestGap,
    UpgradeLost,
    UpgradeFailedConnects,
    UpgradeRefused,
    HeartbeatsPerSec,
    ProxyCpuPerHeartbeat,
    MachineCpuPerHeartbeat,
    CtxPerHeartbeat,
    ProxyRssPerConn,
    ProxyRssPerConnSettled,
    KernelSlabPerConn,
    SocketMemPerConn,
    PeakInFlight,
    PeakKernelMem,
    PeakSocketMem,
    PeakProxyRss,
    Delivered,
    KernelShare,
    DataPathMoves,
    WinProbes,
    RtoTimeouts,
    Retransmits,
    LongestReadWait,
    LongestReadWaitAt,
}

impl Metric {
    pub fn label(self) -> &'static str {
        match self {
            Metric::Throughput => "throughput (Gbit/s)",
            Metric::ProxyCpuPerGib => "proxy CPU (s/GiB)",
            Metric::MachineCpuPerGib => "machine CPU (s/GiB)",
            Metric::CtxPerGib => "context switches per GiB, machine-wide",
            Metric::RequestsPerSec => "requests/s",
            Metric::LatencyMean => "mean latency (µs)",
            Metric::ConnsOverRate => "connections / rate (µs)",
            Metric::LatencyP50 => "p50 (µs)",
            Metric::LatencyP99 => "p99 (µs)",
            Metric::LatencyP999 => "p99.9 (µs)",
            Metric::CtxPerRequest => "context switches per request, machine-wide",
            Metric::ConnectionsPerSec => "connections/s",
            Metric::ConnectionP99 => "p99 connect+exchange+close (µs)",
            Metric::FailedConnections => "failed connections",
            Metric::Refused => "of which refused",
            Metric::Resets => "of which reset",
            Metric::CtxPerConn => "context switches per connection, machine-wide",
            Metric::HandoffMs => "handoff, elapsed_ms reported (ms)",
            Metric::HandoffWallMs => "handoff, wall time of the command (ms)",
            Metric::UpgradeMoved => "connections moved (reported)",
            Metric::UpgradeLongestGap => "longest gap between reads, streaming clients (ms)",
            Metric::UpgradeLost => "connections lost",
            Metric::UpgradeFailedConnects => "connects failed during the upgrade",
            Metric::UpgradeRefused => "of which refused",
            Metric::HeartbeatsPerSec => "heartbeats/s",
            Metric::ProxyCpuPerHeartbeat => "proxy CPU per heartbeat (µs)",
            Metric::MachineCpuPerHeartbeat => "machine CPU per heartbeat (µs)",
            Metric::CtxPerHeartbeat => "context switches per heartbeat, machine-wide",
            Metric::ProxyRssPerConn => "proxy RSS per conn (KiB)",
            // `idle::SETTLED` after the last connection.
            Metric::ProxyRssPerConnSettled => "proxy RSS per conn, 8 s after the last (KiB)",
            Metric::KernelSlabPerConn => "kernel slab per conn (KiB)",
            Metric::SocketMemPerConn => "socket buffers per conn (KiB)",
            Metric::PeakInFlight => "peak bytes in flight (MiB)",
            Metric::PeakKernelMem => "peak kernel memory, machine-wide (MiB)",
            Metric::PeakSocketMem => "peak socket memory, machine-wide (MiB)",
            Metric::PeakProxyRss => "peak proxy RSS growth (MiB)",
            Metric::Delivered => "delivered (MiB)",
            Metric::KernelShare => "bytes through kernel (%)",
            Metric::DataPathMoves => "data path moves (to kernel + to relay)",
            Metric::WinProbes => "zero-window probes",
            Metric::RtoTimeouts => "RTO timeouts",
            Metric::Retransmits => "retransmitted segments",
            Metric::LongestReadWait => "longest read wait (ms)",
            Metric::LongestReadWaitAt => "longest read wait after (MiB)",
        }
    }
}

/// One run's values. A metric that is absent does not apply to the target (shown as "—"); a
/// metric present with `None` applies but could not be read (shown as "n/a").
#[derive(Debug, Clone, Default)]
pub struct Measurement {
    values: BTreeMap<Metric, Option<f64>>,
}

impl Measurement {
    pub fn set(&mut self, metric: Metric, value: f64) {
        self.values.insert(metric, Some(value));
    }

    pub fn set_unavailable(&mut self, metric: Metric) {
        self.values.insert(metric, None);
    }

    /// Absent: does not apply. `Some(None)`: n/a.
    pub fn get(&self, metric: Metric) -> Option<Option<f64>> {
        self.values.get(&metric).copied()
    }

    pub fn metrics(&self) -> impl Iterator<Item = Metric> + '_ {
        self.values.keys().copied()
    }
}

/// CPU counters at one instant: the machine's busy time, its context switches and the
/// proxy's own CPU time (all its processes).
#[derive(Debug, Clone, Copy)]
pub struct CpuCounters {
    at: Instant,
    machine: f64,
    ctxt: u64,
    proxy: Option<f64>,
}

/// CPU seconds and context switches spent between two [`CpuCounters`].
#[derive(Debug, Clone, Copy)]
pub struct CpuSpent {
    pub wall: f64,
    pub machine: f64,
    /// Machine-wide context switches (/proc/stat `ctxt`).
    pub ctxt: u64,
    pub proxy: Option<f64>,
}

impl CpuCounters {
    pub fn read(proxy_pid: Option<u32>) -> Result<Self> {
        Ok(Self {
            at: Instant::now(),
            machine: system::machine_busy_secs()?,
            ctxt: system::context_switches()?,
            proxy: proxy_pid.map(system::tree_cpu_secs).transpose()?,
        })
    }

    /// The CPU spent from `self` until now.
    pub fn spent(&self, proxy_pid: Option<u32>) -> Result<CpuSpent> {
        let now = Self::read(proxy_pid)?;
        Ok(CpuSpent {
            wall: now.at.duration_since(self.at).as_secs_f64(),
            machine: now.machine - self.machine,
            ctxt: now.ctxt.saturating_sub(self.ctxt),
            proxy: now
                .proxy
                .zip(self.proxy)
                .map(|(after, before)| after - before),
        })
    }
}

/// The `q` quantile (0..=1) of sorted samples, nearest rank.
pub fn quantile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let samples: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile(&samples, 0.5), Some(500));
        assert_eq!(quantile(&samples, 0.99), Some(990));
        assert_eq!(quantile(&samples, 0.999), Some(999));
        assert_eq!(quantile(&samples, 1.0), Some(1000));
        assert_eq!(quantile(&[7], 0.999), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
