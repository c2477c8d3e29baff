//! Heartbeats: --idle-conns connections that each exchange one --message-size echo every
//! [`EVERY`], the way WebSocket pings and database keepalives keep long-lived connections
//! alive. The heartbeats are spread evenly over each period, one at a time from one thread,
//! so each connection is quiet between two of its own. What it measures is what such a
//! connection costs while it is mostly idle: CPU and context switches per heartbeat, each
//! heartbeat's round trip, and the proxy's RSS per connection at the end.
//!
//! [`EVERY`] is longer than smartproxy's default `park_idle_after` (1 s) plus its sweep
//! (0.5 s): the first heartbeats find their connection parked and take it up again
//! (`smartproxy/src/park/mod.rs`), until its park delay has grown past the period
//! ([`WARM_UP`]).

use std::{
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::{echo_round_trip, idle, open_echo_connections, Env};
use crate::bench::{
    metric::{quantile, CpuCounters, Measurement, Metric},
    system,
    units::KIB,
    wire::ReadWaits,
};

/// How often each connection sends its heartbeat.
pub const EVERY: Duration = Duration::from_secs(5);
/// Heartbeats before the measured window: four periods. smartproxy parks a connection
/// after 1 s of quiet, and one that traffic takes up soon after parks later each time (2,
/// 4, then 8 s: `PARK_PAYS_AFTER` in `smartproxy/src/park/mod.rs`), so from the fourth
/// heartbeat on it keeps its task between two. The first heartbeats start as soon as the
/// last connection is open, before the sweep (1,024 connections per 0.5 s) has asked
/// every connection to park: one period more lets those catch up.
pub const WARM_UP: Duration = EVERY.saturating_mul(4);
/// The measured window: one heartbeat per connection.
pub const MEASURED: Duration = EVERY;

// The warm-up covers the back-off with smartproxy's defaults: each of the first three
// heartbeats that find their connection parked comes after its delay of 1, 2 or 4 s and a
// sweep of 0.5 s at most, and the fourth delay (8 s) is longer than the period. Each
// connection sends at least once in the window.
const _: () = assert!(
    EVERY.as_millis() > 4_500
        && EVERY.as_millis() < 8_000
        && MEASURED.as_millis() >= EVERY.as_millis()
);

pub fn run(env: &Env<'_>) -> Result<Measurement> {
    let n = env.params.idle_conns;
    thread::sleep(idle::SETTLE);
    let rss_before = env.proxy_pid.map(system::tree_rss_bytes).transpose()?;
    let mut waits = ReadWaits::default();
    let mut conns = open_echo_connections(env, n, "heartbeat", &mut waits, |_| {})?;
    if conns.is_empty() {
        bail!("heartbeat: no connection to send heartbeats on");
    }

    // Heartbeat `j` goes to connection `j % n` at `start + j × spacing`.
    let spacing = EVERY / u32::try_from(n).context("heartbeat: too many connections")?;
    let start = Instant::now();
    let measure_from = start + WARM_UP;
    let measure_until = measure_from + MEASURED;
    let mut counters = None;
    let mut samples_us = Vec::new();
    for j in 0.. {
        let due = start + spacing * u32::try_from(j).context("heartbeat: schedule overflow")?;
        if due >= measure_until {
            break;
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        if due >= measure_from && counters.is_none() {
            counters = Some(CpuCounters::read(env.proxy_pid)?);
        }
        let sent = Instant::now();
        echo_round_trip(&mut conns[j % n], env.params.message, &mut waits)
            .with_context(|| format!("heartbeat {j} on connection {} failed", j % n))?;
        if due >= measure_from {
            // From the send, not from when it was due: the sleep before it overshoots by
            // the timer's slack. A load generator that falls behind shows in heartbeats/s.
            samples_us.push(sent.elapsed().as_micros() as u64);
        }
    }
    let spent = counters
        .context("heartbeat: the measured window never started")?
        .spent(env.proxy_pid)?;
    let rss_after = env.proxy_pid.map(system::tree_rss_bytes).transpose()?;
    drop(conns);

    let beats = samples_us.len().max(1) as f64;
    samples_us.sort_unstable();
    let mut m = Measurement::default();
    m.set(
        Metric::HeartbeatsPerSec,
        samples_us.len() as f64 / spent.wall,
    );
    if let Some(proxy) = spent.proxy {
        m.set(Metric::ProxyCpuPerHeartbeat, proxy / beats * 1e6);
    }
    m.set(Metric::MachineCpuPerHeartbeat, spent.machine / beats * 1e6);
    m.set(Metric::CtxPerHeartbeat, spent.ctxt as f64 / beats);
    for (metric, q) in [(Metric::LatencyP50, 0.5), (Metric::LatencyP99, 0.99)] {
        if let Some(us) = quantile(&samples_us, q) {
            m.set(metric, us as f64);
        }
    }
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        m.set(
            Metric::ProxyRssPerConn,
            (after as f64 - before as f64) / n as f64 / KIB as f64,
        );
    }
    m.set(Metric::LongestReadWait, waits.longest.as_secs_f64() * 1e3);
    Ok(m)
}
